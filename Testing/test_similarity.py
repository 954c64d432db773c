"""The similarity module: analytic derivatives against autograd, identity as a fixed point, masks.

Everything here runs on tiny tensors in float64, in well under a second each.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from DEQRegistrationLib import config, losses, similarity as S
from DEQRegistrationLib.operators import GradientUpdate, gaussian_smooth
from DEQRegistrationLib.transforms import downsample_image

SIMS = ["lncc", "mse", "mind"]


def smooth_image(shape, seed=0, cells=4, dtype=torch.float64):
    """Low-pass random intensities in [0, 1] with texture at a few voxels' scale."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1, *[cells] * len(shape), generator=g, dtype=dtype)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(small, size=shape, mode=mode, align_corners=True)


def wave_image(shape, phase, dtype=torch.float64):
    """A smooth (band-limited) pattern: products of sines with a 14-20 voxel period."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij")
    out = torch.ones(shape, dtype=dtype)
    for k, x in enumerate(axes):
        out = out * torch.sin(2 * torch.pi * x / (14 + 3 * k) + phase + k)
    return (0.5 + 0.4 * out)[None, None]


def smooth_field(shape, amplitude, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    small = amplitude * torch.randn(1, len(shape), *[3] * len(shape), generator=g, dtype=dtype)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(small, size=shape, mode=mode, align_corners=True)


SHAPES = {2: (19, 17), 3: (11, 12, 10)}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("window", [3, 5, 7])
def test_box_mean_is_border_normalised_pooling_and_its_adjoint(ndim, window):
    x = torch.rand(2, 3, *SHAPES[ndim], dtype=torch.float64)
    v = torch.rand_like(x)
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    ref = pool(x, window, 1, window // 2, count_include_pad=False)
    torch.testing.assert_close(S.box_mean(x, window), ref)
    # <M x, v> == <x, M^T v>
    lhs = (S.box_mean(x, window) * v).sum()
    rhs = (x * S.box_mean_adjoint(v, window)).sum()
    assert float(abs(lhs - rhs)) < 1e-10 * float(abs(lhs))


@pytest.mark.parametrize("name", SIMS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_derivative_wrt_warped_features_is_exact(name, ndim, weighted):
    """compare()'s closed-form derivative equals autograd of its own value."""
    sim = S.get_similarity(name)
    shape = SHAPES[ndim]
    fixed = smooth_image(shape, 0)
    moving = smooth_image(shape, 1)
    warped = sim.features(moving).clone().requires_grad_(True)
    weight = torch.rand(1, 1, *shape, dtype=torch.float64) if weighted else None
    value, _ = sim.compare(fixed, warped, weight, derivative=False)
    (auto,) = torch.autograd.grad(value.sum(), warped)
    value2, d = sim.compare(fixed, warped.detach(), weight)
    torch.testing.assert_close(d, auto, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(value2, value.detach())


@pytest.mark.parametrize("name", SIMS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_field_gradient_agrees_with_autograd_through_interpolation(name, ndim):
    """Analytic (sampled central differences) vs autograd through linear interpolation: close, not equal.

    They differ only in how the moving image's derivative between voxels is
    taken (central differences, linearly interpolated, vs the slope of each
    cell), so on a smooth image they agree closely; a wrong sign, axis order or
    scale would not.
    """
    sim = S.get_similarity(name)
    shape = (40, 36) if ndim == 2 else (22, 20, 21)
    fixed, moving = wave_image(shape, 0.0), wave_image(shape, 0.8)
    z = smooth_field(shape, 1.0)
    analytic = sim.gradient(z, fixed, moving)
    auto = sim.gradient(z, fixed, moving, create_graph=True)
    assert auto.grad_fn is not None  # a graph to train through
    inner = (slice(None), slice(None)) + (slice(4, -4),) * ndim  # samples inside the image
    a, b = analytic[inner], auto.detach()[inner]
    cosine = float((a * b).sum() / (a.norm() * b.norm()))
    # MIND descriptors vary at the voxel scale, so the two derivatives differ more there
    assert cosine > (0.6 if name == "mind" else 0.97), cosine
    assert 0.7 < float(a.norm() / b.norm()) < 1.3
    value, g = sim.value_and_gradient(z, fixed, moving)
    torch.testing.assert_close(value, sim.value(z, fixed, moving))
    torch.testing.assert_close(g, analytic)


@pytest.mark.parametrize("name", SIMS)
def test_the_channels_last_table_changes_no_number(name):
    """3D tables of moving features and their gradients are kept channels-last (grid_sample's 3D CPU kernel is ~30 %
    faster on MIND's 48 channels); the analytic gradient is bit for bit the one from a standard-layout table."""
    sim = S.get_similarity(name)
    shape = (22, 20, 21)
    fixed, moving, z = wave_image(shape, 0.0), wave_image(shape, 0.8), smooth_field(shape, 1.0)
    _, _, table = sim.prepare(fixed, moving)
    assert table.is_contiguous(memory_format=torch.channels_last_3d)
    fast = sim.gradient(z, fixed, moving)
    standard = table.contiguous()
    sim._cache = sim._cache[:3] + ((sim._cache[3][0], standard),)  # the same features, standard layout
    assert sim.prepare(fixed, moving)[2] is standard
    assert torch.equal(sim.gradient(z, fixed, moving), fast)


@pytest.mark.parametrize("name", SIMS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_is_a_stationary_point(name, ndim):
    """moving == fixed: the gradient at the zero field vanishes, for textured and smooth images."""
    sim = S.get_similarity(name)
    shape = SHAPES[ndim]
    for image in (smooth_image(shape, 3, cells=3), smooth_image(shape, 4, cells=6) ** 3):
        z = torch.zeros(1, ndim, *shape, dtype=torch.float64)
        g = sim.gradient(z, image, image.clone())
        # scale: the same gradient a quarter-voxel away from the identity
        g_off = sim.gradient(z + 0.25, image, image.clone())
        assert float(g_off.abs().max()) > 0
        assert float(g.abs().max()) < 1e-9 * max(1.0, float(g_off.abs().max()))


def test_the_usual_lncc_epsilon_is_not_stationary_at_identity():
    """Why LNCC is formulated as it is: cross^2 / (var_f var_w + eps) has a non-zero gradient at identity.

    (cc^2 grows when the field raises the warped variance in low-variance
    windows: that is the drift the old default showed on smooth images.)
    """
    shape = (12, 12, 12)
    image = 0.05 * smooth_image(shape, 5, cells=3)  # low local variance, as in smooth anatomy
    z = torch.zeros(1, 3, *shape, dtype=torch.float64, requires_grad=True)
    from DEQRegistrationLib.transforms import warp
    old = losses.lncc_loss(image, warp(image, z), 5, reduction="sum")
    (g_old,) = torch.autograd.grad(old, z)
    g_new = S.LNCC().gradient(z.detach(), image, image.clone())
    assert float(g_old.abs().max()) > 1e3 * max(float(g_new.abs().max()), 1e-12)


@pytest.mark.parametrize("name", SIMS)
def test_zero_weight_masks_voxels_out(name):
    """Changing the warped image where the weight is 0 (beyond the window) changes neither value nor gradient."""
    sim = S.get_similarity(name)
    shape = (14, 13, 12)
    fixed, moving = smooth_image(shape, 0), smooth_image(shape, 1)
    weight = torch.ones(1, 1, *shape, dtype=torch.float64)
    weight[:, :, :7] = 0
    warped = sim.features(moving)
    changed = warped.clone()
    changed[:, :, :3] = torch.rand_like(changed[:, :, :3])  # 4+ voxels from any weighted window centre
    v1, d1 = sim.compare(fixed, warped, weight)
    v2, d2 = sim.compare(fixed, changed, weight)
    torch.testing.assert_close(v1, v2)
    assert float(d1[:, :, :3].abs().max()) == 0.0
    # and without the weight the change does matter
    assert float(abs(sim.compare(fixed, warped)[0] - sim.compare(fixed, changed)[0])) > 1e-6


@pytest.mark.parametrize("ndim,channels", [(2, 4), (3, 12)])
def test_mind_ssc_descriptor(ndim, channels):
    image = smooth_image(SHAPES[ndim], 2, cells=5)
    mind = S.mind_ssc(image)
    assert mind.shape == (1, channels, *SHAPES[ndim])
    assert float(mind.min()) > 0 and float(mind.max()) <= 1.0 + 1e-12
    # contrast and offset do not change it (what makes it usable across modalities)
    torch.testing.assert_close(S.mind_ssc(3.0 * image + 7.0), mind)


@pytest.mark.parametrize("shape,factors,chunk", [((16, 12, 20), [4, 2], 12 * 20 * 4), ((24, 20), [1, 2, 4], 20 * 4)])
def test_mind_pooled_slab_by_slab_equals_the_whole_descriptor_pooled(shape, factors, chunk):
    """Large volumes get their MIND descriptors slab by slab (a halo of radius + dilation rows, the
    variance's image mean from a first pass): the numbers must be those of the whole volume."""
    image = smooth_image(shape, 3, cells=5) + 0.05 * torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(4),
                                                                  dtype=torch.float64)
    whole = S.mind_ssc_pooled(image, factors)
    by_slab = S.mind_ssc_pooled(image, factors, chunk_voxels=chunk)  # 4-row slabs: several per volume
    descriptor = S.mind_ssc(image)
    for f, w, b in zip(factors, whole, by_slab):
        assert w.shape == (1, S.mind_channels(len(shape)), *[n // f for n in shape])
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w, downsample_image(descriptor, f))


def test_a_coarse_mind_level_keeps_the_texture_a_pooled_image_loses():
    """Why MIND's levels come from the full-resolution image: two images whose 2x2 block means are equal
    (one carries a fine checkerboard) give the same pooled image, so a descriptor of the pooled image
    cannot tell them apart; the full-resolution descriptor, pooled, does. LNCC keeps the pooled image."""
    shape = (16, 16)
    base = smooth_image(shape, 5, cells=4)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    textured = base + 0.2 * ((-1.0) ** (i + j)).to(base.dtype)  # zero mean over every 2x2 block
    torch.testing.assert_close(downsample_image(textured, 2), downsample_image(base, 2))
    lncc, mind = GradientUpdate(similarity="lncc"), GradientUpdate(similarity="mind")
    torch.testing.assert_close(lncc.level_inputs(textured, [2])[0], lncc.level_inputs(base, [2])[0])
    a, b = mind.level_inputs(base, [2])[0], mind.level_inputs(textured, [2])[0]
    assert a.shape == (1, 4, 8, 8)
    assert float((a - b).abs().mean()) > 0.05
    # the operator then compares those descriptors as they are (not a descriptor of the descriptor)
    torch.testing.assert_close(mind.sim.features(a), a)


def test_mind_features_refuse_an_input_that_is_neither_image_nor_descriptor():
    with pytest.raises(ValueError, match="1 channel"):
        S.MINDSSC().features(torch.zeros(1, 3, 8, 8))


def test_mind_registers_an_inverted_contrast_where_mse_cannot():
    """A multi-modal toy: moving has inverted intensities. MIND's gradient points the same way as
    for the same-contrast pair; MSE's does not."""
    shape = (24, 24)
    fixed = smooth_image(shape, 7, cells=5)
    z_true = torch.zeros(1, 2, *shape, dtype=torch.float64)
    z_true[:, 0] = 1.0  # moving = fixed shifted by one voxel along axis 0
    from DEQRegistrationLib.transforms import warp
    moving = warp(fixed, -z_true)
    inverted = 1.0 - moving
    z = torch.zeros_like(z_true)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    for name, expect_same in (("mind", True), ("mse", False)):
        sim = S.get_similarity(name)
        g_same = sim.gradient(z, fixed, moving)[inner]
        g_inv = sim.gradient(z, fixed, inverted)[inner]
        cos = float((g_same * g_inv).sum() / (g_same.norm() * g_inv.norm()))
        assert (cos > 0.5) if expect_same else (cos < 0), (name, cos)


def test_diffusion_gradient_is_the_autograd_gradient():
    for shape in [(1, 3, 5, 6, 7), (2, 2, 6, 5)]:
        z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(losses.diffusion_loss(z, "sum"), z)
        torch.testing.assert_close(losses.diffusion_gradient(z.detach()), g)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.5])
def test_gaussian_smooth_matches_a_grouped_convolution(sigma):
    import math

    x = torch.rand(2, 3, 9, 10, 11, dtype=torch.float64)
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    ref = x
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(3, 1, 1, 1, 1)
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        ref = F.conv3d(F.pad(ref, pad, mode="replicate"), weight, groups=3)
    torch.testing.assert_close(gaussian_smooth(x, sigma), ref)


def test_gradient_operator_accepts_every_similarity_and_a_weight():
    shape = (12, 12, 12)
    fixed, moving = smooth_image(shape, 0, dtype=torch.float32), smooth_image(shape, 1, dtype=torch.float32)
    z = torch.zeros(1, 3, *shape)
    for name in SIMS:
        op = GradientUpdate(similarity=name)
        assert op.similarity == name
        out = op(z, fixed, moving)
        assert out.shape == z.shape and torch.isfinite(out).all() and out.abs().max() > 0
        # a zero weight everywhere leaves only the (zero) diffusion term at z = 0
        assert float(op(z, fixed, moving, weight=torch.zeros(1, 1, *shape)).abs().max()) == 0.0


def test_settings_offer_exactly_the_similarities_the_module_has():
    assert set(config.SIMILARITIES) == set(S.SIMILARITIES)
    with pytest.raises(ValueError, match="unknown similarity"):
        S.get_similarity("ncc2")


def test_mind_diffusion_weight_follows_the_dimension_unless_given():
    """3D: ConvexAdam's weight in this energy's scale (0.035); 2D slices: 0.1 (chosen on 2D subjects 1-6)."""
    from DEQRegistrationLib.registration import make_operator
    mind = config.make_settings(similarity="mind")
    assert make_operator(mind, 3)[0].diffusion_weight == pytest.approx(0.035)
    assert make_operator(mind, 2)[0].diffusion_weight == pytest.approx(0.1)
    given = config.make_settings(similarity="mind", diffusion_weight=0.2)
    assert make_operator(given, 3)[0].diffusion_weight == pytest.approx(0.2)
    lncc = config.make_settings()
    assert make_operator(lncc, 3)[0].diffusion_weight == make_operator(lncc, 2)[0].diffusion_weight == 0.45


# --- the symmetric image gradient (MIND's default, opt-in for the others: Settings.image_gradient) -------------


def test_image_gradient_names_agree_with_the_config():
    assert set(config.IMAGE_GRADIENTS) == set(S.IMAGE_GRADIENTS)
    with pytest.raises(ValueError, match="gradient must be one of"):
        S.LNCC(gradient="fixed")


@pytest.mark.parametrize("name", ["lncc", "mse", "mind"])
def test_symmetric_gradient_is_the_mean_of_moving_and_fixed_inside_and_zero_at_a_match(name):
    """ESM: 0.5 (grad m(x + u) + grad f(x)) times the loss derivative; where x + u leaves the moving grid only the
    moving half (0 there) counts; at a perfect match the gradient is exactly zero, as with the exact gradient."""
    shape = (12, 14, 10)
    fixed, moving = smooth_image(shape, 1), smooth_image(shape, 2)
    z = 0.8 * smooth_image(shape, 3).expand(1, 3, *shape).clone()
    z[:, 0, :3] -= 6.0  # the first rows sample outside the moving grid
    kwargs = dict(window=5) if name == "lncc" else {}
    moving_sim = S.get_similarity(name, gradient="moving", **kwargs)
    sym = S.get_similarity(name, gradient="symmetric", **kwargs)
    g_moving = moving_sim.gradient(z, fixed, moving)
    g_sym = sym.gradient(z, fixed, moving)
    # the fixed half, computed by hand: the loss derivative times the fixed features' gradient
    state, C, table = sym.prepare(fixed, moving)
    coords = S._coords(z)
    warped = S.sample(table, coords, padding_mode="border")[:, :C]
    _, dw = sym._loss(state, warped, None, derivative=True)
    g_fixed = (dw.unsqueeze(2) * S.spatial_gradient(sym.features(fixed)).unflatten(1, (C, 3))).sum(1)
    inside = S.inside(coords, shape)
    assert 0 < float(inside.mean()) < 1
    torch.testing.assert_close(g_sym, 0.5 * (g_moving + inside * g_fixed))
    assert float((g_sym - g_moving).abs().max()) > 1e-6  # it is a different direction
    zero = torch.zeros(1, 3, *shape, dtype=fixed.dtype)
    assert float(sym.gradient(zero, fixed, fixed.clone()).abs().max()) < 1e-12


def test_register_with_the_symmetric_gradient_recovers_a_shift_and_converges():
    import numpy as np
    from DEQRegistrationLib import register
    from DEQRegistrationLib.errors import InputError
    from DEQRegistrationLib.image import Image

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (40, 44)], indexing="ij"))

    def blobs(shift):
        out = np.zeros((40, 44), np.float32)
        for c, r in (((14, 15), 6), ((26, 28), 7), ((12, 30), 4)):
            out += np.exp(-(((grid[0] - c[0] - shift[0]) ** 2 + (grid[1] - c[1] - shift[1]) ** 2) / (2 * r * r / 4)))
        return out

    fixed, moving = Image(blobs((0, 0)), np.eye(4)), Image(blobs((1.5, -1.0)), np.eye(4))
    r = register(fixed, moving, image_gradient="symmetric", init="none", device="cpu")
    assert r.converged and r.settings.image_gradient == "symmetric"
    inner = (slice(10, 30), slice(12, 34))
    np.testing.assert_allclose([float(np.median(r.displacement[0][inner])), float(np.median(r.displacement[1][inner]))],
                               [1.5, -1.0], atol=0.25)
    with pytest.raises(InputError, match="image_gradient"):
        register(fixed, moving, image_gradient="sideways", device="cpu")


def test_the_image_gradient_follows_the_similarity_unless_given():
    """None: MIND-SSC steps with the symmetric gradient (config.SIMILARITY_DEFAULTS), LNCC and MSE with the exact
    one; a given value wins; the operator register() builds uses the resolved one."""
    from DEQRegistrationLib.config import make_settings
    from DEQRegistrationLib.registration import make_operator

    assert make_settings(None).similarity_image_gradient == "moving"
    assert make_settings(None, similarity="mse").similarity_image_gradient == "moving"
    assert make_settings(None, similarity="mind").similarity_image_gradient == "symmetric"
    assert make_settings(None, preset="multimodal").similarity_image_gradient == "symmetric"
    assert make_settings(None, similarity="mind", image_gradient="moving").similarity_image_gradient == "moving"
    for settings, source in ((make_settings(None, similarity="mind"), "symmetric"),
                             (make_settings(None, similarity="mind", image_gradient="moving"), "moving"),
                             (make_settings(None), "moving")):
        op, _ = make_operator(settings, 3)
        assert op.sim.gradient_source == source
