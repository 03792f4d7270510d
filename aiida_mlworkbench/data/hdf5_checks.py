"""Structural checks of the HDF5 files the data types keep in their node repositories, before any value is read.

A node from someone else's archive can hold any HDF5 file. These checks read metadata only and refuse what the
package's writers never produce: other datasets or root attributes, an unknown format version, links instead of
datasets, virtual or external datasets (their values would be read from other local files), and storage layouts or
filters the writer does not use (a filter id makes HDF5 look for a plugin library to decode it).
"""

from __future__ import annotations

from collections.abc import Collection

import h5py
import numpy as np

__all__ = ('dataset_problem', 'root_problem')


def root_problem(handle: h5py.File, datasets: Collection[str], attributes: Collection[str], version: int) -> str | None:
    """What is wrong with the root of the file (its datasets, attributes and ``format_version``), or ``None``."""
    names = sorted(handle.keys())
    if names != sorted(datasets):
        return f'the file holds {names}, expected exactly the datasets {sorted(datasets)}'
    found = sorted(handle.attrs.keys())
    if found != sorted(attributes):
        return f'the file has the attributes {found}, expected exactly {sorted(attributes)}'
    stored = np.asarray(handle.attrs['format_version'])
    if stored.shape != () or stored.dtype.kind not in 'iu' or int(stored) != version:
        return f'unknown file format version {stored!r} (this package reads version {version})'
    return None


def dataset_problem(handle: h5py.File, name: str, layouts: Collection[int], filters: Collection[int]) -> str | None:
    """What is wrong with how dataset ``name`` is stored, or ``None``: it must be a hard link to values in this file,
    with one of ``layouts`` and only ``filters``."""
    link = handle.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        return f'{name!r} is an HDF5 {type(link).__name__}, not a dataset stored in this file'
    dataset = handle[name]
    if not isinstance(dataset, h5py.Dataset):
        return f'{name!r} is a {type(dataset).__name__}, not a dataset'
    if dataset.is_virtual:
        return f'{name!r} is a virtual dataset: its values would be read from other files'
    plist = dataset.id.get_create_plist()
    if plist.get_external_count():
        return f'{name!r} is an external dataset: its values would be read from a local file outside the node'
    used = [plist.get_filter(number)[0] for number in range(plist.get_nfilters())]
    if not set(used) <= set(filters):
        allowed = ', '.join(str(number) for number in sorted(filters)) or 'none'
        return (
            f'{name!r} goes through the HDF5 filters {used}: the writer uses only {allowed}, compression and '
            'filter plugins are refused'
        )
    if plist.get_layout() not in layouts:
        return f'{name!r} has the HDF5 storage layout {plist.get_layout()}, which the writer never uses'
    return None
