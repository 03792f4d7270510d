"""Work chain that learns a property of impurity clusters from aiida-kkr embeddings, every step in the provenance graph.

embeddings (host StructureData + impurity_info Dict, as aiida-kkr stored them) or a ready ImpurityClusters
  -> extract_impurity_clusters -> featurize -> targets -> split_rows -> train_model -> score_model
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Mapping

from aiida import orm
from aiida.common import LinkType
from aiida.engine import ExitCode, ProcessBuilder, WorkChain, if_

from aiida_mlworkbench.calcfunctions.clusters import (
    check_embeddings,
    embedding_inputs,
    embedding_key,
    extract_impurity_clusters,
)
from aiida_mlworkbench.calcfunctions.featurize import featurization_jobs, featurize
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
    targets_from_values,
)
from aiida_mlworkbench.calcfunctions.train import train_model
from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.descriptors import get_descriptor
from aiida_mlworkbench.engine import ManyInputs
from aiida_mlworkbench.estimators import validate_estimator_specification
from aiida_mlworkbench.kkr.geometry import RcutUnit

__all__ = ('ImpurityLearningWorkChain', 'embedding_key')

TARGETS = ('host_lattice', 'values')
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


def validate_n_jobs(value: t.Any, _: t.Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        return f'n_jobs must be a non-zero integer (-1 for all cores), got {value!r}'
    return None


def validate_rcut_units(nodes: Mapping[str, orm.Str], _: t.Any) -> str | None:
    """Each unit of Rcut must be one the geometry code knows."""
    units = [unit.value for unit in RcutUnit]
    wrong = sorted(key for key, node in nodes.items() if node.value not in units)
    if wrong:
        return f'embeddings.rcut_units {wrong[:5]} must be one of {units}, got {nodes[wrong[0]].value!r}'
    return None


def validate_inputs(inputs: Mapping[str, t.Any], _: t.Any) -> str | None:
    """Check the inputs together, before anything runs: embeddings or clusters, target, split and cluster sizes.

    Every embedding is checked as far as possible without building its cluster
    (:func:`~aiida_mlworkbench.calcfunctions.clusters.check_embeddings`), including the limit on the cluster size
    (:data:`~aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS`), and the split is planned for the number of rows with
    the rules ``split_rows`` applies (:func:`~aiida_mlworkbench.calcfunctions.split.plan_split`).
    """
    embeddings = inputs.get('embeddings', {})
    hosts, infos = embeddings.get('hosts', {}), embeddings.get('impurity_infos', {})
    clusters = inputs.get('clusters')
    if bool(hosts or infos) == (clusters is not None):
        return 'give either `embeddings` (hosts, impurity_infos, host_of) or ready `clusters`, not both and not neither'
    host_of: dict[str, t.Any] = {}
    if infos:
        if 'host_of' not in embeddings:
            return 'embeddings.host_of is missing: a Dict from each embedding key to its host key (embedding_inputs)'
        host_of = embeddings['host_of'].get_dict()
        if set(host_of) != set(infos):
            differing = sorted(set(host_of) ^ set(infos))[:5]
            return f'embeddings.host_of and embeddings.impurity_infos must have the same keys; differing: {differing}'
        unknown = sorted({str(value) for value in host_of.values()} - set(hosts))
        if unknown:
            return f'embeddings.host_of names hosts that are not in embeddings.hosts: {unknown[:5]}'
        unused = sorted(set(hosts) - set(host_of.values()))
        if unused:
            return f'embeddings.hosts {unused[:5]} are the host of no embedding: leave them out'
    rcut_units = embeddings.get('rcut_units', {})
    if not set(rcut_units) <= set(infos):
        return f'embeddings.rcut_units has keys that are not embeddings: {sorted(set(rcut_units) - set(infos))[:5]}'
    target = inputs['target'].value
    if target not in TARGETS:
        return f'unknown target `{target}`: choose one of {", ".join(TARGETS)}'
    n_samples = len(infos) if infos else len(clusters)
    labels = None
    if target == 'values':
        if 'target_values' not in inputs:
            return 'target `values` needs the input `target_values` (a List with one value per embedding)'
        values = inputs['target_values'].get_list()
        if len(values) != n_samples:
            return f'target_values has {len(values)} values but there are {n_samples} embeddings or clusters'
        labels = values
    elif 'target_values' in inputs:
        return f'target_values is given but the target is `{target}`: set target to `values` to use them'
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

    if infos:
        units = {key: node.value for key, node in rcut_units.items()}
        try:
            check_embeddings(
                [(f'embedding {key}', hosts[host_of[key]], infos[key], units.get(key)) for key in sorted(infos)]
            )
        except ValueError as exception:
            return f'{exception}. Fix or leave out this embedding.'
    return None


class ImpurityLearningWorkChain(ManyInputs, WorkChain):
    """Learn a property of impurity clusters (by default the host lattice type) with every step recorded.

    Takes the impurity embeddings as aiida-kkr stored them (the host ``StructureData`` and ``impurity_info`` ``Dict``
    nodes, see :meth:`get_builder_from_kkr`) or a ready :class:`~aiida_mlworkbench.data.ImpurityClusters`, and runs
    cluster extraction, featurization, targets, a train/test split, training and scoring, each as a calcfunction
    whose outputs the work chain exposes. Given embeddings, it has one input per embedding and links them with
    :class:`~aiida_mlworkbench.engine.ManyInputs`; given clusters, it has a handful of inputs.
    """

    @classmethod
    def define(cls, spec):
        """Define the inputs (embeddings or clusters, and the learning settings), the outline and the outputs."""
        super().define(spec)
        spec.input_namespace(
            'embeddings',
            required=False,
            help='The impurity embeddings as aiida-kkr stored them: one impurity_info per embedding key, each distinct '
            'host once, and host_of naming the host of each embedding. The keys sort in row order.',
        )
        spec.input_namespace(
            'embeddings.hosts',
            valid_type=orm.StructureData,
            dynamic=True,
            required=False,
            help='The distinct host crystals of the embeddings, under host keys.',
        )
        spec.input_namespace(
            'embeddings.impurity_infos',
            valid_type=orm.Dict,
            dynamic=True,
            required=False,
            help='The impurity_info of each embedding, with Rcut (bounded by MAX_CLUSTER_ATOMS) or imp_cls.',
        )
        spec.input(
            'embeddings.host_of',
            valid_type=orm.Dict,
            required=False,
            help='The host key of each embedding key.',
        )
        spec.input_namespace(
            'embeddings.rcut_units',
            valid_type=orm.Str,
            dynamic=True,
            required=False,
            validator=validate_rcut_units,
            help="The unit of Rcut of the embeddings where it is not Angstrom: 'alat' for aiida-kkr before mid 2019.",
        )
        spec.input(
            'clusters',
            valid_type=ImpurityClusters,
            required=False,
            help='Ready impurity clusters instead of embeddings, one row per sample.',
        )
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
            help="What to learn: 'host_lattice' (bcc, fcc, hcp or other, of the host crystal) or 'values' (the "
            'input target_values).',
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
        spec.input(
            'n_jobs',
            valid_type=int,
            non_db=True,
            default=1,
            validator=validate_n_jobs,
            help='The number of processes for featurization, which changes the speed and never the features.',
        )
        spec.inputs.validator = validate_inputs

        spec.outline(
            if_(cls.has_embeddings)(cls.extract_clusters),
            cls.featurize,
            cls.make_targets,
            cls.split_rows,
            cls.train,
            cls.score,
        )

        spec.output(
            'clusters',
            valid_type=ImpurityClusters,
            required=False,
            help='The impurity clusters extracted from the embeddings.',
        )
        spec.output('features', valid_type=SparseFeatureMatrix, help='The feature matrix, one row per cluster.')
        spec.output('targets', valid_type=orm.ArrayData, help='The target of each row (array `targets`).')
        spec.output('groups', valid_type=orm.ArrayData, required=False, help='The host of each row (array `groups`).')
        spec.output('split', valid_type=orm.ArrayData, help='The train and test row indices (arrays `train`, `test`).')
        spec.output('model', valid_type=TrainedModel, help='The fitted estimator.')
        spec.output('metrics', valid_type=orm.Dict, help='The test metrics, and the training score.')
        spec.output('score', valid_type=orm.Float, help='The test accuracy (classification) or R2 (regression).')

        spec.exit_code(401, 'ERROR_CLUSTER_EXTRACTION', message='Cluster extraction failed: {message}')
        spec.exit_code(402, 'ERROR_FEATURIZATION', message='Featurization failed: {message}')
        spec.exit_code(403, 'ERROR_TARGETS', message='Making the targets failed: {message}')
        spec.exit_code(405, 'ERROR_SPLIT', message='The train/test split failed: {message}')
        spec.exit_code(406, 'ERROR_TRAINING', message='Training failed: {message}')
        spec.exit_code(407, 'ERROR_SCORING', message='Scoring failed: {message}')

    # -- steps -----------------------------------------------------------------------------------------------------

    def _failed(self, process: orm.ProcessNode, exit_code: ExitCode) -> ExitCode:
        """Report the failed child as ``label<pk>`` with its exit status, and return ``exit_code`` with its message."""
        label = process.base.links.get_incoming(link_type=LinkType.CALL_CALC).first()
        name = label.link_label if label is not None else process.process_label
        self.report(f'{name}<{process.pk}> failed with exit status {process.exit_status}: {process.exit_message}')
        return exit_code.format(message=f'{name}<{process.pk}>: {process.exit_message}')

    def has_embeddings(self) -> bool:
        """Whether the clusters are to be extracted from embeddings (otherwise they are given ready)."""
        return 'clusters' not in self.inputs

    def extract_clusters(self) -> ExitCode | None:
        """Build all impurity clusters in one process that consumes every host and impurity_info."""
        embeddings = self.inputs.embeddings
        self.report(f'extracting {len(embeddings.impurity_infos)} impurity clusters')
        inputs = {name: dict(value) if isinstance(value, Mapping) else value for name, value in embeddings.items()}
        outputs, process = extract_impurity_clusters.run_get_node(
            **inputs, metadata={'call_link_label': 'extract_clusters'}
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_CLUSTER_EXTRACTION)
        self.out('clusters', outputs['clusters'])
        return None

    def _clusters(self) -> ImpurityClusters:
        return self.inputs.clusters if 'clusters' in self.inputs else self.outputs['clusters']

    def featurize(self) -> ExitCode | None:
        """Describe every cluster with the descriptor, in one process that stores one sparse matrix."""
        clusters = self._clusters()
        descriptor = self.inputs.descriptor.get_dict()
        jobs = self.inputs.n_jobs
        self.report(f'featurizing {len(clusters)} clusters with {descriptor.get("name")} on {jobs} job(s)')
        with featurization_jobs(self.inputs.n_jobs):
            features, process = featurize.run_get_node(
                clusters=clusters, descriptor=self.inputs.descriptor, metadata={'call_link_label': 'featurize'}
            )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_FEATURIZATION)
        self.report(f'feature matrix {features.shape[0]} x {features.shape[1]}, {features.nnz} non-zeros')
        self.out('features', features)
        return None

    def make_targets(self) -> ExitCode | None:
        """Make the target of each row: the given values, or the lattice type of each row's host."""
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

    def split_rows(self) -> ExitCode | None:
        """Split the rows into a train and a test set (grouped by host if asked)."""
        settings = check_split_settings(self.inputs.split.get_dict())
        inputs: dict[str, t.Any] = {
            'targets': self.outputs['targets'],
            'test_fraction': orm.Float(settings['test_fraction']),
            'seed': orm.Int(settings['seed']),
            'stratify': orm.Bool(settings['stratify']),
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
        self.report(f'test score {outputs["score"].value:.4f}')
        return None

    # -- builders --------------------------------------------------------------------------------------------------

    @classmethod
    def get_builder_from_embeddings(cls, embeddings: Iterable[t.Any], **inputs: t.Any) -> ProcessBuilder:
        """Return a builder for (host, impurity_info) pairs or :class:`~aiida_mlworkbench.kkr.ImpurityEmbedding`
        objects, one row each in the order given.

        :param inputs: further inputs (descriptor, target, split, estimator, ...) as nodes or plain values.
        """
        hosts, infos, units = [], [], []
        for embedding in embeddings:
            if isinstance(embedding, tuple):
                host, info = embedding
                unit = None
            else:
                host, info, unit = embedding.host, embedding.impurity_info, embedding.rcut_unit
            hosts.append(host)
            infos.append(info)
            units.append(unit)
        builder = cls.get_builder()
        builder.embeddings = embedding_inputs([embedding_key(i) for i in range(len(infos))], hosts, infos, units)
        _set_inputs(builder, inputs)
        return builder

    @classmethod
    def get_builder_from_kkr(
        cls,
        nodes: orm.Node | orm.Group | Iterable[orm.Node],
        **inputs: t.Any,
    ) -> ProcessBuilder:
        """Return a builder for the impurity embeddings of aiida-kkr processes (a node, a list or a ``Group``).

        Each (host, impurity_info) pair is one embedding however many processes used it; in a ``Group``, nodes that
        are no impurity embedding are skipped (and logged).
        """
        from aiida_mlworkbench.kkr.embeddings import resolve_impurity_embeddings

        resolved = resolve_impurity_embeddings(nodes)
        if not len(resolved):
            raise ValueError(f'no impurity embeddings found in {nodes}')
        return cls.get_builder_from_embeddings(resolved, **inputs)

    @classmethod
    def get_builder_from_clusters(cls, clusters: ImpurityClusters, **inputs: t.Any) -> ProcessBuilder:
        """Return a builder for a ready ``ImpurityClusters`` node."""
        builder = cls.get_builder()
        builder.clusters = clusters
        _set_inputs(builder, inputs)
        return builder


def _set_inputs(builder: ProcessBuilder, inputs: Mapping[str, t.Any]) -> None:
    """Set each input on the builder: its port's serializer turns a plain value into the node the port expects.

    :raises ValueError: naming an unknown input and the known ones.
    """
    ports = ImpurityLearningWorkChain.spec().inputs
    for name, value in inputs.items():
        if name not in ports:
            known = ', '.join(sorted(ports))
            raise ValueError(f'unknown input `{name}` of ImpurityLearningWorkChain; its inputs are: {known}')
        builder[name] = value
