"""Convergence that means something: the default gradient mode reaches its tolerance inside its
budget on real anatomy, the residual is well defined at a zero solution, and a level that
converges early hands its unused steps to the next one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DEQRegistrationLib import Image, metrics, register
from DEQRegistrationLib.operators import UpdateOperator
from DEQRegistrationLib.solvers import RESIDUAL_FLOOR, relative_residual


def test_default_gradient_mode_converges_on_a_real_crop(shared_data):
    """OASIS 1 vs 2, a 48^3 crop at 1 mm (deep grey and white matter, 30+ labels): converged, better Dice."""
    nib = pytest.importorskip("nibabel")
    d = shared_data / "oasis3d"
    if not d.is_dir():
        pytest.skip(f"{d} is absent")
    crop = (slice(40, 88), slice(72, 120), slice(88, 136))

    def load(name):
        img = nib.load(str(d / name))
        return np.asarray(img.dataobj)[crop], img.affine

    f, aff = load("OAS1_0001_norm.nii.gz")
    m, _ = load("OAS1_0002_norm.nii.gz")
    fs, _ = load("OAS1_0001_seg35.nii.gz")
    ms, _ = load("OAS1_0002_seg35.nii.gz")
    # the deformable solver alone: the alignment stage on an interior crop is a known weakness (README, Honest limits)
    res = register(Image(f, aff), Image(m, aff), moving_labels=ms, device="cpu", init="none")
    assert res.converged, f"residual {res.final_residual:.2e} after {res.steps} of {res.plan.max_steps} steps"
    assert res.final_residual < res.plan.tol
    labels = metrics.common_labels(fs, ms)
    before, after = metrics.mean_dice(fs, ms, labels), metrics.mean_dice(fs, res.warped_labels, labels)
    assert after > before + 0.15, (before, after)
    assert metrics.folding_percent(res.jacobian) < 0.5


def test_residual_is_relative_with_an_absolute_floor():
    z = torch.zeros(2, 3, 4, 4, 4)
    fz = torch.ones_like(z)
    fz[1] *= 2.0
    assert relative_residual(fz, z) == pytest.approx(1.0)  # ||f(z) - z|| / ||f(z)|| per item, max
    fz[1] = 2.0 + 0.01
    z[1] = 2.0
    assert relative_residual(fz[1:], z[1:]) == pytest.approx(0.01 / 2.01, rel=1e-5)
    # at a zero solution, rounding noise is measured against an RMS field of RESIDUAL_FLOOR voxel
    noise = torch.full((1, 3, 4, 4, 4), 1e-8)
    assert relative_residual(noise, torch.zeros_like(noise)) == pytest.approx(1e-8 / RESIDUAL_FLOOR, rel=1e-5)


class _Contraction(UpdateOperator):
    """z -> target + rate (z - target): converges geometrically; slower on the fine grid."""

    update = "learned"

    def forward(self, z, fixed, moving):
        rate = 0.3 if z.shape[-1] < 16 else 0.75
        return 1.0 + rate * (z - 1.0)


def test_a_level_that_converges_early_passes_its_steps_on():
    f = Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), np.eye(4))
    res = register(f, Image(f.data.copy(), f.affine), update="learned", model=_Contraction(), pyramid=[2, 1],
                   max_steps=40, tol=1e-3, solver="fixed-point", device="cpu")
    per_level = [sum(1 for t in res.trace if t["stage"] == "deformable" and t["level"] == i) for i in (0, 1)]
    assert [lv.steps for lv in res.plan.levels] == [20, 20]
    assert per_level[0] < 20 and per_level[1] > 20, per_level  # the fine level used the coarse one's spare steps
    assert res.converged and res.steps - res.alignment.steps <= 40  # the budget is the deformable stage's


@pytest.mark.parametrize("step_size, two_cycle", [(None, False), (1.0, True)])
def test_default_lncc_step_is_a_contraction_where_step_1_two_cycles(step_size, two_cycle):
    """Plain fixed-point iteration of the gradient operator on the demo brain pair's full-resolution level.

    At the old step 1 the map 2-cycles where LNCC's curvature is high (consecutive residuals point opposite
    ways and voxels jump by about a voxel per step: Anderson then stalls); the default step (0.5) makes it
    a contraction there: the residuals keep one direction and shrink.
    """
    pytest.importorskip("nilearn", reason="the demo pair needs nilearn (pip install 'deqreg[demo]')")
    from DEQRegistrationLib.config import make_settings
    from DEQRegistrationLib.demo_data import make_demo_pair
    from DEQRegistrationLib.preprocess import normalize_intensity, to_tensor
    from DEQRegistrationLib.registration import make_operator

    pair = make_demo_pair()
    assert np.allclose(pair.fixed.affine, pair.moving.affine)
    fixed, moving = (normalize_intensity(to_tensor(im.data.astype(np.float32), "cpu")) for im in (pair.fixed, pair.moving))
    settings = make_settings(None, **({} if step_size is None else dict(step_size=step_size)))
    op, _ = make_operator(settings, 3)
    z = torch.zeros(1, 3, *fixed.shape[2:])
    with torch.no_grad():
        for _ in range(29):
            z = op(z, fixed, moving)
        g1 = op(z, fixed, moving) - z
        z = z + g1
        g2 = op(z, fixed, moving) - z
    cosine = float((g1 * g2).sum() / (g1.norm() * g2.norm()))
    largest = float(g2.norm(dim=1).max())  # voxels moved by the last step
    if two_cycle:
        assert cosine < -0.5 and largest > 0.5, (cosine, largest)
    else:
        assert cosine > 0.99 and largest < 0.1, (cosine, largest)
        assert float(g2.norm()) < float(g1.norm())
