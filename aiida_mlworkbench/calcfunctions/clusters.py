"""Impurity clusters with provenance: the hosts and ``impurity_info`` nodes of a database in, one ``ImpurityClusters``
node out.

:func:`extract_impurity_clusters` consumes every ``impurity_info`` of the embeddings (under its embedding key) and every
distinct host once, and creates one :class:`~aiida_mlworkbench.data.ImpurityClusters` whose rows are the embeddings in
key order and whose ``keys`` attribute names them. The graph leads from each row to the nodes aiida-kkr used, through
the input links ``impurity_infos__<key>`` and ``hosts__<host key>`` of the extraction. :func:`select_clusters` takes a
subset of rows, with provenance. :func:`build_impurity_clusters` is the entry point from Python: it validates every
embedding before anything is stored, then runs the extraction.
"""

from __future__ import annotations

import collections.abc
import typing as t

import ase
from aiida import orm
from aiida.common.links import validate_link_label
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.data.impurity_clusters import HostCrystal, ImpurityClusters
from aiida_mlworkbench.engine import calcfunction_with_many_inputs, load_together
from aiida_mlworkbench.kkr.geometry import (
    ClusterTooLargeError,
    RcutUnit,
    check_embedding,
    impurity_cluster,
    reading_hosts,
)

if t.TYPE_CHECKING:
    from aiida_mlworkbench.kkr.embeddings import ImpurityEmbedding

__all__ = (
    'EXIT_CODES',
    'build_impurity_clusters',
    'check_embeddings',
    'embedding_inputs',
    'embedding_key',
    'extract_impurity_clusters',
    'select_clusters',
)

EXIT_CODES = {
    'invalid_embedding': ExitCode(300, 'invalid impurity embedding{key}: {detail}'),
    'cluster_too_large': ExitCode(301, 'impurity embedding{key} asks for too large a cluster: {detail}'),
    'invalid_inputs': ExitCode(302, 'invalid inputs: {detail}'),
    'invalid_rows': ExitCode(303, 'invalid rows: {detail}'),
}

Pair = tuple[orm.StructureData, orm.Dict]

_QUERY_CHUNK = 5000
"""Nodes read per query (below SQLite's limit of bound parameters)."""


def embedding_key(index: int) -> str:
    """Key of embedding ``index``: the keys sort in index order, which fixes the row order of the clusters."""
    return f'e{index:06d}'


def _host_key(index: int) -> str:
    return f'host_{index:04d}'


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


