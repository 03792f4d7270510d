"""A first surrogate of juKKR on the real aiida-kkr archives: learn the impurity clusters' spin moments from the
KkrimpCalculation results in the graph, predict them for the embeddings juKKR never converged, and draw the figures.

1. imports the archives into a group (as ``examples/kkr_archives.py`` does; nodes already there are not duplicated);
2. extracts the clusters of every embedding a KkrimpCalculation ran (one ImpurityClusters node);
3. runs ImpurityLearningWorkChain on them with the target ``kkr``: the total spin moment of the last converged run of
   each embedding, in the unit juKKR's parser recorded; embeddings without one are left out and reported;
4. runs it again with the class target ``magnetic`` (|total spin moment| >= 0.1 mu_Bohr);
5. runs ImpurityPredictionWorkChain with the first model on the embeddings that were left out;
6. writes the parity plot and the confusion matrix with ``aiida-mlworkbench plot`` (into ``--figures``).

A few dozen embeddings of two hosts: the point is the graph and the tools, not the accuracy.
Run with ``verdi run examples/kkr_surrogate.py [--archives FOLDER] [--figures FOLDER]``.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess

from aiida import orm
from aiida.engine import run_get_node
from aiida.manage import get_manager

from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
from aiida_mlworkbench.data import ImpurityClusters
from aiida_mlworkbench.kkr import resolve_impurity_embeddings
from aiida_mlworkbench.kkr.archives import archive_group
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain, ImpurityPredictionWorkChain

ARCHIVES = pathlib.Path('..', 'shared', 'data', 'aiida-kkr-archives')
GROUP_LABEL = 'mlworkbench/examples/aiida-kkr-archives'
DESCRIPTOR = {'name': 'soap', 'r_cut': 5.0, 'n_max': 4, 'l_max': 4, 'sigma': 1.0, 'average': 'inner'}
SPLIT = {'test_fraction': 0.3, 'seed': 1}


def learn(clusters: ImpurityClusters, kkr_target: dict, estimator: dict) -> orm.WorkChainNode:
    # The descriptor lists every species of the database: a model that knows only the species of the rows it learned
    # from cannot describe an impurity of another species, and refuses to predict for it.
    descriptor = {**DESCRIPTOR, 'species': clusters.species}
    builder = ImpurityLearningWorkChain.get_builder_from_clusters(
        clusters, target='kkr', kkr_target=kkr_target, descriptor=descriptor, estimator=estimator, split=SPLIT
    )
    _, run = run_get_node(builder)
    if not run.is_finished_ok:
        raise SystemExit(f'{run.process_label}<{run.pk}> failed: {run.exit_message}')
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archives', type=pathlib.Path, default=ARCHIVES, help='folder of aiida-kkr archives')
    parser.add_argument('--figures', type=pathlib.Path, default=pathlib.Path('.'), help='folder for the PNG files')
    arguments = parser.parse_args()

    try:
        group = archive_group(arguments.archives, GROUP_LABEL)
    except FileNotFoundError as exception:
        raise SystemExit(f'{exception}: pass --archives FOLDER') from None
    calculations = orm.QueryBuilder().append(orm.Group, filters={'id': group.pk}, tag='group')
    calculations.append(orm.CalcJobNode, with_group='group', filters={'process_type': 'aiida.calculations:kkr.kkrimp'})
    embeddings = list(resolve_impurity_embeddings(calculations.all(flat=True), skip_invalid=True))
    clusters = build_impurity_clusters(embeddings)
    print(f'{len(embeddings)} embeddings run by KkrimpCalculations, species {", ".join(clusters.species)}')

    moments = learn(clusters, {'quantity': 'total_spin_moment', 'missing': 'drop'}, {'estimator': 'Ridge'})
    metrics = moments.outputs.metrics.get_dict()
    dropped = moments.outputs.targets.base.attributes.get('dropped')
    print(
        f'spin moments <{moments.pk}>: {metrics["n_train"]} train and {metrics["n_test"]} test rows, '
        f'MAE {metrics["mae"]:.3f} {metrics["unit"]} (mean baseline {metrics["baseline"]["mae"]:.3f}), '
        f'R2 {metrics["r2"]:.3f}; {len(dropped)} embeddings without a converged value left out'
    )
    magnetic = learn(
        clusters,
        {'quantity': 'magnetic', 'missing': 'drop'},
        {'estimator': 'LogisticRegression', 'parameters': {'max_iter': 1000}},
    )
    print(f'magnetic or not <{magnetic.pk}>: accuracy {magnetic.outputs.metrics["accuracy"]:.3f}')

    keys = clusters.keys
    left_out = [embeddings[keys.index(row['key'])] for row in dropped]
    builder = ImpurityPredictionWorkChain.get_builder_from_embeddings(moments.outputs.model, left_out)
    _, prediction = run_get_node(builder)
    if not prediction.is_finished_ok:
        raise SystemExit(f'{prediction.process_label}<{prediction.pk}> failed: {prediction.exit_message}')
    predicted = prediction.outputs.predictions
    unit = predicted.base.attributes.get('unit')
    print(f'predictions <{prediction.pk}> for the {len(left_out)} embeddings juKKR never converged:')
    for embedding, value in zip(left_out, predicted.get_array('predicted'), strict=True):
        print(f'  impurity_info<{embedding.impurity_info.pk}> in {embedding.host.get_formula()}: {value:+.3f} {unit}')

    arguments.figures.mkdir(parents=True, exist_ok=True)
    profile = get_manager().get_profile().name
    for figure, run, name in (
        ('parity', moments, 'kkr_spin_moment_parity'),
        ('confusion', magnetic, 'kkr_magnetic_confusion'),
    ):
        path = arguments.figures / f'{name}.png'
        command = ['aiida-mlworkbench', '-p', profile, 'plot', figure, str(run.pk), '-o', str(path)]
        print('$', ' '.join(command))
        subprocess.run(command, check=True)


main()
