"""The README's scripting snippet on the real OASIS 3D pair, with the module's own class, on slicer-core.

``DEQRegistration.DEQRegistrationLogic`` is the class the README names; it
is imported from the module file with the stand-ins of test_slicer_module.py
(no Qt, no Slicer application here). The Dice it reports is then checked
independently of the library: every fixed voxel centre is carried through
the *output transform node* by VTK (what applying the transform in Slicer
does), looked up nearest-neighbour in the moving label map, and Dice is
computed here with plain numpy. So the test fails if the transform in the
scene does not carry the labels to the Dice the module reports.

Reads the shared OASIS data at run time (skips when absent). To stay within
about 1.5 minutes on 2 CPU cores it registers a central 96 x 112 x 112 mm
sub-volume (crop of both images and label maps, geometry kept through the
IJKToRAS origin) with the gradient update and a 45-step budget.
"""
import importlib
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

CROP = (slice(32, 128), slice(40, 152), slice(56, 168))  # (i, j, k) voxels of the 160x192x224 volumes


def load_cropped(folder, name, labelmap=False):
    """A cropped OASIS volume as a node: (i, j, k) -> Slicer (k, j, i), origin moved to the crop corner."""
    import slicer.util
    img = nib.load(os.path.join(folder, name))
    data = np.asarray(img.dataobj)[CROP]
    affine = img.affine.copy()
    affine[:3, 3] = (img.affine @ np.array([CROP[0].start, CROP[1].start, CROP[2].start, 1.0]))[:3]
    data = data.astype(np.int16) if labelmap else data.astype(np.float32)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, name, cls)


def labels_through_transform(transformNode, fixedNode, movingLabelsNode):
    """The moving labels at the fixed voxel centres, carried by VTK through the transform node (nearest)."""
    import vtk
    import slicer.util
    from vtk.util import numpy_support
    from DEQRegistrationSlicerLib import mrml, testing
    shape = slicer.util.arrayFromVolume(fixedNode).shape
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(testing.ras_grid(shape, mrml.ijk_to_ras(fixedNode)), deep=True))
    moved = vtk.vtkPoints()
    transformNode.GetTransformFromParent().TransformPoints(points, moved)
    ras = numpy_support.vtk_to_numpy(moved.GetData()).astype(np.float64)
    ijk = (np.linalg.inv(mrml.ijk_to_ras(movingLabelsNode)) @ np.c_[ras, np.ones(len(ras))].T)[:3]
    kji = np.rint(ijk[::-1]).astype(int)
    labels = slicer.util.arrayFromVolume(movingLabelsNode)
    inside = np.all((kji >= 0) & (kji < np.array(labels.shape)[:, None]), axis=0)
    out = np.zeros(kji.shape[1], labels.dtype)
    out[inside] = labels[tuple(kji[:, inside])]
    return out.reshape(shape)


def mean_dice(a, b):
    values = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    scores = [2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in values
              if np.any(a == v) and np.any(b == v)]
    return float(np.mean(scores))


@pytest.fixture
def module():
    from test_slicer_module import STANDINS
    saved = {k: sys.modules.get(k) for k in ("qt", "ctk", "slicer.ScriptedLoadableModule", "DEQRegistration")}
    exec(STANDINS, {})
    sys.modules.pop("DEQRegistration", None)
    yield importlib.import_module("DEQRegistration")
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def test_readme_snippet_on_real_oasis_pair(shared_data, module):
    import slicer.util
    folder = shared_data / "oasis3d"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    DEQRegistration = module
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixedNode = load_cropped(folder, "OAS1_0001_norm.nii.gz")
    movingNode = load_cropped(folder, "OAS1_0002_norm.nii.gz")
    fixedLabels = load_cropped(folder, "OAS1_0001_seg35.nii.gz", labelmap=True)
    movingLabels = load_cropped(folder, "OAS1_0002_seg35.nii.gz", labelmap=True)
    movingBefore = slicer.util.arrayFromVolume(movingNode).copy()

    # --- the README snippet -------------------------------------------------------------
    def report(progress):
        if progress.step % 15 == 0:
            print(f"step {progress.step}: residual {progress.residual:.3g}")

    logic = DEQRegistration.DEQRegistrationLogic()
    outputs = logic.register(fixedNode, movingNode, fixedLabels, movingLabels, update="gradient",
                             max_steps=45, refreshEvery=15, callback=report)
    print(outputs.messages[-1])
    # --------------------------------------------------------------------------------------

    assert type(logic).__module__ == "DEQRegistration"  # the README's class, not the Qt-free base
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(movingNode), movingBefore)
    fixed = slicer.util.arrayFromVolume(fixedLabels)
    # the Dice before: the moving labels at the fixed voxels with no transform (independent of the library)
    identity = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    before = mean_dice(fixed, labels_through_transform(identity, fixedNode, movingLabels))
    assert outputs.initialDice == pytest.approx(before, abs=0.01)
    # the Dice after: through the output transform node, as applying it in Slicer would carry the labels
    after = mean_dice(fixed, labels_through_transform(outputs.transform, fixedNode, movingLabels))
    assert outputs.dice == pytest.approx(after, abs=0.01), (outputs.dice, after)
    assert after > before + 0.15, (before, after)
    assert outputs.foldingPercent < 0.5
