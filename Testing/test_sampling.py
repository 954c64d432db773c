"""The Sampler: the one mapping from fixed voxels to moving data, checked against physical space."""
import numpy as np
import pytest
import torch

from conftest import oblique_affine
from DEQRegistrationLib.image import Image
from DEQRegistrationLib.sampling import Sampler


def _linear_image(shape, affine, coef=(0.7, -0.3, 0.5)):
    """Intensity = a linear function of the RAS position: linear interpolation reproduces it exactly."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    vox = np.stack(list(grids) + [np.zeros_like(grids[0])] * (3 - len(shape)) + [np.ones_like(grids[0])])
    ras = np.einsum("rc,c...->r...", affine, vox)[:3]
    return np.einsum("r,r...->...", np.asarray(coef), ras), lambda p: np.asarray(coef) @ p


def test_coords_map_fixed_voxels_to_the_same_physical_point():
    Af = oblique_affine()
    Am = oblique_affine((0.9, 1.1, 1.3), (0.1, 0.2, -0.4), (3, 4, 5))
    s = Sampler((6, 7, 8), Af, Am)
    q = s.coords(dtype=torch.float64)[0].numpy()          # (3, 6, 7, 8) moving voxel coordinates
    p = np.array([3, 1, 2])
    np.testing.assert_allclose((Am @ np.r_[q[:, 3, 1, 2], 1])[:3], (Af @ np.r_[p, 1])[:3], atol=1e-9)


def test_field_and_world_transform_enter_in_the_documented_order():
    """q = M^-1 W F (p + u): the field is in fixed voxels, W acts in world space."""
    Af, Am = oblique_affine(), oblique_affine((1.0, 1.0, 1.5), (0.0, 0.1, 0.0), (1, 2, 3))
    W = np.eye(4)
    W[:3, 3] = (4.0, -2.0, 1.0)
    W[:3, :3] = np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]])
    u = np.random.default_rng(0).normal(size=(3, 5, 6, 7))
    s = Sampler((5, 6, 7), Af, Am, world=W)
    q = s.coords(torch.as_tensor(u)[None])[0].numpy()
    p = np.array([2, 4, 5])
    expected = np.linalg.inv(Am) @ W @ Af @ np.r_[p + u[:, 2, 4, 5], 1]
    np.testing.assert_allclose(q[:, 2, 4, 5], expected[:3], atol=1e-9)


def test_resampling_a_linear_ramp_is_exact_inside_the_moving_grid():
    Af, Am = oblique_affine(), oblique_affine((0.8, 0.8, 1.0), (0.05, 0.0, -0.1), (-19.0, 16.0, 8.0))
    moving, f = _linear_image((30, 32, 28), Am)
    s = Sampler((10, 11, 9), Af, Am)
    out = s.image(moving)
    q = s.coords(dtype=torch.float64)[0].numpy()
    inside = np.all([(q[a] >= 0) & (q[a] <= n - 1) for a, n in enumerate(moving.shape)], axis=0)
    assert inside.mean() > 0.3 and (~inside).any(), "the test grids must overlap in part"
    expected, _ = _linear_image((10, 11, 9), Af)
    np.testing.assert_allclose(out[inside], expected[inside], atol=2e-3)
    far = np.any([(q[a] < -1) | (q[a] > n) for a, n in enumerate(moving.shape)], axis=0)
    assert far.any() and np.all(out[far] == 0)  # beyond a voxel outside: zero padding


def test_labels_keep_values_and_dtype_and_big_labels_survive():
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array([0, 3, 2035, 40_000_123], dtype=np.int64), size=(9, 10, 11))
    s = Sampler((9, 10, 11), np.eye(4), np.eye(4))
    out = s.labels(labels, 0.3 * rng.normal(size=(3, 9, 10, 11)))
    assert out.dtype == labels.dtype
    assert set(np.unique(out)) <= set(np.unique(labels))
    np.testing.assert_array_equal(s.labels(labels), labels)


@pytest.mark.parametrize("shape", [(13, 9, 7), (21, 17)])
def test_chunked_resampling_equals_one_pass(shape):
    rng = np.random.default_rng(3)
    nd = len(shape)
    A = oblique_affine()
    moving = rng.normal(size=shape).astype(np.float32)
    disp = rng.normal(size=(nd,) + shape).astype(np.float32)
    s = Sampler(shape, A, A)
    whole = s.image(moving, disp)
    np.testing.assert_array_equal(s.image(moving, disp, chunk_voxels=int(np.prod(shape[1:])) * 2), whole)
    np.testing.assert_array_equal(s.labels((moving > 0).astype(np.uint8), disp, chunk_voxels=1),
                                  s.labels((moving > 0).astype(np.uint8), disp))


def test_torch_in_torch_out_batched():
    s = Sampler((8, 9), np.eye(4), np.eye(4))
    data = torch.rand(2, 3, 8, 9)
    out = s.image(data, torch.zeros(2, 2, 8, 9))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 8, 9)
    assert torch.allclose(out, data, atol=1e-6)


def test_2d_images_in_one_plane():
    Af = np.eye(4)
    Af[:3, :3] = np.diag([1.2, 0.8, 3.0])
    Am = Af.copy()
    Am[:3, 3] = (2.4, 0.0, 0.0)   # the moving grid starts 2 voxels further along i
    moving = np.arange(10 * 12, dtype=np.float32).reshape(10, 12)
    out = Sampler.between(Image(np.zeros((10, 12)), Af), Image(moving, Am)).image(moving)
    np.testing.assert_allclose(out[2:], moving[:-2], atol=1e-4)
    assert np.abs(out[:2]).max() < 1e-5 * np.abs(moving).max()  # outside the moving grid: zero padding


def test_composed_displacement_samples_what_the_world_transform_and_field_sample():
    """One field holds W and u: Sampler(no W) with u_c gives the same moving coordinates as Sampler(W) with u."""
    Af, Am = oblique_affine(), oblique_affine((1.0, 1.2, 0.9), (0.2, -0.1, 0.3), (4, -3, 2))
    W = np.eye(4)
    W[:3, :3] = np.array([[np.cos(0.3), 0, np.sin(0.3)], [0, 1, 0], [-np.sin(0.3), 0, np.cos(0.3)]]) * 1.1
    W[:3, 3] = (7.0, -4.0, 2.5)
    u = torch.as_tensor(np.random.default_rng(1).normal(size=(1, 3, 6, 5, 7)))
    with_w = Sampler((6, 5, 7), Af, Am, world=W)
    composed = with_w.composed_displacement(u)
    plain = Sampler((6, 5, 7), Af, Am)
    np.testing.assert_allclose(plain.coords(composed).numpy(), with_w.coords(u).numpy(), atol=1e-9)
    # the linear part alone, as a field, and its differentiable twin used by the alignment stage
    np.testing.assert_allclose(plain.coords(with_w.composed_displacement(None, torch.float64)).numpy(),
                               with_w.coords(dtype=torch.float64).numpy(), atol=1e-9)
    np.testing.assert_allclose(with_w.coords_through(torch.as_tensor(W)).numpy(),
                               with_w.coords(dtype=torch.float64).numpy(), atol=1e-9)
    pts = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 6.0]], dtype=torch.float64)
    at = with_w.coords_through(torch.as_tensor(W), pts)[0, :, :, 0, 0].T.numpy()
    grid = with_w.coords(dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(at, [grid[:, 1, 2, 3], grid[:, 5, 0, 6]], atol=1e-9)


def test_bspline_order_3_is_cubic_and_follows_the_same_mapping():
    """Order 3 interpolates a smooth function far better than linear, through the same q(p) (a field too)."""
    Af, Am = oblique_affine(), oblique_affine((0.8, 0.8, 1.0), (0.05, 0.0, -0.1), (-19.0, 16.0, 8.0))
    shape = (30, 32, 28)
    g = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    ras = np.einsum("rc,c...->r...", Am, np.stack(list(g) + [np.ones_like(g[0])]))[:3]
    smooth = lambda x: np.sin(0.35 * x[0]) * np.cos(0.3 * x[1]) + 0.5 * np.sin(0.25 * x[2])  # noqa: E731
    moving = smooth(ras).astype(np.float32)
    u = 0.4 * np.random.default_rng(4).normal(size=(3, 10, 11, 9))
    s = Sampler((10, 11, 9), Af, Am)
    q = s.coords(torch.as_tensor(u)[None], dtype=torch.float64)[0].numpy()
    inside = np.all([(q[a] >= 2) & (q[a] <= n - 3) for a, n in enumerate(shape)], axis=0)
    assert inside.mean() > 0.2
    fg = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (10, 11, 9)], indexing="ij")
    pts = np.einsum("rc,c...->r...", Af, np.stack([fg[a] + u[a] for a in range(3)] + [np.ones_like(fg[0])]))[:3]
    truth = smooth(pts)
    err3 = np.abs(s.resample(moving, u, order=3) - truth)[inside]
    err1 = np.abs(s.resample(moving, u, order=1) - truth)[inside]
    assert err3.mean() < 0.2 * err1.mean() and err3.max() < 0.3 * err1.max()
    # Outside the moving grid: zero, as with linear interpolation.
    far = np.any([(q[a] < -2) | (q[a] > n + 1) for a, n in enumerate(shape)], axis=0)
    assert far.any() and np.all(s.resample(moving, u, order=3)[far] == 0)


def test_points_land_where_the_coordinates_say():
    """points() at voxel centres equals coords() there; between voxels the field is interpolated linearly."""
    Af, Am = oblique_affine(), oblique_affine((1.0, 1.0, 1.5), (0.0, 0.1, 0.0), (1, 2, 3))
    W = np.eye(4)
    W[:3, 3] = (1.0, -2.0, 0.5)
    u = np.random.default_rng(5).normal(size=(3, 5, 6, 7))
    s = Sampler((5, 6, 7), Af, Am, world=W)
    q = s.coords(torch.as_tensor(u)[None], dtype=torch.float64)[0].numpy()
    p = np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0]], dtype=np.float64)
    np.testing.assert_allclose(s.points(p, u), q[:, [1, 4, 0], [2, 5, 0], [3, 6, 0]].T, atol=1e-9)
    mid = np.array([[1.5, 2.0, 3.0]])
    halfway = 0.5 * (s.points(np.array([[1.0, 2, 3]]), u) + s.points(np.array([[2.0, 2, 3]]), u))
    np.testing.assert_allclose(s.points(mid, u), halfway, atol=1e-9)  # linear in the field, affine in p
