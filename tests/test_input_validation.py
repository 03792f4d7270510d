"""Every bad input is refused before any work starts, with a message that names the input and says what to do.

Work chain (given embeddings or ready clusters) and ``build_impurity_clusters``: a bad input raises at submission (or
when set on the builder) and leaves the database as it was. Calcfunctions called directly with a bad node: the failed
process has the exit code whose name is the problem, and no output.
"""

from __future__ import annotations

import math
import typing as t

import ase
import numpy as np
import pytest
import scipy.sparse
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import run_get_node

from aiida_mlworkbench.calcfunctions import clusters, featurize, lattice, split, targets, train
from aiida_mlworkbench.data import HostCrystal, ImpurityClusters, SparseFeatureMatrix
from aiida_mlworkbench.descriptors import get_descriptor
from aiida_mlworkbench.estimators import EstimatorSpecificationError, build_estimator
from aiida_mlworkbench.kkr.geometry import (
    MAX_CLUSTER_ATOMS,
    MAX_CYLINDER_SEARCH_SITES,
    MAX_SEARCH_SITES,
    ClusterTooLargeError,
    check_embedding,
    estimate_cluster_size,
    impurity_cluster,
    parse_impurity_info,
)
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

SMALL_SOAP = {'name': 'soap', 'r_cut': 4.0, 'n_max': 2, 'l_max': 2, 'sigma': 1.0}
CU_A = 3.61


def count_nodes() -> int:
    return orm.QueryBuilder().append(orm.Node).count()


def cu_host() -> orm.StructureData:
    from ase.build import bulk

    return orm.StructureData(ase=bulk('Cu', 'fcc', a=CU_A))


def sparse_host() -> orm.StructureData:
    """A cubic cell of 30 Angstrom holding 100 Cu atoms: dilute, so a cluster is small but the search is large."""
    host = orm.StructureData(cell=np.eye(3) * 30.0)
    for position in np.random.default_rng(0).uniform(0, 30, size=(100, 3)):
        host.append_atom(position=position, symbols='Cu')
    return host


def alloy_host() -> orm.StructureData:
    host = orm.StructureData(cell=np.eye(3) * 3.0)
    host.append_atom(position=(0, 0, 0), symbols=('Cu', 'Au'), weights=(0.5, 0.5), name='CuAu')
    return host


def vacuum_host() -> orm.StructureData:
    host = orm.StructureData(cell=np.eye(3) * 3.0)
    host.append_atom(position=(0, 0, 0), symbols='X', name='X')
    return host


@pytest.fixture(scope='module')
def embedding_pks() -> list[tuple[int, int]]:
    group = create_synthetic_database(size=8, seed=3, group_label='tests/input-validation')
    return [(host.pk, info.pk) for host, info in iter_synthetic_embeddings(group)]


@pytest.fixture
def embeddings(embedding_pks) -> list[tuple[orm.StructureData, orm.Dict]]:
    return [(orm.load_node(host), orm.load_node(info)) for host, info in embedding_pks]


# -- the work chain: refused at submission, nothing stored ----------------------------------------------------------

# (inputs given to the builder, embedding 1 replaced by (host, impurity_info) or None, words the message must hold).
# The words name the input and say what to do.
Replace = t.Callable[[], tuple[orm.StructureData | None, dict[str, t.Any]]] | None


def info(**content: t.Any) -> Replace:
    """Replace the impurity_info of embedding 1 (the host kept unless given as ``host``)."""
    host = content.pop('host', None)
    return lambda: (host() if host else None, content)


