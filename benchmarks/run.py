"""The benchmark runner of issues 5 and 11: the plain way and the package's way on the same synthetic data, in one
command.

    python benchmarks/run.py                      # every case at the reference sizes (N = 1752, 7100, 28,400)
    python benchmarks/run.py --quick              # the same cases on small databases (N = 150 to 1200), a check
    python benchmarks/run.py --only featurize-1752 pipeline plain-aiida
    python benchmarks/run.py --write-results      # also write benchmarks/RESULTS.md
    python benchmarks/run.py --list               # the cases and what each one runs

Every measured run is a child process of its own (``python benchmarks/run.py --_task ...`` or a script such as
``plain_pipeline.py``), so that its peak RSS is its own: this process samples the resident memory of the child and
all its descendants (DScribe's and SpeciesAwareSOAP's worker processes) every 50 ms and keeps the largest sum, and
takes the child's own ``ru_maxrss`` (from ``wait4``) if that is larger. The package's runs work on a throw-away AiiDA
profile (``core.sqlite_dos`` in a temporary ``AIIDA_PATH``, deleted at the end; ``~/.aiida`` is never touched); the
plain runs store nothing.

Cases live in the registry :data:`CASES` (name -> :class:`Case`): a case builds the list of :class:`Run` objects
(the command of each child and what it needs set up) and checks its targets from their results. See
``benchmarks/README.md`` for the cases and how to add one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
REPOSITORY = HERE.parent
PROFILE_NAME = 'mlworkbench-benchmark'
SEED = 0

REFERENCE_SIZES = (1752, 7100)
"""Database sizes of the reference studies; ``--quick`` replaces them with :data:`QUICK_SIZES`."""
QUICK_SIZES = {1752: 150, 7100: 300}
RESOLUTIONS = (5, 9)
"""``n_max = l_max`` of the featurization cases."""
SOAP_SETTINGS = {'r_cut': 6.0, 'sigma': 1.0, 'average': 'inner'}
PACKAGE_JOBS = (1, 2)
"""Job counts of the package's featurization (``featurization_jobs``): the 1-core and 2-core figures."""
PLAIN_JOBS = 2
"""``n_jobs`` of DScribe's plain call: both cores, as a user after speed would; 1 core would not fit in 20 minutes."""
SPEED_TARGET = 10.0
MEMORY_TARGET_BYTES = 10**9
TOTAL_TIME_TARGET = 20 * 60
SAMPLE_INTERVAL = 0.05

MIB = 2**20


