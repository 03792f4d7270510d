"""The impurity cluster of an aiida-kkr impurity embedding, exactly as juKKR saw it.

juKKR's impurity code reads the cluster from the file ``scoef``: one row per site, ``x y z`` in units of the host's
lattice constant ``alat``, the 1-based index of the host site the row sits on, the host site's atomic number and the
distance from the centre. aiida-kkr writes that file from the host ``StructureData`` and the ``impurity_info`` ``Dict``
in one of two ways, and this module rebuilds the same rows with aiida-kkr's own functions:

* ``{'Rcut', 'Zimp', 'ilayer_center'}`` (optional ``hcut``, ``cylinder_orient``): all host sites within ``Rcut`` of
  host site ``ilayer_center`` (a cylinder if ``hcut > 0``), from
  :func:`aiida_kkr.tools.tools_kkrimp.create_scoef_array`;
* ``{'imp_cls', 'Zimp', 'Rimp_rel'}``: the rows given explicitly (e.g. two-impurity clusters made by aiida-kkr's
  ``create_combined_imp_info_cf``).

``alat`` is :func:`masci_tools.io.common_functions.get_alat_from_bravais` of the host cell (for a primitive fcc cell
that is ``a / sqrt(2)``, not ``a``). The impurities replace the sites at ``Rimp_rel`` (in alat units, default the
centre), in the order of ``Zimp``, as aiida-kkr's ``KkrimpCalculation`` does when it writes ``kkrflex_atominfo``.

Empty spheres are not atoms and are left out: host sites whose kind is vacuum (a kind with vacancies, e.g. aiida-kkr's
``{H0.00X1.00}`` kind named ``HX``, whose only symbol is ``H`` with weight 0; or the symbol ``X``), which juKKR gets
with ``ZATOM = 0``. The ``scoef`` files of aiida-kkr up to 2021 write such sites with atomic number 1, so the atomic
number in the file cannot tell vacuum from hydrogen; the host kind can. An impurity with ``Zimp = 0`` (a vacancy) is
an empty sphere too and is left out as well.

The unit of ``Rcut``: aiida-kkr before version 1.0 (the series for aiida-core 0.x, used until mid 2019) read ``Rcut``
(and ``hcut``) in units of ``alat``; since then in Angstrom. The ``impurity_info`` node does not record which, so the
caller says it with ``rcut_unit``; :mod:`aiida_mlworkbench.kkr.embeddings` decides it from the calculations that used
the node (see :func:`aiida_mlworkbench.kkr.embeddings.rcut_unit_of_process`).
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import contextvars
import dataclasses
import enum
import functools
import typing as t

import ase
import numpy as np
from aiida import orm

__all__ = (
    'MAX_CLUSTER_ATOMS',
    'MAX_CYLINDER_SEARCH_SITES',
    'MAX_SEARCH_SITES',
    'ClusterSize',
    'ClusterTooLargeError',
    'ImpurityInfo',
    'RcutUnit',
    'check_embedding',
    'estimate_cluster_size',
    'host_alat',
    'host_site_atomic_numbers',
    'impurity_cluster',
    'parse_impurity_info',
    'reading_hosts',
)

MAX_CLUSTER_ATOMS = 2000
"""Largest impurity cluster built, in sites (atoms and empty spheres) within ``Rcut`` or rows of ``imp_cls``.

The clusters of real aiida-kkr databases are far smaller: at most 29 ``scoef`` rows (14 atoms) in the shared aiida-kkr
archives, 19 atoms in the synthetic 7100-embedding database, and juKKR's impurity solver, whose cost grows with the
cube of the cluster size, is run on clusters of tens to a few hundred sites. 2000 sites is about 70 times the largest
real cluster and an ``Rcut`` of about 18 Angstrom in fcc Cu. Before ``Rcut`` is used, the number of sites is estimated
from the host's density: ``4/3 pi Rcut^3`` (a cylinder: ``pi Rcut^2 hcut``) divided by the volume per site of the host
cell, which is within a few per cent of the count for clusters of more than a hundred sites.
"""

MAX_SEARCH_SITES = 30_000
"""Most candidate sites aiida-kkr's neighbour search (``create_scoef_array``) may generate for a spherical cluster.

