"""Tests for the host lattice type: :mod:`aiida_mlworkbench.calcfunctions.lattice`."""

from __future__ import annotations

import numpy as np
import pytest
from aiida import orm
from ase.build import bulk

from aiida_mlworkbench.calcfunctions.lattice import DEFAULT_SYMPREC, classify_lattice, host_lattice_type
from aiida_mlworkbench.data import HostCrystal


def _structure(atoms) -> orm.StructureData:
    return orm.StructureData(ase=atoms)


#: Real structures and their lattice type, space group and atoms in the primitive cell by the documented rule.
LATTICE_CASES = [
    pytest.param(bulk('Cu'), 'fcc', 225, 1, id='Cu-fcc-primitive'),
    pytest.param(bulk('Cu', cubic=True), 'fcc', 225, 1, id='Cu-fcc-conventional-4-atoms'),
    pytest.param(bulk('Al', orthorhombic=True), 'fcc', 225, 1, id='Al-fcc-orthorhombic-cell'),
    pytest.param(bulk('Fe'), 'bcc', 229, 1, id='Fe-bcc-primitive'),
    pytest.param(bulk('Fe', cubic=True), 'bcc', 229, 1, id='Fe-bcc-conventional-2-atoms'),
    pytest.param(bulk('Mg'), 'hcp', 194, 2, id='Mg-hcp'),
    pytest.param(bulk('Ti'), 'hcp', 194, 2, id='Ti-hcp'),
    pytest.param(bulk('Zn'), 'hcp', 194, 2, id='Zn-hcp-large-c/a'),
    pytest.param(bulk('Mg', orthorhombic=True), 'hcp', 194, 2, id='Mg-hcp-orthorhombic-cell'),
    pytest.param(bulk('Cu').repeat((2, 2, 2)), 'fcc', 225, 1, id='Cu-fcc-supercell'),
    pytest.param(bulk('Si'), 'other', 227, 2, id='Si-diamond'),
    pytest.param(bulk('NaCl', 'rocksalt', a=5.64), 'other', 225, 2, id='NaCl-rocksalt'),
    pytest.param(bulk('CsCl', 'cesiumchloride', a=4.12), 'other', 221, 2, id='CsCl'),
    pytest.param(bulk('Po', 'sc', a=3.35), 'other', 221, 1, id='Po-simple-cubic'),
]


@pytest.mark.parametrize(('atoms', 'lattice', 'number', 'n_atoms_primitive'), LATTICE_CASES)
def test_classify_lattice(atoms, lattice, number, n_atoms_primitive):
    """Real structures get the lattice type and space group of the documented rule."""
    result = classify_lattice(_structure(atoms))
    assert result.lattice == lattice
    assert result.spacegroup_number == number
    assert result.n_atoms_primitive == n_atoms_primitive
    assert result.symprec == DEFAULT_SYMPREC


def test_classify_lattice_symbol():
    """The international symbol comes with the number."""
    assert classify_lattice(_structure(bulk('Cu'))).international_symbol == 'Fm-3m'
    assert classify_lattice(_structure(bulk('Fe'))).international_symbol == 'Im-3m'
    assert classify_lattice(_structure(bulk('Mg'))).international_symbol == 'P6_3/mmc'


def _distorted_cu() -> orm.StructureData:
    """Conventional fcc Cu with one atom displaced by 0.03 Angstrom."""
    atoms = bulk('Cu', cubic=True)
    atoms.positions[0] += [0.03, 0.0, 0.0]
    return _structure(atoms)


def _strained_cu() -> orm.StructureData:
    """Primitive fcc Cu strained by 2 % along z."""
    atoms = bulk('Cu')
    atoms.set_cell(atoms.cell[:] * [1.0, 1.0, 1.02], scale_atoms=True)
    return _structure(atoms)


