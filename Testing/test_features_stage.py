"""MIND's full-resolution descriptors are reported as their own stage, "features", and Cancel works there.

Before the first deformable step, MIND-SSC computes each image's descriptors at
full resolution (``similarity.mind_ssc_pooled``): about 2 s an image for OASIS,
about a minute for a 512x512x304 CT on 2 cores. The callback sees that work
(stage "features", ``fraction`` 0-1, no solver step, no trace row) and can stop
it between slabs; the run then ends as a cancel in the alignment does: the
alignment reached, no deformation. Real registrations, nothing mocked; the
slab size is lowered (``chunked`` constants) so a small volume goes slab by
slab as a CT does.
"""
import json
import math

import numpy as np
import pytest
import torch

from DEQRegistrationLib import chunked, register
from DEQRegistrationLib import similarity as S
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.image import Image
from conftest import blob_volume, write_nifti

SHAPE = (24, 28, 20)


def pair():
    fixed = Image(blob_volume(SHAPE), np.diag([1.5, 1.2, 1.8, 1.0]))
    moving = Image(blob_volume(SHAPE, centre_shift=(1.5, -1.0, 1.0)), np.diag([1.5, 1.2, 1.8, 1.0]))
    return fixed, moving


def recorder(stop_at=None):
    """A callback keeping (stage, step, fraction); returns True (stop) at the first report meeting ``stop_at``."""
    seen = []

    def callback(p):
        seen.append((p.stage, p.step, p.fraction, p.residual, p.max_steps))
        return bool(stop_at and stop_at(p))

    return seen, callback


@pytest.fixture
def slabs(monkeypatch):
    """Volumes above 2000 voxels go slab by slab (slabs of about 600 voxels): several slabs per image here."""
    monkeypatch.setattr(chunked, "MIND_WHOLE_VOXELS", 2000)
    monkeypatch.setattr(chunked, "MIND_SLAB_VOXELS", 600)


def test_slab_progress_rises_to_one_and_a_raise_stops_between_slabs():
    image = torch.rand(1, 1, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    fractions = []
    S.mind_ssc_pooled(image, [2], chunk_voxels=4 * 12 * 10, on_progress=fractions.append)  # 4 slabs, 2 passes
    assert fractions == [k / 8 for k in range(1, 9)]
    whole = []
    S.mind_ssc_pooled(image, [2], on_progress=whole.append)
    assert whole == [1.0]

    class Stop(Exception):
        pass

    calls = []

    def stop_at_third(fraction):
        calls.append(fraction)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        S.mind_ssc_pooled(image, [2], chunk_voxels=4 * 12 * 10, on_progress=stop_at_third)
    assert len(calls) == 3  # nothing ran after the stop


@pytest.mark.parametrize("sliced", [False, True])
def test_mind_reports_the_features_stage_between_alignment_and_deformation(sliced, request):
    if sliced:
        request.getfixturevalue("slabs")
    fixed, moving = pair()
    plain = register(fixed, moving, preset="multimodal", max_steps=6, device="cpu")
    seen, callback = recorder()
    r = register(fixed, moving, preset="multimodal", max_steps=6, device="cpu", callback=callback)
    stages = [s[0] for s in seen]
    first_deformable = stages.index("deformable")
    features = [s for s in seen if s[0] == "features"]
    assert set(stages[:first_deformable]) == {"alignment", "features"}
    assert stages.index("features") > max(i for i, s in enumerate(stages) if s == "alignment")
    assert all(s == "deformable" for s in stages[first_deformable:])
    fractions = [s[2] for s in features]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
    if sliced:  # two passes over several slabs, for each image
        assert len(features) > 4
    else:       # one report per image
        assert len(features) == 2
    n_align = stages.count("alignment")
    assert all(s[1] == n_align and math.isnan(s[3]) for s in features)  # no solver step, no residual
    assert all(s[4] == n_align + r.plan.max_steps for s in features)    # the same budget as the next step shows
    # no trace row for it, and the result is the one without a callback
    assert [row["stage"] for row in r.trace] == [s for s in stages if s != "features"]
    np.testing.assert_array_equal(r.displacement, plain.displacement)


def test_lncc_has_no_features_stage():
    fixed, moving = pair()
    seen, callback = recorder()
    register(fixed, moving, max_steps=4, device="cpu", callback=callback)
    assert "features" not in {s[0] for s in seen}


@pytest.mark.parametrize("sliced", [False, True])
def test_cancel_during_the_features_stage_keeps_the_alignment_and_no_deformation(sliced, request):
    if sliced:
        request.getfixturevalue("slabs")
    fixed, moving = pair()
    seen, callback = recorder(stop_at=lambda p: p.stage == "features")
    r = register(fixed, moving, preset="multimodal", max_steps=6, device="cpu", callback=callback)
    assert r.cancelled and not r.converged
    assert [s[0] for s in seen].count("features") == 1      # stopped at the first report
    assert all(row["stage"] == "alignment" for row in r.trace) and r.steps == len(r.trace) > 0
    assert not np.any(r.displacement)
    # the alignment found is kept: the same W as a run that is not stopped
    assert not np.allclose(r.world, np.eye(4))
    full = register(fixed, moving, preset="multimodal", max_steps=6, device="cpu")
    np.testing.assert_allclose(r.world, full.world, atol=1e-6)


def test_cli_progress_bar_shows_the_descriptors(tmp_path, capsys):
    aff = np.diag([1.5, 1.2, 1.8, 1.0])
    f = write_nifti(tmp_path / "f.nii.gz", blob_volume(SHAPE), aff)
    m = write_nifti(tmp_path / "m.nii.gz", blob_volume(SHAPE, centre_shift=(1.5, -1.0, 1.0)), aff)
    out = tmp_path / "o"
    assert main(["register", str(f), str(m), "--out", str(out), "--similarity", "mind", "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "descriptors 100%" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4  # the descriptors are not counted as steps


def test_batch_bar_shows_the_descriptors_then_steps():
    """``deqreg batch``'s per-pair postfix: the descriptors' fraction (no NaN residual), then the steps."""
    import io

    from tqdm import tqdm

    from DEQRegistrationLib.batch import Pair, _compact
    from DEQRegistrationLib.registration import Progress

    out = io.StringIO()
    bar = tqdm(total=3, file=out, mininterval=0)
    show = _compact(bar, Pair(row=1, line=2, id="p7", files={}))
    show(Progress(4, 30, 0, 2, float("nan"), 1.0, "features", 0.5))
    bar.refresh()
    assert "p7 descriptors 50%" in out.getvalue() and "nan" not in out.getvalue()
    show(Progress(5, 30, 0, 2, 0.01, 1.5, "deformable"))
    bar.refresh()
    assert "p7 step 5/30 residual 1.0e-02" in out.getvalue()
