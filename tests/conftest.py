"""Test configuration: real AiiDA profiles from aiida-core's own pytest fixtures.

The storage backend is chosen with ``--aiida-storage`` (or the ``MLWORKBENCH_TEST_STORAGE`` environment variable):

* ``core.sqlite_dos`` (default): the embedded storage with aiida-core's built-in ZeroMQ broker, no services needed
  (aiida-core's fixtures start the broker for the session, so daemon tests run here too).
* ``core.psql_dos``: the production setup, a database on the PostgreSQL service at ``127.0.0.1:5432`` (override with
  ``MLWORKBENCH_TEST_PG_HOST``/``_PORT``/``_USER``) and RabbitMQ at ``127.0.0.1:5672`` as broker.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import sys
import typing as t

import pytest

pytest_plugins = ['aiida.tools.pytest_fixtures']

# The daemon starts workers with the `verdi` next to this interpreter, also when the environment is not activated.
os.environ['PATH'] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])

STORAGE_BACKENDS = ('core.sqlite_dos', 'core.psql_dos')
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
KKR_ARCHIVES = REPO_ROOT.parent / 'shared' / 'data' / 'aiida-kkr-archives'


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        '--aiida-storage',
        choices=STORAGE_BACKENDS,
        default=os.environ.get('MLWORKBENCH_TEST_STORAGE', 'core.sqlite_dos'),
        help='AiiDA storage backend of the test profile (default: core.sqlite_dos, no services).',
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f'aiida storage backend: {config.getoption("aiida_storage")}'


def _pg_connection_parameters() -> dict[str, t.Any]:
    return {
        'host': os.environ.get('MLWORKBENCH_TEST_PG_HOST', '127.0.0.1'),
        'port': int(os.environ.get('MLWORKBENCH_TEST_PG_PORT', '5432')),
        'user': os.environ.get('MLWORKBENCH_TEST_PG_USER', 'postgres'),
        'password': os.environ.get('MLWORKBENCH_TEST_PG_PASSWORD', ''),
    }


@contextlib.contextmanager
def _postgres_database(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[dict[str, t.Any]]:
    """Create a throw-away database on the PostgreSQL service and drop it afterwards."""
    import psycopg

    params = _pg_connection_parameters()
    name = f'mlworkbench_test_{secrets.token_hex(6)}'
    try:
        admin = psycopg.connect(dbname='postgres', autocommit=True, connect_timeout=5, **params)
    except psycopg.OperationalError as exception:
        pytest.exit(
            f'--aiida-storage=core.psql_dos needs PostgreSQL at {params["host"]}:{params["port"]}: {exception}',
            returncode=3,
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {
            'database_engine': 'postgresql_psycopg',
            'database_hostname': params['host'],
            'database_port': params['port'],
            'database_username': params['user'],
            'database_password': params['password'],
            'database_name': name,
            'repository_uri': tmp_path_factory.mktemp('repository').as_uri(),
        }
    finally:
        with psycopg.connect(dbname='postgres', autocommit=True, **params) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope='session')
def aiida_storage_backend(request: pytest.FixtureRequest) -> str:
    """The storage plugin that the test profiles use."""
    return request.config.getoption('aiida_storage')


@pytest.fixture(scope='session')
def make_profile(aiida_profile_factory, aiida_storage_backend, tmp_path_factory):
    """Return a context manager that creates and loads a fresh profile on the selected storage backend."""

    @contextlib.contextmanager
    def factory(config):
        if aiida_storage_backend == 'core.sqlite_dos':
            with aiida_profile_factory(config, broker_backend='core.zeromq') as profile:
                yield profile
        else:
            with (
                _postgres_database(tmp_path_factory) as storage_config,
                aiida_profile_factory(
                    config,
                    storage_backend='core.psql_dos',
                    storage_config=storage_config,
                    broker_backend='core.rabbitmq',
                ) as profile,
            ):
                yield profile

    return factory


@pytest.fixture(scope='session', autouse=True)
def aiida_profile(aiida_config, make_profile):
    """The session's AiiDA profile, on the storage backend chosen with ``--aiida-storage``."""
    with make_profile(aiida_config) as profile:
        # Starting and stopping daemon workers can take longer than the default 2 s on a busy 2-core machine.
        aiida_config.set_option('daemon.timeout', 60, scope=profile.name)
        aiida_config.store()
        yield profile


@pytest.fixture
def fresh_profile(aiida_profile, make_profile):
    """Return a context manager that switches to a second, empty profile (for archive import round trips).

    On leaving the context the session profile is loaded again, with a new storage object: node objects loaded before
    the switch are stale afterwards, so fixtures that outlive a test should hand out pks or UUIDs, not nodes.
    """

    @contextlib.contextmanager
    def factory():
        from aiida.manage import get_manager

        with make_profile(get_manager().get_config()) as profile:
            yield profile

    return factory


@pytest.fixture
def run_cli(aiida_profile):
    """Run ``aiida-mlworkbench`` with the test profile and return the click result."""
    from click.testing import CliRunner

    from aiida_mlworkbench.cli import cmd_root

    def run(*arguments: str):
        return CliRunner().invoke(cmd_root, ['-p', aiida_profile.name, *arguments], catch_exceptions=False)

    return run


@pytest.fixture(scope='session')
def kkr_archives_dir() -> pathlib.Path:
    """The folder of real aiida-kkr export archives shared with this repository (``../shared/data/...``)."""
    if not KKR_ARCHIVES.is_dir():
        pytest.skip(f'the real aiida-kkr archives are not available: {KKR_ARCHIVES} does not exist')
    return KKR_ARCHIVES
