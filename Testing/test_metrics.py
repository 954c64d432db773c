"""Metrics against hand-computed cases and analytic fields."""
import numpy as np
import pytest

from DEQRegistrationLib import metrics
from DEQRegistrationLib.errors import InputError


def test_jacobian_of_uniform_scaling_3d():
    shape = (10, 11, 12)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    s = 1.3 ** (1 / 3) - 1  # x -> (1+s) x has det (1+s)^3 = 1.3
    jac = metrics.jacobian_determinant(s * grid)
    np.testing.assert_allclose(jac, 1.3, rtol=1e-5)


def test_jacobian_of_affine_2d_field_with_shear():
    shape = (9, 8)
    x = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    a, b, c, d = 0.2, 0.5, -0.3, 0.1
    u = np.stack([a * x[0] + b * x[1], c * x[0] + d * x[1]])
    np.testing.assert_allclose(metrics.jacobian_determinant(u), (1 + a) * (1 + d) - b * c, rtol=1e-5)


def test_jacobian_of_nonlinear_field_3d():
    shape = (20, 20, 20)
    x = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
    # u = (0.01 x0^2, 0, 0): det = 1 + 0.02 x0 (central differences are exact on quadratics)
    u = np.zeros_like(x)
    u[0] = 0.01 * x[0] ** 2
    jac = metrics.jacobian_determinant(u)
    np.testing.assert_allclose(jac[1:-1], (1 + 0.02 * x[0])[1:-1], rtol=1e-5)


def test_folding_and_std_log_jacobian():
    jac = np.ones((10, 10, 10), dtype=np.float32)
    jac[0, 0, :5] = -0.5  # 5 folded voxels of 1000
    jac[0, 1, 0] = 0.0    # det 0 counts as folded
    assert metrics.folding_percent(jac) == pytest.approx(0.6)
    assert metrics.std_log_jacobian(np.ones((8, 8, 8))) == 0.0
    j = np.ones((12, 12, 12))
    j[2:10, 2:10, 2:6] = np.e  # half of the 8^3 interior has log J = 1
    assert metrics.std_log_jacobian(j) == pytest.approx(0.5)
    assert metrics.std_log_jacobian_l2r(j) < metrics.std_log_jacobian(j)


def test_dice_hand_computed():
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[0, :] = 1       # 4 voxels
    b[0, :2] = 1      # 2 voxels, 2 shared -> 2*2/6
    a[2, 2] = 3
    b[2, 2] = 3       # perfect
    b[3, 3] = 7       # only in b: not counted
    d = metrics.dice_per_label(a, b)
    assert set(d) == {1, 3}
    assert d[1] == pytest.approx(4 / 6)
    assert d[3] == 1.0
    assert metrics.mean_dice(a, b) == pytest.approx((4 / 6 + 1) / 2)


def test_dice_rejects_non_integer_labels():
    with pytest.raises(InputError, match="non-integer"):
        metrics.dice_per_label(np.array([0.5, 1.0]), np.array([1, 1]))


def test_hd95_hand_computed_with_spacing():
    a = np.zeros((20, 20), int)
    b = np.zeros((20, 20), int)
    a[5:10, 5:10] = 1
    b[5:10, 7:12] = 1  # shifted 2 voxels along axis 1
    # every surface voxel of one square is at most 2 voxels from the other's surface
    assert metrics.hd95(a, b, spacing=(1.0, 1.0)) == pytest.approx(2.0)
    assert metrics.hd95(a, b, spacing=(1.0, 3.0)) == pytest.approx(6.0)
    assert metrics.hd95(a, a, spacing=(1.0, 1.0)) == 0.0


def test_tre_identity_and_translation_in_mm():
    disp = np.zeros((3, 10, 10, 10), np.float32)
    disp[0] = 1.0
    A = np.diag([2.0, 1.0, 1.0, 1.0])
    fixed_pts = np.array([[2.0, 3.0, 4.0], [5.0, 5.0, 5.0]])
    moving_pts = fixed_pts + [1.0, 0, 0]
    np.testing.assert_allclose(metrics.target_registration_error(fixed_pts, moving_pts, disp, A, A), 0, atol=1e-9)
    np.testing.assert_allclose(metrics.target_registration_error(fixed_pts, moving_pts, 0 * disp, A, A), 2.0)
