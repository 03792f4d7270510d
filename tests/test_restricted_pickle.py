"""Loading a model never runs code: the restricted unpickler's tables, real payloads, and ``score_model``'s exit codes.

Every payload here is a real attack: plain ``pickle.loads`` runs it (``test_payload_is_real``), and each writes into
the test's own folder, so "the marker file does not exist" is what proves the restricted loader protected the user.
"""

from __future__ import annotations

import builtins
import copy
import functools
import hashlib
import importlib
import inspect
import os
import pathlib
import pickle
import re
import struct
import subprocess
import typing as t

import numpy as np
import pytest
import scipy.sparse
import scipy.stats
from aiida import orm
from aiida.manage import get_manager
from aiida.tools.archive import create_archive, import_archive
from sklearn.base import is_classifier, is_regressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aiida_mlworkbench.calcfunctions.score import EXIT_CODES, score_model
from aiida_mlworkbench.data import CorruptedModelError, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.estimators import (
    ESTIMATORS,
    INCREMENTAL_ESTIMATORS,
    KERNEL_ESTIMATORS,
    SCALERS,
    build_estimator,
)
from aiida_mlworkbench.restricted_pickle import (
    ADMITTED_CLASSES,
    NOT_CALLABLE,
    RECONSTRUCTORS,
    SAFE_BUILTINS,
    UnsafePickleError,
    restricted_loads,
)

# -- the tables ---------------------------------------------------------------------------------------------------

#: Modules whose classes or functions can run code, import modules, or touch files and processes: none of their
#: names may be admitted.
CODE_RUNNING_MODULES = (
    'builtins',
    'os',
    'posix',
    'nt',
    'subprocess',
    'importlib',
    'functools',
    'operator',
    'pickle',
    '_pickle',
    'copyreg',
    'io',
    '_io',
    'shutil',
    'sys',
    'runpy',
    'code',
    'codeop',
    'ctypes',
    'tempfile',
    'pathlib',
    'socket',
    'urllib',
    'multiprocessing',
    'threading',
    'joblib',
    'threadpoolctl',
    'scipy.stats',
    'scipy.io',
    'scipy.datasets',
    'scipy._lib',
    'numpy.testing',
    'numpy.lib._datasource',
    'numpy.lib._npyio_impl',
    'numpy.lib.format',
    'numpy.lib._format_impl',
    'numpy._core.memmap',
    'numpy.ctypeslib',
    'numpy.f2py',
    'sklearn.datasets',
    'sklearn.utils',
    'sklearn.externals',
)

#: What the reconstructor table was reviewed as; a change to the table must change this test.
REVIEWED_RECONSTRUCTORS = {
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy._core.numeric', '_frombuffer'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy.random._pickle', '__randomstate_ctor'),
    ('numpy.random._pickle', '__bit_generator_ctor'),
    ('numpy.random.bit_generator', '__pyx_unpickle_SeedSequence'),
}


def _within(module: str, packages: t.Iterable[str]) -> bool:
    return any(module == package or module.startswith(f'{package}.') for package in packages)


def _resolve(module: str, name: str) -> t.Any:
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize('pair', sorted(ADMITTED_CLASSES), ids='.'.join)
def test_admitted_name_is_a_class_of_a_module_that_runs_no_code(pair):
    """Each admitted name is a class (not a function), defined where the pickle names it, in no code-running module."""
    import io

    module, name = pair
    assert '.' not in name
    obj = _resolve(module, name)
    assert isinstance(obj, type), f'{module}.{name} is a {type(obj).__name__}, not a class'
    assert (obj.__module__, obj.__qualname__) == pair, f'{module}.{name} is a re-export of {obj.__module__}'
    assert not _within(module, CODE_RUNNING_MODULES)
    assert not issubclass(obj, (np.memmap, io.IOBase, scipy.stats.rv_continuous, scipy.stats.rv_discrete))
    for klass in obj.__mro__:
        assert not _within(klass.__module__, ('scipy.stats',)), f'{module}.{name} inherits from {klass}'


