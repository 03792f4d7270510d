"""The ``scoef`` file: the impurity cluster juKKR itself used, kept in the repository of aiida-kkr calculations.

aiida-kkr writes it (``aiida_kkr.tools.tools_kkrimp.write_scoef``) into the input folder of every host Green function
write-out ``KkrCalculation`` and every ``KkrimpCalculation``, and AiiDA keeps the input files in the node's repository.
The format: the number of rows on the first line, then one row per cluster site with ``x y z`` in units of the
lattice constant ``alat`` of the writing calculation, the 1-based index of the host site, its atomic number (1 for
empty spheres in files written before 2022) and the distance from the centre in alat units.

Which ``alat``: a ``KkrimpCalculation`` writes in the host's ``alat`` (``get_alat_from_bravais`` of the host cell); a
``KkrCalculation`` run with ``use_input_alat``/``USE_INPUT_ALAT`` writes in units of its ``ALATBASIS`` parameter
(in Bohr radii), otherwise also in the host's ``alat``.
"""

from __future__ import annotations

import io

import numpy as np
from aiida import orm

__all__ = ('SCOEF_FILENAME', 'read_scoef', 'scoef_alat', 'scoef_of')

SCOEF_FILENAME = 'scoef'
_N_COLUMNS = 6


def read_scoef(text: str) -> np.ndarray:
    """Return the rows of a ``scoef`` file as an ``(n, 6)`` array: ``x, y, z, host site, Z, distance``."""
    lines = text.splitlines()
    if not lines:
        raise ValueError('the scoef file is empty.')
    n_rows = int(lines[0].split()[0])
    rows = np.loadtxt(io.StringIO('\n'.join(lines[1 : n_rows + 1])), ndmin=2)
    if rows.shape != (n_rows, _N_COLUMNS):
        raise ValueError(f'the scoef file announces {n_rows} rows of {_N_COLUMNS} columns but holds {rows.shape}.')
    return rows


def scoef_of(calculation: orm.CalcJobNode) -> np.ndarray | None:
    """Return the ``scoef`` rows kept in the repository of ``calculation``, or ``None`` if it has none."""
    if SCOEF_FILENAME not in calculation.base.repository.list_object_names():
        return None
    return read_scoef(calculation.base.repository.get_object_content(SCOEF_FILENAME, mode='r'))


def scoef_alat(calculation: orm.CalcJobNode, host: orm.StructureData) -> float:
    """Return the ``alat`` (Angstrom) in whose units ``calculation`` wrote its ``scoef`` file."""
    from masci_tools.io.common_functions import get_Ang2aBohr

    from .geometry import host_alat

    if calculation.process_type == 'aiida.calculations:kkr.kkr' and 'parameters' in calculation.inputs:
        parameters = calculation.inputs.parameters.get_dict()
        use_input_alat = parameters.get('use_input_alat', parameters.get('USE_INPUT_ALAT', False))
        if use_input_alat and parameters.get('ALATBASIS') is not None:
            return float(parameters['ALATBASIS']) / get_Ang2aBohr()
    return host_alat(host)
