"""Process hashes from the stored hashes of the inputs: the same hash as aiida-core's, without rehashing each input.

aiida-core 2.9 hashes a new process node (for caching) from the hashes of its inputs, and recomputes each input's hash
from its content: every attribute of every input is read back from the database (after a commit, one query per node)
and hashed again, although each stored node keeps the hash computed when it was stored (the ``_aiida_hash`` extra).
A work chain with 1752 embeddings spent a third of its time there.

:class:`StoredInputHashes` gives a process node the hash that aiida-core computes, taking each input's hash from the
``_aiida_hash`` extra it was stored with, read for all inputs in one query per thousand. An input without a stored hash
(hashing failed, or the hash was cleared) is hashed from its content as aiida-core does. :class:`~aiida_mlworkbench.
bulk_links.BulkLinks` installs it on the node of every process of this package, so the caching of those processes
works as always: the hash is equal to aiida-core's, which ``tests/test_process_hashing.py`` checks.

A stored hash is trusted as aiida-core trusts it when it looks up a cache: a storage migration that changes the hash
algorithm clears stored hashes, archive import drops them, and ``verdi node rehash`` recomputes them. Only where an
input's stored hash is stale (set by hand, or left behind by a plugin that changed how its nodes hash without a
migration) does the process hash differ from the one aiida-core would compute; the same input then also fails to match
in aiida-core's own cache lookups, and ``verdi node rehash`` repairs both.
"""

from __future__ import annotations

import typing as t

from aiida import orm
from aiida.common.links import LinkType
from aiida.orm.nodes.caching import NodeCaching
from aiida.orm.nodes.process.process import ProcessNodeCaching
from aiida.orm.utils.links import LinkTriple

from aiida_mlworkbench.node_ids import rows_where, stored_pk

__all__ = ('StoredInputHashes', 'use_stored_input_hashes')

INPUT_LINK_TYPES = (LinkType.INPUT_CALC, LinkType.INPUT_WORK)


class StoredInputHashes(ProcessNodeCaching):
    """Caching interface of a process node that takes the hash of each input from its stored ``_aiida_hash`` extra.

    ``pending_inputs`` are input links that :class:`~aiida_mlworkbench.bulk_links.BulkLinks` inserts in bulk right
    after the node is stored: they count as inputs, in the node's link cache or in the database, until then.
    """

    def __init__(self, node: orm.ProcessNode) -> None:
        super().__init__(node)
        self.pending_inputs: list[LinkTriple] = []

    def get_objects_to_hash(self) -> dict[str, t.Any]:
        """The objects of :meth:`aiida.orm.nodes.process.process.ProcessNodeCaching.get_objects_to_hash`."""
        objects = NodeCaching.get_objects_to_hash(self)
        objects['inputs'] = self.input_hashes()
        return objects

    def input_hashes(self) -> dict[str, str | None]:
        """Link label -> hash of each input, as aiida-core hashes them (``_hash_ignored_inputs`` left out)."""
        ignored = set(self._hash_ignored_inputs)
        sources: dict[str, tuple[int | None, t.Any]] = {}
        triples: list[LinkTriple] = []
        if self._node.is_stored:
            builder = orm.QueryBuilder(backend=self._node.backend)
            builder.append(orm.ProcessNode, filters={'id': self._node.pk}, tag='process')
            builder.append(
                orm.Node,
                with_outgoing='process',
                tag='input',
                edge_tag='link',
                edge_filters={'type': {'in': [link_type.value for link_type in INPUT_LINK_TYPES]}},
                edge_project='label',
                project=['id', f'extras.{self._HASH_EXTRA_KEY}'],
            )
            for row in builder.iterdict():
                label, source = row['link']['label'], row['input']
                if label not in ignored:
                    sources[label] = (source['id'], source[f'extras.{self._HASH_EXTRA_KEY}'])
        else:
            triples = [
                triple
                for triple in self._node.base.links.incoming_cache
                if triple.link_type in INPUT_LINK_TYPES and triple.link_label not in ignored
            ]
        triples += [triple for triple in self.pending_inputs if triple.link_label not in ignored]
        pks = []
        for triple in triples:
            pk = stored_pk(triple.node)
            if pk is None:
                # aiida-core's message for the same case (its compute_hash of the input raises it).
                triple.node.base.caching.compute_hash()
            pks.append(pk)
        stored_hashes = _stored_hashes(self._node.backend, pks)
        for triple, pk in zip(triples, pks, strict=True):
            sources[triple.link_label] = (pk, stored_hashes.get(pk))
        hashes: dict[str, str | None] = {}
        for label, (pk, stored) in sources.items():
            hashes[label] = stored if isinstance(stored, str) else orm.load_node(pk).base.caching.compute_hash()
        return hashes


def _stored_hashes(backend: t.Any, pks: list[int | None]) -> dict[int, t.Any]:
    """Node id -> ``_aiida_hash`` extra of the given stored nodes."""
    project = ['id', f'extras.{NodeCaching._HASH_EXTRA_KEY}']
    return dict(rows_where('id', (pk for pk in pks if pk is not None), project, backend=backend))


def use_stored_input_hashes(node: orm.ProcessNode) -> StoredInputHashes | None:
    """Make ``node`` hash its inputs from their stored hashes (see the module docstring); before it is stored.

    Only a node whose caching interface is aiida-core's ``ProcessNodeCaching`` itself is changed; a node class with a
    caching interface of its own (``CalcJobNode``) keeps it.
    """
    if node._CLS_NODE_CACHING is not ProcessNodeCaching:
        return None
    # ``NodeBase.caching`` is a cached property: this instance gets the interface, the class is left alone.
    caching = node.base.__dict__['caching'] = StoredInputHashes(node)
    return caching
