"""Tests for the synthetic impurity database: :mod:`aiida_mlworkbench.synthetic`."""

from __future__ import annotations

import collections
import itertools
import uuid

import pytest
from aiida import orm
from ase.data import atomic_numbers, chemical_symbols, reference_states

from aiida_mlworkbench import synthetic
from aiida_mlworkbench.calcfunctions.lattice import classify_lattice
from aiida_mlworkbench.synthetic import (
    EXTRA_HOST_UUID,
    EXTRA_INDEX,
    EXTRA_SYNTHETIC,
    HOST_ELEMENTS,
    IMPURITY_SPECIES,
    LATTICE_CLASSES,
    create_synthetic_database,
    default_group_label,
    iter_synthetic_embeddings,
    max_database_size,
    plan_synthetic_database,
)


def _unique_label(prefix: str) -> str:
    return f'test/{prefix}/{uuid.uuid4().hex[:12]}'


def _embedding_keys(embeddings) -> tuple[list[tuple[str, str, float]], list[int]]:
    """Return (host element, impurity element, strain) of each embedding as read back from the stored nodes, and pks.

    The impurities are read with one query: each attribute access of a queried ORM node is a database round trip.
    """
    embeddings = list(embeddings)
    pks = [info.pk for _, info in embeddings]
    query = orm.QueryBuilder().append(orm.Dict, filters={'id': {'in': pks}}, project=['id', 'attributes.Zimp'])
    impurities = {pk: chemical_symbols[zimp[0]] for pk, zimp in query.all()}
    hosts: dict[str, tuple[str, float]] = {}
    keys = []
    for (host, _), pk in zip(embeddings, pks, strict=True):
        if host.uuid not in hosts:
            (host_symbol,) = set(host.get_ase().get_chemical_symbols())
            hosts[host.uuid] = (host_symbol, host.base.extras.get(synthetic.EXTRA_STRAIN))
        host_symbol, strain = hosts[host.uuid]
        keys.append((host_symbol, impurities[pk], strain))
    return keys, pks


@pytest.fixture(scope='module', params=[1752, 7100], ids=lambda size: f'size{size}')
def database(request) -> tuple[orm.Group, int]:
    """A synthetic database, created once for the module, and how many process nodes it made.

    1752 embeddings use reference lattice constants only; 7100 also strained hosts.
    """
    processes_before = orm.QueryBuilder().append(orm.ProcessNode).count()
    group = create_synthetic_database(request.param, seed=0, group_label=_unique_label(str(request.param)))
    processes_after = orm.QueryBuilder().append(orm.ProcessNode).count()
    return group, processes_after - processes_before


def _plan_of(group: orm.Group) -> list[synthetic.SyntheticEmbedding]:
    return plan_synthetic_database(group.base.extras.get('size'), seed=group.base.extras.get('seed'))


def _storage_counts() -> tuple[int, int]:
    """Return the number of nodes and of groups in the storage."""
    return orm.QueryBuilder().append(orm.Node).count(), orm.QueryBuilder().append(orm.Group).count()


def test_species_list():
    """60 distinct real elements with reference states, holding every host element."""
    assert len(IMPURITY_SPECIES) == 60
    assert len(set(IMPURITY_SPECIES)) == 60
    assert list(IMPURITY_SPECIES) == sorted(IMPURITY_SPECIES, key=atomic_numbers.__getitem__)
    for symbol in IMPURITY_SPECIES:
        assert reference_states[atomic_numbers[symbol]] is not None, symbol
    hosts = [symbol for lattice in LATTICE_CLASSES for symbol in HOST_ELEMENTS[lattice]]
    assert len(hosts) == len(set(hosts))
    assert set(hosts) <= set(IMPURITY_SPECIES)


@pytest.mark.parametrize('lattice', LATTICE_CLASSES)
def test_host_elements_reference_state(lattice):
    """Every host of a class has that reference state in ASE, and ase.build.bulk builds it with that symmetry."""
    for symbol in HOST_ELEMENTS[lattice]:
        assert reference_states[atomic_numbers[symbol]]['symmetry'] == lattice, symbol
        host = orm.StructureData(ase=synthetic._host_atoms(symbol, 0.0))
        assert classify_lattice(host).lattice == lattice, symbol