LABELS = ['a', 'b'] * 4
WORKCHAIN_CASES: list[tuple[str, dict[str, t.Any], Replace, tuple[str, ...]]] = [
    # split: the bug report's `seed='x'` first
    ('seed-string', {'split': {'seed': 'x'}}, None, ('seed', 'must be an integer from 0')),
    ('seed-float', {'split': {'seed': 2.5}}, None, ('seed', 'must be an integer')),
    ('seed-negative', {'split': {'seed': -1}}, None, ('seed', '2**32 - 1')),
    ('seed-too-large', {'split': {'seed': 2**33}}, None, ('seed', '2**32 - 1')),
    ('seed-bool', {'split': {'seed': True}}, None, ('seed', 'must be an integer')),
    ('fraction-zero', {'split': {'test_fraction': 0}}, None, ('test_fraction', 'strictly between 0 and 1')),
    ('fraction-one', {'split': {'test_fraction': 1.0}}, None, ('test_fraction', 'strictly between 0 and 1')),
    ('fraction-string', {'split': {'test_fraction': 'half'}}, None, ('test_fraction', 'a number')),
    ('fraction-bool', {'split': {'test_fraction': True}}, None, ('test_fraction', 'a number')),
    ('stratify-string', {'split': {'stratify': 'yes'}}, None, ('stratify', 'true or false')),
    ('grouped-int', {'split': {'grouped': 1}}, None, ('grouped', 'true or false')),
    ('split-unknown-key', {'split': {'shuffle': True}}, None, ('shuffle', 'known: grouped, seed')),
    (
        'grouped-with-values',
        {'split': {'grouped': True}, 'target': 'values', 'target_values': [1.0] * 8},
        None,
        ('grouped', 'host_lattice', 'set grouped to false'),
    ),
    ('empty-train-side', {'split': {'test_fraction': 0.95}}, None, ('test_fraction', 'lower test_fraction')),
    (
        'cannot-stratify',
        {'target': 'values', 'target_values': ['a'] * 7 + ['b']},
        None,
        ('stratify', 'single row', 'set stratify to false'),
    ),
    # descriptor: DScribe parameter ranges and types
    ('n_max-zero', {'descriptor': {**SMALL_SOAP, 'n_max': 0}}, None, ('descriptor', 'n_max', 'integer from 1 to')),
    ('n_max-float', {'descriptor': {**SMALL_SOAP, 'n_max': 2.5}}, None, ('n_max', 'integer from 1 to')),
    ('n_max-bool', {'descriptor': {**SMALL_SOAP, 'n_max': True}}, None, ('n_max', 'integer from 1 to')),
    ('n_max-huge', {'descriptor': {**SMALL_SOAP, 'n_max': 1000}}, None, ('n_max', 'integer from 1 to 20')),
    ('l_max-negative', {'descriptor': {**SMALL_SOAP, 'l_max': -1}}, None, ('l_max', 'integer from 0 to 20')),
    ('l_max-too-large', {'descriptor': {**SMALL_SOAP, 'l_max': 21}}, None, ('l_max', 'integer from 0 to 20')),
    ('l_max-string', {'descriptor': {**SMALL_SOAP, 'l_max': '3'}}, None, ('l_max', 'integer from 0 to 20')),
    ('r_cut-negative', {'descriptor': {**SMALL_SOAP, 'r_cut': -1}}, None, ('r_cut', 'above 0 and at most')),
    ('r_cut-huge', {'descriptor': {**SMALL_SOAP, 'r_cut': 1e6}}, None, ('r_cut', 'at most 50')),
    ('r_cut-string', {'descriptor': {**SMALL_SOAP, 'r_cut': 'six'}}, None, ('r_cut', 'cutoff radius in Angstrom')),
    ('r_cut-gto-small', {'descriptor': {**SMALL_SOAP, 'r_cut': 0.8}}, None, ('r_cut', 'above 1 Angstrom')),
    ('r_cut-nan', {'descriptor': {**SMALL_SOAP, 'r_cut': math.nan}}, None, ('r_cut', 'above 0')),
    ('sigma-zero', {'descriptor': {**SMALL_SOAP, 'sigma': 0}}, None, ('sigma', 'positive width')),
    ('sigma-inf', {'descriptor': {**SMALL_SOAP, 'sigma': math.inf}}, None, ('sigma', 'positive width')),
    ('species-unknown', {'descriptor': {**SMALL_SOAP, 'species': ['Cu', 'Xx']}}, None, ('species', 'element')),
    ('species-string', {'descriptor': {**SMALL_SOAP, 'species': 'Cu'}}, None, ('species', "['Cu', 'Fe']")),
    ('species-bool', {'descriptor': {**SMALL_SOAP, 'species': [True]}}, None, ('species', 'atomic numbers')),
    ('species-float', {'descriptor': {**SMALL_SOAP, 'species': [26.5]}}, None, ('species', 'atomic numbers')),
    ('species-zero', {'descriptor': {**SMALL_SOAP, 'species': [0]}}, None, ('species', 'from 1 to')),
    ('average-off', {'descriptor': {**SMALL_SOAP, 'average': 'off'}}, None, ('average', 'use one of')),
    ('rbf-unknown', {'descriptor': {**SMALL_SOAP, 'rbf': 'bessel'}}, None, ('rbf', 'use one of')),
    ('dtype-unknown', {'descriptor': {**SMALL_SOAP, 'dtype': 'float16'}}, None, ('dtype', 'use one of')),
    ('periodic-string', {'descriptor': {**SMALL_SOAP, 'periodic': 'no'}}, None, ('periodic', 'true or false')),
    ('weighting-list', {'descriptor': {**SMALL_SOAP, 'weighting': [1]}}, None, ('weighting', 'left out')),
    ('weighting-key', {'descriptor': {**SMALL_SOAP, 'weighting': {'speed': 1}}}, None, ('weighting', 'DScribe knows')),
    (
        'weighting-r0',
        {'descriptor': {**SMALL_SOAP, 'weighting': {'function': 'poly', 'r0': -1, 'c': 1, 'm': 1}}},
        None,
        ('DScribe refuses', 'r0 > 0'),
    ),
    ('compression-string', {'descriptor': {**SMALL_SOAP, 'compression': 'mu2'}}, None, ('compression', "'mode'")),
    ('descriptor-name', {'descriptor': {'name': 'acsf'}}, None, ('descriptor', 'registered descriptors: soap')),
    ('descriptor-no-name', {'descriptor': {'r_cut': 5.0}}, None, ('descriptor', 'need a `name`')),
    ('descriptor-name-list', {'descriptor': {'name': ['soap']}}, None, ('`name` must be a string', 'soap')),
    ('descriptor-unknown-key', {'descriptor': {**SMALL_SOAP, 'colour': 1}}, None, ("'colour'", 'its parameters')),
    # estimator: every key of the specification, for type and value
    ('parameters-list', {'estimator': {'estimator': 'SVC', 'parameters': [1, 2]}}, None, ('parameters', 'dictionary')),
    ('parameters-string', {'estimator': {'estimator': 'SVC', 'parameters': 'C=1'}}, None, ('parameters', 'dictionary')),
    ('parameters-inf', {'estimator': {'estimator': 'SVC', 'parameters': {'C': math.inf}}}, None, ("'C'", 'finite')),
    ('parameters-range', {'estimator': {'estimator': 'SVC', 'parameters': {'C': -1.0}}}, None, ("'C'", 'SVC')),
    ('parameters-unknown', {'estimator': {'estimator': 'SVC', 'parameters': {'colour': 1}}}, None, ('colour', 'its')),
    ('estimator-list', {'estimator': {'estimator': ['SVC']}}, None, ('unknown estimator', 'choose one of')),
    ('estimator-eval', {'estimator': {'estimator': 'eval'}}, None, ('unknown estimator', 'choose one of')),
    ('estimator-missing', {'estimator': {'parameters': {}}}, None, ('unknown estimator None', 'choose one of')),
    ('spec-unknown-key', {'estimator': {'estimator': 'SVC', 'tuning': 1}}, None, ("'tuning'", 'known:')),
    ('scaler-int', {'estimator': {'estimator': 'SVC', 'scaler': 7}}, None, ('scaler must be None', 'StandardScaler')),
    (
        'scaler-parameters-list',
        {'estimator': {'estimator': 'SVC', 'scaler': {'name': 'MaxAbsScaler', 'parameters': [1]}}},
        None,
        ('scaler parameters', 'dictionary'),
    ),
    ('scaler-unknown', {'estimator': {'estimator': 'SVC', 'scaler': 'Robust'}}, None, ('unknown scaler', 'choose')),
    (
        'scaler-name-list',
        {'estimator': {'estimator': 'SVC', 'scaler': {'name': ['MaxAbsScaler']}}},
        None,
        ('unknown scaler', 'choose one of'),
    ),
    (
        'scaler-key',
        {'estimator': {'estimator': 'SVC', 'scaler': {'name': 'MaxAbsScaler', 'copy': False}}},
        None,
        ('scaler key', "'parameters'"),
    ),
    (
        'scaler-centres',
        {'estimator': {'estimator': 'SVC', 'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': True}}}},
        None,
        ('with_mean', 'use with_mean=False'),
    ),
    ('kernel-string', {'estimator': {'estimator': 'SVC', 'kernel': 'soap'}}, None, ('kernel must be', "'xi'")),
    ('kernel-xi', {'estimator': {'estimator': 'SVC', 'kernel': {'name': 'soap', 'xi': -1}}}, None, ('xi', 'positive')),
    ('kernel-xi-bool', {'estimator': {'estimator': 'SVC', 'kernel': {'name': 'soap', 'xi': True}}}, None, ('xi',)),
    ('kernel-on-ridge', {'estimator': {'estimator': 'Ridge', 'kernel': {'name': 'soap'}}}, None, ('kernel', 'only to')),
    ('training-string', {'estimator': {'estimator': 'SVC', 'training': 'fast'}}, None, ('training', 'dictionary')),
    (
        'training-mode',
        {'estimator': {'estimator': 'SVC', 'training': {'mode': ['incremental']}}},
        None,
        ('training mode', 'choose one of'),
    ),
    (
        'training-incremental-svc',
        {'estimator': {'estimator': 'SVC', 'training': {'mode': 'incremental'}}},
        None,
        ('SVC cannot be trained incrementally', 'use training mode in_memory'),
    ),
    (
        'training-epochs-float',
        {'estimator': {'estimator': 'SGDClassifier', 'training': {'mode': 'incremental', 'epochs': 2.5}}},
        None,
        ('epochs', 'positive integer'),
    ),
    # target and target_values
    ('target-unknown', {'target': 'magnetism'}, None, ('target', 'choose one of')),
    ('values-mixed', {'target': 'values', 'target_values': ['a', 1] * 4}, None, ('target_values', 'all numbers')),
    ('values-bool', {'target': 'values', 'target_values': [True, False] * 4}, None, ('target_values', 'bool')),
    ('values-none', {'target': 'values', 'target_values': [None] * 8}, None, ('target_values', 'NoneType')),
    ('values-nan', {'target': 'values', 'target_values': [1.0] * 7 + [math.nan]}, None, ('row 7', 'finite')),
    ('values-inf', {'target': 'values', 'target_values': [math.inf] + [1.0] * 7}, None, ('row 0', 'finite')),
    ('values-empty', {'target': 'values', 'target_values': []}, None, ('target_values', 'one value per row')),
    ('values-length', {'target': 'values', 'target_values': [1.0, 2.0]}, None, ('target_values has 2 values',)),
    ('values-without-target', {'target_values': LABELS}, None, ('target_values', 'set target to `values`')),
    ('values-missing', {'target': 'values'}, None, ('target_values', 'one value per embedding')),
    ('n_jobs-zero', {'n_jobs': 0}, None, ('n_jobs', 'non-zero integer')),
    ('n_jobs-bool', {'n_jobs': True}, None, ('n_jobs', 'non-zero integer')),
    ('unknown-input', {'descriptors': SMALL_SOAP}, None, ('unknown input `descriptors`', 'its inputs are')),
    # impurity_info: Rcut bounded by the cluster size, types, ranges
    ('rcut-200', {}, info(Rcut=200.0, Zimp=[26], host=cu_host), ('Rcut', 'MAX_CLUSTER_ATOMS', 'use a smaller Rcut')),
    ('rcut-20', {}, info(Rcut=20.0, Zimp=[26], host=cu_host), ('about 2.85e+03 sites', 'MAX_CLUSTER_ATOMS')),
    ('rcut-string', {}, info(Rcut='4', Zimp=[26]), ("'Rcut'", 'must be a number')),
    ('rcut-bool', {}, info(Rcut=True, Zimp=[26]), ("'Rcut'", 'must be a number')),
    ('rcut-negative', {}, info(Rcut=-1.0, Zimp=[26]), ("'Rcut'", 'positive radius')),
    ('rcut-inf', {}, info(Rcut=math.inf, Zimp=[26]), ("'Rcut'", 'finite number')),
    ('rcut-missing', {}, info(Zimp=[26]), ("'Rcut'", "'imp_cls'")),
    ('zimp-missing', {}, info(Rcut=4.0), ("'Zimp'", 'impurity atomic numbers')),
    ('zimp-symbol', {}, info(Rcut=4.0, Zimp='Fe'), ("'Zimp'", 'atomic number')),
    ('zimp-too-large', {}, info(Rcut=4.0, Zimp=[200]), ("'Zimp'", 'between 0 and 118')),
    ('ilayer-float', {}, info(Rcut=4.0, Zimp=[26], ilayer_center=0.5), ("'ilayer_center'", 'integer >= 0')),
    ('ilayer-negative', {}, info(Rcut=4.0, Zimp=[26], ilayer_center=-1), ("'ilayer_center'", 'integer >= 0')),
    ('ilayer-outside', {}, info(Rcut=4.0, Zimp=[26], ilayer_center=9), ("'ilayer_center' is 9", 'sites (0 to')),
    ('hcut-string', {}, info(Rcut=4.0, Zimp=[26], hcut='x'), ("'hcut'", 'must be a number')),
    (
        'cylinder-zero-axis',
        {},
        info(Rcut=4.0, Zimp=[26], hcut=4.0, cylinder_orient=[0, 0, 0]),
        ("'cylinder_orient'", 'non-zero'),
    ),
    (
        'cylinder-search',
        {},
        info(Rcut=12.0, Zimp=[26], hcut=2.0, host=cu_host),
        ('MAX_CYLINDER_SEARCH_SITES', 'smaller Rcut or hcut'),
    ),
    ('dilute-host-search', {}, info(Rcut=10.0, Zimp=[26], host=sparse_host), ('MAX_SEARCH_SITES', 'fewer sites')),
    ('alloy-host', {}, info(Rcut=3.0, Zimp=[26], host=alloy_host), ('CPA/VCA', 'Fix or leave out')),
    (
        'imp_cls-too-many-rows',
        {},
        info(imp_cls=[[0, 0, 0, 1, 29, 0]] * (MAX_CLUSTER_ATOMS + 1), Zimp=[26]),
        ("'imp_cls'", 'MAX_CLUSTER_ATOMS', 'smaller cluster'),
    ),
]


