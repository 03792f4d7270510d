"""The ``aiida-mlworkbench`` command line: the root group that every sub-command hangs on."""

from __future__ import annotations

import click
from aiida.cmdline.groups import VerdiCommandGroup
from aiida.cmdline.params import options, types


@click.group('aiida-mlworkbench', cls=VerdiCommandGroup, context_settings={'help_option_names': ['-h', '--help']})
@options.PROFILE(type=types.ProfileParamType(load_profile=True), expose_value=False)
def cmd_root() -> None:
    """Machine learning on aiida-kkr impurity databases, with provenance."""
