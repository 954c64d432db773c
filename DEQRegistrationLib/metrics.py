"""Evaluation metrics, following the Learn2Reg conventions where they exist.

All functions take numpy arrays on the fixed grid. Fields are (ndim, *S) in
voxel units (see ``geometry``). Conventions used (and stated in outputs):

* Dice: per label present in both maps, background 0 excluded; mean over those.
* HD95: per label, the larger of the two directed 95th-percentile surface
  distances, in **mm** (Learn2Reg reports voxels; pass spacing=1 for that).
* Jacobian: central differences (one-sided at the border) of p + u(p).
  ``folding_percent`` = % of voxels with det <= 0, over the whole grid.
  ``std_log_jacobian`` = std(log(clip(det, 1e-9, 1e9))) over the interior
  (2 voxels cropped per side), the conventional SDlogJ; the Learn2Reg code's
  variant (det + 3 before the log) is ``std_log_jacobian_l2r``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError


# --- overlap ----------------------------------------------------------------------


def _as_labels(a) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise InputError("label map has non-integer values")
        a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise InputError("label map has negative labels")
    return a.astype(np.int64, copy=False)


def common_labels(a, b) -> np.ndarray:
    """Labels present in both maps, 0 excluded."""
    la, lb = np.unique(_as_labels(a)), np.unique(_as_labels(b))
    both = np.intersect1d(la, lb)
    return both[both != 0]


def dice_per_label(fixed_labels, warped_labels, labels: Optional[Sequence[int]] = None) -> Dict[int, float]:
    """Dice of every label present in both maps (or of ``labels``), in one pass.

    Counts come from bincount, not a loop over labels.
    """
    a, b = _as_labels(fixed_labels).ravel(), _as_labels(warped_labels).ravel()
    if a.shape != b.shape:
        raise InputError(f"label maps differ in size: {np.shape(fixed_labels)} vs {np.shape(warped_labels)}")
    labels = common_labels(a, b) if labels is None else np.asarray(labels, dtype=np.int64)
    n = int(max(a.max(initial=0), b.max(initial=0), labels.max(initial=0))) + 1
    count_a = np.bincount(a, minlength=n)
    count_b = np.bincount(b, minlength=n)
    inter = np.bincount(a[a == b], minlength=n)
    out = {}
    for lab in labels:
        denom = count_a[lab] + count_b[lab]
        out[int(lab)] = float(2.0 * inter[lab] / denom) if denom else float("nan")
    return out


def mean_dice(fixed_labels, warped_labels, labels=None) -> float:
    vals = list(dice_per_label(fixed_labels, warped_labels, labels).values())
    return float(np.nanmean(vals)) if vals else float("nan")


# --- surface distance ---------------------------------------------------------------


def _surfaces(labels: np.ndarray, spacing: np.ndarray) -> Dict[int, np.ndarray]:
    """Surface voxels of every label at once, as (N, ndim) coordinates in the units of ``spacing``.

    A voxel is on its label's surface when a face neighbour has another label
    or lies outside the image (the voxels a 6-/4-connected erosion removes).
    """
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        boundary[tuple(lo)] |= differs
        boundary[tuple(hi)] |= differs
        edge = [slice(None)] * labels.ndim
        edge[axis] = [0, n - 1]
        boundary[tuple(edge)] = True
    flat = np.flatnonzero(boundary & (labels > 0))
    values = labels.ravel()[flat]
    order = np.argsort(values, kind="stable")
    flat, values = flat[order], values[order]
    coords = np.stack(np.unravel_index(flat, labels.shape), 1) * spacing
    ids, starts = np.unique(values, return_index=True)
    ends = list(starts[1:]) + [len(values)]
    return {int(i): coords[s:e] for i, s, e in zip(ids, starts, ends)}


class SurfaceDistance:
    """HD95 of several label maps against one fixed label map; the fixed side is built once.

    Exact Euclidean surface distances (KD-trees of surface voxels, queried on
    all cores), the same numbers as distance transforms of the surfaces.
    """

    def __init__(self, fixed_labels, spacing=None):
        self.fixed = _as_labels(fixed_labels)
        self.spacing = np.ones(self.fixed.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
        self._surf = _surfaces(self.fixed, self.spacing)
        self._trees = {}

    def _tree(self, label: int):
        from scipy.spatial import cKDTree

        if label not in self._trees:
            self._trees[label] = cKDTree(self._surf[label])
        return self._trees[label]

    def hd95_per_label(self, warped_labels, labels=None) -> Dict[int, float]:
        from scipy.spatial import cKDTree

        b = _as_labels(warped_labels)
        if b.shape != self.fixed.shape:
            raise InputError(f"label maps differ in size: {self.fixed.shape} vs {b.shape}")
        labels = common_labels(self.fixed, b) if labels is None else labels
        surf_b = _surfaces(b, self.spacing)
        out = {}
        for lab in labels:
            lab = int(lab)
            if lab not in self._surf or lab not in surf_b:
                out[lab] = float("nan")
                continue
            sa, sb = self._surf[lab], surf_b[lab]
            da = cKDTree(sb).query(sa, workers=-1)[0]  # fixed surface -> warped surface
            db = self._tree(lab).query(sb, workers=-1)[0]
            out[lab] = float(max(np.percentile(da, 95), np.percentile(db, 95)))
        return out

    def hd95(self, warped_labels, labels=None) -> float:
        vals = list(self.hd95_per_label(warped_labels, labels).values())
        return float(np.nanmean(vals)) if vals else float("nan")


def hd95_per_label(fixed_labels, warped_labels, spacing=None, labels=None) -> Dict[int, float]:
    """95th-percentile Hausdorff distance per label, in the units of ``spacing`` (mm).

    The larger of the two directed 95th percentiles of surface-to-surface
    distances (see ``SurfaceDistance``, which also serves several maps).
    """
    return SurfaceDistance(fixed_labels, spacing).hd95_per_label(warped_labels, labels)


def hd95(fixed_labels, warped_labels, spacing=None, labels=None) -> float:
    vals = list(hd95_per_label(fixed_labels, warped_labels, spacing, labels).values())
    return float(np.nanmean(vals)) if vals else float("nan")


# --- Jacobian -------------------------------------------------------------------------


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """det(I + grad u) for a voxel-unit field (ndim, *S); returns (*S).

    In voxel units of the field's own grid this equals the physical Jacobian
    determinant (the affine's factors cancel).
    """
    disp = np.asarray(disp, dtype=np.float32)
    ndim = disp.shape[0]
    if ndim not in (2, 3) or disp.ndim != ndim + 1:
        raise ValueError(f"expected a (ndim, *S) field, got {disp.shape}")
    # J[a][b] = d(x_a + u_a) / d x_b
    grads = [np.gradient(disp[a], axis=tuple(range(ndim))) for a in range(ndim)]
    J = [[grads[a][b] + (1.0 if a == b else 0.0) for b in range(ndim)] for a in range(ndim)]
    if ndim == 2:
        return (J[0][0] * J[1][1] - J[0][1] * J[1][0]).astype(np.float32)
    det = (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
           - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
           + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))
    return det.astype(np.float32)


def folding_percent(jac: np.ndarray) -> float:
    """Percentage of voxels whose Jacobian determinant is <= 0."""
    jac = np.asarray(jac)
    return float(100.0 * np.count_nonzero(jac <= 0) / jac.size)


def _interior(jac: np.ndarray, crop: int) -> np.ndarray:
    if crop and all(n > 2 * crop for n in jac.shape):
        return jac[tuple(slice(crop, -crop) for _ in jac.shape)]
    return jac


def std_log_jacobian(jac: np.ndarray, crop: int = 2) -> float:
    """Conventional SDlogJ: std of log(clip(det J)) over the interior."""
    j = _interior(np.asarray(jac, dtype=np.float64), crop)
    return float(np.log(np.clip(j, 1e-9, 1e9)).std())


def std_log_jacobian_l2r(jac: np.ndarray, crop: int = 2) -> float:
    """The Learn2Reg evaluation code's variant: std(log(clip(det J + 3)))."""
    j = _interior(np.asarray(jac, dtype=np.float64), crop)
    return float(np.log(np.clip(j + 3, 1e-9, 1e9)).std())


# --- landmarks -------------------------------------------------------------------------


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray, disp: np.ndarray,
                              fixed_affine: np.ndarray, moving_affine: np.ndarray,
                              world: Optional[np.ndarray] = None) -> np.ndarray:
    """TRE in mm per landmark pair.

    ``fixed_points`` and ``moving_points`` are voxel coordinates (N, ndim) on
    their own grids. The field is sampled at the fixed points (linear), each
    point is carried to the moving image's physical space, and compared there
    with its moving landmark: ||W A_f (p + u(p)) - A_m q||, W the linear
    alignment (fixed RAS -> moving RAS, applied after the field; None:
    identity). With identical grids and no W this is Learn2Reg's
    ||(p + u(p) - q) * spacing||.
    """
    from .geometry import voxel_to_physical_points

    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape:
        raise InputError(f"landmark counts differ: {len(fixed_points)} fixed vs {len(moving_points)} moving")
    disp = np.asarray(disp, dtype=np.float64)
    ndim = disp.shape[0]
    u = np.stack([ndimage.map_coordinates(disp[a], fixed_points.T, order=1, mode="nearest") for a in range(ndim)], 1)
    carried = voxel_to_physical_points(fixed_points + u, fixed_affine)
    if world is not None:
        world = np.asarray(world, dtype=np.float64)
        carried = carried @ world[:3, :3].T + world[:3, 3]
    target = voxel_to_physical_points(moving_points, moving_affine)
    return np.linalg.norm(carried - target, axis=1)