def test_plan_reproducible():
    """The same (size, seed) gives the same pairs in the same order; another seed gives other pairs."""
    plan = plan_synthetic_database(1752, seed=0)
    assert plan == plan_synthetic_database(1752, seed=0)

    other = plan_synthetic_database(1752, seed=1)
    assert other != plan
    assert {(e.host, e.impurity) for e in other} != {(e.host, e.impurity) for e in plan}


@pytest.mark.parametrize('size', [1752, 7100])
def test_plan_sizes_and_balance(size):
    """Sizes 1752 and 7100 work, the classes are balanced and no embedding repeats or puts an element in itself."""
    plan = plan_synthetic_database(size, seed=0)
    assert len(plan) == size
    assert len(set(plan)) == size
    assert all(embedding.host != embedding.impurity for embedding in plan)
    assert all(embedding.host in HOST_ELEMENTS[embedding.lattice] for embedding in plan)

    counts = collections.Counter(embedding.lattice for embedding in plan)
    assert set(counts) == set(LATTICE_CLASSES)
    assert max(counts.values()) - min(counts.values()) <= 1

    species = {embedding.impurity for embedding in plan}
    assert species == set(IMPURITY_SPECIES)


def test_plan_strains_only_when_needed():
    """Up to 3068 embeddings use reference lattice constants only; 7100 needs strained hosts."""
    assert {embedding.strain for embedding in plan_synthetic_database(1752)} == {0.0}
    strains = collections.Counter(embedding.strain for embedding in plan_synthetic_database(7100))
    assert strains[0.0] == 3068
    assert set(strains) == {0.0, -0.02, 0.02}
    assert {embedding.strain for embedding in plan_synthetic_database(28400)} == set(synthetic.HOST_STRAINS)


FIRST_1752 = [('Cu', 'Ho', 0.0), ('Zn', 'Sn', 0.0), ('Au', 'K', 0.0)]
FIRST_7100 = [('Ru', 'K', -0.02), ('Os', 'Ce', 0.0), ('Sc', 'Cd', 0.0)]


def test_plans_fitting_in_three_strains_are_unchanged():
    """More strains were added for larger databases; every database whose classes fit in the first three is drawn as
    before (the first embeddings of the seed-0 databases of 1752 and 7100, as drawn when there were three strains)."""
    first = [(e.host, e.impurity, e.strain) for e in plan_synthetic_database(1752)[:3]]
    assert first == FIRST_1752
    first = [(e.host, e.impurity, e.strain) for e in plan_synthetic_database(7100)[:3]]
    assert first == FIRST_7100


def test_plan_size_errors():
    """Sizes out of range are refused with the allowed range."""
    with pytest.raises(ValueError, match='between 1 and 30680'):
        plan_synthetic_database(0)
    with pytest.raises(ValueError, match='between 1 and 30680'):
        plan_synthetic_database(max_database_size() + 1)
    assert len(plan_synthetic_database(max_database_size())) == 30680


@pytest.mark.parametrize(('symbol', 'lattice', 'neighbours'), [('Cu', 'fcc', 18), ('Fe', 'bcc', 14), ('Zn', 'hcp', 18)])
def test_two_shell_cutoff_ase(symbol, lattice, neighbours):
    """The cutoff holds exactly the first two shells, and lies well inside the gap to the third."""
    from ase.neighborlist import neighbor_list

    atoms = synthetic._host_atoms(symbol, 0.0)
    rcut = synthetic.two_shell_cutoff(atoms, lattice)
    centres = neighbor_list('i', atoms, rcut)
    assert (centres == 0).sum() == neighbours
    centres = neighbor_list('i', atoms, 1.03 * rcut)
    assert (centres == 0).sum() == neighbours