@pytest.fixture(scope='module')
def clusters_pk(embedding_pks) -> int:
    """The clusters of the eight embeddings, for the work chain given ready clusters."""
    return clusters.build_impurity_clusters([(orm.load_node(h), orm.load_node(i)) for h, i in embedding_pks]).pk


def assert_refused(make_builder: t.Callable[[], t.Any], words: t.Iterable[str]) -> None:
    """Making the builder or running it raises ValueError with all ``words`` in the message, and stores nothing."""
    n_nodes = count_nodes()
    with pytest.raises(ValueError) as raised:  # noqa: PT011 (the words are checked below)
        run_get_node(make_builder())
    message = str(raised.value)
    for word in words:
        assert word in message, message
    assert count_nodes() == n_nodes


@pytest.mark.parametrize(
    ('source', 'case'),
    [
        pytest.param(source, case[1:], id=f'{source}-{case[0]}')
        for case in WORKCHAIN_CASES
        for source in ('embeddings', 'clusters')
        if source == 'embeddings' or case[2] is None
    ],
)
def test_work_chain_refuses_before_storing(embeddings, clusters_pk, source, case):
    """Each bad input raises at submission (or on the builder), with a message naming the input and the fix; no node
    is stored. Settings are checked alike whether the work chain is given embeddings or ready clusters."""
    inputs, replace, words = case

    def make_builder():
        if source == 'clusters':
            return ImpurityLearningWorkChain.get_builder_from_clusters(orm.load_node(clusters_pk), **inputs)
        pairs = list(embeddings)
        if replace is not None:
            host, content = replace()
            pairs[1] = (host or pairs[1][0], orm.Dict(content))
        return ImpurityLearningWorkChain.get_builder_from_embeddings(pairs, **inputs)

    assert_refused(make_builder, words)


