"""The compared training methods, all on one U-Net definition.

* ``deqreg``: DEQ, solver without a graph (up to 48 steps), phantom gradients
  (k 5, lambda 0.8) on 4 states at equal intervals, uniform loss weights.
* ``voxelmorph``: one step of the residual update from a zero field.
* ``unroll``: K plain steps with a full graph (BPTT), loss on the last state.
* ``riir``: K unrolled steps, loss on every state, exponentially increasing weights.
* ``gradirn``: HybridUpdate (similarity gradient + learned term), levels 1/4, 1/2,
  1 of the working grid, ``repeats`` unrolled steps each, loss on the final field.

``TrainStep`` wraps operator + method + loss in one module whose forward is
the whole iteration's loss, so DistributedDataParallel hooks exactly one
forward per backward however many times the operator runs inside.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from DEQRegistrationLib import losses
from DEQRegistrationLib.checkpoint import build_operator
from DEQRegistrationLib.config import ModelConfig, TrainingRecord
from DEQRegistrationLib.deq import DEQ, equal_interval_steps, state_weights, unroll
from DEQRegistrationLib.operators import field_channels
from DEQRegistrationLib.transforms import downsample_image, upsample_field, warp

METHODS = ("deqreg", "voxelmorph", "unroll", "riir", "gradirn")


def make_config(method: str, ndim: int, enc=(16, 32, 32), dec=(32, 32, 16), factor: int = 1,
                max_steps: int = 48, unroll_steps: int = 3, levels=(4, 2, 1), repeats: int = 3,
                final_init: float = 1e-5, update: str = "learned", diffusion_weight: float = 0.0, tau: float = 1.0,
                sigma: float = 1.0, pyramid=None, solver: str = "anderson", **training) -> ModelConfig:
    """The model's config (``ModelConfig``): what register() and this trainer rebuild the model from.

    ``factor`` is the working grid the network trains on (the fixed grid
    pooled by it). ``update="hybrid"`` (deqreg only) solves z = z - tau G_sigma
    grad(LNCC + diffusion_weight diffusion) + U(...) as a DEQ: with
    ``diffusion_weight`` equal to gradient mode's and a zero-initialised head
    it starts *as* gradient mode. ``pyramid`` (coarse to fine, ending at the
    training grid or finer) is what register() runs; default: the training
    grid alone. GraDIRN's pyramid is ``levels`` times ``factor``, ``repeats``
    steps per level. ``training`` holds ``TrainingRecord`` fields.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if update not in ("learned", "hybrid"):
        raise ValueError(f"unknown update {update!r}; choose learned or hybrid")
    if update == "hybrid" and method != "deqreg":
        raise ValueError("--update hybrid is for --method deqreg (gradirn is always hybrid)")
    unet = dict(ndim=ndim, in_channels=field_channels(ndim), out_channels=ndim, enc=list(enc), dec=list(dec),
                final_init=final_init)
    if method == "gradirn":
        pyramid = [factor * int(lv) for lv in levels]
    steps = {"deqreg": max_steps, "voxelmorph": 1, "unroll": unroll_steps, "riir": unroll_steps,
             "gradirn": repeats * len(pyramid or [factor])}[method]
    return ModelConfig(
        update="hybrid" if method == "gradirn" else update, ndim=ndim, unet=unet,
        pyramid=[int(f) for f in (pyramid or [factor])],
        # a DEQ runs the solver it was trained with; unrolled methods are plain iterations of their steps
        solver=solver if method == "deqreg" else "fixed-point",
        max_steps=steps, tol=1e-3 if method == "deqreg" else 0.0,
        tau=tau, sigma=sigma, diffusion_weight=diffusion_weight if (update == "hybrid" or method == "gradirn") else 0.0,
        method=method, trained_steps=steps, training=TrainingRecord(factor=factor, **training))


def training_factor(cfg: ModelConfig) -> int:
    """The grid the network trains on: the fixed grid pooled by this."""
    return cfg.training.factor


def relative_levels(cfg: ModelConfig) -> List[int]:
    """GraDIRN's pyramid relative to the training grid (e.g. 4, 2, 1)."""
    return [f // training_factor(cfg) for f in cfg.pyramid]


class TrainStep(nn.Module):
    """forward(fixed, moving) -> (loss, stats): one method's full training objective."""

    def __init__(self, op: nn.Module, cfg: ModelConfig, lam: float = 1.0):
        super().__init__()
        self.op, self.cfg, self.lam = op, cfg, lam
        t = cfg.training
        if cfg.method == "deqreg":
            self.deq = DEQ(solver=cfg.solver, max_steps=cfg.max_steps, tol=t.solver_tol, phantom_k=t.phantom_k,
                           phantom_damping=t.phantom_damping, n_states=t.n_states)

    def states(self, fixed, moving) -> List[torch.Tensor]:
        cfg = self.cfg
        m = cfg.method
        z0 = torch.zeros(fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:], dtype=fixed.dtype, device=fixed.device)

        def f(z):
            return self.op(z, fixed, moving)

        if m == "deqreg":
            out = self.deq(f, z0)
            self.last_solver_steps = out.info.steps
            return out.states
        if m == "voxelmorph":
            return unroll(f, z0, 1)
        if m == "unroll":
            return unroll(f, z0, cfg.max_steps)
        if m == "riir":
            return unroll(f, z0, cfg.max_steps, keep=list(range(1, cfg.max_steps + 1)))
        # gradirn: coarse to fine, field upsampled (and scaled) between levels
        z, prev = None, None
        repeats = cfg.max_steps // len(cfg.pyramid)
        for factor in relative_levels(cfg):
            fl, ml = downsample_image(fixed, factor), downsample_image(moving, factor)
            z = z0.new_zeros(z0.shape[0], z0.shape[1], *fl.shape[2:]) if z is None else upsample_field(z, prev // factor)
            for _ in range(repeats):
                z = self.op(z, fl, ml)
            prev = factor
        return [z]

    def forward(self, fixed, moving, fixed_onehot=None, moving_onehot=None):
        """Loss over the states; with one-hot label maps (synthetic pairs) plus
        ``label_weight`` * soft Dice loss of the warped moving labels, the
        SynthMorph supervision that ties the field to anatomy, not intensity."""
        states = self.states(fixed, moving)
        scheme = "exponential" if self.cfg.method == "riir" else "uniform"
        w = state_weights(len(states), scheme, self.cfg.training.gamma)
        sim = torch.stack([losses.lncc_loss(fixed, warp(moving, z), self.cfg.window) for z in states])
        reg = torch.stack([losses.diffusion_loss(z) for z in states])
        loss = (w * (sim + self.lam * reg)).sum()
        stats = {"lncc": float(sim[-1].detach()), "diffusion": float(reg[-1].detach()), "dice_loss": ""}
        label_weight = float(self.cfg.training.label_weight)
        if label_weight and fixed_onehot is not None:
            dl = torch.stack([losses.soft_dice_loss(fixed_onehot, warp(moving_onehot, z)) for z in states])
            loss = loss + label_weight * (w * dl).sum()
            stats["dice_loss"] = float(dl[-1].detach())
        return loss, stats


__all__ = ["METHODS", "make_config", "training_factor", "relative_levels", "build_operator", "TrainStep",
           "equal_interval_steps"]
