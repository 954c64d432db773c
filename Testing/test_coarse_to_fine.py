"""The coarse-to-fine level loop register() and the trainer share (``coarse_to_fine.solve_levels``): what it
does with budgets, Cancel and the state between levels, and training figures recorded before the loops
became one, for fixed seeds, which must not move."""
from __future__ import annotations

import pytest
import torch

from DEQRegistrationLib.checkpoint import read_checkpoint
from DEQRegistrationLib.coarse_to_fine import solve_levels
from DEQRegistrationLib.levels import Level
from DEQRegistrationLib.solvers import SolverResult
from Training import train
from Training.data import SyntheticPairs, to_working_grid
from Training.methods import TrainStep, build_operator, make_config

# recorded from the training code before the shared loop (commit 091a2b4), CPU
LEVEL_SOLVE_2D = dict(losses=[0.33308978378772736, 0.21309871971607208],
                      lncc=[0.31546926498413086, 0.2038174271583557],
                      start_sum=[1142.2218242923846, 759.3843708150089])
LEVEL_SOLVE_CLI_3D = [("0.640702", "0.637989", "0.002202", "3"), ("0.742786", "0.741913", "0.000778", "3")]
LEVEL_SOLVE_CLI_3D_WEIGHTS = 336.1183540166885
UNROLLED = {"unroll": (0.3055061995983124, 17.276835833009073), "gradirn": (0.4576512575149536, 21.777040864475907)}


def _solving(converge_after=None, stop_at_level=None):
    """A stand-in level solve that leaves the state as it is: converges after ``converge_after`` steps, stops
    (as Cancel does) at level ``stop_at_level``; records (level, budget, grid) of every call."""
    calls = []

    def solve_level(index, z, budget):
        calls.append((index, budget, tuple(z.shape[2:])))
        steps = budget if converge_after is None else min(budget, converge_after)
        return SolverResult(z, steps, steps < budget, index == stop_at_level)

    return solve_level, calls


def test_unused_steps_go_to_the_next_level_only_when_asked():
    levels = [Level(4, 5), Level(2, 5), Level(1, 5)]
    z0 = torch.ones(1, 2, 3, 3)
    solve_level, calls = _solving(converge_after=2)
    out = solve_levels(levels, z0, solve_level)
    assert [c[1] for c in calls] == [5, 8, 11]  # register(): the plan's total stays the budget
    assert [c[2] for c in calls] == [(3, 3), (6, 6), (12, 12)]
    assert (out.factor, out.converged, out.stopped) == (1, True, False)
    assert torch.equal(out.z, torch.full((1, 2, 12, 12), 4.0))  # upsampled twice, in the finer grid's voxels
    solve_level, calls = _solving(converge_after=2)
    solve_levels(levels, z0, solve_level, pass_on_unused=False)
    assert [c[1] for c in calls] == [5, 5, 5]  # the trainer: every level keeps its share


def test_a_stopped_level_ends_the_solve():
    solve_level, calls = _solving(stop_at_level=1)
    out = solve_levels([Level(4, 3), Level(2, 3), Level(1, 3)], torch.zeros(1, 2, 4, 4), solve_level)
    assert [c[0] for c in calls] == [0, 1]
    assert out.stopped and out.factor == 2 and out.z.shape[2:] == (8, 8)


def test_a_level_without_steps_is_carried_not_solved():
    solve_level, calls = _solving()
    out = solve_levels([Level(4, 1), Level(2, 0), Level(1, 1)], torch.ones(1, 2, 2, 2), solve_level,
                       pass_on_unused=False)
    assert [c[0] for c in calls] == [0, 2] and out.factor == 1 and torch.equal(out.z, torch.full((1, 2, 8, 8), 4.0))