def test_database_group(database):
    """The group holds the hosts and the impurity_info nodes, and says what it is."""
    group, processes = database
    plan = _plan_of(group)
    n_hosts = len({(embedding.host, embedding.strain) for embedding in plan})

    assert group.count() == len(plan) + n_hosts
    assert (
        orm.QueryBuilder()
        .append(orm.Group, filters={'id': group.pk}, tag='g')
        .append(orm.StructureData, with_group='g')
        .count()
        == n_hosts
    )
    assert processes == 0, 'a synthetic database must not fabricate process nodes'

    extras = group.base.extras.all
    assert extras[EXTRA_SYNTHETIC] is True
    assert (extras['size'], extras['seed'], extras['hosts']) == (len(plan), 0, n_hosts)
    assert extras['lattice_counts'] == dict(collections.Counter(embedding.lattice for embedding in plan))
    assert 'synthetic' in group.description.lower()


def test_database_order_matches_plan(database):
    """The embeddings come back in the planned order, and hosts are shared between their impurities."""
    group, _ = database
    plan = _plan_of(group)
    embeddings = list(iter_synthetic_embeddings(group))

    keys, pks = _embedding_keys(embeddings)
    assert keys == [(e.host, e.impurity, e.strain) for e in plan]

    query = orm.QueryBuilder().append(
        orm.Dict, filters={'id': {'in': pks}}, project=['id', f'extras.{EXTRA_INDEX}', f'extras.{EXTRA_HOST_UUID}']
    )
    extras = {pk: (index, host_uuid) for pk, index, host_uuid in query.all()}
    assert [extras[pk][0] for pk in pks] == list(range(len(plan)))

    host_uuids: dict[int, str] = {}  # by Python object: hosts are shared objects, read each uuid once
    hosts_by_key = collections.defaultdict(set)
    for (host_symbol, _, strain), (host, _), pk in zip(keys, embeddings, pks, strict=True):
        host_uuid = host_uuids.setdefault(id(host), host.uuid)
        assert extras[pk][1] == host_uuid
        hosts_by_key[(host_symbol, strain)].add(host_uuid)
    assert all(len(uuids) == 1 for uuids in hosts_by_key.values())


def test_database_nodes_marked_synthetic(database):
    """Every node in the group has the synthetic extra and a description that says so."""
    group, _ = database
    query = orm.QueryBuilder().append(orm.Group, filters={'id': group.pk}, tag='g')
    query.append(orm.Node, with_group='g', project=['extras', 'description', 'node_type'])
    rows = query.all()
    assert len(rows) == group.count()
    for extras, description, node_type in rows:
        assert extras.get(EXTRA_SYNTHETIC) is True
        assert 'synthetic' in description.lower()
        assert 'no calculation ran' in description
        assert node_type in {orm.StructureData.class_node_type, orm.Dict.class_node_type}


def test_database_impurity_info_form(database):
    """impurity_info has exactly the keys and types kkr_imp_wc takes; nodes are proper, hashed Dict nodes."""
    group, _ = database
    for index, (host, info) in enumerate(iter_synthetic_embeddings(group)):
        if index % 97:
            continue
        content = info.get_dict()
        assert set(content) == {'ilayer_center', 'Rcut', 'Zimp'}
        assert content['ilayer_center'] == 0
        assert isinstance(content['Rcut'], float)
        assert content['Rcut'] > 0
        assert isinstance(content['Zimp'], list)
        assert len(content['Zimp']) == 1
        assert isinstance(content['Zimp'][0], int)
        assert content['Zimp'][0] not in set(host.get_ase().get_atomic_numbers())
        assert isinstance(info, orm.Dict)
        assert info.is_stored
        assert info.base.caching.get_hash() == info.base.caching.compute_hash()
        assert info.user.pk == orm.User.collection.get_default().pk


