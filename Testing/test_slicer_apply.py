"""The Slicer module's output transform is the transform ``deqreg apply`` uses, on the same data.

Same files (NRRD, so Slicer's reader and deqreg's get bit-identical geometry),
same settings: the module's logic (``RegistrationLogic.register``, which
writes a ``vtkMRMLGridTransformNode``) and ``deqreg register`` give the same
field, value for value; Slicer's own transform storage node writes that node
to files which ``deqreg apply`` reads to the same warped image; and Slicer's
TransformPoint (FromParent) maps fixed-space landmarks to where
``deqreg apply`` maps them.
"""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("SimpleITK", reason="the optional 'formats' extra (SimpleITK) is not installed")
pytest.importorskip("torch")
import slicer.util  # noqa: E402

from conftest import blob_volume, oblique_affine  # noqa: E402
from DEQRegistrationLib import io  # noqa: E402
from DEQRegistrationLib.cli import main  # noqa: E402
from DEQRegistrationLib.geometry import voxel_to_physical_points  # noqa: E402
from DEQRegistrationLib.image import Image  # noqa: E402

STEPS = 12
FIXED_AFFINE = oblique_affine(spacing=(1.4, 1.2, 1.6), angles=(0.1, -0.05, 0.2), origin=(-17.0, 14.0, 6.0))
MOVING_AFFINE = oblique_affine(spacing=(1.3, 1.5, 1.25), angles=(0.15, 0.05, 0.1), origin=(-16.0, 13.0, 7.0))


def _matrix(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _load(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from DEQRegistrationSlicerLib import RegistrationLogic

    d = tmp_path_factory.mktemp("slicer_apply")
    fixed = io.save_image(Image(blob_volume((24, 24, 24)), FIXED_AFFINE), d / "f.nrrd")
    moving = io.save_image(Image(blob_volume((22, 23, 25), centre_shift=(1.0, -1.0, 1.0)), MOVING_AFFINE),
                           d / "m.nrrd")
    # Two independent runs (the command on the files, the module on the nodes Slicer read from them) are
    # compared value for value, so both skip the linear stage: its line search takes discrete branches, and
    # the 1e-9 differences between the two readers' direction matrices may take another one. The linear
    # part's files and their composition are tested on one run (test_apply.py, the affine slot).
    assert main([str(a) for a in ["register", fixed, moving, "--out", d / "out", "--max-steps", STEPS,
                                  "--device", "cpu", "--init", "none"]]) == 0
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    outputs = RegistrationLogic(scene).register(_load(scene, fixed), _load(scene, moving), max_steps=STEPS,
                                                device="cpu", init="none")
    return dict(dir=d, out=d / "out", fixed=fixed, moving=moving, scene=scene, node=outputs.transform)


def _total_ras(both):
    """The saved transform (displacement.nii.gz, then affine.tfm) as one RAS field on the fixed grid."""
    import torch

    from DEQRegistrationLib.apply import load
    from DEQRegistrationLib.geometry import voxel_field_to_physical
    from DEQRegistrationLib.sampling import Sampler

    fixed = io.load_image(both["fixed"])
    t = load(both["out"], fixed)
    sampler = Sampler(fixed.shape, fixed.affine, t.moving.affine, world=t.world)
    total = sampler.composed_displacement(torch.as_tensor(t.displacement, dtype=torch.float64)[None])[0].numpy()
    return voxel_field_to_physical(total, fixed.affine)


def test_grid_transform_holds_the_saved_field(both):
    """Same grid, same vectors: the module's FromParent field is displacement.nii.gz in RAS, value for value."""
    node = both["node"]
    assert node.IsA("vtkMRMLGridTransformNode")
    tf = node.GetTransformFromParent()
    grid = tf.GetDisplacementGrid()
    manifest = json.loads((both["out"] / "transform.json").read_text())
    fixed_affine = np.asarray(manifest["fixed_grid"]["affine_ras"])
    spacing = np.linalg.norm(fixed_affine[:3, :3], axis=0)
    assert tuple(grid.GetDimensions()) == tuple(manifest["fixed_grid"]["shape"])
    np.testing.assert_allclose(grid.GetOrigin(), fixed_affine[:3, 3], atol=1e-9)
    np.testing.assert_allclose(grid.GetSpacing(), spacing, atol=1e-9)
    np.testing.assert_allclose(_matrix(tf.GetGridDirectionMatrix())[:3, :3], fixed_affine[:3, :3] / spacing,
                               atol=1e-9)
    ras = slicer.util.arrayFromGridTransform(node).transpose(2, 1, 0, 3)
    # the node holds the whole transform as one field; the saved result is the field, then affine.tfm
    assert np.abs(ras).max() > 0.5  # a real deformation
    np.testing.assert_allclose(ras, _total_ras(both), atol=1e-4)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_slicer_saved_transform_applies_like_the_result(both, tmp_path, suffix):
    """Slicer's transform storage node writes the node; deqreg apply reads that file to the run's warped image."""
    storage = both["scene"].AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / f"slicer_field{suffix}"))
    assert storage.WriteData(both["node"])
    assert main([str(a) for a in ["apply", tmp_path / f"slicer_field{suffix}", both["moving"], "--reference",
                                  both["fixed"], "--out", tmp_path / "w.nii.gz"]]) == 0
    got = io.load_image(tmp_path / "w.nii.gz").data
    want = io.load_image(both["out"] / "warped.nii.gz").data
    assert np.abs(got - want).max() <= 1e-4  # one composed field vs field then affine: float32 rounding


def test_slicer_maps_landmarks_where_apply_does(both, tmp_path):
    vox = np.array([[11.5, 11.5, 11.5], [8.0, 12.0, 10.0], [14.0, 9.0, 12.5]])
    ras = voxel_to_physical_points(vox, io.load_image(both["fixed"]).affine)
    lines = ["# Markups fiducial file version = 5.0", "# CoordinateSystem = RAS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"{n},{x!r},{y!r},{z!r},0,0,0,1,1,1,0,F-{n},," for n, (x, y, z) in enumerate(ras.tolist())]
    (tmp_path / "p.fcsv").write_text("\n".join(lines) + "\n")
    assert main([str(a) for a in ["apply", both["out"], tmp_path / "p.fcsv", "--reference", both["fixed"],
                                  "--out", tmp_path / "q.fcsv"]]) == 0
    moved = io.read_points(tmp_path / "q.fcsv").points
    tf = both["node"].GetTransformFromParent()
    for x, y in zip(ras, moved):
        np.testing.assert_allclose(tf.TransformPoint(*x), y, atol=1e-3)
