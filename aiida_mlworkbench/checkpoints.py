"""Checkpoints of work chains with thousands of node inputs and outputs, written in a fraction of the time.

A work chain saves a checkpoint at every step, with its raw inputs, parsed inputs and outputs encoded by aiida-core's
pure-Python YAML dumper, one tagged scalar per node. For the 3504 input nodes and 1752 clusters of the reference
study that took about a second per checkpoint, a third of the work chain's own time. :class:`CompactCheckpoints`
writes the nodes as a JSON list of UUIDs beside the YAML of everything else, and reads them back with one query per
thousand. The checkpoint holds the same information; a checkpoint written the aiida-core way still loads.
"""

from __future__ import annotations

import json
import typing as t
from collections.abc import Mapping

from aiida import orm

__all__ = ('CompactCheckpoints',)

_MARKER = 'mlworkbench-compact-checkpoint-v1'


class CompactCheckpoints:
    """Work chain mixin: encode the nodes of the inputs and outputs in checkpoints as UUIDs (module docstring).

    Must come before the ``WorkChain`` class in the bases.
    """

    def encode_input_args(self, inputs: t.Any) -> str:
        # Reading ``node.uuid`` after a commit goes to the database (every commit expires the loaded nodes), and every
        # checkpoint comes after commits: the UUIDs are read once per node object and kept with it.
        known = self.__dict__.setdefault('_mlworkbench_uuids', {})
        nodes: dict[str, str] = {}
        skeleton = _strip_nodes(inputs, (), nodes, known)
        return json.dumps({'format': _MARKER, 'rest': super().encode_input_args(skeleton), 'nodes': nodes})  # type: ignore[misc]

    def decode_input_args(self, encoded: str) -> t.Any:
        try:
            content = json.loads(encoded)
        except (TypeError, ValueError):
            content = None
        if not isinstance(content, dict) or content.get('format') != _MARKER:
            return super().decode_input_args(encoded)  # type: ignore[misc]
        skeleton = super().decode_input_args(content['rest'])  # type: ignore[misc]
        loaded = _load_by_uuid(set(content['nodes'].values()))
        children: dict[tuple[str, ...], dict[str, orm.Node]] = {}
        for path, uuid in content['nodes'].items():
            *parents, name = json.loads(path)
            children.setdefault(tuple(parents), {})[name] = loaded[uuid]
        return _fill_nodes(skeleton, (), children)


def _strip_nodes(value: t.Any, path: tuple[str, ...], nodes: dict[str, str], known: dict[int, tuple]) -> t.Any:
    """Return ``value`` without its nodes, recording each node's UUID under its JSON-encoded key path.

    ``known`` maps ``id(node)`` to ``(node, uuid)`` (the node is kept so that its ``id`` is not reused).
    """
    if isinstance(value, Mapping):
        items = {}
        for key, item in value.items():
            if isinstance(item, orm.Node):
                entry = known.get(id(item))
                if entry is None:
                    entry = known[id(item)] = (item, item.uuid)
                nodes[json.dumps([*path, key])] = entry[1]
            else:
                items[key] = _strip_nodes(item, (*path, key), nodes, known)
        return _same_mapping(value, items)
    return value


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


def _load_by_uuid(uuids: set[str]) -> dict[str, orm.Node]:
    ordered = sorted(uuids)
    loaded: dict[str, orm.Node] = {}
    for start in range(0, len(ordered), 1000):
        query = orm.QueryBuilder().append(
            orm.Node, filters={'uuid': {'in': ordered[start : start + 1000]}}, project=['uuid', '*']
        )
        loaded.update(query.all())
    missing = uuids - set(loaded)
    if missing:
        raise ValueError(
            f'the checkpoint names {len(missing)} node(s) that are not in the profile: {sorted(missing)[:3]}'
        )
    return loaded
