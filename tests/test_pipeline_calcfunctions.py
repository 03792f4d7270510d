"""The learning steps as calcfunctions: featurize, targets, split, train, score; their exit codes and caching; and a
step that raises stays in the graph as an excepted process."""

from __future__ import annotations

import dataclasses
import pathlib
import typing as t

import h5py
import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import Process
from aiida.manage.caching import enable_caching
from dscribe.descriptors import SOAP

from aiida_mlworkbench.calcfunctions import clusters as clusters_module
from aiida_mlworkbench.calcfunctions import targets as targets_module
from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
from aiida_mlworkbench.calcfunctions.featurize import featurize
from aiida_mlworkbench.calcfunctions.score import score_model
from aiida_mlworkbench.calcfunctions.split import split_rows
from aiida_mlworkbench.calcfunctions.targets import host_lattice_targets, targets_from_values
from aiida_mlworkbench.calcfunctions.train import train_model
from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.descriptors import get_descriptor, get_descriptor_class
from aiida_mlworkbench.synthetic import EXTRA_LATTICE, create_synthetic_database, iter_synthetic_embeddings

SOAP_PARAMETERS = {'name': 'soap', 'r_cut': 5.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}
REFERENCE_ESTIMATOR = {
    'estimator': 'SVC',
    'parameters': {'kernel': 'linear'},
    'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
}
N_EMBEDDINGS = 60
N_EXTRACTED = 6  # embeddings extracted again where a test needs an extraction of its own


@pytest.fixture(scope='module')
def embeddings():
    group = create_synthetic_database(size=N_EMBEDDINGS, seed=11, group_label='tests/pipeline-calcfunctions')
    return list(iter_synthetic_embeddings(group))


@pytest.fixture(scope='module')
def clusters(embeddings) -> ImpurityClusters:
    return build_impurity_clusters(embeddings)


@pytest.fixture(scope='module')
def features(clusters) -> SparseFeatureMatrix:
    return featurize(clusters, orm.Dict(SOAP_PARAMETERS))


@pytest.fixture(scope='module')
def lattice_targets(clusters) -> dict[str, orm.ArrayData]:
    return host_lattice_targets(clusters)


def array(values, name='targets') -> orm.ArrayData:
    node = orm.ArrayData()
    node.set_array(name, np.asarray(values))
    return node


def count(node_class: type[orm.Node]) -> int:
    return orm.QueryBuilder().append(node_class).count()


def created(process: orm.ProcessNode) -> list[orm.Node]:
    return [link.node for link in process.base.links.get_outgoing(link_type=LinkType.CREATE).all()]


# -- featurize ------------------------------------------------------------------------------------------------------


