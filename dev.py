#!/usr/bin/env python3
"""The two commands of the README, for a fresh clone on a machine that has only Python.

    python3 dev.py demo    # reproduce the reference study (1752 embeddings) on an isolated AiiDA profile
    python3 dev.py test    # lint, docs and the test suite on SQLite and on PostgreSQL + RabbitMQ

Both create (or reuse) a virtual environment in ``.venv`` with the package and its extras installed. The demo runs on
an AiiDA configuration of its own in ``.aiida-mlworkbench/`` (SQLite storage, built-in ZeroMQ broker), so it never
touches ``~/.aiida``; pass ``--profile NAME`` to run it on one of your own profiles instead.

Only the standard library is used here: this script runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / '.venv'
BIN = VENV / ('Scripts' if os.name == 'nt' else 'bin')
PYTHON = BIN / 'python'
DEMO_AIIDA_PATH = ROOT / '.aiida-mlworkbench'
DEMO_PROFILE = 'mlworkbench-demo'
DEMO_SCRIPT = ROOT / 'examples' / 'reproduce_poster.py'


def say(message: str) -> None:
    print(f'==> {message}', flush=True)


def run(*command: str | Path, env: dict[str, str] | None = None) -> None:
    """Run a command, stopping this script with its exit code if it fails."""
    result = subprocess.run([str(part) for part in command], cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        say(f'failed ({result.returncode}): {" ".join(str(part) for part in command)}')
        sys.exit(result.returncode)


def ensure_environment() -> None:
    """Create ``.venv`` and install the package with its extras; reinstall only when pyproject.toml changed."""
    stamp = VENV / '.mlworkbench-installed'
    wanted = hashlib.sha256((ROOT / 'pyproject.toml').read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        say(f'creating the virtual environment {VENV}')
        venv.create(VENV, with_pip=True)
    say('installing aiida-mlworkbench and its test and docs dependencies (a few minutes the first time)')
    run(PYTHON, '-m', 'pip', 'install', '-qq', '--upgrade', 'pip')
    run(PYTHON, '-m', 'pip', 'install', '-qq', '--editable', f'{ROOT}[dev]')
    stamp.write_text(wanted)


def demo_environment(profile: str | None) -> tuple[dict[str, str], str]:
    """Environment and profile name for the demo: an isolated configuration unless the user names a profile."""
    env = dict(os.environ)
    if profile:
        return env, profile
    env['AIIDA_PATH'] = str(DEMO_AIIDA_PATH)
    listed = subprocess.run(
        [BIN / 'verdi', 'profile', 'list'], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if DEMO_PROFILE not in listed.stdout.split():
        say(f'creating the AiiDA profile {DEMO_PROFILE} (SQLite, ZeroMQ broker) in {DEMO_AIIDA_PATH}')
        run(BIN / 'verdi', 'presto', '--profile-name', DEMO_PROFILE, '--use-zeromq', env=env)
    return env, DEMO_PROFILE


def command_demo(arguments: argparse.Namespace) -> None:
    ensure_environment()
    env, profile = demo_environment(arguments.profile)
    say(f'running {DEMO_SCRIPT.relative_to(ROOT)} on profile {profile}')
    run(BIN / 'verdi', '-p', profile, 'run', DEMO_SCRIPT, *arguments.script_args, env=env)
    prefix = '' if arguments.profile else f'AIIDA_PATH={DEMO_AIIDA_PATH} '
    say(f'the runs are in profile {profile}: {prefix}{BIN / "verdi"} -p {profile} process list -a')


def postgres_reachable(host: str = '127.0.0.1', port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def command_test(arguments: argparse.Namespace) -> None:
    ensure_environment()
    say('ruff: lint and format check')
    run(BIN / 'ruff', 'check', '.')
    run(BIN / 'ruff', 'format', '--check', '.')
    say('docs: sphinx-build with warnings as errors')
    shutil.rmtree(ROOT / 'docs' / '_build', ignore_errors=True)
    run(BIN / 'sphinx-build', '-W', '--keep-going', '-q', '-b', 'html', 'docs', 'docs/_build/html')

    storages = ['core.sqlite_dos', 'core.psql_dos'] if arguments.storage == 'all' else [arguments.storage]
    for storage in storages:
        if storage == 'core.psql_dos' and not postgres_reachable():
            message = 'PostgreSQL is not reachable at 127.0.0.1:5432, so the core.psql_dos part cannot run'
            if os.environ.get('MLWORKBENCH_REQUIRE_SERVICES'):
                say(f'{message}: failing because MLWORKBENCH_REQUIRE_SERVICES is set')
                sys.exit(1)
            say(f'SKIPPED: {message} (start PostgreSQL and RabbitMQ to run it)')
            continue
        say(f'pytest on {storage}')
        run(PYTHON, '-m', 'pytest', f'--aiida-storage={storage}', *arguments.pytest_args)
    say('all tests passed')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    demo = commands.add_parser('demo', help='run the main example on an isolated AiiDA profile')
    demo.add_argument('--profile', help='run on this existing AiiDA profile of yours instead')
    demo.add_argument('script_args', nargs='*', help='arguments of the example (after --), e.g. -- --size 300')
    demo.set_defaults(function=command_demo)
    test = commands.add_parser('test', help='ruff, the docs build and the test suite on both storage backends')
    test.add_argument(
        '--storage', choices=['all', 'core.sqlite_dos', 'core.psql_dos'], default='all', help='storage backend(s)'
    )
    test.add_argument('pytest_args', nargs='*', help='extra pytest arguments (after --)')
    test.set_defaults(function=command_test)
    arguments = parser.parse_args()
    arguments.function(arguments)


if __name__ == '__main__':
    main()
