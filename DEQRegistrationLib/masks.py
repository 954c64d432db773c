"""Masks: the voxels a similarity may use (and, when asked, the metrics).

A mask is a label map or a binary image on its own grid (any geometry, any
dtype): every non-zero voxel is inside (a float image that is not
integer-valued, such as a probability map, is inside where >= 0.5). It is
mapped onto its image's grid by nearest neighbour through ``Sampler``, so a
lung mask saved on a cropped grid or a brain mask from another tool works.

Checked here, each as one ``InputError`` line: a mask that is empty, one
whose grid does not overlap its image (or has another dimensionality), and
one that keeps fewer than ``MIN_MASK_VOXELS`` voxels on a pyramid level the
solver runs (a pooled voxel is inside when at least half of it is).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import InputError
from .image import Image
from .sampling import Sampler
from .transforms import downsample_image

#: a level whose mask keeps fewer voxels than this cannot drive a similarity (12 affine parameters, LNCC windows)
MIN_MASK_VOXELS = 32

MaskLike = Union[None, np.ndarray, Image]


def binary(data: np.ndarray, what: str) -> np.ndarray:
    """Inside = non-zero (labels, binary) or >= 0.5 (a non-integer float image); refuses NaN."""
    data = np.asarray(data)
    if data.dtype.fields is not None or np.iscomplexobj(data) or not (
            np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InputError(f"{what}: holds no scalar values (dtype {data.dtype})")
    if data.dtype == bool:
        return data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise InputError(f"{what}: has NaN or infinite values")
        if not np.all(data == np.round(data)):
            return data >= 0.5
    return data != 0


def on_grid(mask: MaskLike, image: Image, what: str) -> Optional[np.ndarray]:
    """A mask as a boolean array on ``image``'s grid, or None.

    An array must already have the image's shape; an ``Image`` is mapped from
    its own grid through both affines (nearest neighbour).
    """
    if mask is None:
        return None
    if isinstance(mask, Image):
        if mask.ndim != image.ndim:
            raise InputError(f"{what} is {mask.ndim}D {mask.shape} but its image is {image.ndim}D {image.shape}; "
                             "its grid cannot be mapped onto the image's")
        inside = binary(mask.data, what)
        if not inside.any():
            raise InputError(f"{what} is empty (no voxel inside)")
        if mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4):
            return inside
        if mask.ndim == 3 and abs(np.linalg.det(mask.affine[:3, :3])) < 1e-12:
            raise InputError(f"{what} has a singular affine; its grid cannot be mapped onto the image's")
        mapped = Sampler(image.shape, image.affine, mask.affine).labels(inside.astype(np.uint8)) > 0
        if not mapped.any():
            raise InputError(f"{what} does not overlap its image: its grid maps to no voxel of the image "
                             f"{image.shape} (check that it belongs to this image)")
        return mapped
    arr = np.asarray(mask)
    if arr.shape != image.shape:
        raise InputError(f"{what} has shape {arr.shape} but its image has shape {image.shape}; give it as an "
                         "Image (array + affine) to map it from its own grid")
    inside = binary(arr, what)
    if not inside.any():
        raise InputError(f"{what} is empty (no voxel inside)")
    return inside


def pooled(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A (1, 1, *S) 0/1 mask on the grid pooled by ``factor``: inside where at least half was inside."""
    return (downsample_image(mask, factor) >= 0.5).to(mask.dtype)


def check_levels(mask: torch.Tensor, factors: Sequence[int], what: str) -> None:
    """Refuse a mask that keeps fewer than MIN_MASK_VOXELS voxels on one of the pyramid's levels."""
    for index, factor in enumerate(factors):
        kept = int(pooled(mask, factor).sum())
        if kept < MIN_MASK_VOXELS:
            raise InputError(f"{what} keeps {kept} voxel(s) at pyramid level {index + 1} (grid / {factor}); at "
                             f"least {MIN_MASK_VOXELS} are needed: give a larger mask or a finer pyramid")
