"""Featurization: structure nodes in, one ``SparseFeatureMatrix`` out, one row per structure.

The rows follow the structures' input link labels, ``row_000000``, ``row_000001``, ...: the provenance graph itself
records which node each row describes (:func:`get_row_structures`). Blocks of rows are written to the matrix's HDF5
file as they are computed, so memory does not grow with the number of structures.
"""

from __future__ import annotations

import contextlib
import contextvars
import typing as t
from collections.abc import Iterator, Sequence

import ase
from aiida import orm
from aiida.engine import ExitCode

from aiida_mlworkbench.bulk_links import calcfunction
from aiida_mlworkbench.data import SparseFeatureMatrix
from aiida_mlworkbench.descriptors import DEFAULT_BLOCK_SIZE, StructureNotDescribableError, get_descriptor
from aiida_mlworkbench.node_ids import rows_where, stored_pk
from aiida_mlworkbench.progress import progress

__all__ = (
    'EXIT_CODES',
    'ROW_LABEL_PREFIX',
    'featurization_jobs',
    'featurize',
    'featurize_structures',
    'get_row_structures',
    'row_label',
    'structures_as_atoms',
)

ROW_LABEL_PREFIX = 'row_'

EXIT_CODES = {
    'invalid_descriptor': ExitCode(340, 'invalid descriptor parameters: {detail}'),
    'species_outside_list': ExitCode(341, '{detail}'),
    'no_structures': ExitCode(342, 'no structures to featurize: pass at least one'),
    'bad_row_label': ExitCode(343, 'structure input `{label}` is not named `row_<index>` with indices 0, 1, ...'),
    'empty_structure': ExitCode(344, 'structure input `{label}` ({uuid}) has no atoms: leave it out or fix it'),
    'invalid_structure': ExitCode(345, 'input `{label}` cannot be featurized: {detail}'),
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


def row_label(index: int) -> str:
    """Input link label of the structure of row ``index``."""
    return f'{ROW_LABEL_PREFIX}{index:06d}'


@calcfunction
def featurize(descriptor: orm.Dict, **structures: orm.StructureData) -> SparseFeatureMatrix:
    """Describe each structure with the descriptor and store the rows as one sparse feature matrix.

    :param descriptor: descriptor parameters with a ``name`` from the registry, e.g. ``{'name': 'soap', 'r_cut': 6.0,
        'n_max': 5, 'l_max': 5, 'species': [...]}``; without ``species``, the species of the structures are used.
    :param structures: the structures, with labels ``row_000000``, ``row_000001``, ... giving the row order.
    """
    if not structures:
        return EXIT_CODES['no_structures']
    labels = sorted(structures)
    for index, label in enumerate(labels):
        if label != row_label(index):
            return EXIT_CODES['bad_row_label'].format(label=label)

    try:
        featurizer = get_descriptor(descriptor.get_dict())
    except (ValueError, TypeError, KeyError) as exception:
        return EXIT_CODES['invalid_descriptor'].format(detail=str(exception))
    if hasattr(featurizer, 'n_jobs'):
        featurizer.n_jobs = _JOBS.get()

    for label in labels:
        if not isinstance(structures[label], orm.StructureData):
            detail = f'it is a {type(structures[label]).__name__}, not a StructureData'
            return EXIT_CODES['invalid_structure'].format(label=label, detail=detail)
    try:
        atoms = structures_as_atoms([structures[label] for label in labels])
    except ValueError:  # a site that is no single atom (alloy, vacancy): name the first such input
        for label in labels:
            try:
                structures_as_atoms([structures[label]])
            except ValueError as exception:
                return EXIT_CODES['invalid_structure'].format(label=label, detail=str(exception))
        raise
    for label, structure in zip(labels, atoms, strict=True):
        if not len(structure):
            return EXIT_CODES['empty_structure'].format(label=label, uuid=structures[label].uuid)

    def species_exit_code(exception: StructureNotDescribableError) -> ExitCode:
        node = structures[labels[exception.index]]
        detail = f'{exception} (input `{labels[exception.index]}`, {node.get_formula()} <{node.uuid}>)'
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
        description=f'featurizing {len(atoms)} structures ({featurizer.name})',
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


def structures_as_atoms(structures: Sequence[orm.StructureData]) -> list[ase.Atoms]:
    """Return ``[structure.get_ase() for structure in structures]``: numbers, positions, cell and pbc, fast.

    ``get_ase`` on a stored node re-reads its attributes several times and builds the ``Atoms`` atom by atom (about
    3 ms each, minutes for the 7100 clusters of a database); here the attributes of a thousand stored structures come
    in one query. Sites of alloy or vacancy kinds, which are no single atom, go through ``get_ase`` and its error.
    """
    node_pks = [stored_pk(node) for node in structures]
    stored = (pk for pk in node_pks if pk is not None)
    attributes = dict(rows_where('id', stored, ['id', 'attributes'], node_class=orm.StructureData))

    atoms = []
    for node, pk in zip(structures, node_pks, strict=True):
        content = attributes[pk] if pk is not None else node.base.attributes.all
        symbol_of_kind = {
            kind['name']: kind['symbols'][0]
            for kind in content.get('kinds', [])
            if len(kind['symbols']) == 1 and list(kind['weights']) == [1.0]
        }
        sites = content.get('sites', [])
        if any(site['kind_name'] not in symbol_of_kind for site in sites):
            atoms.append(node.get_ase())
            continue
        pbc = [content.get('pbc1', True), content.get('pbc2', True), content.get('pbc3', True)]
        atoms.append(
            ase.Atoms(
                symbols=[symbol_of_kind[site['kind_name']] for site in sites],
                positions=[site['position'] for site in sites],
                cell=content['cell'],
                pbc=pbc,
            )
        )
    return atoms


def featurize_structures(
    structures: Sequence[orm.StructureData], descriptor: t.Mapping[str, t.Any] | orm.Dict, **kwargs: t.Any
) -> SparseFeatureMatrix:
    """Run :func:`featurize` on a list of structures, in list order; ``kwargs`` go to the process (``metadata``)."""
    parameters = descriptor if isinstance(descriptor, orm.Dict) else orm.Dict(dict(descriptor))
    return featurize(descriptor=parameters, **{row_label(i): s for i, s in enumerate(structures)}, **kwargs)


def get_row_structures(matrix: SparseFeatureMatrix) -> list[orm.StructureData]:
    """The structure nodes of the rows of a matrix made by :func:`featurize`, in row order.

    :raises ValueError: if the matrix was not made by :func:`featurize`.
    """
    creator = matrix.creator
    if creator is None or creator.process_label != 'featurize':
        raise ValueError(f'{matrix} was not made by the featurize calcfunction, so its rows map to no structure nodes')
    incoming = creator.base.links.get_incoming(node_class=orm.StructureData).all()
    by_label = {link.link_label: link.node for link in incoming if link.link_label.startswith(ROW_LABEL_PREFIX)}
    return [by_label[label] for label in sorted(by_label)]
