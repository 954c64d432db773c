"""One registration in progress: the solve in a worker thread, the scene written on the main thread.

Threads and what they touch:

* **worker** (``threading.Thread``): runs ``DEQRegistrationLib.register()``
  (torch releases the GIL while it computes). After every solver step it
  posts a row (step, level, residual, seconds) to a queue; every
  ``refreshEvery`` steps it also computes a ``Frame`` (warped image,
  displacement in mm, Jacobian determinant, and Dice when labels are given).
  Frames go to a one-slot mailbox: a newer frame replaces one the main
  thread has not shown yet, so memory stays bounded and the views show the
  latest state; the Dice values go to the queue, so the chart keeps all of
  them. The worker never touches MRML.
* **main** (Slicer's GUI thread): ``poll()`` moves the queued rows into the
  plot tables and the latest frame into the output nodes, and reports
  status. In Slicer a ``QTimer`` calls ``tick()`` (``poll()``, then up to
  40 ms of waiting with the GIL released: Slicer's Python keeps the GIL on
  the main thread while Qt runs, so the worker runs while the main thread
  waits); scripted use and the tests call ``wait()``, which sleeps until the
  worker posts something and polls. Nothing here needs Qt, so all of it
  runs and is tested on ``slicer-core``.

``cancel()`` sets a flag the worker reads after every step (the library's
callback returns True), so a run stops at most one step after it. Closing
the scene (``StartCloseEvent``) or deleting an input or output node cancels
the run too: nothing is written into removed nodes, nothing is created in
the emptied scene, and the result is still returned with the reason.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import mrml

logger = logging.getLogger(__name__)

TRACE_COLUMNS = ["step", "level", "residual", "seconds"]
#: the library's stage identifiers (``Progress.stage``; a library without stages runs only the deformable one)
#: -> the words the status line shows; an unknown identifier is shown as it is
STAGE_LABELS = {"alignment": "Linear alignment", "features": "Image descriptors",
                "deformable": "Deformable registration"}
DICE_COLUMNS = ["step", "dice"]


@dataclass
class Inputs:
    """The input nodes and what the library registers, read from them on the main thread."""
    fixedNode: object
    movingNode: object
    fixedLabelsNode: object
    movingLabelsNode: object
    fixed: object                   # DEQRegistrationLib.Image, world (RAS) geometry
    moving: object
    fixedLabels: Optional[np.ndarray] = None
    movingLabels: Optional[np.ndarray] = None
    fixedMaskNode: object = None    # label map or segmentation: where the similarity may look (all non-zero)
    movingMaskNode: object = None
    fixedMask: Optional[np.ndarray] = None   # bool, on its volume's grid
    movingMask: Optional[np.ndarray] = None

    @property
    def nodes(self):
        return [n for n in (self.fixedNode, self.movingNode, self.fixedLabelsNode, self.movingLabelsNode,
                            self.fixedMaskNode, self.movingMaskNode) if n is not None]


@dataclass
class OutputNodes:
    """The nodes a run writes."""
    warpedVolume: object
    transform: object
    foldingMap: object
    chart: object
    traceTable: object
    diceTable: object = None

    @property
    def nodes(self):
        return [n for n in (self.warpedVolume, self.transform, self.foldingMap, self.chart, self.traceTable,
                            self.diceTable) if n is not None]


@dataclass
class RegistrationOutputs(OutputNodes):
    """The nodes a registration wrote, plus the library result they came from."""
    result: object = None
    dice: Optional[float] = None
    initialDice: Optional[float] = None
    foldingPercent: Optional[float] = None
    device: str = ""
    messages: list = field(default_factory=list)
    stopReason: Optional[str] = None  # why a run stopped early (cancel, scene closed, node deleted)


@dataclass
class Frame:
    """One solver state to show, made ready in the worker: Slicer (k, j, i) arrays on the fixed grid.

    The main thread then only copies them into the nodes (no transposing,
    no arithmetic: that is what keeps a poll short on large volumes).
    """
    step: int
    warped: np.ndarray              # (k, j, i) float32
    displacement: np.ndarray        # (k, j, i, 3) float32, RAS mm, FromParent direction
    jacobian: np.ndarray            # (k, j, i) float32
    affine: Optional[np.ndarray] = None  # the arrays' voxel-to-RAS when not the fixed grid's (a preview lattice)

    @classmethod
    def fromLibrary(cls, step, warped, displacementMm, jacobian, affine=None):
        return cls(step, mrml.library_to_kji(np.asarray(warped, np.float32)), mrml.field_to_kji(displacementMm),
                   mrml.library_to_kji(np.asarray(jacobian, np.float32)), affine)


#: fixed grids larger than this are shown live on a reduced lattice (``Progress.preview``), full size at the end:
#: on a CT-sized grid a full refresh costs about 57 solver steps, a preview a tenth of one (README, large volumes)
LIVE_FULL_MAX_VOXELS = 1 << 23


def previewFrame(progress, fixedAffine) -> Frame:
    """The current state on the preview lattice: warped image, folding map and the whole transform (the field,
    then the linear alignment W) at a fraction of a solver step's cost on any grid."""
    from DEQRegistrationLib.geometry import voxel_field_to_physical, voxel_to_physical_points
    pv = progress.preview()
    shape = pv.warped.shape
    u = voxel_field_to_physical(pv.displacement, fixedAffine)  # (*P, 3) RAS mm
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    p = voxel_to_physical_points(idx.astype(np.float64), pv.affine).reshape(shape + (3,))
    W = progress.world()
    total = (p + u) @ W[:3, :3].T + W[:3, 3] - p
    return Frame.fromLibrary(progress.step, pv.warped, total.astype(np.float32), pv.jacobian, pv.affine)


