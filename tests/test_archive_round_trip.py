"""Sharing results: a feature matrix and a model exported with ``verdi archive create``, imported into a new profile."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import scipy.sparse
from aiida import orm
from aiida.manage import get_manager
from aiida.tools.archive import import_archive
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from aiida_mlworkbench.data import SparseFeatureMatrix, TrainedModel

VERDI = str(pathlib.Path(sys.executable).with_name('verdi'))


def test_archive_round_trip(tmp_path, fresh_profile):
    rng = np.random.default_rng(3)
    features = scipy.sparse.random_array((80, 500), density=0.05, format='csr', rng=rng)
    labels = np.array(['bcc', 'fcc', 'hcp'])[rng.integers(0, 3, 80)]
    descriptor = {'name': 'soap', 'n_max': 5, 'l_max': 5}
    estimator = make_pipeline(StandardScaler(with_mean=False), SVC(kernel='linear')).fit(features, labels)

    matrix = SparseFeatureMatrix(features, descriptor=descriptor).store()
    model = TrainedModel(estimator, descriptor=descriptor).store()
    matrix_bytes = matrix.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb')
    expected = model.predict(matrix)
    uuids = (matrix.uuid, model.uuid)  # node objects of this profile go stale in the other one
    checksum = model.checksum

    archive = tmp_path / 'features-and-model.aiida'
    profile_name = get_manager().get_profile().name
    subprocess.run(
        [VERDI, '-p', profile_name, 'archive', 'create', '--nodes', str(matrix.pk), str(model.pk), '--', str(archive)],
        check=True,
        capture_output=True,
    )
    assert archive.is_file()

    with fresh_profile():
        assert orm.QueryBuilder().append(orm.Node).count() == 0
        import_archive(archive)
        imported_matrix, imported_model = (orm.load_node(uuid) for uuid in uuids)
        assert isinstance(imported_matrix, SparseFeatureMatrix)
        assert imported_matrix.base.repository.get_object_content(SparseFeatureMatrix.FILENAME, 'rb') == matrix_bytes
        imported_matrix.verify()
        assert imported_model.checksum == checksum
        np.testing.assert_array_equal(imported_model.predict(imported_matrix), expected)
        assert (imported_matrix.get_matrix() != features).nnz == 0