class TestFeaturize:
    def test_equals_the_descriptor_run_directly(self, clusters, features):
        """Row i of the stored matrix is the descriptor of cluster i: the same CSR as the descriptor gives for
        ``clusters.get_atoms_list()`` outside any process."""
        atoms = clusters.get_atoms_list()
        descriptor = get_descriptor(SOAP_PARAMETERS).fit(atoms)
        expected = descriptor.create(atoms)
        stored = features.get_matrix()
        assert stored.shape == expected.shape == (len(clusters), descriptor.n_features)
        assert stored.dtype == expected.dtype
        np.testing.assert_array_equal(stored.indptr, expected.indptr)
        np.testing.assert_array_equal(stored.indices, expected.indices)
        np.testing.assert_array_equal(stored.data, expected.data)
        assert features.descriptor == descriptor.parameters

    def test_equals_dscribe_full_species_soap(self, clusters, features):
        """The species-aware SOAP stored in the matrix equals DScribe's own SOAP over the whole species list."""
        species = features.descriptor['species']
        reference = SOAP(species=species, r_cut=5.0, n_max=3, l_max=3, sigma=1.0, average='inner', sparse=True)
        expected = scipy.sparse.csr_array(reference.create(clusters.get_atoms_list()).to_scipy_sparse())
        stored = features.get_matrix()
        assert stored.shape == expected.shape
        assert abs(stored - expected).max() == 0.0

    def test_descriptor_recorded(self, clusters, features):
        assert features.descriptor['name'] == 'soap'
        assert features.descriptor['n_max'] == 3
        assert sorted(features.descriptor['species']) == sorted(clusters.species)
        assert features.n_rows == len(clusters) == N_EMBEDDINGS

    def test_rows_lead_back_to_the_embeddings(self, embeddings, clusters, features):
        """Row i of the matrix is row i of the clusters, whose key is the input link label of embedding i's
        impurity_info at the extraction: the graph leads from each row to the node aiida-kkr used."""
        process = features.creator
        assert process.process_label == 'featurize'
        assert process.base.links.get_incoming(link_label_filter='clusters').one().node.uuid == clusters.uuid
        extraction = clusters.creator
        assert extraction.process_label == 'extract_impurity_clusters'
        infos = {
            link.link_label.removeprefix('impurity_infos__'): link.node.uuid
            for link in extraction.base.links.get_incoming(link_label_filter='impurity_infos__%').all()
        }
        assert len(infos) == len(embeddings)
        for row, (_, impurity_info) in enumerate(embeddings):
            assert infos[clusters.keys[row]] == impurity_info.uuid

    def test_species_outside_list_names_the_row_and_key(self, clusters):
        first_species = set(clusters.get_ase(0).get_chemical_symbols())
        row = next(
            index
            for index, atoms in enumerate(clusters.get_atoms_list())
            if not set(atoms.get_chemical_symbols()) <= first_species
        )
        descriptor = orm.Dict({**SOAP_PARAMETERS, 'species': sorted(first_species)})
        result, node = featurize.run_get_node(clusters=clusters, descriptor=descriptor)
        assert node.exit_status == 341
        assert 'not in the descriptor species list' in node.exit_message
        assert f'row {row}, key `{clusters.keys[row]}`' in node.exit_message
        assert not result
        assert not created(node)

    @pytest.mark.parametrize(
        ('descriptor', 'words'),
        [
            pytest.param({'name': 'unknown'}, 'unknown', id='unknown-name'),
            pytest.param({**SOAP_PARAMETERS, 'n_max': 0}, 'n_max', id='n_max-zero'),
        ],
    )
    def test_invalid_descriptor(self, clusters, descriptor, words):
        _, node = featurize.run_get_node(clusters=clusters, descriptor=orm.Dict(descriptor))
        assert node.exit_status == 340
        assert words in node.exit_message
        assert not created(node)

    def test_caching_reuses_the_matrix(self, clusters):
        subset = clusters.subset(range(5)).store()
        descriptor = orm.Dict(SOAP_PARAMETERS).store()
        first, first_node = featurize.run_get_node(clusters=subset, descriptor=descriptor)
        with enable_caching():
            second, second_node = featurize.run_get_node(clusters=subset, descriptor=descriptor)
        assert second_node.base.caching.is_created_from_cache
        assert second_node.base.caching.get_cache_source() == first_node.uuid
        assert second.checksum == first.checksum
        assert second.base.repository.hash() == first.base.repository.hash()


# -- corrupted clusters: refused with an exit code, nothing created -------------------------------------------------

Arrays = dict[str, np.ndarray]


def _set(name: str, index: int, value: t.Any) -> t.Callable[[Arrays], None]:
    return lambda arrays: arrays[name].__setitem__(index, value)


@dataclasses.dataclass(frozen=True)
class Forgery:
    """A tampered cluster file: the valid arrays edited, or raw bytes instead of HDF5."""

    name: str
    message: str
    edit: t.Callable[[Arrays], None] = lambda arrays: None
    raw: bytes | None = None

    def __str__(self) -> str:
        return self.name


FORGERIES = [
    Forgery('not-hdf5', 'is not an HDF5 file', raw=b'\x89not hdf5\n' * 300),
    Forgery('positions-edited', 'content checksum mismatch', edit=_set('positions', 2, 1.0)),
    Forgery('host_of-out-of-range', 'names host 7', edit=_set('host_of', 1, 7)),
]


def forged_clusters(clusters: ImpurityClusters, forgery: Forgery, tmp_path: pathlib.Path) -> ImpurityClusters:
    """A stored node with the attributes of four valid clusters and a tampered file, stored as an archive import
    stores a node: without the node's own validation."""
    node = clusters.subset(range(4))
    path = tmp_path / 'forged.h5'
    if forgery.raw is not None:
        path.write_bytes(forgery.raw)
    else:
        with node.base.repository.open(ImpurityClusters.FILENAME, 'rb') as stream, h5py.File(stream, 'r') as handle:
            arrays = {name: handle[name][()] for name in handle}
            attributes = dict(handle.attrs)
        forgery.edit(arrays)
        with h5py.File(path, 'w', libver='earliest') as handle:
            handle.attrs.update(attributes)
            for name, values in arrays.items():
                handle.create_dataset(name, data=values, track_times=False)
    node.base.repository.put_object_from_file(str(path), ImpurityClusters.FILENAME)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImpurityClusters, '_validate', orm.Data._validate)
        node.store()
    return orm.load_node(node.pk)


