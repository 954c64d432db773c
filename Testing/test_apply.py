"""``deqreg apply``: the saved result reproduces the run's outputs and means what ITK means by it.

One small registration (different oblique anisotropic grids for fixed and
moving, labels, landmarks, ``--inverse``) is shared by the checks. Its saved
transform is applied by ``deqreg apply`` and, independently, by SimpleITK
(``DisplacementFieldTransform`` from the saved files, ``sitk.Resample``),
so a wrong direction, sign or grid would show.
"""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_labels, blob_volume, oblique_affine, write_nifti
from DEQRegistrationLib import apply, io
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.geometry import voxel_to_physical_points
from DEQRegistrationLib.inverse import MASK_RELIABLE

LPS = np.diag([-1.0, -1.0, 1.0])
FIXED_AFFINE = oblique_affine(spacing=(1.4, 1.2, 1.6), angles=(0.1, -0.05, 0.2), origin=(-17.0, 14.0, 6.0))
MOVING_AFFINE = oblique_affine(spacing=(1.3, 1.5, 1.25), angles=(0.15, 0.05, 0.1), origin=(-16.0, 13.0, 7.0))
FIXED_POINTS = np.array([[11.5, 11.5, 11.5], [8.0, 11.5, 11.5], [14.0, 9.0, 12.0]])
MOVING_POINTS = np.array([[12.0, 10.5, 12.5], [9.5, 10.5, 12.5], [15.0, 8.5, 13.0]])


def _data(shape=(24, 24, 24)):
    fixed = blob_volume(shape)
    moving = blob_volume((22, 23, 25), centre_shift=(1.0, -1.0, 1.0))
    return fixed, moving


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("apply")
    fixed, moving = _data()
    p = dict(fixed=write_nifti(d / "f.nii.gz", fixed, FIXED_AFFINE), moving=write_nifti(d / "m.nii.gz", moving,
                                                                                         MOVING_AFFINE),
             fixed_seg=write_nifti(d / "fs.nii.gz", blob_labels(fixed) * 17, FIXED_AFFINE, np.uint16),
             moving_seg=write_nifti(d / "ms.nii.gz", blob_labels(moving) * 17, MOVING_AFFINE, np.uint16))
    np.savetxt(d / "fl.csv", FIXED_POINTS, delimiter=",")
    (d / "ml.csv").write_text("i,j,k\n" + "\n".join(",".join(str(v) for v in r) for r in MOVING_POINTS) + "\n")
    argv = ["register", p["fixed"], p["moving"], "--out", d / "out", "--fixed-seg", p["fixed_seg"], "--moving-seg",
            p["moving_seg"], "--fixed-landmarks", d / "fl.csv", "--moving-landmarks", d / "ml.csv", "--max-steps",
            "16", "--device", "cpu", "--inverse", "--init", "none"]  # the field alone: SimpleITK compares it bare
    code = main([str(a) for a in argv])
    assert code == 0
    yield dict(dir=d, out=d / "out", **p)
    shutil.rmtree(d, ignore_errors=True)


def _apply(*argv):
    code = main(["apply", *[str(a) for a in argv]])
    assert code == 0
    return code


