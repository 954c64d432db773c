"""Cheap live previews of a registration in progress: a region or a reduced grid, not the whole volume.

A live refresh that upsamples the working field to the full fixed grid,
warps the whole moving image and recomputes the whole Jacobian costs more
than a solver step on a CT-sized volume (the solver works on a grid 64x
smaller). ``preview`` evaluates the same quantities only at the voxels of a
lattice on the fixed grid: a region (e.g. the slices on display) and/or
every ``step``-th voxel, chosen so that at most ``max_voxels`` are computed.
The field there is the working-grid field interpolated exactly as
``transforms.upsample_field`` does (linear, align_corners=False, edge
clamped), so a preview at step 1 equals the corresponding part of the full
refresh (to float rounding). The Jacobian is the central-difference one
on the lattice (``step`` voxels apart), a preview of the full one.

The Slicer module's hook (one line in its refresh): ``pv = progress.preview(max_voxels=...)`` or
``progress.preview(region=...)``; ``pv.affine`` is the voxel-to-RAS matrix of the arrays it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .sampling import Sampler
from .transforms import jacobian_determinant, sample

#: default size of a preview: about a 64^3 grid (on the CT-sized pair a 2^21-voxel lattice cost half a
#: solver step, one full-resolution slice 0.06 of a step; benchmarks/large.py)
DEFAULT_MAX_VOXELS = 1 << 18


@dataclass
class Preview:
    warped: np.ndarray        # (*P) the moving image warped by the current field, at the lattice voxels
    jacobian: np.ndarray      # (*P) det of the Jacobian there (lattice differences)
    displacement: np.ndarray  # (ndim, *P) the current field there, in fixed-grid voxel units
    region: tuple             # the lattice: one slice(start, stop, step) per fixed-grid axis
    affine: np.ndarray        # 4x4 voxel-to-RAS of the lattice (its arrays' own grid)

    @property
    def step(self) -> tuple:
        return tuple(s.step for s in self.region)


def lattice(shape: Sequence[int], region=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple:
    """``region`` (slices; None = the whole grid) with one step on every axis so at most ``max_voxels`` remain.

    Steps the caller gave in ``region`` are kept.
    """
    shape = tuple(int(n) for n in shape)
    region = tuple(region) if region is not None else tuple(slice(None) for _ in shape)
    if len(region) != len(shape):
        raise ValueError(f"region has {len(region)} axes, the grid {len(shape)}")
    bounds = [s.indices(n)[:2] for s, n in zip(region, shape)]
    if any(s.step not in (None,) for s in region):
        return tuple(slice(a, b, s.step or 1) for (a, b), s in zip(bounds, region))
    count = int(np.prod([max(b - a, 0) for a, b in bounds]))
    step = 1
    while count > max_voxels and step < max(shape):
        step += 1
        count = int(np.prod([len(range(a, b, step)) for a, b in bounds]))
    return tuple(slice(a, b, step) for a, b in bounds)


def _axes(region, device, dtype):
    return [torch.arange(s.start, s.stop, s.step, device=device, dtype=dtype) for s in region]


def field_at(z: torch.Tensor, factor: int, region) -> torch.Tensor:
    """(1, ndim, *P): ``upsample_field(z, factor)`` at the fixed-grid voxels of ``region`` (no full upsampling)."""
    axes = _axes(region, z.device, z.dtype)
    if factor == 1:
        return z[(slice(None), slice(None)) + tuple(region)]
    coarse = [(ax + 0.5) / factor - 0.5 for ax in axes]  # align_corners=False, then clamped (border)
    grid = torch.stack(torch.meshgrid(*coarse, indexing="ij"), 0)[None]
    with torch.no_grad():
        return sample(z, grid, mode="bilinear", padding_mode="border") * factor


def preview(z: torch.Tensor, factor: int, sampler: Sampler, moving: torch.Tensor, region=None,
            max_voxels: int = DEFAULT_MAX_VOXELS) -> Preview:
    """Warped image, Jacobian and field of the working-grid field ``z`` (None: zero) at a lattice of the fixed
    grid; ``sampler`` maps through the current linear alignment."""
    region = lattice(sampler.fixed_shape, region, max_voxels)
    with torch.no_grad():
        nd = sampler.ndim
        if z is None:  # no deformation yet (the alignment stage): the sampler's W alone
            u = torch.zeros((1, nd) + tuple(len(range(s.start, s.stop, s.step)) for s in region), device=moving.device)
        else:
            u = field_at(z, factor, region)
        p = sampler.map_voxels(torch.stack(torch.meshgrid(*_axes(region, u.device, u.dtype), indexing="ij"), 0)[None] + u)
        warped = sample(moving.to(u.dtype), p, mode="bilinear", padding_mode="zeros")[0, 0]
        steps = torch.tensor([s.step for s in region], dtype=u.dtype, device=u.device).view(1, nd, *([1] * nd))
        jac = jacobian_determinant(u / steps)[0]  # in lattice units: the steps cancel in det(I + du/dx)
    affine = np.asarray(sampler.fixed_affine, dtype=np.float64).copy()
    start = np.array([s.start for s in region] + [0] * (3 - nd), dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    affine[:3, :nd] = affine[:3, :nd] * np.array([s.step for s in region], dtype=np.float64)
    return Preview(warped.cpu().numpy(), jac.cpu().numpy(), u[0].cpu().numpy(), region, affine)
