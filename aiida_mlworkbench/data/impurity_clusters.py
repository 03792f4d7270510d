"""Data type for the impurity clusters of a database: all clusters in one HDF5 file in the node repository.

A learning process over an impurity database needs every cluster. As one ``StructureData`` each, that is thousands of
input nodes per process; as one :class:`ImpurityClusters` node, it is one. The node stores, per cluster (a row): the
atomic numbers, positions in Angstrom (impurity at the origin), which atoms are impurities and the host site each atom
sits on; and, per host crystal the clusters were cut from, its cell, sites and atomic numbers. Equal content gives
byte-identical files (equal node hashes: AiiDA caching works). Content is validated before anything is written, and
every read of the file checks it against the node's attributes, so that a node imported from someone else's archive
cannot hand forged arrays to the code that uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import typing as t
from collections.abc import Iterator, Mapping, Sequence

import ase
import h5py
import numpy as np
from aiida import orm
from ase.data import chemical_symbols

from aiida_mlworkbench.data.hdf5_checks import dataset_problem, root_problem
from aiida_mlworkbench.data.snapshot import AttributeSnapshot

__all__ = ('CorruptedClustersError', 'HostCrystal', 'ImpurityClusters')

FORMAT_VERSION = 1
MAX_ATOMIC_NUMBER = 118
_MAX_HOST_SITE = int(np.iinfo(np.int32).max)

#: The datasets at the root of a cluster file, in the order they are created (fixed, so that equal content gives
#: equal bytes), with their exact dtypes. ``offsets`` and ``host_offsets`` delimit the atoms of each cluster and the
#: sites of each host in the concatenated per-atom and per-site arrays.
FILE_DATASETS: Mapping[str, np.dtype] = {
    'offsets': np.dtype('<i8'),
    'numbers': np.dtype('<i2'),
    'positions': np.dtype('<f8'),
    'host_sites': np.dtype('<i4'),
    'impurity': np.dtype('u1'),
    'host_of': np.dtype('<i4'),
    'host_offsets': np.dtype('<i8'),
    'host_numbers': np.dtype('<i2'),
    'host_positions': np.dtype('<f8'),
    'host_cells': np.dtype('<f8'),
    'host_pbc': np.dtype('u1'),
}
FILE_ATTRIBUTES = ('format_version',)
#: Node attributes computed from the content: every read compares them with what the file holds.
CONTENT_ATTRIBUTES = (
    'n_clusters',
    'n_atoms_min',
    'n_atoms_max',
    'n_atoms_total',
    'species',
    'impurity_species',
    'keys',
    'hosts',
    'checksum',
    'format_version',
    'filename',
)

Arrays = dict[str, np.ndarray]


class CorruptedClustersError(Exception):
    """The HDF5 file in the repository does not hold what the node's attributes say it holds."""


