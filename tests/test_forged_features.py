"""Forged feature files: never a crash of the interpreter, never a local file's bytes, a clear error naming the node.

Each forgery is a real node whose repository file is replaced by a forged HDF5 file, with a checksum attribute
computed from what plain h5py reads out of that file (the checksum proves the bytes, not a valid matrix). It is
stored the way an archive import stores a node, without the node's own ``_validate``; storing it normally must be
refused. Reads that crashed the interpreter before the structural checks (out-of-range column indices, a decreasing
``indptr``, a virtual dataset) run in a child process, so that a regression fails the test instead of killing pytest;
``MLWORKBENCH_FORGERIES_IN_CHILD=1`` runs every forgery's reads in a child (slower: one interpreter each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import typing as t

import h5py
import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from aiida.manage import get_manager
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aiida_mlworkbench.data import CorruptedFeatureMatrixError, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.data.sparse_features import _ContentHasher

N_ROWS, N_FEATURES = 12, 40
MARKER = b'MLWORKBENCH-LOCAL-SECRET:'
#: Filter id of a plugin (Blosc) that HDF5 would try to load as a shared library to decode the dataset.
PLUGIN_FILTER = 32001
TESTS = pathlib.Path(__file__).resolve().parent


def valid_matrix() -> scipy.sparse.csr_array:
    """A 12 x 40 float64 matrix in canonical form with a value in every row (the forgeries edit rows 3 and 5)."""
    rng = np.random.default_rng(11)
    matrix = scipy.sparse.random_array((N_ROWS, N_FEATURES), density=0.15, format='csr', rng=rng)
    matrix = matrix + scipy.sparse.csr_array((np.ones(N_ROWS), (np.arange(N_ROWS), np.arange(N_ROWS))), matrix.shape)
    matrix.sort_indices()
    arrays = (matrix.data, matrix.indices.astype('int32'), matrix.indptr.astype('int32'))  # scikit-learn's SVC wants
    return scipy.sparse.csr_array(arrays, shape=matrix.shape)


# -- how a forged file is written --------------------------------------------------------------------------------

Arrays = dict[str, np.ndarray]
Maker = t.Callable[[h5py.File, str, np.ndarray, pathlib.Path], None]


def plain_dataset(handle: h5py.File, name: str, values: np.ndarray, **options: t.Any) -> None:
    """A dataset laid out as the package writes it (chunked, fletcher32), with ``options`` on top."""
    settings = {'chunks': (max(1, values.size),), 'fletcher32': True, 'track_times': False, **options}
    handle.create_dataset(name, data=values, **settings)


def external_dataset(handle: h5py.File, name: str, values: np.ndarray, tmp: pathlib.Path) -> None:
    """Values read from a local file outside the HDF5 file (``external=``): it holds the marker."""
    secret = tmp / 'secret.bin'
    secret.write_bytes((MARKER * (values.nbytes // len(MARKER) + 1))[: values.nbytes])
    handle.create_dataset(name, shape=values.shape, dtype=values.dtype, external=[(str(secret), 0, values.nbytes)])


def source_file(name: str, values: np.ndarray, tmp: pathlib.Path) -> pathlib.Path:
    source = tmp / f'source-{name}.h5'
    with h5py.File(source, 'w') as handle:
        handle[name] = values
    return source


def virtual_dataset(handle: h5py.File, name: str, values: np.ndarray, tmp: pathlib.Path) -> None:
    layout = h5py.VirtualLayout(shape=values.shape, dtype=values.dtype)
    layout[:] = h5py.VirtualSource(str(source_file(name, values, tmp)), name, shape=values.shape)
    handle.create_virtual_dataset(name, layout)


def external_link(handle: h5py.File, name: str, values: np.ndarray, tmp: pathlib.Path) -> None:
    handle[name] = h5py.ExternalLink(str(source_file(name, values, tmp)), name)


def plugin_filter(handle: h5py.File, name: str, values: np.ndarray, tmp: pathlib.Path) -> None:
    """A dataset whose filter pipeline names a plugin filter (optional, so that writing works without the plugin)."""
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_chunk((values.size,))
    plist.set_fletcher32()
    plist.set_filter(PLUGIN_FILTER, h5py.h5z.FLAG_OPTIONAL, ())
    space = h5py.h5s.create_simple(values.shape)
    dataset = h5py.h5d.create(handle.id, name.encode(), h5py.h5t.py_create(values.dtype), space, dcpl=plist)
    h5py.Dataset(dataset)[...] = values


def gzip_dataset(handle: h5py.File, name: str, values: np.ndarray, tmp: pathlib.Path) -> None:
    plain_dataset(handle, name, values, compression='gzip', shuffle=True)


@dataclasses.dataclass
class Forgery:
    """A forged feature file: edits of the valid CSR arrays, special datasets, or raw bytes."""

    name: str
    message: str
    """A regular expression the error must match (after the node's name)."""
    edit: t.Callable[[Arrays], None] | None = None
    makers: dict[str, Maker] = dataclasses.field(default_factory=dict)
    raw: t.Callable[[bytes], bytes] | None = None
    shape: tuple[int, int] = (N_ROWS, N_FEATURES)
    crashed: bool = False
    """These reads crashed the interpreter without the structural checks: they run in a child process."""

    def write(self, path: pathlib.Path, tmp: pathlib.Path) -> None:
        matrix = valid_matrix()
        arrays = {
            'data': matrix.data.astype('float64'),
            'indices': matrix.indices.astype('int32'),
            'indptr': matrix.indptr.astype('int64'),
        }
        if self.edit is not None:
            self.edit(arrays)
        with h5py.File(path, 'w', libver='earliest') as handle:
            handle.attrs['format_version'] = 1
            handle.attrs['shape'] = np.array(self.shape, dtype='int64')
            for name, values in arrays.items():
                self.makers.get(name, lambda h, n, v, _: plain_dataset(h, n, v))(handle, name, values, tmp)
        if self.raw is not None:
            path.write_bytes(self.raw(path.read_bytes()))

    def __str__(self) -> str:
        return self.name


def set_value(name: str, position: int | t.Callable[[Arrays], int], value: t.Any) -> t.Callable[[Arrays], None]:
    def edit(arrays: Arrays) -> None:
        arrays[name][position(arrays) if callable(position) else position] = value

    return edit


def retype(name: str, dtype: str) -> t.Callable[[Arrays], None]:
    def edit(arrays: Arrays) -> None:
        arrays[name] = arrays[name].astype(dtype)

    return edit


def add_dataset(arrays: Arrays) -> None:
    arrays['payload'] = np.frombuffer(MARKER, dtype='uint8').copy()


def first_of_row(row: int) -> t.Callable[[Arrays], int]:
    return lambda arrays: int(arrays['indptr'][row])


FORGERIES = [
    Forgery(
        'column index 2e9',
        r'column index 2000000000 in row 3 is out of range for 40 features',
        edit=set_value('indices', first_of_row(3), 2_000_000_000),
        crashed=True,
    ),
    Forgery(
        'column index -1',
        r'column index -1 in row 3 is out of range for 40 features',
        edit=set_value('indices', first_of_row(3), -1),
        crashed=True,
    ),
    Forgery('indptr decreasing', r'indptr decreases at row 5', edit=set_value('indptr', 6, 0), crashed=True),
    Forgery(
        'indptr past nnz',
        r'indptr (ends at \d+, not at the number of stored values|of rows .* points to values .* outside)',
        edit=set_value('indptr', -1, 10**6),
        crashed=True,
    ),
    Forgery(
        'indptr short of nnz',
        r'indptr ends at \d+, not at the number of stored values \d+',
        edit=lambda arrays: arrays['indptr'].__setitem__(-1, arrays['indptr'][-2]),
    ),
    Forgery('indptr not starting at 0', r'indptr starts at 1, not at 0', edit=set_value('indptr', 0, 1)),
    Forgery('non-finite value', r'non-finite value nan in row 3', edit=set_value('data', first_of_row(3), np.nan)),
    Forgery(
        'external dataset',
        r"'data' is an external dataset: its values would be read from a local file",
        makers={'data': external_dataset},
    ),
    # Before the checks, reading it through the repository's file handle segfaulted in HDF5.
    Forgery('virtual dataset', r"'data' is a virtual dataset", makers={'data': virtual_dataset}, crashed=True),
    Forgery('external link', r"'indices' is an HDF5 ExternalLink", makers={'indices': external_link}),
    Forgery(
        'gzip and shuffle filters', r"'data' goes through the HDF5 filters \[2, 1, 3\]", makers={'data': gzip_dataset}
    ),
    Forgery(
        'filter plugin id',
        rf"'indices' goes through the HDF5 filters \[3, {PLUGIN_FILTER}\]",
        makers={'indices': plugin_filter},
    ),
    Forgery('data int64', r"'data' has dtype int64, expected float64", edit=retype('data', 'int64')),
    Forgery(
        'indices float64', r"'indices' has dtype float64, expected int32 or int64", edit=retype('indices', 'float64')
    ),
    Forgery('indptr int32', r"'indptr' has dtype int32, expected int64", edit=retype('indptr', 'int32')),
    Forgery('extra dataset', r"the file holds \['data', 'indices', 'indptr', 'payload'\]", edit=add_dataset),
    Forgery(
        'missing dataset', r"the file holds \['indices', 'indptr'\], expected exactly", edit=lambda a: a.pop('data')
    ),
    Forgery('shape attribute', r'the file says shape \[12, 1000000000\]', shape=(N_ROWS, 10**9)),
    Forgery('not HDF5', r'not an HDF5 file or is truncated', raw=lambda content: b'\x89not hdf5\n' * 300),
    Forgery('truncated', r'not an HDF5 file or is truncated', raw=lambda content: content[: len(content) // 2]),
]


def consistent_checksum(path: pathlib.Path, original: str) -> str:
    """The checksum of what plain h5py reads from the forged file, as the forger would compute it.

    A file plain h5py cannot read as three arrays (not HDF5, a missing dataset) keeps the original checksum.
    """
    try:
        with h5py.File(path, 'r') as handle:
            indptr, indices, data = (handle[name][()] for name in ('indptr', 'indices', 'data'))
    except (KeyError, OSError):
        return original
    hasher = _ContentHasher()
    hasher.update_one('indptr', indptr[1:])
    hasher.update_one('indices', indices)
    hasher.update_one('data', data)
    return hasher.hexdigest((N_ROWS, N_FEATURES), np.dtype('float64'), indices.dtype)


def forged_node(forgery: Forgery, tmp_path: pathlib.Path) -> SparseFeatureMatrix:
    """An unstored node with valid attributes whose repository file is the forged one, with a consistent checksum."""
    node = SparseFeatureMatrix(valid_matrix(), descriptor={'name': 'soap'})
    path = tmp_path / 'forged.h5'
    forgery.write(path, tmp_path)
    node.base.repository.put_object_from_file(str(path), SparseFeatureMatrix.FILENAME)
    node.base.attributes.set('checksum', consistent_checksum(path, node.checksum))
    return node


def store_as_an_import_does(node: SparseFeatureMatrix, monkeypatch: pytest.MonkeyPatch) -> SparseFeatureMatrix:
    """Store without the node's own ``_validate``: an archive import does not run it either."""
    with monkeypatch.context() as patch:
        patch.setattr(SparseFeatureMatrix, '_validate', orm.Data._validate)
        return node.store()


# -- what is tried on each forged node ---------------------------------------------------------------------------

OPERATIONS: dict[str, t.Callable[[SparseFeatureMatrix, TrainedModel], t.Any]] = {
    'get_rows(slice)': lambda node, model: node.get_rows(slice(None)),
    'get_rows(list)': lambda node, model: node.get_rows([N_ROWS - 1, 3, 0]),
    'iter_blocks': lambda node, model: list(node.iter_blocks(5)),
    'iter_row_blocks': lambda node, model: list(node.iter_row_blocks(np.arange(N_ROWS), 4)),
    'get_matrix(verify=True)': lambda node, model: node.get_matrix(),
    'get_matrix(verify=False)': lambda node, model: node.get_matrix(verify=False),
    'verify': lambda node, model: node.verify(),
    'predict': lambda node, model: model.predict(node),
    'predict(rows)': lambda node, model: model.predict(node, rows=[10, 3, 5], block_size=4),
}


def exercise(node_pk: int, model_pk: int) -> dict[str, list[str]]:
    """Run every operation on a freshly loaded node; return ``[exception class, message]`` or what came back."""
    outcomes = {}
    for name, operation in OPERATIONS.items():
        node, model = orm.load_node(node_pk), orm.load_node(model_pk)
        try:
            result = operation(node, model)
        except Exception as exception:
            outcomes[name] = [type(exception).__name__, str(exception)]
        else:
            outcomes[name] = ['returned', repr(result)]
        finally:
            node.close()
    return outcomes


def exercise_in_child(node_pk: int, model_pk: int) -> dict[str, list[str]]:
    """:func:`exercise` in a child process: a crash of its interpreter is a failed test, not a dead pytest run."""
    code = (
        f'import json, sys; sys.path.insert(0, {str(TESTS)!r}); from aiida import load_profile; '
        f'load_profile({get_manager().get_profile().name!r}); from test_forged_features import exercise; '
        f'print(json.dumps(exercise({node_pk}, {model_pk})))'
    )
    completed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, (
        f'reading the forged file killed the interpreter (exit code {completed.returncode}):\n'
        f'{completed.stderr[-3000:]}'
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def model_pk() -> int:
    matrix = valid_matrix()
    labels = np.array(['bcc', 'fcc', 'hcp'])[np.arange(N_ROWS) % 3]
    estimator = make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear')).fit(matrix, labels)
    return TrainedModel(estimator, descriptor={'name': 'soap'}).store().pk


def count_matrices() -> int:
    return orm.QueryBuilder().append(SparseFeatureMatrix).count()


@pytest.mark.parametrize('forgery', FORGERIES, ids=str)
def test_forged_file_is_refused_by_every_read(forgery, tmp_path, monkeypatch, model_pk):
    node = store_as_an_import_does(forged_node(forgery, tmp_path), monkeypatch)
    in_child = forgery.crashed or os.environ.get('MLWORKBENCH_FORGERIES_IN_CHILD') == '1'
    outcomes = exercise_in_child(node.pk, model_pk) if in_child else exercise(node.pk, model_pk)
    for operation, (kind, message) in outcomes.items():
        assert kind == CorruptedFeatureMatrixError.__name__, f'{operation}: {kind} {message}'
        assert f'SparseFeatureMatrix<{node.pk}>' in message, operation
        assert 'Re-create the node' in message, operation
        assert re.search(forgery.message, message), f'{operation}: {message}'
        assert MARKER.decode() not in message


@pytest.mark.parametrize('forgery', FORGERIES, ids=str)
def test_forged_file_cannot_be_stored(forgery, tmp_path):
    node = forged_node(forgery, tmp_path)
    before = count_matrices()
    with pytest.raises(CorruptedFeatureMatrixError, match=r'SparseFeatureMatrix<unstored>.*' + forgery.message):
        node.store()
    assert not node.is_stored
    assert count_matrices() == before


def test_forgeries_are_real(tmp_path):
    """Plain h5py reads the forged arrays without complaint: the checks are the package's, not HDF5's."""
    readable = 0
    for forgery in FORGERIES:
        path = tmp_path / f'{forgery.name.replace(" ", "-")}.h5'
        forgery.write(path, tmp_path)
        try:
            with h5py.File(path, 'r') as handle:
                arrays = {name: handle[name][()] for name in handle}
        except (KeyError, OSError):
            assert forgery.raw is not None, forgery.name
            continue
        readable += 1
        if forgery.name == 'external dataset':
            assert arrays['data'].tobytes().startswith(MARKER)
    assert readable == len(FORGERIES) - 2


def test_marker_never_comes_back_through_an_archive(tmp_path, monkeypatch, fresh_profile):
    """The hostile route: a forged node in an archive, imported elsewhere; the import stores it, every read refuses."""
    from aiida.tools.archive import create_archive, import_archive

    forgery = next(forgery for forgery in FORGERIES if forgery.name == 'external dataset')
    node = store_as_an_import_does(forged_node(forgery, tmp_path), monkeypatch)
    archive = tmp_path / 'forged.aiida'
    create_archive([node], filename=archive)
    uuid = node.uuid
    with fresh_profile():
        import_archive(archive)
        imported = orm.load_node(uuid)
        for read in (imported.get_matrix, imported.verify, lambda: list(imported.iter_blocks(4))):
            with pytest.raises(CorruptedFeatureMatrixError, match=forgery.message) as error:
                read()
            assert MARKER.decode() not in str(error.value)
        imported.close()


@pytest.mark.parametrize(
    ('attributes', 'message'),
    [
        ({'n_rows': '12'}, r"its attributes are inconsistent \(shape \[12, 40\], n_rows '12'"),
        ({'shape': [12, 41]}, r'its attributes are inconsistent \(shape \[12, 41\]'),
        ({'dtype': 'int64'}, r"its attributes are inconsistent .* dtype 'int64'"),
        ({'nnz': 10**6}, r'its attributes are inconsistent .* nnz 1000000'),
        ({'nnz': 80}, r"'data' has shape \(81,\), expected \(80,\)"),
    ],
    ids=['n_rows a string', 'shape', 'dtype', 'nnz beyond the shape', 'nnz one short'],
)
def test_forged_attributes_are_refused(attributes, message, monkeypatch):
    """An archive carries attributes too: they must agree with each other and with the file."""
    node = SparseFeatureMatrix(valid_matrix())
    node.base.attributes.set_many(attributes)
    before = count_matrices()
    with pytest.raises(CorruptedFeatureMatrixError, match=r'SparseFeatureMatrix<unstored>.*' + message):
        node.store()
    assert count_matrices() == before
    store_as_an_import_does(node, monkeypatch)
    for read in (node.get_matrix, node.verify, lambda: node.get_rows([0, 3]), lambda: list(node.iter_blocks(4))):
        with pytest.raises(CorruptedFeatureMatrixError, match=rf'SparseFeatureMatrix<{node.pk}>.*' + message):
            read()
