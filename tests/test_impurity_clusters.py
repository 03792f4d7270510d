"""Tests for :class:`aiida_mlworkbench.data.ImpurityClusters`: the clusters of a database in one node."""

from __future__ import annotations

import dataclasses
import pathlib
import typing as t

import ase
import h5py
import numpy as np
import pytest
from aiida import orm
from aiida.engine import calcfunction
from aiida.tools.archive import create_archive, import_archive
from ase.build import bulk

from aiida_mlworkbench.data import CorruptedClustersError, HostCrystal, ImpurityClusters
from aiida_mlworkbench.data.impurity_clusters import FILE_DATASETS
from aiida_mlworkbench.kkr.geometry import impurity_cluster

CU_A, FE_A = 3.61, 2.87  # Angstrom, fcc Cu and bcc Fe


@dataclasses.dataclass(frozen=True)
class ClusterSet:
    """Clusters as the extraction makes them, with their keys, hosts and host of each cluster."""

    clusters: list[ase.Atoms]
    keys: list[str]
    hosts: list[HostCrystal]
    host_of: list[int]

    def build(self, **changes: t.Any) -> ImpurityClusters:
        clusters = changes.pop('clusters', self.clusters)
        return ImpurityClusters(
            clusters, **{'keys': self.keys, 'hosts': self.hosts, 'host_of': self.host_of, **changes}
        )


def _cu_with_empty_sphere() -> orm.StructureData:
    """fcc Cu with an empty sphere on the octahedral interstitial site (host site 2)."""
    structure = orm.StructureData(ase=bulk('Cu', 'fcc', a=CU_A))
    structure.append_atom(position=(CU_A / 2, 0.0, 0.0), symbols='X', name='X')
    return structure


@pytest.fixture(scope='module')
def cluster_set() -> ClusterSet:
    """Four clusters from three hosts: an Fe impurity in Cu, a vacancy in Cu (no impurity atom), Cr in bcc Fe and H
    on the empty sphere of Cu (an impurity atom on a host site of atomic number 0)."""
    cu = orm.StructureData(ase=bulk('Cu', 'fcc', a=CU_A))
    fe = orm.StructureData(ase=bulk('Fe', 'bcc', a=FE_A))
    cu_x = _cu_with_empty_sphere()
    embeddings = {
        'Cu:Fe': (cu, {'Zimp': 26, 'Rcut': 2.6, 'ilayer_center': 0}, 0),
        'Cu:vacancy': (cu, {'Zimp': 0, 'Rcut': 2.6, 'ilayer_center': 0}, 0),
        'Fe:Cr': (fe, {'Zimp': 24, 'Rcut': 2.9, 'ilayer_center': 0}, 1),
        'CuX:H': (cu_x, {'Zimp': 1, 'Rcut': 2.6, 'ilayer_center': 1}, 2),
    }
    return ClusterSet(
        clusters=[impurity_cluster(host, info) for host, info, _ in embeddings.values()],
        keys=list(embeddings),
        hosts=[HostCrystal.from_structure(host) for host in (cu, fe, cu_x)],
        host_of=[host_index for _, _, host_index in embeddings.values()],
    )


def assert_same_cluster(actual: ase.Atoms, expected: ase.Atoms) -> None:
    np.testing.assert_array_equal(actual.numbers, expected.numbers)
    np.testing.assert_array_equal(actual.positions, expected.positions)
    np.testing.assert_array_equal(actual.get_tags(), expected.get_tags())
    np.testing.assert_array_equal(actual.arrays['host_site'], expected.arrays['host_site'])
    assert not actual.pbc.any()
    assert not actual.cell.array.any()


def file_bytes(node: ImpurityClusters) -> bytes:
    return node.base.repository.get_object_content(ImpurityClusters.FILENAME, 'rb')


def count_nodes() -> int:
    return orm.QueryBuilder().append(ImpurityClusters).count()


