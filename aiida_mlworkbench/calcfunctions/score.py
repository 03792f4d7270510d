"""Scoring a trained model on the test rows: a ``Dict`` of metrics and the main score as a ``Float``."""

from __future__ import annotations

import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.calcfunctions.learning_inputs import (
    LearningInputError,
    split_arrays,
    target_array,
    target_description,
)
from aiida_mlworkbench.data import (
    CorruptedFeatureMatrixError,
    CorruptedModelError,
    IncompatibleFeaturesError,
    SparseFeatureMatrix,
    TrainedModel,
)
from aiida_mlworkbench.restricted_pickle import UnsafePickleError

__all__ = (
    'EXIT_CODES',
    'classification_metrics',
    'mean_baseline',
    'prediction_pairs',
    'regression_metrics',
    'score_model',
)


EXIT_CODES = {
    'incompatible_features': ExitCode(330, 'the model cannot score these features: {detail}'),
    'targets_mismatch': ExitCode(331, 'targets has {n_targets} entries but the feature matrix has {n_rows} rows'),
    'unsupported_task': ExitCode(332, 'cannot score a model of task `{task}`: only classification and regression'),
    'undefined_score': ExitCode(333, 'the {name} is undefined on {n_test} test row(s): use a larger test set'),
    'unsafe_model': ExitCode(334, 'the model was refused, nothing of it ran: {detail}'),
    'corrupted_model': ExitCode(335, 'the model cannot be read: {detail}'),
    'corrupted_features': ExitCode(336, 'the feature matrix cannot be read: {detail}'),
    'invalid_split': ExitCode(337, 'invalid split: {detail}'),
    'invalid_targets': ExitCode(338, 'invalid targets: {detail}'),
    'prediction_failed': ExitCode(339, 'the model failed to predict: {detail}'),
}


def _finite_or_none(value: t.Any) -> t.Any:
    """Metrics that are undefined (R2 of a single sample is NaN) are stored as None: the database takes no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    return value


def _labels(values: np.ndarray) -> list:
    return [value.item() if isinstance(value, np.generic) else value for value in values]


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, t.Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix with names."""
    from sklearn import metrics

    classes = np.unique(np.concatenate([truth, predicted]))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0
    )
    return {
        'accuracy': float(metrics.accuracy_score(truth, predicted)),
        'balanced_accuracy': float(metrics.balanced_accuracy_score(truth, predicted)),
        'f1_macro': float(metrics.f1_score(truth, predicted, average='macro', zero_division=0)),
        'per_class': {
            str(label): {
                'precision': float(precision[index]),
                'recall': float(recall[index]),
                'f1': float(f1[index]),
                'support': int(support[index]),
            }
            for index, label in enumerate(classes)
        },
        'confusion_matrix': {
            'labels': _labels(classes),
            'matrix': metrics.confusion_matrix(truth, predicted, labels=classes).tolist(),
            'rows': 'true label',
            'columns': 'predicted label',
        },
    }


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, t.Any]:
    """Mean absolute error, root mean squared error and the coefficient of determination."""
    from sklearn import metrics

    return {
        'mae': float(metrics.mean_absolute_error(truth, predicted)),
        'rmse': float(np.sqrt(metrics.mean_squared_error(truth, predicted))),
        'r2': float(metrics.r2_score(truth, predicted)),
    }


def mean_baseline(truth: np.ndarray, train_truth: np.ndarray) -> dict[str, t.Any]:
    """The regression metrics of predicting the mean of the training targets for every row: what a model must beat."""
    baseline = regression_metrics(truth, np.full(truth.shape, float(np.mean(train_truth))))
    baseline['predicted'] = float(np.mean(train_truth))
    return baseline


def prediction_pairs(
    rows: np.ndarray, truth: np.ndarray, predicted: np.ndarray, description: dict[str, t.Any], task: str
) -> orm.ArrayData:
    """The predicted and true value of each test row: a parity plot or a confusion matrix needs the graph only."""
    pairs = orm.ArrayData()
    pairs.set_array('rows', np.asarray(rows, dtype=np.int64))
    kind = str if task == 'classification' else float
    pairs.set_array('true', np.asarray(truth).astype(kind))
    pairs.set_array('predicted', np.asarray(predicted).astype(kind))
    pairs.base.attributes.set_many({'task': task, 'set': 'test', **description})
    return pairs


