"""Tests for :class:`aiida_mlworkbench.data.TrainedModel` and the restricted unpickler behind it."""

from __future__ import annotations

import copy
import hashlib
import os
import pickle

import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from sklearn.cluster import MiniBatchKMeans
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aiida_mlworkbench.data import (
    CorruptedModelError,
    IncompatibleFeaturesError,
    ModelVersionWarning,
    SparseFeatureMatrix,
    TrainedModel,
)
from aiida_mlworkbench.restricted_pickle import UnsafePickleError

DESCRIPTOR = {'name': 'soap', 'n_max': 5, 'l_max': 5, 'species': ['Cu', 'Fe']}


@pytest.fixture(scope='module')
def dataset():
    rng = np.random.default_rng(7)
    features = scipy.sparse.random_array((120, 60), density=0.2, format='csr', rng=rng)
    labels = np.array(['bcc', 'fcc', 'hcp'])[rng.integers(0, 3, 120)]
    return features, labels


@pytest.fixture(scope='module')
def reference_pipeline(dataset):
    """The reference setting: standard scaling without centring and a linear SVM."""
    features, labels = dataset
    return make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear')).fit(features, labels)


class TestTrainedModel:
    def test_metadata(self, reference_pipeline):
        node = TrainedModel(reference_pipeline, descriptor=DESCRIPTOR).store()
        assert node.estimator_class == 'sklearn.pipeline.Pipeline'
        assert node.base.attributes.get('final_estimator_class') == 'sklearn.svm.SVC'
        assert [step['class'] for step in node.base.attributes.get('steps')] == [
            'sklearn.preprocessing.StandardScaler',
            'sklearn.svm.SVC',
        ]
        assert node.base.attributes.get('final_estimator_hyperparameters')['kernel'] == 'linear'
        assert node.base.attributes.get('task') == 'classification'
        assert node.n_features_in == 60
        assert node.classes == ['bcc', 'fcc', 'hcp']
        assert node.descriptor == DESCRIPTOR
        assert set(node.versions) == {'python', 'sklearn', 'numpy', 'scipy'}
        content = node.base.repository.get_object_content(TrainedModel.FILENAME, 'rb')
        assert node.checksum == f'sha256:{hashlib.sha256(content).hexdigest()}'

    def test_load_predicts_the_same(self, reference_pipeline, dataset):
        features, _ = dataset
        node = TrainedModel(reference_pipeline).store()
        loaded = orm.load_node(node.pk).load()
        np.testing.assert_array_equal(loaded.predict(features), reference_pipeline.predict(features))

    @pytest.mark.parametrize(
        'estimator',
        [
            SGDClassifier(random_state=np.random.RandomState(0)),
            RandomForestClassifier(n_estimators=3, random_state=0),
            SGDRegressor(random_state=0),
            MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0),
        ],
        ids=lambda estimator: type(estimator).__name__,
    )
    def test_common_estimators_load_through_the_restricted_loader(self, estimator, dataset):
        features, labels = dataset
        target = labels if not isinstance(estimator, SGDRegressor) else np.arange(len(labels), dtype=float)
        estimator.fit(features, target)
        node = TrainedModel(estimator).store()
        np.testing.assert_array_equal(orm.load_node(node.pk).load().predict(features), estimator.predict(features))

    def test_unfitted_refused(self):
        before = orm.QueryBuilder().append(TrainedModel).count()
        with pytest.raises(ValueError, match='SVC estimator is not fitted'):
            TrainedModel(SVC())
        with pytest.raises(TypeError, match='expected a scikit-learn estimator'):
            TrainedModel(object())
        with pytest.raises(ValueError, match='holds no estimator'):
            TrainedModel().store()
        assert orm.QueryBuilder().append(TrainedModel).count() == before

    def test_predict_on_feature_matrix(self, reference_pipeline, dataset):
        features, _ = dataset
        model = TrainedModel(reference_pipeline, descriptor=DESCRIPTOR).store()
        matrix = SparseFeatureMatrix(features, descriptor=DESCRIPTOR).store()
        expected = reference_pipeline.predict(features)
        np.testing.assert_array_equal(model.predict(matrix, block_size=32), expected)
        np.testing.assert_array_equal(model.predict(matrix, rows=slice(10, 20)), expected[10:20])
        np.testing.assert_array_equal(model.predict(matrix, rows=[5, 1]), expected[[5, 1]])

    def test_predict_on_incompatible_features(self, reference_pipeline, dataset):
        features, _ = dataset
        model = TrainedModel(reference_pipeline, descriptor=DESCRIPTOR).store()
        other_descriptor = SparseFeatureMatrix(features, descriptor={**DESCRIPTOR, 'n_max': 9}).store()
        with pytest.raises(IncompatibleFeaturesError, match='differing parameters: n_max'):
            model.predict(other_descriptor)
        narrow = SparseFeatureMatrix(features[:, :50], descriptor=DESCRIPTOR).store()
        with pytest.raises(IncompatibleFeaturesError, match='trained on 60 features but got 50'):
            model.predict(narrow)

    def test_version_mismatch_warns(self, reference_pipeline):
        node = TrainedModel(reference_pipeline)
        node.base.attributes.set('versions', {**node.versions, 'sklearn': '0.24.2'})
        node.store()
        with pytest.warns(ModelVersionWarning, match=r'sklearn 0\.24\.2 \(saved\)'):
            node.load()

    def test_tampered_pickle_detected_before_unpickling(self, reference_pipeline, tmp_path):
        from aiida.manage import get_manager

        # Other bytes than the other tests' models: overwriting the shared repository object would damage them too.
        estimator = copy.deepcopy(reference_pipeline)
        estimator.test_tag = 'tampered'
        node = TrainedModel(estimator).store()
        key = node.base.repository.metadata['o'][TrainedModel.FILENAME]['k']
        path = get_manager().get_profile_storage().get_repository()._container._get_loose_path_from_hashkey(key)
        path.chmod(0o644)
        marker = tmp_path / 'pwned'
        path.write_bytes(pickle.dumps(Payload(os.system, f'touch {marker}')))
        with pytest.raises(CorruptedModelError, match='does not match its checksum'):
            orm.load_node(node.pk).load()
        assert not marker.exists()

    def test_query_by_class(self, aiida_profile_clean, reference_pipeline, dataset):
        features, labels = dataset
        svm = TrainedModel(reference_pipeline).store()
        sgd = TrainedModel(SGDClassifier(random_state=0).fit(features, labels)).store()
        query = orm.QueryBuilder().append(
            TrainedModel, filters={'attributes.final_estimator_class': 'sklearn.svm.SVC'}, project='id'
        )
        assert query.all(flat=True) == [svm.pk]
        query = orm.QueryBuilder().append(
            TrainedModel, filters={'attributes.estimator_class': {'like': 'sklearn.linear_model.%'}}, project='id'
        )
        assert query.all(flat=True) == [sgd.pk]
        query = orm.QueryBuilder().append(TrainedModel, filters={'attributes.n_features_in': 60}, project='id')
        assert sorted(query.all(flat=True)) == sorted([svm.pk, sgd.pk])

    def test_entry_point(self):
        from aiida.plugins import DataFactory

        assert DataFactory('mlworkbench.trained_model') is TrainedModel


class Payload:
    """Pickles into a call of ``function(*arguments)``: what a malicious model file does."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


class TestRestrictedLoading:
    """Node-level refusal; the payloads, tables and forged states are in ``test_restricted_pickle.py``."""

    def test_malicious_model_node_refused(self, reference_pipeline, tmp_path):
        """A forged archive can carry a matching checksum: the unpickler is the last line of defence."""
        marker = tmp_path / 'pwned'
        payload = pickle.dumps(Payload(os.system, f'touch {marker}'))
        node = TrainedModel(reference_pipeline)
        node.base.repository.put_object_from_bytes(payload, TrainedModel.FILENAME)
        node.base.attributes.set('checksum', f'sha256:{hashlib.sha256(payload).hexdigest()}')
        node.store()
        with pytest.raises(UnsafePickleError, match=r'TrainedModel<\d+>'):
            orm.load_node(node.pk).load()
        assert not marker.exists()
