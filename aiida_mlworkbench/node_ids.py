"""Node identities without a query, and node rows by id in few queries: what every step with thousands of nodes needs.

aiida-core's storage commits after each node it stores outside a transaction, and every commit expires all rows
loaded in the session: reading ``node.pk`` or ``node.is_stored`` of any node loaded before then reads its whole row
back, one query per node. For the 3504 inputs of a work chain that is thousands of queries per step. The row's
identity (its pk) stays known in memory; :func:`stored_pk` reads it from there. :func:`rows_where` reads what is
needed of thousands of nodes (attributes, extras, the node itself) in one query per :data:`QUERY_CHUNK` ids.
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Iterator

import sqlalchemy
from aiida import orm

__all__ = ('QUERY_CHUNK', 'is_stored', 'rows_where', 'stored_pk')

QUERY_CHUNK = 999
"""Values per ``IN`` filter (SQLite before 3.32 allows 999 bound parameters)."""


def stored_pk(node: orm.Node) -> int | None:
    """The pk of ``node``, ``None`` if it is not stored, without a query where the storage keeps it in memory.

    After every commit, SQLAlchemy expires the rows it has loaded, and ``node.pk`` reads the whole row again; the
    identity of the row is known without that. Falls back to ``node.pk`` for any other storage.
    """
    bare_model = getattr(node.backend_entity, 'bare_model', None)
    if bare_model is not None:
        try:
            identity = sqlalchemy.inspect(bare_model).identity
        except sqlalchemy.exc.NoInspectionAvailable:
            identity = None
        if identity is not None:
            return identity[0]
    return node.pk


def is_stored(node: orm.Node) -> bool:
    """``node.is_stored`` without a query (see :func:`stored_pk`)."""
    return stored_pk(node) is not None


def rows_where(
    field: str,
    values: Iterable[t.Any],
    project: list[str],
    *,
    node_class: type[orm.Node] = orm.Node,
    backend: t.Any = None,
) -> Iterator[list[t.Any]]:
    """Yield ``project`` of each ``node_class`` node whose ``field`` (``id``, ``uuid``) is in ``values``.

    One query per :data:`QUERY_CHUNK` distinct values; rows come in no particular order.
    """
    ordered = sorted(set(values))
    for start in range(0, len(ordered), QUERY_CHUNK):
        builder = orm.QueryBuilder(backend=backend)
        builder.append(node_class, filters={field: {'in': ordered[start : start + QUERY_CHUNK]}}, project=project)
        yield from builder.iterall()