def test_every_table_entry_is_reviewed():
    assert set(RECONSTRUCTORS) == REVIEWED_RECONSTRUCTORS
    for pair, reason in RECONSTRUCTORS.items():
        obj = _resolve(*pair)
        assert callable(obj), f'{pair} is not callable'
        assert not isinstance(obj, type), f'{pair} is a class, not a function'
        assert len(reason) > 20, f'{pair} has no reason'
    assert NOT_CALLABLE <= ADMITTED_CLASSES
    for module, name in SAFE_BUILTINS:
        assert module in ('builtins', 'collections')
        assert isinstance(_resolve(module, name), type)
        assert name not in ('eval', 'exec', 'getattr', 'setattr', '__import__', 'open', 'compile', 'type')
    assert not ADMITTED_CLASSES & SAFE_BUILTINS


def test_allow_list_covers_every_estimator_the_package_can_build():
    from aiida_mlworkbench.estimators import NormalizedSoapKernel

    paths = [*ESTIMATORS.values(), *SCALERS.values(), 'sklearn.pipeline.Pipeline']
    classes = [_resolve(*path.rsplit('.', 1)) for path in paths] + [NormalizedSoapKernel]
    missing = [cls for cls in classes if (cls.__module__, cls.__qualname__) not in ADMITTED_CLASSES]
    assert not missing


# -- building payloads --------------------------------------------------------------------------------------------


class Payload:
    """Pickles into a call of ``function(*arguments)``: what a malicious model file does."""

    def __init__(self, function: t.Any, *arguments: t.Any) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self) -> tuple:
        return self.function, self.arguments


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack('<I', len(data)) + data


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + pickle.STACK_GLOBAL


def _call(function: bytes, *arguments: bytes) -> bytes:
    return function + pickle.MARK + b''.join(arguments) + pickle.TUPLE + pickle.REDUCE


def _program(body: bytes) -> bytes:
    """A protocol-4 pickle (dotted names resolve) of ``body``."""
    return pickle.PROTO + bytes([4]) + body + pickle.STOP


def _import_then_getattr(importer: bytes, command: str) -> bytes:
    """``getattr(importer('os'), 'system')(command)``, with ``importer`` named first (so it is the first global)."""
    module = _call(importer, _text('os')) + pickle.MEMOIZE + pickle.POP
    system = _call(_global('builtins', 'getattr'), pickle.BINGET + bytes([0]), _text('system'))
    return _program(module + _call(system, _text(command)))


def _evil_distribution(distribution: t.Any, marker: pathlib.Path) -> t.Any:
    """A copy of a scipy.stats distribution whose pickled argument parser first writes ``marker`` (then still works)."""
    evil = copy.deepcopy(distribution)
    evil._parse_arg_template = f'open({str(marker)!r}, "w").close()\n' + evil._parse_arg_template
    return evil


def _scipy_stats_object(kind: str, marker: pathlib.Path) -> t.Any:
    if kind == 'continuous':
        return _evil_distribution(scipy.stats.norm, marker)
    if kind == 'discrete':
        return _evil_distribution(scipy.stats.poisson, marker)
    frozen = scipy.stats.norm(loc=1.0, scale=2.0)
    frozen.dist = _evil_distribution(frozen.dist, marker)
    return frozen


SCIPY_STATS_KINDS = {
    'continuous': 'scipy.stats._continuous_distns.norm_gen',
    'discrete': 'scipy.stats._discrete_distns.poisson_gen',
    'frozen': 'scipy.stats._distn_infrastructure.rv_continuous_frozen',
}


def _fitted_svc() -> SVC:
    rng = np.random.default_rng(0)
    return SVC(kernel='linear').fit(rng.random((6, 2)), [0, 1] * 3)