class TestRoundTrip:
    def test_store_and_load_keep_every_cluster(self, cluster_set):
        pk = cluster_set.build().store().pk
        loaded = orm.load_node(pk)
        assert isinstance(loaded, ImpurityClusters)
        assert len(loaded) == loaded.n_clusters == 4
        for row, expected in enumerate(cluster_set.clusters):
            assert_same_cluster(loaded.get_ase(row), expected)
        assert loaded.keys == cluster_set.keys
        assert loaded.species == ['H', 'Cr', 'Fe', 'Cu']
        assert loaded.impurity_species == ['H', 'Cr', 'Fe']
        sizes = [len(atoms) for atoms in cluster_set.clusters]
        assert (loaded.n_atoms_min, loaded.n_atoms_max, loaded.n_atoms_total) == (min(sizes), max(sizes), sum(sizes))
        assert loaded.hosts == [{'uuid': host.uuid, 'formula': host.formula} for host in cluster_set.hosts]
        np.testing.assert_array_equal(loaded.host_of, cluster_set.host_of)
        assert [loaded.get_host(index) for index in range(3)] == cluster_set.hosts
        np.testing.assert_array_equal(loaded.host_formulas(), ['Cu', 'Cu', 'Fe', 'CuX'])
        loaded.verify()

    def test_vacancy_leaves_no_impurity_atom(self, cluster_set):
        node = cluster_set.build().store()
        vacancy = node.get_ase(cluster_set.keys.index('Cu:vacancy'))
        assert set(vacancy.numbers) == {29}
        assert not vacancy.get_tags().any()

    def test_iteration_and_atoms_list(self, cluster_set):
        node = orm.load_node(cluster_set.build().store().pk)
        for atoms, expected in zip(node, cluster_set.clusters, strict=True):
            assert_same_cluster(atoms, expected)
        for atoms, row in zip(node.get_atoms_list([3, 0, 2]), [3, 0, 2], strict=True):
            assert_same_cluster(atoms, cluster_set.clusters[row])
        assert_same_cluster(node.get_ase(-1), cluster_set.clusters[-1])

    def test_returned_clusters_do_not_share_the_stored_arrays(self, cluster_set):
        node = orm.load_node(cluster_set.build().store().pk)
        node.get_ase(0).positions[:] = 99.0
        assert_same_cluster(node.get_ase(0), cluster_set.clusters[0])
        with pytest.raises(ValueError, match='read-only'):
            node.host_of[0] = 2

    @pytest.mark.parametrize('row', [0, 3])
    def test_get_structure_matches_structuredata_from_ase(self, cluster_set, row):
        node = cluster_set.build().store()
        structure = node.get_structure(row)
        expected = orm.StructureData(ase=node.get_ase(row))
        assert not structure.is_stored
        assert structure.pbc == (False, False, False)
        assert np.array(structure.cell).tolist() == [[0.0] * 3] * 3
        assert [kind.get_raw() for kind in structure.kinds] == [kind.get_raw() for kind in expected.kinds]
        assert [site.get_raw() for site in structure.sites] == [site.get_raw() for site in expected.sites]
        tags = node.get_ase(row).get_tags()
        impurity_kinds = {site.kind_name for site, tag in zip(structure.sites, tags, strict=True) if tag}
        assert impurity_kinds == {'Fe1' if row == 0 else 'H1'}

    def test_clusters_without_hosts(self):
        atoms = ase.Atoms('CuFe', positions=[(0, 0, 0), (1.8, 1.8, 0)])
        node = ImpurityClusters([atoms, atoms[:1]]).store()
        assert node.keys == ['0', '1']
        assert node.hosts == []
        np.testing.assert_array_equal(node.host_of, [-1, -1])
        first = node.get_ase(0)
        np.testing.assert_array_equal(first.get_tags(), [0, 0])
        np.testing.assert_array_equal(first.arrays['host_site'], [0, 0])
        assert node.impurity_species == []
        with pytest.raises(ValueError, match='records no hosts'):
            node.host_formulas()
        subset = node.subset([1])
        np.testing.assert_array_equal(subset.host_of, [-1])
        assert subset.hosts == []
        assert subset.get_ase(0).get_chemical_symbols() == ['Cu']

    def test_host_crystal_keeps_empty_spheres(self, cluster_set):
        host = cluster_set.hosts[2]
        np.testing.assert_array_equal(host.numbers, [29, 0])
        atoms = host.get_ase()
        assert atoms.get_chemical_symbols() == ['Cu', 'X']
        assert atoms.pbc.all()
        hydrogen = cluster_set.clusters[3]
        assert atoms.numbers[hydrogen.arrays['host_site'][hydrogen.get_tags() == 1] - 1].tolist() == [0]

    def test_host_with_alloy_site_is_refused(self):
        structure = orm.StructureData(cell=np.eye(3) * CU_A)
        structure.append_atom(position=(0, 0, 0), symbols=('Cu', 'Zn'), weights=(0.7, 0.3), name='CuZn')
        with pytest.raises(ValueError, match='CPA/VCA site'):
            HostCrystal.from_structure(structure)


