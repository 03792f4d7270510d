"""Resolving real aiida-kkr impurity processes to their (host, impurity_info) embeddings."""

from __future__ import annotations

import collections
import logging

import pytest
from aiida import orm
from ase.data import chemical_symbols
from kkr_fixtures import has_impurity_info_input, impurity_process_nodes, kkr_archives  # noqa: F401

from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
from aiida_mlworkbench.kkr import (
    ImpurityEmbeddingError,
    RcutUnit,
    resolve_impurity_embedding,
    resolve_impurity_embeddings,
)

pytestmark = pytest.mark.usefixtures('kkr_archives')


def _impurity_processes() -> list[orm.ProcessNode]:
    """The impurity processes of the archives: all but the KkrCalculations that are no Green function write-out."""
    return [
        node
        for node in impurity_process_nodes()
        if node.process_type != 'aiida.calculations:kkr.kkr' or has_impurity_info_input(node)
    ]


@pytest.fixture(scope='module')
def resolved(kkr_archives):  # noqa: F811
    """All impurity processes of the archives, resolved together (raises if any of them is not resolvable)."""
    processes = _impurity_processes()
    return processes, resolve_impurity_embeddings(processes)


def test_all_archives_import(kkr_archives):  # noqa: F811
    """Every archive, zip or old gzip'd format, imports and brings nodes."""
    assert len(kkr_archives) == 17
    empty = [name for name, group in kkr_archives.items() if group.count() == 0]
    assert not empty, f'archives that imported no nodes: {empty}'


def test_every_impurity_process_type_resolves(resolved):
    """Each kind of impurity process in the archives resolves to a host StructureData and an impurity_info Dict."""
    processes, result = resolved
    assert not result.skipped
    sources = [source for embedding in result for source in embedding.sources]
    assert sorted(source.pk for source in sources) == sorted(node.pk for node in processes)

    labels = collections.Counter(source.process_label for source in sources)
    for label in ('KkrimpCalculation', 'KkrCalculation', 'kkr_imp_wc', 'kkr_imp_sub_wc', 'kkr_flex_wc'):
        assert labels[label] > 0, label
    assert labels['kkr_imp_dos_wc'] == 2  # one with the old process type aiida_kkr.workflows.kkr_imp_dos.kkr_imp_dos_wc
    assert labels['kkr_STM_wc'] == 1
    assert labels['Legacy JobCalculation'] == 2  # the 2018 GF write-out and KkrimpCalculation

    for embedding in result:
        assert isinstance(embedding.host, orm.StructureData)
        assert isinstance(embedding.impurity_info, orm.Dict)
        assert 'Zimp' in embedding.impurity_info.get_dict()
        assert all(embedding.host.pbc)


def test_host_is_the_voronoi_input_structure(resolved):
    """The host is the structure that the Voronoi calculation at the start of the host chain took."""
    _, result = resolved
    voronoi_structures = set(
        orm.QueryBuilder()
        .append(orm.CalcJobNode, filters={'process_type': 'aiida.calculations:kkr.voro'}, tag='voronoi')
        .append(orm.StructureData, with_outgoing='voronoi', project='uuid')
        .all(flat=True)
    )
    assert {embedding.host.uuid for embedding in result} <= voronoi_structures
    formulas = {embedding.host.get_formula() for embedding in result}
    assert {'Cu', 'Bi2Te3{H0.00X1.00}5'} <= formulas


def test_one_embedding_per_host_impurity_info_pair(resolved):
    """The same (host, impurity_info) pair reached from several processes is one embedding with all of them."""
    _, result = resolved
    keys = [embedding.key for embedding in result]
    assert len(keys) == len(set(keys))
    assert any(len(embedding.sources) > 1 for embedding in result)

    # A KkrimpCalculation without its own impurity_info uses that of its host Green function write-out.
    kkrimp = next(
        node
        for node in _impurity_processes()
        if node.process_label == 'KkrimpCalculation' and not has_impurity_info_input(node)
    )
    gf_writeout = kkrimp.inputs.host_Greenfunction_folder.creator
    again = resolve_impurity_embeddings([kkrimp, gf_writeout, kkrimp])
    assert len(again) == 1
    (embedding,) = again
    assert [source.pk for source in embedding.sources] == [kkrimp.pk, gf_writeout.pk]
    assert embedding.impurity_info.uuid == gf_writeout.inputs.impurity_info.uuid


def test_old_link_labels_and_rcut_unit(resolved):
    """The 2018 KkrimpCalculation (``GFhost_folder``, no impurity_info input) resolves; 2018 nodes read Rcut in alat."""
    _, result = resolved
    legacy = [embedding for embedding in result if embedding.rcut_unit is RcutUnit.ALAT]
    assert len(legacy) == 1
    (embedding,) = legacy
    assert {source.process_type for source in embedding.sources} == {
        'aiida.calculations:kkr.kkr',
        'aiida.calculations:kkr.kkrimp',
    }
    kkrimp = next(source for source in embedding.sources if source.process_type.endswith('kkrimp'))
    assert 'GFhost_folder' in kkrimp.base.links.get_incoming().all_link_labels()
    assert embedding.impurity_info['Rcut'] == pytest.approx(1.01)
    assert all(embedding.rcut_unit is RcutUnit.ANGSTROM for embedding in result if embedding not in legacy)


def _processes_labelled(label: str) -> list[orm.ProcessNode]:
    query = orm.QueryBuilder().append(orm.ProcessNode, filters={'attributes.process_label': label})
    return query.order_by({orm.ProcessNode: 'id'}).all(flat=True)


