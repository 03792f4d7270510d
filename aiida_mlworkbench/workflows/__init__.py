"""Work chains of aiida-mlworkbench."""

from .impurity_learning import ImpurityLearningWorkChain
from .prediction import ImpurityPredictionWorkChain

__all__ = ('ImpurityLearningWorkChain', 'ImpurityPredictionWorkChain')
