"""The coarse-to-fine solve the trainer shares with register(): training figures recorded before the two
loops became one (``coarse_to_fine``), for a fixed seed, must not move."""
from __future__ import annotations

import pytest
import torch

from DEQRegistrationLib.checkpoint import read_checkpoint
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


def _pairs(seed):
    gen = torch.Generator().manual_seed(seed)
    source = SyntheticPairs((32, 32), n_labels=6, label_scale=6, max_disp=2.0)
    while True:
        yield to_working_grid(source.sample(gen), 1, 16, prefactored=True)


def test_level_solve_training_steps_match_the_recorded_losses():
    """Three levels (4, 2, 1), a training tolerance loose enough that the coarse solves stop early: each level
    keeps its share of T (the trainer does not pass unused steps on), two real optimiser steps."""
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
