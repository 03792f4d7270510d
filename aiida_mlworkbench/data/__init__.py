"""AiiDA data types of aiida-mlworkbench: the impurity clusters, the sparse feature matrix and the trained model."""

from .impurity_clusters import CorruptedClustersError, HostCrystal, ImpurityClusters
from .sparse_features import CorruptedFeatureMatrixError, SparseFeatureMatrix
from .trained_model import CorruptedModelError, IncompatibleFeaturesError, ModelVersionWarning, TrainedModel

__all__ = (
    'CorruptedClustersError',
    'CorruptedFeatureMatrixError',
    'CorruptedModelError',
    'HostCrystal',
    'ImpurityClusters',
    'IncompatibleFeaturesError',
    'ModelVersionWarning',
    'SparseFeatureMatrix',
    'TrainedModel',
)
