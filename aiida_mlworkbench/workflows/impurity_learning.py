"""Work chain that learns a property of impurity clusters from aiida-kkr embeddings, every step in the provenance graph.

embeddings (host StructureData + impurity_info Dict, as aiida-kkr stored them) or a ready ImpurityClusters
  -> extract_impurity_clusters -> targets -> featurize -> split_rows -> train_model -> score_model

The targets are the host lattice type, given values, or a quantity that juKKR computed for each embedding (the
``output_parameters`` of its KkrimpCalculation runs, found in the graph by the builders).
"""

from __future__ import annotations

import re
import typing as t
from collections.abc import Iterable, Mapping

from aiida import orm
from aiida.engine import ExitCode, ProcessBuilder, if_

from aiida_mlworkbench.calcfunctions.clusters import embedding_key
from aiida_mlworkbench.calcfunctions.score import score_model
from aiida_mlworkbench.calcfunctions.split import (
    DEFAULT_SPLIT,
    SplitSettingsError,
    check_split_settings,
    plan_split,
    split_rows,
)
from aiida_mlworkbench.calcfunctions.targets import (
    TargetValuesError,
    check_target_values,
    host_lattice_targets,
    kkr_result_targets,
    targets_from_values,
)
from aiida_mlworkbench.calcfunctions.train import train_model
from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.descriptors import get_descriptor
from aiida_mlworkbench.estimators import validate_estimator_specification
from aiida_mlworkbench.kkr.results import KkrTarget, KkrTargetError
from aiida_mlworkbench.workflows.common import ClusterSource, number_of_rows, validate_cluster_source

__all__ = ('ImpurityLearningWorkChain', 'embedding_key')

TARGETS = ('host_lattice', 'values', 'kkr')
DEFAULT_DESCRIPTOR = {'name': 'soap', 'r_cut': 6.0, 'n_max': 5, 'l_max': 5, 'sigma': 1.0, 'average': 'inner'}
DEFAULT_ESTIMATOR = {
    'estimator': 'SVC',
    'parameters': {'kernel': 'linear'},
    'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
}


# Port validators: each names what is wrong and what to give instead, before anything is stored.


def validate_descriptor(node: orm.Dict, _: t.Any) -> str | None:
    """The descriptor parameters must build a descriptor (ranges and types of every DScribe parameter included)."""
    try:
        get_descriptor(node.get_dict())
    except (ValueError, TypeError, KeyError) as exception:
        return f'invalid descriptor parameters: {exception}'
    return None


def validate_estimator(node: orm.Dict, _: t.Any) -> str | None:
    """The estimator specification must name allow-listed classes with parameters that scikit-learn accepts."""
    return validate_estimator_specification(node.get_dict())


def validate_split(node: orm.Dict, _: t.Any) -> str | None:
    """The split settings must follow :func:`~aiida_mlworkbench.calcfunctions.split.check_split_settings`."""
    try:
        check_split_settings(node.get_dict())
    except SplitSettingsError as exception:
        return str(exception)
    return None


def validate_target(node: orm.Str, _: t.Any) -> str | None:
    if node.value not in TARGETS:
        return f'unknown target `{node.value}`: choose one of {", ".join(TARGETS)}'
    return None


def validate_target_values(node: orm.List, _: t.Any) -> str | None:
    """The values must be all finite numbers or all strings (the rule of ``targets_from_values``)."""
    try:
        check_target_values(node.get_list())
    except TargetValuesError as exception:
        return f'invalid target_values: {exception}'
    return None


def validate_kkr_target(node: orm.Dict, _: t.Any) -> str | None:
    """The KKR target specification must name a known quantity or key path and known policies."""
    try:
        KkrTarget.from_dict(node.get_dict())
    except KkrTargetError as exception:
        return f'invalid kkr_target: {exception}'
    return None


