"""Training: features, targets, a split and an estimator specification in, a ``TrainedModel`` out.

By default the train rows are read at once and the estimator is fitted with ``fit``. With
``'training': {'mode': 'incremental', ...}`` in the specification, :func:`fit_incremental` streams them from the HDF5
file block by block through ``partial_fit`` instead, so that memory does not grow with the number of rows.
"""

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
from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.data.sparse_features import CorruptedFeatureMatrixError, plan_row_blocks
from aiida_mlworkbench.estimators import (
    EstimatorSpecificationError,
    TrainingOptions,
    build_estimator,
    training_options,
)
from aiida_mlworkbench.progress import progress

__all__ = ('EXIT_CODES', 'fit_incremental', 'train_model')

EXIT_CODES = {
    'invalid_estimator': ExitCode(320, 'invalid estimator specification: {detail}'),
    'targets_mismatch': ExitCode(321, 'targets has {n_targets} entries but the feature matrix has {n_rows} rows'),
    'split_out_of_range': ExitCode(322, 'the split refers to row {row}, but the feature matrix has {n_rows} rows'),
    'fit_failed': ExitCode(323, 'fitting the {estimator} failed: {detail}'),
    'invalid_split': ExitCode(324, 'invalid split: {detail}'),
    'invalid_targets': ExitCode(325, 'invalid targets: {detail}'),
    'non_finite_targets': ExitCode(326, '{detail}'),
    'corrupted_features': ExitCode(327, 'the feature matrix cannot be read: {detail}'),
}


def _steps(model: t.Any) -> tuple[t.Any, t.Any]:
    """The scaler (or ``None``) and the final estimator of what :func:`build_estimator` returns."""
    steps = getattr(model, 'steps', None)
    if steps is None:
        return None, model
    return steps[0][1], steps[-1][1]


def fit_incremental(
    model: t.Any,
    features: SparseFeatureMatrix,
    targets: np.ndarray,
    rows: np.ndarray,
    options: TrainingOptions,
    *,
    description: str | None = None,
) -> t.Any:
    """Fit ``model`` (an estimator with ``partial_fit``, or a scaler + estimator ``Pipeline``) on ``rows`` in blocks.

    The scaler first learns its statistics in one pass (``partial_fit``; the stateless ``Normalizer`` just ``fit``
    on the first block), then every epoch gives each scaled block to the estimator's ``partial_fit``; classifiers get
    the classes of ``targets[rows]`` up front. At most ``options.block_size`` rows of the file are in memory at once.
    Progress goes through :func:`aiida_mlworkbench.progress.progress`.

    :param targets: the targets of all rows of ``features``.
    :param rows: the rows to train on (the ``train`` array of a split).
    :return: ``model``, fitted: a ``Pipeline`` predicts as if ``fit`` had been called on it.
    :raises ValueError: if there is nothing to train on or scikit-learn refuses the data.
    """
    from sklearn.base import is_classifier

    rows = np.asarray(rows)
    if rows.size == 0:
        raise ValueError('the split has no train rows')
    scaler, estimator = _steps(model)
    fit_kwargs = {'classes': np.unique(targets[rows])} if is_classifier(estimator) else {}
    n_blocks = len(plan_row_blocks(rows, options.block_size))
    stateful_scaler = scaler is not None and hasattr(scaler, 'partial_fit')
    n_passes = options.epochs + stateful_scaler
    rng = None if options.shuffle_seed is None else np.random.default_rng(options.shuffle_seed)

    def work() -> t.Iterator[tuple[int, np.ndarray, t.Any]]:
        for number in range(n_passes):
            scaling = stateful_scaler and number == 0
            # The scaler's statistics do not depend on the order: its pass reads the file sequentially.
            for positions, block in features.iter_row_blocks(rows, options.block_size, rng=None if scaling else rng):
                yield scaling, positions, block

    name = type(estimator).__name__
    description = description or f'training {name} ({options.epochs} epochs of {n_blocks} blocks)'
    for scaling, positions, block in progress(work(), total=n_passes * n_blocks, description=description):
        if scaling:
            scaler.partial_fit(block)
            continue
        if scaler is not None:
            if not stateful_scaler and not hasattr(scaler, 'n_features_in_'):
                scaler.fit(block)  # a stateless scaler: fitting only records the number of features
            block = scaler.transform(block)
        estimator.partial_fit(block, targets[rows[positions]], **fit_kwargs)
    return model


@calcfunction
def train_model(
    features: SparseFeatureMatrix, targets: orm.ArrayData, split: orm.ArrayData, estimator: orm.Dict
) -> TrainedModel:
    """Fit the estimator that ``estimator`` specifies on the ``train`` rows of ``split``.

    The ``training`` key of the specification chooses between fitting in memory (the default) and streaming the rows
    block by block (``'mode': 'incremental'``, see :func:`fit_incremental`). The options used are recorded in the
    ``training`` attribute of the model.

    :param features: the feature matrix, one row per sample.
    :param targets: ``ArrayData`` with the array ``targets``, aligned with the rows of ``features``.
    :param split: ``ArrayData`` with the arrays ``train`` and ``test`` of row indices (from ``split_rows``).
    :param estimator: estimator specification, see :mod:`aiida_mlworkbench.estimators`.
    """
    specification = estimator.get_dict()
    try:
        model = build_estimator(specification)
        options = training_options(specification)
    except EstimatorSpecificationError as exception:
        return EXIT_CODES['invalid_estimator'].format(detail=str(exception))
    n_rows = features.n_rows
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
        return EXIT_CODES['corrupted_features'].format(detail=f'{features} has no valid n_rows attribute ({n_rows!r})')
    try:
        labels = target_array(targets)
        if labels.shape[0] != n_rows:
            return EXIT_CODES['targets_mismatch'].format(n_targets=labels.shape[0], n_rows=n_rows)
        train = split_arrays(split, n_rows, sides=('train',))['train']
    except LearningInputError as exception:
        if exception.name == 'split_out_of_range':
            return EXIT_CODES['split_out_of_range'].format(row=exception.row, n_rows=n_rows)
        return EXIT_CODES[exception.name].format(detail=str(exception))

    try:
        if options.incremental:
            fit_incremental(model, features, labels, train, options)
        else:
            model.fit(features.get_rows(train), labels[train])
    except CorruptedFeatureMatrixError as exception:
        return EXIT_CODES['corrupted_features'].format(detail=str(exception))
    except (ValueError, TypeError, ArithmeticError) as exception:
        return EXIT_CODES['fit_failed'].format(estimator=estimator['estimator'], detail=str(exception))
    node = TrainedModel(model, descriptor=features.descriptor)
    node.base.attributes.set('training', options.as_dict())
    node.base.attributes.set('target', target_description(targets))
    return node
