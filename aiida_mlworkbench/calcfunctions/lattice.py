"""The host lattice type (bcc, fcc, hcp or other) of a crystal structure: the first learning target.

The rule, applied to the space group that spglib finds within ``symprec``:

* space group 229 (Im-3m) with one atom in the primitive cell: ``bcc``;
* space group 225 (Fm-3m) with one atom in the primitive cell: ``fcc``;
* space group 194 (P6_3/mmc) with two atoms of one species in the primitive cell: ``hcp`` (for any c/a, Zn and Cd
  included; two equivalent atoms in 194 can only sit on Wyckoff 2c or 2d, which is the hcp stacking);
* anything else: ``other``, with its space group (diamond Si is 227, rocksalt NaCl is 225 with two atoms).

Counting atoms in the *primitive* cell, not in the cell given, makes conventional cells (4-atom fcc, 2-atom bcc) and
supercells come out the same as primitive ones. Species are told apart by chemistry (symbols and weights of a kind),
not by kind name, so a magnetic host with kinds ``Fe1``/``Fe2`` is still bcc. Empty spheres (kind symbol ``X``, or a
vacancy kind like aiida-kkr's ``{H0.00X1.00}``), which KKR hosts use to fill space, are not atoms and are left out.
A structure that is not periodic in all three directions has no space group and is ``other``.
"""

from __future__ import annotations

import dataclasses
import typing as t

import numpy as np
import spglib
from aiida import orm
from aiida.engine import ExitCode, calcfunction

from aiida_mlworkbench.data.impurity_clusters import HostCrystal
from aiida_mlworkbench.kkr.geometry import is_empty_sphere

__all__ = (
    'DEFAULT_SYMPREC',
    'EXIT_CODES',
    'LATTICE_LABELS',
    'LatticeType',
    'check_symprec',
    'classify_lattice',
    'host_lattice_type',
)

DEFAULT_SYMPREC: float = 1e-3
"""Default distance tolerance of the symmetry search, in Angstrom.

Loose enough for round-off from unit conversions (Bohr to Angstrom, alat units), tight enough that a real distortion of
a per cent is not symmetrised away.
"""

EXIT_CODES = {
    'invalid_symprec': ExitCode(360, 'symprec must be a positive finite distance in Angstrom (e.g. 1e-3), got {value}'),
    'unclassifiable_structure': ExitCode(361, 'the lattice type of structure `{label}` cannot be found: {detail}'),
}

LatticeLabel = t.Literal['bcc', 'fcc', 'hcp', 'other']
LATTICE_LABELS: tuple[LatticeLabel, ...] = ('bcc', 'fcc', 'hcp', 'other')

_SPACEGROUP_BCC = 229
_SPACEGROUP_FCC = 225
_SPACEGROUP_HCP = 194


@dataclasses.dataclass(frozen=True)
class LatticeType:
    """The lattice type of a structure and the symmetry it was decided from."""

    lattice: LatticeLabel
    spacegroup_number: int | None
    international_symbol: str | None
    n_atoms_primitive: int | None
    symprec: float

    def as_dict(self) -> dict[str, t.Any]:
        """Return the fields as a plain dictionary, as stored in the ``Dict`` of :func:`host_lattice_type`."""
        return dataclasses.asdict(self)


def _spglib_cell(structure: orm.StructureData) -> tuple[list, list, list[int]]:
    """Return the spglib cell ``(lattice, fractional positions, types)`` of the atoms of ``structure``."""
    species: dict[tuple, int] = {}
    positions = []
    types = []
    for site in structure.sites:
        kind = structure.get_kind(site.kind_name)
        if is_empty_sphere(kind):
            continue
        chemistry = (kind.symbols, tuple(round(weight, 6) for weight in kind.weights))
        types.append(species.setdefault(chemistry, len(species) + 1))
        positions.append(site.position)

    if not positions:
        raise ValueError(f'{structure} holds no atoms (only empty spheres): it has no lattice type.')

    cell = np.array(structure.cell)
    fractional = np.linalg.solve(cell.T, np.array(positions).T).T
    return cell.tolist(), fractional.tolist(), types


