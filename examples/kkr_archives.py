"""Learn from real aiida-kkr nodes end to end: the test archives of aiida-kkr, imported into your profile.

The archives in ``../shared/data/aiida-kkr-archives/`` next to the repository (run from the repository root), or the
folder given with ``--archives``, hold real juKKR impurity runs of every kind aiida-kkr has, from 2018 to today:
KkrimpCalculation, host Green function write-outs, kkr_imp_wc, kkr_imp_sub_wc, kkr_flex_wc, kkr_imp_dos_wc and
kkr_STM_wc, in fcc Cu and in Bi2Te3. This script

1. imports them into a group (nodes already in the profile are not duplicated);
2. resolves the impurity embeddings, (host, impurity_info) pairs, from the provenance graph alone;
3. runs the ImpurityLearningWorkChain on them: the clusters as juKKR cut them (one ImpurityClusters node, one row per
   embedding), SOAP features, host lattice targets, a split, a linear SVM and its score (a handful of embeddings: the
   point is the graph, not the accuracy);
4. walks the graph back from the trained model, through the features, the clusters and the extraction's input links
   ``impurity_infos__<key>``, to the aiida-kkr calculations whose impurities it learned from, row by row.

Run with ``verdi run examples/kkr_archives.py [--archives FOLDER]``.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

from aiida import orm
from aiida.engine import run_get_node

from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel
from aiida_mlworkbench.kkr import resolve_impurity_embeddings
from aiida_mlworkbench.kkr.archives import archive_group
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

# ``verdi run`` sets ``__file__`` to the bare file name, so the default is relative to where you run it: the repository.
ARCHIVES = pathlib.Path('..', 'shared', 'data', 'aiida-kkr-archives')
GROUP_LABEL = 'mlworkbench/examples/aiida-kkr-archives'
DESCRIPTOR = {'name': 'soap', 'r_cut': 6.0, 'n_max': 4, 'l_max': 4, 'sigma': 1.0, 'average': 'inner'}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archives', type=pathlib.Path, default=ARCHIVES, help='folder of aiida-kkr archives')
    arguments = parser.parse_args()

    try:
        group = archive_group(arguments.archives, GROUP_LABEL)
    except FileNotFoundError as exception:
        raise SystemExit(f'{exception}: pass --archives FOLDER') from None
    print(f'archives of {arguments.archives} in group {group.label!r}: {group.count()} nodes')

    resolved = resolve_impurity_embeddings(group, skip_invalid=True)
    hosts = collections.Counter(embedding.host.get_formula() for embedding in resolved)
    print(f'{len(resolved)} impurity embeddings (hosts: {dict(hosts)}), {len(resolved.skipped)} nodes skipped')

    builder = ImpurityLearningWorkChain.get_builder_from_embeddings(
        resolved,
        descriptor=DESCRIPTOR,
        split={'test_fraction': 0.5, 'seed': 0, 'stratify': False},
        estimator={'estimator': 'SVC', 'parameters': {'kernel': 'linear'}},
    )
    _, run = run_get_node(builder)
    if not run.is_finished_ok:
        raise SystemExit(f'{run.process_label}<{run.pk}> failed: {run.exit_message}')
    metrics = run.outputs.metrics.get_dict()
    print(f'work chain <{run.pk}>: {metrics["n_test"]} test rows, accuracy {metrics["accuracy"]:.3f}')

    query = orm.QueryBuilder()
    query.append(TrainedModel, filters={'id': run.outputs.model.pk}, tag='model')
    query.append(orm.CalcFunctionNode, with_outgoing='model', tag='train')
    query.append(SparseFeatureMatrix, with_outgoing='train', tag='features')
    query.append(orm.CalcFunctionNode, with_outgoing='features', tag='featurize')
    query.append(ImpurityClusters, with_outgoing='featurize', tag='clusters', project='attributes.keys')
    query.append(orm.CalcFunctionNode, with_outgoing='clusters', tag='extraction')
    query.append(
        orm.Dict,
        with_outgoing='extraction',
        edge_filters={'label': {'like': 'impurity_infos__%'}},
        edge_project='label',
        edge_tag='link',
        tag='impurity_info',
    )
    query.append(
        orm.ProcessNode,
        with_incoming='impurity_info',
        filters={'process_type': {'like': 'aiida%kkr%'}},
        project=['id', 'attributes.process_label'],
        tag='kkr',
    )
    rows: dict[tuple[int, str], set[int]] = collections.defaultdict(set)  # (pk, process label) -> rows
    for result in query.iterdict():
        key = result['link']['label'].removeprefix('impurity_infos__')
        kkr = result['kkr']
        rows[kkr['id'], kkr['attributes.process_label']].add(result['clusters']['attributes.keys'].index(key))
    print(f'the model learned from impurities of {len(rows)} aiida-kkr processes:')
    for label, count in collections.Counter(label for _, label in rows).most_common():
        print(f'  {count:3d} x {label}')
    pk, label = min(rows)
    print(f'for example {label}<{pk}>: rows {sorted(rows[pk, label])} of the feature matrix')
    print(f'inspect it with: verdi process show {run.pk}   |   verdi node graph generate {run.pk}')


main()