def test_level_solve_keeps_each_levels_share_of_the_training_budget():
    """T = 12 over (4, 2, 1): 4 steps per coarse level even when a coarse solve converges at once, and 4 left
    for the supervised level."""
    cfg = make_config("deqreg", 2, enc=(4, 8, 8), dec=(8, 8, 4), max_steps=12, pyramid=[4, 2, 1], level_solve=True)
    step = TrainStep(build_operator(cfg), cfg)
    budgets = []

    def solve(f, z, max_steps=None):
        budgets.append((max_steps, tuple(z.shape[2:])))
        return SolverResult(z, 1, True, False)

    step.deq.solve = solve
    fixed, moving = next(_pairs(5))
    z0, budget = step.start(fixed, moving)
    assert budgets == [(4, (8, 8)), (4, (16, 16))] and budget == 4 and z0.shape[2:] == (32, 32)


def _pairs(seed):
    gen = torch.Generator().manual_seed(seed)
    source = SyntheticPairs((32, 32), n_labels=6, label_scale=6, max_disp=2.0)
    while True:
        yield to_working_grid(source.sample(gen), 1, 16, prefactored=True)


def test_level_solve_training_steps_match_the_recorded_losses():
    """Three levels (4, 2, 1) of a hybrid operator, two real optimiser steps."""
    torch.manual_seed(0)
    cfg = make_config("deqreg", 2, enc=(4, 8, 8), dec=(8, 8, 4), update="hybrid", diffusion_weight=0.5,
                      final_init=0.05, max_steps=12, n_states=2, phantom_k=2, pyramid=[4, 2, 1], level_solve=True,
                      solver_tol=0.05)
    op = build_operator(cfg)
    step = TrainStep(op, cfg)
    opt = torch.optim.AdamW(op.parameters(), lr=1e-3)
    pairs = _pairs(5)
    for i in range(2):
        fixed, moving = next(pairs)
        z0, budget = step.start(fixed, moving)
        assert budget == 4
        assert float(z0.double().abs().sum()) == pytest.approx(LEVEL_SOLVE_2D["start_sum"][i], rel=1e-5)
        opt.zero_grad()
        loss, parts = step.backward(fixed, moving)
        opt.step()
        assert loss == pytest.approx(LEVEL_SOLVE_2D["losses"][i], rel=1e-5)
        assert parts["lncc"] == pytest.approx(LEVEL_SOLVE_2D["lncc"][i], rel=1e-5)


def test_level_solve_cli_run_matches_the_recorded_log(tmp_path):
    """``Training.train --level-solve`` end to end on a 16^3 volume, seed 3: the logged losses and the weights."""
    out = tmp_path / "run"
    train.main(["--method", "deqreg", "--level-solve", "--update", "hybrid", "--tau", "0.5", "--pyramid", "4", "2",
                "1", "--data", "synthetic", "--ndim", "3", "--shape", "16", "16", "16", "--enc", "4", "8", "8",
                "--dec", "8", "8", "4", "--max-steps", "9", "--n-states", "2", "--phantom-k", "1", "--steps", "2",
                "--out", str(out), "--no-progress", "--seed", "3"])
    rows = [r.split(",") for r in (out / "log.csv").read_text().strip().splitlines()[1:]]
    for row, want in zip(rows, LEVEL_SOLVE_CLI_3D, strict=True):
        assert [float(v) for v in row[1:4]] == pytest.approx([float(v) for v in want[:3]], abs=2e-6)
        assert row[4] == want[3]
    weights = read_checkpoint(out / "last.pt")["state_dict"]
    assert float(sum(v.double().abs().sum() for v in weights.values())) == pytest.approx(LEVEL_SOLVE_CLI_3D_WEIGHTS,
                                                                                          rel=1e-6)


@pytest.mark.parametrize("method", ["unroll", "gradirn"])
def test_unrolled_level_methods_match_the_recorded_loss(method):
    torch.manual_seed(2)
    cfg = make_config(method, 2, levels=(4, 2, 1), repeats=2, cnn_layers=3, cnn_channels=8, final_init=0.05)
    op = build_operator(cfg)
    fixed, moving = next(_pairs(7))
    loss, _ = TrainStep(op, cfg).backward(fixed, moving)
    grad = float(sum(p.grad.double().abs().sum() for p in op.parameters() if p.grad is not None))
    assert (loss, grad) == pytest.approx(UNROLLED[method], rel=1e-5)
