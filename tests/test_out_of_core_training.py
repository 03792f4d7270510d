"""Out-of-core training: ``partial_fit`` on blocks streamed from the HDF5 feature file, and its progress reports."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from aiida_mlworkbench.calcfunctions.score import score_model
from aiida_mlworkbench.calcfunctions.split import split_rows
from aiida_mlworkbench.calcfunctions.train import train_model
from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel, trained_model
from aiida_mlworkbench.estimators import validate_estimator_specification
from aiida_mlworkbench.progress import progress

N_ROWS = 300
N_FEATURES = 3000
CLASSES = ('bcc', 'fcc', 'hcp')
BLOCK_SIZE = 32


def incremental(estimator: str = 'SGDClassifier', scaler: str | None = 'StandardScaler', **training) -> dict:
    parameters = {'random_state': 0} if estimator.startswith('SGD') else {}
    specification = {
        'estimator': estimator,
        'parameters': parameters,
        'training': {'mode': 'incremental', 'block_size': BLOCK_SIZE, **training},
    }
    if scaler:
        specification['scaler'] = {
            'name': scaler,
            'parameters': {'with_mean': False} if scaler == 'StandardScaler' else {},
        }
    return specification


@pytest.fixture(scope='module')
def data() -> tuple[SparseFeatureMatrix, orm.ArrayData, orm.ArrayData]:
    """Separable sparse data: each class lights up some of its own 100 columns, plus noise anywhere (non-negative)."""
    rng = np.random.default_rng(42)
    labels = rng.choice(len(CLASSES), size=N_ROWS)
    rows, columns, values = [], [], []
    for row, label in enumerate(labels):
        signal = label * 1000 + rng.choice(100, size=20, replace=False)
        noise = rng.choice(N_FEATURES, size=40, replace=False)
        picked = np.concatenate([signal, noise])
        rows += [row] * picked.size
        columns += list(picked)
        values += list(np.concatenate([rng.uniform(0.5, 1.5, 20), rng.uniform(0.0, 0.5, 40)]))
    matrix = scipy.sparse.coo_array((values, (rows, columns)), shape=(N_ROWS, N_FEATURES)).tocsr()
    features = SparseFeatureMatrix(matrix, descriptor={'name': 'synthetic-separable'}).store()
    targets = orm.ArrayData()
    targets.set_array('targets', np.array(CLASSES)[labels])
    targets.store()
    return features, targets, split_rows(targets, seed=0)


@pytest.fixture
def rows_read(monkeypatch) -> list[int]:
    """Record how many rows of the file each ``SparseFeatureMatrix.get_rows`` call reads; forbid ``get_matrix``."""
    counts: list[int] = []
    get_rows = SparseFeatureMatrix.get_rows

    def spy(self, rows):
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.n_rows)
            counts.append(stop - start)
        else:
            rows = np.asarray(rows)
            counts.append(int(rows.max() - rows.min() + 1) if rows.size else 0)
        return get_rows(self, rows)

    def no_full_read(self, *args, **kwargs):
        raise AssertionError('the whole matrix was read')

    monkeypatch.setattr(SparseFeatureMatrix, 'get_rows', spy)
    monkeypatch.setattr(SparseFeatureMatrix, 'get_matrix', no_full_read)
    return counts


class TestIncrementalTraining:
    def test_sgd_learns_separable_data(self, data):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(epochs=3)))
        assert isinstance(model, TrainedModel)
        assert model.base.attributes.get('final_estimator_class') == 'sklearn.linear_model.SGDClassifier'
        assert model.base.attributes.get('training') == {
            'mode': 'incremental',
            'epochs': 3,
            'block_size': BLOCK_SIZE,
            'shuffle_seed': 0,
        }
        assert model.classes == sorted(CLASSES)
        outputs = score_model(model, features, targets, split)
        assert outputs['score'].value > 0.9  # chance is 1/3
        assert outputs['metrics']['train_accuracy'] > 0.9

    def test_reads_at_most_one_block_of_rows_at_once(self, data, rows_read):
        features, targets, split = data
        _, node = train_model.run_get_node(features, targets, split, orm.Dict(incremental(epochs=2)))
        assert node.is_finished_ok
        n_train = split.get_array('train').size
        # One scaler pass and two epochs, each through all train rows in blocks of at most BLOCK_SIZE file rows.
        assert max(rows_read) <= BLOCK_SIZE
        assert len(rows_read) >= 3 * np.ceil(n_train / BLOCK_SIZE)

    def test_is_reproducible(self, data):
        features, targets, split = data
        specification = orm.Dict(incremental(epochs=2)).store()
        first = train_model(features, targets, split, specification).load()
        second = train_model(features, targets, split, specification).load()
        np.testing.assert_array_equal(first[-1].coef_, second[-1].coef_)

    @pytest.mark.parametrize(
        ('scaler', 'reference'), [('StandardScaler', StandardScaler), ('MaxAbsScaler', MaxAbsScaler)]
    )
    def test_scaler_equals_a_fit_on_all_train_rows(self, data, scaler, reference):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(scaler=scaler, epochs=1))).load()
        train_rows = features.get_rows(split.get_array('train'))
        expected = (reference(with_mean=False) if scaler == 'StandardScaler' else reference()).fit(train_rows)
        fitted = model.named_steps['scaler']
        np.testing.assert_allclose(fitted.scale_, expected.scale_)
        if scaler == 'StandardScaler':
            np.testing.assert_allclose(fitted.var_, expected.var_, atol=1e-12)
            assert fitted.n_samples_seen_ == expected.n_samples_seen_ == train_rows.shape[0]
        else:
            np.testing.assert_allclose(fitted.max_abs_, expected.max_abs_)

    def test_stateless_normalizer(self, data):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(scaler='Normalizer', epochs=2)))
        assert score_model(model, features, targets, split)['score'].value > 0.9

    def test_naive_bayes_equals_fit(self, data):
        """MultinomialNB's partial_fit over the blocks, with the classes from the targets, is exactly its fit."""
        features, targets, split = data
        streamed = train_model(features, targets, split, orm.Dict(incremental('MultinomialNB', scaler=None))).load()
        in_memory = train_model(features, targets, split, orm.Dict({'estimator': 'MultinomialNB'})).load()
        np.testing.assert_allclose(streamed.feature_log_prob_, in_memory.feature_log_prob_)
        np.testing.assert_array_equal(streamed.classes_, in_memory.classes_)

    @pytest.mark.parametrize(('estimator', 'scaler'), [('Perceptron', 'MaxAbsScaler'), ('BernoulliNB', None)])
    def test_other_classifiers(self, data, estimator, scaler):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(estimator, scaler=scaler)))
        assert score_model(model, features, targets, split)['score'].value > 0.9

    def test_clustering(self, data):
        features, targets, split = data
        specification = incremental('MiniBatchKMeans', scaler=None)
        specification['parameters'] = {'n_clusters': len(CLASSES), 'random_state': 0, 'n_init': 1}
        model = train_model(features, targets, split, orm.Dict(specification))
        assert model.base.attributes.get('task') == 'other'
        assert model.load().cluster_centers_.shape == (len(CLASSES), N_FEATURES)

    def test_regression(self, data):
        features, _, _ = data
        values = features.get_rows(slice(0, N_ROWS))[:, :100].sum(axis=1)  # depends on the features: learnable
        targets = orm.ArrayData()
        targets.set_array('targets', np.asarray(values, dtype=float))
        split = split_rows(targets, stratify=False)
        model = train_model(
            features, targets, split, orm.Dict(incremental('SGDRegressor', scaler='MaxAbsScaler', epochs=20))
        )
        assert model.base.attributes.get('task') == 'regression'
        assert score_model(model, features, targets, split)['score'].value > 0.5

    def test_in_memory_remains_the_default(self, data):
        features, targets, split = data
        specification = {'estimator': 'SGDClassifier', 'parameters': {'random_state': 0}}
        model = train_model(features, targets, split, orm.Dict(specification))
        assert model.base.attributes.get('training') == {'mode': 'in_memory'}

    def test_fit_failure_is_reported(self, data):
        """MultinomialNB refuses negative features: exit code 323 names the estimator and scikit-learn's reason."""
        features, targets, split = data
        negative = SparseFeatureMatrix(-features.get_matrix(), descriptor=features.descriptor).store()
        _, node = train_model.run_get_node(negative, targets, split, orm.Dict(incremental('MultinomialNB', None)))
        assert node.exit_status == 323
        assert 'MultinomialNB' in node.exit_message
        assert 'Negative values' in node.exit_message


