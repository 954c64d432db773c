"""The module's live layout rendered with real Slicer views (trame-slicer + slicer-layer-dm, offscreen).

A real registration (the library's gradient mode) runs through the module's
logic with the module's ``LiveLayout``; ``scripts/render_live_display.py``
plays Slicer's layout manager and event loop (it creates the views of the
module's layout description, polls like the QTimer and captures the views
after every refresh). Checks that the pictures are what the issue asks for:
the overlay shows misalignment as colour and turns grey as the solver aligns
the pair, and the folding map and the chart change between refreshes from
the first one on; the last picture is the result's and rendering it again
changes nothing.
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

SIZE = 192  # large enough for the chart's axes and curves to be legible in the saved pictures


@pytest.fixture(scope="module")
def rendered():
    import slicer
    import render_live_display as R
    from DEQRegistrationSlicerLib import testing

    renderer = R.LayoutRenderer(size=(SIZE, SIZE))
    shape = (1, 56, 56)  # one axial slice: the library's 2D path
    A = testing.centred_affine(shape, (1.0, 1.0, 2.0), 0.0, axis=(0, 0, 1))
    centres = np.array([[0.0, 0.0, 0.0], [12.0, -9.0, 0.0], [-10.0, 8.0, 0.0], [8.0, 12.0, 0.0]])
    # the blobs move apart and together (not one translation), so the folding map shows expansion and compression
    moved = centres + np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 0.0], [-3.0, 2.5, 0.0], [-2.0, -2.5, 0.0]])
    f, g = testing.blob_function(centres, 4.0), testing.blob_function(moved, 4.0)
    slicer.mrmlScene = renderer.scene
    fixed = testing.add_sampled_volume(f, shape, A, "fixed")
    moving = testing.add_sampled_volume(g, shape, A, "moving")
    to_labels = lambda h: lambda p: (h(p) > 0.4).astype(np.int16)  # noqa: E731
    fixedLabels = testing.add_sampled_volume(to_labels(f), shape, A, "fixed labels", "vtkMRMLLabelMapVolumeNode",
                                             np.int16)
    movingLabels = testing.add_sampled_volume(to_labels(g), shape, A, "moving labels", "vtkMRMLLabelMapVolumeNode",
                                              np.int16)
    # paced: the solver waits until each refresh is rendered (a GUI that keeps up), so every refresh is compared
    # init none: these pictures follow the deformable solver (the linear stage leaves the folding map uniform)
    frames, out, timing = R.run(renderer, fixed, moving, fixedLabels, movingLabels, refreshEvery=4, max_steps=40,
                                update="gradient", paced=True, init="none")
    again = renderer.render()
    return frames, out, again, renderer


def _diff(a, b):
    return float(np.mean(np.abs(a.astype(float) - b.astype(float))))


def _changed(a, b, levels):
    """How many pixels changed by more than ``levels`` (of 255) in some colour channel."""
    return int((np.abs(a.astype(int) - b.astype(int)).max(-1) > levels).sum())


def _colour(overlay):
    """How far the overlay is from grey: mean |green - magenta| over the lit pixels (green fixed, magenta warped)."""
    rgb = overlay.astype(float)
    lit = rgb.max(-1) > 40
    return float(np.mean(np.abs(rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2)[lit]))


def test_the_module_layout_is_what_is_rendered(rendered):
    from DEQRegistrationSlicerLib import layout
    frames, out, again, renderer = rendered
    assert renderer.live.isActive()
    assert renderer.names == [layout.OVERLAY_VIEW, layout.FOLDING_VIEW, layout.CHART_VIEW]
    for _, images in frames:
        assert len(images) == 3 and all(im.shape == (SIZE, SIZE, 3) for im in images)
    overlay, folding, chart = frames[-1][1]
    assert overlay.std() > 5 and folding.std() > 1 and chart.std() > 5  # not blank views


def test_every_refresh_from_the_first_reaches_the_views(rendered):
    frames, out, _, _ = rendered
    steps = [step for step, _ in frames]
    r = out.result
    assert steps == [0] + list(range(4, r.steps + 1, 4)) + [r.steps]  # the pair as given first, the result last


def test_misalignment_shows_as_colour_and_fades_as_the_pair_is_aligned(rendered):
    frames, out, _, _ = rendered
    overlay0, overlay_end = frames[0][1][0], frames[-1][1][0]
    green = (overlay0[..., 1].astype(int) - overlay0[..., 0]) > 60  # fixed only
    magenta = (overlay0[..., 0].astype(int) - overlay0[..., 1]) > 60  # warped only
    assert green.sum() > 30 and magenta.sum() > 30, (green.sum(), magenta.sum())
    assert _colour(overlay_end) < 0.5 * _colour(overlay0), (_colour(overlay0), _colour(overlay_end))
    assert out.dice > out.initialDice + 0.1


def test_folding_map_and_chart_change_between_refreshes(rendered):
    """Visibly: a change counts when a pixel moves by more than 10 % of the colour range, on 1 % of the view."""
    frames, out, again, _ = rendered
    visible = 0.01 * SIZE * SIZE
    for (s0, a), (s1, b) in zip(frames[:3], frames[1:3]):  # the first refreshes, where the solver moves most
        assert _changed(a[1], b[1], 10) > visible, ("folding map unchanged", s0, s1, _changed(a[1], b[1], 10))
        assert _changed(a[2], b[2], 25) > visible, ("chart unchanged", s0, s1, _changed(a[2], b[2], 25))
    # the chart grows at every refresh up to the result (the last frame repeats the last refresh's step)
    for (s0, a), (s1, b) in zip(frames[:-2], frames[1:-1]):
        assert _changed(a[2], b[2], 25) > 20, ("chart unchanged", s0, s1)
    # the folding map of the result is far from the identity's (expansion yellow, compression blue)
    assert _changed(frames[0][1][1], frames[-1][1][1], 25) > visible
    # the last picture is the result's: rendering again changes nothing
    for a, b in zip(frames[-1][1], again):
        assert _diff(a, b) == 0.0


def test_pictures_are_composed_into_the_readme_sheet_and_gif(rendered, tmp_path):
    import render_live_display as R
    frames, _, _, _ = rendered
    R.compose(frames[:3], str(tmp_path / "s.png"), str(tmp_path / "s.gif"), "test")
    from PIL import Image
    with Image.open(tmp_path / "s.png") as im:
        assert im.width == 3 * SIZE and im.height > 3 * SIZE
    with Image.open(tmp_path / "s.gif") as im:
        assert im.n_frames >= 3
