"""Species-aware sparse SOAP: DScribe's averaged SOAP over a large species list, computed from the species present.

DScribe lays the SOAP power spectrum out as one block per species pair (Zi <= Zj, pairs in lexicographic order of the
species sorted by atomic number), and a block of a pair whose species are absent from a structure is zero. An impurity
cluster in an elemental host holds two of the 60 species, so only three of the 1830 blocks can be non-zero. DScribe
still allocates and fills the dense 60-species row for every structure, which makes it slow. Here, each structure is
described by a SOAP over only its own species (one small DScribe object per species set, created once and reused) and
its blocks are moved to the columns they have in the full SOAP, using ``SOAP.get_location`` of both objects. The
values are computed by the same DScribe code on the same neighbours and per-pair sums, so the result equals DScribe's
full-species output exactly.

That argument holds because no part of the uncompressed SOAP mixes species pairs: averaging ('inner' averages the
expansion coefficients of each species over the centres, 'outer' the power spectra) and radial weighting act within
each pair. It does not hold for the compressed SOAP variants (``mu2`` sums over all species, and species weights are
defined over the whole list), so those are refused, and neither for ``average='off'``, which gives one row per atom
rather than one per structure.
"""

from __future__ import annotations

import copy
import functools
import json
import typing as t
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse
from ase.data import atomic_numbers, chemical_symbols
from dscribe.descriptors import SOAP

from .base import DEFAULT_BLOCK_SIZE, Descriptor, StructureNotDescribableError, register_descriptor

if t.TYPE_CHECKING:
    import ase

__all__ = ('SpeciesAwareSOAP',)

SUPPORTED_AVERAGES = ('inner', 'outer')
SUPPORTED_RBFS = ('gto', 'polynomial')
SUPPORTED_DTYPES = ('float32', 'float64')
WEIGHTING_KEYS = frozenset({'function', 'r0', 'c', 'd', 'm', 'w0', 'threshold'})

MAX_R_CUT = 50.0
"""Largest cutoff radius in Angstrom: beyond the largest impurity cluster (about 18 Angstrom at
:data:`~aiida_mlworkbench.kkr.geometry.MAX_CLUSTER_ATOMS`) a larger cutoff changes nothing but the cost."""
MAX_N_MAX = 20
"""Most radial basis functions; DScribe's basis fails to normalise above about 16 at usual cutoffs anyway."""
MAX_L_MAX = 20
"""DScribe's own limit of the spherical harmonics degree."""


