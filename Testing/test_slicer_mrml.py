"""MRML conversions of the Slicer module, on real MRML from the slicer-core wheel (no Slicer app).

Covers axis order and geometry (oblique, anisotropic, 2D), parent transforms
(none, linear, non-linear) on the reference volume and on label maps and
segmentations, every combination checked against where the labels are shown
in world coordinates (issue 9, defect 2); no node left behind by a
segmentation export (defect 8); the grid transform's RAS mapping and events;
the folding colour table; the plot table; the parameter node (its one mapping
to the library's settings, a scene save/load, the old "UpdateMode" name, the
auto-selected fixed volume never being a label map).
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]

slicer = pytest.importorskip("slicer")
import slicer.util  # noqa: E402
import vtk  # noqa: E402

from DEQRegistrationSlicerLib import mrml, testing  # noqa: E402
from DEQRegistrationSlicerLib.parameters import ParameterNode  # noqa: E402


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene


def test_volume_to_library_oblique_anisotropic():
    A = testing.oblique_affine((1.5, 0.8, 2.5), 33.0, (10.0, -5.0, 3.0))
    f = testing.blob_function([[12.0, -2.0, 8.0]], 6.0)
    node = testing.add_sampled_volume(f, (7, 9, 11), A, "v")
    data, affine = mrml.volume_to_library(node)
    assert data.shape == (11, 9, 7)  # (i, j, k) from Slicer's (k, j, i)
    np.testing.assert_allclose(affine, A)
    for ijk in [(0, 0, 0), (3, 4, 5), (10, 8, 6)]:
        ras = (affine @ np.array([*ijk, 1.0]))[:3]
        assert data[ijk] == pytest.approx(f(ras[None])[0], rel=1e-5)


def test_single_slice_becomes_2d_and_round_trips():
    A = testing.oblique_affine((0.7, 1.2, 3.0), 15.0, (1.0, 2.0, 3.0))
    arr = np.random.default_rng(0).random((1, 10, 12)).astype(np.float32)
    node = slicer.util.addVolumeFromArray(arr, A, "slice")
    data, affine = mrml.volume_to_library(node)
    assert data.shape == (12, 10)
    assert data[5, 7] == arr[0, 7, 5]
    out = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.update_volume(out, data, affine)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out), arr)
    np.testing.assert_allclose(mrml.ijk_to_ras(out), A)


def test_singleton_axis_other_than_k_keeps_geometry():
    A = testing.oblique_affine((1.0, 2.0, 3.0), 10.0)
    arr = np.random.default_rng(1).random((6, 1, 8)).astype(np.float32)  # j has one voxel
    data, affine = mrml.kji_to_library(arr, A)
    assert data.shape == (8, 6)
    # voxel (i=5, k=4) -> library (5, 4) must sit at the same RAS point
    np.testing.assert_allclose(affine @ [5, 4, 0, 1], A @ [5, 0, 4, 1])
    assert data[5, 4] == arr[4, 0, 5]


def test_linear_parent_transform_is_folded_into_the_affine():
    A = testing.oblique_affine((1.0, 1.5, 2.0), 20.0)
    node = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), A, "v")
    parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    M = testing.oblique_affine((1, 1, 1), 30.0, (5.0, -3.0, 2.0), axis=(0, 0, 1))
    parent.SetMatrixTransformToParent(mrml._array_to_matrix(M))
    node.SetAndObserveTransformNodeID(parent.GetID())
    _, affine = mrml.volume_to_library(node)
    np.testing.assert_allclose(affine, M @ A, atol=1e-9)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), A)  # input untouched


def test_nonlinear_parent_transform_is_resampled_on_a_copy():
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    f = testing.blob_function([[10.0, 10.0, 10.0]], 4.0)
    node = testing.add_sampled_volume(f, (12, 12, 12), A, "v")
    before = slicer.util.arrayFromVolume(node).copy()
    grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    disp = np.zeros((12, 12, 12, 3), np.float32)
    disp[..., 0] = 2.0  # FromParent: world x samples the volume at x + 2 mm
    mrml.update_grid_transform(grid, disp, A)
    node.SetAndObserveTransformNodeID(grid.GetID())
    n_nodes = slicer.mrmlScene.GetNumberOfNodes()
    data, affine = mrml.volume_to_library(node)
    assert slicer.mrmlScene.GetNumberOfNodes() == n_nodes  # temporary copy removed
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
    assert node.GetTransformNodeID() == grid.GetID()
    # the blob centre (10,10,10) appears at world (8,10,10) after the transform
    peak = np.unravel_index(np.argmax(data), data.shape)
    ras = (affine @ np.array([*peak, 1.0]))[:3]
    np.testing.assert_allclose(ras, [8.0, 10.0, 10.0], atol=1.01)


def test_grid_transform_maps_ras_and_updates_in_place():
    A = testing.oblique_affine((1.2, 0.9, 2.0), 40.0, (3.0, 4.0, -5.0))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    shape = (6, 7, 8)
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., :] = [1.0, -2.0, 0.5]
    mrml.update_grid_transform(node, disp, A)
    x = (A @ np.array([2, 3, 4, 1.0]))[:3]
    np.testing.assert_allclose(testing.transform_points_from_parent(node, [x])[0] - x, [1.0, -2.0, 0.5], atol=1e-5)
    # toWorld (the inverse) maps the other way: hardening moves the volume by -d
    tw = vtk.vtkGeneralTransform()
    node.GetTransformToWorld(tw)
    np.testing.assert_allclose(np.array(tw.TransformPoint(*x)) - x, [-1.0, 2.0, -0.5], atol=1e-3)

    events = []
    node.AddObserver(slicer.vtkMRMLTransformableNode.TransformModifiedEvent, lambda *a: events.append(1))
    grid_before = node.GetTransformFromParent().GetDisplacementGrid()
    disp[..., 0] = 3.0
    mrml.update_grid_transform(node, disp, A)
    assert node.GetTransformFromParent().GetDisplacementGrid() is grid_before  # written in place
    assert len(events) >= 1
    np.testing.assert_allclose(testing.transform_points_from_parent(node, [x])[0] - x, [3.0, -2.0, 0.5], atol=1e-5)
    # varying field: voxel-exact at grid points, array axes in (k, j, i)
    disp = np.random.default_rng(2).normal(size=shape + (3,)).astype(np.float32)
    mrml.update_grid_transform(node, disp, A)
    for ijk in [(0, 0, 0), (5, 1, 3), (2, 6, 7)]:
        p = (A @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(testing.transform_points_from_parent(node, [p])[0] - p, disp[ijk], atol=1e-4)


def test_labelmap_on_another_grid_is_resampled_nearest():
    fixedA = np.diag([1.0, 1.0, 1.0, 1.0])
    vol = slicer.util.addVolumeFromArray(np.zeros((10, 10, 10), np.float32), fixedA, "vol")
    lab = np.zeros((5, 5, 5), np.int16)
    lab[1:3, 1:3, 1:3] = 4
    labA = np.diag([2.0, 2.0, 2.0, 1.0])
    labNode = slicer.util.addVolumeFromArray(lab, labA, "lab", "vtkMRMLLabelMapVolumeNode")
    out = mrml.labels_to_library(labNode, vol, (10, 10, 10), fixedA)
    assert out.shape == (10, 10, 10)
    assert set(np.unique(out)) == {0, 4}
    assert out[3, 3, 3] == 4 and out[8, 8, 8] == 0


# --- parent transforms on label maps, segmentations and their reference volume (issue 9, defect 2) -----------

GRID_SHAPE = (22, 24, 26)  # (k, j, i)
GRID_AFFINE = testing.oblique_affine((1.5, 1.3, 1.7), 15.0, (-16.0, -14.0, -18.0))
LABEL_CENTRES = np.array([[-3.0, 2.0, 1.0], [5.0, -4.0, -2.0]])


def world_labels(points):
    """Two labelled balls in world (RAS) coordinates: the truth every arrangement must reproduce."""
    out = np.zeros(len(points), np.int16)
    for value, centre in enumerate(LABEL_CENTRES, start=1):
        out[np.linalg.norm(points - centre, axis=1) < 4.5] = value
    return out


def non_hierarchy_nodes(scene):
    """Node IDs, without the subject hierarchy (a singleton Slicer always has; a bare scene gets it on first use)."""
    nodes = (scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes()))
    return {n.GetID() for n in nodes if not n.IsA("vtkMRMLSubjectHierarchyNode")}


def labels_node(kind, scene):
    """A label map (on its own grid, not the reference's) or a segmentation made from it."""
    A = testing.oblique_affine((1.2, 1.1, 1.4), -10.0, (-15.0, -16.0, -14.0), axis=(0.6, 0.1, 0.8))
    shape = (26, 28, 24)
    arr = world_labels(testing.ras_grid(shape, A)).reshape(shape)
    lab = slicer.util.addVolumeFromArray(arr, A, "labels", "vtkMRMLLabelMapVolumeNode")
    if kind == "labelmap":
        return lab
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    scene.RemoveNode(lab)
    return seg


@pytest.mark.parametrize("kind", ["labelmap", "segmentation"])
@pytest.mark.parametrize("labels_parent", ["none", "linear", "nonlinear"])
@pytest.mark.parametrize("reference_parent", ["none", "linear", "nonlinear"])
def test_labels_land_where_they_are_shown(scene, kind, labels_parent, reference_parent):
    """Labels on the reference volume's library grid equal the world truth at that grid's voxels."""
    ref = slicer.util.addVolumeFromArray(np.zeros(GRID_SHAPE, np.float32), GRID_AFFINE, "reference")
    testing.put_under_transform(ref, reference_parent, scene)
    labels = labels_node(kind, scene)
    testing.put_under_transform(labels, labels_parent, scene)
    data, affine = mrml.volume_to_library(ref)
    nodes = non_hierarchy_nodes(scene)
    out = mrml.labels_to_library(labels, ref, data.shape, affine)
    assert non_hierarchy_nodes(scene) == nodes  # nothing left behind (defect 8)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
    truth = world_labels((affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T).reshape(data.shape)
    for value in (1, 2):
        assert (out == value).sum() > 0.5 * (truth == value).sum(), (value, (out == value).sum())
        got = (affine @ np.r_[np.argwhere(out == value).mean(0), 1.0])[:3]
        np.testing.assert_allclose(got, LABEL_CENTRES[value - 1], atol=0.7)  # a 5 mm error would show
    assert np.mean(out == truth) > 0.97


def test_volume_under_parent_transform_is_read_where_shown(scene):
    f = testing.blob_function([[2.0, -3.0, 1.0], [-6.0, 4.0, -2.0]], 4.0)
    for kind in ("linear", "nonlinear"):
        node = testing.add_sampled_volume(f, GRID_SHAPE, GRID_AFFINE, kind)
        testing.put_under_transform(node, kind, scene)
        data, affine = mrml.volume_to_library(node)
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
        pts = (affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
        inside = data.reshape(-1) > 0.05  # the hardened copy pads outside the original grid with zeros
        np.testing.assert_allclose(data.reshape(-1)[inside], f(pts)[inside], atol=0.05)


def test_segmentation_export_leaves_no_node_behind(scene):
    """Issue 9 (8): every export used to leave a '*_ColorTable' node in the scene."""
    vol = slicer.util.addVolumeFromArray(np.zeros(GRID_SHAPE, np.float32), GRID_AFFINE, "vol")
    seg = labels_node("segmentation", scene)
    before = non_hierarchy_nodes(scene)
    for _ in range(3):
        mrml.labels_to_library(seg, vol, GRID_SHAPE[::-1], GRID_AFFINE)
    after = non_hierarchy_nodes(scene)
    assert after == before, [scene.GetNodeByID(i).GetName() for i in after - before]


def test_segmentations_get_matching_values_by_name():
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    vol = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), A, "vol")
    segs = []
    for names in (("a", "b"), ("b", "a")):  # same structures, segments in another order
        lab = np.zeros((8, 8, 8), np.int16)
        lab[1:3, 1:3, 1:3] = names.index("a") + 1
        lab[5:7, 5:7, 5:7] = names.index("b") + 1
        labNode = slicer.util.addVolumeFromArray(lab, A, "lab", "vtkMRMLLabelMapVolumeNode")
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labNode, seg)
        for n, name in enumerate(names):
            seg.GetSegmentation().GetNthSegment(n).SetName(name)
        segs.append(seg)
    order = mrml.segment_names(segs[0])
    fixed = mrml.labels_to_library(segs[0], vol, (8, 8, 8), A, order)
    moving = mrml.labels_to_library(segs[1], vol, (8, 8, 8), A, order)
    np.testing.assert_array_equal(fixed, moving)
    assert fixed[1, 1, 1] == 1 and fixed[5, 5, 5] == 2


