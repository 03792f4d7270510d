"""stored_pk reads a node's pk without a query after commits expired it, and agrees with node.pk everywhere."""

from __future__ import annotations

import contextlib

import pytest
import sqlalchemy
from aiida import orm
from aiida.manage import get_manager

from aiida_mlworkbench.node_ids import is_stored, stored_pk


@contextlib.contextmanager
def count_statements():
    """Count the SQL statements the profile's storage sends while the block runs."""
    engine = get_manager().get_profile_storage().get_session().bind
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    sqlalchemy.event.listen(engine, 'before_cursor_execute', record)
    try:
        yield statements
    finally:
        sqlalchemy.event.remove(engine, 'before_cursor_execute', record)


@pytest.mark.usefixtures('aiida_profile_clean')
def test_stored_pk_after_a_commit_needs_no_query():
    nodes = [orm.Int(index).store() for index in range(20)]
    orm.Str('a commit that expires the nodes above').store()
    with count_statements() as statements:
        pks = [stored_pk(node) for node in nodes]
    assert statements == []
    assert pks == [node.pk for node in nodes]
    assert all(is_stored(node) for node in nodes)


@pytest.mark.usefixtures('aiida_profile_clean')
def test_stored_pk_of_unstored_and_loaded_nodes():
    node = orm.Int(1)
    assert stored_pk(node) is None
    assert not is_stored(node)
    node.store()
    assert stored_pk(node) == node.pk
    assert stored_pk(orm.load_node(node.pk)) == node.pk
