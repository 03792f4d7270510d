"""Data type for a sparse feature matrix: CSR arrays in one HDF5 file in the node repository.

SOAP feature matrices of an impurity database are 99.9 % zeros; dense they need tens of GB. This node keeps the CSR
arrays (``data``, ``indices``, ``indptr``) in chunked HDF5 datasets, so that a block of rows reads without the rest, and
writes them in a canonical layout so that equal content gives byte-identical files (equal node hashes: AiiDA caching
works).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import tempfile
import typing as t
import weakref
from collections.abc import Iterable, Iterator, Mapping

import h5py
import numpy as np
import scipy.sparse
from aiida.orm import Data

from aiida_mlworkbench.data.hdf5_checks import dataset_problem, root_problem
from aiida_mlworkbench.data.snapshot import AttributeSnapshot

__all__ = ('CorruptedFeatureMatrixError', 'SparseFeatureMatrix', 'plan_row_blocks')

SUPPORTED_DTYPES = ('float32', 'float64')
INDPTR_DTYPE = np.dtype('int64')
FORMAT_VERSION = 1

#: Elements per HDF5 chunk of ``data`` and ``indices``: 2**16 doubles is 512 kB, so a 256-row block of a SOAP matrix
#: at n_max = l_max = 9 (about 440k non-zeros) touches about seven chunks.
ELEMENT_CHUNK = 2**16
INDPTR_CHUNK = 2**14
#: Elements per slab when copying or hashing a dataset, which bounds memory while streaming (32 MB of doubles).
COPY_SLAB = 2**22

#: Node attributes that describe the file; :meth:`SparseFeatureMatrix._layout` checks that they agree.
LAYOUT_ATTRIBUTES = ('shape', 'n_rows', 'n_features', 'nnz', 'dtype', 'checksum')
#: What the root of a feature file holds, exactly: a file with anything else was not written by this package.
FILE_DATASETS = ('data', 'indices', 'indptr')
FILE_ATTRIBUTES = ('format_version', 'shape')
INDICES_DTYPES = (np.dtype('int32'), np.dtype('int64'))
#: The only HDF5 filter the writer uses (per-chunk checksums). Any other filter id is refused before a value is read:
#: HDF5 would look for a filter plugin (a shared library) to decode it, or inflate a compression bomb.
ALLOWED_FILTERS = frozenset({h5py.h5z.FILTER_FLETCHER32})
#: Storage layouts whose values are in the file itself (a virtual dataset maps other files; external storage is a
#: contiguous layout with a list of external files, checked separately).
ALLOWED_LAYOUTS = frozenset({h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT})
#: Largest chunk accepted, in elements: HDF5 decodes whole chunks, so a forged huge chunk makes a small read large.
MAX_CHUNK_ELEMENTS = 2**20

SparseInput = t.Any  # scipy.sparse matrix or array, or a pydata sparse array


class CorruptedFeatureMatrixError(Exception):
    """The HDF5 file in the repository does not hold what the node's attributes say it holds."""


def _indices_dtype(n_features: int) -> np.dtype:
    return np.dtype('int32') if n_features < np.iinfo(np.int32).max else np.dtype('int64')


def _to_csr(block: SparseInput) -> scipy.sparse.csr_array:
    """Convert one block from scipy.sparse or pydata ``sparse`` to a ``csr_array``, without densifying it."""
    if isinstance(block, scipy.sparse.csr_array):
        return block
    if scipy.sparse.issparse(block):
        return scipy.sparse.csr_array(block)
    module = type(block).__module__.split('.')[0]
    if module == 'sparse' and hasattr(block, 'to_scipy_sparse'):
        if block.ndim != 2:
            raise ValueError(f'a feature matrix has two dimensions (rows, features), got a {block.ndim}-d array')
        return scipy.sparse.csr_array(block.to_scipy_sparse())
    if isinstance(block, np.ndarray):
        raise TypeError(
            'got a dense numpy array: a feature matrix is stored sparse and never densified; '
            'pass scipy.sparse.csr_array(array) if you really mean to convert a dense array'
        )
    raise TypeError(
        f'cannot build a feature matrix from {type(block).__name__}: pass a scipy.sparse matrix or array, '
        'a pydata sparse.COO array (what DScribe returns), or an iterable of such row blocks'
    )


