"""Figures drawn from stored runs alone: the parity plot of a regression and the confusion matrix of a classification.

Both read the ``predictions`` output of ``score_model`` (arrays ``rows``, ``true`` and ``predicted`` of the test rows),
reached from that node, from the ``score_model`` process or from the work chain that ran it. They draw with
matplotlib's non-interactive Agg backend, so they work without a display (on a cluster's login node, in CI).
"""

from __future__ import annotations

import pathlib
import typing as t

import numpy as np
from aiida import orm

__all__ = ('PlotError', 'plot_confusion', 'plot_parity', 'scored_predictions')


class PlotError(ValueError):
    """The node holds nothing that the figure can be drawn from; the message says what to give instead."""


def scored_predictions(node: orm.Node) -> tuple[orm.ArrayData, dict[str, t.Any]]:
    """The ``predictions`` of a scoring and its ``metrics`` (empty if unknown), from the predictions node itself, the
    ``score_model`` process or a work chain with these outputs.

    :raises PlotError: naming the node and what it lacks.
    """
    if isinstance(node, orm.ArrayData):
        predictions = node
        creator = node.creator
        metrics_node = creator.outputs.metrics if creator is not None and 'metrics' in creator.outputs else None
    elif isinstance(node, orm.ProcessNode):
        if 'predictions' not in node.outputs:
            state = node.process_state.value if node.process_state else 'unknown'
            raise PlotError(
                f'{node.process_label}<{node.pk}> has no output `predictions` (state {state}, exit status '
                f'{node.exit_status}): give a finished ImpurityLearningWorkChain or score_model, or their predictions'
            )
        predictions = node.outputs.predictions
        metrics_node = node.outputs.metrics if 'metrics' in node.outputs else None
    else:
        raise PlotError(f'{node} is neither a predictions ArrayData nor a process that made one')
    names = set(predictions.get_arraynames())
    if not {'true', 'predicted'} <= names:
        raise PlotError(
            f'{predictions} has the arrays {sorted(names)}, not `true` and `predicted`: give the `predictions` output '
            'of score_model (or the process that made it)'
        )
    return predictions, metrics_node.get_dict() if metrics_node is not None else {}


def _pairs(node: orm.Node, task: str, figure: str, instead: str) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """The true and predicted values, the attributes of the predictions and the metrics, if the task is ``task``."""
    predictions, metrics = scored_predictions(node)
    attributes = predictions.base.attributes.all
    if attributes.get('task') != task:
        raise PlotError(
            f'{predictions} holds {attributes.get("task")} predictions: {figure} needs a {task}; draw {instead} instead'
        )
    return predictions.get_array('true'), predictions.get_array('predicted'), attributes, metrics


def _pyplot() -> t.Any:
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt

    return plt


def _quantity(attributes: t.Mapping[str, t.Any]) -> str:
    quantity = attributes.get('quantity') or attributes.get('target') or 'target'
    unit = attributes.get('unit')
    return f'{quantity} ({unit})' if unit else str(quantity)


def plot_parity(node: orm.Node, path: str | pathlib.Path, *, dpi: int = 150) -> pathlib.Path:
    """Write the parity plot (predicted against true, the diagonal, MAE/RMSE/R2 and the mean baseline) as PNG.

    :raises PlotError: if the node is no regression scoring.
    """
    truth, predicted, attributes, metrics = _pairs(node, 'regression', 'a parity plot', 'the confusion matrix')
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.8, 4.6), layout='constrained')
    axes.scatter(truth, predicted, s=14, alpha=0.7, edgecolors='none', label=f'test rows ({truth.size})')
    baseline = metrics.get('baseline') or {}
    shown = [truth, predicted] + ([np.array([baseline['predicted']])] if baseline.get('predicted') is not None else [])
    both = np.concatenate(shown) if truth.size else np.array([0.0, 1.0])
    low, high = float(both.min()), float(both.max())
    margin = 0.05 * (high - low or 1.0)
    limits = (low - margin, high + margin)
    axes.plot(limits, limits, color='0.4', linewidth=1, label='predicted = true')
    if baseline.get('predicted') is not None:
        axes.axhline(baseline['predicted'], color='tab:orange', linewidth=1, linestyle='--', label='mean of training')
    axes.set(xlim=limits, ylim=limits, aspect='equal')
    quantity = _quantity(attributes)
    source = 'KKR' if attributes.get('target') == 'kkr' else 'true'
    axes.set_xlabel(f'{source} {quantity}')
    axes.set_ylabel(f'predicted {quantity}')
    if metrics:
        lines = [f'MAE {metrics["mae"]:.3g}, RMSE {metrics["rmse"]:.3g}, R$^2$ {metrics["r2"]:.3f}']
        if baseline:
            lines.append(f'mean baseline: MAE {baseline["mae"]:.3g}, RMSE {baseline["rmse"]:.3g}')
        axes.set_title('\n'.join(lines), fontsize=9)
    axes.legend(fontsize=8, loc='upper left')
    return _save(figure, path, dpi)


def plot_confusion(node: orm.Node, path: str | pathlib.Path, *, dpi: int = 150) -> pathlib.Path:
    """Write the confusion matrix of the test rows (counts, true label down, predicted across) as PNG.

    :raises PlotError: if the node is no classification scoring.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    truth, predicted, attributes, metrics = _pairs(node, 'classification', 'a confusion matrix', 'the parity plot')
    plt = _pyplot()
    size = max(4.0, 1.0 + 0.6 * len(set(truth) | set(predicted)))
    figure, axes = plt.subplots(figsize=(size, size), layout='constrained')
    ConfusionMatrixDisplay.from_predictions(truth, predicted, ax=axes, colorbar=False, cmap='Blues')
    title = _quantity(attributes)
    if 'accuracy' in metrics:
        title += f': accuracy {metrics["accuracy"]:.3f} on {truth.size} test rows'
    axes.set_title(title, fontsize=9)
    return _save(figure, path, dpi)


def _save(figure: t.Any, path: str | pathlib.Path, dpi: int) -> pathlib.Path:
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    try:
        figure.savefig(path, dpi=dpi, format='png')
    except OSError as exception:
        raise PlotError(f'cannot write {path}: {exception.strerror or exception}') from None
    finally:
        plt.close(figure)
    return path
