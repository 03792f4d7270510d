"""Training: features, targets, a split and an estimator specification in, a ``TrainedModel`` out."""

from __future__ import annotations

from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.estimators import EstimatorSpecificationError, build_estimator

__all__ = ('EXIT_CODES', 'train_model')

EXIT_CODES = {
    'invalid_estimator': ExitCode(320, 'invalid estimator specification: {detail}'),
    'targets_mismatch': ExitCode(321, 'targets has {n_targets} entries but the feature matrix has {n_rows} rows'),
    'split_out_of_range': ExitCode(322, 'the split refers to row {row}, but the feature matrix has {n_rows} rows'),
    'fit_failed': ExitCode(323, 'fitting the {estimator} failed: {detail}'),
}


@calcfunction
def train_model(
    features: SparseFeatureMatrix, targets: orm.ArrayData, split: orm.ArrayData, estimator: orm.Dict
) -> TrainedModel:
    """Fit the estimator that ``estimator`` specifies on the ``train`` rows of ``split``.

    :param features: the feature matrix, one row per sample.
    :param targets: ``ArrayData`` with the array ``targets``, aligned with the rows of ``features``.
    :param split: ``ArrayData`` with the arrays ``train`` and ``test`` of row indices (from ``split_rows``).
    :param estimator: estimator specification, see :mod:`aiida_mlworkbench.estimators`.
    """
    try:
        model = build_estimator(estimator.get_dict())
    except EstimatorSpecificationError as exception:
        return EXIT_CODES['invalid_estimator'].format(detail=str(exception))
    labels = targets.get_array('targets')
    if labels.shape[0] != features.n_rows:
        return EXIT_CODES['targets_mismatch'].format(n_targets=labels.shape[0], n_rows=features.n_rows)
    train = split.get_array('train')
    if train.size and (train.min() < 0 or train.max() >= features.n_rows):
        row = int(train.max() if train.max() >= features.n_rows else train.min())
        return EXIT_CODES['split_out_of_range'].format(row=row, n_rows=features.n_rows)

    try:
        model.fit(features.get_rows(train), labels[train])
    except (ValueError, TypeError) as exception:
        return EXIT_CODES['fit_failed'].format(estimator=estimator['estimator'], detail=str(exception))
    return TrainedModel(model, descriptor=features.descriptor)
