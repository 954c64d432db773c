"""Fast paths give the same numbers as the general ones they shortcut."""
from __future__ import annotations

import numpy as np
import torch

from DEQRegistrationLib import metrics
from DEQRegistrationLib.sampling import Sampler
from DEQRegistrationLib.transforms import jacobian_determinant

from conftest import oblique_affine


def test_torch_jacobian_equals_the_numpy_metric():
    rng = np.random.default_rng(0)
    for shape in [(3, 7, 8, 9), (2, 9, 10), (3, 2, 5, 6)]:
        disp = rng.normal(size=shape).astype(np.float32)
        got = jacobian_determinant(torch.as_tensor(disp)[None])[0].numpy()
        np.testing.assert_allclose(got, metrics.jacobian_determinant(disp), rtol=1e-5, atol=1e-5)


def test_same_grid_sampler_skips_the_matrix_and_matches_the_general_path():
    aff = oblique_affine()
    shape = (9, 8, 7)
    rng = np.random.default_rng(1)
    data = rng.random(shape).astype(np.float32)
    labels = rng.integers(0, 5, shape).astype(np.uint8)
    disp = rng.normal(scale=0.7, size=(3,) + shape).astype(np.float32)
    fast = Sampler(shape, aff, aff)
    general = Sampler(shape, aff, aff)
    general.identity = False  # force the matrix product
    assert fast.identity
    assert not Sampler(shape, aff, oblique_affine(origin=(0.0, 0.0, 0.0))).identity
    np.testing.assert_array_equal(fast.image(data), data)  # no field: the data itself
    np.testing.assert_allclose(general.image(data), data, atol=1e-5)
    np.testing.assert_array_equal(fast.labels(labels), labels)
    np.testing.assert_allclose(fast.image(data, disp), general.image(data, disp), atol=1e-5)
    assert np.mean(fast.labels(labels, disp) == general.labels(labels, disp)) > 0.999
    t = torch.as_tensor(data)[None, None]
    torch.testing.assert_close(fast.image(t), t)
    assert fast.image(t) is not t  # a copy, never the caller's tensor


def test_stored_gzip_outputs_are_valid_and_exact(tmp_path):
    """compresslevel=0 (the CLI's choice for float fields) still writes a .nii.gz every reader opens."""
    from DEQRegistrationLib import io

    rng = np.random.default_rng(2)
    disp = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    aff = oblique_affine()
    for level in (0, 1):
        path = io.save_itk_displacement(disp, aff, tmp_path / f"d{level}.nii.gz", compresslevel=level)
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
        back, back_aff = io.load_itk_displacement(path)
        np.testing.assert_array_equal(back, disp)
        np.testing.assert_allclose(back_aff, aff)
    assert (tmp_path / "d0.nii.gz").stat().st_size > (tmp_path / "d1.nii.gz").stat().st_size
