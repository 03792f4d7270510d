"""The ImpurityLearningWorkChain end to end: synthetic and real aiida-kkr embeddings, exit codes, daemon, sharing."""

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

from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

VERDI = str(pathlib.Path(sys.executable).with_name('verdi'))
SMALL_SOAP = {'name': 'soap', 'r_cut': 5.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}


# Module-scoped fixtures hand out pks: a test that switches profiles leaves earlier node objects stale.


@pytest.fixture(scope='module')
def synthetic_embedding_pks():
    group = create_synthetic_database(size=48, seed=5, group_label='tests/impurity-learning')
    return [(host.pk, impurity_info.pk) for host, impurity_info in iter_synthetic_embeddings(group)]


@pytest.fixture
def synthetic_embeddings(synthetic_embedding_pks):
    return [(orm.load_node(host), orm.load_node(info)) for host, info in synthetic_embedding_pks]


@pytest.fixture(scope='module')
def finished_pk(synthetic_embedding_pks):
    """One finished run on 48 synthetic embeddings, shared by the tests that only inspect it."""
    embeddings = [(orm.load_node(host), orm.load_node(info)) for host, info in synthetic_embedding_pks]
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(embeddings, descriptor=SMALL_SOAP)
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node.pk


@pytest.fixture
def finished(finished_pk):
    return orm.load_node(finished_pk)


class TestSyntheticRun:
    def test_ready_clusters_find_their_hosts(self, finished):
        """From the clusters of a run, the host lattice targets come out as from the embeddings: hosts read back from
        the graph (each cluster's creator input ``hosts__<host key>``, named by its input ``host_of``), in row
        order."""
        clusters = clusters_of(finished)
        _, node = run_get_node(ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=SMALL_SOAP))
        assert node.is_finished_ok, node.exit_message
        expected = finished.outputs.targets.get_array('targets')
        assert node.outputs.targets.get_array('targets').tolist() == expected.tolist()
        groups = node.outputs.groups.get_array('groups')
        assert groups.tolist() == finished.outputs.groups.get_array('groups').tolist()
        assert len(set(groups.tolist())) > 1

    def test_outputs(self, finished, synthetic_embeddings):
        outputs = finished.outputs
        assert len(outputs.clusters) == 48
        features = outputs.features
        assert isinstance(features, SparseFeatureMatrix)
        assert features.shape[0] == 48
        assert features.descriptor['n_max'] == 3
        assert len(outputs.targets.get_array('targets')) == 48
        split = outputs.split
        assert split.get_array('train').size + split.get_array('test').size == 48
        assert isinstance(outputs.model, TrainedModel)
        assert 0.0 <= outputs.score.value <= 1.0
        assert outputs.metrics['accuracy'] == outputs.score.value

    def test_every_step_is_a_called_process(self, finished):
        labels = {link.link_label for link in finished.base.links.get_outgoing(node_class=orm.ProcessNode).all()}
        assert labels == {'impurity_clusters', 'featurize', 'targets', 'split', 'train', 'score'}

    def test_rows_follow_the_embedding_order(self, finished, synthetic_embeddings):
        """Row i of the features is the cluster of embedding i, built from that embedding's host and impurity_info."""
        from aiida_mlworkbench.calcfunctions.clusters import hosts_of_clusters
        from aiida_mlworkbench.calcfunctions.featurize import get_row_structures

        rows = get_row_structures(finished.outputs.features)
        found_hosts = hosts_of_clusters(rows)
        for row, found_host, (host, impurity_info) in zip(rows, found_hosts, synthetic_embeddings, strict=True):
            creator = row.creator
            key = next(
                link.link_label.removeprefix('clusters__')
                for link in creator.base.links.get_outgoing().all()
                if link.node.uuid == row.uuid
            )
            inputs = creator.base.links.get_incoming()
            assert found_host.uuid == host.uuid
            assert inputs.get_node_by_label(f'impurity_infos__{key}').uuid == impurity_info.uuid

    def test_reports_a_user_can_follow(self, finished):
        from aiida.cmdline.utils.common import get_workchain_report

        report = get_workchain_report(finished, 'REPORT')
        for expected in ('extracting 48 impurity clusters', 'featurizing 48 clusters', 'split:', 'test score'):
            assert expected in report

    def test_verdi_process_show(self, finished):
        result = subprocess.run(
            [VERDI, 'process', 'show', str(finished.pk)], capture_output=True, text=True, check=True
        )
        for label in ('featurize', 'train', 'score', 'model', 'features'):
            assert label in result.stdout

    def test_query_model_back_to_hosts(self, finished, synthetic_embeddings):
        """From a model, QueryBuilder walks back through training and featurization to the host crystals."""
        query = orm.QueryBuilder()
        query.append(TrainedModel, filters={'id': finished.outputs.model.pk}, tag='model')
        query.append(orm.CalcFunctionNode, with_outgoing='model', tag='train')
        query.append(SparseFeatureMatrix, with_outgoing='train', tag='features')
        query.append(orm.CalcFunctionNode, with_outgoing='features', tag='featurize')
        query.append(orm.StructureData, with_outgoing='featurize', tag='cluster')
        query.append(orm.CalcFunctionNode, with_outgoing='cluster', tag='extraction')
        query.append(
            orm.StructureData, with_outgoing='extraction', edge_filters={'label': {'like': 'hosts__%'}}, project='uuid'
        )
        hosts = set(query.all(flat=True))
        assert hosts == {host.uuid for host, _ in synthetic_embeddings}

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
        """verdi archive create of a finished run, imported into a fresh profile: same bytes, same predictions."""
        archive = tmp_path / 'run.aiida'
        create_archive([finished], filename=archive)
        features, model = finished.outputs.features, finished.outputs.model
        matrix_bytes = features.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb')
        predictions = model.predict(features)
        uuids = _provenance_uuids(finished)
        workchain_uuid, features_uuid, model_uuid = finished.uuid, features.uuid, model.uuid
        with fresh_profile():
            import_archive(archive)
            imported_features = orm.load_node(features_uuid)
            assert (
                imported_features.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb') == matrix_bytes
            )
            np.testing.assert_array_equal(orm.load_node(model_uuid).predict(imported_features), predictions)
            workchain = orm.load_node(workchain_uuid)
            assert _provenance_uuids(workchain) == uuids
            assert workchain.is_finished_ok


