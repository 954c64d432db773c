"""register() end to end on synthetic images with known answers."""
import numpy as np
import pytest

from DEQRegistrationLib import Image, InputError, register
from DEQRegistrationLib.geometry import voxel_field_to_physical, voxel_to_physical_points

from conftest import oblique_affine


def blobs(points_ras, centres, widths):
    """A smooth intensity pattern of physical position (sum of Gaussian blobs)."""
    out = np.zeros(points_ras.shape[:-1])
    for c, w in zip(centres, widths):
        out += np.exp(-((points_ras - c) ** 2).sum(-1) / (2 * w * w))
    return out.astype(np.float32)


def render(shape, affine, shift_mm=(0, 0, 0), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-14, 14, size=(90, 3))
    widths = rng.uniform(1.5, 3.0, size=90)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    ras = voxel_to_physical_points(idx, affine).reshape(*shape, 3)
    return blobs(ras - np.asarray(shift_mm), centres, widths)


def centred(affine, shape):
    """Shift an affine so the grid's centre sits at RAS (0, 0, 0)."""
    a = affine.copy()
    centre = voxel_to_physical_points(np.array([[(n - 1) / 2 for n in shape]]), a)[0]
    a[:3, 3] -= centre
    return a


def test_known_translation_recovered_in_mm_on_oblique_anisotropic_grids():
    """Moving content is fixed content shifted by t mm, on a different oblique grid.

    The fixed point x maps to x + t in the moving space, so the physical
    displacement must be t everywhere the pattern constrains it.
    """
    fshape, mshape = (26, 22, 18), (24, 24, 20)
    Af = centred(oblique_affine((1.2, 1.0, 1.5), (0.3, -0.2, 0.5), (0, 0, 0)), fshape)
    Am = centred(oblique_affine((1.0, 1.3, 1.4), (-0.1, 0.25, 0.2), (0, 0, 0)), mshape)
    t = np.array([1.5, -1.0, 1.2])
    fixed = Image(render(fshape, Af), Af)
    moving = Image(render(mshape, Am, shift_mm=t), Am)
    res = register(fixed, moving, update="gradient", max_steps=150, device="cpu", pyramid=(2, 1))
    d = voxel_field_to_physical(res.total_displacement(), Af)  # the alignment, then the deformation
    core = d[6:-6, 6:-6, 5:-5].reshape(-1, 3)
    np.testing.assert_allclose(np.median(core, axis=0), t, atol=0.3)
    # the result is the moving image resampled at the mapped points: it matches fixed
    err_before = np.abs(Image(render(fshape, Af, shift_mm=t), Af).data - fixed.data)[6:-6, 6:-6, 5:-5].mean()
    err_after = np.abs(res.warped.data - fixed.data)[6:-6, 6:-6, 5:-5].mean()
    assert err_after < 0.35 * err_before
    # LPS is RAS with the first two components flipped
    np.testing.assert_allclose(res.displacement_mm(lps=True)[..., :2], -res.displacement_mm()[..., :2])