CORRUPTED_CASES = [
    pytest.param(
        lambda node: featurize.run_get_node(clusters=node, descriptor=orm.Dict(SOAP_PARAMETERS)), 342, id='featurize'
    ),
    pytest.param(lambda node: host_lattice_targets.run_get_node(clusters=node), 356, id='host_lattice_targets'),
]


@pytest.mark.parametrize('forgery', FORGERIES, ids=str)
@pytest.mark.parametrize(('run', 'status'), CORRUPTED_CASES)
def test_corrupted_clusters_are_refused(clusters, forgery, run, status, tmp_path):
    """A clusters node whose file was tampered with fails the step with its exit code, naming the node and the
    problem, and the step creates nothing."""
    node = forged_clusters(clusters, forgery, tmp_path)
    result, process = run(node)
    assert process.is_finished
    assert process.exit_status == status, (process.exit_status, process.exit_message)
    assert f'ImpurityClusters<{node.pk}> is corrupted or was tampered with' in process.exit_message
    assert forgery.message in process.exit_message
    assert not result
    assert not created(process)


# -- a step that raises stays in the graph --------------------------------------------------------------------------


class UnexpectedStepError(RuntimeError):
    """The unexpected exception the steps below are made to raise."""


def _raise(*args: t.Any, **kwargs: t.Any) -> t.NoReturn:
    raise UnexpectedStepError('unexpected failure inside the step')


def _break_featurize(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_descriptor_class('soap'), 'iter_blocks', _raise)