def _nii(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_apply_reproduces_warped_and_warped_seg(run, tmp_path):
    _apply(run["out"], run["moving"], "--reference", run["fixed"], "--out", tmp_path / "w.nii.gz")
    _apply(run["out"], run["moving_seg"], "--reference", run["fixed"], "--out", tmp_path / "s.nii.gz", "--labels")
    got, want = _nii(tmp_path / "w.nii.gz"), _nii(run["out"] / "warped.nii.gz")
    assert np.abs(got - want).max() <= 1e-5
    seg, want_seg = _nii(tmp_path / "s.nii.gz"), _nii(run["out"] / "warped_seg.nii.gz")
    assert seg.dtype == want_seg.dtype and np.array_equal(seg, want_seg)
    assert set(np.unique(seg)) <= {0, 17, 34}  # labels kept, nothing interpolated
    np.testing.assert_allclose(nib.load(str(tmp_path / "w.nii.gz")).affine, FIXED_AFFINE, atol=1e-5)
    # The bare displacement field (no manifest) gives the same image.
    _apply(run["out"] / "displacement.nii.gz", run["moving"], "--reference", run["fixed"], "--out",
           tmp_path / "w2.nii.gz")
    assert np.abs(_nii(tmp_path / "w2.nii.gz") - want).max() <= 1e-5


def _sitk_transform(path):
    sitk = pytest.importorskip("SimpleITK")
    return sitk, sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


def _interior(shape, affine, ref_shape, ref_affine, field, margin=1.5, world=None):
    """Output voxels whose sample point lies at least ``margin`` voxels inside the input grid."""
    from DEQRegistrationLib.sampling import Sampler
    import torch
    q = Sampler(ref_shape, ref_affine, affine, world).coords(torch.as_tensor(field)[None])[0].numpy()
    return np.all([(q[a] > margin) & (q[a] < shape[a] - 1 - margin) for a in range(3)], axis=0)


@pytest.mark.parametrize("interp", ["linear", "bspline"])
def test_apply_matches_simpleitk_resample(run, tmp_path, interp):
    """SimpleITK resamples the moving image through the saved field file: the same image inside the grid."""
    _apply(run["out"], run["moving"], "--reference", run["fixed"], "--out", tmp_path / "w.nii.gz",
           "--interpolation", interp)
    sitk, tf = _sitk_transform(run["out"] / "displacement.nii.gz")
    ref, mov = sitk.ReadImage(str(run["fixed"])), sitk.ReadImage(str(run["moving"]), sitk.sitkFloat64)
    mode = sitk.sitkLinear if interp == "linear" else sitk.sitkBSpline
    want = sitk.GetArrayFromImage(sitk.Resample(mov, ref, tf, mode, 0.0)).transpose(2, 1, 0)
    got = _nii(tmp_path / "w.nii.gz")
    t = apply.load(run["out"], io.load_image(run["fixed"]))
    inside = _interior(_data()[1].shape, MOVING_AFFINE, t.fixed.shape, t.fixed.affine, t.displacement)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got[inside], want[inside], atol=2e-5 if interp == "linear" else 1e-4)
    if interp == "bspline":  # and it is not the linear image
        lin = sitk.GetArrayFromImage(sitk.Resample(mov, ref, tf, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
        assert np.abs(got[inside] - lin[inside]).max() > 1e-3


def test_points_tre_equals_metrics_and_simpleitk(run, tmp_path):
    out = run["out"]
    _apply(out, run["dir"] / "fl.csv", "--reference", run["fixed"], "--out", tmp_path / "moved.csv")
    moved = np.loadtxt(tmp_path / "moved.csv", delimiter=",")     # voxel coordinates on the moving grid
    moving_affine = io.load_image(run["moving"]).affine
    tre = np.linalg.norm(voxel_to_physical_points(moved, moving_affine)
                         - voxel_to_physical_points(MOVING_POINTS, moving_affine), axis=1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert tre.mean() == pytest.approx(metrics["tre_mm"], abs=1e-6)
    np.testing.assert_allclose(tre, metrics["tre_per_landmark_mm"], atol=1e-6)
    # SimpleITK maps the fixed points through the same file to the same moving points.
    _, tf = _sitk_transform(out / "displacement.nii.gz")
    for p, q in zip(voxel_to_physical_points(FIXED_POINTS, FIXED_AFFINE), voxel_to_physical_points(moved,
                                                                                                    MOVING_AFFINE)):
        np.testing.assert_allclose(LPS @ tf.TransformPoint(tuple(LPS @ p)), q, atol=1e-4)


def test_markups_points_written_back_in_their_format(run, tmp_path):
    fixed_affine = io.load_image(run["fixed"]).affine  # as stored (NIfTI keeps float32)
    ras = voxel_to_physical_points(FIXED_POINTS, fixed_affine)
    lps = ras @ LPS
    lines = ["# Markups fiducial file version = 5.0", "# CoordinateSystem = LPS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"{n},{x},{y},{z},0,0,0,1,1,1,0,F-{n},\"a, b\"," for n, (x, y, z) in enumerate(lps)]
    (tmp_path / "p.fcsv").write_text("\n".join(lines) + "\n")
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                      "Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "coordinateUnits": "mm",
                        "controlPoints": [{"id": str(n), "label": f"F-{n}", "position": list(p)}
                                          for n, p in enumerate(ras)]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(doc))
    _apply(run["out"], run["dir"] / "fl.csv", "--reference", run["fixed"], "--out", tmp_path / "moved.csv")
    want = voxel_to_physical_points(np.loadtxt(tmp_path / "moved.csv", delimiter=","),
                                    io.load_image(run["moving"]).affine)

    _apply(run["out"], tmp_path / "p.fcsv", "--reference", run["fixed"], "--out", tmp_path / "q.fcsv")
    text = (tmp_path / "q.fcsv").read_text().splitlines()
    assert text[:3] == lines[:3]                              # header and coordinate system kept
    got = io.read_points(tmp_path / "q.fcsv")
    np.testing.assert_allclose(got.points, want, atol=1e-6)
    assert text[3].split(",")[11] == "F-0" and '"a, b"' in text[3]  # other columns kept

    _apply(run["out"], tmp_path / "p.mrk.json", "--reference", run["fixed"], "--out", tmp_path / "q.mrk.json")
    out = json.loads((tmp_path / "q.mrk.json").read_text())
    assert out["markups"][0]["coordinateSystem"] == "RAS" and out["markups"][0]["controlPoints"][1]["label"] == "F-1"
    np.testing.assert_allclose([cp["position"] for cp in out["markups"][0]["controlPoints"]], want, atol=1e-6)


# --- the inverse ------------------------------------------------------------------------


def test_saved_inverse_is_the_inverse_simpleitk_sees(run, tmp_path):
    """ITK composes the two saved fields: forward(inverse(y)) = y at the moving grid's voxels."""
    out = run["out"]
    manifest = json.loads((out / "transform.json").read_text())
    assert manifest["inverse"]["residual"] < 1e-3 and manifest["inverse"]["displacement"] == "inverse.nii.gz"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inverse"]["steps"] == manifest["inverse"]["steps"]
    _, fwd = _sitk_transform(out / "displacement.nii.gz")
    _, inv = _sitk_transform(out / "inverse.nii.gz")
    mask = _nii(out / "inverse_unreliable.nii.gz")
    assert mask.shape == _data()[1].shape
    rng = np.random.default_rng(0)
    idx = np.argwhere(mask == MASK_RELIABLE)
    # Voxels whose pre-image stays 2 voxels inside the fixed grid (ITK leaves the field's edge alone).
    pts = []
    for i in idx[rng.permutation(len(idx))]:
        y = voxel_to_physical_points(i[None].astype(float), MOVING_AFFINE)[0]
        x = LPS @ inv.TransformPoint(tuple(LPS @ y))
        p = np.linalg.solve(FIXED_AFFINE[:3, :3], x - FIXED_AFFINE[:3, 3])
        if np.all(p > 2) and np.all(p < np.array(_data()[0].shape) - 3):
            pts.append((y, x))
        if len(pts) == 40:
            break
    assert len(pts) == 40
    for y, x in pts:
        np.testing.assert_allclose(LPS @ fwd.TransformPoint(tuple(LPS @ x)), y, atol=2e-3)


def test_apply_inverse_image_matches_simpleitk_and_points_come_back(run, tmp_path):
    pytest.importorskip("SimpleITK")  # writes NRRD, the reference is SimpleITK's resample
    out = run["out"]
    _apply(out, run["fixed"], "--reference", run["moving"], "--out", tmp_path / "fi.nrrd", "--inverse")
    sitk, tf = _sitk_transform(out / "inverse.nii.gz")
    want = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(run["fixed"]), sitk.sitkFloat64),
                                                sitk.ReadImage(str(run["moving"])), tf, sitk.sitkLinear,
                                                0.0)).transpose(2, 1, 0)
    got = io.load_image(tmp_path / "fi.nrrd")
    np.testing.assert_allclose(got.affine, MOVING_AFFINE, atol=1e-9)
    t = apply.load(out, io.load_image(run["moving"]), inverse=True)
    inside = _interior(_data()[0].shape, FIXED_AFFINE, t.moving.shape, t.moving.affine, t.inverse)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(got.data[inside], want[inside], atol=2e-5)

    # Fixed landmarks -> moving space -> back: the inverse is solved at the points themselves.
    _apply(out, run["dir"] / "fl.csv", "--reference", run["fixed"], "--out", tmp_path / "there.csv")
    _apply(out, tmp_path / "there.csv", "--reference", run["moving"], "--out", tmp_path / "back.csv", "--inverse")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "back.csv", delimiter=","), FIXED_POINTS, atol=1e-3)


