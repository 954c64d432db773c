"""Large-volume behaviour on small volumes (issue 14): preview, memory preflight, the early-written field."""
import numpy as np

from DEQRegistrationLib import Image, chunked, cli, memory, register

from conftest import blob_volume, oblique_affine


def _content(path) -> bytes:
    """A file's bytes, decompressed for .gz (the gzip header holds a name and a time)."""
    import gzip

    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def test_preview_matches_the_full_refresh():
    f = Image(blob_volume((40, 36, 32)), oblique_affine())
    m = Image(blob_volume((40, 36, 32), (1.5, 0, 0)), oblique_affine())
    seen = {}

    def callback(p):
        if p.step == 3:
            whole = p.preview(max_voxels=10 ** 9)  # step 1: the full refresh's numbers, to float rounding
            seen["field"] = np.abs(whole.displacement - p.displacement()).max()
            seen["warped"] = np.abs(whole.warped - p.warped()).max()
            seen["jacobian"] = np.abs(whole.jacobian - p.jacobian()).max()
            small = p.preview(max_voxels=5000)
            assert small.warped.size <= 5000 and small.step[0] > 1
            region = tuple(slice(None, None, s) for s in small.step)
            seen["lattice"] = np.abs(small.warped - p.warped()[region]).max()
            # the preview's affine puts its voxel (1, 1, 1) where the fixed grid's voxel (step, step, step) is
            vox = np.array(small.step + (1,), dtype=float)
            np.testing.assert_allclose(small.affine @ [1, 1, 1, 1], f.affine @ vox, atol=1e-9)
            one = p.preview(region=(slice(10, 11), slice(None), slice(None)), max_voxels=10 ** 9)
            seen["slice"] = np.abs(one.warped - p.warped()[10:11]).max()
        return p.step >= 3

    # init none: the preview's field is the deformation, displacement() the whole transform (equal without W)
    register(f, m, callback=callback, max_steps=5, pyramid=(4, 2), init="none")
    assert max(seen.values()) < 1e-5, seen


def test_preview_maps_through_the_alignment_in_both_stages():
    """With the linear stage on, the preview warps through the current W, during the alignment and after it."""
    f = Image(blob_volume((40, 36, 32)), oblique_affine())
    m = Image(blob_volume((40, 36, 32), (3.0, -2.0, 1.0)), oblique_affine())
    seen = {}

    def callback(p):
        if p.stage not in seen or p.stage == "deformable":
            seen[p.stage] = np.abs(p.preview(max_voxels=10 ** 9).warped - p.warped()).max()
        return False

    res = register(f, m, callback=callback, max_steps=4, pyramid=(4, 2), init="rigid")
    assert not np.allclose(res.world, np.eye(4)), "the pair needs a translation: W should move"
    assert set(seen) == {"alignment", "deformable"} and max(seen.values()) < 1e-4, seen


def test_memory_preflight_stops_with_the_numbers_and_a_way_out(pair3d, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "BASE_BYTES", 0)  # a tiny machine for a tiny pair: only the voxels count
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    args = ["register", str(pair3d["fixed"]), str(pair3d["moving"]), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deqreg: error: this registration needs about") and "\n" not in err
    assert "available" in err and "coarser voxels" in err and "--memory-check warn" in err
    assert not (tmp_path / "out").exists()
    # warn: the same numbers as a warning, and the registration runs
    assert cli.main(args + ["--memory-check", "warn", "--max-steps", "2"]) == 0
    assert "deqreg: warning: likely to run out of memory" in capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_estimate_fits_the_ct_sized_pair_in_40_bytes_per_voxel():
    shape = (512, 512, 300)
    fixed = Image(np.broadcast_to(np.float32(0), shape), np.diag([0.8, 0.8, 1.0, 1.0]))
    est = memory.estimate(shape, shape, "gradient", memory.working_voxels(fixed, "gradient"))
    assert est.need <= 40 * np.prod(shape)
    # MIND's full-resolution descriptors go slab by slab there: a bounded extra, not bytes per voxel
    mind = memory.estimate(shape, shape, "gradient", memory.working_voxels(fixed, "gradient"), similarity="mind")
    assert 0 < mind.need - est.need <= memory.MIND_BYTES_PER_VOXEL * chunked.MIND_SLAB_VOXELS


def test_field_written_early_gives_the_same_files(pair3d, tmp_path, monkeypatch, capsys):
    base = ["register", str(pair3d["fixed"]), str(pair3d["moving"]), "--max-steps", "4",
            "--fixed-seg", str(pair3d["fixed_seg"]), "--moving-seg", str(pair3d["moving_seg"])]
    assert cli.main(base + ["--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(memory, "SPILL_MIN_VOXELS", 0)
    assert cli.main(base + ["--out", str(tmp_path / "spilled")]) == 0
    for name in ("displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "folding_mask.nii.gz",
                 "warped_seg.nii.gz", "transform.json"):
        assert _content(tmp_path / "whole" / name) == _content(tmp_path / "spilled" / name), name
    assert not list(tmp_path.glob(".spilled.field-*"))  # the early file's folder is gone
