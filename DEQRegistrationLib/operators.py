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
* ``FeatureGradientUpdate``: ``GradientUpdate``'s step on LNCC + beta * SSD of learned features (a small
  siamese CNN applied to each image: a learned MIND). With beta at 0 (its initialisation) it *is*
  ``GradientUpdate``, and its fixed points stay the stationary points of a classical energy.
* ``RecurrentUpdate``: RIIR, a recurrent inference machine: the network sees
  the similarity gradient and a hidden state that the state tensor carries
  beside the field (z = [field, hidden]); ``state_channels`` says how many.
* ``LevelStack``: one operator per pyramid level (GraDIRN's separate network
  and tau per level); ``for_level(i)`` is the operator of level i.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses
from .similarity import Similarity, get_similarity, spatial_gradient
from .transforms import downsample_image, warp


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *S), per channel; border replicated."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    total = sum(taps)
    return separable_filter(x, [t / total for t in taps])


#: three 3-voxel box filters in one (the 3-fold convolution of [1, 1, 1] / 3): ConvexAdam's smoothing of its field
BOX3_TAPS = tuple(t / 27 for t in (1, 3, 6, 7, 6, 3, 1))


def box_smooth(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) smoothed by three 3-voxel box filters per axis (``BOX3_TAPS``), border replicated."""
    return separable_filter(x, BOX3_TAPS)


def separable_filter(x: torch.Tensor, taps) -> torch.Tensor:
    """(B, C, *S) filtered along every spatial axis by the same odd, symmetric ``taps``; border replicated.

    Taps are applied as shifted multiply-adds on a replicate-padded copy per
    axis: on a CPU about 4x faster than grouped convolutions, same result.
    """
    radius = len(taps) // 2
    ndim = x.dim() - 2
    for axis in range(ndim):
        dim = 2 + axis
        n = x.shape[dim]
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        xp = F.pad(x, pad, mode="replicate")
        out = xp.narrow(dim, radius, n) * taps[radius]
        for j in range(1, radius + 1):
            out.add_(xp.narrow(dim, radius - j, n), alpha=taps[radius - j])
            out.add_(xp.narrow(dim, radius + j, n), alpha=taps[radius + j])
        x = out
    return x


def similarity_gradient(z, fixed, moving, similarity="lncc", window=5, diffusion_weight=0.0, create_graph=False,
                        weight=None):
    """Gradient w.r.t. the field of the summed similarity + diffusion_weight * summed diffusion.

    ``similarity`` is a name or a ``similarity.Similarity``. Analytic (no
    autograd graph, continuous in z) unless ``create_graph``, which
    back-propagates through the similarity's value for training. Sum
    reduction keeps the per-voxel gradient independent of image size.
    """
    sim = make_similarity(similarity, window)
    g = sim.gradient(z, fixed, moving, weight, create_graph=create_graph)
    if diffusion_weight:
        g = g + diffusion_weight * losses.diffusion_gradient(z if create_graph else z.detach())
    return g


def make_similarity(similarity, window: int = 5, gradient: str = "moving") -> Similarity:
    """A Similarity from a name ('lncc' takes ``window``; ``gradient``: ``similarity.IMAGE_GRADIENTS``) or an
    instance passed through."""
    if isinstance(similarity, Similarity):
        return similarity
    name = str(similarity).lower()
    kwargs = dict(window=window) if name == "lncc" else {}
    return get_similarity(name, gradient=gradient, **kwargs)


class UpdateOperator(nn.Module):
    """Base class; subclasses implement ``forward(z, fixed, moving)``.

    ``z`` holds the field in its first ndim channels; an operator with a
    hidden state (``state_channels(ndim) > ndim``) keeps it in the rest.
    """

    update = "base"  # the update rule's name: learned | gradient | hybrid | features

    def state_channels(self, ndim: int) -> int:
        return ndim

    def field(self, z: torch.Tensor) -> torch.Tensor:
        """The displacement field a state stands for: its first ndim channels (an operator that parameterises
        the field otherwise says how)."""
        return z[:, : z.dim() - 2]

    def for_level(self, level: int) -> "UpdateOperator":
        """The operator of pyramid level ``level`` (one operator for all levels unless a ``LevelStack``)."""
        return self

    def level_inputs(self, image: torch.Tensor, factors, on_progress=None) -> list:
        """The operator's fixed or moving input at each pyramid level, from the full-resolution (padded) image:
        the image average-pooled by each factor (a MIND gradient operator: the descriptor, pooled, reporting
        ``on_progress(fraction)`` as it goes)."""
        return [downsample_image(image, int(f)) for f in factors]

    @property
    def costly_inputs(self) -> bool:
        """``level_inputs`` computes full-resolution features (MIND): worth a progress stage of its own."""
        sim = getattr(self, "sim", None)
        return bool(getattr(sim, "costly_inputs", False))

    @property
    def multiple(self) -> int:
        """Every working grid must divide by this (the network's down-sampling)."""
        return getattr(getattr(self, "net", None), "multiple", 1)

    def forward(self, z, fixed, moving):  # pragma: no cover - abstract
        raise NotImplementedError


class GradientUpdate(UpdateOperator):
    """z - step_size * G_sigma * grad(E(z)), E = similarity(sum) + diffusion_weight * diffusion(sum).

    The Gaussian G_sigma preconditions the step (a Sobolev-type gradient), so
    one step size works across levels and the map contracts near a minimum.
    The gradient is analytic (``similarity`` module), so the map is continuous
    in z, and zero at z = 0 when moving equals fixed. No trainable weights.
    ``weight`` (optional, (1, 1, *S) on the working grid) weighs the
    similarity per voxel; 0 masks a voxel out. ``image_gradient``: where the
    chain rule's image gradient comes from (``similarity.IMAGE_GRADIENTS``;
    ``config.IMAGE_GRADIENTS`` has what "symmetric" measured).

    ``smooth_field``: the state z parameterises the field as ``box_smooth(z)``
    (ConvexAdam's parameterisation, which its MIND-SSC weights go with): the
    energy is taken at that field and its gradient carried back through the
    (symmetric) smoothing. The field then has no components finer than the
    filter; ``field(z)`` gives it. ``config.SIMILARITY_DEFAULTS`` (``smooth_field``) says where it
    is on and what it measured.
    """

    update = "gradient"

    def __init__(self, step_size: float = 1.0, diffusion_weight: float = 1.0, sigma: float = 1.0, window: int = 5,
                 similarity: str = "lncc", image_gradient: str = "moving", smooth_field: bool = False):
        super().__init__()
        self.step_size, self.diffusion_weight, self.sigma, self.window = step_size, diffusion_weight, sigma, window
        self.smooth_field = smooth_field
        # one instance per operator: it keeps the prepared features of the pair being solved
        self.sim = make_similarity(similarity, window, image_gradient)
        self.similarity = self.sim.name

    def level_inputs(self, image, factors, on_progress=None):
        return self.sim.level_inputs(image, factors, on_progress)

    def field(self, z: torch.Tensor) -> torch.Tensor:
        return box_smooth(z) if self.smooth_field else z

    def forward(self, z, fixed, moving, weight=None):
        g = similarity_gradient(self.field(z), fixed, moving, self.sim, self.window, self.diffusion_weight,
                                weight=weight)
        if self.smooth_field:
            g = box_smooth(g)  # the chain rule through the smoothing (symmetric taps)
        return z - self.step_size * gaussian_smooth(g, self.sigma)


class FeatureGradientUpdate(GradientUpdate):
    """Gradient mode with a learned feature similarity (issue 13, seventh attempt).

    z - step_size * G_sigma * grad(LNCC(fixed, moving o z) + beta * SSD(phi(fixed), phi(moving) o z)
    + d * diffusion(z)), SSD = sum over voxels of the mean over phi's K channels of the squared difference.
    phi (``net``, ``networks.FeatureNet``) is one CNN applied to each image of the level (siamese); the moving
    image's features are computed once and sampled at x + z, as MIND's descriptors are. beta and
    d = diffusion_weight * exp(log_diffusion_scale) are trainable scalars; with beta = 0 (its start)
    the operator *is* ``GradientUpdate`` with the same step, diffusion weight, sigma and window, so training
    starts from the weight-free method. beta is stored in units of ``beta_unit``: features of order 1 need
    beta of order 1-10 to weigh as much as LNCC, which optimiser steps of 1e-2 on a raw beta would take
    hundreds of steps to reach.

    The feature term's gradient is analytic (residual times the central differences of phi(moving), sampled
    at x + z). The sampling points carry no graph (no second derivatives through grid_sample); in training the
    graph runs to beta and, through the sampled features and their differences, to phi's weights.
    """

    update = "features"
    beta_unit = 10.0

    def __init__(self, net: nn.Module, step_size: float = 0.5, diffusion_weight: float = 0.45, sigma: float = 1.5,
                 window: int = 5, similarity: str = "lncc"):
        super().__init__(step_size=step_size, diffusion_weight=diffusion_weight, sigma=sigma, window=window,
                         similarity=similarity)
        self.net = net
        self.beta = nn.Parameter(torch.zeros(()))  # in units of beta_unit
        self.log_diffusion_scale = nn.Parameter(torch.zeros(()))
        self._cache = None

    def features(self, fixed: torch.Tensor, moving: torch.Tensor):
        """(phi(fixed) (B, K, *S), [phi(moving), its central differences] (B, K + K ndim, *S)).

        Without a graph, kept for the last (fixed, moving, weights): a solve calls this every step."""
        grad = torch.is_grad_enabled()
        key = None
        if not grad:
            key = (fixed._version, moving._version, tuple(p._version for p in self.net.parameters()))
            c = self._cache
            if c is not None and c[0] is fixed and c[1] is moving and c[2] == key:
                return c[3]
        both = self.net(torch.cat([fixed, moving], 0))  # one pass over the two images, same weights
        pf, pm = both[: fixed.shape[0]], both[fixed.shape[0]:]
        out = (pf, torch.cat([pm, spatial_gradient(pm)], 1))
        if not grad:
            self._cache = (fixed, moving, key, out)
        return out

    def feature_gradient(self, z, fixed, moving, weight=None):
        """d/dz of SSD(phi(fixed), phi(moving) o z), analytic (the sampling points carry no graph)."""
        pf, table = self.features(fixed, moving)
        K, ndim = pf.shape[1], z.shape[1]
        sampled = warp(table, z.detach())  # at x + z, border padding
        diff = sampled[:, :K] - pf
        if weight is not None:
            diff = diff * weight
        return (2.0 / K) * (diff.unsqueeze(2) * sampled[:, K:].unflatten(1, (K, ndim))).sum(1)

    def forward(self, z, fixed, moving, weight=None):
        training = torch.is_grad_enabled()
        g = self.sim.gradient(z, fixed, moving, weight)
        # always added (no host sync to test beta on a GPU); beta = 0 adds exact zeros
        g = g + (self.beta_unit * self.beta) * self.feature_gradient(z, fixed, moving, weight)
        if self.diffusion_weight:
            d = self.diffusion_weight * self.log_diffusion_scale.exp()
            g = g + d * losses.diffusion_gradient(z if training else z.detach())
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
    only, as in GraDIRN). By default the gradient enters as a detached input
    (no second-order terms); ``second_order=True`` back-propagates through it
    while training, as GraDIRN's code does (``create_graph`` in training
    mode). ``tau`` is trainable; ``sigma`` 0 is GraDIRN's raw gradient.
    """

    update = "hybrid"

    def __init__(self, net: nn.Module, tau: float = 1.0, sigma: float = 1.0, window: int = 5,
                 similarity: str = "lncc", scale: float = 1.0, diffusion_weight: float = 0.0,
                 second_order: bool = False):
        super().__init__()
        self.net = net
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.sigma, self.window, self.scale = sigma, window, scale
        self.diffusion_weight = diffusion_weight
        self.second_order = second_order
        self.sim = make_similarity(similarity, window)
        self.similarity = self.sim.name

    def forward(self, z, fixed, moving):
        create = self.second_order and self.training and torch.is_grad_enabled()
        g = similarity_gradient(z, fixed, moving, self.sim, self.window, self.diffusion_weight,
                                create_graph=create)
        g = gaussian_smooth(g, self.sigma)
        warped = warp(moving, z)
        return z - self.log_tau.exp() * g + self.scale * self.net(torch.cat([fixed, warped, z], dim=1))


class RecurrentUpdate(UpdateOperator):
    """RIIR: [z, h] -> [z + U_z, GRU(h)] with U's input (fixed, moving o z, z, grad E(z), h).

    E is the similarity (sum reduction: the per-voxel gradient of a recurrent
    inference machine's data term). The hidden state h (``hidden`` channels
    at the working grid) is updated with a convolutional GRU gate:
    h <- (1 - s) h + s tanh(c), s = sigmoid(u), u and c from U's output.
    The gradient enters as a detached input unless ``second_order`` (then it
    is back-propagated through while training).
    """

    update = "learned"

    def __init__(self, net: nn.Module, hidden: int = 8, window: int = 5, similarity: str = "lncc",
                 scale: float = 1.0, second_order: bool = False):
        super().__init__()
        self.net, self.hidden, self.window, self.similarity, self.scale = net, hidden, window, similarity, scale
        self.second_order = second_order

    def state_channels(self, ndim: int) -> int:
        return ndim + self.hidden

    def forward(self, z, fixed, moving):
        ndim = fixed.dim() - 2
        field, h = z[:, :ndim], z[:, ndim:]
        create = self.second_order and self.training and torch.is_grad_enabled()
        g = similarity_gradient(field, fixed, moving, self.similarity, self.window, 0.0, create_graph=create)
        out = self.net(torch.cat([fixed, warp(moving, field), field, g, h], dim=1))
        dz, u, c = torch.split(out, [ndim, self.hidden, self.hidden], dim=1)
        s = torch.sigmoid(u)
        return torch.cat([field + self.scale * dz, (1 - s) * h + s * torch.tanh(c)], dim=1)


class LevelStack(UpdateOperator):
    """One operator per pyramid level, coarse to fine (GraDIRN: a network and a tau per level)."""

    def __init__(self, levels):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.update = self.levels[0].update

    def for_level(self, level: int) -> UpdateOperator:
        return self.levels[level]

    def state_channels(self, ndim: int) -> int:
        return self.levels[0].state_channels(ndim)

    def level_inputs(self, image, factors, on_progress=None):
        n = len(self.levels)

        def part(i):  # level i's share of the whole
            return None if on_progress is None else (lambda fraction: on_progress((i + fraction) / n))

        return [op.level_inputs(image, [f], part(i))[0] for i, (op, f) in enumerate(zip(self.levels, factors))]

    @property
    def costly_inputs(self) -> bool:
        return any(op.costly_inputs for op in self.levels)

    @property
    def multiple(self) -> int:
        return max(op.multiple for op in self.levels)

    def forward(self, z, fixed, moving):
        raise TypeError("LevelStack runs one level at a time: call for_level(i)(z, fixed, moving)")


def field_channels(ndim: int) -> int:
    """Input channels of the update network: fixed, warped moving, field."""
    return 2 + ndim


def recurrent_channels(ndim: int, hidden: int):
    """(input, output) channels of RIIR's network: + gradient and hidden state in; field update and two gates out."""
    return 2 + 2 * ndim + hidden, ndim + 2 * hidden
