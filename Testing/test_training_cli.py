"""Training CLI options that change where a run starts and when it stops: --init and --time-limit."""
from __future__ import annotations

import torch

from DEQRegistrationLib.checkpoint import read_checkpoint
from Training import train

TINY = ["--data", "synthetic", "--ndim", "2", "--shape", "32", "32", "--enc", "4", "4", "4", "--dec", "4", "4", "4",
        "--no-progress", "--threads", "1"]


def _rows(run):
    return (run / "log.csv").read_text().strip().splitlines()[1:]


def test_init_starts_from_another_checkpoints_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # voxelmorph: the same U-Net as deqreg (unroll has a network per level since it follows GraDIRN)
    train.main(["--method", "voxelmorph", "--steps", "2", "--lr", "1e-2", "--out", str(a)] + TINY)
    # lr 0: AdamW changes nothing, so b's weights are exactly the ones it started from
    train.main(["--method", "deqreg", "--max-steps", "3", "--n-states", "1", "--phantom-k", "1", "--steps", "1",
                "--lr", "0", "--init", str(a / "last.pt"), "--seed", "5", "--out", str(b)] + TINY)
    wa, pb = read_checkpoint(a / "last.pt")["state_dict"], read_checkpoint(b / "last.pt")
    assert all(torch.equal(wa[k], pb["state_dict"][k]) for k in wa)
    assert pb["config"].training.init == str(a / "last.pt") and pb["config"].method == "deqreg"
    # without --init the same seed gives other weights (the test above is not vacuous)
    c = tmp_path / "c"
    train.main(["--method", "deqreg", "--max-steps", "3", "--n-states", "1", "--phantom-k", "1", "--steps", "1",
                "--lr", "0", "--seed", "5", "--out", str(c)] + TINY)
    wc = read_checkpoint(c / "last.pt")["state_dict"]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_time_limit_stops_early_and_saves_where_it_stopped(tmp_path):
    run = tmp_path / "t"
    # 1e-6 minutes: the limit is reached after the first optimiser step
    train.main(["--method", "voxelmorph", "--steps", "50", "--save-every", "100", "--time-limit", "1e-6",
                "--out", str(run)] + TINY)
    assert len(_rows(run)) == 1
    assert int(torch.load(run / "last.pt", weights_only=False)["step"]) == 1
    # and --resume continues from there
    train.main(["--method", "voxelmorph", "--steps", "3", "--out", str(run), "--resume"] + TINY)
    assert [r.split(",")[0] for r in _rows(run)] == ["1", "2", "3"]
