"""The inverse transform (moving space -> fixed space), solved as the fixed point it is.

The forward transform carries a fixed voxel p to p + u(p) (fixed voxel units;
then through the affines and the world transform W into the moving space,
see ``sampling``). Its inverse at a point q of the fixed space is q + v(q)
with

    v(q) = -u(q + v(q))

a fixed-point equation in v, solved with the library's own root solvers
(``solvers.solve``: Anderson or plain iteration) from v = 0. Iteration
contracts where |grad u| < 1; where the forward field folds (det J <= 0)
there is no unique inverse and the iteration need not settle.

The inverse is computed at the voxels of a *target* grid in the moving space
(the moving image's grid): each voxel m sits at the fixed-space point
q0(m) = F^-1 W^-1 A_m m, which is ``Sampler(target, A_m, F, W^-1).coords()``.
The result is stored as a displacement on that grid, so that

    moving point y  ->  W^-1 (y + w(y))      (w = W F v, in RAS mm)

is the fixed-space point; as an ITK displacement field on the moving grid
(``inverse.nii.gz``) it warps the fixed image onto the moving grid the way
``displacement.nii.gz`` warps the moving image onto the fixed grid.

Reported: the solver's residual (``solvers.RESIDUAL_DEFINITION``), steps,
and per voxel the error |v + u(q0 + v)| in mm (how far forward(inverse(y))
lands from y). A voxel is *unreliable* when that error exceeds
``UNRELIABLE_MM`` or its pre-image lies where the forward field folds; it is
*outside* when its pre-image falls outside the fixed grid (no field there:
the edge values are extended).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .geometry import physical_field_to_voxel, voxel_field_to_physical
from .sampling import Sampler
from .solvers import RESIDUAL_DEFINITION, solve
from .transforms import sample

#: pointwise error |forward(inverse(y)) - y| above which a voxel's inverse is called unreliable
UNRELIABLE_MM = 0.05
DEFAULT_SOLVER = "anderson"
DEFAULT_MAX_STEPS = 30
DEFAULT_TOL = 1e-4
#: values of the mask written beside the inverse field
MASK_RELIABLE, MASK_UNRELIABLE, MASK_OUTSIDE = 0, 1, 2


@dataclass
class InverseResult:
    """The inverse on a target grid, with how well it solved its equation."""
    displacement: np.ndarray        # (ndim, *target_shape), target-grid voxel units (Sampler form, world W^-1)
    displacement_ras: np.ndarray    # (*target_shape, 3) RAS mm: y -> W^-1 (y + w(y))
    target_shape: tuple
    target_affine: np.ndarray
    method: str
    steps: int
    converged: bool
    residual: float                 # the solver's relative residual
    error_mm: np.ndarray            # (*target_shape) |forward(inverse(y)) - y| in mm (fixed space)
    mask: np.ndarray                # (*target_shape) uint8: MASK_RELIABLE / MASK_UNRELIABLE / MASK_OUTSIDE
    forward_folded_percent: float
    residuals: list = field(default_factory=list)

    @property
    def unreliable_percent(self) -> float:
        return float(np.mean(self.mask == MASK_UNRELIABLE) * 100.0)

    @property
    def outside_percent(self) -> float:
        return float(np.mean(self.mask == MASK_OUTSIDE) * 100.0)

    def summary(self) -> dict:
        inside = self.error_mm[self.mask != MASK_OUTSIDE]
        inside = inside if inside.size else np.zeros(1)
        return dict(
            method=self.method, steps=int(self.steps), converged=bool(self.converged),
            residual=float(self.residual), residual_definition=RESIDUAL_DEFINITION,
            error_mm_max=float(inside.max()), error_mm_p95=float(np.percentile(inside, 95)),
            error_mm_mean=float(inside.mean()),
            unreliable_percent=self.unreliable_percent, unreliable_threshold_mm=UNRELIABLE_MM,
            outside_percent=self.outside_percent, forward_folded_percent=float(self.forward_folded_percent),
        )

    def message(self) -> str:
        """One line for a user: how good the inverse is and where it is not to be trusted."""
        s = self.summary()
        text = (f"inverse: {s['steps']} steps, residual {s['residual']:.2e}"
                f"{'' if s['converged'] else ' (not converged)'}, error p95 {s['error_mm_p95']:.3g} mm, "
                f"max {s['error_mm_max']:.3g} mm")
        if self.forward_folded_percent > 0:
            text += (f"; the forward field folds at {self.forward_folded_percent:.3f}% of its voxels, so the "
                     f"inverse is not unique there")
        if s["unreliable_percent"] > 0:
            text += f"; unreliable at {s['unreliable_percent']:.3f}% of the target voxels (error > {UNRELIABLE_MM} mm " \
                    "or folded: see the unreliable-voxel mask)"
        return text


def _solve(disp: np.ndarray, q0: torch.Tensor, method: str, max_steps: int, tol: float):
    """Solve v = -u(q0 + v) at fixed-voxel positions q0 (1, ndim, ...); returns (v, f(v) - v, pre-images, result)."""
    U = torch.as_tensor(np.asarray(disp), dtype=q0.dtype)[None]

    def f(v):
        return -sample(U, q0 + v, mode="bilinear", padding_mode="border")

    with torch.no_grad():
        res = solve(f, torch.zeros_like(q0), method, max_steps=max_steps, tol=tol)
        v = res.z
        err = f(v) - v
    return v[0].numpy(), err[0].numpy(), (q0 + v)[0].numpy(), res


def _reliability(disp, fixed_affine, err_vox, pre, jac):
    """(error in mm, mask) per point from the solve's leftover and where its pre-image lies."""
    ndim = disp.shape[0]
    fixed_shape = disp.shape[1:]
    error_mm = np.linalg.norm(voxel_field_to_physical(err_vox, fixed_affine), axis=-1)
    idx = tuple(np.clip(np.rint(pre[a]), 0, fixed_shape[a] - 1).astype(np.intp) for a in range(ndim))
    folded_at = jac[idx] <= 0
    outside = np.zeros(pre.shape[1:], dtype=bool)
    for a in range(ndim):
        outside |= (pre[a] < -0.5) | (pre[a] > fixed_shape[a] - 0.5)
    mask = np.full(pre.shape[1:], MASK_RELIABLE, dtype=np.uint8)
    mask[(error_mm > UNRELIABLE_MM) | folded_at] = MASK_UNRELIABLE
    mask[outside] = MASK_OUTSIDE
    return error_mm.astype(np.float32), mask


