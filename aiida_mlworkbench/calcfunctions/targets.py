"""Learning targets aligned with the rows of a feature matrix, as ``ArrayData`` with the array ``targets``."""

from __future__ import annotations

import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode

from aiida_mlworkbench.bulk_links import calcfunction
from aiida_mlworkbench.calcfunctions.lattice import DEFAULT_SYMPREC, check_symprec, classify_lattice
from aiida_mlworkbench.calcfunctions.learning_inputs import CalcfunctionInputError

__all__ = ('EXIT_CODES', 'TargetValuesError', 'check_target_values', 'host_lattice_targets', 'targets_from_values')

EXIT_CODES = {
    'unknown_host': ExitCode(350, 'row {row} refers to host `{label}`, which is not among the host inputs'),
    'empty_targets': ExitCode(351, 'no target values given: give one value per row'),
    'invalid_values': ExitCode(352, '{detail}'),
    'non_finite_values': ExitCode(353, '{detail}'),
    'invalid_symprec': ExitCode(354, 'symprec must be a positive finite distance in Angstrom (e.g. 1e-3), got {value}'),
    'unclassifiable_host': ExitCode(355, 'the lattice type of host `{label}` cannot be found: {detail}'),
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
def host_lattice_targets(
    rows: orm.List, symprec: float = DEFAULT_SYMPREC, **hosts: orm.StructureData
) -> dict[str, orm.ArrayData]:
    """The lattice type (``bcc``, ``fcc``, ``hcp`` or ``other``) of each row's host crystal, classified with spglib.

    :param rows: for each row, the input label of its host structure (hosts are shared by many rows, so each distinct
        host is an input once and is classified once).
    :param symprec: symmetry tolerance in Angstrom.
    :param hosts: the distinct host structures.
    :returns: ``targets`` (array ``targets``: the lattice type per row) and ``groups`` (array ``groups``: the host's
        chemical formula per row, for splits that keep each host on one side).
    """
    row_hosts = rows.get_list()
    if not row_hosts:
        return EXIT_CODES['empty_targets']
    for row, label in enumerate(row_hosts):
        if not isinstance(label, str) or label not in hosts:
            return EXIT_CODES['unknown_host'].format(row=row, label=label)
    try:
        tolerance = check_symprec(symprec.value)
    except ValueError:
        return EXIT_CODES['invalid_symprec'].format(value=repr(symprec.value))
    lattice = {}
    for label, host in hosts.items():
        if not isinstance(host, orm.StructureData):
            detail = f'it is a {type(host).__name__}, not a StructureData'
            return EXIT_CODES['unclassifiable_host'].format(label=label, detail=detail)
        try:
            lattice[label] = classify_lattice(host, tolerance)
        except ValueError as exception:
            return EXIT_CODES['unclassifiable_host'].format(label=label, detail=str(exception))
    formula = {label: host.get_formula(mode='hill_compact') for label, host in hosts.items()}

    targets = orm.ArrayData()
    targets.set_array('targets', np.array([lattice[label].lattice for label in row_hosts]))
    targets.base.attributes.set_many(
        {
            'target': 'host_lattice',
            'task': 'classification',
            'classes': sorted({lattice[label].lattice for label in row_hosts}),
            'spacegroups': {formula[label]: lattice[label].spacegroup_number for label in hosts},
        }
    )
    groups = orm.ArrayData()
    groups.set_array('groups', np.array([formula[label] for label in row_hosts]))
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