def _payload(name: str, marker: pathlib.Path) -> bytes:
    """The pickle of payload ``name``; run by plain pickle, it creates ``marker`` (or a file next to it)."""
    command = f'touch {marker}'
    write = f'open({str(marker)!r}, "w").close()'
    touch = ['touch', str(marker)]
    if name == 'os.system':
        return pickle.dumps(Payload(os.system, command))
    if name == 'subprocess.Popen':
        return pickle.dumps(Payload(subprocess.Popen, touch))
    if name == 'subprocess.check_output':
        return pickle.dumps(Payload(subprocess.check_output, touch))
    if name == 'builtins.eval':
        return pickle.dumps(Payload(builtins.eval, write))
    if name == 'builtins.exec':
        return pickle.dumps(Payload(builtins.exec, write))
    if name == 'builtins.getattr':
        os_module = _call(_global('builtins', '__import__'), _text('os'))
        system = _call(_global('builtins', 'getattr'), os_module, _text('system'))
        return _program(_call(system, _text(command)))
    if name == 'builtins.__import__':
        return _import_then_getattr(_global('builtins', '__import__'), command)
    if name == 'importlib.import_module':
        return _import_then_getattr(_global('importlib', 'import_module'), command)
    if name == 'functools.partial':
        return pickle.dumps(Payload(functools.partial(os.system, command)))
    if name == 'operator.attrgetter':
        os_module = _call(_global('builtins', '__import__'), _text('os'))
        system = _call(_call(_global('operator', 'attrgetter'), _text('system')), os_module)
        return _program(_call(system, _text(command)))
    if name == 'operator.methodcaller':
        os_module = _call(_global('builtins', '__import__'), _text('os'))
        return _program(_call(_call(_global('operator', 'methodcaller'), _text('system'), _text(command)), os_module))
    if name == 'dotted numpy.testing os.system':
        return _program(_call(_global('numpy.testing._private.utils', 'os.system'), _text(command)))
    if name == 'dotted sklearn np.save':
        return _program(_call(_global('sklearn.svm._classes', 'np.save'), _text(str(marker)), pickle.BININT1 + b'\x01'))
    if name == 'copyreg._reconstructor':  # protocol 0, as copyreg writes it: Popen.__init__(obj, ['touch', marker])
        popen = 'csubprocess\nPopen\n'
        return f'ccopyreg\n_reconstructor\n({popen}{popen}(lp0\nVtouch\naV{marker}\natR.'.encode()
    if name == 'copyreg.__newobj__':
        return _program(_call(_global('copyreg', '__newobj__'), _global('subprocess', 'Popen')))
    if name == 'numpy.memmap':
        return f'cnumpy\nmemmap\n(V{marker}\nVuint8\nVw+\nI0\n(I8\nttR.'.encode()
    if name == 'numpy DataSource':
        return _program(_call(_global('numpy.lib._datasource', 'DataSource'), _text(str(marker))))
    if name == 're-export numpy builtins.open':
        return _program(_call(_global('numpy.lib._datasource', '_open'), _text(str(marker)), _text('w')))
    if name == 're-export sklearn import_module':
        return _import_then_getattr(_global('sklearn.utils.discovery', 'import_module'), command)
    if name == 'inside an SVC':
        estimator = _fitted_svc()
        estimator.hidden = Payload(os.system, command)
        return pickle.dumps(estimator)
    if name.startswith('scipy.stats '):
        return pickle.dumps(_scipy_stats_object(name.split()[1], marker))
    raise ValueError(name)


#: The 23 payloads, with the global that the restricted loader refuses first (where plain pickle starts running it),
#: and whether plain pickle leaves a file behind (two only prepare a call that a further global would make).
PAYLOADS = {
    'os.system': ('posix.system', True),
    'subprocess.Popen': ('subprocess.Popen', True),
    'subprocess.check_output': ('subprocess.check_output', True),
    'builtins.eval': ('builtins.eval', True),
    'builtins.exec': ('builtins.exec', True),
    'builtins.getattr': ('builtins.getattr', True),
    'builtins.__import__': ('builtins.__import__', True),
    'importlib.import_module': ('importlib.import_module', True),
    'functools.partial': ('functools.partial', True),
    'operator.attrgetter': ('operator.attrgetter', True),
    'operator.methodcaller': ('operator.methodcaller', True),
    'dotted numpy.testing os.system': ('numpy.testing._private.utils.os.system', True),
    'dotted sklearn np.save': ('sklearn.svm._classes.np.save', True),
    'copyreg._reconstructor': ('copyreg._reconstructor', True),
    'copyreg.__newobj__': ('copyreg.__newobj__', False),
    'numpy.memmap': ('numpy.memmap', True),
    'numpy DataSource': ('numpy.lib._datasource.DataSource', False),
    're-export numpy builtins.open': ('numpy.lib._datasource._open', True),
    're-export sklearn import_module': ('sklearn.utils.discovery.import_module', True),
    'inside an SVC': ('posix.system', True),
    **{f'scipy.stats {kind}': (path, True) for kind, path in SCIPY_STATS_KINDS.items()},
}


def test_there_are_23_payloads():
    assert len(PAYLOADS) == 23


@pytest.mark.parametrize('name', PAYLOADS)
def test_payload_refused_and_never_run(name, tmp_path):
    marker = tmp_path / 'pwned'
    payload = _payload(name, marker)
    refused_at, _ = PAYLOADS[name]
    with pytest.raises(UnsafePickleError, match=f'refusing to load `{refused_at}`'):
        restricted_loads(payload)
    assert not list(tmp_path.iterdir()), f'the {name} payload ran'


