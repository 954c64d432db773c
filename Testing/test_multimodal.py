"""The multimodal preset on a real 2D pair under the contrast map of issue 12 (``synthetic.contrast_change``).

OASIS-TRT-20 subject 1 (fixed) and subject 2 (moving, |sin(1.5 pi x)| of its
intensities), slice 118 with its DKT31 labels; one of the pairs MIND's diffusion
weight was chosen on (config.SIMILARITY_OPERATOR_DEFAULTS). The pyramid is
(4, 2), the 2 mm working grids the 3D brain gets. With the former weight 0.02
this pair folded 1.06 % of the pixels and did not converge in 216 steps
(Dice 0.443); with 0.1: 0 % folded, converged in 88 steps, Dice 0.493; with
the descriptors also blurred by 1 voxel (``MINDSSC.smooth``): 66 steps, 0.483.
Steps count the alignment's too.
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


def _contrast_pair(shared_data, fixed_subject, moving_subject):
    folder = shared_data / "oasis_trt20_2d"
    fixed, fixed_labels = _slice(folder, fixed_subject)
    moving, moving_labels = _slice(folder, moving_subject)
    return fixed, fixed_labels, Image(contrast_change(moving.data), moving.affine), moving_labels


def test_mind_registers_a_contrast_changed_slice_without_folding(shared_data):
    fixed, fixed_labels, moving, moving_labels = _contrast_pair(shared_data, 1, 2)
    before = metrics.mean_dice(fixed_labels, moving_labels)
    r = register(fixed, moving, preset="multimodal", pyramid=[4, 2], moving_labels=moving_labels)
    dice = metrics.mean_dice(fixed_labels, r.warped_labels)
    folded = metrics.folding_percent(r.jacobian)
    assert r.converged, (r.steps, r.final_residual)
    assert folded < 0.1, folded
    assert dice > before + 0.05 and dice > 0.47, (before, dice)
    assert np.isfinite(r.displacement).all()


def test_blurred_mind_descriptors_converge(shared_data):
    """Subjects 2 -> 3: raw descriptors (smooth=0) ran out of the 200-step budget (residual above 1e-3,
    Dice 0.458, 0.011 % folded); blurred by 1 voxel (the default) the solve converges, 59 steps, Dice 0.450."""
    fixed, fixed_labels, moving, moving_labels = _contrast_pair(shared_data, 2, 3)
    r = register(fixed, moving, preset="multimodal", pyramid=[4, 2], moving_labels=moving_labels)
    assert r.converged and r.steps < 120, (r.steps, r.final_residual)
    assert metrics.folding_percent(r.jacobian) < 0.1
    assert metrics.mean_dice(fixed_labels, r.warped_labels) > 0.43
