"""Render the module's live display with real Slicer slice views, offscreen, to PNG/GIF.

Runs a real registration with the module's logic (``RegistrationLogic``) on a
real pair read at run time (default: ../shared/data/oasis2d, never copied into
the repository) and, every N solver steps, renders two Slicer slice views with
trame-slicer + slicer-layer-dm (Slicer's own displayable managers, no Slicer
application): the fixed volume blended with the warped volume, and the fixed
volume under the folding map. The frames become an image strip and a GIF.

    python scripts/render_live_display.py [--data ../shared/data/oasis2d] [--out docs/images]

Needs: pip install "trame-slicer[standalone]==2.0.0" slicer-core==5.11.0.6; on a
machine without a display: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "DEQRegistration"), ROOT]


class LiveRenderer:
    """Two offscreen Slicer slice views on one scene; ``render()`` returns an RGB array per view."""

    def __init__(self, orientation="Coronal", size=(320, 320)):
        import slicer
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

        self.app = SlicerApp()
        slicer.mrmlScene = self.app.scene
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.views = []
        for n, color in enumerate(("#F34A33", "#6EB04B")):
            layout = ViewLayoutDefinition.slice_view(orientation, label=f"DEQRegView{n + 1}", color=color)
            view = self.app.view_manager.create_view(layout)
            view.render_window().SetSize(*size)
            self.views.append(view)
        self.size = size

    @property
    def scene(self):
        return self.app.scene

    def show(self, fixed, warped, folding, warpedOpacity=0.5, foldingOpacity=0.8):
        """View 1: fixed + warped (blend); view 2: fixed + folding map."""
        blend, fold = self.views
        blend.set_background_volume_id(fixed.GetID())
        blend.set_foreground_volume_id(warped.GetID())
        blend.set_foreground_opacity(warpedOpacity)
        fold.set_background_volume_id(fixed.GetID())
        fold.set_foreground_volume_id(folding.GetID())
        fold.set_foreground_opacity(foldingOpacity)
        for view in self.views:
            view.fit_view_to_content()

    def render(self):
        import vtk
        from vtk.util import numpy_support
        images = []
        for view in self.views:
            view.render()
            grab = vtk.vtkWindowToImageFilter()
            grab.SetInput(view.render_window())
            grab.ReadFrontBufferOff()
            grab.Update()
            img = grab.GetOutput()
            w, h, _ = img.GetDimensions()
            arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
            images.append(arr.copy())
        return images


def load_volume(scene, path, name, labelmap=False):
    """Read a NIfTI file with nibabel into a volume node (array transposed to Slicer's (k, j, i)).

    nibabel rather than Slicer's archetype reader: on slicer-core 5.11 that
    reader returns two slices for these one-slice files.
    """
    import nibabel as nib
    import slicer.util
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    data = data.astype(np.int16) if labelmap else data.astype(np.float32)
    slicer.mrmlScene = scene
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), img.affine, name, cls)


def run(fixed, moving, renderer, every=5, maxSteps=60, fixedLabels=None, movingLabels=None, **kw):
    """Register with live rendering; returns (frames [(step, [view images])], outputs)."""
    from DEQRegistrationSlicerLib import RegistrationLogic
    scene = renderer.scene
    outputs = {"outputVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"),
               "outputTransform": scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "transform"),
               "outputFolding": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "folding map"),
               "outputChart": scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "convergence")}
    frames = []
    shown = {"done": False}

    def callback(progress):
        if progress.step % every == 0:  # the logic has just updated the output nodes in place
            if not shown["done"]:
                renderer.show(fixed, outputs["outputVolume"], outputs["outputFolding"])
                shown["done"] = True
            frames.append((progress.step, renderer.render()))

    logic = RegistrationLogic(scene=scene)
    out = logic.register(fixed, moving, fixedLabels, movingLabels, maxSteps=maxSteps, refreshEvery=every,
                         callback=callback, **outputs, **kw)
    if not shown["done"]:
        renderer.show(fixed, out.warpedVolume, out.foldingMap)
    frames.append((out.result.steps, renderer.render()))  # the final state, exactly register()'s result
    return frames, out


def compose_strip(frames, path_png, path_gif=None, title=""):
    """Frames side by side (two views stacked per column), step numbers on top."""
    from PIL import Image, ImageDraw
    cols = []
    for step, (a, b) in frames:
        col = np.concatenate([a, b], axis=0)
        im = Image.fromarray(col)
        canvas = Image.new("RGB", (im.width, im.height + 22), (0, 0, 0))
        canvas.paste(im, (0, 22))
        ImageDraw.Draw(canvas).text((6, 4), f"step {step}", fill=(255, 255, 255))
        cols.append(canvas)
    strip = Image.new("RGB", (sum(c.width for c in cols), cols[0].height + (20 if title else 0)), (0, 0, 0))
    if title:
        ImageDraw.Draw(strip).text((6, 4), title, fill=(255, 255, 255))
    x = 0
    for c in cols:
        strip.paste(c, (x, 20 if title else 0))
        x += c.width
    strip.save(path_png)
    if path_gif:
        cols[0].save(path_gif, save_all=True, append_images=cols[1:] + [cols[-1]] * 3, duration=400, loop=0)
    return strip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "oasis2d"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images"))
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--frames", type=int, default=5, help="columns in the strip (evenly picked)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        sys.exit(f"data folder {args.data} not found (the shared OASIS data is read at run time)")
    os.makedirs(args.out, exist_ok=True)
    renderer = LiveRenderer("Coronal", size=(300, 300))
    d = args.data
    fixed = load_volume(renderer.scene, os.path.join(d, "OAS1_0001_slice_norm.nii.gz"), "fixed")
    moving = load_volume(renderer.scene, os.path.join(d, "OAS1_0002_slice_norm.nii.gz"), "moving")
    fl = load_volume(renderer.scene, os.path.join(d, "OAS1_0001_slice_seg24.nii.gz"), "fixed labels", True)
    ml = load_volume(renderer.scene, os.path.join(d, "OAS1_0002_slice_seg24.nii.gz"), "moving labels", True)
    frames, out = run(fixed, moving, renderer, every=args.every, maxSteps=args.max_steps,
                      fixedLabels=fl, movingLabels=ml, update="gradient")
    pick = np.unique(np.linspace(0, len(frames) - 1, min(args.frames, len(frames))).round().astype(int))
    title = (f"OASIS 2D, gradient update: Dice {out.initialDice:.3f} -> {out.dice:.3f}, "
             f"{out.foldingPercent:.2f} % folded, {out.result.steps} steps. Top: fixed + warped; bottom: folding map")
    compose_strip([frames[i] for i in pick], os.path.join(args.out, "live_display.png"),
                  os.path.join(args.out, "live_display.gif"), title)
    print("\n".join(out.messages))
    print("wrote", os.path.join(args.out, "live_display.png"), "and live_display.gif")


if __name__ == "__main__":
    main()