def _with(edit: t.Callable[[t.Any, t.Any], None]) -> t.Callable[[list, ImpurityClusters], t.Any]:
    """A builder from the embeddings, changed by ``edit(builder, clusters)``."""

    def make(embeddings: list, ready: ImpurityClusters) -> t.Any:
        builder = ImpurityLearningWorkChain.get_builder_from_embeddings(embeddings)
        edit(builder, ready)
        return builder

    return make


def _too_large_in_alat(builder: t.Any, _: t.Any) -> None:
    builder.embeddings.rcut_units = {'e000001': orm.Str('alat')}
    builder.embeddings.impurity_infos['e000001'] = orm.Dict({'Rcut': 20.0, 'Zimp': [26]})  # 20 alat: ~ 50 Angstrom


def _clusters_of_wrong_type(embeddings: list, ready: ImpurityClusters) -> t.Any:
    builder = ImpurityLearningWorkChain.get_builder()
    builder.clusters = cu_host()
    return builder


SOURCE_CASES = [
    (
        'rcut-unit-bohr',
        _with(lambda b, _: setattr(b.embeddings, 'rcut_units', {'e000001': orm.Str('bohr')})),
        ('rcut_units', "must be one of ['angstrom', 'alat']"),
    ),
    (
        'rcut-unit-of-no-embedding',
        _with(lambda b, _: setattr(b.embeddings, 'rcut_units', {'e000099': orm.Str('alat')})),
        ('rcut_units has keys that are not embeddings', 'e000099'),
    ),
    ('rcut-alat-too-large', _with(_too_large_in_alat), ('Rcut', '20 (alat)', 'MAX_CLUSTER_ATOMS')),
    ('both-sources', _with(lambda b, ready: setattr(b, 'clusters', ready)), ('either `embeddings`', 'not both')),
    ('neither-source', lambda embeddings, ready: ImpurityLearningWorkChain.get_builder(), ('either `embeddings`',)),
    ('clusters-wrong-type', _clusters_of_wrong_type, ('clusters', 'ImpurityClusters')),
    ('host_of-missing', _with(lambda b, _: b.embeddings.pop('host_of')), ('embeddings.host_of is missing',)),
    (
        'host_of-other-keys',
        _with(lambda b, _: setattr(b.embeddings, 'host_of', orm.Dict({'e000000': 'host_0000'}))),
        ('host_of and embeddings.impurity_infos must have the same keys',),
    ),
    (
        'host_of-unknown-host',
        _with(
            lambda b, _: setattr(
                b.embeddings, 'host_of', orm.Dict({**b.embeddings.host_of.get_dict(), 'e000000': 'host_9999'})
            )
        ),
        ('names hosts that are not in embeddings.hosts', 'host_9999'),
    ),
    (
        'unused-host',
        _with(lambda b, _: b.embeddings.hosts.__setitem__('host_9999', cu_host())),
        ("embeddings.hosts ['host_9999'] are the host of no embedding", 'leave them out'),
    ),
]


@pytest.mark.parametrize(('make', 'words'), [pytest.param(m, w, id=name) for name, m, w in SOURCE_CASES])
def test_work_chain_refuses_bad_sources(embeddings, clusters_pk, make, words):
    """Embeddings whose parts do not fit together, both sources or neither: refused with nothing stored."""
    ready = orm.load_node(clusters_pk)
    assert_refused(lambda: make(embeddings, ready), words)


# -- the cluster-size limit ----------------------------------------------------------------------------------------


