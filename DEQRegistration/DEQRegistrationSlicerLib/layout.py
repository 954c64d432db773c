"""The live layout: what the user watches while the solver runs.

Three views side by side (``LAYOUT_XML``, a Slicer layout description):

* **overlay**: the fixed volume in green and the warped moving volume in
  magenta, added (the slice view's "Add" compositing): where the two agree
  the picture is grey to white, where they disagree it is green (fixed only)
  or magenta (warped only), so misalignment shows at a glance and shrinks as
  the solver works (the false-colour overlay of many registration tools);
* **folding**: the folding map (Jacobian determinant, its own colour table:
  folds red, compression blue, expansion yellow) at half opacity over the
  fixed volume in grey;
* **chart**: residual against step, and Dice when labels are given.

Everything here is MRML only: the layout node's arrangement, the views'
slice composite nodes, slice nodes and plot view node, and the application
logic's slice logics for fitting. Slicer's layout manager (Qt) creates the
views when the arrangement changes; ``trame-slicer`` does the same for the
rendered pictures in the README (``scripts/render_live_display.py``); the
tests do it with ``testing.LayoutManagerStandIn``. The fixed volume's own
display is never changed: the green copy is a display proxy (a hidden,
unsaved volume node sharing the fixed volume's voxels).
"""
from __future__ import annotations

from typing import Optional

from . import mrml

#: view arrangement id of the live layout (any number Slicer does not use)
LAYOUT_ID = 3621
OVERLAY_VIEW = "DEQRegOverlay"
FOLDING_VIEW = "DEQRegFolding"
CHART_VIEW = "DEQRegChart"
SLICE_VIEWS = (OVERLAY_VIEW, FOLDING_VIEW)
#: the two slice views move together, apart from the standard views
VIEW_GROUP = 7
PREVIOUS_LAYOUT_ATTRIBUTE = "DEQReg.previousLayout"
PROXY_ATTRIBUTE = "DEQReg.displayProxyOf"
FIXED_COLOR = ("DEQReg fixed (green)", (0.0, 1.0, 0.0))
WARPED_COLOR = ("DEQReg warped (magenta)", (1.0, 0.0, 1.0))
FOLDING_OPACITY = 0.5


def _slice_view(name, label, color):
    return (f'<view class="vtkMRMLSliceNode" singletontag="{name}">'
            '<property name="orientation" action="default">Axial</property>'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewcolor" action="default">{color}</property>'
            f'<property name="viewgroup" action="default">{VIEW_GROUP}</property>'
            '</view>')


LAYOUT_XML = (
    '<layout type="horizontal" split="true">'
    f'<item splitSize="500">{_slice_view(OVERLAY_VIEW, "W", "#C040C0")}</item>'
    f'<item splitSize="500">{_slice_view(FOLDING_VIEW, "J", "#E04040")}</item>'
    f'<item splitSize="500"><view class="vtkMRMLPlotViewNode" singletontag="{CHART_VIEW}">'
    '<property name="viewlabel" action="default">P</property></view></item>'
    '</layout>')


def _nodes_by_class(scene, className):
    return [scene.GetNthNodeByClass(n, className) for n in range(scene.GetNumberOfNodesByClass(className))]


def _by_layout_name(scene, className, name):
    for node in _nodes_by_class(scene, className):
        if node.GetLayoutName() == name:
            return node
    return None


