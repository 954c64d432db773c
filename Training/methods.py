"""The compared training methods, each as its paper describes it.

* ``deqreg`` (the paper's): the residual update z + U(F, M o z, z) solved as a
  fixed point by plain fixed-point iteration (T = 48, no graph); phantom
  gradients (k = 3 damped steps, damping 0.8) on n = 4 states at equal
  intervals, uniform weights. Each state's loss is back-propagated as soon as
  its phantom steps are built, so the peak memory is one state's graph.
* ``voxelmorph``: one step of the residual update from a zero field.
* ``riir``: a recurrent inference machine, K = 6 unrolled steps at a single
  resolution; the network sees the similarity gradient and a hidden state
  (``RecurrentUpdate``); loss on every state with exponentially increasing
  weights gamma^(K-1-i).
* ``unroll``: GraDIRN without the similarity gradient: 3 levels (1/4, 1/2, 1 of
  the working grid) x 3 steps of z + U_l(F, M o z, z), a separate network per
  level, BPTT, loss on the final field.
* ``gradirn``: 3 levels x 3 steps of z - tau_l grad(similarity) + U_l(...), a
  separate network and a trainable tau per level, the raw gradient
  back-propagated through (second order, as GraDIRN's code), loss on the final
  field.

Networks: the U-Net for deqreg, voxelmorph and riir (the paper: "the same U-Net
configuration as VoxelMorph and RIIR"); GraDIRN's regulariser CNN (5 layers of
32 channels, full resolution) per level for gradirn and unroll. ``net``
swaps them.

``TrainStep.backward`` computes one optimiser step's gradients and returns the
loss; ``TrainStep.forward`` returns the same objective as one tensor with the
whole graph (for tests and the memory comparison).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from DEQRegistrationLib import losses
from DEQRegistrationLib.checkpoint import build_operator
from DEQRegistrationLib.config import (GRADIENT_ANDERSON_MEMORY, GRADIENT_ANDERSON_RESTART, ModelConfig,
                                       TrainingRecord)
from DEQRegistrationLib.deq import DEQ, equal_interval_steps, state_weights, unroll
from DEQRegistrationLib.coarse_to_fine import solve_levels
from DEQRegistrationLib.levels import Level, split_budget
from DEQRegistrationLib.operators import field_channels, recurrent_channels
from DEQRegistrationLib.solvers import SolverResult
from DEQRegistrationLib.transforms import downsample_image, upsample_field, warp

METHODS = ("deqreg", "voxelmorph", "unroll", "riir", "gradirn")
LEVEL_METHODS = ("unroll", "gradirn")
DEFAULT_NET = {"deqreg": "unet", "voxelmorph": "unet", "riir": "unet", "unroll": "cnn", "gradirn": "cnn"}


def make_config(method: str, ndim: int, enc=(16, 32, 32), dec=(32, 32, 16), factor: int = 1,
                max_steps: int = 48, unroll_steps: int = 6, levels=(4, 2, 1), repeats: int = 3,
                final_init: float = 1e-5, update: str = "learned", diffusion_weight: float = 0.0,
                tau: Optional[float] = None, sigma: Optional[float] = None, pyramid=None, solver: str = "fixed-point",
                net: Optional[str] = None, cnn_layers: Optional[int] = None, cnn_channels: Optional[int] = None,
                hidden: int = 8, feature_channels: int = 4, feature_activation: str = "none", feature_dilations=None,
                feature_init: float = 1.0, **training) -> ModelConfig:
    """The model's config (``ModelConfig``): what register() and this trainer rebuild the model from.

    ``factor`` is the working grid the network trains on (the fixed grid
    pooled by it). ``max_steps`` is DEQReg's solver budget T, ``unroll_steps``
    RIIR's K, ``levels`` x ``repeats`` the pyramid of unroll and GraDIRN (their
    stored pyramid is ``levels`` times ``factor``). ``solver`` is stored, so
    register() and the evaluation run what was trained. ``update="hybrid"``
    (deqreg only) solves z = z - tau G_sigma grad(LNCC + diffusion_weight
    diffusion) + U(...) as a DEQ: with ``diffusion_weight`` equal to gradient
    mode's and a zero-initialised head it starts *as* gradient mode.
    ``update="features"`` (deqreg only): gradient mode's operator (step ``tau``, default 0.5; ``sigma`` 1.5)
    + beta x SSD of learned features phi, a ``cnn_layers`` x ``cnn_channels`` ``FeatureNet`` (default 4 x 16;
    ``feature_channels`` K outputs, then ``feature_activation``), beta starting at 0: it starts *as*
    gradient mode. ``cnn_layers`` x ``cnn_channels`` default to 5 x 32 for the cnn net.
    ``pyramid`` (coarse to fine) is what register() runs for the other
    methods; default: the training grid alone. ``training`` holds
    ``TrainingRecord`` fields.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if update not in ("learned", "hybrid", "features"):
        raise ValueError(f"unknown update {update!r}; choose learned, hybrid or features")
    if update in ("hybrid", "features") and method != "deqreg":
        raise ValueError(f"--update {update} is for --method deqreg (gradirn is always hybrid)")
    feats = update == "features"
    if feats:  # gradient mode's LNCC operator + beta (0 at the start) x SSD of a small siamese CNN's features
        net = "features"
        tau = 0.5 if tau is None else tau
        sigma = 1.5 if sigma is None else sigma
    cnn_layers = (4 if feats else 5) if cnn_layers is None else cnn_layers
    cnn_channels = (16 if feats else 32) if cnn_channels is None else cnn_channels
    net = net or DEFAULT_NET[method]
    cin, cout = field_channels(ndim), ndim
    if method == "riir":
        cin, cout = recurrent_channels(ndim, hidden)
    if net == "unet":
        args = dict(ndim=ndim, in_channels=cin, out_channels=cout, enc=list(enc), dec=list(dec), final_init=final_init)
    elif net == "cnn":
        args = dict(ndim=ndim, in_channels=cin, out_channels=cout, layers=cnn_layers, channels=cnn_channels,
                    final_init=final_init)
    elif net == "features":
        args = dict(ndim=ndim, in_channels=1, out_channels=int(feature_channels), layers=cnn_layers,
                    channels=cnn_channels, final_init=float(feature_init), activation=feature_activation,
                    dilations=[int(d) for d in feature_dilations] if feature_dilations else [1] * cnn_layers)
    else:
        raise ValueError(f"unknown net {net!r}; choose unet or cnn")
    if method in LEVEL_METHODS:
        pyramid = [factor * int(lv) for lv in levels]
    steps = {"deqreg": max_steps, "voxelmorph": 1, "riir": unroll_steps,
             "unroll": repeats * len(levels), "gradirn": repeats * len(levels)}[method]
    gd = method == "gradirn"  # GraDIRN: the raw gradient, tau initialised at 0.5, second order
    hybrid = update in ("hybrid", "features") or gd
    return ModelConfig(
        update="hybrid" if gd else update, ndim=ndim, unet=args, network=net,
        pyramid=[int(f) for f in (pyramid or [factor])],
        # a DEQ runs the solver it was trained with; unrolled methods are plain iterations of their steps
        solver=solver if method == "deqreg" else "fixed-point",
        max_steps=steps, tol=1e-3 if method == "deqreg" else 0.0,
        tau=(0.5 if gd else 1.0) if tau is None else tau, sigma=(0.0 if gd else 1.0) if sigma is None else sigma,
        diffusion_weight=diffusion_weight if hybrid else 0.0, method=method, trained_steps=steps,
        per_level_networks=method in LEVEL_METHODS, recurrent_hidden=hidden if method == "riir" else 0,
        second_order=gd, training=TrainingRecord(factor=factor, **training))


