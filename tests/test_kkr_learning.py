"""Learning what juKKR computed, end to end on the real aiida-kkr archives: the learning work chain with a KKR target,
predictions with provenance, and the figures drawn from the stored runs."""

from __future__ import annotations

import numpy as np
import pytest
from aiida import orm
from aiida.engine import run_get_node
from kkr_fixtures import kkr_archives  # noqa: F401

from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
from aiida_mlworkbench.calcfunctions.featurize import featurize
from aiida_mlworkbench.calcfunctions.predict import predict
from aiida_mlworkbench.data import TrainedModel
from aiida_mlworkbench.kkr import find_kkr_results, resolve_impurity_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain, ImpurityPredictionWorkChain

KKRIMP = 'aiida.calculations:kkr.kkrimp'
SMALL_SOAP = {'name': 'soap', 'r_cut': 4.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}
SPIN_MOMENT = {'quantity': 'total_spin_moment', 'missing': 'drop'}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def embeddings(kkr_archives):  # noqa: F811
    """Every embedding that a KkrimpCalculation of the archives ran, in pk order of the calculations."""
    builder = orm.QueryBuilder().append(orm.CalcJobNode, filters={'process_type': KKRIMP})
    return list(
        resolve_impurity_embeddings(builder.order_by({orm.CalcJobNode: 'id'}).all(flat=True), skip_invalid=True)
    )


@pytest.fixture(scope='module')
def spin_moment_run(embeddings) -> int:
    """The pk of a learning work chain of the impurity clusters' total spin moments (a regression), whose descriptor
    lists every species of the archives' clusters, so that the model can describe the rows it did not learn from."""
    species = build_impurity_clusters(embeddings).species
    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
        embeddings,
        target='kkr',
        kkr_target=SPIN_MOMENT,
        descriptor={**SMALL_SOAP, 'species': species},
        estimator={'estimator': 'Ridge', 'parameters': {'alpha': 1e-3}},
        split={'test_fraction': 0.3, 'seed': 1},
    )
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node.pk


@pytest.fixture(scope='module')
def magnetic_run(spin_moment_run) -> int:
    """The pk of a learning work chain of magnetic or not (a classification), from the clusters of the first run; its
    species are those of the rows it learned from."""
    clusters = orm.load_node(spin_moment_run).outputs.clusters
    builder = ImpurityLearningWorkChain.get_builder_from_clusters(
        clusters,
        target='kkr',
        kkr_target={'quantity': 'magnetic', 'missing': 'drop'},
        descriptor=SMALL_SOAP,
        estimator={'estimator': 'LogisticRegression', 'parameters': {'max_iter': 1000}},
        split={'test_fraction': 0.3, 'seed': 1},
    )
    _, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    return node.pk


def test_learns_a_kkr_result_with_unit_baseline_and_test_pairs(spin_moment_run):
    """The targets are the KKR values in juKKR's unit, the rows without one are left out before featurizing, and the
    scoring stores the test pairs and a mean-predictor baseline in that unit."""
    node = orm.load_node(spin_moment_run)
    targets, features = node.outputs.targets, node.outputs.features
    assert targets.base.attributes.get('target') == 'kkr'
    assert targets.base.attributes.get('unit') == 'mu_Bohr'
    dropped = targets.base.attributes.get('dropped')
    assert dropped, 'the archives hold embeddings that never converged: some rows must be left out'
    kept = node.outputs.kept_clusters
    assert len(kept) == len(node.outputs.clusters) - len(dropped) == features.n_rows == targets.get_shape('targets')[0]
    assert not set(kept.keys) & {row['key'] for row in dropped}

    metrics, predictions, split = node.outputs.metrics.get_dict(), node.outputs.predictions, node.outputs.split
    assert metrics['unit'] == 'mu_Bohr'
    assert metrics['quantity'] == 'total_spin_moment'
    test = split.get_array('test')
    truth = targets.get_array('targets')
    np.testing.assert_array_equal(predictions.get_array('rows'), test)
    np.testing.assert_array_equal(predictions.get_array('true'), truth[test])
    np.testing.assert_allclose(predictions.get_array('predicted'), node.outputs.model.predict(features, rows=test))
    train_mean = truth[split.get_array('train')].mean()
    assert metrics['baseline']['predicted'] == pytest.approx(train_mean)
    assert metrics['baseline']['mae'] == pytest.approx(np.abs(truth[test] - train_mean).mean())
    assert metrics['mae'] == pytest.approx(np.abs(truth[test] - predictions.get_array('predicted')).mean())
    assert node.outputs.model.target['unit'] == 'mu_Bohr'


