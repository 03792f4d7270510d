"""Impurity clusters: rebuilt as juKKR saw them (checked against its ``scoef`` files), extracted into one
``ImpurityClusters`` node per database with provenance back to the aiida-kkr calculations."""

from __future__ import annotations

import dataclasses
import typing as t

import ase
import numpy as np
import pytest
from aiida import orm
from aiida.common.links import LinkType
from ase.build import bulk
from ase.data import chemical_symbols
from kkr_fixtures import cluster_writers, kkr_archives  # noqa: F401

from aiida_mlworkbench.calcfunctions.clusters import (
    build_impurity_clusters,
    embedding_inputs,
    embedding_key,
    extract_impurity_clusters,
    select_clusters,
)
from aiida_mlworkbench.data import HostCrystal, ImpurityClusters
from aiida_mlworkbench.engine import MANY_INPUTS
from aiida_mlworkbench.kkr import (
    RcutUnit,
    host_alat,
    impurity_cluster,
    resolve_impurity_embeddings,
    scoef_alat,
    scoef_of,
)
from aiida_mlworkbench.kkr.geometry import ClusterTooLargeError, _read_host, reading_hosts
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings

CU_A = 3.61  # Angstrom, fcc Cu
FIRST_TWO_SHELLS_FCC = 1 + 12 + 6
N_SYNTHETIC = MANY_INPUTS + 40  # enough inputs that the extraction links them through aiida_mlworkbench.engine


def _cu_host() -> orm.StructureData:
    return orm.StructureData(ase=bulk('Cu', 'fcc', a=CU_A))


def _pairs(atoms: ase.Atoms) -> list[tuple[int, tuple[float, float, float]]]:
    return sorted((int(z), tuple(np.round(p, 6))) for z, p in zip(atoms.numbers, atoms.positions, strict=True))


def _expected_from_scoef(calculation: orm.CalcJobNode, host: orm.StructureData, impurity_info: dict) -> ase.Atoms:
    """The cluster juKKR used, from the ``scoef`` file: Angstrom, impurities from Zimp, empty spheres left out.

    Empty spheres are told by the host kind of each row's site (a kind with vacancies, ``{H0.00X1.00}``), since the
    files write their atomic number as 1.
    """
    rows = scoef_of(calculation)
    positions = rows[:, :3] * scoef_alat(calculation, host)
    sites = rows[:, 3].astype(int) - 1
    kinds = [host.get_kind(host.sites[site].kind_name) for site in sites]
    numbers = np.array([0 if kind.has_vacancies else rows[index, 4] for index, kind in enumerate(kinds)], dtype=int)
    zimp = impurity_info['Zimp'] if isinstance(impurity_info['Zimp'], list) else [impurity_info['Zimp']]
    for rimp, z in zip(impurity_info.get('Rimp_rel', [[0.0, 0.0, 0.0]]), zimp, strict=True):
        row = np.argmin(np.linalg.norm(positions - np.array(rimp) * host_alat(host), axis=1))
        numbers[row] = int(z)
    keep = numbers > 0
    return ase.Atoms(numbers=numbers[keep], positions=positions[keep])


@pytest.mark.usefixtures('kkr_archives')
def test_clusters_match_the_scoef_files_jukkr_used():
    """Every KkrimpCalculation and GF write-out keeping ``scoef`` gets exactly the cluster in that file."""
    writers = cluster_writers()
    assert len(writers) >= 100

    embedding_of = {
        source.pk: embedding for embedding in resolve_impurity_embeddings(writers) for source in embedding.sources
    }
    checked = {'Bi2Te3 host': 0, 'two impurities (imp_cls)': 0, 'legacy alat Rcut': 0}
    for calculation in writers:
        embedding = embedding_of[calculation.pk]
        info = embedding.impurity_info.get_dict()
        cluster = impurity_cluster(embedding.host, embedding.impurity_info, embedding.rcut_unit)
        expected = _expected_from_scoef(calculation, embedding.host, info)

        assert _pairs(cluster) == _pairs(expected), f'{calculation.process_label}<{calculation.pk}>'
        order = np.lexsort(np.round(expected.positions, 6).T)
        got = np.lexsort(np.round(cluster.positions, 6).T)
        np.testing.assert_allclose(cluster.positions[got], expected.positions[order], atol=1e-6, rtol=0)

        checked['Bi2Te3 host'] += embedding.host.get_formula().startswith('Bi2Te3')
        checked['two impurities (imp_cls)'] += 'imp_cls' in info and len(info['Zimp']) == 2
        checked['legacy alat Rcut'] += embedding.rcut_unit is RcutUnit.ALAT
    assert all(checked.values()), checked


