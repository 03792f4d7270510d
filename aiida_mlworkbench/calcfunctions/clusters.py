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
from aiida.common.links import LinkType
from aiida.engine import ExitCode
from aiida.manage import get_manager

from aiida_mlworkbench.bulk_links import calcfunction
from aiida_mlworkbench.kkr.geometry import ClusterTooLargeError, RcutUnit, check_embedding, impurity_cluster
from aiida_mlworkbench.node_ids import rows_where, stored_pk

if t.TYPE_CHECKING:
    from aiida_mlworkbench.kkr.embeddings import ImpurityEmbedding

__all__ = (
    'DEFAULT_BATCH_SIZE',
    'ERROR_CLUSTER_TOO_LARGE',
    'ERROR_INVALID_EMBEDDING',
    'ERROR_INVALID_INPUTS',
    'EXIT_CODES',
    'EXTRA_HOST_FORMULA',
    'EXTRA_HOST_UUID',
    'EXTRA_IMPURITY_INFO_UUID',
    'EXTRA_N_ATOMS',
    'EXTRA_RCUT_UNIT',
    'EXTRA_ZIMP',
    'batch_inputs',
    'build_impurity_clusters',
    'check_embeddings',
    'cluster_structure',
    'hosts_of_clusters',
    'impurity_cluster_structure',
    'impurity_cluster_structures',
    'structure_from_atoms',
)

DEFAULT_BATCH_SIZE = 1000
"""Pairs per :func:`impurity_cluster_structures` process.

The calcfunctions link their inputs and outputs with :mod:`aiida_mlworkbench.bulk_links`, so the time per cluster no
longer grows with the batch; batches only bound the memory of the unstored clusters of one process.
"""

EXTRA_ZIMP = 'mlworkbench_zimp'
EXTRA_HOST_FORMULA = 'mlworkbench_host_formula'
EXTRA_N_ATOMS = 'mlworkbench_n_atoms'
EXTRA_HOST_UUID = 'mlworkbench_host_uuid'
EXTRA_IMPURITY_INFO_UUID = 'mlworkbench_impurity_info_uuid'
EXTRA_RCUT_UNIT = 'mlworkbench_rcut_unit'

ERROR_INVALID_EMBEDDING = 300
"""Exit status of the calcfunctions when a pair is no valid impurity embedding (the message says why)."""
ERROR_CLUSTER_TOO_LARGE = 301
"""Exit status when an embedding asks for a cluster above :data:`~aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS`
(or a neighbour search above its limit); refused before any site is generated."""
ERROR_INVALID_INPUTS = 302
"""Exit status when the inputs of :func:`impurity_cluster_structures` do not form embeddings (wrong namespaces, types
or keys)."""

EXIT_CODES = {
    'invalid_embedding': ExitCode(ERROR_INVALID_EMBEDDING, 'invalid impurity embedding{key}: {detail}'),
    'cluster_too_large': ExitCode(
        ERROR_CLUSTER_TOO_LARGE, 'impurity embedding{key} asks for too large a cluster: {detail}'
    ),
    'invalid_inputs': ExitCode(ERROR_INVALID_INPUTS, 'invalid inputs: {detail}'),
}

Pair = tuple[orm.StructureData, orm.Dict]


def structure_from_atoms(atoms: ase.Atoms) -> orm.StructureData:
    """Return ``StructureData(ase=atoms)`` built in time linear in the number of atoms.

    ``StructureData.set_ase`` appends atom by atom, re-validating the whole list of sites and kinds each time (about
    7 ms for a cluster of 18 atoms). This builds the same ``Kind`` and ``Site`` objects in one pass and sets them at
    once: one kind per (symbol, tag), named as ``set_ase`` names it (tests compare both ways attribute by attribute).
    """
    kinds: dict[tuple[str, int], orm.Kind] = {}
    sites = []
    for atom in atoms:
        kind = kinds.get((atom.symbol, atom.tag))
        if kind is None:
            kind = kinds[(atom.symbol, atom.tag)] = orm.Kind(ase=atom)
        sites.append(orm.Site(kind_name=kind.name, position=atom.position).get_raw())
    structure = orm.StructureData(cell=atoms.cell.array, pbc=atoms.pbc)
    structure.base.attributes.set_many({'kinds': [kind.get_raw() for kind in kinds.values()], 'sites': sites})
    return structure