class TestSubset:
    def test_rows_in_given_order_with_their_keys_and_only_their_hosts(self, cluster_set):
        node = cluster_set.build().store()
        subset = node.subset([3, 1])
        assert not subset.is_stored
        assert subset.keys == ['CuX:H', 'Cu:vacancy']
        for row, original in enumerate([3, 1]):
            assert_same_cluster(subset.get_ase(row), cluster_set.clusters[original])
        assert [subset.get_host(index) for index in range(2)] == [cluster_set.hosts[2], cluster_set.hosts[0]]
        np.testing.assert_array_equal(subset.host_of, [0, 1])
        np.testing.assert_array_equal(subset.host_formulas(), ['CuX', 'Cu'])
        subset.store().verify()

    def test_subset_equals_a_node_built_from_the_same_clusters(self, cluster_set):
        rows = [2, 0]
        built = ImpurityClusters(
            [cluster_set.clusters[row] for row in rows],
            keys=[cluster_set.keys[row] for row in rows],
            hosts=[cluster_set.hosts[1], cluster_set.hosts[0]],
            host_of=[0, 1],
        )
        subset = cluster_set.build().store().subset(rows)
        assert file_bytes(subset) == file_bytes(built)
        assert subset.checksum == built.checksum

    def test_subset_in_a_calcfunction(self, cluster_set):
        """As a process input and output: the subset is linked to the node it was taken from."""

        @calcfunction
        def take_rows(clusters: ImpurityClusters, rows: orm.List) -> ImpurityClusters:
            return clusters.subset(rows.get_list())

        node = cluster_set.build().store()
        result, process = take_rows.run_get_node(node, orm.List([2, 3]))
        assert process.is_finished_ok
        assert result.is_stored
        assert result.keys == ['Fe:Cr', 'CuX:H']
        assert process.base.links.get_incoming().get_node_by_label('clusters').uuid == node.uuid
        result.verify()

    @pytest.mark.parametrize(
        ('rows', 'error', 'message'),
        [
            ([], ValueError, 'no rows given'),
            ([1, 2, 1], ValueError, 'row 1 is given twice'),
            ([0, 4], IndexError, 'row 4 is out of range for 4 clusters'),
            ([-1], IndexError, 'row -1 is out of range'),
            ([0.5], ValueError, 'integer row indices'),
        ],
    )
    def test_invalid_rows(self, cluster_set, rows, error, message):
        with pytest.raises(error, match=message):
            cluster_set.build().subset(rows)


class TestDeterminism:
    def test_equal_content_gives_equal_bytes_checksum_and_hash(self, cluster_set):
        first, second = cluster_set.build(), cluster_set.build()
        assert file_bytes(first) == file_bytes(second)
        assert first.checksum == second.checksum
        assert first.store().base.caching.get_hash() == second.store().base.caching.get_hash()

    @pytest.mark.parametrize(
        'change',
        [
            {'keys': ['Cu:Fe', 'Cu:vacancy', 'Fe:Cr', 'CuX:H2']},
            {'clusters': 'moved'},
            {'hosts': 'other uuid'},
        ],
        ids=['key', 'position', 'host uuid'],
    )
    def test_other_content_gives_other_checksum_and_hash(self, cluster_set, change):
        if change.get('clusters') == 'moved':
            moved = [atoms.copy() for atoms in cluster_set.clusters]
            moved[2].positions[1] += 1e-9
            change = {'clusters': moved}
        elif 'hosts' in change:
            change = {'hosts': [dataclasses.replace(cluster_set.hosts[0], uuid=None), *cluster_set.hosts[1:]]}
        original, other = cluster_set.build(), cluster_set.build(**change)
        assert original.checksum != other.checksum
        assert original.store().base.caching.get_hash() != other.store().base.caching.get_hash()


