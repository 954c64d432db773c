"""The live layout (issue 9, defect 1) on real MRML: arrangement, views' content, fitting, restoring.

Slicer's layout manager is Qt; what it does to the scene (a vtkMRMLLayoutLogic
creating the view nodes of the arrangement, a vtkMRMLSliceLogic per slice
view registered with the application logic) is done by
``testing.LayoutManagerStandIn`` with the same MRML classes. The pictures
themselves are checked in test_slicer_render.py.
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]

slicer = pytest.importorskip("slicer")
import slicer.util  # noqa: E402

from DEQRegistrationSlicerLib import layout, mrml, testing  # noqa: E402
from DEQRegistrationSlicerLib.layout import LiveLayout  # noqa: E402


@pytest.fixture
def manager():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return testing.LayoutManagerStandIn(slicer.mrmlScene)


def volumes(scene, shape=(20, 24, 28)):
    A = testing.centred_affine(shape, (1.5, 1.2, 1.0), 12.0, centre=(10.0, -20.0, 5.0))
    f = testing.blob_function([[10.0, -20.0, 5.0], [16.0, -14.0, 8.0]], 4.0)
    fixed = testing.add_sampled_volume(f, shape, A, "fixed")
    fixed.CreateDefaultDisplayNodes()
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    mrml.update_volume(warped, np.zeros(shape[::-1], np.float32), A)
    folding = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "folding")
    mrml.update_volume(folding, np.ones(shape[::-1], np.float32), A)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "chart")
    return fixed, warped, folding, chart, A


def test_activate_switches_to_the_live_views_and_restore_brings_back_the_previous_layout(manager):
    scene = slicer.mrmlScene
    node = manager.layoutNode
    node.SetViewArrangement(node.SlicerLayoutFourUpView)
    live = LiveLayout(scene, manager.appLogic)
    assert live.activate() and live.isActive()
    assert live.previousLayout() == node.SlicerLayoutFourUpView
    for name in layout.SLICE_VIEWS:
        assert live.sliceNode(name) is not None and live.compositeNode(name) is not None
        assert live.sliceNode(name).GetViewGroup() == layout.VIEW_GROUP
    assert any(n.GetLayoutName() == layout.CHART_VIEW for n in scene.GetNodesByClass("vtkMRMLPlotViewNode"))
    assert live.activate() and live.previousLayout() == node.SlicerLayoutFourUpView  # a second Register
    assert live.restore()
    assert node.GetViewArrangement() == node.SlicerLayoutFourUpView and live.previousLayout() is None
    assert not live.restore()  # nothing more to restore


def test_show_puts_fixed_warped_folding_and_chart_in_the_views(manager):
    scene = slicer.mrmlScene
    fixed, warped, folding, chart, _ = volumes(scene)
    display = fixed.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(0.8, 0.5)
    fixedColor = display.GetColorNodeID()
    moving = slicer.util.addVolumeFromArray(np.linspace(0, 50, 20 * 24 * 28, dtype=np.float32).reshape(20, 24, 28),
                                            np.eye(4), "moving")
    scene.RemoveNode(moving.GetDisplayNode())  # no display: the window comes from its intensities
    live = LiveLayout(scene, manager.appLogic)
    live.activate()
    live.show(fixed, moving, warped, folding, chart)
    overlay, fold = live.compositeNode(layout.OVERLAY_VIEW), live.compositeNode(layout.FOLDING_VIEW)
    proxy = scene.GetNodeByID(overlay.GetBackgroundVolumeID())
    # overlay view: the fixed voxels (shared, not copied) in green, the warped volume in magenta, added
    assert proxy is not fixed and proxy.GetImageData() is fixed.GetImageData()
    assert proxy.GetHideFromEditors() and not proxy.GetSaveWithScene()
    np.testing.assert_allclose(mrml.ijk_to_ras(proxy), mrml.ijk_to_ras(fixed))
    assert proxy.GetDisplayNode().GetColorNode().GetName() == layout.FIXED_COLOR[0]
    assert (proxy.GetDisplayNode().GetWindow(), proxy.GetDisplayNode().GetLevel()) == pytest.approx((0.8, 0.5))
    assert overlay.GetForegroundVolumeID() == warped.GetID()
    assert warped.GetDisplayNode().GetColorNode().GetName() == layout.WARPED_COLOR[0]
    # the warped volume holds the moving intensities: shown with the moving volume's window, not its own (empty) one
    assert not warped.GetDisplayNode().GetAutoWindowLevel()
    assert (warped.GetDisplayNode().GetWindow(), warped.GetDisplayNode().GetLevel()) == pytest.approx((49.5, 25.0))
    assert overlay.GetCompositing() == overlay.Add and overlay.GetForegroundOpacity() == 1.0
    # folding view: the folding map (its own colours) over the fixed volume as the user displays it
    assert fold.GetBackgroundVolumeID() == fixed.GetID() and fold.GetForegroundVolumeID() == folding.GetID()
    assert fold.GetForegroundOpacity() == layout.FOLDING_OPACITY
    assert display.GetColorNodeID() == fixedColor  # the fixed volume's own display is never changed
    for composite in (overlay, fold):
        assert not composite.GetDoPropagateVolumeSelection() and composite.GetLinkedControl()
    plot = next(n for n in scene.GetNodesByClass("vtkMRMLPlotViewNode") if n.GetLayoutName() == layout.CHART_VIEW)
    assert plot.GetPlotChartNodeID() == chart.GetID() and not plot.GetDoPropagatePlotChartSelection()
    # one proxy per scene, reused; restoring the layout removes it
    live.show(fixed, fixed, warped, folding, chart)
    proxies = [n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if n.GetAttribute(layout.PROXY_ATTRIBUTE)]
    assert proxies == [proxy]
    live.restore()
    assert proxy.GetScene() is None and fixed.GetImageData() is not None


def test_views_are_fitted_to_the_fixed_volume(manager):
    """Issue 9 (11): the views were not fitted. Fitted: centred on the volume, showing all of it."""
    scene = slicer.mrmlScene
    fixed, warped, folding, chart, A = volumes(scene)
    live = LiveLayout(scene, manager.appLogic)
    live.activate()
    for name in layout.SLICE_VIEWS:
        live.sliceNode(name).SetFieldOfView(500.0, 500.0, 1.0)  # far away and zoomed out
        live.sliceNode(name).SetSliceOffset(-300.0)
    live.show(fixed, fixed, warped, folding, chart)
    bounds = [0.0] * 6
    fixed.GetRASBounds(bounds)
    centre = np.array(bounds).reshape(3, 2).mean(1)
    extent = np.array(bounds).reshape(3, 2) @ [-1, 1]
    for name in layout.SLICE_VIEWS:
        sliceNode = live.sliceNode(name)
        sliceToRAS = mrml._matrix_to_array(sliceNode.GetSliceToRAS())
        np.testing.assert_allclose(sliceToRAS[:3, 3], centre, atol=2.0)  # voxel snapping: within a voxel
        fov = sliceNode.GetFieldOfView()
        assert max(fov[:2]) <= 1.5 * extent.max() and max(fov[:2]) >= 0.5 * extent.min(), (fov, extent)


def test_single_slice_volume_is_shown_in_its_own_plane(manager):
    scene = slicer.mrmlScene
    fixed, warped, folding, chart, A = volumes(scene, shape=(1, 24, 28))  # one slice, oblique
    live = LiveLayout(scene, manager.appLogic)
    live.activate()
    live.show(fixed, fixed, warped, folding, chart)
    normal = A[:3, 2] / np.linalg.norm(A[:3, 2])
    for name in layout.SLICE_VIEWS:
        sliceNormal = mrml._matrix_to_array(live.sliceNode(name).GetSliceToRAS())[:3, 2]
        assert abs(abs(np.dot(sliceNormal, normal)) - 1) < 1e-6


def test_without_a_layout_node_nothing_breaks():
    """Scripted use in a scene without views: show() sets what exists, activate() says it could not."""
    scene = slicer.mrmlScene = slicer.vtkMRMLScene()
    fixed, warped, folding, chart, _ = volumes(scene)
    live = LiveLayout(scene)
    assert not live.activate() and not live.isActive() and not live.restore()
    live.show(fixed, fixed, warped, folding, chart)


def test_a_registration_switches_to_the_live_layout_and_fills_it(manager):
    """What the Register button does: the logic activates and fills the layout before the first refresh."""
    pytest.importorskip("torch")
    from DEQRegistrationSlicerLib import RegistrationLogic
    scene = slicer.mrmlScene
    fixed, _, _, _, A = volumes(scene)
    f = testing.blob_function([[10.0, -20.0, 5.0], [16.0, -14.0, 8.0]], 4.0)
    moving = testing.add_sampled_volume(lambda p: f(p - [1.5, 0.0, -1.0]), (20, 24, 28), A, "moving")
    live = LiveLayout(scene, manager.appLogic)
    logic = RegistrationLogic()
    seen = {}

    def callback(progress):  # solver thread: only records what the main thread had set up by then
        if progress.step == 1:
            composite = live.compositeNode(layout.FOLDING_VIEW)
            seen["folding"] = composite.GetForegroundVolumeID()
            seen["active"] = live.isActive()

    out = logic.register(fixed, moving, update="gradient", max_steps=3, refreshEvery=1, liveLayout=live,
                         callback=callback)
    assert seen == {"folding": out.foldingMap.GetID(), "active": True}
    assert live.compositeNode(layout.OVERLAY_VIEW).GetForegroundVolumeID() == out.warpedVolume.GetID()