def _is_int(value: t.Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class HostCrystal:
    """The host crystal a cluster was cut from: enough to rebuild it and to group clusters by host.

    ``numbers`` holds the atomic number juKKR gives each host site, 0 for an empty sphere; ``host_site`` of a cluster
    atom is a 1-based index into these sites.
    """

    uuid: str | None
    """UUID of the host ``StructureData`` (``None`` if the host did not come from a node)."""
    formula: str
    """``StructureData.get_formula(mode='hill_compact')`` of the host."""
    cell: np.ndarray
    """(3, 3) cell vectors in Angstrom."""
    pbc: tuple[bool, bool, bool]
    positions: np.ndarray
    """(n_sites, 3) site positions in Angstrom."""
    numbers: np.ndarray
    """(n_sites,) atomic numbers, 0 for an empty sphere."""

    def __post_init__(self) -> None:
        if self.uuid is not None and (not isinstance(self.uuid, str) or not self.uuid):
            raise ValueError(f'HostCrystal uuid must be a non-empty string or None, got {self.uuid!r}.')
        if not isinstance(self.formula, str) or not self.formula:
            raise ValueError(f'HostCrystal formula must be a non-empty string, got {self.formula!r}.')
        cell = np.array(self.cell, dtype=float)
        if cell.shape != (3, 3) or not np.isfinite(cell).all():
            raise ValueError(
                f'HostCrystal cell must be a 3 x 3 matrix of finite numbers (Angstrom), got {self.cell!r}.'
            )
        pbc = tuple(self.pbc) if isinstance(self.pbc, (tuple, list, np.ndarray)) else None
        if pbc is None or len(pbc) != 3 or not all(isinstance(flag, (bool, np.bool_)) for flag in pbc):
            raise ValueError(f'HostCrystal pbc must be three booleans, got {self.pbc!r}.')
        positions = np.array(self.positions, dtype=float)
        if positions.ndim != 2 or positions.shape[1:] != (3,) or len(positions) < 1 or not np.isfinite(positions).all():
            raise ValueError(
                'HostCrystal positions must be an (n_sites, 3) array of finite numbers (Angstrom) with at least one '
                f'site, got shape {positions.shape}.'
            )
        numbers = np.asarray(self.numbers)
        if numbers.shape != (len(positions),) or (numbers.size and numbers.dtype.kind not in 'iu'):
            raise ValueError(
                f'HostCrystal numbers must be {len(positions)} integer atomic numbers, one per site, got '
                f'{numbers.dtype} of shape {numbers.shape}.'
            )
        if numbers.min() < 0 or numbers.max() > MAX_ATOMIC_NUMBER:
            raise ValueError(
                f'HostCrystal numbers must lie between 0 (empty sphere) and {MAX_ATOMIC_NUMBER}, got '
                f'{int(numbers.min())} to {int(numbers.max())}.'
            )
        object.__setattr__(self, 'cell', _read_only(cell))
        object.__setattr__(self, 'pbc', tuple(bool(flag) for flag in pbc))
        object.__setattr__(self, 'positions', _read_only(positions))
        object.__setattr__(self, 'numbers', _read_only(numbers.astype(int)))

    @classmethod
    def from_structure(cls, structure: orm.StructureData, *, uuid: str | None = None) -> HostCrystal:
        """The host as juKKR sees it: atomic numbers from the site kinds, 0 for empty spheres.

        ``uuid`` is recorded instead of the structure's own, for an unstored copy of a stored host.

        :raises ValueError: if a site is an alloy or partly vacant (CPA/VCA), which no cluster can be cut from.
        """
        from aiida_mlworkbench.kkr.geometry import host_site_atomic_numbers

        if not isinstance(structure, orm.StructureData):
            raise TypeError(f'a host crystal is built from a StructureData, got {type(structure).__name__}.')
        return cls(
            uuid=structure.uuid if uuid is None else uuid,
            formula=structure.get_formula(mode='hill_compact'),
            cell=np.array(structure.cell, dtype=float),
            pbc=tuple(bool(flag) for flag in structure.pbc),
            positions=np.array([site.position for site in structure.sites], dtype=float).reshape(-1, 3),
            numbers=host_site_atomic_numbers(structure),
        )

    @property
    def n_sites(self) -> int:
        return len(self.numbers)

    def get_ase(self) -> ase.Atoms:
        """The host as periodic ``ase.Atoms``, empty spheres included as ``'X'`` (number 0).

        Empty spheres are kept so that atom ``i`` of the result is host site ``i + 1``, the site that a cluster
        atom's ``host_site`` names; drop them with ``atoms[atoms.numbers > 0]`` where they are not wanted.
        """
        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostCrystal):
            return NotImplemented
        return (
            self.uuid == other.uuid
            and self.formula == other.formula
            and self.pbc == other.pbc
            and np.array_equal(self.cell, other.cell)
            and np.array_equal(self.positions, other.positions)
            and np.array_equal(self.numbers, other.numbers)
        )

    __hash__ = None  # type: ignore[assignment]  # compared by array content, so not hashable

    def __repr__(self) -> str:
        return f'HostCrystal(formula={self.formula!r}, n_sites={self.n_sites}, uuid={self.uuid!r})'


# -- content: validation, attributes, checksum --------------------------------------------------------------------


def _cluster_name(row: int, keys: Sequence[str]) -> str:
    return f'cluster {row} (key {keys[row]!r})'


def _check_keys(keys: Sequence[str] | None, n_clusters: int) -> list[str]:
    if keys is None:
        return [str(row) for row in range(n_clusters)]
    if isinstance(keys, str):
        raise TypeError('keys must be a sequence of strings, one per cluster, not a single string.')
    keys = list(keys)
    if len(keys) != n_clusters:
        raise ValueError(f'{len(keys)} keys for {n_clusters} clusters: give exactly one key per cluster.')
    first_row: dict[str, int] = {}
    for row, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f'the key of cluster {row} is {key!r}: keys must be non-empty strings.')
        if key in first_row:
            raise ValueError(f'clusters {first_row[key]} and {row} both have the key {key!r}: keys must be unique.')
        first_row[key] = row
    return [str(key) for key in keys]


