"""A restricted unpickler for the package's estimators: loading a model someone sent you must not run their code.

A pickle is a small program: it names importable objects (``GLOBAL``/``STACK_GLOBAL``), calls them (``REDUCE``,
``NEWOBJ``), and hands state to the objects it built (``BUILD`` calls ``__setstate__``). Admitting whole libraries is
not enough: every class of scikit-learn, NumPy and SciPy brings its ``__setstate__`` and constructor, and some of them
run code (``scipy.stats`` distributions ``exec`` a string of their pickled state) or build objects from raw memory
(``numpy.ndarray(shape, object, buffer)`` turns bytes into object pointers). So :class:`RestrictedUnpickler`

* resolves only the exact ``(module, name)`` pairs of three reviewed tables: :data:`ADMITTED_CLASSES` (what the
  estimators of :mod:`aiida_mlworkbench.estimators` pickle into, found by pickling each of them fitted),
  :data:`RECONSTRUCTORS` (the few functions NumPy uses to rebuild its objects, each with its arguments checked) and
  :data:`SAFE_BUILTINS` (plain value types), and the modules the caller names in ``trusted``. Everything else is refused
  with :class:`UnsafePickleError` before its module is imported, so nothing of it runs;
* calls (``REDUCE``, ``NEWOBJ``) only those, never ``numpy.ndarray`` itself, and ``BUILD`` only on instances of an
  admitted class; it refuses ``BUILD`` with slot state (``setattr``) and items added to anything but a list, dict or
  set;
* checks what NumPy, SciPy and scikit-learn do not check when they unpickle: a dtype's flags match its fields (a dtype
  that hides object fields would let raw bytes become object pointers), a CSR matrix's index arrays are consistent
  and within its shape, a decision tree's nodes point to later nodes of the tree and to features of the tree, and its
  constructor gets one class count per output;
* checks the loaded model as a whole (:func:`check_fitted_state`) against the invariants of ``fit``, because
  scikit-learn's compiled prediction code trusts numbers it does not check: libsvm's per-class support counts,
  coefficient layout, probability parameters and, for a callable kernel, the training rows and ``support_`` (dense
  models are checked by scikit-learn, sparse ones are not); k-means centres indexed by feature column, and OpenMP's
  thread count; a tree's number of features against the model's. Each is refused by name
  (``tests/test_forged_models.py``).

What was reviewed for every admitted class (scikit-learn 1.9, NumPy 2.4, SciPy 1.17): its constructor, ``__new__``,
``__reduce__``/``__setstate__``, ``__setitem__``/``append``/``extend`` and ``__getattr__``. The scikit-learn estimators
inherit ``BaseEstimator.__setstate__`` (a version check, then ``__dict__.update``) and their constructors store their
parameters; the Cython loss functions rebuild from numbers through ``__reduce__``; ``Tree.__setstate__`` copies two
arrays whose dtype and shape it checks; the NumPy bit generator and seed sequence set a validated state; the CSR
classes have no ``__setstate__`` (``__dict__.update``). None opens a file, imports a module or evaluates a string.

The pure-Python unpickler (``pickle._Unpickler``) is used because the C one cannot be told what it may call. Models
are mostly large arrays, which are single opcodes, so the cost stays small.
"""

from __future__ import annotations

import importlib
import io
import pickle
import typing as t
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = (
    'ADMITTED_CLASSES',
    'RECONSTRUCTORS',
    'SAFE_BUILTINS',
    'RestrictedUnpickler',
    'UnsafePickleError',
    'check_fitted_state',
    'restricted_loads',
)

