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
                 maxSteps=None, tolerance=None, solver=None, update="gradient", model=None,
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
        from DEQRegistrationLib.config import make_settings
        from DEQRegistrationLib.image import Image
        from DEQRegistrationLib.registration import register as deq_register
        from DEQRegistrationLib.sampling import Sampler
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
        if fixed_labels is not None:
            initialDice = metrics.mean_dice(fixed_labels, Sampler.between(fixed, moving).labels(moving_labels))
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
                if moving_labels is not None:
                    d = metrics.mean_dice(fixed_labels, progress.warp_labels(moving_labels))
                    mrml.append_row(diceTable, {"step": progress.step, "dice": d})
                state["last"] = progress.step
            fraction = progress.step / progress.max_steps if progress.max_steps else 0.0
            self.statusCallback(status_text(progress, elapsed), fraction)
            self.processEvents()
            stop = bool(callback(progress)) if callback is not None else False
            return stop or self._cancelRequested

        import torch
        if device in ("cuda", "gpu") and not torch.cuda.is_available():
            messages.append("No CUDA GPU available: running on CPU.")
            device = "cpu"
        settings = make_settings(update=update, model=model, solver=solver, max_steps=maxSteps, tol=tolerance,
                                 device=device)

        def on_fallback(message):
            """The library reruns on the CPU: start the live tables again."""
            messages.append(message)
            self.statusCallback(message, 0.0)
            mrml.reset_table(traceTable, ["step", "level", "residual", "seconds"])
            if diceTable is not None:
                mrml.reset_table(diceTable, ["step", "dice"])
                mrml.append_row(diceTable, {"step": 0, "dice": initialDice})

        self.isRunning = True
        try:
            result = deq_register(fixed, moving, settings, callback=on_step, moving_labels=moving_labels,
                                  on_fallback=on_fallback)
        finally:
            self.isRunning = False
        used_device = result.device

        # Final state: exactly what register() returned.
        self._showState(result.warped.data, result.total_displacement(), result.jacobian, fixed,
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