def _value_problem(arrays: Arrays, keys: Sequence[str]) -> str | None:
    """What is wrong with the values of the arrays, naming the row and its key, or ``None``.

    Shapes are taken as given (the reader checks them against the attributes first); values may have any integer
    dtype, so that the writer checks before casting to the stored dtypes.
    """
    offsets, host_offsets = arrays['offsets'], arrays['host_offsets']
    n_clusters, n_hosts = len(offsets) - 1, len(host_offsets) - 1
    total, n_host_sites = len(arrays['numbers']), len(arrays['host_numbers'])
    if n_clusters < 1:
        return 'there are no clusters: an ImpurityClusters holds at least one'
    if offsets[0] != 0:
        return f'offsets start at {int(offsets[0])}, not at 0'
    sizes = np.diff(offsets)
    if (sizes <= 0).any():
        row = int(np.argmax(sizes <= 0))
        if sizes[row] < 0:
            return f'offsets decrease at {_cluster_name(row, keys)}'
        return f'{_cluster_name(row, keys)} has no atom: every cluster needs at least one atom'
    if offsets[-1] != total:
        return f'offsets end at {int(offsets[-1])}, not at the number of atoms {total}'

    def atom_name(position: int) -> str:
        row = int(np.searchsorted(offsets, position, side='right')) - 1
        return f'atom {position - int(offsets[row])} of {_cluster_name(row, keys)}'

    numbers = arrays['numbers']
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        position = int(np.argmax(bad))
        return (
            f'{atom_name(position)} has atomic number {int(numbers[position])}: atomic numbers are 1 to '
            f'{MAX_ATOMIC_NUMBER} (empty spheres and vacancies are left out of a cluster)'
        )
    finite = np.isfinite(arrays['positions']).all(axis=1)
    if not finite.all():
        return f'{atom_name(int(np.argmin(finite)))} has a non-finite position: positions must be finite (Angstrom)'
    impurity = arrays['impurity']
    bad = (impurity != 0) & (impurity != 1)
    if bad.any():
        position = int(np.argmax(bad))
        return (
            f'{atom_name(position)} has the tag {int(impurity[position])}: tag 1 marks an impurity atom, 0 a host atom'
        )

    if host_offsets.size < 1 or host_offsets[0] != 0:
        return 'host_offsets do not start at 0'
    site_counts = np.diff(host_offsets)
    if (site_counts <= 0).any():
        return f'host {int(np.argmax(site_counts <= 0))} has no site (host_offsets must increase)'
    if host_offsets[-1] != n_host_sites:
        return f'host_offsets end at {int(host_offsets[-1])}, not at the number of host sites {n_host_sites}'
    host_numbers = arrays['host_numbers']
    if n_host_sites and (host_numbers.min() < 0 or host_numbers.max() > MAX_ATOMIC_NUMBER):
        return f'host atomic numbers must lie between 0 (empty sphere) and {MAX_ATOMIC_NUMBER}'
    if not (np.isfinite(arrays['host_positions']).all() and np.isfinite(arrays['host_cells']).all()):
        return 'a host cell or site position is not finite'
    if ((arrays['host_pbc'] != 0) & (arrays['host_pbc'] != 1)).any():
        return 'host_pbc holds values other than 0 and 1'

    host_of, host_sites = arrays['host_of'], arrays['host_sites']
    if n_hosts == 0:
        if (host_of != -1).any():
            row = int(np.argmax(host_of != -1))
            return f'{_cluster_name(row, keys)} names host {int(host_of[row])}, but no host is recorded'
        bad = (host_sites < 0) | (host_sites > _MAX_HOST_SITE)
        if bad.any():
            position = int(np.argmax(bad))
            return (
                f'{atom_name(position)} has host_site {int(host_sites[position])}: host sites are 1-based, 0 = unknown'
            )
        return None
    bad = (host_of < 0) | (host_of >= n_hosts)
    if bad.any():
        row = int(np.argmax(bad))
        return f'{_cluster_name(row, keys)} names host {int(host_of[row])}, but the hosts are 0 to {n_hosts - 1}'
    atom_host = np.repeat(host_of, sizes)
    bad = (host_sites < 1) | (host_sites > site_counts[atom_host])
    if bad.any():
        position = int(np.argmax(bad))
        host = int(atom_host[position])
        return (
            f'{atom_name(position)} has host_site {int(host_sites[position])}, but its host {host} has sites 1 to '
            f'{int(site_counts[host])}'
        )
    site_numbers = host_numbers[host_offsets[atom_host] + host_sites - 1]
    bad = (impurity == 0) & (numbers != site_numbers)
    if bad.any():
        position = int(np.argmax(bad))
        return (
            f'{atom_name(position)} is a host atom (tag 0) with atomic number {int(numbers[position])}, but host '
            f'site {int(host_sites[position])} of host {int(atom_host[position])} holds '
            f'{int(site_numbers[position])}: tag impurity atoms 1, and check host_site and host_of'
        )
    return None


def _checksum(arrays: Arrays, keys: Sequence[str], hosts: Sequence[Mapping[str, t.Any]]) -> str:
    """SHA-256 of the whole content: the arrays (with their dtypes and shapes), the keys and the host records."""
    header = {
        'format_version': FORMAT_VERSION,
        'arrays': [[name, FILE_DATASETS[name].str, list(arrays[name].shape)] for name in FILE_DATASETS],
        'keys': list(keys),
        'hosts': [dict(host) for host in hosts],
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(',', ':')).encode())
    for name in FILE_DATASETS:
        digest.update(np.ascontiguousarray(arrays[name], dtype=FILE_DATASETS[name]))
    return f'sha256:{digest.hexdigest()}'


def _symbols(numbers: np.ndarray) -> list[str]:
    """Chemical symbols of the distinct atomic numbers, sorted by atomic number."""
    return [chemical_symbols[number] for number in np.unique(numbers).tolist()]


