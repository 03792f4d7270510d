"""Learning targets aligned with the rows of a feature matrix, as ``ArrayData`` with the array ``targets``."""

from __future__ import annotations

import numpy as np
from aiida import orm
from aiida.engine import ExitCode

from aiida_mlworkbench.bulk_links import calcfunction
from aiida_mlworkbench.calcfunctions.lattice import DEFAULT_SYMPREC, classify_lattice

__all__ = ('EXIT_CODES', 'host_lattice_targets', 'targets_from_values')

EXIT_CODES = {
    'unknown_host': ExitCode(350, 'row {row} refers to host `{label}`, which is not among the host inputs'),
    'empty_targets': ExitCode(351, 'no target values given'),
    'invalid_values': ExitCode(352, 'target values must be all numbers or all strings: {detail}'),
}


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
        if label not in hosts:
            return EXIT_CODES['unknown_host'].format(row=row, label=label)
    lattice = {label: classify_lattice(host, symprec.value) for label, host in hosts.items()}
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
    if not items:
        return EXIT_CODES['empty_targets']
    if all(isinstance(item, str) for item in items):
        array, task = np.array(items), 'classification'
    elif all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
        array, task = np.array(items, dtype=float), 'regression'
        if not np.all(np.isfinite(array)):
            return EXIT_CODES['invalid_values'].format(detail=f'row {int(np.argmin(np.isfinite(array)))} is not finite')
    else:
        kinds = sorted({type(item).__name__ for item in items})
        return EXIT_CODES['invalid_values'].format(detail=f'got {", ".join(kinds)}')
    targets = orm.ArrayData()
    targets.set_array('targets', array)
    targets.base.attributes.set_many({'target': 'user', 'task': task})
    if task == 'classification':
        targets.base.attributes.set('classes', sorted(set(items)))
    return targets
