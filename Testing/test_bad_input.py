"""Every bad input ends in one ``deqreg: error:`` line, a non-zero exit, no traceback and no output folder."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, blob_labels, blob_volume, write_nifti
from DEQRegistrationLib.cli import main


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def _assert_one_line_error(code, err, out_dir, match):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("deqreg: error: "), err
    assert match in lines[0], err
    assert "Traceback" not in err
    assert not out_dir.exists()
    # Nothing half-written beside it either.
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


def _make(tmp_path, name, data, affine=None, dtype=None):
    return write_nifti(tmp_path / name, data, affine, dtype)


def _bad_cases(tmp_path, pair3d):
    """(name, argv tail after 'register', expected message fragment)."""
    f, m = pair3d["fixed"], pair3d["moving"]
    vol = blob_volume()
    cases = {}
    cases["missing fixed"] = ([tmp_path / "nope.nii.gz", m], "file not found")
    cases["missing moving"] = ([f, tmp_path / "nope.nii"], "moving image: file not found")
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not gzip at all" * 10)
    cases["corrupt file"] = ([tmp_path / "garbage.nii.gz", m], "cannot read")
    (tmp_path / "notes.txt").write_text("hello")
    cases["not an image"] = ([f, tmp_path / "notes.txt"], "not an image file")
    cases["folder"] = ([tmp_path, m], "is a folder")
    cases["4D"] = ([_make(tmp_path, "4d.nii.gz", np.stack([vol, vol], -1)), m], "only 2D or 3D")
    cases["2D vs 3D"] = ([_make(tmp_path, "s.nii.gz", vol[:, :, 12:13]), m], "fixed image is 2D")
    cases["constant"] = ([f, _make(tmp_path, "c.nii.gz", np.full((24, 24, 24), 3.0, np.float32))], "constant")
    cases["all zero"] = ([_make(tmp_path, "z.nii.gz", np.zeros((24, 24, 24), np.float32)), m], "constant")
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    cases["NaN"] = ([f, _make(tmp_path, "nan.nii.gz", nan)], "NaN or infinite")
    inf = vol.copy()
    inf[0, 0, 0] = np.inf
    cases["inf"] = ([_make(tmp_path, "inf.nii.gz", inf), m], "NaN or infinite")
    cases["single voxel axis"] = ([_make(tmp_path, "thin.nii.gz", vol[:1]), m], "at least 2 voxels")
    seg = pair3d["fixed_seg"]
    cases["non-integer labels"] = ([f, m, "--fixed-seg", _make(tmp_path, "fs.nii.gz", vol), "--moving-seg",
                                   pair3d["moving_seg"]], "non-integer values")
    cases["label shape"] = ([f, m, "--fixed-seg", _make(tmp_path, "ss.nii.gz", blob_labels(vol)[:20]),
                            "--moving-seg", pair3d["moving_seg"]], "a label map must be on its image's grid")
    cases["negative labels"] = ([f, m, "--fixed-seg", seg, "--moving-seg",
                                _make(tmp_path, "neg.nii.gz", -blob_labels(vol).astype(np.int16))], "negative")
    cases["one seg only"] = ([f, m, "--fixed-seg", seg], "give both --fixed-seg and --moving-seg")
    (tmp_path / "a.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "b.csv").write_text("1,2,3\n")
    cases["landmark count"] = ([f, m, "--fixed-landmarks", tmp_path / "a.csv", "--moving-landmarks",
                               tmp_path / "b.csv"], "landmark counts differ")
    (tmp_path / "w.csv").write_text("1,2\n3,4\n")
    cases["landmark columns"] = ([f, m, "--fixed-landmarks", tmp_path / "w.csv", "--moving-landmarks",
                                 tmp_path / "w.csv"], "2 columns but the image is 3D")
    (tmp_path / "t.csv").write_text("1,2,3\n4,x,6\n")
    cases["landmark text"] = ([f, m, "--fixed-landmarks", tmp_path / "t.csv", "--moving-landmarks",
                              tmp_path / "a.csv"], "non-numeric")
    cases["missing model"] = ([f, m, "--model", tmp_path / "nope.pt"], "model file not found")
    cases["learned without model"] = ([f, m, "--model", "none", "--update", "learned"], "needs trained weights")
    cases["bad max steps"] = ([f, m, "--max-steps", "0"], "positive integer")
    cases["bad tol"] = ([f, m, "--tol", "nan"], "positive number")
    cases["bad solver"] = ([f, m, "--solver", "newton"], "invalid choice")
    # masks (issue 12): each refused before any work
    A = np.diag([1.5, 1.5, 1.5, 1.0])
    far = A.copy()
    far[:3, 3] = 1000.0
    cases["mask off the grid"] = ([f, m, "--fixed-mask", _make(tmp_path, "far.nii.gz", np.ones((24, 24, 24)), far,
                                                                np.uint8)], "does not overlap")
    cases["empty mask"] = ([f, m, "--moving-mask", _make(tmp_path, "e.nii.gz", np.zeros((24, 24, 24)), A,
                                                         np.uint8)], "is empty")
    tiny = np.zeros((24, 24, 24), np.uint8)
    tiny[10:12, 10:12, 10:12] = 1
    cases["mask gone at a level"] = ([f, m, "--fixed-mask", _make(tmp_path, "tiny.nii.gz", tiny, A)],
                                     "voxel(s) at pyramid level")
    cases["2D mask for 3D"] = ([f, m, "--fixed-mask", _make(tmp_path, "m2.nii.gz", np.ones((24, 24, 1)), A,
                                                            np.uint8)], "cannot be mapped")
    cases["unknown similarity"] = ([f, m, "--similarity", "ssd"], "invalid choice")
    cases["unknown preset"] = ([f, m, "--preset", "knee"], "invalid choice")
    cases["unknown init"] = ([f, m, "--init", "deformable"], "invalid choice")
    return cases


CASE_NAMES = ["missing fixed", "missing moving", "corrupt file", "not an image", "folder", "4D", "2D vs 3D",
              "constant", "all zero", "NaN", "inf", "single voxel axis", "non-integer labels", "label shape",
              "negative labels", "one seg only", "landmark count", "landmark columns", "landmark text",
              "missing model", "learned without model", "bad max steps", "bad tol", "bad solver",
              "mask off the grid", "empty mask", "mask gone at a level", "2D mask for 3D", "unknown similarity",
              "unknown preset", "unknown init"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_one_line_error(tmp_path, pair3d, capsys, case):
    args, match = _bad_cases(tmp_path, pair3d)[case]
    out = tmp_path / "out"
    code, err = _run(capsys, ["register", *args, "--out", out])
    _assert_one_line_error(code, err, out, match)


def test_default_model_missing(tmp_path, pair3d, capsys, monkeypatch):
    import DEQRegistrationLib.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "MODELS_DIR", tmp_path / "models")
    out = tmp_path / "out"
    code, err = _run(capsys, ["register", pair3d["fixed"], pair3d["moving"], "--model", "default", "--out", out])
    _assert_one_line_error(code, err, out, "no default 3D model is installed")


def test_missing_subcommand_and_unknown_option(tmp_path, capsys):
    code, err = _run(capsys, [])
    assert code == 2 and err.startswith("deqreg: error:") and len(err.strip().splitlines()) == 1
    code, err = _run(capsys, ["register", "a", "b", "--out", tmp_path / "o", "--frobnicate"])
    assert code == 2 and "unrecognized arguments: --frobnicate" in err and len(err.strip().splitlines()) == 1


def test_a_run_failing_while_writing_leaves_inputs_and_the_previous_output_intact(tmp_path, pair3d, capsys,
                                                                                  monkeypatch):
    """The registration succeeds, then writing fails half-way (disk full, simulated): the inputs, the
    output folder of an earlier run (replaced only with --overwrite) and the directory stay as they were."""
    from conftest import file_hash
    from DEQRegistrationLib import io

    out = tmp_path / "o"
    args = ["register", pair3d["fixed"], pair3d["moving"], "--fixed-seg", pair3d["fixed_seg"], "--moving-seg",
            pair3d["moving_seg"], "--out", out, "--max-steps", "3"]
    assert _run(capsys, args)[0] == 0
    previous = {p.name: file_hash(p) for p in out.iterdir()}
    inputs = {p: file_hash(p) for p in (pair3d["fixed"], pair3d["moving"], pair3d["fixed_seg"], pair3d["moving_seg"])}
    written = []

    def disk_full(labels, affine, path, **options):
        written.append(path)  # the warped image and the field are already on disk by now
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(io, "save_labels", disk_full)
    code, err = _run(capsys, args + ["--overwrite", "--max-steps", "4"])
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("deqreg:")]
    assert code == 1 and len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err
    assert written, "the failure must happen while outputs are being written"
    assert {p.name: file_hash(p) for p in out.iterdir()} == previous
    assert {p: file_hash(p) for p in inputs} == inputs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o")) == []


@pytest.mark.parametrize("what", ["missing", "nan", "4d"])
def test_subprocess_no_traceback(tmp_path, pair3d, what):
    """The real entry point, in a fresh interpreter: exit 2, one line, no traceback."""
    vol = blob_volume()
    if what == "missing":
        moving = tmp_path / "missing.nii.gz"
    elif what == "nan":
        vol[2, 2, 2] = np.nan
        moving = _make(tmp_path, "nan.nii.gz", vol)
    else:
        moving = _make(tmp_path, "4d.nii.gz", np.stack([vol] * 3, -1))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("DEQREG_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "DEQRegistrationLib.cli", "register", str(pair3d["fixed"]),
                           str(moving), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("deqreg: error: moving image:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cuda_requested_without_gpu(tmp_path, pair3d, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so --device cuda is valid here")
    out = tmp_path / "out"
    code, err = _run(capsys, ["register", pair3d["fixed"], pair3d["moving"], "--device", "cuda", "--out", out])
    _assert_one_line_error(code, err, out, "no CUDA GPU is available")


def test_a_diverging_alignment_is_reported_and_the_identity_kept(tmp_path, pair3d, capsys, monkeypatch):
    """The alignment stage returns NaN (simulated): one warning line, the identity kept, finite outputs."""
    import json

    import torch

    from DEQRegistrationLib import alignment

    def diverge(self, kind, T, levels):
        return torch.full_like(T, float("nan"))

    monkeypatch.setattr(alignment.Aligner, "_stage", diverge)
    out = tmp_path / "out"
    code, err = _run(capsys, ["register", pair3d["fixed"], pair3d["moving"], "--out", out, "--max-steps", "3"])
    warnings = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("deqreg:")]
    assert code == 0 and warnings == ["deqreg: warning: the rigid alignment stage diverged (non-finite result); "
                                      "kept the identity"], err
    m = json.loads((out / "metrics.json").read_text())
    assert "Warning" not in err and m["affine"] == np.eye(4).tolist() and m["folding_percent"] is not None
    assert not (out / "affine.tfm").exists()  # the identity: the field alone is the transform
