"""A synthetic impurity database for demonstrations and benchmarks, at the scale of a real aiida-kkr one.

It holds exactly the Data nodes a user gives aiida-kkr's ``kkr_imp_wc``: host crystals as ``StructureData`` (primitive
cells of elements in their bcc, fcc or hcp reference state, with ASE's reference lattice constants) and
``impurity_info`` ``Dict`` nodes ``{'ilayer_center': 0, 'Rcut': <Angstrom>, 'Zimp': [<Z>]}``. No calculation ran on
them, so no process node is made: a synthetic database has no fake provenance.

The group holds the hosts and the ``impurity_info`` nodes. Each ``impurity_info`` carries the extras
:data:`EXTRA_HOST_UUID` (the UUID of its host) and :data:`EXTRA_INDEX` (its position in the database);
:func:`iter_synthetic_embeddings` yields the ``(host, impurity_info)`` pairs in that order.
"""

from __future__ import annotations

import collections
import dataclasses
import typing as t

import numpy as np
from aiida import orm

__all__ = (
    'EXTRA_HOST_UUID',
    'EXTRA_INDEX',
    'EXTRA_SYNTHETIC',
    'HOST_ELEMENTS',
    'HOST_STRAINS',
    'IMPURITY_SPECIES',
    'LATTICE_CLASSES',
    'SyntheticEmbedding',
    'create_synthetic_database',
    'default_group_label',
    'iter_synthetic_embeddings',
    'max_database_size',
    'plan_synthetic_database',
    'two_shell_cutoff',
)

LatticeClass = t.Literal['bcc', 'fcc', 'hcp']
LATTICE_CLASSES: tuple[LatticeClass, ...] = ('bcc', 'fcc', 'hcp')

HOST_ELEMENTS: dict[LatticeClass, tuple[str, ...]] = {
    'bcc': ('Li', 'Na', 'K', 'V', 'Cr', 'Fe', 'Rb', 'Nb', 'Mo', 'Cs', 'Ba', 'Eu', 'Ta', 'W'),
    'fcc': ('Al', 'Ca', 'Ni', 'Cu', 'Sr', 'Rh', 'Pd', 'Ag', 'Ce', 'Yb', 'Ir', 'Pt', 'Au', 'Pb'),
    'hcp': (
        'Be', 'Mg', 'Sc', 'Ti', 'Co', 'Zn', 'Y', 'Zr', 'Ru', 'Cd', 'La', 'Pr',
        'Nd', 'Gd', 'Tb', 'Dy', 'Ho', 'Er', 'Tm', 'Lu', 'Hf', 'Re', 'Os', 'Tl',
    ),
}  # fmt: skip
"""The host elements by lattice class: every element whose ASE reference state is bcc, fcc or hcp, except the noble
gases (van der Waals solids, no hosts for metallic impurities), Ac and Th (radioactive actinides), Tc (radioactive) and
Se and Te (ASE lists them as hcp, but they are trigonal chains without a basis that ``ase.build.bulk`` can build)."""

IMPURITY_ONLY_ELEMENTS: tuple[str, ...] = ('B', 'C', 'Si', 'Mn', 'Ga', 'Ge', 'Sn', 'Bi')
"""Common impurity elements that are no hosts here (their reference states are not bcc, fcc or hcp)."""

IMPURITY_SPECIES: tuple[str, ...] = (
    'Li', 'Be', 'B', 'C', 'Na', 'Mg', 'Al', 'Si', 'K', 'Ca',
    'Sc', 'Ti', 'V', 'Cr', 'Mn', 'Fe', 'Co', 'Ni', 'Cu', 'Zn',
    'Ga', 'Ge', 'Rb', 'Sr', 'Y', 'Zr', 'Nb', 'Mo', 'Ru', 'Rh',
    'Pd', 'Ag', 'Cd', 'Sn', 'Cs', 'Ba', 'La', 'Ce', 'Pr', 'Nd',
    'Eu', 'Gd', 'Tb', 'Dy', 'Ho', 'Er', 'Tm', 'Yb', 'Lu', 'Hf',
    'Ta', 'W', 'Re', 'Os', 'Ir', 'Pt', 'Au', 'Tl', 'Pb', 'Bi',
)  # fmt: skip
"""The 60 species of the database, ordered by atomic number: all host elements and :data:`IMPURITY_ONLY_ELEMENTS`.
Every species is an impurity in every host but its own."""

HOST_STRAINS: tuple[float, ...] = (0.0, -0.02, 0.02, -0.01, 0.01, -0.03, 0.03, -0.04, 0.04, -0.05)
"""Isotropic strains of the host lattice, in order of use. The 3068 (host, impurity) pairs at the reference lattice
constant are used first; larger databases add hosts compressed and then expanded by 2 %, then by 1, 3, 4 and 5 %, so
that no two embeddings are the same (a duplicate would leak between a training and a test set)."""

