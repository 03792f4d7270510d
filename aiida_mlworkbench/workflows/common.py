"""What the work chains share: rows given as aiida-kkr embeddings or as ready clusters, and the extraction step.

A work chain that derives from :class:`ClusterSource` takes either the embeddings as aiida-kkr stored them (one
``impurity_info`` per embedding and the distinct hosts, linked by :class:`~aiida_mlworkbench.engine.ManyInputs`) or
a ready :class:`~aiida_mlworkbench.data.ImpurityClusters`, and has the steps to extract the clusters and to report a
failed child as ``label<pk>``.
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Mapping

from aiida import orm
from aiida.common import LinkType
from aiida.engine import ExitCode, ProcessBuilder, WorkChain

from aiida_mlworkbench.calcfunctions.clusters import (
    check_embeddings,
    embedding_inputs,
    embedding_key,
    extract_impurity_clusters,
)
from aiida_mlworkbench.calcfunctions.featurize import featurization_jobs, featurize
from aiida_mlworkbench.data import ImpurityClusters
from aiida_mlworkbench.engine import ManyInputs
from aiida_mlworkbench.kkr.geometry import RcutUnit

__all__ = ('ClusterSource', 'embeddings_pairs', 'validate_cluster_source', 'validate_n_jobs')


def validate_n_jobs(value: t.Any, _: t.Any) -> str | None:
    """The number of featurization processes: a non-zero integer, -1 for all cores."""
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


def validate_cluster_source(inputs: Mapping[str, t.Any]) -> str | None:
    """Check the ``embeddings`` (or ``clusters``) inputs: one of the two, consistent keys, each embedding usable.

    Every embedding is checked as far as possible without building its cluster
    (:func:`~aiida_mlworkbench.calcfunctions.clusters.check_embeddings`), including the limit on the cluster size
    (:data:`~aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS`).
    """
    embeddings = inputs.get('embeddings', {})
    hosts, infos = embeddings.get('hosts', {}), embeddings.get('impurity_infos', {})
    clusters = inputs.get('clusters')
    if bool(hosts or infos) == (clusters is not None):
        return 'give either `embeddings` (hosts, impurity_infos, host_of) or ready `clusters`, not both and not neither'
    rcut_units = embeddings.get('rcut_units', {})
    if not set(rcut_units) <= set(infos):
        return f'embeddings.rcut_units has keys that are not embeddings: {sorted(set(rcut_units) - set(infos))[:5]}'
    if clusters is not None:
        return None
    if not infos:
        return 'embeddings.impurity_infos is empty: give one impurity_info per embedding, or ready `clusters`'
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
    units = {key: node.value for key, node in rcut_units.items()}
    try:
        check_embeddings(
            [(f'embedding {key}', hosts[host_of[key]], infos[key], units.get(key)) for key in sorted(infos)]
        )
    except ValueError as exception:
        return f'{exception}. Fix or leave out this embedding.'
    return None


def number_of_rows(inputs: Mapping[str, t.Any]) -> int:
    """The number of rows the inputs define: embeddings, or clusters."""
    infos = inputs.get('embeddings', {}).get('impurity_infos', {})
    return len(infos) if infos else len(inputs['clusters'])


def embeddings_pairs(embeddings: Iterable[t.Any]) -> tuple[list, list, list]:
    """The hosts, ``impurity_info`` nodes and Rcut units of (host, impurity_info) pairs or embedding objects."""
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
    return hosts, infos, units


class ClusterSource(ManyInputs, WorkChain):
    """Work chain base: the rows come as aiida-kkr embeddings (extracted by :meth:`extract_clusters`) or as clusters.

    A derived work chain calls :meth:`define_cluster_source` in ``define`` (the ``embeddings``, ``clusters`` and
    ``n_jobs`` inputs, the ``clusters`` output), defines the exit codes ``ERROR_CLUSTER_EXTRACTION`` and
    ``ERROR_FEATURIZATION`` and the output ``features``, and puts ``if_(cls.has_embeddings)(cls.extract_clusters)``
    first in its outline; :meth:`_featurize` then makes the features.
    """

    @classmethod
    def define_cluster_source(cls, spec: t.Any) -> None:
        """Define the ``embeddings`` namespace, the ``clusters`` input and the ``clusters`` output."""
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
            'n_jobs',
            valid_type=int,
            non_db=True,
            default=1,
            validator=validate_n_jobs,
            help='The number of processes for featurization, which changes the speed and never the features.',
        )
        spec.output(
            'clusters',
            valid_type=ImpurityClusters,
            required=False,
            help='The impurity clusters extracted from the embeddings.',
        )

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

    def _featurize(self, clusters: ImpurityClusters, descriptor: orm.Dict) -> ExitCode | None:
        """Run ``featurize`` on ``n_jobs`` processes and expose its matrix as ``features``, or fail with
        ``ERROR_FEATURIZATION``."""
        name, jobs = descriptor.get('name'), self.inputs.n_jobs
        self.report(f'featurizing {len(clusters)} clusters with {name} on {jobs} job(s)')
        with featurization_jobs(jobs):
            features, process = featurize.run_get_node(
                clusters=clusters, descriptor=descriptor, metadata={'call_link_label': 'featurize'}
            )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_FEATURIZATION)
        self.report(f'feature matrix {features.shape[0]} x {features.shape[1]}, {features.nnz} non-zeros')
        self.out('features', features)
        return None

    def _clusters(self) -> ImpurityClusters:
        """The clusters of the rows: given, or extracted by :meth:`extract_clusters`."""
        return self.inputs.clusters if 'clusters' in self.inputs else self.outputs['clusters']

    @classmethod
    def _builder_from_embeddings(cls, embeddings: Iterable[t.Any]) -> ProcessBuilder:
        """A builder with the ``embeddings`` namespace of the pairs, row ``i`` under ``embedding_key(i)``."""
        hosts, infos, units = embeddings_pairs(embeddings)
        builder = cls.get_builder()
        builder.embeddings = embedding_inputs([embedding_key(i) for i in range(len(infos))], hosts, infos, units)
        return builder

    @classmethod
    def _set_inputs(cls, builder: ProcessBuilder, inputs: Mapping[str, t.Any]) -> None:
        """Set each input on the builder: its port's serializer turns a plain value into the node the port expects.

        :raises ValueError: naming an unknown input and the known ones.
        """
        ports = cls.spec().inputs
        for name, value in inputs.items():
            if name not in ports:
                known = ', '.join(sorted(ports))
                raise ValueError(f'unknown input `{name}` of {cls.__name__}; its inputs are: {known}')
            builder[name] = value
