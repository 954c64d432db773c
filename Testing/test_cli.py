"""``deqreg register`` end to end: the output folder, metrics.json, overwrite and interruption rules."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import file_hash
from DEQRegistrationLib import cli
from DEQRegistrationLib.cli import main

OUTPUTS = {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "folding_mask.nii.gz", "warped_seg.nii.gz",
           "convergence.csv", "metrics.json", "transform.json", "affine.tfm"}  # affine.tfm: the alignment moved
METRIC_KEYS = {"dice_before", "dice_mean", "dice_per_label", "hd95", "folding_percent", "std_log_jacobian",
               "tre_mm", "tre_before_mm", "steps", "converged", "final_residual", "seconds", "device", "settings", "plan"}


def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def run3d(tmp_path_factory):
    """One small 3D registration with labels and landmarks, shared by the checks below."""
    import shutil

    from conftest import blob_labels, blob_volume, write_nifti

    d = tmp_path_factory.mktemp("run3d")
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    fixed, moving = blob_volume(), blob_volume(centre_shift=(1.5, -1.0, 1.0))
    paths = dict(fixed=write_nifti(d / "f.nii.gz", fixed, aff), moving=write_nifti(d / "m.nii.gz", moving, aff),
                 fixed_seg=write_nifti(d / "fs.nii.gz", blob_labels(fixed), aff),
                 moving_seg=write_nifti(d / "ms.nii.gz", blob_labels(moving), aff))
    # Landmarks at the blob centres: the moving blob is shifted by (1.5, -1, 1) voxels.
    (d / "fl.csv").write_text("11.5,11.5,11.5\n8,11.5,11.5\n")
    (d / "ml.csv").write_text("i,j,k\n13,10.5,12.5\n9.5,10.5,12.5\n")
    hashes = {k: file_hash(p) for k, p in paths.items()}
    out = d / "out"
    code = main(["register", str(paths["fixed"]), str(paths["moving"]), "--out", str(out),
                 "--fixed-seg", str(paths["fixed_seg"]), "--moving-seg", str(paths["moving_seg"]),
                 "--fixed-landmarks", str(d / "fl.csv"), "--moving-landmarks", str(d / "ml.csv"),
                 "--max-steps", "12", "--device", "cpu"])
    yield dict(code=code, out=out, paths=paths, hashes=hashes, dir=d)
    shutil.rmtree(d, ignore_errors=True)


def test_outputs_written(run3d):
    assert run3d["code"] == 0
    out = run3d["out"]
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert _leftovers(out) == []


def test_metrics_json(run3d):
    m = json.loads((run3d["out"] / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["steps"] == 12 and m["device"] == "cpu"
    assert set(m["dice_per_label"]) == {"1", "2"}
    assert m["dice_mean"] > m["dice_before"]
    assert m["tre_before_mm"] == pytest.approx(1.5 * np.sqrt(1.5 ** 2 + 1 + 1), rel=1e-6)
    assert m["tre_mm"] < m["tre_before_mm"]
    assert 0 <= m["folding_percent"] < 1
    assert m["settings"]["model"] is None and m["settings"]["update"] == "gradient"
    assert m["settings"]["max_steps"] == 12 and m["plan"]["max_steps"] == 12 and m["plan"]["solver"] == "anderson"


def test_output_files_formats(run3d):
    out = run3d["out"]
    disp = nib.load(str(out / "displacement.nii.gz"))
    assert disp.shape == (24, 24, 24, 1, 3)
    assert disp.get_data_dtype() == np.float32
    assert int(disp.header["intent_code"]) == 1007
    np.testing.assert_allclose(disp.affine, np.diag([1.5, 1.5, 1.5, 1.0]))

    jac = np.asarray(nib.load(str(out / "jacobian.nii.gz")).dataobj)
    mask = nib.load(str(out / "folding_mask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (jac <= 0).astype(np.uint8))

    seg = nib.load(str(out / "warped_seg.nii.gz"))
    assert np.issubdtype(seg.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    assert nib.load(str(out / "warped.nii.gz")).shape == (24, 24, 24)

    with open(out / "convergence.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "stage", "level", "residual", "seconds"]
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    stages = [r["stage"] for r in rows]
    assert stages.count("deformable") == 12 and stages == sorted(stages)  # alignment steps first
    secs = [float(r["seconds"]) for r in rows]
    assert secs == sorted(secs)


def test_displacement_matches_warped_labels(run3d):
    """The ITK files (field, then affine.tfm), read back, reproduce warped_seg.nii.gz: they are the ones used."""
    from DEQRegistrationLib import io
    from DEQRegistrationLib.sampling import Sampler

    out = run3d["out"]
    lps, aff = io.load_itk_displacement(out / "displacement.nii.gz")
    u = io.itk_displacement_to_voxel(lps, aff)
    W = io.load_itk_affine(out / "affine.tfm")
    moving = io.load_labels(run3d["paths"]["moving_seg"])
    ours = Sampler(moving.shape, aff, moving.affine, world=W).labels(moving.data, u)
    written = np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    assert np.mean(ours == written) > 0.999


def test_inputs_unchanged(run3d):
    assert {k: file_hash(p) for k, p in run3d["paths"].items()} == run3d["hashes"]


def test_existing_output_refused_then_overwritten(run3d, capsys):
    out, p = run3d["out"], run3d["paths"]
    before = file_hash(out / "metrics.json")
    args = ["register", str(p["fixed"]), str(p["moving"]), "--out", str(out), "--max-steps", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists; use --overwrite" in err and len(err.strip().splitlines()) == 1
    assert file_hash(out / "metrics.json") == before

    assert main(args + ["--overwrite"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["dice_mean"] is None and m["tre_mm"] is None
    assert {q.name for q in out.iterdir()} == OUTPUTS - {"warped_seg.nii.gz"}  # old files gone
    assert _leftovers(out) == []


def test_overwrite_refuses_foreign_folder(run3d, capsys):
    p = run3d["paths"]
    # The folder holding the inputs is not an output folder: --overwrite must not delete it.
    code = main(["register", str(p["fixed"]), str(p["moving"]), "--out", str(run3d["dir"]), "--overwrite"])
    assert code == 2
    assert "refusing to --overwrite" in capsys.readouterr().err
    assert p["fixed"].exists()


def test_interrupt_during_registration(pair3d, tmp_path, monkeypatch, capsys):
    """Ctrl-C at the second solver step (raised from the progress callback): exit 130, nothing written."""
    real = cli.ProgressBar.__call__

    def interrupt_at_step_2(self, p):
        real(self, p)
        if p.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressBar, "__call__", interrupt_at_step_2)
    out = tmp_path / "out"
    assert main(["register", str(pair3d["fixed"]), str(pair3d["moving"]), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and _leftovers(out) == []


def test_interrupt_while_writing_leaves_nothing(pair3d, tmp_path, monkeypatch, capsys):
    real = cli.write_outputs

    def write_then_interrupt(folder, *a, **k):
        real(folder, *a, **k)
        assert (folder / "metrics.json").exists()  # really half-way: files were there
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_outputs", write_then_interrupt)
    out = tmp_path / "out"
    code = main(["register", str(pair3d["fixed"]), str(pair3d["moving"]), "--out", str(out), "--max-steps", "2"])
    assert code == 130
    assert not out.exists() and _leftovers(out) == []


def test_2d_hw1_run(pair2d, tmp_path, capsys):
    out = tmp_path / "out2d"
    code = main(["register", str(pair2d["fixed"]), str(pair2d["moving"]), "--out", str(out),
                 "--fixed-seg", str(pair2d["fixed_seg"]), "--moving-seg", str(pair2d["moving_seg"]),
                 "--max-steps", "9", "--solver", "fixed-point"])
    assert code == 0, capsys.readouterr().err
    assert nib.load(str(out / "displacement.nii.gz")).shape == (32, 32, 1, 1, 3)
    assert nib.load(str(out / "warped.nii.gz")).shape == (32, 32, 1)
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["solver"] == m["plan"]["solver"] == "fixed-point"
    assert m["dice_mean"] > m["dice_before"]


def test_progress_bar_on_stderr(pair2d, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["register", str(pair2d["fixed"]), str(pair2d["moving"]), "--out", str(out), "--max-steps", "4"]) == 0
    captured = capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    total = m["steps"] + m["alignment_steps"]
    assert m["steps"] == 4 and "residual" in captured.err and f"{total}/{total}" in captured.err
    assert "level" not in captured.out and "wrote" in captured.out


def test_oasis2d_end_to_end(shared_data, tmp_path, capsys):
    """Real anatomy: OAS1_0001 (fixed) vs OAS1_0002 (moving), 24-label segmentations."""
    d = shared_data / "oasis2d"
    out = tmp_path / "oasis"
    paths = [d / "OAS1_0001_slice_norm.nii.gz", d / "OAS1_0002_slice_norm.nii.gz",
             d / "OAS1_0001_slice_seg24.nii.gz", d / "OAS1_0002_slice_seg24.nii.gz"]
    hashes = [file_hash(p) for p in paths]
    code = main(["register", str(paths[0]), str(paths[1]), "--fixed-seg", str(paths[2]), "--moving-seg", str(paths[3]),
                 "--out", str(out), "--max-steps", "30"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS - {"tre_mm", "tre_before_mm"} <= set(m)
    assert m["tre_mm"] is None  # no landmarks given
    assert len(m["dice_per_label"]) >= 20
    assert m["dice_mean"] > m["dice_before"] + 0.05
    assert m["folding_percent"] < 1.0
    assert np.isfinite(m["hd95"]) and np.isfinite(m["std_log_jacobian"])
    assert nib.load(str(out / "displacement.nii.gz")).shape == (160, 192, 1, 1, 3)
    assert [file_hash(p) for p in paths] == hashes


def test_demo_quick(tmp_path, capsys):
    """The demo's whole path (nilearn template -> pair -> register -> outputs + PNG) with a tiny step budget."""
    pytest.importorskip("nilearn", reason="the demo needs nilearn (pip install 'deqreg[demo]')")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-steps", "3", "--device", "cpu"]) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert OUTPUTS | {"demo.png", "inputs"} <= names
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["dice_per_label"]) == {"1", "2", "3"}
    assert m["dice_before"] < 0.8  # the known deformation really moves the anatomy
    assert m["demo_true_field_error_before_mm"] > 1.0
    assert m["demo_true_field_error_mm"] < m["demo_true_field_error_before_mm"]
    assert m["steps"] == 3
    fixed = nib.load(str(out / "inputs" / "fixed.nii.gz"))
    np.testing.assert_allclose(np.linalg.norm(fixed.affine[:3, :3], axis=0), [2, 2, 2])
    assert _leftovers(out) == []


