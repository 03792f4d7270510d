"""Resolve aiida-kkr impurity processes to their embeddings: the host crystal and the ``impurity_info``.

An impurity embedding in aiida-kkr is the pair (host ``StructureData``, ``impurity_info`` ``Dict``): the impurity
cluster is cut from the host around a site, as described by the ``impurity_info``. Several processes use one pair (the
host Green function write-out, the ``KkrimpCalculation`` steps, the work chains around them), so the pair, not the
process, is the unit of a dataset: one :class:`ImpurityEmbedding` per pair, with every process that led to it.

Only database links are followed (the remote folders on the cluster are never opened). The host structure is found with
aiida-kkr's :func:`~aiida_kkr.tools.find_parent.find_parent_structure` from the remote folder of the host calculation,
which walks ``parent_folder`` links up to the Voronoi calculation that took the structure. (Called on a
``KkrimpCalculation`` it would instead walk the chain of impurity restarts and give up after 1000 steps.)
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import typing as t

from aiida import orm
from aiida.common.exceptions import NotExistent

from .geometry import RcutUnit

__all__ = (
    'LEGACY_PROCESS_LABEL',
    'ImpurityEmbedding',
    'ImpurityEmbeddingError',
    'ResolvedEmbeddings',
    'SkippedNode',
    'rcut_unit_of_process',
    'resolve_impurity_embedding',
    'resolve_impurity_embeddings',
)

LOGGER = logging.getLogger(__name__)

LEGACY_PROCESS_LABEL = 'Legacy JobCalculation'
"""The ``process_label`` AiiDA's database migration gives every calculation made with aiida-core 0.x."""

_KKR_CALCULATION = 'aiida.calculations:kkr.kkr'
_KKRIMP_CALCULATION = 'aiida.calculations:kkr.kkrimp'


class ImpurityEmbeddingError(ValueError):
    """A node is not an impurity embedding, or its host or ``impurity_info`` cannot be found from its links."""

    def __init__(self, node: orm.Node, reason: str) -> None:
        self.node = node
        self.reason = reason
        super().__init__(f'{_describe(node)} is no impurity embedding: {reason}')


@dataclasses.dataclass(frozen=True)
class ImpurityEmbedding:
    """One impurity embedding: the host crystal and the ``impurity_info``, with the processes that used them.

    ``rcut_unit`` is the unit in which the aiida-kkr version that ran those processes read ``Rcut`` (see
    :func:`rcut_unit_of_process`).
    """

    host: orm.StructureData
    impurity_info: orm.Dict
    sources: tuple[orm.ProcessNode, ...]
    rcut_unit: RcutUnit = RcutUnit.ANGSTROM

    @property
    def key(self) -> tuple[str, str]:
        """The identity of the embedding: the UUIDs of the host and of the ``impurity_info``."""
        return (self.host.uuid, self.impurity_info.uuid)


@dataclasses.dataclass(frozen=True)
class SkippedNode:
    """A node that was passed in but is no impurity embedding, and why."""

    node: orm.Node
    reason: str


@dataclasses.dataclass(frozen=True)
class ResolvedEmbeddings:
    """The embeddings found (one per host/``impurity_info`` pair, in order of first use) and the nodes skipped."""

    embeddings: tuple[ImpurityEmbedding, ...]
    skipped: tuple[SkippedNode, ...] = ()

    def __iter__(self) -> t.Iterator[ImpurityEmbedding]:
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclasses.dataclass(frozen=True)
class _InputLayout:
    """Where a process type keeps the remote folder of its host and its ``impurity_info``, as link labels."""

    remote_labels: tuple[str, ...]
    impurity_info_labels: tuple[str, ...] = ('impurity_info',)
    impurity_info_from_remote_creator: bool = True


_KKRIMP_LAYOUT = _InputLayout(remote_labels=('host_Greenfunction_folder', 'GFhost_folder'))
# A KkrCalculation is a host Green function write-out only if it has an ``impurity_info`` of its own.
_KKR_GF_LAYOUT = _InputLayout(
    remote_labels=('parent_folder', 'parent_calc_folder'), impurity_info_from_remote_creator=False
)

_LAYOUTS_BY_LABEL: dict[str, _InputLayout] = {
    'KkrimpCalculation': _KKRIMP_LAYOUT,
    'KkrCalculation': _KKR_GF_LAYOUT,
    'kkr_imp_wc': _InputLayout(remote_labels=('remote_data_gf', 'remote_data_host')),
    'kkr_imp_sub_wc': _InputLayout(remote_labels=('remote_data',)),
    'kkr_flex_wc': _InputLayout(remote_labels=('remote_data',), impurity_info_from_remote_creator=False),
    'kkr_imp_dos_wc': _InputLayout(remote_labels=('host_remote',), impurity_info_labels=('impurity_info', 'imp_info')),
    'kkr_STM_wc': _InputLayout(remote_labels=('host_remote',), impurity_info_labels=('imp_info', 'impurity_info')),
}
"""Process labels of aiida-kkr's impurity processes; old process types end in them too (``...kkr_imp_dos_wc``)."""