def test_fcc_cluster_two_shells():
    """Primitive fcc Cu with Rcut just beyond a: impurity at the origin, 12 + 6 Cu around it, Angstrom, no pbc."""
    info = {'Rcut': CU_A * 1.01, 'Zimp': [26.0], 'ilayer_center': 0}
    cluster = impurity_cluster(_cu_host(), info)

    assert len(cluster) == FIRST_TWO_SHELLS_FCC
    assert not cluster.pbc.any()
    assert cluster.numbers[0] == 26
    np.testing.assert_allclose(cluster.positions[0], 0.0, atol=1e-12)
    assert list(cluster.get_tags()) == [1] + [0] * 18
    assert set(cluster.numbers[1:]) == {29}
    distances = np.round(np.linalg.norm(cluster.positions, axis=1), 6)
    assert list(np.unique(distances)) == [0.0, round(CU_A / np.sqrt(2), 6), round(CU_A, 6)]
    assert set(cluster.arrays['host_site']) == {1}


def test_zimp_int_list_ase_host_and_alat_unit_agree():
    """Zimp as int or list, the host as ase.Atoms or StructureData, Rcut in alat or Angstrom: the same cluster."""
    host = _cu_host()
    reference = impurity_cluster(host, {'Rcut': 4.0, 'Zimp': [26], 'ilayer_center': 0})
    alat = host_alat(host)
    assert alat == pytest.approx(CU_A / np.sqrt(2))
    variants = [
        impurity_cluster(host, {'Rcut': 4.0, 'Zimp': 26}),
        impurity_cluster(bulk('Cu', 'fcc', a=CU_A), {'Rcut': 4.0, 'Zimp': 26.0}),
        impurity_cluster(host, {'Rcut': 4.0 / alat, 'Zimp': 26}, rcut_unit='alat'),
    ]
    for variant in variants:
        assert _pairs(variant) == _pairs(reference)
    # Read in the wrong unit, the same number gives another cluster: the unit matters.
    assert len(impurity_cluster(host, {'Rcut': 4.0, 'Zimp': 26}, rcut_unit=RcutUnit.ALAT)) > len(reference)


def test_hosts_read_once_in_scope_and_anew_outside():
    """Inside reading_hosts() a host shared by many embeddings is read once, with the same clusters as without; outside
    it, a host changed between two calls gives the cluster of its new geometry."""
    host = _cu_host()
    info = {'Rcut': 4.0, 'Zimp': 26}
    reference = impurity_cluster(host, info)
    with reading_hosts():
        first = impurity_cluster(host, info)
        assert _read_host(host) is _read_host(host)
        second = impurity_cluster(host, {**info, 'Zimp': 28})
    assert _pairs(first) == _pairs(reference)
    assert second.numbers[0] == 28
    assert [pair for pair in _pairs(second) if pair[0] == 29] == [pair for pair in _pairs(reference) if pair[0] == 29]
    assert _read_host(host) is not _read_host(host)
    host.set_cell((np.array(host.cell) * 1.2).tolist())  # the second shell moves beyond Rcut
    assert len(impurity_cluster(host, info)) < len(reference)


def test_empty_spheres_are_left_out_hydrogen_is_kept():
    """Vacuum sites (kind with vacancies, or symbol X) are no atoms; real hydrogen is."""
    atoms = ase.Atoms('CuHX', positions=[[0, 0, 0], [1.8, 0, 0], [0, 1.8, 0]], cell=np.eye(3) * 3.6, pbc=True)
    host = orm.StructureData(ase=atoms)
    cluster = impurity_cluster(host, {'Rcut': 2.0, 'Zimp': 26})
    assert sorted(cluster.numbers) == [1, 1, 26]  # X dropped, both H neighbours (+-x) kept

    vacuum_host = orm.StructureData(cell=atoms.cell.tolist())
    vacuum_host.append_atom(position=(0, 0, 0), symbols='Cu')
    vacuum_host.append_atom(position=(1.8, 0, 0), symbols='H', weights=0.0, mass=1.0, name='HX')
    assert sorted(impurity_cluster(vacuum_host, {'Rcut': 2.0, 'Zimp': 26}).numbers) == [26]
    # An impurity placed on an empty sphere is a real atom.
    assert sorted(impurity_cluster(vacuum_host, {'Rcut': 2.0, 'Zimp': 30, 'ilayer_center': 1}).numbers) == [29, 29, 30]


