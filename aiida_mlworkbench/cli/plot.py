"""``aiida-mlworkbench plot``: figures of a stored run as PNG files, drawn from the graph alone."""

from __future__ import annotations

import pathlib

import click
from aiida import orm
from aiida.cmdline.params import arguments
from aiida.cmdline.utils import decorators, echo

from .root import cmd_root


@cmd_root.group('plot')
def cmd_plot() -> None:
    """Figures of stored runs (parity plot, confusion matrix) as PNG files."""


OUTPUT = click.option(
    '-o',
    '--output',
    type=click.Path(dir_okay=False, writable=True, path_type=pathlib.Path),
    required=True,
    help='The PNG file to write.',
)


def _write(figure: str, node: orm.Node, output: pathlib.Path) -> None:
    """Draw ``figure`` of ``node`` into ``output``; a node without what the figure needs is a clear error."""
    from aiida_mlworkbench import plots

    draw = {'parity': plots.plot_parity, 'confusion': plots.plot_confusion}[figure]
    try:
        path = draw(node, output)
    except plots.PlotError as exception:
        echo.echo_critical(str(exception))
    echo.echo_success(f'wrote {path}')


@cmd_plot.command('parity')
@arguments.NODE()
@OUTPUT
@decorators.with_dbenv()
def plot_parity(node: orm.Node, output: pathlib.Path) -> None:
    """Parity plot of a regression: predicted against true value of each test row.

    NODE is an ImpurityLearningWorkChain, a score_model process or its `predictions` output.
    """
    _write('parity', node, output)


@cmd_plot.command('confusion')
@arguments.NODE()
@OUTPUT
@decorators.with_dbenv()
def plot_confusion(node: orm.Node, output: pathlib.Path) -> None:
    """Confusion matrix of a classification on its test rows.

    NODE is an ImpurityLearningWorkChain, a score_model process or its `predictions` output.
    """
    _write('confusion', node, output)
