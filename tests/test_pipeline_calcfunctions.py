"""The learning steps as calcfunctions: featurize, targets, split, train, score; their exit codes and caching."""

from __future__ import annotations

import ase.build
import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from aiida.manage.caching import enable_caching
from dscribe.descriptors import SOAP

from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
from aiida_mlworkbench.calcfunctions.featurize import (
    featurize,
    featurize_structures,
    get_row_structures,
    row_label,
    structures_as_atoms,
)
from aiida_mlworkbench.calcfunctions.score import score_model
from aiida_mlworkbench.calcfunctions.split import split_rows
from aiida_mlworkbench.calcfunctions.targets import host_lattice_targets, targets_from_values
from aiida_mlworkbench.calcfunctions.train import train_model
from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.synthetic import EXTRA_LATTICE, create_synthetic_database, iter_synthetic_embeddings

SOAP_PARAMETERS = {'name': 'soap', 'r_cut': 5.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}
REFERENCE_ESTIMATOR = {
    'estimator': 'SVC',
    'parameters': {'kernel': 'linear'},
    'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
}


@pytest.fixture(scope='module')
def embeddings():
    group = create_synthetic_database(size=60, seed=11, group_label='tests/pipeline-calcfunctions')
    return list(iter_synthetic_embeddings(group))


@pytest.fixture(scope='module')
def clusters(embeddings):
    return build_impurity_clusters(embeddings)


@pytest.fixture(scope='module')
def features(clusters):
    return featurize_structures(clusters, SOAP_PARAMETERS)


@pytest.fixture(scope='module')
def lattice_targets(embeddings):
    labels, hosts, rows = {}, {}, []
    for host, _ in embeddings:
        label = labels.setdefault(host.uuid, f'host_{len(labels)}')
        hosts[label] = host
        rows.append(label)
    return host_lattice_targets(rows=orm.List(rows), **hosts)


def array(values, name='targets') -> orm.ArrayData:
    node = orm.ArrayData()
    node.set_array(name, np.asarray(values))
    return node


class TestFeaturize:
    def test_structures_as_atoms_equals_get_ase(self, clusters):
        """The bulk reader gives get_ase()'s numbers, positions, cell and pbc, for stored, unstored and periodic
        structures, and leaves alloy sites to get_ase()."""
        bulk_cu = orm.StructureData(ase=ase.build.bulk('Cu', 'fcc', a=3.61) * (2, 1, 1))
        alloy = orm.StructureData(cell=np.eye(3) * 3.0)
        alloy.append_atom(position=(0, 0, 0), symbols=('Cu', 'Au'), weights=(0.5, 0.5), name='CuAu')
        structures = [*clusters[:10], bulk_cu, bulk_cu.clone().store()]
        for got, node in zip(structures_as_atoms(structures), structures, strict=True):
            expected = node.get_ase()
            assert got.get_chemical_symbols() == expected.get_chemical_symbols()
            np.testing.assert_array_equal(got.positions, expected.positions)
            np.testing.assert_array_equal(got.cell.array, expected.cell.array)
            assert got.pbc.tolist() == expected.pbc.tolist()
        with pytest.raises(ValueError, match='alloy'):
            structures_as_atoms([alloy])

    def test_equals_dscribe_full_species_soap(self, clusters, features):
        """The species-aware SOAP stored in the matrix equals DScribe's own SOAP over the whole species list."""
        atoms = [cluster.get_ase() for cluster in clusters]
        species = features.descriptor['species']
        reference = SOAP(species=species, r_cut=5.0, n_max=3, l_max=3, sigma=1.0, average='inner', sparse=True)
        expected = scipy.sparse.csr_array(reference.create(atoms).to_scipy_sparse())
        stored = features.get_matrix()
        assert stored.shape == expected.shape
        assert abs(stored - expected).max() == 0.0

    def test_descriptor_recorded(self, clusters, features):
        assert features.descriptor['name'] == 'soap'
        assert features.descriptor['n_max'] == 3
        species = sorted({symbol for cluster in clusters for symbol in cluster.get_ase().get_chemical_symbols()})
        assert sorted(features.descriptor['species']) == species
        assert features.n_rows == len(clusters)

    def test_rows_map_back_to_clusters(self, clusters, features):
        assert [node.uuid for node in get_row_structures(features)] == [cluster.uuid for cluster in clusters]

    def test_species_outside_list_names_the_structure(self, clusters):
        inputs = {row_label(index): cluster for index, cluster in enumerate(clusters[:3])}
        species = sorted(set(clusters[0].get_ase().get_chemical_symbols()))
        _, node = featurize.run_get_node(descriptor=orm.Dict({**SOAP_PARAMETERS, 'species': species}), **inputs)
        assert node.exit_status == 341
        assert 'not in the descriptor species list' in node.exit_message
        assert 'input `row_00000' in node.exit_message
        assert not node.base.links.get_outgoing().all()

    def test_invalid_descriptor(self, clusters):
        _, node = featurize.run_get_node(descriptor=orm.Dict({'name': 'unknown'}), row_000000=clusters[0])
        assert node.exit_status == 340
        assert 'unknown' in node.exit_message

    def test_row_labels_must_be_contiguous(self, clusters):
        _, node = featurize.run_get_node(descriptor=orm.Dict(SOAP_PARAMETERS), row_000001=clusters[0])
        assert node.exit_status == 343

    def test_caching_reuses_the_matrix(self, clusters):
        inputs = {row_label(index): cluster for index, cluster in enumerate(clusters[:5])}
        descriptor = orm.Dict(SOAP_PARAMETERS).store()
        first, first_node = featurize.run_get_node(descriptor=descriptor, **inputs)
        with enable_caching():
            second, second_node = featurize.run_get_node(descriptor=descriptor, **inputs)
        assert second_node.base.caching.is_created_from_cache
        assert second_node.base.caching.get_cache_source() == first_node.uuid
        assert second.checksum == first.checksum
        assert second.base.repository.hash() == first.base.repository.hash()