def _node_count(node_class: type[orm.Node] = orm.Node) -> int:
    return orm.QueryBuilder().append(node_class).count()


def _assert_same_cluster(got: ase.Atoms, expected: ase.Atoms, name: str) -> None:
    """Same atoms in the same order: atomic numbers, positions, impurity tags and host sites."""
    np.testing.assert_array_equal(got.numbers, expected.numbers, err_msg=name)
    np.testing.assert_allclose(got.positions, expected.positions, atol=1e-12, rtol=0, err_msg=name)
    np.testing.assert_array_equal(got.get_tags(), expected.get_tags(), err_msg=name)
    np.testing.assert_array_equal(got.arrays['host_site'], expected.arrays['host_site'], err_msg=name)
    assert not got.pbc.any(), name


def _stored(inputs: dict[str, t.Any]) -> dict[str, t.Any]:
    """Store every input node, so that counting nodes around a process counts only what the process made."""
    for value in inputs.values():
        for node in value.values() if isinstance(value, dict) else [value]:
            if isinstance(node, orm.Node) and not node.is_stored:
                node.store()
    return inputs


# -- Extraction of a whole database: one ImpurityClusters node, rows as impurity_cluster() builds them ---------------


@dataclasses.dataclass
class Database:
    """The embeddings of a database in row order and the ImpurityClusters extracted from them."""

    hosts: list[orm.StructureData]
    impurity_infos: list[orm.Dict]
    rcut_units: list[RcutUnit]
    sources: list[tuple[orm.ProcessNode, ...]]
    clusters: ImpurityClusters

    @property
    def keys(self) -> list[str]:
        return [embedding_key(index) for index in range(len(self.hosts))]


@pytest.fixture(scope='module', params=['synthetic', 'aiida-kkr archives'])
def database(request: pytest.FixtureRequest) -> Database:
    """A synthetic database (as ``create_synthetic_database`` stores it) or every embedding of the real aiida-kkr
    archives (as ``resolve_impurity_embeddings`` finds them, legacy ``alat`` unit included), extracted with
    ``build_impurity_clusters``."""
    if request.param == 'synthetic':
        group = create_synthetic_database(N_SYNTHETIC, seed=3, group_label='test_clusters_synthetic')
        pairs = list(iter_synthetic_embeddings(group))
        clusters = build_impurity_clusters(pairs)
        hosts, impurity_infos = (list(nodes) for nodes in zip(*pairs, strict=True))
        return Database(hosts, impurity_infos, [RcutUnit.ANGSTROM] * len(pairs), [()] * len(pairs), clusters)
    request.getfixturevalue('kkr_archives')
    embeddings = list(resolve_impurity_embeddings(cluster_writers()))
    clusters = build_impurity_clusters(embeddings)
    return Database(
        [embedding.host for embedding in embeddings],
        [embedding.impurity_info for embedding in embeddings],
        [embedding.rcut_unit for embedding in embeddings],
        [embedding.sources for embedding in embeddings],
        clusters,
    )


def test_extraction_rows_are_the_clusters_of_the_embeddings(database):
    """Row i is ``impurity_cluster(host, impurity_info, rcut_unit)`` of embedding i, under its key, in one stored node
    created by one finished extraction."""
    clusters = database.clusters
    assert clusters.is_stored
    assert len(clusters) == len(database.hosts)
    assert clusters.keys == database.keys
    process = clusters.creator
    assert process.process_label == 'extract_impurity_clusters'
    assert process.is_finished_ok
    assert process.base.links.get_outgoing(link_type=LinkType.CREATE).all_link_labels() == ['clusters']

    atoms_list = clusters.get_atoms_list()
    for row, (host, info, unit) in enumerate(
        zip(database.hosts, database.impurity_infos, database.rcut_units, strict=True)
    ):
        _assert_same_cluster(atoms_list[row], impurity_cluster(host, info, unit), f'row {row} ({info.uuid})')
    assert clusters.n_atoms_min == min(len(atoms) for atoms in atoms_list)
    assert clusters.n_atoms_max == max(len(atoms) for atoms in atoms_list)
    impurities = {int(z) for atoms in atoms_list for z in atoms.numbers[atoms.get_tags() == 1]}
    assert clusters.impurity_species == [chemical_symbols[z] for z in sorted(impurities)]