def _canonical_block(block: SparseInput, n_features: int, dtype: np.dtype, row_offset: int) -> scipy.sparse.csr_array:
    """Validate a block of rows and return it in canonical CSR form (sorted indices, no duplicates, no stored zeros).

    Every check names the problem and, where the block came from a stream, the first affected row.
    """
    csr = _to_csr(block)
    if csr.ndim != 2:
        raise ValueError(f'a feature matrix has two dimensions (rows, features), got shape {csr.shape}')
    if csr.shape[1] != n_features:
        raise ValueError(
            f'the block starting at row {row_offset} has {csr.shape[1]} columns, expected {n_features} features'
        )
    if csr.dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(
            f'unsupported dtype {csr.dtype}: features are stored as one of {SUPPORTED_DTYPES}; '
            f'convert with .astype(numpy.float64) first'
        )
    data, indices, indptr = np.asarray(csr.data), np.asarray(csr.indices), np.asarray(csr.indptr)
    n_rows = csr.shape[0]
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0:
        raise ValueError(f'invalid indptr: expected {n_rows + 1} entries starting at 0, got shape {indptr.shape}')
    if np.any(np.diff(indptr) < 0):
        row = int(np.argmax(np.diff(indptr) < 0))
        raise ValueError(f'invalid indptr: it decreases at row {row_offset + row}; indptr must be non-decreasing')
    if indptr[-1] != data.size or data.size != indices.size:
        raise ValueError(
            f'invalid CSR arrays: indptr ends at {indptr[-1]} but there are {indices.size} indices '
            f'and {data.size} values; the three must agree'
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n_features):
        bad = int(np.flatnonzero((indices < 0) | (indices >= n_features))[0])
        row = int(np.searchsorted(indptr, bad, side='right') - 1)
        raise ValueError(
            f'column index {int(indices[bad])} in row {row_offset + row} is out of range for {n_features} features'
        )
    # Cast first, then check: a value that is finite as float64 can overflow the stored dtype (1e300 as float32).
    with np.errstate(over='ignore', invalid='ignore'):
        values = data.astype(dtype, copy=True)
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        row = int(np.searchsorted(indptr, bad, side='right') - 1)
        if np.isfinite(data[bad]):
            raise ValueError(
                f'value {float(data[bad])!r} in row {row_offset + row}, column {int(indices[bad])} does not fit in '
                f'{dtype} (largest {np.finfo(dtype).max:.3g}): store the features as float64 or rescale them'
            )
        raise ValueError(
            f'non-finite value {data[bad]} in row {row_offset + row}, column {int(indices[bad])}: '
            'features must be finite numbers'
        )
    # Canonical form, on copies so that the caller's matrix is not modified.
    canonical = scipy.sparse.csr_array(
        (values, indices.astype(_indices_dtype(n_features), copy=True), indptr.copy()),
        shape=csr.shape,
    )
    with np.errstate(over='ignore', invalid='ignore'):
        canonical.sum_duplicates()
    if not np.all(np.isfinite(canonical.data)):
        bad = int(np.flatnonzero(~np.isfinite(canonical.data))[0])
        row = int(np.searchsorted(canonical.indptr, bad, side='right') - 1)
        raise ValueError(
            f'the duplicate entries of row {row_offset + row}, column {int(canonical.indices[bad])} sum to '
            f'{canonical.data[bad]} in {dtype}: features must be finite numbers'
        )
    canonical.eliminate_zeros()
    return canonical


def _csr_from_arrays(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
) -> scipy.sparse.csr_array:
    """Build a ``csr_array`` with 32-bit index arrays wherever they fit: scikit-learn's SVMs accept nothing else."""
    if indices.dtype == np.int32 and (indptr.size == 0 or indptr[-1] <= np.iinfo(np.int32).max):
        indptr = indptr.astype(np.int32)
    return scipy.sparse.csr_array((data, indices, indptr), shape=shape, copy=False)


def plan_row_blocks(rows: np.ndarray, block_size: int) -> list[tuple[int, int, np.ndarray]]:
    """Group row indices into blocks that each lie within ``block_size`` consecutive rows of the file.

    Returns ``(start, stop, positions)`` per block, in file order: ``rows[positions]`` are the block's rows, sorted,
    all in ``start:stop``. Reading ``start:stop`` reads contiguous HDF5 chunks, and never more than ``block_size``
    rows; spans without a requested row are not read at all.
    """
    if block_size < 1:
        raise ValueError(f'block_size must be positive, got {block_size}')
    rows = np.asarray(rows)
    order = np.argsort(rows, kind='stable')
    ordered = rows[order]
    blocks = []
    first = 0
    while first < ordered.size:
        start = int(ordered[first])
        last = int(np.searchsorted(ordered, start + block_size, side='left'))
        blocks.append((start, int(ordered[last - 1]) + 1, order[first:last]))
        first = last
    return blocks


