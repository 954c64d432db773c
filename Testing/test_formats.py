"""NRRD, MetaImage and DICOM: read with the geometry other tools give them, written so other tools agree.

Files are written by SimpleITK/GDCM or by hand (not by deqreg) where reading
is tested, and read back by SimpleITK, Slicer's storage nodes or pydicom
(not by deqreg) where writing is tested. Grids are oblique and anisotropic,
the case where LPS/RAS, axis-order and spacing mistakes show.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import blob_labels, blob_volume, oblique_affine, write_nifti
from DEQRegistrationLib import io
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.errors import InputError
from DEQRegistrationLib.geometry import voxel_field_to_physical, voxel_to_physical_points
from DEQRegistrationLib.image import Image

sitk = pytest.importorskip("SimpleITK", reason="the optional 'formats' extra (SimpleITK) is not installed")
from itk_files import dicom_affine_from_tags, lps_geometry, write_dicom_series  # noqa: E402

SHAPE = (9, 8, 7)
LPS = np.diag([-1.0, -1.0, 1.0])


def _sitk_image(data, affine, vector=False):
    """A SimpleITK image of (i, j, k) data with the geometry of a RAS affine (converted by the test helper)."""
    order = (2, 1, 0, 3) if vector else (2, 1, 0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(order)), isVector=vector)
    origin, spacing, direction = lps_geometry(affine)
    img.SetOrigin(tuple(origin))
    img.SetSpacing(tuple(spacing))
    img.SetDirection(tuple(direction.ravel()))
    return img


def _ras_of_index(img, idx):
    """RAS position of voxel index (i, j, k) according to SimpleITK."""
    return LPS @ np.asarray(img.TransformIndexToPhysicalPoint(tuple(int(v) for v in idx)))


def _one_error_line(capsys, argv, match):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deqreg: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_files_read_with_their_geometry(tmp_path, suffix):
    aff = oblique_affine()
    vol = blob_volume(SHAPE)
    img = _sitk_image(vol, aff)
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    back = io.load_image(tmp_path / f"v{suffix}")
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back.data, vol)
    np.testing.assert_allclose(back.affine, aff, atol=1e-9)
    # Independently of the affine formula: SimpleITK's own index -> physical mapping.
    for idx in [(0, 0, 0), (8, 0, 0), (0, 7, 0), (3, 5, 6)]:
        np.testing.assert_allclose(back.affine[:3] @ np.r_[idx, 1], _ras_of_index(img, idx), atol=1e-9)

    labels = blob_labels(vol).astype(np.uint16) * 300
    sitk.WriteImage(_sitk_image(labels, aff), str(tmp_path / f"s{suffix}"))
    seg = io.load_labels(tmp_path / f"s{suffix}", like=back)
    assert seg.data.dtype == np.int32
    np.testing.assert_array_equal(seg.data, labels)


@pytest.mark.parametrize("space,flip", [("right-anterior-superior", np.eye(3)), ("left-posterior-superior", LPS)])
def test_hand_written_nrrd_header_in_ras_or_lps_space(tmp_path, space, flip):
    """A detached NRRD header written by hand: the affine is the header's vectors, read in their space."""
    dirs = np.array([[0.0, 1.2, 0.0], [0.0, 0.0, -0.9], [2.0, 0.5, 0.0]])  # space directions, one row per axis
    origin = np.array([10.0, -20.0, 30.0])
    vol = blob_volume(SHAPE).astype(np.float32)
    (tmp_path / "v.raw").write_bytes(vol.transpose(2, 1, 0).tobytes())  # NRRD: fastest axis first
    header = ["NRRD0004", "type: float", "dimension: 3", f"space: {space}", "sizes: 9 8 7",
              "space directions: " + " ".join("(" + ",".join(f"{v:.17g}" for v in d) + ")" for d in dirs),
              "kinds: domain domain domain", "endian: little", "encoding: raw",
              "space origin: (" + ",".join(f"{v:.17g}" for v in origin) + ")", "data file: v.raw"]
    (tmp_path / "v.nhdr").write_text("\n".join(header) + "\n")
    img = io.load_image(tmp_path / "v.nhdr")
    np.testing.assert_array_equal(img.data, vol)
    expected = np.eye(4)
    expected[:3, :3] = flip @ dirs.T   # columns = axis directions, in RAS
    expected[:3, 3] = flip @ origin
    np.testing.assert_allclose(img.affine, expected, atol=1e-12)


