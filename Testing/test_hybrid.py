"""Hybrid DEQReg (gradient-mode step + learned correction): it starts as gradient
mode, trains with label supervision, and register() runs its stored pyramid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DEQRegistrationLib import losses
from DEQRegistrationLib.checkpoint import read_checkpoint, save_checkpoint
from DEQRegistrationLib.cli import resolve_model
from DEQRegistrationLib.image import Image
from DEQRegistrationLib.operators import GradientUpdate
from DEQRegistrationLib.registration import register
from Training.data import SyntheticPairs, labels_to_working_grid, to_working_grid
from Training.methods import TrainStep, build_operator, make_config


def _hybrid(ndim=2, **kw):
    cfg = make_config("deqreg", ndim, enc=(4, 8, 8), dec=(8, 8, 4), update="hybrid", diffusion_weight=0.5,
                      max_steps=6, n_states=2, phantom_k=2, **kw)
    return build_operator(cfg), cfg


def _sample(ndim=2, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return SyntheticPairs((size,) * ndim, n_labels=5, label_scale=6, max_disp=2.0).sample(gen)


def test_hybrid_with_zero_head_is_exactly_gradient_mode():
    op, _ = _hybrid()
    torch.nn.init.zeros_(op.net.head.weight)
    fixed, moving = to_working_grid(_sample(), 1, 8, prefactored=True)
    z = 0.5 * torch.randn(1, 2, *fixed.shape[2:])
    with torch.no_grad():
        expected = GradientUpdate(step_size=1.0, diffusion_weight=0.5, sigma=1.0)(z, fixed, moving)
        got = op(z, fixed, moving)
    assert torch.allclose(got, expected, atol=1e-6)
    # and the diffusion term matters: weight 0 gives a different step
    op.diffusion_weight = 0.0
    with torch.no_grad():
        assert not torch.allclose(op(z, fixed, moving), expected, atol=1e-4)


def test_soft_dice_loss_bounds_and_gradient():
    lab = torch.zeros(1, 3, 8, 8)
    lab[:, 0, :4], lab[:, 1, 4:, :4], lab[:, 2, 4:, 4:] = 1, 1, 1
    assert float(losses.soft_dice_loss(lab, lab)) == pytest.approx(0.0, abs=1e-6)
    swapped = lab[:, [1, 2, 0]]
    assert float(losses.soft_dice_loss(lab, swapped)) == pytest.approx(1.0, abs=1e-6)
    warped = (0.7 * lab + 0.3 * swapped).requires_grad_(True)
    losses.soft_dice_loss(lab, warped).backward()
    assert warped.grad.abs().sum() > 0


@pytest.mark.parametrize("factor", [1, 2])
def test_labels_to_working_grid_is_a_partition_of_unity(factor):
    s = _sample(size=32)
    s["fixed_labels"] = s["fixed_labels"] * 7  # arbitrary ids, not 0..L-1
    s["moving_labels"] = s["moving_labels"] * 7
    fo, mo = labels_to_working_grid(s, factor, 8, prefactored=False)
    n_ids = len(np.union1d(np.unique(s["fixed_labels"]), np.unique(s["moving_labels"])))
    assert fo.shape == mo.shape == (1, n_ids, 32 // factor, 32 // factor)
    assert torch.allclose(fo.sum(1), torch.ones(1, 32 // factor, 32 // factor))
    if factor == 1:  # channel k is exactly the k-th smallest id
        ids = np.union1d(np.unique(s["fixed_labels"]), np.unique(s["moving_labels"]))
        assert np.array_equal(ids[fo[0].argmax(0).numpy()], s["fixed_labels"])


def test_hybrid_training_step_with_label_loss_has_finite_gradients():
    torch.manual_seed(0)
    op, cfg = _hybrid(label_weight=1.0)
    torch.nn.init.normal_(op.net.head.weight, 0, 1e-2)
    s = _sample()
    fixed, moving = to_working_grid(s, 1, 8, prefactored=True)
    fo, mo = labels_to_working_grid(s, 1, 8, prefactored=True)
    loss, stats = TrainStep(op, cfg, lam=1.0)(fixed, moving, fo, mo)
    loss.backward()
    assert torch.isfinite(loss) and 0 < stats["dice_loss"] < 1
    assert op.net.head.weight.grad.abs().sum() > 0 and op.log_tau.grad is not None
    loss_no_labels, _ = TrainStep(op, cfg, lam=1.0)(fixed, moving)
    assert float(loss_no_labels.detach()) < float(loss.detach())  # the label term adds a positive loss


def test_register_runs_the_pyramid_a_model_stores(tmp_path):
    op, cfg = _hybrid(pyramid=[2, 1])
    cfg.max_steps = 10
    path = tmp_path / "hybrid.pt"
    save_checkpoint(path, op, cfg)
    s = _sample(size=48, seed=2)
    fixed, moving = Image(s["fixed"], np.eye(4)), Image(s["moving"], np.eye(4))
    model, update = resolve_model(str(path), None, 2)
    assert update == "hybrid"  # taken from the checkpoint, not assumed "learned"
    res = register(fixed, moving, update=update, model=model, device="cpu")
    levels = [t["level"] for t in res.trace if t["stage"] == "deformable"]
    assert set(levels) == {0, 1} and levels == sorted(levels)
    assert res.displacement.shape == (2, 48, 48)


def test_train_cli_stores_hybrid_settings_and_logs_the_label_loss(tmp_path):
    from Training import train

    out = tmp_path / "run"
    train.main(["--method", "deqreg", "--update", "hybrid", "--op-diffusion-weight", "0.4", "--pyramid", "2", "1",
                "--label-weight", "0.5", "--data", "synthetic", "--ndim", "2", "--shape", "32", "32",
                "--enc", "4", "8", "8", "--dec", "8", "8", "4", "--max-steps", "4", "--n-states", "2",
                "--phantom-k", "2", "--steps", "2", "--out", str(out), "--no-progress"])
    cfg = read_checkpoint(out / "last.pt")["config"]
    assert (cfg.update, cfg.diffusion_weight, cfg.pyramid, cfg.training.label_weight) == ("hybrid", 0.4, [2, 1], 0.5)
    assert (cfg.tau, cfg.sigma) == (1.0, 1.0)  # the operator's defaults without --tau / --sigma
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].endswith("dice_loss") and len(rows) == 3
    assert all(0 < float(r.split(",")[-1]) < 1 for r in rows[1:])


def test_train_cli_tau_and_sigma_start_the_hybrid_as_gradient_mode(tmp_path):
    """--tau/--sigma/--op-diffusion-weight at gradient mode's LNCC values: stored, and the step's tau starts there."""
    from Training import train

    out = tmp_path / "run"
    train.main(["--method", "deqreg", "--update", "hybrid", "--tau", "0.5", "--sigma", "1.5",
                "--op-diffusion-weight", "0.45", "--data", "synthetic", "--ndim", "2", "--shape", "32", "32",
                "--enc", "4", "8", "8", "--dec", "8", "8", "4", "--max-steps", "4", "--n-states", "1",
                "--phantom-k", "1", "--steps", "1", "--lr", "0", "--out", str(out), "--no-progress"])
    payload = read_checkpoint(out / "last.pt")
    cfg = payload["config"]
    assert (cfg.tau, cfg.sigma, cfg.diffusion_weight) == (0.5, 1.5, 0.45)
    op = build_operator(cfg)
    op.load_state_dict(payload["state_dict"])
    assert abs(float(op.log_tau.exp()) - 0.5) < 1e-6 and op.sigma == 1.5


def test_export_sets_inference_budget_and_drops_training_state(tmp_path):
    from Training import train

    op, cfg = _hybrid()
    src, dst = tmp_path / "last.pt", tmp_path / "model.pt"
    save_checkpoint(src, op, cfg, optimizer={"x": 1}, step=7)
    train.main(["export", str(src), str(dst), "--max-steps", "120", "--tol", "0.002"])
    payload = read_checkpoint(dst)
    assert "optimizer" not in payload
    cfg = payload["config"]
    assert (cfg.max_steps, cfg.tol) == (120, 0.002)
    assert cfg.training.optimizer_steps == 7
    assert cfg.trained_steps == 6  # what it was trained with stays on record


def test_level_solve_trains_on_the_pyramid_register_runs(tmp_path):
    """--level-solve: the coarse level is solved first (half the budget), the training grid's solve starts from
    its upsampled field, and a real optimiser step runs with finite gradients."""
    from Training import train
    from Training.methods import TrainStep

    def config(pyramid):
        return make_config("deqreg", 2, enc=(4, 8, 8), dec=(8, 8, 4), update="hybrid", diffusion_weight=0.5,
                           max_steps=8, n_states=2, phantom_k=1, pyramid=pyramid, level_solve=True, label_weight=1.0)

    cfg = config([2, 1])
    op = build_operator(cfg)
    fixed, moving = to_working_grid(_sample(size=32), 1, 32)
    z0, budget = TrainStep(op, cfg).start(fixed, moving)
    assert budget == 4 and z0.shape[1:] == (2, 32, 32) and z0.abs().max() > 0  # the coarse level moved it
    z_flat, b_flat = TrainStep(op, config([1])).start(fixed, moving)
    assert b_flat == 8 and z_flat.abs().max() == 0  # one level: zero start, whole budget
    out = tmp_path / "run"
    train.main(["--method", "deqreg", "--update", "hybrid", "--level-solve", "--pyramid", "2", "1", "--tau", "0.5",
                "--label-weight", "1", "--data", "synthetic", "--ndim", "2", "--shape", "32", "32",
                "--enc", "4", "8", "8", "--dec", "8", "8", "4", "--max-steps", "8", "--n-states", "2",
                "--phantom-k", "1", "--steps", "2", "--out", str(out), "--no-progress"])
    payload = read_checkpoint(out / "last.pt")
    assert payload["config"].training.level_solve is True
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values())
    rows = (out / "log.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2 and all(int(r.split(",")[4]) <= 4 for r in rows)  # solver steps: the fine level's share