def clusters_of(run: orm.WorkChainNode) -> list[orm.StructureData]:
    """The clusters of a finished run, in row order."""
    outputs = run.outputs.clusters
    return [outputs[key] for key in sorted(outputs)]


def _provenance_uuids(workchain: orm.WorkChainNode) -> set[str]:
    """UUIDs of the work chain, its called processes, and all their inputs and outputs."""
    uuids = {workchain.uuid}
    for process in [workchain, *workchain.called]:
        uuids.add(process.uuid)
        uuids.update(link.node.uuid for link in process.base.links.get_incoming().all())
        uuids.update(link.node.uuid for link in process.base.links.get_outgoing().all())
    return uuids


class TestValidation:
    """Inconsistent inputs are refused before anything runs."""

    def test_neither_embeddings_nor_clusters(self):
        with pytest.raises(ValueError, match='either `embeddings`'):
            run_get_node(ImpurityLearningWorkChain.get_builder())

    def test_unknown_target(self, synthetic_embeddings):
        """Refused as soon as the input is set on the builder."""
        with pytest.raises(ValueError, match='unknown target `magnetism`'):
            ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:4], target='magnetism')

    def test_values_length_mismatch(self, synthetic_embeddings):
        builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
            synthetic_embeddings[:4], target='values', target_values=[1.0, 2.0]
        )
        with pytest.raises(ValueError, match='target_values has 2 values but there are 4'):
            run_get_node(builder)

    def test_invalid_estimator(self, synthetic_embeddings):
        """Refused as soon as the input is set on the builder."""
        with pytest.raises(ValueError, match="unknown estimator 'eval'"):
            ImpurityLearningWorkChain.get_builder_from_embeddings(
                synthetic_embeddings[:4], estimator={'estimator': 'eval'}
            )

    def test_invalid_descriptor(self, synthetic_embeddings):
        """Refused as soon as the input is set on the builder."""
        with pytest.raises(ValueError, match="average='off' is not supported"):
            ImpurityLearningWorkChain.get_builder_from_embeddings(
                synthetic_embeddings[:4], descriptor={'name': 'soap', 'r_cut': 5.0, 'average': 'off'}
            )

    def test_invalid_split(self, synthetic_embeddings):
        """Refused as soon as the input is set on the builder."""
        with pytest.raises(ValueError, match='strictly between 0 and 1'):
            ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:4], split={'test_fraction': 2})


