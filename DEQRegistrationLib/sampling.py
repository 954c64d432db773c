"""The one place where data on the moving grid is sampled at the fixed grid's voxels.

A fixed voxel p (array indices) is carried to the moving image's voxel
coordinates through the displacement u (fixed-grid voxel units), the fixed
image's voxel-to-RAS affine F, an optional linear world transform W (fixed
RAS -> moving RAS; identity unless an alignment stage found one) and the
inverse of the moving affine M:

    q(p) = M^-1 W F (p + u(p))

Every resampling the library, the CLI, training and the Slicer module do
("the moving image on the fixed grid", with or without a field, intensities
or labels) goes through ``Sampler``; nothing else composes these matrices.
Points go the same way (``points``): a fixed landmark p lands at q(p).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .image import Image
from .transforms import identity_grid, sample

Array = Union[np.ndarray, torch.Tensor]
#: coordinates computed at once, at most (a slab of the fixed grid otherwise): bounds memory on big volumes
#: (a slab costs about 50 bytes a voxel in coordinates and grids; the result does not depend on it)
DEFAULT_CHUNK_VOXELS = 1 << 21


class Sampler:
    """Samples moving-grid data at fixed-grid voxels (plus a displacement), through both affines."""

    def __init__(self, fixed_shape: Sequence[int], fixed_affine: np.ndarray, moving_affine: np.ndarray,
                 world: Optional[np.ndarray] = None):
        self.fixed_shape = tuple(int(n) for n in fixed_shape)
        self.ndim = len(self.fixed_shape)
        self.fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
        self.moving_affine = np.asarray(moving_affine, dtype=np.float64)
        self.world = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
        full = np.linalg.inv(self.moving_affine) @ self.world @ self.fixed_affine
        keep = list(range(self.ndim)) + [3]
        # (ndim+1)^2: for 2D images both grids lie in one plane; the unused axis drops out
        self.matrix = full[np.ix_(keep, keep)]
        # same grid (the usual case for a pre-aligned pair): no matrix product, no resampling without a field
        self.identity = bool(np.allclose(self.matrix, np.eye(self.ndim + 1), rtol=0, atol=1e-9))

    @classmethod
    def between(cls, fixed: Image, moving: Image, world: Optional[np.ndarray] = None) -> "Sampler":
        return cls(fixed.shape, fixed.affine, moving.affine, world)

    # --- coordinates -------------------------------------------------------------------

    def coords(self, disp: Optional[torch.Tensor] = None, rows: Optional[slice] = None,
               device=None, dtype=torch.float32) -> torch.Tensor:
        """Moving voxel coordinates (1, ndim, *S) of the fixed voxels (a slab along axis 0 with ``rows``)."""
        rows = rows or slice(0, self.fixed_shape[0])
        shape = (rows.stop - rows.start,) + self.fixed_shape[1:]
        if disp is not None:
            device, dtype = disp.device, disp.dtype
        grid = identity_grid(shape, device, dtype)
        if rows.start:
            offset = torch.zeros(self.ndim, dtype=dtype, device=grid.device)
            offset[0] = rows.start
            grid = grid + offset.view(1, -1, *([1] * self.ndim))
        return self.map_voxels(grid if disp is None else grid + disp[:, :, rows])

    def map_voxels(self, p: torch.Tensor) -> torch.Tensor:
        """Moving voxel coordinates of fixed voxel coordinates ``p`` (1, ndim, ...): the one matrix product."""
        if self.identity:
            return p
        A = torch.as_tensor(self.matrix, dtype=p.dtype, device=p.device)
        nd = self.ndim
        return torch.einsum("ab,nb...->na...", A[:nd, :nd], p) + A[:nd, nd].view(1, nd, *([1] * (p.dim() - 2)))

    def coords_through(self, world: torch.Tensor, points: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Moving voxel coordinates of fixed voxels through a linear world transform (no field).

        ``world`` is a 4x4 torch tensor (fixed RAS -> moving RAS) that may carry
        gradients: the linear alignment stage differentiates its similarity
        through it (``self.world`` is not used). Every fixed voxel: (1, ndim, *S);
        ``points`` (N, ndim) fixed voxel coordinates: (1, ndim, N, 1[, 1]), a shape
        ``transforms.sample`` takes.
        """
        dtype, device = world.dtype, world.device
        inv_m = torch.as_tensor(np.linalg.inv(self.moving_affine), dtype=dtype, device=device)
        fa = torch.as_tensor(self.fixed_affine, dtype=dtype, device=device)
        keep = list(range(self.ndim)) + [3]
        A = (inv_m @ world @ fa)[keep][:, keep]
        nd = self.ndim
        if points is None:
            grid = identity_grid(self.fixed_shape, device, dtype)
        else:
            grid = points.to(device=device, dtype=dtype).T.reshape(1, nd, -1, *([1] * (nd - 1)))
        return torch.einsum("ab,nb...->na...", A[:nd, :nd], grid) + A[:nd, nd].view(1, nd, *([1] * nd))

    def composed_displacement(self, disp: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
        """The field u_c, fixed voxel units, that maps like ``world`` and ``disp`` together with no world.

        F (p + u_c(p)) = W F (p + u(p)), so ``Sampler(shape, F, M)`` with u_c
        samples exactly what this sampler samples with ``disp``: one field file
        then holds the linear alignment and the deformation. ``disp`` is
        (B, ndim, *S) torch (None: the linear part alone, as a field of ``dtype``).
        """
        full = np.linalg.inv(self.fixed_affine) @ self.world @ self.fixed_affine
        keep = list(range(self.ndim)) + [3]
        K = full[np.ix_(keep, keep)]
        dtype = disp.dtype if disp is not None else dtype
        device = disp.device if disp is not None else None
        grid = identity_grid(self.fixed_shape, device, dtype)
        p = grid if disp is None else grid + disp
        nd = self.ndim
        A = torch.as_tensor(K, dtype=torch.float64, device=grid.device)
        # (K - I) p + k: in float64 so a tiny rotation of a large grid keeps its precision
        lin = (A[:nd, :nd] - torch.eye(nd, dtype=torch.float64, device=grid.device)).to(dtype)
        out = torch.einsum("ab,nb...->na...", lin, p) + A[:nd, nd].to(dtype).view(1, nd, *([1] * nd))
        return out if disp is None else out + disp

    # --- sampling ----------------------------------------------------------------------

    def resample(self, data: Array, disp: Optional[Array] = None, order: int = 1, padding: str = "zeros",
                 chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> Array:
        """``data`` on the moving grid, sampled at every fixed voxel.

        numpy in, numpy out: ``data`` (*S_moving) and ``disp`` (ndim, *S_fixed)
        give (*S_fixed). torch in, torch out: (B, C, *S_moving) and
        (B, ndim, *S_fixed) give (B, C, *S_fixed), on the data's device.
        ``order`` 1 is (tri)linear, 0 nearest (label maps keep their dtype),
        3 cubic B-spline (numpy only, through scipy; zero outside the grid).
        Large grids are done in slabs of at most ``chunk_voxels`` voxels.
        """
        if order == 3:
            return self._bspline(data, disp, padding, chunk_voxels)
        if order not in (0, 1):
            raise ValueError(f"interpolation order {order} is not 0 (nearest), 1 (linear) or 3 (B-spline)")
        as_numpy = isinstance(data, np.ndarray)
        if as_numpy:
            src = np.asarray(data)
            dtype = torch.float64 if order == 0 and src.size and np.abs(src).max() >= 2 ** 24 else torch.float32
            x = torch.as_tensor(np.ascontiguousarray(src), dtype=dtype)[None, None]
            d = None if disp is None else torch.as_tensor(np.asarray(disp), dtype=dtype)[None]
        else:
            x = data
            d = disp
        if d is not None:
            d = d.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
            if tuple(d.shape[2:]) != self.fixed_shape:
                raise ValueError(f"displacement grid {tuple(d.shape[2:])} is not the fixed grid {self.fixed_shape}")
        if d is None and self.identity and tuple(x.shape[2:]) == self.fixed_shape:
            # the moving grid is the fixed grid: sampling at its own voxels returns the data
            if not as_numpy:
                return x.clone() if x.is_floating_point() else x.float()
            return src.copy() if order == 0 else src.astype(np.float32)
        if not x.is_floating_point():
            x = x.float()
        mode = "nearest" if order == 0 else "bilinear"
        per_row = int(np.prod(self.fixed_shape[1:])) if self.ndim > 1 else 1
        step = max(1, int(chunk_voxels) // max(per_row, 1))
        n0 = self.fixed_shape[0]
        out = None  # slabs are written into the output as they come (no list of parts, no concatenation)
        for start in range(0, n0, step):
            rows = slice(start, min(n0, start + step))
            c = self.coords(d, rows, device=x.device, dtype=x.dtype)
            if c.shape[0] != x.shape[0]:
                c = c.expand(x.shape[0], *c.shape[1:])
            part = sample(x, c, mode=mode, padding_mode=padding)
            del c
            if step >= n0:
                out = part
                break
            if out is None:
                out = part.new_empty(part.shape[:2] + self.fixed_shape)
            out[:, :, rows] = part
        if not as_numpy:
            return out
        out = out[0, 0].cpu().numpy()
        if order == 0:
            return np.rint(out).astype(src.dtype)
        return out.astype(np.float32, copy=False)

    def _bspline(self, data, disp, padding, chunk_voxels) -> np.ndarray:
        """Cubic B-spline: the data's spline coefficients once, then evaluated slab by slab."""
        from scipy import ndimage

        if not isinstance(data, np.ndarray):
            raise TypeError("B-spline resampling takes numpy arrays")
        if padding != "zeros":
            raise ValueError("B-spline resampling pads with zeros only")
        coef = ndimage.spline_filter(np.asarray(data, dtype=np.float64), order=3, mode="mirror")
        d = None if disp is None else torch.as_tensor(np.asarray(disp), dtype=torch.float64)[None]
        if d is not None and tuple(d.shape[2:]) != self.fixed_shape:
            raise ValueError(f"displacement grid {tuple(d.shape[2:])} is not the fixed grid {self.fixed_shape}")
        per_row = int(np.prod(self.fixed_shape[1:])) if self.ndim > 1 else 1
        step = max(1, int(chunk_voxels) // max(per_row, 1))
        out = np.empty(self.fixed_shape, dtype=np.float32)
        for start in range(0, self.fixed_shape[0], step):
            rows = slice(start, min(self.fixed_shape[0], start + step))
            c = self.coords(d, rows, dtype=torch.float64)[0].numpy()
            out[rows] = ndimage.map_coordinates(coef, c, order=3, mode="constant", cval=0.0, prefilter=False)
        return out

    def points(self, points: np.ndarray, disp: Optional[np.ndarray] = None) -> np.ndarray:
        """Moving voxel coordinates (N, ndim) of fixed-grid points (N, ndim), float64.

        The displacement is interpolated linearly at the points (the nearest
        edge value outside the grid), as ``metrics.target_registration_error`` does.
        """
        from scipy import ndimage

        p = np.asarray(points, dtype=np.float64).reshape(-1, self.ndim)
        if disp is not None:
            disp = np.asarray(disp, dtype=np.float64)
            if tuple(disp.shape[1:]) != self.fixed_shape:
                raise ValueError(f"displacement grid {tuple(disp.shape[1:])} is not the fixed grid {self.fixed_shape}")
            p = p + np.stack([ndimage.map_coordinates(disp[a], p.T, order=1, mode="nearest")
                              for a in range(self.ndim)], 1)
        nd = self.ndim
        return p @ self.matrix[:nd, :nd].T + self.matrix[:nd, nd]

    def image(self, data: Array, disp: Optional[Array] = None, **kw) -> Array:
        """Intensities, (tri)linear, zero outside the moving grid."""
        return self.resample(data, disp, order=1, **kw)

    def labels(self, labels: Array, disp: Optional[Array] = None, **kw) -> Array:
        """A label map, nearest neighbour (values and dtype kept), 0 outside the moving grid."""
        return self.resample(labels, disp, order=0, **kw)