@pytest.mark.parametrize('name', [name for name, (_, runs) in PAYLOADS.items() if runs])
def test_payload_is_real(name, tmp_path):
    """Plain pickle runs the payload: the refusal above is what protects the user."""
    marker = tmp_path / 'pwned'
    result = pickle.loads(_payload(name, marker))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert list(tmp_path.iterdir()), f'the {name} payload did nothing with plain pickle'


# -- forged state: objects the libraries would build from raw memory or trust blindly -----------------------------


def _forged_dtype() -> np.dtype:
    dtype = np.dtype('V8')
    dtype.__setstate__((3, '|', None, ('a',), {'a': (np.dtype('O'), 0)}, 8, 1, 16))  # object field, no object flags
    return dtype


def _forged_csr() -> scipy.sparse.csr_array:
    matrix = scipy.sparse.csr_array(np.eye(3))
    matrix.indices = np.array([0, 1, 2_000_000_000], dtype=np.int32)  # a column far outside the 3 columns
    return matrix


def _forged_forest() -> t.Any:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(1)
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(rng.random((20, 3)), [0, 1] * 10)
    tree = forest.estimators_[0].tree_
    state = tree.__getstate__()
    state['nodes'] = state['nodes'].copy()
    state['nodes']['left_child'][0] = 10**6  # the root points far outside the tree
    tree.__setstate__(state)
    return forest


FORGED = {
    # numpy.ndarray((1,), object, b'AAAAAAAA') makes an object pointer 0x4141414141414141 (a segfault at best).
    'ndarray from raw bytes': (
        lambda: pickle.dumps(Payload(np.ndarray, (1,), 'O', b'A' * 8)),
        'a call of `numpy.ndarray`',
    ),
    'dtype hiding an object field': (
        lambda: pickle.dumps(Payload(np.frombuffer, b'A' * 8, _forged_dtype())),
        'refusing to load `numpy.frombuffer`',  # the function itself is not admitted either
    ),
    'dtype hiding an object field, through _frombuffer': (
        lambda: pickle.dumps(
            Payload(_resolve('numpy._core.numeric', '_frombuffer'), b'A' * 8, _forged_dtype(), (1,), 'C')
        ),
        'flags or size do not match its fields',
    ),
    'CSR matrix with a column outside its shape': (lambda: pickle.dumps(_forged_csr()), 'a CSR matrix'),
    'CSR matrix built by its constructor with a column outside its shape': (
        lambda: pickle.dumps(
            Payload(scipy.sparse.csr_array, ([1.0], np.array([7], dtype=np.int32), np.array([0, 1, 1])), (2, 3))
        ),
        'a CSR matrix',
    ),
    'decision tree pointing outside itself': (lambda: pickle.dumps(_forged_forest()), 'a decision tree'),
    'BUILD on a reconstructor (monkeypatching it)': (
        lambda: _program(_global('numpy.random._pickle', '__randomstate_ctor') + _text('x') + pickle.BUILD),
        'state for a `builtins.function` object',
    ),
    'BUILD with slot state (setattr) on the SOAP kernel': (
        lambda: _program(
            _global('aiida_mlworkbench.estimators', 'NormalizedSoapKernel')
            + pickle.EMPTY_TUPLE
            + pickle.NEWOBJ
            + pickle.NONE
            + pickle.EMPTY_DICT
            + _text('__class__')
            + _global('sklearn.pipeline', 'Pipeline')
            + pickle.SETITEM
            + pickle.TUPLE2
            + pickle.BUILD
        ),
        'slot state',
    ),
    'SETITEMS on an array': (
        lambda: _program(
            _call(
                _global('numpy._core.multiarray', '_reconstruct'),
                _global('numpy', 'ndarray'),
                pickle.EMPTY_TUPLE,
                _text('b'),
            )
            + pickle.MARK
            + pickle.BININT1
            + b'\x00'
            + pickle.BININT1
            + b'\x01'
            + pickle.SETITEMS
        ),
        'SETITEMS on a ndarray',
    ),
    'persistent id': (lambda: _program(_text('x') + pickle.BINPERSID), 'a persistent id'),
}


@pytest.mark.parametrize('name', FORGED)
def test_forged_state_refused(name):
    build, message = FORGED[name]
    with pytest.raises(UnsafePickleError, match=message):
        restricted_loads(build())


