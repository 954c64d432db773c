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


#: the physical rule (3D volumes of at least BIG_SIDE voxels a side or BIG_SIDE**3 voxels): the finest
#: working voxel aims at max(TARGET_SPACING_MM, longest field-of-view side / FOV_VOXELS)
TARGET_SPACING_MM = 2.0
FOV_VOXELS = 128
BIG_SIDE = 96


def _big(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and (min(shape) >= BIG_SIDE or int(np.prod(shape)) >= BIG_SIDE ** 3)


def finest_factor(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> int:
    """The pooling factor of the finest level the gradient mode solves on (see ``auto_pyramid``)."""
    if not _big(shape):
        return 1
    if spacing is None:
        return 2
    spacing = np.asarray(spacing, dtype=np.float64)
    target = target_spacing(shape, spacing)
    f = 2 ** max(0, int(round(np.log2(target / float(spacing.min())))))
    while f > 1 and min(shape) / f < 2 * MIN_LEVEL_SIDE:  # room for a coarser level below the finest
        f //= 2
    return int(f)


def target_spacing(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """mm: max(TARGET_SPACING_MM, the field of view's longest side / FOV_VOXELS)."""
    fov = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return float(max(TARGET_SPACING_MM, fov.max() / FOV_VOXELS))


def auto_pyramid(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> List[int]:
    """The gradient mode's pyramid for a fixed grid, coarse to fine.

    Small grids (2D, or 3D with a side under ``BIG_SIDE`` voxels and fewer
    than ``BIG_SIDE``**3 voxels) end at full resolution with up to three
    levels. Larger 3D grids are planned by physical size: the finest level
    pools the fixed grid by the power of two f that brings its finest
    spacing closest (in log scale) to ``target_spacing`` = max(2 mm, longest
    side of the field of view / 128), kept small enough that every side
    still has 2 * ``MIN_LEVEL_SIDE`` voxels; then one coarser level (2f).
    A 1 mm brain (160x192x224, 224 mm) gets f = 2: (4, 2), as before; a
    0.8 x 0.8 x 1 mm CT of 512x512x300 (410 mm) gets f = 4: (8, 4), i.e. a
    3.2 mm working grid, so the solve's cost follows the anatomy's size,
    not the voxel count. Without ``spacing``, a large grid gets f = 2.
    Coarser levels are kept only while their smallest side has
    ``MIN_LEVEL_SIDE`` voxels.
    """
    finest = finest_factor(shape, spacing)
    n_levels = 2 if finest >= 2 else 3
    factors = [finest * 2 ** i for i in range(n_levels)]
    factors = [f for f in factors if f == finest or min(shape) / f >= MIN_LEVEL_SIDE]
    return factors[::-1]


def describe_rule(shape: Sequence[int], spacing: Sequence[float]) -> dict:
    """What ``auto_pyramid`` saw and chose, for metrics.json."""
    spacing = [float(s) for s in spacing]
    big = _big(shape)
    return dict(
        rule=("3D grid of at least %d^3 voxels: finest working spacing ~ max(%g mm, longest field-of-view side / "
              "%d), power-of-two pooling, then one coarser level" % (BIG_SIDE, TARGET_SPACING_MM, FOV_VOXELS))
        if big else "small grid: full resolution, up to three levels",
        field_of_view_mm=[round(n * s, 3) for n, s in zip(shape, spacing)],
        target_spacing_mm=round(target_spacing(shape, spacing), 3) if big else None,
        finest_factor=finest_factor(shape, spacing))


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
