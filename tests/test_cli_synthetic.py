"""Tests for ``aiida-mlworkbench synthetic create``."""

from __future__ import annotations

import uuid

import pytest
from aiida import orm
from ase.data import atomic_numbers

from aiida_mlworkbench.synthetic import iter_synthetic_embeddings, max_database_size, plan_synthetic_database


def test_synthetic_create(run_cli):
    """The command creates the database in the named group and reports the counts per lattice class."""
    label = f'test/cli/{uuid.uuid4().hex[:12]}'
    result = run_cli('synthetic', 'create', '--size', '30', '--seed', '1', '--group-label', label)
    assert result.exit_code == 0, result.output

    group = orm.load_group(label)
    assert f'group `{label}` (pk {group.pk})' in result.output
    assert 'created 30 synthetic impurity embeddings (seed 1)' in result.output
    for lattice in ('bcc', 'fcc', 'hcp'):
        assert f'{lattice}: 10 embeddings' in result.output

    embeddings = list(iter_synthetic_embeddings(group))
    assert len(embeddings) == 30
    plan = plan_synthetic_database(30, seed=1)
    assert [info['Zimp'][0] for _, info in embeddings] == [atomic_numbers[e.impurity] for e in plan]


def test_synthetic_create_default_label(run_cli):
    """Without a label the group follows ``mlworkbench/synthetic/<size>-seed<seed>``."""
    seed = 1000 + uuid.uuid4().int % 100000
    result = run_cli('synthetic', 'create', '-n', '6', '-s', str(seed))
    assert result.exit_code == 0, result.output
    group = orm.load_group(f'mlworkbench/synthetic/6-seed{seed}')
    assert group.base.extras.get('size') == 6


def test_synthetic_create_existing_group(run_cli):
    """A second run on the same group fails with a clear message unless asked to reuse it."""
    label = f'test/cli/{uuid.uuid4().hex[:12]}'
    assert run_cli('synthetic', 'create', '-n', '9', '-L', label).exit_code == 0
    count = orm.load_group(label).count()

    result = run_cli('synthetic', 'create', '-n', '9', '-L', label)
    assert result.exit_code != 0
    assert 'already exists and holds' in result.output
    assert '--reuse-existing' in result.output

    result = run_cli('synthetic', 'create', '-n', '9', '-L', label, '--reuse-existing')
    assert result.exit_code == 0, result.output
    assert 'reusing the existing group' in result.output
    assert orm.load_group(label).count() == count


@pytest.mark.parametrize('size', ['0', str(max_database_size() + 1)])
def test_synthetic_create_bad_size(run_cli, size):
    """Sizes out of range are refused before anything is stored."""
    result = run_cli('synthetic', 'create', '-n', size, '-L', f'test/cli/{uuid.uuid4().hex[:12]}')
    assert result.exit_code != 0
    assert 'size' in result.output.lower()