def test_graph_leads_from_the_model_to_the_kkr_calculations(spin_moment_run):
    """QueryBuilder walks from the trained model to the KkrimpCalculation runs of the embeddings it learned (the
    targets' inputs, of which the policy chose one per row), and to no other."""
    node = orm.load_node(spin_moment_run)
    builder = orm.QueryBuilder()
    builder.append(TrainedModel, filters={'id': node.outputs.model.pk}, tag='model')
    builder.append(orm.CalcFunctionNode, with_outgoing='model', tag='train')
    builder.append(orm.ArrayData, with_outgoing='train', edge_filters={'label': 'targets'}, tag='targets')
    builder.append(orm.CalcFunctionNode, with_outgoing='targets', tag='make_targets')
    builder.append(orm.Dict, with_outgoing='make_targets', tag='results')
    builder.append(orm.CalcJobNode, with_outgoing='results', project='uuid', filters={'process_type': KKRIMP})
    learned_from = set(builder.all(flat=True))
    every_run = find_kkr_results(node.outputs.clusters)
    assert learned_from == {result.calculation.uuid for runs in every_run.values() for result in runs}
    sources = node.outputs.targets.base.attributes.get('sources')
    assert {orm.load_node(uuid).creator.uuid for uuid in sources} <= learned_from

    # the kept rows, made by kkr_result_targets, still lead to their runs
    kept = node.outputs.kept_clusters
    runs_of_kept = find_kkr_results(kept)
    assert list(runs_of_kept) == kept.keys
    assert all(runs_of_kept[key] == every_run[key] for key in kept.keys)


def test_prediction_work_chain_predicts_what_the_model_would(spin_moment_run, embeddings):
    """New embeddings (here: every one of the archives, those juKKR never converged included) are extracted and
    featurized with the model's own descriptor; the predictions carry the unit and equal the model's."""
    node = orm.load_node(spin_moment_run)
    model = node.outputs.model
    pairs = [(embedding.host, embedding.impurity_info) for embedding in embeddings]
    _, prediction = run_get_node(ImpurityPredictionWorkChain.get_builder_from_embeddings(model, pairs))
    assert prediction.is_finished_ok, prediction.exit_message
    predictions = prediction.outputs.predictions
    assert predictions.base.attributes.get('unit') == 'mu_Bohr'
    assert predictions.get_shape('predicted') == (len(pairs),)
    assert prediction.outputs.features.descriptor == model.descriptor
    np.testing.assert_allclose(predictions.get_array('predicted'), model.predict(prediction.outputs.features))
    kept = set(node.outputs.kept_clusters.keys)
    rows = [row for row, key in enumerate(node.outputs.clusters.keys) if key in kept]
    np.testing.assert_allclose(
        predictions.get_array('predicted')[rows], model.predict(node.outputs.features), rtol=1e-10, atol=1e-12
    )


def test_surrogate_runs_on_the_daemon(spin_moment_run, embeddings, submit_and_await):
    """Learning the spin moments and predicting them, both submitted to the daemon (this profile's storage and broker),
    give the results of the runs in this process."""
    node = orm.load_node(spin_moment_run)
    builder = ImpurityLearningWorkChain.get_builder_from_clusters(
        node.outputs.clusters,
        target='kkr',
        kkr_target=SPIN_MOMENT,
        descriptor=node.inputs.descriptor.get_dict(),
        estimator=node.inputs.estimator.get_dict(),
        split=node.inputs.split.get_dict(),
    )
    learned = submit_and_await(builder, timeout=300)
    assert learned.is_finished_ok, learned.exit_message
    assert learned.outputs.features.checksum == node.outputs.features.checksum
    assert learned.outputs.metrics.get_dict() == node.outputs.metrics.get_dict()

    pairs = [(embedding.host, embedding.impurity_info) for embedding in embeddings[:4]]
    builder = ImpurityPredictionWorkChain.get_builder_from_embeddings(learned.outputs.model, pairs)
    prediction = submit_and_await(builder, timeout=300)
    assert prediction.is_finished_ok, prediction.exit_message
    np.testing.assert_allclose(
        prediction.outputs.predictions.get_array('predicted'),
        node.outputs.model.predict(prediction.outputs.features),
        rtol=1e-10,
        atol=1e-12,
    )


def test_predict_from_clusters_equals_predict_from_features(spin_moment_run):
    node = orm.load_node(spin_moment_run)
    model, clusters = node.outputs.model, node.outputs.kept_clusters
    from_clusters = predict(model, clusters=clusters).get_array('predicted')
    from_features = predict(model, features=node.outputs.features).get_array('predicted')
    np.testing.assert_allclose(from_clusters, from_features, rtol=1e-10, atol=1e-12)


def test_model_refuses_features_of_another_descriptor(spin_moment_run):
    """Features with as many columns but another cutoff radius are refused by name, and nothing is predicted."""
    node = orm.load_node(spin_moment_run)
    other = featurize(node.outputs.kept_clusters, orm.Dict({**node.outputs.model.descriptor, 'r_cut': 5.0}))
    assert other.n_features == node.outputs.features.n_features
    outputs, process = predict.run_get_node(node.outputs.model, features=other)
    assert process.exit_status == 371
    assert 'r_cut' in process.exit_message
    assert not outputs