_ALWAYS_DRAWN_STRAINS = 3
"""Strains whose pairs are always drawn, needed or not; further strains are drawn only for a class whose quota needs
them, so that adding strains left every database whose classes fit in the first three as it was (same seed, same
list): all databases of up to 7434 embeddings, 1752 and 7100 among them."""

SHELL_NEIGHBOURS: dict[LatticeClass, int] = {'bcc': 8 + 6, 'fcc': 12 + 6, 'hcp': 12 + 6}
"""Number of neighbours in the first two shells of the ideal lattice (in hcp with c/a far from ideal, as Zn and Cd,
the first shell splits into 6 + 6, which still counts as one)."""

EXTRA_SYNTHETIC = 'mlworkbench_synthetic'
EXTRA_HOST_UUID = 'mlworkbench_host_uuid'
EXTRA_INDEX = 'mlworkbench_embedding_index'
EXTRA_LATTICE = 'mlworkbench_reference_lattice'
EXTRA_STRAIN = 'mlworkbench_host_strain'

_DESCRIPTION_NOTE = 'made by aiida-mlworkbench for demonstrations and benchmarks; no calculation ran on it'


@dataclasses.dataclass(frozen=True)
class SyntheticEmbedding:
    """One planned embedding: an impurity element in a host element, at a strain of the host's reference lattice."""

    host: str
    impurity: str
    lattice: LatticeClass
    strain: float


def default_group_label(size: int, seed: int) -> str:
    """Return the label of the group of a synthetic database: ``mlworkbench/synthetic/<size>-seed<seed>``."""
    return f'mlworkbench/synthetic/{size}-seed{seed}'


def _pair_capacity(lattice: LatticeClass) -> int:
    """Return how many distinct embeddings hosts of one lattice class can give over all strains."""
    return len(HOST_STRAINS) * len(HOST_ELEMENTS[lattice]) * (len(IMPURITY_SPECIES) - 1)


def max_database_size() -> int:
    """Return the largest database in which no two embeddings are the same (30,680)."""
    return sum(_pair_capacity(lattice) for lattice in LATTICE_CLASSES)


def _class_quotas(size: int) -> dict[LatticeClass, int]:
    """Share ``size`` embeddings as evenly as possible among the lattice classes, as far as each class has pairs."""
    quotas = dict.fromkeys(LATTICE_CLASSES, 0)
    remaining = size
    while remaining:
        for lattice in LATTICE_CLASSES:
            if remaining and quotas[lattice] < _pair_capacity(lattice):
                quotas[lattice] += 1
                remaining -= 1
    return quotas


def plan_synthetic_database(size: int = 1752, seed: int = 0) -> list[SyntheticEmbedding]:
    """Return the embeddings of a synthetic database in order, without touching the storage.

    The lattice classes get equal shares (as far as they have pairs); within a class the (host, impurity) pairs are
    drawn at random without repetition, reference lattice constants first, then strained hosts (:data:`HOST_STRAINS`);
    the final order is a random permutation. The same ``(size, seed)`` always gives the same list.

    :raises ValueError: if ``size`` is not positive or larger than :func:`max_database_size`.
    """
    if not 0 < size <= max_database_size():
        raise ValueError(f'size must be between 1 and {max_database_size()} distinct embeddings, got {size}.')

    rng = np.random.default_rng(seed)
    embeddings: list[SyntheticEmbedding] = []
    for lattice, quota in _class_quotas(size).items():
        candidates: list[SyntheticEmbedding] = []
        for number, strain in enumerate(HOST_STRAINS):
            if number >= _ALWAYS_DRAWN_STRAINS and len(candidates) >= quota:
                break
            pairs = [
                SyntheticEmbedding(host, impurity, lattice, strain)
                for host in HOST_ELEMENTS[lattice]
                for impurity in IMPURITY_SPECIES
                if impurity != host
            ]
            candidates.extend(pairs[index] for index in rng.permutation(len(pairs)))
        embeddings.extend(candidates[:quota])

    return [embeddings[index] for index in rng.permutation(len(embeddings))]


def _host_atoms(symbol: str, strain: float):
    """Return the primitive cell of ``symbol`` in its ASE reference state, isotropically strained by ``strain``."""
    from ase.build import bulk

    atoms = bulk(symbol)
    if strain:
        atoms.set_cell(atoms.cell[:] * (1.0 + strain), scale_atoms=True)
    return atoms