def test_two_impurity_processes_resolve_to_their_combined_embedding():
    """aiida-kkr's combine_imps_wc and create_combined_imp_info_cf resolve to the host and the combined impurity_info,
    the embedding of the KkrimpCalculations that the work chain ran, and its cluster holds both impurities."""
    functions = _processes_labelled('create_combined_imp_info_cf')
    workflows = _processes_labelled('combine_imps_wc')
    assert functions
    assert workflows
    for function in functions:
        embedding = resolve_impurity_embedding(function)
        assert embedding.host.uuid == function.inputs.host_structure.uuid
        assert embedding.impurity_info.uuid == function.outputs.imp_info_combined.uuid
        assert len(embedding.impurity_info['Zimp']) == 2
    for workflow in workflows:
        embedding = resolve_impurity_embedding(workflow)
        (function,) = [child for child in workflow.called if child.process_label == 'create_combined_imp_info_cf']
        assert embedding.key == resolve_impurity_embedding(function).key
        kkrimps = [node for node in workflow.called_descendants if node.process_label == 'KkrimpCalculation']
        assert kkrimps
        assert {resolve_impurity_embedding(kkrimp).key for kkrimp in kkrimps} == {embedding.key}
        (atoms,) = build_impurity_clusters([embedding])
        assert {chemical_symbols[number] for number in embedding.impurity_info['Zimp']} <= set(
            atoms.get_chemical_symbols()
        )


@pytest.mark.parametrize(
    ('process_type', 'reason'),
    [
        ('aiida.calculations:kkr.voro', 'none of the aiida-kkr impurity processes'),
        ('aiida.workflows:kkr.scf', 'none of the aiida-kkr impurity processes'),
    ],
)
def test_non_impurity_process_raises(process_type, reason):
    node = orm.QueryBuilder().append(orm.ProcessNode, filters={'process_type': process_type}).first(flat=True)
    with pytest.raises(ImpurityEmbeddingError, match=reason) as info:
        resolve_impurity_embedding(node)
    assert f'<{node.pk}>' in str(info.value)
    assert info.value.node.pk == node.pk


def test_kkr_calculation_without_impurity_info_raises():
    """A KkrCalculation that wrote no host Green function is no embedding, and the error says so."""
    node = next(
        node
        for node in impurity_process_nodes()
        if node.process_label == 'KkrCalculation' and not has_impurity_info_input(node)
    )
    with pytest.raises(ImpurityEmbeddingError, match='no host Green function write-out'):
        resolve_impurity_embeddings([node])


def test_data_node_raises():
    node = orm.Dict({'Rcut': 2.0, 'Zimp': [26]}).store()
    with pytest.raises(ImpurityEmbeddingError, match='it is a Dict, not an aiida-kkr process'):
        resolve_impurity_embedding(node)


def test_group_input_skips_and_reports(caplog):
    """A Group's nodes that are no embedding are skipped, returned with the reason and logged."""
    kkrimp = next(node for node in _impurity_processes() if node.process_label == 'KkrimpCalculation')
    voronoi = (
        orm.QueryBuilder()
        .append(orm.CalcJobNode, filters={'process_type': 'aiida.calculations:kkr.voro'})
        .first(flat=True)
    )
    structure = kkrimp.inputs.host_Greenfunction_folder.creator.inputs.impurity_info
    group = orm.Group(label='test_group_input_skips_and_reports').store()
    group.add_nodes([kkrimp, voronoi, structure])

    with caplog.at_level(logging.INFO, logger='aiida_mlworkbench.kkr.embeddings'):
        result = resolve_impurity_embeddings(group)

    assert [embedding.sources for embedding in result] == [(kkrimp,)]
    assert {skipped.node.pk for skipped in result.skipped} == {voronoi.pk, structure.pk}
    assert all(skipped.reason for skipped in result.skipped)
    assert 'skipped 2 of the nodes given' in caplog.text

    with pytest.raises(ImpurityEmbeddingError):
        resolve_impurity_embeddings(group, skip_invalid=False)
    assert len(resolve_impurity_embeddings([voronoi, kkrimp], skip_invalid=True).skipped) == 1


def test_import_archives_names_a_missing_file(tmp_path):
    """A missing archive is named before anything is imported."""
    from aiida_mlworkbench.kkr import import_archives

    missing = tmp_path / 'nowhere.aiida'
    with pytest.raises(FileNotFoundError, match=r'nowhere\.aiida'):
        import_archives([missing])


def test_archive_group_imports_each_archive_once(kkr_archives_dir, tmp_path):
    """The group gets every archive of the folder; a second call imports nothing, and an import that did not finish
    (its archive not recorded in the group's extra) is done again by the next call."""
    from aiida_mlworkbench.kkr.archives import ARCHIVES_EXTRA, archive_group

    names = ['kkrflex_writeout_wc.aiida', 'export_kkr_flex.tar.gz']
    for name in names:
        (tmp_path / name).symlink_to(kkr_archives_dir / name)
    label = f'tests/archive_group/{tmp_path.name}'
    group = archive_group(tmp_path, label)
    count = group.count()
    assert count > 0
    assert sorted(group.base.extras.get(ARCHIVES_EXTRA)) == sorted(names)

    group.base.extras.set(ARCHIVES_EXTRA, names[:1])  # as if the second import had been interrupted
    again = archive_group(tmp_path, label)
    assert again.pk == group.pk
    assert sorted(again.base.extras.get(ARCHIVES_EXTRA)) == sorted(names)
    assert again.count() == count

    with pytest.raises(FileNotFoundError, match='no aiida-kkr archives'):
        archive_group(tmp_path / 'empty', label)
