"""``aiida-mlworkbench synthetic``: synthetic impurity databases for demonstrations and benchmarks."""

from __future__ import annotations

import click
from aiida.cmdline.utils import decorators, echo

from .root import cmd_root


@cmd_root.group('synthetic')
def cmd_synthetic() -> None:
    """Synthetic impurity databases (hosts and impurity_info nodes, no calculations) for demos and benchmarks."""


@cmd_synthetic.command('create')
@click.option(
    '-n',
    '--size',
    type=click.IntRange(min=1),
    default=1752,
    show_default=True,
    help='Number of impurity embeddings (the reference studies use 1752 and 7100).',
)
@click.option('-s', '--seed', type=int, default=0, show_default=True, help='Seed of the choice and order of the pairs.')
@click.option(
    '-L',
    '--group-label',
    type=str,
    default=None,
    help='Label of the group to create [default: mlworkbench/synthetic/<size>-seed<seed>].',
)
@click.option(
    '--reuse-existing',
    is_flag=True,
    help='If the group already holds a synthetic database of this size and seed, report it instead of failing.',
)
@decorators.with_dbenv()
def synthetic_create(size: int, seed: int, group_label: str | None, reuse_existing: bool) -> None:
    """Create a seeded synthetic impurity database in a group.

    The group holds elemental bcc, fcc and hcp hosts (StructureData) and the impurity_info Dicts that aiida-kkr's
    kkr_imp_wc takes, all marked as synthetic.
    """
    import time

    from aiida import orm

    from aiida_mlworkbench.synthetic import LATTICE_CLASSES, create_synthetic_database, default_group_label

    label = group_label or default_group_label(size, seed)
    existing = orm.QueryBuilder().append(orm.Group, filters={'label': label}).first(flat=True)
    existing_size = existing.count() if existing is not None else 0

    start = time.perf_counter()
    try:
        group = create_synthetic_database(size, seed, group_label=label, reuse_existing=reuse_existing)
    except ValueError as exception:
        echo.echo_critical(str(exception))
    elapsed = time.perf_counter() - start

    extras = group.base.extras.all
    counts = extras.get('lattice_counts', {})
    if existing_size:
        echo.echo_report(f'reusing the existing group `{group.label}` (pk {group.pk}), nothing was created.')
    else:
        echo.echo_success(
            f'created {size} synthetic impurity embeddings (seed {seed}) in {extras.get("hosts")} hosts '
            f'in {elapsed:.1f} s: group `{group.label}` (pk {group.pk}).'
        )
    for lattice in LATTICE_CLASSES:
        echo.echo(f'  {lattice}: {counts.get(lattice, 0)} embeddings')
