"""Pre-processing: input checks, normalisation, padding (resampling is ``sampling.Sampler``)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .image import Image


def check_image(img: Image, name: str) -> None:
    """Raise InputError for what cannot be registered: wrong rank, NaN/inf, constant."""
    if img.ndim not in (2, 3):
        raise InputError(f"{name} image has {img.ndim} dimensions; only 2D and 3D images are supported")
    if img.data.size == 0 or min(img.shape) < 2:
        raise InputError(f"{name} image is empty or has a dimension of size < 2: shape {img.shape}")
    if not np.issubdtype(img.data.dtype, np.number) or np.issubdtype(img.data.dtype, np.complexfloating):
        raise InputError(f"{name} image has non-numeric voxels ({img.data.dtype})")
    if not np.all(np.isfinite(img.data)):
        raise InputError(f"{name} image contains NaN or infinite voxels")
    if np.ptp(img.data) == 0:
        raise InputError(f"{name} image is constant (all voxels {img.data.flat[0]}); nothing to register")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-12 and img.ndim == 3:
        raise InputError(f"{name} image has a singular affine")


def check_pair(fixed: Image, moving: Image) -> None:
    """The one check of a pair before registration: each image, then that they agree in dimension."""
    check_image(fixed, "fixed")
    check_image(moving, "moving")
    if fixed.ndim != moving.ndim:
        raise InputError(f"fixed image is {fixed.ndim}D {fixed.shape} but moving image is {moving.ndim}D "
                         f"{moving.shape}; both must be 2D or both 3D")


def to_tensor(data: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    """(*S) numpy array to a (1, 1, *S) tensor."""
    return torch.as_tensor(np.ascontiguousarray(data), dtype=dtype, device=device)[None, None]


def normalize_intensity(x: torch.Tensor, low: float = 0.5, high: float = 99.5, inplace: bool = False) -> torch.Tensor:
    """Map the [low, high] percentiles to [0, 1] and clip: robust to outliers and scanner scale.

    ``inplace`` overwrites ``x`` (the same numbers, no full-size temporaries).
    """
    flat = x.flatten()
    if flat.numel() > 2_000_000:  # percentiles of a strided subsample are plenty
        flat = flat[:: flat.numel() // 1_000_000]
    lo, hi = torch.quantile(flat.float(), torch.tensor([low / 100, high / 100], device=x.device))
    if hi <= lo:
        lo, hi = flat.min(), flat.max()
    if inplace:
        return x.sub_(lo).div_((hi - lo).clamp_min(1e-12)).clamp_(0, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, tuple]:
    """Replicate-pad the spatial dims at the far end to a multiple; returns the crop to undo it."""
    shape = x.shape[2:]
    target = [int(np.ceil(n / multiple) * multiple) for n in shape]
    pad = []
    for n, t in reversed(list(zip(shape, target))):
        pad += [0, t - n]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in shape)
    return x, crop
