"""Prediction with provenance: a ``TrainedModel`` and the rows to predict in, one prediction per row out.

The rows are a stored feature matrix, or impurity clusters that are described here with the model's own recorded
descriptor. Either way the model's descriptor decides: features of another descriptor are refused, never predicted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.calcfunctions.learning_inputs import TARGET_DESCRIPTION
from aiida_mlworkbench.data import (
    CorruptedClustersError,
    CorruptedFeatureMatrixError,
    CorruptedModelError,
    ImpurityClusters,
    IncompatibleFeaturesError,
    SparseFeatureMatrix,
    TrainedModel,
)
from aiida_mlworkbench.descriptors import DEFAULT_BLOCK_SIZE, StructureNotDescribableError, get_descriptor
from aiida_mlworkbench.restricted_pickle import UnsafePickleError

__all__ = ('EXIT_CODES', 'predict')

EXIT_CODES = {
    'rows_to_predict': ExitCode(370, 'give exactly one of `features` and `clusters`, got {given}'),
    'incompatible_features': ExitCode(371, 'the model cannot predict these features: {detail}'),
    'no_descriptor': ExitCode(
        372, '{model} records no descriptor, so clusters cannot be described as it expects: {hint}'
    ),
    'species_outside_list': ExitCode(373, '{detail}'),
    'unsafe_model': ExitCode(374, 'the model was refused, nothing of it ran: {detail}'),
    'corrupted_model': ExitCode(375, 'the model cannot be read: {detail}'),
    'corrupted_input': ExitCode(376, 'the {what} cannot be read: {detail}'),
    'prediction_failed': ExitCode(377, 'the model failed to predict: {detail}'),
    'invalid_descriptor': ExitCode(378, 'the descriptor the model records cannot describe these clusters: {detail}'),
}


def _clusters_features(model: TrainedModel, clusters: ImpurityClusters) -> Iterator[scipy.sparse.csr_array]:
    """Return the feature rows of ``clusters``, to be computed block by block, described with the model's descriptor
    (its species list included, so that a cluster with another species is refused rather than described otherwise).

    The descriptor is built and checked against every cluster now, before any block is computed.
    """
    featurizer = get_descriptor(model.descriptor)
    atoms = clusters.get_atoms_list()
    featurizer.fit(atoms)
    model.check_features(scipy.sparse.csr_array((0, featurizer.n_features)))
    return featurizer.iter_blocks(atoms, block_size=DEFAULT_BLOCK_SIZE)


@calcfunction
def predict(
    model: TrainedModel, features: SparseFeatureMatrix | None = None, clusters: ImpurityClusters | None = None
) -> orm.ArrayData | ExitCode:
    """Predict one value per row of ``features``, or per cluster of ``clusters`` (described with the model's own
    recorded descriptor, in blocks; the features are not stored).

    :returns: ``ArrayData`` with the array ``predicted`` in row order; attributes ``task``, ``n_rows`` and what the
        model learned (``target``, ``quantity``, ``path`` and ``unit``, as recorded by ``train_model``).
    """
    given = [name for name, node in (('features', features), ('clusters', clusters)) if node is not None]
    if len(given) != 1:
        return EXIT_CODES['rows_to_predict'].format(given=', '.join(given) or 'neither')
    try:
        estimator = model._estimator_for_prediction(())
    except UnsafePickleError as exception:
        return EXIT_CODES['unsafe_model'].format(
            detail=f'{exception} Do not use this model; retrain it from the features and targets, or ask its author.'
        )
    except CorruptedModelError as exception:
        return EXIT_CODES['corrupted_model'].format(detail=str(exception))

    try:
        if features is not None:
            model.check_features(features)
            blocks = features.iter_blocks(DEFAULT_BLOCK_SIZE)
        elif not model.descriptor:
            return EXIT_CODES['no_descriptor'].format(
                model=model, hint='featurize the clusters as the training features were, and give `features`'
            )
        else:
            try:
                blocks = _clusters_features(model, clusters)
            except (StructureNotDescribableError, IncompatibleFeaturesError, CorruptedClustersError):
                raise  # named below
            except (ValueError, TypeError, KeyError) as exception:
                return EXIT_CODES['invalid_descriptor'].format(detail=str(exception))
        predicted = [estimator.predict(block) for block in blocks]
    except IncompatibleFeaturesError as exception:
        return EXIT_CODES['incompatible_features'].format(detail=str(exception))
    except StructureNotDescribableError as exception:
        return EXIT_CODES['species_outside_list'].format(
            detail=f'{exception} (row {exception.index}, key `{clusters.keys[exception.index]}`): the model can only '
            'describe the species it was trained on'
        )
    except (CorruptedFeatureMatrixError, CorruptedClustersError) as exception:
        what = 'features' if features is not None else 'clusters'
        return EXIT_CODES['corrupted_input'].format(what=what, detail=str(exception))
    except Exception as exception:  # a model inconsistent with itself can fail in any way; it must not crash
        return EXIT_CODES['prediction_failed'].format(detail=f'{type(exception).__name__}: {exception}')

    values = np.concatenate(predicted) if predicted else np.empty(0)
    task = model.base.attributes.get('task')
    result = orm.ArrayData()
    result.set_array('predicted', values.astype(str) if task == 'classification' else values.astype(float))
    target = model.target if isinstance(model.target, dict) else {}
    described = {key: target[key] for key in TARGET_DESCRIPTION if isinstance(target.get(key), str)}
    result.base.attributes.set_many({'task': task, 'n_rows': int(values.size), **described})
    return result
