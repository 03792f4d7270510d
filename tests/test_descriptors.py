"""Tests for the descriptor interface and the species-aware SOAP, which must equal DScribe's full-species SOAP."""

from __future__ import annotations

import json
import typing as t

import numpy as np
import pytest
import scipy.sparse
from ase import Atoms
from ase.build import bulk
from ase.data import chemical_symbols
from dscribe.descriptors import SOAP

from aiida_mlworkbench.descriptors import (
    Descriptor,
    SpeciesAwareSOAP,
    base,
    get_descriptor,
    get_descriptor_class,
    register_descriptor,
    registered_descriptors,
)

#: A fixed list of 60 real elements, helium to promethium, holding all hosts and impurities below.
SPECIES_60 = tuple(chemical_symbols[2:62])
SOAP_SETTINGS = {'r_cut': 6.0, 'n_max': 5, 'l_max': 5, 'sigma': 0.5, 'average': 'inner'}


def impurity_cluster(host: Atoms, radius: float, impurity: str | list[str], seed: int = 0) -> Atoms:
    """Sphere of ``radius`` around a host atom, moved to the origin, the centre (and nearest sites) substituted."""
    crystal = host * (5, 5, 5)
    centre = crystal.positions[np.argmin(np.linalg.norm(crystal.positions - crystal.cell.sum(axis=0) / 2, axis=1))]
    cluster = crystal[np.linalg.norm(crystal.positions - centre, axis=1) < radius]
    cluster.positions -= centre
    cluster.set_pbc(False)
    cluster.set_cell(None)
    impurities = [impurity] if isinstance(impurity, str) else impurity
    nearest_sites = np.argsort(np.linalg.norm(cluster.positions, axis=1))[: len(impurities)]
    symbols = cluster.get_chemical_symbols()
    for site, symbol in zip(nearest_sites, impurities, strict=True):
        symbols[site] = symbol
    cluster.set_chemical_symbols(symbols)
    cluster.positions += np.random.default_rng(seed).normal(scale=0.02, size=cluster.positions.shape)
    return cluster


@pytest.fixture(scope='module')
def clusters() -> list[Atoms]:
    """Two-shell clusters of fcc Cu, bcc Fe and hcp Ti (19, 15 and 19 atoms) with assorted impurities."""
    hosts = [
        (bulk('Cu', 'fcc', a=3.61), 1.1 * 3.61, ['Fe', 'Zn', 'Cu', 'He', 'Pm']),
        (bulk('Fe', 'bcc', a=2.87), 1.1 * 2.87, ['Cu', 'Mn', 'Nd', 'Fe']),
        (bulk('Ti', 'hcp', a=2.95, c=4.68), 1.5 * 2.95, ['Al', 'V', 'Fe']),
    ]
    structures = []
    for host, radius, impurities in hosts:
        structures += [impurity_cluster(host, radius, impurity, seed=i) for i, impurity in enumerate(impurities)]
    structures.append(impurity_cluster(bulk('Cu', 'fcc', a=3.61), 3.97, ['Ni', 'Ni', 'Pd'], seed=7))  # Three species.
    structures.append(impurity_cluster(bulk('Fe', 'bcc', a=2.87), 3.16, ['Fe'], seed=8))  # Pure host.
    return structures


def dscribe_full(structures: list[Atoms], species: t.Sequence[str] = SPECIES_60, **settings: t.Any) -> t.Any:
    """DScribe's own full-species sparse SOAP, as CSR: the reference output."""
    features = SOAP(species=list(species), sparse=True, **settings).create(structures)
    return scipy.sparse.csr_array(features.tocsr())


def assert_identical(actual: scipy.sparse.csr_array, expected: scipy.sparse.csr_array) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    expected = expected.copy()
    expected.sort_indices()
    assert actual.has_sorted_indices
    np.testing.assert_array_equal(actual.indptr, expected.indptr)
    np.testing.assert_array_equal(actual.indices, expected.indices)
    np.testing.assert_array_equal(actual.data, expected.data)  # Bitwise: max abs diff 0.0.


def test_cluster_sizes(clusters: list[Atoms]) -> None:
    """The fixture looks like real impurity clusters: two neighbour shells, non-periodic, impurity at the origin."""
    assert {len(cluster) for cluster in clusters[:12]} == {15, 19}
    assert not any(cluster.pbc.any() for cluster in clusters)