The search builds every host site in a box of ``(2 b + 1)^3`` cells, ``b = int(Rcut / shortest cell length + 3)``,
appending them one by one (time quadratic in their number): 20,000 candidates took 0.6 s, 37,000 took 11 s, 62,500
took 32 s on the development machine. The cluster-size limit alone does not bound this for hosts with many sites
per cell or a short cell vector; a cluster of :data:`MAX_CLUSTER_ATOMS` sites in fcc Cu needs at most 13,500.
"""

MAX_CYLINDER_SEARCH_SITES = 3_000
"""Most candidate sites of aiida-kkr's neighbour search for a cylindrical cluster (``hcut > 0``).

The cylinder test rotates all candidates once per candidate: 1,400 candidates took 6 s and 2,900 took 29 s.
"""

_MAX_ATOMIC_NUMBER = 118
_RIMP_REL_TOLERANCE = 1e-4
"""How far (in alat units) an ``Rimp_rel`` may lie from the cluster site it names; rows of a cluster are >0.1 apart."""
_OCCUPATION_TOLERANCE = 1e-6
_SCOEF_CACHE_SIZE = 4096


class ClusterTooLargeError(ValueError):
    """The cluster an ``impurity_info`` asks for exceeds :data:`MAX_CLUSTER_ATOMS` (or the neighbour search limits)."""


class RcutUnit(str, enum.Enum):
    """The unit in which ``Rcut`` and ``hcut`` of an ``impurity_info`` are given."""

    ANGSTROM = 'angstrom'
    ALAT = 'alat'


@dataclasses.dataclass(frozen=True)
class ImpurityInfo:
    """A validated ``impurity_info``: either the cutoff form or the explicit cluster form."""

    zimp: tuple[int, ...]
    rimp_rel: tuple[tuple[float, float, float], ...]
    rcut: float | None = None
    hcut: float = -1.0
    cylinder_orient: tuple[float, float, float] = (0.0, 0.0, 1.0)
    ilayer_center: int = 0
    imp_cls: tuple[tuple[float, ...], ...] | None = None

    @property
    def is_explicit_cluster(self) -> bool:
        """Whether the cluster rows are given (``imp_cls``) rather than cut out of the host (``Rcut``)."""
        return self.imp_cls is not None


def _atomic_number(value: t.Any, what: str) -> int:
    """Return ``value`` as an atomic number, accepting the floats (``29.0``) that aiida-kkr nodes often hold."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be an atomic number, got {value!r}.') from None
    if not number.is_integer() or not 0 <= number <= _MAX_ATOMIC_NUMBER:
        raise ValueError(f'{what} must be an integer atomic number between 0 and {_MAX_ATOMIC_NUMBER}, got {value!r}.')
    return int(number)


