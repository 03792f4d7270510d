"""Data type for a fitted scikit-learn estimator: the pickle in the repository, what it is in queryable attributes.

Loading goes through :mod:`aiida_mlworkbench.restricted_pickle`, because a model can arrive in an archive from
someone else, and unpickling an arbitrary file runs arbitrary code.

Stored format: the repository file ``model.pkl`` is the estimator pickled with protocol 5 (attribute
``pickle_protocol``); the attribute ``checksum`` is ``sha256:`` and the hex digest of that file. What the pickle may
contain is the reviewed list of :data:`aiida_mlworkbench.restricted_pickle.ADMITTED_CLASSES` (plus the modules named
in ``trusted``): a model that needs anything else is refused when it is created, not when a colleague loads it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import platform
import typing as t
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from aiida.orm import Data

from aiida_mlworkbench.restricted_pickle import UnsafePickleError, restricted_loads

if t.TYPE_CHECKING:
    from aiida_mlworkbench.data.sparse_features import SparseFeatureMatrix

__all__ = ('CorruptedModelError', 'IncompatibleFeaturesError', 'ModelVersionWarning', 'TrainedModel')

PICKLE_PROTOCOL = 5
#: Rows of a stored feature matrix that :meth:`TrainedModel.predict` reads at once by default.
PREDICT_BLOCK_SIZE = 4096


class CorruptedModelError(Exception):
    """The pickle in the repository is not the one that was stored (checksum mismatch), or it cannot be read."""


class IncompatibleFeaturesError(ValueError):
    """The features given to a model are not of the kind it was trained on."""


class ModelVersionWarning(UserWarning):
    """The model was saved with other library versions than the ones loading it."""


def public_class_path(cls: type) -> str:
    """Dotted path of a class under its shortest public module, e.g. ``sklearn.svm.SVC`` for ``sklearn.svm._classes``.

    Users query for the name they import, not for the private module that defines it.
    """
    parts = cls.__module__.split('.')
    for depth in range(1, len(parts) + 1):
        candidate = '.'.join(parts[:depth])
        if any(part.startswith('_') for part in parts[1:depth]):
            continue
        try:
            if getattr(importlib.import_module(candidate), cls.__qualname__, None) is cls:
                return f'{candidate}.{cls.__qualname__}'
        except ImportError:
            continue
    return f'{cls.__module__}.{cls.__qualname__}'


def _json_safe(value: t.Any) -> t.Any:
    """Turn a hyper-parameter into something JSON can hold: estimators and callables by their class path."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, type):
        return public_class_path(value)
    if hasattr(value, 'get_params'):
        return {'class': public_class_path(type(value)), 'params': _json_safe(value.get_params(deep=False))}
    if callable(value) and hasattr(value, '__qualname__'):
        return f'{getattr(value, "__module__", "")}.{value.__qualname__}'
    return repr(value)


