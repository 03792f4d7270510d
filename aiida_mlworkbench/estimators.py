"""Estimator specifications: a JSON-able dictionary in, a validated scikit-learn pipeline out.

An estimator is recorded in the provenance graph as a ``Dict`` such as::

    {
        'estimator': 'SVC',                                    # a name from ESTIMATORS
        'parameters': {'kernel': 'linear'},                    # its constructor parameters
        'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},   # optional, or None
        'kernel': {'name': 'soap', 'xi': 2},                   # optional: the normalised SOAP kernel
        'training': {'mode': 'incremental', 'epochs': 5},      # optional: out-of-core training, see below
    }

Only names from an allow-list are accepted, so a specification cannot instantiate arbitrary code, and every parameter is
checked against scikit-learn's own constraints before anything is fitted.

The optional ``training`` key chooses how the estimator is fitted (:class:`TrainingOptions`): ``'in_memory'`` (the
default) reads all train rows and calls ``fit``; ``'incremental'`` streams them from the HDF5 file in blocks through
``partial_fit``, so memory does not grow with the number of rows. Only the estimators of
``INCREMENTAL_ESTIMATORS`` can learn incrementally.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing as t
from collections.abc import Mapping

import numpy as np
import scipy.sparse
from sklearn.gaussian_process.kernels import Kernel as GaussianProcessKernel

__all__ = (
    'ESTIMATORS',
    'INCREMENTAL_ESTIMATORS',
    'SCALERS',
    'EstimatorSpecificationError',
    'NormalizedSoapKernel',
    'TrainingOptions',
    'build_estimator',
    'training_options',
    'validate_estimator_specification',
)

#: Estimators that a specification may name, with the class they stand for.
ESTIMATORS: dict[str, str] = {
    name: f'{module}.{name}'
    for module, names in {
        'sklearn.svm': ('SVC', 'LinearSVC', 'SVR', 'LinearSVR', 'NuSVC'),
        'sklearn.linear_model': (
            'LogisticRegression',
            'RidgeClassifier',
            'Ridge',
            'Lasso',
            'ElasticNet',
            'SGDClassifier',
            'SGDRegressor',
            'PassiveAggressiveClassifier',
            'PassiveAggressiveRegressor',
            'Perceptron',
        ),
        'sklearn.kernel_ridge': ('KernelRidge',),
        'sklearn.ensemble': ('RandomForestClassifier', 'RandomForestRegressor', 'ExtraTreesClassifier'),
        'sklearn.neighbors': ('KNeighborsClassifier', 'KNeighborsRegressor'),
        'sklearn.naive_bayes': ('MultinomialNB', 'BernoulliNB'),
        'sklearn.cluster': ('MiniBatchKMeans',),
        'sklearn.dummy': ('DummyClassifier', 'DummyRegressor'),
    }.items()
    for name in names
}

#: Scalers that a specification may name. None of them centres sparse data (that would densify it).
SCALERS: dict[str, str] = {
    'StandardScaler': 'sklearn.preprocessing.StandardScaler',
    'MaxAbsScaler': 'sklearn.preprocessing.MaxAbsScaler',
    'Normalizer': 'sklearn.preprocessing.Normalizer',
}

#: Estimators that accept a callable kernel.
KERNEL_ESTIMATORS = ('SVC', 'SVR', 'NuSVC', 'KernelRidge')

#: Estimators that can learn block by block with ``partial_fit``, with their default number of epochs (passes over
#: the train rows). The naive Bayes classifiers count: one pass is their exact ``fit``, a second would count twice.
INCREMENTAL_ESTIMATORS: dict[str, int] = {
    'SGDClassifier': 5,
    'SGDRegressor': 5,
    'PassiveAggressiveClassifier': 5,
    'PassiveAggressiveRegressor': 5,
    'Perceptron': 5,
    'MiniBatchKMeans': 5,
    'MultinomialNB': 1,
    'BernoulliNB': 1,
}
SINGLE_PASS_ESTIMATORS = ('MultinomialNB', 'BernoulliNB')

TRAINING_MODES = ('in_memory', 'incremental')
#: Rows per block: a block of SOAP rows at n_max = l_max = 9 is about 20 MB, and every partial_fit call costs time in
#: proportion to the number of features, whatever the rows, so larger blocks are faster.
DEFAULT_BLOCK_SIZE = 1024

KNOWN_KEYS = {'estimator', 'parameters', 'scaler', 'kernel', 'training'}


class EstimatorSpecificationError(ValueError):
    """The estimator specification names something not allowed, or parameters that scikit-learn refuses."""


class NormalizedSoapKernel(GaussianProcessKernel):
    """The normalised SOAP kernel K(p, q) = (p.q / sqrt(p.p q.q)) ** xi, for SVC, SVR, NuSVC and KernelRidge.

    Works on sparse feature matrices without densifying them: only the (n_samples x n_samples) Gram matrix is dense.
    It is a scikit-learn Gaussian-process ``Kernel`` because ``KernelRidge`` hands a plain callable one pair of rows at
    a time (``pairwise_kernels`` expects a number per pair: n**2 Python calls, and a 1 x 1 array from sparse rows
    fails with "setting an array element with a sequence"), while a ``Kernel`` it calls once on whole matrices, as
    the SVMs call any callable kernel.
    """

    def __init__(self, xi: float = 2.0) -> None:
        self.xi = xi

    def __call__(self, X: t.Any, Y: t.Any = None, eval_gradient: bool = False) -> np.ndarray:  # noqa: N803
        from sklearn.utils.extmath import row_norms

        if eval_gradient:
            raise ValueError('NormalizedSoapKernel has no hyper-parameters to differentiate by: its xi is fixed')
        second = X if Y is None else Y
        gram = X @ second.T
        gram = gram.toarray() if scipy.sparse.issparse(gram) else np.asarray(gram)
        denominator = np.outer(row_norms(X), row_norms(second))
        with np.errstate(divide='ignore', invalid='ignore'):
            normalised = np.where(denominator > 0, gram / denominator, 0.0)
        return normalised**self.xi

    def diag(self, X: t.Any) -> np.ndarray:  # noqa: N803
        """K(p, p): 1 for every row that is not all zeros (whose kernel is 0 by definition)."""
        from sklearn.utils.extmath import row_norms

        return (row_norms(X) > 0).astype(float)

    def is_stationary(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f'NormalizedSoapKernel(xi={self.xi})'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NormalizedSoapKernel) and other.xi == self.xi

    def __hash__(self) -> int:
        return hash(('NormalizedSoapKernel', self.xi))


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """How an estimator is fitted: the ``training`` key of the specification, validated, with defaults filled in.

    ``mode='in_memory'``: the train rows are read at once and ``fit`` is called (any estimator).
    ``mode='incremental'``: ``epochs`` passes over the train rows, read in blocks of at most ``block_size``
    consecutive rows of the feature file, each block given to ``partial_fit``; the scaler is fitted the same way
    first. ``shuffle_seed`` seeds the order of the blocks and of the rows within each block in every epoch; with
    ``None`` they come in file order.
    """

    mode: str = 'in_memory'
    epochs: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    shuffle_seed: int | None = 0

    @property
    def incremental(self) -> bool:
        return self.mode == 'incremental'

    def as_dict(self) -> dict[str, t.Any]:
        """The options as stored in the ``training`` attribute of a ``TrainedModel``."""
        if not self.incremental:
            return {'mode': self.mode}
        return dataclasses.asdict(self)


def _positive_integer(options: Mapping[str, t.Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EstimatorSpecificationError(f'training {key} must be a positive integer, got {value!r}')
    return int(value)


def training_options(specification: Mapping[str, t.Any]) -> TrainingOptions:
    """Return the validated :class:`TrainingOptions` of a specification (its ``training`` key).

    :raises EstimatorSpecificationError: naming what is wrong, for example incremental training of an estimator that
        has no ``partial_fit``.
    """
    options = specification.get('training')
    if options is None:
        return TrainingOptions()
    if not isinstance(options, Mapping):
        raise EstimatorSpecificationError(
            f"training must be a dictionary such as {{'mode': 'incremental', 'epochs': 5}}, got {options!r}"
        )
    mode = options.get('mode', 'in_memory')
    if not isinstance(mode, str) or mode not in TRAINING_MODES:
        raise EstimatorSpecificationError(f'unknown training mode {mode!r}: choose one of {", ".join(TRAINING_MODES)}')
    if mode == 'in_memory':
        if set(options) - {'mode'}:
            extra = ', '.join(map(repr, sorted(set(options) - {'mode'})))
            raise EstimatorSpecificationError(f"training key(s) {extra} apply only to mode 'incremental'")
        return TrainingOptions()

    unknown = sorted(set(options) - {'mode', 'epochs', 'block_size', 'shuffle_seed'})
    if unknown:
        raise EstimatorSpecificationError(
            f'unknown training key(s) {", ".join(map(repr, unknown))}; known: block_size, epochs, mode, shuffle_seed'
        )
    name = specification.get('estimator')
    if name not in INCREMENTAL_ESTIMATORS:
        raise EstimatorSpecificationError(
            f'{name} cannot be trained incrementally (it has no partial_fit): use training mode in_memory, or one of '
            f'{", ".join(INCREMENTAL_ESTIMATORS)}'
        )
    epochs = _positive_integer(options, 'epochs', INCREMENTAL_ESTIMATORS[name])
    if name in SINGLE_PASS_ESTIMATORS and epochs != 1:
        raise EstimatorSpecificationError(
            f'{name} learns by counting, so one pass over the data is its complete fit: use epochs 1, not {epochs}'
        )
    block_size = _positive_integer(options, 'block_size', DEFAULT_BLOCK_SIZE)
    seed = options.get('shuffle_seed', 0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise EstimatorSpecificationError(f'training shuffle_seed must be a non-negative integer or None, got {seed!r}')

    parameters = _parameter_mapping(specification.get('parameters'), f'parameters of {name}')
    if parameters.get('early_stopping'):
        raise EstimatorSpecificationError(
            f'early_stopping needs the whole train set at once (fit): set it to False to train {name} incrementally'
        )
    if parameters.get('class_weight') == 'balanced':
        raise EstimatorSpecificationError(
            "class_weight 'balanced' needs the whole train set at once (fit): give explicit class weights to train "
            f'{name} incrementally'
        )
    return TrainingOptions('incremental', epochs, block_size, None if seed is None else int(seed))


def _import(path: str) -> type:
    module, name = path.rsplit('.', 1)
    return getattr(importlib.import_module(module), name)


def _check_parameters(cls: type, parameters: Mapping[str, t.Any], what: str) -> t.Any:
    """Instantiate ``cls`` and let scikit-learn check the parameters against its constraints, without fitting."""
    from sklearn.utils._param_validation import InvalidParameterError

    known = set(cls().get_params(deep=False))
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise EstimatorSpecificationError(
            f'{what} has no parameter {", ".join(map(repr, unknown))}; its parameters are: {", ".join(sorted(known))}'
        )
    instance = cls(**parameters)
    validate = getattr(instance, '_validate_params', None)
    if validate is not None:
        try:
            validate()
        except (InvalidParameterError, TypeError, ValueError) as exception:
            raise EstimatorSpecificationError(f'invalid parameter for {what}: {exception}') from None
    return instance


def _parameter_mapping(value: t.Any, what: str) -> dict[str, t.Any]:
    """Return ``value`` (``None`` or a mapping of parameter names to JSON-like values) as a dictionary, or refuse it."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EstimatorSpecificationError(
            f"{what} must be a dictionary of parameter names to values, such as {{'C': 1.0}}, got {value!r}"
        )
    not_names = [key for key in value if not isinstance(key, str)]
    if not_names:
        raise EstimatorSpecificationError(f'{what} names must be strings, got {not_names!r}')
    for key, item in value.items():
        _check_finite(item, f'{what} {key!r}')
    return dict(value)


