"""Conversions between MRML nodes and the registration library's arrays.

Slicer stores voxels as (k, j, i) arrays and a volume's geometry as its
IJKToRAS matrix plus an optional parent transform; the library wants (i, j, k)
arrays with a 4x4 voxel-to-RAS affine (``DEQRegistrationLib.image.Image``). The
functions here are the only place the axes are swapped, and they take every
parent transform into account so a volume is always used where it is *shown*
in world (RAS) coordinates. Only numpy, vtk and MRML are needed (no Qt, no
torch), so ``slicer-core`` runs all of it.
"""
from __future__ import annotations

import numpy as np
import vtk

import slicer
import slicer.util

FOLDING_COLOR_NODE_NAME = "DEQReg folding"
#: Jacobian-determinant range the folding map's colours span (window/level).
FOLDING_RANGE = (-1.0, 3.0)


# --- matrices ----------------------------------------------------------------------


def _matrix_to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(a) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m


def ijk_to_ras(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return _matrix_to_array(m)


def world_affine(node):
    """(affine, nonlinear): IJK to world RAS of a volume, through a linear parent.

    For a non-linear parent transform the affine is the node's own one and
    ``nonlinear`` is True: the caller must resample (see ``resampled_copy``).
    """
    affine = ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return affine, False
    if parent.IsTransformToWorldLinear():
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(m)
        return _matrix_to_array(m) @ affine, False
    return affine, True


def resampled_copy_array(volumeNode, scene):
    """(kji array, IJKToRAS) of a volume after hardening its non-linear parent, on a copy.

    The input node is never modified: the copy lives in the scene only while
    the transform logic hardens it (a label map copy is resampled nearest
    neighbour: Slicer's label map resampling mode).
    """
    before = _node_ids(scene)
    copy = scene.AddNewNodeByClass(volumeNode.GetClassName(), "DEQReg temporary copy")
    try:
        image = vtk.vtkImageData()
        image.DeepCopy(volumeNode.GetImageData())
        copy.SetIJKToRASMatrix(_array_to_matrix(ijk_to_ras(volumeNode)))
        copy.SetAndObserveImageData(image)
        copy.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        slicer.vtkSlicerTransformLogic().hardenTransform(copy)
        # Hardening can leave a linear part of the chain as a parent.
        affine, nonlinear = world_affine(copy)
        if nonlinear:
            raise RuntimeError("could not harden the parent transform of " + volumeNode.GetName())
        return np.array(slicer.util.arrayFromVolume(copy)), affine
    finally:
        _remove_new_nodes(scene, before, keep_classes=("vtkMRMLSubjectHierarchyNode",))


# --- arrays <-> library images ----------------------------------------------------------


def kji_to_library(arr_kji: np.ndarray, affine: np.ndarray):
    """(data, affine) in the library's convention from a Slicer (k, j, i) array.

    A single-slice volume becomes a 2D (H, W) image; if the singleton axis is
    not k, the affine's columns are permuted with the data axes so the voxel
    to RAS mapping is unchanged.
    """
    arr_kji = np.asarray(arr_kji)
    if arr_kji.ndim != 3:
        raise ValueError(f"expected a scalar volume, got an array of shape {arr_kji.shape}")
    data = arr_kji.transpose(2, 1, 0)
    affine = np.array(affine, dtype=np.float64)
    singleton = [a for a in range(3) if data.shape[a] == 1]
    if len(singleton) == 1:
        s = singleton[0]
        order = [a for a in range(3) if a != s] + [s]
        data = data.transpose(order)[..., 0]
        affine[:3, :3] = affine[:3, order]
    return np.ascontiguousarray(data), affine


def library_to_kji(data: np.ndarray) -> np.ndarray:
    """A Slicer (k, j, i) array from a library (i, j[, k]) array (2D gets k = 1)."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[:, :, None]
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def volume_to_library(volumeNode, scene=None):
    """(data (i, j[, k]) float32 copy, affine to world RAS) of a scalar volume node."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("volume has no image data")
    affine, nonlinear = world_affine(volumeNode)
    if nonlinear:
        arr, affine = resampled_copy_array(volumeNode, scene or volumeNode.GetScene())
    else:
        arr = np.array(slicer.util.arrayFromVolume(volumeNode))
    if arr.ndim != 3:
        raise ValueError(f"{volumeNode.GetName()} is not a scalar volume (array shape {arr.shape})")
    return kji_to_library(arr, affine)


def segment_names(segmentationNode):
    seg = segmentationNode.GetSegmentation()
    return [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())]


