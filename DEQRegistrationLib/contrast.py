"""Does the pair's intensity relation suit an intensity similarity? One warning when it does not.

LNCC and MSE compare the images as if one intensity were a linear map of the
other (LNCC: locally). A scan of another contrast breaks that: on the OASIS
pair with a T2-like moving image LNCC reaches Dice 0.574 where MIND-SSC
(``--preset multimodal``) reaches 0.706, and nothing tells the user why.

After the linear alignment, on the voxels where either image shows something,
``linear_share`` compares r^2 (the share of one image's variance a linear map
of the other explains) with eta^2 (the share the best function of it
explains: the mean within each intensity bin, the correlation ratio; the larger
of both directions). Their ratio is near 1 when the contrasts match and low
when a non-monotonic map relates them. Measured, before any deformation:
OASIS pairs of the same contrast 0.86-0.95 (2D OASIS-TRT-20, five pairs)
and 0.95 (3D); the same pairs with the moving image under
``synthetic.contrast_change`` 0.21-0.68, under ``synthetic.t2_like``
0.00-0.41. Below ``LINEAR_SHARE_MIN`` the registration warns and goes on: the
user chose the similarity, the warning says what fits better.

Why after the alignment, not before: misaligned scans of the same contrast
look unrelated too (the OASIS pair turned 18-40 degrees: 0.01-0.62). The
price: an alignment that an intensity measure got wrong on a pair of other
contrasts can make the intensities look related and the warning stays silent.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

#: r^2 / eta^2 below this: the intensities are not related by a linear map (see the module docstring)
LINEAR_SHARE_MIN = 0.7
#: a voxel counts when either normalised image ([0, 1], ``preprocess.normalize_intensity``) exceeds this
FOREGROUND = 0.02
#: at most this many voxels (a strided lattice): the statistic, not the registration, is sampled
MAX_VOXELS = 2 ** 20
BINS = 32
#: fewer foreground voxels than this: no verdict
MIN_VOXELS = 1000
#: the best curve explains less than this: nothing relates the images (noise, no overlap): no verdict on the
#: similarity (the other contrasts measured: 0.11 and above)
MIN_EXPLAINED = 0.05

#: the alignment keeps its first measure's pose (NCC) over the measure for other contrasts' (MI) only if the best
#: curve explains at most this much less there (eta^2, absolute; ``registration._align``). Measured after each
#: measure's affine alignment: same-contrast pairs differ by at most 0.008 (2D OASIS-TRT-20, three pairs; 3D 0.001);
#: a synthetic pair of inverted contrast on which NCC found a wrong pose 38 mm away that looked linear
#: (r^2 / eta^2 0.88): 0.515 at NCC's pose against 0.919 at MI's
CURVE_MARGIN = 0.02
#: similarities that assume a linear intensity relation
INTENSITY_SIMILARITIES = ("lncc", "mse")


def lattice_stride(shape) -> int:
    """The stride per axis that keeps a grid of ``shape`` within ``MAX_VOXELS``."""
    n = math.prod(int(s) for s in shape)
    return max(1, math.ceil((n / MAX_VOXELS) ** (1.0 / len(shape))))


def subsample(x: torch.Tensor) -> torch.Tensor:
    """(1, 1, *S) -> the strided lattice ``linear_share`` works on (a copy: the full image can be freed)."""
    s = lattice_stride(x.shape[2:])
    return x[(slice(None), slice(None)) + (slice(None, None, s),) * (x.dim() - 2)].clone()


def _explained(x: torch.Tensor, y: torch.Tensor) -> float:
    """eta^2 of y given x: 1 - E[Var(y | bin of x)] / Var(y), ``BINS`` quantile bins of x."""
    edges = torch.quantile(x, torch.linspace(0, 1, BINS + 1, device=x.device, dtype=x.dtype)[1:-1])
    idx = torch.bucketize(x, edges)
    count = torch.bincount(idx, minlength=BINS).clamp_min(1)
    mean = torch.bincount(idx, weights=y, minlength=BINS) / count
    return 1.0 - float(((y - mean[idx]) ** 2).mean() / y.var(unbiased=False).clamp_min(1e-12))


def linear_share(fixed: torch.Tensor, moving: torch.Tensor, weight: Optional[torch.Tensor] = None
                 ) -> Optional[Tuple[float, float]]:
    """(r^2, eta^2) of two normalised images on one grid (``weight`` > 0: the voxels to use); None when
    too few voxels show anything or one image is constant there."""
    keep = (fixed > FOREGROUND) | (moving > FOREGROUND)
    if weight is not None:
        keep &= weight > 0
    x, y = moving[keep].double(), fixed[keep].double()
    if x.numel() < MIN_VOXELS or float(x.var()) < 1e-12 or float(y.var()) < 1e-12:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    r2 = float((xc * yc).mean() ** 2 / (xc.var(unbiased=False) * yc.var(unbiased=False)))
    return r2, max(_explained(x, y), _explained(y, x))


def applies(similarity: str) -> bool:
    """Whether ``check`` looks at pairs compared with ``similarity`` (those assuming a linear relation)."""
    return similarity in INTENSITY_SIMILARITIES


def nonlinear(share: Optional[Tuple[float, float]]) -> bool:
    """Whether ``linear_share``'s (r^2, eta^2) say a curve relates the images and a linear map does not."""
    if share is None:
        return False
    r2, eta2 = share
    return eta2 >= MIN_EXPLAINED and r2 < LINEAR_SHARE_MIN * eta2


def check(fixed: torch.Tensor, moving: torch.Tensor, weight: Optional[torch.Tensor], similarity: str
          ) -> Optional[str]:
    """The warning to give (None: none) when ``similarity`` assumes a linear relation the pair does not show."""
    if not applies(similarity):
        return None
    share = linear_share(fixed, moving, weight)
    if share is None:
        return None
    if not nonlinear(share):
        return None
    r2, eta2 = share
    return (f"the two images' intensities do not follow a linear map after the alignment (a linear map explains "
            f"{r2:.2f} of the variance, the best curve {eta2:.2f}): {similarity.upper()} assumes one; if the scans "
            f"differ in contrast use the multimodal preset (MIND-SSC), if not check the alignment")
