"""Render the module's live layout with real Slicer views, offscreen, while a real registration runs.

The module's own code does everything it does in Slicer: ``RegistrationLogic``
starts the solve in a worker thread, ``LiveLayout`` (the module's layout code)
switches the layout node to the live layout and puts the fixed, warped,
folding-map and chart nodes into its views, and ``RegistrationRun.poll()``
writes each refresh into the nodes on the main thread. This script only plays
the part of Slicer's layout manager and event loop: it creates the views of
the module's layout description (``layout.LAYOUT_XML``) with trame-slicer
(Slicer's own slice-view displayable managers, no Slicer application), draws
the plot view's chart with VTK's chart classes from the plot chart node (as
Slicer's plot view does; trame-slicer has no plot view), calls ``poll()``
like Slicer's QTimer, and captures the three views after every refresh.

    python scripts/render_live_display.py [--pair oasis3d|oasis2d|sample] [--out docs/images]

Writes live_display.png (refreshes stacked: overlay | folding map | chart),
live_display.gif (every refresh) and DEQReg.png-sized screenshot
(live_layout.png, the final layout) and prints how long the main thread was
busy at most (a poll, a render), which is what a GUI would freeze for.

Needs: pip install "trame-slicer[standalone]==2.0.0" slicer-core==5.11.0.6; on a
machine without a display: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri.
The OASIS pairs are read at run time from ../shared/data (never copied into
the repository); the sample pair comes from nilearn's wheel.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]


def _grab(render_window):
    import vtk
    from vtk.util import numpy_support
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    return arr.copy()


class ChartView:
    """Draws a plot view node's chart (series, colours, titles, log axis) with VTK charts, offscreen."""

    def __init__(self, scene, layoutName, size):
        import vtkmodules.vtkRenderingContextOpenGL2  # noqa: F401  (the chart's OpenGL back end)
        from vtkmodules.vtkViewsContext2D import vtkContextView
        self.scene, self.layoutName = scene, layoutName
        self.view = vtkContextView()
        self.view.GetRenderWindow().SetOffScreenRendering(1)
        self.view.GetRenderWindow().SetSize(*size)
        self.view.GetRenderer().SetBackground(1.0, 1.0, 1.0)

    def render(self):
        from vtkmodules.vtkChartsCore import vtkAxis, vtkChart, vtkChartXY
        scene = self.view.GetScene()
        scene.ClearItems()
        plotViewNode = next((n for n in self.scene.GetNodesByClass("vtkMRMLPlotViewNode")
                             if n.GetLayoutName() == self.layoutName), None)
        chartNode = plotViewNode.GetPlotChartNode() if plotViewNode is not None else None
        chart = vtkChartXY()
        scene.AddItem(chart)
        if chartNode is not None:
            chart.SetTitle(chartNode.GetTitle() or "")
            chart.SetShowLegend(bool(chartNode.GetLegendVisibility()))
            bottom = chart.GetAxis(vtkAxis.BOTTOM)
            bottom.SetTitle(chartNode.GetXAxisTitle() or "")
            if not chartNode.GetXAxisRangeAuto():
                bottom.SetBehavior(vtkAxis.FIXED)
                bottom.SetRange(*chartNode.GetXAxisRange())
            left = chart.GetAxis(vtkAxis.LEFT)
            left.SetTitle(chartNode.GetYAxisTitle() or "")
            left.SetLogScale(bool(chartNode.GetYAxisLogScale()))
            for n in range(chartNode.GetNumberOfPlotSeriesNodes()):
                series = chartNode.GetNthPlotSeriesNode(n)
                table = series.GetTableNode().GetTable() if series.GetTableNode() else None
                if table is None or table.GetNumberOfRows() == 0:
                    continue
                marker = series.GetMarkerStyle() != series.MarkerStyleNone
                plot = chart.AddPlot(vtkChart.LINE if table.GetNumberOfRows() > 1 else vtkChart.POINTS)
                plot.SetInputData(table, series.GetXColumnName(), series.GetYColumnName())
                plot.SetLabel(series.GetName())
                r, g, b = series.GetColor()
                plot.SetColor(int(255 * r), int(255 * g), int(255 * b), 255)
                plot.SetWidth(2.0)
                if marker:
                    plot.SetMarkerStyle(4)  # circles, like the series' marker
        self.view.GetRenderWindow().Render()
        return _grab(self.view.GetRenderWindow())


