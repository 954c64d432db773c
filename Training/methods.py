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

from typing import Dict, List

import torch
import torch.nn as nn

from DEQRegistrationLib import losses
from DEQRegistrationLib.checkpoint import build_operator
from DEQRegistrationLib.deq import DEQ, equal_interval_steps, state_weights, unroll
from DEQRegistrationLib.operators import field_channels
from DEQRegistrationLib.transforms import downsample_image, upsample_field, warp

METHODS = ("deqreg", "voxelmorph", "unroll", "riir", "gradirn")


def make_config(method: str, ndim: int, enc=(16, 32, 32), dec=(32, 32, 16), factor: int = 1,
                max_steps: int = 48, unroll_steps: int = 3, levels=(4, 2, 1), repeats: int = 3,
                final_init: float = 1e-5, update: str = "learned", op_lam: float = 0.0, tau: float = 1.0,
                sigma: float = 1.0, factors=None, **train) -> dict:
    """The checkpoint config: everything register() and this trainer need to rebuild the model.

    ``update="hybrid"`` (deqreg only) solves z = z - tau G_sigma grad(LNCC +
    op_lam diffusion) + U(...) as a DEQ: with ``op_lam`` equal to gradient
    mode's lam and a zero-initialised head it starts *as* gradient mode.
    ``factors`` stores an inference pyramid (coarse to fine) for register().
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if update not in ("learned", "hybrid"):
        raise ValueError(f"unknown update {update!r}; choose learned or hybrid")
    if update == "hybrid" and method != "deqreg":
        raise ValueError("--update hybrid is for --method deqreg (gradirn is always hybrid)")
    unet = dict(ndim=ndim, in_channels=field_channels(ndim), out_channels=ndim, enc=list(enc), dec=list(dec),
                final_init=final_init)
    inference_steps = {"deqreg": max_steps, "voxelmorph": 1, "unroll": unroll_steps, "riir": unroll_steps,
                       "gradirn": repeats * len(levels)}[method]
    cfg = dict(update="hybrid" if method == "gradirn" else update, unet=unet, ndim=ndim, factor=factor,
               max_steps=inference_steps, tol=1e-3 if method == "deqreg" else 0.0, scale=1.0, window=5,
               method=method, trained_steps=inference_steps)
    if cfg["update"] == "hybrid":
        cfg.update(tau=tau, sigma=sigma, op_lam=op_lam)
    if method == "gradirn":  # register() runs the stored pyramid, `repeats` steps per level
        cfg.update(levels=list(levels), repeats=repeats, factors=[factor * lv for lv in levels])
    if factors:
        cfg.update(factors=[int(f) for f in factors])
    cfg.update(train)
    return cfg


class TrainStep(nn.Module):
    """forward(fixed, moving) -> (loss, stats): one method's full training objective."""

    def __init__(self, op: nn.Module, cfg: dict, lam: float = 1.0, solver: str = "anderson"):
        super().__init__()
        self.op, self.cfg, self.lam = op, cfg, lam
        m = cfg["method"]
        if m == "deqreg":
            self.deq = DEQ(solver=solver, max_steps=cfg["max_steps"], tol=cfg.get("train_tol", 1e-3),
                           phantom_k=cfg.get("phantom_k", 5), phantom_damping=cfg.get("phantom_damping", 0.8),
                           n_states=cfg.get("n_states", 4))

    def states(self, fixed, moving) -> List[torch.Tensor]:
        cfg = self.cfg
        m = cfg["method"]
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
            return unroll(f, z0, cfg["max_steps"])
        if m == "riir":
            return unroll(f, z0, cfg["max_steps"], keep=list(range(1, cfg["max_steps"] + 1)))
        # gradirn: coarse to fine, field upsampled (and scaled) between levels
        z, prev = None, None
        for factor in cfg["levels"]:
            fl, ml = downsample_image(fixed, factor), downsample_image(moving, factor)
            z = z0.new_zeros(z0.shape[0], z0.shape[1], *fl.shape[2:]) if z is None else upsample_field(z, prev // factor)
            for _ in range(cfg["repeats"]):
                z = self.op(z, fl, ml)
            prev = factor
        return [z]

    def forward(self, fixed, moving, fixed_onehot=None, moving_onehot=None):
        """Loss over the states; with one-hot label maps (synthetic pairs) plus
        ``label_weight`` * soft Dice loss of the warped moving labels, the
        SynthMorph supervision that ties the field to anatomy, not intensity."""
        states = self.states(fixed, moving)
        scheme = "exponential" if self.cfg["method"] == "riir" else "uniform"
        w = state_weights(len(states), scheme, self.cfg.get("gamma", 0.8))
        sim = torch.stack([losses.lncc_loss(fixed, warp(moving, z), self.cfg.get("window", 5)) for z in states])
        reg = torch.stack([losses.diffusion_loss(z) for z in states])
        loss = (w * (sim + self.lam * reg)).sum()
        stats = {"lncc": float(sim[-1].detach()), "diffusion": float(reg[-1].detach()), "dice_loss": ""}
        label_weight = float(self.cfg.get("label_weight", 0.0))
        if label_weight and fixed_onehot is not None:
            dl = torch.stack([losses.soft_dice_loss(fixed_onehot, warp(moving_onehot, z)) for z in states])
            loss = loss + label_weight * (w * dl).sum()
            stats["dice_loss"] = float(dl[-1].detach())
        return loss, stats


__all__ = ["METHODS", "make_config", "build_operator", "TrainStep", "equal_interval_steps"]