def describe(cfg: ModelConfig) -> str:
    """A table row's name that says how the model was trained (and where it departs from its paper)."""
    m = cfg.method
    net = "U-Net" if cfg.network == "unet" else f"{cfg.unet['layers']}-layer {cfg.unet['channels']}-ch CNN"
    if m == "deqreg":
        hybrid = {"hybrid": ", hybrid operator",
                  "features": ", gradient + learned feature similarity"}.get(cfg.update, "")
        t = cfg.training
        return f"deqreg ({cfg.solver} T={cfg.trained_steps}, {t.n_states} states x k={t.phantom_k}{hybrid})"
    if m == "voxelmorph":
        return "voxelmorph (1 step)"
    if m == "riir":
        if not cfg.recurrent_hidden:  # models trained before RIIR had its recurrent update
            return f"riir (K={cfg.trained_steps}, plain residual update)"
        return f"riir (K={cfg.trained_steps}, gradient input, hidden {cfg.recurrent_hidden})"
    if not cfg.per_level_networks:  # models trained before one network per level
        return f"{m} ({cfg.trained_steps} steps, one shared {net})"
    per = f"{len(cfg.pyramid)} levels x {repeats(cfg)}, {net} per level"
    return f"unroll ({per}, no gradient)" if m == "unroll" else f"gradirn ({per}, tau per level)"