def test_cluster_size_estimate_is_close_and_refuses_before_the_search():
    """The density estimate is within 10 per cent for a cluster of a thousand sites; Rcut 200 is refused at once."""
    host = cu_host()
    rcut = 14.0
    size = estimate_cluster_size(host, parse_impurity_info({'Rcut': rcut, 'Zimp': 26}))
    n_atoms = len(impurity_cluster(host, {'Rcut': rcut, 'Zimp': 26}))
    assert abs(size.n_sites - n_atoms) / n_atoms < 0.1
    with pytest.raises(ClusterTooLargeError, match='MAX_CLUSTER_ATOMS'):
        check_embedding(host, {'Rcut': 200.0, 'Zimp': 26})
    # The largest cluster allowed stays within the neighbour search limit in primitive and conventional cells.
    from ase.build import bulk

    for atoms in (bulk('Cu', 'fcc', a=CU_A), bulk('Cu', 'fcc', a=CU_A, cubic=True), bulk('Fe', 'bcc', a=2.87)):
        structure = orm.StructureData(ase=atoms)
        volume_per_site = atoms.get_volume() / len(atoms)
        radius = (3 * MAX_CLUSTER_ATOMS * volume_per_site / (4 * np.pi)) ** (1 / 3) * 0.99
        size = check_embedding_size(structure, radius)
        assert size.n_search_sites <= MAX_SEARCH_SITES
    assert MAX_CYLINDER_SEARCH_SITES < MAX_SEARCH_SITES


def check_embedding_size(host: orm.StructureData, rcut: float):
    info = check_embedding(host, {'Rcut': rcut, 'Zimp': 26})
    return estimate_cluster_size(host, info)


# -- calcfunctions called directly: exit code named after the problem ----------------------------------------------


def array_node(**arrays: t.Any) -> orm.ArrayData:
    node = orm.ArrayData()
    for name, values in arrays.items():
        node.set_array(name, np.asarray(values))
    return node


@pytest.fixture(scope='module')
def features_pk() -> int:
    matrix = scipy.sparse.random_array((8, 12), density=0.5, rng=np.random.default_rng(1), format='csr')
    return SparseFeatureMatrix(matrix, descriptor={'name': 'soap'}).store().pk


@pytest.fixture
def features(features_pk) -> SparseFeatureMatrix:
    return orm.load_node(features_pk)


GOOD_SPLIT = {'train': np.arange(6), 'test': np.array([6, 7])}
GOOD_TARGETS = {'targets': np.array(LABELS)}
SVC = {'estimator': 'SVC', 'parameters': {'kernel': 'linear'}}


def corrupted_features(tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch) -> SparseFeatureMatrix:
    """A stored matrix whose file is not HDF5 (stored as an archive import does: without the node's validation)."""
    matrix = scipy.sparse.random_array((8, 12), density=0.5, rng=np.random.default_rng(2), format='csr')
    node = SparseFeatureMatrix(matrix, descriptor={'name': 'soap'})
    path = tmp_path / 'junk.h5'
    path.write_bytes(b'not an HDF5 file' * 100)
    node.base.repository.put_object_from_file(str(path), SparseFeatureMatrix.FILENAME)
    with monkeypatch.context() as patch:
        patch.setattr(SparseFeatureMatrix, '_validate', orm.Data._validate)
        return node.store()


TRAIN_CASES = [
    ('no-train-array', {'targets': GOOD_TARGETS, 'split': {'rows': np.arange(6)}}, 'invalid_split', 'split_rows'),
    ('float-rows', {'targets': GOOD_TARGETS, 'split': {'train': np.arange(6) + 0.5}}, 'invalid_split', 'integer'),
    ('2d-rows', {'targets': GOOD_TARGETS, 'split': {'train': np.zeros((2, 2), int)}}, 'invalid_split', 'one-dim'),
    ('out-of-range', {'targets': GOOD_TARGETS, 'split': {'train': [0, 1, 8]}}, 'split_out_of_range', '8 rows'),
    ('negative-row', {'targets': GOOD_TARGETS, 'split': {'train': [-1, 1, 2]}}, 'split_out_of_range', 'row -1'),
    ('duplicate-row', {'targets': GOOD_TARGETS, 'split': {'train': [0, 0, 1, 2]}}, 'invalid_split', 'more than once'),
    ('empty-train', {'targets': GOOD_TARGETS, 'split': {'train': np.array([], int)}}, 'invalid_split', 'no train'),
    ('overlap', {'targets': GOOD_TARGETS, 'split': {'train': [0, 1, 2], 'test': [2, 3]}}, 'invalid_split', 'both'),
    ('no-targets-array', {'targets': {'labels': LABELS}, 'split': GOOD_SPLIT}, 'invalid_targets', 'no array'),
    ('2d-targets', {'targets': {'targets': np.zeros((8, 2))}, 'split': GOOD_SPLIT}, 'invalid_targets', 'one-dim'),
    (
        'nan-targets',
        {'targets': {'targets': [1.0, np.nan] * 4}, 'split': GOOD_SPLIT, 'estimator': {'estimator': 'Ridge'}},
        'non_finite_targets',
        'row 1',
    ),
    ('short-targets', {'targets': {'targets': LABELS[:4]}, 'split': GOOD_SPLIT}, 'targets_mismatch', '4 entries'),
    (
        'parameters-list',
        {'targets': GOOD_TARGETS, 'split': GOOD_SPLIT, 'estimator': {'estimator': 'SVC', 'parameters': [1, 2]}},
        'invalid_estimator',
        'dictionary',
    ),
    (
        'scaler-parameters-list',
        {
            'targets': GOOD_TARGETS,
            'split': GOOD_SPLIT,
            'estimator': {'estimator': 'SVC', 'scaler': {'name': 'MaxAbsScaler', 'parameters': [1]}},
        },
        'invalid_estimator',
        'scaler parameters',
    ),
    (
        'one-class',
        {'targets': {'targets': ['a'] * 8}, 'split': GOOD_SPLIT},
        'fit_failed',
        'SVC',
    ),
]


