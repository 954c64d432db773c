"""The README's scripting snippet on the real OASIS 3D pair, on slicer-core.

Reads ../shared/data/oasis3d at run time (skips when absent). To stay within
about 1.5 minutes on 2 CPU cores it registers a central 96 x 112 x 112 mm
sub-volume (crop of both images and label maps, geometry kept through the
IJKToRAS origin) with the gradient update and a 45-step budget; the full
volume at 60 steps takes about 4 minutes here (Dice 0.459 -> 0.70).
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]
DATA = os.path.join(os.environ.get("DEQREG_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data"), "oasis3d")

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data/oasis3d is absent (real data is "
                                                                 "read at run time, never committed)")
slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

CROP = (slice(32, 128), slice(40, 152), slice(56, 168))  # (i, j, k) voxels of the 160x192x224 volumes


def load_cropped(name, labelmap=False):
    """A cropped OASIS volume as a node: (i, j, k) -> Slicer (k, j, i), origin moved to the crop corner."""
    import slicer.util
    img = nib.load(os.path.join(DATA, name))
    data = np.asarray(img.dataobj)[CROP]
    affine = img.affine.copy()
    affine[:3, 3] = (img.affine @ np.array([CROP[0].start, CROP[1].start, CROP[2].start, 1.0]))[:3]
    data = data.astype(np.int16) if labelmap else data.astype(np.float32)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, name, cls)


def test_readme_snippet_on_real_oasis_pair():
    import slicer.util
    from DEQRegistrationSlicerLib.logic import RegistrationLogic as DEQRegistrationLogic  # the module's logic base
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixedNode = load_cropped("OAS1_0001_norm.nii.gz")
    movingNode = load_cropped("OAS1_0002_norm.nii.gz")
    fixedLabels = load_cropped("OAS1_0001_seg35.nii.gz", labelmap=True)
    movingLabels = load_cropped("OAS1_0002_seg35.nii.gz", labelmap=True)
    movingBefore = slicer.util.arrayFromVolume(movingNode).copy()

    # --- the README snippet -------------------------------------------------------------
    def report(progress):
        if progress.step % 15 == 0:
            print(f"step {progress.step}: residual {progress.residual:.3g}")

    logic = DEQRegistrationLogic()
    outputs = logic.register(fixedNode, movingNode, fixedLabels, movingLabels, update="gradient",
                             maxSteps=45, refreshEvery=15, callback=report)
    print(outputs.messages[-1])
    # --------------------------------------------------------------------------------------

    assert outputs.initialDice == pytest.approx(0.466, abs=0.02)
    assert outputs.dice > outputs.initialDice + 0.15, (outputs.initialDice, outputs.dice)
    assert outputs.foldingPercent < 0.5
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(movingNode), movingBefore)
    # Applying the transform to the moving label map gives the library's warped labels (nearest).
    warped = outputs.result.warped_labels
    from DEQRegistrationLib import metrics
    assert metrics.mean_dice(slicer.util.arrayFromVolume(fixedLabels).transpose(2, 1, 0), warped) == \
        pytest.approx(outputs.dice)
