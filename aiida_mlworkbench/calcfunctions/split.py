"""Train/test split of the rows of a feature matrix, recorded as an ``ArrayData`` of row indices.

The rules a split must meet are in :func:`check_split_settings` (the settings alone) and :func:`plan_split` (the
settings against the rows): :func:`split_rows` applies both to its inputs and returns the exit code named by the
problem, and the work chain's input validator applies the same two functions before anything runs.
"""

from __future__ import annotations

import math
import typing as t
from collections.abc import Mapping

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.calcfunctions.learning_inputs import CalcfunctionInputError

__all__ = (
    'DEFAULT_SPLIT',
    'EXIT_CODES',
    'MAX_SEED',
    'SplitSettingsError',
    'check_split_settings',
    'plan_split',
    'split_rows',
)

DEFAULT_SPLIT: dict[str, t.Any] = {'test_fraction': 0.25, 'seed': 0, 'stratify': True, 'grouped': False}
MAX_SEED = 2**32 - 1
"""Largest seed: scikit-learn hands it to NumPy's ``RandomState``, which takes 0 to 2**32 - 1."""

EXIT_CODES = {
    'invalid_fraction': ExitCode(310, '{detail}'),
    'cannot_stratify': ExitCode(311, 'cannot stratify: {detail}'),
    'groups_mismatch': ExitCode(312, 'groups has {n_groups} entries but targets has {n_targets}: they must align'),
    'too_few_groups': ExitCode(313, '{detail}'),
    'empty_side': ExitCode(314, '{detail}'),
    'invalid_seed': ExitCode(315, '{detail}'),
    'invalid_flag': ExitCode(316, '{detail}'),
    'too_few_rows': ExitCode(317, '{detail}'),
    'invalid_targets': ExitCode(318, 'targets must be an ArrayData with a one-dimensional array `targets`: {detail}'),
    'invalid_groups': ExitCode(319, 'groups must be an ArrayData with a one-dimensional array `groups`: {detail}'),
}


class SplitSettingsError(CalcfunctionInputError):
    """A split setting is invalid, or the rows cannot be split so; ``name`` is the key of its exit code."""