#: Classes a stored model may contain, by the module that defines them (the name a pickle writes). Found by pickling
#: every estimator of ``ESTIMATORS`` fitted (with and without each scaler, classification and regression, float32 and
#: float64, ``csr_array`` and ``csr_matrix`` input, ``fit`` and ``partial_fit``, every loss of the SGD family) and
#: recording each global the pickles name; reviewed as described in the module docstring.
ADMITTED_CLASSES: frozenset[tuple[str, str]] = frozenset(
    # The estimators of aiida_mlworkbench.estimators.ESTIMATORS.
    {('sklearn.svm._classes', name) for name in ('SVC', 'LinearSVC', 'SVR', 'LinearSVR', 'NuSVC')}
    | {('sklearn.linear_model._logistic', 'LogisticRegression')}
    | {('sklearn.linear_model._ridge', 'RidgeClassifier'), ('sklearn.linear_model._ridge', 'Ridge')}
    | {
        ('sklearn.linear_model._coordinate_descent', 'Lasso'),
        ('sklearn.linear_model._coordinate_descent', 'ElasticNet'),
    }
    | {('sklearn.linear_model._stochastic_gradient', 'SGDClassifier')}
    | {('sklearn.linear_model._stochastic_gradient', 'SGDRegressor')}
    | {('sklearn.linear_model._passive_aggressive', 'PassiveAggressiveClassifier')}
    | {('sklearn.linear_model._passive_aggressive', 'PassiveAggressiveRegressor')}
    | {('sklearn.linear_model._perceptron', 'Perceptron')}
    | {('sklearn.kernel_ridge', 'KernelRidge')}
    | {('sklearn.ensemble._forest', 'RandomForestClassifier'), ('sklearn.ensemble._forest', 'RandomForestRegressor')}
    | {('sklearn.ensemble._forest', 'ExtraTreesClassifier')}
    | {('sklearn.neighbors._classification', 'KNeighborsClassifier')}
    | {('sklearn.neighbors._regression', 'KNeighborsRegressor')}
    | {('sklearn.naive_bayes', 'MultinomialNB'), ('sklearn.naive_bayes', 'BernoulliNB')}
    | {('sklearn.cluster._kmeans', 'MiniBatchKMeans')}
    | {('sklearn.dummy', 'DummyClassifier'), ('sklearn.dummy', 'DummyRegressor')}
    # The scalers of SCALERS, the pipeline that joins a scaler and an estimator, and the normalised SOAP kernel.
    | {('sklearn.preprocessing._data', name) for name in ('StandardScaler', 'MaxAbsScaler', 'Normalizer')}
    | {('sklearn.pipeline', 'Pipeline')}
    | {('aiida_mlworkbench.estimators', 'NormalizedSoapKernel')}
    # Parts of fitted estimators: the trees of the forests, the label binariser of RidgeClassifier, and the Cython loss
    # functions that the SGD family keeps (hinge, log, modified Huber, squared hinge, squared error, Huber, epsilon).
    | {('sklearn.tree._classes', name) for name in ('DecisionTreeClassifier', 'DecisionTreeRegressor')}
    | {('sklearn.tree._classes', 'ExtraTreeClassifier'), ('sklearn.tree._tree', 'Tree')}
    | {('sklearn.preprocessing._label', 'LabelBinarizer')}
    | {('sklearn.linear_model._sgd_fast', name) for name in ('Hinge', 'ModifiedHuber', 'SquaredHinge')}
    | {('sklearn.linear_model._sgd_fast', name) for name in ('EpsilonInsensitive', 'SquaredEpsilonInsensitive')}
    | {('sklearn._loss._loss', name) for name in ('CyHalfBinomialLoss', 'CyHalfSquaredError', 'CyHuberLoss')}
    # Building blocks: arrays and their dtypes, sparse support vectors and training rows, the legacy random state.
    | {('numpy', 'dtype'), ('numpy', 'ndarray')}
    | {('scipy.sparse._csr', 'csr_array'), ('scipy.sparse._csr', 'csr_matrix')}
    | {('numpy.random._mt19937', 'MT19937'), ('numpy.random.bit_generator', 'SeedSequence')}
)

#: Admitted classes that a pickle may name but never call: ``numpy.ndarray(shape, object, buffer)`` makes object
#: pointers of raw bytes. Arrays are rebuilt through ``_reconstruct`` and ``_frombuffer`` instead.
NOT_CALLABLE: frozenset[tuple[str, str]] = frozenset({('numpy', 'ndarray')})

#: Functions that pickles of the admitted classes call, with the reason each is safe. Their arguments are checked by
#: :func:`_check_reconstructor_arguments` before the call.
RECONSTRUCTORS: dict[tuple[str, str], str] = {
    ('numpy._core.multiarray', '_reconstruct'): 'allocates an empty array of an ndarray type; its state comes by BUILD',
    ('numpy._core.multiarray', 'scalar'): 'a NumPy scalar from a dtype and its bytes (object dtypes need an object)',
    ('numpy._core.numeric', '_frombuffer'): 'an array over pickled bytes; NumPy refuses object dtypes from a buffer',
    ('numpy.core.multiarray', '_reconstruct'): 'NumPy < 2 spelling of numpy._core.multiarray._reconstruct',
    ('numpy.core.multiarray', 'scalar'): 'NumPy < 2 spelling of numpy._core.multiarray.scalar',
    ('numpy.core.numeric', '_frombuffer'): 'NumPy < 2 spelling of numpy._core.numeric._frombuffer',
    ('numpy.random._pickle', '__randomstate_ctor'): 'a legacy RandomState (random_state=RandomState(...)) of a bit '
    'generator, made by __bit_generator_ctor only',
    ('numpy.random._pickle', '__bit_generator_ctor'): 'a bit generator of a name or of an admitted bit generator class',
    ('numpy.random.bit_generator', '__pyx_unpickle_SeedSequence'): "Cython's rebuild of a SeedSequence (checks the "
    'class layout, sets numbers)',
}

#: Builtins and standard-library classes that only build plain values from plain values.
SAFE_BUILTINS: frozenset[tuple[str, str]] = frozenset(
    {('builtins', name) for name in ('bool', 'bytearray', 'bytes', 'complex', 'dict', 'float', 'frozenset', 'int')}
    | {('builtins', name) for name in ('list', 'object', 'range', 'set', 'slice', 'str', 'tuple')}
    | {('collections', 'OrderedDict')}
)

