"""The work chain at the scale of a database: where its time goes, caching at thousands of inputs, the full database.

Usage::

    /work/venv/bin/python benchmarks/workchain_at_scale.py profile [--size 1752]   # shares of the work chain's time
    /work/venv/bin/python benchmarks/workchain_at_scale.py caching [--size 1752]   # cache lookups at that size
    /work/venv/bin/python benchmarks/workchain_at_scale.py full [--size 7100 --nl 9 --jobs 2]   # incremental SGD

Each runs on a throw-away ``core.sqlite_dos`` profile in a temporary folder (``~/.aiida`` is never touched), on the
synthetic database of ``--size`` embeddings, with the work chain's default settings unless said otherwise:

- ``profile``: one run timed, one run under cProfile; prints the share of each part of the work chain's time (the
  table of ``benchmarks/README.md``, "Where the work chain's time goes"). cProfile inflates Python-heavy parts, so the
  shares are the result, not the seconds.
- ``caching``: after one run, ``featurize`` of the same clusters with caching enabled (lookup and reuse of the stored
  matrix), and the first cluster-extraction batch run again without and with caching (aiida-core clones the outputs of
  a cached process one by one).
- ``full``: the work chain at n_max = l_max = ``--nl`` over the 60 species with an incremental ``SGDClassifier``
  (out-of-core training), on ``--jobs`` featurization jobs; prints the time, the test score and the peak RSS of this
  process and of its largest worker.
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import resource
import sys
import tempfile
import time
import typing as t

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SOAP = {'name': 'soap', 'r_cut': 6.0, 'sigma': 1.0, 'average': 'inner'}

PARTS = (
    # (part, file name, function name): the cumulative time of that function is the part's time.
    ('starting the work chain (validation of its inputs)', 'utils.py', 'instantiate_process'),
    ('cluster geometry (aiida-kkr neighbour search, StructureData)', 'clusters.py', 'cluster_structure'),
    ('storing the clusters (bulk_store: validation, clean_value, hash, one insert)', 'bulk_links.py', 'bulk_store'),
    ('featurize step (reading the structures, SOAP, HDF5 file, node)', 'impurity_learning.py', 'featurize'),
    ('targets', 'impurity_learning.py', 'make_targets'),
    ('split', 'impurity_learning.py', 'split_rows'),
    ('training (scikit-learn)', 'impurity_learning.py', 'train'),
    ('scoring (scikit-learn)', 'impurity_learning.py', 'score'),
    ('checkpoints of the work chain', 'process.py', '_save_checkpoint'),
    ('process nodes with their input links', 'bulk_links.py', '_create_and_setup_db_record'),
)


def _load_profile(folder: pathlib.Path) -> None:
    from _common import create_profile
    from aiida import load_profile

    load_profile(create_profile(folder, 'workchain-at-scale'), allow_switch=True)


def _species() -> list[str]:
    from aiida_mlworkbench.synthetic import IMPURITY_SPECIES

    return list(IMPURITY_SPECIES)


def _builder(size: int, nl: int = 5, jobs: int = 1, **inputs: t.Any) -> t.Any:
    from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
    from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

    group = create_synthetic_database(size, seed=0, reuse_existing=True)
    descriptor = {**SOAP, 'species': _species(), 'n_max': nl, 'l_max': nl}
    return ImpurityLearningWorkChain.get_builder_from_embeddings(
        iter_synthetic_embeddings(group), descriptor=descriptor, n_jobs=jobs, **inputs
    )


def _run(builder: t.Any) -> tuple[t.Any, t.Any, float]:
    from aiida.engine import run_get_node

    start = time.perf_counter()
    results, node = run_get_node(builder)
    seconds = time.perf_counter() - start
    if not node.is_finished_ok:
        raise RuntimeError(f'{node} failed: {node.exit_status} {node.exit_message}')
    return results, node, seconds


def profile(size: int) -> None:
    _, _, seconds = _run(_builder(size))
    print(f'work chain on {size} embeddings: {seconds:.1f} s without the profiler')
    profiler = cProfile.Profile()
    builder = _builder(size)
    profiler.enable()
    _run(builder)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def cumulative(file_name: str, function: str) -> float:
        return sum(
            entry[3]
            for (path, _, name), entry in stats.items()
            if name == function and pathlib.Path(path).name == file_name
        )

    total = cumulative('launch.py', 'run_get_node')
    print(f'under cProfile: {total:.1f} s; share of each part:')
    for part, file_name, function in PARTS:
        print(f'  {100 * cumulative(file_name, function) / total:5.1f} %  {part}')


def caching(size: int) -> None:
    from aiida.common.links import LinkType
    from aiida.manage.caching import enable_caching

    from aiida_mlworkbench.calcfunctions.clusters import impurity_cluster_structures
    from aiida_mlworkbench.calcfunctions.featurize import featurize, row_label

    results, node, seconds = _run(_builder(size))
    print(f'work chain on {size} embeddings: {seconds:.1f} s')
    featurized = next(called for called in node.called if called.process_label == 'featurize')
    clusters = results['clusters']
    inputs = {row_label(row): clusters[key] for row, key in enumerate(sorted(clusters))}
    start = time.perf_counter()
    with enable_caching():
        _, cached = featurize.run_get_node(descriptor=featurized.inputs.descriptor, **inputs)
    print(
        f'featurize of {len(inputs)} clusters with caching: {time.perf_counter() - start:.2f} s, taken from the cache: '
        f'{cached.base.caching.get_cache_source() == featurized.uuid}'
    )

    extraction = next(called for called in node.called if called.process_label == 'impurity_cluster_structures')
    nested: dict[str, t.Any] = {}
    for link in extraction.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all():
        *namespaces, name = link.link_label.split('__')
        target = nested
        for namespace in namespaces:
            target = target.setdefault(namespace, {})
        target[name] = link.node
    nested.pop('metadata', None)
    for label, use_cache in (('without caching', False), ('with caching', True)):
        start = time.perf_counter()
        if use_cache:
            with enable_caching():
                outputs, again = impurity_cluster_structures.run_get_node(**nested)
        else:
            outputs, again = impurity_cluster_structures.run_get_node(**nested)
        print(
            f'cluster extraction of a batch of {len(outputs["clusters"])} {label}: {time.perf_counter() - start:.1f} s '
            f'(from the cache: {again.base.caching.is_created_from_cache})'
        )


def full(size: int, nl: int, jobs: int) -> None:
    estimator = {
        'estimator': 'SGDClassifier',
        'parameters': {'random_state': 0},
        'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
        'training': {'mode': 'incremental', 'epochs': 5},
    }
    results, _, seconds = _run(_builder(size, nl, jobs, estimator=estimator))
    rows, columns = results['features'].shape
    print(f'work chain on {size} embeddings, n_max = l_max = {nl}, {jobs} job(s), incremental SGDClassifier')
    print(f'features {rows} x {columns}; {seconds:.1f} s; test score {results["score"].value:.4f}')
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    print(f'peak RSS: this process {own:.2f} GB, largest worker {worker:.2f} GB')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    for name in ('profile', 'caching'):
        command = commands.add_parser(name)
        command.add_argument('--size', type=int, default=1752, help='embeddings (default 1752)')
    command = commands.add_parser('full')
    command.add_argument('--size', type=int, default=7100, help='embeddings (default 7100)')
    command.add_argument('--nl', type=int, default=9, help='n_max = l_max (default 9)')
    command.add_argument('--jobs', type=int, default=2, help='featurization jobs (default 2)')
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='mlworkbench-workchain-at-scale-') as folder:
        _load_profile(pathlib.Path(folder))
        if args.command == 'profile':
            profile(args.size)
        elif args.command == 'caching':
            caching(args.size)
        else:
            full(args.size, args.nl, args.jobs)
    return 0


if __name__ == '__main__':
    sys.exit(main())
