"""Sparse matrix I/O: :class:`SparseFeatureMatrix` on a throw-away AiiDA profile against plain h5py on a plain file.

A random CSR matrix (default 7100 x 1,460,700, about 1,710 non-zeros per row, float64, sorted column indices) is
generated row by row from a seeded RNG, so that the package's writer never sees more than one block of it. Each phase
runs in its own child process, so that its peak RSS (the child's ``ru_maxrss``) is not mixed with the others':

* write: ``SparseFeatureMatrix.from_blocks(...)`` + ``store()``, against ``h5py.File(path, 'w')`` with three datasets
  written from the whole CSR arrays in memory (the plain way needs the whole matrix in memory first);
* full read: ``get_matrix()`` (checksum verified), against ``f['data'][:]`` etc.;
* 256-row block read: ``get_rows(slice(i, i + 256))``, against opening the file and slicing through ``indptr``; median
  over random block positions after a warm-up.

Every phase reports a SHA-256 digest of the content it wrote or read; the run fails unless they all agree. The AiiDA
profile (``core.sqlite_dos``) lives in a temporary folder with its own ``AIIDA_PATH``, and is deleted at the end.

    python benchmarks/sparse_matrix_io.py            # 7100 x 1,460,700, about 1,710 non-zeros per row
    python benchmarks/sparse_matrix_io.py --quick    # 710 rows, a few seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Iterator

import numpy as np

try:  # imported as benchmarks.sparse_matrix_io
    from ._common import MB, create_profile, header, row_block
except ImportError:  # run as a script
    from _common import MB, create_profile, header, row_block

BLOCK_ROWS = 256
GENERATOR_BLOCK_ROWS = 500
FULL_READ_REPEATS = 3
BLOCK_READ_WARMUP = 3
BLOCK_READ_REPEATS = 31
SCAN_REPEATS = 3
RSS_LIMIT = 2**30
BLOCK_RATIO_LIMIT = 2.0
PLAIN_FILENAME = 'plain.h5'
PROFILE_NAME = 'sparse-matrix-io-benchmark'


class ContentDigest:
    """SHA-256 of CSR content (global ``indptr`` as int64, ``indices`` as int32, ``data`` as float64), fed by rows."""

    def __init__(self) -> None:
        self._parts = {name: hashlib.sha256() for name in ('indptr', 'indices', 'data')}
        self._parts['indptr'].update(np.zeros(1, dtype=np.int64).tobytes())
        self._nnz = 0

    def update(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Add consecutive rows given by their local CSR arrays (``indptr`` starting at its own offset)."""
        tail = np.asarray(indptr[1:], dtype=np.int64) - int(indptr[0]) + self._nnz
        self._parts['indptr'].update(memoryview(np.ascontiguousarray(tail)))
        self._parts['indices'].update(memoryview(np.ascontiguousarray(indices, dtype=np.int32)))
        self._parts['data'].update(memoryview(np.ascontiguousarray(data, dtype=np.float64)))
        if tail.size:
            self._nnz = int(tail[-1])

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for part in self._parts.values():
            total.update(part.digest())
        return total.hexdigest()


class TimedBlocks:
    """Iterable of the matrix's row blocks that times its own work and digests what it yields.

    ``seconds`` is the time spent generating (and digesting) blocks, to subtract from the writer's wall time.
    """

    def __init__(self, n_rows: int, n_features: int, nnz_per_row: int, seed: int) -> None:
        self.n_rows, self.n_features, self.nnz_per_row, self.seed = n_rows, n_features, nnz_per_row, seed
        self.digest = ContentDigest()
        self.seconds = 0.0

    def __iter__(self) -> Iterator[t.Any]:
        for first in range(0, self.n_rows, GENERATOR_BLOCK_ROWS):
            start = time.perf_counter()
            block = row_block(
                first, min(first + GENERATOR_BLOCK_ROWS, self.n_rows), self.n_features, self.nnz_per_row, self.seed
            )
            self.digest.update(block.indptr, block.indices, block.data)
            self.seconds += time.perf_counter() - start
            yield block


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports ``ru_maxrss`` in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def block_positions(n_rows: int, seed: int) -> list[int]:
    """Start rows of the warm-up and timed 256-row block reads, the same for both ways."""
    rng = np.random.default_rng([seed, 256])
    count = BLOCK_READ_WARMUP + BLOCK_READ_REPEATS
    return [int(i) for i in rng.integers(0, max(1, n_rows - BLOCK_ROWS + 1), size=count)]