def _number(value: t.Any, what: str) -> float:
    """Return ``value`` as a finite float; a bool, a string or a list is no number, whatever ``float`` makes of it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f'{what} must be a number, got {value!r}.')
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f'{what} must be a finite number, got {value!r}.')
    return number


def _vector(value: t.Any, what: str) -> tuple[float, float, float]:
    try:
        vector = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a 3-vector of numbers, got {value!r}.') from None
    if vector.shape != (3,) or not np.all(np.isfinite(vector)):
        raise ValueError(f'{what} must be a 3-vector of numbers, got {value!r}.')
    return tuple(float(x) for x in vector)  # type: ignore[return-value]


def parse_impurity_info(impurity_info: orm.Dict | collections.abc.Mapping[str, t.Any]) -> ImpurityInfo:
    """Validate an ``impurity_info`` the way aiida-kkr reads it and return it normalised.

    :raises ValueError: naming the problem, if a key is missing or the keys contradict each other.
    """
    if isinstance(impurity_info, orm.Dict):
        impurity_info = impurity_info.get_dict()
    if not isinstance(impurity_info, collections.abc.Mapping):
        raise TypeError(f'impurity_info must be a Dict or a mapping, got {type(impurity_info).__name__}.')

    if 'Zimp' not in impurity_info:
        raise ValueError(f"impurity_info has no 'Zimp' (the impurity atomic numbers); keys: {sorted(impurity_info)}.")
    zimp_raw = impurity_info['Zimp']
    zimp_list = list(zimp_raw) if isinstance(zimp_raw, (list, tuple)) else [zimp_raw]
    if not zimp_list:
        raise ValueError("impurity_info 'Zimp' is an empty list.")
    zimp = tuple(_atomic_number(z, f"impurity_info 'Zimp' entry {index}") for index, z in enumerate(zimp_list))

    rimp_raw = impurity_info.get('Rimp_rel', [[0.0, 0.0, 0.0]])
    if not isinstance(rimp_raw, (list, tuple)) or not rimp_raw:
        raise ValueError(f"impurity_info 'Rimp_rel' must be a list of 3-vectors, got {rimp_raw!r}.")
    rimp_rel = tuple(_vector(r, f"impurity_info 'Rimp_rel' entry {index}") for index, r in enumerate(rimp_raw))
    if len(rimp_rel) != len(zimp):
        raise ValueError(
            f"impurity_info has {len(zimp)} 'Zimp' value(s) {list(zimp)} but {len(rimp_rel)} 'Rimp_rel' position(s): "
            'every impurity needs its position (without Rimp_rel there is one impurity, at the centre).'
        )

    if 'imp_cls' in impurity_info:
        # aiida-kkr uses ``imp_cls`` whenever it is present, ignoring ``Rcut``: so do we.
        try:
            imp_cls = np.asarray(impurity_info['imp_cls'], dtype=float)
        except (TypeError, ValueError):
            raise ValueError("impurity_info 'imp_cls' must be a table of numbers.") from None
        if imp_cls.ndim != 2 or imp_cls.shape[0] < 1 or imp_cls.shape[1] < 5 or not np.all(np.isfinite(imp_cls)):
            raise ValueError(
                "impurity_info 'imp_cls' must have one row (x, y, z, host site, Z, distance) per cluster site, "
                f'got shape {imp_cls.shape}.'
            )
        if imp_cls.shape[0] > MAX_CLUSTER_ATOMS:
            raise ClusterTooLargeError(
                f"impurity_info 'imp_cls' has {imp_cls.shape[0]} rows, more than the limit of {MAX_CLUSTER_ATOMS} "
                'cluster sites (aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS): give a smaller cluster.'
            )
        return ImpurityInfo(zimp=zimp, rimp_rel=rimp_rel, imp_cls=tuple(map(tuple, imp_cls.tolist())))

    if 'Rcut' not in impurity_info:
        raise ValueError(
            "impurity_info needs either 'Rcut' (cluster radius around 'ilayer_center') or 'imp_cls' (explicit "
            f'cluster); keys: {sorted(impurity_info)}.'
        )
    rcut = _number(impurity_info['Rcut'], "impurity_info 'Rcut'")
    hcut = _number(impurity_info.get('hcut', -1.0), "impurity_info 'hcut'")
    ilayer_center = impurity_info.get('ilayer_center', 0)
    if rcut <= 0:
        raise ValueError(f"impurity_info 'Rcut' must be a positive radius, got {impurity_info['Rcut']!r}.")
    if (
        isinstance(ilayer_center, bool)
        or not isinstance(ilayer_center, (int, float, np.integer, np.floating))
        or not np.isfinite(ilayer_center)
        or not float(ilayer_center).is_integer()
        or ilayer_center < 0
    ):
        raise ValueError(
            f"impurity_info 'ilayer_center' must be a host site index (an integer >= 0), got {ilayer_center!r}."
        )
    orient = _vector(impurity_info.get('cylinder_orient', [0.0, 0.0, 1.0]), "impurity_info 'cylinder_orient'")
    if hcut > 0 and not np.linalg.norm(orient) > 0:
        raise ValueError("impurity_info 'cylinder_orient' must be a non-zero 3-vector (the axis of the cylinder).")
    return ImpurityInfo(
        zimp=zimp,
        rimp_rel=rimp_rel,
        rcut=rcut,
        hcut=hcut,
        cylinder_orient=orient,
        ilayer_center=int(ilayer_center),
    )


def _as_structure(host: orm.StructureData | ase.Atoms) -> orm.StructureData:
    """Return the host as a ``StructureData`` (unstored if it came as ``ase.Atoms``), the form aiida-kkr works on."""
    if isinstance(host, orm.StructureData):
        return host
    if isinstance(host, ase.Atoms):
        return orm.StructureData(ase=host)
    raise TypeError(f'host must be a StructureData or ase.Atoms, got {type(host).__name__}.')


class _HostReading:
    """What the cluster functions read from a host ``StructureData``, each read once.

    A ``StructureData`` builds its sites and kinds anew from its attributes on every access; a host is shared by
    hundreds of embeddings, so inside :func:`reading_hosts` each host is read once (see :func:`_read_host`).
    """

    def __init__(self, host: orm.StructureData) -> None:
        self.host = host
        self.cell = np.array(host.cell, dtype=float)
        self.pbc = tuple(bool(flag) for flag in host.pbc)
        self.kinds = {kind.name: kind for kind in host.kinds}
        sites = host.sites
        self.site_kinds = [site.kind_name for site in sites]
        self.positions = np.array([site.position for site in sites], dtype=float).reshape(len(sites), 3)
        self.n_sites = len(sites)

    @functools.cached_property
    def alat(self) -> float:
        from masci_tools.io.common_functions import get_alat_from_bravais

        return float(get_alat_from_bravais(self.cell.copy(), self.pbc[2]))

    @functools.cached_property
    def atomic_numbers(self) -> np.ndarray | ValueError:
        """The atomic numbers of the sites, or the error that says why the host has none."""
        numbers = np.empty(self.n_sites, dtype=int)
        for index, kind_name in enumerate(self.site_kinds):
            kind = self.kinds[kind_name]
            if is_empty_sphere(kind):
                numbers[index] = 0
            elif kind.is_alloy or kind.has_vacancies:
                return ValueError(
                    f'host site {index} has kind {kind.name!r} ({kind.get_symbols_string()}): a CPA/VCA site, partly '
                    'occupied or an alloy, is not a single atom and cannot be part of an impurity cluster.'
                )
            else:
                try:
                    numbers[index] = _atomic_number(_ATOMIC_NUMBERS[kind.symbols[0]], f'host kind {kind.name!r}')
                except ValueError as exception:
                    return exception
        numbers.setflags(write=False)
        return numbers

    @functools.cached_property
    def fingerprint(self) -> tuple:
        """A hashable summary of everything ``create_scoef_array`` reads from the host."""
        kinds = {name: (kind.symbols, kind.weights) for name, kind in self.kinds.items()}
        sites = tuple(
            (tuple(position), kinds[kind_name])
            for position, kind_name in zip(self.positions.tolist(), self.site_kinds, strict=True)
        )
        return (tuple(map(tuple, self.cell.tolist())), self.pbc, sites)


_HOST_READINGS: contextvars.ContextVar[dict[int, _HostReading] | None] = contextvars.ContextVar(
    'aiida_mlworkbench_host_readings', default=None
)


@contextlib.contextmanager
def reading_hosts() -> collections.abc.Iterator[None]:
    """Within this context each host ``StructureData`` is read once, however many embeddings share it.

    Only for hosts that are not changed inside the context (the cluster extraction works on its own copies).
    """
    token = _HOST_READINGS.set({})
    try:
        yield
    finally:
        _HOST_READINGS.reset(token)


def _read_host(host: orm.StructureData) -> _HostReading:
    readings = _HOST_READINGS.get()
    if readings is None:
        return _HostReading(host)
    reading = readings.get(id(host))
    if reading is None or reading.host is not host:
        reading = readings[id(host)] = _HostReading(host)
    return reading


def host_alat(host: orm.StructureData) -> float:
    """Return aiida-kkr's lattice constant ``alat`` of the host in Angstrom: the unit of ``scoef`` and ``imp_cls``."""
    return _read_host(host).alat