def textured(shape, seed=0):
    """Smooth random texture in [0, 1]: structure everywhere, as LNCC needs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1, *[n // 4 for n in shape], generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(small, size=shape, mode=mode, align_corners=True)[0, 0].numpy()


def test_2d_registration_recovers_a_known_smooth_deformation():
    import torch
    from DEQRegistrationLib.transforms import identity_grid, warp

    shape = (64, 56)
    fixed = textured(shape)
    g = identity_grid(shape, dtype=torch.float32)
    true = torch.cat([2.0 * torch.sin(g[:, 1:] / 9.0), 1.5 * torch.cos(g[:, :1] / 11.0)], 1)
    # moving(x + true(x)) == fixed(x): build moving by sampling fixed at the inverse map (approximately x - true)
    moving = warp(torch.as_tensor(fixed)[None, None], -true)[0, 0].numpy()
    res = register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), max_steps=90, device="cpu", init="none")
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(res.warped.data - fixed)[inner].mean() < 0.35 * np.abs(moving - fixed)[inner].mean()
    err = np.linalg.norm(res.displacement - true[0].numpy(), axis=0)[inner]
    assert np.median(err) < 0.5  # voxels, for displacements of up to 2.5
    assert res.displacement.shape == (2, *shape)
    assert res.jacobian.shape == shape and (res.jacobian > 0).all()
    assert len(res.trace) == res.steps
    assert [r["step"] for r in res.trace] == list(range(1, res.steps + 1))


def test_callback_cancel_keeps_last_state_as_result():
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    f = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 40.0).astype(np.float32)
    m = np.exp(-((yy - 18) ** 2 + (xx - 15) ** 2) / 40.0).astype(np.float32)
    seen = []

    def cb(p):
        seen.append((p.step, p.displacement(), p.warped()))
        return p.step == 7

    res = register(Image(f, np.eye(4)), Image(m, np.eye(4)), max_steps=100, tol=0, callback=cb, device="cpu",
                   init="none")  # the deformable stage's steps alone (test_alignment: cancel during alignment)
    assert res.cancelled and res.steps == 7 and not res.converged
    assert [s for s, _, _ in seen] == list(range(1, 8))
    np.testing.assert_allclose(res.displacement, seen[-1][1], atol=1e-6)
    np.testing.assert_allclose(res.warped.data, seen[-1][2], atol=1e-6)


def test_labels_are_warped_with_nearest_neighbour():
    shape = (24, 24)
    f = np.zeros(shape, np.float32)
    f[6:18, 6:18] = 1
    m = np.zeros(shape, np.float32)
    m[7:19, 5:17] = 1
    labels = (m > 0).astype(np.uint8) * 7
    res = register(Image(f + 0.01 * np.random.rand(*shape).astype(np.float32), np.eye(4)),
                   Image(m, np.eye(4)), moving_labels=labels, max_steps=30, device="cpu")
    assert res.warped_labels.dtype == np.uint8
    assert set(np.unique(res.warped_labels)) <= {0, 7}
    np.testing.assert_array_equal(res.warp(labels, order=0), res.warped_labels)
    # intensities through the same mapping: the result's own warped image
    np.testing.assert_allclose(res.warp(m), res.warped.data, atol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: (Image(np.zeros((8, 8, 8)), np.eye(4)), Image(np.random.rand(8, 8, 8), np.eye(4))), "constant"),
    (lambda: (Image(np.random.rand(8, 8), np.eye(4)), Image(np.random.rand(8, 8, 8), np.eye(4))), "2D .* but moving"),
    (lambda: (Image(np.full((8, 8), np.nan), np.eye(4)), Image(np.random.rand(8, 8), np.eye(4))), "NaN"),
    (lambda: (Image(np.random.rand(4, 4, 4, 2), np.eye(4)), Image(np.random.rand(4, 4, 4, 2), np.eye(4))), "4 dimensions"),
])
def test_bad_inputs_raise_input_error(make, match):
    fixed, moving = make()
    with pytest.raises(InputError, match=match):
        register(fixed, moving, device="cpu")


def test_bad_options_raise_input_error():
    img = Image(np.random.rand(8, 8).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match="unknown update 'magic'"):
        register(img, img, update="magic")
    with pytest.raises(InputError, match="max_steps"):
        register(img, img, max_steps=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lamda=0.1), r"unknown setting\(s\) 'lamda'; valid settings: .*diffusion_weight"),
    (dict(factors=(2, 1)), r"unknown setting\(s\) 'factors'.*pyramid"),
    (dict(update="learned", model="default", diffusion_weight=0.1), "diffusion_weight set the gradient update"),
    (dict(model="some.pt"), "gradient update has no weights"),
    (dict(pyramid=(1, 2)), "coarse to fine"),
    (dict(pyramid=(2, 1), level_weights=(1,)), "level_weights has 1 entries"),
    (dict(window=4), "odd"),
    (dict(solver="newton"), "unknown solver"),
])
def test_unknown_or_inconsistent_settings_are_refused_by_name(kwargs, match):
    """Nothing is silently ignored: a typo or a setting the mode cannot use raises, naming it."""
    img = Image(np.random.rand(8, 8).astype(np.float32), np.eye(4))
    with pytest.raises(InputError, match=match):
        register(img, img, device="cpu", **kwargs)


def test_max_steps_below_the_number_of_levels_runs_exactly_that_many():
    img = Image(textured((48, 48)), np.eye(4))
    seen = []
    # the deformable stage's plan alone (init none: no alignment steps before it)
    res = register(img, Image(np.roll(img.data, 1, 0), np.eye(4)), max_steps=1, tol=0, pyramid=(4, 2, 1),
                   device="cpu", init="none", callback=lambda p: seen.append((p.step, p.max_steps, p.n_levels)))
    assert res.steps == 1 and seen == [(1, 1, 1)]
    assert res.plan.max_steps == 1 and [lv.factor for lv in res.plan.levels] == [4]
    assert res.displacement.shape == (2, 48, 48)


def test_cpu_fallback_reruns_on_the_cpu_and_tells_the_caller(monkeypatch):
    """A CUDA out-of-memory error (simulated: no GPU here) reruns the whole registration on the CPU."""
    import torch
    from DEQRegistrationLib import registration

    img = Image(textured((32, 32)), np.eye(4))
    devices, told = [], []
    real = registration._Registration.run

    def run(self):
        devices.append(self.device.type)
        if self.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self)

    # _Registration runs its operator on the device it is given; give it "cuda" for the first attempt
    monkeypatch.setattr(registration, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(registration._Registration, "run", run)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    to_tensor = registration.to_tensor
    monkeypatch.setattr(registration, "to_tensor", lambda data, device, dtype=torch.float32: to_tensor(data, "cpu", dtype))
    with pytest.warns(UserWarning, match="out of memory"):
        res = register(img, Image(np.roll(img.data, 1, 0), np.eye(4)), max_steps=3, on_fallback=told.append)
    deformable = [row for row in res.trace if row["stage"] == "deformable"]
    assert devices == ["cuda", "cpu"] and res.device == "cpu" and len(deformable) == 3
    assert told == ["GPU out of memory; registering on the CPU instead"]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        register(img, img, max_steps=3, cpu_fallback=False)
    assert devices[-1] == "cuda"