def _with_row(clusters: list[ase.Atoms], row: int, edit: t.Callable[[ase.Atoms], None]) -> list[ase.Atoms]:
    edited = [atoms.copy() for atoms in clusters]
    edit(edited[row])
    return edited


def _set_array(name: str, index: int, value: t.Any) -> t.Callable[[ase.Atoms], None]:
    def edit(atoms: ase.Atoms) -> None:
        values = atoms.get_tags() if name == 'tags' else atoms.arrays[name]
        values[index] = value
        if name == 'tags':
            atoms.set_tags(values)

    return edit


INVALID_INPUTS: dict[str, tuple[t.Callable[[ClusterSet], dict[str, t.Any]], type[Exception], str]] = {
    'no clusters': (lambda s: {'clusters': [], 'keys': [], 'host_of': []}, ValueError, 'no clusters given'),
    'one Atoms, not a list': (lambda s: {'clusters': s.clusters[0]}, TypeError, r'pass a list of clusters'),
    'not an Atoms': (
        lambda s: {'clusters': [*s.clusters[:3], 'H']},
        TypeError,
        r"cluster 3 \(key 'CuX:H'\) is a str, not an ase.Atoms",
    ),
    'cluster without atoms': (
        lambda s: {'clusters': [*s.clusters[:3], ase.Atoms()]},
        ValueError,
        r"cluster 3 \(key 'CuX:H'\) has no atom",
    ),
    'atomic number 0': (
        lambda s: {'clusters': _with_row(s.clusters, 2, _set_array('numbers', 4, 0))},
        ValueError,
        r"atom 4 of cluster 2 \(key 'Fe:Cr'\) has atomic number 0: atomic numbers are 1 to 118",
    ),
    'non-finite position': (
        lambda s: {'clusters': _with_row(s.clusters, 1, _set_array('positions', 3, np.nan))},
        ValueError,
        r"atom 3 of cluster 1 \(key 'Cu:vacancy'\) has a non-finite position",
    ),
    'periodic cluster': (
        lambda s: {'clusters': _with_row(s.clusters, 0, lambda atoms: atoms.set_pbc(True))},
        ValueError,
        r"cluster 0 \(key 'Cu:Fe'\) is periodic",
    ),
    'tag 2': (
        lambda s: {'clusters': _with_row(s.clusters, 0, _set_array('tags', 0, 2))},
        ValueError,
        r"atom 0 of cluster 0 \(key 'Cu:Fe'\) has the tag 2: tag 1 marks an impurity atom",
    ),
    'duplicate key': (
        lambda s: {'keys': ['a', 'b', 'a', 'c']},
        ValueError,
        r"clusters 0 and 2 both have the key 'a'",
    ),
    'empty key': (lambda s: {'keys': ['a', '', 'b', 'c']}, ValueError, r"the key of cluster 1 is ''"),
    'key not a string': (lambda s: {'keys': ['a', 'b', 3, 'c']}, ValueError, r'the key of cluster 2 is 3'),
    'too few keys': (lambda s: {'keys': ['a', 'b']}, ValueError, r'2 keys for 4 clusters'),
    'hosts without host_of': (lambda s: {'host_of': None}, ValueError, r'hosts are given but not host_of'),
    'host_of without hosts': (lambda s: {'hosts': ()}, ValueError, r'host_of is given without hosts'),
    'host_of out of range': (
        lambda s: {'host_of': [0, 0, 1, 3]},
        ValueError,
        r"cluster 3 \(key 'CuX:H'\) names host 3, but the hosts are 0 to 2",
    ),
    'host_of not an integer': (lambda s: {'host_of': [0, 0, 1.0, 2]}, ValueError, r'host_of of cluster 2'),
    'host_site out of range': (
        lambda s: {'clusters': _with_row(s.clusters, 3, _set_array('host_site', 1, 3))},
        ValueError,
        r"atom 1 of cluster 3 \(key 'CuX:H'\) has host_site 3, but its host 2 has sites 1 to 2",
    ),
    'cluster on the wrong host': (
        lambda s: {'host_of': [0, 0, 0, 2]},
        ValueError,
        r"atom 1 of cluster 2 \(key 'Fe:Cr'\) is a host atom \(tag 0\) with atomic number 26, but host site 1 of "
        r'host 0 holds 29',
    ),
    'no host_site with hosts': (
        lambda s: {'clusters': [*s.clusters[:3], ase.Atoms('H')]},
        ValueError,
        r"cluster 3 \(key 'CuX:H'\) has no host_site array",
    ),
    'host not a HostCrystal': (
        lambda s: {'hosts': [*s.hosts[:2], s.hosts[2].get_ase()]},
        TypeError,
        r'host 2 has the type Atoms, not HostCrystal',
    ),
}


