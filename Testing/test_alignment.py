"""The linear alignment stage: known motions recovered, the identity kept when nothing is wrong, failures undone."""
import numpy as np
import pytest
import torch

from conftest import oblique_affine
from DEQRegistrationLib import Image, register
from DEQRegistrationLib.alignment import align
from DEQRegistrationLib.geometry import voxel_field_to_physical, voxel_to_physical_points
from DEQRegistrationLib.synthetic import rigid_motion


def pattern(points_ras, seed=0):
    """A smooth intensity pattern of physical position (sum of Gaussian blobs) inside a ~18 mm ball."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-12, 12, size=(60, 3))
    widths = rng.uniform(2.0, 3.5, size=60)
    out = np.zeros(points_ras.shape[:-1])
    for c, w in zip(centres, widths):
        out += np.exp(-((points_ras - c) ** 2).sum(-1) / (2 * w * w))
    return out.astype(np.float32)


def render(shape, affine, motion=np.eye(4)):
    """The pattern seen by a grid after the anatomy moved by ``motion`` (RAS -> RAS): exact, no resampling."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    ras = voxel_to_physical_points(idx, affine)
    back = (ras - motion[:3, 3]) @ np.linalg.inv(motion[:3, :3]).T
    return pattern(back).reshape(shape)


def centred(affine, shape):
    a = affine.copy()
    a[:3, 3] -= voxel_to_physical_points(np.array([[(n - 1) / 2 for n in shape]]), a)[0]
    return a