class _Layout(t.NamedTuple):
    """The checked layout attributes of a node."""

    n_rows: int
    n_features: int
    nnz: int
    dtype: np.dtype


def _layout_problem(handle: h5py.File, layout: _Layout) -> str | None:
    """What is wrong with the structure of a feature file, or ``None``; reads metadata only, never a value.

    Exactly the writer's datasets and attributes, with its dtypes and lengths, every dataset a hard link to values
    stored in this file (no external or virtual dataset, no link to another file) and no filter but fletcher32.
    """
    problem = root_problem(handle, FILE_DATASETS, FILE_ATTRIBUTES, FORMAT_VERSION)
    if problem:
        return problem
    file_shape = np.asarray(handle.attrs['shape'])
    if file_shape.dtype.kind not in 'iu' or [int(x) for x in file_shape.ravel()] != [layout.n_rows, layout.n_features]:
        return f'the file says shape {file_shape.tolist()}, the attributes {[layout.n_rows, layout.n_features]}'
    expected = {
        'data': ((layout.dtype,), layout.nnz),
        'indices': (INDICES_DTYPES, layout.nnz),
        'indptr': ((INDPTR_DTYPE,), layout.n_rows + 1),
    }
    for name, (dtypes, length) in expected.items():
        problem = dataset_problem(handle, name, ALLOWED_LAYOUTS, ALLOWED_FILTERS)
        if problem:
            return problem
        dataset = handle[name]
        if dataset.dtype not in dtypes:
            return f'{name!r} has dtype {dataset.dtype}, expected {" or ".join(str(dtype) for dtype in dtypes)}'
        if dataset.shape != (length,):
            return f'{name!r} has shape {dataset.shape}, expected ({length},) from the attributes'
        if dataset.chunks is not None and int(np.prod(dataset.chunks)) > MAX_CHUNK_ELEMENTS:
            return f'{name!r} has chunks of {dataset.chunks} elements, more than the {MAX_CHUNK_ELEMENTS} accepted'
    return None