def digest_of(matrix: t.Any) -> str:
    digest = ContentDigest()
    digest.update(matrix.indptr, matrix.indices, matrix.data)
    return digest.hexdigest()


# Phases, each run in its own child process ---------------------------------------------------------------------


def phase_plain_write(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, t.Any]:
    """Build the whole CSR matrix in memory, then time writing it with h5py to a plain file."""
    import h5py
    import scipy.sparse

    blocks = TimedBlocks(args.rows, args.features, args.nnz_per_row, args.seed)
    matrix = scipy.sparse.vstack(list(blocks), format='csr')
    # The same dtypes as the package stores (scipy's vstack may upcast the indices to int64).
    matrix.indices, matrix.indptr = matrix.indices.astype(np.int32), matrix.indptr.astype(np.int64)
    rss_before = current_rss()
    path = workdir / PLAIN_FILENAME
    start = time.perf_counter()
    with h5py.File(path, 'w') as handle:
        handle.attrs['shape'] = matrix.shape
        handle.create_dataset('data', data=matrix.data)
        handle.create_dataset('indices', data=matrix.indices)
        handle.create_dataset('indptr', data=matrix.indptr)
    seconds = time.perf_counter() - start
    return {
        'write_s': seconds,
        'generate_s': blocks.seconds,
        'rss_before': rss_before,
        'peak_rss': peak_rss(),
        'size': path.stat().st_size,
        'nnz': int(matrix.nnz),
        'digest': blocks.digest.hexdigest(),
    }


def phase_package_write(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, t.Any]:
    """Time ``from_blocks`` + ``store`` from the streaming generator; its own time is subtracted."""
    from aiida_mlworkbench.data import SparseFeatureMatrix

    # Warm-up on a tiny matrix (not stored): one-time imports and the default-user query are not part of the write.
    SparseFeatureMatrix.from_blocks([row_block(0, 2, 10, 2, args.seed)], 10)
    blocks = TimedBlocks(args.rows, args.features, args.nnz_per_row, args.seed)
    rss_before = current_rss()
    start = time.perf_counter()
    node = SparseFeatureMatrix.from_blocks(blocks, args.features, descriptor={'name': 'benchmark'}, dtype='float64')
    built = time.perf_counter()
    node.store()
    stored = time.perf_counter()
    with node.base.repository.open(node.FILENAME, mode='rb') as stream:
        size = stream.seek(0, os.SEEK_END)
    return {
        'write_s': stored - start - blocks.seconds,
        'from_blocks_s': built - start - blocks.seconds,
        'store_s': stored - built,
        'generate_s': blocks.seconds,
        'rss_before': rss_before,
        'peak_rss': peak_rss(),
        'size': size,
        'nnz': node.nnz,
        'pk': node.pk,
        'digest': blocks.digest.hexdigest(),
    }


def read_plain(path: pathlib.Path) -> t.Any:
    import h5py
    import scipy.sparse

    with h5py.File(path, 'r') as handle:
        shape = tuple(int(x) for x in handle.attrs['shape'])
        data, indices, indptr = handle['data'][:], handle['indices'][:], handle['indptr'][:]
    return scipy.sparse.csr_array((data, indices, indptr), shape=shape)