@register_descriptor
class SpeciesAwareSOAP(Descriptor):
    """Averaged SOAP (one row per structure) over a fixed species list, equal to DScribe's ``SOAP(...).create``.

    :param species: chemical symbols or atomic numbers spanning the feature space; ``None`` takes all species of the
        structures given to :meth:`fit`. Stored as symbols sorted by atomic number, as DScribe orders them.
    :param r_cut: cutoff radius in Angstrom (may be left out if ``weighting`` defines one).
    :param n_max: number of radial basis functions.
    :param l_max: maximum degree of the spherical harmonics.
    :param sigma: width of the Gaussians that smear the atomic density, in Angstrom.
    :param rbf: radial basis, ``'gto'`` or ``'polynomial'``.
    :param average: ``'inner'`` or ``'outer'``, see DScribe's documentation.
    :param weighting: DScribe's radial weighting dictionary, or ``None``.
    :param periodic: whether to honour the periodic boundary conditions of the structures.
    :param dtype: ``'float64'`` or ``'float32'``.
    :param n_jobs: processes used by :meth:`iter_blocks`; it changes the speed, never the values, and is therefore not
        part of :attr:`parameters`. ``-1`` means all cores. Each worker process costs about 3 s of CPU to start (it
        imports DScribe, which imports scikit-learn); the workers are stopped when :meth:`iter_blocks` ends, so that
        no idle process holds memory after featurization, and this process computes blocks itself while new ones
        start.
        On the 2-core development machine, busy with other work while measured (``benchmarks/featurization_speed.py``),
        2 jobs were at best 1.3 to 1.9x faster than 1 (warm workers, N = 1752) and often slower, because there was no
        idle core to use. Hence the default of 1; try 2 where a core is free and runs are long.
    """

    name = 'soap'

    def __init__(
        self,
        species: Sequence[str | int] | None = None,
        *,
        r_cut: float | None = None,
        n_max: int = 5,
        l_max: int = 5,
        sigma: float = 1.0,
        rbf: str = 'gto',
        average: str = 'inner',
        weighting: Mapping[str, t.Any] | None = None,
        periodic: bool = False,
        dtype: str = 'float64',
        compression: Mapping[str, t.Any] | None = None,
        n_jobs: int = 1,
    ) -> None:
        _check_parameters(
            r_cut=r_cut,
            n_max=n_max,
            l_max=l_max,
            sigma=sigma,
            rbf=rbf,
            average=average,
            weighting=weighting,
            periodic=periodic,
            dtype=dtype,
            compression=compression,
            n_jobs=n_jobs,
        )

        self.r_cut = None if r_cut is None else float(r_cut)
        self.n_max = int(n_max)
        self.l_max = int(l_max)
        self.sigma = float(sigma)
        self.rbf = rbf
        self.average = average
        self.weighting = None if weighting is None else dict(copy.deepcopy(weighting))
        self.periodic = bool(periodic)
        self._dtype = dtype
        self.n_jobs = n_jobs
        self._species: tuple[str, ...] | None = None
        self._full_soap: SOAP | None = None
        self._per_species_set: dict[tuple[int, ...], tuple[SOAP, np.ndarray]] = {}
        self._template_soap: SOAP | None = None
        if species is not None:
            self._set_species(species)
        else:
            self._dscribe_soap(['H'], sparse=False)  # DScribe's own checks (weighting, basis), before any fit

    # -- the feature space ---------------------------------------------------------------------------------------

    @property
    def species(self) -> tuple[str, ...] | None:
        """Chemical symbols of the feature space, sorted by atomic number; ``None`` until given or fitted."""
        return self._species

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def n_features(self) -> int:
        return int(self._require_full_soap().get_number_of_features())

    @property
    def parameters(self) -> dict[str, t.Any]:
        return {
            'name': self.name,
            'species': list(self._require_species()),
            'r_cut': self.r_cut,
            'n_max': self.n_max,
            'l_max': self.l_max,
            'sigma': self.sigma,
            'rbf': self.rbf,
            'average': self.average,
            'weighting': copy.deepcopy(self.weighting),
            'periodic': self.periodic,
            'dtype': self._dtype,
        }

    def get_location(self, species_pair: tuple[str | int, str | int]) -> slice:
        """Columns of the block of ``species_pair`` in the feature matrix (DScribe's ``SOAP.get_location``)."""
        return self._require_full_soap().get_location(species_pair)

    def fit(self, structures: Sequence[ase.Atoms]) -> SpeciesAwareSOAP:
        """Take the species of ``structures`` as the species list if none was given, else check they are covered."""
        for index, structure in enumerate(structures):
            numbers = structure.get_atomic_numbers()
            if numbers.size and (numbers.min() < 1 or numbers.max() >= len(chemical_symbols)):
                raise StructureNotDescribableError(
                    f'structure {index} ({structure.get_chemical_formula()}) holds atoms that are no element (atomic '
                    'number 0, e.g. an empty sphere X): leave them out',
                    index,
                )
        if self._species is None:
            present = sorted({int(number) for structure in structures for number in structure.get_atomic_numbers()})
            if not present:
                raise ValueError('cannot infer the species from structures without atoms')
            self._set_species(present)
        else:
            for index, structure in enumerate(structures):
                self._check_species(structure, index)
        return self

    # -- computing rows ------------------------------------------------------------------------------------------

    def iter_blocks(
        self, structures: Sequence[ase.Atoms], block_size: int = DEFAULT_BLOCK_SIZE
    ) -> Iterator[scipy.sparse.csr_array]:
        """Yield CSR blocks of at most ``block_size`` rows, in input order; with ``n_jobs != 1`` blocks run in parallel.

        With several processes, at most about ``6 * n_jobs`` blocks are held at a time, so memory stays bounded.
        All species are checked before the first block is computed, so that a bad structure fails the run at once.
        """
        if block_size < 1:
            raise ValueError(f'block_size must be positive, got {block_size}')
        self._require_full_soap()
        for index, structure in enumerate(structures):
            self._check_species(structure, index)
        starts = range(0, len(structures), block_size)
        if self.n_jobs == 1 or len(starts) <= 1:
            yield from self._iter_blocks_serially(structures, block_size)
            return

        yield from self._iter_blocks_in_parallel(structures, block_size)

    def _iter_blocks_in_parallel(
        self, structures: Sequence[ase.Atoms], block_size: int
    ) -> Iterator[scipy.sparse.csr_array]:
        """Share the blocks between this process and ``n_jobs - 1`` worker processes, yielding them in order.

        This process never waits for a worker: whenever the next block to yield is not ready it computes another
        block, or that block itself, so a run is not slower than a serial one while the workers are still starting
        (each imports DScribe, which takes seconds). At most about ``6 * n_jobs`` blocks are held at a time.
        """
        import joblib
        from joblib.externals.loky import get_reusable_executor

        n_workers = (self.n_jobs if self.n_jobs > 0 else joblib.cpu_count() + 1 + self.n_jobs) - 1
        if n_workers < 1:
            yield from self._iter_blocks_serially(structures, block_size)
            return
        executor = get_reusable_executor(max_workers=n_workers)
        parameters = json.dumps(self.parameters, sort_keys=True)
        starts = range(0, len(structures), block_size)
        max_computed_ahead = 4 * self.n_jobs
        submitted: dict[int, t.Any] = {}  # Block index -> future of a worker.
        computed: dict[int, scipy.sparse.csr_array] = {}
        next_to_assign = 0
        try:
            for next_to_yield in range(len(starts)):
                while next_to_yield not in computed:
                    while next_to_assign < len(starts) and len(submitted) < 2 * n_workers:
                        start = starts[next_to_assign]
                        block = structures[start : start + block_size]
                        submitted[next_to_assign] = executor.submit(_create_block_in_worker, parameters, block, start)
                        next_to_assign += 1
                    # Every block before next_to_assign is submitted, computed or yielded, so this one is submitted.
                    if submitted[next_to_yield].done():
                        computed[next_to_yield] = submitted.pop(next_to_yield).result()
                    elif next_to_assign < len(starts) and len(computed) < max_computed_ahead:
                        start = starts[next_to_assign]
                        computed[next_to_assign] = self._create_block(structures[start : start + block_size], start)
                        next_to_assign += 1
                    else:  # Rather than wait for a worker (it may still be starting), compute its block here too.
                        submitted.pop(next_to_yield).cancel()
                        start = starts[next_to_yield]
                        computed[next_to_yield] = self._create_block(structures[start : start + block_size], start)
                yield computed.pop(next_to_yield)
        finally:
            for future in submitted.values():
                future.cancel()
            # Stop the workers: idle, each would keep its memory until loky's idle timeout, beside whatever this
            # process does next (training, in a work chain). The next call starts new ones without waiting for them.
            executor.shutdown(wait=True)

    def _iter_blocks_serially(
        self, structures: Sequence[ase.Atoms], block_size: int
    ) -> Iterator[scipy.sparse.csr_array]:
        for start in range(0, len(structures), block_size):
            yield self._create_block(structures[start : start + block_size], offset=start)

    def _create_block(self, structures: Sequence[ase.Atoms], offset: int = 0) -> scipy.sparse.csr_array:
        """Rows of ``structures``: one small DScribe call per species set, then the columns moved to global ones."""
        rows_of_species_set: dict[tuple[int, ...], list[int]] = {}
        for row, structure in enumerate(structures):
            key = self._check_species(structure, offset + row)
            rows_of_species_set.setdefault(key, []).append(row)

        row_parts, column_parts, value_parts = [], [], []
        for key, rows in rows_of_species_set.items():
            soap, global_columns = self._soap_of_species_set(key)
            # One system per call: DScribe then skips its joblib machinery, which costs more than the small SOAP.
            values = np.stack([soap.create(structures[row]) for row in rows])
            nonzero_rows, nonzero_columns = np.nonzero(values)
            row_parts.append(np.asarray(rows, dtype=np.int64)[nonzero_rows])
            column_parts.append(global_columns[nonzero_columns])
            value_parts.append(values[nonzero_rows, nonzero_columns])

        shape = (len(structures), self.n_features)
        if not value_parts:
            return scipy.sparse.csr_array(shape, dtype=self._dtype)
        coordinates = (np.concatenate(row_parts), np.concatenate(column_parts))
        return scipy.sparse.csr_array((np.concatenate(value_parts), coordinates), shape=shape, dtype=self._dtype)

    def _soap_of_species_set(self, key: tuple[int, ...]) -> tuple[SOAP, np.ndarray]:
        """DScribe SOAP over the species ``key`` and the global column of each of its columns, cached."""
        cached = self._per_species_set.get(key)
        if cached is not None:
            return cached
        full_soap = self._require_full_soap()
        # The radial basis does not depend on the species and is the costly part of creating a DScribe SOAP (about
        # 3 ms, while a cluster takes 1 ms), and the clusters of a database span hundreds of species sets: so build
        # the basis once and give each species set a shallow copy with its species set through DScribe's setters.
        if self._template_soap is None:
            self._template_soap = self._dscribe_soap(list(key), sparse=False)
        soap = copy.copy(self._template_soap)
        soap.species = list(key)
        soap.compression = self._template_soap.compression  # Resizes the per-species weights to the new species.
        global_columns = np.full(soap.get_number_of_features(), -1, dtype=np.int64)
        for i, first in enumerate(key):
            for second in key[i:]:
                local = soap.get_location((first, second))
                target = full_soap.get_location((first, second))
                global_columns[local] = np.arange(target.start, target.stop, dtype=np.int64)
        if (global_columns < 0).any():  # Would mean DScribe's layout is not one block per species pair any more.
            raise RuntimeError(f'DScribe SOAP blocks of species {key} do not cover all its features')
        self._per_species_set[key] = (soap, global_columns)
        return soap, global_columns

    def _dscribe_soap(self, species: Sequence[str | int], sparse: bool) -> SOAP:
        try:
            return SOAP(
                species=species,
                r_cut=self.r_cut,
                n_max=self.n_max,
                l_max=self.l_max,
                sigma=self.sigma,
                rbf=self.rbf,
                weighting=copy.deepcopy(self.weighting),  # DScribe writes into the dictionary.
                average=self.average,
                periodic=self.periodic,
                sparse=sparse,
                dtype=self._dtype,
            )
        except (ValueError, TypeError, ArithmeticError, np.linalg.LinAlgError) as exception:
            raise ValueError(f'DScribe refuses the SOAP parameters: {exception}') from None

    def _check_species(self, structure: ase.Atoms, index: int) -> tuple[int, ...]:
        """Return the sorted atomic numbers of ``structure``; raise if one is outside the species list."""
        numbers = tuple(int(number) for number in np.unique(structure.get_atomic_numbers()))
        allowed = self._require_full_soap()._atomic_number_set
        missing = [number for number in numbers if number not in allowed]
        if missing:
            symbols = ', '.join(chemical_symbols[number] for number in missing)
            raise StructureNotDescribableError(
                f'structure {index} ({structure.get_chemical_formula()}) contains species not in the descriptor '
                f'species list: {symbols}',
                index,
            )
        if not numbers:
            raise StructureNotDescribableError(f'structure {index} has no atoms', index)
        return numbers

    def _set_species(self, species: Sequence[str | int]) -> None:
        if isinstance(species, (str, bytes)) or not isinstance(species, (Sequence, np.ndarray)):
            raise ValueError(
                f"species must be a list of chemical symbols or atomic numbers such as ['Cu', 'Fe'], got {species!r}"
            )
        numbers = set()
        for entry in species:
            if isinstance(entry, str):
                number = atomic_numbers.get(entry)
            elif isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
                number = int(entry)
            else:
                number = None
            if number is None or not 0 < number < len(chemical_symbols):
                raise ValueError(
                    f'unknown chemical species {entry!r}: give element symbols (Cu) or atomic numbers from 1 to '
                    f'{len(chemical_symbols) - 1}'
                )
            numbers.add(number)
        if not numbers:
            raise ValueError('the species list is empty')
        self._species = tuple(chemical_symbols[number] for number in sorted(numbers))
        self._full_soap = self._dscribe_soap(sorted(numbers), sparse=True)  # Validates the other parameters too.
        self._per_species_set = {}
        self._template_soap = None

    def _require_species(self) -> tuple[str, ...]:
        if self._species is None:
            raise ValueError('the species list is not set: pass species=... or call fit(structures) first')
        return self._species

    def _require_full_soap(self) -> SOAP:
        self._require_species()
        return t.cast(SOAP, self._full_soap)

    def __getstate__(self) -> dict[str, t.Any]:
        state = self.__dict__.copy()
        state['_per_species_set'] = {}
        state['_template_soap'] = None  # Cheap to rebuild; keeps pickles for worker processes small.
        return state


