"""Bulk provenance links give exactly the graph aiida-core's own linking gives, and refuse what it refuses."""

from __future__ import annotations

import json

import pytest
from aiida import engine, orm
from aiida.common.links import LinkType

from aiida_mlworkbench import bulk_links
from aiida_mlworkbench.checkpoints import CompactCheckpoints


def _echo(**namespaces):
    """Return a new Int for every input Int, under the same namespace and key (``n.<key>`` -> ``doubled.<key>``)."""
    return {'doubled': {key: orm.Int(node.value * 2) for key, node in namespaces.get('n', {}).items()}}


plain_echo = engine.calcfunction(_echo)
bulk_echo = bulk_links.calcfunction(_echo)


class PlainReturn(engine.WorkChain):
    """Takes a namespace of nodes and returns each of them: INPUT_WORK and RETURN links, aiida-core's way."""

    @classmethod
    def define(cls, spec):
        super().define(spec)
        spec.input_namespace('nodes', valid_type=orm.Data, dynamic=True)
        spec.input('extra', valid_type=orm.Str, required=False)
        spec.output_namespace('nodes', valid_type=orm.Data, dynamic=True)
        spec.outline(cls.run_echo, cls.give_back)

    def run_echo(self):
        # A calcfunction in between: a returned node must have been created by a calculation of the workflow.
        self.ctx.outputs = plain_echo(n=dict(self.inputs.nodes))['doubled']

    def give_back(self):
        self.out('nodes', dict(self.ctx.outputs))


class BulkReturn(bulk_links.BulkLinks, PlainReturn):
    """The same work chain with bulk links."""


def _links(node: orm.ProcessNode) -> tuple[set, set]:
    incoming = {(link.link_label, link.link_type, link.node.uuid) for link in node.base.links.get_incoming().all()}
    outgoing = {
        (link.link_label, link.link_type, link.node.base.attributes.get('value', None))
        for link in node.base.links.get_outgoing(link_type=(LinkType.CREATE, LinkType.RETURN)).all()
    }
    return incoming, outgoing


@pytest.mark.usefixtures('aiida_profile_clean')
def test_calcfunction_links_equal_aiida_core_links():
    """Same input triples (label, type, source), same output labels and values, both nodes finished and sealed."""
    inputs = {f'k{index:03d}': orm.Int(index).store() for index in range(40)}
    plain_outputs, plain = plain_echo.run_get_node(n=inputs)
    bulk_outputs, bulk = bulk_echo.run_get_node(n=inputs)

    assert plain.is_finished_ok
    assert bulk.is_finished_ok
    assert bulk.is_sealed
    plain_in, plain_out = _links(plain)
    bulk_in, bulk_out = _links(bulk)
    assert bulk_in == plain_in
    assert len(bulk_in) == 40
    assert bulk_out == plain_out
    assert {key: node.value for key, node in bulk_outputs['doubled'].items()} == {
        key: node.value for key, node in plain_outputs['doubled'].items()
    }
    # Every output is stored with its creator, as the engine stores it.
    assert all(node.is_stored and node.creator.uuid == bulk.uuid for node in bulk_outputs['doubled'].values())


@pytest.mark.usefixtures('aiida_profile_clean')
def test_calcfunction_unstored_inputs_are_stored_with_the_process():
    """Inputs given unstored are stored when the process node is, and linked."""
    _, node = bulk_echo.run_get_node(n={'a': orm.Int(1), 'b': orm.Int(2)})
    incoming = node.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all()
    assert sorted(link.link_label for link in incoming) == ['n__a', 'n__b']
    assert all(link.node.is_stored for link in incoming)


@pytest.mark.usefixtures('aiida_profile_clean')
def test_workchain_links_equal_aiida_core_links():
    """INPUT_WORK and RETURN links of a work chain with bulk links equal those of the same work chain without."""
    nodes = {f'k{index:03d}': orm.Int(index).store() for index in range(30)}
    extra = orm.Str('x').store()
    _, plain = engine.run_get_node(PlainReturn, nodes=nodes, extra=extra)
    _, bulk = engine.run_get_node(BulkReturn, nodes=nodes, extra=extra)

    assert plain.is_finished_ok
    assert bulk.is_finished_ok
    plain_in, plain_out = _links(plain)
    bulk_in, bulk_out = _links(bulk)
    assert bulk_in == plain_in
    assert len(bulk_in) == 31
    assert bulk_out == plain_out
    assert len(bulk_out) == 30