class TestSpecification:
    @pytest.mark.parametrize(
        ('specification', 'message'),
        [
            (
                {'estimator': 'SVC', 'training': {'mode': 'incremental'}},
                'SVC cannot be trained incrementally (it has no partial_fit)',
            ),
            ({'estimator': 'SGDClassifier', 'training': {'mode': 'streaming'}}, "unknown training mode 'streaming'"),
            (
                {'estimator': 'SGDClassifier', 'training': {'mode': 'incremental', 'epochs': 0}},
                'training epochs must be a positive integer, got 0',
            ),
            (
                {'estimator': 'SGDClassifier', 'training': {'mode': 'incremental', 'block_size': 2.5}},
                'training block_size must be a positive integer',
            ),
            (
                {'estimator': 'SGDClassifier', 'training': {'mode': 'incremental', 'shuffle_seed': -1}},
                'shuffle_seed must be a non-negative integer or None',
            ),
            (
                {'estimator': 'SGDClassifier', 'training': {'mode': 'incremental', 'batch': 10}},
                "unknown training key(s) 'batch'",
            ),
            ({'estimator': 'SGDClassifier', 'training': {'epochs': 3}}, "apply only to mode 'incremental'"),
            ({'estimator': 'MultinomialNB', 'training': {'mode': 'incremental', 'epochs': 2}}, 'use epochs 1'),
            (
                {
                    'estimator': 'SGDClassifier',
                    'parameters': {'early_stopping': True},
                    'training': {'mode': 'incremental'},
                },
                'early_stopping needs the whole train set',
            ),
            (
                {
                    'estimator': 'SGDClassifier',
                    'parameters': {'class_weight': 'balanced'},
                    'training': {'mode': 'incremental'},
                },
                "class_weight 'balanced' needs the whole train set",
            ),
            ({'estimator': 'SGDClassifier', 'training': 'incremental'}, 'training must be a dictionary'),
        ],
    )
    def test_invalid_training_is_refused(self, specification, message):
        assert message in validate_estimator_specification(specification)

    def test_incremental_svc_is_refused_before_reading_features(self, data, rows_read):
        features, targets, split = data
        specification = {'estimator': 'SVC', 'parameters': {'kernel': 'linear'}, 'training': {'mode': 'incremental'}}
        result, node = train_model.run_get_node(features, targets, split, orm.Dict(specification))
        assert node.exit_status == 320
        assert 'SVC cannot be trained incrementally (it has no partial_fit)' in node.exit_message
        assert not result
        assert rows_read == []

    def test_defaults(self):
        from aiida_mlworkbench.estimators import training_options

        assert training_options({'estimator': 'SGDClassifier', 'training': {'mode': 'incremental'}}).as_dict() == {
            'mode': 'incremental',
            'epochs': 5,
            'block_size': 1024,
            'shuffle_seed': 0,
        }
        assert training_options({'estimator': 'BernoulliNB', 'training': {'mode': 'incremental'}}).epochs == 1
        assert training_options({'estimator': 'SVC'}).as_dict() == {'mode': 'in_memory'}


