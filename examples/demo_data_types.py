"""Store impurity clusters, a SOAP feature matrix and a trained model as AiiDA nodes, then find them with QueryBuilder.

Run with ``verdi run examples/demo_data_types.py`` (or ``python3 dev.py demo`` on an isolated profile).
"""

from __future__ import annotations

import numpy as np
from aiida import orm
from ase.build import bulk
from dscribe.descriptors import SOAP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aiida_mlworkbench.data import ImpurityClusters, SparseFeatureMatrix, TrainedModel

HOSTS = {'Cu': 'fcc', 'Ag': 'fcc', 'Fe': 'bcc', 'W': 'bcc', 'Ti': 'hcp', 'Mg': 'hcp'}
IMPURITIES = ['Mn', 'Co', 'Ni', 'Zn', 'Cr', 'V', 'Pd', 'Pt']


def impurity_cluster(host: str, impurity: str, radius: float):
    """A non-periodic cluster cut from the host crystal, the impurity at the origin (tag 1, host atoms tag 0)."""
    crystal = bulk(host).repeat(5)
    centre = crystal.positions[len(crystal) // 2].copy()
    distances = np.linalg.norm(crystal.positions - centre, axis=1)
    cluster = crystal[distances < radius]
    cluster.positions -= centre
    cluster.pbc = False
    cluster.cell = None
    tags = np.zeros(len(cluster), dtype=int)
    centre_atom = int(np.argmin(np.linalg.norm(cluster.positions, axis=1)))
    cluster[centre_atom].symbol = impurity
    tags[centre_atom] = 1
    cluster.set_tags(tags)
    return cluster


def main() -> None:
    atoms_list, keys, labels = [], [], []
    for host, lattice in HOSTS.items():
        radius = 4.5  # Angstrom: about two neighbour shells in these hosts
        for impurity in IMPURITIES:
            atoms_list.append(impurity_cluster(host, impurity, radius))
            keys.append(f'{impurity} in {host}')
            labels.append(lattice)
    clusters = ImpurityClusters(atoms_list, keys=keys).store()  # all clusters in one node, one row each
    print(f'stored {clusters}')
    species = clusters.species
    parameters = {'name': 'soap', 'species': species, 'r_cut': 5.0, 'n_max': 4, 'l_max': 4, 'average': 'inner'}
    soap = SOAP(
        species=species,
        r_cut=parameters['r_cut'],
        n_max=parameters['n_max'],
        l_max=parameters['l_max'],
        average='inner',
        sparse=True,
    )
    features = SparseFeatureMatrix(soap.create(clusters.get_atoms_list()), descriptor=parameters).store()
    print(f'stored {features}, density {features.density:.4f}')

    matrix = features.get_matrix()
    estimator = make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear')).fit(matrix, labels)
    model = TrainedModel(estimator, descriptor=features.descriptor).store()
    print(f'stored {model}, classes {model.classes}')

    query = orm.QueryBuilder().append(
        ImpurityClusters,
        filters={'attributes.impurity_species': {'contains': ['Mn']}, 'attributes.n_atoms_max': {'>=': 40}},
        project=['id', 'attributes.n_clusters'],
    )
    print(f'cluster sets with Mn impurities and a cluster of 40 atoms or more: {query.all()}')
    row = clusters.keys.index('Mn in Fe')
    print(f'row {row} is {clusters.keys[row]}: {clusters.get_ase(row).get_chemical_formula()}')
    query = orm.QueryBuilder().append(
        SparseFeatureMatrix,
        filters={'attributes.descriptor.name': 'soap', 'attributes.n_features': {'>': 100}},
        project=['id', 'attributes.shape'],
    )
    print(f'feature matrices of SOAP with more than 100 features: {query.all()}')
    query = orm.QueryBuilder().append(
        TrainedModel, filters={'attributes.final_estimator_class': 'sklearn.svm.SVC'}, project='id'
    )
    print(f'trained SVC models: {query.all(flat=True)}')

    reloaded = orm.load_node(model.pk)
    accuracy = float(np.mean(reloaded.predict(orm.load_node(features.pk)) == np.array(labels)))
    print(f'model reloaded through the restricted unpickler; training accuracy {accuracy:.2f}')


main()
