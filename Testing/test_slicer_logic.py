"""The module's registration logic on real MRML (slicer-core) with the real library.

Synthetic smooth volumes with a known RAS shift, on oblique anisotropic grids
that differ between fixed and moving. Checks: outputs created, reused, never
an input; inputs untouched; the shift recovered in RAS; the moving volume
hardened through the output transform matching the warped output; live
updates every N steps (counted with observers); processEvents once per step;
cancel within one step keeping the last state; the plot tables; linear parent
transforms on the moving volume; 2D single-slice volumes; CPU fallback.
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")
import slicer.util  # noqa: E402
import vtk  # noqa: E402

from DEQRegistrationSlicerLib import RegistrationLogic, mrml, testing  # noqa: E402
from DEQRegistrationLib.alignment import planned_steps  # noqa: E402
from DEQRegistrationLib.geometry import voxel_field_to_physical  # noqa: E402

SHIFT = np.array([3.0, -1.5, 2.0])
CENTRES = np.array([[0.0, 0.0, 0.0], [9.0, -7.0, 5.0], [-8.0, 6.0, -4.0], [6.0, 8.0, -7.0]])
FIXED_SHAPE = (24, 32, 32)  # (k, j, i); each level of the 3-level plan keeps >= 5 voxels
MOVING_SHAPE = (30, 30, 34)


def make_pair(labels=False):
    """Fixed and moving volumes (and label maps) where moving(x) = fixed(x - SHIFT) in RAS."""
    fA = testing.centred_affine(FIXED_SHAPE, (1.5, 1.4, 2.0), 20.0)
    mA = testing.centred_affine(MOVING_SHAPE, (1.8, 1.9, 1.6), -12.0, axis=(0.1, 0.9, 0.3))
    f = testing.blob_function(CENTRES, 5.0)
    fixed = testing.add_sampled_volume(f, FIXED_SHAPE, fA, "fixed")
    moving = testing.add_sampled_volume(lambda p: f(p - SHIFT), MOVING_SHAPE, mA, "moving")
    if not labels:
        return fixed, moving
    lab = testing.blob_function(CENTRES[:2], 5.0)
    to_labels = lambda g: lambda p: (g(p) > 0.5).astype(np.int16) + (g(p) > 0.9)  # noqa: E731
    fixedLabels = testing.add_sampled_volume(to_labels(lab), FIXED_SHAPE, fA, "fixed labels",
                                             "vtkMRMLLabelMapVolumeNode", np.int16)
    movingLabels = testing.add_sampled_volume(to_labels(lambda p: lab(p - SHIFT)), MOVING_SHAPE, mA,
                                              "moving labels", "vtkMRMLLabelMapVolumeNode", np.int16)
    return fixed, moving, fixedLabels, movingLabels


def weighted_mean_displacement(outputs, fixed):
    """Mean RAS displacement of the output grid transform, weighted by fixed intensity."""
    disp = slicer.util.arrayFromGridTransform(outputs.transform).reshape(-1, 3)
    w = slicer.util.arrayFromVolume(fixed).reshape(-1).astype(np.float64)
    return (disp * w[:, None]).sum(0) / w.sum()


def snapshot(node):
    return (slicer.util.arrayFromVolume(node).copy(), mrml.ijk_to_ras(node), node.GetTransformNodeID(),
            node.GetMTime())


class Recorder:
    """Counts the output nodes' events per solver step (the live display must fire them every N steps)."""

    def __init__(self, volume, transform, folding):
        self.counts = {"volume": 0, "transform": 0, "folding": 0}
        self.per_step = []
        volume.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, self._bump("volume"))
        transform.AddObserver(slicer.vtkMRMLTransformableNode.TransformModifiedEvent, self._bump("transform"))
        folding.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, self._bump("folding"))

    def _bump(self, key):
        def f(caller, event):
            self.counts[key] += 1
        return f

    def __call__(self, progress):
        self.per_step.append((progress.step, dict(self.counts)))


