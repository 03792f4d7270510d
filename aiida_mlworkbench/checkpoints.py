"""Checkpoints of work chains with thousands of node inputs and outputs, written in a fraction of the time.

A work chain saves a checkpoint at every step, with its raw inputs, parsed inputs and outputs encoded by aiida-core's
pure-Python YAML dumper, one tagged scalar per node. For the 3504 input nodes and 1752 clusters of the reference
study that took about a second per checkpoint, a third of the work chain's own time. :class:`CompactCheckpoints`
writes the nodes as JSON, ``{namespace path: {key: pk}}``, beside the YAML of everything else, and reads them back
with one query per thousand. The inputs of a process never change, so their encoding is computed once and reused by
every checkpoint. The checkpoint holds the same information; a checkpoint lives only as long as its process, in its
profile, where a pk names a node as well as a UUID (and is a seventh of the length that the YAML dumper scans
character by character). Checkpoints written the aiida-core way, or by the first version of this class (UUIDs), still
load.
"""

from __future__ import annotations

import json
import typing as t
from collections.abc import Mapping

from aiida import orm
from plumpy.utils import Frozendict

from aiida_mlworkbench.node_ids import rows_where, stored_pk

__all__ = ('CompactCheckpoints',)

_MARKER = 'mlworkbench-compact-checkpoint-v2'
_MARKER_UUIDS = 'mlworkbench-compact-checkpoint-v1'


class CompactCheckpoints:
    """Work chain mixin: encode the nodes of the inputs and outputs in checkpoints as pks (module docstring).

    Must come before the ``WorkChain`` class in the bases.
    """

    def encode_input_args(self, inputs: t.Any) -> str:
        # The raw and parsed inputs are frozen and the same objects at every checkpoint: encode each once. The cache
        # keeps the object, so that its ``id`` cannot be reused by another one.
        cache = self.__dict__.setdefault('_mlworkbench_encoded', {})
        frozen = isinstance(inputs, Frozendict)
        if frozen and id(inputs) in cache:
            return cache[id(inputs)][1]
        # Reading ``node.pk`` after a commit goes to the database (every commit expires the loaded nodes), and every
        # checkpoint comes after commits: the pks are read once per node object and kept with it.
        known = self.__dict__.setdefault('_mlworkbench_pks', {})
        nodes: dict[str, dict[str, int]] = {}
        skeleton = _strip_nodes(inputs, (), nodes, known)
        encoded = json.dumps({'format': _MARKER, 'rest': super().encode_input_args(skeleton), 'nodes': nodes})  # type: ignore[misc]
        if frozen:
            cache[id(inputs)] = (inputs, encoded)
        return encoded

    def decode_input_args(self, encoded: str) -> t.Any:
        try:
            content = json.loads(encoded)
        except (TypeError, ValueError):
            content = None
        if not isinstance(content, dict) or content.get('format') not in (_MARKER, _MARKER_UUIDS):
            return super().decode_input_args(encoded)  # type: ignore[misc]
        skeleton = super().decode_input_args(content['rest'])  # type: ignore[misc]
        children: dict[tuple[str, ...], dict[str, orm.Node]] = {}
        if content['format'] == _MARKER:
            namespaces = {tuple(json.loads(path)): keys for path, keys in content['nodes'].items()}
            loaded = _load_nodes('id', {pk for keys in namespaces.values() for pk in keys.values()})
            for path, keys in namespaces.items():
                children[path] = {key: loaded[pk] for key, pk in keys.items()}
        else:
            loaded = _load_nodes('uuid', set(content['nodes'].values()))
            for path, uuid in content['nodes'].items():
                *parents, name = json.loads(path)
                children.setdefault(tuple(parents), {})[name] = loaded[uuid]
        return _fill_nodes(skeleton, (), children)


def _strip_nodes(
    value: t.Any, path: tuple[str, ...], nodes: dict[str, dict[str, int]], known: dict[int, tuple[orm.Node, int]]
) -> t.Any:
    """Return ``value`` without its nodes, recording each node's pk under its key in ``nodes[<namespace path>]``.

    ``known`` maps ``id(node)`` to ``(node, pk)`` (the node is kept so that its ``id`` is not reused).
    """
    if isinstance(value, Mapping):
        items = {}
        for key, item in value.items():
            if isinstance(item, orm.Node):
                entry = known.get(id(item))
                if entry is None:
                    entry = known[id(item)] = (item, _pk(item))
                nodes.setdefault(json.dumps(path), {})[key] = entry[1]
            else:
                items[key] = _strip_nodes(item, (*path, key), nodes, known)
        return _same_mapping(value, items)
    return value


def _pk(node: orm.Node) -> int:
    """The pk of a stored node; the checkpoint of a stored process only holds stored nodes."""
    pk = stored_pk(node)
    if pk is None:
        raise ValueError(f'{node!r} is not stored: a checkpoint can only name stored nodes')
    return pk


def _fill_nodes(value: t.Any, path: tuple[str, ...], children: dict[tuple[str, ...], dict[str, orm.Node]]) -> t.Any:
    """The inverse of :func:`_strip_nodes`: ``children`` maps a namespace path to the nodes directly in it."""
    if isinstance(value, Mapping):
        items = {key: _fill_nodes(item, (*path, key), children) for key, item in value.items()}
        items.update(children.get(path, {}))
        return _same_mapping(value, items)
    return value


def _same_mapping(original: Mapping, items: dict) -> Mapping:
    """``items`` as the type of ``original`` (a frozen namespace stays frozen: ``inputs.a.b`` keeps working)."""
    try:
        return type(original)(items)
    except TypeError:
        return items


def _load_nodes(field: str, values: set) -> dict[t.Any, orm.Node]:
    """Load the nodes whose ``field`` (``id`` or ``uuid``) is in ``values``, one query per thousand."""
    loaded: dict[t.Any, orm.Node] = dict(rows_where(field, values, [field, '*']))
    missing = values - set(loaded)
    if missing:
        raise ValueError(
            f'the checkpoint names {len(missing)} node(s) that are not in the profile: {sorted(missing)[:3]}'
        )
    return loaded
