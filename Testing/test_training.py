"""Training package: every method trains, loaders read the Learn2Reg layout, resume is exact,
DDP replicas stay identical, evaluation writes its tables. Tiny volumes: seconds each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from DEQRegistrationLib.checkpoint import load_operator
from Training import evaluate, train
from Training.data import FolderPairs, Learn2RegDataset, SyntheticPairs, build_source, to_working_grid
from DEQRegistrationLib.checkpoint import read_checkpoint
from Training.methods import METHODS, TrainStep, build_operator, make_config

REPO = Path(__file__).resolve().parents[1]


def _pair(ndim=2, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = SyntheticPairs((size,) * ndim, n_labels=6, label_scale=6, max_disp=2.0).sample(gen)
    return to_working_grid(s, 1, 8, prefactored=True)


@pytest.mark.parametrize("method", METHODS)
def test_method_step_has_finite_gradients(method):
    torch.manual_seed(0)
    cfg = make_config(method, 2, enc=(8, 8, 8), dec=(8, 8, 8), max_steps=6 if method == "deqreg" else 2,
                      unroll_steps=2, repeats=2, levels=(2, 1), final_init=1e-2)
    op = build_operator(cfg)
    fixed, moving = _pair()
    loss, stats = TrainStep(op, cfg)(fixed, moving)
    loss.backward()
    grads = [p.grad for p in op.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_deqreg_3d_step_reaches_the_network_and_lowers_the_loss():
    torch.manual_seed(0)
    cfg = make_config("deqreg", 3, enc=(4, 4, 4), dec=(4, 4, 4), max_steps=4, n_states=2, phantom_k=2,
                      final_init=1e-2)
    op = build_operator(cfg)
    fixed, moving = _pair(ndim=3, size=16)
    step = TrainStep(op, cfg)
    opt = torch.optim.AdamW(op.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, _ = step(fixed, moving)
        opt.zero_grad()
        loss.backward()
        assert float(op.net.head.weight.grad.abs().sum()) > 0  # the phantom gradient reaches the head
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_training_reduces_loss_on_a_fixed_pair():
    torch.manual_seed(0)
    cfg = make_config("voxelmorph", 2, enc=(8, 16, 16), dec=(16, 16, 8), final_init=1e-2)
    op = build_operator(cfg)
    step = TrainStep(op, cfg, lam=0.1)
    fixed, moving = _pair(seed=3)
    opt = torch.optim.AdamW(op.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss, _ = step(fixed, moving)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.02


def test_synthetic_generator_2d_3d_deterministic():
    for shape in ((40, 48), (16, 24, 32)):
        src = SyntheticPairs(shape)
        a = src.sample(torch.Generator().manual_seed(5))
        b = src.sample(torch.Generator().manual_seed(5))
        assert a["fixed"].shape == shape and a["moving_labels"].shape == shape
        assert np.array_equal(a["fixed"], b["fixed"]) and np.isfinite(a["moving"]).all()
        assert not np.array_equal(a["fixed_labels"], a["moving_labels"])  # it was deformed


def _write_nii(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


def make_learn2reg(root: Path, paired: bool, n: int = 3, shape=(16, 16, 16)) -> Path:
    """A miniature Learn2Reg task folder following the official layout."""
    rng = np.random.default_rng(0)
    name = "NLST" if paired else "OASIS"
    training = []
    for i in range(1, n + 1):
        for t in ((0, 1) if paired else (0,)):
            stem = f"{name}_{i:04d}_{t:04d}"
            img = rng.random(shape).astype(np.float32)
            lab = rng.integers(0, 4, shape).astype(np.uint8)
            _write_nii(root / "imagesTr" / f"{stem}.nii.gz", img)
            entry = {"image": f"./imagesTr/{stem}.nii.gz"}
            if paired:
                _write_nii(root / "masksTr" / f"{stem}.nii.gz", (lab > 0).astype(np.uint8))
                (root / "keypointsTr").mkdir(exist_ok=True)
                kp = rng.uniform(2, 13, (5, 3))
                np.savetxt(root / "keypointsTr" / f"{stem}.csv", kp, delimiter=",", fmt="%.4f")
                entry.update(mask=f"./masksTr/{stem}.nii.gz", keypoints=f"./keypointsTr/{stem}.csv")
            else:
                _write_nii(root / "labelsTr" / f"{stem}.nii.gz", lab)
                entry["label"] = f"./labelsTr/{stem}.nii.gz"
            training.append(entry)
    meta = {"name": name, "pairings": "paired" if paired else "unpaired", "tensorImageShape": {"0": list(shape)},
            "numTraining": len(training), "training": training}
    if paired:
        meta["training_paired_images"] = [{"fixed": f"./imagesTr/{name}_{i:04d}_0000.nii.gz",
                                           "moving": f"./imagesTr/{name}_{i:04d}_0001.nii.gz"} for i in range(1, n + 1)]
        meta["registration_val"] = [{"fixed": f"./imagesTr/{name}_{n:04d}_0000.nii.gz",
                                     "moving": f"./imagesTr/{name}_{n:04d}_0001.nii.gz"}]
    else:  # like Learn2Reg's OASIS: consecutive subjects, all of them also in "training"
        meta["registration_val"] = [{"fixed": f"./imagesTr/{name}_0001_0000.nii.gz",
                                     "moving": f"./imagesTr/{name}_0002_0000.nii.gz"},
                                    {"fixed": f"./imagesTr/{name}_0002_0000.nii.gz",
                                     "moving": f"./imagesTr/{name}_0003_0000.nii.gz"}]
    path = root / f"{name}_dataset.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def test_learn2reg_loader_paired_and_unpaired(tmp_path):
    js = make_learn2reg(tmp_path / "nlst", paired=True, n=5)
    ds = Learn2RegDataset(js)  # train: cases 1-3 (5 is the test case, 4 the validation case)
    assert len(ds.pairs) == 3 and ds.pairs[0][1].endswith("NLST_0001_0001.nii.gz")
    s = ds.sample(torch.Generator().manual_seed(0))
    assert s["fixed"].shape == (16, 16, 16) and s["fixed_keypoints"].shape == (5, 3) and "fixed_mask" in s
    assert [p[0][-18:] for p in Learn2RegDataset(js, split="val").pairs] == ["NLST_0004_0000.nii.gz"[-18:]]
    assert len(Learn2RegDataset(js, split="test").pairs) == 1

    js2 = make_learn2reg(tmp_path / "oasis", paired=False, n=7)
    ds2 = Learn2RegDataset(js2)
    assert len(ds2.pairs) == 6  # every ordered pair of the 3 training volumes (4, 5, 6; 1-3 test, 7 val)
    s2 = ds2.pair(0)
    assert s2["fixed_labels"].dtype == np.int32 and s2["moving_labels"].shape == (16, 16, 16)
    f, m = to_working_grid(s2, 2, 8)
    assert f.shape == (1, 1, 8, 8, 8) and 0 <= float(f.min()) and float(f.max()) <= 1


@pytest.mark.parametrize("paired", [False, True])
def test_learn2reg_splits_share_no_subject(tmp_path, paired):
    """The JSON's training list holds the registration_val subjects too: no subject may be in two splits."""
    js = make_learn2reg(tmp_path, paired=paired, n=12)
    from Training.data import learn2reg_subject
    seen = {}
    for split in ("train", "val", "test"):
        ds = Learn2RegDataset(js, split=split, n_val=2)
        seen[split] = {learn2reg_subject(x) for pair in ds.pairs for x in pair}
        if split != "test":
            assert seen[split] == ds.subjects[split]
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    assert len(seen["val"]) == 2 and seen["train"]
    # every subject of the task is somewhere: nothing silently dropped
    assert seen["train"] | seen["val"] | seen["test"] == {f"{i:04d}" for i in range(1, 13)}


