"""Featurization speed: DScribe's 60-species sparse SOAP against :class:`SpeciesAwareSOAP`, same clusters, same output.

Each way runs in its own child process, so that its wall time, CPU time and peak RSS (the child and its workers,
sampled every 20 ms, and at least the child's own ``ru_maxrss``) are not mixed with the others'. The feature matrices
are written to a temporary directory and compared in the parent: the run fails unless they are identical.
``speed-up`` is the ratio of wall times to the first row, ``CPU ratio`` that of CPU times (steadier on a busy machine).

    python benchmarks/featurization_speed.py                    # N = 1752, n_max = l_max = 5, 1 and 2 jobs
    python benchmarks/featurization_speed.py --nmax 9 --lmax 9
    python benchmarks/featurization_speed.py --n 7100 --jobs 1 2 --skip-plain
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

# The 60 species of the feature space: helium to promethium, which hold all hosts and impurities below.
SPECIES = tuple(range(2, 62))
# Elemental hosts within SPECIES: (symbol, lattice, a in Angstrom, c in Angstrom or None).
HOSTS = (
    ('Al', 'fcc', 4.05, None),
    ('Ni', 'fcc', 3.52, None),
    ('Cu', 'fcc', 3.61, None),
    ('Rh', 'fcc', 3.80, None),
    ('Pd', 'fcc', 3.89, None),
    ('Ag', 'fcc', 4.09, None),
    ('V', 'bcc', 3.03, None),
    ('Cr', 'bcc', 2.91, None),
    ('Fe', 'bcc', 2.87, None),
    ('Nb', 'bcc', 3.30, None),
    ('Mo', 'bcc', 3.15, None),
    ('Mg', 'hcp', 3.21, 5.21),
    ('Ti', 'hcp', 2.95, 4.68),
    ('Co', 'hcp', 2.51, 4.07),
    ('Zn', 'hcp', 2.66, 4.95),
    ('Zr', 'hcp', 3.23, 5.15),
    ('Ru', 'hcp', 2.71, 4.28),
)
# Cluster radius over the lattice constant a: takes the first two neighbour shells (fcc 19, bcc 15, hcp 19 atoms).
RADIUS_OVER_A = {'fcc': 1.1, 'bcc': 1.1, 'hcp': 1.5}


def make_clusters(n: int, seed: int = 0) -> list:
    """``n`` impurity clusters: a host sphere of two shells, the centre atom replaced by a random impurity, at origin.

    Positions get a 0.02 Angstrom random displacement, as relaxed clusters would, so that no two rows are equal.
    """
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    templates = []
    for symbol, lattice, a, c in HOSTS:
        crystal = bulk(symbol, lattice, a=a, c=c) * (5, 5, 5)
        centre = crystal.positions[np.argmin(np.linalg.norm(crystal.positions - crystal.cell.sum(axis=0) / 2, axis=1))]
        sphere = crystal[np.linalg.norm(crystal.positions - centre, axis=1) < RADIUS_OVER_A[lattice] * a]
        sphere.positions -= centre
        sphere.set_pbc(False)
        sphere.set_cell(None)
        templates.append(sphere)

    clusters = []
    for index in range(n):
        cluster = templates[index % len(templates)].copy()
        numbers = cluster.get_atomic_numbers()
        numbers[np.argmin(np.linalg.norm(cluster.positions, axis=1))] = rng.choice(SPECIES)
        cluster.set_atomic_numbers(numbers)
        cluster.positions += rng.normal(scale=0.02, size=cluster.positions.shape)
        clusters.append(cluster)
    return clusters


class PeakRSS:
    """Peak resident memory of this process and all its descendants, sampled in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for process in [self._process, *self._process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live descendants, such as joblib's worker processes."""
    import psutil

    total = 0.0
    process = psutil.Process()
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def run_one(way: str, jobs: int, output: pathlib.Path, settings: argparse.Namespace) -> dict:
    """Featurize in this process with one way, save the CSR matrix to ``output``, return times and peak RSS.

    ``way`` is ``plain`` (DScribe over all species), ``aware`` (:class:`SpeciesAwareSOAP` in a fresh process, worker
    start-up included) or ``aware-warm`` (worker processes started by a small run first, as in a long-lived process).
    """
    import scipy.sparse
    from dscribe.descriptors import SOAP

    from aiida_mlworkbench.descriptors import SpeciesAwareSOAP

    soap_settings = {'r_cut': 6.0, 'n_max': settings.nmax, 'l_max': settings.lmax, 'sigma': 0.5, 'average': 'inner'}
    clusters = make_clusters(settings.n)
    if way == 'aware-warm':
        warm_up = make_clusters(4 * jobs, seed=1)
        SpeciesAwareSOAP(species=SPECIES, n_jobs=jobs, **soap_settings).create(warm_up, block_size=4)
    with PeakRSS() as rss:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        if way == 'plain':
            features = SOAP(species=list(SPECIES), sparse=True, **soap_settings).create(clusters, n_jobs=jobs)
        else:
            features = SpeciesAwareSOAP(species=SPECIES, n_jobs=jobs, **soap_settings).create(clusters)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    if way == 'plain':
        features = scipy.sparse.csr_array(features.tocsr())
    scipy.sparse.save_npz(output, features, compressed=False)
    return {
        'seconds': seconds,
        'cpu_seconds': cpu,
        'peak_rss_mb': rss.peak / 2**20,
        'shape': list(features.shape),
        'nnz': features.nnz,
    }


def compare(reference: pathlib.Path, other: pathlib.Path) -> tuple[bool, float]:
    """Return whether two saved CSR matrices are identical (structure and values) and their max abs difference."""
    import scipy.sparse

    first = scipy.sparse.csr_array(scipy.sparse.load_npz(reference))
    second = scipy.sparse.csr_array(scipy.sparse.load_npz(other))
    for matrix in (first, second):
        matrix.sort_indices()
    if first.shape != second.shape:
        return False, float('inf')
    difference = abs(first - second)
    max_abs_diff = float(difference.max()) if difference.nnz else 0.0
    identical = (
        np.array_equal(first.indptr, second.indptr)
        and np.array_equal(first.indices, second.indices)
        and np.array_equal(first.data, second.data)
    )
    return identical, max_abs_diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--n', type=int, default=1752, help='number of clusters (default 1752)')
    parser.add_argument('--nmax', type=int, default=5)
    parser.add_argument('--lmax', type=int, default=5)
    parser.add_argument('--jobs', type=int, nargs='+', default=[1, 2], help='job counts for SpeciesAwareSOAP')
    parser.add_argument('--plain-jobs', type=int, default=1, help='n_jobs of the plain DScribe call (default 1)')
    parser.add_argument('--skip-plain', action='store_true', help='compare the job counts with each other only')
    parser.add_argument('--_child', nargs=2, metavar=('WAY', 'OUTPUT'), help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments._child:
        way, output = arguments._child
        print(json.dumps(run_one(way, arguments.jobs[0], pathlib.Path(output), arguments)))
        return 0

    runs = [] if arguments.skip_plain else [('plain', arguments.plain_jobs)]
    runs += [('aware', jobs) for jobs in arguments.jobs]
    runs += [('aware-warm', jobs) for jobs in arguments.jobs if jobs != 1]
    results = {}
    print(f'N = {arguments.n} clusters, 60 species, n_max = {arguments.nmax}, l_max = {arguments.lmax}, average=inner')
    with tempfile.TemporaryDirectory() as directory:
        for way, jobs in runs:
            output = pathlib.Path(directory) / f'{way}-{jobs}.npz'
            command = [sys.executable, __file__, '--n', str(arguments.n), '--nmax', str(arguments.nmax)]
            command += ['--lmax', str(arguments.lmax), '--jobs', str(jobs), '--_child', way, str(output)]
            completed = subprocess.run(command, check=True, capture_output=True, text=True)
            results[way, jobs] = json.loads(completed.stdout.strip().splitlines()[-1])

        reference = results[runs[0]]
        label = {
            'plain': 'DScribe SOAP, 60 species',
            'aware': 'SpeciesAwareSOAP',
            'aware-warm': 'SpeciesAwareSOAP, warm',
        }
        print(f'features: {reference["shape"][1]}, non-zeros per row: {reference["nnz"] / arguments.n:.0f}')
        print(
            f'{"way":<26}{"jobs":>5}{"wall s":>9}{"CPU s":>9}{"peak RSS MB":>13}{"speed-up":>10}{"CPU ratio":>11}'
            f'  {"identical":<10}max abs diff'
        )
        all_identical = True
        for way, jobs in runs:
            result = results[way, jobs]
            identical, max_abs_diff = compare(
                pathlib.Path(directory) / f'{runs[0][0]}-{runs[0][1]}.npz',
                pathlib.Path(directory) / f'{way}-{jobs}.npz',
            )
            all_identical &= identical
            print(
                f'{label[way]:<26}{jobs:>5}{result["seconds"]:>9.2f}{result["cpu_seconds"]:>9.2f}'
                f'{result["peak_rss_mb"]:>13.0f}{reference["seconds"] / result["seconds"]:>9.1f}x'
                f'{reference["cpu_seconds"] / result["cpu_seconds"]:>10.1f}x'
                f'  {identical!s:<10}{max_abs_diff:.1e}'
            )
    if not all_identical:
        print('FAILED: the feature matrices differ', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