def test_extraction_records_each_host_once(database):
    """``hosts`` lists each distinct host once (UUID and formula), ``host_of`` points each row to its own host, and
    ``get_host`` gives back the host crystal of the StructureData."""
    clusters = database.clusters
    distinct = list({host.uuid: host for host in database.hosts}.values())
    assert [record['uuid'] for record in clusters.hosts] == [host.uuid for host in distinct]
    assert [record['formula'] for record in clusters.hosts] == [host.get_formula('hill_compact') for host in distinct]
    host_uuids = [clusters.hosts[index]['uuid'] for index in clusters.host_of]
    assert host_uuids == [host.uuid for host in database.hosts]
    assert list(clusters.host_formulas()) == [host.get_formula('hill_compact') for host in database.hosts]
    for index, host in enumerate(distinct):
        assert clusters.get_host(index) == HostCrystal.from_structure(host)


def test_extraction_inputs_are_the_nodes_of_the_embeddings(database):
    """The extraction takes every ``impurity_info`` under its key, each distinct host once under a host key that
    ``host_of`` names, and an ``rcut_units`` entry exactly for the embeddings read in ``alat``."""
    inputs = {link.link_label: link.node for link in database.clusters.creator.base.links.get_incoming().all()}
    host_of = inputs['host_of'].get_dict()
    assert sorted(host_of) == database.keys
    for key, host, info, unit in zip(
        database.keys, database.hosts, database.impurity_infos, database.rcut_units, strict=True
    ):
        assert inputs[f'impurity_infos__{key}'].uuid == info.uuid
        assert inputs[f'hosts__{host_of[key]}'].uuid == host.uuid
        if unit is RcutUnit.ALAT:
            assert inputs[f'rcut_units__{key}'].value == 'alat'
        else:
            assert f'rcut_units__{key}' not in inputs
    host_labels = [label for label in inputs if label.startswith('hosts__')]
    assert len(host_labels) == len({host.uuid for host in database.hosts}) == len(set(host_of.values()))
    assert len(inputs) == len(database.keys) + len(host_labels) + 1 + database.rcut_units.count(RcutUnit.ALAT)


@pytest.mark.parametrize('database', ['aiida-kkr archives'], indirect=True)
def test_archives_cover_the_kinds_of_embedding(database):
    """The real archives exercise what the extraction must handle: the legacy ``alat`` Rcut (read as aiida-kkr < 1.0
    read it), explicit two-impurity clusters (``imp_cls``) and a host with empty spheres."""
    assert database.rcut_units.count(RcutUnit.ALAT) >= 1
    assert any('imp_cls' in info.get_dict() for info in database.impurity_infos)
    assert any(0 in HostCrystal.from_structure(host).numbers for host in database.hosts)  # an empty sphere
    assert all(database.sources)


def _impurity_info_of(clusters: ImpurityClusters, key: str) -> orm.Dict:
    """The query a user writes from an ImpurityClusters node (or a subset taken with ``select_clusters``) to the
    ``impurity_info`` of the row with ``key``: the extraction took it under the input link ``impurity_infos__<key>``."""
    query = orm.QueryBuilder()
    query.append(ImpurityClusters, filters={'id': clusters.pk}, tag='clusters')
    extracted = 'clusters'
    if clusters.creator.process_label == 'select_clusters':  # a subset: first back to the clusters it came from
        query.append(orm.CalcFunctionNode, with_outgoing='clusters', tag='selection')
        query.append(ImpurityClusters, with_outgoing='selection', edge_filters={'label': 'clusters'}, tag='source')
        extracted = 'source'
    query.append(orm.CalcFunctionNode, with_outgoing=extracted, tag='extraction')
    query.append(orm.Dict, with_outgoing='extraction', edge_filters={'label': f'impurity_infos__{key}'}, project='*')
    (impurity_info,) = query.all(flat=True)
    return impurity_info


