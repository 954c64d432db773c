"""Large-volume paths (issue 14): outputs computed in slabs equal the whole-volume ones, on a small volume.

Every chunked function is run with slabs of a few rows (so a 20-row volume
is cut in several places, including slabs narrower than the stencils' halo)
and compared with the one-piece computation it replaces.
"""
import io as stdio

import numpy as np
import pytest
import torch

from DEQRegistrationLib import chunked, io, metrics, transforms
from DEQRegistrationLib.levels import auto_pyramid, describe_rule
from DEQRegistrationLib.sampling import Sampler

from conftest import blob_volume, oblique_affine

SHAPE = (20, 14, 12)
ROW = SHAPE[1] * SHAPE[2]


@pytest.fixture(scope="module")
def field():
    """A smooth field with some folding, from a coarse working grid (5 x 4 x 3) upsampled by 4."""
    rng = np.random.default_rng(14)
    z = torch.tensor(rng.standard_normal((1, 3, 5, 4, 3)), dtype=torch.float32) * 0.8
    return z


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 19, 20])
def test_upsampled_field_equals_the_whole_one(field, rows):
    whole = transforms.upsample_field(field, 4)[0, :, :SHAPE[0], :SHAPE[1], :SHAPE[2]].numpy()
    slabs = chunked.upsample_field_into(field, 4, SHAPE, chunk_voxels=rows * ROW)
    assert slabs.dtype == np.float32
    np.testing.assert_array_equal(slabs, whole)


@pytest.mark.parametrize("rows", [1, 2, 5, 20])
def test_jacobian_and_folding_map_equal_the_whole_ones(field, rows):
    disp = chunked.upsample_field_into(field, 4, SHAPE)
    whole = metrics.jacobian_determinant(disp)
    assert (whole <= 0).any() and (whole > 0).any()  # the folding map is not trivial
    got = chunked.jacobian_determinant(disp, chunk_voxels=rows * ROW)
    np.testing.assert_array_equal(got, whole)
    np.testing.assert_array_equal(got <= 0, whole <= 0)
    t = torch.from_numpy(disp)[None]
    torch.testing.assert_close(chunked.jacobian_determinant(t, chunk_voxels=rows * ROW),
                               transforms.jacobian_determinant(t), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_jacobian_metrics_equal_the_whole_ones(field, rows):
    jac = metrics.jacobian_determinant(chunked.upsample_field_into(field, 4, SHAPE))
    whole = chunked.jacobian_summary(jac)  # small: metrics' own functions
    assert whole == dict(folding_percent=metrics.folding_percent(jac), std_log_jacobian=metrics.std_log_jacobian(jac),
                         std_log_jacobian_l2r=metrics.std_log_jacobian_l2r(jac),
                         jacobian_min=float(jac.min()), jacobian_max=float(jac.max()))
    got = chunked.jacobian_summary(jac, chunk_voxels=rows * ROW, whole_voxels=0)
    for key in ("folding_percent", "jacobian_min", "jacobian_max"):
        assert got[key] == whole[key]
    for key in ("std_log_jacobian", "std_log_jacobian_l2r"):
        assert got[key] == pytest.approx(whole[key], rel=1e-12)


@pytest.mark.parametrize("rows", [1, 4, 20])
def test_warped_image_and_labels_equal_the_whole_ones(field, rows):
    disp = chunked.upsample_field_into(field, 4, SHAPE)
    moving = blob_volume((22, 15, 13))
    labels = (moving > 0.3).astype(np.int32) + (moving > 0.6)
    s = Sampler(SHAPE, oblique_affine(), oblique_affine((1.1, 1.0, 1.9)))
    with torch.no_grad():
        for data, order in ((moving, 1), (labels, 0)):
            whole = s.resample(data, disp, order=order, chunk_voxels=10 ** 9)
            np.testing.assert_array_equal(s.resample(data, disp, order=order, chunk_voxels=rows * ROW), whole)


@pytest.mark.parametrize("in_place", [False, True])
def test_saved_field_equals_the_whole_one(field, in_place):
    disp = chunked.upsample_field_into(field, 4, SHAPE)
    aff = oblique_affine()
    from DEQRegistrationLib.geometry import ras_to_lps, voxel_field_to_physical

    lps0 = ras_to_lps(voxel_field_to_physical(disp, aff)).astype(np.float32)
    vox0 = io.itk_displacement_to_voxel(lps0, aff)
    work = disp.copy()
    lps, vox = chunked.field_as_saved(work, aff, chunk_voxels=3 * ROW, in_place=in_place)
    np.testing.assert_array_equal(lps, lps0)
    np.testing.assert_array_equal(vox, vox0)
    assert (vox is work) == in_place


def test_streamed_nifti_is_byte_identical(field):
    disp = chunked.upsample_field_into(field, 4, SHAPE)
    aff = oblique_affine()
    cases = [(disp[0], None), (np.moveaxis(disp, 0, -1)[:, :, :, None, :], "vector"),
             ((disp[0] > 0).astype(np.uint8), "label")]
    for data, intent in cases:
        out = []
        for stream in (False, True):
            img = io._nifti(data, aff)
            if intent == "vector":
                img.header.set_intent("vector", (), name="DEQReg displacement")
            elif intent == "label":
                img.header.set_intent("label")
            fh = stdio.BytesIO()
            io._to_stream(img, fh, min_voxels=0 if stream else 10 ** 12)
            out.append(fh.getvalue())
        assert out[0] == out[1]


def test_level_plan_by_physical_size():
    assert auto_pyramid((160, 192, 224), (1.0, 1.0, 1.0)) == [4, 2]  # the OASIS brain: as before
    assert auto_pyramid((512, 512, 300), (0.8, 0.8, 1.0)) == [8, 4]  # CT: a 3.2 mm working grid
    assert auto_pyramid((256, 256, 150), (1.6, 1.6, 2.0)) == [4, 2]  # the same field of view, coarser voxels
    assert auto_pyramid((64, 64, 64), (0.5, 0.5, 0.5)) == [4, 2, 1]  # small grids: full resolution
    rule = describe_rule((512, 512, 300), (0.8, 0.8, 1.0))
    assert rule["target_spacing_mm"] == 3.2 and rule["finest_factor"] == 4
