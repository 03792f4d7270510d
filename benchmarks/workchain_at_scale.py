"""The work chain at the scale of a database: where its time goes, caching at thousands of inputs, the full database.

Usage::

    python benchmarks/workchain_at_scale.py profile [--size 1752]   # shares of the work chain's time
    python benchmarks/workchain_at_scale.py caching [--size 1752]   # cache lookups at that size
    python benchmarks/workchain_at_scale.py full [--size 7100 --nl 9 --jobs 2]   # incremental SGD, out of core

Each runs on a throw-away ``core.sqlite_dos`` profile in a temporary folder (``~/.aiida`` is never touched), on the
synthetic database of ``--size`` embeddings, with the work chain from the embeddings
(``ImpurityLearningWorkChain.get_builder_from_embeddings``: one process that extracts the clusters) and its default
settings unless said otherwise. With ``MLWORKBENCH_PLAIN_AIIDA=1`` in the environment every command runs on plain
aiida-core, without ``aiida_mlworkbench.engine``.

- ``profile``: one run timed, one run under cProfile; prints where the timed run's time went (the times the process
  nodes record) and the share of each part of the profiled run (the table of ``benchmarks/README.md``, "Where the work
  chain's time goes"). cProfile inflates Python-heavy parts, so the shares are the result, not the seconds.
- ``caching``: after one run, ``featurize`` of its clusters with caching enabled (lookup and reuse of the stored
  matrix), and the cluster extraction of its embeddings run again without and with caching.
- ``full``: the work chain at n_max = l_max = ``--nl`` over the 60 species with an incremental ``SGDClassifier``
  (out-of-core training), on ``--jobs`` featurization jobs; prints the time, the test score and the peak RSS of this
  process and its workers together. ``benchmarks/run.py`` measures it as the case ``workchain-7100-9``
  (:func:`full_run`).
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

FULL_JOBS = 2
"""Featurization jobs of ``full``: both cores of the reference machine."""

FULL_ESTIMATOR = {
    'estimator': 'SGDClassifier',
    'parameters': {'random_state': 0},
    'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
    'training': {'mode': 'incremental', 'epochs': 5},
}
"""The estimator of ``full``: streamed from the HDF5 file block by block, so the matrix is never in memory."""

PARTS = (
    # (part, path suffix of the file, function name): the cumulative time of that function is the part's time.
    # Indented parts are inside the part above them; parts nest, so the shares do not add up to 100 %.
    ('starting the work chain (validating inputs, storing its node)', 'aiida/engine/utils.py', 'instantiate_process'),
    (
        'process nodes stored with their input links and hashes (all processes)',
        'aiida/engine/processes/process.py',
        '_create_and_setup_db_record',
    ),
    (
        "  linking the inputs, aiida-core's way (Process._setup_inputs: below 200 inputs, or with the module off)",
        'aiida/engine/processes/process.py',
        '_setup_inputs',
    ),
    (
        '  linking the inputs, the engine way (ManyInputs._setup_inputs; includes the line above when it defers)',
        'aiida_mlworkbench/engine/__init__.py',
        '_setup_inputs',
    ),
    (
        '  the self-check after each such store (engine check_stored_inputs)',
        'aiida_mlworkbench/engine/__init__.py',
        'check_stored_inputs',
    ),
    ('cluster extraction step (process, geometry, file, store)', 'workflows/impurity_learning.py', 'extract_clusters'),
    (
        '  the extract_impurity_clusters calcfunction body',
        'aiida_mlworkbench/calcfunctions/clusters.py',
        'extract_impurity_clusters',
    ),
    ('    cluster geometry (aiida-kkr neighbour search)', 'aiida_mlworkbench/kkr/geometry.py', 'impurity_cluster'),
    ('    the ImpurityClusters file (checks, HDF5)', 'aiida_mlworkbench/data/impurity_clusters.py', '__init__'),
    ('featurize step (reading the clusters, SOAP, HDF5 file, node)', 'workflows/impurity_learning.py', 'featurize'),
    ('targets', 'workflows/impurity_learning.py', 'make_targets'),
    ('split', 'workflows/impurity_learning.py', 'split_rows'),
    ('training (scikit-learn)', 'workflows/impurity_learning.py', 'train'),
    ('scoring (scikit-learn)', 'workflows/impurity_learning.py', 'score'),
    ('checkpoints of the work chain (Process._save_checkpoint)', 'engine/processes/process.py', '_save_checkpoint'),
)


def _load_profile(folder: pathlib.Path) -> None:
    from _common import create_profile
    from aiida import load_profile

    load_profile(create_profile(folder, 'workchain-at-scale'), allow_switch=True)


def _species() -> list[str]:
    from aiida_mlworkbench.synthetic import IMPURITY_SPECIES

    return list(IMPURITY_SPECIES)


def _builder(size: int, nl: int = 5, jobs: int = 1, **inputs: t.Any) -> t.Any:
    """The work chain's builder for the synthetic database of ``size`` embeddings (created if missing)."""
    from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
    from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

    group = create_synthetic_database(size, seed=0, reuse_existing=True)
    descriptor = {**SOAP, 'species': _species(), 'n_max': nl, 'l_max': nl}
    return ImpurityLearningWorkChain.get_builder_from_embeddings(
        iter_synthetic_embeddings(group), descriptor=descriptor, n_jobs=jobs, **inputs
    )