@calcfunction
def score_model(
    model: TrainedModel, features: SparseFeatureMatrix, targets: orm.ArrayData, split: orm.ArrayData
) -> dict[str, orm.Data]:
    """Score ``model`` on the ``test`` rows of ``split`` (and, for comparison, on the ``train`` rows).

    Outputs ``metrics`` (``Dict``: for classification accuracy, balanced accuracy, macro F1, per-class precision and
    recall, the confusion matrix with class names; for regression MAE, RMSE and R2 beside the ``baseline`` of always
    predicting the mean training target, in the unit of the targets), ``score`` (``Float``: the test accuracy, or the
    test R2 for regression) and ``predictions`` (``ArrayData``: the arrays ``rows``, ``true`` and ``predicted`` of
    the test rows, for a parity plot or a confusion matrix drawn from the graph alone).

    Every problem of the inputs is an exit code of :data:`EXIT_CODES`, never an exception: a model that the restricted
    loader refuses (334) or cannot read (335), a feature file that fails its checks (336), a split without integer row
    indices within the matrix (337), targets without the array ``targets`` (338), a model that fails to predict (339).
    """
    task = model.base.attributes.get('task')
    if task not in ('classification', 'regression'):
        return EXIT_CODES['unsupported_task'].format(task=task)
    try:
        labels = target_array(targets)
        if labels.shape[0] != features.n_rows:
            return EXIT_CODES['targets_mismatch'].format(n_targets=labels.shape[0], n_rows=features.n_rows)
        rows = split_arrays(split, features.n_rows, sides=('train', 'test'))
    except LearningInputError as exception:
        name = 'invalid_targets' if exception.name.endswith('targets') else 'invalid_split'
        return EXIT_CODES[name].format(detail=str(exception))
    test, train = rows['test'], rows['train']
    try:
        model.check_features(features)
    except IncompatibleFeaturesError as exception:
        return EXIT_CODES['incompatible_features'].format(detail=str(exception))

    # Load the model before reading any feature, so that a refused or unreadable model is named as such.
    try:
        model._estimator_for_prediction(())
    except UnsafePickleError as exception:
        return EXIT_CODES['unsafe_model'].format(
            detail=f'{exception} Do not use this model; retrain it from the features and targets, or ask its author.'
        )
    except CorruptedModelError as exception:
        return EXIT_CODES['corrupted_model'].format(detail=str(exception))

    measure = classification_metrics if task == 'classification' else regression_metrics
    main = 'accuracy' if task == 'classification' else 'r2'
    try:
        predicted = model.predict(features, rows=test)
        metrics = measure(labels[test], predicted)
        train_metrics = measure(labels[train], model.predict(features, rows=train))
    except CorruptedFeatureMatrixError as exception:
        return EXIT_CODES['corrupted_features'].format(
            detail=f'{exception} Featurize the structures again, or re-import the features from a trusted archive.'
        )
    except Exception as exception:  # a model inconsistent with itself can fail in any way; it must not crash
        return EXIT_CODES['prediction_failed'].format(
            detail=f'{type(exception).__name__}: {exception}. The model is inconsistent with itself or with these '
            'targets: retrain it on these features and targets.'
        )
    description = target_description(targets)
    metrics.update(
        {'task': task, 'n_test': int(test.size), 'n_train': int(train.size), f'train_{main}': train_metrics[main]}
    )
    if task == 'regression':
        metrics['baseline'] = mean_baseline(labels[test], labels[train])
    metrics.update(description)
    metrics = _finite_or_none(metrics)
    if metrics[main] is None:
        return EXIT_CODES['undefined_score'].format(name=main, n_test=int(test.size))
    return {
        'metrics': orm.Dict(metrics),
        'score': orm.Float(metrics[main]),
        'predictions': prediction_pairs(test, labels[test], predicted, description, task),
    }
