"""Real Slicer slice-view rendering of the live display (trame-slicer + slicer-layer-dm, offscreen).

A real registration (the library's gradient mode) runs through the module's
logic; every few steps the fixed volume is rendered with the warped volume
blended over it and with the folding map over it. The pictures must change
while the solver moves, change less and less, and stop changing once it has
converged (the final picture is the result's, and rendering again is identical).
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "scripts"), os.path.join(ROOT, "DEQRegistration"), ROOT]

pytest.importorskip("slicer")
pytest.importorskip("trame_slicer")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def rendered():
    import slicer
    import render_live_display as R
    from DEQRegistrationSlicerLib import testing

    renderer = R.LiveRenderer("Axial", size=(160, 160))
    shape = (1, 64, 64)  # one axial slice: the library's 2D path
    A = testing.centred_affine(shape, (1.0, 1.0, 2.0), 0.0, axis=(0, 0, 1))
    centres = np.array([[0.0, 0.0, 0.0], [12.0, -9.0, 0.0], [-10.0, 8.0, 0.0], [8.0, 12.0, 0.0]])
    f = testing.blob_function(centres, 5.0)
    slicer.mrmlScene = renderer.scene
    fixed = testing.add_sampled_volume(f, shape, A, "fixed")
    moving = testing.add_sampled_volume(lambda p: f(p - [4.0, -3.0, 0.0]), shape, A, "moving")
    frames, out = R.run(fixed, moving, renderer, every=4, maxSteps=120, update="gradient")
    again = renderer.render()
    return frames, out, again


def _diff(a, b):
    return float(np.mean(np.abs(np.concatenate(a).astype(float) - np.concatenate(b).astype(float))))


def test_frames_are_real_pictures(rendered):
    frames, _, _ = rendered
    assert len(frames) >= 4
    blend, folding = frames[-1][1]
    assert blend.shape == (160, 160, 3) and blend.std() > 5  # not a blank view
    assert folding.std() > 1


def test_pictures_change_then_settle_and_stop_at_convergence(rendered):
    frames, out, again = rendered
    r = out.result
    assert r.converged, "the synthetic pair should converge inside the budget"
    diffs = [_diff(frames[i][1], frames[i + 1][1]) for i in range(len(frames) - 1)]
    assert diffs[0] > 0.2 and diffs[0] == max(diffs), diffs  # the display follows the solver
    # ... and settles as it converges: the later changes are small next to the
    # first (a new level starts with a jump, as the field gains detail), and
    # the last frames within a level barely move (the final level may converge
    # within a step or two, so it can hold a single frame)
    levels = [r.trace[step - 1]["level"] for step, _ in frames]
    within = [d for d, lv0, lv1 in zip(diffs, levels, levels[1:]) if lv0 == lv1]
    assert within and within[-1] < 0.3 * diffs[0], (levels, diffs)
    assert max(diffs[len(diffs) // 2:]) < 0.5 * diffs[0], (levels, diffs)
    # the last picture is the result's: rendering it again changes nothing
    assert frames[-1][0] == r.steps
    assert _diff(frames[-1][1], again) == 0.0


def test_strip_and_gif_are_written(rendered, tmp_path):
    import render_live_display as R
    frames, _, _ = rendered
    R.compose_strip(frames[:3], str(tmp_path / "s.png"), str(tmp_path / "s.gif"), "test")
    from PIL import Image
    with Image.open(tmp_path / "s.png") as im:
        assert im.width == 3 * 160
    with Image.open(tmp_path / "s.gif") as im:
        assert im.n_frames >= 3