def segmentation_to_labels(segmentationNode, referenceVolumeNode, name_order, scene):
    """(labels (i, j[, k]), world affine) of a segmentation, on the reference volume's grid, where it is shown.

    Segments get label values by their position in ``name_order`` (1-based),
    so a fixed and a moving segmentation with the same segment names give
    comparable labels; segments not in ``name_order`` get values after them.

    ``ExportSegmentsToLabelmapNode`` already resamples the segmentation into
    the reference volume's frame *including both parent transforms* and puts
    the labelmap under the reference volume's parent transform; the labelmap
    is then read like any volume (``volume_to_library``: a linear parent goes
    into the affine, a non-linear one is hardened on a copy, nearest
    neighbour for label maps), so no transform is applied twice. The
    temporary labelmap and the colour table the export creates are removed.
    """
    seg = segmentationNode.GetSegmentation()
    names = segment_names(segmentationNode)
    values, extra = {}, len(name_order)
    for n in names:
        if n in name_order:
            values[n] = name_order.index(n) + 1
        else:
            extra += 1
            values[n] = extra
    before = _node_ids(scene)
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DEQReg temporary labels")
    try:
        out = None
        for n in names:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(seg.GetSegmentIdBySegmentName(n))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelNode, referenceVolumeNode):
                raise RuntimeError(f"could not export segment {n!r} of {segmentationNode.GetName()}")
            mask = slicer.util.arrayFromVolume(labelNode)
            if out is None:
                out = np.zeros(mask.shape, dtype=np.int32)
            out[mask > 0] = values[n]
        if out is None:  # no segments: an empty map on the reference grid
            out = np.zeros(slicer.util.arrayFromVolume(referenceVolumeNode).shape, dtype=np.int32)
            labelNode.SetIJKToRASMatrix(_array_to_matrix(ijk_to_ras(referenceVolumeNode)))
            labelNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(labelNode, out)
        return volume_to_library(labelNode, scene)
    finally:
        _remove_new_nodes(scene, before, keep_classes=("vtkMRMLSubjectHierarchyNode",))


def _node_ids(scene):
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def _remove_new_nodes(scene, before, keep_classes=()):
    """Remove the nodes added since ``before`` (temporary nodes and what their creation brought along)."""
    added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    for node in added:
        if node.GetID() not in before and not any(node.IsA(c) for c in keep_classes):
            scene.RemoveNode(node)


def labels_to_library(labelsNode, referenceVolumeNode, reference_shape, reference_affine,
                      name_order=None, scene=None):
    """Integer labels (i, j[, k]) on the grid of a reference volume (as given to the library).

    ``labelsNode`` is a label map volume (any grid: resampled with nearest
    neighbour through both world affines) or a segmentation (exported on the
    reference volume's grid, segment values by ``name_order``).
    """
    scene = scene or labelsNode.GetScene()
    if labelsNode.IsA("vtkMRMLSegmentationNode"):
        order = list(name_order) if name_order is not None else segment_names(labelsNode)
        data, affine = segmentation_to_labels(labelsNode, referenceVolumeNode, order, scene)
    else:
        data, affine = volume_to_library(labelsNode, scene)
    data = np.rint(data).astype(np.int32)
    if data.shape == tuple(reference_shape) and np.allclose(affine, reference_affine, atol=1e-5):
        return data
    from DEQRegistrationLib.sampling import Sampler  # torch: only when a registration runs
    return Sampler(reference_shape, reference_affine, affine).labels(data)


# --- outputs ---------------------------------------------------------------------------


def update_volume(volumeNode, data: np.ndarray, affine: np.ndarray):
    """Write a library array into a volume node (fires ImageDataModifiedEvent)."""
    write_volume_kji(volumeNode, library_to_kji(data), affine)


