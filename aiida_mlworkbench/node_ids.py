"""The pk of a loaded node without a query: what every step with thousands of nodes asks after each commit.

aiida-core's storage commits after each node it stores outside a transaction, and every commit expires all rows
loaded in the session: reading ``node.pk`` or ``node.is_stored`` of any node loaded before then reads its whole row
back, one query per node. For the 3504 inputs of a work chain that is thousands of queries per step. The row's
identity (its pk) stays known in memory; :func:`stored_pk` reads it from there.
"""

from __future__ import annotations

import sqlalchemy
from aiida import orm

__all__ = ('is_stored', 'stored_pk')


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