def validate_inputs(inputs: Mapping[str, t.Any], _: t.Any) -> str | None:
    """Check the inputs together, before anything runs: embeddings or clusters, target, split and cluster sizes.

    The embeddings are checked by :func:`~aiida_mlworkbench.workflows.common.validate_cluster_source`, and the split
    is planned for the number of rows with the rules ``split_rows`` applies
    (:func:`~aiida_mlworkbench.calcfunctions.split.plan_split`).
    """
    problem = validate_cluster_source(inputs)
    if problem:
        return problem
    clusters = inputs.get('clusters')
    target = inputs['target'].value
    if target not in TARGETS:
        return f'unknown target `{target}`: choose one of {", ".join(TARGETS)}'
    n_samples = number_of_rows(inputs)
    labels = None
    if target == 'values':
        if 'target_values' not in inputs:
            return 'target `values` needs the input `target_values` (a List with one value per embedding)'
        values = inputs['target_values'].get_list()
        if len(values) != n_samples:
            return f'target_values has {len(values)} values but there are {n_samples} embeddings or clusters'
        labels = values if all(isinstance(value, str) for value in values) else None
    elif 'target_values' in inputs:
        return f'target_values is given but the target is `{target}`: set target to `values` to use them'
    if target == 'kkr':
        if 'kkr_target' not in inputs:
            return "target `kkr` needs the input `kkr_target`, e.g. {'quantity': 'total_spin_moment'}"
        rows = set(inputs['embeddings']['impurity_infos']) if clusters is None else set(clusters.keys)
        kkr_results = inputs.get('kkr_results', {})
        stray = sorted(set(kkr_results) - rows)
        if stray:
            return f'kkr_results has results of no row: {stray[:5]}; the builders find them for you'
        malformed = sorted(key for key, runs in kkr_results.items() if not _is_runs(runs))
        if malformed:
            return (
                f'kkr_results.{malformed[0]} must be a namespace of runs c0, c1, ... (oldest first), each the '
                'output_parameters Dict of a KkrimpCalculation; the builders find them for you'
            )
    elif 'kkr_target' in inputs or inputs.get('kkr_results'):
        return f'kkr_target or kkr_results is given but the target is `{target}`: set target to `kkr` to use them'
    if target == 'host_lattice' and clusters is not None and not clusters.hosts:
        return (
            f'{clusters} records no host crystals, which the target `host_lattice` needs: give clusters extracted '
            'from embeddings, or target values'
        )

    try:
        settings = check_split_settings(inputs['split'].get_dict())
        if settings['grouped'] and target != 'host_lattice':
            return 'split grouped needs the target `host_lattice` (the groups are the hosts): set grouped to false'
        plan_split(n_samples, settings, labels=labels)
    except SplitSettingsError as exception:
        return f'split: {exception}'
    return None