def write_volume_kji(volumeNode, kji: np.ndarray, affine: np.ndarray):
    """Write a Slicer (k, j, i) array into a volume node; in place (one copy) when its image has this shape and type.

    In place: the voxels are copied into the existing image data, which is
    marked Modified, so the node fires ImageDataModifiedEvent and views
    redraw; the geometry is set only when it changed. Otherwise the image
    data is reallocated (``updateVolumeFromArray``).
    """
    kji = np.asarray(kji)
    matrix = _affine_3d(affine)
    if not np.allclose(ijk_to_ras(volumeNode), matrix, rtol=0, atol=1e-9):
        volumeNode.SetIJKToRASMatrix(_array_to_matrix(matrix))
    image = volumeNode.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if (scalars is not None and tuple(image.GetDimensions()) == kji.shape[::-1]
            and scalars.GetNumberOfComponents() == 1
            and slicer.util.arrayFromVolume(volumeNode).dtype == kji.dtype):
        slicer.util.arrayFromVolume(volumeNode)[:] = kji
        scalars.Modified()
        image.Modified()
        volumeNode.StorableModified()
    else:
        slicer.util.updateVolumeFromArray(volumeNode, kji)


def _affine_3d(affine) -> np.ndarray:
    """A non-singular 4x4 affine: a 2D image's unused third column becomes the plane normal."""
    affine = np.array(affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        n = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = n / max(np.linalg.norm(n), 1e-12)
    return affine


def _grid_geometry(affine):
    affine = _affine_3d(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    return affine[:3, 3].copy(), spacing, direction


def update_grid_transform(transformNode, displacement_mm: np.ndarray, affine: np.ndarray):
    """Set a grid transform node's FromParent displacement field (RAS mm) on a grid.

    ``displacement_mm`` is (*S, 3) on the library grid (i, j[, k]) with the
    voxel-to-RAS ``affine``. When the node already holds a grid of this
    geometry the values are written in place and the transform is marked
    Modified, which makes the node fire TransformModifiedEvent (writing the
    array alone fires nothing); otherwise a new vtkOrientedGridTransform is set.
    """
    write_grid_transform_kji(transformNode, field_to_kji(displacement_mm), affine)


def field_to_kji(displacement_mm: np.ndarray) -> np.ndarray:
    """A library (*S, 3) displacement as Slicer's (k, j, i, 3) float32 array (2D gets k = 1)."""
    disp = np.asarray(displacement_mm, dtype=np.float32)
    if disp.ndim == 3:
        disp = disp[:, :, None, :]
    return np.ascontiguousarray(disp.transpose(2, 1, 0, 3))


def write_grid_transform_kji(transformNode, kji: np.ndarray, affine: np.ndarray):
    """``update_grid_transform`` for a displacement already in Slicer's (k, j, i, 3) layout."""
    origin, spacing, direction = _grid_geometry(affine)
    dims = tuple(int(n) for n in kji.shape[2::-1])
    transform = transformNode.GetTransformFromParent()
    grid = transform.GetDisplacementGrid() if isinstance(transform, slicer.vtkOrientedGridTransform) else None
    if grid is not None and _same_geometry(transform, grid, dims, origin, spacing, direction):
        arr = slicer.util.arrayFromGridTransform(transformNode)
        arr[:] = kji
        grid.GetPointData().GetScalars().Modified()
        grid.Modified()
        transform.Modified()
        return
    image = vtk.vtkImageData()
    image.SetOrigin(*origin)
    image.SetSpacing(*spacing)
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    from vtk.util import numpy_support
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = kji.reshape(-1, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(_array_to_matrix(_homogeneous(direction)))
    transform.SetInterpolationModeToLinear()
    transformNode.SetAndObserveTransformFromParent(transform)


def _homogeneous(m3):
    m = np.eye(4)
    m[:3, :3] = m3
    return m


def _same_geometry(transform, grid, dims, origin, spacing, direction):
    d = transform.GetGridDirectionMatrix()
    have_dir = _matrix_to_array(d)[:3, :3] if d is not None else np.eye(3)
    return (tuple(grid.GetDimensions()) == dims and np.allclose(grid.GetOrigin(), origin)
            and np.allclose(grid.GetSpacing(), spacing) and np.allclose(have_dir, direction)
            and grid.GetNumberOfScalarComponents() == 3)


def folding_color_node(scene):
    """The colour table of folding maps (created once per scene).

    Indexed over the Jacobian determinant range ``FOLDING_RANGE``: det <= 0
    (folded) is bright red; compression (0 < det < 1) ramps to blue and
    expansion (det > 1) to yellow, both from black at det = 1, so an overlay
    shows where and how much the transform deforms and folds stand out. Slice
    views blend scalar overlays by the layer opacity only, so the ramp is in
    the colours; alpha follows it too for views that use it.
    """
    lo, hi = FOLDING_RANGE

    def colour(x):
        det = lo + (hi - lo) * x
        if det <= 0:
            return f"det {det:.2f}", (1.0, 0.0, 0.0, 1.0)
        if det < 1:
            t = (1.0 - det) ** 0.7  # 0 at det=1, 1 at det=0
            return f"det {det:.2f}", (0.1 * t, 0.45 * t, 1.0 * t, min(1.0, 0.15 + 0.85 * t))
        t = min(1.0, (det - 1.0) / (hi - 1.0)) ** 0.7
        return f"det {det:.2f}", (1.0 * t, 0.85 * t, 0.1 * t, min(1.0, 0.15 + 0.85 * t))

    return _colour_table(scene, FOLDING_COLOR_NODE_NAME, colour)


def _colour_table(scene, name, colour, n=256):
    """The scene's colour table ``name``, created once with ``colour(x) -> (label, rgba)`` for x in [0, 1]."""
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(n)
    for idx in range(n):
        label, rgba = colour(idx / (n - 1))
        node.SetColor(idx, label, *rgba)
    node.SetAttribute("Category", "DEQRegistration")
    return node


def show_folding_colors(foldingNode):
    """Give a folding-map volume the folding colour table and a fixed window/level."""
    scene = foldingNode.GetScene()
    if foldingNode.GetDisplayNode() is None:
        foldingNode.CreateDefaultDisplayNodes()
    display = foldingNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(folding_color_node(scene).GetID())
    lo, hi = FOLDING_RANGE
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi)


def ramp_color_node(scene, name, rgb):
    """A colour table from black to ``rgb`` (created once per scene, found by name)."""
    return _colour_table(scene, name, lambda t: (f"{t:.2f}", (t * rgb[0], t * rgb[1], t * rgb[2], 1.0)))


def show_with_colors(volumeNode, colorNode, window_level=None):
    """Display a volume with a colour table; auto window/level unless ``(window, level)`` is given."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    if window_level is None:
        display.AutoWindowLevelOn()
    else:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*window_level)
    return display


# --- convergence plot ---------------------------------------------------------------------


def _double_column(table, name):
    arr = table.GetColumnByName(name)
    if arr is None:
        arr = vtk.vtkDoubleArray()
        arr.SetName(name)
        table.AddColumn(arr)
    return arr


def reset_table(tableNode, columns):
    """Empty a table node and give it double columns ``columns``."""
    table = tableNode.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(0)
    for name in columns:
        _double_column(table, name)
    table.Modified()
    tableNode.Modified()


def append_row(tableNode, values: dict):
    """Append one row (column name -> number) and notify observers (plots redraw)."""
    table = tableNode.GetTable()
    for name, value in values.items():
        _double_column(table, name).InsertNextValue(float(value))
    table.Modified()
    tableNode.Modified()


def setup_plot(scene, chartNode, traceTable, diceTable=None):
    """Residual (and Dice) against step in a plot chart, series created or reused."""
    def series(name, table, ycol, color, marker):
        ref_role = "DEQReg" + ycol
        node = chartNode.GetNodeReference(ref_role)
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            chartNode.SetNodeReferenceID(ref_role, node.GetID())
        node.SetAndObserveTableNodeID(table.GetID())
        node.SetXColumnName("step")
        node.SetYColumnName(ycol)
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        node.SetMarkerStyle(marker)
        node.SetColor(*color)
        return node

    residual = series("DEQReg residual", traceTable, "residual", (0.1, 0.3, 0.9),
                      slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    wanted = [residual.GetID()]
    if diceTable is not None:
        dice = series("DEQReg Dice", diceTable, "dice", (0.9, 0.4, 0.1),
                      slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        wanted.append(dice.GetID())
    chartNode.RemoveAllPlotSeriesNodeIDs()
    for sid in wanted:
        chartNode.AddAndObservePlotSeriesNodeID(sid)
    chartNode.SetXAxisRangeAuto(True)  # until a run knows its step budget
    chartNode.SetTitle("DEQReg convergence")
    chartNode.SetXAxisTitle("solver step")
    # no legend: in the top corner it hid the Dice curve (0.5-1 on the log axis); the axis title names the colours
    chartNode.SetLegendVisibility(False)
    chartNode.SetYAxisTitle("residual (blue)" + (" / Dice (orange)" if diceTable is not None else ""))
    chartNode.SetYAxisLogScale(True)
    return chartNode