def invert(disp: np.ndarray, fixed_affine: np.ndarray, target_shape: Sequence[int], target_affine: np.ndarray,
           world: Optional[np.ndarray] = None, method: str = DEFAULT_SOLVER, max_steps: int = DEFAULT_MAX_STEPS,
           tol: float = DEFAULT_TOL, jacobian: Optional[np.ndarray] = None) -> InverseResult:
    """Invert the forward field ``disp`` ((ndim, *fixed), fixed voxel units) at the voxels of a target grid.

    ``world`` is the forward transform's W (fixed RAS -> moving RAS), identity
    if None; ``jacobian`` the forward field's det J (computed if None).
    """
    from . import metrics

    disp = np.asarray(disp, dtype=np.float32)
    ndim = disp.shape[0]
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    W = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
    # Fixed-space voxel coordinates of the target voxels (float32: 1e-5 voxel, far below the tolerance).
    q0 = Sampler(target_shape, target_affine, fixed_affine, world=np.linalg.inv(W)).coords()
    v, err, pre, res = _solve(disp, q0, method, max_steps, tol)
    jac = metrics.jacobian_determinant(disp) if jacobian is None else np.asarray(jacobian)
    error_mm, mask = _reliability(disp, fixed_affine, err, pre, jac)
    # v (fixed voxel units) -> w (RAS mm in the moving space) -> target voxel units.
    ras = voxel_field_to_physical(v, W @ fixed_affine)
    vox = physical_field_to_voxel(ras, target_affine, ndim)
    return InverseResult(
        displacement=vox, displacement_ras=ras, target_shape=tuple(int(n) for n in target_shape),
        target_affine=target_affine, method=method, steps=res.steps, converged=res.converged,
        residual=res.final_residual, error_mm=error_mm, mask=mask,
        forward_folded_percent=float(np.mean(jac <= 0) * 100.0), residuals=list(res.residuals))


def invert_points(disp: np.ndarray, fixed_affine: np.ndarray, points_ras: np.ndarray,
                  world: Optional[np.ndarray] = None, method: str = DEFAULT_SOLVER,
                  max_steps: int = DEFAULT_MAX_STEPS, tol: float = DEFAULT_TOL, jacobian=None):
    """Fixed-space RAS points (N, 3) of moving-space RAS points, solved at the points themselves.

    Exact up to the solver's tolerance (no interpolation of a gridded inverse).
    Returns (points, InverseResult-like summary dict with per-point ``mask`` and ``error_mm``).
    """
    from . import metrics
    from .geometry import physical_to_voxel_points, voxel_to_physical_points

    disp = np.asarray(disp, dtype=np.float64)
    ndim = disp.shape[0]
    W = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
    pts = np.asarray(points_ras, dtype=np.float64)
    pre_world = pts @ np.linalg.inv(W)[:3, :3].T + np.linalg.inv(W)[:3, 3]
    x0 = physical_to_voxel_points(pre_world, fixed_affine, ndim)              # (N, ndim) fixed voxels
    q0 = torch.as_tensor(x0.T.copy())[None].reshape(1, ndim, -1, *([1] * (ndim - 1)))
    v, err, pre, res = _solve(disp, q0, method, max_steps, tol)
    jac = metrics.jacobian_determinant(disp) if jacobian is None else np.asarray(jacobian)
    error_mm, mask = _reliability(disp, fixed_affine, err, pre, jac)
    out = voxel_to_physical_points(pre.reshape(ndim, -1).T, fixed_affine)
    info = dict(method=method, steps=int(res.steps), converged=bool(res.converged),
                residual=float(res.final_residual), error_mm=error_mm.reshape(-1), mask=mask.reshape(-1),
                forward_folded_percent=float(np.mean(jac <= 0) * 100.0))
    return out, info