def _check_finite(value: t.Any, what: str) -> None:
    """Refuse NaN and infinities anywhere in a parameter value: scikit-learn accepts some of them, then fails."""
    if isinstance(value, float) and not np.isfinite(value):
        raise EstimatorSpecificationError(f'{what} must be a finite number, got {value!r}')
    if isinstance(value, Mapping):
        for item in value.values():
            _check_finite(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(item, what)


def _scaler_specification(scaler: t.Any) -> tuple[str, dict[str, t.Any]] | None:
    usage = f"scaler must be None, a name ({', '.join(SCALERS)}) or {{'name': ..., 'parameters': {{...}}}}"
    if scaler is None:
        return None
    if isinstance(scaler, str):
        name, parameters = scaler, {}
    elif isinstance(scaler, Mapping) and 'name' in scaler:
        unknown = sorted(map(str, set(scaler) - {'name', 'parameters'}))
        if unknown:
            raise EstimatorSpecificationError(f'{usage}; unknown scaler key(s) {unknown}')
        name, parameters = scaler['name'], _parameter_mapping(scaler.get('parameters'), 'scaler parameters')
    else:
        raise EstimatorSpecificationError(f'{usage}, got {scaler!r}')
    if not isinstance(name, str) or name not in SCALERS:
        raise EstimatorSpecificationError(f'unknown scaler {name!r}: choose one of {", ".join(SCALERS)}')
    return name, parameters


def _soap_kernel(kernel: t.Any, name: str, parameters: Mapping[str, t.Any]) -> NormalizedSoapKernel:
    if name not in KERNEL_ESTIMATORS:
        raise EstimatorSpecificationError(
            f'a kernel can be given only to {", ".join(KERNEL_ESTIMATORS)}, not to {name}'
        )
    if not isinstance(kernel, Mapping) or kernel.get('name') != 'soap' or set(kernel) - {'name', 'xi'}:
        raise EstimatorSpecificationError(f"kernel must be {{'name': 'soap', 'xi': <number>}}, got {kernel!r}")
    if 'kernel' in parameters:
        raise EstimatorSpecificationError('give either the `kernel` key or a `kernel` parameter, not both')
    xi = kernel.get('xi', 2)
    if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not np.isfinite(xi) or xi <= 0:
        raise EstimatorSpecificationError(f'the SOAP kernel exponent xi must be a positive number, got {xi!r}')
    return NormalizedSoapKernel(xi)


def build_estimator(specification: Mapping[str, t.Any]) -> t.Any:
    """Return the unfitted scikit-learn estimator (a ``Pipeline`` if a scaler is given) that the specification names.

    :raises EstimatorSpecificationError: naming what is wrong, before anything is fitted.
    """
    from sklearn.pipeline import Pipeline

    if not isinstance(specification, Mapping):
        raise EstimatorSpecificationError(
            f"an estimator specification is a dictionary such as {{'estimator': 'SVC'}}, got {specification!r}"
        )
    unknown = sorted(map(str, set(specification) - KNOWN_KEYS))
    if unknown:
        raise EstimatorSpecificationError(
            f'unknown key(s) {", ".join(map(repr, unknown))} in the estimator specification; known: '
            f'{", ".join(sorted(KNOWN_KEYS))}'
        )
    name = specification.get('estimator')
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise EstimatorSpecificationError(f'unknown estimator {name!r}: choose one of {", ".join(sorted(ESTIMATORS))}')
    parameters = _parameter_mapping(specification.get('parameters'), f'parameters of {name}')
    kernel = specification.get('kernel')
    if kernel is not None:
        parameters['kernel'] = _soap_kernel(kernel, name, parameters)
    estimator = _check_parameters(_import(ESTIMATORS[name]), parameters, name)
    training_options(specification)

    scaler = _scaler_specification(specification.get('scaler'))
    if scaler is None:
        return estimator
    scaler_name, scaler_parameters = scaler
    if scaler_name == 'StandardScaler':
        if scaler_parameters.get('with_mean', False):
            raise EstimatorSpecificationError(
                'StandardScaler with with_mean=True would centre, and so densify, the sparse feature matrix; '
                'use with_mean=False'
            )
        scaler_parameters['with_mean'] = False
    scaler_instance = _check_parameters(_import(SCALERS[scaler_name]), scaler_parameters, scaler_name)
    return Pipeline([('scaler', scaler_instance), ('estimator', estimator)])


def validate_estimator_specification(specification: Mapping[str, t.Any]) -> str | None:
    """Port validator: return an error message for an invalid specification, ``None`` if it is valid."""
    try:
        build_estimator(specification)
    except EstimatorSpecificationError as exception:
        return f'invalid estimator specification: {exception}'
    return None
