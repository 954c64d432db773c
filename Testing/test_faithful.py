"""DEQReg as the paper trains it, and the baselines as their papers describe them.

Each test can fail for the reason it names: streamed back-propagation must
give the same gradients as one backward with less graph alive; the stored
solver must be the one register() runs; the baselines must have the
structure their papers give them; the diffusion loss must be VoxelMorph's
scale. Tiny volumes, a few seconds each.
"""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from DEQRegistrationLib import losses
from DEQRegistrationLib.checkpoint import save_checkpoint
from DEQRegistrationLib.image import Image
from DEQRegistrationLib.operators import HybridUpdate, LevelStack, RecurrentUpdate
from DEQRegistrationLib.registration import register
from Training.data import Augment, SyntheticPairs, labels_to_working_grid, to_working_grid
from Training.methods import TrainStep, build_operator, make_config, repeats

TINY = dict(enc=(4, 8, 8), dec=(8, 8, 4), final_init=1e-2)


def _pair(ndim=2, size=32, seed=0, labels=False):
    gen = torch.Generator().manual_seed(seed)
    s = SyntheticPairs((size,) * ndim, n_labels=5, label_scale=6, max_disp=2.0).sample(gen)
    out = list(to_working_grid(s, 1, 8, prefactored=True))
    if labels:
        out += list(labels_to_working_grid(s, 1, 8, prefactored=True))
    return out


# --------------------------------------------------------------------------- losses


def test_diffusion_mean_is_voxelmorph_grad_l2_and_sum_is_unchanged():
    g = torch.Generator().manual_seed(0)
    for ndim in (2, 3):
        u = torch.randn(2, ndim, *([7] * ndim), generator=g, dtype=torch.float64)
        per_axis = [(torch.diff(u, dim=2 + a) ** 2) for a in range(ndim)]
        # VoxelMorph Grad('l2'): mean of the per-axis means (sum divided by ndim)
        expected = sum(d.mean() for d in per_axis) / ndim
        torch.testing.assert_close(losses.diffusion_loss(u), expected)
        # the classical gradient mode's energy: the total, not divided by ndim
        torch.testing.assert_close(losses.diffusion_loss(u, "sum"), sum(d.sum() for d in per_axis))


# --------------------------------------------------------------------------- DEQ: solver and memory


def test_deqreg_defaults_are_the_papers_fixed_point_configuration():
    cfg = make_config("deqreg", 2)
    assert cfg.solver == "fixed-point" and cfg.trained_steps == 48 and cfg.max_steps == 48
    step = TrainStep(build_operator(cfg), cfg)
    assert step.deq.solver == "fixed-point" and step.deq.phantom_k == 3 and step.deq.n_states == 4


def _grads(op):
    return [p.grad.clone() for p in op.parameters()]


@pytest.mark.parametrize("with_labels", [False, True])
def test_streamed_backward_gives_the_gradients_of_one_backward(with_labels):
    torch.manual_seed(0)
    cfg = make_config("deqreg", 2, max_steps=8, n_states=4, phantom_k=2, label_weight=0.5, **TINY)
    op = build_operator(cfg)
    step = TrainStep(op, cfg)
    data = _pair(size=16, labels=with_labels)
    loss, _ = step(*data)
    loss.backward()
    whole = _grads(op)
    op.zero_grad(set_to_none=True)
    value, _ = step.backward(*data)
    streamed = _grads(op)
    assert value == pytest.approx(float(loss.detach()), rel=1e-5)
    for a, b in zip(whole, streamed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in streamed)