def read_plain_rows(handle: t.Any, first: int, stop: int, n_features: int) -> t.Any:
    import scipy.sparse

    indptr = handle['indptr'][first : stop + 1]
    low, high = int(indptr[0]), int(indptr[-1])
    indices, data = handle['indices'][low:high], handle['data'][low:high]
    return scipy.sparse.csr_array((data, indices, indptr - low), shape=(stop - first, n_features))


def timed_full_reads(read: t.Callable[[], t.Any]) -> tuple[float, str]:
    """Median wall time of ``FULL_READ_REPEATS`` full reads, and the digest of what was read."""
    times, digest = [], ''
    for _ in range(FULL_READ_REPEATS):
        start = time.perf_counter()
        matrix = read()
        times.append(time.perf_counter() - start)
        digest = digest_of(matrix)
        del matrix
    return statistics.median(times), digest


def timed_block_reads(readers: dict[str, t.Callable[[int, int], t.Any]], n_rows: int, seed: int) -> dict[str, t.Any]:
    """Median wall time of each reader's timed block reads after the warm-up ones, and a digest of the blocks read.

    The readers take turns at each block position, in a rotating order, so that a change of the machine's load during
    the run affects them alike.
    """
    names = list(readers)
    times: dict[str, list[float]] = {name: [] for name in names}
    digests = {name: hashlib.sha256() for name in names}
    for count, first in enumerate(block_positions(n_rows, seed)):
        stop = min(first + BLOCK_ROWS, n_rows)
        for name in names[count % len(names) :] + names[: count % len(names)]:
            start = time.perf_counter()
            block = readers[name](first, stop)
            elapsed = time.perf_counter() - start
            if count >= BLOCK_READ_WARMUP:
                times[name].append(elapsed)
                digests[name].update(digest_of(block).encode())
    return {name: (statistics.median(times[name]), digests[name].hexdigest()) for name in names}


def phase_plain_read(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, t.Any]:
    seconds, digest = timed_full_reads(lambda: read_plain(workdir / PLAIN_FILENAME))
    return {'read_s': seconds, 'digest': digest, 'peak_rss': peak_rss()}


def phase_package_read(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, t.Any]:
    from aiida import orm

    node = orm.load_node(args.pk)
    seconds, digest = timed_full_reads(node.get_matrix)
    unverified_s, _ = timed_full_reads(lambda: node.get_matrix(verify=False))
    return {'read_s': seconds, 'read_unverified_s': unverified_s, 'digest': digest, 'peak_rss': peak_rss()}