# -- the registry ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One measured child process: one way (``plain`` or ``package``) of doing the work of a case.

    :param command: the arguments after the Python interpreter; the child's last line of output, if it is a JSON
        object, is kept as :attr:`Result.payload`. Its ``seconds`` (the time of the work itself, without interpreter
        start-up and setup) is the wall time of the table; without it the whole process's lifetime is.
    :param needs: setup steps to run first, each once per benchmark run: ``('database', N)`` (the synthetic database
        of N embeddings in the throw-away profile) or ``('clusters', N)`` (that database and its impurity clusters,
        stored with provenance).
    :param seconds_key: the key of the child's JSON that holds the time of the work.
    :param environment: variables set in the child's environment on top of the runner's (e.g.
        ``MLWORKBENCH_PLAIN_AIIDA=1``).
    :param timeout: seconds after which this run is killed (the smaller of this and ``--timeout`` if both are set).
    """

    case: str
    way: str
    size: int
    nl: int | None
    jobs: int | None
    command: list[str]
    needs: tuple[tuple[str, int], ...] = ()
    label: str = ''
    seconds_key: str = 'seconds'
    environment: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float | None = None


@dataclasses.dataclass
class Result:
    run: Run
    seconds: float
    process_seconds: float
    peak_rss: int
    returncode: int
    payload: dict[str, t.Any]
    stderr_tail: str = ''

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclasses.dataclass
class Target:
    """A PASS/FAIL line: ``passed`` is ``None`` when the figure is not available (case skipped or failed).

    ``info`` lines report a figure that has no target.
    """

    text: str
    passed: bool | None
    info: bool = False

    def line(self) -> str:
        status = 'info' if self.info else {True: 'PASS', False: 'FAIL', None: 'n/a '}[self.passed]
        return f'{status}  {self.text}'


@dataclasses.dataclass
class Case:
    """A benchmark case: ``build`` returns its runs, ``check`` its target lines from the results of those runs.

    ``check`` may run further unmeasured child processes through :meth:`Context.task` (e.g. to compare outputs).
    """

    name: str
    description: str
    build: Callable[[Context], list[Run]]
    check: Callable[[Context, list[Result]], list[Target]] | None = None


CASES: dict[str, Case] = {}
"""The case registry, in running order."""


def register(case: Case) -> Case:
    if case.name in CASES:
        raise ValueError(f'case {case.name!r} is registered twice')
    CASES[case.name] = case
    return case


# -- running children ------------------------------------------------------------------------------------------------


class Context:
    """What the cases share: the mode, the work folder, the throw-away AiiDA profile and the setup already done."""

    def __init__(self, quick: bool, workdir: pathlib.Path, timeout: float | None) -> None:
        self.quick = quick
        self.plain_jobs = PLAIN_JOBS
        self.package_jobs = PACKAGE_JOBS
        self.workdir = workdir
        self.timeout = timeout
        self.aiida_path = workdir / 'aiida'
        self.setup_results: list[Result] = []
        self.results: list[Result] = []
        """The measured runs so far (setup excluded): a case's check may compare with an earlier case's runs."""
        self._done: dict[tuple[str, int], Result] = {}

    def size(self, reference: int) -> int:
        """The database size that stands for the reference size ``reference`` in this mode."""
        return QUICK_SIZES.get(reference, reference) if self.quick else reference

    def task_command(self, task: str, **arguments: t.Any) -> list[str]:
        """Command line of a child running the function ``task_<task>`` of this file with ``arguments``."""
        return [str(HERE / 'run.py'), '--_task', task, json.dumps(arguments)]

    def environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment['AIIDA_PATH'] = str(self.aiida_path)
        environment['PYTHONUNBUFFERED'] = '1'
        environment.pop('AIIDA_PROFILE', None)
        return environment

    def measure(self, run: Run) -> Result:
        """Run the setup ``run`` needs, then ``run`` itself in a child process, sampling its memory."""
        for need in run.needs:
            self.setup(need)
        say(f'  {run.case:<18} {run.way:<16} N={run.size:<5} n=l={run.nl or "-"!s:<2} jobs={run.jobs or "-"} ...')
        timeouts = [timeout for timeout in (run.timeout, self.timeout) if timeout is not None]
        environment = {**self.environment(), **run.environment}
        result = measure_child(run, environment, self.workdir, min(timeouts) if timeouts else None)
        status = 'ok' if result.ok else f'FAILED (exit code {result.returncode})'
        figures = f'{result.seconds:.1f} s, process {result.process_seconds:.1f} s, {result.peak_rss / MIB:.0f} MiB'
        details = ', '.join(
            f'{key} {value:.1f} s' for key, value in result.payload.items() if key.endswith('_seconds') and value
        )
        say(f'    {status}: {figures}' + (f' ({details})' if details else ''))
        steps = result.payload.get('steps')
        if steps:
            say('    steps: ' + ', '.join(f'{name} {seconds:.1f} s' for name, seconds in steps.items()))
        if not result.ok:
            say(result.stderr_tail)
        if run.case != 'setup':
            self.results.append(result)
        return result

    def setup(self, need: tuple[str, int]) -> Result:
        """Run a setup step once: the synthetic database (and its clusters) of a size, in the throw-away profile."""
        kind, size = need
        if need in self._done:
            return self._done[need]
        run = Run('setup', kind, size, None, None, self.task_command('setup', size=size, clusters=kind == 'clusters'))
        result = self.measure(run)
        if not result.ok:
            raise RuntimeError(f'setup {need} failed:\n{result.stderr_tail}')
        self.setup_results.append(result)
        self._done[need] = result
        if kind == 'clusters':
            self._done['database', size] = result
        return result

    def task(self, task: str, script: pathlib.Path | None = None, **arguments: t.Any) -> dict[str, t.Any]:
        """Run an unmeasured helper child (e.g. a comparison) and return its JSON payload.

        ``script``: run ``<script> --_task <task> <JSON>`` instead of a task of this file.
        """
        command = self.task_command(task, **arguments)
        if script is not None:
            command[0] = str(script)
        completed = subprocess.run(
            [sys.executable, *command],
            env=self.environment(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f'task {task} failed:\n{completed.stderr[-3000:]}')
        return json.loads(completed.stdout.strip().splitlines()[-1])


def tree_rss(process) -> int:
    """Summed resident memory of ``process`` and all its descendants, in bytes (0 for any that just ended)."""
    import psutil

    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def measure_child(run: Run, environment: dict[str, str], workdir: pathlib.Path, timeout: float | None) -> Result:
    """Run ``run.command`` with this Python, sample its process tree's RSS, and return the measured figures."""
    import psutil

    stdout_path = workdir / 'child.stdout'
    stderr_path = workdir / 'child.stderr'
    with open(stdout_path, 'w') as stdout, open(stderr_path, 'w') as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, *run.command], stdout=stdout, stderr=stderr, env=environment, cwd=workdir
        )
        process = psutil.Process(child.pid)
        peak = 0
        timed_out = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(process))
            if timeout is not None and time.perf_counter() - start > timeout:
                timed_out = True
                for member in [*process.children(recursive=True), process]:
                    with contextlib.suppress(psutil.Error):
                        member.kill()
            time.sleep(SAMPLE_INTERVAL)
        process_seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
    peak = max(peak, usage.ru_maxrss * 1024)
    output = stdout_path.read_text()
    errors = stderr_path.read_text()
    payload: dict[str, t.Any] = {}
    lines = output.strip().splitlines()
    if lines and lines[-1].startswith('{'):
        with contextlib.suppress(json.JSONDecodeError):
            payload = json.loads(lines[-1])
    returncode = child.returncode
    if timed_out:
        returncode = returncode or -9
        errors += f'\nkilled after the timeout of {timeout:.0f} s'
    return Result(
        run=run,
        seconds=float(payload.get(run.seconds_key, process_seconds)),
        process_seconds=process_seconds,
        peak_rss=peak,
        returncode=returncode,
        payload=payload,
        stderr_tail=errors[-3000:],
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- child tasks (run as `python benchmarks/run.py --_task NAME JSON`) -----------------------------------------------


def _profile_storage(aiida_path: pathlib.Path) -> pathlib.Path:
    return aiida_path / 'storage'


def load_benchmark_profile(create: bool = False) -> None:
    """Load the throw-away profile in ``$AIIDA_PATH`` (set by the parent), creating it if asked and missing."""
    from aiida import load_profile
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    if PROFILE_NAME not in config.profile_names:
        if not create:
            raise RuntimeError(f'the benchmark profile {PROFILE_NAME} does not exist yet: run its setup first')
        profile = create_profile(
            config,
            storage_backend='core.sqlite_dos',
            storage_config={'filepath': str(_profile_storage(pathlib.Path(os.environ['AIIDA_PATH'])))},
            name=PROFILE_NAME,
            email='benchmark@localhost',
        )
        config.set_default_profile(profile.name, overwrite=True)
        config.store()
    load_profile(PROFILE_NAME, allow_switch=True)


def task_create_profile(name: str) -> dict[str, t.Any]:
    """Add a ``core.sqlite_dos`` profile ``name`` to the configuration in ``$AIIDA_PATH`` (for other scripts' tasks)."""
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    if name not in config.profile_names:
        create_profile(
            config,
            storage_backend='core.sqlite_dos',
            storage_config={'filepath': str(pathlib.Path(os.environ['AIIDA_PATH']) / f'storage-{name}')},
            name=name,
            email='benchmark@localhost',
        )
        config.store()
    return {'profile': name}


def species() -> list[str]:
    from aiida_mlworkbench.synthetic import IMPURITY_SPECIES

    return list(IMPURITY_SPECIES)


def descriptor_parameters(nl: int) -> dict[str, t.Any]:
    """The package's descriptor: the same SOAP as the plain way's, over the same 60 species."""
    return {'name': 'soap', 'species': species(), 'n_max': nl, 'l_max': nl, **SOAP_SETTINGS}


def clusters_file(size: int) -> pathlib.Path:
    """The file that holds the pk of the stored ``ImpurityClusters`` of the database of ``size`` embeddings."""
    return pathlib.Path(os.environ['AIIDA_PATH']) / f'clusters-{size}.json'


def load_clusters(size: int) -> t.Any:
    """The ``ImpurityClusters`` node the setup stored for the database of ``size`` embeddings."""
    from aiida import orm

    return orm.load_node(json.loads(clusters_file(size).read_text())['pk'])


def task_setup(size: int, clusters: bool) -> dict[str, t.Any]:
    """Create the synthetic database of ``size`` embeddings and, if asked, store its clusters with provenance.

    The clusters are one ``ImpurityClusters`` node (``build_impurity_clusters``); its pk goes to
    ``clusters-<size>.json`` and its geometry, as ``featurize`` reads it (``get_atoms_list()``), to
    ``clusters-<size>.npz``: the plain way featurizes exactly these clusters (see :func:`task_plain_featurize`).
    """
    load_benchmark_profile(create=True)
    import numpy as np

    from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
    from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings

    start = time.perf_counter()
    group = create_synthetic_database(size=size, seed=SEED, reuse_existing=True)
    result: dict[str, t.Any] = {'database_seconds': time.perf_counter() - start}
    if clusters and not clusters_file(size).exists():
        step = time.perf_counter()
        node = build_impurity_clusters(iter_synthetic_embeddings(group))
        result['cluster_seconds'] = time.perf_counter() - step
        clusters_file(size).write_text(json.dumps({'pk': node.pk}))
        atoms = node.get_atoms_list()
        np.savez(
            geometry_file(size),
            counts=np.array([len(cluster) for cluster in atoms]),
            numbers=np.concatenate([cluster.numbers for cluster in atoms]),
            positions=np.concatenate([cluster.positions for cluster in atoms]),
        )
    result['seconds'] = time.perf_counter() - start
    return result


def geometry_file(size: int) -> pathlib.Path:
    return pathlib.Path(os.environ['AIIDA_PATH']) / f'clusters-{size}.npz'


def task_plain_featurize(size: int, nl: int, jobs: int, output: str) -> dict[str, t.Any]:
    """The plain way: DScribe's 60-species sparse SOAP on the clusters as ``ase.Atoms``, then a scipy CSR matrix.

    The clusters are those the package featurizes, read from the geometry file the setup wrote (no AiiDA here).
    Clusters that ``benchmarks/plain_pipeline.py`` builds from ``ase`` hosts with aiida-kkr's ``create_scoef_array``
    are the same to 1e-15 Angstrom, but the host cell read back from the database differs from ASE's by round-off,
    which reorders equidistant atoms in about a third of them, and DScribe's sums then differ by up to 1e-10: only
    the same geometry can show that the outputs are identical.
    """
    import ase
    import numpy as np
    import scipy.sparse

    sys.path.insert(0, str(HERE))
    from plain_pipeline import dscribe_features

    geometry = np.load(geometry_file(size))
    bounds = np.concatenate([[0], np.cumsum(geometry['counts'])])
    clusters = [
        ase.Atoms(numbers=geometry['numbers'][first:stop], positions=geometry['positions'][first:stop], pbc=False)
        for first, stop in itertools.pairwise(bounds)
    ]
    start = time.perf_counter()
    features = dscribe_features(clusters, nl, nl, jobs)
    seconds = time.perf_counter() - start
    scipy.sparse.save_npz(output, features, compressed=False)
    return {'seconds': seconds, 'descriptor_seconds': seconds, 'shape': list(features.shape), 'nnz': features.nnz}


def task_package_featurize(size: int, nl: int, jobs: int) -> dict[str, t.Any]:
    """The package's way: the featurize calcfunction on the stored ``ImpurityClusters``, storing the
    SparseFeatureMatrix."""
    load_benchmark_profile()
    from aiida import orm

    from aiida_mlworkbench.calcfunctions.featurize import featurization_jobs, featurize
    from aiida_mlworkbench.descriptors.soap import SpeciesAwareSOAP

    clusters = load_clusters(size)

    # Time spent inside the descriptor (computing the blocks), to tell it from the calcfunction's other work.
    descriptor_seconds = [0.0]
    iter_blocks = SpeciesAwareSOAP.iter_blocks

    def timed_iter_blocks(self, *args, **kwargs):
        blocks = iter_blocks(self, *args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                block = next(blocks)
            except StopIteration:
                descriptor_seconds[0] += time.perf_counter() - start
                return
            descriptor_seconds[0] += time.perf_counter() - start
            yield block

    SpeciesAwareSOAP.iter_blocks = timed_iter_blocks
    start = time.perf_counter()
    with featurization_jobs(jobs):
        matrix = featurize(clusters=clusters, descriptor=orm.Dict(descriptor_parameters(nl)))
    seconds = time.perf_counter() - start
    if not matrix.is_stored:
        raise RuntimeError('the feature matrix was not stored')
    return {
        'seconds': seconds,
        'descriptor_seconds': descriptor_seconds[0],
        'matrix_pk': matrix.pk,
        'shape': list(matrix.shape),
        'nnz': matrix.nnz,
    }


def task_compare(plain: str, matrix_pks: list[int], block_size: int = 512) -> dict[str, t.Any]:
    """Compare the plain CSR matrix with stored SparseFeatureMatrix nodes, block by block, never densifying."""
    import numpy as np
    import scipy.sparse

    load_benchmark_profile()
    from aiida import orm

    reference = scipy.sparse.csr_array(scipy.sparse.load_npz(plain))
    reference.sort_indices()
    comparisons = {}
    for pk in matrix_pks:
        matrix = orm.load_node(pk)
        identical = tuple(matrix.shape) == tuple(reference.shape)
        max_abs_diff = 0.0 if identical else float('inf')
        start = 0
        for block in matrix.iter_blocks(block_size) if identical else ():
            block = scipy.sparse.csr_array(block)
            block.sort_indices()
            expected = reference[start : start + block.shape[0]]
            start += block.shape[0]
            difference = abs(block - expected)
            if difference.nnz:
                max_abs_diff = max(max_abs_diff, float(difference.max()))
            identical &= (
                np.array_equal(block.indptr, expected.indptr)
                and np.array_equal(block.indices, expected.indices)
                and np.array_equal(block.data, expected.data)
            )
        comparisons[str(pk)] = {
            'identical': bool(identical and start == reference.shape[0]),
            'max_abs_diff': max_abs_diff,
        }
    return {'comparisons': comparisons}


def _pipeline_builder(
    nl: int, jobs: int, embeddings: t.Any = None, clusters: t.Any = None, incremental: bool = False
) -> t.Any:
    """The work chain's builder, from the embeddings or from the clusters, with the pipeline's descriptor; with
    ``incremental``, the out-of-core SGDClassifier of ``workchain_at_scale.py full`` instead of the default SVC, whose
    training time grows faster than linearly with the number of rows."""
    from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

    inputs: dict[str, t.Any] = {'descriptor': descriptor_parameters(nl), 'n_jobs': jobs}
    if incremental:
        from workchain_at_scale import FULL_ESTIMATOR

        inputs['estimator'] = FULL_ESTIMATOR
    if clusters is not None:
        return ImpurityLearningWorkChain.get_builder_from_clusters(clusters, **inputs)
    return ImpurityLearningWorkChain.get_builder_from_embeddings(embeddings, **inputs)


def _pipeline_payload(results: dict[str, t.Any], node: t.Any) -> dict[str, t.Any]:
    from aiida_mlworkbench.engine import acceleration_enabled

    return {
        'score': results['score'].value,
        'shape': list(results['features'].shape),
        'nnz': results['features'].nnz,
        'workchain_pk': node.pk,
        'engine_module': acceleration_enabled(),
    }


def task_package_pipeline(size: int, nl: int, jobs: int, incremental: bool = False) -> dict[str, t.Any]:
    """The package's way of the whole pipeline: ImpurityLearningWorkChain on the synthetic database's embeddings, in
    one process that extracts the clusters (``get_builder_from_embeddings``). The time includes loading the
    embeddings and making the builder, not the imports (nor does the plain script's)."""
    load_benchmark_profile()
    from _common import run_workchain, workchain_steps
    from aiida import orm

    import aiida_mlworkbench.workflows  # noqa: F401
    from aiida_mlworkbench.synthetic import default_group_label, iter_synthetic_embeddings

    group = orm.Group.collection.get(label=default_group_label(size, SEED))
    start = time.perf_counter()
    builder = _pipeline_builder(nl, jobs, embeddings=iter_synthetic_embeddings(group), incremental=incremental)
    builder_seconds = time.perf_counter() - start
    results, node, run_seconds, epoch = run_workchain(builder)
    seconds = time.perf_counter() - start
    steps = {'builder': builder_seconds, **workchain_steps(node, epoch, run_seconds)}
    return {'seconds': seconds, 'steps': steps, **_pipeline_payload(results, node)}


def task_package_clusters_pipeline(size: int, nl: int, jobs: int) -> dict[str, t.Any]:
    """The package's way in two parts: ``build_impurity_clusters`` on the embeddings (one stored ``ImpurityClusters``),
    then ImpurityLearningWorkChain from that node (``get_builder_from_clusters``); the time is the sum."""
    load_benchmark_profile()
    from _common import run_workchain, workchain_steps
    from aiida import orm

    import aiida_mlworkbench.workflows  # noqa: F401
    from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters
    from aiida_mlworkbench.synthetic import default_group_label, iter_synthetic_embeddings

    group = orm.Group.collection.get(label=default_group_label(size, SEED))
    start = time.perf_counter()
    clusters = build_impurity_clusters(iter_synthetic_embeddings(group))
    clusters_seconds = time.perf_counter() - start
    step = time.perf_counter()
    results, node, run_seconds, epoch = run_workchain(_pipeline_builder(nl, jobs, clusters=clusters))
    workchain_seconds = time.perf_counter() - step
    return {
        'seconds': clusters_seconds + workchain_seconds,
        'clusters_seconds': clusters_seconds,
        'workchain_seconds': workchain_seconds,
        'steps': workchain_steps(node, epoch, run_seconds),
        **_pipeline_payload(results, node),
    }


def task_workchain_full(size: int, nl: int, jobs: int) -> dict[str, t.Any]:
    """``workchain_at_scale.py full`` in the benchmark profile: the work chain with the incremental SGDClassifier."""
    load_benchmark_profile()
    import workchain_at_scale

    return workchain_at_scale.full_run(size, nl, jobs)


def run_task(name: str, arguments: str) -> int:
    """Entry point of a child: run ``task_<name>`` and print its result (plus ``ru_maxrss``) as the last line."""
    function = globals()[f'task_{name}']
    result = function(**json.loads(arguments))
    result['ru_maxrss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result), flush=True)
    return 0


# -- the cases -------------------------------------------------------------------------------------------------------


def _featurize_case(reference_size: int, nl: int) -> Case:
    name = f'featurize-{reference_size}-{nl}'

    def build(context: Context) -> list[Run]:
        size = context.size(reference_size)
        output = context.workdir / f'plain-{size}-{nl}.npz'
        runs = [
            Run(
                name,
                'plain',
                size,
                nl,
                context.plain_jobs,
                context.task_command('plain_featurize', size=size, nl=nl, jobs=context.plain_jobs, output=str(output)),
                needs=(('clusters', size),),
                label='DScribe SOAP(species=60, sparse=True).create, scipy CSR',
            )
        ]
        runs += [
            Run(
                name,
                'package',
                size,
                nl,
                jobs,
                context.task_command('package_featurize', size=size, nl=nl, jobs=jobs),
                needs=(('clusters', size),),
                label='featurize calcfunction (SpeciesAwareSOAP), stored SparseFeatureMatrix',
            )
            for jobs in context.package_jobs
        ]
        return runs

    def check(context: Context, results: list[Result]) -> list[Target]:
        size = context.size(reference_size)
        plain = [result for result in results if result.run.way == 'plain' and result.ok]
        package = [result for result in results if result.run.way == 'package' and result.ok]
        targets = []
        where = f'N = {size}, n = l = {nl}'
        comparisons = {}
        if plain and package:
            comparisons = context.task(
                'compare',
                plain=str(context.workdir / f'plain-{size}-{nl}.npz'),
                matrix_pks=[result.payload['matrix_pk'] for result in package],
            )['comparisons']
        for result in package:
            comparison = comparisons.get(str(result.payload['matrix_pk']))
            jobs = result.run.jobs
            if comparison is not None:
                targets.append(
                    Target(
                        f'identical output, {where}, package {jobs} job(s) vs plain: max abs diff '
                        f'{comparison["max_abs_diff"]:.1e}',
                        comparison['identical'],
                    )
                )
        if plain and package:
            # One line per case: the target is met with the better job count ("use both cores where it pays").
            descriptor = [plain[0].payload['descriptor_seconds'] / r.payload['descriptor_seconds'] for r in package]
            whole = [plain[0].seconds / r.seconds for r in package]
            jobs = [r.run.jobs for r in package]
            targets.append(
                Target(
                    f'speed, {where}: SpeciesAwareSOAP is '
                    + ', '.join(f'{x:.1f}x ({j} job{"s" * (j > 1)})' for x, j in zip(descriptor, jobs, strict=True))
                    + f' faster than DScribe 60-species on {plain[0].run.jobs} jobs (target >= {SPEED_TARGET:.0f}x '
                    'with the better job count); the whole featurize calcfunction (loading, provenance, storage) '
                    + ', '.join(f'{x:.1f}x' for x in whole),
                    max(descriptor) >= SPEED_TARGET,
                )
            )
        if not (plain and package):
            targets.append(Target(f'identical output and speed, {where}: a run failed or was skipped', None))
        if reference_size == 7100 and nl == 9:
            for result in package:
                targets.append(
                    Target(
                        f'memory, {size} x {result.payload["shape"][1]} features (n = l = 9), featurize and store '
                        f'on {result.run.jobs} job(s): peak RSS {result.peak_rss / 1e9:.2f} GB (target < '
                        f'{MEMORY_TARGET_BYTES / 1e9:.0f} GB)',
                        result.peak_rss < MEMORY_TARGET_BYTES,
                    )
                )
            if not package:
                targets.append(Target('memory, N = 7100, n = l = 9: the package run failed or was skipped', None))
        return targets

    return Case(
        name,
        f'featurize the clusters of the N = {reference_size} database at n_max = l_max = {nl}: plain (DScribe, '
        f'{PLAIN_JOBS} jobs) and package (featurize calcfunction, {" and ".join(map(str, PACKAGE_JOBS))} jobs); '
        'identical output, speed-up'
        + (', peak RSS of the package < 1 GB' if (reference_size, nl) == (7100, 9) else ''),
        build,
        check,
    )


for _size in REFERENCE_SIZES:
    for _nl in RESOLUTIONS:
        register(_featurize_case(_size, _nl))


PIPELINE_SIZE = 1752
PIPELINE_NL = 5
PIPELINE_JOBS = 1
"""Featurization jobs of every way of the pipeline case: what a user writes by default (``SOAP.create`` and the work
chain both default to one job)."""
PIPELINE_PLAIN_RATIO = 0.5
"""Target: the package's time / the plain DScribe + scikit-learn script's."""
PIPELINE_OWN_RATIO = 2.0
"""Target: the package's time / the plain script on the package's own SOAP (what provenance costs)."""
PACKAGE_WAYS = ('package', 'package-clusters')
PLAIN_WAYS = {'plain': 'dscribe', 'plain-own': 'package'}
"""The plain ways of the pipeline case and the ``--featurizer`` of ``plain_pipeline.py`` each runs."""
WAYS = ('plain', 'plain-own', *PACKAGE_WAYS)


def _plain_pipeline_command(size: int, featurizer: str) -> list[str]:
    command = [str(HERE / 'plain_pipeline.py'), '--size', str(size), '--n-max', str(PIPELINE_NL)]
    command += ['--l-max', str(PIPELINE_NL), '--jobs', str(PIPELINE_JOBS), '--seed', str(SEED)]
    return [*command, '--featurizer', featurizer, '--json']


def _build_pipeline(context: Context) -> list[Run]:
    size = context.size(PIPELINE_SIZE)
    arguments = {'size': size, 'nl': PIPELINE_NL, 'jobs': PIPELINE_JOBS}
    return [
        Run(
            'pipeline',
            'plain',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            _plain_pipeline_command(size, PLAIN_WAYS['plain']),
            label='benchmarks/plain_pipeline.py (DScribe SOAP)',
        ),
        Run(
            'pipeline',
            'plain-own',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            _plain_pipeline_command(size, PLAIN_WAYS['plain-own']),
            label="benchmarks/plain_pipeline.py --featurizer package (the package's SOAP, no provenance)",
        ),
        Run(
            'pipeline',
            'package',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            context.task_command('package_pipeline', **arguments),
            needs=(('database', size),),
            label='ImpurityLearningWorkChain.get_builder_from_embeddings: one process that extracts',
        ),
        Run(
            'pipeline',
            'package-clusters',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            context.task_command('package_clusters_pipeline', **arguments),
            needs=(('database', size),),
            label='build_impurity_clusters, then ImpurityLearningWorkChain.get_builder_from_clusters',
        ),
    ]


def _check_pipeline(context: Context, results: list[Result]) -> list[Target]:
    done = {result.run.way: result for result in results if result.ok}
    size = context.size(PIPELINE_SIZE)
    targets = []
    for way in PACKAGE_WAYS:
        if way not in done:
            targets.append(Target(f'pipeline, N = {size}: the {way} run failed or was skipped', None))
            continue
        package = done[way]
        parts = ''
        if way == 'package-clusters':
            parts = (
                f' (build_impurity_clusters {package.payload["clusters_seconds"]:.1f} s + work chain from the '
                f'clusters {package.payload["workchain_seconds"]:.1f} s)'
            )
        for reference, limit in (('plain', PIPELINE_PLAIN_RATIO), ('plain-own', PIPELINE_OWN_RATIO)):
            if reference not in done:
                targets.append(Target(f'pipeline, N = {size}: {way} / {reference}: the {reference} run failed', None))
                continue
            ratio = package.seconds / done[reference].seconds
            targets.append(
                Target(
                    f'pipeline, N = {size}, every node stored: {way} {package.seconds:.1f} s{parts} / {reference} '
                    f'{done[reference].seconds:.1f} s = {ratio:.2f} (target <= {limit})',
                    ratio <= limit,
                )
            )
    # Not a target: the plain script's clusters differ from the stored ones by round-off (see task_plain_featurize),
    # and StandardScaler(with_mean=False) blows up features whose spread is round-off, so accuracies may differ.
    scores = ', '.join(f'{way} {run.payload["score"]:.4f}' for way, run in done.items() if 'score' in run.payload)
    if scores:
        targets.append(Target(f'pipeline, N = {size}: test accuracy: {scores}', None, info=True))
    return targets


register(
    Case(
        'pipeline',
        f'the whole work (clusters, features at n = l = {PIPELINE_NL}, stratified 0.25 split, StandardScaler + linear '
        f'SVC, accuracy) on the N = {PIPELINE_SIZE} database, {PIPELINE_JOBS} featurization job: plain_pipeline.py '
        "with DScribe (plain) and with the package's SOAP (plain-own), against ImpurityLearningWorkChain from the "
        'embeddings (package) and build_impurity_clusters + the work chain from the clusters (package-clusters); '
        f'each package way <= {PIPELINE_PLAIN_RATIO}x plain and <= {PIPELINE_OWN_RATIO:.0f}x plain-own',
        _build_pipeline,
        _check_pipeline,
    )
)


PLAIN_AIIDA_VARIABLE = 'MLWORKBENCH_PLAIN_AIIDA'
"""``aiida_mlworkbench.engine.ENVIRONMENT_VARIABLE`` (not imported: the runner itself does not import aiida)."""
PLAIN_AIIDA_TIMEOUT = 2 * 60 * 60
PLAIN_AIIDA_QUICK_TIMEOUT = 10 * 60
"""Seconds after which the plain-aiida run is killed: aiida-core compares each new input link with all earlier ones
(``Dict.__eq__`` reads both nodes' attributes from the database), so the 1752 embeddings take most of an hour."""


def _build_plain_aiida(context: Context) -> list[Run]:
    size = context.size(PIPELINE_SIZE)
    return [
        Run(
            'plain-aiida',
            'package',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            context.task_command('package_pipeline', size=size, nl=PIPELINE_NL, jobs=PIPELINE_JOBS),
            needs=(('database', size),),
            label=f'the package way of the pipeline case with {PLAIN_AIIDA_VARIABLE}=1 (plain aiida-core)',
            environment={PLAIN_AIIDA_VARIABLE: '1'},
            timeout=PLAIN_AIIDA_QUICK_TIMEOUT if context.quick else PLAIN_AIIDA_TIMEOUT,
        )
    ]


def _check_plain_aiida(context: Context, results: list[Result]) -> list[Target]:
    if not results:
        return [Target('plain aiida-core: the run was skipped', None)]
    result = results[0]
    where = f'the work chain from the embeddings, N = {result.run.size}, on plain aiida-core ({PLAIN_AIIDA_VARIABLE}=1)'
    if not result.ok:
        return [Target(f'{where}: failed or killed after {result.process_seconds:.0f} s', None)]
    if result.payload.get('engine_module') is not False:
        return [Target(f'{where}: the engine module was still used: the switch did not take effect', False)]
    package = next(
        (
            other
            for other in context.results
            if (other.run.case, other.run.way, other.run.size) == ('pipeline', 'package', result.run.size) and other.ok
        ),
        None,
    )
    versus = ''
    if package is not None:
        versus = f', {result.seconds / package.seconds:.1f}x the {package.seconds:.1f} s with the engine module'
    return [Target(f'{where}: {result.seconds:.1f} s{versus} (no target)', None, info=True)]


register(
    Case(
        'plain-aiida',
        f'the package way of the pipeline case (N = {PIPELINE_SIZE}) with {PLAIN_AIIDA_VARIABLE}=1: every process on '
        'plain aiida-core, without aiida_mlworkbench.engine; the time is reported, no target',
        _build_plain_aiida,
        _check_plain_aiida,
    )
)


SCALING_SIZES = (1752, 7100, 28_400)
QUICK_SCALING_SIZES = (150, 300, 1200)
SCALING_TIME_RATIO = 1.2
"""Target: time per embedding at the largest N / that at the smallest."""
SCALING_RSS_BYTES = 1.5e9


def _scaling_sizes(context: Context) -> tuple[int, ...]:
    return QUICK_SCALING_SIZES if context.quick else SCALING_SIZES


def _build_scaling(context: Context) -> list[Run]:
    return [
        Run(
            'scaling',
            'package',
            size,
            PIPELINE_NL,
            PIPELINE_JOBS,
            context.task_command('package_pipeline', size=size, nl=PIPELINE_NL, jobs=PIPELINE_JOBS, incremental=True),
            needs=(('database', size),),
            label='ImpurityLearningWorkChain.get_builder_from_embeddings with the incremental SGDClassifier',
        )
        for size in _scaling_sizes(context)
    ]


def _check_scaling(context: Context, results: list[Result]) -> list[Target]:
    done = {result.run.size: result for result in results if result.ok}
    sizes = _scaling_sizes(context)
    targets = [
        Target(
            f'scaling, N = {size}: {done[size].seconds:.1f} s, {1000 * done[size].seconds / size:.2f} ms per '
            f'embedding, peak RSS {done[size].peak_rss / MIB:.0f} MiB',
            None,
            info=True,
        )
        for size in sizes
        if size in done
    ]
    small, large = min(sizes), max(sizes)
    if small not in done or large not in done:
        return [*targets, Target('scaling: a run failed or was skipped', None)]
    ratio = (done[large].seconds / large) / (done[small].seconds / small)
    return [
        *targets,
        Target(
            f'scaling: time per embedding at N = {large} is {ratio:.2f}x that at N = {small} (target <= '
            f'{SCALING_TIME_RATIO})',
            ratio <= SCALING_TIME_RATIO,
        ),
        Target(
            f'scaling: peak RSS at N = {large} {done[large].peak_rss / 1e9:.2f} GB (target < {SCALING_RSS_BYTES / 1e9} '
            'GB)',
            done[large].peak_rss < SCALING_RSS_BYTES,
        ),
    ]


register(
    Case(
        'scaling',
        f'the package way of the pipeline case with the incremental SGDClassifier of workchain-7100-9 (training '
        f'linear in N; SVC is not) (n = l = {PIPELINE_NL}, {PIPELINE_JOBS} job) at N = '
        f'{", ".join(map(str, SCALING_SIZES))} (synthetic): time, time per embedding and peak RSS per N; time per '
        f'embedding at the largest N within {SCALING_TIME_RATIO}x of that at the smallest, peak RSS there < '
        f'{SCALING_RSS_BYTES / 1e9} GB',
        _build_scaling,
        _check_scaling,
    )
)


sys.path.insert(0, str(HERE))  # the other scripts of this folder, whose tasks some cases measure
import workchain_at_scale  # noqa: E402

FULL_SIZE = 7100
FULL_NL = 9
FULL_SECONDS = 45.0
FULL_RSS_BYTES = 1e9


def _build_workchain_full(context: Context) -> list[Run]:
    size = context.size(FULL_SIZE)
    jobs = workchain_at_scale.FULL_JOBS
    return [
        Run(
            f'workchain-{FULL_SIZE}-{FULL_NL}',
            'package',
            size,
            FULL_NL,
            jobs,
            context.task_command('workchain_full', size=size, nl=FULL_NL, jobs=jobs),
            needs=(('database', size),),
            label='workchain_at_scale.py full: ImpurityLearningWorkChain, incremental SGDClassifier',
        )
    ]


def _check_workchain_full(context: Context, results: list[Result]) -> list[Target]:
    if not results or not results[0].ok:
        return [Target(f'workchain-{FULL_SIZE}-{FULL_NL}: the run failed or was skipped', None)]
    result = results[0]
    rows, columns = result.payload['shape']
    where = f'the work chain at {rows} x {columns:,} (n = l = {FULL_NL}), {result.run.jobs} job(s), incremental SGD'
    own = result.payload['ru_maxrss'] / 1e9
    return [
        Target(
            f'{where}: {result.seconds:.1f} s end to end (target < {FULL_SECONDS:.0f} s); test score '
            f'{result.payload["score"]:.4f}',
            result.seconds < FULL_SECONDS,
        ),
        Target(
            f'{where}: peak RSS {result.peak_rss / 1e9:.2f} GB, the child and its featurization workers together '
            f'(the child alone {own:.2f} GB; target < {FULL_RSS_BYTES / 1e9:.0f} GB)',
            result.peak_rss < FULL_RSS_BYTES,
        ),
    ]


register(
    Case(
        f'workchain-{FULL_SIZE}-{FULL_NL}',
        f'workchain_at_scale.py full: ImpurityLearningWorkChain from the N = {FULL_SIZE} embeddings at n = l = '
        f'{FULL_NL} over the 60 species (1,460,700 features), incremental SGDClassifier streaming from the HDF5 file, '
        f'{workchain_at_scale.FULL_JOBS} featurization jobs; end to end < {FULL_SECONDS:.0f} s and peak RSS < '
        f'{FULL_RSS_BYTES / 1e9:.0f} GB',
        _build_workchain_full,
        _check_workchain_full,
    )
)


# The training case of benchmarks/training_memory.py (written separately): its tasks, measured here.
try:
    import training_memory
except ImportError:  # Without that script the other cases still run.
    training_memory = None


def _training_sizes(context: Context) -> tuple[int, ...]:
    return tuple(training_memory.QUICK_SIZES if context.quick else training_memory.SIZES)


def _build_training(context: Context) -> list[Run]:
    """Store the SOAP-shaped random matrix, targets and split per size (unmeasured), then train both ways."""
    script = HERE / 'training_memory.py'
    context.task('create_profile', name=training_memory.PROFILE_NAME)
    runs = []
    for size in _training_sizes(context):
        prepared = context.task(
            'prepare',
            script=script,
            n_rows=size,
            n_features=training_memory._common.SOAP_FEATURES,
            nnz_per_row=training_memory._common.SOAP_NNZ_PER_ROW,
            seed=SEED,
            workdir=str(context.workdir),
        )
        nodes = {key: prepared[key] for key in ('features', 'targets', 'split')}
        package = {**nodes, 'epochs': training_memory.EPOCHS, 'block_size': training_memory.BLOCK_SIZE}
        plain = {'plain': prepared['plain'], 'epochs': training_memory.EPOCHS}
        for way, arguments in (('plain', plain), ('package', package)):
            runs.append(
                Run(
                    'training',
                    way,
                    size,
                    9,
                    1,
                    [str(script), '--_task', way, json.dumps(arguments)],
                    label='SGDClassifier, in memory' if way == 'plain' else 'train_model, incremental from HDF5',
                    seconds_key='train_s',
                )
            )
    return runs


def _check_training(context: Context, results: list[Result]) -> list[Target]:
    package = {result.run.size: result for result in results if result.run.way == 'package'}
    sizes = _training_sizes(context)
    if not all(size in package and package[size].ok for size in sizes) or any(
        package[size].payload.get('exit_status') != 0 for size in sizes
    ):
        return [Target('training: a run failed or was skipped', None)]
    small, large = package[min(sizes)], package[max(sizes)]
    ratio = large.peak_rss / small.peak_rss
    return [
        Target(
            f'training memory: peak RSS of the package at N = {large.run.size} is {ratio:.2f}x that at N = '
            f'{small.run.size} ({large.peak_rss / MIB:.0f} / {small.peak_rss / MIB:.0f} MiB; target within '
            f'{training_memory.RSS_RATIO_TARGET}x)',
            ratio <= training_memory.RSS_RATIO_TARGET,
        )
    ]


if training_memory is not None:
    register(
        Case(
            'training',
            'benchmarks/training_memory.py: a stored SOAP-shaped random matrix (1,460,700 columns, about 1,710 '
            f'non-zeros per row) of N = {" and ".join(map(str, training_memory.SIZES))} rows; package: train_model '
            'with incremental SGDClassifier streaming blocks from the HDF5 file; plain: SGDClassifier.fit on the '
            "whole matrix in memory; the package's peak RSS must not grow with N",
            _build_training,
            _check_training,
        )
    )


# The feature-reads case (issue 10): block reads of a stored SparseFeatureMatrix, every block checked (indptr
# monotone and within the stored values, column indices within the shape, values finite) before scipy sees it,
# against plain h5py reads of the same arrays from a copy of the same file.
READS_SHAPE = (7100, 270_900)
READS_QUICK_ROWS = 710
READS_NNZ_PER_ROW = 330
READS_BLOCK = 256
READS_SCAN_BLOCK = 1024
READS_REPEATS = 200
READS_RATIO_TARGET = 2.0


def task_feature_reads_setup(n_rows: int) -> dict[str, t.Any]:
    """Store a SOAP-like random matrix (about 330 non-zeros per row) and copy its HDF5 file for the plain reads."""
    load_benchmark_profile(create=True)
    sys.path.insert(0, str(HERE))
    from _common import row_block

    from aiida_mlworkbench.data import SparseFeatureMatrix

    n_features = READS_SHAPE[1]
    blocks = (
        row_block(first, min(first + 1024, n_rows), n_features, READS_NNZ_PER_ROW, SEED)
        for first in range(0, n_rows, 1024)
    )
    node = SparseFeatureMatrix.from_blocks(blocks, n_features, descriptor={'name': 'random, SOAP-like'}).store()
    plain = pathlib.Path(os.environ['AIIDA_PATH']) / f'feature-reads-{n_rows}.h5'
    with node.base.repository.open(node.FILENAME, 'rb') as source, open(plain, 'wb') as target:
        shutil.copyfileobj(source, target)
    return {'pk': node.pk, 'plain': str(plain), 'nnz': node.nnz}


def _feature_readers(way: str, pk: int, plain: str, n_rows: int) -> tuple[t.Callable, t.Callable]:
    """``read(first, stop)`` and ``scan()`` of one way, the file kept open (as a stored node keeps it)."""
    import scipy.sparse

    n_features = READS_SHAPE[1]
    if way == 'package':
        load_benchmark_profile()
        from aiida import orm

        node = orm.load_node(pk)
        return (lambda first, stop: node.get_rows(slice(first, stop))), (lambda: node.iter_blocks(READS_SCAN_BLOCK))
    import h5py

    handle = h5py.File(plain, 'r')

    def read(first: int, stop: int) -> t.Any:
        indptr = handle['indptr'][first : stop + 1]
        low, high = int(indptr[0]), int(indptr[-1])
        arrays = (handle['data'][low:high], handle['indices'][low:high], indptr - low)
        return scipy.sparse.csr_array(arrays, shape=(stop - first, n_features))

    def scan() -> t.Iterator[t.Any]:
        for first in range(0, n_rows, READS_SCAN_BLOCK):
            yield read(first, min(first + READS_SCAN_BLOCK, n_rows))

    return read, scan


def task_feature_reads(way: str, pk: int, plain: str, n_rows: int) -> dict[str, t.Any]:
    """Random 256-row block reads (median) and full scans in 1024-row blocks (best of 5), the file kept open.

    The package's child also runs the plain reads, taking turns with its own, so that both ratios compare reads made
    under the same load (the machine is shared); the plain child runs the plain reads alone.
    """
    import numpy as np

    ways = [way] if way == 'plain' else [way, 'plain']
    readers = {name: _feature_readers(name, pk, plain, n_rows) for name in ways}
    for read, _ in readers.values():
        read(0, 1)  # opens the file and, for the package, checks its structure (once: a stored node keeps it open)
    block_seconds: dict[str, list[float]] = {name: [] for name in ways}
    for first in np.random.default_rng(SEED).integers(0, n_rows - READS_BLOCK, READS_REPEATS):
        for name, (read, _) in readers.items():
            start = time.perf_counter()
            read(int(first), int(first) + READS_BLOCK)
            block_seconds[name].append(time.perf_counter() - start)
    scan_seconds: dict[str, list[float]] = {name: [] for name in ways}
    nnz = {}
    for _ in range(5):
        for name, (_, scan) in readers.items():
            start = time.perf_counter()
            nnz[name] = sum(block.nnz for block in scan())
            scan_seconds[name].append(time.perf_counter() - start)
    if len(set(nnz.values())) != 1:
        raise RuntimeError(f'the ways read different numbers of values: {nnz}')
    result: dict[str, t.Any] = {'seconds': min(scan_seconds[way]), 'nnz': nnz[way]}
    for name in ways:
        result[f'{name}_block_ms'] = 1000 * float(np.median(block_seconds[name]))
        result[f'{name}_scan_s'] = min(scan_seconds[name])
    return result


def _build_feature_reads(context: Context) -> list[Run]:
    n_rows = READS_QUICK_ROWS if context.quick else READS_SHAPE[0]
    stored = context.task('feature_reads_setup', n_rows=n_rows)
    return [
        Run(
            'feature-reads',
            way,
            n_rows,
            None,
            None,
            context.task_command('feature_reads', way=way, pk=stored['pk'], plain=stored['plain'], n_rows=n_rows),
            label=label,
        )
        for way, label in (
            ('plain', 'h5py slices of indptr, indices, data + scipy csr_array'),
            ('package', 'SparseFeatureMatrix.get_rows / iter_blocks, every block checked'),
        )
    ]


def _check_feature_reads(context: Context, results: list[Result]) -> list[Target]:
    ways = {result.run.way: result for result in results if result.ok}
    if 'package' not in ways:
        return [Target('feature reads: the package run failed or was skipped', None)]
    figures = ways['package'].payload
    where = f'{ways["package"].run.size} x {READS_SHAPE[1]:,}, {figures["nnz"]:,} non-zeros, the ways taking turns'
    block = figures['package_block_ms'] / figures['plain_block_ms']
    scan = figures['package_scan_s'] / figures['plain_scan_s']
    return [
        Target(
            f'feature reads ({where}): {READS_BLOCK}-row block, median of {READS_REPEATS}: package '
            f'{figures["package_block_ms"]:.2f} ms, plain h5py {figures["plain_block_ms"]:.2f} ms, ratio {block:.2f} '
            f'(target <= {READS_RATIO_TARGET:.0f})',
            block <= READS_RATIO_TARGET,
        ),
        Target(
            f'feature reads ({where}): full scan in {READS_SCAN_BLOCK}-row blocks, best of 5: package '
            f'{figures["package_scan_s"]:.3f} s, plain h5py {figures["plain_scan_s"]:.3f} s, ratio {scan:.2f} '
            f'(target <= {READS_RATIO_TARGET:.0f})',
            scan <= READS_RATIO_TARGET,
        ),
    ]


register(
    Case(
        'feature-reads',
        f'block reads of a stored {READS_SHAPE[0]} x {READS_SHAPE[1]:,} SOAP-like random matrix (about '
        f'{READS_NNZ_PER_ROW} non-zeros per row): SparseFeatureMatrix.get_rows ({READS_BLOCK} rows) and iter_blocks '
        f'({READS_SCAN_BLOCK} rows), every block checked before scipy sees it, against plain h5py reads of the same '
        f'arrays from a copy of the file (taking turns in the package child); each within {READS_RATIO_TARGET:.0f}x',
        _build_feature_reads,
        _check_feature_reads,
    )
)


# -- report ----------------------------------------------------------------------------------------------------------


def select_cases(only: list[str] | None) -> list[Case]:
    """The cases named in ``only`` (a name or the start of names, e.g. ``featurize`` or ``featurize-7100``)."""
    if not only:
        return list(CASES.values())
    selected = []
    for pattern in only:
        matches = [case for name, case in CASES.items() if name == pattern or name.startswith(pattern + '-')]
        if not matches:
            raise SystemExit(f'unknown case {pattern!r}; the cases are: {", ".join(CASES)}')
        selected += [case for case in matches if case not in selected]
    return [case for case in CASES.values() if case in selected]


def _format_seconds(seconds: float) -> str:
    return f'{seconds:.1f}' if seconds < 100 else f'{seconds:.0f}'


def table(results: list[Result], setup: list[Result]) -> str:
    """Markdown table of the runs; ratios are each way / the plain way of the same case, N and n=l (time and peak
    RSS)."""
    header = '| case | way | N | n=l | jobs | wall s | process s | peak RSS MiB | time / plain | RSS / plain |'
    lines = [header, '|' + '---|' * (header.count('|') - 1)]
    for result in setup:
        run = result.run
        lines.append(
            f'| setup | {run.way} | {run.size} | - | - | {_format_seconds(result.seconds)} | '
            f'{_format_seconds(result.process_seconds)} | {result.peak_rss / MIB:.0f} | | |'
        )
    for result in results:
        run = result.run
        plain = next(
            (
                other
                for other in results
                if (other.run.case, other.run.size, other.run.nl) == (run.case, run.size, run.nl)
                and other.run.way == 'plain'
                and other.ok
            ),
            None,
        )
        time_ratio = rss_ratio = ''
        if run.way != 'plain' and plain is not None and result.ok:
            time_ratio = f'{result.seconds / plain.seconds:.3f}'
            rss_ratio = f'{result.peak_rss / plain.peak_rss:.2f}'
        wall = _format_seconds(result.seconds) if result.ok else f'failed ({result.returncode})'
        lines.append(
            f'| {run.case} | {run.way} | {run.size} | {run.nl or "-"} | {run.jobs or "-"} | {wall} | '
            f'{_format_seconds(result.process_seconds)} | {result.peak_rss / MIB:.0f} | {time_ratio} | {rss_ratio} |'
        )
    return '\n'.join(lines)


def machine_description() -> dict[str, str]:
    import importlib.metadata

    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    versions = []
    for package in ('aiida-mlworkbench', 'aiida-core', 'aiida-kkr', 'dscribe', 'scikit-learn', 'numpy', 'scipy'):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f'{package} {importlib.metadata.version(package)}')
    for package in ('h5py', 'ase', 'joblib', 'psutil'):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f'{package} {importlib.metadata.version(package)}')
    commit = subprocess.run(
        ['git', 'describe', '--always', '--dirty'], cwd=REPOSITORY, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        'CPU': f'{cpu}, {psutil.cpu_count(logical=True)} logical cores ({psutil.cpu_count(logical=False)} physical)',
        'memory': f'{psutil.virtual_memory().total / 2**30:.1f} GiB',
        'system': f'{platform.system()} {platform.release()}',
        'Python': f'{platform.python_implementation()} {platform.python_version()}',
        'libraries': ', '.join(versions),
        'commit': commit or 'unknown',
    }


def load_average() -> str:
    return ', '.join(f'{value:.2f}' for value in os.getloadavg())


# -- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help=f'small databases ({QUICK_SIZES}) instead of 1752/7100')
    parser.add_argument('--only', nargs='+', metavar='CASE', help='run these cases (a name or its start) only')
    parser.add_argument(
        '--ways',
        nargs='+',
        choices=WAYS,
        default=list(WAYS),
        help='run only these ways (default all); ratios need a plain way and a package way',
    )
    parser.add_argument('--plain-jobs', type=int, default=PLAIN_JOBS, help=f'n_jobs of DScribe (default {PLAIN_JOBS})')
    parser.add_argument(
        '--package-jobs',
        type=int,
        nargs='+',
        default=list(PACKAGE_JOBS),
        help=f'job counts of the package featurization (default {" ".join(map(str, PACKAGE_JOBS))})',
    )
    parser.add_argument('--list', action='store_true', help='list the cases and exit')
    parser.add_argument('--write-results', action='store_true', help='write the results file (see --results-file)')
    parser.add_argument('--results-file', type=pathlib.Path, default=HERE / 'RESULTS.md')
    parser.add_argument(
        '--timeout', type=float, default=None, help='seconds after which a run is killed (default none)'
    )
    parser.add_argument('--keep', action='store_true', help='keep the work folder (profile, plain matrices)')
    parser.add_argument('--_task', nargs=2, metavar=('NAME', 'JSON'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._task:
        return run_task(*args._task)
    if args.list:
        for case in CASES.values():
            print(f'{case.name}: {case.description}')
        return 0

    cases = select_cases(args.only)
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    machine = machine_description()
    say(f'{started:%Y-%m-%d %H:%M %Z}, {machine["CPU"]}, load average {load_start}')
    say(f'cases: {", ".join(case.name for case in cases)}{" (quick sizes)" if args.quick else ""}')

    start = time.perf_counter()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='mlworkbench-benchmarks-'))
    results: list[Result] = []
    targets: list[Target] = []
    try:
        context = Context(args.quick, workdir, args.timeout)
        context.plain_jobs, context.package_jobs = args.plain_jobs, tuple(args.package_jobs)
        for case in cases:
            say(f'{case.name}: {case.description}')
            case_results = [context.measure(run) for run in case.build(context) if run.way in args.ways]
            results += case_results
            if case.check is not None:
                targets += case.check(context, case_results)
    finally:
        if args.keep:
            say(f'work folder kept: {workdir}')
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - start
    load_end = load_average()

    plain_aiida = sum(result.process_seconds for result in results if result.run.case == 'plain-aiida')
    rest = total - plain_aiida
    text = f'total time {total / 60:.1f} min'
    if plain_aiida:
        text += f', of which plain-aiida {plain_aiida / 60:.1f} min: the rest {rest / 60:.1f} min'
    if args.quick or args.only or len(args.ways) < len(WAYS):
        targets.append(Target(f'{text}: checked only for a full run (target < 20 min without plain-aiida)', None))
    else:
        targets.append(Target(f'{text} (target < 20 min without plain-aiida)', rest < TOTAL_TIME_TARGET))

    report = table(results, context.setup_results)
    print(report)
    print()
    for target in targets:
        print(target.line())

    if args.write_results:
        write_results(
            args=args,
            cases=cases,
            report=report,
            targets=targets,
            machine=machine,
            started=started,
            load_start=load_start,
            load_end=load_end,
            total=total,
        )
    failed = any(target.passed is False for target in targets) or not all(result.ok for result in results)
    return 1 if failed else 0


def write_results(
    *,
    args: argparse.Namespace,
    cases: list[Case],
    report: str,
    targets: list[Target],
    machine: dict[str, str],
    started: datetime.datetime,
    load_start: str,
    load_end: str,
    total: float,
) -> None:
    command = 'python benchmarks/run.py ' + ' '.join(arg for arg in (argv_for_display(args)) if arg)
    lines = [
        '# Benchmark results',
        '',
        f'Written by `{command.strip()}` on {started:%Y-%m-%d %H:%M %Z}; total time {total / 60:.1f} min.'
        + (' **Quick run: small databases, not the reference sizes.**' if args.quick else ''),
        '',
        '## Machine',
        '',
        *(f'- {key}: {value}' for key, value in machine.items()),
        f'- load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end',
        '',
        '## Cases',
        '',
        *(f'- `{case.name}`: {case.description}' for case in cases),
        '',
        '## Results',
        '',
        'wall s: the work itself (the child reports it: featurization, or the whole pipeline, without interpreter '
        'start-up and loading); process s: the whole child process; peak RSS: the child and all its descendants, '
        'sampled every 50 ms; ratios: each way / the plain way of the same case, N and n = l. Setup rows: the '
        'synthetic database and its clusters stored with provenance, done once per size and shared by the cases.',
        '',
        report,
        '',
        '## Targets',
        '',
        '```text',
        *(target.line() for target in targets),
        '```',
        '',
    ]
    args.results_file.write_text('\n'.join(lines))
    say(f'wrote {args.results_file}')


def argv_for_display(args: argparse.Namespace) -> list[str]:
    shown = []
    if args.quick:
        shown.append('--quick')
    if args.only:
        shown += ['--only', *args.only]
    shown.append('--write-results')
    return shown


if __name__ == '__main__':
    sys.exit(main())