@dataclass
class _Done:
    result: object
    dice: Optional[float]
    foldingPercent: float
    final: Frame


def total_displacement_mm(result) -> np.ndarray:
    """The result's whole transform (deformation, then the linear alignment W) as one RAS-mm field on
    the fixed grid: what the one grid transform node holds."""
    from DEQRegistrationLib.geometry import voxel_field_to_physical
    return voxel_field_to_physical(result.total_displacement(), result.fixed_affine)


def format_seconds(s: float) -> str:
    s = max(0.0, float(s))
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def status_text(row: dict, elapsed: float) -> str:
    """One status line: stage, step, level, residual, elapsed time and an upper estimate of the rest.

    The estimate assumes the whole step budget is used; the solver usually
    stops earlier when it converges, so it is an upper bound.
    """
    step, total = row["step"], row["max_steps"]
    text = (f"{row['stage']}: step {step}/{total}, level {row['level'] + 1}/{row['n_levels']}, "
            f"residual {row['residual']:.2e}, {format_seconds(elapsed)} elapsed")
    if total and step:
        text += f", at most {format_seconds(elapsed / step * max(total - step, 0))} left"
    return text


def device_label(device: str) -> str:
    device = str(device)
    return "CPU" if device == "cpu" else f"GPU ({device})" if device.startswith("cuda") else device


