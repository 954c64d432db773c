"""Spatial transforms on tensors that share one grid: warp, resize displacement fields.

Fields are (B, ndim, *S) in voxel units of the grid they are defined on
(see ``geometry``); images and label maps are (B, C, *S). Everything is
dimension-agnostic (2D or 3D) and batched; no Python loops over voxels.
Sampling across two grids (moving data at fixed voxels) is ``sampling.Sampler``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _identity_cached(shape: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates (1, ndim, *shape); channel a holds the index along axis a."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _identity_cached(tuple(int(n) for n in shape), str(device), dtype)


def sample(image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` (B, C, *S_in) at voxel coordinates ``coords`` (B, ndim, *S_out).

    ``mode`` is 'bilinear' (trilinear in 3D) or 'nearest' (for label maps).
    """
    ndim = coords.shape[1]
    in_shape = image.shape[2:]
    scales = [2.0 / max(n - 1, 1) for n in in_shape]
    # grid_sample wants (B, *S_out, ndim), normalised, with components in reversed axis order.
    # A diverging field must not reach grid_sample as inf/NaN (it can crash);
    # beyond +-2 every sample is padding anyway.
    if coords.requires_grad and torch.is_grad_enabled():
        scale = torch.tensor(scales, dtype=coords.dtype, device=coords.device)
        norm = coords * scale.view(1, -1, *([1] * ndim)) - 1.0
        grid = torch.nan_to_num(norm, nan=0.0).clamp(-2.0, 2.0).movedim(1, -1).flip(-1)
    else:  # the same numbers written once into grid_sample's layout (no autograd: in-place)
        grid = coords.new_empty(coords.shape[0], *coords.shape[2:], ndim)
        for a in range(ndim):
            torch.mul(coords[:, a], scales[a], out=grid[..., ndim - 1 - a])
        grid.sub_(1.0).nan_to_num_(nan=0.0).clamp_(-2.0, 2.0)
    if image.dtype != grid.dtype:
        image = image.to(grid.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def inside(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, 1, *S): 1.0 where the voxel coordinates (B, ndim, *S) lie within a grid of ``shape``, else 0."""
    ok = None
    for d, n in enumerate(shape):
        c = coords[:, d:d + 1]
        within = (c >= 0) & (c <= n - 1)
        ok = within if ok is None else ok & within
    return ok.to(coords.dtype)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Resample ``image`` (on the field's grid) at x + disp(x) for every voxel x."""
    coords = identity_grid(disp.shape[2:], disp.device, disp.dtype) + disp
    return sample(image, coords, mode=mode, padding_mode=padding_mode)


def downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool an image (B, C, *S) by an integer factor (S divisible by it).

    Coarse voxel c then sits at fine position factor * c + (factor - 1) / 2,
    the convention ``upsample_field`` follows.
    """
    if factor == 1:
        return image
    pool = F.avg_pool3d if image.dim() == 5 else F.avg_pool2d
    return pool(image, kernel_size=factor, stride=factor)


def upsample_field(disp: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel-unit field on the grid finer by ``factor`` (values multiplied by it).

    Linear interpolation with align_corners=False matches the pooling
    convention above exactly: a constant coarse field d becomes factor * d.
    """
    if factor == 1:
        return disp
    mode = "trilinear" if disp.dim() == 5 else "bilinear"
    return F.interpolate(disp, scale_factor=factor, mode=mode, align_corners=False) * factor


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of (B, ndim, *S) voxel-unit fields: (B, *S), on the field's device.

    The same differences as ``metrics.jacobian_determinant`` (numpy's
    ``gradient``: central inside, one-sided at the border), so both give the
    same numbers; this one runs where the field is (GPU, or all CPU threads)
    and builds the determinant with fused multiply-adds.
    """
    ndim = disp.shape[1]
    J = [[None] * ndim for _ in range(ndim)]  # J[a][b] = d(x_a + u_a) / d x_b, (B, *S)
    for b in range(ndim):
        dim = 2 + b
        n = disp.shape[dim]
        g = torch.zeros_like(disp)
        if n >= 2:
            torch.sub(disp.narrow(dim, 2, n - 2), disp.narrow(dim, 0, n - 2), out=g.narrow(dim, 1, n - 2))
            g.narrow(dim, 1, n - 2).mul_(0.5)
            torch.sub(disp.narrow(dim, 1, 1), disp.narrow(dim, 0, 1), out=g.narrow(dim, 0, 1))
            torch.sub(disp.narrow(dim, n - 1, 1), disp.narrow(dim, n - 2, 1), out=g.narrow(dim, n - 1, 1))
        g[:, b].add_(1.0)
        for a in range(ndim):
            J[a][b] = g[:, a]
    if ndim == 2:
        return (J[0][0] * J[1][1]).addcmul_(J[0][1], J[1][0], value=-1.0)
    minor0 = (J[1][1] * J[2][2]).addcmul_(J[1][2], J[2][1], value=-1.0)
    minor1 = (J[1][0] * J[2][2]).addcmul_(J[1][2], J[2][0], value=-1.0)
    minor2 = (J[1][0] * J[2][1]).addcmul_(J[1][1], J[2][0], value=-1.0)
    return (J[0][0] * minor0).addcmul_(J[0][1], minor1, value=-1.0).addcmul_(J[0][2], minor2)
