"""Impurity clusters: rebuilt as juKKR saw them (checked against its ``scoef`` files), stored with provenance."""

from __future__ import annotations

import ase
import numpy as np
import pytest
from aiida import orm
from aiida.common.links import LinkType
from ase.build import bulk
from kkr_fixtures import cluster_writers, kkr_archives  # noqa: F401

from aiida_mlworkbench.calcfunctions.clusters import (
    EXTRA_HOST_UUID,
    EXTRA_IMPURITY_INFO_UUID,
    EXTRA_N_ATOMS,
    EXTRA_ZIMP,
    build_impurity_clusters,
    hosts_of_clusters,
    impurity_cluster_structure,
    impurity_cluster_structures,
    structure_from_atoms,
)
from aiida_mlworkbench.kkr import (
    RcutUnit,
    host_alat,
    impurity_cluster,
    resolve_impurity_embeddings,
    scoef_alat,
    scoef_of,
)

CU_A = 3.61  # Angstrom, fcc Cu
FIRST_TWO_SHELLS_FCC = 1 + 12 + 6


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


@pytest.mark.parametrize(
    ('impurity_info', 'message'),
    [
        ({'Rcut': 3.0}, "no 'Zimp'"),
        ({'Zimp': 26, 'ilayer_center': 0}, "either 'Rcut'"),
        ({'Rcut': -1.0, 'Zimp': 26}, 'positive radius'),
        ({'Rcut': 3.0, 'Zimp': [26, 27]}, "2 'Zimp' value"),
        ({'Rcut': 3.0, 'Zimp': 26, 'ilayer_center': 3}, 'only 1 sites'),
        ({'Rcut': 3.0, 'Zimp': 'Fe'}, 'atomic number'),
        (
            {'imp_cls': [[0, 0, 0, 1, 29, 0]], 'Zimp': [26, 27], 'Rimp_rel': [[0, 0, 0], [0.5, 0, 0]]},
            'no site of the cluster',
        ),
        ({'imp_cls': [[0, 0, 0]], 'Zimp': 26}, 'one row'),
    ],
)
def test_invalid_impurity_info_raises_before_storing(impurity_info, message):
    host = _cu_host().store()
    info = orm.Dict(impurity_info).store()
    with pytest.raises(ValueError, match=message):
        impurity_cluster(host, info)

    n_nodes = orm.QueryBuilder().append(orm.Node).count()
    with pytest.raises(ValueError, match=message):
        build_impurity_clusters([(_cu_host().store(), orm.Dict({'Rcut': 3.0, 'Zimp': 26}).store()), (host, info)])
    assert orm.QueryBuilder().append(orm.Node).count() == n_nodes + 2  # only the two nodes stored above

    _, process = impurity_cluster_structure.run_get_node(host, info)
    assert process.exit_status == 300
    assert process.exit_message.startswith('invalid impurity embedding')
    assert not process.base.links.get_outgoing(link_type=LinkType.CREATE).all()


def test_single_calcfunction_links_and_extras():
    host, info = _cu_host().store(), orm.Dict({'Rcut': CU_A * 1.01, 'Zimp': [26]}).store()
    cluster, process = impurity_cluster_structure.run_get_node(host, info)

    assert process.is_finished_ok
    assert sorted(process.base.links.get_incoming().all_link_labels()) == ['host', 'impurity_info']
    assert cluster.creator.pk == process.pk
    assert cluster.pbc == (False, False, False)
    assert len(cluster.sites) == FIRST_TWO_SHELLS_FCC
    assert cluster.get_formula() == 'Cu18Fe'
    assert cluster.base.extras.get(EXTRA_ZIMP) == [26]
    assert cluster.base.extras.get(EXTRA_N_ATOMS) == FIRST_TWO_SHELLS_FCC
    assert cluster.base.extras.get(EXTRA_HOST_UUID) == host.uuid
    assert cluster.base.extras.get(EXTRA_IMPURITY_INFO_UUID) == info.uuid


def test_batched_clusters_link_each_pair_to_its_cluster():
    """In a batch, the cluster ``clusters.<key>`` is created by the process that took ``impurity_infos.<key>`` and its
    host, linked once per batch and named for each key by ``host_of``; it equals the cluster built alone."""
    hosts = [_cu_host().store(), orm.StructureData(ase=bulk('Fe', 'bcc', a=2.87)).store()]
    pairs = [(hosts[i % 2], orm.Dict({'Rcut': 3.7, 'Zimp': [20 + i]}).store()) for i in range(5)]
    clusters = build_impurity_clusters(pairs, batch_size=2)

    assert len(clusters) == 5
    assert len({cluster.creator.pk for cluster in clusters}) == 3
    for (host, info), cluster in zip(pairs, clusters, strict=True):
        label = cluster.base.links.get_incoming(link_type=LinkType.CREATE).one().link_label
        key = label.removeprefix('clusters__')
        inputs = {link.link_label: link.node for link in cluster.creator.base.links.get_incoming().all()}
        assert inputs[f'hosts__{inputs["host_of"][key]}'].uuid == host.uuid
        assert inputs[f'impurity_infos__{key}'].uuid == info.uuid
        assert _pairs(cluster.get_ase()) == _pairs(impurity_cluster(host, info))
    first_batch = clusters[0].creator.base.links.get_incoming().all_link_labels()
    assert sorted(label for label in first_batch if label.startswith('hosts__')) == [
        'hosts__host_0000',
        'hosts__host_0001',
    ]
    assert [host.uuid for host in hosts_of_clusters(clusters)] == [host.uuid for host, _ in pairs]


