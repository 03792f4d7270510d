"""Process nodes hashed from their inputs' stored hashes get aiida-core's hash, so caching works as it always did."""

from __future__ import annotations

import pytest
from aiida import engine, orm
from aiida.common.links import LinkType
from aiida.manage.caching import enable_caching
from aiida.orm.nodes.process.process import ProcessNodeCaching

from aiida_mlworkbench import bulk_links
from aiida_mlworkbench.process_hashing import StoredInputHashes


def _total(**namespaces):
    """Sum of the input Ints and the lengths of the input Dicts."""
    nodes = namespaces.get('n', {}).values()
    return orm.Int(sum(node.value if isinstance(node, orm.Int) else len(node.get_dict()) for node in nodes))


bulk_total = bulk_links.calcfunction(_total)


def _aiida_core_hash(node: orm.ProcessNode) -> str:
    """The hash aiida-core computes for ``node``: every input hashed again from its content."""
    return ProcessNodeCaching(node).compute_hash()


def _inputs(count: int) -> dict[str, orm.Data]:
    inputs: dict[str, orm.Data] = {f'i{index:03d}': orm.Int(index).store() for index in range(count)}
    inputs.update({f'd{index:03d}': orm.Dict({'x': index, 'y': [index, 1.5]}).store() for index in range(count)})
    return inputs


@pytest.mark.usefixtures('aiida_profile_clean')
def test_stored_hash_equals_aiida_core_hash():
    """The node of a package process has the hash aiida-core would give it, and uses the stored input hashes."""
    _, node = bulk_total.run_get_node(n=_inputs(20))
    assert isinstance(node.base.caching, StoredInputHashes)
    assert node.base.caching.get_hash() == _aiida_core_hash(node)
    assert node.base.caching.compute_hash() == _aiida_core_hash(node)


@pytest.mark.usefixtures('aiida_profile_clean')
def test_input_without_stored_hash_is_hashed_from_its_content():
    """An input whose stored hash was cleared is hashed as aiida-core hashes it, not skipped."""
    inputs = _inputs(3)
    inputs['i001'].base.caching.clear_hash()
    _, node = bulk_total.run_get_node(n=inputs)
    assert inputs['i001'].base.caching.get_hash() is None
    assert node.base.caching.get_hash() == _aiida_core_hash(node)
    hashes = node.base.caching.input_hashes()
    assert hashes['n__i001'] == inputs['i001'].base.caching.compute_hash()


@pytest.mark.usefixtures('aiida_profile_clean')
def test_work_chain_hash_equals_aiida_core_hash():
    """Work chains with BulkLinks: the node's hash covers every input as aiida-core's does."""
    from tests.test_bulk_links import BulkReturn

    nodes = {f'k{index:03d}': orm.Int(index).store() for index in range(15)}
    _, node = engine.run_get_node(BulkReturn, nodes=nodes, extra=orm.Str('x').store())
    assert node.is_finished_ok
    assert isinstance(node.base.caching, StoredInputHashes)
    assert node.base.caching.get_hash() == _aiida_core_hash(node)


@pytest.mark.usefixtures('aiida_profile_clean')
def test_caching_finds_the_earlier_process():
    """A second run with the same inputs is taken from the cache; other inputs are not."""
    inputs = _inputs(10)
    _, first = bulk_total.run_get_node(n=inputs)
    with enable_caching():
        _, second = bulk_total.run_get_node(n=inputs)
        _, third = bulk_total.run_get_node(n={**inputs, 'i000': orm.Int(100).store()})
    assert second.base.caching.get_cache_source() == first.uuid
    assert not third.base.caching.is_created_from_cache
    # The cached process has its own input links, the same hash and the outputs of the first.
    assert _input_links(second) == _input_links(first)
    assert second.base.caching.get_hash() == _aiida_core_hash(second) == first.base.caching.get_hash()
    assert second.outputs.result.value == first.outputs.result.value
    assert second.outputs.result.uuid != first.outputs.result.uuid


def _input_links(node: orm.ProcessNode) -> set[tuple[str, str]]:
    return {(link.link_label, link.node.uuid) for link in node.base.links.get_incoming(link_type=LinkType.INPUT_CALC)}