def test_inverse_computed_on_the_fly_equals_the_saved_one(run, tmp_path, capsys):
    """A result saved without --inverse: apply --inverse solves it (and says how well) to the same image."""
    folder = tmp_path / "noinv"
    shutil.copytree(run["out"], folder)
    doc = json.loads((folder / "transform.json").read_text())
    doc["inverse"] = None
    (folder / "transform.json").write_text(json.dumps(doc))
    for name in ("inverse.nii.gz", "inverse_unreliable.nii.gz"):
        (folder / name).unlink()
    _apply(run["out"], run["fixed_seg"], "--reference", run["moving"], "--out", tmp_path / "a.nii.gz", "--inverse",
           "--labels")
    capsys.readouterr()
    _apply(folder, run["fixed_seg"], "--reference", run["moving"], "--out", tmp_path / "b.nii.gz", "--inverse",
           "--labels")
    assert "deqreg: inverse:" in capsys.readouterr().err
    a, b = _nii(tmp_path / "a.nii.gz"), _nii(tmp_path / "b.nii.gz")
    assert np.mean(a == b) > 0.999  # equal up to float32 rounding of the saved field at nearest-neighbour ties


# --- the affine slot ------------------------------------------------------------------------


def test_world_affine_is_applied_after_the_field_as_itk_composes_it(run, tmp_path):
    """A saved result with an affine (what the alignment stage will add): deqreg apply and SimpleITK's
    CompositeTransform(affine.tfm, displacement) resample the same image and map the same points."""
    sitk = pytest.importorskip("SimpleITK")
    fixed = io.load_image(run["fixed"])
    t = apply.load(run["out"], fixed)
    c, s = np.cos(0.08), np.sin(0.08)
    W = np.array([[c, -s, 0, 1.5], [s, c, 0, -1.0], [0, 0, 1, 0.5], [0, 0, 0, 1.0]])
    t.world = W
    folder = tmp_path / "withaffine"
    folder.mkdir()
    apply.save(folder, t)
    manifest = json.loads((folder / "transform.json").read_text())
    assert manifest["forward"] == {"displacement": "displacement.nii.gz", "affine": "affine.tfm"}

    _apply(folder, run["moving"], "--reference", run["fixed"], "--out", tmp_path / "w.nii.gz")
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(folder / "affine.tfm")))
    composite.AddTransform(_sitk_transform(folder / "displacement.nii.gz")[1])  # applied to a point first
    want = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(run["moving"]), sitk.sitkFloat64),
                                                sitk.ReadImage(str(run["fixed"])), composite, sitk.sitkLinear,
                                                0.0)).transpose(2, 1, 0)
    inside = _interior(_data()[1].shape, MOVING_AFFINE, t.fixed.shape, t.fixed.affine, t.displacement, world=W)
    assert inside.mean() > 0.2
    np.testing.assert_allclose(_nii(tmp_path / "w.nii.gz")[inside], want[inside], atol=2e-5)

    _apply(folder, run["dir"] / "fl.csv", "--reference", run["fixed"], "--out", tmp_path / "m.csv")
    moved = voxel_to_physical_points(np.loadtxt(tmp_path / "m.csv", delimiter=","), MOVING_AFFINE)
    for p, q in zip(voxel_to_physical_points(FIXED_POINTS, FIXED_AFFINE), moved):
        np.testing.assert_allclose(LPS @ composite.TransformPoint(tuple(LPS @ p)), q, atol=1e-4)
    # and back through the inverse (W^-1 after the inverse field)
    _apply(folder, tmp_path / "m.csv", "--reference", run["moving"], "--out", tmp_path / "b.csv", "--inverse")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "b.csv", delimiter=","), FIXED_POINTS, atol=1e-3)


