"""Impurity clusters as ``StructureData``, built with provenance from the host and ``impurity_info`` of an embedding.

Two calcfunctions give the same clusters: :func:`impurity_cluster_structure` makes one per process, and
:func:`impurity_cluster_structures` makes many in one process (inputs ``hosts.<key>`` and ``impurity_infos.<key>``,
output ``clusters.<key>``), since a process costs far more than a cluster (about 0.5 s against 2 ms on SQLite). Either
way each cluster is created by a process that consumed its own host and ``impurity_info``, under the link labels of
its key, so the graph leads from a cluster back to the aiida-kkr calculations that used the same nodes.

:func:`build_impurity_clusters` is the entry point: it validates every pair before anything is stored and runs the
batched calcfunction on chunks of them.
"""

from __future__ import annotations

import collections.abc
import typing as t

import ase
from aiida import orm
from aiida.engine import ExitCode, calcfunction
from aiida.manage import get_manager

from aiida_mlworkbench.kkr.geometry import RcutUnit, impurity_cluster

if t.TYPE_CHECKING:
    from aiida_mlworkbench.kkr.embeddings import ImpurityEmbedding

__all__ = (
    'DEFAULT_BATCH_SIZE',
    'EXTRA_HOST_FORMULA',
    'EXTRA_HOST_UUID',
    'EXTRA_IMPURITY_INFO_UUID',
    'EXTRA_N_ATOMS',
    'EXTRA_RCUT_UNIT',
    'EXTRA_ZIMP',
    'build_impurity_clusters',
    'cluster_structure',
    'impurity_cluster_structure',
    'impurity_cluster_structures',
)

DEFAULT_BATCH_SIZE = 100
"""Pairs per :func:`impurity_cluster_structures` process.

AiiDA validates each new input or output link of a process against those already added, so the cost per link grows
with the batch: 1000 clusters took 304 s in one batch, 120 s in batches of 250, 63 s in batches of 100 and 82 s in
batches of 25 (where the process overhead shows) on the 2-core development machine.
"""

EXTRA_ZIMP = 'mlworkbench_zimp'
EXTRA_HOST_FORMULA = 'mlworkbench_host_formula'
EXTRA_N_ATOMS = 'mlworkbench_n_atoms'
EXTRA_HOST_UUID = 'mlworkbench_host_uuid'
EXTRA_IMPURITY_INFO_UUID = 'mlworkbench_impurity_info_uuid'
EXTRA_RCUT_UNIT = 'mlworkbench_rcut_unit'

ERROR_INVALID_EMBEDDING = 300
"""Exit status of the calcfunctions when a pair is no valid impurity embedding (the message says why)."""

Pair = tuple[orm.StructureData, orm.Dict]


def cluster_structure(
    host: orm.StructureData, impurity_info: orm.Dict, rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM
) -> orm.StructureData:
    """Return the impurity cluster as an unstored, non-periodic ``StructureData`` with queryable extras.

    The cell is zero: a cluster has no lattice. Extras: the impurity atomic numbers (:data:`EXTRA_ZIMP`), the host
    formula, the number of atoms, the UUIDs of the host and ``impurity_info`` and the unit ``Rcut`` was read in.

    :raises ValueError: if the pair is no valid embedding (see :func:`~aiida_mlworkbench.kkr.impurity_cluster`).
    """
    atoms: ase.Atoms = impurity_cluster(host, impurity_info, rcut_unit)
    structure = orm.StructureData(ase=atoms)
    structure.base.extras.set_many(
        {
            EXTRA_ZIMP: [int(z) for z in atoms.numbers[atoms.get_tags() == 1]],
            EXTRA_HOST_FORMULA: host.get_formula(),
            EXTRA_N_ATOMS: len(atoms),
            EXTRA_HOST_UUID: host.uuid,
            EXTRA_IMPURITY_INFO_UUID: impurity_info.uuid,
            EXTRA_RCUT_UNIT: RcutUnit(rcut_unit).value,
        }
    )
    return structure


def _rcut_unit(node: orm.Str | None) -> RcutUnit:
    if node is None:
        return RcutUnit.ANGSTROM
    return RcutUnit(node.value)


@calcfunction
def impurity_cluster_structure(
    host: orm.StructureData, impurity_info: orm.Dict, rcut_unit: orm.Str | None = None
) -> orm.StructureData | ExitCode:
    """Build the impurity cluster of one embedding (``rcut_unit``: ``'angstrom'``, the default, or ``'alat'``)."""
    try:
        return cluster_structure(host, impurity_info, _rcut_unit(rcut_unit))
    except ValueError as exception:
        return ExitCode(ERROR_INVALID_EMBEDDING, f'invalid impurity embedding: {exception}')


