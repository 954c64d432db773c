"""Full-resolution outputs computed slab by slab, so a large fixed grid costs its outputs and little more.

Every function here gives the same numbers as its whole-volume counterpart
(``Testing/test_chunked.py`` checks it): slabs run along array axis 0, and a
slab is computed with the halo its stencil needs, then cropped.

* ``upsample_field_into``: ``transforms.upsample_field`` (linear,
  align_corners=False) of a working-grid field, cropped to the fixed grid,
  written straight into a float32 numpy array (no padded full-size tensor, no copy).
* ``jacobian_determinant``: ``metrics.jacobian_determinant`` (numpy) or
  ``transforms.jacobian_determinant`` (torch), one voxel of halo.
* ``jacobian_summary``: folding %, SDlogJ (both conventions), min and max of
  a Jacobian map, without float64 copies of the whole map.
* ``field_as_saved``: ``apply.field_as_saved`` (the LPS-mm float32 field a
  file holds and the voxel field reading it back gives).

``DEFAULT_CHUNK_VOXELS`` voxels per slab; below it a volume is done in one
piece, exactly as before.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: voxels per slab (8 MB of float32 per channel; a Jacobian slab's temporaries are about 80 bytes a voxel)
DEFAULT_CHUNK_VOXELS = 1 << 21
#: MIND-SSC descriptors are computed whole up to this many voxels (12 channels and their temporaries: about
#: 200 bytes a voxel, 3 GB), beyond in slabs of MIND_SLAB_VOXELS (``similarity.mind_ssc_pooled``: two passes;
#: slabs of 2^21 voxels spent half their time on the halo of a 512 x 304 CT section, 90 s vs 62 s for 2^24)
MIND_WHOLE_VOXELS = 1 << 24
MIND_SLAB_VOXELS = 1 << 23
#: Jacobian maps up to this size are summarised whole, in float64 (exactly the numbers ``metrics`` gives)
SUMMARY_WHOLE_VOXELS = 1 << 24


def _rows_per_slab(shape: Sequence[int], chunk_voxels: int) -> int:
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, int(chunk_voxels) // max(per_row, 1))


def slabs(n0: int, rows: int):
    for start in range(0, n0, rows):
        yield start, min(n0, start + rows)


# --- the final field ---------------------------------------------------------------------


def upsample_field_into(z: torch.Tensor, factor: int, shape: Sequence[int],
                        chunk_voxels: int = DEFAULT_CHUNK_VOXELS, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``upsample_field(z, factor)`` cropped to ``shape``, as a float32 numpy array (ndim, *shape).

    ``z`` is (1, ndim, *coarse) on the working grid. The linear interpolation
    (align_corners=False) of fine row i only reads coarse rows
    floor((i + 0.5) / f - 0.5) and the next, clamped at the edges, so a slab
    of fine rows needs its coarse rows and one more on each side; for a
    power-of-two factor the weights are exact and the result equals the
    whole-volume one bit for bit.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if out is None:
        out = np.empty((ndim,) + shape, dtype=np.float32)
    crop = tuple(slice(0, n) for n in shape[1:])
    if factor == 1:
        for a, b in slabs(shape[0], _rows_per_slab(shape, chunk_voxels)):
            out[(slice(None), slice(a, b)) + crop] = z[0, :, a:b][(slice(None), slice(None)) + crop].cpu().numpy()
        return out
    mode = "trilinear" if ndim == 3 else "bilinear"
    if factor & (factor - 1):  # not a power of two: the weights round differently per slab, do it whole
        with torch.no_grad():
            fine = F.interpolate(z, scale_factor=factor, mode=mode, align_corners=False) * factor
        out[...] = fine[(0, slice(None), slice(0, shape[0])) + crop].cpu().numpy()
        return out
    n_coarse = z.shape[2]
    rows = max(factor, _rows_per_slab(shape, chunk_voxels) // factor * factor)
    with torch.no_grad():
        for a, b in slabs(shape[0], rows):
            c0 = max(0, a // factor - 1)
            c1 = min(n_coarse, (b - 1) // factor + 2)
            part = F.interpolate(z[:, :, c0:c1], scale_factor=factor, mode=mode, align_corners=False) * factor
            fine = part[0, :, a - c0 * factor: b - c0 * factor][(slice(None), slice(None)) + crop]
            out[(slice(None), slice(a, b)) + crop] = fine.cpu().numpy()
    return out


# --- Jacobian ------------------------------------------------------------------------------


def _halo_slabs(n0: int, rows: int):
    """(slab start, slab stop with halo, rows to keep within it) for a 1-voxel stencil along axis 0."""
    for a, b in slabs(n0, rows):
        lo, hi = max(0, a - 1), min(n0, b + 1)
        yield a, b, lo, hi


def jacobian_determinant(disp, chunk_voxels: int = DEFAULT_CHUNK_VOXELS, fn: Optional[Callable] = None):
    """det(I + grad u) of a (ndim, *S) numpy field (float32), or a (1, ndim, *S) tensor, in slabs.

    numpy in: ``metrics.jacobian_determinant``'s numbers; torch in:
    ``transforms.jacobian_determinant``'s, shape (1, *S). Each slab carries one
    row of halo on each inner side: central differences reach one row, and
    the one-sided differences stay at the volume's own first and last rows.
    """
    is_torch = isinstance(disp, torch.Tensor)
    if fn is None:
        if is_torch:
            from .transforms import jacobian_determinant as fn
        else:
            from .metrics import jacobian_determinant as fn
    shape = tuple(disp.shape[2:] if is_torch else disp.shape[1:])
    rows = _rows_per_slab(shape, chunk_voxels)
    if rows >= shape[0] or shape[0] < 3:
        return fn(disp)
    rows = max(rows, 2)
    if is_torch:
        out = torch.empty((disp.shape[0],) + shape, dtype=disp.dtype, device=disp.device)
        for a, b, lo, hi in _halo_slabs(shape[0], rows):
            out[:, a:b] = fn(disp[:, :, lo:hi])[:, a - lo: b - lo]
        return out
    out = np.empty(shape, dtype=np.float32)
    for a, b, lo, hi in _halo_slabs(shape[0], rows):
        out[a:b] = fn(disp[:, lo:hi])[a - lo: b - lo]
    return out


def jacobian_summary(jac: np.ndarray, crop: int = 2, chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
                     whole_voxels: int = SUMMARY_WHOLE_VOXELS) -> Dict[str, float]:
    """folding_percent, std_log_jacobian (+ _l2r), jacobian_min, jacobian_max of a Jacobian map.

    A map of at most ``whole_voxels`` voxels goes through ``metrics`` as a
    whole (the same numbers as always). A larger one is read in slabs: counts,
    min and max are exact; the standard deviations use a two-pass slab sum
    (mean, then squared deviations) in float64, equal to numpy's to ~1e-12.
    """
    from . import metrics as M

    jac = np.asarray(jac)
    if jac.size <= whole_voxels:
        return dict(folding_percent=M.folding_percent(jac), std_log_jacobian=M.std_log_jacobian(jac, crop),
                    std_log_jacobian_l2r=M.std_log_jacobian_l2r(jac, crop),
                    jacobian_min=float(jac.min()), jacobian_max=float(jac.max()))
    rows = _rows_per_slab(jac.shape, chunk_voxels)
    folded, lo, hi = 0, np.inf, -np.inf
    for a, b in slabs(jac.shape[0], rows):
        part = jac[a:b]
        folded += int(np.count_nonzero(part <= 0))
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    inner = M._interior(jac, crop)

    def std(transform):
        n, total = inner.size, 0.0
        for a, b in slabs(inner.shape[0], rows):
            total += float(transform(inner[a:b]).sum())
        mean = total / n
        sq = 0.0
        for a, b in slabs(inner.shape[0], rows):
            d = transform(inner[a:b]) - mean
            sq += float(np.dot(d.ravel(), d.ravel()))
        return float(np.sqrt(sq / n))

    return dict(folding_percent=float(100.0 * folded / jac.size),
                std_log_jacobian=std(lambda j: np.log(np.clip(j.astype(np.float64), 1e-9, 1e9))),
                std_log_jacobian_l2r=std(lambda j: np.log(np.clip(j.astype(np.float64) + 3, 1e-9, 1e9))),
                jacobian_min=lo, jacobian_max=hi)


# --- the field as a file holds it ------------------------------------------------------------


def field_as_saved(displacement: np.ndarray, fixed_affine: np.ndarray, chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
                   in_place: bool = False):
    """``apply.field_as_saved`` in slabs: (LPS mm float32 (*S, 3), voxel field float32 (ndim, *S)).

    With ``in_place`` the voxel field is written over ``displacement`` (which
    must then be a writable float32 array): the caller no longer needs the
    unrounded field, and the pair of fields costs 24 bytes per voxel, not 36.
    """
    from . import io
    from .geometry import ras_to_lps, voxel_field_to_physical

    disp = np.asarray(displacement)
    shape = tuple(disp.shape[1:])
    lps = np.empty(shape + (3,), dtype=np.float32)
    vox = disp if in_place else np.empty(disp.shape, dtype=np.float32)
    if in_place and (disp.dtype != np.float32 or not disp.flags.writeable):
        raise ValueError("in_place needs a writable float32 field")
    for a, b in slabs(shape[0], _rows_per_slab(shape, chunk_voxels)):
        part = ras_to_lps(voxel_field_to_physical(disp[:, a:b], fixed_affine)).astype(np.float32)
        lps[a:b] = part
        vox[:, a:b] = io.itk_displacement_to_voxel(part, fixed_affine)
    return lps, vox