def test_demo_converges_at_default_settings(tmp_path, capsys):
    """``deqreg demo`` as a new user runs it: the alignment, then the deformable stage to its tolerance."""
    pytest.importorskip("nilearn", reason="the demo needs nilearn (pip install 'deqreg[demo]')")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["converged"] and m["final_residual"] < m["plan"]["tol"], (m["final_residual"], m["steps"])
    assert m["steps"] < m["plan"]["max_steps"]
    assert m["dice_mean"] > m["dice_before"] + 0.15
    assert m["folding_percent"] < 0.1


def test_pyramid_option_sets_the_deformable_levels(pair2d, tmp_path, capsys):
    """--pyramid F ... chooses the working grids (recorded in metrics.json); a fine-to-coarse list is one error line."""
    out = tmp_path / "levels"
    assert main(["register", str(pair2d["fixed"]), str(pair2d["moving"]), "--out", str(out), "--max-steps", "6",
                 "--pyramid", "4", "2", "1", "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["pyramid"] == [4, 2, 1] and [lv["factor"] for lv in m["plan"]["levels"]] == [4, 2, 1]
    capsys.readouterr()
    assert main(["register", str(pair2d["fixed"]), str(pair2d["moving"]), "--out", str(tmp_path / "bad"),
                 "--pyramid", "1", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deqreg: error:") and "coarse to fine" in err[0]