class TestTargets:
    def test_host_lattice(self, embeddings, lattice_targets):
        targets = lattice_targets['targets'].get_array('targets')
        groups = lattice_targets['groups'].get_array('groups')
        assert len(targets) == len(embeddings)
        assert set(targets) <= {'bcc', 'fcc', 'hcp'}
        for (host, _), label, group in zip(embeddings, targets, groups, strict=True):
            assert label == host.base.extras.get(EXTRA_LATTICE)
            assert group == host.get_formula(mode='hill_compact')

    def test_unknown_host_label(self, embeddings):
        _, node = host_lattice_targets.run_get_node(rows=orm.List(['host_0', 'host_9']), host_0=embeddings[0][0])
        assert node.exit_status == 350
        assert 'row 1 refers to host `host_9`' in node.exit_message

    def test_values(self):
        assert targets_from_values(orm.List([1.0, 2, 3.5])).base.attributes.get('task') == 'regression'
        node = targets_from_values(orm.List(['a', 'b']))
        assert node.base.attributes.get('classes') == ['a', 'b']
        _, failed = targets_from_values.run_get_node(orm.List(['a', 1]))
        assert failed.exit_status == 352
        _, failed = targets_from_values.run_get_node(orm.List([]))
        assert failed.exit_status == 351


class TestSplit:
    def test_stratified_is_reproducible_and_keeps_proportions(self, lattice_targets):
        targets = lattice_targets['targets']
        first = split_rows(targets, test_fraction=0.25, seed=3)
        second = split_rows(targets, test_fraction=0.25, seed=3)
        other = split_rows(targets, test_fraction=0.25, seed=4)
        np.testing.assert_array_equal(first.get_array('test'), second.get_array('test'))
        assert not np.array_equal(first.get_array('test'), other.get_array('test'))
        train, test = first.get_array('train'), first.get_array('test')
        assert sorted(np.concatenate([train, test])) == list(range(60))
        labels = targets.get_array('targets')
        for label in set(labels):
            overall = np.mean(labels == label)
            assert abs(np.mean(labels[test] == label) - overall) < 0.1

    def test_grouped_split_keeps_hosts_on_one_side(self, lattice_targets):
        split = split_rows(lattice_targets['targets'], groups=lattice_targets['groups'], seed=1)
        groups = lattice_targets['groups'].get_array('groups')
        assert split.base.attributes.get('kind') == 'grouped'
        assert not set(groups[split.get_array('train')]) & set(groups[split.get_array('test')])

    @pytest.mark.parametrize(
        ('inputs', 'status'),
        [
            ({'test_fraction': 1.0}, 310),
            ({'test_fraction': 0.0}, 310),
        ],
    )
    def test_exit_codes(self, lattice_targets, inputs, status):
        _, node = split_rows.run_get_node(lattice_targets['targets'], **inputs)
        assert node.exit_status == status

    def test_cannot_stratify_a_singleton_class(self):
        _, node = split_rows.run_get_node(array(['a', 'a', 'a', 'b']), test_fraction=0.5)
        assert node.exit_status == 311

    def test_groups_must_align(self):
        _, node = split_rows.run_get_node(array(['a', 'b', 'a', 'b']), groups=array(['x', 'y'], 'groups'))
        assert node.exit_status == 312
        _, node = split_rows.run_get_node(array(['a', 'b', 'a', 'b']), groups=array(['x'] * 4, 'groups'))
        assert node.exit_status == 313