@pytest.fixture(scope="module")
def run():
    """One registration with pre-made outputs, labels and observers; many tests read it."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixed, moving, fixedLabels, movingLabels = make_pair(labels=True)
    before = {n.GetName(): snapshot(n) for n in (fixed, moving, fixedLabels, movingLabels)}
    scene = slicer.mrmlScene
    outVol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")
    outT = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform")
    outF = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my folding")
    outC = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "my chart")
    rec = Recorder(outVol, outT, outF)
    calls = {"processEvents": 0, "status": []}

    def processEvents():
        calls["processEvents"] += 1

    logic = RegistrationLogic(processEvents=processEvents,
                              statusCallback=lambda text, fraction: calls["status"].append((text, fraction)))
    n_nodes = scene.GetNumberOfNodes()
    outputs = logic.register(fixed, moving, fixedLabels, movingLabels, update="gradient", maxSteps=45,
                             refreshEvery=4, callback=rec, outputVolume=outVol, outputTransform=outT,
                             outputFolding=outF, outputChart=outC)
    return dict(fixed=fixed, moving=moving, fixedLabels=fixedLabels, movingLabels=movingLabels, before=before,
                outputs=outputs, rec=rec, calls=calls, n_nodes=n_nodes, scene=scene,
                given=(outVol, outT, outF, outC))


def test_inputs_untouched_and_outputs_reused(run):
    for node in (run["fixed"], run["moving"], run["fixedLabels"], run["movingLabels"]):
        arr, affine, parent, _ = run["before"][node.GetName()]
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), arr)
        np.testing.assert_array_equal(mrml.ijk_to_ras(node), affine)
        assert node.GetTransformNodeID() == parent
    o = run["outputs"]
    assert (o.warpedVolume, o.transform, o.foldingMap, o.chart) == run["given"]
    assert o.transform.GetTransformFromParent().IsA("vtkOrientedGridTransform")


def test_final_state_is_exactly_the_library_result(run):
    o, r = run["outputs"], run["outputs"].result
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(o.warpedVolume), mrml.library_to_kji(r.warped.data))
    np.testing.assert_allclose(mrml.ijk_to_ras(o.warpedVolume), mrml.ijk_to_ras(run["fixed"]))
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(o.transform),
                               voxel_field_to_physical(r.total_displacement(), r.fixed_affine).transpose(2, 1, 0, 3),
                               atol=1e-5)  # the grid transform holds the whole transform (alignment included)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(o.foldingMap), mrml.library_to_kji(r.jacobian))
    assert o.foldingMap.GetDisplayNode().GetColorNode().GetName() == mrml.FOLDING_COLOR_NODE_NAME


def test_known_ras_shift_recovered(run):
    mean = weighted_mean_displacement(run["outputs"], run["fixed"])
    assert np.linalg.norm(mean - SHIFT) < 0.8, mean  # sub-voxel (spacing 1.4-2 mm)
    assert run["outputs"].foldingPercent < 0.1


def test_transform_maps_fixed_points_into_the_moving_image(run):
    """Sampling the moving volume through the output transform reproduces the warped output."""
    fixed, moving, o = run["fixed"], run["moving"], run["outputs"]
    pts = testing.ras_grid(FIXED_SHAPE, mrml.ijk_to_ras(fixed))
    mapped = testing.transform_points_from_parent(o.transform, pts)
    ijk = (np.linalg.inv(mrml.ijk_to_ras(moving)) @ np.c_[mapped, np.ones(len(mapped))].T)[:3].T
    inside = np.all((ijk > 1) & (ijk < np.array(MOVING_SHAPE[::-1]) - 2), axis=1)
    from scipy import ndimage
    sampled = ndimage.map_coordinates(slicer.util.arrayFromVolume(moving).astype(np.float64), ijk.T[::-1], order=1)
    warped = slicer.util.arrayFromVolume(o.warpedVolume).reshape(-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(sampled[inside], warped[inside], atol=2e-4)


def test_hardened_moving_matches_warped(run):
    """Harden the output transform on a copy of the moving volume; resample into the fixed grid."""
    fixed, moving, o = run["fixed"], run["moving"], run["outputs"]
    scene = run["scene"]
    copy = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(moving), mrml.ijk_to_ras(moving), "copy")
    copy.SetAndObserveTransformNodeID(o.transform.GetID())
    slicer.vtkSlicerTransformLogic().hardenTransform(copy)
    assert copy.GetTransformNodeID() is None
    resampled = testing.resample_into(copy, FIXED_SHAPE, mrml.ijk_to_ras(fixed))
    warped = slicer.util.arrayFromVolume(o.warpedVolume)
    core = (slice(3, -3),) * 3
    peak = warped.max()
    err = np.abs(resampled[core] - warped[core])
    assert err.mean() < 0.01 * peak and err.max() < 0.1 * peak, (err.mean(), err.max(), peak)
    scene.RemoveNode(copy)


def test_live_updates_every_n_steps_and_process_events_each_step(run):
    r, rec = run["outputs"].result, run["rec"]
    assert run["calls"]["processEvents"] == r.steps
    prev = {"volume": 0, "transform": 0, "folding": 0}
    for step, counts in rec.per_step:
        for key in prev:
            if step % 4 == 0:
                assert counts[key] > prev[key], (step, key)
            else:
                assert counts[key] == prev[key], (step, key)
        prev = counts
    texts = [t for t, _ in run["calls"]["status"]]
    # the total is the alignment stage's planned steps, then the 45 deformable ones
    planned = planned_steps("affine", run["outputs"].result.displacement.shape[1:])
    assert texts[0].startswith(f"Step 1/{planned + 45}") and "residual" in texts[0] and "elapsed" in texts[0]
    assert "left" in texts[0]
    assert run["calls"]["status"][-1][1] == 1.0


def test_plot_tables(run):
    o, r = run["outputs"], run["outputs"].result
    assert o.traceTable.GetNumberOfRows() == r.steps
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(o.traceTable, "residual"),
                               [t["residual"] for t in r.trace])
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(o.traceTable, "step"), np.arange(1, r.steps + 1))
    dice_steps = slicer.util.arrayFromTableColumn(o.diceTable, "step")
    expected = [0] + list(range(4, r.steps + 1, 4))
    if r.steps % 4:
        expected.append(r.steps)
    np.testing.assert_array_equal(dice_steps, expected)
    assert o.chart.GetNumberOfPlotSeriesNodes() == 2


def test_dice_improves(run):
    o = run["outputs"]
    assert o.dice > o.initialDice + 0.03, (o.initialDice, o.dice)  # small synthetic labels; OASIS test checks more
    dice = slicer.util.arrayFromTableColumn(o.diceTable, "dice")
    assert dice[-1] == pytest.approx(o.dice)


def test_rerun_reuses_the_same_nodes(run):
    o = run["outputs"]
    n = run["scene"].GetNumberOfNodes()
    logic = RegistrationLogic()
    again = logic.register(run["fixed"], run["moving"], update="gradient", maxSteps=3, refreshEvery=2,
                           outputVolume=o.warpedVolume, outputTransform=o.transform, outputFolding=o.foldingMap,
                           outputChart=o.chart)
    assert again.warpedVolume is o.warpedVolume and again.chart is o.chart
    assert run["scene"].GetNumberOfNodes() == n
    assert again.traceTable.GetNumberOfRows() == again.result.steps  # alignment steps, then the 3 deformable ones
    assert [row["stage"] for row in again.result.trace].count("deformable") == 3


def test_output_that_is_an_input_is_refused(run):
    with pytest.raises(ValueError, match="is an input"):
        RegistrationLogic().register(run["fixed"], run["moving"], maxSteps=2, outputVolume=run["moving"])


def test_cancel_within_one_step_keeps_last_state():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixed, moving = make_pair()
    logic = RegistrationLogic()
    seen = []

    def processEvents():  # the Cancel button is clicked while events are processed at step 5
        if len(seen) == 4:
            logic.cancel()

    logic.processEvents = processEvents
    out = logic.register(fixed, moving, update="gradient", maxSteps=40, refreshEvery=3,
                         callback=lambda p: seen.append(p.step))
    r = out.result
    assert r.cancelled and r.steps == 5 and seen[-1] == 5
    assert out.traceTable.GetNumberOfRows() == 5
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(out.transform),
                               voxel_field_to_physical(r.total_displacement(), r.fixed_affine).transpose(2, 1, 0, 3),
                               atol=1e-5)  # the grid transform holds the whole transform (alignment included)
    assert "Cancelled" in out.messages[-1]
    # a callback returning True stops too, and a new run is not pre-cancelled
    out2 = logic.register(fixed, moving, update="gradient", maxSteps=40, callback=lambda p: p.step >= 2)
    assert out2.result.steps == 2


def test_moving_with_linear_parent_transform():
    """A moving volume shown through a linear transform is registered where it is shown."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixed, moving = make_pair()
    parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    M = testing.oblique_affine((1, 1, 1), 25.0, (4.0, -2.0, 1.0), axis=(0.2, 0.3, 0.9))
    parent.SetMatrixTransformToParent(mrml._array_to_matrix(M))
    # Keep the shown (world) image identical: move the voxels' IJKToRAS by the inverse.
    moving.SetIJKToRASMatrix(mrml._array_to_matrix(np.linalg.inv(M) @ mrml.ijk_to_ras(moving)))
    moving.SetAndObserveTransformNodeID(parent.GetID())
    out = RegistrationLogic().register(fixed, moving, update="gradient", maxSteps=45, refreshEvery=15)
    mean = weighted_mean_displacement(out, fixed)
    assert np.linalg.norm(mean - SHIFT) < 0.8, mean
    assert moving.GetTransformNodeID() == parent.GetID()
    # Applying: output transform above the moving's own transform, then hardened on a copy.
    copy = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(moving), mrml.ijk_to_ras(moving), "copy")
    chainParent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    chainParent.SetMatrixTransformToParent(mrml._array_to_matrix(M))
    chainParent.SetAndObserveTransformNodeID(out.transform.GetID())
    copy.SetAndObserveTransformNodeID(chainParent.GetID())
    resampled = testing.resample_into(copy, FIXED_SHAPE, mrml.ijk_to_ras(fixed))
    warped = slicer.util.arrayFromVolume(out.warpedVolume)
    core = (slice(3, -3),) * 3
    assert np.abs(resampled[core] - warped[core]).max() < 0.02 * warped.max()


