"""Import aiida-kkr export archives of any age into the loaded profile, as ``verdi archive import`` does.

Impurity databases are shared as AiiDA archives, some written by aiida-core 0.x/1.x: those are migrated to a temporary
copy first, then imported. Nodes already in the profile are not duplicated, so importing twice is harmless.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterable

from aiida import orm

__all__ = ('ARCHIVES_EXTRA', 'archive_group', 'import_archives')


def import_archives(paths: Iterable[str | pathlib.Path], group: orm.Group | None = None) -> list[orm.Group]:
    """Import each archive (migrating old formats to a temporary copy) and return the import group of each.

    :param paths: archive files (``.aiida``, and the zip or gzip'd tar files of older aiida-core versions).
    :param group: also add every imported node to this group.
    :raises FileNotFoundError: naming the file, if one does not exist.
    """
    from aiida.common.exceptions import IncompatibleStorageSchema
    from aiida.tools.archive import import_archive
    from aiida.tools.archive.abstract import get_format

    paths = [pathlib.Path(path) for path in paths]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f'archive file(s) not found: {", ".join(missing)}')

    groups = []
    with tempfile.TemporaryDirectory(prefix='mlworkbench-archives-') as folder:
        for path in paths:
            try:
                imported = import_archive(path, group=group, import_new_extras=False)
            except IncompatibleStorageSchema:
                archive_format = get_format()
                copy = pathlib.Path(folder) / f'{path.name}.aiida'
                archive_format.migrate(path, copy, archive_format.latest_version, force=True, compression=0)
                imported = import_archive(copy, group=group, import_new_extras=False)
            if imported is None:
                raise RuntimeError(f'importing {path} gave no import group')
            groups.append(imported if isinstance(imported, orm.Group) else orm.load_group(imported))
    return groups


ARCHIVES_EXTRA = 'mlworkbench_archives'
"""The extra of a group made by :func:`archive_group` that lists the archive files imported into it, one by one."""


def archive_group(folder: str | pathlib.Path, label: str) -> orm.Group:
    """Return the group ``label`` with the nodes of every archive in ``folder``, importing those not imported yet.

    Each archive's file name is recorded in the group's extra :data:`ARCHIVES_EXTRA` once its import finished, so an
    interrupted import is completed by the next call, and a second call imports nothing.

    :raises FileNotFoundError: if ``folder`` holds no archive (``*.aiida``, ``*.tar.gz``).
    """
    folder = pathlib.Path(folder)
    paths = sorted({*folder.glob('*.aiida'), *folder.glob('*.tar.gz')})
    if not paths:
        raise FileNotFoundError(f'no aiida-kkr archives (*.aiida, *.tar.gz) in {folder}')
    group, _ = orm.Group.collection.get_or_create(label)
    imported = list(group.base.extras.get(ARCHIVES_EXTRA, []))
    for path in paths:
        if path.name not in imported:
            import_archives([path], group=group)
            imported.append(path.name)
            group.base.extras.set(ARCHIVES_EXTRA, imported)
    return group