_LAYOUTS_BY_TYPE: dict[str, _InputLayout] = {
    _KKRIMP_CALCULATION: _KKRIMP_LAYOUT,
    _KKR_CALCULATION: _KKR_GF_LAYOUT,
    'aiida.workflows:kkr.imp': _LAYOUTS_BY_LABEL['kkr_imp_wc'],
    'aiida.workflows:kkr.imp_sub': _LAYOUTS_BY_LABEL['kkr_imp_sub_wc'],
    'aiida.workflows:kkr.gf_writeout': _LAYOUTS_BY_LABEL['kkr_flex_wc'],
    'aiida.workflows:kkr.imp_dos': _LAYOUTS_BY_LABEL['kkr_imp_dos_wc'],
    'aiida.workflows:kkr.STM': _LAYOUTS_BY_LABEL['kkr_STM_wc'],
}


_COMBINED_INFO_FUNCTION = 'create_combined_imp_info_cf'
_COMBINE_WORKFLOW = 'combine_imps_wc'
"""aiida-kkr's two-impurity embeddings: the calcfunction that makes the combined ``impurity_info`` (output
``imp_info_combined``, ``imp_cls`` rows with both impurities) from the host ``StructureData`` (input
``host_structure``), and the work chain that calls it."""


def _describe(node: orm.Node) -> str:
    label = getattr(node, 'process_label', None) or type(node).__name__
    return f'{label}<{node.pk}>' if node.is_stored else f'unstored {label}'


def _layout_of(node: orm.ProcessNode) -> _InputLayout | None:
    process_type = node.process_type or ''
    if process_type in _LAYOUTS_BY_TYPE:
        return _LAYOUTS_BY_TYPE[process_type]
    label = node.process_label or ''
    if label in _LAYOUTS_BY_LABEL:
        return _LAYOUTS_BY_LABEL[label]
    return _LAYOUTS_BY_LABEL.get(process_type.rsplit('.', 1)[-1])


def rcut_unit_of_process(process: orm.ProcessNode) -> RcutUnit:
    """Return the unit in which the aiida-kkr version that ran ``process`` read ``Rcut`` of an ``impurity_info``.

    The rule: aiida-kkr before 1.0, the series for aiida-core 0.x, cut the cluster with ``Rcut`` in units of the host's
    ``alat``; aiida-kkr 1.0 and later (aiida-core >= 1.0, from mid 2019) in Angstrom. What a node records of that:
    AiiDA's migration of an aiida-core 0.x database turns every calculation into a ``CalcJobNode`` with the
    ``process_label`` ``'Legacy JobCalculation'``, while calculations run with aiida-core >= 1.0 carry their class name
    (``KkrCalculation``, ``KkrimpCalculation``) and, from aiida-core 1.1, the ``version`` attribute. Checked against the
    ``scoef`` files in the aiida-kkr archives: the legacy nodes of 2018-11-22 (``Rcut = 1.01``) match only in alat
    units, every other node (2019-06-25 onwards) only in Angstrom.
    """
    return RcutUnit.ALAT if process.process_label == LEGACY_PROCESS_LABEL else RcutUnit.ANGSTROM


_REMOTE_LABELS = frozenset(label for layout in _LAYOUTS_BY_LABEL.values() for label in layout.remote_labels)
_IMPURITY_INFO_LABELS = frozenset(
    label for layout in _LAYOUTS_BY_LABEL.values() for label in layout.impurity_info_labels
)
_QUERY_CHUNK = 500