def test_nifti_converted_by_simpleitk_reads_the_same(tmp_path):
    """nibabel writes an oblique NIfTI, SimpleITK converts it to NRRD and MetaImage: deqreg reads one geometry."""
    aff = oblique_affine()
    vol = blob_volume(SHAPE)
    write_nifti(tmp_path / "v.nii.gz", vol, aff, dtype=np.float32)
    ref = io.load_image(tmp_path / "v.nii.gz")
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")), str(tmp_path / f"v{suffix}"))
        got = io.load_image(tmp_path / f"v{suffix}")
        np.testing.assert_array_equal(got.data, ref.data)
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)  # NIfTI's sform is float32


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_written_files_read_by_simpleitk_and_slicer(tmp_path, suffix):
    aff = oblique_affine()
    vol = blob_volume(SHAPE)
    io.save_image(Image(vol, aff), tmp_path / f"v{suffix}")
    labels = blob_labels(vol)
    io.save_labels(labels, aff, tmp_path / f"s{suffix}")
    img = sitk.ReadImage(str(tmp_path / f"v{suffix}"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol)
    for idx in [(0, 0, 0), (8, 7, 6), (2, 3, 4)]:
        np.testing.assert_allclose(_ras_of_index(img, idx), aff[:3] @ np.r_[idx, 1], atol=1e-9)
    seg = sitk.ReadImage(str(tmp_path / f"s{suffix}"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg).transpose(2, 1, 0), labels)

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import vtk
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / f"v{suffix}"))
    assert storage.ReadData(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], aff, atol=1e-6)


def test_2d_image_in_metaimage_and_nrrd(tmp_path):
    img2 = sitk.GetImageFromArray(blob_volume((20, 16)).T.copy())  # a genuinely 2D ITK image (x = i)
    img2.SetSpacing((0.8, 1.3))
    img2.SetOrigin((5.0, -7.0))
    c, s = np.cos(0.4), np.sin(0.4)
    img2.SetDirection((c, -s, s, c))
    sitk.WriteImage(img2, str(tmp_path / "s.mha"))
    im = io.load_image(tmp_path / "s.mha")
    assert im.shape == (20, 16)
    for idx in [(0, 0), (19, 0), (4, 15)]:
        lps = np.r_[img2.TransformIndexToPhysicalPoint(idx), 0.0]
        np.testing.assert_allclose(im.affine[:3] @ np.r_[idx, 0, 1], LPS @ lps, atol=1e-9)
    io.save_image(im, tmp_path / "back.nrrd")  # written as a one-slice volume, read back 2D
    back = io.load_image(tmp_path / "back.nrrd")
    assert back.shape == (20, 16)
    np.testing.assert_array_equal(back.data, im.data)
    np.testing.assert_allclose(back.affine[:3, [0, 1, 3]], im.affine[:3, [0, 1, 3]], atol=1e-9)


# --- DICOM -----------------------------------------------------------------------------


def _series(tmp_path, name="dcm", affine=None, uid="1.2.826.0.1.3680043.2.1125.7.1", data=None, **kw):
    affine = oblique_affine(spacing=(0.9, 1.1, 2.5)) if affine is None else affine
    data = (np.rint(blob_volume(SHAPE) * 200) / 255).astype(np.float32) if data is None else data
    files = write_dicom_series(tmp_path / name, data, affine, uid=uid, slope=1 / 255 if data.dtype.kind == "f"
                               else None, **kw)
    return tmp_path / name, files, data, affine


def test_simpleitk_calls_give_the_locale_back():
    """GDCM's DICOM writer sets LC_ALL to "C" (Python then writes text files as ASCII): the library's
    SimpleITK calls, and the test helper, restore the caller's locale."""
    import locale

    from DEQRegistrationLib import formats

    before = locale.setlocale(locale.LC_ALL)
    with formats._Quiet(sitk):
        locale.setlocale(locale.LC_ALL, "C")
    assert locale.setlocale(locale.LC_ALL) == before


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_dicom_series_oblique_anisotropic(tmp_path, modality):
    import locale

    before = locale.setlocale(locale.LC_ALL)
    folder, files, data, aff = _series(tmp_path, modality=modality)
    assert locale.setlocale(locale.LC_ALL) == before
    img = io.load_image(folder)
    np.testing.assert_array_equal(img.data, data)  # rescale slope applied, exact in float32
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    # One file of the series names the series.
    np.testing.assert_array_equal(io.load_image(files[3]).data, data)
    if modality == "CT":  # classic files: the geometry computed from their tags by pydicom, without ITK
        pytest.importorskip("pydicom")
        np.testing.assert_allclose(img.affine, dicom_affine_from_tags(files), atol=1e-6)