class _HostSnapshots:
    """Unstored copies of the hosts of a batch, one per host node.

    Reading the sites of a stored ``StructureData`` goes to the database each time; hosts are shared by hundreds of
    embeddings, so the geometry code reads each host once, from its copy.
    """

    def __init__(self) -> None:
        self._copies: dict[str, orm.StructureData] = {}

    def __call__(self, host: orm.StructureData) -> orm.StructureData:
        if not host.is_stored:
            return host
        copy = self._copies.get(host.uuid)
        if copy is None:
            copy = self._copies[host.uuid] = host.clone()
        return copy


def _impurity_info_contents(nodes: collections.abc.Iterable[orm.Dict]) -> dict[str, dict[str, t.Any]]:
    """Return the contents of many ``impurity_info`` nodes by UUID, with one query per thousand stored nodes.

    ``Dict.get_dict()`` on a stored node loads its attributes with a query of its own (about 2 ms each on SQLite).
    """
    nodes = list(nodes)
    pks = [stored_pk(node) for node in nodes]
    contents = {node.uuid: node.get_dict() for node, pk in zip(nodes, pks, strict=True) if pk is None}
    stored = (pk for pk in pks if pk is not None)
    contents.update(rows_where('id', stored, ['uuid', 'attributes'], node_class=orm.Dict))
    return contents