def is_empty_sphere(kind: orm.Kind) -> bool:
    """Whether juKKR sees sites of ``kind`` as vacuum (``ZATOM = 0``): the symbol ``X``, or a kind with (almost) only
    vacancies, like aiida-kkr's ``{H0.00X1.00}`` kind ``HX``."""
    return kind.symbols == ('X',) or (kind.has_vacancies and float(sum(kind.weights)) < _OCCUPATION_TOLERANCE)


def host_site_atomic_numbers(host: orm.StructureData) -> np.ndarray:
    """Return the atomic number juKKR gives each host site, 0 for an empty sphere (vacuum), as aiida-kkr does.

    :raises ValueError: if a site is an alloy or partly vacant (CPA/VCA): such a site is not one atom.
    """
    numbers = _read_host(host).atomic_numbers
    if isinstance(numbers, ValueError):
        raise ValueError(str(numbers))
    return numbers.copy()


def _atomic_numbers() -> dict[str, int]:
    from aiida.common.constants import elements

    return {data['symbol']: number for number, data in elements.items()}


_ATOMIC_NUMBERS = _atomic_numbers()


_scoef_cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()


def _cached_scoef_rows(host: orm.StructureData, rcut: float, hcut: float, orient: tuple, center: int) -> np.ndarray:
    """Return ``create_scoef_array`` of the host, from a least-recently-used cache keyed by geometry and cutoff."""
    from aiida_kkr.tools.tools_kkrimp import create_scoef_array

    key = (_read_host(host).fingerprint, rcut, hcut, orient, center)
    rows = _scoef_cache.get(key)
    if rows is None:
        rows = create_scoef_array(host, rcut, hcut, list(orient), center)
        rows.setflags(write=False)
        _scoef_cache[key] = rows
        if len(_scoef_cache) > _SCOEF_CACHE_SIZE:
            _scoef_cache.popitem(last=False)
    else:
        _scoef_cache.move_to_end(key)
    return rows


