"""Registration on MRML nodes: inputs to the library, live display, outputs.

``RegistrationLogic.register`` is what the module's Register button and
scripted users call. It never modifies an input node, creates or reuses the
output nodes, updates them in place every ``refreshEvery`` solver steps
while ``DEQRegistrationLib.register()`` runs, and finally writes exactly the
library's result into them. GUI responsiveness comes from ``processEvents``,
called once per solver step; it is injected (``slicer.app.processEvents`` in
Slicer) so that this file needs no Qt and tests can count the calls.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import mrml

logger = logging.getLogger(__name__)


@dataclass
class RegistrationOutputs:
    """The nodes a registration wrote, plus the library result they came from."""
    warpedVolume: object
    transform: object
    foldingMap: object
    chart: object
    traceTable: object
    diceTable: object = None
    result: object = None
    dice: Optional[float] = None
    initialDice: Optional[float] = None
    foldingPercent: Optional[float] = None
    device: str = ""
    messages: list = field(default_factory=list)


def _format_seconds(s: float) -> str:
    s = max(0.0, float(s))
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def status_text(progress, elapsed: float) -> str:
    """One status line: step, residual, elapsed time and an estimate of the rest.

    The estimate assumes the whole step budget is used; the solver usually
    stops earlier when it converges, so it is an upper bound.
    """
    step, total = progress.step, progress.max_steps
    text = f"Step {step}/{total}, level {progress.level + 1}/{progress.n_levels}, " \
           f"residual {progress.residual:.2e}, {_format_seconds(elapsed)} elapsed"
    if total and step:
        text += f", at most {_format_seconds(elapsed / step * max(total - step, 0))} left"
    return text


def _is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class RegistrationLogic:
    """Qt-free registration logic on a MRML scene.

    processEvents: called once per solver step (keeps a GUI responsive).
    statusCallback(text, fraction): progress for a status line / bar.
    """

    def __init__(self, scene=None, processEvents: Optional[Callable[[], None]] = None,
                 statusCallback: Optional[Callable[[str, float], None]] = None):
        self._scene = scene
        self.processEvents = processEvents or (lambda: None)
        self.statusCallback = statusCallback or (lambda text, fraction: None)
        self._cancelRequested = False
        self.isRunning = False

    @property
    def scene(self):
        import slicer
        return self._scene if self._scene is not None else slicer.mrmlScene

    def cancel(self):
        """Ask a running registration to stop after the current step; its state is kept."""
        self._cancelRequested = True

    # --- output nodes -------------------------------------------------------------------

    def _output(self, node, className, name, inputs):
        if node is not None:
            if any(node is n or (n is not None and node.GetID() == n.GetID()) for n in inputs):
                raise ValueError(f"output {node.GetName()} is an input: choose another output node")
            if not node.IsA(className):
                raise ValueError(f"output {node.GetName()} is not a {className}")
            return node
        return self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))

    # --- main entry ------------------------------------------------------------------------

    def register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None, *,
                 maxSteps=None, tolerance=None, solver="anderson", update="gradient", model=None,
                 device="auto", refreshEvery=5, callback=None,
                 outputVolume=None, outputTransform=None, outputFolding=None, outputChart=None):
        """Register moving to fixed; return a ``RegistrationOutputs`` with the output nodes.

        callback(progress) is the library's callback (``DEQRegistrationLib.Progress``),
        called after the display update of each step; returning True stops the
        solver (as does ``cancel()``) and the state reached is the result.
        """
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise ValueError("select a fixed and a moving volume")
        if (fixedLabelsNode is None) != (movingLabelsNode is None):
            raise ValueError("give both fixed and moving labels (or neither) to report Dice")
        refreshEvery = max(1, int(refreshEvery or 1))
        inputs = [fixedVolumeNode, movingVolumeNode, fixedLabelsNode, movingLabelsNode]
        scene = self.scene
        messages = []

        # Inputs as library images, in world coordinates (parent transforms included).
        fixed_data, fixed_affine = mrml.volume_to_library(fixedVolumeNode, scene)
        moving_data, moving_affine = mrml.volume_to_library(movingVolumeNode, scene)
        fixed_labels = moving_labels = None
        if fixedLabelsNode is not None:
            order = mrml.segment_names(fixedLabelsNode) if fixedLabelsNode.IsA("vtkMRMLSegmentationNode") else None
            fixed_labels = mrml.labels_to_library(fixedLabelsNode, fixedVolumeNode, fixed_data.shape,
                                                  fixed_affine, order, scene)
            moving_labels = mrml.labels_to_library(movingLabelsNode, movingVolumeNode, moving_data.shape,
                                                   moving_affine, order, scene)

        # Heavy imports only now (never at module load).
        from DEQRegistrationLib.image import Image
        from DEQRegistrationLib.registration import register as deq_register
        from DEQRegistrationLib import metrics

        fixed = Image(fixed_data.astype(np.float32, copy=False), fixed_affine)
        moving = Image(moving_data.astype(np.float32, copy=False), moving_affine)

        # Outputs: created or reused, never an input.
        warpedNode = self._output(outputVolume, "vtkMRMLScalarVolumeNode",
                                  movingVolumeNode.GetName() + " warped", inputs)
        transformNode = self._output(outputTransform, "vtkMRMLGridTransformNode",
                                     movingVolumeNode.GetName() + " to " + fixedVolumeNode.GetName(), inputs)
        foldingNode = self._output(outputFolding, "vtkMRMLScalarVolumeNode", "DEQReg folding map", inputs)
        chartNode = self._output(outputChart, "vtkMRMLPlotChartNode", "DEQReg convergence", inputs)
        traceTable, diceTable = self._tables(chartNode, with_dice=fixed_labels is not None)
        mrml.setup_plot(scene, chartNode, traceTable, diceTable)

        initialDice = None
        live_labels = None
        if fixed_labels is not None:
            live_labels = _LabelWarper(moving_labels, fixed_affine, moving_affine)
            initialDice = metrics.mean_dice(fixed_labels, live_labels.warp(np.zeros((fixed.ndim,) + fixed.shape,
                                                                                      np.float32)))
            mrml.append_row(diceTable, {"step": 0, "dice": initialDice})
            messages.append(f"Dice before registration: {initialDice:.3f}")

        self._cancelRequested = False
        t0 = time.perf_counter()
        state = {"last": 0}

        def on_step(progress):
            elapsed = time.perf_counter() - t0
            mrml.append_row(traceTable, {"step": progress.step, "level": progress.level,
                                         "residual": progress.residual, "seconds": progress.seconds})
            if progress.step % refreshEvery == 0:
                disp = progress.displacement()
                self._showState(progress.warped(), disp, progress.jacobian(), fixed,
                                warpedNode, transformNode, foldingNode)
                if live_labels is not None:
                    d = metrics.mean_dice(fixed_labels, live_labels.warp(getattr(disp, "data", disp)))
                    mrml.append_row(diceTable, {"step": progress.step, "dice": d})
                state["last"] = progress.step
            fraction = progress.step / progress.max_steps if progress.max_steps else 0.0
            self.statusCallback(status_text(progress, elapsed), fraction)
            self.processEvents()
            stop = bool(callback(progress)) if callback is not None else False
            return stop or self._cancelRequested

        kwargs = dict(update=update, model=model, solver=solver, max_steps=maxSteps, tol=tolerance,
                      callback=on_step, moving_labels=moving_labels)
        self.isRunning = True
        try:
            result, used_device = self._run_with_fallback(deq_register, fixed, moving, device, kwargs, messages,
                                                          traceTable, diceTable, initialDice)
        finally:
            self.isRunning = False

        # Final state: exactly what register() returned.
        self._showState(result.warped.data, result.displacement, result.jacobian, fixed,
                        warpedNode, transformNode, foldingNode)
        outputs = RegistrationOutputs(warpedNode, transformNode, foldingNode, chartNode, traceTable, diceTable,
                                      result=result, initialDice=initialDice, device=str(used_device),
                                      messages=messages)
        outputs.foldingPercent = float(np.mean(np.asarray(result.jacobian) <= 0) * 100.0)
        if fixed_labels is not None and result.warped_labels is not None:
            outputs.dice = metrics.mean_dice(fixed_labels, result.warped_labels)
            if result.steps != state["last"]:
                mrml.append_row(diceTable, {"step": result.steps, "dice": outputs.dice})
        self._annotate(outputs, fixedVolumeNode, movingVolumeNode)
        summary = (f"{'Cancelled' if result.cancelled else 'Done'}: {result.steps} steps, "
                   f"residual {result.final_residual:.2e}, {'converged' if result.converged else 'not converged'}, "
                   f"{_format_seconds(result.seconds)} on {used_device}, {outputs.foldingPercent:.3f} % folded")
        if outputs.dice is not None:
            summary += f", Dice {initialDice:.3f} -> {outputs.dice:.3f}"
        messages.append(summary)
        self.statusCallback(summary, 1.0)
        logger.info(summary)
        return outputs

    def _run_with_fallback(self, deq_register, fixed, moving, device, kwargs, messages,
                           traceTable, diceTable, initialDice):
        """Run on the requested device; a missing GPU or CUDA out-of-memory falls back to CPU."""
        import torch
        if device in ("cuda", "gpu") and not torch.cuda.is_available():
            messages.append("No CUDA GPU available: running on CPU.")
            device = "cpu"
        try:
            result = deq_register(fixed, moving, device=device, cpu_fallback=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only OOM is retried, the rest re-raised
            if device == "cpu" or not _is_out_of_memory(exc):
                raise
            messages.append("GPU out of memory: running again on CPU.")
            self.statusCallback(messages[-1], 0.0)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            mrml.reset_table(traceTable, ["step", "level", "residual", "seconds"])
            if diceTable is not None:
                mrml.reset_table(diceTable, ["step", "dice"])
                mrml.append_row(diceTable, {"step": 0, "dice": initialDice})
            device = "cpu"
            result = deq_register(fixed, moving, device=device, cpu_fallback=False, **kwargs)
        return result, getattr(result, "device", device)

    def _tables(self, chartNode, with_dice):
        scene = self.scene
        trace = chartNode.GetNodeReference("DEQRegTraceTable")
        if trace is None:
            trace = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("DEQReg trace"))
            chartNode.SetNodeReferenceID("DEQRegTraceTable", trace.GetID())
        mrml.reset_table(trace, ["step", "level", "residual", "seconds"])
        dice = None
        if with_dice:
            dice = chartNode.GetNodeReference("DEQRegDiceTable")
            if dice is None:
                dice = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("DEQReg Dice"))
                chartNode.SetNodeReferenceID("DEQRegDiceTable", dice.GetID())
            mrml.reset_table(dice, ["step", "dice"])
        return trace, dice

    def _showState(self, warped, displacement, jacobian, fixed, warpedNode, transformNode, foldingNode):
        """Write one solver state into the output nodes, in place (their observers redraw)."""
        from DEQRegistrationLib.geometry import voxel_field_to_physical
        warped, displacement, jacobian = (np.asarray(getattr(a, "data", a)) for a in (warped, displacement, jacobian))
        mrml.update_volume(warpedNode, np.asarray(warped, dtype=np.float32), fixed.affine)
        mrml.update_grid_transform(transformNode, voxel_field_to_physical(displacement, fixed.affine),
                                   fixed.affine)
        first = foldingNode.GetImageData() is None
        mrml.update_volume(foldingNode, np.asarray(jacobian, dtype=np.float32), fixed.affine)
        if first or foldingNode.GetDisplayNode() is None:
            mrml.show_folding_colors(foldingNode)
        if warpedNode.GetDisplayNode() is None:
            warpedNode.CreateDefaultDisplayNodes()

    @staticmethod
    def _annotate(outputs, fixedNode, movingNode):
        r = outputs.result
        for node in (outputs.warpedVolume, outputs.transform, outputs.foldingMap):
            node.SetAttribute("DEQReg.fixed", fixedNode.GetID())
            node.SetAttribute("DEQReg.moving", movingNode.GetID())
            node.SetAttribute("DEQReg.steps", str(r.steps))
            node.SetAttribute("DEQReg.converged", str(bool(r.converged)))
        if outputs.dice is not None:
            outputs.warpedVolume.SetAttribute("DEQReg.dice", f"{outputs.dice:.4f}")
        outputs.foldingMap.SetAttribute("DEQReg.foldingPercent", f"{outputs.foldingPercent:.4f}")


class _LabelWarper:
    """Warps moving labels (nearest) by a current displacement, for the live Dice.

    Uses the library's own warp through both affines, the same sampling the
    library's ``warp_labels`` uses for the final result.
    """

    def __init__(self, moving_labels, fixed_affine, moving_affine):
        import torch
        from DEQRegistrationLib.geometry import voxel_to_voxel_affine
        self.ndim = moving_labels.ndim
        self.labels = torch.as_tensor(np.asarray(moving_labels, dtype=np.float32))[None, None]
        self.f2m = torch.as_tensor(voxel_to_voxel_affine(fixed_affine, moving_affine, self.ndim), dtype=torch.float32)

    def warp(self, displacement):
        import torch
        from DEQRegistrationLib.transforms import warp
        with torch.no_grad():
            d = torch.as_tensor(np.asarray(displacement, dtype=np.float32))[None]
            out = warp(self.labels, d, mode="nearest", padding_mode="zeros", fixed_to_moving=self.f2m)
        return out[0, 0].round().to(torch.int64).numpy()
