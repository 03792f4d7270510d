"""Learning targets aligned with the rows of a feature matrix, as ``ArrayData`` with the array ``targets``."""

from __future__ import annotations

import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.calcfunctions.lattice import DEFAULT_SYMPREC, check_symprec, classify_lattice
from aiida_mlworkbench.calcfunctions.learning_inputs import CalcfunctionInputError
from aiida_mlworkbench.data import CorruptedClustersError, ImpurityClusters

__all__ = ('EXIT_CODES', 'TargetValuesError', 'check_target_values', 'host_lattice_targets', 'targets_from_values')

EXIT_CODES = {
    'no_hosts': ExitCode(
        350,
        '{clusters} records no host crystal for some rows: the host lattice target needs clusters extracted '
        'from embeddings (extract_impurity_clusters), or give target values instead',
    ),
    'empty_targets': ExitCode(351, 'no target values given: give one value per row'),
    'invalid_values': ExitCode(352, '{detail}'),
    'non_finite_values': ExitCode(353, '{detail}'),
    'invalid_symprec': ExitCode(354, 'symprec must be a positive finite distance in Angstrom (e.g. 1e-3), got {value}'),
    'unclassifiable_host': ExitCode(355, 'the lattice type of host `{label}` cannot be found: {detail}'),
    'corrupted_clusters': ExitCode(356, 'the clusters cannot be read: {detail}'),
}


class TargetValuesError(CalcfunctionInputError):
    """The target values are unusable; ``name`` is the key of the exit code of :func:`targets_from_values`."""


def check_target_values(items: t.Sequence[t.Any]) -> tuple[np.ndarray, str]:
    """Return the values as an array and the task they define (``regression`` or ``classification``), or raise.

    Numbers (not booleans) make a regression target and must be finite; strings make class labels. The work chain's
    input validator and :func:`targets_from_values` apply this same rule.

    :raises TargetValuesError: with the exit code name ``empty_targets``, ``invalid_values`` or ``non_finite_values``.
    """
    if not len(items):
        raise TargetValuesError('empty_targets', 'no target values given: give one value per row')
    if all(isinstance(item, str) for item in items):
        return np.array(items, dtype=str), 'classification'
    if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
        try:
            array = np.array(items, dtype=float)
        except OverflowError:  # an integer beyond the float range
            array = np.array([float('inf')])
        if not np.all(np.isfinite(array)):
            row = int(np.argmin(np.isfinite(array))) if array.size == len(items) else 0
            raise TargetValuesError(
                'non_finite_values',
                f'target value of row {row} is {items[row]!r}: regression targets must be finite numbers (no NaN or '
                'infinity); drop that row or give its value',
            )
        return array, 'regression'
    kinds = sorted({type(item).__name__ for item in items})
    raise TargetValuesError(
        'invalid_values',
        f'target values must be all numbers (regression) or all strings (classification), got {", ".join(kinds)}: '
        'give one number or one label per row',
    )


@calcfunction
def host_lattice_targets(clusters: ImpurityClusters, symprec: orm.Float = DEFAULT_SYMPREC) -> dict[str, orm.ArrayData]:  # type: ignore[assignment]
    """The lattice type (``bcc``, ``fcc``, ``hcp`` or ``other``) of each row's host crystal, classified with spglib.

    Each distinct host recorded in ``clusters`` is classified once.

    :param clusters: the impurity clusters, with the host crystals they were cut from.
    :param symprec: symmetry tolerance in Angstrom.
    :returns: ``targets`` (array ``targets``: the lattice type per row) and ``groups`` (array ``groups``: the host's
        chemical formula per row, for splits that keep each host on one side).
    """
    try:
        tolerance = check_symprec(symprec.value)
    except ValueError:
        return EXIT_CODES['invalid_symprec'].format(value=repr(symprec.value))
    try:
        host_of = clusters.host_of
        hosts = [clusters.get_host(index) for index in range(len(clusters.hosts))]
    except CorruptedClustersError as exception:
        return EXIT_CODES['corrupted_clusters'].format(detail=str(exception))
    if not hosts or np.any(host_of < 0):
        return EXIT_CODES['no_hosts'].format(clusters=clusters)
    lattice = []
    for index, host in enumerate(hosts):
        try:
            lattice.append(classify_lattice(host, tolerance))
        except ValueError as exception:
            return EXIT_CODES['unclassifiable_host'].format(label=f'{index} ({host.formula})', detail=str(exception))
    labels = np.array([result.lattice for result in lattice])[host_of]

    targets = orm.ArrayData()
    targets.set_array('targets', labels)
    targets.base.attributes.set_many(
        {
            'target': 'host_lattice',
            'task': 'classification',
            'classes': sorted(set(labels.tolist())),
            'spacegroups': {
                host.formula: result.spacegroup_number for host, result in zip(hosts, lattice, strict=True)
            },
        }
    )
    groups = orm.ArrayData()
    groups.set_array('groups', clusters.host_formulas())
    groups.base.attributes.set('grouped_by', 'host formula')
    return {'targets': targets, 'groups': groups}


@calcfunction
def targets_from_values(values: orm.List) -> orm.ArrayData:
    """Targets given by the user, one per row: numbers (regression) or labels (classification)."""
    items = values.get_list()
    try:
        array, task = check_target_values(items)
    except TargetValuesError as exception:
        return EXIT_CODES[exception.name].format(detail=str(exception))
    targets = orm.ArrayData()
    targets.set_array('targets', array)
    targets.base.attributes.set_many({'target': 'user', 'task': task})
    if task == 'classification':
        targets.base.attributes.set('classes', sorted(set(items)))
    return targets