@pytest.mark.parametrize(('inputs', 'name', 'words'), [pytest.param(i, n, w, id=case) for case, i, n, w in TRAIN_CASES])
def test_train_model_exit_codes(features, inputs, name, words):
    _, node = train.train_model.run_get_node(
        features,
        array_node(**inputs['targets']),
        array_node(**inputs['split']),
        orm.Dict(inputs.get('estimator', SVC)),
    )
    assert_failed_with(node, train.EXIT_CODES, name, words)


def test_train_model_corrupted_features(tmp_path, monkeypatch):
    node = corrupted_features(tmp_path, monkeypatch)
    _, process = train.train_model.run_get_node(
        node, array_node(**GOOD_TARGETS), array_node(**GOOD_SPLIT), orm.Dict(SVC)
    )
    assert_failed_with(process, train.EXIT_CODES, 'corrupted_features', str(node.pk))


def assert_failed_with(node: orm.ProcessNode, exit_codes: dict, name: str, words: str) -> None:
    """The process failed with the exit code ``name``, its message holds ``words``, and it created nothing."""
    assert node.is_finished, node.process_state
    assert not node.is_finished_ok
    assert node.exit_status == exit_codes[name].status, (node.exit_status, node.exit_message)
    assert words in node.exit_message, node.exit_message
    assert not node.base.links.get_outgoing(link_type=LinkType.CREATE).all()


SPLIT_CASES = [
    ('seed-negative', {'seed': -1}, LABELS, 'invalid_seed', '2**32 - 1'),
    ('seed-too-large', {'seed': 2**33}, LABELS, 'invalid_seed', '2**32 - 1'),
    ('fraction-above-one', {'test_fraction': 1.5}, LABELS, 'invalid_fraction', 'strictly between 0 and 1'),
    ('fraction-negative', {'test_fraction': -0.1}, LABELS, 'invalid_fraction', 'strictly between 0 and 1'),
    ('one-row', {}, ['a'], 'too_few_rows', 'at least 2 rows'),
    ('all-test', {'test_fraction': 0.95, 'stratify': False}, LABELS, 'empty_side', 'lower test_fraction'),
    ('singleton-class', {}, ['a', 'a', 'a', 'b'], 'cannot_stratify', 'set stratify to false'),
    ('test-side-too-small', {'test_fraction': 0.1}, ['a', 'b', 'c'] * 4, 'cannot_stratify', '3 classes'),
]


@pytest.mark.parametrize(
    ('inputs', 'labels', 'name', 'words'), [pytest.param(i, la, n, w, id=c) for c, i, la, n, w in SPLIT_CASES]
)
def test_split_rows_exit_codes(inputs, labels, name, words):
    _, node = split.split_rows.run_get_node(array_node(targets=labels), **inputs)
    assert_failed_with(node, split.EXIT_CODES, name, words)


@pytest.mark.parametrize(
    ('targets', 'groups', 'inputs', 'name', 'words'),
    [
        pytest.param({'labels': LABELS}, None, {}, 'invalid_targets', 'no array `targets`', id='no-targets-array'),
        pytest.param(GOOD_TARGETS, {'hosts': LABELS}, {}, 'invalid_groups', 'no array `groups`', id='no-groups'),
        pytest.param(GOOD_TARGETS, {'groups': ['x'] * 8}, {}, 'too_few_groups', 'two distinct', id='one-group'),
        pytest.param(
            GOOD_TARGETS, {'groups': ['x', 'y'] * 4}, {'test_fraction': 0.9}, 'empty_side', 'all 2 groups', id='all'
        ),
        pytest.param(GOOD_TARGETS, {'groups': ['x', 'y']}, {}, 'groups_mismatch', '2 entries', id='misaligned'),
    ],
)
def test_split_rows_exit_codes_of_arrays(targets, groups, inputs, name, words):
    extra = {'groups': array_node(**groups)} if groups else {}
    _, node = split.split_rows.run_get_node(array_node(**targets), **inputs, **extra)
    assert_failed_with(node, split.EXIT_CODES, name, words)


def test_split_rules_are_shared_with_the_work_chain():
    """The work chain's validator and split_rows apply one function: the same settings give the same message."""
    bad = {'seed': 'x'}
    with pytest.raises(split.SplitSettingsError, match='seed must be an integer') as raised:
        split.check_split_settings(bad)
    validator = ImpurityLearningWorkChain.spec().inputs['split'].validator
    assert validator(orm.Dict(bad), None) == str(raised.value)


@pytest.mark.parametrize(
    ('values', 'name', 'words'),
    [
        pytest.param([], 'empty_targets', 'one value per row', id='empty'),
        pytest.param(['a', 1], 'invalid_values', 'all numbers', id='mixed'),
        pytest.param([True, False], 'invalid_values', 'bool', id='bools'),
        pytest.param([None, None], 'invalid_values', 'NoneType', id='none'),
        pytest.param([[1.0], [2.0]], 'invalid_values', 'list', id='nested'),
    ],
)
def test_targets_from_values_exit_codes(values, name, words):
    _, node = targets.targets_from_values.run_get_node(orm.List(values))
    assert_failed_with(node, targets.EXIT_CODES, name, words)


def test_non_finite_values_rule():
    """NaN cannot even be stored in a List: the rule is checked on the plain values (the work chain does so)."""
    for values, row in (([1.0, math.nan], 1), ([math.inf, 2.0], 0), ([10**400, 1], 0)):
        with pytest.raises(targets.TargetValuesError, match=f'row {row}') as raised:
            targets.check_target_values(values)
        assert raised.value.name == 'non_finite_values'


def cu_fe_cluster() -> ase.Atoms:
    return ase.Atoms('CuFe', positions=[[0, 0, 0], [2.5, 0, 0]])


def clusters_without_hosts() -> ImpurityClusters:
    """One Cu-Fe cluster made by hand, without the host crystal it came from."""
    return ImpurityClusters([cu_fe_cluster()], keys=['CuFe'])