@dataclasses.dataclass(frozen=True)
class ClusterSize:
    """Estimated size of the cluster of an embedding, computed from the host cell before any site is generated."""

    n_sites: float
    """Estimated sites (atoms and empty spheres) of the cluster: exact for ``imp_cls``, from the density for Rcut."""
    n_search_sites: int
    """Candidate sites aiida-kkr's neighbour search generates (0 for ``imp_cls``, which needs no search)."""
    cylinder: bool = False


def estimate_cluster_size(
    host: orm.StructureData, impurity_info: ImpurityInfo, rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM
) -> ClusterSize:
    """Return the estimated size of the cluster and of aiida-kkr's neighbour search, from the host cell only.

    The search box is the one ``aiida_kkr.tools.tools_kkrimp.find_neighbors`` builds, so the estimate bounds the time
    of ``create_scoef_array`` before it runs.

    :raises ValueError: if the host cell has a vector of zero length (no search box can be built around it).
    """
    if impurity_info.is_explicit_cluster:
        return ClusterSize(float(len(impurity_info.imp_cls or ())), 0)
    reading = _read_host(host)
    cell = reading.cell
    n_host_sites = reading.n_sites
    lengths = np.linalg.norm(cell, axis=1)
    if not reading.pbc[2]:  # as find_neighbors: the third vector spans the sites' height plus 10 Angstrom
        positions = reading.positions
        top = positions[positions[:, 2] == positions[:, 2].max()][0].copy()
        top[2] += 10
        lengths[2] = float(np.sum(np.abs(top)))
    if not np.all(np.isfinite(lengths)) or not np.all(lengths > 0):
        raise ValueError(f'the host cell has a vector of zero length ({lengths.tolist()}): it is no crystal.')
    scale = host_alat(host) if RcutUnit(rcut_unit) is RcutUnit.ALAT else 1.0
    rcut = impurity_info.rcut * scale if impurity_info.rcut is not None else 0.0
    cylinder = impurity_info.hcut > 0
    hcut = impurity_info.hcut * scale if cylinder else 0.0
    reach = max(hcut / 2.0, rcut) if cylinder else rcut
    # A box too large for an int is refused anyway: cap the count instead of overflowing.
    box = float(np.max(np.floor(reach / lengths + 3)))
    n_search = min(n_host_sites * (2 * box + 1) ** 3 + 1, float(2**62))
    volume_per_site = abs(float(np.linalg.det(cell))) / max(n_host_sites, 1)
    if volume_per_site > 0:
        volume = np.pi * rcut**2 * hcut if cylinder else 4.0 / 3.0 * np.pi * rcut**3
        n_sites = volume / volume_per_site
    else:
        n_sites = n_search  # no density to estimate from: the search bounds the cluster
    return ClusterSize(float(n_sites), int(n_search), cylinder)