def test_dicom_left_handed_source_keeps_every_voxel_in_place(tmp_path):
    """OASIS-like left-handed voxel axes: DICOM orders slices along row x col, so the k axis comes back
    reversed, and every value must still sit at the same RAS position."""
    aff = np.array([[-1.0, 0, 0, 80], [0, 0, 1.0, -112], [0, -1.0, 0, 96], [0, 0, 0, 1]])
    aff[:3, :3] = aff[:3, :3] @ np.diag([1.0, 1.2, 0.8])
    folder, _, data, _ = _series(tmp_path, affine=aff)
    img = io.load_image(folder)
    assert np.linalg.det(img.affine[:3, :3]) > 0  # right-handed as read
    np.testing.assert_array_equal(img.data, data[:, :, ::-1])
    np.testing.assert_allclose(img.affine[:3] @ np.r_[2, 3, SHAPE[2] - 1 - 4, 1], aff[:3] @ np.r_[2, 3, 4, 1],
                               atol=1e-6)


def test_dicom_label_map_series(tmp_path):
    labels = blob_labels(blob_volume(SHAPE)).astype(np.int16) * 7
    folder, _, _, aff = _series(tmp_path, data=labels)
    seg = io.load_labels(folder)
    np.testing.assert_array_equal(seg.data, labels)
    np.testing.assert_allclose(seg.affine, aff, atol=1e-6)


def test_dicom_folder_with_two_series_lists_them(tmp_path, pair3d, capsys):
    _series(tmp_path, "two", uid="1.2.826.0.1.3680043.2.1125.7.1", description="first")
    _series(tmp_path, "two", uid="1.2.826.0.1.3680043.2.1125.7.2", description="second")
    line = _one_error_line(capsys, ["register", tmp_path / "two", pair3d["moving"], "--out", tmp_path / "o"],
                           "holds 2 DICOM series")
    assert "1.2.826.0.1.3680043.2.1125.7.1 (7 files, 'first')" in line
    assert "1.2.826.0.1.3680043.2.1125.7.2 (7 files, 'second')" in line
    # Picking the series by one of its files works.
    files = sorted((tmp_path / "two").glob("*.dcm"))
    assert io.load_image(files[0]).shape == SHAPE


def test_unreadable_dicom_is_one_line(tmp_path, pair3d, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 50)
    _one_error_line(capsys, ["register", tmp_path / "junk", pair3d["moving"], "--out", tmp_path / "o"],
                    "is a folder with no DICOM series")
    _one_error_line(capsys, ["register", tmp_path / "junk" / "a.dcm", pair3d["moving"], "--out", tmp_path / "o"],
                    "cannot read")
    # A series with a missing slice in the middle: refused, not silently stretched.
    folder, files, _, _ = _series(tmp_path, "gap")
    files[3].unlink()
    _one_error_line(capsys, ["register", folder, pair3d["moving"], "--out", tmp_path / "o"],
                    "unevenly spaced slices")
    # A series with one file whose pixel data is cut short.
    folder, files, _, _ = _series(tmp_path, "cut")
    files[2].write_bytes(files[2].read_bytes()[:-40])
    _one_error_line(capsys, ["register", folder, pair3d["moving"], "--out", tmp_path / "o"], "cannot read")
    assert not (tmp_path / "o").exists()


def test_unknown_format_is_one_line(tmp_path, pair3d, capsys):
    (tmp_path / "a.xyz").write_bytes(b"\0" * 64)
    line = _one_error_line(capsys, ["register", tmp_path / "a.xyz", pair3d["moving"], "--out", tmp_path / "o"],
                           "not an image file")
    assert ".nrrd" in line and "DICOM" in line


