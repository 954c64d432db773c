"""The level plan: which grids the solver runs on (coarse to fine) and how many steps each gets.

Computed here and only here, for every mode: the gradient mode's automatic
pyramid, a model's stored pyramid, and the split of the caller's step budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

#: a level is kept only while its smallest side still has this many voxels
MIN_LEVEL_SIDE = 12


@dataclass(frozen=True)
class Level:
    factor: int   # the working grid is the fixed grid average-pooled by this
    steps: int    # solver budget on this level


def auto_pyramid(shape: Sequence[int]) -> List[int]:
    """The gradient mode's pyramid for a fixed grid, coarse to fine.

    A 3D volume whose every side is >= 96 voxels (a brain MRI) stops at half
    resolution, two levels: (4, 2) for 160x192x224. Anything smaller ends at
    full resolution with up to three levels. Coarser levels are kept only
    while their smallest side has ``MIN_LEVEL_SIDE`` voxels.
    """
    finest = 2 if len(shape) == 3 and min(shape) >= 96 else 1
    n_levels = 2 if finest == 2 else 3
    factors = [finest * 2 ** i for i in range(n_levels)]
    factors = [f for f in factors if f == finest or min(shape) / f >= MIN_LEVEL_SIDE]
    return factors[::-1]


def split_budget(total: int, weights: Sequence[float]) -> List[int]:
    """Integer steps per level summing exactly to ``total``, proportional to ``weights``.

    With at least one step per level available, every level gets one and the
    rest is shared by weight (largest remainders, ties to the coarser level).
    With fewer steps than levels, the coarsest levels get one each and the
    others none (the caller drops them).
    """
    total = int(total)
    n = len(weights)
    if total < n:
        return [1] * total + [0] * (n - total)
    w = np.asarray(weights, dtype=np.float64)
    share = (total - n) * w / w.sum()
    steps = np.floor(share).astype(int)
    left = (total - n) - int(steps.sum())
    order = sorted(range(n), key=lambda i: (-(share[i] - steps[i]), i))
    for i in order[:left]:
        steps[i] += 1
    return [int(s) + 1 for s in steps]


def plan_levels(pyramid: Sequence[int], budget: int, level_weights: Optional[Sequence[float]] = None) -> List[Level]:
    """The levels actually run: ``budget`` steps in all, levels without a step dropped."""
    weights = list(level_weights) if level_weights is not None else [1.0] * len(pyramid)
    steps = split_budget(budget, weights)
    return [Level(int(f), s) for f, s in zip(pyramid, steps) if s > 0]
