"""Helpers shared by the benchmark scripts: a throw-away AiiDA profile, the random SOAP-like matrix, child processes.

Import it as ``from _common import ...`` from a script in this folder (the folder is on ``sys.path`` when a script
runs), or as ``benchmarks._common`` from the repository root.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time
import typing as t

import numpy as np

MB = 2**20

#: Shape of the SOAP matrices of the reference study at n_max = l_max = 9 (60 species): columns and mean non-zeros
#: per row.
SOAP_FEATURES = 1_460_700
SOAP_NNZ_PER_ROW = 1710

HEADER_PACKAGES = ('aiida-core', 'aiida-mlworkbench', 'disk-objectstore', 'numpy', 'scipy', 'h5py')


def row_block(first: int, stop: int, n_features: int, nnz_per_row: int, seed: int) -> t.Any:
    """Rows ``first:stop`` of a random benchmark matrix as a ``csr_array``; each row has its own RNG stream.

    A row holds a uniform random count of non-zeros within 10 % of ``nnz_per_row``, at distinct sorted random columns,
    with values in (0, 1]. The same ``(row, seed)`` gives the same row whatever the blocks, so a matrix can be
    generated block by block without ever being in memory.
    """
    import scipy.sparse

    counts, columns, values = [], [], []
    spread = nnz_per_row // 10
    for row in range(first, stop):
        rng = np.random.default_rng([seed, row])
        count = int(min(n_features, rng.integers(nnz_per_row - spread, nnz_per_row + spread + 1)))
        columns.append(np.sort(rng.choice(n_features, size=count, replace=False)).astype(np.int32))
        values.append(1.0 - rng.random(count))
        counts.append(count)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return scipy.sparse.csr_array(
        (np.concatenate(values), np.concatenate(columns), indptr), shape=(stop - first, n_features)
    )


def create_profile(directory: pathlib.Path, name: str) -> str:
    """Create a ``core.sqlite_dos`` profile in a fresh config under ``directory`` (``AIIDA_PATH`` points there).

    Child processes inherit ``AIIDA_PATH`` and load the profile by name; ``~/.aiida`` is never touched.
    """
    import warnings

    os.environ['AIIDA_PATH'] = str(directory)
    warnings.filterwarnings('ignore', message='Creating AiiDA configuration folder')
    from aiida.manage.configuration import create_profile as aiida_create_profile
    from aiida.manage.configuration import get_config
    from aiida.manage.configuration.settings import AiiDAConfigDir

    AiiDAConfigDir.set(directory / '.aiida')
    config = get_config(create=True)
    profile = aiida_create_profile(
        config,
        storage_backend='core.sqlite_dos',
        storage_config={'filepath': str(directory / 'storage')},
        name=name,
        email='benchmark@localhost',
        is_test_profile=True,
    )
    profile.set_option('warnings.development_version', False)
    config.set_default_profile(name)
    config.store()
    return name


def header(packages: t.Iterable[str] = HEADER_PACKAGES) -> str:
    """Date, machine, load and library versions: the first line of every benchmark's output."""
    from importlib.metadata import version

    import h5py
    import psutil

    cpu = platform.processor() or 'unknown CPU'
    with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
        cpu = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), cpu)
    versions = ', '.join(f'{name} {version(name)}' for name in packages)
    load = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    return (
        f'{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | {cpu}, {os.cpu_count()} cores, load {load}, '
        f'{psutil.virtual_memory().total / 2**30:.1f} GiB RAM | Python {platform.python_version()}, {versions}, '
        f'HDF5 {h5py.version.hdf5_version}'
    )


def run_child(command: list[str]) -> tuple[dict[str, t.Any], int, float]:
    """Run ``command`` in a child process; return the JSON on the last line of its output, its peak RSS and wall time.

    The peak RSS (bytes) is the child's own ``ru_maxrss`` from ``wait4``, so every child is measured on its own (the
    ``RUSAGE_CHILDREN`` figure would be the largest of all children so far).

    :raises RuntimeError: with the child's output, if it fails.
    """
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read().decode(), stderr.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f'{" ".join(command)} failed with exit code {process.returncode}:\n{output}{errors}')
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss * 1024, wall


def run_workchain(builder: t.Any) -> tuple[dict[str, t.Any], t.Any, float, float]:
    """Run the process of ``builder``; return its outputs, node and seconds, and the wall clock (epoch) at its start.

    :raises RuntimeError: naming the process and its exit status, if it did not finish OK.
    """
    from aiida.engine import run_get_node

    epoch = time.time()
    start = time.perf_counter()
    results, node = run_get_node(builder)
    seconds = time.perf_counter() - start
    if not node.is_finished_ok:
        raise RuntimeError(f'{node.process_label}<{node.pk}> failed: {node.exit_status} {node.exit_message}')
    return results, node, seconds, epoch


def workchain_steps(node: t.Any, epoch: float, seconds: float) -> dict[str, float]:
    """Where the ``seconds`` of a work chain started at ``epoch`` went, from the times its nodes record.

    ``launch``: from the start until its first step began (validating its inputs, storing its node with its input
    links); then each child process by call link label, from its node's creation to its last change (storing its
    inputs, the work, storing its outputs); ``rest``: the remainder (checkpoints, the work chain's own outputs).
    """
    from aiida.common.links import LinkType

    links = node.base.links.get_outgoing(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).all()
    links.sort(key=lambda link: link.node.ctime)
    steps = {}
    if links:
        steps['launch'] = links[0].node.ctime.timestamp() - epoch
    for link in links:
        steps[link.link_label] = (link.node.mtime - link.node.ctime).total_seconds()
    steps['rest'] = seconds - sum(steps.values())
    return steps


class TreeRss:
    """Sample the summed resident memory of this process and its descendants (e.g. featurization workers) every
    ``interval`` seconds in a thread while the context is open; :attr:`peak` is the largest sum, in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import contextlib

        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for member in [process, *process.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += member.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
