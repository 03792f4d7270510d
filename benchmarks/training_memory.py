"""Training memory: incremental SGDClassifier training through ``train_model`` against the plain in-memory fit.

For N = 1752 and N = 7100 rows, a random CSR matrix shaped like the SOAP matrices of the reference study at
n_max = l_max = 9 (1,460,700 columns, about 1,710 non-zeros per row, float64) is stored as a ``SparseFeatureMatrix`` on
a throw-away ``core.sqlite_dos`` profile (its own ``AIIDA_PATH`` in a temporary folder, deleted at the end), with
random lattice-type targets and a stratified split from ``split_rows``. Then, each in a fresh child process whose peak
RSS is its own ``ru_maxrss`` (from ``wait4``):

* package: ``train_model`` with ``SGDClassifier`` + ``StandardScaler(with_mean=False)`` and
  ``'training': {'mode': 'incremental', 'epochs': 5, 'block_size': 1024}``: the train rows are streamed from the HDF5
  file block by block, and the fitted pipeline is stored as a ``TrainedModel``;
* plain: the same matrix from a ``scipy.sparse.save_npz`` file, fully in memory, its train rows scaled by
  ``StandardScaler(with_mean=False)`` and fitted by ``SGDClassifier(max_iter=5, tol=None)``.

The target of issue 5: the peak RSS of the package's training at N = 7100 is within 1.2x of that at N = 1752.

    python benchmarks/training_memory.py            # N = 1752 and 7100 (about 2 minutes)
    python benchmarks/training_memory.py --quick    # N = 150 and 600, a check

Exit code: 0 if the target passes, 1 if it fails, 2 if a training run failed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable, Sequence

import numpy as np

try:  # imported as benchmarks.training_memory
    from . import _common
except ImportError:  # run as a script, or imported with this folder on sys.path
    import _common

SIZES = (1752, 7100)
QUICK_SIZES = (150, 600)
EPOCHS = 5
BLOCK_SIZE = 1024
CLASSES = ('bcc', 'fcc', 'hcp')
RSS_RATIO_TARGET = 1.2
TARGET = f'peak RSS of training at N={SIZES[1]} is within {RSS_RATIO_TARGET}x of N={SIZES[0]}'
PROFILE_NAME = 'training-memory-benchmark'
GENERATOR_BLOCK_ROWS = 500
SCRIPT = pathlib.Path(__file__).resolve()

__all__ = ('SIZES', 'TARGET', 'check_target', 'estimator_specification', 'format_table', 'main', 'measure')


def estimator_specification(epochs: int = EPOCHS, block_size: int = BLOCK_SIZE) -> dict[str, t.Any]:
    """The package's estimator specification: incremental SGDClassifier behind StandardScaler(with_mean=False)."""
    return {
        'estimator': 'SGDClassifier',
        'parameters': {'random_state': 0},
        'scaler': {'name': 'StandardScaler', 'parameters': {'with_mean': False}},
        'training': {'mode': 'incremental', 'epochs': epochs, 'block_size': block_size, 'shuffle_seed': 0},
    }


# Tasks, each run in its own child process ------------------------------------------------------------------------


def _load_profile() -> None:
    import aiida

    aiida.load_profile(PROFILE_NAME, allow_switch=True)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def task_prepare(n_rows: int, n_features: int, nnz_per_row: int, seed: int, workdir: str) -> dict[str, t.Any]:
    """Store the features (streamed, block by block), targets and split; write the same data for the plain way."""
    import scipy.sparse
    from aiida import orm

    from aiida_mlworkbench.calcfunctions.split import split_rows
    from aiida_mlworkbench.data import SparseFeatureMatrix

    _load_profile()

    def blocks() -> t.Iterator[t.Any]:
        for first in range(0, n_rows, GENERATOR_BLOCK_ROWS):
            yield _common.row_block(first, min(first + GENERATOR_BLOCK_ROWS, n_rows), n_features, nnz_per_row, seed)

    features = SparseFeatureMatrix.from_blocks(blocks(), n_features, descriptor={'name': 'benchmark'}).store()
    labels = np.array(CLASSES)[np.random.default_rng([seed, n_rows]).integers(len(CLASSES), size=n_rows)]
    targets = orm.ArrayData()
    targets.set_array('targets', labels)
    targets.store()
    split = split_rows(targets, seed=seed)

    plain = pathlib.Path(workdir) / f'plain-{n_rows}'
    matrix = scipy.sparse.vstack(list(blocks()), format='csr')
    # 32-bit indices, as the package reads them: scikit-learn's SGD refuses 64-bit ones (vstack may upcast).
    matrix.indices, matrix.indptr = matrix.indices.astype(np.int32), matrix.indptr.astype(np.int32)
    scipy.sparse.save_npz(f'{plain}.npz', matrix, compressed=False)
    np.savez(f'{plain}-targets.npz', targets=labels, train=split.get_array('train'))
    return {'features': features.pk, 'targets': targets.pk, 'split': split.pk, 'nnz': features.nnz, 'plain': str(plain)}