def _is_number(value: t.Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value: t.Any) -> bool:
    """Whether ``value`` is an integer: ``2.0``, ``2.5`` and ``True`` are not (they would be truncated or mean 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_choice(name: str, value: t.Any, choices: tuple[str, ...], why: str = '') -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f'{name}={value!r} is not supported: use one of {choices}.{why}')


def _check_parameters(
    *,
    r_cut: t.Any,
    n_max: t.Any,
    l_max: t.Any,
    sigma: t.Any,
    rbf: t.Any,
    average: t.Any,
    weighting: t.Any,
    periodic: t.Any,
    dtype: t.Any,
    compression: t.Any,
    n_jobs: t.Any,
) -> None:
    """Refuse SOAP parameters of the wrong type or out of range, naming the parameter and the allowed values.

    DScribe checks some of them only when its SOAP is built, some not at all (``n_max=2.5`` is truncated, ``r_cut=-1``
    fails deep in the basis): checked here, the port validator of the work chain refuses them before anything runs.
    """
    _check_choice(
        'average',
        average,
        SUPPORTED_AVERAGES,
        " The descriptor gives one row per structure; average='off' would give one row per atom.",
    )
    _check_choice('rbf', rbf, SUPPORTED_RBFS)
    _check_choice('dtype', dtype, SUPPORTED_DTYPES)
    if compression is not None and not isinstance(compression, Mapping):
        raise ValueError(f"compression must be left out or {{'mode': 'off'}}, got {compression!r}")
    if compression is not None and (
        compression.get('mode', 'off') != 'off' or compression.get('species_weighting') is not None
    ):
        raise ValueError(
            f'compression={dict(compression)!r} is not supported: compressed SOAP mixes species, so it cannot be '
            "computed from the species present only. Leave it out or use {'mode': 'off'}."
        )
    if weighting is not None and not isinstance(weighting, Mapping):
        raise ValueError(f"weighting must be DScribe's weighting dictionary or left out, got {weighting!r}")
    if weighting:
        unknown = sorted(set(weighting) - WEIGHTING_KEYS)
        if unknown:
            raise ValueError(f'unknown weighting key(s) {unknown}: DScribe knows {sorted(WEIGHTING_KEYS)}')
        for key, value in weighting.items():
            if key != 'function' and (not _is_number(value) or not np.isfinite(value)):
                raise ValueError(f'weighting {key!r} must be a finite number, got {value!r}')
    if r_cut is None:
        if not weighting:
            raise ValueError('either r_cut or a weighting that defines the cutoff is needed: give r_cut, e.g. 6.0')
    elif not _is_number(r_cut) or not np.isfinite(r_cut) or not 0 < r_cut <= MAX_R_CUT:
        raise ValueError(
            f'r_cut must be a cutoff radius in Angstrom, above 0 and at most {MAX_R_CUT} (MAX_R_CUT), got {r_cut!r}'
        )
    elif rbf == 'gto' and r_cut <= 1:
        raise ValueError(f"r_cut must be above 1 Angstrom for rbf='gto' (DScribe's rule), got {r_cut!r}")
    if not _is_integer(n_max) or not 1 <= n_max <= MAX_N_MAX:
        raise ValueError(f'n_max must be an integer from 1 to {MAX_N_MAX} (radial basis functions), got {n_max!r}')
    if not _is_integer(l_max) or not 0 <= l_max <= MAX_L_MAX:
        raise ValueError(f"l_max must be an integer from 0 to {MAX_L_MAX} (DScribe's limit), got {l_max!r}")
    if not _is_number(sigma) or not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f'sigma must be a positive width in Angstrom, e.g. 1.0, got {sigma!r}')
    if not isinstance(periodic, (bool, np.bool_)):
        raise ValueError(f'periodic must be true or false, got {periodic!r}')
    if not _is_integer(n_jobs) or n_jobs == 0:
        raise ValueError(f'n_jobs must be a non-zero integer, got {n_jobs!r}')


@functools.lru_cache(maxsize=8)
def _descriptor_in_worker(parameters: str) -> SpeciesAwareSOAP:
    """One descriptor per parameter set and process, so its cache of DScribe objects lives across blocks."""
    return SpeciesAwareSOAP.from_parameters(json.loads(parameters))


def _create_block_in_worker(parameters: str, structures: Sequence[ase.Atoms], offset: int) -> scipy.sparse.csr_array:
    return _descriptor_in_worker(parameters)._create_block(structures, offset=offset)