def rms_error(W, truth, shape, affine):
    """Root-mean-square distance (mm) between where W and the truth put the fixed grid's points."""
    idx = np.stack(np.meshgrid(*[np.arange(0, n, 3) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    h = np.c_[voxel_to_physical_points(idx, affine), np.ones(len(idx))]
    return float(np.sqrt((((h @ W.T) - (h @ truth.T))[:, :3] ** 2).sum(1).mean()))


FSHAPE, MSHAPE = (36, 34, 32), (34, 36, 30)
AF = centred(oblique_affine((1.2, 1.1, 1.3), (0.2, -0.1, 0.3), (0, 0, 0)), FSHAPE)
AM = centred(oblique_affine((1.0, 1.3, 1.4), (-0.1, 0.25, 0.2), (0, 0, 0)), MSHAPE)


@pytest.mark.parametrize("init", ["rigid", "affine"])
def test_a_known_rigid_world_motion_is_recovered_on_oblique_grids(init):
    """Moving = the fixed anatomy turned 14 degrees about an oblique axis and shifted 7 mm, on another grid."""
    motion = rigid_motion((0.4, -0.3, 1.0), 14.0, (4.0, -5.0, 3.0), (1.0, 2.0, -1.0))
    fixed = Image(render(FSHAPE, AF), AF)
    moving = Image(render(MSHAPE, AM, motion), AM)
    before = rms_error(np.eye(4), motion, FSHAPE, AF)
    result = align(fixed, moving, init=init, similarity="ncc")
    assert before > 7 and result.message == ""
    assert rms_error(result.matrix, motion, FSHAPE, AF) < 0.35, result.stages


def test_2d_rotation_and_shift_are_recovered():
    shape = (64, 60)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:2, 3] = (-31.5, -29.5)
    motion = rigid_motion((0, 0, 1), -12.0, (3.0, -4.0, 0.0), (0, 0, 0))
    fixed = Image(render(shape, aff), aff)
    moving = Image(render(shape, aff, motion), aff)
    result = align(fixed, moving, init="rigid", similarity="ncc")
    assert rms_error(result.matrix, motion, shape, aff) < 0.3
    np.testing.assert_allclose(result.matrix[2], [0, 0, 1, 0], atol=1e-6)  # stays in the image's plane


def test_an_aligned_pair_keeps_the_identity():
    fixed = Image(render(FSHAPE, AF), AF)
    result = align(fixed, Image(fixed.data.copy(), AF), init="affine", similarity="ncc")
    assert result.start == "identity"
    assert rms_error(result.matrix, np.eye(4), FSHAPE, AF) < 0.05


def test_center_init_matches_the_centres_of_mass():
    big = (48, 48, 44)  # fields of view holding the whole pattern: the centroids are the pattern's
    af = centred(np.diag([1.2, 1.2, 1.2, 1.0]), big)
    am = centred(oblique_affine((1.3, 1.2, 1.4), (-0.1, 0.25, 0.2), (0, 0, 0)), big)
    fixed = Image(render(big, af), af)
    shift = np.eye(4)
    shift[:3, 3] = (6.0, -3.0, 2.0)
    moving = Image(render(big, am, shift), am)
    result = align(fixed, moving, init="center", similarity="ncc")
    assert result.steps == 0
    np.testing.assert_allclose(result.matrix[:3, :3], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(result.matrix[:3, 3], shift[:3, 3], atol=0.3)


def test_a_diverging_stage_is_undone_and_reported_never_nan(monkeypatch):
    """A stage that returns a non-finite transform: the identity is kept, the message says why, no NaN anywhere."""
    from DEQRegistrationLib import alignment

    def diverge(self, kind, T, levels):
        self.steps += 1
        return torch.full_like(T, float("nan"))

    monkeypatch.setattr(alignment.Aligner, "_stage", diverge)
    fixed = Image(render(FSHAPE, AF), AF)
    moving = Image(render(MSHAPE, AM, rigid_motion((0, 0, 1), 10, (3, 0, 0), (0, 0, 0))), AM)
    with pytest.warns(UserWarning, match="diverged"):
        res = register(fixed, moving, max_steps=4, device="cpu")
    assert res.alignment.message == "the rigid alignment stage diverged (non-finite result); kept the identity"
    assert np.all(np.isfinite(res.world)) and np.all(np.isfinite(res.displacement))
    np.testing.assert_array_equal(res.world, np.eye(4))


@pytest.mark.parametrize("degrees,axis", [(100.0, (0.4, -0.3, 1.0)), (180.0, (0.0, 0.0, 1.0))])
def test_a_turn_far_beyond_a_local_descent_is_found_by_the_orientation_search(degrees, axis):
    """Turned by 100 or 180 degrees: from the centres alone the rigid stage ends 20-35 mm off (measured before
    the search existed); the search refines far orientations too and starts from the best."""
    motion = rigid_motion(axis, degrees, (3.0, -2.0, 1.0), (0.0, 0.0, 0.0))
    fixed = Image(render(FSHAPE, AF), AF)
    moving = Image(render(MSHAPE, AM, motion), AM)
    result = align(fixed, moving, init="rigid", similarity="ncc")
    assert rms_error(result.matrix, motion, FSHAPE, AF) < 0.35, result.stages[0]
    search = result.stages[0]["search"]
    assert result.start not in ("identity", "center") and len(search) >= 2
    # the winner ends lowest (two far starts can reach the same pose: equal up to float32 rounding)
    best = min(row["refined"] for row in search)
    assert next(r["refined"] for r in search if r["candidate"] == result.start) <= best + 1e-5 + 1e-4 * abs(best)


def test_an_alignment_that_makes_things_worse_keeps_the_identity():
    """Nothing to align (a noise image): whatever the stages do, a worse similarity than the identity is refused."""
    from DEQRegistrationLib import alignment

    fixed = Image(render(FSHAPE, AF), AF)
    noise = Image(np.random.default_rng(3).random(MSHAPE).astype(np.float32), AM)
    result = align(fixed, noise, init="affine", similarity="ncc")
    final = result.stages[-1]
    assert np.all(np.isfinite(result.matrix))
    if result.message:
        assert "kept" in result.message
    for stage in result.stages[1:]:
        assert not stage["kept"] or stage["energy_after"] <= stage["energy_before"] + 1e-6
    assert final is not None and alignment.MAX_SCALE > 1


def test_progress_names_the_stage_and_cancel_during_the_alignment_keeps_its_transform():
    motion = rigid_motion((0.4, -0.3, 1.0), 14.0, (4.0, -5.0, 3.0), (1.0, 2.0, -1.0))
    fixed = Image(render(FSHAPE, AF), AF)
    moving = Image(render(MSHAPE, AM, motion), AM)
    seen = []

    def cancel_at_third(p):
        seen.append((p.stage, p.step, p.displacement()))
        return p.step == 3

    res = register(fixed, moving, max_steps=6, device="cpu", callback=cancel_at_third)
    assert [s for s, _, _ in seen] == ["alignment"] * 3 and res.cancelled
    assert [row["stage"] for row in res.trace] == ["alignment"] * 3
    # the result is the transform the callback saw last, as one field, and its linear part
    np.testing.assert_allclose(res.total_displacement(), seen[-1][2], atol=1e-4)
    assert np.abs(res.displacement).max() == 0  # no deformation yet
    assert not np.allclose(res.world, np.eye(4))

    stages = []
    full = register(fixed, moving, max_steps=6, device="cpu", callback=lambda p: stages.append(p.stage))
    k = stages.count("alignment")
    assert k > 0 and stages == ["alignment"] * k + ["deformable"] * 6 and full.steps == k + 6


def test_mind_aligns_another_contrast_by_mutual_information_and_one_contrast_by_ncc():
    """--similarity mind aligns by global NCC and by (normalised) MI and keeps NCC's pose only where the intensities
    follow a line and the best curve explains as much as at MI's (``registration._align``). Here NCC finds a wrong
    pose 38 mm away where the inverted contrast looks linear; a pair of one contrast keeps NCC's answer (an image
    aligned to itself stays exact); an explicit init_similarity is used alone."""
    motion = rigid_motion((0.4, -0.3, 1.0), 14.0, (4.0, -5.0, 3.0), (1.0, 2.0, -1.0))
    fixed = Image(render(FSHAPE, AF), AF)
    data = render(MSHAPE, AM, motion)
    inverted = Image(np.where(data > 0.05 * data.max(), 1.2 - data / data.max(), 0).astype(np.float32), AM)
    seen = []
    res = register(fixed, inverted, similarity="mind", max_steps=4, device="cpu",
                   callback=lambda p: seen.append((p.stage, p.step, p.max_steps)))
    first = res.alignment.stages[0]
    assert res.alignment.similarity == "mi" and first["name"] == "measure" and first["measures"] == ["ncc", "mi"]
    assert first["eta2"][1] > first["eta2"][0] + 0.2
    assert rms_error(res.world, motion, FSHAPE, AF) < 1.5, res.alignment.stages  # measured 1.04 mm (NCC's: 38)
    steps = [(step, total) for stage, step, total in seen if stage != "features"]  # MIND's descriptors: no step
    assert all(step <= total for step, total in steps) and res.steps == len(steps)  # Progress counts both runs
    assert res.alignment.steps == sum(row["stage"] == "alignment" for row in res.trace)

    same = register(fixed, Image(data, AM), similarity="mind", max_steps=4, device="cpu")
    assert same.alignment.similarity == "ncc" and same.alignment.stages[0]["chosen"] == "ncc"
    itself = register(fixed, Image(fixed.data.copy(), AF), similarity="mind", max_steps=4, device="cpu")
    assert itself.alignment.similarity == "ncc" and np.allclose(itself.world, np.eye(4), atol=1e-5)
    assert rms_error(same.world, motion, FSHAPE, AF) < 0.35
    asked = register(fixed, inverted, similarity="mind", init_similarity="ncc", max_steps=4, device="cpu")
    assert asked.alignment.similarity == "ncc" and asked.alignment.stages[0]["name"] == "start"


def test_the_result_is_one_composed_transform():
    """displacement = W then the deformation: warping with it alone reproduces the warped image, and W is its linear part."""
    motion = rigid_motion((0.4, -0.3, 1.0), 14.0, (4.0, -5.0, 3.0), (1.0, 2.0, -1.0))
    fixed = Image(render(FSHAPE, AF), AF)
    moving = Image(render(MSHAPE, AM, motion), AM)
    res = register(fixed, moving, max_steps=12, device="cpu")
    np.testing.assert_allclose(res.warp(moving.data), res.warped.data, atol=1e-5)
    assert rms_error(res.world, motion, FSHAPE, AF) < 0.5
    # the field's physical displacement at the grid points is the linear part plus a small deformation
    d = voxel_field_to_physical(res.total_displacement(), AF)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in FSHAPE], indexing="ij"), -1).reshape(-1, 3)
    x = voxel_to_physical_points(idx, AF)
    linear = (x @ res.world[:3, :3].T + res.world[:3, 3]) - x
    assert np.median(np.linalg.norm(d.reshape(-1, 3) - linear, axis=1)) < 1.0
    np.testing.assert_allclose(res.world_lps(), np.diag([-1, -1, 1, 1]) @ res.world @ np.diag([-1, -1, 1, 1]))


