"""The plugins are registered where AiiDA looks for them: ``verdi plugin list`` shows them."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

VERDI = str(pathlib.Path(sys.executable).with_name('verdi'))


@pytest.mark.parametrize(
    ('group', 'names'),
    [
        ('aiida.data', ['mlworkbench.sparse_features', 'mlworkbench.trained_model', 'mlworkbench.impurity_clusters']),
        ('aiida.calculations', ['mlworkbench.extract_impurity_clusters', 'mlworkbench.featurize']),
        ('aiida.workflows', ['mlworkbench.impurity_learning']),
    ],
)
def test_verdi_plugin_list(group, names):
    result = subprocess.run([VERDI, 'plugin', 'list', group], check=True, capture_output=True, text=True)
    for name in names:
        assert name in result.stdout