def task_package(features: int, targets: int, split: int, epochs: int, block_size: int) -> dict[str, t.Any]:
    """Incremental training through the ``train_model`` calcfunction; the model is stored."""
    from aiida import orm

    from aiida_mlworkbench.calcfunctions.train import train_model

    _load_profile()
    nodes = [orm.load_node(pk) for pk in (features, targets, split)]
    specification = orm.Dict(estimator_specification(epochs, block_size))
    rss_before = _rss()
    start = time.perf_counter()
    _, node = train_model.run_get_node(*nodes, specification)
    seconds = time.perf_counter() - start
    return {'train_s': seconds, 'rss_before': rss_before, 'exit_status': node.exit_status, 'node': node.pk}


def task_plain(plain: str, epochs: int) -> dict[str, t.Any]:
    """The plain way: the whole CSR matrix in memory, its train rows scaled and fitted by SGDClassifier.fit."""
    import warnings

    import scipy.sparse
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    rss_before = _rss()
    start = time.perf_counter()
    matrix = scipy.sparse.load_npz(f'{plain}.npz')
    arrays = np.load(f'{plain}-targets.npz')
    train = arrays['train']
    rows = StandardScaler(with_mean=False).fit_transform(matrix[train])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ConvergenceWarning)
        SGDClassifier(max_iter=epochs, tol=None, random_state=0).fit(rows, arrays['targets'][train])
    return {'train_s': time.perf_counter() - start, 'rss_before': rss_before, 'exit_status': 0}


TASKS: dict[str, Callable[..., dict[str, t.Any]]] = {
    'prepare': task_prepare,
    'package': task_package,
    'plain': task_plain,
}


def run_task(name: str, **kwargs: t.Any) -> dict[str, t.Any]:
    """Run a task in a fresh child process; its result with ``peak_rss`` (bytes) and ``wall_s`` (whole child)."""
    result, peak_rss, wall = _common.run_child([sys.executable, str(SCRIPT), '--_task', name, json.dumps(kwargs)])
    return {**result, 'peak_rss': peak_rss, 'wall_s': wall}


# Parent -----------------------------------------------------------------------------------------------------------


def measure(
    sizes: Sequence[int] = SIZES,
    *,
    epochs: int = EPOCHS,
    block_size: int = BLOCK_SIZE,
    n_features: int = _common.SOAP_FEATURES,
    nnz_per_row: int = _common.SOAP_NNZ_PER_ROW,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, t.Any]]:
    """Prepare the data and train both ways for each size, on a throw-away profile; one result per size.

    Each result: ``n``, ``nnz``, and for ``package`` and ``plain`` the child's ``peak_rss`` (bytes), ``rss_before``
    (after the imports), ``train_s`` (the training call, reading the matrix included), ``wall_s`` (the whole child)
    and ``exit_status``.
    """
    log = log or (lambda message: None)
    results = []
    with tempfile.TemporaryDirectory(prefix='mlworkbench-training-benchmark-') as tmp:
        directory = pathlib.Path(tmp)
        _common.create_profile(directory, PROFILE_NAME)
        for n_rows in sizes:
            log(f'N={n_rows}: storing the feature matrix ...')
            prepared = run_task(
                'prepare', n_rows=n_rows, n_features=n_features, nnz_per_row=nnz_per_row, seed=seed, workdir=tmp
            )
            log(f'N={n_rows}: training, package ...')
            nodes = {key: prepared[key] for key in ('features', 'targets', 'split')}
            package = run_task('package', **nodes, epochs=epochs, block_size=block_size)
            log(f'N={n_rows}: training, plain ...')
            plain = run_task('plain', plain=prepared['plain'], epochs=epochs)
            results.append({'n': n_rows, 'nnz': prepared['nnz'], 'package': package, 'plain': plain})
    return results


