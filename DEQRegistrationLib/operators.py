"""Update operators: z_next = op(z, fixed, moving), all with that one signature.

``z`` is a (B, ndim, *S) voxel-unit field on the working grid; ``fixed`` and
``moving`` are (B, 1, *S) normalised images on that grid (moving already
resampled into the fixed grid). The solver only ever sees ``lambda z: op(z, F, M)``,
so it does not know which operator it runs.

* ``LearnedUpdate``: the paper's DEQReg, z + U(fixed, moving o z, z).
* ``GradientUpdate``: one preconditioned descent step on LNCC + diffusion_weight *
  diffusion. Its fixed points are the stationary points of that classical
  objective, so classical optimisation is a fixed-point problem too.
* ``HybridUpdate``: GraDIRN-style, z - tau * grad(similarity) + U(...). With
  ``diffusion_weight`` > 0 and a zero network output it *is* ``GradientUpdate``,
  so a model can start from the classical method and learn corrections to it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .transforms import warp


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *S), per channel; border replicated."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    ndim = x.dim() - 2
    C = x.shape[1]
    conv = F.conv3d if ndim == 3 else F.conv2d
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(C, 1, *([1] * ndim))
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), weight, groups=C)
    return x


def similarity_gradient(z, fixed, moving, similarity="lncc", window=5, diffusion_weight=0.0, create_graph=False):
    """Gradient w.r.t. the field of sum-reduced similarity + diffusion_weight * diffusion.

    Sum reduction keeps the per-voxel gradient independent of image size.
    Works inside ``torch.no_grad()`` (it turns grad on locally).
    """
    with torch.enable_grad():
        zz = z if (create_graph and z.requires_grad) else z.detach().requires_grad_(True)
        warped = warp(moving, zz)
        energy = losses.similarity(similarity, fixed, warped, window, reduction="sum")
        if diffusion_weight:
            energy = energy + diffusion_weight * losses.diffusion_loss(zz, reduction="sum")
        (grad,) = torch.autograd.grad(energy, zz, create_graph=create_graph)
    return grad


class UpdateOperator(nn.Module):
    """Base class; subclasses implement ``forward(z, fixed, moving)``."""

    update = "base"  # the update rule's name: learned | gradient | hybrid

    def forward(self, z, fixed, moving):  # pragma: no cover - abstract
        raise NotImplementedError


class GradientUpdate(UpdateOperator):
    """z - step_size * G_sigma * grad(E(z)), E = LNCC(sum) + diffusion_weight * diffusion(sum).

    The Gaussian G_sigma preconditions the step (a Sobolev-type gradient), so
    one step size works across levels and the map contracts near a minimum.
    No trainable weights.
    """

    update = "gradient"

    def __init__(self, step_size: float = 1.0, diffusion_weight: float = 1.0, sigma: float = 1.0, window: int = 5,
                 similarity: str = "lncc"):
        super().__init__()
        self.step_size, self.diffusion_weight = step_size, diffusion_weight
        self.sigma, self.window, self.similarity = sigma, window, similarity

    def forward(self, z, fixed, moving):
        g = similarity_gradient(z, fixed, moving, self.similarity, self.window, self.diffusion_weight)
        return z - self.step_size * gaussian_smooth(g, self.sigma)


class LearnedUpdate(UpdateOperator):
    """DEQReg: z + scale * U(concat(fixed, moving o z, z))."""

    update = "learned"

    def __init__(self, net: nn.Module, scale: float = 1.0):
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, z, fixed, moving):
        warped = warp(moving, z)
        return z + self.scale * self.net(torch.cat([fixed, warped, z], dim=1))


class HybridUpdate(UpdateOperator):
    """GraDIRN-style: z - tau * G_sigma * grad(E) + U(fixed, moving o z, z).

    E is the similarity plus ``diffusion_weight`` * diffusion (0: similarity
    only, as in GraDIRN). The gradient enters as a detached input (no second-order
    terms); ``tau`` is trainable.
    """

    update = "hybrid"

    def __init__(self, net: nn.Module, tau: float = 1.0, sigma: float = 1.0, window: int = 5,
                 similarity: str = "lncc", scale: float = 1.0, diffusion_weight: float = 0.0):
        super().__init__()
        self.net = net
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.sigma, self.window, self.similarity, self.scale = sigma, window, similarity, scale
        self.diffusion_weight = diffusion_weight

    def forward(self, z, fixed, moving):
        g = similarity_gradient(z, fixed, moving, self.similarity, self.window, self.diffusion_weight)
        g = gaussian_smooth(g, self.sigma)
        warped = warp(moving, z)
        return z - self.log_tau.exp() * g + self.scale * self.net(torch.cat([fixed, warped, z], dim=1))


def field_channels(ndim: int) -> int:
    """Input channels of the update network: fixed, warped moving, field."""
    return 2 + ndim
