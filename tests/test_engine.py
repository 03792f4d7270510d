"""The engine module: processes with many inputs stored exactly as plain aiida-core stores them, its self-check, and
its switch to plain aiida-core."""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.common import LinkType
from aiida.engine import run_get_node

from aiida_mlworkbench import engine
from aiida_mlworkbench.calcfunctions.clusters import embedding_inputs, embedding_key, extract_impurity_clusters
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

SMALL_SOAP = {'name': 'soap', 'r_cut': 5.0, 'n_max': 2, 'l_max': 2, 'sigma': 1.0, 'average': 'inner'}
WAYS = ('engine', 'plain')


@pytest.fixture(scope='module')
def embedding_pks():
    group = create_synthetic_database(size=30, seed=11, group_label='tests/engine')
    return [(host.pk, info.pk) for host, info in iter_synthetic_embeddings(group)]


@pytest.fixture
def embeddings(embedding_pks):
    return [(orm.load_node(host), orm.load_node(info)) for host, info in embedding_pks]


@pytest.fixture
def way(request, monkeypatch):
    """Run with the engine module (its threshold lowered so that this small database counts as many inputs) or on
    plain aiida-core (the documented switch)."""
    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    if request.param == 'plain':
        monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, '1')
    else:
        monkeypatch.delenv(engine.ENVIRONMENT_VARIABLE, raising=False)
    return request.param


def extraction_inputs(embeddings):
    keys = [embedding_key(index) for index in range(len(embeddings))]
    return embedding_inputs(keys, *zip(*embeddings, strict=True))


def input_links(node):
    return sorted(
        (link.link_label, link.node.uuid)
        for link in node.base.links.get_incoming(link_type=(LinkType.INPUT_CALC, LinkType.INPUT_WORK)).all()
    )


@pytest.mark.parametrize('way', WAYS, indirect=True)
def test_extraction_stored_as_aiida_core_stores_it(embeddings, way):
    """Both ways store every input link and the hash aiida-core computes; the outputs are the same."""
    inputs = extraction_inputs(embeddings)
    n_inputs = len(inputs['hosts']) + len(inputs['impurity_infos']) + 1
    outputs, node = extract_impurity_clusters.run_get_node(**inputs)
    assert node.is_finished_ok, node.exit_message
    assert engine.acceleration_enabled() is (way == 'engine')
    links = input_links(node)
    assert len(links) == n_inputs
    assert {label for label, _ in links} >= {f'impurity_infos__{key}' for key in inputs['impurity_infos']}
    assert node.base.caching.get_hash() == node.base.caching.compute_hash()
    assert len(outputs['clusters']) == len(embeddings)


def test_both_ways_give_the_same_process_hash(embeddings, monkeypatch):
    """A process linked by the engine module has the hash that plain aiida-core gives the same inputs, so caching
    matches across the switch."""
    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    hashes, checksums = [], []
    for plain in (False, True):
        if plain:
            monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, '1')
        outputs, node = extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
        hashes.append(node.base.caching.get_hash())
        checksums.append(outputs['clusters'].checksum)
    assert hashes[0] == hashes[1]
    assert checksums[0] == checksums[1]


def test_caching_takes_only_equal_inputs(embeddings, monkeypatch):
    """With caching on, a second extraction of the same embeddings is taken from the cache, one of other embeddings
    is not (the failure the self-check guards against: outputs of an earlier call for other inputs)."""
    from aiida.manage.caching import enable_caching

    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    first_outputs, first = extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
    with enable_caching(identifier='aiida.calculations:mlworkbench.extract_impurity_clusters'):
        _, same = extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
        other_outputs, other = extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings[:-1]))
    source = orm.load_node(same.base.caching.get_cache_source())
    assert source.base.caching.get_hash() == first.base.caching.get_hash()
    assert source.outputs.clusters.checksum == first_outputs['clusters'].checksum
    assert other.base.caching.get_cache_source() is None
    assert len(other_outputs['clusters']) == len(embeddings) - 1 != len(first_outputs['clusters'])
    assert len(input_links(same)) == len(input_links(first))


def test_self_check_catches_links_not_stored(embeddings, monkeypatch):
    """If aiida-core stopped storing the links handed to it (simulated: the storage drops every new link), the
    process is refused loudly, naming the aiida-core version and the switch, instead of finishing with no inputs."""
    from aiida.storage.psql_dos.orm.nodes import SqlaNode

    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    monkeypatch.setattr(SqlaNode, '_add_link', lambda self, source, link_type, link_label: None)
    with pytest.raises(engine.EngineCheckError, match=r'0 input links stored') as raised:
        extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
    message = str(raised.value)
    assert 'aiida-core 2.' in message
    assert f'{engine.ENVIRONMENT_VARIABLE}=1' in message
    assert_refused_node_excepted(message)


def test_self_check_catches_a_wrong_hash(embeddings, monkeypatch):
    """If the stored hash is not the one the inputs give (simulated: aiida-core stores a stale hash), caching would
    match the process with others: refused loudly."""
    from aiida.orm.nodes.caching import NodeCaching

    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    original = NodeCaching.rehash

    def stale_rehash(self):
        original(self)
        if isinstance(self._node, orm.CalcFunctionNode):
            self._node.base.extras.set(self._HASH_EXTRA_KEY, 'stale')

    monkeypatch.setattr(NodeCaching, 'rehash', stale_rehash)
    with pytest.raises(engine.EngineCheckError, match=r'hash stale') as raised:
        extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
    assert_refused_node_excepted(str(raised.value))