class TestBlockwisePrediction:
    def test_rows_in_any_order_read_in_blocks(self, data, rows_read):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(epochs=1)))
        rows = np.array([250, 3, 3, 120, -1, 7, 299, 0])
        rows_read.clear()
        predicted = model.predict(features, rows=rows, block_size=16)
        assert max(rows_read) <= 16
        expected = model.load().predict(features.get_rows(slice(0, N_ROWS)))
        np.testing.assert_array_equal(predicted, expected[rows])

    def test_score_model_reads_in_blocks(self, data, rows_read, monkeypatch):
        features, targets, split = data
        model = train_model(features, targets, split, orm.Dict(incremental(epochs=1)))
        monkeypatch.setattr(trained_model, 'PREDICT_BLOCK_SIZE', 8)
        rows_read.clear()
        score_model(model, features, targets, split)
        assert rows_read
        assert max(rows_read) <= 8


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestProgress:
    def test_reports_into_the_process_log(self, data, monkeypatch):
        monkeypatch.setattr(sys, 'stderr', io.StringIO())  # not a terminal
        features, targets, split = data
        _, node = train_model.run_get_node(features, targets, split, orm.Dict(incremental(epochs=2)))
        assert node.is_finished_ok
        messages = [log.message for log in orm.Log.collection.get_logs_for(node)]
        # Lines look like '[pk|train_model|_report_progress]: training SGDClassifier (2 epochs of 10 blocks): 10% ...'
        progress_lines = [message for message in messages if 'training SGDClassifier (2 epochs of ' in message]
        assert any('10%' in message for message in progress_lines), messages
        assert any('90%' in message for message in progress_lines), messages
        assert ': done, ' in progress_lines[-1]
        assert len(progress_lines) <= 11  # every 10 %, and the end
        assert sys.stderr.getvalue() == ''

    def test_progress_bar_on_a_terminal(self, monkeypatch):
        terminal = _Terminal()
        monkeypatch.setattr(sys, 'stderr', terminal)
        assert list(progress(range(5), description='counting')) == [0, 1, 2, 3, 4]
        assert 'counting' in terminal.getvalue()
        assert '5/5' in terminal.getvalue()

    def test_silent_outside_a_process(self, monkeypatch, capsys):
        monkeypatch.setattr(sys, 'stderr', io.StringIO())
        assert list(progress(iter(range(3)), description='counting')) == [0, 1, 2]
        assert sys.stderr.getvalue() == ''
        assert capsys.readouterr().out == ''