def check_cluster_size(
    host: orm.StructureData, impurity_info: ImpurityInfo, rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM
) -> ClusterSize:
    """Refuse a cluster above :data:`MAX_CLUSTER_ATOMS` sites or a neighbour search above its limit, before it runs.

    :raises ClusterTooLargeError: naming the estimate, the limit and what to change.
    """
    size = estimate_cluster_size(host, impurity_info, rcut_unit)
    if impurity_info.is_explicit_cluster:  # its size was checked with the rows of imp_cls
        return size
    rcut = f"impurity_info 'Rcut' {impurity_info.rcut:g} ({RcutUnit(rcut_unit).value})"
    if size.n_sites > MAX_CLUSTER_ATOMS:
        raise ClusterTooLargeError(
            f'{rcut} gives a cluster of about {size.n_sites:.3g} sites in this host, more than the limit of '
            f'{MAX_CLUSTER_ATOMS} (aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS): use a smaller Rcut (real '
            'aiida-kkr clusters hold tens to a few hundred sites); check its unit (alat before aiida-kkr 1.0).'
        )
    limit = MAX_CYLINDER_SEARCH_SITES if size.cylinder else MAX_SEARCH_SITES
    if size.n_search_sites > limit:
        name = 'MAX_CYLINDER_SEARCH_SITES' if size.cylinder else 'MAX_SEARCH_SITES'
        raise ClusterTooLargeError(
            f"{rcut}{' with hcut' if size.cylinder else ''} makes aiida-kkr's neighbour search generate about "
            f'{size.n_search_sites:.3g} candidate sites in this host ({_read_host(host).n_sites} sites per cell), more '
            f'than the limit of {limit} (aiida_mlworkbench.kkr.geometry.{name}): use a smaller Rcut'
            f'{" or hcut" if size.cylinder else ""}, or a host cell with fewer sites.'
        )
    return size


def check_embedding(
    host: orm.StructureData | ase.Atoms,
    impurity_info: orm.Dict | collections.abc.Mapping[str, t.Any],
    rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM,
) -> ImpurityInfo:
    """Check everything about an embedding that needs no cluster built: cheap enough for a process's input validator.

    The ``impurity_info`` itself, the unit, the host's sites (no CPA/VCA site), ``ilayer_center`` within the host and
    the cluster size (:func:`check_cluster_size`). What remains for :func:`impurity_cluster` is whether ``Rimp_rel``
    and ``imp_cls`` name sites of the cluster.

    :raises ValueError: naming the problem (:class:`ClusterTooLargeError` for a cluster over the limits).
    """
    try:
        unit = RcutUnit(rcut_unit)
    except ValueError:
        raise ValueError(
            f'the unit of Rcut must be one of {", ".join(repr(u.value) for u in RcutUnit)}, got {rcut_unit!r}.'
        ) from None
    info = parse_impurity_info(impurity_info)
    structure = _as_structure(host)
    host_site_atomic_numbers(structure)
    n_sites = _read_host(structure).n_sites
    if not info.is_explicit_cluster and info.ilayer_center >= n_sites:
        raise ValueError(
            f"impurity_info 'ilayer_center' is {info.ilayer_center} but the host has only "
            f'{n_sites} sites (0 to {n_sites - 1}).'
        )
    check_cluster_size(structure, info, unit)
    return info


