"""The real OASIS pair (a crop) as NRRD, MetaImage and a DICOM series registers as it does from NIfTI;
forward then inverse brings brain voxels back.

Reads the shared data at run time (skips when absent). The crop is written by
the test with nibabel (NIfTI), SimpleITK (NRRD, MetaImage) and GDCM through
SimpleITK (DICOM: int16 with rescale slope 1/255, which holds OASIS's k/255
intensities exactly). OASIS's voxel axes are left-handed; DICOM orders slices
along row x col, which would reverse k. So every file holds the crop with k
reversed and the affine to match: the same image in physical space, and the
same voxel order in every format (a registration is only float-identical on
identical voxel grids).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from DEQRegistrationLib import apply, io
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.geometry import voxel_to_physical_points

sitk = pytest.importorskip("SimpleITK", reason="the optional 'formats' extra (SimpleITK) is not installed")
from itk_files import lps_geometry, write_dicom_series  # noqa: E402

CROP = (slice(56, 104), slice(72, 136), slice(84, 140))  # (i, j, k) of the 160 x 192 x 224 volumes
STEPS = "20"
FORMATS = ("nii", "nrrd", "mha", "dicom")


def _crop(path):
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)[CROP][:, :, ::-1]
    affine = img.affine.copy()
    corner = np.array([CROP[0].start, CROP[1].start, CROP[2].stop - 1, 1.0])
    affine[:3, 3] = (img.affine @ corner)[:3]
    affine[:3, 2] *= -1
    return np.ascontiguousarray(data), affine


def _write(folder, name, data, affine, fmt, labels=False):
    """One volume in one format; returns the path to hand to deqreg."""
    import nibabel as nib

    if fmt == "nii":
        nib.Nifti1Image(data, affine).to_filename(str(folder / f"{name}.nii.gz"))
        return folder / f"{name}.nii.gz"
    if fmt == "dicom":
        uid = "1.2.826.0.1.3680043.2.1125.9." + str(abs(hash(name)) % 10**8)
        write_dicom_series(folder / name, data, affine, uid=uid, description=name,
                           slope=None if labels else 1 / 255)
        return folder / name
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    origin, spacing, direction = lps_geometry(affine)
    img.SetOrigin(tuple(origin))
    img.SetSpacing(tuple(spacing))
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(folder / f"{name}.{fmt}"), useCompression=True)
    return folder / f"{name}.{fmt}"


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    oasis = shared_data / "oasis3d"
    if not oasis.is_dir():
        pytest.skip(f"{oasis} is absent")
    d = tmp_path_factory.mktemp("oasis_files")
    vols = {role: _crop(oasis / f"OAS1_000{n}_{kind}.nii.gz")
            for role, n, kind in [("fixed", 1, "norm"), ("moving", 2, "norm"), ("fixed_seg", 1, "seg35"),
                                  ("moving_seg", 2, "seg35")]}
    out = {}
    for fmt in FORMATS:
        folder = d / fmt
        folder.mkdir()
        paths = {role: _write(folder, role, data, aff, fmt, labels=role.endswith("seg"))
                 for role, (data, aff) in vols.items()}
        argv = ["register", paths["fixed"], paths["moving"], "--fixed-seg", paths["fixed_seg"], "--moving-seg",
                paths["moving_seg"], "--out", folder / "out", "--max-steps", STEPS, "--device", "cpu",
                "--init", "none"]  # the field's files and conventions; test_alignment covers affine.tfm
        argv += {"nii": ["--inverse"], "nrrd": ["--format", "nrrd"]}.get(fmt, [])
        assert main([str(a) for a in argv]) == 0, fmt
        out[fmt] = dict(paths=paths, out=folder / "out", vols=vols)
    return out


def test_every_format_reads_the_same_arrays_and_geometry(runs):
    ref = {role: io.load_image(p) if not role.endswith("seg") else io.load_labels(p)
           for role, p in runs["nii"]["paths"].items()}
    for fmt in FORMATS[1:]:
        for role, p in runs[fmt]["paths"].items():
            got = io.load_labels(p) if role.endswith("seg") else io.load_image(p)
            np.testing.assert_array_equal(got.data, ref[role].data, err_msg=f"{fmt} {role}")
            np.testing.assert_allclose(got.affine, ref[role].affine, atol=1e-6, err_msg=f"{fmt} {role}")


def test_every_format_registers_to_the_nifti_result(runs):
    base = json.loads((runs["nii"]["out"] / "metrics.json").read_text())
    field, aff = io.load_itk_displacement(runs["nii"]["out"] / "displacement.nii.gz")
    assert base["dice_mean"] > base["dice_before"] + 0.05  # a real registration happened
    for fmt in FORMATS[1:]:
        out = runs[fmt]["out"]
        m = json.loads((out / "metrics.json").read_text())
        assert abs(m["dice_mean"] - base["dice_mean"]) <= 1e-3, fmt
        name = "displacement.nrrd" if fmt == "nrrd" else "displacement.nii.gz"
        f2, a2 = io.load_itk_displacement(out / name)
        np.testing.assert_allclose(a2, aff, atol=1e-4)
        assert np.abs(f2 - field).max() <= 1e-4, fmt  # mm
    assert (runs["nrrd"]["out"] / "warped_seg.nrrd").is_file()
    assert json.loads((runs["nrrd"]["out"] / "transform.json").read_text())["forward"]["displacement"] == \
        "displacement.nrrd"


def test_forward_then_inverse_brings_brain_voxels_back(runs):
    """Fixed brain voxels -> moving space (forward field) -> fixed space (inverse): 95th percentile of the
    distance back < 0.1 voxel. The inverse is solved at the points; the saved gridded inverse is exact at
    moving voxels, checked by inverse then forward there."""
    r = runs["nii"]
    fixed, moving = io.load_image(r["paths"]["fixed"]), io.load_image(r["paths"]["moving"])
    seg = io.load_labels(r["paths"]["fixed_seg"]).data
    t = apply.load(r["out"], fixed)
    p = np.argwhere(seg > 0).astype(np.float64)
    there, _ = t.points(voxel_to_physical_points(p, fixed.affine))
    back, info = t.points(there, inverse=True)
    err = np.linalg.norm(np.linalg.solve(fixed.affine[:3, :3], (back - voxel_to_physical_points(p, fixed.affine)).T),
                         axis=0)
    assert np.percentile(err, 95) < 0.1, np.percentile(err, [50, 95, 99])
    assert info["residual"] < 1e-2

    ti = apply.load(r["out"], moving, inverse=True)
    assert ti.inverse is not None and ti.inverse_info["residual"] < 1e-2
    mask = io.load_labels(r["out"] / "inverse_unreliable.nii.gz").data
    m = np.argwhere(mask == 0).astype(np.float64)
    from DEQRegistrationLib.sampling import Sampler
    x = voxel_to_physical_points(Sampler(moving.shape, moving.affine, fixed.affine).points(m, ti.inverse),
                                 fixed.affine)   # inverse at moving voxels (no interpolation of the inverse)
    y, _ = t.points(x)
    err_m = np.linalg.norm(np.linalg.solve(moving.affine[:3, :3], (y - voxel_to_physical_points(m, moving.affine)).T),
                           axis=0)
    assert np.percentile(err_m, 95) < 0.01, np.percentile(err_m, [50, 95, 99])