def test_model_refuses_clusters_with_species_it_never_saw(magnetic_run):
    """A model whose species are those of its training rows cannot describe a cluster with another species: the
    prediction fails naming the row, instead of describing the cluster without that species."""
    node = orm.load_node(magnetic_run)
    model, clusters = node.outputs.model, node.inputs.clusters
    unseen = [
        row
        for row, atoms in enumerate(clusters)
        if set(atoms.get_chemical_symbols()) - set(model.descriptor['species'])
    ]
    assert unseen, 'the rows without a KKR value of the archives hold species that the kept rows do not'
    outputs, process = predict.run_get_node(model, clusters=clusters)
    assert process.exit_status == 373
    assert f'row {unseen[0]}, key `{clusters.keys[unseen[0]]}`' in process.exit_message
    assert not outputs


@pytest.mark.parametrize(
    ('descriptor', 'status'), [({}, 372), ({'name': 'no-such-descriptor'}, 378), ({'name': 'soap', 'n_max': 0}, 378)]
)
def test_predict_from_clusters_needs_a_usable_descriptor(spin_moment_run, descriptor, status):
    """Clusters can only be described with the descriptor the model records: none, or an unusable one, is an exit
    code, and the prediction work chain refuses a model without one before anything runs."""
    node = orm.load_node(spin_moment_run)
    model = TrainedModel(node.outputs.model.load(), descriptor=descriptor).store()
    outputs, process = predict.run_get_node(model, clusters=node.outputs.kept_clusters)
    assert process.exit_status == status
    assert not outputs
    if not descriptor:
        with pytest.raises(ValueError, match='records no descriptor'):
            run_get_node(ImpurityPredictionWorkChain.get_builder_from_clusters(model, node.outputs.kept_clusters))


def _failing_model(node: orm.WorkChainNode, step: str) -> TrainedModel:
    """A model whose prediction work chain fails at ``step``: a descriptor that cannot describe the clusters, or an
    estimator that fails at prediction time (nearest neighbours fitted on fewer samples than neighbours)."""
    model = node.outputs.model
    if step == 'featurize':
        return TrainedModel(model.load(), descriptor={**model.descriptor, 'species': ['Cu']})
    from sklearn.neighbors import KNeighborsRegressor

    features, targets = node.outputs.features, node.outputs.targets.get_array('targets')
    estimator = KNeighborsRegressor(n_neighbors=5).fit(features.get_rows([0, 1]), targets[:2])
    return TrainedModel(estimator, descriptor=model.descriptor)


@pytest.mark.parametrize(('step', 'exit_code', 'child_status'), [('featurize', 402, 341), ('predict', 408, 377)])
def test_prediction_work_chain_names_the_failed_step(spin_moment_run, step, exit_code, child_status):
    """A failing step ends the prediction work chain with its exit code and a report naming the step as label<pk>."""
    node = orm.load_node(spin_moment_run)
    model = _failing_model(node, step).store()
    _, run = run_get_node(ImpurityPredictionWorkChain.get_builder_from_clusters(model, node.outputs.clusters))
    assert run.exit_status == exit_code
    (child,) = [child for child in run.called if child.process_label == step]
    assert child.exit_status == child_status
    assert f'{step}<{child.pk}>' in run.exit_message
    reports = [log.message for log in orm.Log.collection.get_logs_for(run)]
    assert any(f'{step}<{child.pk}> failed with exit status {child_status}' in line for line in reports)


@pytest.mark.parametrize('given', [(), ('features', 'clusters')])
def test_predict_needs_features_or_clusters(spin_moment_run, given):
    node = orm.load_node(spin_moment_run)
    rows = {'features': node.outputs.features, 'clusters': node.outputs.kept_clusters}
    _, process = predict.run_get_node(node.outputs.model, **{name: rows[name] for name in given})
    assert process.exit_status == 370


@pytest.mark.parametrize(('run', 'figure'), [('spin_moment_run', 'parity'), ('magnetic_run', 'confusion')])
def test_plot_command_writes_a_png(run_cli, request, tmp_path, run, figure):
    """The figure is drawn from the work chain, or from its predictions node, into a non-empty PNG file."""
    node = orm.load_node(request.getfixturevalue(run))
    for source in (node, node.outputs.predictions):
        path = tmp_path / f'{figure}-{source.pk}.png'
        result = run_cli('plot', figure, str(source.pk), '-o', str(path))
        assert result.exit_code == 0, result.output
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert path.stat().st_size > 10_000


WRONG_KIND = {
    ('spin_moment_run', 'confusion'): 'a confusion matrix needs a classification',
    ('magnetic_run', 'parity'): 'a parity plot needs a regression',
}


@pytest.mark.parametrize(('run', 'figure'), list(WRONG_KIND))
def test_plot_command_names_the_wrong_kind_of_run(run_cli, request, tmp_path, run, figure):
    node = orm.load_node(request.getfixturevalue(run))
    path = tmp_path / 'figure.png'
    result = run_cli('plot', figure, str(node.pk), '-o', str(path))
    assert result.exit_code != 0
    assert WRONG_KIND[run, figure] in result.output
    assert not path.exists()