class RegistrationRun:
    """A registration running in a worker thread; ``poll()`` (main thread) writes its progress into the scene."""

    def __init__(self, scene, inputs: Inputs, nodes: OutputNodes, settings, *, refreshEvery: int = 5,
                 callback: Optional[Callable] = None, statusCallback: Optional[Callable[[str, float], None]] = None,
                 liveLayout=None, messages=None):
        self.scene = scene
        self.inputs = inputs
        self.nodes = nodes
        self.settings = settings
        self.refreshEvery = max(1, int(refreshEvery or 1))
        self.callback = callback
        self.statusCallback = statusCallback or (lambda text, fraction: None)
        self.liveLayout = liveLayout
        self.messages = list(messages or [])
        # shared between the threads
        self._queue: "queue.Queue" = queue.Queue()
        self._frameLock = threading.Lock()
        self._frame: Optional[Frame] = None
        self._cancel = threading.Event()
        self._news = threading.Event()
        self.stepsDone = 0                   # written by the worker only
        # main thread only
        self.stopReason: Optional[str] = None
        self.finished = False
        self.error: Optional[BaseException] = None
        self.errorDetails = ""
        self.outputs: Optional[RegistrationOutputs] = None
        self.shownSteps = []                 # steps of the frames written into the nodes, in order
        self.initialDice: Optional[float] = None
        self._lastDiceStep = None
        self._thread: Optional[threading.Thread] = None
        self._observations = []
        self._t0 = None

    # --- control (main thread) ------------------------------------------------------------------

    def start(self):
        self._t0 = time.perf_counter()
        for event in (self.scene.StartCloseEvent,):
            self._observations.append((self.scene, self.scene.AddObserver(event, self._onSceneClose)))
        if self.liveLayout is not None:
            self.liveLayout.activate()
            self.liveLayout.show(self.inputs.fixedNode, self.inputs.movingNode, self.nodes.warpedVolume,
                                 self.nodes.foldingMap, self.nodes.chart)
        self.statusCallback("Starting the registration...", 0.0)
        self._thread = threading.Thread(target=self._work, name="DEQRegistration solver", daemon=True)
        self._thread.start()
        return self

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, reason: str = "cancelled"):
        """Stop after the current solver step; the state reached is the result."""
        if self.stopReason is None:
            self.stopReason = reason
        self._cancel.set()

    def poll(self) -> bool:
        """Write what the worker produced since the last call into the scene; True once the run is over."""
        if self.finished:
            return True
        try:
            self._checkNodes()
            done = None
            while True:
                try:
                    kind, payload = self._queue.get_nowait()
                except queue.Empty:
                    break
                if kind == "row":
                    self._applyRow(payload)
                elif kind == "features":
                    self._applyFeatures(payload)
                elif kind == "dice":
                    self._applyDice(*payload)
                elif kind == "fallback":
                    self._restartTables(payload)
                elif kind in ("done", "error"):
                    done = (kind, payload)
            with self._frameLock:
                frame, self._frame = self._frame, None
            if frame is not None and done is None:
                self._applyFrame(frame)
            if done is not None:
                self._finish(*done)
        except Exception as exc:  # a fault here must not leave the worker running unseen
            self.cancel("error")
            self._thread.join()
            self._finish("error", (exc, traceback.format_exc()))
        return self.finished

    def tick(self, yieldSeconds: float = 0.04) -> bool:
        """One turn of a GUI timer: ``poll()``, then give the worker the GIL for up to ``yieldSeconds``.

        Slicer's Python (PythonQt) keeps the GIL on the main thread while Qt
        runs its event loop, so a Python thread only runs while the main
        thread runs Python or waits. Waiting here (until the worker posts, at
        most ``yieldSeconds``) lets the solver run nearly all the time, and
        Qt's events wait at most that long. True once the run is over.
        """
        if self.poll():
            return True
        self.waitForNews(yieldSeconds)
        return False

    def waitForNews(self, timeout: float) -> bool:
        """Sleep until the worker posts something (or ``timeout`` seconds pass); for event loops without Qt."""
        news = self._news.wait(timeout)
        self._news.clear()
        return news

    def wait(self, processEvents: Optional[Callable[[], None]] = None, interval: float = 0.05):
        """Block until the run is over, polling whenever the worker posts (and calling ``processEvents``)."""
        while True:
            self._news.clear()
            if self.poll():
                break
            if processEvents is not None:
                processEvents()
            self._news.wait(interval)
        if self.error is not None:
            raise self.error
        return self.outputs

    # --- worker thread ------------------------------------------------------------------------------

    def _post(self, kind, payload=None):
        self._queue.put((kind, payload))
        self._news.set()

    def _work(self):
        from DEQRegistrationLib.registration import register
        from DEQRegistrationLib.sampling import Sampler
        from DEQRegistrationLib import metrics
        try:
            inputs = self.inputs
            # step 0: the pair as given (the moving image on the fixed grid, no deformation)
            sampler = Sampler.between(inputs.fixed, inputs.moving)
            if inputs.fixedLabels is not None:  # before the frame: the chart has it when the views show step 0
                self._post("dice", (0, metrics.mean_dice(inputs.fixedLabels, sampler.labels(inputs.movingLabels)),
                                    True))
            shape = inputs.fixed.shape
            self._putFrame(Frame.fromLibrary(0, sampler.image(inputs.moving.data),
                                             np.zeros(tuple(shape) + (3,), np.float32), np.ones(shape, np.float32)))
            result = register(inputs.fixed, inputs.moving, self.settings, callback=self._onStep,
                              moving_labels=inputs.movingLabels, on_fallback=self._onFallback,
                              fixed_mask=inputs.fixedMask, moving_mask=inputs.movingMask)
            dice = None
            if inputs.fixedLabels is not None and result.warped_labels is not None:
                dice = metrics.mean_dice(inputs.fixedLabels, result.warped_labels)
            final = Frame.fromLibrary(result.steps, result.warped.data, total_displacement_mm(result),
                                      result.jacobian)
            self._post("done", _Done(result, dice, metrics.folding_percent(result.jacobian), final))
        except BaseException as exc:  # reported on the main thread
            self._post("error", (exc, traceback.format_exc()))

    def _putFrame(self, frame: Frame):
        with self._frameLock:
            self._frame = frame
        self._news.set()

    def _onStep(self, progress) -> bool:
        if getattr(progress, "stage", "deformable") == "features":  # no solver step: a status line, no row
            self._post("features", dict(step=progress.step, max_steps=progress.max_steps,
                                        fraction=progress.fraction or 0.0))
        else:
            self._onSolverStep(progress)
        stop = bool(self.callback(progress)) if self.callback is not None else False
        return stop or self._cancel.is_set()

    def _onSolverStep(self, progress):
        """A solver step: a trace row, and every ``refreshEvery`` steps a frame (and Dice) for the scene."""
        self.stepsDone = progress.step
        self._post("row", dict(step=progress.step, max_steps=progress.max_steps, level=progress.level,
                               n_levels=progress.n_levels, residual=progress.residual, seconds=progress.seconds,
                               stage=STAGE_LABELS.get(getattr(progress, "stage", "deformable"),
                                                      str(getattr(progress, "stage", "")))))
        if progress.step % self.refreshEvery == 0:
            from DEQRegistrationLib.geometry import voxel_field_to_physical
            from DEQRegistrationLib import metrics
            if int(np.prod(self.inputs.fixed.shape)) > LIVE_FULL_MAX_VOXELS:
                self._putFrame(previewFrame(progress, self.inputs.fixed.affine))
            else:
                displacement = progress.displacement()
                self._putFrame(Frame.fromLibrary(progress.step, progress.warped(),
                                                 voxel_field_to_physical(displacement, self.inputs.fixed.affine),
                                                 metrics.jacobian_determinant(displacement)))
            if self.inputs.movingLabels is not None:
                self._post("dice", (progress.step, metrics.mean_dice(
                    self.inputs.fixedLabels, progress.warp_labels(self.inputs.movingLabels)), False))

    def _onFallback(self, message):
        with self._frameLock:
            self._frame = None
        self._post("fallback", message)

    # --- main thread: writing the scene ----------------------------------------------------------------

    @staticmethod
    def _alive(node) -> bool:
        return node is not None and node.GetScene() is not None

    def _checkNodes(self):
        """Stop when an input or output node was deleted (writing into it would be lost, or raise)."""
        if self.cancelRequested:
            return
        for node in self.inputs.nodes + self.nodes.nodes:
            if not self._alive(node):
                self.cancel(f"'{node.GetName()}' was deleted")
                return

    def _onSceneClose(self, caller=None, event=None):
        self.cancel("the scene was closed")

    def _applyRow(self, row):
        if self._alive(self.nodes.traceTable):
            mrml.append_row(self.nodes.traceTable, {k: row[k] for k in TRACE_COLUMNS})
        fraction = row["step"] / row["max_steps"] if row["max_steps"] else 0.0
        text = status_text(row, time.perf_counter() - self._t0)
        if self.cancelRequested:
            text = f"Stopping ({self.stopReason})... " + text
        self.statusCallback(text, fraction)

    def _applyFeatures(self, row):
        """The "features" stage (MIND's descriptors, before the first deformable step): the status line only."""
        text = (f"{STAGE_LABELS['features']}: {100 * row['fraction']:.0f}%, "
                f"{format_seconds(time.perf_counter() - self._t0)} elapsed")
        if self.cancelRequested:
            text = f"Stopping ({self.stopReason})... " + text
        self.statusCallback(text, row["step"] / row["max_steps"] if row["max_steps"] else 0.0)

    def _applyDice(self, step, dice, initial):
        if initial:
            self.initialDice = dice
            self.messages.append(f"Dice before registration: {dice:.3f}")
        if self._alive(self.nodes.diceTable):
            mrml.append_row(self.nodes.diceTable, {"step": step, "dice": dice})
        self._lastDiceStep = step

    def _restartTables(self, message):
        """The library reruns on the CPU: start the live tables again."""
        self.messages.append(message)
        self.statusCallback(message, 0.0)
        if self._alive(self.nodes.traceTable):
            mrml.reset_table(self.nodes.traceTable, TRACE_COLUMNS)
        if self._alive(self.nodes.diceTable):
            mrml.reset_table(self.nodes.diceTable, DICE_COLUMNS)
            if self.initialDice is not None:
                mrml.append_row(self.nodes.diceTable, {"step": 0, "dice": self.initialDice})

    def _applyFrame(self, frame: Frame):
        affine = self.inputs.fixed.affine if frame.affine is None else frame.affine
        if self._alive(self.nodes.warpedVolume):
            mrml.write_volume_kji(self.nodes.warpedVolume, frame.warped, affine)
        if self._alive(self.nodes.transform):
            mrml.write_grid_transform_kji(self.nodes.transform, frame.displacement, affine)
        if self._alive(self.nodes.foldingMap):
            mrml.write_volume_kji(self.nodes.foldingMap, frame.jacobian, affine)
        self.shownSteps.append(frame.step)

    def _finish(self, kind, payload):
        if self._thread is not None:
            self._thread.join()
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []
        self.finished = True
        n = self.nodes
        self.outputs = RegistrationOutputs(n.warpedVolume, n.transform, n.foldingMap, n.chart, n.traceTable,
                                           n.diceTable, initialDice=self.initialDice, messages=self.messages,
                                           stopReason=self.stopReason)
        if kind == "error":
            self.error, self.errorDetails = payload
            self.messages.append(f"Registration failed: {self.error}")
            self.statusCallback(self.messages[-1], 0.0)
            return
        done: _Done = payload
        r = done.result
        # the final state: exactly what register() returned
        self._applyFrame(done.final)
        out = self.outputs
        out.result, out.dice, out.foldingPercent, out.device = r, done.dice, done.foldingPercent, str(r.device)
        if done.dice is not None and self._lastDiceStep != r.steps:
            self._applyDice(r.steps, done.dice, False)
        self._annotate(out)
        if r.cancelled:
            head = f"Stopped ({self.stopReason})" if self.stopReason and self.stopReason != "cancelled" \
                else "Cancelled"
        else:
            head = "Done"
        # no deformable step yet (stopped in the alignment or the descriptors): no residual to show
        residual = f"residual {r.final_residual:.2e}, " if np.isfinite(r.final_residual) else ""
        summary = (f"{head}: {r.steps} steps, {residual}"
                   f"{'converged' if r.converged else 'not converged'}, {format_seconds(r.seconds)} on "
                   f"{device_label(r.device)}, {out.foldingPercent:.3f} % folded")
        if out.dice is not None and self.initialDice is not None:
            summary += f", Dice {self.initialDice:.3f} -> {out.dice:.3f}"
        for warning in getattr(r, "warnings", []):  # an alignment undone, a similarity that does not fit the pair
            self.messages.append(f"Warning: {warning}")  # before the summary: messages[-1] stays the summary
            logger.warning(warning)
        self.messages.append(summary)
        self.statusCallback(summary, 1.0)
        logger.info(summary)

    def _annotate(self, out):
        r = out.result
        for node in (out.warpedVolume, out.transform, out.foldingMap):
            if self._alive(node):
                node.SetAttribute("DEQReg.steps", str(r.steps))
                node.SetAttribute("DEQReg.converged", str(bool(r.converged)))
        if out.dice is not None and self._alive(out.warpedVolume):
            out.warpedVolume.SetAttribute("DEQReg.dice", f"{out.dice:.4f}")
        if self._alive(out.foldingMap):
            out.foldingMap.SetAttribute("DEQReg.foldingPercent", f"{out.foldingPercent:.4f}")