def _content_attributes(arrays: Arrays, keys: Sequence[str], hosts: Sequence[Mapping[str, t.Any]]) -> dict[str, t.Any]:
    sizes = np.diff(arrays['offsets'])
    return {
        'n_clusters': len(sizes),
        'n_atoms_min': int(sizes.min()),
        'n_atoms_max': int(sizes.max()),
        'n_atoms_total': len(arrays['numbers']),
        'species': _symbols(arrays['numbers']),
        'impurity_species': _symbols(arrays['numbers'][arrays['impurity'] == 1]),
        'keys': list(keys),
        'hosts': [dict(host) for host in hosts],
        'checksum': _checksum(arrays, keys, hosts),
        'format_version': FORMAT_VERSION,
        'filename': ImpurityClusters.FILENAME,
    }


def _pack(
    clusters: Sequence[ase.Atoms], keys: list[str], hosts: Sequence[HostCrystal], host_of: Sequence[int] | None
) -> Arrays:
    """Concatenate the clusters and hosts into the file's arrays (integer values not yet cast to the stored dtypes)."""
    n_clusters = len(clusters)
    if hosts and host_of is None:
        raise ValueError('hosts are given but not host_of: give the index into hosts of each cluster.')
    if host_of is not None and not hosts:
        raise ValueError('host_of is given without hosts: give the HostCrystal list that host_of indexes.')
    for index, host in enumerate(hosts):
        if not isinstance(host, HostCrystal):
            raise TypeError(
                f'host {index} has the type {type(host).__name__}, not HostCrystal (HostCrystal.from_structure).'
            )
    if host_of is None:
        host_index = np.full(n_clusters, -1, dtype=np.int64)
    else:
        if len(host_of) != n_clusters:
            raise ValueError(f'{len(host_of)} host_of entries for {n_clusters} clusters: give one per cluster.')
        for row, value in enumerate(host_of):
            if not _is_int(value):
                raise ValueError(f'host_of of {_cluster_name(row, keys)} is {value!r}: it must be an integer index.')
        host_index = np.array([int(value) for value in host_of], dtype=np.int64)

    numbers, positions, tags, host_sites = [], [], [], []
    for row, atoms in enumerate(clusters):
        if not isinstance(atoms, ase.Atoms):
            raise TypeError(f'{_cluster_name(row, keys)} is a {type(atoms).__name__}, not an ase.Atoms.')
        if len(atoms) == 0:
            raise ValueError(f'{_cluster_name(row, keys)} has no atom: every cluster needs at least one atom.')
        if atoms.pbc.any():
            raise ValueError(
                f'{_cluster_name(row, keys)} is periodic (pbc {atoms.pbc.tolist()}): an impurity cluster is a finite '
                'set of atoms; pass it with pbc=False.'
            )
        sites = atoms.arrays.get('host_site')
        if sites is None:
            if hosts:
                raise ValueError(
                    f'{_cluster_name(row, keys)} has no host_site array: with hosts, every atom needs the 1-based '
                    'index of its host site (impurity_cluster sets it).'
                )
            sites = np.zeros(len(atoms), dtype=np.int64)
        elif sites.shape != (len(atoms),) or sites.dtype.kind not in 'iu':
            raise ValueError(
                f'the host_site array of {_cluster_name(row, keys)} must hold one integer per atom, got '
                f'{sites.dtype} of shape {sites.shape}.'
            )
        numbers.append(atoms.numbers)
        positions.append(atoms.positions)
        tags.append(atoms.get_tags())
        host_sites.append(sites)

    host_list = list(hosts)
    sizes = np.array([len(atoms) for atoms in clusters], dtype=np.int64)
    site_counts = np.array([host.n_sites for host in host_list], dtype=np.int64)
    return {
        'offsets': np.concatenate(([0], np.cumsum(sizes))).astype(np.int64),
        'numbers': np.concatenate(numbers).astype(np.int64),
        'positions': np.concatenate(positions).astype(np.float64).reshape(-1, 3),
        'host_sites': np.concatenate(host_sites).astype(np.int64),
        'impurity': np.concatenate(tags).astype(np.int64),
        'host_of': host_index,
        'host_offsets': np.concatenate(([0], np.cumsum(site_counts))).astype(np.int64),
        'host_numbers': np.concatenate([host.numbers for host in host_list] or [np.empty(0, np.int64)]),
        'host_positions': np.concatenate([host.positions for host in host_list] or [np.empty((0, 3))]),
        'host_cells': np.array([host.cell for host in host_list], dtype=np.float64).reshape(-1, 3, 3),
        'host_pbc': np.array([host.pbc for host in host_list], dtype=np.int64).reshape(-1, 3),
    }


# -- file structure ------------------------------------------------------------------------------------------------


