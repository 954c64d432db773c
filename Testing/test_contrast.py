"""A pair whose intensities no linear map relates gets one warning when LNCC or MSE is asked for.

``contrast.linear_share`` compares r^2 (a linear map) with eta^2 (the best curve); the
registration warns (``ContrastWarning``, ``RegistrationResult.warnings``, the CLI's
``deqreg: warning:`` line and metrics.json, Slicer's messages) and goes on. Synthetic
2D pairs with three tissue-like intensities, and, when the data is present, every
ordered pair of OASIS-TRT-20 subjects 1-10 (same contrast: never a warning).
"""
import json

import numpy as np
import pytest
import torch

from DEQRegistrationLib import contrast, register
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.errors import ContrastWarning
from DEQRegistrationLib.image import Image
from DEQRegistrationLib.synthetic import contrast_change, t2_like
from conftest import write_nifti

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def tissues(shift=(0.0, 0.0), shape=(64, 64)):
    """A head-like slice: background 0, an outer ring 0.3, a body 0.9 with dark (0.6) inclusions, smooth edges."""
    i, j = np.meshgrid(np.arange(shape[0]) - shape[0] / 2 - shift[0], np.arange(shape[1]) - shape[1] / 2 - shift[1],
                       indexing="ij")
    r = np.hypot(i, j * 1.2)
    soft = lambda d: 1.0 / (1.0 + np.exp(-d))  # noqa: E731
    img = 0.3 * soft(26 - r) + 0.6 * soft(22 - r)
    for ci, cj, rad in ((-8, -6, 5), (7, 5, 6), (0, 10, 4), (9, -9, 4)):
        img -= 0.3 * soft(rad - np.hypot(i - ci, j - cj))
    return img.astype(np.float32)


def share(fixed, moving):
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32) / np.max(a))[None, None]  # noqa: E731
    return contrast.linear_share(t(fixed), t(moving))


def test_linear_share_is_one_for_a_linear_map_and_low_for_another_contrast():
    fixed, moving = tissues(), tissues((1.5, -1.0))
    r2, eta2 = share(fixed, 0.5 * moving + 0.1 * (moving > 0.05))
    assert r2 >= contrast.LINEAR_SHARE_MIN * eta2 and r2 > 0.7
    for mapped in (contrast_change(moving), t2_like(moving)):
        r2, eta2 = share(fixed, mapped)
        assert r2 < contrast.LINEAR_SHARE_MIN * eta2, (r2, eta2)


def test_no_verdict_without_enough_voxels_or_contrast():
    zero = torch.zeros(1, 1, 40, 40)
    assert contrast.linear_share(zero, zero) is None
    flat = torch.full((1, 1, 40, 40), 0.5)
    assert contrast.linear_share(flat, torch.rand(1, 1, 40, 40)) is None
    assert contrast.check(flat, flat, None, "lncc") is None
    # two unrelated noise images: nothing relates them, so no verdict on the similarity either
    g = torch.Generator().manual_seed(0)
    noise_a, noise_b = torch.rand(1, 1, 64, 64, generator=g), torch.rand(1, 1, 64, 64, generator=g)
    assert contrast.linear_share(noise_a, noise_b)[1] < contrast.MIN_EXPLAINED
    assert contrast.check(noise_a, noise_b, None, "lncc") is None


def test_lattice_keeps_large_grids_small():
    big = torch.zeros(1, 1, 300, 300, 200)
    assert contrast.subsample(big).numel() <= contrast.MAX_VOXELS
    small = torch.zeros(1, 1, 30, 30)
    assert contrast.subsample(small).shape == small.shape


def test_register_warns_for_lncc_only_and_goes_on():
    fixed = Image(tissues(), AFFINE)
    other = Image(t2_like(tissues((1.5, -1.0))), AFFINE)
    with pytest.warns(ContrastWarning, match="multimodal"):
        r = register(fixed, other, similarity="lncc", max_steps=3, device="cpu")
    about_contrast = [w for w in r.warnings if "linear map" in w]
    assert len(about_contrast) == 1 and "LNCC" in about_contrast[0] and r.steps > 0
    with pytest.warns(ContrastWarning, match="MSE"):
        register(fixed, other, similarity="mse", max_steps=2, device="cpu")
    for moving, sim in ((other, "mind"), (Image(tissues((1.5, -1.0)), AFFINE), "lncc")):
        r = register(fixed, moving, similarity=sim, max_steps=2, device="cpu")
        assert not any("linear map" in w for w in r.warnings), (sim, r.warnings)


def test_cli_prints_the_warning_once_and_writes_it_to_metrics(tmp_path, capsys):
    f = write_nifti(tmp_path / "f.nii.gz", tissues()[:, :, None], AFFINE)
    m = write_nifti(tmp_path / "m.nii.gz", t2_like(tissues((1.5, -1.0)))[:, :, None], AFFINE)
    assert main(["register", str(f), str(m), "--out", str(tmp_path / "o"), "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "deqreg: warning:" in line and "linear map" in line]
    assert len(lines) == 1 and "ContrastWarning" not in err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert lines[0].split("deqreg: warning: ", 1)[1] in metrics["warnings"]
    assert main(["register", str(f), str(m), "--out", str(tmp_path / "o2"), "--preset", "multimodal",
                 "--max-steps", "3"]) == 0
    assert "linear map" not in capsys.readouterr().err
    assert not any("linear map" in w for w in json.loads((tmp_path / "o2" / "metrics.json").read_text())["warnings"])


def test_no_false_alarm_on_same_contrast_oasis_pairs(shared_data):
    """OASIS-TRT-20 slices (T1, different subjects), each subject against the next and the previous: no
    contrast warning (all 90 ordered pairs of subjects 1-10 were checked once, none warned); a few of the
    pairs with the T2-like map: a warning for each."""
    from DEQRegistrationLib.io import load_image

    folder = shared_data / "oasis_trt20_2d"
    images = {k: load_image(folder / f"OASIS-TRT-20-{k}_slice118.nii.gz") for k in range(1, 11)}
    false_alarms, missed = [], []
    pairs = [(a, a % 10 + 1) for a in range(1, 11)] + [(a % 10 + 1, a) for a in range(1, 11)]
    for a, b in pairs:
        fixed, moving = images[a], images[b]
        if a < 4:  # the T2-like copy of a few pairs (the check runs before the first step: 1 step is enough)
            with pytest.warns(ContrastWarning):
                r = register(fixed, Image(t2_like(moving.data), moving.affine), max_steps=1, device="cpu")
            if not any("linear map" in w for w in r.warnings):
                missed.append((a, b))
        r = register(fixed, moving, max_steps=1, device="cpu")
        if any("linear map" in w for w in r.warnings):
            false_alarms.append((a, b))
    assert not false_alarms and not missed, (false_alarms, missed)