def test_folding_colors_mark_folds():
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.update_volume(node, np.linspace(-1, 3, 24, dtype=np.float32).reshape(2, 3, 4), np.eye(4))
    mrml.show_folding_colors(node)
    color = node.GetDisplayNode().GetColorNode()
    assert color.GetName() == mrml.FOLDING_COLOR_NODE_NAME
    assert mrml.folding_color_node(slicer.mrmlScene) is color  # created once per scene
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert rgba == [1.0, 0.0, 0.0, 1.0]  # det <= 0: opaque red
    color.GetColor(64, rgba)  # det ~ 0.004
    assert rgba[0] < 0.5 and rgba[2] > 0.5
    display = node.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(-1.0) and display.GetWindowLevelMax() == pytest.approx(3.0)


def test_plot_table_rows_and_series():
    chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode")
    trace = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
    dice = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.reset_table(trace, ["step", "residual"])
    mrml.reset_table(dice, ["step", "dice"])
    for s in range(1, 6):
        mrml.append_row(trace, {"step": s, "residual": 1.0 / s})
    mrml.append_row(dice, {"step": 5, "dice": 0.7})
    mrml.setup_plot(slicer.mrmlScene, chart, trace, dice)
    mrml.setup_plot(slicer.mrmlScene, chart, trace, dice)  # idempotent: series reused
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert trace.GetNumberOfRows() == 5
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(trace, "residual"), [1, 0.5, 1 / 3, 0.25, 0.2])
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetXColumnName() == "step" and series.GetTableNode() is trace
    # the curves are named in the axis title, not in a legend that would cover Dice (0.5-1, the top of the axis)
    assert not chart.GetLegendVisibility() and "Dice (orange)" in chart.GetYAxisTitle()