def _print_steps(steps: dict[str, float]) -> None:
    print('  ' + ', '.join(f'{name} {seconds:.1f} s' for name, seconds in steps.items()))


def profile(size: int) -> None:
    from _common import run_workchain, workchain_steps

    from aiida_mlworkbench.engine import acceleration_enabled

    _, node, seconds, epoch = run_workchain(_builder(size))
    engine = 'with the engine module' if acceleration_enabled() else 'on plain aiida-core'
    print(f'work chain on {size} embeddings ({engine}): {seconds:.1f} s without the profiler; its steps:')
    _print_steps(workchain_steps(node, epoch, seconds))
    profiler = cProfile.Profile()
    builder = _builder(size)
    profiler.enable()
    run_workchain(builder)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def cumulative(suffix: str, function: str) -> float:
        return sum(entry[3] for (path, _, name), entry in stats.items() if name == function and path.endswith(suffix))

    total = cumulative('aiida/engine/launch.py', 'run_get_node')
    print(f'under cProfile: {total:.1f} s; share of each part (indented parts are inside the one above):')
    for part, suffix, function in PARTS:
        print(f'  {100 * cumulative(suffix, function) / total:5.1f} %  {part}')


def caching(size: int) -> None:
    from _common import run_workchain
    from aiida.common.links import LinkType
    from aiida.manage.caching import enable_caching

    from aiida_mlworkbench.calcfunctions.clusters import extract_impurity_clusters
    from aiida_mlworkbench.calcfunctions.featurize import featurize

    results, node, seconds, _ = run_workchain(_builder(size))
    print(f'work chain on {size} embeddings: {seconds:.1f} s')
    featurized = node.base.links.get_outgoing(link_label_filter='featurize').one().node
    start = time.perf_counter()
    with enable_caching():
        _, cached = featurize.run_get_node(clusters=results['clusters'], descriptor=featurized.inputs.descriptor)
    print(
        f'featurize of the {len(results["clusters"])} clusters with caching: {time.perf_counter() - start:.2f} s, '
        f'taken from the cache: {cached.base.caching.get_cache_source() == featurized.uuid}'
    )

    extraction = node.base.links.get_outgoing(link_label_filter='extract_clusters').one().node
    nested: dict[str, t.Any] = {}
    for link in extraction.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all():
        *namespaces, name = link.link_label.split('__')
        target = nested
        for namespace in namespaces:
            target = target.setdefault(namespace, {})
        target[name] = link.node
    for label, use_cache in (('without caching', False), ('with caching', True)):
        start = time.perf_counter()
        if use_cache:
            with enable_caching():
                _, again = extract_impurity_clusters.run_get_node(**nested)
        else:
            _, again = extract_impurity_clusters.run_get_node(**nested)
        print(
            f'cluster extraction of the {len(nested["impurity_infos"])} embeddings again {label}: '
            f'{time.perf_counter() - start:.1f} s (from the cache: {again.base.caching.is_created_from_cache})'
        )


def full_run(size: int, nl: int, jobs: int) -> dict[str, t.Any]:
    """Run the work chain of ``full`` in the loaded profile; return its time (the builder included), the time of
    each step, the test score, the feature shape and the peak RSS of this process and its workers."""
    from _common import TreeRss, run_workchain, workchain_steps

    with TreeRss() as memory:
        start = time.perf_counter()
        builder = _builder(size, nl, jobs, estimator=FULL_ESTIMATOR)
        builder_seconds = time.perf_counter() - start
        results, node, run_seconds, epoch = run_workchain(builder)
        seconds = time.perf_counter() - start
    return {
        'seconds': seconds,
        'steps': {'builder': builder_seconds, **workchain_steps(node, epoch, run_seconds)},
        'score': results['score'].value,
        'shape': list(results['features'].shape),
        'peak_rss_self': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        'peak_rss_tree': memory.peak,
    }


def full(size: int, nl: int, jobs: int) -> None:
    from aiida_mlworkbench.synthetic import create_synthetic_database

    create_synthetic_database(size, seed=0, reuse_existing=True)  # not part of the time
    result = full_run(size, nl, jobs)
    rows, columns = result['shape']
    print(f'work chain on {size} embeddings, n_max = l_max = {nl}, {jobs} job(s), incremental SGDClassifier')
    print(f'features {rows} x {columns:,}; {result["seconds"]:.1f} s; test score {result["score"]:.4f}; steps:')
    _print_steps(result['steps'])
    print(
        f'peak RSS: this process {result["peak_rss_self"] / 1e9:.2f} GB, with its workers (sampled every 50 ms) '
        f'{result["peak_rss_tree"] / 1e9:.2f} GB'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    for name in ('profile', 'caching'):
        command = commands.add_parser(name)
        command.add_argument('--size', type=int, default=1752, help='embeddings (default 1752)')
    command = commands.add_parser('full')
    command.add_argument('--size', type=int, default=7100, help='embeddings (default 7100)')
    command.add_argument('--nl', type=int, default=9, help='n_max = l_max (default 9)')
    command.add_argument('--jobs', type=int, default=FULL_JOBS, help=f'featurization jobs (default {FULL_JOBS})')
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
