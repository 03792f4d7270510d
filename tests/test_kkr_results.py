"""Targets from what juKKR computed: the ``output_parameters`` of the KkrimpCalculation runs of each embedding, found
through the graph of the real aiida-kkr archives, with the selection and missing-value policies."""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.common.links import LinkType
from kkr_fixtures import kkr_archives  # noqa: F401

from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters, select_clusters
from aiida_mlworkbench.calcfunctions.targets import kkr_result_targets
from aiida_mlworkbench.data import ImpurityClusters
from aiida_mlworkbench.kkr import (
    KkrTarget,
    KkrTargetError,
    find_kkr_results,
    kkr_target_inputs,
    resolve_impurity_embedding,
    resolve_impurity_embeddings,
)
from aiida_mlworkbench.kkr.results import is_converged

KKRIMP = 'aiida.calculations:kkr.kkrimp'


@pytest.fixture(scope='module')
def archive_clusters(kkr_archives):  # noqa: F811
    """The clusters of every embedding that a KkrimpCalculation of the archives ran."""
    builder = orm.QueryBuilder().append(orm.CalcJobNode, filters={'process_type': KKRIMP})
    calculations = builder.order_by({orm.CalcJobNode: 'id'}).all(flat=True)
    embeddings = resolve_impurity_embeddings(calculations, skip_invalid=True)
    return build_impurity_clusters(list(embeddings))


def test_every_row_leads_to_the_calculations_that_ran_it(archive_clusters):
    """Each row's runs are KkrimpCalculations of exactly that (host, impurity_info) pair, with output_parameters,
    oldest first; together they are every such calculation of the archives."""
    found = find_kkr_results(archive_clusters)
    assert list(found) == archive_clusters.keys
    extraction = archive_clusters.creator
    all_runs = []
    for row, (key, runs) in enumerate(found.items()):
        info = extraction.inputs.impurity_infos[key]
        host_uuid = archive_clusters.hosts[archive_clusters.host_of[row]]['uuid']
        assert runs, f'row {key} has no KkrimpCalculation'
        for result in runs:
            assert resolve_impurity_embedding(result.calculation).key == (host_uuid, info.uuid)
            assert result.calculation.outputs.output_parameters.uuid == result.output_parameters.uuid
        assert [result.calculation.ctime for result in runs] == sorted(result.calculation.ctime for result in runs)
        all_runs.extend(result.calculation.pk for result in runs)
    with_parameters = orm.QueryBuilder().append(orm.CalcJobNode, filters={'process_type': KKRIMP}, tag='calc')
    with_parameters.append(orm.Dict, with_incoming='calc', edge_filters={'label': 'output_parameters'})
    assert sorted(all_runs) == sorted(set(all_runs))
    assert len(all_runs) == with_parameters.count()


def test_error_policy_names_the_embedding_and_why(archive_clusters):
    """Some embeddings of the archives never converged: by default that is an error naming the row and the reason."""
    _, node = kkr_result_targets.run_get_node(**kkr_target_inputs(archive_clusters, {'quantity': 'total_spin_moment'}))
    assert node.exit_status == 358
    first_without = next(key for key, runs in find_kkr_results(archive_clusters).items() if _spin_moment(runs) is None)
    assert f'(embedding {first_without})' in node.exit_message
    assert "missing: 'drop'" in node.exit_message


def _spin_moment(runs):
    """The total spin moment of the last converged run, or None (no converged run, or no number recorded)."""
    converged = [result for result in runs if is_converged(result.output_parameters.get_dict())]
    value = converged[-1].output_parameters.get_dict().get('magnetism_group', {}) if converged else {}
    moment = value.get('total_spin_moment')
    return moment if isinstance(moment, (int, float)) else None


@pytest.mark.parametrize('quantity', ['total_spin_moment', 'magnetism_group.total_spin_moment'])
def test_drop_policy_keeps_the_last_converged_value_of_each_row(archive_clusters, quantity):
    """With missing: 'drop', each kept row has the value of its last converged run, the unit juKKR's parser recorded,
    the source recorded; the dropped rows are named; the kept rows' clusters come out for featurization."""
    outputs, node = kkr_result_targets.run_get_node(
        **kkr_target_inputs(archive_clusters, {'quantity': quantity, 'missing': 'drop'})
    )
    assert node.is_finished_ok, node.exit_message
    targets = outputs['targets']
    attributes = targets.base.attributes.all
    found = find_kkr_results(archive_clusters)
    expected, kept_keys = [], []
    for key, runs in found.items():
        moment = _spin_moment(runs)  # some old runs record an empty list: missing
        if moment is not None:
            expected.append(moment)
            kept_keys.append(key)
    assert targets.get_array('targets').tolist() == expected
    assert attributes['unit'] == 'mu_Bohr'
    assert attributes['task'] == 'regression'
    assert sorted(entry['key'] for entry in attributes['dropped']) == sorted(set(found) - set(kept_keys))
    assert 0 < len(kept_keys) < len(found)
    assert outputs['clusters'].keys == kept_keys
    sources = [orm.load_node(uuid) for uuid in attributes['sources']]
    assert all(source.creator.process_type == KKRIMP for source in sources)