# -- error messages, trusted modules, performance of the pure-Python unpickler -------------------------------------


def test_error_names_the_global_and_the_way_out():
    with pytest.raises(UnsafePickleError, match=r'`posix\.system`.*trusted=\[\'posix\'\]'):
        restricted_loads(pickle.dumps(Payload(os.system, 'true')))


def test_trusted_modules_are_admitted():
    payload = pickle.dumps(Payload(hashlib.sha256, b'abc'))
    with pytest.raises(UnsafePickleError):
        restricted_loads(payload)
    assert restricted_loads(payload, trusted=['_hashlib']).hexdigest() == hashlib.sha256(b'abc').hexdigest()


def _custom_kernel(first: t.Any, second: t.Any) -> t.Any:
    return first @ second.T


def test_estimator_needing_untrusted_code_refused_at_creation(dataset):
    features, labels, _ = dataset
    features = features.toarray()
    estimator = SVC(kernel=_custom_kernel).fit(features[:20], labels[:20])
    with pytest.raises(UnsafePickleError, match='test_restricted_pickle'):
        TrainedModel(estimator)
    node = TrainedModel(estimator, trusted=[__name__]).store()
    assert node.base.attributes.get('trusted_modules') == [__name__]
    with pytest.raises(UnsafePickleError):
        node.load()
    np.testing.assert_array_equal(node.load(trusted=[__name__]).predict(features), estimator.predict(features))


def test_unreadable_pickle_with_matching_checksum_is_corrupted(dataset, pipeline):
    content = pickle.dumps(pipeline, protocol=5)[:-100]
    node = _swapped_model(pipeline, content).store()
    with pytest.raises(CorruptedModelError, match='cannot be read'):
        orm.load_node(node.pk).load()


# -- every estimator the package can train loads back -------------------------------------------------------------


