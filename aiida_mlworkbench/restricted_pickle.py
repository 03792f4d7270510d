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
  and within its shape, a decision tree's nodes point to later nodes of the tree and to features of the tree.

What was reviewed for every admitted class (scikit-learn 1.9, NumPy 2.4, SciPy 1.17): its constructor, ``__new__``,
``__reduce__``/``__setstate__``, ``__setitem__``/``append``/``extend`` and ``__getattr__``. The scikit-learn estimators
inherit ``BaseEstimator.__setstate__`` (a version check, then ``__dict__.update``) and their constructors store their
parameters; the Cython loss functions rebuild from numbers through ``__reduce__``; ``Tree.__setstate__`` copies two
arrays whose dtype and shape it checks; the NumPy bit generator and seed sequence set a validated state; the CSR
classes have no ``__setstate__`` (``__dict__.update``). None opens a file, imports a module or evaluates a string.

The pure-Python unpickler (``pickle._Unpickler``) is used because the C one cannot be told what it may call. Models
are mostly large arrays, which are single opcodes, so it costs little: a 16 MB forest of 200 trees loads in 63 ms
instead of 9 ms, a 2.5 MB SVM pipeline in 2 ms.
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
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    :raises UnsafePickleError: if the pickle asks for a global or an operation that is not admitted.
    """
    return RestrictedUnpickler(io.BytesIO(data), trusted=trusted, source=source).load()
