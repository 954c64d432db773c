"""Registration on MRML nodes: checks, inputs to the library, output nodes, and the run.

``RegistrationLogic.start`` is what the module's Register button calls and
``RegistrationLogic.register`` what scripts call (it waits). Both go through
the same steps, each a small function:

1. ``readInputs``: the input nodes as library images and label maps, in
   world (RAS) coordinates, parent transforms included (no node is left in
   the scene, no input is modified);
2. ``checkSettings``: the library's ``Settings`` (unknown names refused),
   the model, loaded once to check it exists for the images' dimension, and
   the step budget of the library's level plan;
3. ``checkOutputs``: the given output nodes must be of the right class, not
   inputs, and not a transform an input is shown through;
4. ``prepareOutputs``: outputs created or reused (never the result of
   another fixed/moving pair), named after the pair, tables and plot set up;
5. ``RegistrationRun`` (``run.py``): the solve in a worker thread, the scene
   written on the main thread.

Steps 1 to 3 create nothing, so a refused registration leaves the scene as it
was. Torch and ``DEQRegistrationLib`` are imported only inside these
functions (never at module load).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from . import mrml
from .run import DICE_COLUMNS, TRACE_COLUMNS, Inputs, OutputNodes, RegistrationOutputs, RegistrationRun  # noqa: F401

logger = logging.getLogger(__name__)

OUTPUT_CLASSES = {"outputVolume": "vtkMRMLScalarVolumeNode", "outputTransform": "vtkMRMLGridTransformNode",
                  "outputFolding": "vtkMRMLScalarVolumeNode", "outputChart": "vtkMRMLPlotChartNode"}
OUTPUT_ROLE_ATTRIBUTE = "DEQReg.output"
PAIR_ATTRIBUTES = ("DEQReg.fixed", "DEQReg.moving")


def _input_error(message):
    from DEQRegistrationLib.errors import InputError
    return InputError(message)


# --- 1. inputs -------------------------------------------------------------------------------------------


def readInputs(scene, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None,
               fixedMask=None, movingMask=None) -> Inputs:
    """The input nodes as the library sees them: world geometry, labels and masks on their volume's grid."""
    from DEQRegistrationLib.image import Image
    for role, node in (("fixed", fixedVolumeNode), ("moving", movingVolumeNode)):
        if node is None:
            raise _input_error("select a fixed and a moving volume")
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise _input_error(f"the {role} volume '{node.GetName()}' is not an intensity volume")
        if node.GetImageData() is None:
            raise _input_error(f"the {role} volume '{node.GetName()}' has no image data")
    if (fixedLabelsNode is None) != (movingLabelsNode is None):
        raise _input_error("give both fixed and moving labels (or neither) to report Dice")
    fixed_data, fixed_affine = mrml.volume_to_library(fixedVolumeNode, scene)
    moving_data, moving_affine = mrml.volume_to_library(movingVolumeNode, scene)
    inputs = Inputs(fixedVolumeNode, movingVolumeNode, fixedLabelsNode, movingLabelsNode,
                    Image(fixed_data.astype(np.float32, copy=False), fixed_affine),
                    Image(moving_data.astype(np.float32, copy=False), moving_affine))
    if fixedLabelsNode is not None:
        order = mrml.segment_names(fixedLabelsNode) if fixedLabelsNode.IsA("vtkMRMLSegmentationNode") else None
        inputs.fixedLabels = mrml.labels_to_library(fixedLabelsNode, fixedVolumeNode, fixed_data.shape,
                                                    fixed_affine, order, scene)
        inputs.movingLabels = mrml.labels_to_library(movingLabelsNode, movingVolumeNode, moving_data.shape,
                                                     moving_affine, order, scene)
    for role, node, volume, data, affine in (("fixed", fixedMask, fixedVolumeNode, fixed_data, fixed_affine),
                                             ("moving", movingMask, movingVolumeNode, moving_data, moving_affine)):
        if node is None:
            continue
        if not (node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLSegmentationNode")):
            raise _input_error(f"the {role} mask '{node.GetName()}' is not a label map or a segmentation")
        mask = mrml.labels_to_library(node, volume, data.shape, affine, None, scene) > 0
        if not mask.any():
            raise _input_error(f"the {role} mask '{node.GetName()}' is empty over the {role} volume")
        setattr(inputs, role + "MaskNode", node)
        setattr(inputs, role + "Mask", mask)
    return inputs


# --- 2. settings -------------------------------------------------------------------------------------------


def checkSettings(inputs: Inputs, settings=None, messages=None, **overrides):
    """(the library's ``Settings``, the step budget it gives); the model is loaded once, so a missing or
    mismatched one is refused now, and the level plan is the library's (``make_plan``)."""
    import torch
    from DEQRegistrationLib.config import make_settings
    from DEQRegistrationLib.registration import make_operator, make_plan
    if overrides.get("device", getattr(settings, "device", "auto")) in ("cuda", "gpu") \
            and not torch.cuda.is_available():
        if messages is not None:
            messages.append("No CUDA GPU available: running on the CPU.")
        overrides["device"] = "cpu"
    result = make_settings(settings, **overrides)
    op, config = make_operator(result, inputs.fixed.ndim)
    return result, make_plan(result, op, config, inputs.fixed.shape).max_steps


# --- 3. outputs: checks -------------------------------------------------------------------------------------


def _transform_chain(node):
    """The transform nodes a node is shown through, nearest first."""
    chain = []
    parent = node.GetParentTransformNode() if node is not None else None
    while parent is not None and parent not in chain:
        chain.append(parent)
        parent = parent.GetParentTransformNode()
    return chain


def checkOutputs(inputs: Inputs, outputs: dict):
    """Refuse output nodes of the wrong class, inputs, one node for two outputs, and transforms an input uses.

    An input shown through the output transform would be read through the
    transform that the run then overwrites: the result would be silently
    wrong, so it is refused (choose another output transform, or none).
    """
    given = {key: node for key, node in outputs.items() if node is not None}
    for key, node in given.items():
        if any(node is n or node.GetID() == n.GetID() for n in inputs.nodes):
            raise _input_error(f"output '{node.GetName()}' is an input: choose another output node")
        if not node.IsA(OUTPUT_CLASSES[key]):
            raise _input_error(f"output '{node.GetName()}' is not a {OUTPUT_CLASSES[key]}")
    ids = [node.GetID() for node in given.values()]
    if len(set(ids)) != len(ids):
        raise _input_error("the same node is selected for two outputs")
    transform = given.get("outputTransform")
    if transform is not None:
        for node in inputs.nodes:
            if transform in _transform_chain(node):
                raise _input_error(
                    f"the output transform '{transform.GetName()}' is applied to the input '{node.GetName()}': "
                    "registering would read the input through the transform it then overwrites. Choose another "
                    "output transform (or none, to create one), or remove the transform from the input first")


# --- 4. outputs: created or reused ------------------------------------------------------------------------


def _pair_of(node):
    return tuple(node.GetAttribute(a) for a in PAIR_ATTRIBUTES)


def prepareOutputs(scene, inputs: Inputs, outputs: dict, messages: list, maxSteps=None) -> OutputNodes:
    """Output nodes: the given ones, or new ones named after the pair; each marked with its pair and role.

    A given node that holds the result of another fixed/moving pair is left
    as it is and a new node is made instead (a rerun after changing the
    inputs must not overwrite the previous pair's results under their names).
    """
    fixed, moving = inputs.fixedNode, inputs.movingNode
    pair = (fixed.GetID(), moving.GetID())
    base = f"{moving.GetName()} to {fixed.GetName()}"
    names = {"outputVolume": f"{moving.GetName()} warped", "outputTransform": base,
             "outputFolding": f"{base} folding map", "outputChart": f"{base} convergence"}

    def output(key):
        node = outputs.get(key)
        if node is not None and _pair_of(node) not in (pair, (None, None)):
            messages.append(f"'{node.GetName()}' holds the result of another pair: the result of {base} goes "
                            f"into a new node")
            node = None
        if node is None:
            node = scene.AddNewNodeByClass(OUTPUT_CLASSES[key], scene.GenerateUniqueName(names[key]))
        for attribute, value in zip(PAIR_ATTRIBUTES, pair):
            node.SetAttribute(attribute, value)
        node.SetAttribute(OUTPUT_ROLE_ATTRIBUTE, key)
        if key != "outputChart":
            node.SetAndObserveTransformNodeID(None)  # outputs are in world coordinates
        return node

    nodes = OutputNodes(output("outputVolume"), output("outputTransform"), output("outputFolding"),
                        output("outputChart"), None)
    nodes.traceTable, nodes.diceTable = _tables(scene, nodes.chart, base, with_dice=inputs.fixedLabels is not None)
    mrml.setup_plot(scene, nodes.chart, nodes.traceTable, nodes.diceTable)
    if maxSteps:  # the whole budget from the start: the curves grow to the right
        nodes.chart.SetXAxisRangeAuto(False)
        nodes.chart.SetXAxisRange(0, maxSteps)
    # the identity state, so the views and the transform are valid before the first refresh
    shape, affine = inputs.fixed.shape, inputs.fixed.affine
    mrml.update_volume(nodes.warpedVolume, np.zeros(shape, np.float32), affine)
    mrml.update_grid_transform(nodes.transform, np.zeros(tuple(shape) + (3,), np.float32), affine)
    mrml.update_volume(nodes.foldingMap, np.ones(shape, np.float32), affine)
    mrml.show_folding_colors(nodes.foldingMap)
    if nodes.warpedVolume.GetDisplayNode() is None:
        nodes.warpedVolume.CreateDefaultDisplayNodes()
    return nodes


def _tables(scene, chartNode, base, with_dice):
    def table(role, name, columns):
        node = chartNode.GetNodeReference(role)
        if node is None or node.GetScene() is None:
            node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
            chartNode.SetNodeReferenceID(role, node.GetID())
        mrml.reset_table(node, columns)
        return node

    trace = table("DEQRegTraceTable", f"{base} trace", TRACE_COLUMNS)
    dice = table("DEQRegDiceTable", f"{base} Dice", DICE_COLUMNS) if with_dice else None
    return trace, dice


# --- the logic --------------------------------------------------------------------------------------------


class RegistrationLogic:
    """Qt-free registration logic on a MRML scene.

    processEvents: called while ``register`` waits (keeps a GUI responsive).
    statusCallback(text, fraction): progress for a status line / bar (main thread).
    """

    def __init__(self, scene=None, processEvents: Optional[Callable[[], None]] = None,
                 statusCallback: Optional[Callable[[str, float], None]] = None):
        self._scene = scene
        self.processEvents = processEvents or (lambda: None)
        self.statusCallback = statusCallback or (lambda text, fraction: None)
        self.run: Optional[RegistrationRun] = None

    @property
    def scene(self):
        import slicer
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def isRunning(self) -> bool:
        """True from ``start`` until the run's last ``poll``: the one place this is known."""
        return self.run is not None and not self.run.finished

    def cancel(self):
        """Ask a running registration to stop after the current step; its state is kept."""
        if self.isRunning:
            self.run.cancel()

    def start(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None, *,
              fixedMask=None, movingMask=None, settings=None, refreshEvery=5, callback=None, liveLayout=None,
              outputVolume=None, outputTransform=None, outputFolding=None, outputChart=None,
              **overrides) -> RegistrationRun:
        """Check everything, prepare the output nodes and start the solve; returns the running ``RegistrationRun``.

        ``settings`` (a ``DEQRegistrationLib.config.Settings``) and/or keyword
        overrides of its fields (``update``, ``max_steps``, ``tol``, ``solver``,
        ``model``, ``device``, ...); an unknown name raises ``InputError``.
        ``callback(progress)`` is the library's callback: it runs in the
        solver's thread after each step (do not touch MRML in it) and
        returning True stops the solve. Nothing is created when a check fails.
        ``fixedMask`` / ``movingMask``: label maps or segmentations (any
        non-zero voxel counts) restricting where the similarity looks, e.g. a
        lesion left out of the moving image (the library's masks).
        """
        from .dependencies import requireLibrary
        if self.isRunning:
            raise RuntimeError("a registration is already running: cancel it or wait for it to finish")
        requireLibrary()
        scene = self.scene
        messages = []
        inputs = readInputs(scene, fixedVolumeNode, movingVolumeNode, fixedLabelsNode, movingLabelsNode,
                            fixedMask, movingMask)
        librarySettings, maxSteps = checkSettings(inputs, settings, messages, **overrides)
        given = dict(outputVolume=outputVolume, outputTransform=outputTransform, outputFolding=outputFolding,
                     outputChart=outputChart)
        checkOutputs(inputs, given)
        nodes = prepareOutputs(scene, inputs, given, messages, maxSteps)
        self.run = RegistrationRun(scene, inputs, nodes, librarySettings, refreshEvery=refreshEvery,
                                   callback=callback, statusCallback=self.statusCallback, liveLayout=liveLayout,
                                   messages=messages)
        return self.run.start()

    def register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None, *,
                 wait=True, **kwargs):
        """``start`` and, with ``wait`` (the default), wait for the result: a ``RegistrationOutputs``.

        With ``wait=False`` the running ``RegistrationRun`` is returned; call
        its ``poll()`` regularly (a QTimer) or ``wait()``.
        """
        run = self.start(fixedVolumeNode, movingVolumeNode, fixedLabelsNode, movingLabelsNode, **kwargs)
        if not wait:
            return run
        outputs = run.wait(self.processEvents)
        for message in outputs.messages:
            logger.info(message)
        return outputs