def test_parameter_node_survives_scene_save_and_load(scene):
    p = ParameterNode.create(scene)
    vol = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "fixedVol")
    p.set("MaxSteps", 48)
    p.set("Tolerance", 2.5e-4)
    p.set("Solver", "fixed-point")
    p.set("Update", "hybrid")
    p.set("Pyramid", "4, 2, 1")
    p.set("CpuFallback", False)
    p.setNode("FixedVolume", vol)
    with pytest.raises(ValueError):
        p.set("Solver", "newton")
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()

    loaded = slicer.vtkMRMLScene()
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(xml)
    loaded.Import()
    node = loaded.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    q = ParameterNode(node)
    assert q.get("MaxSteps") == 48 and q.get("Tolerance") == pytest.approx(2.5e-4)
    assert q.get("Solver") == "fixed-point" and q.get("Update") == "hybrid"
    assert q.get("RefreshEvery") == 5
    assert q.getNode("FixedVolume").GetName() == "fixedVol"
    assert q.get("CpuFallback") is False and q.get("Pyramid") == "4, 2, 1"
    assert q.settings() == {"update": "hybrid", "max_steps": 48, "tol": 2.5e-4, "solver": "fixed-point",
                            "device": "auto", "model": "default", "pyramid": [4, 2, 1], "cpu_fallback": False,
                            "init": "affine"}