def test_folder_loader_random_pairs(tmp_path):
    for i in range(3):
        _write_nii(tmp_path / f"sub{i}.nii.gz", np.random.default_rng(i).random((20, 24)).astype(np.float32))
        _write_nii(tmp_path / f"sub{i}_seg.nii.gz", np.zeros((20, 24), np.uint8))
    src = FolderPairs(tmp_path)
    assert len(src.files) == 3
    s = src.sample(torch.Generator().manual_seed(1))
    assert s["fixed"].shape == (20, 24) and not np.array_equal(s["fixed"], s["moving"])
    mixed = build_source("synthetic+folder", ndim=2, shape=(32, 32), folder=str(tmp_path), mix=0.5)
    kinds = {mixed.sample(torch.Generator().manual_seed(k))["prefactored"] for k in range(8)}
    assert kinds == {True, False}


def _train_args(out, steps, extra=()):
    return train.parse_args(["--method", "deqreg", "--data", "synthetic", "--shape", "32", "32", "--enc", "8", "8",
                             "8", "--dec", "8", "8", "8", "--max-steps", "6", "--lr", "1e-3", "--steps", str(steps),
                             "--save-every", "100", "--out", str(out), "--no-progress", *extra])


def test_resume_is_exact(tmp_path):
    train.train(_train_args(tmp_path / "full", 4))
    train.train(_train_args(tmp_path / "half", 2))
    train.train(_train_args(tmp_path / "half", 4, ["--resume"]))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the training checkpoint and its export both load for inference
    op, cfg = load_operator(str(tmp_path / "full" / "last.pt"), 2)
    train.export(tmp_path / "full" / "last.pt", tmp_path / "model.pt")
    assert "optimizer" not in torch.load(tmp_path / "model.pt", weights_only=True)
    log = (tmp_path / "half" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 5  # header + 4 steps, resume appended


def test_ddp_gloo_two_processes_keep_replicas_identical(tmp_path):
    """DEQReg back-propagates once per state inside a step (what DDP's reducer cannot take): the
    explicit gradient averaging must keep the two replicas identical while they draw different data."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "Training.train", "--method", "deqreg", "--max-steps", "4", "--data", "synthetic", "--shape",
           "32", "32", "--enc", "8", "8", "8", "--dec", "8", "8", "8", "--lr", "1e-2", "--steps", "3",
           "--out", str(out), "--no-progress", "--save-replicas", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0 = torch.load(out / "replica_rank0.pt", weights_only=True)
    r1 = torch.load(out / "replica_rank1.pt", weights_only=True)
    torch.manual_seed(0)  # the trainer's --seed: every rank starts from these weights
    init = build_operator(read_checkpoint(out / "last.pt")["config"]).state_dict()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(not torch.equal(r0[k], init[k]) for k in r0 if k in init)  # they did train
    ck = torch.load(out / "last.pt", weights_only=True)
    assert isinstance(ck["rng"], list) and len(ck["rng"]) == 2
    # the two ranks drew different data
    assert not torch.equal(ck["rng"][0]["data"], ck["rng"][1]["data"])


def test_evaluate_writes_tables_and_convergence(tmp_path):
    js = make_learn2reg(tmp_path / "oasis", paired=False, shape=(16, 16))
    model = tmp_path / "vm.pt"
    torch.manual_seed(0)
    cfg = make_config("unroll", 2, cnn_channels=4, cnn_layers=3, levels=(2, 1), repeats=1)
    from DEQRegistrationLib.checkpoint import save_checkpoint
    save_checkpoint(model, build_operator(cfg), cfg)
    hybrid = tmp_path / "gd.pt"
    gcfg = make_config("gradirn", 2, cnn_channels=4, cnn_layers=3, levels=(2, 1), repeats=1)
    save_checkpoint(hybrid, build_operator(gcfg), gcfg)
    out = tmp_path / "eval"
    evaluate.main(["table", "--models", "gradient", str(model), str(hybrid), "--json", str(js), "--out", str(out),
                   "--max-steps", "4", "--memory-shape", "16", "16"])
    md = (out / "table.md").read_text()
    assert "gradient" in md and "unroll" in md and "gradirn" in md and (out / "table.csv").is_file()
    rows = (out / "table.csv").read_text().splitlines()
    assert len(rows) == 4
    evaluate.main(["convergence", "--models", str(model), "--json", str(js), "--out", str(out),
                   "--multipliers", "0.5", "1", "2"])
    assert (out / "convergence.png").stat().st_size > 1000
    assert "trained steps" in (out / "convergence.md").read_text()
    tre_js = make_learn2reg(tmp_path / "nlst", paired=True, shape=(16, 16, 16))
    evaluate.main(["table", "--models", "gradient", "--json", str(tre_js), "--out", str(tmp_path / "e2"),
                   "--max-steps", "3"])
    assert "TRE" in (tmp_path / "e2" / "table.md").read_text()
    assert "-" != (tmp_path / "e2" / "table.csv").read_text().splitlines()[1].split(",")[12]


def test_learn2reg_validation_uses_the_val_split(tmp_path):
    js = make_learn2reg(tmp_path, paired=False, n=8)
    args = train.parse_args(["--method", "voxelmorph", "--data", "learn2reg", "--json", str(js), "--n-val", "2",
                             "--val-every", "1", "--out", str(tmp_path / "r")])
    loaders = train.validation_pairs(args)
    val = Learn2RegDataset(js, split="val", n_val=2)
    assert len(loaders) == len(val.pairs) == 2  # subjects 7 and 8, both directions
    np.testing.assert_array_equal(loaders[0]()["fixed"], val.pair(0)["fixed"])
