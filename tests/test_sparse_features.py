"""Tests for :class:`aiida_mlworkbench.data.SparseFeatureMatrix`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse
import sparse
from aiida import orm

from aiida_mlworkbench.data import CorruptedFeatureMatrixError, SparseFeatureMatrix

SOAP_DESCRIPTOR = {'name': 'soap', 'species': ['Cu', 'Fe'], 'r_cut': 5.0, 'n_max': 5, 'l_max': 5}


@pytest.fixture
def matrix() -> scipy.sparse.csr_array:
    """A random 250 x 3000 CSR matrix with about 30 non-zeros per row."""
    return scipy.sparse.random_array((250, 3000), density=0.01, format='csr', rng=np.random.default_rng(42))


def assert_equal_sparse(first, second) -> None:
    assert first.shape == second.shape
    assert (abs(first - second)).max() == 0 if first.nnz or second.nnz else True
    assert (first != second).nnz == 0


def object_path(node: orm.Node, filename: str):
    """Path of a stored node's file in the profile's disk-objectstore (to tamper with it, as an attacker would)."""
    from aiida.manage import get_manager

    key = node.base.repository.metadata['o'][filename]['k']
    container = get_manager().get_profile_storage().get_repository()._container
    return container._get_loose_path_from_hashkey(key)


class TestRoundTrip:
    def test_scipy_in_scipy_out(self, matrix):
        node = SparseFeatureMatrix(matrix, descriptor=SOAP_DESCRIPTOR).store()
        loaded = orm.load_node(node.pk)
        result = loaded.get_matrix()
        assert isinstance(result, scipy.sparse.csr_array)
        assert_equal_sparse(result, matrix)
        assert isinstance(loaded.get_matrix('matrix'), scipy.sparse.csr_matrix)
        assert loaded.shape == (250, 3000)
        assert loaded.nnz == matrix.nnz
        assert loaded.dtype == np.float64
        assert loaded.descriptor == SOAP_DESCRIPTOR

    def test_pydata_coo_in(self, matrix):
        """DScribe returns ``sparse.COO``: it goes in without densifying and gives the same content."""
        from_coo = SparseFeatureMatrix(sparse.COO.from_scipy_sparse(matrix)).store()
        from_scipy = SparseFeatureMatrix(matrix).store()
        assert from_coo.checksum == from_scipy.checksum
        assert_equal_sparse(from_coo.get_matrix(), matrix)

    @pytest.mark.parametrize('kind', ['csc', 'coo', 'lil'])
    def test_other_scipy_formats(self, matrix, kind):
        node = SparseFeatureMatrix(matrix.asformat(kind)).store()
        assert_equal_sparse(node.get_matrix(), matrix)

    def test_float32_is_kept(self, matrix):
        node = SparseFeatureMatrix(matrix.astype(np.float32)).store()
        assert node.dtype == np.float32
        assert node.base.attributes.get('dtype') == 'float32'
        assert node.get_matrix().dtype == np.float32

    def test_from_blocks_equals_whole(self, matrix):
        blocks = (matrix[start : start + 17] for start in range(0, matrix.shape[0], 17))
        streamed = SparseFeatureMatrix.from_blocks(blocks, n_features=matrix.shape[1]).store()
        whole = SparseFeatureMatrix(matrix).store()
        assert_equal_sparse(streamed.get_matrix(), matrix)
        assert streamed.checksum == whole.checksum

    def test_row_blocks_equal_slices(self, matrix):
        node = SparseFeatureMatrix(matrix).store()
        assert_equal_sparse(node.get_rows(slice(10, 60)), matrix[10:60])
        assert_equal_sparse(node.get_rows(slice(240, 400)), matrix[240:])
        assert_equal_sparse(node.get_rows(slice(0, 250, 3)), matrix[0:250:3])
        rows = [200, 3, 3, 17, -1]
        assert_equal_sparse(node.get_rows(rows), matrix[[200, 3, 3, 17, 249]])
        scattered = np.random.default_rng(0).permutation(250)[:20]
        assert_equal_sparse(node.get_rows(scattered), matrix[scattered])
        assert node.get_rows([]).shape == (0, 3000)
        with pytest.raises(IndexError, match='out of range'):
            node.get_rows([250])

    def test_iter_blocks(self, matrix):
        node = SparseFeatureMatrix(matrix).store()
        blocks = list(node.iter_blocks(64))
        assert [block.shape[0] for block in blocks] == [64, 64, 64, 58]
        assert_equal_sparse(scipy.sparse.vstack(blocks, format='csr'), matrix)

    def test_blocks_have_32bit_indices_for_scikit_learn(self, matrix):
        """libsvm-based estimators refuse int64 CSR indices, so blocks come with int32 indices where they fit."""
        node = SparseFeatureMatrix(matrix).store()
        block = node.get_rows(slice(0, 10))
        assert block.indices.dtype == np.int32
        assert block.indptr.dtype == np.int32

    def test_empty_rows_allowed(self):
        matrix = scipy.sparse.csr_array((5, 10))
        node = SparseFeatureMatrix(matrix).store()
        assert node.nnz == 0
        assert node.get_matrix().shape == (5, 10)

    def test_file_is_chunked_for_block_reads(self, matrix):
        node = SparseFeatureMatrix(matrix).store()
        with node.base.repository.open(node.FILENAME, 'rb') as stream, h5py.File(stream) as handle:
            for name in ('data', 'indices', 'indptr'):
                assert handle[name].chunks is not None
                assert handle[name].fletcher32


class TestCanonicalContent:
    def test_equal_content_equal_bytes_and_hash(self, matrix):
        first = SparseFeatureMatrix(matrix, descriptor=SOAP_DESCRIPTOR)
        second = SparseFeatureMatrix.from_blocks(
            (matrix[start : start + 100] for start in range(0, 250, 100)), 3000, descriptor=SOAP_DESCRIPTOR
        )
        first_bytes = first.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb')
        second_bytes = second.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb')
        assert first_bytes == second_bytes
        assert first.base.caching.get_hash() == second.base.caching.get_hash()

    def test_duplicates_unsorted_and_explicit_zeros_are_canonicalised(self):
        messy = scipy.sparse.csr_array(
            (np.array([1.0, 2.0, 0.0, 3.0]), np.array([5, 1, 2, 1]), np.array([0, 4])), shape=(1, 8)
        )
        clean = scipy.sparse.csr_array((np.array([5.0, 1.0]), np.array([1, 5]), np.array([0, 2])), shape=(1, 8))
        assert SparseFeatureMatrix(messy).checksum == SparseFeatureMatrix(clean).checksum

    def test_input_is_not_modified(self):
        messy = scipy.sparse.csr_array((np.array([1.0, 2.0]), np.array([5, 1]), np.array([0, 2])), shape=(1, 8))
        SparseFeatureMatrix(messy)
        assert list(messy.indices) == [5, 1]

    def test_different_content_different_checksum(self, matrix):
        other = matrix.copy()
        other.data[0] += 1.0
        assert SparseFeatureMatrix(matrix).checksum != SparseFeatureMatrix(other).checksum


class TestValidation:
    """Bad input is refused with a clear message and nothing is stored."""

    @staticmethod
    def raw(data, indices, indptr, shape):
        matrix = scipy.sparse.csr_array((1, 1))
        matrix.data, matrix.indices, matrix.indptr = (np.asarray(a) for a in (data, indices, indptr))
        matrix._shape = shape
        return matrix

    def count(self) -> int:
        return orm.QueryBuilder().append(SparseFeatureMatrix).count()

    @pytest.mark.parametrize(
        ('arrays', 'message'),
        [
            (([1.0, 2.0], [0, 1], [0, 2, 1]), 'decreases at row 1'),
            (([1.0, 2.0], [0, 10], [0, 1, 2]), 'column index 10 in row 1 is out of range'),
            (([1.0, 2.0], [0, -1], [0, 1, 2]), 'column index -1 in row 1 is out of range'),
            (([1.0, np.nan], [0, 1], [0, 1, 2]), 'non-finite value nan in row 1'),
            (([np.inf, 1.0], [0, 1], [0, 1, 2]), 'non-finite value inf in row 0'),
            (([1.0, 2.0], [0, 1], [0, 1]), 'expected 3 entries'),
            (([1.0, 2.0], [0, 1], [0, 1, 3]), 'indptr ends at 3'),
        ],
    )
    def test_invalid_csr(self, arrays, message):
        before = self.count()
        with pytest.raises(ValueError, match=message):
            SparseFeatureMatrix(self.raw(*arrays, shape=(2, 4)))
        assert self.count() == before

    @pytest.mark.parametrize(
        'build',
        [
            lambda matrix: SparseFeatureMatrix(matrix, dtype='float32'),
            lambda matrix: SparseFeatureMatrix.from_blocks([matrix[:1], matrix[1:]], 4, dtype='float32'),
        ],
        ids=['whole', 'blocks'],
    )
    def test_value_overflowing_float32_is_refused(self, build):
        """Cast first, then check: 1e300 is finite as float64 but inf as float32, and must not be stored as inf."""
        matrix = self.raw([1.0, 1e300], [0, 3], [0, 1, 2], shape=(2, 4))
        before = self.count()
        with pytest.raises(ValueError, match=r'value 1e\+300 in row 1, column 3 does not fit in float32'):
            build(matrix)
        assert self.count() == before
        assert SparseFeatureMatrix(matrix, dtype='float64').get_matrix()[1, 3] == 1e300

    def test_duplicates_summing_past_float32_are_refused(self):
        matrix = self.raw([3e38, 3e38], [2, 2], [0, 2], shape=(1, 4))
        with pytest.raises(ValueError, match='duplicate entries of row 0, column 2 sum to inf in float32'):
            SparseFeatureMatrix(matrix, dtype='float32')

    @pytest.mark.parametrize('dtype', [np.int64, np.complex128, np.bool_])
    def test_unsupported_dtype(self, dtype):
        matrix = scipy.sparse.csr_array(np.eye(3, dtype=dtype))
        with pytest.raises(ValueError, match='unsupported dtype'):
            SparseFeatureMatrix(matrix)

    def test_dense_input_refused(self):
        with pytest.raises(TypeError, match='never densified'):
            SparseFeatureMatrix(np.eye(3))

    def test_block_with_wrong_width(self, matrix):
        blocks = [matrix[:10], matrix[10:20, :2999]]
        with pytest.raises(ValueError, match='block starting at row 10 has 2999 columns, expected 3000'):
            SparseFeatureMatrix.from_blocks(blocks, 3000)

    def test_error_in_later_block_names_global_row(self, matrix):
        bad = matrix[100:110].copy()
        bad.data[bad.indptr[3]] = np.nan
        blocks = [matrix[:100], bad]
        with pytest.raises(ValueError, match='non-finite value nan in row 103'):
            SparseFeatureMatrix.from_blocks(blocks, 3000)

    def test_no_rows(self):
        with pytest.raises(ValueError, match='no rows'):
            SparseFeatureMatrix.from_blocks([], 10)

    def test_descriptor_must_be_json(self, matrix):
        with pytest.raises(ValueError, match='JSON-serialisable'):
            SparseFeatureMatrix(matrix, descriptor={'species': {1, 2}})

    def test_empty_node_cannot_be_stored(self):
        before = self.count()
        with pytest.raises(ValueError, match='holds no matrix'):
            SparseFeatureMatrix().store()
        assert self.count() == before


class TestCorruption:
    def test_flipped_bytes_are_detected(self, matrix):
        node = SparseFeatureMatrix(matrix).store()
        path = object_path(node, node.FILENAME)
        with h5py.File(path, 'r') as handle:
            offset = handle['data'].id.get_chunk_info(0).byte_offset
        path.chmod(0o644)
        with open(path, 'r+b') as stream:
            stream.seek(offset + 100)
            stream.write(b'\x13\x37\x13\x37')
        loaded = orm.load_node(node.pk)
        with pytest.raises(CorruptedFeatureMatrixError, match='corrupted or was tampered with'):
            loaded.get_matrix()
        with pytest.raises(CorruptedFeatureMatrixError):
            loaded.get_rows(slice(0, 5))
        with pytest.raises(CorruptedFeatureMatrixError):
            loaded.verify()

    def test_consistently_replaced_file_is_detected(self, matrix):
        """A valid HDF5 file with other values of the same layout passes the chunk checksums but not the content one."""
        node = SparseFeatureMatrix(matrix).store()
        forged = matrix.copy()
        forged.data[:] = 1.0
        forged_node = SparseFeatureMatrix(forged)
        path = object_path(node, node.FILENAME)
        path.chmod(0o644)
        path.write_bytes(forged_node.base.repository.get_object_content(forged_node.FILENAME, 'rb'))
        loaded = orm.load_node(node.pk)
        with pytest.raises(CorruptedFeatureMatrixError, match='checksum mismatch'):
            loaded.get_matrix()
        with pytest.raises(CorruptedFeatureMatrixError, match='checksum mismatch'):
            loaded.verify()

    def test_intact_file_verifies(self, matrix):
        SparseFeatureMatrix(matrix).store().verify()


class TestQuery:
    def test_filter_on_attributes(self, aiida_profile_clean):
        rng = np.random.default_rng(1)
        small = SparseFeatureMatrix(
            scipy.sparse.random_array((3, 100), density=0.1, rng=rng), descriptor=SOAP_DESCRIPTOR
        )
        wide_soap = SparseFeatureMatrix(
            scipy.sparse.random_array((3, 5000), density=0.01, rng=rng), descriptor=SOAP_DESCRIPTOR
        )
        wide_other = SparseFeatureMatrix(
            scipy.sparse.random_array((3, 5000), density=0.01, rng=rng), descriptor={'name': 'mbtr'}
        )
        for node in (small, wide_soap, wide_other):
            node.store()
        query = orm.QueryBuilder().append(
            SparseFeatureMatrix,
            filters={'attributes.n_features': {'>': 1000}, 'attributes.descriptor.name': 'soap'},
            project='id',
        )
        assert query.all(flat=True) == [wide_soap.pk]
        query = orm.QueryBuilder().append(
            SparseFeatureMatrix, filters={'attributes.descriptor.n_max': 5}, project='attributes.checksum'
        )
        assert sorted(query.all(flat=True)) == sorted([small.checksum, wide_soap.checksum])

    def test_entry_point(self):
        from aiida.plugins import DataFactory

        assert DataFactory('mlworkbench.sparse_features') is SparseFeatureMatrix