def clusters_in(host: HostCrystal) -> ImpurityClusters:
    """One Fe impurity atom on site 1 of ``host``."""
    impurity = ase.Atoms('Fe', positions=[[0, 0, 0]])
    impurity.set_tags([1])
    impurity.new_array('host_site', np.array([1]), int)
    return ImpurityClusters([impurity], keys=['X:Fe'], hosts=[host], host_of=[0])


def vacuum_crystal() -> HostCrystal:
    return HostCrystal(
        uuid=None, formula='X', cell=np.eye(3) * 3.0, pbc=(True, True, True), positions=[[0, 0, 0]], numbers=[0]
    )


@pytest.mark.parametrize(
    ('make', 'name', 'words'),
    [
        pytest.param(
            lambda: {'clusters': clusters_without_hosts()}, 'no_hosts', 'records no host crystal', id='no-hosts'
        ),
        pytest.param(
            lambda: {'clusters': clusters_in(HostCrystal.from_structure(cu_host())), 'symprec': orm.Float(-1.0)},
            'invalid_symprec',
            'positive finite',
            id='symprec-negative',
        ),
        pytest.param(
            lambda: {'clusters': clusters_in(vacuum_crystal())}, 'unclassifiable_host', 'no atoms', id='vacuum-host'
        ),
    ],
)
def test_host_lattice_targets_exit_codes(make, name, words):
    _, node = targets.host_lattice_targets.run_get_node(**make())
    assert_failed_with(node, targets.EXIT_CODES, name, words)


@pytest.mark.parametrize(
    ('structure', 'symprec', 'name', 'words'),
    [
        pytest.param(cu_host, 0.0, 'invalid_symprec', 'positive finite', id='symprec-zero'),
        pytest.param(vacuum_host, 1e-3, 'unclassifiable_structure', 'no atoms', id='vacuum'),
    ],
)
def test_host_lattice_type_exit_codes(structure, symprec, name, words):
    _, node = lattice.host_lattice_type.run_get_node(structure(), orm.Float(symprec))
    assert_failed_with(node, lattice.EXIT_CODES, name, words)


FEATURIZE_CASES = [
    # The bug report: bad DScribe parameters gave 341 (species outside the list); they are 340 invalid_descriptor.
    ('n_max-zero', {**SMALL_SOAP, 'n_max': 0}, 'invalid_descriptor', 'n_max'),
    ('r_cut-negative', {**SMALL_SOAP, 'r_cut': -1}, 'invalid_descriptor', 'r_cut'),
    ('n_max-float', {**SMALL_SOAP, 'n_max': 2.5}, 'invalid_descriptor', 'n_max'),
    ('sigma-negative', {**SMALL_SOAP, 'sigma': -1.0}, 'invalid_descriptor', 'sigma'),
    ('species-string', {**SMALL_SOAP, 'species': 'Cu'}, 'invalid_descriptor', 'species'),
    ('unknown-name', {'name': 'acsf'}, 'invalid_descriptor', 'registered descriptors'),
    ('species-outside', {**SMALL_SOAP, 'species': ['Cu']}, 'species_outside_list', 'row 0, key `CuFe`, CuFe'),
]


@pytest.mark.parametrize(
    ('descriptor', 'name', 'words'), [pytest.param(d, n, w, id=c) for c, d, n, w in FEATURIZE_CASES]
)
def test_featurize_exit_codes(descriptor, name, words):
    _, node = featurize.featurize.run_get_node(clusters=clusters_without_hosts(), descriptor=orm.Dict(descriptor))
    assert_failed_with(node, featurize.EXIT_CODES, name, words)


# -- cluster extraction: refused by build_impurity_clusters before anything is stored, or by the process -----------


@pytest.mark.parametrize(
    ('make', 'error', 'words'),
    [
        pytest.param(lambda pairs: [], ValueError, 'no embeddings given', id='no-embeddings'),
        pytest.param(
            lambda pairs: [pairs[0], (pairs[1][1], pairs[1][0])], TypeError, '(StructureData, Dict) pair', id='swapped'
        ),
        pytest.param(
            lambda pairs: [pairs[0], (cu_host(), orm.Dict({'Rcut': 200.0, 'Zimp': [26]}))],
            ClusterTooLargeError,
            'embedding e000001',
            id='rcut-200',
        ),
        pytest.param(
            lambda pairs: [pairs[0], (pairs[1][0], orm.Dict({'Rcut': 4.0}))], ValueError, "'Zimp'", id='no-zimp'
        ),
        pytest.param(
            lambda pairs: [pairs[0], (alloy_host(), orm.Dict({'Rcut': 3.0, 'Zimp': [26]}))],
            ValueError,
            'CPA/VCA',
            id='alloy-host',
        ),
    ],
)
def test_build_impurity_clusters_refuses_before_storing(embeddings, make, error, words):
    """A bad embedding raises before any node is stored, naming the embedding (its key) and the problem."""
    n_nodes = count_nodes()
    with pytest.raises(error) as raised:
        clusters.build_impurity_clusters(make(embeddings))
    assert words in str(raised.value)
    assert count_nodes() == n_nodes


def one_embedding(content: dict[str, t.Any], unit: str | None = None, host: t.Callable = cu_host) -> dict[str, t.Any]:
    inputs = clusters.embedding_inputs([clusters.embedding_key(0)], [host()], [orm.Dict(content)])
    if unit is not None:
        inputs['rcut_units'] = {clusters.embedding_key(0): orm.Str(unit)}
    return inputs