def test_without_simpleitk_the_error_names_the_extra(tmp_path, monkeypatch):
    sitk.WriteImage(_sitk_image(blob_volume(SHAPE), np.eye(4)), str(tmp_path / "v.nrrd"))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    with pytest.raises(InputError, match=r'pip install "deqreg\[formats\]"'):
        io.load_image(tmp_path / "v.nrrd")
    with pytest.raises(InputError, match=r"is a folder, not a file.*deqreg\[formats\]"):
        io.load_image(tmp_path)
    # NIfTI needs no extra.
    write_nifti(tmp_path / "v.nii.gz", blob_volume(SHAPE))
    assert io.load_image(tmp_path / "v.nii.gz").shape == SHAPE


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_register_format_option_writes_every_image_in_that_format(pair3d, tmp_path, fmt):
    out = tmp_path / "out"
    assert main([str(a) for a in ["register", pair3d["fixed"], pair3d["moving"], "--fixed-seg", pair3d["fixed_seg"],
                                  "--moving-seg", pair3d["moving_seg"], "--out", out, "--max-steps", "2",
                                  "--device", "cpu", "--format", fmt]]) == 0
    images = {p.name for p in out.iterdir() if p.suffix not in (".json", ".csv")}
    # affine.tfm: the alignment moved (an ITK text transform whatever --format says)
    assert images - {"affine.tfm"} == {f"{n}.{fmt}" for n in ("warped", "displacement", "jacobian", "folding_mask",
                                                               "warped_seg")}
    fixed = io.load_image(pair3d["fixed"])
    warped = sitk.ReadImage(str(out / f"warped.{fmt}"))
    np.testing.assert_allclose(_ras_of_index(warped, (3, 4, 5)), fixed.affine[:3] @ np.r_[3, 4, 5, 1], atol=1e-6)
    assert sitk.ReadImage(str(out / f"warped_seg.{fmt}")).GetPixelID() == sitk.sitkUInt8
    field, aff = io.load_itk_displacement(out / f"displacement.{fmt}")
    assert field.shape == fixed.shape + (3,)

# --- displacement fields and affines for other tools ---------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_displacement_field_formats_read_by_simpleitk_and_slicer(tmp_path, suffix):
    """The field in each output format is the same ITK transform: fixed point A p maps to A (p + u(p))."""
    aff = oblique_affine()
    shape = (10, 9, 8)
    g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    u = np.stack([0.3 + 0.05 * g[1], -0.4 + 0.02 * g[0], 0.2 + 0.03 * g[2]]).astype(np.float32)
    lps = io.ras_to_lps(voxel_field_to_physical(u, aff))
    path = io.save_itk_displacement(lps, aff, tmp_path / f"d{suffix}")
    back, back_aff = io.load_itk_displacement(path)
    np.testing.assert_allclose(back, lps, atol=1e-6)
    np.testing.assert_allclose(back_aff, aff, atol=1e-5)

    vox = np.array([[4.0, 3.0, 2.0], [7.0, 5.0, 6.0], [1.0, 8.0, 3.0]])
    idx = vox.astype(int)
    expected = voxel_to_physical_points(vox + u[:, idx[:, 0], idx[:, 1], idx[:, 2]].T, aff)
    start = voxel_to_physical_points(vox, aff)
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    if field.GetDimension() == 4:  # ITK reads the 5D NIfTI as a 4D image with one time point
        pytest.skip("this SimpleITK reads the 5D NIfTI field as 4D")
    tf = sitk.DisplacementFieldTransform(field)
    for x, y in zip(start, expected):
        np.testing.assert_allclose(LPS @ tf.TransformPoint(tuple(LPS @ x)), y, atol=1e-4)

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    t = node.GetTransformFromParent()
    for x, y in zip(start, expected):
        np.testing.assert_allclose(t.TransformPoint(*x), y, atol=1e-3)


def test_itk_affine_file_round_trip_with_simpleitk(tmp_path):
    rng = np.random.default_rng(1)
    W = np.eye(4)
    W[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] @ np.diag([1.1, 0.9, 1.05])
    W[:3, 3] = [4.0, -3.0, 2.5]
    io.save_itk_affine(W, tmp_path / "a.tfm")
    tf = sitk.ReadTransform(str(tmp_path / "a.tfm"))
    for x in rng.normal(scale=50, size=(4, 3)):
        np.testing.assert_allclose(LPS @ tf.TransformPoint(tuple(LPS @ x)), W[:3, :3] @ x + W[:3, 3], atol=1e-9)
    # An ITK affine with a centre of rotation, written by SimpleITK, reads as the same mapping.
    a = sitk.AffineTransform(3)
    a.SetMatrix(tuple(rng.normal(size=9) * 0.1 + np.eye(3).ravel()))
    a.SetTranslation((1.0, 2.0, -3.0))
    a.SetCenter((10.0, -5.0, 7.0))
    sitk.WriteTransform(a, str(tmp_path / "b.tfm"))
    M = io.load_itk_affine(tmp_path / "b.tfm")
    for x in rng.normal(scale=50, size=(4, 3)):
        np.testing.assert_allclose(M[:3, :3] @ x + M[:3, 3], LPS @ a.TransformPoint(tuple(LPS @ x)), atol=1e-9)
    (tmp_path / "c.tfm").write_text("#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n")
    with pytest.raises(InputError, match="expected a 3D affine"):
        io.load_itk_affine(tmp_path / "c.tfm")