def test_parameter_node_maps_to_the_library_settings_in_one_place(scene):
    """Every parameter with a setting maps to a real Settings field; choices are the library's; auto values drop."""
    pytest.importorskip("torch")
    from DEQRegistrationLib import config
    from DEQRegistrationSlicerLib import parameters as P
    fields = set(config.setting_names())
    assert {p.setting for p in P.PARAMETERS if p.setting} <= fields
    assert set(P.UPDATES) == set(config.UPDATES) and set(P.SOLVERS) == set(config.SOLVER_NAMES)
    assert set(P.SIMILARITIES) == set(config.SIMILARITIES) and set(P.INITS) == set(config.INITS)
    assert set(P.INIT_SIMILARITIES) == set(config.INIT_SIMILARITIES) and set(P.PRESETS) == set(config.PRESETS)
    defaults = config.Settings()
    for p in P.PARAMETERS:
        if p.setting and p.auto is None:
            assert p.default == getattr(defaults, p.setting), p.name  # the panel's default is the library's
    q = ParameterNode.create(scene)
    assert config.make_settings(**q.settings()) == config.make_settings()  # defaults == library defaults
    q.set("Similarity", "mse")
    q.set("DiffusionWeight", 1.5)
    q.set("MaxSteps", 30)
    s = config.make_settings(**q.settings())
    assert (s.similarity, s.diffusion_weight, s.max_steps) == ("mse", 1.5, 30)
    q.set("Update", "learned")  # a model keeps its own similarity and smoothness: not passed
    assert config.make_settings(**q.settings()).similarity == "lncc"
    assert q.settings()["model"] == "default"
    q.set("Model", "file")
    q.set("ModelPath", "/some/model.pt")
    assert q.settings()["model"] == "/some/model.pt"
    with pytest.raises(ValueError, match="Similarity must be one of"):
        q.set("Similarity", "mi")
    # the rows the module builds its own widgets for reach Settings too
    q.set("Update", "gradient")
    for name, value in (("Similarity", "mind"), ("Window", 7), ("StepSize", 0.5), ("Sigma", 2.0),
                        ("Pyramid", "2,1"), ("LevelWeights", "1, 3"), ("CpuFallback", False)):
        q.set(name, value)
    s = config.make_settings(**q.settings())
    assert (s.similarity, s.window, s.step_size, s.sigma, list(s.pyramid), list(s.level_weights), s.cpu_fallback) \
        == ("mind", 7, 0.5, 2.0, [2, 1], [1, 3], False)
    q.set("Pyramid", "4, x")
    with pytest.raises(ValueError, match="Pyramid must be numbers"):
        q.settings()