@pytest.fixture(scope='module')
def dataset() -> tuple[scipy.sparse.csr_array, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    features = scipy.sparse.random_array((48, 24), density=0.3, format='csr', rng=rng)
    labels = np.array(['bcc', 'fcc', 'hcp'])[rng.integers(0, 3, 48)]
    values = rng.random(48)
    return features, labels, values


@pytest.fixture(scope='module')
def pipeline(dataset) -> t.Any:
    features, labels, _ = dataset
    return make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear')).fit(features, labels)


def _specifications() -> t.Iterator[t.Any]:
    for name in ESTIMATORS:
        for scaler in (None, 'StandardScaler'):
            yield pytest.param({'estimator': name, 'scaler': scaler}, id=f'{name}-{scaler or "no scaler"}')
    for name in INCREMENTAL_ESTIMATORS:
        yield pytest.param(
            {'estimator': name, 'scaler': 'MaxAbsScaler', 'training': {'mode': 'incremental'}}, id=f'{name}-incremental'
        )
    for name in KERNEL_ESTIMATORS:
        yield pytest.param({'estimator': name, 'kernel': {'name': 'soap'}}, id=f'{name}-soap')
    yield pytest.param({'estimator': 'SGDClassifier', 'parameters': {'loss': 'log_loss'}}, id='SGDClassifier-log_loss')
    yield pytest.param({'estimator': 'SGDRegressor', 'parameters': {'loss': 'huber'}}, id='SGDRegressor-huber')
    yield pytest.param({'estimator': 'SVC', 'parameters': {'probability': True, 'random_state': 0}}, id='SVC-proba')


@pytest.mark.parametrize('specification', _specifications())
def test_every_estimator_stores_and_loads_through_the_restricted_loader(specification, dataset):
    features, labels, values = dataset
    model = build_estimator(specification)
    final = model.steps[-1][1] if hasattr(model, 'steps') else model
    targets = values if is_regressor(final) else labels
    if specification.get('training', {}).get('mode') == 'incremental':
        scaler = model.steps[0][1]
        scaler.partial_fit(features)
        extra = {'classes': np.unique(targets)} if is_classifier(final) else {}
        for start in range(0, features.shape[0], 16):
            final.partial_fit(scaler.transform(features[start : start + 16]), targets[start : start + 16], **extra)
    else:
        model.fit(features, targets)
    node = TrainedModel(model).store()
    loaded = orm.load_node(node.pk).load()
    np.testing.assert_array_equal(loaded.predict(features), model.predict(features))


def test_big_forest_loads_and_predicts_the_same(dataset):
    """The pure-Python unpickler rebuilds a 100-tree forest (about 1 MB) that predicts as the original does."""
    from sklearn.ensemble import RandomForestClassifier

    features, labels, _ = dataset
    forest = RandomForestClassifier(n_estimators=100, random_state=0).fit(features, labels)
    loaded = restricted_loads(pickle.dumps(forest, protocol=5))
    np.testing.assert_array_equal(loaded.predict(features), forest.predict(features))


# -- the scipy.stats payloads in a fitted pipeline, in a stored node, through an archive ---------------------------


def _hidden_in_pipeline(pipeline: t.Any, kind: str, marker: pathlib.Path) -> t.Any:
    evil = copy.deepcopy(pipeline)
    evil.steps[0][1].hidden = _scipy_stats_object(kind, marker)
    return evil


def _swapped_model(honest: t.Any, content: bytes) -> TrainedModel:
    """An unstored TrainedModel of ``honest`` with ``content`` as its pickle and a matching checksum: a forgery."""
    node = TrainedModel(honest)
    node.base.repository.put_object_from_bytes(content, TrainedModel.FILENAME)
    node.base.attributes.set('checksum', f'sha256:{hashlib.sha256(content).hexdigest()}')
    return node


@pytest.fixture(scope='module')
def scoring_inputs(dataset) -> dict[str, int]:
    """Stored features, targets and split that a model trained on ``dataset`` can be scored on (their pks)."""
    features, labels, _ = dataset
    matrix = SparseFeatureMatrix(features)
    targets = orm.ArrayData()
    targets.set_array('targets', labels)
    split = orm.ArrayData()
    split.set_array('train', np.arange(0, 36))
    split.set_array('test', np.arange(36, 48))
    return {'features': matrix.store().pk, 'targets': targets.store().pk, 'split': split.store().pk}


def _inputs(pks: dict[str, int]) -> dict[str, orm.Node]:
    return {key: orm.load_node(pk) for key, pk in pks.items()}


def _assert_failed_without_outputs(node: orm.ProcessNode, exit_code: str) -> None:
    assert node.is_stored
    assert node.is_finished
    assert not node.is_finished_ok
    assert node.exit_status == EXIT_CODES[exit_code].status
    assert not node.base.links.get_outgoing().all()


@pytest.mark.parametrize('kind', SCIPY_STATS_KINDS)
def test_scipy_stats_payload_in_a_pipeline(kind, pipeline, dataset, scoring_inputs, tmp_path):
    features, _, _ = dataset
    marker = tmp_path / 'pwned'
    evil = _hidden_in_pipeline(pipeline, kind, marker)
    content = pickle.dumps(evil, protocol=5)
    # Real: plain pickle runs it, and the model still predicts normally.
    np.testing.assert_array_equal(pickle.loads(content).predict(features), pipeline.predict(features))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafePickleError, match=SCIPY_STATS_KINDS[kind]):
        TrainedModel(evil)  # refused at creation: such a model is never stored honestly
    node = _swapped_model(pipeline, content).store()
    loaded = orm.load_node(node.pk)
    with pytest.raises(UnsafePickleError, match=rf'TrainedModel<{node.pk}>'):
        loaded.load()
    matrix = orm.load_node(scoring_inputs['features'])
    with pytest.raises(UnsafePickleError):
        loaded.predict(matrix)
    _, process = score_model.run_get_node(model=loaded, **_inputs(scoring_inputs))
    _assert_failed_without_outputs(process, 'unsafe_model')
    assert SCIPY_STATS_KINDS[kind] in process.exit_message
    assert not marker.exists()


PREDICT_REFUSALS = {'unsafe': 'unsafe_model', 'unreadable': 'corrupted_model', 'features': 'corrupted_input'}


