"""Train/test split of the rows of a feature matrix, recorded as an ``ArrayData`` of row indices."""

from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

__all__ = ('EXIT_CODES', 'split_rows')

EXIT_CODES = {
    'invalid_fraction': ExitCode(310, 'test_fraction must lie strictly between 0 and 1, got {value}'),
    'cannot_stratify': ExitCode(311, 'cannot stratify: {detail}'),
    'groups_mismatch': ExitCode(312, 'groups has {n_groups} entries but targets has {n_targets}: they must align'),
    'too_few_groups': ExitCode(313, 'a grouped split needs at least two distinct groups, got {n_groups}'),
    'empty_side': ExitCode(314, 'the split leaves the {side} set empty: change test_fraction'),
}


def _targets(targets: orm.ArrayData) -> np.ndarray:
    return targets.get_array('targets')


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
    :param test_fraction: fraction of rows (or, with ``groups``, of groups) in the test set.
    :param seed: seed of the random permutation, so the split is reproducible.
    :param stratify: keep the class proportions in both sets (ignored with ``groups``).
    :param groups: ``ArrayData`` with the array ``groups``, one label per row: all rows of a group land on the same
        side, which measures whether a model generalises to unseen groups (for example unseen host elements) instead
        of memorising them.
    """
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    labels = _targets(targets)
    fraction = test_fraction.value
    if not 0 < fraction < 1:
        return EXIT_CODES['invalid_fraction'].format(value=fraction)
    rows = np.arange(labels.shape[0])

    if groups is not None:
        group_labels = groups.get_array('groups')
        if group_labels.shape[0] != labels.shape[0]:
            return EXIT_CODES['groups_mismatch'].format(n_groups=group_labels.shape[0], n_targets=labels.shape[0])
        n_groups = np.unique(group_labels).size
        if n_groups < 2:
            return EXIT_CODES['too_few_groups'].format(n_groups=n_groups)
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed.value)
        train, test = next(splitter.split(rows, labels, group_labels))
        kind = 'grouped'
    else:
        try:
            train, test = train_test_split(
                rows, test_size=fraction, random_state=seed.value, stratify=labels if stratify.value else None
            )
        except ValueError as exception:
            return EXIT_CODES['cannot_stratify'].format(detail=str(exception))
        kind = 'stratified' if stratify.value else 'random'
    for side, indices in (('train', train), ('test', test)):
        if indices.size == 0:
            return EXIT_CODES['empty_side'].format(side=side)

    split = orm.ArrayData()
    split.set_array('train', np.sort(train).astype(np.int64))
    split.set_array('test', np.sort(test).astype(np.int64))
    split.base.attributes.set_many(
        {
            'kind': kind,
            'seed': seed.value,
            'test_fraction': fraction,
            'n_train': int(train.size),
            'n_test': int(test.size),
        }
    )
    return split
