"""Coarse to fine: each level of a plan solved from the previous level's state, upsampled.

The one level loop register() runs and the trainer shares (``Training.methods``:
``--level-solve`` and the unrolled level methods), so a network trains on the
solve it will run in. What differs between callers comes in as arguments:
how one level is solved (its images, operator, solver and progress callback)
and whether the steps a level leaves unused go to the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .levels import Level
from .solvers import SolverResult
from .transforms import upsample_field

#: one level's solve: (level index, start state on the level's grid, step budget) -> the solver's result;
#: a result with ``stopped`` set (the progress callback asked to stop: Cancel) ends the whole solve
LevelSolve = Callable[[int, torch.Tensor, int], SolverResult]


@dataclass
class LevelsResult:
    z: torch.Tensor   # the last solved level's state, on its working grid
    factor: int       # that grid's pooling factor
    converged: bool   # the last level's solve reached its tolerance
    stopped: bool     # a level's solve was stopped: the levels after it did not run


def solve_levels(levels: Sequence[Level], z0: torch.Tensor, solve_level: LevelSolve,
                 pass_on_unused: bool = True) -> LevelsResult:
    """Solve ``levels`` coarse to fine from ``z0``, the start state on the first level's grid.

    Between levels the whole state (the field and a recurrent model's hidden
    channels) is upsampled to the next grid (``upsample_field``: a field in
    that grid's voxels). ``pass_on_unused``: the steps a level leaves unused
    (it converged early) go to the next, so the plan's total stays the budget
    (register()); off, every level keeps its own share (the trainer's level
    solve). A level with no steps is not solved; its state is still carried.
    No copy and no host sync beyond the solver's own: ``upsample_field`` by 1
    returns its input.
    """
    z, factor = z0, levels[0].factor
    converged = stopped = False
    spare = 0
    for index, level in enumerate(levels):
        z = upsample_field(z, factor // level.factor)
        factor = level.factor
        budget = level.steps + spare
        if budget <= 0:
            continue
        res = solve_level(index, z, budget)
        z, converged, stopped = res.z, res.converged, res.stopped
        spare = budget - res.steps if pass_on_unused else 0
        del res
        if stopped:
            break
    return LevelsResult(z, factor, converged, stopped)
