"""The multimodal preset on a real 2D pair under the contrast map of issue 12 (``synthetic.contrast_change``).

OASIS-TRT-20 subject 1 (fixed) and subject 2 (moving, |sin(1.5 pi x)| of its
intensities), slice 118 with its DKT31 labels; one of the pairs MIND's diffusion
weight was chosen on (config.SIMILARITY_DEFAULTS). The pyramid is
(4, 2), the 2 mm working grids the 3D brain gets. With the former weight 0.02
this pair folded 1.06 % of the pixels and did not converge in 216 steps
(Dice 0.443); with 0.1: 0 % folded, converged in 88 steps, Dice 0.493 (descriptors
of the pooled image, dilation 1: 0.488, 0.011 % folded); with each level's
descriptors pooled from the full-resolution MIND (dilation 2): 0.503, 0 % folded,
converged in 148 steps.
"""
from __future__ import annotations

import numpy as np

from DEQRegistrationLib import io, metrics
from DEQRegistrationLib.image import Image
from DEQRegistrationLib.registration import register
from DEQRegistrationLib.synthetic import contrast_change


def _slice(folder, subject):
    image = io.load_image(folder / f"OASIS-TRT-20-{subject}_slice118.nii.gz")
    labels = io.load_labels(folder / f"OASIS-TRT-20-{subject}_DKT31_CMA_labels_slice118.nii.gz").data
    return image, labels


def test_mind_registers_a_contrast_changed_slice_without_folding(shared_data):
    folder = shared_data / "oasis_trt20_2d"
    fixed, fixed_labels = _slice(folder, 1)
    moving, moving_labels = _slice(folder, 2)
    moving = Image(contrast_change(moving.data), moving.affine)
    before = metrics.mean_dice(fixed_labels, moving_labels)
    r = register(fixed, moving, preset="multimodal", pyramid=[4, 2], moving_labels=moving_labels)
    dice = metrics.mean_dice(fixed_labels, r.warped_labels)
    folded = metrics.folding_percent(r.jacobian)
    assert r.converged, (r.steps, r.final_residual)
    assert folded < 0.1, folded
    # measured: 0.4935 with MIND's default symmetric image gradient, 0.5043 with the exact one ("moving"); the
    # symmetric one is better on average (30 ordered pairs of subjects 1-6: 0.4525 vs 0.4506) but not on this pair
    assert dice > before + 0.05 and dice > 0.488, (before, dice)
    assert np.isfinite(r.displacement).all()