class _LiveSaved:
    """Counts the bytes autograd holds for backward, live, and their peak (freed graphs release them)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        box = _Box(t)
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._free, n)
        return box

    def _free(self, n):
        self.live -= n

    @staticmethod
    def unpack(box):
        return box.t


class _Box:
    def __init__(self, t):
        self.t = t


def _peak_graph_bytes(run):
    counter = _LiveSaved()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        run()
    return counter.peak


def test_streamed_deq_peak_graph_is_one_states_flat_in_states_and_steps():
    torch.manual_seed(0)
    data = _pair(size=16)

    def peak(max_steps, n_states, streamed=True):
        cfg = make_config("deqreg", 2, max_steps=max_steps, n_states=n_states, phantom_k=3, **TINY)
        step = TrainStep(build_operator(cfg), cfg)
        if streamed:
            return _peak_graph_bytes(lambda: step.backward(*data))
        return _peak_graph_bytes(lambda: step(*data)[0].backward())

    one = peak(8, 1)
    assert peak(8, 4) == pytest.approx(one, rel=0.02)  # 4 states streamed: the peak of one
    assert peak(32, 4) == pytest.approx(one, rel=0.02)  # flat in the solver budget T
    assert peak(8, 4, streamed=False) > 3 * one  # holding all 4 graphs costs ~4x


def test_register_runs_the_solver_the_model_was_trained_with(tmp_path):
    torch.manual_seed(0)
    fixed, moving = (x[0, 0].numpy() for x in _pair(size=24, seed=2))
    out = {}
    for solver in ("fixed-point", "anderson"):
        cfg = make_config("deqreg", 2, max_steps=5, solver=solver, **TINY)
        op = build_operator(cfg)
        torch.nn.init.normal_(op.net.head.weight, 0, 0.05)  # a map that moves the field
        path = tmp_path / f"{solver}.pt"
        save_checkpoint(path, op, cfg)
        res = [register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), update="learned", model=str(path),
                        device="cpu", tol=0.0, solver=s).displacement for s in (None, "fixed-point", "anderson")]
        out[solver] = res
    fp_default, fp_fp, fp_and = out["fixed-point"]
    np.testing.assert_array_equal(fp_default, fp_fp)  # default = stored fixed-point
    assert np.abs(fp_default - fp_and).max() > 1e-4  # and the solvers really differ on this map
    and_default, _, and_and = out["anderson"]
    np.testing.assert_array_equal(and_default, and_and)


# --------------------------------------------------------------------------- baselines


def test_riir_is_six_single_resolution_steps_with_gradient_input_hidden_state_and_growing_weights():
    cfg = make_config("riir", 2, **TINY)
    op = build_operator(cfg)
    assert isinstance(op, RecurrentUpdate) and op.state_channels(2) == 2 + op.hidden > 2
    assert cfg.trained_steps == 6 and cfg.pyramid == [1]
    step = TrainStep(op, cfg)
    fixed, moving = _pair()
    states = step.states(fixed, moving)
    assert len(states) == 6 and states[0].shape[1] == 2 + op.hidden
    w = step.weights(6)
    assert all(b > a for a, b in zip(w, w[1:]))  # exponentially increasing
    torch.testing.assert_close(w[1:] / w[:-1], torch.full((5,), 1 / 0.8))
    # the gradient input matters: the same state with another moving image gives another update
    z = torch.zeros(1, op.state_channels(2), *fixed.shape[2:])
    torch.nn.init.normal_(op.net.head.weight, 0, 0.1)
    a, b = op(z, fixed, moving), op(z, fixed, moving.flip(-1))
    assert not torch.allclose(a, b)
    # the hidden state is carried: it changes after a step and feeds the next one
    assert float(a[:, 2:].detach().abs().sum()) > 0


def test_gradirn_has_a_network_and_a_tau_per_level_and_a_second_order_gradient():
    cfg = make_config("gradirn", 2, cnn_channels=8, final_init=1e-2)
    op = build_operator(cfg)
    assert isinstance(op, LevelStack) and len(op.levels) == 3 and cfg.pyramid == [4, 2, 1]
    assert repeats(cfg) == 3 and cfg.trained_steps == 9
    nets = [lv.net for lv in op.levels]
    assert len({id(n) for n in nets}) == 3 and all(type(n).__name__ == "ConvNet" for n in nets)
    assert all(isinstance(lv, HybridUpdate) and lv.second_order and lv.sigma == 0 for lv in op.levels)
    fixed, moving = _pair(size=16)
    TrainStep(op, cfg).backward(fixed, moving)
    for lv in op.levels:  # every level's own tau and network get a gradient
        assert lv.log_tau.grad is not None and float(lv.log_tau.grad.abs()) > 0
        assert float(lv.net.head.weight.grad.abs().sum()) > 0
    # second order: the similarity gradient itself is differentiated (its graph reaches the parameters)
    lv = op.levels[-1]
    z = torch.zeros(1, 2, *fixed.shape[2:], requires_grad=True)
    out = lv(z + 0.3, fixed, moving)
    (gz,) = torch.autograd.grad(out.sum(), z, create_graph=True)
    assert gz.requires_grad


def test_unroll_is_gradirn_without_the_similarity_gradient():
    cfg = make_config("unroll", 2, cnn_channels=8, final_init=1e-2)
    op = build_operator(cfg)
    assert isinstance(op, LevelStack) and len(op.levels) == 3 and cfg.pyramid == [4, 2, 1]
    assert not any(isinstance(lv, HybridUpdate) for lv in op.levels)
    fixed, moving = _pair()
    for lv in op.levels:
        torch.nn.init.zeros_(lv.net.head.weight)
    z = torch.zeros(1, 2, *fixed.shape[2:])
    assert torch.equal(op.for_level(2)(z, fixed, moving), z)  # no gradient step: a zero network is identity


def test_register_runs_each_level_with_its_own_network(tmp_path):
    torch.manual_seed(0)
    cfg = make_config("unroll", 2, cnn_channels=8, final_init=1e-2, levels=(2, 1), repeats=2)
    op = build_operator(cfg)
    fixed, moving = (x[0, 0].numpy() for x in _pair(size=32, seed=4))
    save_checkpoint(tmp_path / "a.pt", op, cfg)
    a = register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), update="learned", model=str(tmp_path / "a.pt"),
                 device="cpu").displacement
    torch.nn.init.zeros_(op.levels[0].net.head.weight)  # silence the coarse level only
    torch.nn.init.zeros_(op.levels[0].net.head.bias)
    save_checkpoint(tmp_path / "b.pt", op, cfg)
    b = register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), update="learned", model=str(tmp_path / "b.pt"),
                 device="cpu").displacement
    assert np.abs(a - b).max() > 1e-6 and np.abs(b).max() > 1e-6  # coarse level ran its own net; fine level still moves


# --------------------------------------------------------------------------- data


def test_augment_flips_pairs_jointly_and_is_reproducible():
    src = SyntheticPairs((24, 28), n_labels=5, label_scale=6)

    class Fixed:
        prefactored = False

        def sample(self, gen):
            return src.sample(torch.Generator().manual_seed(0))

    base = Fixed().sample(None)
    aug = Augment(Fixed(), flip_axes=(0,), rotate=10, scale=0.05, gamma=0.2)
    a = aug.sample(torch.Generator().manual_seed(3))
    b = aug.sample(torch.Generator().manual_seed(3))
    for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["fixed_labels"].dtype == base["fixed_labels"].dtype
    assert set(np.unique(a["fixed_labels"])) <= set(np.unique(base["fixed_labels"])) | {0}
    flip_only = Augment(Fixed(), flip_axes=(0,))
    flips = []
    for seed in range(8):
        s = flip_only.sample(torch.Generator().manual_seed(seed))
        flipped = np.array_equal(s["fixed_labels"], base["fixed_labels"][::-1])
        assert flipped or np.array_equal(s["fixed_labels"], base["fixed_labels"])
        # fixed, moving and both label maps are flipped together (the pair's correspondence is kept)
        assert np.array_equal(s["moving_labels"], base["moving_labels"][::-1] if flipped else base["moving_labels"])
        flips.append(flipped)
    assert any(flips) and not all(flips)


# --------------------------------------------------------------------------- training runs


def test_faithful_configuration_trains_on_a_small_3d_volume(tmp_path):
    """The paper's configuration as the CLI runs it (fixed-point T = 48, 4 states x k = 3, streamed
    backward), on 16^3: the weights move, the loss is finite, the model records what it was trained with."""
    from Training import train

    out = tmp_path / "deq3d"
    train.train(train.parse_args(["--method", "deqreg", "--data", "synthetic", "--ndim", "3", "--shape", "16", "16",
                                  "16", "--max-disp", "2", "--enc", "4", "4", "4", "--dec", "4", "4", "4", "--lr", "1e-2",
                                  "--steps", "2", "--out", str(out), "--no-progress", "--threads", "1"]))
    from DEQRegistrationLib.checkpoint import read_checkpoint

    ck = read_checkpoint(out / "last.pt")
    cfg = ck["config"]
    t = cfg.training
    assert (cfg.ndim, cfg.solver, cfg.trained_steps, t.phantom_k, t.n_states) == (3, "fixed-point", 48, 3, 4)
    init = build_operator(cfg).state_dict()
    assert any(not torch.equal(ck["state_dict"][k], init[k]) for k in init)
    rows = (out / "log.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2 and all(np.isfinite(float(r.split(",")[1])) for r in rows)
    # solver steps per row: at most T = 48; the freshly initialised network's output can be so small that the
    # solve meets the tolerance at once (its field is under the residual's 0.01-voxel floor), after one update
    # it runs the whole T
    steps = [int(r.split(",")[4]) for r in rows]
    assert all(1 <= s <= 48 for s in steps) and steps[-1] == 48, steps


def _labelled_folder(root, n=4, shape=(32, 40)):
    from Testing.conftest import write_nifti

    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        s = SyntheticPairs(shape, n_labels=4, label_scale=8, max_disp=2.0).sample(torch.Generator().manual_seed(i))
        write_nifti(root / f"sub-{i}_img.nii.gz", s["fixed"])
        write_nifti(root / f"sub-{i}_lab.nii.gz", s["fixed_labels"].astype(np.uint8))
    return root


def _subject_labels(folder, i):
    import nibabel as nib

    return np.asarray(nib.load(str(folder / f"sub-{i}_lab.nii.gz")).dataobj)


def test_training_on_labelled_subjects_validates_on_held_out_ones(tmp_path):
    """--subjects / --val-subjects: the label loss is used, a held-out subject is never trained on,
    val.csv has the Dice of register() on pairs with it, best.pt keeps the best."""
    from Training import train

    folder = _labelled_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = train.parse_args(["--method", "voxelmorph", "--data", "folder", "--folder", str(folder), "--glob",
                             "*_img.nii.gz", "--label-sub", "_img", "_lab", "--subjects", "1", "2", "3",
                             "--val-subjects", "4", "--val-every", "2", "--label-weight", "1", "--flip", "0",
                             "--enc", "4", "4", "4", "--dec", "4", "4", "4", "--steps", "4", "--out", str(out),
                             "--no-progress", "--threads", "1"])
    train.train(args)
    log = (out / "log.csv").read_text().strip().splitlines()
    assert all(r.split(",")[6] != "" for r in log[1:])  # the label loss was computed on every step
    val = [r.split(",") for r in (out / "val.csv").read_text().strip().splitlines()]
    assert [int(r[0]) for r in val] == [2, 4]
    assert all(0 < float(r[1]) <= 1 and 0 <= float(r[3]) <= 100 for r in val)
    assert (out / "best.pt").is_file()
    # a folding limit no validation can meet: nothing is selected
    args.out, args.steps, args.val_max_folding = str(tmp_path / "strict"), 2, -1.0
    train.train(args)
    assert not (tmp_path / "strict" / "best.pt").exists()
    assert (tmp_path / "strict" / "val.csv").read_text().strip().split(",")[2] == "0"
    pairs = train.validation_pairs(args)
    assert len(pairs) == 6  # 4 with 1..3, both directions
    fixed4 = [np.array_equal(p()["fixed_labels"], s4) for p in pairs for s4 in [_subject_labels(folder, 4)]]
    assert sum(fixed4) == 3  # subject 4 is the fixed image of three pairs (and the moving one of the others)
    args.val_subjects = ["3"]
    with pytest.raises(SystemExit):  # a subject in both sets is refused
        train.validation_pairs(args)


# --------------------------------------------------------------------------- evaluation


def test_label_sets_and_the_table_names_the_one_it_used(tmp_path):
    from Training import evaluate

    fixed = np.array([[0, 1, 1, 2], [0, 1, 3, 2]])
    moving = np.array([[0, 1, 2, 2], [0, 1, 2, 2]])
    warped = np.array([[0, 1, 1, 1], [0, 1, 1, 1]])
    assert evaluate.label_set("pair", fixed, moving, warped).tolist() == [1, 2]
    assert evaluate.label_set("fixed", fixed, moving, warped).tolist() == [1, 2, 3]
    assert evaluate.label_set("warped", fixed, moving, warped).tolist() == [1]
    assert evaluate.label_set("ids:2,3", fixed, moving, warped).tolist() == [2, 3]
    (tmp_path / "ids.txt").write_text("3\n1\n")
    assert evaluate.label_set(str(tmp_path / "ids.txt"), fixed, moving, warped).tolist() == [3, 1]
    with pytest.raises(ValueError):
        evaluate.label_set("present", fixed, moving, warped)

    folder = _labelled_folder(tmp_path / "data", n=2)
    evaluate.main(["table", "--models", "gradient", "--pairs-folder", str(folder), "--image-glob", "*_img.nii.gz",
                   "--label-sub", "_img", "_lab", "--max-steps", "3", "--label-set", "fixed", "--out", str(tmp_path / "t")])
    md = (tmp_path / "t" / "table.md").read_text()
    assert "label set: fixed (labels present in the fixed label map" in md


def test_ants_field_follows_this_librarys_convention():
    """The ANTs peer's field, applied with this library's warp, reproduces ANTs' own warped image."""
    pytest.importorskip("ants")
    from DEQRegistrationLib.transforms import warp
    from Training.peers import ants_register

    s = SyntheticPairs((48, 40), n_labels=5, label_scale=10, max_disp=3.0).sample(torch.Generator().manual_seed(1))
    r = ants_register(s["fixed"], s["moving"], s["moving_labels"], "ants-cc")
    assert r["displacement"].shape == (2, 48, 40) and np.abs(r["displacement"]).max() > 0.5
    ours = warp(torch.as_tensor(s["moving"])[None, None], torch.as_tensor(r["displacement"])[None])[0, 0].numpy()
    inner = (slice(3, -3), slice(3, -3))
    assert np.abs(ours - r["warped"])[inner].max() < 1e-3 * np.abs(r["warped"]).max()
    assert r["warped_labels"].shape == (48, 40) and r["warped_labels"].dtype == s["moving_labels"].dtype


