"""The one image type the library passes around: an array with its geometry.

Array axes are voxel indices (i, j[, k]) exactly as nibabel returns them, and
``affine`` maps homogeneous voxel indices (i, j, k, 1) to RAS millimetres, also
as in nibabel. A 2D image is an (H, W) array whose affine still is 4x4 (k = 0).
Slicer's arrays are (k, j, i): the Slicer module transposes, nothing else does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Image:
    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.data = np.asarray(self.data)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (length ndim)."""
        return np.linalg.norm(self.affine[:3, : self.ndim], axis=0)

    @classmethod
    def from_spacing(cls, data, spacing=None, origin=None) -> "Image":
        """An axis-aligned image (convenience for tests and synthetic data)."""
        data = np.asarray(data)
        affine = np.eye(4)
        if spacing is not None:
            for a, s in enumerate(spacing):
                affine[a, a] = s
        if origin is not None:
            affine[: len(origin), 3] = origin
        return cls(data, affine)