def test_old_scenes_update_mode_is_read_as_update(scene):
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetParameter("UpdateMode", "learned")
    scene.AddNode(node)
    p = ParameterNode(node)
    p.setDefaults()
    assert p.get("Update") == "learned" and not node.GetParameter("UpdateMode")


def test_auto_selected_fixed_volume_is_never_a_label_map_or_an_output(scene):
    """Issue 9 (11): the first scalar volume of the scene used to be taken, label maps included."""
    slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.int16), np.eye(4), "labels", "vtkMRMLLabelMapVolumeNode")
    out = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "old warped")
    out.SetAttribute("DEQReg.output", "outputVolume")
    image = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "image")
    p = ParameterNode.create(scene)
    assert p.selectDefaultInputs(scene) is image and p.getNode("FixedVolume") is image
    assert p.selectDefaultInputs(scene) is None  # a selection is kept


def test_a_preset_chosen_in_the_panel_is_the_librarys_and_a_change_makes_it_custom(scene):
    """Each preset sets the panel's rows to exactly what ``make_settings(preset=...)`` gives; changing one of
    them afterwards makes the preset custom, so a run never names a preset its settings do not follow."""
    pytest.importorskip("torch")
    from DEQRegistrationLib import config
    from DEQRegistrationSlicerLib import parameters as P
    q = ParameterNode.create(scene)
    assert q.get("Preset") == P.CUSTOM and "preset" not in q.settings()
    for name in P.PRESETS:
        q.set("Preset", name)
        ours, library = config.make_settings(**q.settings()), config.make_settings(preset=name)
        assert ours == library, name
        assert ours.preset == name
    q.set("Preset", "multimodal")
    assert (q.get("Init"), q.get("InitSimilarity"), q.get("Similarity")) == ("rigid", "mi", "mind")
    q.set("Similarity", "mind")  # the preset's own value: still the preset
    assert q.get("Preset") == "multimodal"
    q.set("Similarity", "lncc")  # the user departs from it
    assert q.get("Preset") == P.CUSTOM
    s = config.make_settings(**q.settings())
    assert s.preset is None and (s.init, s.init_similarity, s.similarity) == ("rigid", "mi", "lncc")
    # the preset is kept with the scene's parameter node (a reloaded scene shows it)
    q.set("Preset", "lung-ct")
    assert ParameterNode(q.node).get("Preset") == "lung-ct" and ParameterNode(q.node).get("InitSimilarity") == "ncc"
