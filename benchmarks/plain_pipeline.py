"""The whole learning pipeline written the plain way: no provenance, no stored node, no aiida-mlworkbench step.

It does the work of ``ImpurityLearningWorkChain`` with its default inputs (learn the host lattice class of each
impurity cluster of the synthetic database), as a user would write it without this package:

1. clusters: the seeded synthetic database of ``--size`` embeddings (:func:`aiida_mlworkbench.synthetic.
   plan_synthetic_database`: host element, lattice class, strain and impurity of each embedding), each host built
   with ``ase.build.bulk`` and strained, ``Rcut`` the two-shell cutoff, and the cluster cut out with aiida-kkr's
   ``create_scoef_array`` through :func:`aiida_mlworkbench.kkr.geometry.impurity_cluster` on the ``ase.Atoms`` host
   (the clusters are the ones the synthetic database gives; nothing is stored: the AiiDA profile is an in-memory
   ``core.sqlite_temp`` one, needed only because aiida-kkr works on unstored ``StructureData``);
2. features: DScribe ``SOAP(species=<the 60 species>, r_cut=6.0, n_max, l_max, sigma=1.0, average='inner',
   sparse=True).create(clusters, n_jobs=J)``, then a scipy CSR matrix; or, with ``--featurizer package``, the
   package's own SOAP called directly (no node, no file: the honest measure of what provenance costs);
3. split: ``train_test_split(test_size=0.25, random_state=0, stratify=<lattice class>)``;
4. train: ``make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear'))``;
5. score: accuracy on the test rows.

Usage::

    python benchmarks/plain_pipeline.py --size 1752 [--n-max 5 --l-max 5] [--jobs 2] [--featurizer package] [--json]

Prints the time of each step and the test accuracy; with ``--json`` the last line is a JSON object with them
(``benchmarks/run.py`` reads it: the ways ``plain`` and ``plain-own`` of its ``pipeline`` case). The times start after
the imports and the loading of the in-memory profile (:func:`prepare`), as the package's do in ``run.py``.
:func:`dscribe_features` is also the plain featurization of the ``featurize-*`` cases of ``run.py``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

SOAP_SETTINGS = {'r_cut': 6.0, 'sigma': 1.0, 'average': 'inner'}
"""The SOAP settings of the work chain's default descriptor, but ``n_max`` and ``l_max``."""


def use_temporary_aiida_path() -> None:
    """Point ``AIIDA_PATH`` to a temporary folder, deleted at exit, unless it is set: keeps ``~/.aiida`` untouched.

    Must run before ``aiida`` is imported, which fixes the configuration folder (and creates it) on import.
    """
    if 'AIIDA_PATH' not in os.environ:
        folder = tempfile.mkdtemp(prefix='mlworkbench-plain-')
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ['AIIDA_PATH'] = folder


def load_temporary_profile() -> None:
    """Load an in-memory AiiDA profile (nothing is written to it) unless a profile is loaded."""
    use_temporary_aiida_path()
    from aiida import get_profile, load_profile

    if get_profile() is not None:
        return
    from aiida.storage.sqlite_temp import SqliteTempBackend

    load_profile(SqliteTempBackend.create_profile('mlworkbench-plain'), allow_switch=True)


def synthetic_clusters(size: int, seed: int = 0) -> tuple[list, list[str]]:
    """Return the impurity clusters (``ase.Atoms``) of the synthetic database and the host lattice class of each.

    The same embeddings, in the same order, as ``create_synthetic_database(size, seed)`` stores: host in its ASE
    reference state, isotropically strained, ``Rcut`` the two-shell cutoff of the unstrained host scaled by the
    strain and rounded to 0.1 mAngstrom, ``ilayer_center = 0``, one impurity.
    """
    from ase.build import bulk
    from ase.data import atomic_numbers

    from aiida_mlworkbench.kkr.geometry import impurity_cluster
    from aiida_mlworkbench.synthetic import plan_synthetic_database, two_shell_cutoff

    load_temporary_profile()
    hosts, cutoffs, reference_cutoffs = {}, {}, {}
    clusters, lattices = [], []
    for embedding in plan_synthetic_database(size, seed):
        key = (embedding.host, embedding.strain)
        if key not in hosts:
            atoms = bulk(embedding.host)
            if embedding.strain:
                atoms.set_cell(atoms.cell[:] * (1.0 + embedding.strain), scale_atoms=True)
            hosts[key] = atoms
            if embedding.host not in reference_cutoffs:
                reference_cutoffs[embedding.host] = two_shell_cutoff(bulk(embedding.host), embedding.lattice)
            cutoffs[key] = round(reference_cutoffs[embedding.host] * (1.0 + embedding.strain), 4)
        impurity_info = {'ilayer_center': 0, 'Rcut': cutoffs[key], 'Zimp': [atomic_numbers[embedding.impurity]]}
        clusters.append(impurity_cluster(hosts[key], impurity_info))
        lattices.append(embedding.lattice)
    return clusters, lattices


def species() -> list[str]:
    """The 60 species of the synthetic database: the feature space of every SOAP here."""
    from aiida_mlworkbench.synthetic import IMPURITY_SPECIES

    return list(IMPURITY_SPECIES)