def test_graph_leads_from_the_targets_to_the_kkr_calculations(archive_clusters):
    """QueryBuilder walks from the targets node back to the KkrimpCalculations whose results it holds."""
    outputs, _ = kkr_result_targets.run_get_node(
        **kkr_target_inputs(archive_clusters, {'quantity': 'total_energy', 'calculations': 'last', 'missing': 'drop'})
    )
    targets = outputs['targets']
    builder = orm.QueryBuilder().append(orm.ArrayData, filters={'id': targets.pk}, tag='targets')
    builder.append(orm.CalcFunctionNode, with_outgoing='targets', tag='make')
    builder.append(orm.Dict, with_outgoing='make', edge_filters={'label': {'like': 'results%'}}, tag='parameters')
    builder.append(orm.CalcJobNode, with_outgoing='parameters', filters={'process_type': KKRIMP}, project='uuid')
    reached = set(builder.all(flat=True))
    used = {orm.load_node(uuid).creator.uuid for uuid in targets.base.attributes.get('sources')}
    assert used <= reached
    assert targets.base.attributes.get('unit') == 'Rydberg'


@pytest.mark.parametrize(
    ('specification', 'labels'),
    [
        ({'quantity': 'converged', 'calculations': 'last', 'missing': 'drop'}, {'converged', 'not converged'}),
        ({'quantity': 'magnetic', 'missing': 'drop'}, {'magnetic', 'non-magnetic'}),
    ],
)
def test_class_targets_from_results(archive_clusters, specification, labels):
    outputs, node = kkr_result_targets.run_get_node(**kkr_target_inputs(archive_clusters, specification))
    assert node.is_finished_ok, node.exit_message
    targets = outputs['targets']
    assert set(targets.get_array('targets').tolist()) == labels
    assert targets.base.attributes.get('task') == 'classification'
    assert targets.base.attributes.get('classes') == sorted(labels)


def test_magnetic_threshold_moves_rows_between_classes(archive_clusters):
    counts = []
    for threshold in (0.1, 3.0):
        outputs, _ = kkr_result_targets.run_get_node(
            **kkr_target_inputs(archive_clusters, {'quantity': 'magnetic', 'missing': 'drop', 'threshold': threshold})
        )
        counts.append(int((outputs['targets'].get_array('targets') == 'magnetic').sum()))
    assert counts[0] > counts[1] > 0


def test_subsets_keep_their_way_to_the_calculations(archive_clusters):
    """Rows taken with select_clusters still lead to the calculations of their embeddings."""
    subset = select_clusters(archive_clusters, orm.List([3, 0, 5]))['clusters']
    found = find_kkr_results(subset)
    whole = find_kkr_results(archive_clusters)
    assert list(found) == subset.keys
    for key, runs in found.items():
        assert [run.calculation.pk for run in runs] == [run.calculation.pk for run in whole[key]]


@pytest.mark.parametrize(
    ('specification', 'named'),
    [
        ({}, 'quantity'),
        ({'quantity': 'total_spin_moment', 'policy': 'last'}, 'unknown key'),
        ({'quantity': 'total_spin_moment', 'calculations': 'first'}, 'calculations'),
        ({'quantity': 'total_spin_moment', 'missing': 'ignore'}, 'missing'),
        ({'quantity': 'magnetic', 'threshold': -1}, 'threshold'),
        ({'quantity': 'converged'}, "'calculations': 'last'"),
    ],
)
def test_invalid_specifications_are_refused_by_name(archive_clusters, specification, named):
    with pytest.raises(KkrTargetError, match=named):
        KkrTarget.from_dict(specification)
    inputs = kkr_target_inputs(archive_clusters, {'quantity': 'total_energy'})
    inputs['target'] = orm.Dict(specification)
    _, node = kkr_result_targets.run_get_node(**inputs)
    assert node.exit_status == 357
    assert named in node.exit_message


def test_results_of_other_rows_are_refused(archive_clusters):
    inputs = kkr_target_inputs(archive_clusters, {'quantity': 'total_energy'})
    inputs['results']['not_a_row'] = {'c0': orm.Dict({'total_energy_Ry': 1.0})}
    _, node = kkr_result_targets.run_get_node(**inputs)
    assert node.exit_status == 360
    assert 'not_a_row' in node.exit_message


def test_clusters_without_kkr_provenance_are_refused():
    """Clusters made by hand cannot be traced to impurity_info nodes: said so, with what to do instead."""
    import ase

    clusters = ImpurityClusters([ase.Atoms('Fe', positions=[[0, 0, 0]])], keys=['only'])
    clusters.store()
    with pytest.raises(KkrTargetError, match='build_impurity_clusters'):
        find_kkr_results(clusters)


def test_no_link_of_the_targets_process_is_a_copy(archive_clusters):
    """The targets process consumes the output_parameters nodes themselves (the graph leads to the KKR runs), each
    once."""
    specification = {'quantity': 'total_energy', 'calculations': 'last', 'missing': 'drop'}
    inputs = kkr_target_inputs(archive_clusters, specification)
    _, node = kkr_result_targets.run_get_node(**inputs)
    links = node.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all()
    parameters = [link.node for link in links if link.link_label.startswith('results__')]
    assert len(parameters) == sum(len(runs) for runs in inputs['results'].values())
    assert all(parameter.creator.process_type == KKRIMP for parameter in parameters)
