"""Learning targets aligned with the rows of a feature matrix, as ``ArrayData`` with the array ``targets``."""

from __future__ import annotations

import re
import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.calcfunctions.lattice import DEFAULT_SYMPREC, check_symprec, classify_lattice
from aiida_mlworkbench.calcfunctions.learning_inputs import CalcfunctionInputError
from aiida_mlworkbench.data import CorruptedClustersError, ImpurityClusters
from aiida_mlworkbench.engine import calcfunction_with_many_inputs

__all__ = (
    'EXIT_CODES',
    'TargetValuesError',
    'check_target_values',
    'host_lattice_targets',
    'kkr_result_targets',
    'targets_from_values',
)

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
    'invalid_kkr_target': ExitCode(357, 'invalid KKR target: {detail}'),
    'missing_kkr_result': ExitCode(358, '{detail}'),
    'no_kkr_results': ExitCode(359, 'no row of {clusters} has a usable KKR result: {detail}'),
    'invalid_kkr_results': ExitCode(360, 'invalid results: {detail}'),
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


def _is_runs(runs: t.Any) -> bool:
    """Whether ``runs`` is a namespace of runs ``c<i>``, each a ``Dict``."""
    return isinstance(runs, dict) and all(
        isinstance(label, str) and re.fullmatch(r'c\d+', label) is not None and isinstance(run, orm.Dict)
        for label, run in runs.items()
    )


def _describe_run(parameters: orm.Dict) -> str:
    creator = parameters.creator
    return f'{creator.process_label}<{creator.pk}>' if creator is not None else f'output_parameters<{parameters.pk}>'


@calcfunction_with_many_inputs
def kkr_result_targets(
    clusters: ImpurityClusters, target: orm.Dict, **results: t.Any
) -> dict[str, orm.Data] | ExitCode:
    """The target of each row from what juKKR computed for its embedding: a quantity of the ``output_parameters`` of
    its ``KkrimpCalculation`` runs, given as ``results.<row key>.c<i>`` (oldest run first;
    :func:`~aiida_mlworkbench.kkr.results.kkr_target_inputs` finds them in the graph).

    ``target`` is a :class:`~aiida_mlworkbench.kkr.results.KkrTarget` specification. Of several runs of an embedding
    the last converged one counts (``calculations: 'last'``: the last one); a row without a usable value is an error
    naming the embedding and the calculation (exit code 358), or, with ``missing: 'drop'``, left out and recorded.

    :returns: ``targets`` (array ``targets``, one value per kept row; attributes: the quantity, its key path and unit,
        the task, the policies, the UUID of the ``output_parameters`` of each kept row and the dropped rows with the
        reason) and, if rows were dropped, ``clusters``: the kept rows, to featurize instead of the input clusters.
    """
    from aiida_mlworkbench.kkr.results import KkrTarget, KkrTargetError, is_converged

    try:
        specification = KkrTarget.from_dict(target.get_dict())
    except KkrTargetError as exception:
        return EXIT_CODES['invalid_kkr_target'].format(detail=str(exception))
    runs_of = results.get('results', {}) if set(results) <= {'results'} else None
    try:
        keys = clusters.keys
    except CorruptedClustersError as exception:
        return EXIT_CODES['corrupted_clusters'].format(detail=str(exception))
    if runs_of is None or not all(_is_runs(runs) for runs in runs_of.values()):
        return EXIT_CODES['invalid_kkr_results'].format(
            detail=f'give the namespace `results` only, as results.<row key>.c<i> (a Dict each, i = 0, 1, ... oldest '
            f'first), not {sorted(results) if runs_of is None else sorted(runs_of)[:5]}'
        )
    stray = sorted(set(runs_of) - set(keys))
    if stray:
        return EXIT_CODES['invalid_kkr_results'].format(detail=f'results of no row of {clusters}: {stray[:5]}')

    values: list[t.Any] = []
    rows: list[int] = []
    sources: list[str] = []
    units: set[str | None] = set()
    dropped: list[dict[str, str]] = []
    for row, key in enumerate(keys):
        runs = [runs_of.get(key, {})[label] for label in sorted(runs_of.get(key, {}), key=lambda name: int(name[1:]))]
        if specification.calculations == 'last_converged':
            usable = [run for run in runs if is_converged(run.get_dict())]
            why = f'none of its {len(runs)} calculation(s) converged' if runs else 'no KkrimpCalculation ran it'
        else:
            usable, why = runs, 'no KkrimpCalculation ran it'
        problem = None
        if usable:
            chosen = usable[-1]
            content = chosen.get_dict()
            try:
                values.append(specification.value_of(content))
            except (KeyError, TypeError) as exception:
                problem = f'{_describe_run(chosen)}: {str(exception).strip(chr(34))}'
            else:
                rows.append(row)
                sources.append(chosen.uuid)
                units.add(specification.unit_of(content))
        else:
            problem = why
        if problem is None:
            continue
        if specification.missing == 'error':
            unconverged = " or calculations: 'last' to use unconverged runs" if 'converged' in problem else ''
            return EXIT_CODES['missing_kkr_result'].format(
                detail=f"row {row} (embedding {key}) has no value of '{specification.quantity}': {problem}. Use "
                f"missing: 'drop' to leave such rows out{unconverged}."
            )
        dropped.append({'key': key, 'reason': problem})

    if not rows:
        return EXIT_CODES['no_kkr_results'].format(
            clusters=clusters, detail=dropped[0]['reason'] if dropped else 'it has no rows'
        )
    if len(units) > 1:
        return EXIT_CODES['invalid_kkr_results'].format(
            detail=f"the runs give '{specification.quantity}' in different units {sorted(map(str, units))}"
        )
    task = specification.task
    targets = orm.ArrayData()
    targets.set_array('targets', np.array(values, dtype=str if task == 'classification' else float))
    attributes: dict[str, t.Any] = {
        'target': 'kkr',
        'task': task,
        'quantity': specification.quantity,
        'path': '.'.join(specification.path),
        'unit': units.pop(),
        'calculations': specification.calculations,
        'missing': specification.missing,
        'sources': sources,
        'dropped': dropped,
    }
    if task == 'classification':
        attributes['classes'] = sorted(set(values))
    targets.base.attributes.set_many(attributes)
    outputs: dict[str, orm.Data] = {'targets': targets}
    if dropped:
        outputs['clusters'] = clusters.subset(rows)
    return outputs