def test_saved_result_holds_w_in_affine_tfm_metrics_and_manifest_and_apply_uses_it(tmp_path, capsys):
    """The CLI writes W three ways (affine.tfm, metrics.json, transform.json's affine slot); deqreg apply
    reproduces warped.nii.gz through field then W, and the TRE goes through W."""
    import json

    import nibabel as nib

    from DEQRegistrationLib import io
    from DEQRegistrationLib.cli import main
    from DEQRegistrationLib.geometry import physical_to_voxel_points

    motion = rigid_motion((0.4, -0.3, 1.0), 14.0, (4.0, -5.0, 3.0), (1.0, 2.0, -1.0))
    fixed = io.save_image(Image(render(FSHAPE, AF), AF), tmp_path / "f.nii.gz")
    moving = io.save_image(Image(render(MSHAPE, AM, motion), AM), tmp_path / "m.nii.gz")
    # landmarks: fixed voxels and where the motion puts their anatomy, in moving voxels
    fp = np.array([[10.0, 12.0, 14.0], [20.0, 15.0, 9.0], [17.0, 20.0, 18.0]])
    ras = voxel_to_physical_points(fp, AF)
    mp = physical_to_voxel_points(ras @ motion[:3, :3].T + motion[:3, 3], AM, 3)
    np.savetxt(tmp_path / "fp.csv", fp, delimiter=",")
    np.savetxt(tmp_path / "mp.csv", mp, delimiter=",")
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "--out", str(out), "--max-steps", "10", "--device", "cpu",
                 "--fixed-landmarks", str(tmp_path / "fp.csv"), "--moving-landmarks", str(tmp_path / "mp.csv")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    W = np.asarray(m["affine"])
    assert rms_error(W, motion, FSHAPE, AF) < 0.5
    np.testing.assert_allclose(io.load_itk_affine(out / "affine.tfm"), W, atol=1e-9)
    assert json.loads((out / "transform.json").read_text())["forward"]["affine"] == "affine.tfm"
    assert m["tre_before_mm"] > 7 and m["tre_mm"] < 1.0  # through W: without it the error stays ~ the motion
    assert main(["apply", str(out), str(moving), "--reference", str(fixed), "--out", str(tmp_path / "w.nii.gz")]) == 0
    got = np.asanyarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)
    want = np.asanyarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    assert np.abs(got - want).max() <= 1e-5
