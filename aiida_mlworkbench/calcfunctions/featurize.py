"""Featurization: one ``ImpurityClusters`` in, one ``SparseFeatureMatrix`` out, row ``i`` describing cluster ``i``.

Blocks of rows are written to the matrix's HDF5 file as they are computed, so memory does not grow with the number of
clusters. The row order is the clusters' own, so their ``keys`` name the embedding of each row.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.data import CorruptedClustersError, ImpurityClusters, SparseFeatureMatrix
from aiida_mlworkbench.descriptors import DEFAULT_BLOCK_SIZE, StructureNotDescribableError, get_descriptor
from aiida_mlworkbench.progress import progress

__all__ = ('EXIT_CODES', 'featurization_jobs', 'featurize')

EXIT_CODES = {
    'invalid_descriptor': ExitCode(340, 'invalid descriptor parameters: {detail}'),
    'species_outside_list': ExitCode(341, '{detail}'),
    'corrupted_clusters': ExitCode(342, 'the clusters cannot be read: {detail}'),
}

_JOBS: contextvars.ContextVar[int] = contextvars.ContextVar('mlworkbench_featurization_jobs', default=1)


@contextlib.contextmanager
def featurization_jobs(n_jobs: int) -> Iterator[None]:
    """Run featurizations inside the context with ``n_jobs`` processes.

    The number of processes changes the speed, never the features, so it is not an input of :func:`featurize`: equal
    structures and descriptor give equal process hashes (AiiDA caching) whatever the number of cores.
    """
    token = _JOBS.set(n_jobs)
    try:
        yield
    finally:
        _JOBS.reset(token)


@calcfunction
def featurize(clusters: ImpurityClusters, descriptor: orm.Dict) -> SparseFeatureMatrix:
    """Describe each cluster with the descriptor and store the rows as one sparse feature matrix, row ``i`` for
    cluster ``i`` of ``clusters``.

    :param clusters: the impurity clusters, from
        :func:`~aiida_mlworkbench.calcfunctions.clusters.extract_impurity_clusters` or made by hand.
    :param descriptor: descriptor parameters with a ``name`` from the registry, e.g. ``{'name': 'soap', 'r_cut': 6.0,
        'n_max': 5, 'l_max': 5, 'species': [...]}``; without ``species``, the species of the clusters are used.
    """
    try:
        featurizer = get_descriptor(descriptor.get_dict())
    except (ValueError, TypeError, KeyError) as exception:
        return EXIT_CODES['invalid_descriptor'].format(detail=str(exception))
    if hasattr(featurizer, 'n_jobs'):
        featurizer.n_jobs = _JOBS.get()
    try:
        atoms = clusters.get_atoms_list()
    except CorruptedClustersError as exception:
        return EXIT_CODES['corrupted_clusters'].format(detail=str(exception))

    def species_exit_code(exception: StructureNotDescribableError) -> ExitCode:
        key = clusters.keys[exception.index]
        detail = f'{exception} (row {exception.index}, key `{key}`, {atoms[exception.index].get_chemical_formula()})'
        return EXIT_CODES['species_outside_list'].format(detail=detail)

    try:
        featurizer.fit(atoms)
    except StructureNotDescribableError as exception:
        return species_exit_code(exception)
    except ValueError as exception:  # the descriptor refuses its parameters once it knows the species
        return EXIT_CODES['invalid_descriptor'].format(detail=str(exception))

    blocks = progress(
        featurizer.iter_blocks(atoms, block_size=DEFAULT_BLOCK_SIZE),
        total=-(-len(atoms) // DEFAULT_BLOCK_SIZE),
        description=f'featurizing {len(atoms)} clusters ({featurizer.name})',
    )
    try:
        return SparseFeatureMatrix.from_blocks(
            blocks,
            featurizer.n_features,
            descriptor=featurizer.parameters,
            dtype=getattr(featurizer, 'dtype', 'float64'),
        )
    except StructureNotDescribableError as exception:
        return species_exit_code(exception)
