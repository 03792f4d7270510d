"""The ImpurityLearningWorkChain end to end: synthetic and real aiida-kkr embeddings, ready clusters, exit codes,
daemon, caching, sharing."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from aiida import orm
from aiida.common import LinkType
from aiida.engine import run_get_node
from aiida.tools.archive import create_archive, import_archive

from aiida_mlworkbench.calcfunctions.clusters import embedding_key, select_clusters
from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

VERDI = str(pathlib.Path(sys.executable).with_name('verdi'))
SMALL_SOAP = {'name': 'soap', 'r_cut': 5.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}
N_EMBEDDINGS = 48
STEPS = ('featurize', 'targets', 'split', 'train', 'score')
"""The link labels of the children of a run from ready clusters; a run from embeddings has ``extract_clusters`` too."""


# Module-scoped fixtures hand out pks: a test that switches profiles leaves earlier node objects stale.


@pytest.fixture(scope='module')
def synthetic_embedding_pks():
    group = create_synthetic_database(size=N_EMBEDDINGS, seed=5, group_label='tests/impurity-learning')
    return [(host.pk, impurity_info.pk) for host, impurity_info in iter_synthetic_embeddings(group)]


@pytest.fixture
def synthetic_embeddings(synthetic_embedding_pks):
    return [(orm.load_node(host), orm.load_node(info)) for host, info in synthetic_embedding_pks]


@pytest.fixture(scope='module')
def finished_pk(synthetic_embedding_pks):
    """One finished run on the synthetic embeddings, shared by the tests that only inspect it."""
    embeddings = [(orm.load_node(host), orm.load_node(info)) for host, info in synthetic_embedding_pks]
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(embeddings, descriptor=SMALL_SOAP)
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node.pk


@pytest.fixture
def finished(finished_pk):
    return orm.load_node(finished_pk)


@pytest.fixture
def clusters(finished) -> ImpurityClusters:
    """The clusters the finished run extracted from the embeddings."""
    return finished.outputs.clusters


def select(clusters: ImpurityClusters, rows) -> ImpurityClusters:
    """The clusters of ``rows``, taken with provenance (``select_clusters``)."""
    return select_clusters(clusters, orm.List([int(row) for row in rows]))['clusters']


def called_labels(run: orm.WorkChainNode) -> set[str]:
    return {link.link_label for link in run.base.links.get_outgoing(link_type=LinkType.CALL_CALC).all()}


def child(run: orm.WorkChainNode, label: str) -> orm.CalcFunctionNode:
    return run.base.links.get_outgoing(link_type=LinkType.CALL_CALC, link_label_filter=label).one().node


class TestSyntheticRun:
    def test_outputs(self, finished):
        outputs = finished.outputs
        assert isinstance(outputs.clusters, ImpurityClusters)
        assert len(outputs.clusters) == N_EMBEDDINGS
        assert outputs.clusters.keys == [embedding_key(row) for row in range(N_EMBEDDINGS)]
        features = outputs.features
        assert isinstance(features, SparseFeatureMatrix)
        assert features.shape[0] == N_EMBEDDINGS
        assert features.descriptor['n_max'] == 3
        assert len(outputs.targets.get_array('targets')) == N_EMBEDDINGS
        split = outputs.split
        assert split.get_array('train').size + split.get_array('test').size == N_EMBEDDINGS
        assert isinstance(outputs.model, TrainedModel)
        assert 0.0 <= outputs.score.value <= 1.0
        assert outputs.metrics['accuracy'] == outputs.score.value

    def test_every_step_is_a_called_process(self, finished):
        assert called_labels(finished) == {'extract_clusters', *STEPS}
        assert child(finished, 'featurize').inputs.clusters.uuid == finished.outputs.clusters.uuid

    def test_rows_follow_the_embedding_order(self, finished, clusters, synthetic_embeddings):
        """Row i of the clusters (and of the features) is embedding i: its key names the extraction's input
        ``impurity_infos__<key>``, and its host record the host linked as ``hosts__<host key>`` by ``host_of``."""
        extraction = clusters.creator
        assert extraction.uuid == child(finished, 'extract_clusters').uuid
        inputs = extraction.base.links.get_incoming()
        host_of = extraction.inputs.host_of.get_dict()
        for row, (host, impurity_info) in enumerate(synthetic_embeddings):
            key = clusters.keys[row]
            assert key == embedding_key(row)
            assert inputs.get_node_by_label(f'impurity_infos__{key}').uuid == impurity_info.uuid
            assert inputs.get_node_by_label(f'hosts__{host_of[key]}').uuid == host.uuid
            assert clusters.hosts[clusters.host_of[row]]['uuid'] == host.uuid

    def test_reports_a_user_can_follow(self, finished):
        from aiida.cmdline.utils.common import get_workchain_report

        report = get_workchain_report(finished, 'REPORT')
        for expected in (
            f'extracting {N_EMBEDDINGS} impurity clusters',
            f'featurizing {N_EMBEDDINGS} clusters',
            'split:',
            'test score',
        ):
            assert expected in report

    def test_verdi_process_show(self, finished):
        result = subprocess.run(
            [VERDI, 'process', 'show', str(finished.pk)], capture_output=True, text=True, check=True
        )
        for label in ('extract_clusters', 'featurize', 'train', 'score', 'clusters', 'model', 'features'):
            assert label in result.stdout

    @pytest.mark.parametrize(
        ('node_class', 'link_prefix', 'index'),
        [(orm.StructureData, 'hosts__', 0), (orm.Dict, 'impurity_infos__', 1)],
        ids=['hosts', 'impurity_infos'],
    )
    def test_query_model_back_to_embeddings(self, finished, synthetic_embeddings, node_class, link_prefix, index):
        """From a model, QueryBuilder walks back through training, featurization and the extraction to the host
        crystals and the impurity_info nodes of every embedding."""
        query = orm.QueryBuilder()
        query.append(TrainedModel, filters={'id': finished.outputs.model.pk}, tag='model')
        query.append(orm.CalcFunctionNode, with_outgoing='model', tag='train')
        query.append(SparseFeatureMatrix, with_outgoing='train', tag='features')
        query.append(orm.CalcFunctionNode, with_outgoing='features', tag='featurize')
        query.append(ImpurityClusters, with_outgoing='featurize', tag='clusters')
        query.append(orm.CalcFunctionNode, with_outgoing='clusters', tag='extraction')
        query.append(
            node_class, with_outgoing='extraction', edge_filters={'label': {'like': f'{link_prefix}%'}}, project='uuid'
        )
        assert set(query.all(flat=True)) == {embedding[index].uuid for embedding in synthetic_embeddings}

    def test_query_runs_above_accuracy(self, finished):
        def runs_scoring_at_least(threshold: float) -> list[int]:
            query = orm.QueryBuilder()
            query.append(ImpurityLearningWorkChain, tag='run', project='id')
            query.append(
                orm.Float,
                with_incoming='run',
                edge_filters={'label': 'score'},
                filters={'attributes.value': {'>=': threshold}},
            )
            return query.all(flat=True)

        assert finished.pk in runs_scoring_at_least(finished.outputs.score.value)
        assert finished.pk not in runs_scoring_at_least(finished.outputs.score.value + 1e-6)

    def test_query_feature_matrices_of_a_descriptor(self, finished):
        query = orm.QueryBuilder().append(
            SparseFeatureMatrix,
            filters={'attributes.descriptor.name': 'soap', 'attributes.descriptor.n_max': 3},
            project='id',
        )
        assert finished.outputs.features.pk in query.all(flat=True)

    def test_archive_round_trip(self, finished, tmp_path, fresh_profile):
        """An archive of a finished run, imported into a fresh profile: the same clusters and feature bytes, the whole
        provenance, and the model loaded with the restricted loader predicts the same."""
        archive = tmp_path / 'run.aiida'
        create_archive([finished], filename=archive)
        clusters, features, model = finished.outputs.clusters, finished.outputs.features, finished.outputs.model
        matrix_bytes = features.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb')
        clusters_bytes = clusters.base.repository.get_object_content(ImpurityClusters.FILENAME, 'rb')
        clusters_checksum = clusters.checksum
        predictions = model.predict(features)
        uuids = _provenance_uuids(finished)
        workchain_uuid, clusters_uuid = finished.uuid, clusters.uuid
        features_uuid, model_uuid = features.uuid, model.uuid
        with fresh_profile():
            import_archive(archive)
            imported_clusters = orm.load_node(clusters_uuid)
            assert imported_clusters.base.repository.get_object_content(ImpurityClusters.FILENAME, 'rb') == (
                clusters_bytes
            )
            imported_clusters.verify()
            assert imported_clusters.checksum == clusters_checksum
            imported_features = orm.load_node(features_uuid)
            assert (
                imported_features.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb') == matrix_bytes
            )
            imported_model = orm.load_node(model_uuid)
            np.testing.assert_array_equal(imported_model.predict(imported_features), predictions)
            np.testing.assert_array_equal(imported_model.load().predict(imported_features.get_matrix()), predictions)
            workchain = orm.load_node(workchain_uuid)
            assert _provenance_uuids(workchain) == uuids
            assert workchain.is_finished_ok


def _provenance_uuids(workchain: orm.WorkChainNode) -> set[str]:
    """UUIDs of the work chain, its called processes, and all their inputs and outputs."""
    uuids = {workchain.uuid}
    for process in [workchain, *workchain.called]:
        uuids.add(process.uuid)
        uuids.update(link.node.uuid for link in process.base.links.get_incoming().all())
        uuids.update(link.node.uuid for link in process.base.links.get_outgoing().all())
    return uuids


class TestReadyClusters:
    """A run given a ready ImpurityClusters: no extraction, the same results as the run from the embeddings."""

    def test_same_results_as_from_embeddings(self, finished, clusters):
        _, node = run_get_node(ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=SMALL_SOAP))
        assert node.is_finished_ok, node.exit_message
        assert called_labels(node) == set(STEPS)
        assert 'clusters' not in node.outputs
        assert child(node, 'featurize').inputs.clusters.uuid == clusters.uuid
        assert node.outputs.features.checksum == finished.outputs.features.checksum
        assert node.outputs.score.value == finished.outputs.score.value
        for name in ('targets', 'groups'):
            assert node.outputs[name].get_array(name).tolist() == finished.outputs[name].get_array(name).tolist()
        assert len(set(node.outputs.groups.get_array('groups').tolist())) > 1

    def test_caching_reuses_only_equal_featurization(self, clusters):
        """With caching on, a second identical run from the same clusters takes the featurization from the cache (the
        same features), and a run with another descriptor computes its own."""
        from aiida.manage.caching import enable_caching

        descriptor = {**SMALL_SOAP, 'sigma': 0.8}  # a descriptor no other test uses: the first run is not cached
        _, first = run_get_node(ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=descriptor))
        assert first.is_finished_ok, first.exit_message
        with enable_caching():
            _, same = run_get_node(ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=descriptor))
            _, other = run_get_node(
                ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor={**descriptor, 'n_max': 2})
            )
        assert same.is_finished_ok, same.exit_message
        assert other.is_finished_ok, other.exit_message
        featurized = child(same, 'featurize')
        source = featurized.base.caching.get_cache_source()
        assert source is not None
        assert orm.load_node(source).base.caching.get_hash() == child(first, 'featurize').base.caching.get_hash()
        assert same.outputs.features.checksum == first.outputs.features.checksum
        assert same.outputs.score.value == first.outputs.score.value
        assert child(other, 'featurize').base.caching.get_cache_source() is None
        assert other.outputs.features.checksum != first.outputs.features.checksum


class TestValidation:
    """Inconsistent inputs are refused before anything runs."""

    def test_neither_embeddings_nor_clusters(self):
        with pytest.raises(ValueError, match='either `embeddings`'):
            run_get_node(ImpurityLearningWorkChain.get_builder())

    def test_both_embeddings_and_clusters(self, synthetic_embeddings, clusters):
        builder = ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:4])
        builder.clusters = clusters
        with pytest.raises(ValueError, match='not both'):
            run_get_node(builder)

    def test_values_length_mismatch(self, synthetic_embeddings):
        builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
            synthetic_embeddings[:4], target='values', target_values=[1.0, 2.0]
        )
        with pytest.raises(ValueError, match='target_values has 2 values but there are 4'):
            run_get_node(builder)

    def test_clusters_without_hosts(self, clusters):
        """Clusters built from atoms alone record no host crystal: refused for the host lattice target, learned from
        with target values."""
        foreign = ImpurityClusters(clusters.get_atoms_list(range(8))).store()
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(foreign, descriptor=SMALL_SOAP)
        with pytest.raises(ValueError, match='records no host crystals'):
            run_get_node(builder)
        builder.target = 'values'
        builder.target_values = [1.0, 2.0] * 4
        builder.estimator = {'estimator': 'Ridge'}
        builder.split = {'stratify': False}
        _, node = run_get_node(builder)
        assert node.is_finished_ok, node.exit_message

    @pytest.mark.parametrize(
        ('inputs', 'message'),
        [
            ({'target': 'magnetism'}, 'unknown target `magnetism`'),
            ({'estimator': {'estimator': 'eval'}}, "unknown estimator 'eval'"),
            ({'descriptor': {'name': 'soap', 'r_cut': 5.0, 'average': 'off'}}, "average='off' is not supported"),
            ({'split': {'test_fraction': 2}}, 'strictly between 0 and 1'),
        ],
        ids=['target', 'estimator', 'descriptor', 'split'],
    )
    def test_refused_when_set_on_the_builder(self, synthetic_embeddings, inputs, message):
        with pytest.raises(ValueError, match=message):
            ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:4], **inputs)


# Each failing case: a function (finished run's clusters, synthetic embeddings) -> builder, the work chain's exit code,
# and a part of the exit message.


def _broken_impurity_position(clusters, embeddings):
    """An impurity position that is no site of the cluster is found only when the cluster is built."""
    host, _ = embeddings[0]
    broken = orm.Dict({'ilayer_center': 0, 'Rcut': 4.0, 'Zimp': [26], 'Rimp_rel': [[0.3, 0.0, 0.0]]})
    return ImpurityLearningWorkChain.get_builder_from_embeddings([(host, broken)] * 2)


def _species_outside_list(clusters, embeddings):
    return ImpurityLearningWorkChain.get_builder_from_clusters(
        select(clusters, range(6)), descriptor={**SMALL_SOAP, 'species': ['H']}
    )


def _host_of_empty_spheres(clusters, embeddings):
    """A host of empty spheres only has no lattice type: found when the targets are made."""
    vacuum = orm.StructureData(cell=[[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    vacuum.append_atom(position=(0, 0, 0), symbols='X', name='X')
    vacuum_embeddings = [(vacuum, orm.Dict({'Rcut': 3.1, 'Zimp': [z]})) for z in (26, 27, 28, 29)]
    return ImpurityLearningWorkChain.get_builder_from_embeddings(vacuum_embeddings, descriptor=SMALL_SOAP)


def _single_host_grouped(clusters, embeddings):
    """A grouped split of clusters of a single host has one group: found once the groups are known."""
    hosts, counts = np.unique(clusters.host_of, return_counts=True)
    rows = np.flatnonzero(clusters.host_of == hosts[np.argmax(counts)])[:4]
    assert len(rows) >= 2
    return ImpurityLearningWorkChain.get_builder_from_clusters(
        select(clusters, rows), descriptor=SMALL_SOAP, split={'grouped': True}
    )


def _regressor_on_labels(clusters, embeddings):
    return ImpurityLearningWorkChain.get_builder_from_clusters(
        select(clusters, range(8)),
        descriptor=SMALL_SOAP,
        target='values',
        target_values=['a', 'b'] * 4,
        estimator={'estimator': 'Ridge'},
    )


def _clustering_estimator(clusters, embeddings):
    return ImpurityLearningWorkChain.get_builder_from_clusters(
        select(clusters, range(8)),
        descriptor=SMALL_SOAP,
        target='values',
        target_values=['a', 'b'] * 4,
        estimator={'estimator': 'MiniBatchKMeans', 'parameters': {'n_clusters': 2, 'n_init': 1}},
    )


@pytest.mark.parametrize(
    ('make_builder', 'exit_code', 'message'),
    [
        (_broken_impurity_position, 'ERROR_CLUSTER_EXTRACTION', 'no site of the cluster'),
        (_species_outside_list, 'ERROR_FEATURIZATION', 'not in the descriptor species list'),
        (_host_of_empty_spheres, 'ERROR_TARGETS', 'no atoms'),
        (_single_host_grouped, 'ERROR_SPLIT', 'at least two distinct groups'),
        (_regressor_on_labels, 'ERROR_TRAINING', ''),
        (_clustering_estimator, 'ERROR_SCORING', 'only classification and regression'),
    ],
    ids=['extraction', 'featurization', 'targets', 'split', 'training', 'scoring'],
)
def test_exit_codes(clusters, synthetic_embeddings, make_builder, exit_code, message):
    """A failing step ends the run with its exit code; the failed child stays in the graph and is named as
    ``label<pk>`` with its exit status in a report and in the exit message."""
    _, node = run_get_node(make_builder(clusters, synthetic_embeddings))
    assert node.exit_status == ImpurityLearningWorkChain.exit_codes[exit_code].status, node.exit_message
    assert message in node.exit_message
    called = node.base.links.get_outgoing(link_type=LinkType.CALL_CALC).all()
    failed = [link for link in called if not link.node.is_finished_ok]
    assert len(failed) == 1
    link = failed[0]
    assert link.node.is_finished
    assert link.node.exit_status != 0
    named = f'{link.link_label}<{link.node.pk}>'
    reports = [log.message for log in orm.Log.collection.get_logs_for(node)]
    assert any(f'{named} failed with exit status {link.node.exit_status}' in line for line in reports), reports
    assert named in node.exit_message


def test_prediction_work_chain_reports_a_failed_extraction(synthetic_embeddings):
    """The prediction work chain extracts the clusters of new embeddings; an extraction that fails ends it with exit
    code 401, naming the extraction as label<pk>."""
    from sklearn.dummy import DummyRegressor

    from aiida_mlworkbench.workflows import ImpurityPredictionWorkChain

    model = TrainedModel(DummyRegressor().fit(np.zeros((2, 1)), [0.0, 1.0]), descriptor=SMALL_SOAP).store()
    host, _ = synthetic_embeddings[0]
    broken = orm.Dict({'ilayer_center': 0, 'Rcut': 4.0, 'Zimp': [26], 'Rimp_rel': [[0.3, 0.0, 0.0]]})
    _, node = run_get_node(ImpurityPredictionWorkChain.get_builder_from_embeddings(model, [(host, broken)]))
    assert node.exit_status == ImpurityPredictionWorkChain.exit_codes.ERROR_CLUSTER_EXTRACTION.status
    (extraction,) = node.called
    assert f'extract_clusters<{extraction.pk}>' in node.exit_message
    assert 'no site of the cluster' in node.exit_message


@pytest.mark.parametrize('source', ['embeddings', 'clusters'])
def test_submit_to_daemon(source, synthetic_embeddings, clusters, submit_and_await):
    """The production way: submitted to daemon workers (ZeroMQ broker on SQLite, RabbitMQ on PostgreSQL)."""
    if source == 'embeddings':
        builder = ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:24])
    else:
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(select(clusters, range(24)))
    builder.descriptor = SMALL_SOAP
    node = submit_and_await(builder, timeout=180)
    assert node.is_finished_ok, node.exit_message
    assert node.outputs.features.shape[0] == 24
    assert called_labels(node) == ({'extract_clusters', *STEPS} if source == 'embeddings' else set(STEPS))


@pytest.fixture
def kkr_group(kkr_archives_dir):
    """Four real aiida-kkr archives (full and sub impurity work chains, a GF write-out, an STM scan) in one group."""
    group, _ = orm.Group.collection.get_or_create('tests/kkr-archives-learning')
    if not group.count():
        for name in ('kkrimp_full_wc.aiida', 'kkrimp_sub_wc.aiida', 'kkrflex_writeout_wc.aiida', 'stm.aiida'):
            import_archive(kkr_archives_dir / name, group=group)
    return group


class TestRealArchives:
    """Real aiida-kkr nodes end to end: the resolver, the clusters juKKR used, the learning steps, and the graph from
    the model back to the aiida-kkr processes."""

    def test_learn_from_kkr_group(self, kkr_group):
        builder = ImpurityLearningWorkChain.get_builder_from_kkr(
            kkr_group,
            descriptor=SMALL_SOAP,
            target='values',
            split={'test_fraction': 0.5, 'stratify': False},
            estimator={'estimator': 'Ridge'},
        )
        impurity_infos = {node.uuid for node in builder.embeddings.impurity_infos.values()}
        n_embeddings = len(impurity_infos)
        builder.target_values = orm.List([float(index) for index in range(n_embeddings)])
        _, node = run_get_node(builder)
        assert node.is_finished_ok, node.exit_message
        assert node.outputs.features.shape[0] == n_embeddings
        assert len(node.outputs.clusters) == n_embeddings

        # From the model back to the aiida-kkr processes that used the impurity_info nodes it learned from.
        query = orm.QueryBuilder()
        query.append(TrainedModel, filters={'id': node.outputs.model.pk}, tag='model')
        query.append(orm.CalcFunctionNode, with_outgoing='model', tag='train')
        query.append(SparseFeatureMatrix, with_outgoing='train', tag='features')
        query.append(orm.CalcFunctionNode, with_outgoing='features', tag='featurize')
        query.append(ImpurityClusters, with_outgoing='featurize', tag='clusters')
        query.append(
            orm.CalcFunctionNode,
            with_outgoing='clusters',
            filters={'process_type': 'aiida.calculations:mlworkbench.extract_impurity_clusters'},
            tag='extraction',
        )
        query.append(
            orm.Dict,
            with_outgoing='extraction',
            edge_filters={'label': {'like': 'impurity_infos__%'}},
            tag='impurity_info',
            project='uuid',
        )
        query.append(
            orm.ProcessNode,
            with_incoming='impurity_info',
            filters={'process_type': {'like': 'aiida.%kkr%'}},
            project='uuid',
        )
        found = query.all()
        assert {info for info, _ in found} == impurity_infos, 'every impurity_info leads to an aiida-kkr process'
        assert {process for _, process in found}