def test_folding_penalty_is_zero_on_a_diffeomorphism_and_counts_folds():
    g = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij"))[None]
    smooth = 0.3 * g  # det J = 1.3^2 everywhere
    torch.testing.assert_close(losses.jacobian_determinant(smooth), torch.full((1, 11, 9), 1.69))
    assert float(losses.folding_loss(smooth)) == 0.0
    folded = smooth.clone()
    folded[:, 0, 4:6] = folded[:, 0, 4:6].flip(1) + 3.0  # rows 4 and 5 swap order along axis 0: det < 0 there
    assert float(losses.folding_loss(folded)) > 0
    # the training loss carries it with its weight
    fixed, moving = _pair(size=16)
    z = torch.zeros(1, 2, 16, 16)
    z[:, 0, 6:8] = torch.tensor([3.0, -3.0]).view(2, 1)  # row 6 moves down past row 7, which moves up: a fold
    with_penalty = make_config("voxelmorph", 2, fold_weight=10.0, **TINY)
    without = make_config("voxelmorph", 2, **TINY)
    a = TrainStep(build_operator(with_penalty), with_penalty).state_loss(z, fixed, moving)[0]
    b = TrainStep(build_operator(without), without).state_loss(z, fixed, moving)[0]
    assert float(losses.folding_loss(z)) > 0
    torch.testing.assert_close(a - b, 10.0 * losses.folding_loss(z))