class _Hosts:
    """Unstored copies of the hosts, one per host object: a stored node reads its sites from the database on every
    access, and a host is shared by hundreds of embeddings. Keyed by object identity, so that no database access is
    needed to find a copy."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[orm.StructureData, orm.StructureData]] = {}

    def __call__(self, host: orm.StructureData) -> orm.StructureData:
        entry = self._copies.get(id(host))
        if entry is None:
            entry = self._copies[id(host)] = (host, host.clone() if host.is_stored else host)
        return entry[1]


@calcfunction_with_many_inputs
def extract_impurity_clusters(**namespaces: t.Any) -> dict[str, ImpurityClusters] | ExitCode:
    """Build the impurity cluster of every embedding and store them all in one ``ImpurityClusters`` (output
    ``clusters``), one row per embedding in key order.

    Inputs: ``impurity_infos.<key>`` (``Dict``), ``hosts.<host key>`` (``StructureData``, each distinct host once),
    ``host_of`` (``Dict``: embedding key -> host key) and optionally ``rcut_units.<key>`` (``Str``: ``'alat'`` for
    aiida-kkr < 1.0; default ``'angstrom'``). :func:`embedding_inputs` builds them.
    """
    problem = _input_problem(namespaces)
    if problem:
        return EXIT_CODES['invalid_inputs'].format(detail=problem)
    hosts = namespaces['hosts']
    impurity_infos = namespaces['impurity_infos']
    rcut_units = namespaces.get('rcut_units', {})
    host_of = namespaces['host_of'].get_dict()
    keys = sorted(impurity_infos)
    host_keys = sorted(set(host_of.values()))
    host_index = {host_key: index for index, host_key in enumerate(host_keys)}
    copies = {host_key: hosts[host_key].clone() for host_key in host_keys}
    with reading_hosts():  # each host copy is read once, not once per embedding
        crystals = []
        for host_key in host_keys:
            try:
                crystals.append(HostCrystal.from_structure(copies[host_key], uuid=hosts[host_key].uuid))
            except ValueError as exception:
                return EXIT_CODES['invalid_embedding'].format(key=f's of host {host_key}', detail=str(exception))
        clusters: list[ase.Atoms] = []
        info_dicts = dict(zip(keys, _dict_contents([impurity_infos[key] for key in keys]), strict=True))
        for key in keys:
            try:
                host = copies[host_of[key]]
                clusters.append(impurity_cluster(host, info_dicts[key], _rcut_unit(rcut_units.get(key))))
            except ValueError as exception:
                return _embedding_exit_code(exception, key)
    node = ImpurityClusters(clusters, keys=keys, hosts=crystals, host_of=[host_index[host_of[key]] for key in keys])
    return {'clusters': node}


def _input_problem(namespaces: collections.abc.Mapping[str, t.Any]) -> str | None:
    """Say what is wrong with the inputs of :func:`extract_impurity_clusters`, or return ``None``."""
    usage = (
        'inputs must be the namespaces impurity_infos (Dict) and hosts (StructureData), the Dict host_of mapping each '
        'embedding key to its host key, and optionally rcut_units (Str, a subset of the embedding keys); '
        'embedding_inputs() builds them'
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
    impurity_infos, hosts = namespaces.get('impurity_infos', {}), namespaces.get('hosts', {})
    if not impurity_infos:
        return f'{usage}; no impurity_infos given.'
    host_of_node = namespaces.get('host_of')
    if not isinstance(host_of_node, orm.Dict):
        return f'{usage}; host_of is missing or a {type(host_of_node).__name__}, not a Dict.'
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
    unused = sorted(set(hosts) - set(host_of.values()))
    if unused:
        return f'{usage}; hosts of no embedding: {unused[:5]}.'
    stray_units = sorted(set(namespaces.get('rcut_units', {})) - set(impurity_infos))
    if stray_units:
        return f'{usage}; rcut_units of no embedding: {stray_units[:5]}.'
    return None


@calcfunction
def select_clusters(clusters: ImpurityClusters, rows: orm.List) -> dict[str, ImpurityClusters] | ExitCode:
    """Take the clusters of ``rows`` (row indices, in the order given, each at most once) as a new ``ImpurityClusters``
    (output ``clusters``); keys and hosts go with their rows."""
    indices = rows.get_list()
    n_rows = len(clusters)
    if not indices:
        return EXIT_CODES['invalid_rows'].format(detail='no rows given: give at least one row index')
    if not all(isinstance(row, int) and not isinstance(row, bool) for row in indices):
        return EXIT_CODES['invalid_rows'].format(detail='rows must be integer row indices')
    bad = [row for row in indices if not 0 <= row < n_rows]
    if bad:
        return EXIT_CODES['invalid_rows'].format(detail=f'row {bad[0]} is outside 0 to {n_rows - 1} of {clusters}')
    if len(set(indices)) != len(indices):
        return EXIT_CODES['invalid_rows'].format(detail='a row is named more than once')
    return {'clusters': clusters.subset(indices)}


def _as_triples(
    embeddings: collections.abc.Iterable[ImpurityEmbedding | Pair],
) -> list[tuple[orm.StructureData, orm.Dict, RcutUnit]]:
    triples = []
    for embedding in embeddings:
        if isinstance(embedding, tuple):
            host, impurity_info = embedding
            rcut_unit = RcutUnit.ANGSTROM
        else:
            host, impurity_info, rcut_unit = embedding.host, embedding.impurity_info, RcutUnit(embedding.rcut_unit)
        if not isinstance(host, orm.StructureData) or not isinstance(impurity_info, orm.Dict):
            raise TypeError(
                f'an embedding must be a (StructureData, Dict) pair, got ({type(host).__name__}, '
                f'{type(impurity_info).__name__}).'
            )
        triples.append((host, impurity_info, rcut_unit))
    return triples


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
    copies = _Hosts()
    check = impurity_cluster if build else check_embedding
    contents = _dict_contents([impurity_info for _, _, impurity_info, _ in embeddings])
    with reading_hosts():  # the copies are read once each, however many embeddings share them
        for (name, host, impurity_info, rcut_unit), content in zip(embeddings, contents, strict=True):
            try:
                check(copies(host), content, RcutUnit.ANGSTROM if rcut_unit is None else rcut_unit)
            except ValueError as exception:
                error = ClusterTooLargeError if isinstance(exception, ClusterTooLargeError) else ValueError
                raise error(
                    f'{name} (host {host.get_formula()} <{host.uuid}>, impurity_info <{impurity_info.uuid}>): '
                    f'{exception}'
                ) from exception


def _dict_contents(nodes: collections.abc.Sequence[orm.Dict]) -> list[dict[str, t.Any]]:
    """The content of each ``Dict``, the stored ones read with a few queries: ``get_dict()`` of a stored node reads it
    from the database each time, a query per node."""
    load_together(nodes)  # their rows, so that asking each whether it is stored and for its pk takes no query
    pks = [node.pk if node.is_stored else None for node in nodes]
    stored_pks = [pk for pk in pks if pk is not None]
    stored: dict[int, dict[str, t.Any]] = {}
    for start in range(0, len(stored_pks), _QUERY_CHUNK):
        builder = orm.QueryBuilder().append(
            orm.Dict, filters={'id': {'in': stored_pks[start : start + _QUERY_CHUNK]}}, project=['id', 'attributes']
        )
        stored.update(builder.all())
    return [node.get_dict() if pk is None else stored[pk] for node, pk in zip(nodes, pks, strict=True)]


def embedding_inputs(
    keys: collections.abc.Sequence[str],
    hosts: collections.abc.Sequence[orm.StructureData],
    impurity_infos: collections.abc.Sequence[orm.Dict],
    rcut_units: collections.abc.Sequence[RcutUnit | str | None] | None = None,
) -> dict[str, t.Any]:
    """Return the inputs of :func:`extract_impurity_clusters` for the embeddings ``keys``, each distinct host once.

    Hosts are shared by many embeddings; linking each once, with ``host_of`` naming the host of each embedding, keeps
    the inputs to one per embedding. One ``Str`` node per ``Rcut`` unit other than Angstrom is shared by its embeddings.

    :raises ValueError: if a key cannot be part of a link label (letters, digits and underscores only).
    """
    for key in keys:
        try:
            validate_link_label(f'impurity_infos__{key}')
        except (TypeError, ValueError):
            raise ValueError(
                f'the embedding key {key!r} cannot name an input link: use letters, digits and underscores, e.g. '
                'embedding_key(index)'
            ) from None
    host_key: dict[str, str] = {}
    host_nodes: dict[str, orm.StructureData] = {}
    host_of: dict[str, str] = {}
    for key, host in zip(keys, hosts, strict=True):
        label = host_key.setdefault(host.uuid, _host_key(len(host_key)))
        host_nodes[label] = host
        host_of[key] = label
    inputs: dict[str, t.Any] = {
        'hosts': host_nodes,
        'impurity_infos': dict(zip(keys, impurity_infos, strict=True)),
        'host_of': orm.Dict(host_of),
    }
    unit_nodes: dict[RcutUnit, orm.Str] = {}
    units = {}
    for key, unit in zip(keys, rcut_units or [None] * len(keys), strict=True):
        unit = RcutUnit.ANGSTROM if unit is None else RcutUnit(unit)
        if unit is not RcutUnit.ANGSTROM:
            units[key] = unit_nodes.setdefault(unit, orm.Str(unit.value))
    if units:
        inputs['rcut_units'] = units
    return inputs


def build_impurity_clusters(
    embeddings: collections.abc.Iterable[ImpurityEmbedding | Pair], **kwargs: t.Any
) -> ImpurityClusters:
    """Build and store the impurity clusters of the embeddings with provenance, one row each in the order given.

    :param embeddings: :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding` objects or (host, ``impurity_info``) pairs
        (read with ``Rcut`` in Angstrom).
    :param kwargs: passed to the process, e.g. ``metadata``.
    :raises ValueError: naming the embedding and the problem, before anything is stored, if one is invalid as far as
        :func:`check_embeddings` can tell without building its cluster.
    :raises RuntimeError: if the extraction fails (a ``Rimp_rel`` or ``imp_cls`` that names no site of the cluster);
        the failed process stays in the graph with its exit code.
    """
    triples = _as_triples(embeddings)
    if not triples:
        raise ValueError('no embeddings given: give at least one (host, impurity_info) pair')
    keys = [embedding_key(index) for index in range(len(triples))]
    check_embeddings([(f'embedding {key}', *triple) for key, triple in zip(keys, triples, strict=True)])
    inputs = embedding_inputs(keys, *zip(*triples, strict=True))
    outputs, process = extract_impurity_clusters.run_get_node(**inputs, **kwargs)
    if not process.is_finished_ok:
        raise RuntimeError(f'{process.process_label}<{process.pk}> failed: {process.exit_message}')
    return outputs['clusters']