def _bcc_sites(first: tuple[str, str], second: tuple[str, str]) -> orm.StructureData:
    """The two sites of conventional bcc Fe, each with a (symbol, kind name)."""
    atoms = bulk('Fe', cubic=True)
    structure = orm.StructureData(cell=atoms.cell[:])
    for position, (symbol, name) in zip(atoms.positions, (first, second), strict=True):
        structure.append_atom(position=position, symbols=symbol, name=name)
    return structure


def _cu_with_empty_spheres(empty_sphere: str) -> orm.StructureData:
    """Conventional fcc Cu with an empty sphere in each octahedral hole.

    ``empty_sphere`` is ``'X'`` (a kind of symbol X) or ``'HX'``: the kind aiida-kkr writes for vacuum sites,
    ``{H0.00X1.00}``, an H site with weight 0.
    """
    atoms = bulk('Cu', cubic=True)
    structure = orm.StructureData(cell=atoms.cell[:])
    for position in atoms.positions:
        structure.append_atom(position=position, symbols='Cu')
    half = atoms.cell[0, 0] / 2.0
    for offset in ([half, 0, 0], [0, half, 0], [0, 0, half], [half, half, half]):
        if empty_sphere == 'X':
            structure.append_atom(position=np.array(offset), symbols='X', name='X')
        else:
            structure.append_atom(position=np.array(offset), symbols='H', weights=0.0, mass=1.0, name='HX')
    return structure


def _not_periodic_cu() -> orm.StructureData:
    structure = _structure(bulk('Cu'))
    structure.pbc = (True, True, False)
    return structure


def test_classify_lattice_distorted():
    """A displaced atom breaks the symmetry at the default tolerance; a loose tolerance symmetrises it away."""
    distorted = _distorted_cu()

    result = classify_lattice(distorted)
    assert result.lattice == 'other'
    assert result.spacegroup_number != 225

    assert classify_lattice(distorted, symprec=0.1).lattice == 'fcc'


def test_classify_lattice_tetragonal_strain():
    """A uniaxially strained fcc cell is body-centred tetragonal (139), not fcc."""
    result = classify_lattice(_strained_cu())
    assert (result.lattice, result.spacegroup_number) == ('other', 139)


def test_classify_lattice_magnetic_kinds():
    """Kinds of the same element with different names (``Fe1``, ``Fe2``) are one species: still bcc."""
    assert classify_lattice(_bcc_sites(('Fe', 'Fe1'), ('Fe', 'Fe2'))).lattice == 'bcc'


def test_classify_lattice_binary_with_same_geometry():
    """Two elements on the bcc sites make CsCl (221), not bcc: species are told apart by chemistry."""
    result = classify_lattice(_bcc_sites(('Fe', 'Fe'), ('Co', 'Co')))
    assert (result.lattice, result.spacegroup_number) == ('other', 221)


@pytest.mark.parametrize(
    'empty_sphere',
    [
        'X',
        'HX',
    ],
)
def test_classify_lattice_empty_spheres(empty_sphere):
    """Empty spheres are no atoms: fcc Cu with an empty sphere in each octahedral hole is fcc."""
    assert classify_lattice(_cu_with_empty_spheres(empty_sphere)).lattice == 'fcc'


def test_classify_lattice_not_periodic():
    """A structure that is not periodic in three dimensions has no space group."""
    result = classify_lattice(_not_periodic_cu())
    assert result.lattice == 'other'
    assert result.spacegroup_number is None


def test_classify_lattice_errors():
    """A non-positive tolerance and a structure without atoms are refused with a clear error."""
    with pytest.raises(ValueError, match='symprec must be a positive'):
        classify_lattice(_structure(bulk('Cu')), symprec=0)

    structure = orm.StructureData(cell=np.eye(3) * 3.0)
    structure.append_atom(position=(0, 0, 0), symbols='X', name='X')
    with pytest.raises(ValueError, match='holds no atoms'):
        classify_lattice(structure)
    with pytest.raises(ValueError, match='holds no atoms'):
        classify_lattice(HostCrystal.from_structure(structure))