def dscribe_features(clusters: list, n_max: int, l_max: int, jobs: int):
    """DScribe's SOAP over all 60 species, sparse, as a scipy CSR array: the plain featurization."""
    import scipy.sparse
    from dscribe.descriptors import SOAP

    soap = SOAP(species=species(), n_max=n_max, l_max=l_max, sparse=True, **SOAP_SETTINGS)
    return _int32_indices(scipy.sparse.csr_array(soap.create(clusters, n_jobs=jobs).tocsr()))


def _int32_indices(features):
    """``features`` with 32-bit indices where they fit: scikit-learn's SVC refuses 64-bit ones (sparse.COO's)."""
    import numpy as np

    if features.nnz < np.iinfo(np.int32).max:
        features.indices = features.indices.astype(np.int32)
        features.indptr = features.indptr.astype(np.int32)
    return features


def package_features(clusters: list, n_max: int, l_max: int, jobs: int):
    """The package's own SOAP (``SpeciesAwareSOAP``, what ``featurize`` runs) over the 60 species, called directly:
    no node, no HDF5 file, no provenance. Same features as :func:`dscribe_features`."""
    import scipy.sparse

    from aiida_mlworkbench.descriptors import get_descriptor

    parameters = {'name': 'soap', 'species': species(), 'n_max': n_max, 'l_max': l_max, **SOAP_SETTINGS}
    descriptor = get_descriptor(parameters)
    descriptor.n_jobs = jobs
    descriptor.fit(clusters)
    return _int32_indices(scipy.sparse.csr_array(scipy.sparse.vstack(list(descriptor.iter_blocks(clusters)))))


FEATURIZERS = {'dscribe': dscribe_features, 'package': package_features}


def prepare(featurizer: str) -> None:
    """Load the in-memory profile and import what the steps use, so that the times are those of the work alone (as
    ``benchmarks/run.py`` times the package's work after its imports and profile loading)."""
    load_temporary_profile()
    import ase.build  # noqa: F401

    import aiida_mlworkbench.kkr.geometry
    import aiida_mlworkbench.synthetic

    if featurizer == 'dscribe':
        import dscribe.descriptors  # noqa: F401
    else:
        import aiida_mlworkbench.descriptors  # noqa: F401


def run(size: int, n_max: int, l_max: int, jobs: int, *, seed: int = 0, featurizer: str = 'dscribe') -> dict:
    """Run the five steps and return the seconds of each, the total, the matrix shape and the test accuracy."""
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    step = time.perf_counter()
    prepare(featurizer)
    import_seconds = time.perf_counter() - step

    seconds = {}
    start = time.perf_counter()
    clusters, lattices = synthetic_clusters(size, seed)
    seconds['clusters'] = time.perf_counter() - start

    step = time.perf_counter()
    features = FEATURIZERS[featurizer](clusters, n_max, l_max, jobs)
    seconds['features'] = time.perf_counter() - step

    step = time.perf_counter()
    train, test = train_test_split(range(size), test_size=0.25, random_state=0, stratify=lattices)
    targets = [lattices[row] for row in range(size)]
    seconds['split'] = time.perf_counter() - step

    step = time.perf_counter()
    model = make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear'))
    model.fit(features[train], [targets[row] for row in train])
    seconds['train'] = time.perf_counter() - step

    step = time.perf_counter()
    accuracy = accuracy_score([targets[row] for row in test], model.predict(features[test]))
    seconds['score'] = time.perf_counter() - step

    return {
        'seconds': time.perf_counter() - start,
        'import_seconds': import_seconds,
        'steps': seconds,
        'shape': list(features.shape),
        'nnz': int(features.nnz),
        'score': float(accuracy),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1752, help='number of embeddings (default 1752)')
    parser.add_argument('--n-max', type=int, default=5)
    parser.add_argument('--l-max', type=int, default=5)
    parser.add_argument('--jobs', type=int, default=1, help='n_jobs of the DScribe call (default 1)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the synthetic database (default 0)')
    parser.add_argument(
        '--featurizer',
        choices=sorted(FEATURIZERS),
        default='dscribe',
        help="the SOAP: DScribe's (default) or the package's own SpeciesAwareSOAP called directly, without provenance",
    )
    parser.add_argument('--json', action='store_true', help='end with one line of JSON holding the results')
    args = parser.parse_args(argv)

    use_temporary_aiida_path()
    result = run(args.size, args.n_max, args.l_max, args.jobs, seed=args.seed, featurizer=args.featurizer)
    soap = f'{args.featurizer} SOAP, n_jobs = {args.jobs}'
    print(f'embeddings: {args.size}, n_max = {args.n_max}, l_max = {args.l_max}, {soap}')
    print(f'features:   {result["shape"][0]} x {result["shape"][1]}, {result["nnz"]} non-zeros')
    for name, seconds in result['steps'].items():
        print(f'{name + ":":<11} {seconds:8.2f} s')
    print(f'total:      {result["seconds"]:8.2f} s')
    print(f'accuracy:   {result["score"]:.4f}')
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