def two_shell_cutoff(atoms, lattice: LatticeClass, site: int = 0) -> float:
    """Return the cluster radius in Angstrom that holds the first two neighbour shells around ``site``.

    The radius lies midway between the farthest neighbour of the two shells (the 14th in bcc, the 18th in fcc and
    hcp, see :data:`SHELL_NEIGHBOURS`) and the next one, so it is far from any neighbour distance.

    :param atoms: the host crystal as an ``ase.Atoms``.
    """
    from ase.neighborlist import PrimitiveNeighborList

    count = SHELL_NEIGHBOURS[lattice]
    wigner_seitz_radius = (3.0 * atoms.get_volume() / (4.0 * np.pi * len(atoms))) ** (1.0 / 3.0)
    cutoff = 4.0 * wigner_seitz_radius  # the nearest neighbour is at about 1.8 radii, the 19th within 3.2
    neighbour_list = PrimitiveNeighborList([cutoff / 2.0] * len(atoms), skin=0.0, self_interaction=False, bothways=True)
    neighbour_list.update(atoms.pbc, atoms.cell[:], atoms.positions)
    indices, offsets = neighbour_list.get_neighbors(site)
    vectors = atoms.positions[indices] + offsets @ atoms.cell[:] - atoms.positions[site]
    distances = np.sort(np.linalg.norm(vectors, axis=1))
    if len(distances) <= count:
        raise ValueError(f'found only {len(distances)} neighbours within {cutoff} Angstrom, {count + 1} are needed.')
    return round(float(distances[count - 1] + distances[count]) / 2.0, 4)


def _get_existing_group(label: str, size: int, seed: int, reuse_existing: bool) -> orm.Group | None:
    """Return the group ``label`` if it exists; refuse to fill a group that already holds nodes unless reusing it."""
    from aiida.common.exceptions import NotExistent

    try:
        group = orm.Group.collection.get(label=label)
    except NotExistent:
        return None

    if group.is_empty:
        return group
    if not reuse_existing:
        raise ValueError(
            f'the group `{label}` already exists and holds {group.count()} nodes. Pass `reuse_existing=True` '
            '(`--reuse-existing`) to use it as it is, choose another group label, or delete it with '
            f'`verdi group delete "{label}"`.'
        )
    if group.base.extras.get('size', None) != size or group.base.extras.get('seed', None) != seed:
        raise ValueError(
            f'the group `{label}` is not a synthetic database of size {size} with seed {seed} '
            f'(its extras: {group.base.extras.all}): choose another group label.'
        )
    return group


def create_synthetic_database(
    size: int = 1752, seed: int = 0, group_label: str | None = None, reuse_existing: bool = False
) -> orm.Group:
    """Create a seeded synthetic impurity database and return the group that holds it.

    Hosts are stored once and shared by all their impurities; every node carries the extra
    ``mlworkbench_synthetic: True`` and a description that says it is synthetic. Iterate the embeddings in order with
    :func:`iter_synthetic_embeddings`. All nodes and the group membership are stored in one transaction: if anything
    fails, no node and no new group is left behind, and an existing empty group stays empty.

    :param size: number of embeddings, at most :func:`max_database_size`; 1752 and 7100 are the sizes of the
        reference studies.
    :param seed: seed of the random choice and order of the (host, impurity) pairs.
    :param group_label: label of the group, by default :func:`default_group_label`.
    :param reuse_existing: return an existing, non-empty group of this size and seed as it is instead of failing.
    :raises ValueError: if the size is out of range, or the group exists, holds nodes and is not to be reused.
    """
    from aiida.manage import get_manager

    label = group_label or default_group_label(size, seed)
    plan = plan_synthetic_database(size, seed)
    group = _get_existing_group(label, size, seed, reuse_existing)
    if group is not None and not group.is_empty:
        return group

    host_lattices: dict[tuple[str, float], LatticeClass] = {}  # in order of first use
    cutoffs: dict[tuple[str, float], float] = {}
    reference_cutoffs: dict[str, float] = {}  # an isotropic strain scales the cutoff with the lattice
    for embedding in plan:
        key = (embedding.host, embedding.strain)
        if key in host_lattices:
            continue
        host_lattices[key] = embedding.lattice
        if embedding.host not in reference_cutoffs:
            reference_cutoffs[embedding.host] = two_shell_cutoff(_host_atoms(embedding.host, 0.0), embedding.lattice)
        cutoffs[key] = round(reference_cutoffs[embedding.host] * (1.0 + embedding.strain), 4)

    # One transaction: a failure leaves neither nodes nor a new group behind, and the storage commits once. Each node
    # is made just before it is stored: a flush that meets an unstored node warns (`DbUser.dbnodes` SAWarning).
    with get_manager().get_profile_storage().transaction():
        hosts = {key: _host(*key, lattice).store() for key, lattice in host_lattices.items()}
        impurity_infos: list[orm.Dict] = []
        for index, embedding in enumerate(plan):
            key = (embedding.host, embedding.strain)
            impurity_infos.append(_impurity_info(index, embedding, hosts[key], cutoffs[key]).store())

        if group is None:
            group = orm.Group(label=label).store()
        group.description = (
            f'Synthetic impurity database of {size} embeddings (seed {seed}) in {len(hosts)} hosts, '
            f'{_DESCRIPTION_NOTE}.'
        )
        counts = collections.Counter(embedding.lattice for embedding in plan)
        group.base.extras.set_many(
            {EXTRA_SYNTHETIC: True, 'size': size, 'seed': seed, 'hosts': len(hosts), 'lattice_counts': dict(counts)}
        )
        group.add_nodes([*hosts.values(), *impurity_infos])

    return group


