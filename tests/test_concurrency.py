"""Several ImpurityLearningWorkChains at once on two daemon workers: each finishes with the results of a run alone.

The suite runs once per backend, so this covers SQLite + ZeroMQ (``core.sqlite_dos``) and PostgreSQL + RabbitMQ
(``core.psql_dos``). Each run takes enough embeddings of a synthetic database that the work chain and its cluster
extraction have at least :data:`aiida_mlworkbench.engine.MANY_INPUTS` inputs, so their input links are stored by the
engine module, or, in the case with ``MLWORKBENCH_PLAIN_AIIDA=1`` in the daemon's environment, by plain aiida-core.
The runs share part of their input nodes and differ in the rest (window of embeddings and split seed), so no two
compute the same thing, and each stores process nodes, clusters, features and a model while the others do.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
import typing as t

import numpy as np
import pytest
from aiida import orm
from aiida.engine import ProcessState, run_get_node, submit

from aiida_mlworkbench import engine
from aiida_mlworkbench.synthetic import create_synthetic_database, iter_synthetic_embeddings
from aiida_mlworkbench.workflows import ImpurityLearningWorkChain

SMALL_SOAP = {'name': 'soap', 'r_cut': 5.0, 'n_max': 3, 'l_max': 3, 'sigma': 1.0, 'average': 'inner'}
RUN_SIZE = engine.MANY_INPUTS
"""Embeddings per run (one input each, plus the hosts, ``host_of`` and the settings): run ``i`` takes embeddings
``[i * OFFSET, i * OFFSET + RUN_SIZE)``."""
OFFSET = 24
MAX_RUNS = 4
WORKERS = 2
TIMEOUT = 600
"""Seconds to wait for all runs of a case: each takes seconds, the limit only ends a hung test."""
LOCK_MESSAGES = ('database is locked', 'deadlock detected', 'could not serialize access')
"""SQLite's busy error, PostgreSQL's deadlock and serialization failures."""
CASES = [(2, 'engine'), (4, 'engine'), (2, 'plain')]
"""(number of runs at once, how the daemon workers link the inputs: engine module or plain aiida-core)."""


@pytest.fixture(scope='module')
def embedding_pks() -> list[tuple[int, int]]:
    size = RUN_SIZE + (MAX_RUNS - 1) * OFFSET
    group = create_synthetic_database(size=size, seed=11, group_label='tests/concurrency', reuse_existing=True)
    return [(host.pk, impurity_info.pk) for host, impurity_info in iter_synthetic_embeddings(group)]


def builder_of(run: int, embedding_pks: list[tuple[int, int]]):
    """The builder of run ``run``: its own window of embeddings and its own split seed."""
    window = embedding_pks[run * OFFSET : run * OFFSET + RUN_SIZE]
    embeddings = [(orm.load_node(host), orm.load_node(info)) for host, info in window]
    return ImpurityLearningWorkChain.get_builder_from_embeddings(
        embeddings, descriptor=SMALL_SOAP, split={'seed': run, 'test_fraction': 0.25}
    )


def results_of(node: orm.WorkChainNode) -> dict:
    """What must not depend on other runs going on at the same time."""
    outputs = node.outputs
    return {
        'clusters': (len(outputs.clusters), outputs.clusters.checksum),
        'features': (outputs.features.checksum, outputs.features.shape, outputs.features.nnz),
        'targets': outputs.targets.get_array('targets').tolist(),
        'split': (outputs.split.get_array('train').tolist(), outputs.split.get_array('test').tolist()),
        'predictions': np.asarray(outputs.model.predict(outputs.features)).tolist(),
        'metrics': outputs.metrics.get_dict(),
        'score': outputs.score.value,
    }


@pytest.fixture(scope='module')
def alone(embedding_pks):
    """Return the results of a run on its own, in this process (each run once: the cases share runs)."""
    cache: dict[int, dict] = {}

    def results(run: int) -> dict:
        if run not in cache:
            _, node = run_get_node(builder_of(run, embedding_pks))
            assert node.is_finished_ok, node.exit_message
            cache[run] = results_of(node)
        return cache[run]

    return results


@contextlib.contextmanager
def switch_set(plain: bool) -> t.Iterator[None]:
    """Set the plain-aiida-core switch in this process's environment (``plain``) or remove it, and restore it after."""
    before = os.environ.pop(engine.ENVIRONMENT_VARIABLE, None)
    if plain:
        os.environ[engine.ENVIRONMENT_VARIABLE] = '1'
    try:
        yield
    finally:
        os.environ.pop(engine.ENVIRONMENT_VARIABLE, None)
        if before is not None:
            os.environ[engine.ENVIRONMENT_VARIABLE] = before


