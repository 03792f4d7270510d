"""Checks of the targets and split inputs that ``train_model`` and ``score_model`` share.

Both read row indices and target values that may come from someone else's archive: they are checked before any
feature is read, and a problem raises :class:`LearningInputError` whose ``name`` each calcfunction maps to its own exit
code.
"""

from __future__ import annotations

import typing as t

import numpy as np
from aiida import orm

__all__ = (
    'TARGET_DESCRIPTION',
    'CalcfunctionInputError',
    'LearningInputError',
    'split_arrays',
    'target_array',
    'target_description',
)


class CalcfunctionInputError(ValueError):
    """An input of a calcfunction is unusable: ``name`` is the key of the exit code that says so, ``row`` the
    offending row if any. The calcfunctions' input checks raise subclasses of it, which the port validators of the work
    chain turn into messages and the calcfunctions into exit codes.
    """

    def __init__(self, name: str, message: str, *, row: int | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.row = row


class LearningInputError(CalcfunctionInputError):
    """A targets or split input of ``train_model`` or ``score_model`` is unusable."""


def target_array(targets: orm.ArrayData) -> np.ndarray:
    """The ``targets`` array: one-dimensional, and finite if numeric (NaN labels can be neither learnt nor scored).

    :raises LearningInputError: ``invalid_targets`` or ``non_finite_targets``.
    """
    names = targets.get_arraynames()
    if 'targets' not in names:
        raise LearningInputError(
            'invalid_targets',
            f'{targets} has no array `targets` (arrays: {sorted(names)}): give the `targets` output of the targets '
            'calcfunction, or an ArrayData with the array `targets`',
        )
    labels = targets.get_array('targets')
    if labels.ndim != 1:
        raise LearningInputError(
            'invalid_targets', f'`targets` must be one-dimensional, one value per row, got {labels.shape}'
        )
    if labels.dtype.kind in 'fc' and not np.all(np.isfinite(labels)):
        row = int(np.argmin(np.isfinite(labels)))
        raise LearningInputError(
            'non_finite_targets',
            f'target of row {row} is {labels[row]}: targets must be finite numbers; drop that row or give its value',
            row=row,
        )
    return labels


def split_arrays(split: orm.ArrayData, n_rows: int, *, sides: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The row indices of a split, checked: the arrays ``sides`` present and not empty, integer rows of the matrix,
    no row twice, no row on both sides (a ``test`` array is checked also where it is not required).

    :raises LearningInputError: ``invalid_split``, or ``split_out_of_range`` with the offending ``row``.
    """
    names = split.get_arraynames()
    arrays = {}
    for side in ('train', 'test'):
        if side not in names:
            if side in sides:
                raise LearningInputError(
                    'invalid_split',
                    f'{split} has no array `{side}` (arrays: {sorted(names)}): give the output of split_rows, or an '
                    'ArrayData with the arrays `train` and `test` of row indices',
                )
            continue
        rows = split.get_array(side)
        if rows.ndim != 1 or rows.dtype.kind not in 'iu':
            raise LearningInputError(
                'invalid_split',
                f'`{side}` must be a one-dimensional array of integer row indices, got {rows.dtype} '
                f'of shape {rows.shape}',
            )
        if side in sides and not rows.size:
            raise LearningInputError(
                'invalid_split', f'the split has no {side} rows: give rows on that side of the split'
            )
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            row = int(rows.max() if rows.max() >= n_rows else rows.min())
            raise LearningInputError(
                'split_out_of_range',
                f'`{side}` refers to row {row}, but the feature matrix has {n_rows} rows (0 to {n_rows - 1}): '
                'split the rows of these features',
                row=row,
            )
        if np.unique(rows).size != rows.size:
            raise LearningInputError('invalid_split', f'`{side}` names a row more than once')
        arrays[side] = rows
    if 'test' in arrays and 'train' in arrays and np.intersect1d(arrays['train'], arrays['test']).size:
        raise LearningInputError(
            'invalid_split', 'rows are in both `train` and `test`: a model would be scored on its training data'
        )
    return arrays


TARGET_DESCRIPTION = ('target', 'quantity', 'path', 'unit')
"""Attributes of a targets node that say what was learned; the metrics, the predictions and the model repeat them."""


def target_description(targets: orm.ArrayData) -> dict[str, t.Any]:
    """What the targets are, as far as their node says: kind, quantity, key path, unit (:data:`TARGET_DESCRIPTION`)."""
    return {key: targets.base.attributes.get(key) for key in TARGET_DESCRIPTION if key in targets.base.attributes}
