"""Spatial transforms on tensors: warp, compose, resize displacement fields.

Fields are (B, ndim, *S) in voxel units of the grid they are defined on
(see ``geometry``); images and label maps are (B, C, *S). Everything is
dimension-agnostic (2D or 3D) and batched; no Python loops over voxels.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

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
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in in_shape], dtype=coords.dtype, device=coords.device)
    norm = coords * scale.view(1, -1, *([1] * ndim)) - 1.0
    # A diverging field must not reach grid_sample as inf/NaN (it can crash);
    # beyond +-2 every sample is padding anyway.
    norm = torch.nan_to_num(norm, nan=0.0).clamp(-2.0, 2.0)
    # grid_sample wants (B, *S_out, ndim) with components in reversed axis order.
    grid = norm.movedim(1, -1).flip(-1)
    if image.dtype != grid.dtype:
        image = image.to(grid.dtype)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border",
         fixed_to_moving: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Resample ``image`` at x + disp(x) for every voxel x of the field's grid.

    Without ``fixed_to_moving`` the image lives on the field's grid. With it,
    an (ndim+1)x(ndim+1) voxel-to-voxel matrix (see
    ``geometry.voxel_to_voxel_affine``), the image is the original moving
    image on its own grid, and warping through both affines costs a single
    interpolation.
    """
    coords = identity_grid(disp.shape[2:], disp.device, disp.dtype) + disp
    if fixed_to_moving is not None:
        ndim = disp.shape[1]
        A = torch.as_tensor(fixed_to_moving, dtype=disp.dtype, device=disp.device)
        coords = torch.einsum("ab,nb...->na...", A[:ndim, :ndim], coords) + A[:ndim, ndim].view(1, ndim, *([1] * ndim))
    return sample(image, coords, mode=mode, padding_mode=padding_mode)


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The field w with warp(warp(m, first), then) == warp(m, w).

    w(x) = then(x) + first(x + then(x)); both fields on the same grid.
    """
    return then + warp(first, then)


def downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool an image (B, C, *S) by an integer factor (S divisible by it).

    Coarse voxel c then sits at fine position factor * c + (factor - 1) / 2,
    the convention ``upsample_field`` and ``downsample_field`` share.
    """
    if factor == 1:
        return image
    pool = F.avg_pool3d if image.dim() == 5 else F.avg_pool2d
    return pool(image, kernel_size=factor, stride=factor)


def downsample_field(disp: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel-unit field on the grid coarser by ``factor`` (values divided by it)."""
    return downsample_image(disp, factor) / factor if factor != 1 else disp


def upsample_field(disp: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel-unit field on the grid finer by ``factor`` (values multiplied by it).

    Linear interpolation with align_corners=False matches the pooling
    convention above exactly: a constant coarse field d becomes factor * d.
    """
    if factor == 1:
        return disp
    mode = "trilinear" if disp.dim() == 5 else "bilinear"
    return F.interpolate(disp, scale_factor=factor, mode=mode, align_corners=False) * factor
