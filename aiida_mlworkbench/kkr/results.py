"""What juKKR computed for each impurity embedding: the ``output_parameters`` of its ``KkrimpCalculation`` runs.

A learning target from KKR results is named by a :class:`KkrTarget`: a quantity of the ``output_parameters`` (a short
name of :data:`QUANTITIES`, or any key path such as ``magnetism_group.total_spin_moment``), which calculation to take
when an embedding was run several times, and what to do when a value is missing.

:func:`find_kkr_results` walks the graph from an ``ImpurityClusters`` node to the calculations: from each row to the
``impurity_info`` the extraction consumed (through ``select_clusters`` subsets too), from there to every
``KkrimpCalculation`` that ran that ``impurity_info`` (as its own input, or through the host Green function write-out
that made its ``host_Greenfunction_folder``), keeping those whose host is the row's host.
:func:`kkr_target_inputs` turns what it finds into the inputs of
:func:`~aiida_mlworkbench.calcfunctions.targets.kkr_result_targets`, so that the graph leads from a target (and a
model trained on it) to the KKR results it came from.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import typing as t

from aiida import orm
from aiida.common.links import LinkType

from aiida_mlworkbench.data import ImpurityClusters

from .embeddings import ImpurityEmbeddingError, _Resolver

__all__ = (
    'CALCULATION_POLICIES',
    'CLASSIFICATIONS',
    'MISSING_POLICIES',
    'QUANTITIES',
    'KkrQuantity',
    'KkrResult',
    'KkrTarget',
    'KkrTargetError',
    'find_embedding_results',
    'find_kkr_results',
    'kkr_target_inputs',
    'results_inputs',
)

KKRIMP_PROCESS_TYPE = 'aiida.calculations:kkr.kkrimp'
_REMOTE_LABELS = ('host_Greenfunction_folder', 'GFhost_folder')


@dataclasses.dataclass(frozen=True)
class KkrQuantity:
    """A number in the ``output_parameters`` of a ``KkrimpCalculation``: where it is and where its unit is."""

    path: tuple[str, ...]
    unit_path: tuple[str, ...] | None
    description: str


QUANTITIES: dict[str, KkrQuantity] = {
    'total_spin_moment': KkrQuantity(
        ('magnetism_group', 'total_spin_moment'),
        ('magnetism_group', 'total_spin_moment_unit'),
        'total spin moment of the impurity cluster',
    ),
    'total_abs_spin_moment': KkrQuantity(
        ('magnetism_group', 'total_abs_spin_moment'),
        ('magnetism_group', 'spin_moment_unit'),
        'sum of the lengths of the spin moments of the cluster atoms (spin-orbit runs only)',
    ),
    'total_orbital_moment': KkrQuantity(
        ('magnetism_group', 'total_orbital_moment'),
        ('magnetism_group', 'orbital_moment_unit'),
        'total orbital moment of the cluster (spin-orbit runs only)',
    ),
    'total_energy': KkrQuantity(('total_energy_Ry',), ('total_energy_Ry_unit',), 'total energy of the cluster'),
    'fermi_energy': KkrQuantity(('fermi_energy',), ('fermi_energy_units',), 'Fermi energy of the host'),
    'number_of_iterations': KkrQuantity(
        ('convergence_group', 'number_of_iterations'), None, 'self-consistency iterations juKKR ran'
    ),
}
"""The registered short names of per-cluster quantities; any other key path to a number works too (without a unit,
unless ``unit`` is given)."""

CLASSIFICATIONS = {
    'converged': 'whether juKKR reached self-consistency (convergence_group.calculation_converged)',
    'magnetic': 'whether |magnetism_group.total_spin_moment| is at least `threshold` (default 0.1 mu_Bohr)',
}
"""Class targets made from results: their labels are strings (``converged``/``not converged``,
``magnetic``/``non-magnetic``)."""

CALCULATION_POLICIES = ('last_converged', 'last')
"""Which calculation of an embedding run several times counts: the last converged one (default), or the last one
whether converged or not."""

MISSING_POLICIES = ('error', 'drop')
"""An embedding without a usable value: an error naming it (default), or the row is dropped and reported."""

DEFAULT_MAGNETIC_THRESHOLD = 0.1
"""Smallest |total spin moment| (mu_Bohr) of a cluster counted as magnetic by the ``magnetic`` class target."""

_CONVERGED_PATH = ('convergence_group', 'calculation_converged')


class KkrTargetError(ValueError):
    """A target specification that cannot be used, or a graph in which the KKR results cannot be found."""


@dataclasses.dataclass(frozen=True)
class KkrTarget:
    """A learning target made from the ``output_parameters`` of the ``KkrimpCalculation`` runs of each embedding."""

    quantity: str
    calculations: str = 'last_converged'
    missing: str = 'error'
    threshold: float = DEFAULT_MAGNETIC_THRESHOLD
    unit: str | None = None

    @classmethod
    def from_dict(cls, specification: collections.abc.Mapping[str, t.Any]) -> KkrTarget:
        """Read and check a specification (the content of the ``target`` input of the targets calcfunction).

        :raises KkrTargetError: naming the key and what it must be.
        """
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(specification) - fields))
        if unknown:
            raise KkrTargetError(f'unknown key(s) {unknown} in the KKR target: use {sorted(fields)}.')
        quantity = specification.get('quantity')
        if not isinstance(quantity, str) or not quantity.strip('.'):
            raise KkrTargetError(
                f"the KKR target needs 'quantity': one of {sorted(QUANTITIES) + sorted(CLASSIFICATIONS)} or a key path "
                "of the output_parameters such as 'magnetism_group.total_spin_moment'."
            )
        target = cls(**specification)
        if target.calculations not in CALCULATION_POLICIES:
            raise KkrTargetError(
                f"'calculations' must be one of {list(CALCULATION_POLICIES)}, got {target.calculations!r}."
            )
        if target.missing not in MISSING_POLICIES:
            raise KkrTargetError(f"'missing' must be one of {list(MISSING_POLICIES)}, got {target.missing!r}.")
        if (
            not isinstance(target.threshold, (int, float))
            or isinstance(target.threshold, bool)
            or not math.isfinite(target.threshold)
            or target.threshold < 0
        ):
            raise KkrTargetError(f"'threshold' must be a finite number >= 0 (mu_Bohr), got {target.threshold!r}.")
        if target.unit is not None and not isinstance(target.unit, str):
            raise KkrTargetError(f"'unit' must be a string, got {target.unit!r}.")
        if target.quantity == 'converged' and target.calculations != 'last':
            raise KkrTargetError(
                "the target 'converged' needs 'calculations': 'last' (with 'last_converged' every row would be "
                'converged).'
            )
        return target

    @property
    def task(self) -> str:
        """``classification`` for the class targets of :data:`CLASSIFICATIONS`, ``regression`` otherwise."""
        return 'classification' if self.quantity in CLASSIFICATIONS else 'regression'

    @property
    def path(self) -> tuple[str, ...]:
        """Where the value is in the ``output_parameters``."""
        if self.quantity == 'converged':
            return _CONVERGED_PATH
        if self.quantity == 'magnetic':
            return QUANTITIES['total_spin_moment'].path
        if self.quantity in QUANTITIES:
            return QUANTITIES[self.quantity].path
        return tuple(self.quantity.split('.'))

    def unit_of(self, parameters: collections.abc.Mapping[str, t.Any]) -> str | None:
        """The unit of the value in ``parameters``: the one given, else the one juKKR's parser recorded."""
        if self.unit is not None or self.task == 'classification':
            return self.unit
        path = self.path
        registered = next((quantity for quantity in QUANTITIES.values() if quantity.path == path), None)
        if registered is not None:
            unit_paths = [registered.unit_path] if registered.unit_path else []
        else:  # juKKR's parser records the unit of `name` as `name_unit` (or `name_units`) beside it
            unit_paths = [(*path[:-1], f'{path[-1]}{suffix}') for suffix in ('_unit', '_units')]
        for unit_path in unit_paths:
            unit = _lookup(parameters, unit_path)
            if isinstance(unit, str):
                return unit
        return None

    def value_of(self, parameters: collections.abc.Mapping[str, t.Any]) -> float | str:
        """The target value in ``parameters``.

        :raises KeyError: naming the missing key, if the value is not there.
        :raises TypeError: if it is not a finite number (or a boolean, for ``converged``).
        """
        value = _lookup(parameters, self.path)
        if value is None:
            raise KeyError(f"no '{'.'.join(self.path)}'")
        if self.quantity == 'converged':
            if not isinstance(value, bool):
                raise TypeError(f"'{'.'.join(self.path)}' is {value!r}, not true or false")
            return 'converged' if value else 'not converged'
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TypeError(f"'{'.'.join(self.path)}' is {value!r}, not a finite number")
        if self.quantity == 'magnetic':
            return 'magnetic' if abs(value) >= self.threshold else 'non-magnetic'
        return float(value)