@pytest.mark.parametrize('average', ['inner', 'outer'])
def test_equals_dscribe_full_species(clusters: list[Atoms], average: str) -> None:
    settings = {**SOAP_SETTINGS, 'average': average}
    actual = SpeciesAwareSOAP(species=SPECIES_60, **settings).create(clusters)
    assert_identical(actual, dscribe_full(clusters, **settings))
    assert actual.shape == (len(clusters), 270_900)


def test_equals_dscribe_full_species_n9(clusters: list[Atoms]) -> None:
    settings = {**SOAP_SETTINGS, 'n_max': 9, 'l_max': 9, 'average': 'inner'}
    sample = clusters[::2]
    actual = SpeciesAwareSOAP(species=SPECIES_60, **settings).create(sample)
    assert_identical(actual, dscribe_full(sample, **settings))
    assert actual.shape == (len(sample), 1_460_700)


@pytest.mark.parametrize(
    'settings',
    [
        {'weighting': {'function': 'poly', 'r0': 5.0, 'c': 1.0, 'm': 2}, 'n_max': 4, 'l_max': 4, 'average': 'inner'},
        {**SOAP_SETTINGS, 'average': 'inner', 'dtype': 'float32'},
        {**SOAP_SETTINGS, 'n_max': 3, 'l_max': 2, 'average': 'outer', 'rbf': 'polynomial'},
    ],
    ids=['weighting', 'float32', 'polynomial'],
)
def test_equals_dscribe_other_settings(clusters: list[Atoms], settings: dict[str, t.Any]) -> None:
    sample = clusters[::3]
    actual = SpeciesAwareSOAP(species=SPECIES_60, **json.loads(json.dumps(settings))).create(sample)
    assert_identical(actual, dscribe_full(sample, **json.loads(json.dumps(settings))))


def test_default_species_are_those_present(clusters: list[Atoms]) -> None:
    descriptor = SpeciesAwareSOAP(**SOAP_SETTINGS).fit(clusters)
    present = sorted({number for cluster in clusters for number in cluster.numbers})
    assert descriptor.species == tuple(chemical_symbols[number] for number in present)
    assert_identical(descriptor.create(clusters), dscribe_full(clusters, species=descriptor.species, **SOAP_SETTINGS))


def test_species_given_as_numbers_are_sorted() -> None:
    descriptor = SpeciesAwareSOAP(species=[29, 26, 'Cu', 'Al'], **SOAP_SETTINGS)
    assert descriptor.species == ('Al', 'Fe', 'Cu')


def test_species_needed_before_use(clusters: list[Atoms]) -> None:
    descriptor = SpeciesAwareSOAP(**SOAP_SETTINGS)
    with pytest.raises(ValueError, match=r'call fit\(structures\)'):
        next(descriptor.iter_blocks(clusters))
    with pytest.raises(ValueError, match='species list is not set'):
        descriptor.parameters  # noqa: B018


@pytest.mark.parametrize('n_jobs', [1, 2])
def test_species_outside_list_is_an_error(clusters: list[Atoms], n_jobs: int) -> None:
    """The error names the structure (index and formula) and the species, instead of giving a zero row."""
    structures = [*clusters[:4], impurity_cluster(bulk('Cu', 'fcc', a=3.61), 3.97, 'U')]
    descriptor = SpeciesAwareSOAP(species=SPECIES_60, n_jobs=n_jobs, **SOAP_SETTINGS)
    formula = structures[4].get_chemical_formula()
    with pytest.raises(ValueError, match=rf'structure 4 \({formula}\) contains species .*: U$'):
        list(descriptor.iter_blocks(structures, block_size=2))
    with pytest.raises(ValueError, match=rf'structure 4 \({formula}\)'):
        descriptor.fit(structures)


