"""Training support: DEQ with phantom gradients, and unrolled BPTT for comparison.

DEQ: the solver runs without a graph (memory independent of its step count);
the n intermediate states it records, at equal intervals of the budget, each
get ``k`` damped steps with a graph, z <- (1 - damping) z + damping f(z),
starting from the detached state. Gradients flow only through those steps.
``DEQ.solve`` + ``DEQ.attach`` let a trainer back-propagate each state's loss
as soon as its phantom steps are built (the gradients add up), so the peak is
one state's graph, k network applications, whatever n and the solver's
budget; ``DEQ.__call__`` returns all n states with their graphs at once.

Defaults follow the paper: plain fixed-point iteration, T = 48. k = 3: the
paper's memory figures put DEQReg at about 3 graph-carrying network calls
(see docs/TRAINING.md, "Memory").

BPTT: ``unroll`` keeps the graph of every step, memory linear in the steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .solvers import SolverResult, solve


def equal_interval_steps(max_steps: int, n_states: int) -> List[int]:
    """Steps at which to sample n states: max_steps/n, 2 max_steps/n, ..., max_steps."""
    n_states = max(1, min(n_states, max_steps))
    return [max(1, round(max_steps * (i + 1) / n_states)) for i in range(n_states)]


def phantom_steps(f, z: torch.Tensor, steps: int = 5, damping: float = 0.8) -> torch.Tensor:
    """k damped steps from a detached state, with a graph: the phantom gradient."""
    z = z.detach()
    for _ in range(steps):
        z = (1 - damping) * z + damping * f(z)
    return z


@dataclass
class DEQOutput:
    states: List[torch.Tensor]  # n states carrying phantom gradients, last = the equilibrium
    info: SolverResult


class DEQ:
    """Solve without a graph, then attach phantom gradients to n sampled states."""

    def __init__(self, solver: str = "fixed-point", max_steps: int = 48, tol: float = 1e-4,
                 phantom_k: int = 3, phantom_damping: float = 0.8, n_states: int = 4, **solver_kwargs):
        self.solver, self.max_steps, self.tol = solver, max_steps, tol
        self.phantom_k, self.phantom_damping, self.n_states = phantom_k, phantom_damping, n_states
        self.solver_kwargs = solver_kwargs

    def solve(self, f, z0: torch.Tensor, max_steps: Optional[int] = None) -> SolverResult:
        """The forward solve without a graph; ``.states`` holds the n detached states."""
        budget = max_steps or self.max_steps
        record = equal_interval_steps(budget, self.n_states)
        with torch.no_grad():
            return solve(f, z0.detach(), self.solver, max_steps=budget, tol=self.tol,
                         record_at=record, **self.solver_kwargs)

    def attach(self, f, state: torch.Tensor) -> torch.Tensor:
        """One state with its phantom-gradient graph (k damped steps from it)."""
        return phantom_steps(f, state, self.phantom_k, self.phantom_damping)

    def __call__(self, f, z0: torch.Tensor, max_steps: Optional[int] = None) -> DEQOutput:
        info = self.solve(f, z0, max_steps)
        if torch.is_grad_enabled():
            states = [self.attach(f, s) for s in info.states]
        else:
            states = list(info.states)
        return DEQOutput(states, info)


def unroll(f, z0: torch.Tensor, steps: int, keep: Optional[List[int]] = None) -> List[torch.Tensor]:
    """Plain unrolling with a full graph (BPTT); returns the states at ``keep`` steps (default: last)."""
    keep = set(keep or [steps])
    z = z0
    out = []
    for t in range(1, steps + 1):
        z = f(z)
        if t in keep:
            out.append(z)
    return out


def state_weights(n: int, scheme: str = "uniform", gamma: float = 0.8) -> torch.Tensor:
    """Loss weights of n intermediate states: uniform (DEQReg), exponential (RIIR: gamma^(n-1-i))."""
    if scheme == "uniform":
        w = torch.ones(n)
    elif scheme == "exponential":
        w = torch.tensor([gamma ** (n - 1 - i) for i in range(n)])
    elif scheme == "last":
        w = torch.zeros(n)
        w[-1] = 1
    else:
        raise ValueError(f"unknown weighting {scheme!r}")
    return w / w.sum()