def _host(symbol: str, strain: float, lattice: LatticeClass) -> orm.StructureData:
    """Return the unstored host crystal of ``symbol`` at ``strain``, labelled and marked as synthetic."""
    strain_text = f', strained by {strain:+.0%}' if strain else ''
    host = orm.StructureData(ase=_host_atoms(symbol, strain))
    host.label = f'{symbol} {lattice} host{strain_text} (synthetic)'
    host.description = (
        f'Synthetic host: {symbol} in its ASE reference state ({lattice}{strain_text}), {_DESCRIPTION_NOTE}.'
    )
    host.base.extras.set_many({EXTRA_SYNTHETIC: True, EXTRA_LATTICE: lattice, EXTRA_STRAIN: strain})
    return host


def _impurity_info(index: int, embedding: SyntheticEmbedding, host: orm.StructureData, rcut: float) -> orm.Dict:
    """Return the unstored ``impurity_info`` ``Dict`` of one embedding, as ``kkr_imp_wc`` takes it.

    Its extras name the host by UUID and the position in the database.
    """
    impurity_info = orm.Dict({'ilayer_center': 0, 'Rcut': rcut, 'Zimp': [_atomic_number(embedding.impurity)]})
    impurity_info.label = f'{embedding.impurity} in {host.label}'
    impurity_info.description = (
        f'Synthetic impurity_info for kkr_imp_wc: a {embedding.impurity} impurity in {host.label}, '
        f'cluster of two neighbour shells, {_DESCRIPTION_NOTE}.'
    )
    impurity_info.base.extras.set_many({EXTRA_SYNTHETIC: True, EXTRA_HOST_UUID: host.uuid, EXTRA_INDEX: index})
    return impurity_info


def _atomic_number(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def iter_synthetic_embeddings(
    group: orm.Group, batch_size: int = 1000
) -> t.Iterator[tuple[orm.StructureData, orm.Dict]]:
    """Return an iterator over the ``(host, impurity_info)`` pairs of a synthetic database, in the order created.

    The ``impurity_info`` nodes are loaded ``batch_size`` at a time: thousands of nodes alive in the storage session
    make every later database commit slow (each commit expires all of them).

    :raises ValueError: if the group holds no synthetic embeddings or a host is missing from the storage.
    """
    query = orm.QueryBuilder()
    query.append(orm.Group, filters={'id': group.pk}, tag='group')
    query.append(
        orm.Dict,
        with_group='group',
        filters={f'extras.{EXTRA_SYNTHETIC}': True, 'extras': {'has_key': EXTRA_HOST_UUID}},
        tag='impurity_info',
        project=['id', f'extras.{EXTRA_HOST_UUID}'],
    )
    query.order_by({'impurity_info': [{f'extras.{EXTRA_INDEX}': {'order': 'asc', 'cast': 'i'}}]})
    rows: list[tuple[int, str]] = query.all()
    if not rows:
        raise ValueError(
            f'{group} holds no synthetic impurity embeddings: create them with `create_synthetic_database` or '
            '`aiida-mlworkbench synthetic create`.'
        )

    host_uuids = {host_uuid for _, host_uuid in rows}
    query = orm.QueryBuilder().append(
        orm.StructureData, filters={'uuid': {'in': list(host_uuids)}}, project=['uuid', '*']
    )
    hosts: dict[str, orm.StructureData] = dict(query.all())
    if missing := host_uuids - hosts.keys():
        raise ValueError(
            f'{len(missing)} hosts of the synthetic embeddings in {group} are missing, e.g. {min(missing)}.'
        )

    def generate() -> t.Iterator[tuple[orm.StructureData, orm.Dict]]:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            pks = sorted(pk for pk, _ in batch)
            query = orm.QueryBuilder().append(orm.Dict, filters={'id': {'in': pks}}, tag='impurity_info')
            query.order_by({'impurity_info': 'id'})
            # Zip with the sorted pks: reading ``node.pk`` of a freshly queried node is a database round trip.
            impurity_infos = dict(zip(pks, query.all(flat=True), strict=True))
            for pk, host_uuid in batch:
                yield hosts[host_uuid], impurity_infos[pk]

    return generate()