@pytest.fixture
def two_workers(n_runs, way, aiida_profile, aiida_config, daemon_client):
    """A daemon of two workers, each taking at most half of the runs: both workers run work chains at once, and with
    four runs each worker also runs two at once. With ``way == 'plain'`` the daemon is started with
    ``MLWORKBENCH_PLAIN_AIIDA=1`` in its environment (the workers inherit it; this process is left as it was).
    Afterwards the option is unset and the daemon restarted as usual."""

    def stop() -> None:
        if daemon_client.is_daemon_running:  # stopping a stopped daemon waits for the whole ``daemon.timeout``
            daemon_client.stop_daemon(wait=True)

    stop()
    aiida_config.set_option('daemon.worker_process_slots', max(1, n_runs // WORKERS), scope=aiida_profile.name)
    aiida_config.store()
    try:
        with switch_set(way == 'plain'):
            daemon_client.start_daemon(number_workers=WORKERS)
        assert int(daemon_client.get_numprocesses()['numprocesses']) == WORKERS
        yield daemon_client
    finally:
        stop()
        aiida_config.unset_option('daemon.worker_process_slots', scope=aiida_profile.name)
        aiida_config.store()
        # Left running with the default settings, as ``started_daemon_client`` starts it (and the session fixture
        # stops it at once; stopping a stopped daemon waits for the whole timeout).
        daemon_client.start_daemon(number_workers=1)


def switch_of(pid: int) -> str | None:
    """The value of the plain-aiida-core switch in the environment of the process ``pid`` (Linux ``/proc``)."""
    entries = pathlib.Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    values = [entry.partition(b'=')[2].decode() for entry in entries if entry.startswith(b'MLWORKBENCH_PLAIN_AIIDA=')]
    return values[0] if values else None


def process_logs(node: orm.ProcessNode) -> list[orm.Log]:
    """Log records (reports, warnings, tracebacks) of ``node`` and of every process it called."""
    return [log for process in [node, *node.called_descendants] for log in orm.Log.collection.get_logs_for(process)]


def diagnosis(message: str, nodes: list[orm.ProcessNode], daemon_output: str) -> str:
    """``message`` with the state and logs of every run and the end of the daemon's log."""
    lines = [message]
    for node in nodes:
        lines.append(f'--- {node}: {node.process_state} {node.exit_status} {node.process_status}')
        lines.extend(f'  {log.levelname} {log.metadata.get("process")}: {log.message}' for log in process_logs(node))
    if len(daemon_output) > 30000:  # the first error and the end
        daemon_output = f'{daemon_output[:20000]}\n[...]\n{daemon_output[-10000:]}'
    lines.append(f'--- daemon log:\n{daemon_output}')
    return '\n'.join(lines)


@pytest.mark.parametrize(('n_runs', 'way'), CASES, ids=[f'{n_runs}-{way}' for n_runs, way in CASES])
def test_work_chains_at_once(n_runs, way, embedding_pks, alone, two_workers):
    """``n_runs`` work chains submitted together to two daemon workers all finish OK, with the results of each alone
    (run in this process with the engine module), and no process or worker logged a lock error."""
    # The runs alone come first. They also store aiida-core's global setting `process|state_change|calculation`: in a
    # profile where no calculation ever ran, aiida-core 2.9 creates it with a check-then-insert at the first state
    # change, and two workers doing that at once collide (UniqueViolation on PostgreSQL) in aiida-core's own code.
    expected = [alone(run) for run in range(n_runs)]
    daemon_log = pathlib.Path(two_workers.daemon_log_file)
    log_start = daemon_log.stat().st_size if daemon_log.exists() else 0

    builders = [builder_of(run, embedding_pks) for run in range(n_runs)]
    for builder in builders:  # every run and its extraction have enough inputs for the engine module
        assert len(builder.embeddings.impurity_infos) + len(builder.embeddings.hosts) + 1 >= engine.MANY_INPUTS
    nodes = [submit(builder) for builder in builders]
    deadline = time.monotonic() + TIMEOUT
    while not all(node.is_terminated for node in nodes) and time.monotonic() < deadline:
        time.sleep(0.5)

    daemon_output = daemon_log.read_bytes()[log_start:].decode(errors='replace') if daemon_log.exists() else ''
    assert all(node.is_terminated for node in nodes), diagnosis(f'not finished in {TIMEOUT} s', nodes, daemon_output)
    problems = [
        f'{node}: {node.process_state} {node.exit_status} {node.exit_message} {node.exception}'
        for node in nodes
        if not node.is_finished_ok
    ]
    problems.extend(
        f'{node} log: {log.message}'
        for node in nodes
        for log in process_logs(node)
        if any(message in log.message for message in LOCK_MESSAGES)
    )
    problems.extend(f'daemon log: {message}' for message in LOCK_MESSAGES if message in daemon_output)
    assert not problems, diagnosis('\n'.join(problems), nodes, daemon_output)
    assert all(node.process_state is ProcessState.FINISHED for node in nodes)
    assert [node.exit_status for node in nodes] == [0] * n_runs

    # The runs were shared out to both workers (the pid of the worker that wrote each report).
    workers = {log.metadata['process'] for node in nodes for log in orm.Log.collection.get_logs_for(node)}
    assert len(workers) == WORKERS, f'the {n_runs} runs went to the workers {workers}'
    # Those workers ran with the switch as the case asks (the daemon is still running: the pids are alive).
    assert {switch_of(pid) for pid in workers} == {'1' if way == 'plain' else None}

    for run, node in enumerate(nodes):
        assert results_of(node) == expected[run], f'run {run} ({node}) differs from the same run alone'
