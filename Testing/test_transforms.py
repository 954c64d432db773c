"""Warping, composition, resizing and unit conversions on anisotropic, oblique grids."""
import numpy as np
import pytest
import torch

from DEQRegistrationLib import geometry
from conftest import oblique_affine
from DEQRegistrationLib.transforms import (compose, downsample_field, downsample_image, identity_grid,
                                           upsample_field, warp)


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


def test_compose_of_translations_is_their_sum():
    shape = (10, 12, 14)
    a = torch.zeros(1, 3, *shape)
    b = torch.zeros(1, 3, *shape)
    a[:, 0], b[:, 1], b[:, 2] = 1.0, -2.0, 0.5
    w = compose(a, b)
    inner = (slice(None), slice(None), slice(2, -2), slice(3, -3), slice(2, -2))
    assert torch.allclose(w[inner], (a + b)[inner], atol=1e-5)


def test_compose_matches_the_analytic_composition():
    """warp(m, compose(first, then)) samples m at y + first(y), y = x + then(x)."""
    shape = (32, 32)
    g = identity_grid(shape, dtype=torch.float64)

    def img_fn(p):
        return torch.sin(p[:, :1] / 6.0) * torch.cos(p[:, 1:] / 7.0)

    def first_fn(p):
        return 1.5 * torch.sin(p / 9.0)

    then = 1.0 * torch.cos(g.flip(1) / 8.0)
    y = g + then
    expected = img_fn(y + first_fn(y))
    once = warp(img_fn(g), compose(first_fn(g), then))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert (expected - once)[inner].abs().max() < 0.01


def test_field_unit_round_trips_on_oblique_anisotropic_grid():
    A = oblique_affine()
    u = np.random.default_rng(0).normal(size=(3, 5, 6, 7)).astype(np.float32)
    mm = geometry.voxel_field_to_physical(u, A)
    # a displacement is the difference of the two mapped points
    p = np.array([2, 3, 4])
    expected = (A @ np.r_[p + u[:, 2, 3, 4], 1])[:3] - (A @ np.r_[p, 1])[:3]
    np.testing.assert_allclose(mm[2, 3, 4], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(geometry.physical_field_to_voxel(mm, A, 3), u, atol=1e-5)
    t = torch.as_tensor(u)[None]
    np.testing.assert_allclose(geometry.normalized_to_voxel_field(geometry.voxel_to_normalized_field(t)), t, atol=1e-6)
    # normalized units: the whole extent of an axis is 2
    n = geometry.voxel_to_normalized_field(torch.ones(1, 3, 5, 6, 7))
    np.testing.assert_allclose(n[0, :, 0, 0, 0], [2 / 4, 2 / 5, 2 / 6], rtol=1e-6)


def test_lps_flip_and_point_round_trip():
    A = oblique_affine()
    pts = np.random.default_rng(1).uniform(0, 10, size=(7, 3))
    ras = geometry.voxel_to_physical_points(pts, A)
    np.testing.assert_allclose(geometry.physical_to_voxel_points(ras, A, 3), pts, atol=1e-9)
    lps = geometry.ras_to_lps(ras)
    np.testing.assert_allclose(lps[:, :2], -ras[:, :2])
    np.testing.assert_allclose(lps[:, 2], ras[:, 2])


def test_voxel_to_voxel_affine_maps_through_physical_space():
    Af, Am = oblique_affine(), oblique_affine((0.9, 1.1, 1.3), (0.1, 0.2, -0.4), (3, 4, 5))
    M = geometry.voxel_to_voxel_affine(Af, Am, 3)
    p = np.array([3.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(Am @ (M @ p), Af @ p, atol=1e-9)


@pytest.mark.parametrize("shape", [(8, 12, 16), (12, 20)])
def test_pyramid_conventions_agree(shape):
    """A constant coarse field upsamples to factor x itself; images and fields share the grid."""
    d = torch.full((1, len(shape), *[n // 2 for n in shape]), 1.25)
    up = upsample_field(d, 2)
    assert up.shape[2:] == torch.Size(shape)
    assert torch.allclose(up, torch.full_like(up, 2.5))
    assert torch.allclose(downsample_field(up, 2), d)
    # a linear ramp image downsampled by 2 has its coarse voxel c at fine 2c + 0.5
    ramp = identity_grid(shape, dtype=torch.float64)[:, :1]
    coarse = downsample_image(ramp, 2)
    c = identity_grid(coarse.shape[2:], dtype=torch.float64)[:, :1]
    assert torch.allclose(coarse, 2 * c + 0.5)