def _kkr_processes_of(impurity_info: orm.Dict) -> tuple[set[int], set[int]]:
    """The pks of the aiida-kkr processes that took ``impurity_info`` as input, and of the impurity calculations that
    ran on the host Green functions those wrote (a ``KkrimpCalculation`` need not take the ``impurity_info`` itself)."""
    direct = orm.QueryBuilder()
    direct.append(orm.Dict, filters={'id': impurity_info.pk}, tag='impurity_info')
    direct.append(
        orm.ProcessNode, with_incoming='impurity_info', filters={'process_type': {'like': 'aiida%kkr%'}}, project='id'
    )

    on_green_functions = orm.QueryBuilder()
    on_green_functions.append(orm.Dict, filters={'id': impurity_info.pk}, tag='impurity_info')
    on_green_functions.append(
        orm.CalcJobNode,
        with_incoming='impurity_info',
        filters={'process_type': 'aiida.calculations:kkr.kkr'},
        tag='gf_writeout',
    )
    on_green_functions.append(orm.RemoteData, with_incoming='gf_writeout', tag='green_functions')
    on_green_functions.append(
        orm.CalcJobNode,
        with_incoming='green_functions',
        edge_filters={'label': {'in': ['host_Greenfunction_folder', 'GFhost_folder']}},
        filters={'process_type': 'aiida.calculations:kkr.kkrimp'},
        project='id',
    )
    return set(direct.all(flat=True)), set(on_green_functions.all(flat=True))