class _ContentHasher:
    """SHA-256 of the CSR content that does not depend on how the rows were split into blocks."""

    def __init__(self) -> None:
        self._indptr = hashlib.sha256()
        self._indices = hashlib.sha256()
        self._data = hashlib.sha256()

    def update(self, indptr_tail: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Add rows: ``indptr_tail`` is their part of the global ``indptr`` without its leading zero."""
        self.update_one('indptr', np.asarray(indptr_tail, dtype=INDPTR_DTYPE))
        self.update_one('indices', indices)
        self.update_one('data', data)

    def update_one(self, name: str, values: np.ndarray) -> None:
        getattr(self, f'_{name}').update(np.ascontiguousarray(values))  # the buffer itself: no copy

    def hexdigest(self, shape: tuple[int, int], dtype: np.dtype, indices_dtype: np.dtype) -> str:
        header = json.dumps({'shape': list(shape), 'dtype': dtype.name, 'indices': indices_dtype.name})
        total = hashlib.sha256(header.encode())
        for part in (self._indptr, self._indices, self._data):
            total.update(part.digest())
        return f'sha256:{total.hexdigest()}'


class SparseFeatureMatrix(AttributeSnapshot, Data):
    """A sparse feature matrix (rows are samples, columns are features) stored as CSR in an HDF5 file.

    Build it from a ``scipy.sparse`` matrix or array, a pydata ``sparse.COO`` array (what DScribe returns), or, for
    matrices larger than memory, from an iterable of row blocks with :meth:`from_blocks`. The content is validated
    before anything is written; a node whose content fails validation is never created.

    Queryable attributes: ``shape``, ``n_rows``, ``n_features``, ``nnz``, ``dtype``, ``descriptor`` (free parameters
    filled in by the featurizer: name, species, cutoffs, ...) and ``checksum``.
    """

    FILENAME = 'features.h5'

    def __init__(
        self,
        matrix: SparseInput | None = None,
        *,
        descriptor: Mapping[str, t.Any] | None = None,
        dtype: str | np.dtype | None = None,
        **kwargs: t.Any,
    ) -> None:
        super().__init__(**kwargs)
        if matrix is not None:
            csr = _to_csr(matrix)
            self._write_blocks([csr], n_features=csr.shape[1], dtype=dtype or csr.dtype, descriptor=descriptor)

    @classmethod
    def from_blocks(
        cls,
        blocks: Iterable[SparseInput],
        n_features: int,
        *,
        descriptor: Mapping[str, t.Any] | None = None,
        dtype: str | np.dtype = 'float64',
        **kwargs: t.Any,
    ) -> SparseFeatureMatrix:
        """Build a matrix from an iterable of row blocks, holding only one block in memory at a time.

        :param blocks: row blocks, each a scipy.sparse or pydata sparse 2-d array with ``n_features`` columns.
        :param n_features: number of columns (features).
        :param descriptor: JSON-serialisable parameters of the descriptor that made the features.
        :param dtype: stored value type, ``float32`` or ``float64``.
        """
        node = cls(**kwargs)
        node._write_blocks(blocks, n_features=n_features, dtype=dtype, descriptor=descriptor)
        return node

    def _write_blocks(
        self,
        blocks: Iterable[SparseInput],
        *,
        n_features: int,
        dtype: str | np.dtype,
        descriptor: Mapping[str, t.Any] | None,
    ) -> None:
        """Validate and write the blocks: first appended to raw scratch files, then copied into the HDF5 file.

        The two passes make the HDF5 layout independent of how the rows were split into blocks (datasets of final
        size, chunks written in order), hence equal content gives equal bytes.
        """
        dtype = np.dtype(dtype)
        if dtype.name not in SUPPORTED_DTYPES:
            raise ValueError(f'unsupported dtype {dtype}: features are stored as one of {SUPPORTED_DTYPES}')
        if not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise ValueError(f'n_features must be a positive integer, got {n_features!r}')
        n_features = int(n_features)
        indices_dtype = _indices_dtype(n_features)
        descriptor = dict(descriptor or {})
        try:
            json.dumps(descriptor)
        except TypeError as exception:
            raise ValueError(f'descriptor parameters must be JSON-serialisable: {exception}') from exception

        hasher = _ContentHasher()
        n_rows = 0
        nnz = 0
        with tempfile.TemporaryDirectory(prefix='mlworkbench-') as tmpdir:
            scratch = pathlib.Path(tmpdir)
            with (
                open(scratch / 'data', 'wb') as data_file,
                open(scratch / 'indices', 'wb') as indices_file,
                open(scratch / 'indptr', 'wb') as indptr_file,
            ):
                np.zeros(1, dtype=INDPTR_DTYPE).tofile(indptr_file)
                for block in blocks:
                    csr = _canonical_block(block, n_features, dtype, n_rows)
                    # scipy may have changed the index dtype on the way: cast to what the file stores.
                    indptr_tail = csr.indptr[1:].astype(INDPTR_DTYPE) + nnz
                    indices = csr.indices.astype(indices_dtype, copy=False)
                    values = csr.data.astype(dtype, copy=False)
                    values.tofile(data_file)
                    indices.tofile(indices_file)
                    indptr_tail.tofile(indptr_file)
                    hasher.update(indptr_tail, indices, values)
                    n_rows += csr.shape[0]
                    nnz += csr.nnz
            if n_rows == 0:
                raise ValueError('the feature matrix has no rows: give at least one sample')

            shape = (n_rows, n_features)
            filepath = scratch / self.FILENAME
            with h5py.File(filepath, 'w', libver='earliest') as handle:
                handle.attrs['format_version'] = FORMAT_VERSION
                handle.attrs['shape'] = np.array(shape, dtype='int64')
                for name, dset_dtype, size, chunk in (
                    ('data', dtype, nnz, ELEMENT_CHUNK),
                    ('indices', indices_dtype, nnz, ELEMENT_CHUNK),
                    ('indptr', INDPTR_DTYPE, n_rows + 1, INDPTR_CHUNK),
                ):
                    dataset = handle.create_dataset(
                        name,
                        shape=(size,),
                        dtype=dset_dtype,
                        chunks=(min(chunk, size),) if size else None,
                        fletcher32=bool(size),
                        track_times=False,
                    )
                    source = np.memmap(scratch / name, dtype=dset_dtype, mode='r') if size else np.empty(0)
                    for start in range(0, size, COPY_SLAB):
                        dataset[start : start + COPY_SLAB] = source[start : start + COPY_SLAB]
                    del source
            self.base.repository.put_object_from_file(str(filepath), self.FILENAME)

        self.base.attributes.set_many(
            {
                'shape': list(shape),
                'n_rows': n_rows,
                'n_features': n_features,
                'nnz': nnz,
                'dtype': dtype.name,
                'descriptor': descriptor,
                'checksum': hasher.hexdigest(shape, dtype, indices_dtype),
                'filename': self.FILENAME,
                'format_version': FORMAT_VERSION,
            }
        )
        self.__dict__['_written_file'] = self._file_record()

    def _validate(self) -> bool:
        """Refuse to store a node without a matrix, or whose file disagrees with its attributes.

        A file this node wrote itself from validated blocks only needs its layout checked; a file put into the
        repository by other means (or attributes changed since) is checked whole: structure and checksum.
        """
        super()._validate()
        if self.FILENAME not in self.base.repository.list_object_names():
            raise ValueError(
                'this SparseFeatureMatrix holds no matrix: build it with SparseFeatureMatrix(matrix) or from_blocks()'
            )
        if self.__dict__.get('_written_file') == self._file_record():
            with self._open():  # checks the layout against the attributes
                pass
        else:
            self.verify()
        return True

    def _file_record(self) -> tuple[str, ...]:
        """What identifies the file and attributes :meth:`_write_blocks` wrote (a new put gets a new sandbox key)."""
        key = self.base.repository.serialize().get('o', {}).get(self.FILENAME, {}).get('k', '')
        return (str(key), *(json.dumps(self.base.attributes.get(name), sort_keys=True) for name in LAYOUT_ATTRIBUTES))

    # Queryable properties ---------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(number of rows, number of features)."""
        n_rows, n_features = self._attribute('shape')
        return n_rows, n_features

    @property
    def n_rows(self) -> int:
        return self._attribute('n_rows')

    @property
    def n_features(self) -> int:
        return self._attribute('n_features')

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) values."""
        return self._attribute('nnz')

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._attribute('dtype'))

    @property
    def descriptor(self) -> dict[str, t.Any]:
        """Parameters of the descriptor that made these features (name, species, cutoffs, ...)."""
        return self._attribute('descriptor', {})

    @property
    def checksum(self) -> str:
        """SHA-256 of the CSR content, independent of how it was written."""
        return self._attribute('checksum')

    @property
    def density(self) -> float:
        """Fraction of entries that are non-zero."""
        n_rows, n_features = self.shape
        return self.nnz / (n_rows * n_features)

    # Reading ----------------------------------------------------------------------------------------------------
    #
    # An archive from someone else can hold any HDF5 file with any attributes, and a consistent checksum proves only
    # the bytes. So every read checks, before scipy or scikit-learn see an array: the attributes (once), the file's
    # structure (once per open: datasets, dtypes, lengths, values stored in this file, no filter but fletcher32) and
    # the values of each block as it is read (indptr monotone and within the stored values, column indices within the
    # shape, values finite). Out-of-range indices or a decreasing indptr would otherwise crash the interpreter in
    # scipy's or scikit-learn's compiled code; an external or virtual dataset would read other local files.

    def _layout(self) -> _Layout:
        """The layout attributes, checked to agree with each other (an imported node may carry any attributes)."""
        cached = self.__dict__.get('_checked_layout')
        if cached is not None:
            return cached
        shape, n_rows, n_features, nnz, dtype = (self._attribute(name) for name in LAYOUT_ATTRIBUTES[:5])

        def is_int(value: t.Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not (
            is_int(n_rows)
            and is_int(n_features)
            and is_int(nnz)
            and isinstance(shape, (list, tuple))
            and list(shape) == [n_rows, n_features]
            and n_rows >= 1
            and n_features >= 1
            and 0 <= nnz <= n_rows * n_features
            and dtype in SUPPORTED_DTYPES
        ):
            raise CorruptedFeatureMatrixError(
                self._corruption_message(
                    f'its attributes are inconsistent (shape {shape!r}, n_rows {n_rows!r}, n_features '
                    f'{n_features!r}, nnz {nnz!r}, dtype {dtype!r})'
                )
            )
        layout = _Layout(n_rows, n_features, nnz, np.dtype(dtype))
        if self.is_stored:
            self.__dict__['_checked_layout'] = layout
        return layout

    @contextlib.contextmanager
    def _open(self) -> Iterator[h5py.File]:
        """Open the HDF5 file through the repository's own file handle (no temporary copy) and check its structure.

        A stored node is immutable, so its file stays open for later reads: opening a file in the object store costs
        more than reading a block of rows from it. :meth:`close` releases it.
        """
        if not self.is_stored:
            with contextlib.ExitStack() as stack:
                yield self._open_checked(stack)
            return
        reader = self.__dict__.get('_open_reader')
        if reader is None:
            stack = contextlib.ExitStack()
            try:
                handle = self._open_checked(stack)
            except BaseException:
                stack.close()
                raise
            reader = self.__dict__['_open_reader'] = (handle, stack, weakref.finalize(self, stack.close))
        yield reader[0]

    def _open_checked(self, stack: contextlib.ExitStack) -> h5py.File:
        """Open the file on ``stack``; refuse anything but a readable HDF5 file of the expected structure."""
        layout = self._layout()
        try:
            stream = stack.enter_context(self.base.repository.open(self.FILENAME, mode='rb'))
        except FileNotFoundError:
            raise CorruptedFeatureMatrixError(
                self._corruption_message(f'its repository holds no {self.FILENAME}')
            ) from None
        try:
            handle = stack.enter_context(h5py.File(stream, 'r'))
        except (OSError, ValueError) as exception:
            raise CorruptedFeatureMatrixError(
                self._corruption_message(f'{self.FILENAME} is not an HDF5 file or is truncated ({exception})')
            ) from None
        self._check_layout(handle, layout)
        # Two values, once per open: a block read anywhere in the file then stays within an indptr from 0 to nnz.
        dataset = handle['indptr']
        first, last = self._read(dataset, 0, 1)[0], self._read(dataset, layout.n_rows, layout.n_rows + 1)[0]
        if first != 0:
            raise self._corrupted(f'indptr starts at {first}, not at 0')
        if last != layout.nnz:
            raise self._corrupted(f'indptr ends at {last}, not at the number of stored values {layout.nnz}')
        return handle

    def close(self) -> None:
        """Close the HDF5 file that reads of a stored node keep open (it is also closed when the node is collected)."""
        reader = self.__dict__.pop('_open_reader', None)
        if reader is not None:
            reader[2]()

    def _check_layout(self, handle: h5py.File, layout: _Layout) -> None:
        """Check the file's structure against the attributes; only metadata is read, no value."""
        try:
            problem = _layout_problem(handle, layout)
        except (KeyError, OSError, RuntimeError, TypeError, ValueError) as exception:
            problem = f'its HDF5 structure is unreadable ({type(exception).__name__}: {exception})'
        if problem:
            raise CorruptedFeatureMatrixError(self._corruption_message(problem))

    def _corruption_message(self, detail: str) -> str:
        return (
            f'the feature file of SparseFeatureMatrix<{self.pk or "unstored"}> is corrupted or was tampered with: '
            f'{detail}. Re-create the node (rerun the featurization) or re-import it from a trusted archive.'
        )

    def _corrupted(self, detail: str) -> CorruptedFeatureMatrixError:
        return CorruptedFeatureMatrixError(self._corruption_message(detail))

    def _read(self, dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        try:
            return dataset[start:stop]
        except (OSError, RuntimeError, ValueError) as exception:
            raise self._corrupted(f'reading {dataset.name} failed ({exception})') from None

    def _read_raw(self, handle: h5py.File, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the CSR arrays of rows ``start:stop`` as stored (``indptr`` not yet shifted to start at zero).

        Checked before anyone sees them: ``indptr`` non-decreasing and within the stored values (starting at 0 and
        ending at nnz where the block touches the file's ends), column indices within the shape, values finite.
        """
        layout = self._layout()
        indptr = self._read(handle['indptr'], start, stop + 1)
        low, high = int(indptr[0]), int(indptr[-1])
        if start == 0 and low != 0:
            raise self._corrupted(f'indptr starts at {low}, not at 0')
        if stop == layout.n_rows and high != layout.nnz:
            raise self._corrupted(f'indptr ends at {high}, not at the number of stored values {layout.nnz}')
        if low < 0 or high > layout.nnz:
            raise self._corrupted(
                f'indptr of rows {start}:{stop} points to values {low}:{high}, outside the {layout.nnz} stored values'
            )
        decreasing = indptr[1:] < indptr[:-1]
        if decreasing.any():
            raise self._corrupted(f'indptr decreases at row {start + int(np.argmax(decreasing))}')
        indices = self._read(handle['indices'], low, high)
        data = self._read(handle['data'], low, high)

        def row_of(position: int) -> str:
            return f'row {start + int(np.searchsorted(indptr, low + position, side="right")) - 1}'

        self._check_indices(indices, layout.n_features, row_of)
        self._check_values(data, row_of)
        return indptr, indices, data

    def _check_indices(self, indices: np.ndarray, n_features: int, where: t.Callable[[int], str]) -> None:
        """Column indices within ``[0, n_features)``: one pass, negative indices being huge as unsigned integers."""
        if not indices.size:
            return
        unsigned = indices.view(np.uint32 if indices.dtype.itemsize == 4 else np.uint64)
        if unsigned.max() >= n_features:
            bad = int(np.argmax(unsigned >= n_features))
            raise self._corrupted(
                f'column index {int(indices[bad])} in {where(bad)} is out of range for {n_features} features'
            )

    def _check_values(self, data: np.ndarray, where: t.Callable[[int], str]) -> None:
        if not np.isfinite(data).all():
            bad = int(np.argmax(~np.isfinite(data)))
            raise self._corrupted(f'non-finite value {data[bad]} in {where(bad)}')

    def _read_row_range(self, handle: h5py.File, start: int, stop: int) -> scipy.sparse.csr_array:
        indptr, indices, data = self._read_raw(handle, start, stop)
        return _csr_from_arrays(data, indices, indptr - indptr[0], (stop - start, self._layout().n_features))

    def _check_checksum(self, hasher: _ContentHasher, indices_dtype: np.dtype) -> None:
        if hasher.hexdigest(self.shape, self.dtype, indices_dtype) != self.checksum:
            raise self._corrupted('content checksum mismatch')

    def get_matrix(self, kind: t.Literal['array', 'matrix'] = 'array', *, verify: bool = True):
        """Return the whole matrix as ``scipy.sparse.csr_array`` (``kind='array'``) or ``csr_matrix``.

        :param verify: also check the content against the stored checksum (detects a tampered file); the structure is
            checked either way.
        :raises CorruptedFeatureMatrixError: if the file does not hold what the attributes say.
        """
        if kind not in ('array', 'matrix'):
            raise ValueError(f"kind must be 'array' or 'matrix', got {kind!r}")
        with self._open() as handle:
            layout = self._layout()
            indptr, indices, data = self._read_raw(handle, 0, layout.n_rows)
        if verify:
            hasher = _ContentHasher()
            hasher.update(indptr[1:], indices, data)
            self._check_checksum(hasher, indices.dtype)
        matrix = _csr_from_arrays(data, indices, indptr, (layout.n_rows, layout.n_features))
        return scipy.sparse.csr_matrix(matrix) if kind == 'matrix' else matrix

    def get_rows(self, rows: slice | Iterable[int] | np.ndarray) -> scipy.sparse.csr_array:
        """Return a block of rows, by slice or by an array of row indices (in the order given).

        Only the chunks that hold the requested rows are read; HDF5 per-chunk checksums detect corrupted chunks.
        """
        with self._open() as handle:
            n_rows, n_features = self._layout()[:2]
            if isinstance(rows, slice):
                start, stop, step = rows.indices(n_rows)
                if step == 1:
                    return self._read_row_range(handle, start, max(start, stop))
                rows = np.arange(start, stop, step)
            index = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows)
            if index.size == 0:
                return scipy.sparse.csr_array((0, n_features), dtype=self.dtype)
            if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
                raise ValueError('rows must be a slice or a one-dimensional sequence of integer row indices')
            index = np.where(index < 0, index + n_rows, index)
            if index.min() < 0 or index.max() >= n_rows:
                raise IndexError(f'row index out of range for a matrix with {n_rows} rows')
            low, high = int(index.min()), int(index.max()) + 1
            if high - low <= 4 * index.size:
                return self._read_row_range(handle, low, high)[index - low]
            # Scattered rows: read covering blocks one at a time, keeping only the requested rows.
            order = np.argsort(index, kind='stable')
            sorted_index = index[order]
            pieces = []
            block = max(1024, index.size)
            for start in range(low, high, block):
                stop = min(start + block, high)
                lo, hi = np.searchsorted(sorted_index, [start, stop])
                if hi > lo:
                    pieces.append(self._read_row_range(handle, start, stop)[sorted_index[lo:hi] - start])
            gathered = scipy.sparse.vstack(pieces, format='csr')
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            return scipy.sparse.csr_array(gathered[inverse])

    def iter_blocks(self, block_size: int = 1024) -> Iterator[scipy.sparse.csr_array]:
        """Iterate over consecutive row blocks of at most ``block_size`` rows; memory is bounded by one block."""
        if block_size < 1:
            raise ValueError(f'block_size must be positive, got {block_size}')
        with self._open() as handle:
            n_rows = self._layout().n_rows
            for start in range(0, n_rows, block_size):
                yield self._read_row_range(handle, start, min(start + block_size, n_rows))

    def iter_row_blocks(
        self,
        rows: slice | Iterable[int] | np.ndarray,
        block_size: int = 1024,
        *,
        rng: np.random.Generator | None = None,
    ) -> Iterator[tuple[np.ndarray, scipy.sparse.csr_array]]:
        """Iterate over the given rows in blocks, reading at most ``block_size`` consecutive rows of the file at once.

        Yields ``(positions, block)``: ``block`` holds the rows ``rows[positions]``, in that order. Memory is bounded
        by one block, whatever the number of rows. Blocks come in file order, or, with ``rng``, in a random order and
        with their rows shuffled (for stochastic training).
        """
        n_rows = self._layout().n_rows
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(n_rows))
        index = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows)
        if index.size == 0:
            return
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise ValueError('rows must be a slice or a one-dimensional sequence of integer row indices')
        index = np.where(index < 0, index + n_rows, index)
        if index.min() < 0 or index.max() >= n_rows:
            raise IndexError(f'row index out of range for a matrix with {n_rows} rows')
        plan = plan_row_blocks(index, block_size)
        for number in range(len(plan)) if rng is None else rng.permutation(len(plan)):
            start, stop, positions = plan[number]
            if rng is not None:
                positions = positions[rng.permutation(positions.size)]
            block = self.get_rows(slice(start, stop))
            selected = index[positions] - start
            if not np.array_equal(selected, np.arange(stop - start)):
                block = block[selected]
            yield positions, block

    def verify(self) -> None:
        """Stream through the whole file in slabs: check its structure, as every read does, and its content checksum.

        :raises CorruptedFeatureMatrixError: if the file is not a valid matrix or its content differs from what was
            stored.
        """
        layout = self._layout()
        hasher = _ContentHasher()
        with self._open() as handle:
            # The checksum hashes each array as one stream, so slab boundaries do not matter.
            previous = 0
            dataset = handle['indptr']
            for start in range(0, layout.n_rows + 1, COPY_SLAB):
                slab = self._read(dataset, start, start + COPY_SLAB)
                if start == 0 and slab[0] != 0:
                    raise self._corrupted(f'indptr starts at {int(slab[0])}, not at 0')
                decreasing = np.concatenate(([slab[0] < previous], slab[1:] < slab[:-1]))
                if decreasing.any():
                    raise self._corrupted(f'indptr decreases at row {start + int(np.argmax(decreasing)) - 1}')
                hasher.update_one('indptr', slab[1:] if start == 0 else slab)
                previous = int(slab[-1])
            if previous != layout.nnz:
                raise self._corrupted(f'indptr ends at {previous}, not at the number of stored values {layout.nnz}')

            def row_of(offset: int) -> t.Callable[[int], str]:
                def where(position: int) -> str:
                    row = np.searchsorted(
                        self._read(handle['indptr'], 0, layout.n_rows + 1), offset + position, 'right'
                    )
                    return f'row {int(row) - 1}'

                return where

            for name in ('indices', 'data'):
                dataset = handle[name]
                for start in range(0, layout.nnz, COPY_SLAB):
                    slab = self._read(dataset, start, start + COPY_SLAB)
                    if name == 'indices':
                        self._check_indices(slab, layout.n_features, row_of(start))
                    else:
                        self._check_values(slab, row_of(start))
                    hasher.update_one(name, slab)
            indices_dtype = handle['indices'].dtype
        self._check_checksum(hasher, indices_dtype)

    def __str__(self) -> str:
        n_rows, n_features = self.base.attributes.get('shape', (0, 0))
        name = self.descriptor.get('name', 'features')
        return f'{type(self).__name__}<{self.pk or "unstored"}>: {n_rows} x {n_features} {name}, nnz {self.nnz}'