class TestExitCodes:
    def run(self, builder):
        """Run the work chain; a failed child must be named as ``label<pk>`` in a report and in the exit message."""
        _, node = run_get_node(builder)
        called = node.base.links.get_outgoing(link_type=LinkType.CALL_CALC).all()
        reports = [log.message for log in orm.Log.collection.get_logs_for(node)]
        for link in (link for link in called if not link.node.is_finished_ok):
            named = f'{link.link_label}<{link.node.pk}>'
            assert any(f'{named} failed with exit status {link.node.exit_status}' in line for line in reports), reports
            assert named in node.exit_message
        return node

    def test_cluster_extraction(self, synthetic_embeddings):
        """An impurity position that is no site of the cluster is found only when the cluster is built."""
        host, _ = synthetic_embeddings[0]
        broken = orm.Dict({'ilayer_center': 0, 'Rcut': 4.0, 'Zimp': [26], 'Rimp_rel': [[0.3, 0.0, 0.0]]})
        node = self.run(ImpurityLearningWorkChain.get_builder_from_embeddings([(host, broken)] * 2))
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_CLUSTER_EXTRACTION.status
        assert 'no site of the cluster' in node.exit_message

    def test_featurization(self, finished):
        clusters = clusters_of(finished)[:6]
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(
            clusters, descriptor={**SMALL_SOAP, 'species': ['H']}
        )
        node = self.run(builder)
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_FEATURIZATION.status
        assert 'not in the descriptor species list' in node.exit_message

    def test_targets(self):
        """A host of empty spheres only has no lattice type: found when the targets are made."""
        vacuum = orm.StructureData(cell=[[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
        vacuum.append_atom(position=(0, 0, 0), symbols='X', name='X')
        embeddings = [(vacuum, orm.Dict({'Rcut': 3.1, 'Zimp': [z]})) for z in (26, 27, 28, 29)]
        node = self.run(ImpurityLearningWorkChain.get_builder_from_embeddings(embeddings, descriptor=SMALL_SOAP))
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_TARGETS.status
        assert 'no atoms' in node.exit_message

    def test_no_host_for_foreign_clusters(self, finished):
        clusters = [cluster.clone().store() for cluster in clusters_of(finished)[:4]]
        node = self.run(ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=SMALL_SOAP))
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_NO_HOST.status

    def test_split(self, finished):
        """A grouped split of clusters of a single host has one group: found once the groups are known."""
        groups = finished.outputs.groups.get_array('groups')
        names, counts = np.unique(groups, return_counts=True)
        rows = np.flatnonzero(groups == names[np.argmax(counts)])[:4]
        assert len(rows) >= 2
        clusters = [clusters_of(finished)[row] for row in rows]
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(
            clusters, descriptor=SMALL_SOAP, split={'grouped': True}
        )
        node = self.run(builder)
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_SPLIT.status
        assert 'at least two distinct groups' in node.exit_message

    def test_training(self, finished):
        clusters = clusters_of(finished)[:8]
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(
            clusters,
            descriptor=SMALL_SOAP,
            target='values',
            target_values=['a', 'b'] * 4,
            estimator={'estimator': 'Ridge'},
        )
        node = self.run(builder)
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_TRAINING.status

    def test_scoring(self, finished):
        clusters = clusters_of(finished)[:8]
        builder = ImpurityLearningWorkChain.get_builder_from_clusters(
            clusters,
            descriptor=SMALL_SOAP,
            target='values',
            target_values=['a', 'b'] * 4,
            estimator={'estimator': 'MiniBatchKMeans', 'parameters': {'n_clusters': 2, 'n_init': 1}},
        )
        node = self.run(builder)
        assert node.exit_status == ImpurityLearningWorkChain.exit_codes.ERROR_SCORING.status
        assert 'only classification and regression' in node.exit_message


def test_submit_to_daemon(synthetic_embeddings, submit_and_await):
    """The production way: submitted to daemon workers (ZeroMQ broker on SQLite, RabbitMQ on PostgreSQL)."""
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(synthetic_embeddings[:24], descriptor=SMALL_SOAP)
    node = submit_and_await(builder, timeout=180)
    assert node.is_finished_ok, node.exit_message
    assert node.outputs.features.shape[0] == 24


class TestRealArchives:
    """Real aiida-kkr nodes end to end: the resolver, the clusters juKKR used, the learning steps."""

    @pytest.fixture(scope='class')
    def kkr_group(self, kkr_archives_dir):
        group, _ = orm.Group.collection.get_or_create('tests/kkr-archives-learning')
        if not group.count():
            for name in ('kkrimp_full_wc.aiida', 'kkrimp_sub_wc.aiida', 'kkrflex_writeout_wc.aiida', 'stm.aiida'):
                import_archive(kkr_archives_dir / name, group=group)
        return group

    def test_learn_from_kkr_group(self, kkr_group):
        builder = ImpurityLearningWorkChain.get_builder_from_kkr(
            kkr_group,
            descriptor=SMALL_SOAP,
            target='values',
            split={'test_fraction': 0.5, 'stratify': False},
            estimator={'estimator': 'Ridge'},
        )
        n_embeddings = len(builder.embeddings.hosts)
        builder.target_values = orm.List([float(index) for index in range(n_embeddings)])
        _, node = run_get_node(builder)
        assert node.is_finished_ok, node.exit_message
        assert node.outputs.features.shape[0] == n_embeddings
        # From the model back to the aiida-kkr calculations that used the same impurity_info nodes.
        query = orm.QueryBuilder()
        query.append(TrainedModel, filters={'id': node.outputs.model.pk}, tag='model')
        query.append(orm.WorkChainNode, with_outgoing='model', tag='run')
        query.append(
            orm.Dict,
            with_outgoing='run',
            edge_filters={'label': {'like': 'embeddings__impurity_infos__%'}},
            tag='impurity_info',
        )
        query.append(
            orm.ProcessNode,
            with_incoming='impurity_info',
            filters={'process_type': {'like': 'aiida.%kkr%'}},
            project='uuid',
        )
        kkr_processes = set(query.all(flat=True))
        assert kkr_processes
