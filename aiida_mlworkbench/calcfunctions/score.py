"""Scoring a trained model on the test rows: a ``Dict`` of metrics and the main score as a ``Float``."""

from __future__ import annotations

import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.data import IncompatibleFeaturesError, SparseFeatureMatrix, TrainedModel

__all__ = ('EXIT_CODES', 'classification_metrics', 'regression_metrics', 'score_model')

EXIT_CODES = {
    'incompatible_features': ExitCode(330, 'the model cannot score these features: {detail}'),
    'targets_mismatch': ExitCode(331, 'targets has {n_targets} entries but the feature matrix has {n_rows} rows'),
    'unsupported_task': ExitCode(332, 'cannot score a model of task `{task}`: only classification and regression'),
    'undefined_score': ExitCode(333, 'the {name} is undefined on {n_test} test row(s): use a larger test set'),
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


@calcfunction
def score_model(
    model: TrainedModel, features: SparseFeatureMatrix, targets: orm.ArrayData, split: orm.ArrayData
) -> dict[str, orm.Data]:
    """Score ``model`` on the ``test`` rows of ``split`` (and, for comparison, on the ``train`` rows).

    Outputs ``metrics`` (``Dict``: for classification accuracy, balanced accuracy, macro F1, per-class precision and
    recall, the confusion matrix with class names; for regression MAE, RMSE and R2) and ``score`` (``Float``: the
    test accuracy, or the test R2 for regression).
    """
    task = model.base.attributes.get('task')
    if task not in ('classification', 'regression'):
        return EXIT_CODES['unsupported_task'].format(task=task)
    labels = targets.get_array('targets')
    if labels.shape[0] != features.n_rows:
        return EXIT_CODES['targets_mismatch'].format(n_targets=labels.shape[0], n_rows=features.n_rows)
    try:
        model.check_features(features)
    except IncompatibleFeaturesError as exception:
        return EXIT_CODES['incompatible_features'].format(detail=str(exception))

    measure = classification_metrics if task == 'classification' else regression_metrics
    main = 'accuracy' if task == 'classification' else 'r2'
    test, train = split.get_array('test'), split.get_array('train')
    metrics = measure(labels[test], model.predict(features, rows=test))
    train_metrics = measure(labels[train], model.predict(features, rows=train))
    metrics.update(
        {'task': task, 'n_test': int(test.size), 'n_train': int(train.size), f'train_{main}': train_metrics[main]}
    )
    metrics = _finite_or_none(metrics)
    if metrics[main] is None:
        return EXIT_CODES['undefined_score'].format(name=main, n_test=int(test.size))
    return {'metrics': orm.Dict(metrics), 'score': orm.Float(metrics[main])}
