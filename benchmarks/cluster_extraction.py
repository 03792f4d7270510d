"""Benchmark: extract the impurity clusters of N embeddings with provenance, one process, on a throw-away profile.

Usage::

    python benchmarks/cluster_extraction.py --n 7100
    MLWORKBENCH_PLAIN_AIIDA=1 python benchmarks/cluster_extraction.py --n 1752   # on plain aiida-core

The embeddings come from :func:`aiida_mlworkbench.synthetic.create_synthetic_database` (elemental bcc/fcc/hcp hosts,
``Rcut`` covering two neighbour shells). :func:`~aiida_mlworkbench.calcfunctions.clusters.build_impurity_clusters`
checks them and runs ``extract_impurity_clusters``: one process whose inputs are every ``impurity_info`` and each
distinct host once, and whose output is one ``ImpurityClusters`` node. The profile lives in a temporary
``AIIDA_PATH`` that is deleted afterwards, so ``~/.aiida`` is never touched. Prints the wall time of the extraction
(database creation excluded), clusters per second, the input links stored and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n', type=int, default=7100, help='number of embeddings (default 7100)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='mlworkbench-cluster-benchmark-') as tmp:
        from _common import create_profile, header
        from aiida import load_profile

        load_profile(create_profile(pathlib.Path(tmp), 'cluster-benchmark'), allow_switch=True)

        from aiida import orm

        from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
        from aiida_mlworkbench.engine import acceleration_enabled
        from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings

        print(header())
        start = time.perf_counter()
        group = create_synthetic_database(size=args.n, seed=args.seed)
        pairs = list(iter_synthetic_embeddings(group))
        setup = time.perf_counter() - start
        n_hosts = len({host.uuid for host, _ in pairs})

        start, cpu_start = time.perf_counter(), time.process_time()
        clusters = build_impurity_clusters(pairs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

        process = clusters.creator
        n_links = (
            orm.QueryBuilder()
            .append(orm.ProcessNode, filters={'id': process.pk}, tag='process')
            .append(orm.Data, with_outgoing='process')
            .count()
        )
        engine = 'engine module' if acceleration_enabled() else 'plain aiida-core (MLWORKBENCH_PLAIN_AIIDA)'
        print(f'embeddings:          {len(pairs)} ({n_hosts} hosts; database created in {setup:.1f} s)')
        print(f'linking:             {engine}; {process.process_label}<{process.pk}> has {n_links} input links')
        print(
            f'clusters:            {len(clusters)} of {clusters.n_atoms_min} to {clusters.n_atoms_max} atoms '
            f'({clusters.n_atoms_total / len(clusters):.1f} on average), one stored ImpurityClusters<{clusters.pk}>'
        )
        print(f'wall time:           {wall:.1f} s (CPU time {cpu:.1f} s; load average {os.getloadavg()[0]:.2f})')
        print(f'clusters per second: {len(clusters) / wall:.0f}')
        print(f'peak RSS:            {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