class LayoutRenderer:
    """Slicer's layout manager for the module's live layout, offscreen (see the module docstring)."""

    def __init__(self, size=(360, 360)):
        import slicer
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
        from trame_slicer.views.render_scheduler import NoScheduleRendering
        from DEQRegistrationSlicerLib import layout

        self.app = SlicerApp()
        slicer.mrmlScene = self.app.scene
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        # the MRML half of Slicer's layout manager: a layout node whose arrangement creates the view nodes
        self.layoutLogic = slicer.vtkMRMLLayoutLogic()
        self.layoutLogic.SetMRMLScene(self.app.scene)
        self.names, self.sliceViews = [], {}
        for element in ET.fromstring(layout.LAYOUT_XML).iter("view"):
            name = element.get("singletontag")
            self.names.append(name)
            if element.get("class") == "vtkMRMLSliceNode":  # created before the layout asks: reused by it
                view = self.app.view_manager.create_view(ViewLayoutDefinition.from_xml(ET.tostring(element)))
                view.set_scheduled_render(NoScheduleRendering())  # render when asked, as Slicer's views do
                view.render_window().SetSize(*size)
                view._update_slice_size()  # the slice node's size = the view's, as a resized slice widget sets it
                self.sliceViews[name] = view
        self.live = layout.LiveLayout(self.app.scene, self.app.app_logic)
        self.chartView = ChartView(self.app.scene, layout.CHART_VIEW, size)
        self.size = size

    @property
    def scene(self):
        return self.app.scene

    def render(self):
        """One RGB array per view of the layout, in the layout's order."""
        images = []
        for name in self.names:
            if name in self.sliceViews:
                view = self.sliceViews[name]
                view.render()
                images.append(_grab(view.render_window()))
            else:
                images.append(self.chartView.render())
        return images


def run(renderer, fixed, moving, fixedLabels=None, movingLabels=None, refreshEvery=5, paced=False, **settings):
    """Register with the module's logic and live layout; returns (frames [(step, [images])], outputs, timing).

    The loop is the GUI's: poll (what the QTimer does), render after every
    refresh that reached the nodes (what Slicer's views do), sleep until the
    worker posts. A GUI that falls behind shows the latest refresh and skips
    the ones it missed; with ``paced`` the solver waits at each refresh until
    it has been rendered (a GUI that keeps up), so every refresh is captured.
    ``timing``: the longest poll and render (after the first, which sets up
    OpenGL), in wall-clock and in main-thread CPU seconds (``time.thread_time``:
    what the GUI thread itself spends, whatever else the machine runs), and the
    longest interval between two polls.
    """
    from DEQRegistrationSlicerLib import RegistrationLogic
    logic = RegistrationLogic(scene=renderer.scene)
    rendered = set()

    def pace(progress):  # the solver's thread
        due = 0 if progress.step == 1 else progress.step if progress.step % refreshEvery == 0 else None
        deadline = time.monotonic() + 120
        while paced and due is not None and due not in rendered and time.monotonic() < deadline:
            time.sleep(0.002)

    job = logic.start(fixed, moving, fixedLabels, movingLabels, refreshEvery=refreshEvery,
                      liveLayout=renderer.live, callback=pace, **settings)
    frames, shown = [], 0
    timing = dict(poll=0.0, poll_cpu=0.0, render=0.0, render_cpu=0.0, longest_interval=0.0)
    last_poll = time.perf_counter()
    while True:
        t0, c0 = time.perf_counter(), time.thread_time()
        timing["longest_interval"] = max(timing["longest_interval"], t0 - last_poll)
        done = job.poll()
        t1, c1 = time.perf_counter(), time.thread_time()
        timing["poll"], timing["poll_cpu"] = max(timing["poll"], t1 - t0), max(timing["poll_cpu"], c1 - c0)
        if len(job.shownSteps) > shown:
            shown = len(job.shownSteps)
            frames.append((job.shownSteps[-1], renderer.render()))
            rendered.add(job.shownSteps[-1])
            if len(frames) > 1:  # the first render sets up the OpenGL contexts (once per view)
                timing["render"] = max(timing["render"], time.perf_counter() - t1)
                timing["render_cpu"] = max(timing["render_cpu"], time.thread_time() - c1)
        last_poll = time.perf_counter()
        if done:
            break
        job.waitForNews(0.05)
    if job.error is not None:
        raise job.error
    return frames, job.outputs, timing


