"""Warping, resizing and unit conversions on anisotropic, oblique grids."""
import numpy as np
import pytest
import torch

from DEQRegistrationLib import geometry
from conftest import oblique_affine
from DEQRegistrationLib.transforms import downsample_image, identity_grid, upsample_field, warp


@pytest.mark.parametrize("shape", [(9, 11, 13), (17, 10)])
def test_identity_warp_is_exact(shape):
    img = torch.rand(1, 2, *shape, dtype=torch.float64)
    out = warp(img, torch.zeros(1, len(shape), *shape, dtype=torch.float64))
    assert torch.allclose(out, img, rtol=0, atol=1e-12)


def test_integer_translation_matches_array_shift():
    img = torch.rand(1, 1, 12, 14, 16, dtype=torch.float64)
    disp = torch.zeros(1, 3, 12, 14, 16, dtype=torch.float64)
    disp[:, 0] = 2.0   # sample 2 voxels further along axis 0
    disp[:, 2] = -1.0  # and 1 voxel back along axis 2
    out = warp(img, disp)
    assert torch.allclose(out[..., :-2, :, 1:], img[..., 2:, :, :-1], atol=1e-12)


def test_nearest_warp_keeps_label_values():
    labels = torch.randint(0, 5, (1, 1, 10, 10)).double()
    disp = 0.4 * torch.randn(1, 2, 10, 10, dtype=torch.float64)
    out = warp(labels, disp, mode="nearest")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_field_unit_round_trips_on_oblique_anisotropic_grid():
    A = oblique_affine()
    u = np.random.default_rng(0).normal(size=(3, 5, 6, 7)).astype(np.float32)
    mm = geometry.voxel_field_to_physical(u, A)
    # a displacement is the difference of the two mapped points
    p = np.array([2, 3, 4])
    expected = (A @ np.r_[p + u[:, 2, 3, 4], 1])[:3] - (A @ np.r_[p, 1])[:3]
    np.testing.assert_allclose(mm[2, 3, 4], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(geometry.physical_field_to_voxel(mm, A, 3), u, atol=1e-5)


def test_lps_flip_and_point_round_trip():
    A = oblique_affine()
    pts = np.random.default_rng(1).uniform(0, 10, size=(7, 3))
    ras = geometry.voxel_to_physical_points(pts, A)
    np.testing.assert_allclose(geometry.physical_to_voxel_points(ras, A, 3), pts, atol=1e-9)
    lps = geometry.ras_to_lps(ras)
    np.testing.assert_allclose(lps[:, :2], -ras[:, :2])
    np.testing.assert_allclose(lps[:, 2], ras[:, 2])


@pytest.mark.parametrize("shape", [(8, 12, 16), (12, 20)])
def test_pyramid_conventions_agree(shape):
    """A constant coarse field upsamples to factor x itself; images and fields share the grid."""
    d = torch.full((1, len(shape), *[n // 2 for n in shape]), 1.25)
    up = upsample_field(d, 2)
    assert up.shape[2:] == torch.Size(shape)
    assert torch.allclose(up, torch.full_like(up, 2.5))
    # a linear ramp image downsampled by 2 has its coarse voxel c at fine 2c + 0.5
    ramp = identity_grid(shape, dtype=torch.float64)[:, :1]
    coarse = downsample_image(ramp, 2)
    c = identity_grid(coarse.shape[2:], dtype=torch.float64)[:, :1]
    assert torch.allclose(coarse, 2 * c + 0.5)
