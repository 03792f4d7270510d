"""Benchmark: build the impurity clusters of N embeddings with full provenance on a throw-away SQLite profile.

Usage::

    /work/venv/bin/python benchmarks/cluster_extraction.py --n 7100 [--batch-size 1000]

The embeddings come from :func:`aiida_mlworkbench.synthetic.create_synthetic_database` (elemental bcc/fcc/hcp hosts
with reference lattice constants, ``Rcut`` covering two neighbour shells). The profile lives in a temporary
``AIIDA_PATH`` that is deleted afterwards, so ``~/.aiida`` is never touched. Prints the wall time of the cluster
extraction (database creation excluded), clusters per second and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time


def _peak_rss_mib() -> float:
    """Return the peak resident set size of this process in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_throwaway_profile(folder: pathlib.Path) -> None:
    """Create and load an SQLite profile (no broker: process functions need none) inside ``folder``."""
    os.environ['AIIDA_PATH'] = str(folder)
    from aiida import load_profile
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    profile = create_profile(
        config,
        storage_backend='core.sqlite_dos',
        storage_config={'filepath': str(folder / 'storage')},
        name='cluster-benchmark',
        email='benchmark@localhost',
    )
    config.set_default_profile(profile.name, overwrite=True)
    config.store()
    load_profile(profile.name, allow_switch=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n', type=int, default=7100, help='number of embeddings (default 7100)')
    parser.add_argument('--batch-size', type=int, default=None, help='embeddings per calcfunction process')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='mlworkbench-cluster-benchmark-') as tmp:
        _load_throwaway_profile(pathlib.Path(tmp))

        from aiida_mlworkbench.calcfunctions.clusters import DEFAULT_BATCH_SIZE, build_impurity_clusters
        from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings

        start = time.perf_counter()
        group = create_synthetic_database(size=args.n, seed=args.seed)
        pairs = list(iter_synthetic_embeddings(group))
        setup = time.perf_counter() - start
        n_hosts = len({host.uuid for host, _ in pairs})

        batch_size = args.batch_size or DEFAULT_BATCH_SIZE
        start, cpu_start = time.perf_counter(), time.process_time()
        clusters = build_impurity_clusters(pairs, batch_size=batch_size)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

        n_atoms = sum(len(cluster.sites) for cluster in clusters)
        print(f'embeddings:          {len(pairs)} ({n_hosts} hosts; database created in {setup:.1f} s)')
        print(f'batch size:          {batch_size}')
        print(f'clusters built:      {len(clusters)} ({n_atoms / len(clusters):.1f} atoms on average), all stored')
        print(f'wall time:           {wall:.1f} s (CPU time {cpu:.1f} s; load average {os.getloadavg()[0]:.2f})')
        print(f'clusters per second: {len(clusters) / wall:.0f}')
        print(f'peak RSS:            {_peak_rss_mib():.0f} MiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