def compose(frames, path_png, path_gif=None, title="", labels=("fixed (green) + warped (magenta)",
                                                               "folding map over fixed", "convergence")):
    """Rows of [overlay | folding | chart] (one row per chosen refresh), step numbers and view titles."""
    from PIL import Image, ImageDraw
    rows = []
    for step, images in frames:
        row = np.concatenate(images, axis=1)
        im = Image.fromarray(row)
        canvas = Image.new("RGB", (im.width, im.height + 20), (0, 0, 0))
        canvas.paste(im, (0, 20))
        draw = ImageDraw.Draw(canvas)
        x = 0
        for image, label in zip(images, labels):
            draw.text((x + 6, 4), f"step {step}: {label}", fill=(255, 255, 255))
            x += image.shape[1]
        rows.append(canvas)
    head = 22 if title else 0
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + head), (0, 0, 0))
    if title:
        ImageDraw.Draw(sheet).text((6, 5), title, fill=(255, 255, 255))
    y = head
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(path_png)
    if path_gif:
        rows[0].save(path_gif, save_all=True, append_images=rows[1:] + [rows[-1]] * 3, duration=350, loop=0)
    return sheet


def load_nifti(scene, path, name, labelmap=False):
    """A NIfTI file as a node (nibabel; slicer-core 5.11's archetype reader gives one-slice files two slices)."""
    import nibabel as nib
    import slicer
    import slicer.util
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    data = data.astype(np.int16) if labelmap else data.astype(np.float32)
    slicer.mrmlScene = scene
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), img.affine, name, cls)


def load_pair(renderer, pair, data_dir):
    scene = renderer.scene
    if pair == "sample":
        from DEQRegistrationSlicerLib.sampledata import loadSamplePair
        p = loadSamplePair(scene)
        return p.fixed, p.moving, p.fixedLabels, p.movingLabels, "MNI152 template and a deformed copy (nilearn)"
    d = os.path.join(data_dir, pair)
    if not os.path.isdir(d):
        sys.exit(f"data folder {d} not found (the shared OASIS data is read at run time)")
    if pair == "oasis3d":
        names = ("OAS1_0001_norm", "OAS1_0002_norm", "OAS1_0001_seg35", "OAS1_0002_seg35")
        what = "OASIS 3D pair, 35 labels"
    else:
        names = ("OAS1_0001_slice_norm", "OAS1_0002_slice_norm", "OAS1_0001_slice_seg24", "OAS1_0002_slice_seg24")
        what = "OASIS 2D slices, 24 labels"
    nodes = [load_nifti(scene, os.path.join(d, n + ".nii.gz"), n, labelmap="seg" in n) for n in names]
    return (*nodes, what)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=("oasis3d", "oasis2d", "sample"), default="oasis3d")
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images"))
    ap.add_argument("--refresh-every", type=int, default=5, help="the module's default")
    ap.add_argument("--rows", type=int, default=3, help="refreshes shown in the PNG (evenly picked)")
    ap.add_argument("--size", type=int, default=360)
    ap.add_argument("--paced", action="store_true",
                    help="capture every refresh (the solver waits for each render); the timing is then not the GUI's")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    renderer = LayoutRenderer(size=(args.size, args.size))
    fixed, moving, fl, ml, what = load_pair(renderer, args.pair, args.data)
    t0 = time.perf_counter()
    frames, out, timing = run(renderer, fixed, moving, fl, ml, refreshEvery=args.refresh_every, paced=args.paced)
    total = time.perf_counter() - t0
    # the pair as given (step 0), refreshes in between, the result
    pick = np.unique(np.linspace(0, len(frames) - 1, min(args.rows, len(frames))).round().astype(int))
    title = (f"{what}, gradient update at the module's defaults: Dice {out.initialDice:.3f} -> {out.dice:.3f}, "
             f"{out.foldingPercent:.2f} % folded, {out.result.steps} steps. The module's live layout, "
             f"every {args.refresh_every} steps")
    compose([frames[i] for i in pick], os.path.join(args.out, "live_display.png"),
            os.path.join(args.out, "live_display.gif"), title)
    from PIL import Image
    Image.fromarray(np.concatenate(frames[-1][1], axis=1)).save(os.path.join(args.out, "live_layout.png"))
    print("\n".join(out.messages))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(frames)} refreshes rendered in {total:.1f} s (load average {load:.1f} on {os.cpu_count()} CPUs). "
          f"Main thread, longest poll (writing a refresh into the nodes): {1000 * timing['poll']:.0f} ms wall, "
          f"{1000 * timing['poll_cpu']:.0f} ms CPU; longest render of the three views: "
          f"{1000 * timing['render']:.0f} ms wall, {1000 * timing['render_cpu']:.0f} ms CPU; longest interval "
          f"between two polls: {1000 * timing['longest_interval']:.0f} ms")
    print("wrote", os.path.join(args.out, "live_display.png"), "live_display.gif and live_layout.png")


if __name__ == "__main__":
    main()