@pytest.mark.parametrize('damage', PREDICT_REFUSALS)
def test_predict_refuses_what_it_cannot_trust(damage, pipeline, dataset, scoring_inputs, tmp_path):
    """predict, like score_model, turns a forged model, an unreadable one and a damaged feature file into exit codes,
    stores no prediction and runs nothing of the model."""
    from aiida_mlworkbench.calcfunctions.predict import EXIT_CODES as PREDICT_EXIT_CODES
    from aiida_mlworkbench.calcfunctions.predict import predict

    marker = tmp_path / 'pwned'
    features = orm.load_node(scoring_inputs['features'])
    if damage == 'unsafe':
        model = _swapped_model(pipeline, pickle.dumps(_hidden_in_pipeline(pipeline, 'frozen', marker), protocol=5))
    elif damage == 'unreadable':
        model = _swapped_model(pipeline, b'\x80\x05not a pickle')
    else:
        model = TrainedModel(pipeline)
        matrix = SparseFeatureMatrix(dataset[0] * 3.0).store()  # other bytes than the shared matrix
        _loose_path(matrix, SparseFeatureMatrix.FILENAME).write_bytes(b'this is not an HDF5 file')
        features = orm.load_node(matrix.pk)
    outputs, process = predict.run_get_node(model=orm.load_node(model.store().pk), features=features)
    assert process.is_finished
    assert process.exit_status == PREDICT_EXIT_CODES[PREDICT_REFUSALS[damage]].status
    assert not outputs
    assert not process.base.links.get_outgoing().all()
    assert not marker.exists()


def test_predict_turns_a_failing_model_into_an_exit_code(dataset, scoring_inputs):
    """A model that fails at prediction time (nearest neighbours fitted on fewer samples than neighbours) ends
    predict with exit code 377, scikit-learn's message in it."""
    from sklearn.neighbors import KNeighborsClassifier

    from aiida_mlworkbench.calcfunctions.predict import predict

    features, labels, _ = dataset
    model = TrainedModel(KNeighborsClassifier(n_neighbors=5).fit(features[:2], labels[:2])).store()
    outputs, process = predict.run_get_node(model=model, features=orm.load_node(scoring_inputs['features']))
    assert process.exit_status == 377
    assert 'n_neighbors' in process.exit_message
    assert not outputs


def test_scipy_stats_payload_through_an_archive(pipeline, dataset, scoring_inputs, tmp_path, fresh_profile):
    """The hostile route: a forged node passes store() and archive export/import; the importing side refuses it."""
    marker = tmp_path / 'pwned'
    content = pickle.dumps(_hidden_in_pipeline(pipeline, 'frozen', marker), protocol=5)
    model = _swapped_model(pipeline, content).store()
    inputs = _inputs(scoring_inputs)
    nodes = [model, *inputs.values()]
    uuids = {'model': model.uuid, **{key: node.uuid for key, node in inputs.items()}}
    checksum = model.checksum
    archive = tmp_path / 'forged.aiida'
    create_archive(nodes, filename=archive)
    assert not marker.exists()

    with fresh_profile():
        import_archive(archive)
        imported = {key: orm.load_node(uuid) for key, uuid in uuids.items()}
        assert imported['model'].checksum == checksum
        with pytest.raises(UnsafePickleError, match='rv_continuous_frozen'):
            imported['model'].load()
        with pytest.raises(UnsafePickleError):
            imported['model'].predict(imported['features'])
        _, process = score_model.run_get_node(**imported)
        _assert_failed_without_outputs(process, 'unsafe_model')
        assert not marker.exists()


# -- score_model turns every bad input into an exit code ----------------------------------------------------------


def _loose_path(node: orm.Node, filename: str) -> pathlib.Path:
    """The file of ``node``'s repository object in the disk object store (to damage it as a broken disk would)."""
    key = node.base.repository.metadata['o'][filename]['k']
    container = get_manager().get_profile_storage().get_repository()._container
    path = container._get_loose_path_from_hashkey(key)
    path.chmod(0o644)
    return path


def _array(**arrays: t.Any) -> orm.ArrayData:
    node = orm.ArrayData()
    for name, values in arrays.items():
        node.set_array(name, np.asarray(values))
    return node.store()


SPLIT_CASES = {
    'no test array': ({'train': np.arange(36)}, 'has no array `test`'),
    'row outside the matrix': ({'train': np.arange(36), 'test': [36, 48]}, 'refers to row 48'),
    'negative row': ({'train': np.arange(36), 'test': [-1, 40]}, 'refers to row -1'),
    'non-integer rows': ({'train': np.arange(36), 'test': [36.0, 37.5]}, 'integer row indices, got float64'),
    'two-dimensional rows': ({'train': np.arange(36), 'test': [[36, 37]]}, 'of shape \\(1, 2\\)'),
    'no test rows': ({'train': np.arange(36), 'test': np.array([], dtype=int)}, 'has no test rows'),
}