def _return_input(**namespaces):
    """Return an input node as if it were new: a cycle, which aiida-core refuses."""
    return {'same': namespaces['n']['a']}


@pytest.mark.usefixtures('aiida_profile_clean')
def test_returning_an_input_is_refused_as_aiida_core_refuses_it():
    """A calcfunction cannot create a node that already exists; both ways fail with the engine's error."""
    node = orm.Int(1).store()
    errors = []
    for decorator in (engine.calcfunction, bulk_links.calcfunction):
        with pytest.raises(ValueError, match='cycle') as info:
            decorator(_return_input)(n={'a': node})
        errors.append(str(info.value))
    assert errors[1] == errors[0]


class CompactReturn(CompactCheckpoints, BulkReturn):
    """The bulk work chain with compact checkpoints."""


@pytest.mark.usefixtures('aiida_profile_clean')
def test_compact_checkpoint_round_trip():
    """A checkpoint lists the nodes by pk and restores the same inputs and outputs, namespaces still frozen."""
    nodes = {f'k{index:03d}': orm.Int(index).store() for index in range(25)}
    extra = orm.Str('x').store()
    process = CompactReturn(inputs={'nodes': nodes, 'extra': extra})
    encoded = process.encode_input_args(process.inputs)
    assert len(encoded) < 200 * len(nodes)
    assert all(f': {node.pk}' in encoded for node in nodes.values())
    decoded = process.decode_input_args(encoded)
    assert decoded['extra'].uuid == extra.uuid
    assert {key: node.uuid for key, node in decoded['nodes'].items()} == {key: n.uuid for key, n in nodes.items()}
    assert type(decoded['nodes']) is type(process.inputs['nodes'])
    # A checkpoint written the aiida-core way still loads.
    plain = PlainReturn(inputs={'nodes': nodes, 'extra': extra}).encode_input_args({'nodes': nodes})
    assert {key: node.pk for key, node in process.decode_input_args(plain)['nodes'].items()} == {
        key: node.pk for key, node in nodes.items()
    }


@pytest.mark.usefixtures('aiida_profile_clean')
def test_compact_checkpoint_names_missing_nodes():
    node = orm.Int(1).store()
    process = CompactReturn(inputs={'nodes': {'a': node}})
    content = json.loads(process.encode_input_args({'nodes': {'a': node}}))
    content['nodes'] = {path: {key: pk + 10**6 for key, pk in keys.items()} for path, keys in content['nodes'].items()}
    with pytest.raises(ValueError, match='not in the profile'):
        process.decode_input_args(json.dumps(content))


@pytest.mark.usefixtures('aiida_profile_clean')
def test_compact_checkpoint_of_the_first_version_loads():
    """A work chain checkpointed by the first version (nodes as UUIDs under their key paths) resumes after an update."""
    nodes = {'a': orm.Int(1).store(), 'b': orm.Int(2).store()}
    process = CompactReturn(inputs={'nodes': nodes})
    content = json.loads(process.encode_input_args({'nodes': nodes}))
    first_version = {
        'format': 'mlworkbench-compact-checkpoint-v1',
        'rest': content['rest'],
        'nodes': {json.dumps(['nodes', key]): node.uuid for key, node in nodes.items()},
    }
    decoded = process.decode_input_args(json.dumps(first_version))
    assert {key: node.pk for key, node in decoded['nodes'].items()} == {key: node.pk for key, node in nodes.items()}