def phase_block_read(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, t.Any]:
    """Block reads of both ways, taking turns: ``get_rows``, plain h5py opening the file, plain h5py kept open."""
    import h5py
    from aiida import orm

    node = orm.load_node(args.pk)
    path = workdir / PLAIN_FILENAME

    def plain(first: int, stop: int) -> t.Any:
        with h5py.File(path, 'r') as handle:
            return read_plain_rows(handle, first, stop, args.features)

    with h5py.File(path, 'r') as kept_open:
        results = timed_block_reads(
            {
                'package': lambda first, stop: node.get_rows(slice(first, stop)),
                'plain': plain,
                'plain_open': lambda first, stop: read_plain_rows(kept_open, first, stop, args.features),
            },
            args.rows,
            args.seed,
        )
        scan = timed_scans(
            {
                'package': lambda: node.iter_blocks(BLOCK_ROWS),
                'plain': lambda: (
                    read_plain_rows(kept_open, first, min(first + BLOCK_ROWS, args.rows), args.features)
                    for first in range(0, args.rows, BLOCK_ROWS)
                ),
            }
        )
    n_blocks = -(-args.rows // BLOCK_ROWS)
    summary = {name: {'seconds': seconds, 'digest': digest} for name, (seconds, digest) in results.items()}
    for name, (seconds, digest) in scan.items():
        summary[f'{name}_scan'] = {'seconds': seconds / n_blocks, 'digest': digest}
    return summary


def timed_scans(scans: dict[str, t.Callable[[], Iterator[t.Any]]]) -> dict[str, tuple[float, str]]:
    """Median wall time of ``SCAN_REPEATS`` sequential scans through all row blocks, taking turns, and a digest."""
    times: dict[str, list[float]] = {name: [] for name in scans}
    digests = {}
    for _ in range(SCAN_REPEATS):
        for name, scan in scans.items():
            digest = ContentDigest()
            elapsed = 0.0
            start = time.perf_counter()
            for block in scan():
                elapsed += time.perf_counter() - start
                digest.update(block.indptr, block.indices, block.data)
                start = time.perf_counter()
            times[name].append(elapsed + time.perf_counter() - start)
            digests[name] = digest.hexdigest()
    return {name: (statistics.median(times[name]), digests[name]) for name in scans}


PHASES: dict[str, t.Callable[[argparse.Namespace, pathlib.Path], dict[str, t.Any]]] = {
    'plain-write': phase_plain_write,
    'package-write': phase_package_write,
    'plain-read': phase_plain_read,
    'package-read': phase_package_read,
    'block-read': phase_block_read,
}


def run_child_phase(args: argparse.Namespace) -> int:
    """Entry point of a child process: load the profile if the phase needs it, run the phase, print JSON."""
    if args.phase.startswith('package') or args.phase == 'block-read':
        import aiida

        aiida.load_profile(args.profile, allow_switch=True)
    result = PHASES[args.phase](args, pathlib.Path(args.workdir))
    print(json.dumps(result))
    return 0


# Parent: profile, children, table -------------------------------------------------------------------------------


def run_phase(phase: str, args: argparse.Namespace, workdir: pathlib.Path, **extra: t.Any) -> dict[str, t.Any]:
    command = [sys.executable, __file__, '--rows', str(args.rows), '--features', str(args.features)]
    command += ['--nnz-per-row', str(args.nnz_per_row), '--seed', str(args.seed)]
    command += ['--phase', phase, '--workdir', str(workdir)]
    for key, value in extra.items():
        command += [f'--{key}', str(value)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise RuntimeError(f'phase {phase} failed with exit code {completed.returncode}')
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_report(args: argparse.Namespace, plain: dict[str, t.Any], package: dict[str, t.Any]) -> bool:
    """Print the table and the target lines; return whether both targets pass."""
    nnz = package['nnz']
    dense = args.rows * args.features * 8
    print(
        f'matrix: {args.rows} x {args.features:,}, nnz {nnz:,} ({nnz / args.rows:.0f} per row), float64, int32 indices'
    )
    print(f'dense it would need {dense / 1e9:.2f} GB ({args.rows} x {args.features} x 8 bytes)')
    rows = [
        ('write (s)', package['write_s'], plain['write_s']),
        ('full read (s)', package['read_s'], plain['read_s']),
        (f'{BLOCK_ROWS}-row block read (ms, median)', package['block_s'] * 1e3, plain['block_s'] * 1e3),
        (f'{BLOCK_ROWS}-row blocks, full scan (ms/block)', package['scan_s'] * 1e3, plain['scan_s'] * 1e3),
        ('file size (MB)', package['size'] / MB, plain['size'] / MB),
        ('peak RSS while writing (MB)', package['peak_rss'] / MB, plain['peak_rss'] / MB),
        ('peak RSS while reading (MB)', package['read_peak_rss'] / MB, plain['read_peak_rss'] / MB),
    ]
    print(f'{"operation":<36}{"package":>12}{"plain h5py":>12}{"package/plain":>15}')
    for label, ours, theirs in rows:
        print(f'{label:<36}{ours:>12.2f}{theirs:>12.2f}{ours / theirs:>14.2f}x')
    print(
        f'- write: package = from_blocks {package["from_blocks_s"]:.2f} s + store {package["store_s"]:.2f} s, '
        f'row generation ({package["generate_s"]:.2f} s) excluded; RSS before writing: package '
        f'{package["rss_before"] / MB:.0f} MB, plain {plain["rss_before"] / MB:.0f} MB (whole matrix in memory)\n'
        f'- full read: median of {FULL_READ_REPEATS}; package without checksum verification '
        f'{package["read_unverified_s"]:.2f} s\n'
        f'- block read: get_rows vs opening the plain file and slicing, each call opening its file, median of '
        f'{BLOCK_READ_REPEATS} random positions after {BLOCK_READ_WARMUP} warm-up, taking turns; plain with the file '
        f'kept open: {plain["block_open_s"] * 1e3:.2f} ms\n'
        f'- full scan: iter_blocks({BLOCK_ROWS}) vs slicing a plain file kept open, median of {SCAN_REPEATS} scans'
    )
    rss_ok = package['peak_rss'] < RSS_LIMIT
    ratio = package['block_s'] / plain['block_s']
    block_ok = ratio <= BLOCK_RATIO_LIMIT
    print(
        f'{"PASS" if rss_ok else "FAIL"}: peak RSS while storing via SparseFeatureMatrix '
        f'{package["peak_rss"] / MB:.0f} MB < {RSS_LIMIT / MB:.0f} MB'
    )
    print(
        f'{"PASS" if block_ok else "FAIL"}: {BLOCK_ROWS}-row block read {ratio:.2f}x plain h5py '
        f'(limit {BLOCK_RATIO_LIMIT:.0f}x)'
    )
    return rss_ok and block_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=7100, help='number of rows (default 7100)')
    parser.add_argument('--features', type=int, default=1_460_700, help='number of columns (default 1,460,700)')
    parser.add_argument('--nnz-per-row', type=int, default=1710, help='mean non-zeros per row (default 1710)')
    parser.add_argument('--quick', action='store_true', help='710 rows, for a fast check')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--phase', choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument('--workdir', help=argparse.SUPPRESS)
    parser.add_argument('--profile', help=argparse.SUPPRESS)
    parser.add_argument('--pk', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows = 710
    if args.phase:
        return run_child_phase(args)

    print(header())
    home_config = pathlib.Path('~/.aiida/config.json').expanduser()
    home_mtime = home_config.stat().st_mtime if home_config.exists() else None
    with tempfile.TemporaryDirectory(prefix='mlworkbench-benchmark-') as tmp:
        directory = pathlib.Path(tmp)
        profile = create_profile(directory, PROFILE_NAME)
        plain = run_phase('plain-write', args, directory)
        package = run_phase('package-write', args, directory, profile=profile)
        plain_read = run_phase('plain-read', args, directory)
        package_read = run_phase('package-read', args, directory, profile=profile, pk=package['pk'])
        blocks = run_phase('block-read', args, directory, profile=profile, pk=package['pk'])
    if (home_config.stat().st_mtime if home_config.exists() else None) != home_mtime:
        print('FAILED: ~/.aiida/config.json was modified', file=sys.stderr)
        return 3

    plain.update(read_s=plain_read['read_s'], read_peak_rss=plain_read['peak_rss'], block_s=blocks['plain']['seconds'])
    plain['block_open_s'] = blocks['plain_open']['seconds']
    plain['scan_s'], package['scan_s'] = blocks['plain_scan']['seconds'], blocks['package_scan']['seconds']
    package.update(read_s=package_read['read_s'], read_peak_rss=package_read['peak_rss'])
    package.update(read_unverified_s=package_read['read_unverified_s'], block_s=blocks['package']['seconds'])
    passed = print_report(args, plain, package)

    written = {plain['digest'], package['digest']}
    read = {plain_read['digest'], package_read['digest']}
    block_digests = {blocks[name]['digest'] for name in ('package', 'plain', 'plain_open')}
    read.update(blocks[name]['digest'] for name in ('package_scan', 'plain_scan'))
    if len(written | read) != 1 or len(block_digests) != 1:
        print('FAILED: the content written or read back differs between the two ways', file=sys.stderr)
        return 2
    print('content: identical in all phases (SHA-256 of indptr, indices, data)')
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