#: Containers that the item opcodes (APPEND(S), SETITEM(S), ADDITEMS) may fill.
_ITEM_CONTAINERS = (list, dict, OrderedDict, set)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global or an operation that the restricted unpickler does not admit; none of it ran."""


def _within(module: str, packages: Iterable[str]) -> bool:
    return any(module == package or module.startswith(f'{package}.') for package in packages)


def _resolve(module: str, name: str) -> t.Any:
    return getattr(importlib.import_module(module), name)


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that admits only what the module docstring describes.

    :param file: binary file object holding the pickle.
    :param trusted: modules or packages whose globals are all admitted, callable and buildable (for estimator parts
        of your own). Only name code you trust: its globals can run anything.
    :param source: a description of where the pickle comes from, used in error messages.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: t.IO[bytes], *, trusted: Iterable[str] = (), source: str = 'the pickle') -> None:
        super().__init__(file)
        self.trusted = tuple(trusted)
        self.source = source

    # -- what may be named ----------------------------------------------------------------------------------------

    def _refuse(self, what: str, why: str, module: str | None = None) -> t.NoReturn:
        way_out = (
            f' If you trust whoever made this file and `{module}` is code you have installed and trust, pass '
            f'trusted=[{module!r}].'
            if module
            else ''
        )
        raise UnsafePickleError(
            f'refusing to load {what} from {self.source}: {why}. Only the classes that the estimators of '
            'aiida_mlworkbench.estimators need are admitted (aiida_mlworkbench.restricted_pickle.ADMITTED_CLASSES), so '
            f'that loading a model cannot run foreign code.{way_out}'
        )

    def find_class(self, module: str, name: str) -> t.Any:
        if _within(module, self.trusted):
            return super().find_class(module, name)
        pair = (module, name)
        if pair in ADMITTED_CLASSES or pair in SAFE_BUILTINS or pair in RECONSTRUCTORS:
            return _resolve(module, name)
        if '.' in name:
            why = 'dotted attribute paths are never admitted'
        elif name.startswith('__pyx_unpickle_'):
            why = 'it is a Cython rebuild helper of a class that is not admitted'
        else:
            why = 'it is not one of the admitted classes'
        self._refuse(f'`{module}.{name}`', why, module)

    # -- what may be called and built -----------------------------------------------------------------------------

    def _is_trusted(self, obj: t.Any) -> bool:
        return bool(self.trusted) and _within(getattr(obj, '__module__', None) or '', self.trusted)

    def _check_callable(self, func: t.Any, opcode: str) -> None:
        """Refuse to call anything but an admitted class (not ``numpy.ndarray``), a builtin or a reconstructor."""
        if self._is_trusted(func):
            return
        if isinstance(func, type):
            pair = (func.__module__, func.__qualname__)
            if (pair in ADMITTED_CLASSES and pair not in NOT_CALLABLE) or pair in SAFE_BUILTINS:
                return
            way_out = None if pair in ADMITTED_CLASSES else pair[0]
            self._refuse(f'a call of `{pair[0]}.{pair[1]}`', f'{opcode} may not call this class', way_out)
        if _reconstructor_pair(func) is not None:
            return
        self._refuse(
            f'a call of {type(func).__name__} object', f'{opcode} may call only admitted classes and functions'
        )

    def load_reduce(self) -> None:
        args = self.stack[-1]
        func = self.stack[-2]
        self._check_callable(func, 'REDUCE')
        trusted = self._is_trusted(func)
        pair = _reconstructor_pair(func)
        if pair is not None and not trusted:
            _check_reconstructor_arguments(pair, args, self)
        if not trusted and isinstance(func, type) and (func.__module__, func.__qualname__) == _TREE:
            _check_tree_arguments(args, self)
        super().load_reduce()
        # A constructor's own checks may be partial: csr_array((data, indices, indptr)) checks no index bounds.
        if not trusted:
            _check_built(self.stack[-1], self)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _check_new(self, cls: t.Any, opcode: str) -> None:
        if not isinstance(cls, type):
            self._refuse(f'{opcode} of a {type(cls).__name__} object', f'{opcode} needs a class')
        self._check_callable(cls, opcode)

    def load_newobj(self) -> None:
        self._check_new(self.stack[-2], 'NEWOBJ')
        super().load_newobj()

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        self._check_new(self.stack[-3], 'NEWOBJ_EX')
        super().load_newobj_ex()

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: t.Any, args: list) -> None:  # INST and OBJ (protocols 0 and 1)
        self._check_new(klass, 'INST/OBJ')
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        cls = type(inst)
        trusted = self._is_trusted(cls)
        if not trusted:
            pair = _buildable_pair(inst)
            if pair is None:
                name = f'{cls.__module__}.{cls.__qualname__}'
                self._refuse(f'state for a `{name}` object', 'BUILD may set state only on an admitted class')
            has_setstate = getattr(cls, '__setstate__', None) is not None
            if not has_setstate and isinstance(state, tuple) and len(state) == 2 and state[1]:
                self._refuse(f'slot state for `{pair[0]}.{pair[1]}`', 'no admitted class uses slot state')
            check = _STATE_CHECKS.get(pair)
            if check is not None:
                check(inst, state, self)
        super().load_build()
        if not trusted:
            _check_built(inst, self)

    dispatch[pickle.BUILD[0]] = load_build

    def _check_container(self, container: t.Any, opcode: str) -> None:
        if type(container) not in _ITEM_CONTAINERS:
            self._refuse(
                f'{opcode} on a {type(container).__name__} object', f'{opcode} may fill only lists, dicts, sets'
            )

    def load_append(self) -> None:
        self._check_container(self.stack[-2], 'APPEND')
        super().load_append()

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        self._check_container(self.metastack[-1][-1], 'APPENDS')
        super().load_appends()

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        self._check_container(self.stack[-3], 'SETITEM')
        super().load_setitem()

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        self._check_container(self.metastack[-1][-1], 'SETITEMS')
        super().load_setitems()

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        self._check_container(self.metastack[-1][-1], 'ADDITEMS')
        super().load_additems()

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def persistent_load(self, pid: t.Any) -> t.NoReturn:
        self._refuse('a persistent id', 'a stored model holds no references to outside objects')


# -- reconstructors -----------------------------------------------------------------------------------------------


def _reconstructor_pair(func: t.Any) -> tuple[str, str] | None:
    """The :data:`RECONSTRUCTORS` key that ``func`` is, or None (by identity, not by name)."""
    pair = (getattr(func, '__module__', None), getattr(func, '__name__', None))
    if pair in RECONSTRUCTORS and _resolve(*pair) is func:
        return pair
    return None


def _check_reconstructor_arguments(pair: tuple[str, str], args: t.Any, unpickler: RestrictedUnpickler) -> None:
    """Refuse arguments that a reconstructor would turn into a call of something else or into raw memory."""
    import numpy as np
    from numpy.random.bit_generator import BitGenerator, SeedSequence

    name = pair[1]
    bit_generator_ctor = _resolve('numpy.random._pickle', '__bit_generator_ctor')

    def bad(why: str) -> t.NoReturn:
        unpickler._refuse(f'a call of `{pair[0]}.{name}`', why)

    if not isinstance(args, tuple):
        bad('its arguments are not a tuple')
    if name == '_reconstruct':
        if len(args) != 3 or args[0] is not np.ndarray:
            bad('it may rebuild only numpy.ndarray')
    elif name in ('scalar', '_frombuffer'):
        position = 0 if name == 'scalar' else 1
        if len(args) <= position or not isinstance(args[position], np.dtype):
            bad('its dtype argument is not a dtype')
    elif name == '__randomstate_ctor':
        if len(args) > 2 or (len(args) == 2 and args[1] is not bit_generator_ctor):
            bad('it may make its bit generator only with numpy.random._pickle.__bit_generator_ctor')
        if args and not isinstance(args[0], (str, BitGenerator)):
            bad('its bit generator is neither a name nor a bit generator')
    elif name == '__bit_generator_ctor':
        if len(args) > 1 or (args and not isinstance(args[0], str) and args[0] is not _resolve(*_BIT_GENERATOR)):
            bad('it may make only a bit generator of a name or numpy.random._mt19937.MT19937')
    elif name == '__pyx_unpickle_SeedSequence' and (not args or args[0] is not SeedSequence):
        bad('it may rebuild only numpy.random.bit_generator.SeedSequence')


_BIT_GENERATOR = ('numpy.random._mt19937', 'MT19937')


# -- checks of state that the libraries do not check when they unpickle -------------------------------------------


def _check_dtype(dtype: t.Any, unpickler: RestrictedUnpickler) -> None:
    """Refuse a dtype whose pickled flags or layout differ from what NumPy derives from its fields.

    ``dtype.__setstate__`` takes the flags as given: a structured dtype with an object field and the flags of plain
    bytes lets ``_frombuffer`` make object pointers of raw bytes.
    """
    import numpy as np

    try:
        if dtype.fields is not None:
            names = list(dtype.names)
            canonical = np.dtype(
                {
                    'names': names,
                    'formats': [dtype.fields[name][0] for name in names],
                    'offsets': [dtype.fields[name][1] for name in names],
                    'itemsize': dtype.itemsize,
                },
                align=dtype.isalignedstruct,
            )
        elif dtype.subdtype is not None:
            canonical = np.dtype(dtype.subdtype)
        else:
            canonical = np.dtype(dtype.str)
        consistent = (canonical.flags, canonical.itemsize, canonical.hasobject) == (
            dtype.flags,
            dtype.itemsize,
            dtype.hasobject,
        )
    except (TypeError, ValueError) as exception:
        unpickler._refuse('a dtype', f'its state does not describe a valid dtype ({exception})')
    if not consistent:
        unpickler._refuse(f'the dtype {dtype}', 'its flags or size do not match its fields (a forged dtype)')


def _check_csr(matrix: t.Any, unpickler: RestrictedUnpickler) -> None:
    """Refuse a CSR matrix whose index arrays point outside its data or shape: sparse kernels trust them."""
    try:
        matrix.check_format(full_check=True)
    except (TypeError, ValueError, AttributeError, IndexError) as exception:
        unpickler._refuse('a CSR matrix', f'its index arrays are inconsistent ({exception})')


def _check_tree_state(tree: t.Any, state: t.Any, unpickler: RestrictedUnpickler) -> None:
    """Refuse a decision tree whose nodes would send ``predict`` outside the tree or outside the features."""
    import numpy as np

    def bad(why: str) -> t.NoReturn:
        unpickler._refuse('a decision tree', why)

    if not isinstance(state, dict) or not isinstance(state.get('nodes'), np.ndarray):
        bad('its state has no node array')
    nodes = state['nodes']
    names = nodes.dtype.names or ()
    if nodes.ndim != 1 or not {'left_child', 'right_child', 'feature'} <= set(names):
        bad('its node array has not the layout of a scikit-learn tree')
    count = state.get('node_count')
    if not isinstance(count, (int, np.integer)) or count != nodes.shape[0] or count < 1:
        bad(f'node_count {count!r} does not match its {nodes.shape[0]} nodes')
    left, right, feature = (
        np.asarray(nodes[name], dtype=np.int64) for name in ('left_child', 'right_child', 'feature')
    )
    index = np.arange(count)
    leaf = left == -1
    if np.any(leaf != (right == -1)):
        bad('a node has one child')
    inner = ~leaf
    # scikit-learn numbers children after their parent; requiring it also rules out cycles.
    if np.any((left[inner] <= index[inner]) | (left[inner] >= count) | (right[inner] <= index[inner])):
        bad('a node points to a node outside the tree or before itself')
    if np.any(right[inner] >= count):
        bad('a node points to a node outside the tree')
    if np.any((feature[inner] < 0) | (feature[inner] >= tree.n_features)):
        bad(f'a node splits on a feature outside the {tree.n_features} features of the tree')
    depth = state.get('max_depth')
    if not isinstance(depth, (int, np.integer)) or not 0 <= depth < count:
        bad(f'max_depth {depth!r} is not possible for {count} nodes')


_TREE = ('sklearn.tree._tree', 'Tree')


def _check_tree_arguments(args: t.Any, unpickler: RestrictedUnpickler) -> None:
    """Refuse ``Tree(n_features, n_classes, n_outputs)`` unless there is one class count per output.

    The constructor allocates ``n_outputs`` entries before it reads ``n_classes``: a forged count allocates terabytes.
    """
    import numpy as np

    def bad(why: str) -> t.NoReturn:
        unpickler._refuse('a decision tree', why)

    if not isinstance(args, tuple) or len(args) != 3:
        bad('its constructor arguments are not (n_features, n_classes, n_outputs)')
    n_features, n_classes, n_outputs = args
    for name, value in (('n_features', n_features), ('n_outputs', n_outputs)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            bad(f'its {name} {value!r} is not a positive integer')
    if not isinstance(n_classes, np.ndarray) or n_classes.shape != (n_outputs,):
        bad(f'it has not one class count for each of its {n_outputs} outputs')


_STATE_CHECKS: dict[tuple[str, str], Callable[[t.Any, t.Any, RestrictedUnpickler], None]] = {
    ('sklearn.tree._tree', 'Tree'): _check_tree_state,
}

#: Objects that reconstructors make, which BUILD may give state to besides the admitted classes: the legacy random
#: state that ``__randomstate_ctor`` makes (``RandomState.__setstate__`` calls its validating ``set_state``).
_BUILT_BY_RECONSTRUCTORS: frozenset[tuple[str, str]] = frozenset({('numpy.random.mtrand', 'RandomState')})


def _buildable_pair(inst: t.Any) -> tuple[str, str] | None:
    """The table entry that allows BUILD on ``inst``: its exact class, or ``numpy.dtype`` for NumPy's dtype classes."""
    import numpy as np

    cls = type(inst)
    pair = (cls.__module__, cls.__qualname__)
    if pair in ADMITTED_CLASSES or pair in _BUILT_BY_RECONSTRUCTORS:
        return pair
    if isinstance(inst, np.dtype):  # np.dtype('f8') is a numpy.dtypes.Float64DType
        return ('numpy', 'dtype')
    return None