def _lookup(parameters: collections.abc.Mapping[str, t.Any], path: tuple[str, ...]) -> t.Any:
    value: t.Any = parameters
    for key in path:
        if not isinstance(value, collections.abc.Mapping) or key not in value:
            return None
        value = value[key]
    return value


def is_converged(parameters: collections.abc.Mapping[str, t.Any]) -> bool:
    """Whether juKKR's parser recorded the run as converged."""
    return _lookup(parameters, _CONVERGED_PATH) is True


@dataclasses.dataclass(frozen=True)
class KkrResult:
    """One ``KkrimpCalculation`` of an embedding and its ``output_parameters``."""

    calculation: orm.CalcJobNode
    output_parameters: orm.Dict


def _source_extraction(clusters: ImpurityClusters) -> orm.CalcFunctionNode:
    """The extraction that made ``clusters``, through any ``select_clusters`` subsets and the rows that
    ``kkr_result_targets`` kept."""
    node: orm.Node = clusters
    for _ in range(1000):
        creator = node.creator
        if creator is None:
            break
        if creator.process_label == 'extract_impurity_clusters':
            return creator
        if creator.process_label not in ('select_clusters', 'kkr_result_targets'):
            break
        node = creator.inputs.clusters
    raise KkrTargetError(
        f'{clusters} was not made by extract_impurity_clusters (nor a subset of such clusters): the rows cannot '
        'be traced to aiida-kkr impurity_info nodes: extract them from the embeddings (build_impurity_clusters).'
    )


