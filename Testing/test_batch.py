"""``deqreg batch``: the CSV, resume after a killed run, failure isolation, --jobs and two torchrun ranks.

Every registration here is a 32x32 slice with a two-step budget: what is
tested is which pairs run where and what is recorded, not accuracy.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, blob_labels, blob_volume, file_hash, write_nifti
from DEQRegistrationLib import batch, cli
from DEQRegistrationLib.cli import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_SOME_FAILED, main
from DEQRegistrationLib.errors import InputError

FAST = ["--max-steps", "2", "--device", "cpu"]
SHIFTS = [(0.0, 0.0), (2.0, -1.5), (1.0, 1.0), (-1.5, 2.0), (1.5, 0.5)]


@pytest.fixture
def cohort(tmp_path):
    """Five 32x32 slices with label maps in tmp_path/data; ``write(rows)`` makes a CSV there (relative paths)."""
    data = tmp_path / "data"
    data.mkdir()
    for i, shift in enumerate(SHIFTS):
        vol = blob_volume((32, 32), centre_shift=shift, radius=7.0)
        write_nifti(data / f"img{i}.nii.gz", vol[:, :, None])
        write_nifti(data / f"seg{i}.nii.gz", blob_labels(vol)[:, :, None])

    def write(rows, header="fixed,moving,fixed_seg,moving_seg", name="pairs.csv"):
        path = data / name
        path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
        return path

    def pair(f, m, pid=None):
        row = [f"img{f}.nii.gz", f"img{m}.nii.gz", f"seg{f}.nii.gz", f"seg{m}.nii.gz"]
        return ([pid] if pid is not None else []) + row

    return dict(dir=data, write=write, pair=pair)


def _summary(out):
    with open(out / batch.SUMMARY_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def _complete(folder):
    return (folder / "metrics.json").is_file() and (folder / "warped.nii.gz").is_file()


def _leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# --- the CSV -------------------------------------------------------------------------


def test_pairs_resolved_against_the_csv_folder_and_named(cohort, tmp_path, monkeypatch):
    path = cohort["write"]([["a", "img0.nii.gz", "img1.nii.gz"], ["", "sub/img0.nii.gz", "/abs/img2.nii.gz"]],
                           header="id,fixed,moving")
    monkeypatch.chdir(tmp_path)  # not the CSV's folder
    pairs = batch.read_pairs(path)
    assert [p.id for p in pairs] == ["a", batch.default_id(2, "sub/img0.nii.gz", "/abs/img2.nii.gz")]
    assert pairs[1].id == "0002_img0_img2"
    assert pairs[0].files["fixed"] == str(cohort["dir"] / "img0.nii.gz")
    assert pairs[1].files["fixed"] == str(cohort["dir"] / "sub" / "img0.nii.gz")
    assert pairs[1].files["moving"] == "/abs/img2.nii.gz"
    assert pairs[0].files["fixed_seg"] is None and set(pairs[0].files) == set(batch.PAIR_COLUMNS)
    assert [p.id for p in batch.read_pairs(path)] == [p.id for p in pairs]  # stable


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("fixed,mooving\na,b\n", "unknown column(s) 'mooving'"),
    ("fixed\na\n", "no moving column"),
    ("fixed,moving\na,\n", "line 2 has no moving image"),
    ("id,fixed,moving\nx,a,b\nx,c,d\n", "lines 2 and 3 have the same id 'x'"),
    ("id,fixed,moving\n../up,a,b\n", "cannot name an output folder"),
    ("id,fixed,moving\nsummary.csv,a,b\n", "cannot name an output folder"),
    ("fixed,moving\na,b,c\n", "line 2 has 3 fields"),
    ("fixed,moving\n", "no pairs"),
])
def test_bad_csv_is_one_error_line(tmp_path, capsys, text, message):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    assert main(["batch", str(path), "--out", str(tmp_path / "out")] + FAST) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("deqreg: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_masks_passed_through_only_when_register_takes_them(cohort, tmp_path):
    path = cohort["write"]([["img0.nii.gz", "img1.nii.gz", "m0.nii.gz", "m1.nii.gz"]],
                           header="fixed,moving,fixed_mask,moving_mask")
    defaults = batch.register_arguments()
    if "fixed_mask" not in defaults:
        with pytest.raises(InputError, match="column fixed_mask is not supported"):
            batch.read_pairs(path, supported=set(defaults))
    pair = batch.read_pairs(path)[0]  # every column is read when register takes it
    args = batch.pair_args(pair, tmp_path / "o", batch.check_options({}, defaults))
    assert args.fixed_mask == str(cohort["dir"] / "m0.nii.gz") and args.moving_mask == str(cohort["dir"] / "m1.nii.gz")


# --- options shared with register ---------------------------------------------------------


def test_register_options_are_batch_options():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    register, bat = sub.choices["register"], sub.choices["batch"]
    shared = [a for a in register._actions if a.option_strings and a.dest not in batch.PER_PAIR + ("help",)]
    assert shared and {a.dest for a in shared} <= {a.dest for a in bat._actions}
    for action in shared:  # the same definition, not a copy that can drift
        assert action in bat._actions
    for per_pair in (["--fixed-seg", "x"], ["--overwrite"]):
        with pytest.raises(InputError, match="unrecognized"):
            bat.parse_args(["p.csv", "--out", "o"] + per_pair)
    with pytest.raises(InputError, match="unknown option"):
        batch.check_options({"max_stepz": 3}, batch.register_arguments())
    with pytest.raises(InputError, match="set per pair"):
        batch.check_options({"fixed_seg": "x"}, batch.register_arguments())


# --- where pairs run ---------------------------------------------------------------------


def test_shard_covers_every_row_once():
    for n in range(0, 11):
        for world in range(1, 5):
            shares = [batch.shard(n, world, r) for r in range(world)]
            flat = sorted(i for s in shares for i in s)
            assert flat == list(range(n)), (n, world, shares)
            assert shares == [batch.shard(n, world, r) for r in range(world)]  # deterministic


def test_threads_split_among_workers():
    assert batch.threads_per_worker(2, cores=8, env={}) == 4
    assert batch.threads_per_worker(3, local_world=2, cores=8, env={}) == 1
    assert batch.threads_per_worker(4, cores=2, env={}) == 1
    assert batch.threads_per_worker(2, cores=8, env={"OMP_NUM_THREADS": "3"}) is None


def test_ranks_from_torchrun_environment():
    r = batch.Ranks({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert (r.world, r.rank, r.local_rank, r.local_world) == (4, 2, 0, 2)
    assert batch.Ranks({}).world == 1 and batch.Ranks({}).device("auto") == "auto"
    with pytest.raises(InputError):
        batch.Ranks({"WORLD_SIZE": "2", "RANK": "2"})


# --- runs ----------------------------------------------------------------------------------


def test_bad_pair_among_good_ones(cohort, tmp_path, capsys):
    path = cohort["write"]([cohort["pair"](0, 1, "good1"), ["bad", "img0.nii.gz", "missing.nii.gz", "", ""],
                            cohort["pair"](0, 2, "good2")], header="id,fixed,moving,fixed_seg,moving_seg")
    out = tmp_path / "out"
    code = main(["batch", str(path), "--out", str(out)] + FAST)
    captured = capsys.readouterr()
    assert code == EXIT_SOME_FAILED, captured.err
    rows = _summary(out)
    assert [(r["id"], r["status"]) for r in rows] == [("good1", "ok"), ("bad", "failed"), ("good2", "ok")]
    assert "missing.nii.gz" in rows[1]["error"] and "not found" in rows[1]["error"]
    assert "pair bad failed" in captured.err
    assert not (out / "bad").exists() and _complete(out / "good1") and _complete(out / "good2")
    # each ok row is that pair's metrics.json, and the table is over the ok pairs only
    metrics = [json.loads((out / pid / "metrics.json").read_text()) for pid in ("good1", "good2")]
    for row, m in zip((rows[0], rows[2]), metrics):
        assert float(row["dice_after"]) == pytest.approx(m["dice_mean"], rel=1e-5)
        assert int(row["steps"]) == m["steps"] and row["converged"] == str(m["converged"]).lower()
    summary = json.loads((out / batch.SUMMARY_JSON).read_text())
    assert summary["counts"] == {"ok": 2, "skipped": 0, "failed": 1, "not-run": 0}
    dice = [m["dice_mean"] for m in metrics]
    assert summary["metrics"]["dice_after"]["n"] == 2
    assert summary["metrics"]["dice_after"]["mean"] == pytest.approx(np.mean(dice), rel=1e-5)
    assert summary["metrics"]["dice_after"]["median"] == pytest.approx(np.median(dice), rel=1e-5)
    assert summary["failed"] == {"bad": rows[1]["error"]}
    assert "| dice_after | 2 |" in captured.out and "| dice_after | 2 |" in (out / batch.SUMMARY_MD).read_text()
    assert _leftovers(out) == []


def test_reused_id_with_other_images_is_refused(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    header = "id,fixed,moving,fixed_seg,moving_seg"
    assert main(["batch", str(cohort["write"]([cohort["pair"](0, 1, "p")], header)), "--out", str(out)] + FAST) == 0
    before = file_hash(out / "p" / "metrics.json")
    path = cohort["write"]([cohort["pair"](0, 2, "p")], header, name="edited.csv")
    assert main(["batch", str(path), "--out", str(out)] + FAST) == EXIT_SOME_FAILED
    row = _summary(out)[0]
    assert row["status"] == "failed" and "img1.nii.gz, not" in row["error"] and "another id" in row["error"]
    assert file_hash(out / "p" / "metrics.json") == before


KILL_SECOND_PAIR_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    from DEQRegistrationLib import cli
    real, calls = cli.write_outputs, []
    def write_then_die(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # half of the second pair's files, then SIGKILL: no cleanup can run
            (folder / "warped.nii.gz").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, *args, **kwargs)
    cli.write_outputs = write_then_die
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_resume_after_killed_run(cohort, tmp_path, capsys):
    path = cohort["write"]([cohort["pair"](0, m) for m in (1, 2, 3)])
    ids = [p.id for p in batch.read_pairs(path)]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILL_SECOND_PAIR_WHILE_WRITING, "batch", str(path),
                             "--out", str(out)] + FAST, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert _complete(out / ids[0])
    assert not (out / ids[1]).exists() and not (out / ids[2]).exists()  # no half-written pair folder
    assert any(name.startswith(f".{ids[1]}.partial-") for name in _leftovers(out))  # it was killed mid-write
    first = file_hash(out / ids[0] / "metrics.json")

    code = main(["batch", str(path), "--out", str(out)] + FAST)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 already done (skipped), 2 to register" in captured.err
    assert [(r["id"], r["status"]) for r in _summary(out)] == list(zip(ids, ["skipped", "ok", "ok"]))
    assert all(_complete(out / i) for i in ids)
    assert file_hash(out / ids[0] / "metrics.json") == first  # skipped, not redone
    assert _leftovers(out) == []  # the killed run's temporary folder and partial summaries are gone
    summary = json.loads((out / batch.SUMMARY_JSON).read_text())
    assert summary["metrics"]["dice_after"]["n"] == 3  # the skipped pair's metrics count in the table


def test_interrupt_keeps_finished_pairs_and_summary(cohort, tmp_path, capsys, monkeypatch):
    path = cohort["write"]([cohort["pair"](0, m) for m in (1, 2, 3)])
    ids = [p.id for p in batch.read_pairs(path)]
    out = tmp_path / "out"
    real, calls = cli.write_outputs, []

    def write_then_interrupt(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(cli, "write_outputs", write_then_interrupt)
    assert main(["batch", str(path), "--out", str(out)] + FAST) == EXIT_INTERRUPTED
    assert "run the same command again" in capsys.readouterr().err
    assert [r["status"] for r in _summary(out)] == ["ok", "not-run", "not-run"]
    assert _complete(out / ids[0]) and not (out / ids[1]).exists() and _leftovers(out) == []
    monkeypatch.setattr(cli, "write_outputs", real)
    assert main(["batch", str(path), "--out", str(out)] + FAST) == 0
    assert [r["status"] for r in _summary(out)] == ["skipped", "ok", "ok"]


def test_jobs_2_registers_in_worker_processes(cohort, tmp_path, capsys):
    path = cohort["write"]([cohort["pair"](0, m) for m in (1, 2, 3)])
    out = tmp_path / "out"
    code = main(["batch", str(path), "--out", str(out), "--jobs", "2"] + FAST)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 to register (2 process(es)" in captured.err
    rows = _summary(out)
    assert [r["status"] for r in rows] == ["ok"] * 3
    pids = {r["pid"] for r in rows}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2  # in workers, at most two of them
    assert all(_complete(out / r["id"]) for r in rows)


def _work_or_die(pair, marker):
    """A pool task (importable by spawned workers): dies like an OOM-killed process for the 'die' pair."""
    if pair.id == "die":
        os._exit(1)
    return dict(id=pair.id, status="ok", pid=os.getpid(), marker=marker)


def test_dead_worker_fails_its_pair_only():
    pairs = [batch.Pair(i + 1, i + 2, pid, {"fixed": "f", "moving": "m"}) for i, pid in enumerate(["a", "die", "b"])]
    rows = []
    batch.run_in_pool(pairs, 1, 1, _work_or_die, ("x",), rows.append)
    got = {r["id"]: r for r in rows}
    assert [got[i]["status"] for i in ("a", "die", "b")] == ["ok", "failed", "ok"]
    assert "worker process died" in got["die"]["error"]
    assert got["a"]["pid"] != got["b"]["pid"]  # a fresh pool took the rest


def test_two_torchrun_ranks_split_the_rows(cohort, tmp_path):
    rows = [cohort["pair"](0, m) for m in (1, 2, 3, 4)]
    rows.insert(1, ["img0.nii.gz", "missing.nii.gz", "", ""])  # row 2: rank 1's failure must not stop anything
    path = cohort["write"](rows)
    pairs = batch.read_pairs(path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "DEQRegistrationLib.cli", "batch", str(path), "--out", str(out)] + FAST,
                          env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode != 0  # a pair failed
    assert "rank 0/2: 3 of 5 pairs" in proc.stderr and "rank 1/2: 2 of 5 pairs" in proc.stderr, proc.stderr
    summary = _summary(out)
    assert [r["id"] for r in summary] == [p.id for p in pairs]  # every row once, in CSV order
    assert [r["status"] for r in summary] == ["ok", "failed", "ok", "ok", "ok"]
    for rank in (0, 1):
        mine = [r for r in summary if r["rank"] == str(rank)]
        assert [r["id"] for r in mine] == [pairs[i].id for i in batch.shard(len(pairs), 2, rank)]
        assert len({r["pid"] for r in mine}) == 1
    assert summary[0]["pid"] != summary[1]["pid"]  # two processes
    assert proc.stdout.count("5 pairs: 4 ok") == 1  # rank 0 alone printed the summary
    assert all(_complete(out / r["id"]) for r in summary if r["status"] == "ok")
    assert _leftovers(out) == []