@pytest.mark.parametrize('n_jobs', [1, 2])
def test_blocks_keep_rows_and_order(clusters: list[Atoms], n_jobs: int) -> None:
    descriptor = SpeciesAwareSOAP(species=SPECIES_60, n_jobs=n_jobs, **SOAP_SETTINGS)
    whole = descriptor.create(clusters, block_size=len(clusters))
    for block_size in (1, 3, 5):
        blocks = list(descriptor.iter_blocks(clusters, block_size=block_size))
        assert len(blocks) == -(-len(clusters) // block_size)
        assert all(isinstance(block, scipy.sparse.csr_array) and block.shape[0] <= block_size for block in blocks)
        assert_identical(scipy.sparse.csr_array(scipy.sparse.vstack(blocks, format='csr')), whole)
    reversed_rows = descriptor.create(clusters[::-1], block_size=4)
    assert_identical(reversed_rows, scipy.sparse.csr_array(whole[np.arange(len(clusters))[::-1]]))


def test_empty_input() -> None:
    descriptor = SpeciesAwareSOAP(species=SPECIES_60, **SOAP_SETTINGS)
    assert list(descriptor.iter_blocks([])) == []
    assert descriptor.create([]).shape == (0, 270_900)


def test_parameters_round_trip(clusters: list[Atoms]) -> None:
    descriptor = SpeciesAwareSOAP(
        species=SPECIES_60, average='outer', weighting={'function': 'pow', 'r0': 3, 'c': 1, 'd': 1, 'm': 1}, sigma=0.5
    )
    parameters = descriptor.parameters
    assert parameters['name'] == 'soap'
    assert parameters['species'] == list(SPECIES_60)
    restored = get_descriptor(json.loads(json.dumps(parameters)), n_jobs=2)
    assert isinstance(restored, SpeciesAwareSOAP)
    assert restored.parameters == parameters
    assert 'n_jobs' not in parameters
    assert restored.n_features == descriptor.n_features
    assert_identical(restored.create(clusters[:4]), descriptor.create(clusters[:4]))
    assert SpeciesAwareSOAP.from_parameters(parameters).parameters == parameters
    assert 'species=' in repr(descriptor)


def test_get_location_matches_dscribe() -> None:
    descriptor = SpeciesAwareSOAP(species=SPECIES_60, **SOAP_SETTINGS)
    reference = SOAP(species=list(SPECIES_60), **SOAP_SETTINGS)
    assert descriptor.get_location(('Fe', 'Cu')) == reference.get_location(('Cu', 'Fe'))


@pytest.mark.parametrize(
    ('settings', 'message'),
    [
        ({'average': 'off'}, "average='off' is not supported"),
        ({'compression': {'mode': 'mu2'}}, 'compressed SOAP mixes species'),
        ({'compression': {'mode': 'off', 'species_weighting': {'Cu': 2.0}}}, 'compressed SOAP mixes species'),
        ({'rbf': 'bessel'}, "rbf='bessel' is not supported"),
        ({'dtype': 'float16'}, "dtype='float16' is not supported"),
        ({'n_jobs': 0}, 'n_jobs must be a non-zero integer'),
        ({'species': ['Cu', 'Xx']}, "unknown chemical species 'Xx'"),
    ],
)
def test_unsupported_options_are_refused(settings: dict[str, t.Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpeciesAwareSOAP(**{'species': ['Cu', 'Fe'], **SOAP_SETTINGS, **settings})


def test_compression_off_is_accepted() -> None:
    descriptor = SpeciesAwareSOAP(species=['Cu'], compression={'mode': 'off'}, **SOAP_SETTINGS)
    assert descriptor.n_features == SOAP(species=['Cu'], **SOAP_SETTINGS).get_number_of_features()


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert 'soap' in registered_descriptors()
    assert get_descriptor_class('soap') is SpeciesAwareSOAP
    with pytest.raises(ValueError, match="unknown descriptor 'acsf'; registered descriptors: soap"):
        get_descriptor({'name': 'acsf'})
    with pytest.raises(ValueError, match='need a `name`'):
        get_descriptor({'r_cut': 6.0})
    with pytest.raises(ValueError, match="are for descriptor 'mbtr', not 'soap'"):
        SpeciesAwareSOAP.from_parameters({'name': 'mbtr'})

    monkeypatch.setattr(base, '_REGISTRY', dict(base._REGISTRY))

    @register_descriptor
    class AtomCount(Descriptor):
        """A one-column descriptor, to show that new descriptors plug in by name."""

        name = 'atom_count'

        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        @property
        def n_features(self) -> int:
            return 1

        @property
        def parameters(self) -> dict[str, t.Any]:
            return {'name': self.name, 'scale': self.scale}

        def iter_blocks(self, structures: t.Sequence[Atoms], block_size: int = 256) -> t.Iterator[t.Any]:
            for start in range(0, len(structures), block_size):
                counts = [[self.scale * len(structure)] for structure in structures[start : start + block_size]]
                yield scipy.sparse.csr_array(np.array(counts))

    descriptor = get_descriptor({'name': 'atom_count', 'scale': 2.0})
    assert isinstance(descriptor, AtomCount)
    assert descriptor.fit([]) is descriptor
    assert descriptor.create([Atoms('Cu2'), Atoms('Fe')]).toarray().tolist() == [[4.0], [2.0]]
    assert registered_descriptors() == ('atom_count', 'soap')
    with pytest.raises(ValueError, match='already taken'):
        register_descriptor(type('OtherSOAP', (AtomCount,), {'name': 'soap'}))
