"""Root solvers for z = f(z): plain fixed-point iteration and Anderson acceleration.

Written here rather than taken from TorchDEQ because registration needs three
things it does not give (see README, design notes): a per-iteration callback
that can stop the solve (live display, Cancel), a residual that is relative
per batch item, and the *last* iterate returned (so what a viewer showed last
is the result), with every requested state present even after an early stop.

Residual: see ``RESIDUAL_DEFINITION`` (the CLI, the Slicer module and the
docs quote it from there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

Callback = Callable[[int, float, torch.Tensor], Optional[bool]]

#: the relative residual every solver reports and every tolerance applies to
RESIDUAL_DEFINITION = ("||f(z) - z|| / max(||f(z)||, 1e-2 sqrt(n)), per batch item (n values), maximum over the "
                       "batch: relative to the field, or to an RMS field of 0.01 voxel when the field is smaller "
                       "(near the fixed point this equals ||f(z) - z|| / ||z||; unlike that form it is finite at "
                       "the zero initial field and meaningful at a zero solution, e.g. an image registered to itself)")
#: the RMS field size (voxels) below which the residual is measured against this size instead of the field's.
#: At the tolerance 1e-3 it asks a near-zero field to move by less than 1e-5 voxel RMS per step: about what float32
#: sampling coordinates resolve on a few-hundred-voxel grid (6e-8 x 128 ~ 1e-5). The former 1e-3 asked for 1e-6
#: voxel, below that resolution: a slice registered to a shifted copy of itself (the alignment takes the shift,
#: the deformable field stays under 0.015 voxel) wandered at 1.2-1.5e-3 for its whole budget of 200 steps.
RESIDUAL_FLOOR = 1e-2
#: how many repeated restarts may damp Anderson's mixing (``anderson``'s ``restart_damping``): at most to beta / 8
MAX_RESTART_DAMPINGS = 3


@dataclass
class SolverResult:
    z: torch.Tensor
    steps: int
    converged: bool
    stopped: bool  # the callback asked to stop
    residuals: List[float] = field(default_factory=list)
    states: List[torch.Tensor] = field(default_factory=list)  # iterates at ``record_at`` steps

    @property
    def final_residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")


def relative_residual(fz: torch.Tensor, z: torch.Tensor) -> float:
    """``RESIDUAL_DEFINITION``."""
    return _relative(fz - z, fz)


def _relative(diff: torch.Tensor, fz: torch.Tensor) -> float:
    floor = RESIDUAL_FLOOR * fz[0].numel() ** 0.5
    scale = fz.flatten(1).norm(dim=1).clamp_min(floor)
    return float((diff.flatten(1).norm(dim=1) / scale).max())  # the one host sync per step


class _Recorder:
    """Keeps the iterates asked for by ``record_at`` and fills the rest on early stop."""

    def __init__(self, record_at):
        self.at = sorted(set(int(s) for s in (record_at or [])))
        self.states: List[torch.Tensor] = []

    def see(self, step: int, z: torch.Tensor):
        while len(self.states) < len(self.at) and self.at[len(self.states)] <= step:
            self.states.append(z)

    def finish(self, z: torch.Tensor):
        while len(self.states) < len(self.at):
            self.states.append(z)


def fixed_point_iteration(f, z0: torch.Tensor, max_steps: int = 48, tol: float = 1e-3,
                          callback: Optional[Callback] = None, damping: float = 1.0,
                          record_at=None) -> SolverResult:
    """z <- (1 - damping) z + damping f(z) until r < tol or the budget is spent."""
    z = z0
    residuals: List[float] = []
    rec = _Recorder(record_at)
    converged = stopped = False
    step = 0
    for step in range(1, max_steps + 1):
        fz = f(z)
        r = relative_residual(fz, z)
        residuals.append(r)
        z = fz if damping == 1.0 else (1 - damping) * z + damping * fz
        rec.see(step, z)
        if callback is not None and callback(step, r, z):
            stopped = True
        if r < tol:
            converged = True
        if converged or stopped:
            break
    rec.finish(z)
    return SolverResult(z, step, converged, stopped, residuals, rec.states)


def anderson(f, z0: torch.Tensor, max_steps: int = 48, tol: float = 1e-3,
             callback: Optional[Callback] = None, memory: int = 5, beta: float = 1.0,
             ridge: float = 1e-4, record_at=None, restart: float = 10.0,
             restart_damping: float = 0.5) -> SolverResult:
    """Anderson acceleration (type II) with a *relative* Tikhonov term.

    The least-squares system H = G G^T is regularised by ridge * mean(diag(H)),
    not by an absolute ridge: displacement residuals are tiny, and an absolute
    1e-4 stalls the solver (a known TorchDEQ trap). A step whose residual
    jumps above ``restart`` times the best seen restarts the history from the best
    iterate, which keeps the method safe on non-contractive early-training maps
    (the gradient mode uses 2: ``config.GRADIENT_ANDERSON_RESTART``). A restart
    from the *same* best iterate as the previous one (nothing better was found in
    between) means the undamped steps from there repeat the same jump, a cycle
    that would spend the whole budget: it multiplies the mixing ``beta`` by
    ``restart_damping`` from then on (at most ``MAX_RESTART_DAMPINGS`` times; 1
    keeps it). A first restart from a new best keeps the step: on the contrast-
    changed 2D pair of ``Testing/test_multimodal.py`` it is what gets a stalled
    solve moving again. Damping keeps the fixed points.

    Cost per step beyond f: the history keeps f(z) and g = f(z) - z, and
    H = G G^T is updated by one new row (memory dot products), not rebuilt.
    """
    B = z0.shape[0]
    shape = z0.shape
    n = z0[0].numel()
    Fx = torch.zeros(B, memory, n, dtype=z0.dtype, device=z0.device)  # f(z) of the history
    G = torch.zeros_like(Fx)                                            # f(z) - z of the history
    H = torch.zeros(B, memory, memory, dtype=z0.dtype, device=z0.device)
    residuals: List[float] = []
    rec = _Recorder(record_at)
    converged = stopped = False

    z = z0
    fz = f(z)
    count = 0  # entries in the history
    best = (float("inf"), z0)
    mix = beta  # damped when a restart repeats (below)
    restarted_from = None
    step = 0
    for step in range(1, max_steps + 1):
        g = fz - z
        r = _relative(g, fz)
        residuals.append(r)
        if r < best[0]:
            best = (r, fz)
        elif r > restart * best[0] and count > 1:
            # restart from the best iterate seen so far; damped if it restarted from there before
            count = 0
            if restarted_from is best[1]:
                mix = max(mix * restart_damping, beta * restart_damping ** MAX_RESTART_DAMPINGS)
            restarted_from = best[1]
            z = best[1]
            fz = f(z)
            g = fz - z
            r = _relative(g, fz)
            residuals[-1] = r
        # report and record the latest evaluated output: it is what is returned
        rec.see(step, fz)
        if callback is not None and callback(step, r, fz):
            stopped = True
        if r < tol:
            converged = True
        if converged or stopped or step == max_steps:
            break
        slot = count % memory
        Fx[:, slot] = fz.reshape(B, -1)
        G[:, slot] = g.reshape(B, -1)
        count += 1
        k = min(count, memory)
        row = torch.bmm(G[:, :k], G[:, slot].unsqueeze(2)).squeeze(2)  # (B, k): <g_j, g_slot>
        H[:, slot, :k] = row
        H[:, :k, slot] = row
        Hk = H[:, :k, :k]
        reg = ridge * Hk.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        Hk = Hk + reg.view(B, 1, 1) * torch.eye(k, dtype=H.dtype, device=H.device)
        ones = torch.ones(B, k, 1, dtype=H.dtype, device=H.device)
        # solve_ex reports a singular system in ``info`` instead of raising (no host sync on a GPU);
        # singular despite the ridge: equal weights, the mean of the history
        w, info = torch.linalg.solve_ex(Hk, ones)
        w = torch.where((info == 0).view(B, 1, 1) & torch.isfinite(w).all(1, keepdim=True), w, ones)
        alpha = (w / w.sum(1, keepdim=True)).transpose(1, 2)  # (B, 1, k)
        z_new = torch.bmm(alpha, Fx[:, :k]).squeeze(1)
        if mix != 1.0:  # mix with the history's z = f(z) - g
            z_new = z_new - (1 - mix) * torch.bmm(alpha, G[:, :k]).squeeze(1)
        z = z_new.reshape(shape)
        fz = f(z)
    rec.finish(fz)
    return SolverResult(fz, step, converged, stopped, residuals, rec.states)


SOLVERS = {"anderson": anderson, "fixed-point": fixed_point_iteration}


def solve(f, z0: torch.Tensor, method: str = "anderson", **kwargs) -> SolverResult:
    try:
        fn = SOLVERS[method]
    except KeyError:
        raise ValueError(f"unknown solver {method!r}; choose anderson or fixed-point") from None
    return fn(f, z0, **kwargs)