def check_symprec(symprec: t.Any) -> float:
    """Return the symmetry tolerance as a float, or raise if it is no positive finite distance."""
    if isinstance(symprec, bool) or not isinstance(symprec, (int, float)) or not 0 < symprec < float('inf'):
        raise ValueError(f'symprec must be a positive finite distance in Angstrom (e.g. 1e-3), got {symprec!r}.')
    return float(symprec)


def classify_lattice(structure: orm.StructureData | HostCrystal, symprec: float = DEFAULT_SYMPREC) -> LatticeType:
    """Return the lattice type (bcc, fcc, hcp or other) of ``structure`` by the rule of this module.

    :param structure: a crystal structure, stored or not, or the :class:`~aiida_mlworkbench.data.HostCrystal` an
        ``ImpurityClusters`` node records (its sites are single atoms or empty spheres, told apart by atomic number).
    :param symprec: distance tolerance of the symmetry search in Angstrom.
    :raises ValueError: if the structure holds no atoms or spglib cannot analyse it.
    """
    check_symprec(symprec)

    if not all(structure.pbc):
        return LatticeType('other', None, None, None, symprec)

    if isinstance(structure, orm.StructureData):
        cell = _spglib_cell(structure)
    else:
        atoms = np.asarray(structure.numbers) > 0
        if not atoms.any():
            raise ValueError(f'host {structure.formula} holds no atoms (only empty spheres): it has no lattice type.')
        lattice_vectors = np.asarray(structure.cell, dtype=float)
        fractional = np.linalg.solve(lattice_vectors.T, np.asarray(structure.positions, dtype=float)[atoms].T).T
        cell = (lattice_vectors.tolist(), fractional.tolist(), [int(z) for z in np.asarray(structure.numbers)[atoms]])
    dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    if dataset is None:
        raise ValueError(
            f'spglib found no symmetry for {structure} with symprec={symprec}: {spglib.get_error_message()}. '
            'Check that the atoms do not overlap, or change symprec.'
        )

    number = int(dataset.number)
    n_atoms_primitive = len(set(dataset.mapping_to_primitive))
    n_species = len(set(cell[2]))

    lattice: LatticeLabel = 'other'
    if number == _SPACEGROUP_BCC and n_atoms_primitive == 1:
        lattice = 'bcc'
    elif number == _SPACEGROUP_FCC and n_atoms_primitive == 1:
        lattice = 'fcc'
    elif number == _SPACEGROUP_HCP and n_atoms_primitive == 2 and n_species == 1:
        lattice = 'hcp'

    return LatticeType(lattice, number, str(dataset.international), n_atoms_primitive, symprec)


@calcfunction
def host_lattice_type(structure: orm.StructureData, symprec: orm.Float = DEFAULT_SYMPREC) -> orm.Dict:  # type: ignore[assignment]
    """Record the lattice type of a host structure with provenance.

    Returns a ``Dict`` with ``lattice`` (``bcc``, ``fcc``, ``hcp`` or ``other``), ``spacegroup_number``,
    ``international_symbol``, ``n_atoms_primitive`` and ``symprec``.
    """
    outputs = _lattice_types(symprec.value, {'structure': structure})
    return outputs if isinstance(outputs, ExitCode) else outputs['structure']


def _lattice_types(symprec: float, structures: t.Mapping[str, t.Any]) -> dict[str, orm.Dict] | ExitCode:
    """The lattice type ``Dict`` of each structure, or the exit code that names the first problem."""
    try:
        check_symprec(symprec)
    except ValueError:
        return EXIT_CODES['invalid_symprec'].format(value=repr(symprec))
    outputs = {}
    for label, structure in structures.items():
        if not isinstance(structure, orm.StructureData):
            detail = f'it is a {type(structure).__name__}, not a StructureData'
            return EXIT_CODES['unclassifiable_structure'].format(label=label, detail=detail)
        try:
            outputs[label] = orm.Dict(classify_lattice(structure, symprec).as_dict())
        except ValueError as exception:
            return EXIT_CODES['unclassifiable_structure'].format(label=label, detail=str(exception))
    return outputs