def _chunks(items: list, size: int = _QUERY_CHUNK) -> t.Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Resolver:
    """Resolve many processes with a few bulk queries, and call ``find_parent_structure`` once per host remote folder.

    Following links node by node costs a query each (about 10 ms on SQLite), and thousands of embeddings share a few
    host Green functions, so the links of all processes are fetched together and hosts are remembered.
    """

    def __init__(self) -> None:
        self._inputs: dict[int, dict[str, orm.Node]] = {}
        self._gf_writeouts: dict[int, tuple[orm.CalcJobNode, orm.Dict]] = {}
        self._legacy_workflows: set[int] = set()
        self._hosts: dict[int, orm.StructureData | str] = {}

    def prefetch(self, processes: list[orm.ProcessNode]) -> None:
        """Fetch the links that :meth:`resolve` follows, for all ``processes`` at once."""
        pks = [process.pk for process in processes if process.pk not in self._inputs]
        for pk in pks:
            self._inputs[pk] = {}
        for chunk in _chunks(pks):
            query = orm.QueryBuilder()
            query.append(orm.ProcessNode, filters={'id': {'in': chunk}}, project='id', tag='process')
            query.append(
                orm.Node,
                with_outgoing='process',
                edge_filters={'label': {'in': sorted(_REMOTE_LABELS | _IMPURITY_INFO_LABELS)}},
                edge_project='label',
                project='*',
            )
            for pk, node, label in query.iterall():
                self._inputs[pk][label] = node

        remotes = sorted(
            {node.pk for pk in pks for node in self._inputs[pk].values() if isinstance(node, orm.RemoteData)}
        )
        for chunk in _chunks(remotes):
            query = orm.QueryBuilder()
            query.append(orm.RemoteData, filters={'id': {'in': chunk}}, project='id', tag='remote')
            query.append(orm.CalcJobNode, with_outgoing='remote', project='*', tag='creator')
            query.append(orm.Dict, with_outgoing='creator', edge_filters={'label': 'impurity_info'}, project='*')
            for remote_pk, creator, info in query.iterall():
                self._gf_writeouts[remote_pk] = (creator, info)

        workflows = [process.pk for process in processes if isinstance(process, orm.WorkflowNode)]
        for chunk in _chunks(workflows):
            query = orm.QueryBuilder()
            query.append(orm.WorkflowNode, filters={'id': {'in': chunk}}, project='id', tag='workflow')
            query.append(
                orm.CalcJobNode,
                with_ancestors='workflow',
                filters={'attributes.process_label': LEGACY_PROCESS_LABEL},
            )
            self._legacy_workflows.update(query.all(flat=True))

    def _host(self, node: orm.ProcessNode, remote: orm.RemoteData) -> orm.StructureData:
        from aiida_kkr.tools.find_parent import find_parent_structure

        if remote.pk not in self._hosts:
            try:
                host, _ = find_parent_structure(remote)
            except (ValueError, NotExistent) as exception:
                host = f'no host structure found from its remote folder {remote}: {exception}'
            if not isinstance(host, (orm.StructureData, str)):
                host = f'the host found from {remote} is a {type(host).__name__}, not a StructureData.'
            self._hosts[remote.pk] = host
        host = self._hosts[remote.pk]
        if isinstance(host, str):
            raise ImpurityEmbeddingError(node, host)
        return host

    def _rcut_unit(self, node: orm.ProcessNode, remote: orm.RemoteData) -> RcutUnit:
        """Return the unit of ``Rcut`` of the calculations that wrote a ``scoef`` file for this embedding."""
        writers = [node] if isinstance(node, orm.CalcJobNode) else []
        if remote.pk in self._gf_writeouts:
            writers.append(self._gf_writeouts[remote.pk][0])
        units = {rcut_unit_of_process(writer) for writer in writers}
        if node.pk in self._legacy_workflows:
            units.add(RcutUnit.ALAT)
        if len(units) > 1:
            raise ImpurityEmbeddingError(node, 'calculations of aiida-kkr < 1.0 and >= 1.0 cut its cluster.')
        return units.pop() if units else RcutUnit.ANGSTROM

    def _combined(self, node: orm.ProcessNode) -> ImpurityEmbedding:
        """The two-impurity embedding of a ``combine_imps_wc`` or ``create_combined_imp_info_cf``: the host and the
        combined ``impurity_info`` of the calcfunction (the one the work chain called)."""
        function = node
        if node.process_label == _COMBINE_WORKFLOW:
            called = [
                child
                for child in node.called
                if child.process_label == _COMBINED_INFO_FUNCTION and child.is_finished_ok
            ]
            if len(called) != 1:
                raise ImpurityEmbeddingError(
                    node, f'it called {len(called)} finished {_COMBINED_INFO_FUNCTION}, so its embedding is not known.'
                )
            function = called[0]
        outputs = function.base.links.get_outgoing(link_label_filter='imp_info_combined').all_nodes()
        hosts = function.base.links.get_incoming(link_label_filter='host_structure').all_nodes()
        if len(outputs) != 1 or not isinstance(outputs[0], orm.Dict):
            raise ImpurityEmbeddingError(node, f'{_describe(function)} has no output imp_info_combined Dict.')
        if len(hosts) != 1 or not isinstance(hosts[0], orm.StructureData):
            raise ImpurityEmbeddingError(node, f'{_describe(function)} has no input host_structure StructureData.')
        return ImpurityEmbedding(host=hosts[0], impurity_info=outputs[0], sources=(node,))

    def resolve(self, node: orm.Node) -> ImpurityEmbedding:
        if not isinstance(node, orm.ProcessNode):
            raise ImpurityEmbeddingError(node, f'it is a {type(node).__name__}, not an aiida-kkr process.')
        if node.process_label in (_COMBINE_WORKFLOW, _COMBINED_INFO_FUNCTION):
            return self._combined(node)
        layout = _layout_of(node)
        if layout is None:
            raise ImpurityEmbeddingError(
                node,
                f'process type {node.process_type!r} is none of the aiida-kkr impurity processes '
                f'({", ".join(sorted([*_LAYOUTS_BY_LABEL, _COMBINE_WORKFLOW, _COMBINED_INFO_FUNCTION]))}).',
            )
        self.prefetch([node])
        inputs = self._inputs[node.pk]

        info = next((inputs[label] for label in layout.impurity_info_labels if label in inputs), None)
        if info is None and node.process_type == _KKR_CALCULATION:
            raise ImpurityEmbeddingError(
                node, 'a KkrCalculation without an impurity_info input is no host Green function write-out.'
            )

        remote = next((inputs[label] for label in layout.remote_labels if label in inputs), None)
        if not isinstance(remote, orm.RemoteData):
            raise ImpurityEmbeddingError(node, f'it has no host remote folder input ({list(layout.remote_labels)}).')

        if info is None and layout.impurity_info_from_remote_creator and remote.pk in self._gf_writeouts:
            info = self._gf_writeouts[remote.pk][1]
        if not isinstance(info, orm.Dict):
            where = f'inputs {list(layout.impurity_info_labels)}'
            if layout.impurity_info_from_remote_creator:
                where += ' and the host Green function write-out that made its remote folder'
            raise ImpurityEmbeddingError(node, f'it has no impurity_info Dict (looked at {where}).')

        host = self._host(node, remote)
        return ImpurityEmbedding(
            host=host, impurity_info=info, sources=(node,), rcut_unit=self._rcut_unit(node, remote)
        )