def test_batch_with_a_key_without_host_fails_before_anything_is_made():
    """``host_of`` naming a host key that is not an input gives exit code 302 (invalid inputs) and no clusters."""
    host = _cu_host().store()
    info = orm.Dict({'Rcut': 3.7, 'Zimp': 26}).store()
    _, node = impurity_cluster_structures.run_get_node(
        hosts={'host_0000': host}, impurity_infos={'a': info}, host_of=orm.Dict({'a': 'host_0001'})
    )
    assert node.exit_status == 302
    assert 'host_0001' in node.exit_message
    assert not node.base.links.get_outgoing().all()


def _aiida_kkr_processes_of(cluster: orm.StructureData) -> set[int]:
    """The query of ``docs/clusters.md``: from a cluster back to the aiida-kkr processes that used its impurity_info."""
    label = cluster.base.links.get_incoming(link_type=LinkType.CREATE).one().link_label
    info_label = 'impurity_info' if label == 'result' else 'impurity_infos__' + label.removeprefix('clusters__')

    query = orm.QueryBuilder()
    query.append(orm.StructureData, filters={'id': cluster.pk}, tag='cluster')
    query.append(orm.CalcFunctionNode, with_outgoing='cluster', tag='builder')
    query.append(orm.Dict, with_outgoing='builder', edge_filters={'label': info_label}, tag='impurity_info')
    query.append(
        orm.ProcessNode,
        with_incoming='impurity_info',
        filters={'process_type': {'like': '%kkr%'}},
        project='id',
    )
    return set(query.all(flat=True))


@pytest.mark.usefixtures('kkr_archives')
def test_query_from_cluster_to_aiida_kkr_calculations():
    """From a stored cluster, a QueryBuilder query walks back to the aiida-kkr calculations that used its nodes."""
    gf_writeouts = [node for node in cluster_writers() if node.process_type == 'aiida.calculations:kkr.kkr']
    embeddings = list(resolve_impurity_embeddings(gf_writeouts[:3]))
    clusters = build_impurity_clusters(embeddings)
    other = build_impurity_clusters([(_cu_host().store(), orm.Dict({'Rcut': 3.0, 'Zimp': 26}).store())])[0]

    for embedding, cluster in zip(embeddings, clusters, strict=True):
        found = _aiida_kkr_processes_of(cluster)
        users = {
            link.node.pk
            for link in embedding.impurity_info.base.links.get_outgoing().all()
            if 'kkr' in (link.node.process_type or '')
        }
        assert {source.pk for source in embedding.sources} <= found
        assert found == users
    assert _aiida_kkr_processes_of(other) == set()


@pytest.mark.usefixtures('aiida_profile_clean')
def test_structure_from_atoms_equals_set_ase():
    """The linear-time constructor gives ``StructureData(ase=...)``'s kinds and sites, stored and read back alike.

    Covers an impurity of the host's own element (kind ``Cu1`` beside ``Cu``), two impurities and a vacancy-free host.
    """
    host = _cu_host()
    neighbour = impurity_cluster(host, {'Rcut': 3.0, 'Zimp': 29}).positions[1] / host_alat(host)
    infos = [
        {'Rcut': 3.0, 'Zimp': 29, 'ilayer_center': 0},
        {'Rcut': 4.0, 'Zimp': 26, 'ilayer_center': 0},
        {'Rcut': 3.0, 'Zimp': [26, 27], 'Rimp_rel': [[0, 0, 0], neighbour.tolist()], 'ilayer_center': 0},
    ]
    for info in infos:
        atoms = impurity_cluster(host, info)
        fast, reference = structure_from_atoms(atoms), orm.StructureData(ase=atoms)
        assert fast.base.attributes.all == reference.base.attributes.all, info
        fast.store()
        reference.store()
        loaded_fast, loaded_reference = orm.load_node(fast.pk), orm.load_node(reference.pk)
        assert loaded_fast.base.attributes.all == loaded_reference.base.attributes.all
        assert loaded_fast.get_ase() == loaded_reference.get_ase()
        assert loaded_fast.base.caching.get_hash() == loaded_reference.base.caching.get_hash()