def _impurity_infos_of(extraction: orm.CalcFunctionNode) -> dict[str, orm.Dict]:
    builder = orm.QueryBuilder().append(orm.CalcFunctionNode, filters={'id': extraction.pk}, tag='extraction')
    builder.append(
        orm.Dict,
        with_outgoing='extraction',
        edge_filters={'label': {'like': 'impurity_infos%'}},
        edge_project='label',
        project='*',
    )
    prefix = 'impurity_infos__'
    return {label[len(prefix) :]: node for node, label in builder.iterall() if label.startswith(prefix)}


def _candidate_calculations(info_pks: list[int]) -> dict[int, set[int]]:
    """``KkrimpCalculation`` pks by the ``impurity_info`` pk they may have run: as their own input, or as the input of
    the host Green function write-out that made their host folder."""
    found: dict[int, set[int]] = {pk: set() for pk in info_pks}
    for start in range(0, len(info_pks), 500):
        chunk = info_pks[start : start + 500]
        direct = orm.QueryBuilder().append(orm.Dict, filters={'id': {'in': chunk}}, project='id', tag='info')
        direct.append(
            orm.CalcJobNode,
            with_incoming='info',
            edge_filters={'label': 'impurity_info', 'type': LinkType.INPUT_CALC.value},
            filters={'process_type': KKRIMP_PROCESS_TYPE},
            project='id',
        )
        through_host = orm.QueryBuilder().append(orm.Dict, filters={'id': {'in': chunk}}, project='id', tag='info')
        through_host.append(
            orm.CalcJobNode, with_incoming='info', edge_filters={'label': 'impurity_info'}, tag='writeout'
        )
        through_host.append(orm.RemoteData, with_incoming='writeout', tag='remote')
        through_host.append(
            orm.CalcJobNode,
            with_incoming='remote',
            edge_filters={'label': {'in': list(_REMOTE_LABELS)}},
            filters={'process_type': KKRIMP_PROCESS_TYPE},
            project='id',
        )
        for query in (direct, through_host):
            for info_pk, calculation_pk in query.iterall():
                found[info_pk].add(calculation_pk)
    return found


def find_kkr_results(clusters: ImpurityClusters) -> dict[str, list[KkrResult]]:
    """Return the ``KkrimpCalculation`` runs of each row's embedding, by row key, oldest first.

    Only calculations with ``output_parameters`` count, and only those whose host (aiida-kkr's
    ``find_parent_structure`` of their host Green function) is the row's host; a row with none has an empty list.

    :raises KkrTargetError: if the rows cannot be traced to ``impurity_info`` nodes.
    """
    extraction = _source_extraction(clusters)
    infos = _impurity_infos_of(extraction)
    keys = clusters.keys
    missing = [key for key in keys if key not in infos]
    if missing:
        raise KkrTargetError(
            f'the extraction {extraction.process_label}<{extraction.pk}> of {clusters} has no impurity_info for the '
            f'row keys {missing[:5]}.'
        )
    host_uuids = [clusters.hosts[index]['uuid'] for index in clusters.host_of]
    runs = _runs_of([(host_uuid, infos[key]) for key, host_uuid in zip(keys, host_uuids, strict=True)])
    return dict(zip(keys, runs, strict=True))