def rss_ratio(results: Sequence[dict[str, t.Any]], way: str = 'package') -> float:
    """Peak RSS of the largest size over that of the smallest."""
    ordered = sorted(results, key=lambda result: result['n'])
    return ordered[-1][way]['peak_rss'] / ordered[0][way]['peak_rss']


def check_target(results: Sequence[dict[str, t.Any]]) -> tuple[bool, str]:
    """Whether the package's peak RSS at the largest size is within ``RSS_RATIO_TARGET`` of the smallest, and a line."""
    ordered = sorted(results, key=lambda result: result['n'])
    ratio = rss_ratio(ordered)
    passed = ratio <= RSS_RATIO_TARGET
    line = (
        f'{"PASS" if passed else "FAIL"}: peak RSS of training at N={ordered[-1]["n"]} is {ratio:.2f}x that at '
        f'N={ordered[0]["n"]} (target: within {RSS_RATIO_TARGET}x)'
    )
    return passed, line


def format_table(results: Sequence[dict[str, t.Any]]) -> str:
    """The table of the results: per size and way, training time, child wall time, RSS after imports, peak RSS."""
    mb = _common.MB
    lines = [
        f'{"N":>6}  {"way":<8}{"training (s)":>14}{"child wall (s)":>16}{"RSS after imports (MB)":>24}'
        f'{"peak RSS (MB)":>15}'
    ]
    for result in sorted(results, key=lambda result: result['n']):
        for way in ('package', 'plain'):
            run = result[way]
            lines.append(
                f'{result["n"]:>6}  {way:<8}{run["train_s"]:>14.1f}{run["wall_s"]:>16.1f}'
                f'{run["rss_before"] / mb:>24.0f}{run["peak_rss"] / mb:>15.0f}'
            )
    if len(results) > 1:
        lines.append(
            f'peak RSS ratio N={max(r["n"] for r in results)} / N={min(r["n"] for r in results)}: package '
            f'{rss_ratio(results):.2f}x, plain {rss_ratio(results, "plain"):.2f}x'
        )
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=list(SIZES), help='numbers of rows (default 1752 7100)')
    parser.add_argument('--quick', action='store_true', help=f'sizes {QUICK_SIZES}, a fast check')
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--block-size', type=int, default=BLOCK_SIZE)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--_task', nargs=2, metavar=('NAME', 'JSON'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._task:
        name, kwargs = args._task
        print(json.dumps(TASKS[name](**json.loads(kwargs))))
        return 0

    sizes = QUICK_SIZES if args.quick else tuple(args.sizes)
    print(_common.header(('aiida-core', 'aiida-mlworkbench', 'scikit-learn', 'numpy', 'scipy', 'h5py')))
    print(
        f'matrix: N x {_common.SOAP_FEATURES:,}, about {_common.SOAP_NNZ_PER_ROW} non-zeros per row, float64; '
        f'SGDClassifier, {len(CLASSES)} classes, {args.epochs} epochs; package block_size {args.block_size}'
    )
    results = measure(
        sizes, epochs=args.epochs, block_size=args.block_size, seed=args.seed, log=lambda m: print(m, flush=True)
    )
    print(format_table(results))
    failed = [f'N={r["n"]}' for r in results if r['package']['exit_status'] != 0]
    if failed:
        print(f'FAILED: train_model did not finish ok for {", ".join(failed)}', file=sys.stderr)
        return 2
    if len(results) < 2:
        return 0
    passed, line = check_target(results)
    print(line)
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