def _expected_shapes(n_clusters: int, n_atoms: int, n_hosts: int, n_host_sites: int) -> dict[str, tuple[int, ...]]:
    return {
        'offsets': (n_clusters + 1,),
        'numbers': (n_atoms,),
        'positions': (n_atoms, 3),
        'host_sites': (n_atoms,),
        'impurity': (n_atoms,),
        'host_of': (n_clusters,),
        'host_offsets': (n_hosts + 1,),
        'host_numbers': (n_host_sites,),
        'host_positions': (n_host_sites, 3),
        'host_cells': (n_hosts, 3, 3),
        'host_pbc': (n_hosts, 3),
    }


def _layout_problem(handle: h5py.File, n_clusters: int, n_atoms: int, n_hosts: int) -> str | None:
    """What is wrong with the structure of a cluster file, or ``None``; reads metadata only, never a value.

    Exactly the writer's datasets and root attribute, with its dtypes and the shapes the attributes imply; every
    dataset a hard link to contiguous values stored in this file (no external or virtual dataset, no link to another
    file, no filter), whose bytes all lie within the file: a forged dataset can make no read larger than the file.
    """
    problem = root_problem(handle, FILE_DATASETS, FILE_ATTRIBUTES, FORMAT_VERSION)
    if problem:
        return problem
    host_numbers = handle.get('host_numbers', getclass=True)
    if host_numbers is not h5py.Dataset or len(handle['host_numbers'].shape) != 1:
        return "'host_numbers' is not a one-dimensional dataset"
    shapes = _expected_shapes(n_clusters, n_atoms, n_hosts, handle['host_numbers'].shape[0])
    file_size = handle.id.get_filesize()
    for name, dtype in FILE_DATASETS.items():
        problem = dataset_problem(handle, name, layouts=(h5py.h5d.CONTIGUOUS,), filters=())
        if problem:
            return problem
        dataset = handle[name]
        if dataset.dtype != dtype:
            return f'{name!r} has dtype {dataset.dtype}, expected {dtype}'
        if dataset.shape != shapes[name]:
            return f'{name!r} has shape {dataset.shape}, expected {shapes[name]} from the attributes'
        size = int(np.prod(dataset.shape)) * dtype.itemsize
        if size:
            offset = dataset.id.get_offset()
            if offset is None or dataset.id.get_storage_size() != size or offset + size > file_size:
                return f'the {size} bytes of {name!r} are not stored within the file'
    return None


def _write_file(arrays: Arrays) -> bytes:
    """The HDF5 file of the arrays: contiguous datasets in a fixed order, no timestamps, the oldest file format."""
    buffer = io.BytesIO()
    with h5py.File(buffer, 'w', libver='earliest') as handle:
        handle.attrs['format_version'] = np.int64(FORMAT_VERSION)
        for name, dtype in FILE_DATASETS.items():
            handle.create_dataset(name, data=np.ascontiguousarray(arrays[name], dtype=dtype), track_times=False)
    return buffer.getvalue()


class _Layout(t.NamedTuple):
    """The checked attributes that describe the file."""

    n_clusters: int
    n_atoms: int
    keys: list[str]
    hosts: list[dict[str, t.Any]]


