"""Fixtures shared by the tests on real aiida-kkr archives: import them, and the processes they hold.

Import into a test module with ``from .kkr_fixtures import kkr_archives  # noqa: F401``.
"""

from __future__ import annotations

import pathlib

import pytest
from aiida import orm

ARCHIVE_PATTERNS = ('*.aiida', '*.tar.gz')
N_ARCHIVES = 17

IMPURITY_PROCESS_TYPES = (
    'aiida.calculations:kkr.kkrimp',
    'aiida.calculations:kkr.kkr',
    'aiida.workflows:kkr.imp',
    'aiida.workflows:kkr.imp_sub',
    'aiida.workflows:kkr.gf_writeout',
    'aiida.workflows:kkr.imp_dos',
    'aiida.workflows:kkr.STM',
    'aiida_kkr.workflows.kkr_imp_dos.kkr_imp_dos_wc',
)


@pytest.fixture(scope='module')
def kkr_archives(kkr_archives_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, orm.Group]:
    """Import every shared aiida-kkr archive into the test profile (once per module) and return the import groups.

    The ``*-nodes-*.tar.gz`` files are zip archives despite their names; the gzip'd ``export_*`` files are old formats,
    which :func:`~aiida_mlworkbench.kkr.import_archives` migrates to a temporary copy first. Nodes already present are
    skipped, so a second module importing them again gets the same nodes.
    """
    from aiida_mlworkbench.kkr.archives import import_archives

    paths = sorted({path for pattern in ARCHIVE_PATTERNS for path in kkr_archives_dir.glob(pattern)})
    assert len(paths) == N_ARCHIVES, f'expected {N_ARCHIVES} archives in {kkr_archives_dir}, found {len(paths)}'
    return {path.name: group for path, group in zip(paths, import_archives(paths), strict=True)}


def impurity_process_nodes() -> list[orm.ProcessNode]:
    """Return the aiida-kkr processes of the impurity kinds (GF write-outs still mixed with other KkrCalculations)."""
    query = orm.QueryBuilder().append(
        orm.ProcessNode, filters={'process_type': {'in': list(IMPURITY_PROCESS_TYPES)}}, project='*'
    )
    return query.all(flat=True)


def has_impurity_info_input(node: orm.ProcessNode) -> bool:
    return 'impurity_info' in node.base.links.get_incoming().all_link_labels()


def cluster_writers() -> list[orm.CalcJobNode]:
    """Return every ``KkrimpCalculation`` and host Green function write-out ``KkrCalculation`` that keeps ``scoef``."""
    from aiida_mlworkbench.kkr.scoef import SCOEF_FILENAME

    writers = []
    for node in impurity_process_nodes():
        if not isinstance(node, orm.CalcJobNode):
            continue
        if node.process_type == 'aiida.calculations:kkr.kkr' and not has_impurity_info_input(node):
            continue
        if SCOEF_FILENAME in node.base.repository.list_object_names():
            writers.append(node)
    return writers