@calcfunction
def impurity_cluster_structures(
    **namespaces: dict[str, orm.Data],
) -> dict[str, dict[str, orm.StructureData]] | ExitCode:
    """Build the impurity clusters of many embeddings in one process.

    Inputs ``hosts.<key>``, ``impurity_infos.<key>`` and optionally ``rcut_units.<key>`` (a ``Str``: ``'alat'`` for
    aiida-kkr < 1.0, default ``'angstrom'``); outputs ``clusters.<key>``.
    """
    hosts = namespaces.get('hosts', {})
    impurity_infos = namespaces.get('impurity_infos', {})
    rcut_units = namespaces.get('rcut_units', {})
    unknown = set(namespaces) - {'hosts', 'impurity_infos', 'rcut_units'}
    if unknown or set(hosts) != set(impurity_infos) or not set(rcut_units) <= set(hosts):
        return ExitCode(
            ERROR_INVALID_EMBEDDING,
            'inputs must be the namespaces hosts, impurity_infos (same keys) and optionally rcut_units (a subset); '
            f'got {sorted(namespaces)} with keys differing: {sorted(set(hosts) ^ set(impurity_infos))}.',
        )
    clusters = {}
    for key, host in hosts.items():
        try:
            clusters[key] = cluster_structure(host, impurity_infos[key], _rcut_unit(rcut_units.get(key)))
        except ValueError as exception:
            return ExitCode(ERROR_INVALID_EMBEDDING, f'invalid impurity embedding {key}: {exception}')
    return {'clusters': clusters}


def _as_pairs(
    embeddings: collections.abc.Iterable[ImpurityEmbedding | Pair],
) -> list[tuple[orm.StructureData, orm.Dict, RcutUnit]]:
    pairs = []
    for embedding in embeddings:
        if isinstance(embedding, tuple):
            host, impurity_info = embedding
            rcut_unit = RcutUnit.ANGSTROM
        else:
            host, impurity_info, rcut_unit = embedding.host, embedding.impurity_info, embedding.rcut_unit
        if not isinstance(host, orm.StructureData) or not isinstance(impurity_info, orm.Dict):
            raise TypeError(
                f'an embedding must be a (StructureData, Dict) pair, got ({type(host).__name__}, '
                f'{type(impurity_info).__name__}).'
            )
        pairs.append((host, impurity_info, rcut_unit))
    return pairs


def build_impurity_clusters(
    embeddings: collections.abc.Iterable[ImpurityEmbedding | Pair], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[orm.StructureData]:
    """Build and store the impurity cluster of each embedding with provenance, in the order given.

    :param embeddings: :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding` objects or (host, ``impurity_info``) pairs
        (read with ``Rcut`` in Angstrom).
    :param batch_size: embeddings per :func:`impurity_cluster_structures` process.
    :raises ValueError: naming the embedding and the problem, before anything is stored, if one is invalid.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}.')
    pairs = _as_pairs(embeddings)
    for index, (host, impurity_info, rcut_unit) in enumerate(pairs):
        try:
            impurity_cluster(host, impurity_info, rcut_unit)
        except ValueError as exception:
            raise ValueError(
                f'embedding {index} (host {host.get_formula()} {host.uuid}, impurity_info {impurity_info.uuid}): '
                f'{exception}'
            ) from exception

    clusters: list[orm.StructureData] = []
    unit_nodes: dict[RcutUnit, orm.Str] = {}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        keys = [f'pair_{start + offset}' for offset in range(len(batch))]
        rcut_units = {}
        for key, (_, _, rcut_unit) in zip(keys, batch, strict=True):
            if rcut_unit is not RcutUnit.ANGSTROM:
                rcut_units[key] = unit_nodes.setdefault(rcut_unit, orm.Str(rcut_unit.value))
        inputs: dict[str, t.Any] = {
            'hosts': {key: host for key, (host, _, _) in zip(keys, batch, strict=True)},
            'impurity_infos': {key: info for key, (_, info, _) in zip(keys, batch, strict=True)},
        }
        if rcut_units:
            inputs['rcut_units'] = rcut_units
        # One transaction per batch: nodes are flushed, not committed one by one, and stored nodes are not re-read
        # from the database on every access (the engine compares each new input link with all earlier ones).
        with get_manager().get_profile_storage().transaction():
            outputs, process = impurity_cluster_structures.run_get_node(
                **inputs, metadata={'call_link_label': 'impurity_cluster_structures'}
            )
        if not process.is_finished_ok:
            raise RuntimeError(f'{process} failed: {process.exit_message}')
        clusters.extend(outputs['clusters'][key] for key in keys)
    return clusters