def assert_refused_node_excepted(message):
    """The process the self-check refused stays in the graph: excepted, sealed, with the check's message, no output."""
    builder = orm.QueryBuilder().append(
        orm.CalcFunctionNode, filters={'attributes.process_label': 'extract_impurity_clusters'}, tag='process'
    )
    builder.order_by({'process': {'id': 'desc'}})
    node = builder.first(flat=True)
    assert node.is_excepted
    assert node.is_sealed
    assert message in node.exception
    assert not node.base.links.get_outgoing().all()


def test_switched_off_module_does_not_check(embeddings, monkeypatch):
    """With the switch set, the process is plain aiida-core's: the module neither links nor checks."""
    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    monkeypatch.setenv(engine.ENVIRONMENT_VARIABLE, 'true')
    calls = []
    monkeypatch.setattr(engine, 'check_stored_inputs', lambda *args: calls.append(args))
    _, node = extract_impurity_clusters.run_get_node(**extraction_inputs(embeddings))
    assert node.is_finished_ok
    assert calls == []
    assert node.base.caching.get_hash() == node.base.caching.compute_hash()


def test_untested_aiida_core_switches_the_module_off(monkeypatch, caplog):
    monkeypatch.setattr(engine, 'aiida_core_version', '2.99.0')
    monkeypatch.setattr(engine, '_WARNED', set())
    assert engine.acceleration_enabled() is False
    assert 'not among the versions' in caplog.text


def test_duplicate_or_invalid_inputs_are_refused(embeddings, monkeypatch):
    """The rules aiida-core applies to input links still hold: an input that is no Data node is refused."""
    monkeypatch.setattr(engine, 'MANY_INPUTS', 10)
    inputs = extraction_inputs(embeddings)
    process = orm.CalcFunctionNode()
    process.store()
    inputs['impurity_infos'][embedding_key(0)] = process
    with pytest.raises(ValueError, match='impurity_infos'):
        extract_impurity_clusters.run_get_node(**inputs)


@pytest.mark.parametrize('way', WAYS, indirect=True)
def test_work_chain_from_embeddings_both_ways(embeddings, way):
    """The whole work chain from embeddings runs the same on plain aiida-core and with the engine module."""
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
        embeddings, descriptor=SMALL_SOAP, split={'test_fraction': 0.3, 'stratify': False}
    )
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    n_inputs = len(builder.embeddings.hosts) + len(builder.embeddings.impurity_infos) + 1 + 4
    assert len(input_links(node)) == n_inputs
    assert node.outputs.features.n_rows == len(embeddings)
    assert node.base.caching.get_hash() == node.base.caching.compute_hash()


@pytest.mark.parametrize('way', WAYS, indirect=True)
def test_checkpoints_encode_the_inputs_once(embeddings, way, monkeypatch):
    """With the module, a work chain with many inputs encodes its (frozen) inputs for the checkpoints once, not at
    every step; every checkpoint still holds them, and they decode to the same nodes as plain aiida-core's."""
    from aiida.engine.processes.process import Process
    from plumpy.processes import BundleKeys

    encodings = []
    original = Process.encode_input_args

    def counting(self, inputs):
        encoded = original(self, inputs)
        if isinstance(self, ImpurityLearningWorkChain):
            encodings.append((id(inputs), encoded))
        return encoded

    monkeypatch.setattr(Process, 'encode_input_args', counting)
    checkpoints = []
    original_save = ImpurityLearningWorkChain.save_instance_state

    def recording(self, out_state, save_context):
        original_save(self, out_state, save_context)
        checkpoints.append((self.decode_input_args(out_state[BundleKeys.INPUTS_RAW]), dict(self.inputs)))

    monkeypatch.setattr(ImpurityLearningWorkChain, 'save_instance_state', recording)
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
        embeddings, descriptor=SMALL_SOAP, split={'test_fraction': 0.3, 'stratify': False}
    )
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert len(checkpoints) >= 5
    input_encodings = [entry for entry in encodings if len(entry[1]) > 1000]  # the embeddings namespace is long
    if way == 'engine':
        assert len(input_encodings) == 2  # as given and as parsed
    else:
        assert len(input_encodings) == 2 * len(checkpoints)
    for decoded, parsed in checkpoints:
        assert {key: node.uuid for key, node in decoded['embeddings']['impurity_infos'].items()} == {
            key: node.uuid for key, node in parsed['embeddings']['impurity_infos'].items()
        }


def test_load_together_reads_all_rows_in_one_query(embeddings):
    """After a commit, every node would be read back by a query of its own; after load_together, by none."""
    import sqlalchemy

    nodes = [info for _, info in embeddings]
    orm.Int(1).store()  # a commit: the session forgets what it read
    session = nodes[0].backend.get_session()
    statements = []

    def count(*args):
        statements.append(args[2])

    engine_ = session.get_bind()
    sqlalchemy.event.listen(engine_, 'before_cursor_execute', count)
    try:
        engine.load_together(nodes)
        queries_to_load = len(statements)
        uuids = [node.uuid for node in nodes]
    finally:
        sqlalchemy.event.remove(engine_, 'before_cursor_execute', count)
    assert queries_to_load == 1
    assert len(statements) == 1  # reading the UUIDs afterwards needed no query
    assert uuids == [orm.load_node(node.pk).uuid for node in nodes]


def test_load_together_fails_loudly_if_storage_changed(embeddings, monkeypatch):
    """If aiida-core's storage no longer exposes a node's SQLAlchemy model, the module says so and how to switch off."""
    node = embeddings[0][1]
    monkeypatch.setattr(type(node.backend_entity), 'bare_model', property(lambda self: self.missing))
    with pytest.raises(engine.EngineCheckError, match=engine.ENVIRONMENT_VARIABLE):
        engine.load_together([node])