class TestValidation:
    @pytest.mark.parametrize('case', list(INVALID_INPUTS))
    def test_invalid_input_is_refused_before_anything_is_made(self, cluster_set, case):
        changes, error, message = INVALID_INPUTS[case]
        before = count_nodes()
        with pytest.raises(error, match=message):
            cluster_set.build(**changes(cluster_set))
        assert count_nodes() == before

    @pytest.mark.parametrize(
        ('field', 'value', 'message'),
        [
            ('cell', np.eye(2), 'cell must be a 3 x 3 matrix'),
            ('pbc', (1, 1, 1), 'pbc must be three booleans'),
            ('positions', np.full((1, 3), np.inf), 'positions must be an'),
            ('numbers', np.array([119]), 'numbers must lie between 0'),
            ('formula', '', 'formula must be a non-empty string'),
        ],
    )
    def test_invalid_host_crystal(self, cluster_set, field, value, message):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(cluster_set.hosts[0], **{field: value})

    def test_empty_node_cannot_be_stored(self):
        before = count_nodes()
        with pytest.raises(ValueError, match='holds no clusters'):
            ImpurityClusters().store()
        assert count_nodes() == before

    @pytest.mark.parametrize('index', [4, -5, 1.0])
    def test_row_out_of_range(self, cluster_set, index):
        with pytest.raises(IndexError, match='out of range for 4 clusters'):
            cluster_set.build().get_ase(index)


# -- forged files -----------------------------------------------------------------------------------------------

Arrays = dict[str, np.ndarray]


def read_arrays(node: ImpurityClusters) -> Arrays:
    with node.base.repository.open(ImpurityClusters.FILENAME, 'rb') as stream, h5py.File(stream, 'r') as handle:
        return {name: handle[name][()] for name in handle}


@dataclasses.dataclass
class Forgery:
    """A forged cluster file: the valid arrays edited, a dataset written in another way, or raw bytes."""

    name: str
    message: str
    edit: t.Callable[[Arrays], None] = lambda arrays: None
    dataset: t.Callable[[h5py.File, str, np.ndarray, pathlib.Path], None] | None = None
    target: str = 'numbers'
    format_version: int = 1
    raw: bytes | None = None

    def write(self, arrays: Arrays, path: pathlib.Path) -> None:
        if self.raw is not None:
            path.write_bytes(self.raw)
            return
        self.edit(arrays)
        with h5py.File(path, 'w', libver='earliest') as handle:
            handle.attrs['format_version'] = self.format_version
            for name, values in arrays.items():
                if name == self.target and self.dataset is not None:
                    self.dataset(handle, name, values, path.parent)
                else:
                    handle.create_dataset(name, data=values, track_times=False)

    def __str__(self) -> str:
        return self.name


def set_value(name: str, index: t.Any, value: t.Any) -> t.Callable[[Arrays], None]:
    def edit(arrays: Arrays) -> None:
        arrays[name][index] = value

    return edit


def retype(name: str, dtype: str) -> t.Callable[[Arrays], None]:
    return lambda arrays: arrays.__setitem__(name, arrays[name].astype(dtype))


def external(handle: h5py.File, name: str, values: np.ndarray, folder: pathlib.Path) -> None:
    outside = folder / 'outside.bin'
    values.tofile(outside)
    handle.create_dataset(name, shape=values.shape, dtype=values.dtype, external=[(str(outside), 0, values.nbytes)])