def training_factor(cfg: ModelConfig) -> int:
    """The grid the network trains on: the fixed grid pooled by this."""
    return cfg.training.factor


def relative_levels(cfg: ModelConfig) -> List[int]:
    """A multi-level method's pyramid relative to the training grid (e.g. 4, 2, 1)."""
    return [f // training_factor(cfg) for f in cfg.pyramid]


def repeats(cfg: ModelConfig) -> int:
    """Steps per level of unroll / GraDIRN (as trained)."""
    return int(cfg.trained_steps or cfg.max_steps) // len(cfg.pyramid)


class TrainStep(nn.Module):
    """One method's training objective: ``backward(...)`` (gradients) or ``forward(...)`` (one loss tensor)."""

    def __init__(self, op: nn.Module, cfg: ModelConfig, lam: float = 1.0):
        super().__init__()
        self.op, self.cfg, self.lam = op, cfg, lam
        self.last_solver_steps = ""
        t = cfg.training
        if cfg.method == "deqreg":
            # the features update solves as gradient mode does (register() gives it gradient mode's Anderson)
            options = (dict(memory=GRADIENT_ANDERSON_MEMORY, restart=GRADIENT_ANDERSON_RESTART)
                       if cfg.update == "features" and cfg.solver == "anderson" else {})
            self.deq = DEQ(solver=cfg.solver, max_steps=int(cfg.trained_steps or cfg.max_steps), tol=t.solver_tol,
                           phantom_k=t.phantom_k, phantom_damping=t.phantom_damping, n_states=t.n_states, **options)

    # ------------------------------------------------------------------ pieces

    def z0(self, fixed, factor: int = 1):
        """The initial state: a zero field (and hidden state) on ``fixed``'s grid pooled by ``factor``."""
        ndim = fixed.dim() - 2
        return fixed.new_zeros(fixed.shape[0], self.op.state_channels(ndim), *(n // factor for n in fixed.shape[2:]))

    def _f(self, fixed, moving):
        return lambda z: self.op(z, fixed, moving)

    def start(self, fixed, moving) -> Tuple[torch.Tensor, int]:
        """DEQReg's training solve: (initial state on the training grid, its step budget).

        By default a zero field and the whole budget T. With ``training.level_solve``
        and a stored pyramid coarser than the training grid, the solve is the one
        register() runs (``coarse_to_fine.solve_levels``): T split equally over the
        levels, each coarser level solved without a graph from the previous one's
        upsampled field, and the training grid's level (the supervised one) starts
        from the last of them. Unlike register(), a level that converges early does
        not pass its unused steps on: every level keeps its share.
        """
        cfg = self.cfg
        budget = int(cfg.trained_steps or cfg.max_steps)
        rel = relative_levels(cfg)
        if not (cfg.method == "deqreg" and cfg.training.level_solve and len(rel) > 1 and rel[-1] == 1):
            return self.z0(fixed), budget
        *coarse, fine = [Level(f, n) for f, n in zip(rel, split_budget(budget, [1.0] * len(rel)))]

        def solve_level(index, z, steps):
            fl, ml = (downsample_image(x, coarse[index].factor) for x in (fixed, moving))
            return self.deq.solve(self._f(fl, ml), z, max_steps=steps)

        out = solve_levels(coarse, self.z0(fixed, coarse[0].factor), solve_level, pass_on_unused=False)
        return upsample_field(out.z, out.factor).detach(), max(1, fine.steps)

    def weights(self, n: int) -> torch.Tensor:
        scheme = "exponential" if self.cfg.method == "riir" else "uniform"
        return state_weights(n, scheme, self.cfg.training.gamma)

    def state_loss(self, z, fixed, moving, fixed_onehot=None, moving_onehot=None) -> Tuple[torch.Tensor, dict]:
        """LNCC + lam diffusion (+ fold_weight folding penalty) (+ label_weight soft Dice, the
        SynthMorph-style supervision) of one state's field."""
        field = z[:, : fixed.dim() - 2]
        sim = losses.lncc_loss(fixed, warp(moving, field), self.cfg.window)
        reg = losses.diffusion_loss(field)
        loss = sim + self.lam * reg
        if self.cfg.training.fold_weight:
            loss = loss + self.cfg.training.fold_weight * losses.folding_loss(field)
        parts = {"lncc": float(sim.detach()), "diffusion": float(reg.detach()), "dice_loss": ""}
        label_weight = float(self.cfg.training.label_weight)
        if label_weight and fixed_onehot is not None:
            dl = losses.soft_dice_loss(fixed_onehot, warp(moving_onehot, field))
            loss = loss + label_weight * dl
            parts["dice_loss"] = float(dl.detach())
        return loss, parts

    def states(self, fixed, moving) -> List[torch.Tensor]:
        """Every supervised state with its graph (DEQ: all n phantom graphs at once)."""
        cfg, m = self.cfg, self.cfg.method
        f = self._f(fixed, moving)
        if m == "deqreg":
            z0, budget = self.start(fixed, moving)
            out = self.deq(f, z0, budget)
            self.last_solver_steps = out.info.steps
            return out.states
        z0, k = self.z0(fixed), int(cfg.trained_steps or cfg.max_steps)
        if m == "voxelmorph":
            return unroll(f, z0, 1)
        if m == "riir":
            return unroll(f, z0, k, keep=list(range(1, k + 1)))
        if m == "unroll" and not cfg.per_level_networks:  # models trained before one network per level
            return unroll(f, z0, k)
        # unroll / gradirn: coarse to fine, an operator per level, ``repeats`` steps each (with their graph)
        levels = [Level(f, repeats(cfg)) for f in relative_levels(cfg)]

        def unroll_level(index, z, steps):
            fl, ml = (downsample_image(x, levels[index].factor) for x in (fixed, moving))
            level_op = self.op.for_level(index)
            return SolverResult(unroll(lambda zz: level_op(zz, fl, ml), z, steps)[0], steps, False, False)

        return [solve_levels(levels, self.z0(fixed, levels[0].factor), unroll_level).z]

    # ------------------------------------------------------------------ objectives

    def forward(self, fixed, moving, fixed_onehot=None, moving_onehot=None):
        """The whole objective as one tensor with its graph, and stats of the last state."""
        states = self.states(fixed, moving)
        w = self.weights(len(states))
        total, parts = 0.0, {}
        for wi, z in zip(w, states):
            loss, parts = self.state_loss(z, fixed, moving, fixed_onehot, moving_onehot)
            total = total + wi * loss
        return total, parts

    def backward(self, fixed, moving, fixed_onehot=None, moving_onehot=None) -> Tuple[float, Dict]:
        """Accumulate this objective's gradients; return (loss value, stats of the last state).

        DEQReg streams: solve once without a graph, then for each recorded
        state build its k phantom steps, back-propagate its weighted loss and
        free the graph before the next state. The same gradients as
        ``forward(...)[0].backward()``, with the peak memory of one state's graph.
        """
        if self.cfg.method != "deqreg":
            loss, parts = self.forward(fixed, moving, fixed_onehot, moving_onehot)
            loss.backward()
            return float(loss.detach()), parts
        f = self._f(fixed, moving)
        z0, budget = self.start(fixed, moving)
        info = self.deq.solve(f, z0, budget)
        self.last_solver_steps = info.steps
        w = self.weights(len(info.states))
        total, parts = 0.0, {}
        for wi, s in zip(w, info.states):
            loss, parts = self.state_loss(self.deq.attach(f, s), fixed, moving, fixed_onehot, moving_onehot)
            (wi * loss).backward()
            total += float(wi) * float(loss.detach())
        return total, parts


__all__ = ["METHODS", "make_config", "describe", "training_factor", "relative_levels", "repeats", "build_operator",
           "TrainStep", "equal_interval_steps"]