def test_database_rcut_two_shells(database):
    """With aiida-kkr's own cluster geometry, Rcut gives 18 neighbours in fcc and hcp and 14 in bcc, also in strained
    hosts."""
    from aiida_kkr.tools.tools_kkrimp import create_scoef_array

    group, _ = database
    expected = {'fcc': 18, 'hcp': 18, 'bcc': 14}
    seen = {}
    for host, info in iter_synthetic_embeddings(group):
        if id(host) in seen:  # hosts are shared objects: test each once
            continue
        lattice = host.base.extras.get(synthetic.EXTRA_LATTICE)
        rows = create_scoef_array(host.clone(), info['Rcut'])  # an unstored copy reads its attributes in memory
        seen[id(host)] = (lattice, len(rows) - 1)
    assert len(seen) == group.base.extras.get('hosts')
    for lattice, neighbours in seen.values():
        assert neighbours == expected[lattice]


def test_database_hosts_classified(database):
    """Every stored host has the lattice type of its class: the learning target is right."""
    group, _ = database
    query = orm.QueryBuilder().append(orm.Group, filters={'id': group.pk}, tag='g')
    query.append(orm.StructureData, with_group='g')
    for host in query.all(flat=True):
        assert classify_lattice(host).lattice == host.base.extras.get(synthetic.EXTRA_LATTICE)
        assert len(host.sites) == (2 if host.base.extras.get(synthetic.EXTRA_LATTICE) == 'hcp' else 1)


def test_existing_group_refused_or_reused(database):
    """A non-empty group is refused unless reused; reusing returns it unchanged; a mismatched one is refused."""
    group, _ = database
    size = group.base.extras.get('size')
    with pytest.raises(ValueError, match='already exists and holds'):
        create_synthetic_database(size, seed=0, group_label=group.label)

    count = group.count()
    reused = create_synthetic_database(size, seed=0, group_label=group.label, reuse_existing=True)
    assert reused.pk == group.pk
    assert reused.count() == count

    with pytest.raises(ValueError, match='is not a synthetic database of size 100 with seed 0'):
        create_synthetic_database(100, seed=0, group_label=group.label, reuse_existing=True)


def test_empty_existing_group_filled():
    """An existing empty group is filled, and a default label follows the convention."""
    label = _unique_label('empty')
    group = orm.Group(label=label).store()
    filled = create_synthetic_database(12, seed=3, group_label=label)
    assert filled.pk == group.pk
    assert len(list(iter_synthetic_embeddings(filled))) == 12
    assert default_group_label(7100, 2) == 'mlworkbench/synthetic/7100-seed2'


def test_iter_refuses_other_group():
    """A group without synthetic embeddings gives a clear error."""
    group = orm.Group(label=_unique_label('plain')).store()
    group.add_nodes(orm.Dict({'Rcut': 1.0}).store())
    with pytest.raises(ValueError, match='holds no synthetic impurity embeddings'):
        iter_synthetic_embeddings(group)


@pytest.mark.parametrize('existing_group', [False, True], ids=['new_group', 'empty_group'])
@pytest.mark.parametrize('failing', ['Dict.store', 'Group.add_nodes'])
def test_failure_leaves_nothing_behind(monkeypatch, failing, existing_group):
    """A failure after some nodes were stored rolls everything back: no node, no new group, an empty group stays empty;
    a second try then creates the database."""
    label = _unique_label('failure')
    if existing_group:
        orm.Group(label=label).store()
    counts = _storage_counts()

    if failing == 'Dict.store':
        store = orm.Dict.store
        calls = itertools.count()

        def failing_store(node):
            if next(calls) == 5:
                raise RuntimeError('simulated storage failure')
            return store(node)

        monkeypatch.setattr(orm.Dict, 'store', failing_store)
    else:

        def failing_add_nodes(group, nodes):
            raise RuntimeError('simulated storage failure')

        monkeypatch.setattr(orm.Group, 'add_nodes', failing_add_nodes)

    with pytest.raises(RuntimeError, match='simulated storage failure'):
        create_synthetic_database(12, seed=4, group_label=label)
    monkeypatch.undo()

    assert _storage_counts() == counts
    groups = orm.QueryBuilder().append(orm.Group, filters={'label': label}, project=['extras']).all(flat=True)
    if existing_group:
        assert groups == [{}]
        assert orm.load_group(label).is_empty
    else:
        assert groups == []

    group = create_synthetic_database(12, seed=4, group_label=label)
    assert len(list(iter_synthetic_embeddings(group))) == 12