class ImpurityLearningWorkChain(ClusterSource):
    """Learn a property of impurity clusters (by default the host lattice type) with every step recorded.

    Takes the impurity embeddings as aiida-kkr stored them (the host ``StructureData`` and ``impurity_info`` ``Dict``
    nodes, see :meth:`get_builder_from_kkr`) or a ready :class:`~aiida_mlworkbench.data.ImpurityClusters`, and runs
    cluster extraction, targets, featurization (of the rows that have a target), a train/test split, training and
    scoring, each as a calcfunction whose outputs the work chain exposes. Given embeddings, it has one input per
    embedding and links them with :class:`~aiida_mlworkbench.engine.ManyInputs`; given clusters, it has a handful of
    inputs. With the target ``kkr``, it learns what juKKR computed for each embedding (see
    :meth:`get_builder_from_kkr`).
    """

    @classmethod
    def define(cls, spec):
        """Define the inputs (embeddings or clusters, and the learning settings), the outline and the outputs."""
        super().define(spec)
        cls.define_cluster_source(spec)
        spec.input(
            'descriptor',
            valid_type=orm.Dict,
            default=lambda: orm.Dict(DEFAULT_DESCRIPTOR),
            serializer=orm.to_aiida_type,
            validator=validate_descriptor,
            help='The descriptor parameters with a registered `name`; for SOAP: species, r_cut, n_max, l_max, sigma, '
            'rbf, average, weighting, periodic and dtype.',
        )
        spec.input(
            'target',
            valid_type=orm.Str,
            default=lambda: orm.Str('host_lattice'),
            serializer=orm.to_aiida_type,
            validator=validate_target,
            help="What to learn: 'host_lattice' (bcc, fcc, hcp or other, of the host crystal), 'values' (the input "
            "target_values) or 'kkr' (a quantity of the KkrimpCalculation results, see kkr_target).",
        )
        spec.input(
            'kkr_target',
            valid_type=orm.Dict,
            required=False,
            serializer=orm.to_aiida_type,
            validator=validate_kkr_target,
            help='For the target kkr: the quantity of the KkrimpCalculation output_parameters (a short name such as '
            'total_spin_moment, or a key path) and the policies for several runs and for missing values.',
        )
        spec.input_namespace(
            'kkr_results',
            valid_type=orm.Dict,
            dynamic=True,
            required=False,
            help='For the target kkr: the output_parameters of the KkrimpCalculation runs of each row, as '
            'kkr_results.<row key>.c<i> (oldest first). The builders find them in the graph.',
        )
        spec.input(
            'target_values',
            valid_type=orm.List,
            required=False,
            serializer=orm.to_aiida_type,
            validator=validate_target_values,
            help='One value per embedding in row order: finite numbers (regression) or strings (classification).',
        )
        spec.input(
            'split',
            valid_type=orm.Dict,
            default=lambda: orm.Dict(DEFAULT_SPLIT),
            serializer=orm.to_aiida_type,
            validator=validate_split,
            help='The train/test split: test_fraction (between 0 and 1), seed (0 to 2**32 - 1), stratify, and '
            'grouped (all embeddings of one host on one side).',
        )
        spec.input(
            'estimator',
            valid_type=orm.Dict,
            default=lambda: orm.Dict(DEFAULT_ESTIMATOR),
            serializer=orm.to_aiida_type,
            validator=validate_estimator,
            help='The estimator specification: estimator (an allow-listed name), parameters, scaler, kernel and '
            'training.',
        )
        spec.inputs.validator = validate_inputs

        spec.outline(
            if_(cls.has_embeddings)(cls.extract_clusters),
            cls.make_targets,
            cls.featurize,
            cls.split_rows,
            cls.train,
            cls.score,
        )

        spec.output(
            'kept_clusters',
            valid_type=ImpurityClusters,
            required=False,
            help='The rows that have a KKR result, when the target kkr left some out (missing: drop).',
        )
        spec.output('features', valid_type=SparseFeatureMatrix, help='The feature matrix, one row per cluster.')
        spec.output('targets', valid_type=orm.ArrayData, help='The target of each row (array `targets`).')
        spec.output('groups', valid_type=orm.ArrayData, required=False, help='The host of each row (array `groups`).')
        spec.output('split', valid_type=orm.ArrayData, help='The train and test row indices (arrays `train`, `test`).')
        spec.output('model', valid_type=TrainedModel, help='The fitted estimator.')
        spec.output(
            'metrics',
            valid_type=orm.Dict,
            help='The test metrics and the training score; for a regression also the mean-predictor baseline, and the '
            'quantity and unit of the targets.',
        )
        spec.output('score', valid_type=orm.Float, help='The test accuracy (classification) or R2 (regression).')
        spec.output(
            'predictions',
            valid_type=orm.ArrayData,
            help='The true and predicted value of each test row (arrays rows, true, predicted), from which the parity '
            'plot or the confusion matrix is drawn.',
        )

        spec.exit_code(401, 'ERROR_CLUSTER_EXTRACTION', message='Cluster extraction failed: {message}')
        spec.exit_code(402, 'ERROR_FEATURIZATION', message='Featurization failed: {message}')
        spec.exit_code(403, 'ERROR_TARGETS', message='Making the targets failed: {message}')
        spec.exit_code(405, 'ERROR_SPLIT', message='The train/test split failed: {message}')
        spec.exit_code(406, 'ERROR_TRAINING', message='Training failed: {message}')
        spec.exit_code(407, 'ERROR_SCORING', message='Scoring failed: {message}')

    # -- steps -----------------------------------------------------------------------------------------------------

    def _rows(self) -> ImpurityClusters:
        """The clusters that are learned from: all of them, or those with a KKR result if the targets left some out."""
        return self.outputs['kept_clusters'] if 'kept_clusters' in self.outputs else self._clusters()

    def featurize(self) -> ExitCode | None:
        """Describe every cluster with the descriptor, in one process that stores one sparse matrix."""
        return self._featurize(self._rows(), self.inputs.descriptor)

    def make_targets(self) -> ExitCode | None:
        """Make the target of each row: the given values, a KKR result of its embedding, or its host's lattice type."""
        if self.inputs.target.value == 'kkr':
            return self._kkr_targets()
        if self.inputs.target.value == 'values':
            targets, process = targets_from_values.run_get_node(
                self.inputs.target_values, metadata={'call_link_label': 'targets'}
            )
            if not process.is_finished_ok:
                return self._failed(process, self.exit_codes.ERROR_TARGETS)
            self.out('targets', targets)
            return None

        outputs, process = host_lattice_targets.run_get_node(
            clusters=self._clusters(), metadata={'call_link_label': 'targets'}
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_TARGETS)
        labels = outputs['targets'].get_array('targets')
        counts = {label: int((labels == label).sum()) for label in outputs['targets'].base.attributes.get('classes')}
        self.report(f'host lattice targets of {len(self._clusters().hosts)} distinct hosts: {counts}')
        self.out('targets', outputs['targets'])
        self.out('groups', outputs['groups'])
        return None

    def _kkr_targets(self) -> ExitCode | None:
        """The targets from the KKR results of each row; rows without one are left out if ``missing`` is ``drop``."""
        results = {key: dict(runs) for key, runs in self.inputs.get('kkr_results', {}).items()}
        outputs, process = kkr_result_targets.run_get_node(
            clusters=self._clusters(),
            target=self.inputs.kkr_target,
            results=results,
            metadata={'call_link_label': 'targets'},
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_TARGETS)
        targets = outputs['targets']
        attributes = targets.base.attributes
        dropped = attributes.get('dropped')
        n_rows, n_sources = targets.get_shape('targets')[0], len(set(attributes.get('sources')))
        unit = f' ({attributes.get("unit")})' if attributes.get('unit') else ''
        message = f"KKR targets '{attributes.get('quantity')}'{unit} of {n_rows} rows"
        self.report(f'{message} from {n_sources} KkrimpCalculation results')
        if dropped:
            first = dropped[0]
            self.report(f'{len(dropped)} rows without a value left out, e.g. {first["key"]}: {first["reason"]}')
        self.out('targets', targets)
        if 'clusters' in outputs:
            self.out('kept_clusters', outputs['clusters'])
        return None

    def _task(self) -> str:
        return self.outputs['targets'].base.attributes.get('task', 'classification')

    def split_rows(self) -> ExitCode | None:
        """Split the rows into a train and a test set (grouped by host if asked)."""
        settings = check_split_settings(self.inputs.split.get_dict())
        inputs: dict[str, t.Any] = {
            'targets': self.outputs['targets'],
            'test_fraction': orm.Float(settings['test_fraction']),
            'seed': orm.Int(settings['seed']),
            'stratify': orm.Bool(settings['stratify'] and self._task() == 'classification'),
        }
        if settings['grouped']:
            inputs['groups'] = self.outputs['groups']
        split, process = split_rows.run_get_node(**inputs, metadata={'call_link_label': 'split'})
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_SPLIT)
        self.report(
            f'{split.base.attributes.get("kind")} split: {split.base.attributes.get("n_train")} train, '
            f'{split.base.attributes.get("n_test")} test rows'
        )
        self.out('split', split)
        return None

    def train(self) -> ExitCode | None:
        """Fit the estimator on the train rows."""
        self.report(f'training {self.inputs.estimator.get("estimator")}')
        model, process = train_model.run_get_node(
            features=self.outputs['features'],
            targets=self.outputs['targets'],
            split=self.outputs['split'],
            estimator=self.inputs.estimator,
            metadata={'call_link_label': 'train'},
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_TRAINING)
        self.out('model', model)
        return None

    def score(self) -> ExitCode | None:
        """Score the model on the test rows."""
        outputs, process = score_model.run_get_node(
            model=self.outputs['model'],
            features=self.outputs['features'],
            targets=self.outputs['targets'],
            split=self.outputs['split'],
            metadata={'call_link_label': 'score'},
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_SCORING)
        self.out('metrics', outputs['metrics'])
        self.out('score', outputs['score'])
        self.out('predictions', outputs['predictions'])
        self.report(f'test score {outputs["score"].value:.4f}')
        return None

    # -- builders --------------------------------------------------------------------------------------------------

    @classmethod
    def get_builder_from_embeddings(cls, embeddings: Iterable[t.Any], **inputs: t.Any) -> ProcessBuilder:
        """Return a builder for (host, impurity_info) pairs or :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding`
        objects, one row each in the order given.

        With ``target='kkr'`` and no ``kkr_results``, the KkrimpCalculation results of each embedding are found in the
        graph (:func:`~aiida_mlworkbench.kkr.results.find_embedding_results`) and set as ``kkr_results``.

        :param inputs: further inputs (descriptor, target, split, estimator, ...) as nodes or plain values.
        """
        from aiida_mlworkbench.kkr.results import find_embedding_results, results_inputs

        embeddings = list(embeddings)
        builder = cls._builder_from_embeddings(embeddings)
        cls._set_inputs(builder, inputs)
        if _wants_kkr_results(builder):
            keys = [embedding_key(i) for i in range(len(embeddings))]
            builder.kkr_results = results_inputs(dict(zip(keys, find_embedding_results(embeddings), strict=True)))
        return builder

    @classmethod
    def get_builder_from_kkr(
        cls,
        nodes: orm.Node | orm.Group | Iterable[orm.Node],
        **inputs: t.Any,
    ) -> ProcessBuilder:
        """Return a builder for the impurity embeddings of aiida-kkr processes (a node, a list or a ``Group``).

        Each (host, impurity_info) pair is one embedding however many processes used it; in a ``Group``, nodes that
        are no impurity embedding are skipped (and logged). For example, to learn the impurities' spin moments::

            builder = ImpurityLearningWorkChain.get_builder_from_kkr(
                group, target='kkr', kkr_target={'quantity': 'total_spin_moment', 'missing': 'drop'},
                estimator={'estimator': 'Ridge'},
            )
        """
        from aiida_mlworkbench.kkr.embeddings import resolve_impurity_embeddings

        resolved = resolve_impurity_embeddings(nodes)
        if not len(resolved):
            raise ValueError(f'no impurity embeddings found in {nodes}')
        return cls.get_builder_from_embeddings(resolved, **inputs)

    @classmethod
    def get_builder_from_clusters(cls, clusters: ImpurityClusters, **inputs: t.Any) -> ProcessBuilder:
        """Return a builder for a ready ``ImpurityClusters`` node (for ``target='kkr'``: one extracted from aiida-kkr
        embeddings, whose KkrimpCalculation results are then found in the graph)."""
        from aiida_mlworkbench.kkr.results import find_kkr_results, results_inputs

        builder = cls.get_builder()
        builder.clusters = clusters
        cls._set_inputs(builder, inputs)
        if _wants_kkr_results(builder):
            builder.kkr_results = results_inputs(find_kkr_results(clusters))
        return builder


def _is_runs(runs: t.Any) -> bool:
    """Whether ``runs`` is a namespace ``c<i>`` of ``Dict`` nodes, as ``kkr_result_targets`` takes it."""
    return isinstance(runs, Mapping) and all(
        re.fullmatch(r'c\d+', str(label)) is not None and isinstance(run, orm.Dict) for label, run in runs.items()
    )


def _wants_kkr_results(builder: ProcessBuilder) -> bool:
    """Whether the builder asks for the target ``kkr`` without giving the results: then the builder finds them."""
    target = builder.get('target')
    return target is not None and target.value == 'kkr' and not builder.get('kkr_results')
