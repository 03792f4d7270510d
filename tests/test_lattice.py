"""Tests for the host lattice type: :mod:`aiida_mlworkbench.calcfunctions.lattice`."""

from __future__ import annotations

import numpy as np
import pytest
from aiida import orm
from ase.build import bulk

from aiida_mlworkbench.calcfunctions.lattice import (
    DEFAULT_SYMPREC,
    classify_lattice,
    host_lattice_type,
    host_lattice_types,
    label_host_lattices,
)


def _structure(atoms) -> orm.StructureData:
    return orm.StructureData(ase=atoms)


@pytest.mark.parametrize(
    ('atoms', 'lattice', 'number', 'n_atoms_primitive'),
    [
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
    ],
)
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


def test_classify_lattice_distorted():
    """A displaced atom breaks the symmetry at the default tolerance; a loose tolerance symmetrises it away."""
    atoms = bulk('Cu', cubic=True)
    atoms.positions[0] += [0.03, 0.0, 0.0]
    distorted = _structure(atoms)

    result = classify_lattice(distorted)
    assert result.lattice == 'other'
    assert result.spacegroup_number != 225

    assert classify_lattice(distorted, symprec=0.1).lattice == 'fcc'


def test_classify_lattice_tetragonal_strain():
    """A uniaxially strained fcc cell is body-centred tetragonal (139), not fcc."""
    atoms = bulk('Cu')
    atoms.set_cell(atoms.cell[:] * [1.0, 1.0, 1.02], scale_atoms=True)
    result = classify_lattice(_structure(atoms))
    assert (result.lattice, result.spacegroup_number) == ('other', 139)


def test_classify_lattice_magnetic_kinds():
    """Kinds of the same element with different names (``Fe1``, ``Fe2``) are one species: still bcc."""
    atoms = bulk('Fe', cubic=True)
    structure = orm.StructureData(cell=atoms.cell[:])
    structure.append_atom(position=atoms.positions[0], symbols='Fe', name='Fe1')
    structure.append_atom(position=atoms.positions[1], symbols='Fe', name='Fe2')
    assert classify_lattice(structure).lattice == 'bcc'


def test_classify_lattice_binary_with_same_geometry():
    """Two elements on the bcc sites make CsCl (221), not bcc: species are told apart by chemistry."""
    atoms = bulk('Fe', cubic=True)
    structure = orm.StructureData(cell=atoms.cell[:])
    structure.append_atom(position=atoms.positions[0], symbols='Fe')
    structure.append_atom(position=atoms.positions[1], symbols='Co')
    result = classify_lattice(structure)
    assert (result.lattice, result.spacegroup_number) == ('other', 221)


def test_classify_lattice_empty_spheres():
    """Empty spheres (symbol ``X``) are no atoms: fcc Cu with an empty sphere in each octahedral hole is fcc."""
    atoms = bulk('Cu', cubic=True)
    structure = orm.StructureData(cell=atoms.cell[:])
    for position in atoms.positions:
        structure.append_atom(position=position, symbols='Cu')
    half = atoms.cell[0, 0] / 2.0
    for offset in ([half, 0, 0], [0, half, 0], [0, 0, half], [half, half, half]):
        structure.append_atom(position=np.array(offset), symbols='X', name='X')
    assert classify_lattice(structure).lattice == 'fcc'


def test_classify_lattice_not_periodic():
    """A structure that is not periodic in three dimensions has no space group."""
    structure = _structure(bulk('Cu'))
    structure.pbc = (True, True, False)
    result = classify_lattice(structure)
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


def test_host_lattice_types_batched():
    """One process labels many hosts; each output has the link label of its input."""
    hosts = {'cu': _structure(bulk('Cu')), 'fe': _structure(bulk('Fe')), 'si': _structure(bulk('Si'))}
    results = host_lattice_types(**hosts)
    assert {label: result['lattice'] for label, result in results.items()} == {'cu': 'fcc', 'fe': 'bcc', 'si': 'other'}
    assert len({result.creator.pk for result in results.values()}) == 1


def test_label_host_lattices_deduplicates():
    """Shared hosts are labelled once, and the result is keyed by host UUID."""
    copper = _structure(bulk('Cu')).store()
    magnesium = _structure(bulk('Mg')).store()
    labels = label_host_lattices([copper, magnesium, copper, copper])

    assert set(labels) == {copper.uuid, magnesium.uuid}
    assert labels[copper.uuid]['lattice'] == 'fcc'
    assert labels[magnesium.uuid]['lattice'] == 'hcp'
    process = labels[copper.uuid].creator
    assert process.pk == labels[magnesium.uuid].creator.pk
    assert {entry.node.uuid for entry in process.base.links.get_incoming(node_class=orm.StructureData).all()} == {
        copper.uuid,
        magnesium.uuid,
    }
    assert label_host_lattices([]) == {}
