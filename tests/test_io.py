import gzip

import nibabel as nib
import numpy as np
import pytest

from radflow import io


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with io.atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_save_nifti_roundtrip_qform_sform(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(17, 9, 40)) * 100).astype(dtype)
    aff = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    path = tmp_path / "v.nii.gz"
    io.save_nifti(data, aff, path, threads=2)
    img = nib.load(path)
    assert img.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, aff)
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    with gzip.open(path) as fh:  # plain gzip readers see a valid stream too
        assert len(fh.read()) == 352 + data.nbytes
