"""The inverse transform as a fixed point: exact where the field is invertible, honest where it folds."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import oblique_affine
from DEQRegistrationLib.geometry import voxel_to_physical_points
from DEQRegistrationLib.inverse import MASK_OUTSIDE, MASK_RELIABLE, MASK_UNRELIABLE, invert, invert_points
from DEQRegistrationLib.sampling import Sampler

SHAPE = (20, 22, 18)


def _smooth_field(shape=SHAPE, amp=1.5):
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return np.stack([amp * np.sin(0.25 * g[1] + 0.3) + 0.5, amp * np.cos(0.2 * g[2]) - 0.4,
                     amp * np.sin(0.22 * g[0]) * 0.8]).astype(np.float32)


@pytest.mark.parametrize("world", [None, "rotation"])
def test_forward_of_the_inverse_is_the_identity_at_target_voxels(world):
    """On another oblique grid (and with a world transform W), forward(inverse(y)) = y for every target
    voxel whose pre-image is inside the fixed grid; forward is the Sampler's own point mapping."""
    Af = oblique_affine()
    At = oblique_affine((1.1, 1.0, 1.7), (0.25, -0.15, 0.45), (-19.0, 14.0, 9.0))
    W = None
    if world:
        c, s = np.cos(0.1), np.sin(0.1)
        W = np.array([[c, 0, s, 1.0], [0, 1, 0, -0.5], [-s, 0, c, 0.7], [0, 0, 0, 1.0]])
    u = _smooth_field()
    res = invert(u, Af, (18, 20, 16), At, world=W, method="anderson", max_steps=40, tol=1e-6)
    assert res.residual < 1e-4
    inside = res.mask == MASK_RELIABLE
    assert inside.mean() > 0.4 and (res.mask == MASK_OUTSIDE).any()
    m = np.argwhere(inside).astype(np.float64)
    # the inverse as stored: target voxel m -> fixed voxel (through W^-1 and the target-grid field)
    pre = Sampler((18, 20, 16), At, Af, world=None if W is None else np.linalg.inv(W)).points(m, res.displacement)
    y = voxel_to_physical_points(Sampler(SHAPE, Af, At, world=W).points(pre, u), At)
    np.testing.assert_allclose(y, voxel_to_physical_points(m, At), atol=1e-3)
    assert res.error_mm[inside].max() < 1e-3


def test_points_inverse_agrees_with_the_grid_inverse_at_voxels():
    A = oblique_affine()
    u = _smooth_field()
    res = invert(u, A, SHAPE, A)
    m = np.array([[5.0, 6.0, 7.0], [10.0, 3.0, 12.0], [14.0, 15.0, 4.0]])
    y = voxel_to_physical_points(m, A)
    x, info = invert_points(u, A, y)
    grid = voxel_to_physical_points(Sampler(SHAPE, A, A).points(m, res.displacement), A)
    np.testing.assert_allclose(x, grid, atol=1e-3)
    assert info["mask"].tolist() == [MASK_RELIABLE] * 3


def test_folding_is_reported_and_masked():
    """A field that folds: the inverse says so and marks the voxels around the fold unreliable."""
    shape = (20, 20, 20)
    g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    u = np.zeros((3,) + shape, np.float32)
    r2 = (g[0] - 10) ** 2 + (g[1] - 10) ** 2 + (g[2] - 10) ** 2
    u[0] = -3.6 * np.exp(-r2 / 8.0) * (g[0] - 10)   # d(u0)/d(i) = -3.6 at the centre: det J < 0 there
    aff = np.eye(4)
    res = invert(u, aff, shape, aff)
    assert res.forward_folded_percent > 0
    assert "folds" in res.message() and "unreliable" in res.message()
    bad = res.mask == MASK_UNRELIABLE
    assert bad.any() and not bad[:5].any() and not bad[15:].any()  # around the fold only
    reliable = res.mask == MASK_RELIABLE
    assert res.error_mm[reliable].max() <= 0.05
    assert (res.mask == MASK_OUTSIDE).sum() == 0
    s = res.summary()
    assert s["unreliable_percent"] == pytest.approx(bad.mean() * 100) and s["residual"] == res.residual
