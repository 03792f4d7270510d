"""Work chains of aiida-mlworkbench."""

from .impurity_learning import ImpurityLearningWorkChain

__all__ = ('ImpurityLearningWorkChain',)