def gzip(handle: h5py.File, name: str, values: np.ndarray, folder: pathlib.Path) -> None:
    handle.create_dataset(name, data=values, compression='gzip')


def chunked(handle: h5py.File, name: str, values: np.ndarray, folder: pathlib.Path) -> None:
    handle.create_dataset(name, data=values, chunks=True)


def never_written(handle: h5py.File, name: str, values: np.ndarray, folder: pathlib.Path) -> None:
    """Declared but without storage: HDF5 would return fill values for it, of any size the attributes allow."""
    handle.create_dataset(name, shape=values.shape, dtype=values.dtype)


FORGERIES = [
    Forgery('numbers int64', r"'numbers' has dtype int64, expected int16", edit=retype('numbers', '<i8')),
    Forgery('positions float32', r"'positions' has dtype float32, expected float64", edit=retype('positions', '<f4')),
    Forgery(
        'offsets past the atoms', r'offsets end at \d+, not at the number of atoms', edit=set_value('offsets', -1, 99)
    ),
    Forgery(
        'offsets decreasing', r"offsets decrease at cluster 1 \(key 'Cu:vacancy'\)", edit=set_value('offsets', 2, 1)
    ),
    Forgery('offsets not at 0', r'offsets start at 1, not at 0', edit=set_value('offsets', 0, 1)),
    Forgery(
        'extra dataset',
        r"the file holds \[.*'payload'.*\], expected exactly",
        edit=lambda arrays: arrays.__setitem__('payload', np.arange(3)),
    ),
    Forgery('missing dataset', r'the file holds .* expected exactly', edit=lambda arrays: arrays.pop('impurity')),
    Forgery('external dataset', r"'numbers' is an external dataset", dataset=external),
    Forgery('gzip filter', r"'numbers' goes through the HDF5 filters", dataset=gzip),
    Forgery('chunked layout', r"'positions' has the HDF5 storage layout", dataset=chunked, target='positions'),
    Forgery(
        'never written',
        r"the \d+ bytes of 'positions' are not stored within the file",
        dataset=never_written,
        target='positions',
    ),
    Forgery('format version 2', r'unknown file format version', format_version=2),
    Forgery(
        'atomic number 0',
        r"atom 0 of cluster 0 \(key 'Cu:Fe'\) has atomic number 0",
        edit=set_value('numbers', 0, 0),
    ),
    Forgery(
        'host_of out of range',
        r"cluster 3 \(key 'CuX:H'\) names host 7, but the hosts are 0 to 2",
        edit=set_value('host_of', 3, 7),
    ),
    Forgery(
        'host site out of range',
        r"atom 5 of cluster 0 \(key 'Cu:Fe'\) has host_site 40, but its host 0 has sites 1 to 1",
        edit=set_value('host_sites', 5, 40),
    ),
    Forgery('other positions, same layout', r'content checksum mismatch', edit=set_value('positions', 2, 1.0)),
    Forgery('not HDF5', r'clusters.h5 is not an HDF5 file or is truncated', raw=b'\x89not hdf5\n' * 300),
]


def forged_node(cluster_set: ClusterSet, forgery: Forgery, tmp_path: pathlib.Path) -> ImpurityClusters:
    """An unstored node with the attributes of the valid clusters, whose repository file is the forged one."""
    node = cluster_set.build()
    path = tmp_path / 'forged.h5'
    forgery.write(read_arrays(node), path)
    node.base.repository.put_object_from_file(str(path), ImpurityClusters.FILENAME)
    return node