class ImpurityClusters(AttributeSnapshot, orm.Data):
    """The impurity clusters of a database, one row per cluster, with the host crystals they were cut from.

    Build it from clusters as :func:`aiida_mlworkbench.kkr.geometry.impurity_cluster` returns them (non-periodic
    ``ase.Atoms`` in Angstrom, tags 1 for impurity atoms and 0 for host atoms, per-atom array ``host_site``), with one
    key per cluster (e.g. the link label of its embedding) and, optionally, the hosts and the host of each cluster.
    The content is validated before anything is written; a node whose content fails validation is never created.

    Queryable attributes: ``n_clusters``, ``species`` and ``impurity_species`` (symbols sorted by atomic number),
    ``n_atoms_min``, ``n_atoms_max``, ``n_atoms_total``, ``keys`` (row -> key), ``hosts`` (``uuid`` and ``formula`` of
    each host), ``checksum``, ``format_version`` and ``filename``.

    Every first read of the file (every read of an unstored node) checks its structure, its values, the attributes
    and the checksum; a stored node then keeps the arrays in memory (tens of MB for tens of thousands of clusters).
    """

    FILENAME = 'clusters.h5'

    def __init__(
        self,
        clusters: Sequence[ase.Atoms] | None = None,
        *,
        keys: Sequence[str] | None = None,
        hosts: Sequence[HostCrystal] = (),
        host_of: Sequence[int] | None = None,
        **kwargs: t.Any,
    ) -> None:
        """Validate and write the clusters.

        :param clusters: the clusters; ``tags`` 0 and ``host_site`` 0 (unknown) where missing, allowed only without
            hosts.
        :param keys: one unique non-empty string per cluster; default ``'0'``, ``'1'``, ...
        :param hosts: the host crystals, see :meth:`HostCrystal.from_structure`.
        :param host_of: the index into ``hosts`` of each cluster's host; required with ``hosts``, refused without.
        :raises ValueError: naming the cluster (row and key) and the problem.
        """
        super().__init__(**kwargs)
        if clusters is None:
            if keys is not None or hosts or host_of is not None:
                raise ValueError('keys, hosts and host_of describe clusters: give the clusters too.')
            return
        if isinstance(clusters, ase.Atoms):
            raise TypeError('got one ase.Atoms: pass a list of clusters, e.g. [atoms].')
        clusters = list(clusters)
        if not clusters:
            raise ValueError('no clusters given: an ImpurityClusters holds at least one cluster.')
        keys = _check_keys(keys, len(clusters))
        hosts = tuple(hosts)
        self._set_content(_pack(clusters, keys, hosts, host_of), keys, [_host_record(host) for host in hosts])

    def _set_content(self, arrays: Arrays, keys: list[str], hosts: list[dict[str, t.Any]]) -> None:
        """Check the values, then write the file and the attributes; nothing is changed if a check fails."""
        problem = _value_problem(arrays, keys)
        if problem:
            raise ValueError(f'{problem}.')
        arrays = {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype in FILE_DATASETS.items()}
        self.base.repository.put_object_from_bytes(_write_file(arrays), self.FILENAME)
        self.base.attributes.set_many(_content_attributes(arrays, keys, hosts))

    def _validate(self) -> bool:
        """Refuse to store a node without clusters, or whose file disagrees with its attributes (checked whole)."""
        super()._validate()
        if self.FILENAME not in self.base.repository.list_object_names():
            raise ValueError('this ImpurityClusters holds no clusters: build it with ImpurityClusters(clusters, ...).')
        self._read_checked()
        return True

    # Attributes -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._attribute('n_clusters', 0)

    @property
    def n_clusters(self) -> int:
        return self._attribute('n_clusters')

    @property
    def keys(self) -> list[str]:
        """The key of each row (e.g. the link label of its embedding)."""
        return list(self._attribute('keys', []))

    @property
    def species(self) -> list[str]:
        """Chemical symbols of all atoms, sorted by atomic number."""
        return list(self._attribute('species', []))

    @property
    def impurity_species(self) -> list[str]:
        """Chemical symbols of the atoms tagged as impurity, sorted by atomic number."""
        return list(self._attribute('impurity_species', []))

    @property
    def n_atoms_min(self) -> int:
        return self._attribute('n_atoms_min')

    @property
    def n_atoms_max(self) -> int:
        return self._attribute('n_atoms_max')

    @property
    def n_atoms_total(self) -> int:
        return self._attribute('n_atoms_total')

    @property
    def hosts(self) -> list[dict[str, t.Any]]:
        """``{'uuid': ..., 'formula': ...}`` of each host, in host order (what :attr:`host_of` indexes)."""
        return [dict(host) for host in self._attribute('hosts', [])]

    @property
    def checksum(self) -> str:
        """SHA-256 of the whole content: arrays, keys and host records."""
        return self._attribute('checksum')

    @property
    def host_of(self) -> np.ndarray:
        """The index into :attr:`hosts` of each row's host (-1 for all rows if no hosts are recorded); read-only."""
        return self._content()['host_of']

    def host_formulas(self) -> np.ndarray:
        """The formula of each row's host, e.g. as groups for a split that keeps each host on one side.

        :raises ValueError: if no hosts are recorded.
        """
        host_of = self.host_of  # checks the file and the attributes first
        hosts = self._attribute('hosts')
        if not hosts:
            raise ValueError(
                f'{self._name()} records no hosts: build it with hosts= and host_of= to know the host of each row.'
            )
        return np.array([host['formula'] for host in hosts])[host_of]

    # Reading ----------------------------------------------------------------------------------------------------
    #
    # An archive from someone else can hold any HDF5 file with any attributes. Before any array is used, each read
    # checks the attributes, the file's structure (datasets, dtypes, shapes, values stored in this file, no filter),
    # the values (offsets, atomic numbers, host indices, ...), that the attributes computed from the content equal
    # the node's, and the checksum.

    def _name(self) -> str:
        return f'{type(self).__name__}<{self.pk or "unstored"}>'

    def _corrupted(self, detail: str) -> CorruptedClustersError:
        return CorruptedClustersError(
            f'the cluster file of {self._name()} is corrupted or was tampered with: {detail}. Re-create the node '
            '(rerun the cluster extraction) or re-import it from a trusted archive.'
        )

    def _layout(self) -> _Layout:
        """The attributes that describe the file, checked to agree with each other (an import may carry any)."""
        n_clusters, n_atoms = self._attribute('n_clusters'), self._attribute('n_atoms_total')
        keys, hosts = self._attribute('keys'), self._attribute('hosts')
        if not (
            _is_int(n_clusters)
            and _is_int(n_atoms)
            and 1 <= n_clusters <= n_atoms
            and isinstance(keys, list)
            and len(keys) == n_clusters
            and all(isinstance(key, str) for key in keys)
            and isinstance(hosts, list)
            and all(
                isinstance(host, dict)
                and sorted(host) == ['formula', 'uuid']
                and isinstance(host['formula'], str)
                and (host['uuid'] is None or isinstance(host['uuid'], str))
                for host in hosts
            )
            and self._attribute('format_version') == FORMAT_VERSION
        ):
            raise self._corrupted(
                f'its attributes are inconsistent (n_clusters {n_clusters!r}, n_atoms_total {n_atoms!r}, '
                f'{len(keys) if isinstance(keys, list) else keys!r} keys, hosts of type {type(hosts).__name__}, '
                f'format_version {self._attribute("format_version")!r})'
            )
        return _Layout(n_clusters, n_atoms, keys, hosts)

    def _read_checked(self) -> Arrays:
        """Read the whole file and check everything; the arrays returned are read-only."""
        layout = self._layout()
        with contextlib.ExitStack() as stack:
            try:
                stream = stack.enter_context(self.base.repository.open(self.FILENAME, mode='rb'))
            except FileNotFoundError:
                raise self._corrupted(f'its repository holds no {self.FILENAME}') from None
            try:
                handle = stack.enter_context(h5py.File(stream, 'r'))
            except (OSError, ValueError) as exception:
                raise self._corrupted(f'{self.FILENAME} is not an HDF5 file or is truncated ({exception})') from None
            try:
                problem = _layout_problem(handle, layout.n_clusters, layout.n_atoms, len(layout.hosts))
                arrays = {} if problem else {name: handle[name][()] for name in FILE_DATASETS}
            except (KeyError, OSError, RuntimeError, TypeError, ValueError) as exception:
                problem = f'its HDF5 structure is unreadable ({type(exception).__name__}: {exception})'
        if problem:
            raise self._corrupted(problem)
        problem = _value_problem(arrays, layout.keys)
        if problem:
            raise self._corrupted(problem)
        expected = _content_attributes(arrays, layout.keys, layout.hosts)
        for name in CONTENT_ATTRIBUTES:
            if self._attribute(name) != expected[name]:
                if name == 'checksum':
                    raise self._corrupted('content checksum mismatch')
                raise self._corrupted(f'the attribute {name!r} does not match the content of the file')
        return {name: _read_only(array) for name, array in arrays.items()}

    def _content(self) -> Arrays:
        """The checked arrays: of a stored node read once and kept, of an unstored node read on every call."""
        if not self.is_stored:
            if self.FILENAME not in self.base.repository.list_object_names():
                raise ValueError(f'{self._name()} holds no clusters: build it with ImpurityClusters(clusters, ...).')
            return self._read_checked()
        arrays = self.__dict__.get('_arrays')
        if arrays is None:
            arrays = self.__dict__['_arrays'] = self._read_checked()
        return arrays

    @staticmethod
    def _rows(rows: Sequence[int] | np.ndarray | None, arrays: Arrays) -> np.ndarray:
        """The row indices as an int64 array, checked against the number of clusters in the (checked) arrays."""
        n_clusters = len(arrays['offsets']) - 1
        if rows is None:
            return np.arange(n_clusters)
        index = np.asarray(rows)
        if index.size == 0:
            return np.empty(0, dtype=np.int64)
        if index.ndim != 1 or index.dtype.kind not in 'iu':
            raise ValueError('rows must be a one-dimensional sequence of integer row indices.')
        bad = (index < 0) | (index >= n_clusters)
        if bad.any():
            raise IndexError(f'row {int(index[np.argmax(bad)])} is out of range for {n_clusters} clusters.')
        return index.astype(np.int64)

    def get_atoms_list(self, rows: Sequence[int] | np.ndarray | None = None) -> list[ase.Atoms]:
        """The clusters of ``rows`` (default all, in row order) as ``ase.Atoms``, from one read of the arrays.

        Each is non-periodic with a zero cell and carries the tags (1 impurity, 0 host atom) and the per-atom array
        ``host_site`` (1-based host site, 0 if unknown), as :func:`~aiida_mlworkbench.kkr.geometry.impurity_cluster`
        returns it.
        """
        arrays = self._content()
        return self._atoms_list(arrays, self._rows(rows, arrays))

    @staticmethod
    def _atoms_list(arrays: Arrays, index: np.ndarray) -> list[ase.Atoms]:
        numbers, positions, tags, host_sites = (
            arrays[name] for name in ('numbers', 'positions', 'impurity', 'host_sites')
        )
        starts, stops = arrays['offsets'][index].tolist(), arrays['offsets'][index + 1].tolist()
        clusters = []
        for start, stop in zip(starts, stops, strict=True):
            # ase copies each slice into arrays of its own dtypes (int, float): nothing shares the cached arrays.
            atoms = ase.Atoms(numbers=numbers[start:stop], positions=positions[start:stop], pbc=False)
            atoms.set_tags(tags[start:stop])
            atoms.new_array('host_site', host_sites[start:stop], int)
            clusters.append(atoms)
        return clusters

    def get_ase(self, index: int) -> ase.Atoms:
        """The cluster of row ``index`` (negative counts from the end); see :meth:`get_atoms_list`."""
        arrays = self._content()
        n_clusters = len(arrays['offsets']) - 1
        if not _is_int(index) or not -n_clusters <= index < n_clusters:
            raise IndexError(f'row {index!r} is out of range for {n_clusters} clusters.')
        return self._atoms_list(arrays, np.array([int(index) % n_clusters]))[0]

    def __iter__(self) -> Iterator[ase.Atoms]:
        return iter(self.get_atoms_list())

    def get_structure(self, index: int) -> orm.StructureData:
        """The cluster of row ``index`` as an unstored, non-periodic ``StructureData`` with a zero cell.

        One kind per (symbol, tag), named as ``StructureData(ase=...)`` names them (``'Fe1'`` for an Fe impurity).
        """
        return orm.StructureData(ase=self.get_ase(index))

    def get_host(self, host_index: int) -> HostCrystal:
        """The host crystal of index ``host_index`` (what :attr:`host_of` holds)."""
        arrays = self._content()
        hosts = self._attribute('hosts')
        if not _is_int(host_index) or not 0 <= host_index < len(hosts):
            raise IndexError(f'host {host_index!r} is out of range: {self._name()} records {len(hosts)} host(s).')
        start, stop = arrays['host_offsets'][host_index : host_index + 2]
        return HostCrystal(
            uuid=hosts[host_index]['uuid'],
            formula=hosts[host_index]['formula'],
            cell=arrays['host_cells'][host_index],
            pbc=tuple(bool(flag) for flag in arrays['host_pbc'][host_index]),
            positions=arrays['host_positions'][start:stop],
            numbers=arrays['host_numbers'][start:stop],
        )

    def subset(self, rows: Sequence[int] | np.ndarray) -> ImpurityClusters:
        """A new, unstored node with the clusters of ``rows`` in the order given, their keys and only their hosts.

        Hosts are renumbered in order of first use.

        :raises ValueError: if ``rows`` is empty or names a row twice.
        :raises IndexError: if a row is out of range.
        """
        arrays = self._content()
        index = self._rows(rows, arrays)
        if index.size == 0:
            raise ValueError('no rows given: a subset holds at least one cluster.')
        unique, first = np.unique(index, return_index=True)
        if unique.size != index.size:
            duplicate = np.setdiff1d(np.arange(index.size), first)[0]
            raise ValueError(f'row {int(index[duplicate])} is given twice: a subset holds each cluster once.')
        atoms = _gather(arrays['offsets'], index)
        host_records = self._attribute('hosts')
        host_of = arrays['host_of'][index]
        if host_records:
            used, first_use = np.unique(host_of, return_index=True)
            used = used[np.argsort(first_use)]  # in order of first use
            renumber = np.full(len(host_records), -1, dtype=np.int64)
            renumber[used] = np.arange(used.size)
            new_host_of = renumber[host_of]
        else:
            used = np.empty(0, dtype=np.int64)
            new_host_of = host_of
        sites = _gather(arrays['host_offsets'], used)
        new_arrays = {
            'offsets': np.concatenate(([0], np.cumsum(np.diff(arrays['offsets'])[index]))),
            'numbers': arrays['numbers'][atoms],
            'positions': arrays['positions'][atoms],
            'host_sites': arrays['host_sites'][atoms],
            'impurity': arrays['impurity'][atoms],
            'host_of': new_host_of,
            'host_offsets': np.concatenate(([0], np.cumsum(np.diff(arrays['host_offsets'])[used]))),
            'host_numbers': arrays['host_numbers'][sites],
            'host_positions': arrays['host_positions'][sites],
            'host_cells': arrays['host_cells'][used],
            'host_pbc': arrays['host_pbc'][used],
        }
        keys = self._attribute('keys')
        node = type(self)()
        node._set_content(new_arrays, [keys[row] for row in index.tolist()], [host_records[h] for h in used.tolist()])
        return node

    def verify(self) -> None:
        """Read the whole file again and check it: structure, values, attributes and content checksum.

        :raises CorruptedClustersError: if the file is not a valid cluster file or differs from what was stored.
        """
        self._read_checked()

    def __str__(self) -> str:
        if not len(self):
            return f'{self._name()}: empty'
        return (
            f'{self._name()}: {self.n_clusters} clusters of {self.n_atoms_min} to {self.n_atoms_max} atoms, '
            f'species {" ".join(self.species)}'
        )


def _gather(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in the concatenated arrays of the elements of ``rows`` (delimited by ``offsets``), in that order."""
    starts, sizes = offsets[rows], np.diff(offsets)[rows]
    new_starts = np.cumsum(sizes) - sizes
    return np.repeat(starts - new_starts, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def _host_record(host: HostCrystal) -> dict[str, t.Any]:
    return {'uuid': host.uuid, 'formula': host.formula}