def scoef_rows(
    host: orm.StructureData, impurity_info: ImpurityInfo, rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM
) -> np.ndarray:
    """Return the rows of the ``scoef`` file aiida-kkr writes for this embedding (positions in alat units).

    Hosts are often shared by thousands of embeddings that differ only in ``Zimp``, so the rows are cached by the
    host's geometry and the cutoff: aiida-kkr's neighbour search takes milliseconds per call.
    """
    if impurity_info.is_explicit_cluster:
        return np.array(impurity_info.imp_cls, dtype=float)

    n_sites = _read_host(host).n_sites
    if impurity_info.ilayer_center >= n_sites:
        raise ValueError(
            f"impurity_info 'ilayer_center' is {impurity_info.ilayer_center} but the host has only "
            f'{n_sites} sites (0 to {n_sites - 1}).'
        )
    scale = host_alat(host) if RcutUnit(rcut_unit) is RcutUnit.ALAT else 1.0
    hcut = impurity_info.hcut * scale if impurity_info.hcut > 0 else impurity_info.hcut
    return _cached_scoef_rows(
        host,
        impurity_info.rcut * scale,
        hcut,
        impurity_info.cylinder_orient,
        impurity_info.ilayer_center,
    ).copy()


def _impurity_rows(rows: np.ndarray, impurity_info: ImpurityInfo) -> list[int]:
    """Return the row of each impurity: the site nearest to its ``Rimp_rel``, which must be a site of the cluster."""
    found = []
    for index, rimp in enumerate(impurity_info.rimp_rel):
        distances = np.linalg.norm(rows[:, :3] - np.array(rimp), axis=1)
        row = int(np.argmin(distances))
        if distances[row] > _RIMP_REL_TOLERANCE:
            raise ValueError(
                f"impurity_info 'Rimp_rel' entry {index} {list(rimp)} is no site of the cluster (nearest site is "
                f'{distances[row]:.3g} alat away): Zimp and imp_cls/Rcut are inconsistent.'
            )
        if row in found:
            raise ValueError(f"impurity_info 'Rimp_rel' names cluster site {row} twice.")
        found.append(row)
    return found


def impurity_cluster(
    host: orm.StructureData | ase.Atoms,
    impurity_info: orm.Dict | collections.abc.Mapping[str, t.Any],
    rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM,
) -> ase.Atoms:
    """Return the impurity cluster juKKR used, as non-periodic ``ase.Atoms`` in Angstrom with the centre at the origin.

    Atoms come in the order of the ``scoef`` rows (by distance from the centre), empty spheres left out. Each atom
    carries the array ``host_site`` (the 1-based host site index of its ``scoef`` row) and the tag 1 if it is an
    impurity, 0 if a host atom. Nothing is stored.

    :param host: the host crystal (aiida-kkr's ``find_parent_structure`` of the host Green function).
    :param impurity_info: the ``impurity_info`` of the embedding, either form (see the module docstring).
    :param rcut_unit: the unit of ``Rcut`` and ``hcut``: ``'angstrom'`` (aiida-kkr >= 1.0) or ``'alat'`` (older).
    :raises ValueError: naming the problem, if ``impurity_info`` is incomplete or inconsistent with the host
        (:class:`ClusterTooLargeError` if the cluster would exceed :data:`MAX_CLUSTER_ATOMS`, checked before any
        site is generated).
    """
    structure = _as_structure(host)
    info = check_embedding(structure, impurity_info, rcut_unit)
    numbers_of_sites = host_site_atomic_numbers(structure)
    rows = scoef_rows(structure, info, rcut_unit)

    site_index = rows[:, 3].astype(int)
    if site_index.min() < 1 or site_index.max() > len(numbers_of_sites):
        raise ValueError(
            f'the cluster names host sites {site_index.min()} to {site_index.max()} but the host has '
            f'{len(numbers_of_sites)} sites: imp_cls does not belong to this host.'
        )
    numbers = numbers_of_sites[site_index - 1]
    is_impurity = np.zeros(len(rows), dtype=int)
    for row, zimp in zip(_impurity_rows(rows, info), info.zimp, strict=True):
        numbers[row] = zimp
        is_impurity[row] = 1

    keep = numbers > 0
    atoms = ase.Atoms(numbers=numbers[keep], positions=rows[keep, :3] * host_alat(structure), pbc=False)
    atoms.set_tags(is_impurity[keep])
    atoms.new_array('host_site', site_index[keep])
    return atoms