def find_embedding_results(embeddings: collections.abc.Iterable[t.Any]) -> list[list[KkrResult]]:
    """Return the ``KkrimpCalculation`` runs of each embedding, oldest first, in the order given.

    :param embeddings: (host ``StructureData``, ``impurity_info`` ``Dict``) pairs or
        :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding` objects, as the work chain's builders take them.
    """
    pairs = []
    for embedding in embeddings:
        host, info = embedding if isinstance(embedding, tuple) else (embedding.host, embedding.impurity_info)
        pairs.append((host.uuid, info))
    return _runs_of(pairs)


def _runs_of(embeddings: list[tuple[str, orm.Dict]]) -> list[list[KkrResult]]:
    """The runs with ``output_parameters`` of each (host UUID, ``impurity_info``) embedding, oldest first."""
    candidates = _candidate_calculations(sorted({info.pk for _, info in embeddings}))
    calculation_pks = sorted(set().union(*candidates.values())) if candidates else []
    calculations = {node.pk: node for node in _load(orm.CalcJobNode, calculation_pks)}
    parameters = _output_parameters(calculation_pks)
    resolver = _Resolver()
    resolver.prefetch(list(calculations.values()))
    embedding_of: dict[int, tuple[str, str] | None] = {}
    for pk, calculation in calculations.items():
        try:
            embedding_of[pk] = resolver.resolve(calculation).key
        except ImpurityEmbeddingError:
            embedding_of[pk] = None
    found = []
    for host_uuid, info in embeddings:
        runs = [
            calculations[pk]
            for pk in candidates[info.pk]
            if pk in parameters and embedding_of[pk] == (host_uuid, info.uuid)
        ]
        runs.sort(key=lambda node: (node.ctime, node.pk))
        found.append([KkrResult(run, parameters[run.pk]) for run in runs])
    return found


def results_inputs(found: collections.abc.Mapping[str, list[KkrResult]]) -> dict[str, dict[str, orm.Dict]]:
    """The ``results`` namespace of ``kkr_result_targets`` (``<row key>.c<i>``, oldest first) from runs by row key;
    rows without a run have no entry."""
    return {
        key: {f'c{index}': result.output_parameters for index, result in enumerate(runs)}
        for key, runs in found.items()
        if runs
    }


def _load(entity: type[orm.Node], pks: list[int]) -> list[orm.Node]:
    nodes = []
    for start in range(0, len(pks), 500):
        builder = orm.QueryBuilder().append(entity, filters={'id': {'in': pks[start : start + 500]}})
        nodes.extend(builder.all(flat=True))
    return nodes


def _output_parameters(calculation_pks: list[int]) -> dict[int, orm.Dict]:
    found = {}
    for start in range(0, len(calculation_pks), 500):
        builder = orm.QueryBuilder().append(
            orm.CalcJobNode, filters={'id': {'in': calculation_pks[start : start + 500]}}, project='id', tag='calc'
        )
        builder.append(
            orm.Dict,
            with_incoming='calc',
            edge_filters={'label': 'output_parameters', 'type': LinkType.CREATE.value},
            project='*',
        )
        found.update(dict(builder.all()))
    return found


def kkr_target_inputs(
    clusters: ImpurityClusters, target: KkrTarget | collections.abc.Mapping[str, t.Any]
) -> dict[str, t.Any]:
    """Return the inputs of :func:`~aiida_mlworkbench.calcfunctions.targets.kkr_result_targets` for ``clusters``.

    ``results.<row key>.c<i>`` is the ``output_parameters`` of the ``i``-th calculation of that embedding, oldest
    first; rows without any calculation have no entry (the calcfunction applies the ``missing`` policy).

    :raises KkrTargetError: for an unusable specification, or clusters that cannot be traced to aiida-kkr nodes.
    """
    specification = target if isinstance(target, KkrTarget) else KkrTarget.from_dict(target)
    return {
        'clusters': clusters,
        'target': orm.Dict(dataclasses.asdict(specification)),
        'results': results_inputs(find_kkr_results(clusters)),
    }