def resolve_impurity_embedding(node: orm.ProcessNode) -> ImpurityEmbedding:
    """Return the embedding of one aiida-kkr impurity process.

    :raises ImpurityEmbeddingError: naming the node and the reason, if it is no impurity embedding.
    """
    return _Resolver().resolve(node)


def resolve_impurity_embeddings(
    nodes: orm.Node | orm.Group | collections.abc.Iterable[orm.Node], *, skip_invalid: bool | None = None
) -> ResolvedEmbeddings:
    """Return the impurity embeddings of aiida-kkr processes, one per (host, ``impurity_info``) pair.

    A pair reached from several processes is one embedding whose ``sources`` lists them all, in the order given.

    :param nodes: a process node, an iterable of them, or a ``Group`` (whose nodes of other kinds are skipped).
    :param skip_invalid: skip nodes that are no impurity embedding (logged and returned in ``skipped``) instead of
        raising. Default: ``True`` for a ``Group``, ``False`` otherwise.
    :raises ImpurityEmbeddingError: for the first node that is no impurity embedding, unless skipping.
    """
    if isinstance(nodes, orm.Group):
        skip = True if skip_invalid is None else skip_invalid
        candidates: collections.abc.Iterable[orm.Node] = nodes.nodes
    else:
        skip = bool(skip_invalid)
        candidates = [nodes] if isinstance(nodes, orm.Node) else nodes

    candidates = list(candidates)
    resolver = _Resolver()
    resolver.prefetch([node for node in candidates if isinstance(node, orm.ProcessNode) and _layout_of(node)])
    embeddings: dict[tuple[str, str], ImpurityEmbedding] = {}
    skipped: list[SkippedNode] = []
    for node in candidates:
        try:
            embedding = resolver.resolve(node)
        except ImpurityEmbeddingError as exception:
            if not skip:
                raise
            LOGGER.info('skipping %s', exception)
            skipped.append(SkippedNode(node=node, reason=exception.reason))
            continue

        known = embeddings.get(embedding.key)
        if known is None:
            embeddings[embedding.key] = embedding
            continue
        if known.rcut_unit is not embedding.rcut_unit:
            raise ImpurityEmbeddingError(
                node,
                f'it reads Rcut in {embedding.rcut_unit.value} but {known.sources} read it in {known.rcut_unit.value}.',
            )
        if all(source.uuid != node.uuid for source in known.sources):
            embeddings[embedding.key] = dataclasses.replace(known, sources=(*known.sources, node))

    if skipped:
        LOGGER.warning('skipped %d of the nodes given: they are no impurity embeddings.', len(skipped))
    return ResolvedEmbeddings(embeddings=tuple(embeddings.values()), skipped=tuple(skipped))