@pytest.mark.parametrize('through', ['extraction', 'select_clusters'])
def test_query_from_clusters_to_the_aiida_kkr_calculations(database, through):
    """From the clusters (or a subset of them), QueryBuilder walks find the ``impurity_info`` of each row key, every
    aiida-kkr process that used it, and the impurity calculations on the Green functions it was written for: together
    the processes the embedding was resolved from."""
    rows = list(range(len(database.keys)))[:: max(1, len(database.keys) // 25)]
    clusters = database.clusters
    if through == 'select_clusters':
        rows = rows[::-1]
        clusters = select_clusters(database.clusters, orm.List(rows))['clusters']
    for row in rows:
        key, info = database.keys[row], database.impurity_infos[row]
        assert key in clusters.keys
        impurity_info = _impurity_info_of(clusters, key)
        assert impurity_info.uuid == info.uuid

        direct, on_green_functions = _kkr_processes_of(impurity_info)
        users = {
            link.node.pk for link in info.base.links.get_outgoing().all() if 'kkr' in (link.node.process_type or '')
        }
        assert direct == users
        assert {source.pk for source in database.sources[row]} <= direct | on_green_functions


# -- The unit of Rcut, the row order -------------------------------------------------------------------------------


def test_rcut_in_alat_is_read_in_alat():
    """An ``rcut_units.<key>`` of ``'alat'`` reads that embedding's Rcut in units of the host's alat (aiida-kkr < 1.0);
    the others stay in Angstrom. Embeddings of one unit share one Str node."""
    host = _cu_host().store()
    alat = host_alat(host)
    keys = ['a', 'b', 'c']
    infos = [orm.Dict({'Rcut': 4.0 / alat, 'Zimp': [26]}), orm.Dict({'Rcut': 4.0, 'Zimp': [26]})]
    infos.append(orm.Dict({'Rcut': 4.0 / alat, 'Zimp': [27]}))
    inputs = embedding_inputs(keys, [host] * 3, infos, ['alat', None, RcutUnit.ALAT])
    assert sorted(inputs['rcut_units']) == ['a', 'c']
    assert inputs['rcut_units']['a'] is inputs['rcut_units']['c']

    clusters = extract_impurity_clusters(**inputs)['clusters']

    for row, (info, unit) in enumerate(zip(infos, ['alat', 'angstrom', 'alat'], strict=True)):
        _assert_same_cluster(clusters.get_ase(row), impurity_cluster(host, info, unit), keys[row])
    assert _pairs(clusters.get_ase(0)) == _pairs(clusters.get_ase(1))  # 4 Angstrom either way
    assert len(impurity_cluster(host, infos[0])) < len(clusters.get_ase(0))  # the same number read in Angstrom


def test_rows_follow_the_sorted_keys():
    """Whatever order the inputs come in, the rows are in sorted key order and ``keys`` names them."""
    hosts = [_cu_host().store(), orm.StructureData(ase=bulk('Fe', 'bcc', a=2.87)).store()]
    keys = ['zinc_in_Fe', 'cobalt_in_Cu', 'nickel_in_Fe']
    infos = [orm.Dict({'Rcut': 3.7, 'Zimp': [z]}).store() for z in (30, 27, 28)]
    chosen = [hosts[1], hosts[0], hosts[1]]

    clusters = extract_impurity_clusters(**embedding_inputs(keys, chosen, infos))['clusters']

    assert clusters.keys == sorted(keys)
    for key, host, info in zip(keys, chosen, infos, strict=True):
        row = clusters.keys.index(key)
        _assert_same_cluster(clusters.get_ase(row), impurity_cluster(host, info), key)
        assert clusters.hosts[clusters.host_of[row]]['uuid'] == host.uuid


# -- Failures: exit codes that name the problem, nothing half stored --------------------------------------------------

#: impurity_info contents that no cluster can be built from, and what the error says.
INVALID_IMPURITY_INFOS = [
    pytest.param({'Rcut': 3.0}, "no 'Zimp'", id='no-Zimp'),
    pytest.param({'Zimp': 26, 'ilayer_center': 0}, "either 'Rcut'", id='no-Rcut'),
    pytest.param({'Rcut': -1.0, 'Zimp': 26}, 'positive radius', id='negative-Rcut'),
    pytest.param({'Rcut': 3.0, 'Zimp': [26, 27]}, "2 'Zimp' value", id='Zimp-without-Rimp_rel'),
    pytest.param({'Rcut': 3.0, 'Zimp': 26, 'ilayer_center': 3}, 'only 1 sites', id='ilayer_center-outside-host'),
    pytest.param({'Rcut': 3.0, 'Zimp': 'Fe'}, 'atomic number', id='Zimp-symbol'),
    pytest.param(
        {'imp_cls': [[0, 0, 0, 1, 29, 0]], 'Zimp': [26, 27], 'Rimp_rel': [[0, 0, 0], [0.5, 0, 0]]},
        'no site of the cluster',
        id='Rimp_rel-outside-imp_cls',
    ),
    pytest.param({'imp_cls': [[0, 0, 0]], 'Zimp': 26}, 'one row', id='imp_cls-short-rows'),
    pytest.param({'Rcut': 50.0, 'Zimp': 26}, 'more than the limit', id='cluster-too-large'),
]
#: Problems only building the cluster finds: build_impurity_clusters cannot refuse them before the extraction runs.
FOUND_WHEN_BUILT = ('no site of the cluster',)


def _embeddings_with(bad_info: dict[str, t.Any]) -> tuple[list[orm.StructureData], list[orm.Dict]]:
    """Three stored embeddings in Cu, Fe and Cu; the second has the ``impurity_info`` ``bad_info``."""
    cu = _cu_host().store()
    hosts = [cu, orm.StructureData(ase=bulk('Fe', 'bcc', a=2.87)).store(), cu]
    infos = [orm.Dict(content).store() for content in ({'Rcut': 3.7, 'Zimp': 26}, bad_info, {'Rcut': 3.7, 'Zimp': 28})]
    return hosts, infos


@pytest.mark.parametrize(('impurity_info', 'message'), INVALID_IMPURITY_INFOS)
def test_invalid_impurity_info(impurity_info, message):
    """``impurity_cluster`` raises; the extraction fails with exit code 300 (301 for too large a cluster) naming the
    key, creates nothing and stays in the graph; ``build_impurity_clusters`` raises before storing anything if the
    embedding can be checked without building its cluster, and otherwise after the failed extraction."""
    hosts, infos = _embeddings_with(impurity_info)
    too_large = 'limit' in message
    error = ClusterTooLargeError if too_large else ValueError
    with pytest.raises(error, match=message):
        impurity_cluster(hosts[1], infos[1])

    keys = [embedding_key(index) for index in range(3)]
    inputs = _stored(embedding_inputs(keys, hosts, infos))
    n_nodes, n_clusters = _node_count(), _node_count(ImpurityClusters)
    outputs, process = extract_impurity_clusters.run_get_node(**inputs)
    assert outputs == {}
    assert process.exit_status == (301 if too_large else 300)
    assert process.exit_message.startswith(
        'impurity embedding e000001 asks for too large a cluster' if too_large else 'invalid impurity embedding e000001'
    )
    assert message in process.exit_message
    assert not process.base.links.get_outgoing().all()
    assert _node_count() == n_nodes + 1  # the failed process, kept in the graph with its exit code
    assert _node_count(ImpurityClusters) == n_clusters
    assert orm.load_node(process.pk).exit_status == process.exit_status

    n_nodes = _node_count()
    if message in FOUND_WHEN_BUILT:
        with pytest.raises(RuntimeError, match=message):
            build_impurity_clusters(list(zip(hosts, infos, strict=True)))
        failed = orm.QueryBuilder().append(orm.CalcFunctionNode, tag='process', project='*')
        failed.order_by({'process': {'id': 'desc'}})
        last = failed.first(flat=True)
        assert (last.process_label, last.exit_status) == ('extract_impurity_clusters', 300)
        assert message in last.exit_message
        assert _node_count() == n_nodes + 2  # the host_of Dict and the failed process
    else:
        with pytest.raises(error, match=message) as raised:
            build_impurity_clusters(list(zip(hosts, infos, strict=True)))
        assert 'embedding e000001' in str(raised.value)
        assert infos[1].uuid in str(raised.value)
        assert _node_count() == n_nodes  # refused before anything was stored
    assert _node_count(ImpurityClusters) == n_clusters


def _alloy_host() -> orm.StructureData:
    host = orm.StructureData(cell=bulk('Cu', 'fcc', a=CU_A).cell[:])
    host.append_atom(position=(0, 0, 0), symbols=('Cu', 'Ni'), weights=(0.5, 0.5), name='CuNi')
    return host


def _set_host_of(inputs: dict[str, t.Any], **changes: str | None) -> None:
    host_of = {**inputs['host_of'].get_dict(), **changes}
    inputs['host_of'] = orm.Dict({key: value for key, value in host_of.items() if value is not None})


#: Ways to spoil the inputs of three good embeddings (keys e000000 to e000002, hosts host_0000 and host_0001), the
#: exit status they give and what its message must name.
INVALID_INPUTS = [
    pytest.param(lambda inputs: _set_host_of(inputs, e000002='host_0007'), 302, 'host_0007', id='missing-host'),
    pytest.param(lambda inputs: _set_host_of(inputs, e000002=None), 302, 'e000002', id='embedding-without-host_of'),
    pytest.param(lambda inputs: inputs['hosts'].update(host_0009=_cu_host()), 302, 'host_0009', id='unused-host'),
    pytest.param(
        lambda inputs: inputs['hosts'].update(host_0001=orm.Dict({'cell': 1})),
        302,
        'host_0001',
        id='host-not-structure',
    ),
    pytest.param(
        lambda inputs: inputs['impurity_infos'].update(e000001=_cu_host()), 302, 'e000001', id='info-not-dict'
    ),
    pytest.param(
        lambda inputs: inputs.update(rcut_units={'e000009': orm.Str('alat')}), 302, 'e000009', id='unit-of-no-key'
    ),
    pytest.param(lambda inputs: inputs.update(structures={'e000000': _cu_host()}), 302, 'structures', id='unknown'),
    pytest.param(lambda inputs: inputs.pop('host_of'), 302, 'host_of', id='no-host_of'),
    pytest.param(
        lambda inputs: inputs.update(rcut_units={'e000001': orm.Str('bohr')}), 300, 'e000001', id='unknown-unit'
    ),
    pytest.param(lambda inputs: inputs['hosts'].update(host_0001=_alloy_host()), 300, 'host_0001', id='alloy-host'),
]


@pytest.mark.parametrize(('spoil', 'exit_status', 'named'), INVALID_INPUTS)
def test_invalid_inputs(spoil, exit_status, named):
    """Wrong inputs give their exit code with a message that names the key; the process creates nothing and stays in
    the graph."""
    hosts, infos = _embeddings_with({'Rcut': 3.7, 'Zimp': 27})
    inputs = embedding_inputs([embedding_key(index) for index in range(3)], hosts, infos)
    spoil(inputs)
    _stored(inputs)
    n_nodes, n_clusters = _node_count(), _node_count(ImpurityClusters)

    outputs, process = extract_impurity_clusters.run_get_node(**inputs)

    assert outputs == {}
    assert process.exit_status == exit_status, process.exit_message
    assert named in process.exit_message
    assert not process.base.links.get_outgoing().all()
    assert _node_count() == n_nodes + 1
    assert _node_count(ImpurityClusters) == n_clusters
    assert orm.load_node(process.pk).is_finished


# -- select_clusters ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def small_clusters() -> tuple[ImpurityClusters, list[tuple[orm.StructureData, orm.Dict]]]:
    """Five embeddings in fcc Cu and bcc Fe (alternating), extracted with ``build_impurity_clusters``."""
    hosts = [_cu_host().store(), orm.StructureData(ase=bulk('Fe', 'bcc', a=2.87)).store()]
    pairs = [(hosts[index % 2], orm.Dict({'Rcut': 3.7, 'Zimp': [20 + index]}).store()) for index in range(5)]
    return build_impurity_clusters(pairs), pairs


@pytest.mark.parametrize('rows', [[3], [4, 0, 2], [1, 3], [0, 1, 2, 3, 4]])
def test_select_clusters(small_clusters, rows):
    """The subset holds the clusters of ``rows`` in the order given, with their keys and only their hosts, created
    from the clusters and the row list."""
    clusters, pairs = small_clusters
    outputs, process = select_clusters.run_get_node(clusters, orm.List(rows))
    subset = outputs['clusters']

    assert process.is_finished_ok
    assert subset.is_stored
    assert subset.keys == [clusters.keys[row] for row in rows]
    for position, row in enumerate(rows):
        _assert_same_cluster(subset.get_ase(position), clusters.get_ase(row), f'row {row}')
        assert subset.hosts[subset.host_of[position]]['uuid'] == pairs[row][0].uuid
    assert [host['uuid'] for host in subset.hosts] == list(dict.fromkeys(pairs[row][0].uuid for row in rows))
    assert process.inputs.clusters.uuid == clusters.uuid
    assert process.inputs.rows.get_list() == rows


@pytest.mark.parametrize(
    ('rows', 'message'),
    [
        pytest.param([], 'no rows given', id='empty'),
        pytest.param([5], 'row 5 is outside 0 to 4', id='past-the-end'),
        pytest.param([0, -1], 'row -1 is outside', id='negative'),
        pytest.param([1, 2, 1], 'more than once', id='repeated'),
        pytest.param([0.0], 'integer row indices', id='float'),
        pytest.param([True], 'integer row indices', id='bool'),
        pytest.param(['e000000'], 'integer row indices', id='key-instead-of-row'),
    ],
)
def test_select_clusters_invalid_rows(small_clusters, rows, message):
    """Invalid rows give exit code 303 naming the problem; nothing is created and the process stays in the graph."""
    clusters, _ = small_clusters
    n_clusters = _node_count(ImpurityClusters)
    outputs, process = select_clusters.run_get_node(clusters, orm.List(rows))

    assert outputs == {}
    assert process.exit_status == 303
    assert process.exit_message.startswith('invalid rows')
    assert message in process.exit_message
    assert not process.base.links.get_outgoing().all()
    assert _node_count(ImpurityClusters) == n_clusters


# -- build_impurity_clusters -----------------------------------------------------------------------------------------


def test_build_impurity_clusters_keeps_the_order_given(small_clusters):
    """One row per embedding in the order given (keys e000000, e000001, ...), the same embedding twice included."""
    _, pairs = small_clusters
    chosen = [pairs[3], pairs[0], pairs[3]]
    clusters = build_impurity_clusters(chosen)
    assert clusters.keys == [embedding_key(index) for index in range(3)]
    for row, (host, info) in enumerate(chosen):
        _assert_same_cluster(clusters.get_ase(row), impurity_cluster(host, info), f'row {row}')


@pytest.mark.parametrize(
    ('embeddings', 'error', 'message'),
    [
        pytest.param(list, ValueError, 'no embeddings given', id='none'),
        pytest.param(
            lambda: [(orm.Dict({'Rcut': 3.7, 'Zimp': 26}), _cu_host())],
            TypeError,
            r'\(Dict, StructureData\)',
            id='swapped',
        ),
        pytest.param(lambda: [(bulk('Cu'), orm.Dict({'Rcut': 3.7, 'Zimp': 26}))], TypeError, 'Atoms', id='ase-host'),
    ],
)
def test_build_impurity_clusters_refuses_what_is_no_embedding(embeddings, error, message):
    """What is no (host, impurity_info) pair is refused with the types it has, before anything is stored."""
    n_nodes = _node_count()
    with pytest.raises(error, match=message):
        build_impurity_clusters(embeddings())
    assert _node_count() == n_nodes


@pytest.mark.parametrize('key', ['zinc in Fe', 'e-1', ''])
def test_embedding_keys_must_name_links(key):
    """A key that cannot be part of a link label is refused by name before any process exists."""
    host = orm.StructureData(ase=bulk('Cu'))
    with pytest.raises(ValueError, match='cannot name an input link'):
        embedding_inputs([key], [host], [orm.Dict({'ilayer_center': 0, 'Rcut': 3.0, 'Zimp': [26]})])
