"""AiiDA data types of aiida-mlworkbench: the sparse feature matrix and the trained model."""

from .sparse_features import CorruptedFeatureMatrixError, SparseFeatureMatrix
from .trained_model import CorruptedModelError, IncompatibleFeaturesError, ModelVersionWarning, TrainedModel

__all__ = (
    'CorruptedFeatureMatrixError',
    'CorruptedModelError',
    'IncompatibleFeaturesError',
    'ModelVersionWarning',
    'SparseFeatureMatrix',
    'TrainedModel',
)
