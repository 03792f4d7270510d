"""aiida-kkr impurity embeddings: find them from provenance and rebuild the impurity clusters juKKR used."""

from .archives import import_archives
from .embeddings import (
    ImpurityEmbedding,
    ImpurityEmbeddingError,
    ResolvedEmbeddings,
    SkippedNode,
    rcut_unit_of_process,
    resolve_impurity_embedding,
    resolve_impurity_embeddings,
)
from .geometry import ImpurityInfo, RcutUnit, host_alat, impurity_cluster, parse_impurity_info
from .results import KkrTarget, KkrTargetError, find_kkr_results, kkr_target_inputs
from .scoef import read_scoef, scoef_alat, scoef_of

__all__ = (
    'ImpurityEmbedding',
    'ImpurityEmbeddingError',
    'ImpurityInfo',
    'KkrTarget',
    'KkrTargetError',
    'RcutUnit',
    'ResolvedEmbeddings',
    'SkippedNode',
    'find_kkr_results',
    'host_alat',
    'import_archives',
    'impurity_cluster',
    'kkr_target_inputs',
    'parse_impurity_info',
    'rcut_unit_of_process',
    'read_scoef',
    'resolve_impurity_embedding',
    'resolve_impurity_embeddings',
    'scoef_alat',
    'scoef_of',
)