def window_level(volumeNode):
    """(window, level) the volume is displayed with, or from its intensities (0.5-99.5 percentiles) without a display."""
    display = volumeNode.GetDisplayNode()
    if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode") and display.GetWindow() > 0:
        return display.GetWindow(), display.GetLevel()
    import numpy as np
    import slicer.util
    lo, hi = np.percentile(slicer.util.arrayFromVolume(volumeNode), [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0
    return float(hi - lo), float((hi + lo) / 2)


class LiveLayout:
    """Switches to the live layout, shows a run's nodes in it and restores the previous layout.

    ``appLogic``: the application logic whose slice logics belong to the
    views (``slicer.app.applicationLogic()`` in Slicer); without it views are
    not fitted (nothing else needs it).
    """

    def __init__(self, scene, appLogic=None):
        self.scene = scene
        self.appLogic = appLogic

    # --- arrangement ------------------------------------------------------------------------

    @property
    def layoutNode(self):
        return self.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")

    def isActive(self) -> bool:
        node = self.layoutNode
        return node is not None and node.GetViewArrangement() == LAYOUT_ID

    def previousLayout(self) -> Optional[int]:
        node = self.layoutNode
        value = node.GetAttribute(PREVIOUS_LAYOUT_ATTRIBUTE) if node is not None else None
        return int(value) if value else None

    def activate(self) -> bool:
        """Switch to the live layout, remembering the current one; False when the scene has no layout."""
        node = self.layoutNode
        if node is None:
            return False
        if not node.IsLayoutDescription(LAYOUT_ID):
            node.AddLayoutDescription(LAYOUT_ID, LAYOUT_XML)
        current = node.GetViewArrangement()
        if current != LAYOUT_ID:
            node.SetAttribute(PREVIOUS_LAYOUT_ATTRIBUTE, str(current))
            node.SetViewArrangement(LAYOUT_ID)
        return True

    def restore(self) -> bool:
        """Go back to the layout shown before the live one (and drop the display proxy)."""
        node, previous = self.layoutNode, self.previousLayout()
        self.removeProxy()
        if node is None or previous is None:
            return False
        node.SetViewArrangement(previous)
        node.RemoveAttribute(PREVIOUS_LAYOUT_ATTRIBUTE)
        return True

    # --- content ------------------------------------------------------------------------------

    def show(self, fixedNode, movingNode, warpedNode, foldingNode, chartNode, fit=True):
        """Put a run's nodes in the live views (whichever exist) and fit the slice views to the fixed volume.

        The warped volume gets the moving volume's window/level (it holds the
        moving intensities; its own automatic one would be computed from the
        empty volume it starts as), the green fixed copy the fixed volume's.
        """
        proxy = self.fixedProxy(fixedNode)
        mrml.show_with_colors(warpedNode, mrml.ramp_color_node(self.scene, *WARPED_COLOR),
                              window_level(movingNode))
        overlay = self.compositeNode(OVERLAY_VIEW)
        if overlay is not None:
            overlay.SetBackgroundVolumeID(proxy.GetID())
            overlay.SetForegroundVolumeID(warpedNode.GetID())
            overlay.SetForegroundOpacity(1.0)
            overlay.SetCompositing(overlay.Add)
            overlay.SetLabelVolumeID(None)
        folding = self.compositeNode(FOLDING_VIEW)
        if folding is not None:
            folding.SetBackgroundVolumeID(fixedNode.GetID())
            folding.SetForegroundVolumeID(foldingNode.GetID())
            folding.SetForegroundOpacity(FOLDING_OPACITY)
            folding.SetCompositing(folding.Alpha)
            folding.SetLabelVolumeID(None)
        for composite in (overlay, folding):
            if composite is not None:
                composite.SetDoPropagateVolumeSelection(False)  # loading data elsewhere does not replace ours
                composite.SetLinkedControl(True)
        plot = _by_layout_name(self.scene, "vtkMRMLPlotViewNode", CHART_VIEW)
        if plot is not None:
            plot.SetPlotChartNodeID(chartNode.GetID())
            plot.SetDoPropagatePlotChartSelection(False)
        for name in SLICE_VIEWS:
            sliceNode = self.sliceNode(name)
            if sliceNode is not None:
                sliceNode.RotateToVolumePlane(fixedNode)  # a single-slice volume is seen in its own plane
        if fit:
            self.fit()

    def fit(self):
        """Centre and zoom the live slice views on their background (the fixed volume)."""
        for name in SLICE_VIEWS:
            logic = self.sliceLogic(name)
            if logic is not None:
                logic.FitSliceToBackground()
                logic.SnapSliceOffsetToIJK()

    def compositeNode(self, name):
        logic = self.sliceLogic(name)
        if logic is not None and logic.GetSliceCompositeNode() is not None:
            return logic.GetSliceCompositeNode()
        return _by_layout_name(self.scene, "vtkMRMLSliceCompositeNode", name)

    def sliceNode(self, name):
        logic = self.sliceLogic(name)
        if logic is not None and logic.GetSliceNode() is not None:
            return logic.GetSliceNode()
        return _by_layout_name(self.scene, "vtkMRMLSliceNode", name)

    def sliceLogic(self, name):
        if self.appLogic is None or self.appLogic.GetSliceLogics() is None:
            return None
        return self.appLogic.GetSliceLogicByLayoutName(name)

    # --- the fixed volume in green ---------------------------------------------------------------

    def fixedProxy(self, fixedNode):
        """A hidden, unsaved volume node that shows the fixed volume's voxels (shared, not copied) in green.

        Same geometry and parent transform as the fixed volume, window/level
        from the fixed volume's display; one per scene, reused.
        """
        proxy = None
        for node in _nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(PROXY_ATTRIBUTE) is not None:
                proxy = node
                break
        if proxy is None:
            proxy = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DEQReg fixed view")
            proxy.SetHideFromEditors(True)
            proxy.SetSaveWithScene(False)
        proxy.SetAttribute(PROXY_ATTRIBUTE, fixedNode.GetID())
        proxy.SetName(fixedNode.GetName() + " (DEQReg view)")
        proxy.SetIJKToRASMatrix(mrml._array_to_matrix(mrml.ijk_to_ras(fixedNode)))
        proxy.SetAndObserveImageData(fixedNode.GetImageData())
        proxy.SetAndObserveTransformNodeID(fixedNode.GetTransformNodeID())
        mrml.show_with_colors(proxy, mrml.ramp_color_node(self.scene, *FIXED_COLOR), window_level(fixedNode))
        return proxy

    def removeProxy(self):
        for node in _nodes_by_class(self.scene, "vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(PROXY_ATTRIBUTE) is not None:
                self.scene.RemoveNode(node)