def cluster_structure(
    host: orm.StructureData,
    impurity_info: orm.Dict,
    rcut_unit: RcutUnit | str = RcutUnit.ANGSTROM,
    *,
    snapshots: _HostSnapshots | None = None,
    impurity_info_content: collections.abc.Mapping[str, t.Any] | None = None,
) -> orm.StructureData:
    """Return the impurity cluster as an unstored, non-periodic ``StructureData`` with queryable extras.

    The cell is zero: a cluster has no lattice. Extras: the impurity atomic numbers (:data:`EXTRA_ZIMP`), the host
    formula, the number of atoms, the UUIDs of the host and ``impurity_info`` and the unit ``Rcut`` was read in.

    :raises ValueError: if the pair is no valid embedding (see :func:`~aiida_mlworkbench.kkr.impurity_cluster`).
    """
    working_host = snapshots(host) if snapshots is not None else host
    content = impurity_info.get_dict() if impurity_info_content is None else impurity_info_content
    atoms: ase.Atoms = impurity_cluster(working_host, content, rcut_unit)
    structure = structure_from_atoms(atoms)
    structure.base.extras.set_many(
        {
            EXTRA_ZIMP: [int(z) for z in atoms.numbers[atoms.get_tags() == 1]],
            EXTRA_HOST_FORMULA: working_host.get_formula(),
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
    try:
        return RcutUnit(node.value)
    except ValueError:
        raise ValueError(
            f'the unit of Rcut must be one of {", ".join(repr(unit.value) for unit in RcutUnit)}, got {node.value!r}.'
        ) from None


def _embedding_exit_code(exception: ValueError, key: str | None = None) -> ExitCode:
    """The exit code for an embedding refused with ``exception``: too large, or invalid otherwise."""
    name = 'cluster_too_large' if isinstance(exception, ClusterTooLargeError) else 'invalid_embedding'
    return EXIT_CODES[name].format(key=f' {key}' if key else '', detail=str(exception))


@calcfunction
def impurity_cluster_structure(
    host: orm.StructureData, impurity_info: orm.Dict, rcut_unit: orm.Str | None = None
) -> orm.StructureData | ExitCode:
    """Build the impurity cluster of one embedding (``rcut_unit``: ``'angstrom'``, the default, or ``'alat'``)."""
    try:
        return cluster_structure(host, impurity_info, _rcut_unit(rcut_unit))
    except ValueError as exception:
        return _embedding_exit_code(exception)


@calcfunction
def impurity_cluster_structures(
    **namespaces: t.Any,
) -> dict[str, dict[str, orm.StructureData]] | ExitCode:
    """Build the impurity clusters of many embeddings in one process.

    Inputs ``impurity_infos.<key>``, the hosts, and optionally ``rcut_units.<key>`` (a ``Str``: ``'alat'`` for
    aiida-kkr < 1.0, default ``'angstrom'``); outputs ``clusters.<key>``. The hosts come either as ``hosts.<key>``, one
    per embedding, or, since a batch holds many embeddings of few hosts, once each as ``hosts.<host key>`` with
    ``host_of``, a ``Dict`` from each embedding key to its host key (see :func:`batch_inputs`).
    """
    problem = _input_problem(namespaces)
    if problem:
        return EXIT_CODES['invalid_inputs'].format(detail=problem)
    hosts = namespaces.get('hosts', {})
    impurity_infos = namespaces.get('impurity_infos', {})
    rcut_units = namespaces.get('rcut_units', {})
    host_of = namespaces['host_of'].get_dict() if 'host_of' in namespaces else {key: key for key in hosts}
    hosts = {key: hosts[host_of[key]] for key in impurity_infos}
    clusters = {}
    snapshots = _HostSnapshots()
    contents = _impurity_info_contents(impurity_infos.values())
    for key, host in hosts.items():
        info = impurity_infos[key]
        try:
            clusters[key] = cluster_structure(
                host,
                info,
                _rcut_unit(rcut_units.get(key)),
                snapshots=snapshots,
                impurity_info_content=contents[info.uuid],
            )
        except ValueError as exception:
            return _embedding_exit_code(exception, key)
    return {'clusters': clusters}


def _input_problem(namespaces: collections.abc.Mapping[str, t.Any]) -> str | None:
    """Say what is wrong with the inputs of :func:`impurity_cluster_structures`, or return ``None``."""
    usage = (
        'inputs must be the namespaces impurity_infos (Dict), hosts (StructureData, with the same keys, or with the '
        'host keys that the Dict host_of gives each embedding key) and optionally rcut_units (Str, a subset of the '
        'keys)'
    )
    unknown = sorted(set(namespaces) - {'hosts', 'impurity_infos', 'rcut_units', 'host_of'})
    if unknown:
        return f'{usage}; unknown input(s) {unknown}.'
    types = {'hosts': orm.StructureData, 'impurity_infos': orm.Dict, 'rcut_units': orm.Str}
    for name, node_type in types.items():
        namespace = namespaces.get(name, {})
        if not isinstance(namespace, collections.abc.Mapping):
            return f'{usage}; `{name}` is a single {type(namespace).__name__}, not a namespace.'
        wrong = sorted(key for key, node in namespace.items() if not isinstance(node, node_type))
        if wrong:
            return f'{usage}; {name} {wrong[:5]} are not {node_type.__name__} nodes.'
    if not namespaces.get('impurity_infos'):
        return f'{usage}; no impurity_infos given.'
    hosts, impurity_infos = namespaces.get('hosts', {}), namespaces['impurity_infos']
    host_of_node = namespaces.get('host_of')
    if host_of_node is None:
        host_of = {key: key for key in hosts}
    elif not isinstance(host_of_node, orm.Dict):
        return f'{usage}; host_of is a {type(host_of_node).__name__}, not a Dict.'
    else:
        host_of = host_of_node.get_dict()
        not_keys = sorted(key for key, value in host_of.items() if not isinstance(value, str))
        if not_keys:
            return f'{usage}; host_of must map embedding keys to host keys (strings), not for {not_keys[:5]}.'
    if set(host_of) != set(impurity_infos) or not set(host_of.values()) <= set(hosts):
        return (
            f'{usage}; embeddings without a host: {sorted(set(impurity_infos) - set(host_of))[:5]}, host keys without '
            f'a host: {sorted(set(host_of.values()) - set(hosts))[:5]}, host_of keys without an impurity_info: '
            f'{sorted(set(host_of) - set(impurity_infos))[:5]}.'
        )
    stray_units = sorted(set(namespaces.get('rcut_units', {})) - set(impurity_infos))
    if stray_units:
        return f'{usage}; rcut_units of no embedding: {stray_units[:5]}.'
    return None


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


def check_embeddings(
    embeddings: collections.abc.Sequence[tuple[str, orm.StructureData, orm.Dict, RcutUnit | str | None]],
    *,
    build: bool = False,
) -> None:
    """Check (name, host, ``impurity_info``, ``Rcut`` unit) embeddings without storing anything.

    With ``build=False`` only what needs no cluster (:func:`~aiida_mlworkbench.kkr.geometry.check_embedding`: the
    ``impurity_info``, the unit, the host's sites, the cluster-size limit), fast enough for a process's input
    validator; with ``build=True`` the clusters are built too, which also checks that ``Rimp_rel`` and ``imp_cls`` name
    sites of the cluster. Each host is read once however many embeddings share it.

    :raises ValueError: naming the embedding, its nodes and the problem (:class:`ClusterTooLargeError` for a cluster
        over the size limit).
    """
    snapshots = _HostSnapshots()
    contents = _impurity_info_contents(info for _, _, info, _ in embeddings)
    check = impurity_cluster if build else check_embedding
    for name, host, impurity_info, rcut_unit in embeddings:
        try:
            check(snapshots(host), contents[impurity_info.uuid], RcutUnit.ANGSTROM if rcut_unit is None else rcut_unit)
        except ValueError as exception:
            error = ClusterTooLargeError if isinstance(exception, ClusterTooLargeError) else ValueError
            raise error(
                f'{name} (host {host.get_formula()} <{host.uuid}>, impurity_info <{impurity_info.uuid}>): {exception}'
            ) from exception


def batch_inputs(
    keys: collections.abc.Sequence[str],
    hosts: collections.abc.Sequence[orm.StructureData],
    impurity_infos: collections.abc.Sequence[orm.Dict],
    rcut_units: collections.abc.Sequence[orm.Str | None] | None = None,
) -> dict[str, t.Any]:
    """Return the inputs of :func:`impurity_cluster_structures` for the embeddings ``keys``, each host linked once.

    Hosts are shared by many embeddings (about 50 hosts for 1000 embeddings of the synthetic database); linking each
    once, with ``host_of`` naming the host of each embedding, saves one input link and one input hash per cluster.
    """
    host_key: dict[str, str] = {}
    host_nodes: dict[str, orm.StructureData] = {}
    host_of: dict[str, str] = {}
    for key, host in zip(keys, hosts, strict=True):
        label = host_key.setdefault(host.uuid, f'host_{len(host_key):04d}')
        host_nodes[label] = host
        host_of[key] = label
    inputs: dict[str, t.Any] = {
        'hosts': host_nodes,
        'impurity_infos': dict(zip(keys, impurity_infos, strict=True)),
        'host_of': orm.Dict(host_of),
    }
    units = {key: unit for key, unit in zip(keys, rcut_units or [None] * len(keys), strict=True) if unit is not None}
    if units:
        inputs['rcut_units'] = units
    return inputs


def build_impurity_clusters(
    embeddings: collections.abc.Iterable[ImpurityEmbedding | Pair], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[orm.StructureData]:
    """Build and store the impurity cluster of each embedding with provenance, in the order given.

    :param embeddings: :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding` objects or (host, ``impurity_info``) pairs
        (read with ``Rcut`` in Angstrom).
    :param batch_size: embeddings per :func:`impurity_cluster_structures` process.
    :raises ValueError: naming the embedding and the problem, before anything is stored, if one is invalid.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be an integer of at least 1, got {batch_size!r}.')
    pairs = _as_pairs(embeddings)
    check_embeddings([(f'embedding {index}', *pair) for index, pair in enumerate(pairs)], build=True)

    clusters: list[orm.StructureData] = []
    unit_nodes: dict[RcutUnit, orm.Str] = {}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        keys = [f'pair_{start + offset}' for offset in range(len(batch))]
        inputs = batch_inputs(
            keys,
            [host for host, _, _ in batch],
            [info for _, info, _ in batch],
            [
                unit_nodes.setdefault(unit, orm.Str(unit.value)) if unit is not RcutUnit.ANGSTROM else None
                for *_, unit in batch
            ],
        )
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


def hosts_of_clusters(clusters: collections.abc.Sequence[orm.StructureData]) -> list[orm.StructureData | None]:
    """Return the host crystal each cluster was built from, read from the provenance graph, in the order given.

    The host is the input of the cluster's creator that its link label names: ``host`` for ``result`` of
    :func:`impurity_cluster_structure`; for ``clusters__<key>`` of :func:`impurity_cluster_structures`,
    ``hosts__<host key>`` with the host key that its input ``host_of`` gives ``<key>`` (``hosts__<key>`` without it).
    ``None`` for a cluster not made by either. Two queries per thousand clusters.
    """
    pks = [cluster.pk for cluster in clusters]
    created: dict[int, tuple[int, str]] = {}
    for start in range(0, len(pks), 1000):
        query = orm.QueryBuilder()
        query.append(orm.StructureData, filters={'id': {'in': pks[start : start + 1000]}}, project=['id'], tag='c')
        query.append(
            orm.CalcFunctionNode,
            with_outgoing='c',
            edge_filters={'type': LinkType.CREATE.value},
            edge_project=['label'],
            edge_tag='created',
            project=['id'],
            tag='creator',
        )
        for row in query.iterdict():
            created[row['c']['id']] = (row['creator']['id'], row['created']['label'])

    creators = sorted({creator for creator, _ in created.values()})
    host_of_input: dict[tuple[int, str], orm.StructureData] = {}
    host_keys: dict[int, dict[str, str]] = {}  # the ``host_of`` input of each creator that has one
    for start in range(0, len(creators), 1000):
        query = orm.QueryBuilder()
        query.append(
            orm.CalcFunctionNode, filters={'id': {'in': creators[start : start + 1000]}}, project=['id'], tag='creator'
        )
        # The inputs ``host``, ``hosts__<key>`` and ``host_of``, and nothing else: not the impurity_info nodes.
        query.append(
            orm.Data,
            with_outgoing='creator',
            edge_filters={'type': LinkType.INPUT_CALC.value, 'label': {'like': 'host%'}},
            edge_project=['label'],
            edge_tag='input',
            project=['*'],
            tag='node',
        )
        for row in query.iterdict():
            creator, label, node = row['creator']['id'], row['input']['label'], row['node']['*']
            if label == 'host_of':
                host_keys[creator] = node.get_dict()
            elif isinstance(node, orm.StructureData):
                host_of_input[(creator, label)] = node

    hosts: list[orm.StructureData | None] = []
    for pk in pks:
        creator_pk, label = created.get(pk, (None, ''))
        if label == 'result':
            host_label = 'host'
        elif label.startswith('clusters__'):
            key = label.removeprefix('clusters__')
            host_label = f'hosts__{host_keys.get(creator_pk, {}).get(key, key)}'
        else:
            hosts.append(None)
            continue
        hosts.append(host_of_input.get((creator_pk, host_label)))
    return hosts
