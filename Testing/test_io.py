"""File I/O: round trips keep values and geometry; the ITK field has ITK's layout and LPS signs."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_labels, blob_volume, oblique_affine, write_nifti
from DEQRegistrationLib import io
from DEQRegistrationLib.errors import InputError
from DEQRegistrationLib.geometry import voxel_field_to_physical, voxel_to_physical_points
from DEQRegistrationLib.image import Image


def test_nifti_round_trip_3d_oblique(tmp_path):
    aff = oblique_affine()
    vol = blob_volume((12, 10, 8))
    img = Image(vol, aff)
    for name in ("a.nii", "a.nii.gz"):
        io.save_image(img, tmp_path / name)
        back = io.load_image(tmp_path / name)
        assert back.shape == (12, 10, 8) and back.data.dtype == np.float32
        np.testing.assert_array_equal(back.data, vol)
        np.testing.assert_allclose(back.affine, aff, atol=1e-5)
        # Both qform and sform carry the affine, so tools preferring either agree.
        hdr = nib.load(str(tmp_path / name)).header
        np.testing.assert_allclose(hdr.get_qform(), aff, atol=1e-5)
        np.testing.assert_allclose(hdr.get_sform(), aff, atol=1e-5)


def test_mgz_round_trip(tmp_path):
    aff = np.array([[-1.0, 0, 0, 64], [0, 0, 1.0, -60], [0, -1.0, 0, 70], [0, 0, 0, 1]])
    vol = blob_volume((16, 14, 12))
    nib.MGHImage(vol, aff).to_filename(str(tmp_path / "x.mgz"))
    back = io.load_image(tmp_path / "x.mgz")
    np.testing.assert_array_equal(back.data, vol)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    labels = blob_labels(vol).astype(np.int32)
    nib.MGHImage(labels, aff).to_filename(str(tmp_path / "seg.mgz"))
    seg = io.load_labels(tmp_path / "seg.mgz", like=back)
    np.testing.assert_array_equal(seg.data, labels)


@pytest.mark.parametrize("stored_shape", [(20, 16), (20, 16, 1)])
def test_2d_hw_and_hw1(tmp_path, stored_shape):
    aff = np.array([[-0.8, 0, 0, 10], [0, 0, 1.0, -3], [0, -1.2, 0, 5], [0, 0, 0, 1]])
    vol = blob_volume((20, 16)).reshape(stored_shape)
    write_nifti(tmp_path / "s.nii.gz", vol, aff)
    img = io.load_image(tmp_path / "s.nii.gz")
    assert img.shape == (20, 16) and img.ndim == 2
    np.testing.assert_allclose(img.affine, aff)  # 4x4 affine kept whole
    np.testing.assert_allclose(img.spacing, [0.8, 1.2])
    # Saved 2D images come back 2D with the same geometry.
    io.save_image(img, tmp_path / "out.nii.gz")
    assert nib.load(str(tmp_path / "out.nii.gz")).shape == (20, 16, 1)
    back = io.load_image(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)


def test_labels_saved_as_integers(tmp_path):
    labels = np.zeros((8, 9, 10), np.int32)
    labels[2:5, 3:6, 4:8] = 3
    labels[0, 0, 0] = 300
    io.save_labels(labels, oblique_affine(), tmp_path / "seg.nii.gz")
    loaded = nib.load(str(tmp_path / "seg.nii.gz"))
    assert loaded.get_data_dtype() == np.uint16
    back = io.load_labels(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(back.data, labels)
    # Labels stored as float but integer-valued are accepted as-is.
    write_nifti(tmp_path / "f.nii.gz", labels.astype(np.float32))
    assert io.load_labels(tmp_path / "f.nii.gz").data.dtype == np.int32


def test_4d_singleton_is_3d(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", blob_volume((8, 8, 8))[..., None])
    assert io.load_image(tmp_path / "v.nii.gz").shape == (8, 8, 8)


def test_itk_displacement_layout_and_lps(tmp_path):
    """A known voxel field on an oblique anisotropic grid must be stored in LPS mm, (X,Y,Z,1,3), intent 1007."""
    aff = oblique_affine()
    shape = (6, 5, 4)
    u = np.zeros((3,) + shape, np.float32)
    u[0] = 1.0  # one voxel along array axis 0 everywhere
    u[2, 1, 2, 3] = -2.0
    ras = voxel_field_to_physical(u, aff)  # (*S, 3) RAS mm
    lps = io.ras_to_lps(ras)
    io.save_itk_displacement(lps, aff, tmp_path / "d.nii.gz")

    raw = nib.load(str(tmp_path / "d.nii.gz"))
    assert raw.shape == (6, 5, 4, 1, 3)
    assert raw.get_data_dtype() == np.float32
    assert int(raw.header["intent_code"]) == 1007
    np.testing.assert_allclose(raw.affine, aff, atol=1e-5)
    stored = np.asarray(raw.dataobj)[:, :, :, 0, :]
    # Axis-0 step in RAS is aff[:3, 0]; in LPS its first two components flip sign.
    expected = aff[:3, 0] * np.array([-1, -1, 1])
    np.testing.assert_allclose(stored[0, 0, 0], expected, atol=1e-5)
    # Independently: fixed point x maps to x + d in the moving space, i.e. A(p + u).
    p = np.array([[1, 2, 3]])
    x_moved = voxel_to_physical_points(p + u[:, 1, 2, 3][None], aff)[0]
    x = voxel_to_physical_points(p, aff)[0]
    np.testing.assert_allclose(stored[1, 2, 3] * np.array([-1, -1, 1]), x_moved - x, atol=1e-5)

    back, back_aff = io.load_itk_displacement(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(back, lps, atol=1e-6)
    np.testing.assert_allclose(io.itk_displacement_to_voxel(back, back_aff), u, atol=1e-4)


def test_itk_displacement_2d(tmp_path):
    aff = np.array([[-1.0, 0, 0, 80], [0, 0, 1.0, -0.5], [0, -1.0, 0, 96], [0, 0, 0, 1]])
    u = np.stack([np.full((7, 5), 0.5, np.float32), np.full((7, 5), -1.0, np.float32)])
    lps = io.ras_to_lps(voxel_field_to_physical(u, aff))
    io.save_itk_displacement(lps, aff, tmp_path / "d2.nii.gz")
    assert nib.load(str(tmp_path / "d2.nii.gz")).shape == (7, 5, 1, 1, 3)
    back, back_aff = io.load_itk_displacement(tmp_path / "d2.nii.gz")
    assert back.shape == (7, 5, 3)
    # RAS (-0.5, 0, 1.0) -> LPS (0.5, 0, 1.0)
    np.testing.assert_allclose(back[0, 0], [0.5, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(io.itk_displacement_to_voxel(back, back_aff), u, atol=1e-5)


def test_load_itk_displacement_refuses_plain_image(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", blob_volume((8, 8, 8)))
    with pytest.raises(InputError, match="displacement field"):
        io.load_itk_displacement(tmp_path / "v.nii.gz")


def test_csv_landmarks_with_and_without_header(tmp_path):
    img = Image(np.zeros((10, 10, 10), np.float32), oblique_affine())
    pts = np.array([[1.0, 2.0, 3.0], [4.5, 5.5, 6.5]])
    (tmp_path / "a.csv").write_text("1,2,3\n4.5,5.5,6.5\n")
    (tmp_path / "b.csv").write_text("x,y,z\n1,2,3\n4.5,5.5,6.5\n\n")
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "a.csv", img), pts)
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "b.csv", img), pts)
    io.save_landmarks_csv(pts, tmp_path / "c.csv")
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "c.csv", img), pts)


def test_csv_landmarks_2d(tmp_path):
    img = Image(np.zeros((10, 12), np.float32), np.eye(4))
    (tmp_path / "a.csv").write_text("1,2,0\n3,4,0\n")
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "a.csv", img), [[1, 2], [3, 4]])
    (tmp_path / "b.csv").write_text("1,2,5\n")
    with pytest.raises(InputError, match="3 columns but the image is 2D"):
        io.load_landmarks(tmp_path / "b.csv", img)


def test_slicer_markups_to_voxels(tmp_path):
    """.fcsv (RAS or LPS) and .mrk.json (LPS) land on the voxels they name through the oblique affine."""
    aff = oblique_affine()
    img = Image(np.zeros((10, 10, 10), np.float32), aff)
    vox = np.array([[1.0, 2.0, 3.0], [7.0, 0.5, 4.25]])
    ras = voxel_to_physical_points(vox, aff)
    lps = ras * np.array([-1, -1, 1])

    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = RAS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"vtkMRMLMarkupsFiducialNode_{n},{x},{y},{z},0,0,0,1,1,1,0,F-{n},," for n, (x, y, z) in enumerate(ras)]
    (tmp_path / "p.fcsv").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "p.fcsv", img), vox, atol=1e-9)

    lines[1] = "# CoordinateSystem = LPS"
    lines[3:] = [f"id{n},{x},{y},{z},0,0,0,1,1,1,0,F-{n},," for n, (x, y, z) in enumerate(lps)]
    (tmp_path / "q.fcsv").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "q.fcsv", img), vox, atol=1e-9)

    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                      "Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "controlPoints": [{"id": str(n), "label": f"F-{n}", "position": list(p)}
                                          for n, p in enumerate(lps)]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(doc))
    np.testing.assert_allclose(io.load_landmarks(tmp_path / "p.mrk.json", img), vox, atol=1e-9)


def test_loaded_arrays_are_independent_of_their_files(tmp_path):
    """Loading copies the voxels: the file and the loaded array can change without affecting each other.

    An uncompressed float32 .nii is the case where nibabel would hand out a
    memory map of the file: rewriting the file in place would then change an
    image already loaded, and writing to the array could reach the file.
    """
    from conftest import file_hash

    vol = blob_volume((8, 9, 10))
    p = write_nifti(tmp_path / "v.nii", vol, oblique_affine(), dtype=np.float32)
    img = io.load_image(p)
    labels = io.load_labels(write_nifti(tmp_path / "s.nii", blob_labels(vol), dtype=np.int32))
    for arr in (img.data, labels.data):
        base = arr
        while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
            base = base.base
        assert not isinstance(base, np.memmap), "a loaded array is a view of a memory-mapped file"

    # Rewrite the file's voxels in place: the image loaded before must keep its values ...
    offset = nib.load(str(p)).dataobj.offset
    with open(p, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.zeros(vol.size, np.float32).tobytes())
    np.testing.assert_array_equal(img.data, vol)
    assert np.count_nonzero(np.asanyarray(nib.load(str(p)).dataobj)) == 0  # ... though the file did change

    # ... and editing the loaded array leaves the file as it is.
    before = file_hash(p)
    img.data[...] = 7.0
    assert file_hash(p) == before


def test_slicer_reads_displacement_as_transform(tmp_path):
    """An independent reader: Slicer's transform storage node loads the file as a grid transform whose
    FromParent (resampling) direction maps fixed point A p to A (p + u(p)), on an oblique anisotropic grid."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLTransformStorageNode"):
        pytest.skip("this slicer package has no MRML transform storage node")
    aff = oblique_affine()
    shape = (10, 9, 8)
    g = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    u = np.stack([0.3 + 0.05 * g[1], -0.4 + 0.02 * g[0], 0.2 + 0.03 * g[2]]).astype(np.float32)
    io.save_itk_displacement(io.ras_to_lps(voxel_field_to_physical(u, aff)), aff, tmp_path / "d.nii.gz")

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "d.nii.gz"))
    assert storage.ReadData(node)
    tf = node.GetTransformFromParent()
    vox = np.array([[4.0, 3.0, 2.0], [7.0, 5.0, 6.0], [1.0, 8.0, 3.0]])
    idx = vox.astype(int)
    moved = vox + u[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    for x, expected in zip(voxel_to_physical_points(vox, aff), voxel_to_physical_points(moved, aff)):
        np.testing.assert_allclose(tf.TransformPoint(*x), expected, atol=1e-3)