# --- bad input ------------------------------------------------------------------------------


def _one_line(capsys, argv, match):
    code = main(["apply", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deqreg: error: "), err
    assert match in lines[0], lines[0]


def test_bad_apply_input_is_one_line(run, tmp_path, capsys):
    out, f, m = run["out"], run["fixed"], run["moving"]
    other = write_nifti(tmp_path / "other.nii.gz", blob_volume((20, 24, 24)), FIXED_AFFINE)
    shifted_aff = FIXED_AFFINE.copy()
    shifted_aff[:3, 3] += 2.0
    shifted = write_nifti(tmp_path / "shifted.nii.gz", blob_volume(), shifted_aff)
    (tmp_path / "x.xyz").write_text("?")
    cases = [
        ([out, m, "--reference", other, "--out", tmp_path / "o.nii.gz"], "the transform is defined on a 24x24x24"),
        ([out, m, "--reference", shifted, "--out", tmp_path / "o.nii.gz"], "another geometry"),
        ([out / "displacement.nii.gz", m, "--reference", other, "--out", tmp_path / "o.nii.gz"],
         "the transform is defined on a 24x24x24"),
        ([out, m, "--reference", f, "--out", tmp_path / "o.nii.gz", "--inverse"],
         "defined on a 22x23x25 grid (moving image)"),
        ([out, tmp_path / "x.xyz", "--reference", f, "--out", tmp_path / "o.nii.gz"], "not an image file"),
        ([out, m, "--reference", f, "--out", tmp_path / "o.png"], "output images are"),
        ([out, run["dir"] / "fl.csv", "--reference", f, "--out", tmp_path / "o.fcsv"], "input format"),
        ([tmp_path, m, "--reference", f, "--out", tmp_path / "o.nii.gz"], "without transform.json"),
        ([out / "displacement.nii.gz", run["dir"] / "fl.csv", "--reference", f, "--out", tmp_path / "o.csv"],
         "does not name"),
        ([out, m, "--reference", f, "--out", out / "warped.nii.gz"], "already exists"),
        ([out, m, "--reference", f, "--out", m, "--overwrite"], "it is an input"),
        ([out, m, "--reference", f, "--out", tmp_path / "o.nii.gz", "--labels"], "non-integer values"),
        ([out, run["dir"] / "fl.csv", "--reference", f, "--out", tmp_path / "o.csv", "--labels"], "for images"),
        ([out, m, "--reference", f, "--out", tmp_path / "o.nii.gz", "--labels", "--interpolation", "bspline"],
         "nearest neighbour"),
    ]
    for argv, match in cases:
        _one_line(capsys, argv, match)
    assert not (tmp_path / "o.nii.gz").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
