"""Synthetic test volumes, RAS checks and a layout-manager stand-in, shared by the pytest suite and the self-test.

Kept in the package (not in Testing/) because the module's
ScriptedLoadableModuleTest runs inside Slicer, where only installed files exist.
"""
from __future__ import annotations

import numpy as np
import vtk

import slicer
import slicer.util

from .mrml import _array_to_matrix, ijk_to_ras, update_grid_transform, world_affine


def oblique_affine(spacing=(1.0, 1.0, 1.0), angle_deg=0.0, origin=(0.0, 0.0, 0.0), axis=(0.3, 0.2, 0.93)):
    """IJKToRAS with a rotation about ``axis`` and anisotropic spacing."""
    axis = np.asarray(axis, float)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(spacing)
    A[:3, 3] = origin
    return A


def centred_affine(shape_kji, spacing=(1.0, 1.0, 1.0), angle_deg=0.0, centre=(0.0, 0.0, 0.0),
                   axis=(0.3, 0.2, 0.93)):
    """Like ``oblique_affine``, with the origin chosen so the grid's centre voxel sits at ``centre``."""
    A = oblique_affine(spacing, angle_deg, (0.0, 0.0, 0.0), axis)
    mid = (np.array(shape_kji[::-1], float) - 1) / 2
    A[:3, 3] = np.asarray(centre, float) - A[:3, :3] @ mid
    return A


def blob_function(centres_ras, sigma=6.0):
    """Smooth image intensity as a function of RAS points (N, 3)."""
    centres = np.asarray(centres_ras, float)

    def f(points):
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma ** 2)).sum(-1)
    return f


def ras_grid(shape_kji, affine):
    """RAS coordinates (N, 3) of every voxel of a (k, j, i) array, in C order."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    return (np.asarray(affine) @ ijk1)[:3].T


def add_sampled_volume(func, shape_kji, affine, name, className="vtkMRMLScalarVolumeNode", dtype=np.float32):
    """A volume node whose voxels sample ``func`` (of RAS points) on the given grid."""
    values = func(ras_grid(shape_kji, affine)).reshape(shape_kji).astype(dtype)
    return slicer.util.addVolumeFromArray(values, affine, name, className)


def transform_points_from_parent(transformNode, points):
    """Map RAS points (N, 3) through a transform node's FromParent (resampling) direction."""
    t = transformNode.GetTransformFromParent()
    return np.array([t.TransformPoint(*p) for p in np.asarray(points, float)])


def resample_into(volumeNode, refShapeKJI, refAffine):
    """Sample a volume (with its parent transforms) at the voxel centres of a reference grid.

    World point x of the reference voxel goes through the volume's
    transform-from-world (parent transforms, linear or not) to the volume's
    RAS, then through RASToIJK; trilinear with vtkImageReslice would do the
    same, this is written out so the test checks the geometry independently.
    """
    from scipy import ndimage
    pts = ras_grid(refShapeKJI, refAffine)
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        toLocal = vtk.vtkGeneralTransform()
        parent.GetTransformFromWorld(toLocal)
        pts = np.array([toLocal.TransformPoint(*p) for p in pts])
    ijk = (np.linalg.inv(ijk_to_ras(volumeNode)) @ np.c_[pts, np.ones(len(pts))].T)[:3]
    arr = slicer.util.arrayFromVolume(volumeNode)
    vals = ndimage.map_coordinates(arr.astype(np.float64), ijk[::-1], order=1, mode="nearest")
    return vals.reshape(refShapeKJI)


class LayoutManagerStandIn:
    """What Slicer's layout manager does to the scene, without Qt: for tests on ``slicer-core``.

    Slicer's ``qMRMLLayoutManager`` keeps a ``vtkMRMLLayoutLogic`` (which
    creates the view nodes of the current arrangement) and, for every slice
    view it shows, a ``vtkMRMLSliceLogic`` registered with the application
    logic (which creates the view's slice composite node). This stand-in
    does the same whenever the layout node changes; it draws nothing.
    """

    def __init__(self, scene):
        self.scene = scene
        self.appLogic = slicer.vtkMRMLApplicationLogic()
        self.appLogic.SetMRMLScene(scene)
        self.appLogic.SetSliceLogics(vtk.vtkCollection())
        self.layoutLogic = slicer.vtkMRMLLayoutLogic()
        self.layoutLogic.SetMRMLScene(scene)
        self.layoutNode = self.layoutLogic.GetLayoutNode()
        self.layoutNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *args: self.createViews())
        self.createViews()

    def createViews(self):
        for n in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            sliceNode = self.scene.GetNthNodeByClass(n, "vtkMRMLSliceNode")
            if self.appLogic.GetSliceLogicByLayoutName(sliceNode.GetLayoutName()) is None:
                logic = slicer.vtkMRMLSliceLogic()
                logic.SetMRMLApplicationLogic(self.appLogic)
                logic.SetMRMLScene(self.scene)
                logic.SetSliceNode(sliceNode)
                self.appLogic.GetSliceLogics().AddItem(logic)



def put_under_transform(node, kind, scene, variant=0):
    """Put ``node`` under a transform of ``kind`` without changing where it is shown in world coordinates.

    ``variant`` picks another transform of the same kind (so two nodes can be
    under different transforms, which is what catches a transform applied to
    the wrong node).

    linear: a rigid motion M, with the node's IJKToRAS moved by M^-1; non-linear: a
    grid transform whose FromParent displacement is a constant d (world x shows
    local x + d), with the node's IJKToRAS moved by +d. The grid transform is a
    vtkOrientedGridTransform, so Slicer treats it as non-linear (resampling).
    """
    if kind == "none":
        return
    if kind == "linear":
        M = oblique_affine((1, 1, 1), 20.0 - 35.0 * variant, (5.0 - 9.0 * variant, -3.0, 4.0 + 3.0 * variant),
                           axis=(0.3, 0.8, 0.5))
        t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        t.SetMatrixTransformToParent(_array_to_matrix(M))
        local = np.linalg.inv(M)
    else:
        d = np.array([5.0, -2.0, 3.0]) + variant * np.array([-8.0, 6.0, -1.0])
        t = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
        big = np.diag([4.0, 4.0, 4.0, 1.0])
        big[:3, 3] = -60.0  # a 120 mm cube around the origin: every test volume is inside it
        update_grid_transform(t, np.broadcast_to(d, (31, 31, 31, 3)).astype(np.float32), big)
        local = np.eye(4)
        local[:3, 3] = d
    if node.IsA("vtkMRMLSegmentationNode"):
        node.ApplyTransformMatrix(_array_to_matrix(local)) if kind == "linear" else _shift_segmentation(node, d)
    else:
        node.SetIJKToRASMatrix(_array_to_matrix(local @ ijk_to_ras(node)))
    node.SetAndObserveTransformNodeID(t.GetID())


def _shift_segmentation(seg, d):
    m = np.eye(4)
    m[:3, 3] = d
    seg.ApplyTransformMatrix(_array_to_matrix(m))


__all__ = ["LayoutManagerStandIn", "oblique_affine", "centred_affine", "blob_function", "ras_grid", "add_sampled_volume",
           "transform_points_from_parent", "resample_into", "put_under_transform", "world_affine", "_array_to_matrix"]