def check_split_settings(settings: Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Return the settings with the defaults filled in, or raise naming the setting and what it must be.

    :param settings: ``test_fraction`` (strictly between 0 and 1), ``seed`` (an integer from 0 to :data:`MAX_SEED`),
        ``stratify`` and ``grouped`` (booleans); any of them may be left out.
    :raises SplitSettingsError: with the exit code name ``invalid_fraction``, ``invalid_seed`` or ``invalid_flag``.
    """
    unknown = sorted(map(str, set(settings) - set(DEFAULT_SPLIT)))
    if unknown:
        raise SplitSettingsError(
            'invalid_flag',
            f'unknown split setting(s) {", ".join(unknown)}; known: {", ".join(sorted(DEFAULT_SPLIT))}',
        )
    merged = {**DEFAULT_SPLIT, **settings}
    fraction = merged['test_fraction']
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.integer, np.floating))
        or not 0 < fraction < 1
    ):
        raise SplitSettingsError(
            'invalid_fraction', f'split test_fraction must be a number strictly between 0 and 1, got {fraction!r}'
        )
    seed = merged['seed']
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise SplitSettingsError(
            'invalid_seed', f'split seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}'
        )
    for flag in ('stratify', 'grouped'):
        if not isinstance(merged[flag], (bool, np.bool_)):
            raise SplitSettingsError('invalid_flag', f'split {flag} must be true or false, got {merged[flag]!r}')
    return {
        'test_fraction': float(fraction),
        'seed': int(seed),
        'stratify': bool(merged['stratify']),
        'grouped': bool(merged['grouped']),
    }


def _sides(n_items: int, fraction: float) -> tuple[int, int]:
    """(train, test) sizes as scikit-learn makes them for a float ``test_size``: the test side is rounded up."""
    n_test = math.ceil(fraction * n_items)
    return n_items - n_test, n_test


def plan_split(
    n_rows: int,
    settings: Mapping[str, t.Any],
    labels: np.ndarray | t.Sequence[t.Any] | None = None,
    groups: np.ndarray | t.Sequence[t.Any] | None = None,
) -> tuple[int, int]:
    """Return the (train, test) sizes of a split of ``n_rows`` rows, or raise if it cannot be made as asked.

    :param settings: settings as returned by :func:`check_split_settings`.
    :param labels: the targets, to check stratification (left unchecked if ``None``).
    :param groups: the group of each row, for a grouped split (left unchecked if ``None``).
    :raises SplitSettingsError: with the exit code name ``too_few_rows``, ``empty_side``, ``cannot_stratify`` or
        ``too_few_groups``.
    """
    fraction = settings['test_fraction']
    if n_rows < 2:
        raise SplitSettingsError(
            'too_few_rows', f'a train/test split needs at least 2 rows, got {n_rows}: give more embeddings or clusters'
        )
    if groups is not None:
        n_groups = int(np.unique(np.asarray(groups)).size)
        if n_groups < 2:
            raise SplitSettingsError(
                'too_few_groups',
                f'a grouped split needs at least two distinct groups (hosts), got {n_groups}: add embeddings of '
                'other hosts or set grouped to false',
            )
        n_train, n_test = _sides(n_groups, fraction)
        if n_train == 0:
            raise SplitSettingsError(
                'empty_side',
                f'test_fraction {fraction} puts all {n_groups} groups in the test set: lower test_fraction',
            )
        return n_train, n_test
    n_train, n_test = _sides(n_rows, fraction)
    if n_train == 0:
        raise SplitSettingsError(
            'empty_side', f'test_fraction {fraction} leaves no train row of {n_rows}: lower test_fraction'
        )
    if settings['stratify'] and labels is not None:
        classes, counts = np.unique(np.asarray(labels), return_counts=True)
        if counts.min() < 2:
            rare = [str(label) for label in classes[counts < 2][:5]]
            raise SplitSettingsError(
                'cannot_stratify',
                f'class(es) {", ".join(rare)} have a single row, and stratifying needs at least 2 per class: set '
                'stratify to false or add rows of those classes',
            )
        for side, size in (('train', n_train), ('test', n_test)):
            if size < classes.size:
                raise SplitSettingsError(
                    'cannot_stratify',
                    f'the {side} set would have {size} rows for {classes.size} classes, and stratifying puts every '
                    'class on both sides: change test_fraction or set stratify to false',
                )
    return n_train, n_test


def _one_dimensional(node: orm.ArrayData, name: str) -> np.ndarray:
    if name not in node.get_arraynames():
        raise ValueError(f'it has no array `{name}` (arrays: {sorted(node.get_arraynames())})')
    values = node.get_array(name)
    if values.ndim != 1:
        raise ValueError(f'`{name}` has shape {values.shape}')
    return values


@calcfunction
def split_rows(
    targets: orm.ArrayData,
    test_fraction: float = 0.25,
    seed: int = 0,
    stratify: bool = True,
    groups: orm.ArrayData | None = None,
) -> orm.ArrayData:
    """Split the rows into a train and a test set: arrays ``train`` and ``test`` of sorted row indices.

    :param targets: ``ArrayData`` with the array ``targets``, one entry per row (used to stratify).
    :param test_fraction: fraction of rows (or, with ``groups``, of groups) in the test set, strictly between 0 and 1.
    :param seed: seed of the random permutation, so the split is reproducible (0 to 2**32 - 1).
    :param stratify: keep the class proportions in both sets (ignored with ``groups``).
    :param groups: ``ArrayData`` with the array ``groups``, one label per row: all rows of a group land on the same
        side, which measures whether a model generalises to unseen groups (for example unseen host elements) instead
        of memorising them.
    """
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    try:
        labels = _one_dimensional(targets, 'targets')
    except ValueError as exception:
        return EXIT_CODES['invalid_targets'].format(detail=str(exception))
    group_labels = None
    if groups is not None:
        try:
            group_labels = _one_dimensional(groups, 'groups')
        except ValueError as exception:
            return EXIT_CODES['invalid_groups'].format(detail=str(exception))
        if group_labels.shape[0] != labels.shape[0]:
            return EXIT_CODES['groups_mismatch'].format(n_groups=group_labels.shape[0], n_targets=labels.shape[0])
    try:
        settings = check_split_settings(
            {
                'test_fraction': test_fraction.value,
                'seed': seed.value,
                'stratify': stratify.value,
                'grouped': groups is not None,
            }
        )
        plan_split(labels.shape[0], settings, labels=labels, groups=group_labels)
    except SplitSettingsError as exception:
        return EXIT_CODES[exception.name].format(detail=str(exception))
    fraction = settings['test_fraction']
    rows = np.arange(labels.shape[0])

    if group_labels is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=settings['seed'])
        train, test = next(splitter.split(rows, labels, group_labels))
        kind = 'grouped'
    else:
        try:
            train, test = train_test_split(
                rows,
                test_size=fraction,
                random_state=settings['seed'],
                stratify=labels if settings['stratify'] else None,
            )
        except ValueError as exception:  # a rule of scikit-learn's that plan_split does not know
            return EXIT_CODES['cannot_stratify'].format(detail=str(exception))
        kind = 'stratified' if settings['stratify'] else 'random'
    for side, indices in (('train', train), ('test', test)):
        if indices.size == 0:
            detail = f'the split leaves the {side} set empty: change test_fraction'
            return EXIT_CODES['empty_side'].format(detail=detail)

    split = orm.ArrayData()
    split.set_array('train', np.sort(train).astype(np.int64))
    split.set_array('test', np.sort(test).astype(np.int64))
    split.base.attributes.set_many(
        {
            'kind': kind,
            'seed': settings['seed'],
            'test_fraction': fraction,
            'n_train': int(train.size),
            'n_test': int(test.size),
        }
    )
    return split