@pytest.mark.parametrize('case', SPLIT_CASES)
def test_score_invalid_split(case, pipeline, scoring_inputs):
    arrays, message = SPLIT_CASES[case]
    inputs = _inputs(scoring_inputs)
    inputs['split'] = _array(**arrays)
    result, process = score_model.run_get_node(model=TrainedModel(pipeline).store(), **inputs)
    assert not result
    _assert_failed_without_outputs(process, 'invalid_split')
    assert re.search(message, process.exit_message)


def test_score_targets_without_targets_array(pipeline, dataset, scoring_inputs):
    inputs = _inputs(scoring_inputs)
    inputs['targets'] = _array(values=dataset[1])
    _, process = score_model.run_get_node(model=TrainedModel(pipeline).store(), **inputs)
    _assert_failed_without_outputs(process, 'invalid_targets')
    assert 'has no array `targets`' in process.exit_message


def _distinct(pipeline: t.Any, tag: str) -> t.Any:
    """A copy of ``pipeline`` that pickles to other bytes: damaging its repository object damages no other node."""
    copied = copy.deepcopy(pipeline)
    copied.steps[0][1].test_tag = tag
    return copied


def test_score_tampered_model(pipeline, scoring_inputs, tmp_path):
    model = TrainedModel(_distinct(pipeline, 'tampered')).store()
    marker = tmp_path / 'pwned'
    _loose_path(model, TrainedModel.FILENAME).write_bytes(_payload('os.system', marker))
    _, process = score_model.run_get_node(model=orm.load_node(model.pk), **_inputs(scoring_inputs))
    _assert_failed_without_outputs(process, 'corrupted_model')
    assert 'does not match its checksum' in process.exit_message
    assert not marker.exists()


def test_score_unreadable_model(pipeline, scoring_inputs):
    model = _swapped_model(pipeline, b'\x80\x05not a pickle').store()
    _, process = score_model.run_get_node(model=model, **_inputs(scoring_inputs))
    _assert_failed_without_outputs(process, 'corrupted_model')


def test_score_corrupted_feature_file(pipeline, dataset, scoring_inputs):
    matrix = SparseFeatureMatrix(dataset[0] * 2.0).store()  # other bytes than the shared matrix: damage only this
    _loose_path(matrix, SparseFeatureMatrix.FILENAME).write_bytes(b'this is not an HDF5 file')
    inputs = {**_inputs(scoring_inputs), 'features': orm.load_node(matrix.pk)}
    _, process = score_model.run_get_node(model=TrainedModel(pipeline).store(), **inputs)
    _assert_failed_without_outputs(process, 'corrupted_features')
    assert f'<{matrix.pk}>' in process.exit_message or str(matrix.pk) in process.exit_message


def test_score_model_that_cannot_predict_these_targets(pipeline, dataset, scoring_inputs):
    """A classifier of string labels scored against numbers: scikit-learn's error becomes an exit code."""
    inputs = _inputs(scoring_inputs)
    inputs['targets'] = _array(targets=dataset[2])
    _, process = score_model.run_get_node(model=TrainedModel(pipeline).store(), **inputs)
    _assert_failed_without_outputs(process, 'prediction_failed')


def test_score_model_whose_forged_state_fails_in_python(dataset, scoring_inputs):
    """A forged strategy makes scikit-learn raise UnboundLocalError (no ValueError): still exit code 339."""
    from sklearn.dummy import DummyClassifier

    features, labels, _ = dataset
    estimator = DummyClassifier(strategy='prior').fit(features, labels)
    estimator._strategy = ''
    _, process = score_model.run_get_node(model=TrainedModel(estimator).store(), **_inputs(scoring_inputs))
    _assert_failed_without_outputs(process, 'prediction_failed')
    assert 'UnboundLocalError' in process.exit_message


def test_score_still_scores(pipeline, scoring_inputs):
    outputs = score_model(model=TrainedModel(pipeline).store(), **_inputs(scoring_inputs))
    assert 0 <= outputs['score'].value <= 1


def test_reconstructors_have_their_documented_signatures():
    """The argument checks assume these signatures; a NumPy that changes them must fail here, not silently."""
    assert list(inspect.signature(_resolve('numpy.random._pickle', '__randomstate_ctor')).parameters) == [
        'bit_generator_name',
        'bit_generator_ctor',
    ]
    assert list(inspect.signature(_resolve('numpy._core.numeric', '_frombuffer')).parameters)[:2] == ['buf', 'dtype']
