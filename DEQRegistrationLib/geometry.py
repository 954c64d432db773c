"""Coordinate systems, kept explicit.

Three systems appear in this library, and every function here converts between
two of them, saying which in its name:

* **voxel**: array indices (i, j[, k]) of an image, in the axis order of its
  array. A displacement field in voxel units is a tensor (B, ndim, *S) whose
  channel ``a`` is the displacement along array axis ``a`` (the Learn2Reg
  convention). This is the library's internal unit.
* **normalized**: torch ``grid_sample`` coordinates with ``align_corners=True``:
  -1 at the first voxel centre, +1 at the last, per axis. Note grid_sample
  wants the components in reversed axis order (x = last axis); only
  ``transforms.sample`` deals with that.
* **physical**: millimetres in RAS (nibabel's and Slicer's world) or LPS (ITK's
  files), through a 4x4 voxel-to-RAS affine, any rotation, shear or spacing.

Mapping fixed voxels to moving voxels (both affines, a field) is
``sampling.Sampler``, the only place that composes those matrices.
"""
from __future__ import annotations

import numpy as np

# --- voxel <-> physical ---------------------------------------------------------


def _linear(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The 3 x ndim block of an affine that maps voxel steps to RAS mm."""
    return np.asarray(affine, dtype=np.float64)[:3, :ndim]


def voxel_field_to_physical(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement (ndim, *S) to RAS millimetres, shape (*S, 3).

    A displacement is a difference of points, so only the linear part of the
    affine applies (rotation, spacing, shear); the translation cancels.
    """
    disp = np.asarray(disp)
    ndim = disp.shape[0]
    lin = _linear(affine, ndim)
    return np.einsum("ra,a...->...r", lin, disp.astype(np.float64)).astype(np.float32)


def physical_field_to_voxel(disp_mm: np.ndarray, affine: np.ndarray, ndim: int) -> np.ndarray:
    """RAS millimetre displacement (*S, 3) to voxel units (ndim, *S).

    For a 2D image the component normal to its plane has no voxel axis and is
    dropped (least squares through the pseudo-inverse).
    """
    inv = np.linalg.pinv(_linear(affine, ndim))
    return np.einsum("ar,...r->a...", inv, np.asarray(disp_mm, dtype=np.float64)).astype(np.float32)


def pooled_affine(affine: np.ndarray, factor: int, ndim: int) -> np.ndarray:
    """The voxel-to-RAS affine of a grid average-pooled by ``factor`` (``transforms.downsample_image``).

    Coarse voxel c covers fine voxels factor * c ... factor * c + factor - 1,
    so its centre is the fine position factor * c + (factor - 1) / 2.
    """
    scale = np.eye(4)
    for a in range(ndim):
        scale[a, a] = factor
        scale[a, 3] = (factor - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ scale


def ras_to_lps(vectors: np.ndarray) -> np.ndarray:
    """Flip the first two components of (..., 3) vectors or points (RAS <-> LPS)."""
    out = np.array(vectors, dtype=np.float64, copy=True)
    out[..., :2] *= -1
    return out


lps_to_ras = ras_to_lps


def voxel_to_physical_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates (N, ndim) to RAS points (N, 3)."""
    points = np.asarray(points, dtype=np.float64)
    ndim = points.shape[1]
    return points @ _linear(affine, ndim).T + np.asarray(affine)[:3, 3]


def physical_to_voxel_points(points: np.ndarray, affine: np.ndarray, ndim: int) -> np.ndarray:
    """RAS points (N, 3) to voxel coordinates (N, ndim)."""
    points = np.asarray(points, dtype=np.float64)
    inv = np.linalg.pinv(_linear(affine, ndim))
    return (points - np.asarray(affine)[:3, 3]) @ inv.T