class TestForgedFiles:
    @pytest.mark.parametrize('forgery', FORGERIES, ids=str)
    def test_forged_file_is_refused(self, cluster_set, forgery, tmp_path):
        node = forged_node(cluster_set, forgery, tmp_path)
        message = rf'ImpurityClusters<unstored> is corrupted or was tampered with: {forgery.message}.*trusted archive'
        for operation in (node.verify, node.get_atoms_list, lambda: node.get_ase(0), lambda: node.subset([0])):
            with pytest.raises(CorruptedClustersError, match=message):
                operation()
        before = count_nodes()
        with pytest.raises(CorruptedClustersError, match=message):
            node.store()
        assert count_nodes() == before

    def test_a_valid_file_written_elsewhere_is_accepted(self, cluster_set, tmp_path):
        """Only the layout matters, not who wrote it: a file of the same arrays with h5py defaults is read."""
        node = forged_node(cluster_set, Forgery('none', ''), tmp_path)
        node.store()
        assert_same_cluster(orm.load_node(node.pk).get_ase(3), cluster_set.clusters[3])

    @pytest.mark.parametrize(
        ('attribute', 'value', 'message'),
        [
            ('species', ['H', 'Cr', 'Fe', 'Cu', 'Au'], r"the attribute 'species' does not match the content"),
            ('n_atoms_max', 99, r"the attribute 'n_atoms_max' does not match the content"),
            ('n_clusters', 3, r'its attributes are inconsistent'),
            ('keys', ['a', 'b', 'c', 'd'], r'content checksum mismatch'),
        ],
    )
    def test_imported_node_with_forged_attributes(self, cluster_set, attribute, value, message, monkeypatch):
        """Stored the way an archive import stores a node, without the node's ``_validate``: reads refuse it."""
        node = cluster_set.build()
        node.base.attributes.set(attribute, value)
        with monkeypatch.context() as patch:
            patch.setattr(ImpurityClusters, '_validate', orm.Data._validate)
            node.store()
        loaded = orm.load_node(node.pk)
        with pytest.raises(CorruptedClustersError, match=rf'ImpurityClusters<{node.pk}> .*{message}'):
            loaded.get_ase(0)
        with pytest.raises(CorruptedClustersError, match=message):
            loaded.verify()


def test_file_layout(cluster_set):
    """Contiguous datasets in a fixed order, no filters: what the reader accepts and what makes equal bytes."""
    node = cluster_set.build()
    with node.base.repository.open(ImpurityClusters.FILENAME, 'rb') as stream, h5py.File(stream, 'r') as handle:
        assert dict(handle.attrs) == {'format_version': 1}
        assert sorted(handle) == sorted(FILE_DATASETS)
        for name, dtype in FILE_DATASETS.items():
            dataset = handle[name]
            assert dataset.dtype == dtype
            assert dataset.chunks is None
            assert dataset.compression is None
        assert handle['host_cells'].shape == (3, 3, 3)


# -- queries and sharing ----------------------------------------------------------------------------------------


def test_query_on_attributes(cluster_set, aiida_profile_clean):
    everything = cluster_set.build().store()
    copper = everything.subset([0, 1]).store()
    hydrogen = everything.subset([3]).store()

    def query(filters: dict[str, t.Any]) -> list[int]:
        builder = orm.QueryBuilder().append(ImpurityClusters, filters=filters, project='id')
        return sorted(builder.all(flat=True))

    assert query({'attributes.n_clusters': {'>': 1}}) == sorted([everything.pk, copper.pk])
    assert query({'attributes.species': {'contains': ['H']}}) == sorted([everything.pk, hydrogen.pk])
    assert query({'attributes.impurity_species': {'contains': ['Fe']}}) == sorted([everything.pk, copper.pk])
    assert query({'attributes.keys': {'contains': ['Cu:vacancy']}}) == sorted([everything.pk, copper.pk])
    assert query({'attributes.n_atoms_max': {'<': 10}}) == [hydrogen.pk]


def test_archive_round_trip(cluster_set, tmp_path, fresh_profile):
    node = cluster_set.build().store()
    content, attributes, uuid = file_bytes(node), node.base.attributes.all, node.uuid
    archive = create_archive([node], filename=tmp_path / 'clusters.aiida')

    with fresh_profile():
        import_archive(archive)
        imported = orm.load_node(uuid)
        assert isinstance(imported, ImpurityClusters)
        assert file_bytes(imported) == content
        assert imported.base.attributes.all == attributes
        imported.verify()
        for atoms, expected in zip(imported, cluster_set.clusters, strict=True):
            assert_same_cluster(atoms, expected)
        assert imported.get_host(2) == cluster_set.hosts[2]


def test_entry_point():
    from aiida.plugins import DataFactory

    assert DataFactory('mlworkbench.impurity_clusters') is ImpurityClusters
