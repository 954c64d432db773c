"""Similarity and regularisation losses on (B, C, *S) tensors, 2D or 3D.

``reduction='sum'`` exists for the classical gradient update: summed losses
give a per-voxel gradient whose size does not depend on the image size, so one
step size works at every resolution level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a window^ndim box, borders averaged over the valid part.

    Separable (one 1D pass per axis): the same result as a full box pool at a
    fraction of the cost (3 x 5 instead of 5^3 reads per voxel in 3D).
    """
    ndim = x.dim() - 2
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    for axis in range(ndim):
        n = x.shape[2 + axis]
        w = min(window, n if n % 2 else n - 1)  # tiny coarse levels: the largest odd window that fits
        k, p = [1] * ndim, [0] * ndim
        k[axis], p[axis] = w, w // 2
        x = pool(x, tuple(k), 1, tuple(p), count_include_pad=False)
    return x


def local_ncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """Squared local normalised cross-correlation per voxel, in [0, 1].

    Local means come from one separable box filter over the five stacked
    moments.
    """
    moments = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    means = box_mean(moments, window)
    c = fixed.shape[1]
    mf, mw, mff, mww, mfw = torch.split(means, c, dim=1)
    cross = mfw - mf * mw
    var_f = (mff - mf * mf).clamp_min(0)
    var_w = (mww - mw * mw).clamp_min(0)
    return cross * cross / (var_f * var_w + eps)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5, reduction: str = "mean") -> torch.Tensor:
    """1 - squared LNCC (VoxelMorph's definition, window 5 as in the paper); 0 is perfect."""
    return _reduce(1.0 - local_ncc_map(fixed, warped, window), reduction)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return _reduce((fixed - warped) ** 2, reduction)


def diffusion_loss(disp: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Diffusion regulariser on squared forward differences of the field.

    ``reduction='mean'`` is VoxelMorph's ``Grad('l2')``: the mean squared
    difference along each axis, *averaged* over the axes (VoxelMorph divides
    the sum of per-axis means by ndim). The paper's lambda values (1 for
    OASIS, 0.125 for NLST) are in this scale, so training uses it as is.
    ``'sum'`` is the total squared gradient, summed over axes and voxels (no
    division by ndim): the classical gradient mode's energy, whose step size
    and diffusion weight were tuned on that scale.
    """
    ndim = disp.dim() - 2
    total = 0.0
    for axis in range(2, 2 + ndim):
        total = total + _reduce(torch.diff(disp, dim=axis) ** 2, reduction)
    return total if reduction == "sum" else total / ndim


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a voxel-unit field (B, ndim, *S), forward differences: (B, *(S - 1))."""
    ndim = disp.dim() - 2
    J = []
    for a in range(ndim):
        row = []
        for b in range(ndim):
            d = torch.diff(disp[:, a], dim=1 + b)  # axis b shortened by one
            keep = (slice(None),) + tuple(slice(None) if i == b else slice(0, n - 1)
                                          for i, n in enumerate(disp.shape[2:]))
            row.append(d[keep] + (1.0 if a == b else 0.0))
        J.append(row)
    if ndim == 2:
        return J[0][0] * J[1][1] - J[0][1] * J[1][0]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def folding_loss(disp: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of relu(margin - det J): zero unless the field folds (det J <= margin somewhere).

    Only the folded voxels contribute, so it removes folds without the
    overall smoothing a larger diffusion weight would add.
    """
    return torch.relu(margin - jacobian_determinant(disp)).mean()


def diffusion_gradient(disp: torch.Tensor) -> torch.Tensor:
    """The gradient of ``diffusion_loss(disp, reduction='sum')`` w.r.t. ``disp``, in closed form.

    -2 times the divergence of the forward differences (a Laplacian with
    zero-flux borders); no autograd graph needed, so it is cheap inside a solver.
    """
    ndim = disp.dim() - 2
    g = torch.zeros_like(disp)
    for axis in range(ndim):
        dim = 2 + axis
        n = disp.shape[dim]
        if n < 2:
            continue
        d = torch.diff(disp, dim=dim)  # d[i] = u[i+1] - u[i]
        g.narrow(dim, 0, n - 1).sub_(d, alpha=2.0)
        g.narrow(dim, 1, n - 1).add_(d, alpha=2.0)
    return g


def similarity(name: str, fixed: torch.Tensor, warped: torch.Tensor, window: int = 5, reduction: str = "mean"):
    """Dispatch on a similarity name ('lncc' or 'mse')."""
    if name == "lncc":
        return lncc_loss(fixed, warped, window, reduction)
    if name == "mse":
        return mse_loss(fixed, warped, reduction)
    raise ValueError(f"unknown similarity {name!r}")


def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over label channels of (B, L, *S) one-hot maps.

    The warped map is linearly interpolated, so the loss is differentiable in
    the field: the label supervision SynthMorph trains with. Labels absent
    from both maps count as perfect overlap rather than dividing by zero.
    """
    dims = tuple(range(2, fixed_onehot.dim()))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    total = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()