@pytest.mark.parametrize(
    ('make', 'name', 'words'),
    [
        pytest.param(
            lambda: one_embedding({'Rcut': 200.0, 'Zimp': 26}),
            'cluster_too_large',
            'embedding e000000 asks for too large a cluster',
            id='rcut-200',
        ),
        pytest.param(lambda: one_embedding({'Rcut': 4.0}), 'invalid_embedding', "'Zimp'", id='no-zimp'),
        pytest.param(
            lambda: one_embedding({'Rcut': 4.0, 'Zimp': 26}, unit='bohr'),
            'invalid_embedding',
            "'angstrom', 'alat'",
            id='unit',
        ),
        pytest.param(
            lambda: one_embedding({'Rcut': 'big', 'Zimp': 26}),
            'invalid_embedding',
            'must be a number',
            id='rcut-string',
        ),
        pytest.param(
            lambda: one_embedding({'Rcut': 3.0, 'Zimp': 26}, host=alloy_host),
            'invalid_embedding',
            'CPA/VCA',
            id='alloy-host',
        ),
        pytest.param(
            lambda: {'hosts': {'h': orm.Int(1)}, 'impurity_infos': {'a': orm.Dict({'Rcut': 3.0, 'Zimp': 26})}},
            'invalid_inputs',
            'not StructureData',
            id='host-int',
        ),
        pytest.param(
            lambda: {'hosts': cu_host(), 'impurity_infos': {'a': orm.Dict({'Rcut': 3.0, 'Zimp': 26})}},
            'invalid_inputs',
            '`hosts` is a single StructureData, not a namespace',
            id='hosts-not-a-namespace',
        ),
        pytest.param(
            lambda: {'hosts': {'h': cu_host()}, 'host_of': orm.Dict({})},
            'invalid_inputs',
            'no impurity_infos',
            id='no-infos',
        ),
        pytest.param(
            lambda: {'hosts': {'h': cu_host()}, 'impurity_infos': {'a': orm.Dict({'Rcut': 3.0, 'Zimp': 26})}},
            'invalid_inputs',
            'host_of is missing',
            id='no-host_of',
        ),
        pytest.param(
            lambda: {**one_embedding({'Rcut': 3.0, 'Zimp': 26}), 'host_of': orm.Dict({'e000000': ['host_0000']})},
            'invalid_inputs',
            'strings',
            id='host_of-list',
        ),
        pytest.param(
            lambda: {**one_embedding({'Rcut': 3.0, 'Zimp': 26}), 'host_of': orm.Dict({'e000000': 'host_0009'})},
            'invalid_inputs',
            "host keys without a host: ['host_0009']",
            id='host_of-unknown-host',
        ),
        pytest.param(
            lambda: {
                **one_embedding({'Rcut': 3.0, 'Zimp': 26}),
                'hosts': {'host_0000': cu_host(), 'host_0001': cu_host()},
            },
            'invalid_inputs',
            "hosts of no embedding: ['host_0001']",
            id='unused-host',
        ),
        pytest.param(
            lambda: {**one_embedding({'Rcut': 3.0, 'Zimp': 26}), 'rcut_units': {'e000009': orm.Str('alat')}},
            'invalid_inputs',
            "rcut_units of no embedding: ['e000009']",
            id='stray-rcut-unit',
        ),
        pytest.param(
            lambda: {**one_embedding({'Rcut': 3.0, 'Zimp': 26}), 'structures': {'s': cu_host()}},
            'invalid_inputs',
            "unknown input(s) ['structures']",
            id='unknown-input',
        ),
        pytest.param(
            lambda: {
                'hosts': {'h': cu_host()},
                'impurity_infos': {'a': orm.Dict({'Rcut': 300.0, 'Zimp': 26})},
                'host_of': orm.Dict({'a': 'h'}),
            },
            'cluster_too_large',
            'embedding a',
            id='rcut-300',
        ),
    ],
)
def test_extract_impurity_clusters_exit_codes(make, name, words):
    _, node = clusters.extract_impurity_clusters.run_get_node(**make())
    assert_failed_with(node, clusters.EXIT_CODES, name, words)


@pytest.mark.parametrize(
    ('rows', 'words'),
    [
        pytest.param([], 'no rows given', id='empty'),
        pytest.param([0, 1.0], 'integer row indices', id='float'),
        pytest.param([True], 'integer row indices', id='bool'),
        pytest.param([0, 3], 'row 3 is outside 0 to 2', id='out-of-range'),
        pytest.param([-1], 'row -1 is outside', id='negative'),
        pytest.param([1, 0, 1], 'more than once', id='duplicate'),
    ],
)
def test_select_clusters_exit_codes(rows, words):
    three = ImpurityClusters([cu_fe_cluster()] * 3, keys=['a', 'b', 'c'])
    _, node = clusters.select_clusters.run_get_node(three, orm.List(rows))
    assert_failed_with(node, clusters.EXIT_CODES, 'invalid_rows', words)


# -- the rules on their own ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'specification',
    [
        pytest.param({'estimator': 'SVC', 'parameters': {1: 2}}, id='parameter-name-int'),
        pytest.param({'estimator': {'name': 'SVC'}}, id='estimator-dict'),
        pytest.param({'estimator': 'SVC', 'kernel': {'name': 'soap', 'xi': 2, 'gamma': 1}}, id='kernel-extra-key'),
        pytest.param({'estimator': 'SGDRegressor', 'parameters': [1], 'training': {'mode': 'incremental'}}, id='sgd'),
        pytest.param(['SVC'], id='not-a-dictionary'),
    ],
)
def test_estimator_specification_errors_are_clear(specification):
    """Never a raw TypeError or AttributeError: always EstimatorSpecificationError."""
    with pytest.raises(EstimatorSpecificationError):
        build_estimator(specification)


def test_integers_are_integers():
    """n_max=2.5 was truncated to 2, and True counted as 1: both are refused, numpy integers accepted."""
    for bad in (2.5, 2.0, True, '2'):
        with pytest.raises(ValueError, match='n_max must be an integer'):
            get_descriptor({**SMALL_SOAP, 'n_max': bad})
    assert get_descriptor({**SMALL_SOAP, 'n_max': np.int64(3)}).n_max == 3


def test_work_chain_refuses_host_lattice_of_clusters_without_hosts():
    """Clusters made without hosts cannot give the host lattice target: refused at submission, nothing stored."""
    from ase.build import molecule

    clusters = ImpurityClusters([molecule('H2O'), molecule('CO')], keys=['water', 'monoxide']).store()
    assert_refused(
        lambda: ImpurityLearningWorkChain.get_builder_from_clusters(clusters, descriptor=SMALL_SOAP),
        ('records no host crystals', 'host_lattice'),
    )