def _break_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raise inside the extraction process only: the validation before it (which builds the same clusters) passes."""
    original = clusters_module.impurity_cluster

    def impurity_cluster(*args: t.Any, **kwargs: t.Any) -> t.Any:
        if Process.current() is not None:
            _raise()
        return original(*args, **kwargs)

    monkeypatch.setattr(clusters_module, 'impurity_cluster', impurity_cluster)


def _break_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets_module, 'classify_lattice', _raise)


@dataclasses.dataclass(frozen=True)
class RaisingStep:
    name: str
    process_label: str
    output_class: type[orm.Data]
    n_inputs: t.Callable[[list], int]
    breaks: t.Callable[[pytest.MonkeyPatch], None]
    run: t.Callable[[list, ImpurityClusters], t.Any]

    def __str__(self) -> str:
        return self.name


RAISING_STEPS = [
    RaisingStep(
        'featurize',
        'featurize',
        SparseFeatureMatrix,
        lambda embeddings: 2,
        _break_featurize,
        lambda embeddings, clusters: featurize(clusters, orm.Dict(SOAP_PARAMETERS)),
    ),
    RaisingStep(
        'build_impurity_clusters',
        'extract_impurity_clusters',
        ImpurityClusters,
        # every impurity_info, each distinct host once, and host_of
        lambda embeddings: N_EXTRACTED + len({host.uuid for host, _ in embeddings[:N_EXTRACTED]}) + 1,
        _break_extraction,
        lambda embeddings, clusters: build_impurity_clusters(embeddings[:N_EXTRACTED]),
    ),
    RaisingStep(
        'host_lattice_targets',
        'host_lattice_targets',
        orm.ArrayData,
        lambda embeddings: 2,  # clusters and the default symprec
        _break_targets,
        lambda embeddings, clusters: host_lattice_targets(clusters),
    ),
]


@pytest.mark.parametrize('step', RAISING_STEPS, ids=str)
def test_a_step_that_raises_leaves_its_excepted_process(embeddings, clusters, step, monkeypatch):
    """The exception reaches the caller, and the process node stays in the graph: excepted, with its inputs linked
    and the exception recorded, and no output stored."""
    query = orm.QueryBuilder().append(orm.CalcFunctionNode, project='id')
    before = max((pk for (pk,) in query.all()), default=0)
    n_outputs = count(step.output_class)
    step.breaks(monkeypatch)
    with pytest.raises(UnexpectedStepError, match='unexpected failure inside the step'):
        step.run(embeddings, clusters)
    monkeypatch.undo()

    query = orm.QueryBuilder().append(
        orm.CalcFunctionNode, filters={'id': {'>': before}, 'attributes.process_label': step.process_label}
    )
    assert query.count() == 1
    node = query.one()[0]
    assert node.is_excepted
    assert node.is_sealed
    assert 'unexpected failure inside the step' in node.exception
    assert len(node.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all()) == step.n_inputs(embeddings)
    assert not created(node)
    assert count(step.output_class) == n_outputs


# -- targets --------------------------------------------------------------------------------------------------------


class TestTargets:
    def test_host_lattice(self, embeddings, clusters, lattice_targets):
        targets = lattice_targets['targets'].get_array('targets')
        groups = lattice_targets['groups'].get_array('groups')
        assert len(targets) == len(groups) == len(clusters) == len(embeddings)
        assert set(targets) <= {'bcc', 'fcc', 'hcp'}
        for (host, _), label, group in zip(embeddings, targets, groups, strict=True):
            assert label == host.base.extras.get(EXTRA_LATTICE)
            assert group == host.get_formula(mode='hill_compact')

    def test_clusters_without_hosts(self, clusters):
        """Clusters made by hand, without their host crystals, have no host lattice: exit 350, nothing created."""
        node = ImpurityClusters(clusters.get_atoms_list(range(3))).store()
        result, process = host_lattice_targets.run_get_node(clusters=node)
        assert process.exit_status == 350
        assert 'records no host crystal' in process.exit_message
        assert not result
        assert not created(process)

    def test_values(self):
        assert targets_from_values(orm.List([1.0, 2, 3.5])).base.attributes.get('task') == 'regression'
        node = targets_from_values(orm.List(['a', 'b']))
        assert node.base.attributes.get('classes') == ['a', 'b']
        _, failed = targets_from_values.run_get_node(orm.List(['a', 1]))
        assert failed.exit_status == 352
        _, failed = targets_from_values.run_get_node(orm.List([]))
        assert failed.exit_status == 351


# -- split ----------------------------------------------------------------------------------------------------------


class TestSplit:
    def test_stratified_is_reproducible_and_keeps_proportions(self, lattice_targets):
        targets = lattice_targets['targets']
        first = split_rows(targets, test_fraction=0.25, seed=3)
        second = split_rows(targets, test_fraction=0.25, seed=3)
        other = split_rows(targets, test_fraction=0.25, seed=4)
        np.testing.assert_array_equal(first.get_array('test'), second.get_array('test'))
        assert not np.array_equal(first.get_array('test'), other.get_array('test'))
        train, test = first.get_array('train'), first.get_array('test')
        assert sorted(np.concatenate([train, test])) == list(range(N_EMBEDDINGS))
        labels = targets.get_array('targets')
        for label in set(labels):
            overall = np.mean(labels == label)
            assert abs(np.mean(labels[test] == label) - overall) < 0.1

    def test_grouped_split_keeps_hosts_on_one_side(self, lattice_targets):
        split = split_rows(lattice_targets['targets'], groups=lattice_targets['groups'], seed=1)
        groups = lattice_targets['groups'].get_array('groups')
        assert split.base.attributes.get('kind') == 'grouped'
        assert not set(groups[split.get_array('train')]) & set(groups[split.get_array('test')])

    @pytest.mark.parametrize('test_fraction', [1.0, 0.0])
    def test_test_fraction_out_of_range(self, lattice_targets, test_fraction):
        _, node = split_rows.run_get_node(lattice_targets['targets'], test_fraction=test_fraction)
        assert node.exit_status == 310

    def test_cannot_stratify_a_singleton_class(self):
        _, node = split_rows.run_get_node(array(['a', 'a', 'a', 'b']), test_fraction=0.5)
        assert node.exit_status == 311

    def test_groups_must_align(self):
        _, node = split_rows.run_get_node(array(['a', 'b', 'a', 'b']), groups=array(['x', 'y'], 'groups'))
        assert node.exit_status == 312
        _, node = split_rows.run_get_node(array(['a', 'b', 'a', 'b']), groups=array(['x'] * 4, 'groups'))
        assert node.exit_status == 313


# -- train and score ------------------------------------------------------------------------------------------------


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
