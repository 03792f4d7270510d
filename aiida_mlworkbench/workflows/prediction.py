"""Work chain that predicts, with a trained model, what juKKR would give for impurities it has not run.

embeddings (host StructureData + impurity_info Dict, as aiida-kkr stored them) or a ready ImpurityClusters
  -> extract_impurity_clusters -> featurize (with the model's own descriptor) -> predict
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Mapping

from aiida import orm
from aiida.engine import ExitCode, ProcessBuilder, if_

from aiida_mlworkbench.calcfunctions.predict import predict
from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.workflows.common import ClusterSource, validate_cluster_source

__all__ = ('ImpurityPredictionWorkChain',)


def validate_model(model: TrainedModel, _: t.Any) -> str | None:
    """The model must record the descriptor of its training features, which describes the new clusters."""
    if not model.descriptor:
        return (
            f'{model} records no descriptor, so the new clusters cannot be described as its training clusters were: '
            'use a model made by train_model, or featurize yourself and call the predict calcfunction'
        )
    return None


def validate_inputs(inputs: Mapping[str, t.Any], _: t.Any) -> str | None:
    """The embeddings (or clusters) must be usable, as for the learning work chain."""
    return validate_cluster_source(inputs)


class ImpurityPredictionWorkChain(ClusterSource):
    """Predict a learned property for impurity embeddings, every step in the provenance graph.

    The clusters are described with the descriptor recorded in the model (its species list included), so the features
    are those the model was trained on; a cluster with a species outside that list is refused by name. The
    predictions link to the model, and through it to the KKR results it learned from.
    """

    @classmethod
    def define(cls, spec):
        """Define the inputs (a model, and embeddings or clusters), the outline and the outputs."""
        super().define(spec)
        cls.define_cluster_source(spec)
        spec.input(
            'model',
            valid_type=TrainedModel,
            validator=validate_model,
            help='The trained model, from ImpurityLearningWorkChain or train_model; its descriptor describes the rows.',
        )
        spec.inputs.validator = validate_inputs
        spec.outline(
            if_(cls.has_embeddings)(cls.extract_clusters),
            cls.featurize,
            cls.predict,
        )
        spec.output('features', valid_type=SparseFeatureMatrix, help='The feature matrix, one row per cluster.')
        spec.output(
            'predictions',
            valid_type=orm.ArrayData,
            help='The predicted value of each row (array predicted), with the unit and quantity the model learned.',
        )
        spec.exit_code(401, 'ERROR_CLUSTER_EXTRACTION', message='Cluster extraction failed: {message}')
        spec.exit_code(402, 'ERROR_FEATURIZATION', message='Featurization failed: {message}')
        spec.exit_code(408, 'ERROR_PREDICTION', message='Prediction failed: {message}')

    def featurize(self) -> ExitCode | None:
        """Describe every cluster with the model's descriptor, species list included."""
        return self._featurize(self._clusters(), orm.Dict(self.inputs.model.descriptor))

    def predict(self) -> ExitCode | None:
        """Predict one value per row."""
        predictions, process = predict.run_get_node(
            model=self.inputs.model, features=self.outputs['features'], metadata={'call_link_label': 'predict'}
        )
        if not process.is_finished_ok:
            return self._failed(process, self.exit_codes.ERROR_PREDICTION)
        attributes = predictions.base.attributes
        self.report(f'{attributes.get("n_rows")} predictions of {attributes.get("quantity", attributes.get("task"))}')
        self.out('predictions', predictions)
        return None

    @classmethod
    def get_builder_from_embeddings(
        cls, model: TrainedModel, embeddings: Iterable[t.Any], **inputs: t.Any
    ) -> ProcessBuilder:
        """Return a builder that predicts for (host, impurity_info) pairs or ``ImpurityEmbedding`` objects, one row
        each in the order given."""
        builder = cls._builder_from_embeddings(embeddings)
        builder.model = model
        cls._set_inputs(builder, inputs)
        return builder

    @classmethod
    def get_builder_from_kkr(
        cls, model: TrainedModel, nodes: orm.Node | orm.Group | Iterable[orm.Node], **inputs: t.Any
    ) -> ProcessBuilder:
        """Return a builder that predicts for the impurity embeddings of aiida-kkr nodes (a node, a list or a
        ``Group``), for example impurity workflows that did not converge. For impurities no process has used yet,
        give (host, impurity_info) pairs to :meth:`get_builder_from_embeddings`."""
        from aiida_mlworkbench.kkr.embeddings import resolve_impurity_embeddings

        resolved = resolve_impurity_embeddings(nodes)
        if not len(resolved):
            raise ValueError(f'no impurity embeddings found in {nodes}')
        return cls.get_builder_from_embeddings(model, resolved, **inputs)

    @classmethod
    def get_builder_from_clusters(
        cls, model: TrainedModel, clusters: ImpurityClusters, **inputs: t.Any
    ) -> ProcessBuilder:
        """Return a builder that predicts for a ready ``ImpurityClusters`` node."""
        builder = cls.get_builder()
        builder.model = model
        builder.clusters = clusters
        cls._set_inputs(builder, inputs)
        return builder