def _make_nodes(**namespaces):
    """New nodes of several kinds: a structure, a Dict, an array (files in the repository) and an Int per input."""
    import numpy as np

    structure = orm.StructureData(cell=[[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols='Fe')
    structure.append_atom(position=(1.5, 1.5, 1.5), symbols='Co')
    structure.label = 'FeCo'
    array = orm.ArrayData({'values': np.arange(4.0)})
    # numpy scalars and tuples: Node.store cleans them (np.int64 is no JSON), so must bulk_store.
    dictionary = orm.Dict({'a': 1, 'nested': {'b': [1.5, 'x']}, 'n': np.int64(3), 'f': np.float64(0.25), 't': (1, 2)})
    ints = {key: orm.Int(node.value + 1) for key, node in namespaces.get('n', {}).items()}
    return {'structure': structure, 'array': array, 'dict': dictionary, 'ints': ints}


plain_make = engine.calcfunction(_make_nodes)
bulk_make = bulk_links.calcfunction(_make_nodes)


def _row(node: orm.Node) -> dict:
    """What the database holds of a node, but its identity and times."""
    return {
        'node_type': node.node_type,
        'process_type': node.process_type,
        'label': node.label,
        'description': node.description,
        'attributes': node.base.attributes.all,
        'extras': node.base.extras.all,
        'repository': node.base.repository.metadata,
        'user': node.user.pk,
        'computer': node.computer,
    }


@pytest.mark.usefixtures('aiida_profile_clean')
def test_bulk_stored_outputs_equal_aiida_core_stored_outputs():
    """Outputs stored in one bulk insert have the rows, hashes and CREATE links aiida-core's store gives them."""
    inputs = {f'k{index}': orm.Int(index).store() for index in range(5)}
    plain_outputs = plain_make(n=inputs)
    bulk_outputs, bulk = bulk_make.run_get_node(n=inputs)

    flat_plain = {label: plain_outputs[label] for label in ('structure', 'array', 'dict')}
    flat_bulk = {label: bulk_outputs[label] for label in ('structure', 'array', 'dict')}
    flat_plain.update({f'ints__{key}': node for key, node in plain_outputs['ints'].items()})
    flat_bulk.update({f'ints__{key}': node for key, node in bulk_outputs['ints'].items()})
    assert set(flat_bulk) == set(flat_plain)
    for label, node in flat_bulk.items():
        assert node.is_stored, label
        assert _row(node) == _row(flat_plain[label]), label
        assert node.base.caching.get_hash() == node.base.caching.compute_hash(), label
        assert node.base.caching.get_hash() == flat_plain[label].base.caching.get_hash(), label
        creator = node.base.links.get_incoming(link_type=LinkType.CREATE).one()
        assert (creator.node.uuid, creator.link_label) == (bulk.uuid, label)
    # The node with files went through aiida-core's own store: its array is in the repository.
    assert list(flat_bulk['array'].get_array('values')) == [0.0, 1.0, 2.0, 3.0]
    # The outputs the caller gets are the stored nodes, and the process node lists the same ones.
    assert {link.node.uuid for link in bulk.base.links.get_outgoing().all()} == {n.uuid for n in flat_bulk.values()}


def _same_node_twice():
    node = orm.Int(1)
    return {'a': node, 'b': node}


@pytest.mark.usefixtures('aiida_profile_clean')
def test_same_new_node_under_two_labels_is_refused():
    """A new node has one creator: returning it twice fails both ways, and the bulk way stores none of the outputs."""
    for decorator in (engine.calcfunction, bulk_links.calcfunction):
        with pytest.raises(ValueError, match=r'already has an incoming LinkType\.CREATE link'):
            decorator(_same_node_twice)()
    assert orm.QueryBuilder().append(orm.Int).count() == 1  # aiida-core's way stored one before it failed


@pytest.mark.usefixtures('aiida_profile_clean')
def test_bulk_stored_outputs_join_the_autogroup_by_their_own_type():
    """``verdi run --auto-group -i aiida.data:core.int``: the Int outputs are grouped, the calcfunction is not."""
    from aiida.manage import get_manager

    autogroup = get_manager().get_profile_storage().autogroup
    autogroup.enable()
    autogroup.set_include(['aiida.data:core.int'])
    try:
        outputs, node = bulk_make.run_get_node(n={'a': orm.Int(1).store(), 'b': orm.Int(2).store()})
        group = autogroup.get_or_create_group()
    finally:
        autogroup.disable()
        autogroup.set_include(None)
    grouped = {member.uuid for member in group.nodes}
    assert {output.uuid for output in outputs['ints'].values()} <= grouped
    assert node.uuid not in grouped
    assert outputs['dict'].uuid not in grouped


def test_bulk_store_refuses_what_it_cannot_store():
    """bulk_store checks its own preconditions: a stored calculation as creator, new plain nodes, valid labels."""
    with pytest.raises(ValueError, match='stored calculation node'):
        bulk_links.bulk_store(orm.CalcFunctionNode(), {'a': orm.Int(1)})


@pytest.mark.usefixtures('aiida_profile_clean')
def test_bulk_store_refuses_a_stored_node_and_stores_nothing():
    creator = orm.CalcFunctionNode()
    creator.store()
    new = orm.Int(1)
    with pytest.raises(ValueError, match=r'output `b`.*cannot be bulk stored'):
        bulk_links.bulk_store(creator, {'a': new, 'b': orm.Int(2).store()})
    assert not new.is_stored
    assert orm.QueryBuilder().append(orm.Int).count() == 1  # only the one stored by the test itself