def _is_fitted(estimator: t.Any) -> bool:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide whether a pickled estimator loads and behaves the same."""
    import scipy
    import sklearn

    return {
        'python': platform.python_version(),
        'sklearn': sklearn.__version__,
        'numpy': np.__version__,
        'scipy': scipy.__version__,
    }


class TrainedModel(Data):
    """A fitted scikit-learn estimator (a ``Pipeline`` too), pickled in the repository.

    Queryable attributes: ``estimator_class`` (public class path, e.g. ``sklearn.svm.SVC``), ``final_estimator_class``
    (the last step of a pipeline, or the estimator itself), ``steps``, ``hyperparameters``, ``task``,
    ``n_features_in``, ``classes``, ``versions``, ``checksum``, ``descriptor`` (parameters of the features the model
    was trained on, so that predicting on incompatible features fails clearly) and, when ``train_model`` made it,
    ``target`` (what it learned: kind, quantity, key path and unit, so that its predictions carry the unit).
    """

    FILENAME = 'model.pkl'

    def __init__(
        self,
        estimator: t.Any = None,
        *,
        descriptor: Mapping[str, t.Any] | None = None,
        trusted: Iterable[str] = (),
        **kwargs: t.Any,
    ) -> None:
        """
        :param estimator: a fitted scikit-learn estimator.
        :param descriptor: parameters of the descriptor of the training features (``SparseFeatureMatrix.descriptor``).
        :param trusted: modules that the estimator needs beyond the admitted classes of
            :data:`~aiida_mlworkbench.restricted_pickle.ADMITTED_CLASSES` (its own code); they are recorded, and whoever
            loads the model has to trust them too.
        """
        super().__init__(**kwargs)
        if estimator is not None:
            self._set_estimator(estimator, descriptor=descriptor, trusted=tuple(trusted))

    def _set_estimator(self, estimator: t.Any, *, descriptor: Mapping[str, t.Any] | None, trusted: tuple) -> None:
        from sklearn.base import is_classifier, is_regressor

        if not hasattr(estimator, 'get_params'):
            raise TypeError(f'expected a scikit-learn estimator, got {type(estimator).__name__}')
        if not _is_fitted(estimator):
            raise ValueError(
                f'the {type(estimator).__name__} estimator is not fitted: call fit() on it before storing it as a '
                'TrainedModel'
            )
        descriptor = dict(descriptor or {})
        try:
            json.dumps(descriptor)
        except TypeError as exception:
            raise ValueError(f'descriptor parameters must be JSON-serialisable: {exception}') from exception

        content = pickle.dumps(estimator, protocol=PICKLE_PROTOCOL)
        # Fail now, not when a colleague imports the archive: what is stored must load with the restricted loader.
        restricted_loads(content, trusted=trusted, source=f'the {type(estimator).__name__} estimator')

        steps = getattr(estimator, 'steps', None)
        final = steps[-1][1] if steps else estimator
        task = 'classification' if is_classifier(estimator) else 'regression' if is_regressor(estimator) else 'other'
        attributes: dict[str, t.Any] = {
            'estimator_class': public_class_path(type(estimator)),
            'final_estimator_class': public_class_path(type(final)),
            'steps': [{'name': name, 'class': public_class_path(type(step))} for name, step in steps or []],
            'hyperparameters': _json_safe(estimator.get_params(deep=False)),
            'final_estimator_hyperparameters': _json_safe(final.get_params(deep=False)),
            'task': task,
            'n_features_in': int(getattr(estimator, 'n_features_in_', getattr(final, 'n_features_in_', -1))),
            'versions': library_versions(),
            'checksum': f'sha256:{hashlib.sha256(content).hexdigest()}',
            'descriptor': descriptor,
            'trusted_modules': list(trusted),
            'pickle_protocol': PICKLE_PROTOCOL,
        }
        classes = getattr(estimator, 'classes_', None)
        if classes is not None:
            attributes['classes'] = _json_safe(list(classes))
        self.base.attributes.set_many(attributes)
        self.base.repository.put_object_from_bytes(content, self.FILENAME)
        self._estimator_cache = estimator

    def _validate(self) -> bool:
        super()._validate()
        if self.FILENAME not in self.base.repository.list_object_names():
            raise ValueError('this TrainedModel holds no estimator: build it with TrainedModel(fitted_estimator)')
        return True

    # Queryable properties ---------------------------------------------------------------------------------------

    @property
    def estimator_class(self) -> str:
        return self.base.attributes.get('estimator_class')

    @property
    def hyperparameters(self) -> dict[str, t.Any]:
        return self.base.attributes.get('hyperparameters')

    @property
    def n_features_in(self) -> int:
        return self.base.attributes.get('n_features_in')

    @property
    def classes(self) -> list | None:
        return self.base.attributes.get('classes')

    @property
    def descriptor(self) -> dict[str, t.Any]:
        return self.base.attributes.get('descriptor', {})

    @property
    def target(self) -> dict[str, t.Any]:
        return self.base.attributes.get('target', {})

    @property
    def versions(self) -> dict[str, str]:
        return self.base.attributes.get('versions')

    @property
    def checksum(self) -> str:
        return self.base.attributes.get('checksum')

    def __str__(self) -> str:
        return f'{type(self).__name__}<{self.pk or "unstored"}>: {self.base.attributes.get("final_estimator_class")}'

    # Loading and predicting -------------------------------------------------------------------------------------

    def load(self, *, trusted: Iterable[str] = ()) -> t.Any:
        """Return the fitted estimator, unpickled with the restricted unpickler.

        :param trusted: extra modules you trust (their globals are admitted); the modules recorded at creation in the
            ``trusted_modules`` attribute are *not* trusted automatically, because the attribute comes with the file.
        :raises CorruptedModelError: if the stored pickle does not match the stored checksum, or cannot be read.
        :raises aiida_mlworkbench.restricted_pickle.UnsafePickleError: if the pickle asks for anything not admitted
            (nothing of it ran), or builds a fitted state that scikit-learn's ``fit`` never makes (forged numbers that
            its compiled prediction code would trust; see
            :func:`~aiida_mlworkbench.restricted_pickle.check_fitted_state`).
        """
        cached = getattr(self, '_estimator_cache', None)
        if cached is not None and not self.is_stored:
            return cached
        content = self.base.repository.get_object_content(self.FILENAME, mode='rb')
        if f'sha256:{hashlib.sha256(content).hexdigest()}' != self.checksum:
            raise CorruptedModelError(
                f'the pickle of TrainedModel<{self.pk}> does not match its checksum: the file was corrupted or '
                'tampered with. Retrain the model or re-import it from a trusted archive.'
            )
        saved, current = self.versions or {}, library_versions()
        differing = {
            key: (saved.get(key), current[key]) for key in ('sklearn', 'numpy') if saved.get(key) != current[key]
        }
        if differing:
            described = ', '.join(f'{key} {old} (saved) vs {new} (now)' for key, (old, new) in differing.items())
            warnings.warn(
                f'TrainedModel<{self.pk}> was saved with other library versions: {described}. It may predict '
                'differently; retrain it with the current versions to be sure.',
                ModelVersionWarning,
                stacklevel=2,
            )
        try:
            return restricted_loads(content, trusted=trusted, source=f'TrainedModel<{self.pk}>')
        except UnsafePickleError:
            raise
        except Exception as exception:
            # The checksum matches, so the file is the one the archive brought: malformed or forged, not damaged.
            raise CorruptedModelError(
                f'the pickle of TrainedModel<{self.pk}> cannot be read ({type(exception).__name__}: {exception}): '
                'it was not written by TrainedModel. Retrain the model or re-import it from a trusted archive.'
            ) from exception

    def _estimator_for_prediction(self, trusted: tuple[str, ...]) -> t.Any:
        """The estimator that :meth:`predict` uses: of a stored (immutable) node, loaded and checked once.

        :meth:`load` always returns a fresh object, since callers may modify it; predictions never do.
        """
        if not self.is_stored:
            return self.load(trusted=trusted)
        cache = self.__dict__.setdefault('_prediction_estimators', {})
        if trusted not in cache:
            cache[trusted] = self.load(trusted=trusted)
        return cache[trusted]

    def check_features(self, features: SparseFeatureMatrix | t.Any) -> None:
        """Raise :class:`IncompatibleFeaturesError` if ``features`` are not of the kind this model was trained on."""
        from aiida_mlworkbench.data.sparse_features import SparseFeatureMatrix

        n_features = features.n_features if isinstance(features, SparseFeatureMatrix) else features.shape[1]
        if self.n_features_in >= 0 and n_features != self.n_features_in:
            raise IncompatibleFeaturesError(
                f'the model was trained on {self.n_features_in} features but got {n_features}: featurize with the '
                f'same descriptor ({self.descriptor or "see the training features"})'
            )
        if isinstance(features, SparseFeatureMatrix) and self.descriptor and features.descriptor:
            differing = sorted(
                key
                for key in set(self.descriptor) | set(features.descriptor)
                if self.descriptor.get(key) != features.descriptor.get(key)
            )
            if differing:
                raise IncompatibleFeaturesError(
                    f'the features were made with another descriptor than the training features; differing '
                    f'parameters: {", ".join(differing)}'
                )

    def predict(
        self,
        features: SparseFeatureMatrix | t.Any,
        *,
        rows: slice | Iterable[int] | None = None,
        block_size: int | None = None,
        trusted: Iterable[str] = (),
    ) -> np.ndarray:
        """Predict for a :class:`SparseFeatureMatrix` (all rows, or ``rows``) or a scipy sparse matrix.

        A stored matrix is read block by block, also for ``rows``, so memory stays bounded by ``block_size`` rows
        of the file whatever the number of rows predicted.

        :param block_size: rows read at once; by default ``PREDICT_BLOCK_SIZE``.
        """
        from aiida_mlworkbench.data.sparse_features import SparseFeatureMatrix

        block_size = block_size or PREDICT_BLOCK_SIZE

        self.check_features(features)
        estimator = self._estimator_for_prediction(tuple(trusted))
        if not isinstance(features, SparseFeatureMatrix):
            return estimator.predict(features if rows is None else features[rows])
        if rows is None:
            return np.concatenate([estimator.predict(block) for block in features.iter_blocks(block_size)])
        predicted = [
            (positions, estimator.predict(block)) for positions, block in features.iter_row_blocks(rows, block_size)
        ]
        if not predicted:  # no rows: let the estimator say what it makes of that
            return estimator.predict(features.get_rows(rows))
        result = np.empty(
            sum(positions.size for positions, _ in predicted),
            dtype=np.result_type(*(values for _, values in predicted)),
        )
        for positions, values in predicted:
            result[positions] = values
        return result
