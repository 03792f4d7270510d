"""Forged numbers inside admitted objects: refused when the model is loaded, never handed to compiled code.

Every case here is a fitted model with one attribute changed the way a forger would (found by fuzzing every fitted
attribute of every estimator the package trains). Loading it runs in a subprocess, so that a regression shows as a
failed test instead of a killed pytest. ``test_forgery_is_real`` shows the cases marked ``CRASHES`` kill a plain
``pickle.loads`` + ``predict`` by a signal (or make OpenMP exit the interpreter); the others read outside their arrays
without a signal (seen with guard pages after every NumPy buffer) or break in a way that escapes ``score_model``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import pickle
import subprocess
import sys
import textwrap
import typing as t

import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from sklearn.base import is_classifier
from sklearn.tree._tree import Tree

from aiida_mlworkbench.calcfunctions.score import EXIT_CODES, score_model
from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.estimators import build_estimator
from aiida_mlworkbench.restricted_pickle import UnsafePickleError, check_fitted_state, restricted_loads

#: Run in a fresh interpreter: load the pickle (restricted, or plain to show the forgery is real), then predict.
RUNNER = textwrap.dedent(
    """
    import pickle, sys
    import scipy.sparse
    mode, model_path, features_path = sys.argv[1:4]
    blob = open(model_path, 'rb').read()
    features = scipy.sparse.csr_array(scipy.sparse.load_npz(features_path))
    if mode == 'restricted':
        from aiida_mlworkbench.restricted_pickle import UnsafePickleError, restricted_loads
        try:
            estimator = restricted_loads(blob, source='the forged model')
        except UnsafePickleError as exception:
            print('REFUSED', exception)
            sys.exit(0)
    else:
        estimator = pickle.loads(blob)
    print('LOADED', flush=True)
    for method in ('predict', 'decision_function', 'predict_proba'):
        if hasattr(estimator, method):
            try:
                getattr(estimator, method)(features)
            except Exception as exception:
                print(method, 'raised', type(exception).__name__, flush=True)
    print('PREDICTED', flush=True)
    """
)


@dataclasses.dataclass(frozen=True)
class Forgery:
    specification: dict[str, t.Any]
    forge: t.Callable[[t.Any], dict[int, tuple] | None]  # changes the model; may return forged Tree reductions
    estimator: str  # the class the refusal names
    attribute: str  # the attribute the refusal names
    crashes: bool = False  # plain pickle + predict dies (signal, or exit from the OpenMP runtime)
    n_classes: int = 3  # 0: regression
    message: str | None = None  # what the refusal says, if not `fitted <estimator>` and the attribute


def _set(name: str, value: t.Callable[[t.Any], t.Any]) -> t.Callable[[t.Any], None]:
    def forge(estimator: t.Any) -> None:
        setattr(_final(estimator), name, value(getattr(_final(estimator), name, None)))

    return forge


def _final(estimator: t.Any) -> t.Any:
    return estimator.steps[-1][1] if hasattr(estimator, 'steps') else estimator


def _first(value: int) -> t.Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        array[0] = value
        return array

    return change


def _scaler(name: str, value: t.Callable[[t.Any], t.Any]) -> t.Callable[[t.Any], None]:
    def forge(pipeline: t.Any) -> None:
        scaler = pipeline.steps[0][1]
        setattr(scaler, name, value(getattr(scaler, name)))

    return forge


def _tree_features(estimator: t.Any) -> dict[int, tuple]:
    """The first tree of the forest says one feature more than the model: its nodes may then split on feature 24."""
    tree = estimator.estimators_[0].tree_
    cls, (n_features, n_classes, n_outputs), state = tree.__reduce__()
    state = dict(state, nodes=state['nodes'].copy())
    state['nodes']['feature'][0] = n_features  # the root splits on the feature that the model does not have
    return {id(tree): (cls, (n_features + 1, n_classes, n_outputs), state)}


def _tree_outputs(estimator: t.Any) -> dict[int, tuple]:
    """The first tree of the forest says 10**12 outputs: its constructor would allocate 8 TB before any check."""
    tree = estimator.estimators_[0].tree_
    cls, (n_features, n_classes, _), state = tree.__reduce__()
    return {id(tree): (cls, (n_features, n_classes, 10**12), state)}


SVC = {'estimator': 'SVC'}
SOAP_SVC = {'estimator': 'SVC', 'kernel': {'name': 'soap', 'xi': 2}}
SVC_PROBA = {'estimator': 'SVC', 'parameters': {'probability': True, 'random_state': 0}}
KMEANS = {'estimator': 'MiniBatchKMeans', 'parameters': {'n_clusters': 3, 'random_state': 0, 'n_init': 1}}
FOREST = {'estimator': 'RandomForestClassifier', 'parameters': {'n_estimators': 3, 'random_state': 0}}

FORGERIES: dict[str, Forgery] = {
    # libsvm reads support vectors and coefficients by the per-class counts: sparse models are not checked by sklearn.
    'SVC _n_support empty': Forgery(SVC, _set('_n_support', lambda a: a[:0]), 'SVC', '_n_support', crashes=True),
    'SVC _n_support 2**31-1': Forgery(SVC, _set('_n_support', _first(2**31 - 1)), 'SVC', '_n_support', crashes=True),
    'SVC _n_support -2**31': Forgery(SVC, _set('_n_support', _first(-(2**31))), 'SVC', '_n_support', crashes=True),
    'SVR _n_support empty': Forgery(
        {'estimator': 'SVR'}, _set('_n_support', lambda a: a[:0]), 'SVR', '_n_support', crashes=True, n_classes=0
    ),
    'SVR _n_support one count': Forgery(
        {'estimator': 'SVR'}, _set('_n_support', lambda a: a[:1]), 'SVR', '_n_support', n_classes=0
    ),
    'NuSVC _dual_coef_ no rows': Forgery(
        {'estimator': 'NuSVC'}, _set('_dual_coef_', lambda m: m[:0]), 'NuSVC', '_dual_coef_', crashes=True
    ),
    'SVC binary _dual_coef_ no columns': Forgery(
        SVC, _set('_dual_coef_', lambda m: m[:, :0]), 'SVC', '_dual_coef_', crashes=True, n_classes=2
    ),
    'SVC _effective_probability without probabilities': Forgery(
        SVC, _set('_effective_probability', lambda _: True), 'SVC', '_probA', crashes=True
    ),
    'SVC _probA one short': Forgery(SVC_PROBA, _set('_probA', lambda a: a[:-1]), 'SVC', '_probA', n_classes=2),
    'SVC _probB empty': Forgery(SVC_PROBA, _set('_probB', lambda a: a[:0]), 'SVC', '_probB', crashes=True),
    # A callable kernel: libsvm indexes the kernel matrix (n_test x training rows) by support_.
    'SOAP SVC support_ 2**31-1': Forgery(
        SOAP_SVC, _set('support_', _first(2**31 - 1)), 'SVC', 'support_', crashes=True
    ),
    'SOAP SVR support_ beyond the rows': Forgery(
        {'estimator': 'SVR', 'kernel': {'name': 'soap'}},
        _set('support_', lambda a: a + a.size),
        'SVR',
        'support_',
        n_classes=0,
    ),
    'SOAP SVC _dual_coef_ one column short': Forgery(
        SOAP_SVC, _set('_dual_coef_', lambda a: np.ascontiguousarray(a[:, :-1])), 'SVC', '_dual_coef_'
    ),
    'SOAP SVC training rows one short': Forgery(
        SOAP_SVC, _set('_BaseLibSVM__Xfit', lambda m: m[:-1]), 'SVC', '_BaseLibSVM__Xfit'
    ),
    # Cython k-means assignment indexes the centres by the features' column indices; OpenMP takes _n_threads.
    'MiniBatchKMeans centres of one column': Forgery(
        KMEANS,
        _set('cluster_centers_', lambda a: np.ascontiguousarray(a[:, :1])),
        'MiniBatchKMeans',
        'cluster_centers_',
    ),
    'MiniBatchKMeans centres one column short': Forgery(
        KMEANS,
        _set('cluster_centers_', lambda a: np.ascontiguousarray(a[:, :-1])),
        'MiniBatchKMeans',
        'cluster_centers_',
    ),
    'MiniBatchKMeans _n_threads -1': Forgery(
        KMEANS, _set('_n_threads', lambda _: -1), 'MiniBatchKMeans', '_n_threads', crashes=True
    ),
    # Not signals, but outside what scikit-learn fits: a tree reading past its feature buffer (malloc, unguarded),
    # and errors that score_model would not turn into an exit code (AssertionError, OverflowError, AttributeError).
    'forest tree with a feature more': Forgery(FOREST, _tree_features, 'DecisionTreeClassifier', 'tree_'),
    'forest tree with 10**12 outputs': Forgery(
        FOREST, _tree_outputs, 'Tree', 'n_outputs', message='decision tree from the forged model: it has not one class'
    ),
    'StandardScaler scale_ one short': Forgery(
        {**SVC, 'scaler': 'StandardScaler'}, _scaler('scale_', lambda a: a[:-1]), 'StandardScaler', 'scale_'
    ),
    'MaxAbsScaler scale_ one short': Forgery(
        {**SVC, 'scaler': 'MaxAbsScaler'}, _scaler('scale_', lambda a: a[:-1]), 'MaxAbsScaler', 'scale_'
    ),
    'SVC degree 2**31': Forgery(SVC, _set('degree', lambda _: 2**31), 'SVC', 'degree'),
    'SVC _sparse flipped': Forgery(SVC, _set('_sparse', lambda _: False), 'SVC', 'support_vectors_'),
    'SVC _impl of another libsvm model': Forgery(SVC, _set('_impl', lambda _: 'epsilon_svr'), 'SVC', '_impl'),
}


@pytest.fixture(scope='module')
def data() -> dict[str, t.Any]:
    rng = np.random.default_rng(11)
    return {
        'train': scipy.sparse.random_array((48, 24), density=0.3, format='csr', rng=rng),
        'test': scipy.sparse.random_array((20, 24), density=0.3, format='csr', rng=rng),
        2: np.array(['bcc', 'fcc'])[rng.integers(0, 2, 48)],
        3: np.array(['bcc', 'fcc', 'hcp'])[rng.integers(0, 3, 48)],
        0: rng.random(48),
    }


def _fitted(forgery: Forgery, data: dict[str, t.Any]) -> t.Any:
    model = build_estimator(forgery.specification)
    n_classes = forgery.n_classes if is_classifier(_final(model)) or forgery.n_classes == 0 else 3
    return model.fit(data['train'], data[n_classes])


class _ForgingPickler(pickle.Pickler):
    def __init__(self, file: t.IO[bytes], trees: dict[int, tuple]) -> None:
        super().__init__(file, protocol=5)
        self.trees = trees

    def reducer_override(self, obj: t.Any) -> t.Any:
        if isinstance(obj, Tree) and id(obj) in self.trees:
            return self.trees[id(obj)]
        return NotImplemented


def _forged_pickle(forgery: Forgery, data: dict[str, t.Any]) -> bytes:
    model = copy.deepcopy(_fitted(forgery, data))
    trees = forgery.forge(model) or {}
    buffer = io.BytesIO()
    _ForgingPickler(buffer, trees).dump(model)
    return buffer.getvalue()


def _run(mode: str, blob: bytes, data: dict[str, t.Any], tmp_path: t.Any) -> subprocess.CompletedProcess:
    model_path, features_path = tmp_path / 'model.pkl', tmp_path / 'features.npz'
    model_path.write_bytes(blob)
    scipy.sparse.save_npz(features_path, scipy.sparse.csr_matrix(data['test']))
    return subprocess.run(
        [sys.executable, '-c', RUNNER, mode, str(model_path), str(features_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize('name', FORGERIES)
def test_forged_model_refused_at_load(name, data, tmp_path):
    forgery = FORGERIES[name]
    result = _run('restricted', _forged_pickle(forgery, data), data, tmp_path)
    assert result.returncode == 0, f'loading the forged model killed the interpreter ({result.returncode}): {result}'
    assert result.stdout.startswith('REFUSED'), f'the forged model was not refused: {result.stdout}'
    if forgery.message is None:
        assert f'fitted {forgery.estimator}' in result.stdout
        assert f'`{forgery.attribute}`' in result.stdout
    else:
        assert forgery.message in result.stdout
    assert 'the forged model' in result.stdout


@pytest.mark.parametrize('name', [name for name, forgery in FORGERIES.items() if forgery.crashes])
def test_forgery_is_real(name, data, tmp_path):
    """Without the checks the forged model kills the interpreter: the refusal above is what protects the user."""
    result = _run('plain', _forged_pickle(FORGERIES[name], data), data, tmp_path)
    assert 'LOADED' in result.stdout
    assert 'PREDICTED' not in result.stdout
    assert result.returncode < 0 or 'libgomp' in result.stderr, result


def _swapped_model(honest: t.Any, content: bytes) -> TrainedModel:
    """An unstored TrainedModel of ``honest`` with ``content`` as its pickle and a matching checksum: a forgery."""
    node = TrainedModel(honest)
    node.base.repository.put_object_from_bytes(content, TrainedModel.FILENAME)
    node.base.attributes.set('checksum', f'sha256:{hashlib.sha256(content).hexdigest()}')
    return node


@pytest.mark.parametrize('name', ['SVC _n_support empty', 'SVR _n_support empty', 'StandardScaler scale_ one short'])
def test_forged_node_refused_by_load_and_score_model(name, data):
    """The archive route: a stored node with a forged pickle and a matching checksum is refused, score_model exits."""
    forgery = FORGERIES[name]
    honest = _fitted(forgery, data)
    with pytest.raises(UnsafePickleError, match=f'`{forgery.attribute}`'):
        restricted_loads(_forged_pickle(forgery, data))  # refused at creation too: TrainedModel loads what it stores
    node = _swapped_model(honest, _forged_pickle(forgery, data)).store()
    loaded = orm.load_node(node.pk)
    with pytest.raises(UnsafePickleError, match=rf'TrainedModel<{node.pk}>.*`{forgery.attribute}`'):
        loaded.load()
    features = SparseFeatureMatrix(scipy.sparse.vstack([data['train'], data['test']]).tocsr()).store()
    targets = orm.ArrayData()
    labels = data[forgery.n_classes] if forgery.n_classes else data[0]
    targets.set_array('targets', np.concatenate([labels, labels[:20]]))
    split = orm.ArrayData()
    split.set_array('train', np.arange(48))
    split.set_array('test', np.arange(48, 68))
    _, process = score_model.run_get_node(model=loaded, features=features, targets=targets.store(), split=split.store())
    assert process.exit_status == EXIT_CODES['unsafe_model'].status
    assert forgery.attribute in process.exit_message


def _legitimate_models(data: dict[str, t.Any]) -> t.Iterator[t.Any]:
    """Fitted models outside the package's own specifications that the checks must still accept."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.svm import SVC, SVR

    train, labels = data['train'], data[3]
    yield SVC().fit(train.toarray(), labels)  # dense
    yield SVC().fit(scipy.sparse.csr_matrix(train.astype(np.float32)), labels)  # float32, csr_matrix
    yield SVC(probability=True, random_state=0).fit(train, data[2])
    yield SVC(kernel='precomputed').fit((train @ train.T).toarray(), labels)
    yield SVR().fit(train.toarray(), data[0])
    yield SVC(kernel='linear', C=1e-9).fit(train, data[2])  # all coefficients at the bound
    two_outputs = np.stack([labels, np.roll(labels, 1)], axis=1)
    yield RandomForestClassifier(n_estimators=2, random_state=0).fit(train, two_outputs)
    yield RandomForestRegressor(n_estimators=2, random_state=0).fit(train, np.stack([data[0], data[0]], axis=1))
    kmeans = build_estimator(KMEANS)
    yield kmeans.fit(train.astype(np.float32))
    yield kmeans.partial_fit(train.astype(np.float32))


def test_legitimate_models_pass(data):
    for model in _legitimate_models(data):
        check_fitted_state(model)
        restricted_loads(pickle.dumps(model, protocol=5))