def test_single_slice_volumes_register_in_2d():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    shape = (1, 48, 40)
    A = testing.centred_affine(shape, (1.2, 1.0, 3.0), 0.0)
    f = testing.blob_function(np.c_[CENTRES[:, :2], np.zeros(len(CENTRES))], 5.0)
    fixed = testing.add_sampled_volume(f, shape, A, "fixed2d")
    moving = testing.add_sampled_volume(lambda p: f(p - [2.0, -1.0, 0.0]), shape, A, "moving2d")
    out = RegistrationLogic().register(fixed, moving, update="gradient", maxSteps=30, refreshEvery=5)
    assert out.result.displacement.shape == (2, 40, 48)
    assert slicer.util.arrayFromVolume(out.warpedVolume).shape == shape
    mean = weighted_mean_displacement(out, fixed)
    np.testing.assert_allclose(mean, [2.0, -1.0, 0.0], atol=0.5)


def test_gpu_request_without_gpu_and_out_of_memory_fall_back_to_cpu(monkeypatch):
    """The library's one CPU fallback (simulated CUDA out-of-memory: no GPU here) reaches the logic's hook,
    which restarts the live tables."""
    import torch
    import DEQRegistrationLib.registration as core
    slicer.mrmlScene = slicer.vtkMRMLScene()
    fixed, moving = make_pair()
    real_run = core._Registration.run
    devices = []

    def flaky(self):
        devices.append(self.device.type)
        if self.device.type == "cuda":
            self._on_step(0, 1, 0.5, torch.zeros(1, 3, 4, 4, 4))  # a partial run, then CUDA runs out of memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self)

    with monkeypatch.context() as m:
        m.setattr(core._Registration, "run", flaky)
        m.setattr(core, "resolve_device", lambda device: torch.device("cuda"))
        m.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
        to_tensor = core.to_tensor
        m.setattr(core, "to_tensor", lambda data, device, dtype=torch.float32: to_tensor(data, "cpu", dtype))
        out = RegistrationLogic().register(fixed, moving, update="gradient", maxSteps=4, device="auto",
                                           refreshEvery=10)
    assert devices == ["cuda", "cpu"] and out.device == "cpu"
    assert any("out of memory" in msg for msg in out.messages)
    # the failed attempt's rows were dropped: the CPU run's alignment steps and its 4 deformable ones
    assert out.traceTable.GetNumberOfRows() == out.result.steps
    assert [row["stage"] for row in out.result.trace].count("deformable") == 4

    if not torch.cuda.is_available():
        out = RegistrationLogic().register(fixed, moving, update="gradient", maxSteps=2, device="cuda")
        assert out.device == "cpu" and any("No CUDA GPU" in m for m in out.messages)