class TestTrainAndScore:
    def test_reference_setting(self, features, lattice_targets):
        targets = lattice_targets['targets']
        split = split_rows(targets, seed=0)
        model = train_model(features, targets, split, orm.Dict(REFERENCE_ESTIMATOR))
        assert isinstance(model, TrainedModel)
        assert model.base.attributes.get('final_estimator_class') == 'sklearn.svm.SVC'
        assert model.descriptor == features.descriptor
        outputs = score_model(model, features, targets, split)
        metrics = outputs['metrics'].get_dict()
        truth = targets.get_array('targets')[split.get_array('test')]
        predicted = model.predict(features, rows=split.get_array('test'))
        assert outputs['score'].value == pytest.approx(np.mean(truth == predicted))
        assert metrics['accuracy'] == outputs['score'].value
        assert metrics['confusion_matrix']['labels'] == sorted(set(truth) | set(predicted))
        assert np.sum(metrics['confusion_matrix']['matrix']) == len(truth)
        assert set(metrics['per_class']) == set(metrics['confusion_matrix']['labels'])
        assert {'balanced_accuracy', 'f1_macro', 'train_accuracy'} <= set(metrics)

    def test_soap_kernel(self, features, lattice_targets):
        targets = lattice_targets['targets']
        split = split_rows(targets, seed=0)
        model = train_model(
            features, targets, split, orm.Dict({'estimator': 'SVC', 'kernel': {'name': 'soap', 'xi': 2}})
        )
        reloaded = orm.load_node(model.pk)
        assert 'NormalizedSoapKernel' in str(reloaded.base.attributes.get('hyperparameters')['kernel'])
        assert len(reloaded.predict(features)) == features.n_rows

    def test_regression(self, features):
        values = orm.List([float(index % 7) for index in range(features.n_rows)])
        targets = targets_from_values(values)
        split = split_rows(targets, stratify=False)
        model = train_model(features, targets, split, orm.Dict({'estimator': 'Ridge', 'parameters': {'alpha': 1.0}}))
        outputs = score_model(model, features, targets, split)
        assert set(outputs['metrics'].get_dict()) >= {'mae', 'rmse', 'r2'}
        assert outputs['score'].value == outputs['metrics']['r2']

    @pytest.mark.parametrize(
        ('specification', 'message'),
        [
            ({'estimator': 'os.system'}, "unknown estimator 'os.system'"),
            ({'estimator': 'SVC', 'parameters': {'C': -1.0}}, "The 'C' parameter of SVC"),
            ({'estimator': 'SVC', 'parameters': {'colour': 1}}, "SVC has no parameter 'colour'"),
            ({'estimator': 'SVC', 'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': True}}}, 'densify'),
            ({'estimator': 'Ridge', 'kernel': {'name': 'soap'}}, 'a kernel can be given only to'),
            ({'estimator': 'SVC', 'tuning': 'yes'}, "unknown key(s) 'tuning'"),
        ],
    )
    def test_invalid_estimator(self, features, lattice_targets, specification, message):
        targets = lattice_targets['targets']
        split = split_rows(targets, seed=0)
        result, node = train_model.run_get_node(features, targets, split, orm.Dict(specification))
        assert node.exit_status == 320
        assert message in node.exit_message
        assert not result

    def test_targets_mismatch(self, features):
        targets = array(['a', 'b'] * 3)
        split = array([0, 1, 2], 'train')
        split.set_array('test', np.array([3, 4, 5]))
        _, node = train_model.run_get_node(features, targets, split, orm.Dict(REFERENCE_ESTIMATOR))
        assert node.exit_status == 321

    def test_score_on_incompatible_features(self, features, lattice_targets):
        targets = lattice_targets['targets']
        split = split_rows(targets, seed=0)
        model = train_model(features, targets, split, orm.Dict(REFERENCE_ESTIMATOR))
        other = SparseFeatureMatrix(
            scipy.sparse.random_array((features.n_rows, 10), density=0.5, rng=np.random.default_rng(0)),
            descriptor={'name': 'soap', 'n_max': 9},
        ).store()
        _, node = score_model.run_get_node(model, other, targets, split)
        assert node.exit_status == 330