@pytest.mark.parametrize(
    ('make', 'symprec'),
    [
        *(
            pytest.param(lambda atoms=case.values[0]: _structure(atoms), DEFAULT_SYMPREC, id=case.id)
            for case in LATTICE_CASES
        ),
        pytest.param(_distorted_cu, DEFAULT_SYMPREC, id='Cu-distorted'),
        pytest.param(_distorted_cu, 0.1, id='Cu-distorted-loose-symprec'),
        pytest.param(_strained_cu, DEFAULT_SYMPREC, id='Cu-tetragonal-strain'),
        pytest.param(lambda: _bcc_sites(('Fe', 'Fe1'), ('Fe', 'Fe2')), DEFAULT_SYMPREC, id='Fe-magnetic-kinds'),
        pytest.param(lambda: _bcc_sites(('Fe', 'Fe'), ('Co', 'Co')), DEFAULT_SYMPREC, id='FeCo-on-bcc-sites'),
        pytest.param(lambda: _cu_with_empty_spheres('X'), DEFAULT_SYMPREC, id='Cu-empty-spheres-X'),
        pytest.param(
            lambda: _cu_with_empty_spheres('HX'),
            DEFAULT_SYMPREC,
            id='Cu-empty-spheres-aiida-kkr-HX',
        ),
        pytest.param(_not_periodic_cu, DEFAULT_SYMPREC, id='Cu-not-periodic'),
    ],
)
def test_classify_lattice_of_host_crystal_agrees_with_its_structure(make, symprec):
    """The host an ImpurityClusters node records gets the lattice type of the StructureData it was made from."""
    structure = make()
    assert classify_lattice(HostCrystal.from_structure(structure), symprec) == classify_lattice(structure, symprec)


def test_classify_lattice_of_recorded_hosts():
    """Hosts read back from a stored ImpurityClusters node keep the lattice type of their StructureData."""
    from aiida_mlworkbench.calcfunctions.clusters import build_impurity_clusters

    hosts = [_structure(atoms).store() for atoms in (bulk('Cu'), bulk('Fe'), bulk('Ti'), bulk('Si'))]
    clusters = build_impurity_clusters([(host, orm.Dict({'Rcut': 3.0, 'Zimp': [30]}).store()) for host in hosts])
    recorded = {record['uuid']: clusters.get_host(index) for index, record in enumerate(clusters.hosts)}
    assert sorted(recorded) == sorted(host.uuid for host in hosts)
    for host in hosts:
        assert classify_lattice(recorded[host.uuid]) == classify_lattice(host), host.get_formula()
    assert [classify_lattice(recorded[host.uuid]).lattice for host in hosts] == ['fcc', 'bcc', 'hcp', 'other']


def test_host_lattice_type_provenance():
    """The calcfunction records the label as a Dict created from the host and the tolerance."""
    host = _structure(bulk('Ti')).store()
    result = host_lattice_type(host)

    assert result.get_dict() == {
        'lattice': 'hcp',
        'spacegroup_number': 194,
        'international_symbol': 'P6_3/mmc',
        'n_atoms_primitive': 2,
        'symprec': DEFAULT_SYMPREC,
    }
    creator = result.creator
    assert creator.is_finished_ok
    assert creator.inputs.structure.uuid == host.uuid
    assert creator.inputs.symprec.value == DEFAULT_SYMPREC


def test_host_lattice_type_symprec_input():
    """The tolerance is an input of the process and changes the result."""
    atoms = bulk('Cu', cubic=True)
    atoms.positions[0] += [0.03, 0.0, 0.0]
    host = _structure(atoms).store()
    assert host_lattice_type(host)['lattice'] == 'other'
    assert host_lattice_type(host, orm.Float(0.1))['lattice'] == 'fcc'