def _check_built(inst: t.Any, unpickler: RestrictedUnpickler) -> None:
    import numpy as np
    import scipy.sparse

    if isinstance(inst, np.dtype):
        _check_dtype(inst, unpickler)
    elif isinstance(inst, (scipy.sparse.csr_array, scipy.sparse.csr_matrix)):
        _check_csr(inst, unpickler)


def restricted_loads(data: bytes, *, trusted: Iterable[str] = (), source: str = 'the pickle') -> t.Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`, then check the fitted state (:func:`check_fitted_state`).

    :raises UnsafePickleError: if the pickle asks for a global or an operation that is not admitted, or if what it
        built is not a state that scikit-learn's fitting makes.
    """
    loaded = RestrictedUnpickler(io.BytesIO(data), trusted=trusted, source=source).load()
    check_fitted_state(loaded, source=source)
    return loaded


# -- the fitted state: numbers that compiled code trusts when it predicts ----------------------------------------


class _StateError(Exception):
    """One attribute of a fitted estimator breaks an invariant of scikit-learn's fitting."""

    def __init__(self, attribute: str, detail: str) -> None:
        super().__init__(attribute, detail)
        self.attribute, self.detail = attribute, detail


#: Largest value of numbers that scikit-learn hands to C as a C ``int`` (libsvm's degree, OpenMP thread counts).
_C_INT_MAX = 2**31 - 1


def _integer(value: t.Any, attribute: str, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _StateError(attribute, f'is {value!r} ({type(value).__name__}), not an integer')
    if not minimum <= value <= maximum:
        raise _StateError(attribute, f'is {value}, outside {minimum} to {maximum}')
    return int(value)


def _real(value: t.Any, attribute: str) -> None:
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _StateError(attribute, f'is {value!r} ({type(value).__name__}), not a number')


def _array(
    value: t.Any, attribute: str, kinds: str, shape: tuple[int | None, ...], *, contiguous: bool = False
) -> t.Any:
    """Require an ndarray of a dtype kind in ``kinds`` and of ``shape`` (None: any length on that axis)."""
    import numpy as np

    if type(value) is not np.ndarray:
        raise _StateError(attribute, f'is a {type(value).__name__}, not a NumPy array')
    if value.dtype.kind not in kinds or value.dtype.hasobject:
        raise _StateError(attribute, f'has dtype {value.dtype}, expected kind {kinds!r}')
    if value.ndim != len(shape) or any(
        want is not None and have != want for have, want in zip(value.shape, shape, strict=True)
    ):
        expected = tuple('any' if want is None else want for want in shape)
        raise _StateError(attribute, f'has shape {value.shape}, expected {expected}')
    if contiguous and not value.flags.c_contiguous:
        raise _StateError(attribute, 'is not C-contiguous')
    return value


def _libsvm_state(estimator: t.Any) -> None:
    """SVC, NuSVC, SVR: libsvm reads support vectors, coefficients and per-class counts by the numbers it is given.

    scikit-learn checks ``n_support_`` against ``support_vectors_`` for dense models only (CVE-2020-28975); a sparse
    model, a callable kernel's training rows and the probability parameters are taken as they are.
    """
    import numpy as np
    import scipy.sparse
    from sklearn.base import is_classifier

    kernel = estimator.kernel
    if not callable(kernel) and kernel not in ('linear', 'poly', 'rbf', 'sigmoid', 'precomputed'):
        raise _StateError('kernel', f'is {kernel!r}, not a libsvm kernel or a callable')
    shape_fit = estimator.shape_fit_
    if not isinstance(shape_fit, tuple) or len(shape_fit) != 2:
        raise _StateError('shape_fit_', f'is {shape_fit!r}, not the (rows, features) of the training data')
    n_train = _integer(shape_fit[0], 'shape_fit_[0]', 1)
    n_features = _integer(shape_fit[1], 'shape_fit_[1]', 1)
    # A callable kernel skips scikit-learn's input validation, which is what records n_features_in_.
    if 'n_features_in_' in vars(estimator) and estimator.n_features_in_ != n_features:
        raise _StateError('shape_fit_', f'says {n_features} features, n_features_in_ says {estimator.n_features_in_}')
    for name in ('degree',):
        _integer(getattr(estimator, name), name, 0, _C_INT_MAX)
    for name in ('_gamma', 'coef0', 'tol', 'nu', 'epsilon'):
        _real(getattr(estimator, name), name)
    for name in ('_sparse', '_effective_probability'):
        if not isinstance(getattr(estimator, name), (bool, np.bool_)):
            raise _StateError(name, f'is {getattr(estimator, name)!r}, not a boolean')

    classifier = is_classifier(estimator)
    if classifier:
        n_classes = _array(estimator.classes_, 'classes_', 'biufUS', (None,)).shape[0]
        if n_classes < 2:
            raise _StateError('classes_', f'has {n_classes} class(es); a fitted classifier has at least 2')
        n_pairs, n_rows = n_classes * (n_classes - 1) // 2, n_classes - 1
    else:
        n_classes, n_pairs, n_rows = 2, 1, 1  # libsvm's regression model: two "classes", one coefficient row

    support = _array(estimator.support_, 'support_', 'i', (None,), contiguous=True)
    if support.dtype != np.int32:
        raise _StateError('support_', f'has dtype {support.dtype}, libsvm takes int32')
    n_sv = support.shape[0]
    if n_sv and (support.min() < 0 or support.max() >= n_train):
        raise _StateError('support_', f'names training rows outside the {n_train} rows of shape_fit_')
    n_support = _array(estimator._n_support, '_n_support', 'i', (n_classes,), contiguous=True)
    if n_support.dtype != np.int32:
        raise _StateError('_n_support', f'has dtype {n_support.dtype}, libsvm takes int32')
    if np.any(n_support < 0):
        raise _StateError('_n_support', 'has a negative count')
    counted = int(n_support.sum(dtype=np.int64))
    if classifier and counted != n_sv:
        raise _StateError('_n_support', f'counts {counted} support vectors, support_ has {n_sv}')
    if not classifier and np.any(n_support > n_sv):
        raise _StateError('_n_support', f'counts more than the {n_sv} support vectors of support_')

    vectors = estimator.support_vectors_
    sparse_model = bool(estimator._sparse)
    if callable(kernel) or kernel == 'precomputed':
        expected, kinds = (0, 0), 'f'  # the kernel matrix takes the place of the support vectors
    else:
        expected, kinds = (n_sv, n_features), 'f'
    if sparse_model and not (callable(kernel) or kernel == 'precomputed'):
        if not isinstance(vectors, (scipy.sparse.csr_matrix, scipy.sparse.csr_array)):
            raise _StateError('support_vectors_', f'is a {type(vectors).__name__}, but _sparse says a CSR matrix')
        if vectors.shape != expected or vectors.dtype != np.float64:
            raise _StateError('support_vectors_', f'is {vectors.shape} {vectors.dtype}, expected {expected} float64')
    else:
        _array(vectors, 'support_vectors_', kinds, expected, contiguous=True)

    dual = estimator._dual_coef_
    if sparse_model:
        if not isinstance(dual, (scipy.sparse.csr_matrix, scipy.sparse.csr_array)):
            raise _StateError('_dual_coef_', f'is a {type(dual).__name__}, but _sparse says a CSR matrix')
        full_structure = (
            dual.shape == (n_rows, n_sv)
            and dual.dtype == np.float64
            and dual.data.shape == (n_rows * n_sv,)
            and np.array_equal(dual.indptr, np.arange(n_rows + 1) * n_sv)
            and np.array_equal(dual.indices, np.tile(np.arange(n_sv), n_rows))
        )
        if not full_structure:
            raise _StateError(
                '_dual_coef_', f'is not the full {n_rows} x {n_sv} float64 matrix that libsvm reads by position'
            )
    else:
        _array(dual, '_dual_coef_', 'f', (n_rows, n_sv), contiguous=True)
    _array(estimator._intercept_, '_intercept_', 'f', (n_pairs,), contiguous=True)
    _array(estimator.intercept_, 'intercept_', 'f', (n_pairs,))
    n_probability = n_pairs if estimator._effective_probability else 0
    if estimator._effective_probability and not classifier:
        raise _StateError('_effective_probability', 'is set on a regressor')
    for name in ('_probA', '_probB'):
        _array(getattr(estimator, name), name, 'f', (n_probability,), contiguous=True)
    if classifier:
        _array(estimator.class_weight_, 'class_weight_', 'f', (n_classes,), contiguous=True)
    if callable(kernel):
        fitted_rows = estimator.__dict__.get('_BaseLibSVM__Xfit')
        if getattr(fitted_rows, 'shape', None) != (n_train, n_features):
            raise _StateError(
                '_BaseLibSVM__Xfit',
                f'(the training rows the kernel is computed against) is not of shape_fit_ {(n_train, n_features)}',
            )


def _kmeans_state(estimator: t.Any) -> None:
    """MiniBatchKMeans: the Cython assignment loop indexes the centres by the column indices of the features."""
    n_features = _integer(estimator.n_features_in_, 'n_features_in_', 1)
    centres = _array(estimator.cluster_centers_, 'cluster_centers_', 'f', (None, n_features), contiguous=True)
    if centres.shape[0] != estimator.n_clusters or centres.shape[0] < 1:
        raise _StateError('cluster_centers_', f'has {centres.shape[0]} centres, n_clusters is {estimator.n_clusters}')
    _integer(estimator._n_threads, '_n_threads', 1, _C_INT_MAX)


def _tree_state(estimator: t.Any) -> None:
    """Decision trees: nodes are checked at unpickling against the tree's own n_features, which must be the model's."""
    import numpy as np
    from sklearn.base import is_classifier

    n_features = _integer(estimator.n_features_in_, 'n_features_in_', 1)
    tree = estimator.tree_
    if tree.n_features != n_features:
        raise _StateError('tree_', f'has {tree.n_features} features, the model n_features_in_ {n_features}')
    n_outputs = _integer(estimator.n_outputs_, 'n_outputs_', 1)
    if tree.n_outputs != n_outputs:
        raise _StateError('tree_', f'has {tree.n_outputs} outputs, the model n_outputs_ {n_outputs}')
    if is_classifier(estimator) and not np.array_equal(np.atleast_1d(estimator.n_classes_), tree.n_classes):
        raise _StateError('tree_', f'has {list(tree.n_classes)} classes, the model n_classes_ {estimator.n_classes_}')


def _forest_state(estimator: t.Any) -> None:
    """Forests: each tree must be a fitted tree of the forest's kind, of its features, outputs and classes."""
    import numpy as np
    from sklearn.base import is_classifier
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier

    n_features = _integer(estimator.n_features_in_, 'n_features_in_', 1)
    n_outputs = _integer(estimator.n_outputs_, 'n_outputs_', 1)
    trees = estimator.estimators_
    if not isinstance(trees, list) or not trees:
        raise _StateError('estimators_', 'is not a non-empty list of trees')
    if isinstance(estimator, ExtraTreesClassifier):
        kind = ExtraTreeClassifier
    else:
        kind = DecisionTreeClassifier if is_classifier(estimator) else DecisionTreeRegressor
    if is_classifier(estimator):
        classes = estimator.classes_ if n_outputs > 1 else [estimator.classes_]
        counts = np.atleast_1d(estimator.n_classes_)
        if len(classes) != n_outputs or counts.shape != (n_outputs,):
            raise _StateError('n_classes_', f'does not give the classes of {n_outputs} output(s)')
        for number, (labels, count) in enumerate(zip(classes, counts, strict=True)):
            if getattr(labels, 'shape', None) != (count,):
                raise _StateError('n_classes_', f'says {count} classes for output {number}, classes_ has another')
    for number, tree in enumerate(trees):
        if type(tree) is not kind:
            raise _StateError(f'estimators_[{number}]', f'is a {type(tree).__name__}, not a {kind.__name__}')
        if getattr(tree, 'n_features_in_', None) != n_features or getattr(tree, 'n_outputs_', None) != n_outputs:
            raise _StateError(f'estimators_[{number}]', 'has other features or outputs than the forest')
        if is_classifier(estimator) and not np.array_equal(np.atleast_1d(tree.n_classes_), counts):
            raise _StateError(f'estimators_[{number}]', 'has other classes than the forest')


def _scaler_state(estimator: t.Any) -> None:
    """StandardScaler and MaxAbsScaler: one scale (and statistic) per feature."""
    n_features = _integer(estimator.n_features_in_, 'n_features_in_', 1)
    for name in ('scale_', 'max_abs_', 'mean_', 'var_'):
        value = estimator.__dict__.get(name)
        if value is not None:
            _array(value, name, 'f', (n_features,))


def _neighbors_state(estimator: t.Any) -> None:
    """K-nearest neighbours: the stored training rows, their targets and counts agree."""
    import scipy.sparse

    n_features = _integer(estimator.n_features_in_, 'n_features_in_', 1)
    n_samples = _integer(estimator.n_samples_fit_, 'n_samples_fit_', 1)
    rows = estimator._fit_X
    if scipy.sparse.issparse(rows):
        if rows.shape != (n_samples, n_features):
            raise _StateError('_fit_X', f'has shape {rows.shape}, expected {(n_samples, n_features)}')
    else:
        _array(rows, '_fit_X', 'f', (n_samples, n_features))
    if getattr(estimator._y, 'shape', (None,))[0] != n_samples:
        raise _StateError('_y', f'does not hold one target per training row ({n_samples})')


def _pipeline_state(estimator: t.Any) -> None:
    """A pipeline of the package: each step is fitted on the width the previous one gives (scalers keep it)."""
    widths = {name: step.n_features_in_ for name, step in estimator.steps if hasattr(step, 'n_features_in_')}
    if len(set(map(repr, widths.values()))) > 1:
        raise _StateError('steps', f'are fitted on different numbers of features: {widths}')


def _state_checks() -> dict[type, Callable[[t.Any], None]]:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier, RandomForestRegressor
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MaxAbsScaler, StandardScaler
    from sklearn.svm import SVC, SVR, NuSVC
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier

    return {
        **dict.fromkeys((SVC, NuSVC, SVR), _libsvm_state),
        MiniBatchKMeans: _kmeans_state,
        **dict.fromkeys((DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier), _tree_state),
        **dict.fromkeys((RandomForestClassifier, RandomForestRegressor, ExtraTreesClassifier), _forest_state),
        **dict.fromkeys((StandardScaler, MaxAbsScaler), _scaler_state),
        **dict.fromkeys((KNeighborsClassifier, KNeighborsRegressor), _neighbors_state),
        Pipeline: _pipeline_state,
    }


def _estimators_within(obj: t.Any, where: str, seen: set[int]) -> Iterable[tuple[t.Any, str]]:
    """Every scikit-learn estimator reachable through attributes, lists and tuples, with its path from the root."""
    from sklearn.base import BaseEstimator

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from _estimators_within(item, f'{where}[{index}]', seen)
    elif isinstance(obj, BaseEstimator):
        yield obj, where
        for name, value in vars(obj).items():
            if isinstance(value, (BaseEstimator, list, tuple)):
                yield from _estimators_within(value, f'{where}.{name}', seen)


def _is_fitted(estimator: t.Any) -> bool:
    """scikit-learn's convention: fitting sets attributes ending in an underscore (unfitted templates have none)."""
    return any(name.endswith('_') and not name.startswith('__') for name in vars(estimator))


def _shadowed_class_attribute(estimator: t.Any) -> str | None:
    """An instance attribute that hides a plain class attribute (``SVC._impl``, ``_sparse_kernels``): none is fitted."""
    for name in vars(estimator):
        for klass in type(estimator).__mro__:
            if name in vars(klass):
                if not hasattr(type(vars(klass)[name]), '__set__'):  # a property would win over the instance anyway
                    return name
                break
    return None


def check_fitted_state(obj: t.Any, *, source: str = 'the pickle') -> None:
    """Refuse a loaded model whose fitted numbers scikit-learn's fitting never makes, before anything predicts.

    Unpickling sets attributes as the file says, and scikit-learn's compiled prediction code trusts several of them
    without checks (libsvm's support-vector counts and coefficient layout, k-means centres indexed by feature, the
    number of OpenMP threads, a tree's number of features). A forged file with such numbers crashes the interpreter
    or makes it read outside its arrays. The checks here are the invariants of ``fit``: shapes against
    ``n_features_in_``, ``classes_`` and the support vectors, dtypes the compiled code takes, counts that add up.

    :raises UnsafePickleError: naming the estimator, where it is in the model, the attribute and what is wrong.
    """
    checks = _state_checks()
    for estimator, where in _estimators_within(obj, type(obj).__name__, set()):
        name = type(estimator).__name__
        shadowed = _shadowed_class_attribute(estimator)
        check = checks.get(type(estimator))
        try:
            if shadowed is not None:
                raise _StateError(shadowed, f'replaces the {name} class attribute of that name')
            if check is not None and _is_fitted(estimator):
                check(estimator)
        except _StateError as problem:
            _refuse_state(source, name, where, problem.attribute, problem.detail)
        except (AttributeError, TypeError, ValueError) as exception:  # an attribute missing or of another type
            _refuse_state(source, name, where, '?', f'cannot be checked ({type(exception).__name__}: {exception})')


def _refuse_state(source: str, name: str, where: str, attribute: str, detail: str) -> t.NoReturn:
    location = '' if where == name else f' at {where}'
    raise UnsafePickleError(
        f'refusing to load {source}: the fitted {name}{location} is not one that scikit-learn makes: `{attribute}` '
        f"{detail}. scikit-learn's compiled prediction code trusts these numbers (a forged model crashes the "
        'interpreter or reads outside its arrays), so this model is refused; retrain it from its features and '
        'targets, or ask its author for a new copy.'
    )
