"""DEQRegistration: deformable registration with Deep Equilibrium Models, in 3D Slicer.

This file holds only what needs Slicer's application, Qt or the scripted-module
base classes (module description, panel, Slicer self-test). The registration
logic on MRML nodes is ``DEQRegistrationSlicerLib`` (Qt-free, tested on
slicer-core); torch and ``DEQRegistrationLib`` are imported only when a
registration starts, so loading the module costs nothing.
"""
import logging
import os

import vtk

import qt
import ctk  # noqa: F401  (ctk widgets are created from the .ui file)
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _, translate
except ImportError:  # Slicer < 5.3
    def _(text):
        return text

    def translate(context, text):
        return text

from DEQRegistrationSlicerLib import parameters as P
from DEQRegistrationSlicerLib.logic import RegistrationLogic
from DEQRegistrationSlicerLib.parameters import ParameterNode


#
# DEQRegistration
#


class DEQRegistration(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DEQ Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DEQRegistration developers"]
        self.parent.helpText = _(
            "Deformable registration of a moving volume to a fixed volume as the fixed point of a "
            "Deep Equilibrium Model (DEQReg). Outputs a warped volume, a grid transform (apply it to the "
            "moving volume or its segmentation), a folding map (Jacobian determinant; folds in red) and a "
            "convergence plot, all updated live while the solver runs. "
            "See <a href='https://github.com/deqreg/SlicerDEQRegistration'>the project page</a>.")
        self.parent.acknowledgementText = _(
            "DEQReg follows 'Deep Equilibrium Models for Image Registration'. Registration core: "
            "DEQRegistrationLib (PyTorch).")


#
# DEQRegistrationWidget
#


class DEQRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: settings mirror the parameter node; Register turns into Cancel while running."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DEQRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        for combo, values in ((self.ui.solverComboBox, P.SOLVERS), (self.ui.updateModeComboBox, P.UPDATE_MODES),
                              (self.ui.modelComboBox, P.MODELS), (self.ui.deviceComboBox, P.DEVICES)):
            for value in values:
                combo.addItem(_(value), value)

        self.logic = DEQRegistrationLogic()
        self.logic.processEvents = slicer.app.processEvents
        self.logic.statusCallback = self.onStatus

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for selector in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector, self.ui.fixedLabelsSelector,
                         self.ui.movingLabelsSelector, self.ui.outputVolumeSelector,
                         self.ui.outputTransformSelector, self.ui.outputFoldingSelector,
                         self.ui.outputChartSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.maxStepsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.refreshEverySpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.toleranceSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        for combo in (self.ui.solverComboBox, self.ui.updateModeComboBox, self.ui.modelComboBox,
                      self.ui.deviceComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)

        self.initializeParameterNode()

    def cleanup(self):
        if self.logic is not None and self.logic.isRunning:
            self.logic.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self.logic.isRunning:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node <-> GUI ------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        wrapper = ParameterNode(self._parameterNode)
        if not wrapper.getNode("FixedVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                wrapper.setNode("FixedVolume", first)

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            ParameterNode(inputParameterNode).setDefaults()
        if self._parameterNode is not None and self.hasObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = ParameterNode(self._parameterNode)
            self.ui.fixedVolumeSelector.setCurrentNode(p.getNode("FixedVolume"))
            self.ui.movingVolumeSelector.setCurrentNode(p.getNode("MovingVolume"))
            self.ui.fixedLabelsSelector.setCurrentNode(p.getNode("FixedLabels"))
            self.ui.movingLabelsSelector.setCurrentNode(p.getNode("MovingLabels"))
            self.ui.outputVolumeSelector.setCurrentNode(p.getNode("OutputVolume"))
            self.ui.outputTransformSelector.setCurrentNode(p.getNode("OutputTransform"))
            self.ui.outputFoldingSelector.setCurrentNode(p.getNode("OutputFolding"))
            self.ui.outputChartSelector.setCurrentNode(p.getNode("OutputChart"))
            self.ui.maxStepsSpinBox.value = p.get("MaxSteps")
            self.ui.toleranceSpinBox.value = p.get("Tolerance")
            self.ui.refreshEverySpinBox.value = p.get("RefreshEvery")
            for combo, name in ((self.ui.solverComboBox, "Solver"), (self.ui.updateModeComboBox, "UpdateMode"),
                                (self.ui.modelComboBox, "Model"), (self.ui.deviceComboBox, "Device")):
                combo.setCurrentIndex(combo.findData(p.get(name)))
            self.ui.modelPathLineEdit.currentPath = p.get("ModelPath")
            learned = p.get("UpdateMode") != "gradient"
            self.ui.modelComboBox.enabled = learned
            self.ui.modelPathLineEdit.enabled = learned and p.get("Model") == "file"
            self._updateRegisterButton(p)
        finally:
            self._updatingGUIFromParameterNode = False

    def _updateRegisterButton(self, p):
        if self.logic is not None and self.logic.isRunning:
            self.ui.registerButton.text = _("Cancel")
            self.ui.registerButton.toolTip = _("Stop after the current step, keeping the state reached.")
            self.ui.registerButton.enabled = True
            return
        self.ui.registerButton.text = _("Register")
        ready = p.getNode("FixedVolume") is not None and p.getNode("MovingVolume") is not None
        self.ui.registerButton.toolTip = (_("Register the moving volume to the fixed volume.") if ready
                                          else _("Select fixed and moving volumes."))
        self.ui.registerButton.enabled = ready

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            p = ParameterNode(self._parameterNode)
            p.setNode("FixedVolume", self.ui.fixedVolumeSelector.currentNode())
            p.setNode("MovingVolume", self.ui.movingVolumeSelector.currentNode())
            p.setNode("FixedLabels", self.ui.fixedLabelsSelector.currentNode())
            p.setNode("MovingLabels", self.ui.movingLabelsSelector.currentNode())
            p.setNode("OutputVolume", self.ui.outputVolumeSelector.currentNode())
            p.setNode("OutputTransform", self.ui.outputTransformSelector.currentNode())
            p.setNode("OutputFolding", self.ui.outputFoldingSelector.currentNode())
            p.setNode("OutputChart", self.ui.outputChartSelector.currentNode())
            p.set("MaxSteps", self.ui.maxStepsSpinBox.value)
            p.set("Tolerance", self.ui.toleranceSpinBox.value)
            p.set("RefreshEvery", self.ui.refreshEverySpinBox.value)
            for combo, name in ((self.ui.solverComboBox, "Solver"), (self.ui.updateModeComboBox, "UpdateMode"),
                                (self.ui.modelComboBox, "Model"), (self.ui.deviceComboBox, "Device")):
                if combo.currentIndex >= 0:
                    p.set(name, combo.itemData(combo.currentIndex))
            p.set("ModelPath", self.ui.modelPathLineEdit.currentPath)
        finally:
            self._parameterNode.EndModify(wasModified)

    # --- running --------------------------------------------------------------------------

    def onStatus(self, text, fraction):
        self.ui.statusLabel.text = text
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))

    def onRegisterButton(self):
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.registerButton.text = _("Cancelling...")
            self.ui.registerButton.enabled = False
            return
        p = ParameterNode(self._parameterNode)
        if not self.logic.ensureDependencies():
            return
        kwargs = p.registrationKwargs()
        fixed, moving = p.getNode("FixedVolume"), p.getNode("MovingVolume")
        self.ui.progressBar.value = 0
        try:
            self.logic.isRunning = True  # the button shows Cancel from the first step
            self._updateRegisterButton(p)
            outputs = None
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=False):
                slicer.util.setSliceViewerLayers(background=fixed, foreground=None, foregroundOpacity=0.5)
                outputs = self.logic.register(fixed, moving, **kwargs, showOutputs=True)
        finally:
            self.logic.isRunning = False
            self._updateRegisterButton(p)
        if outputs is None:
            return
        # Remember the outputs so a rerun reuses them.
        wasModified = self._parameterNode.StartModify()
        p.setNode("OutputVolume", outputs.warpedVolume)
        p.setNode("OutputTransform", outputs.transform)
        p.setNode("OutputFolding", outputs.foldingMap)
        p.setNode("OutputChart", outputs.chart)
        self._parameterNode.EndModify(wasModified)
        self.ui.statusLabel.text = "\n".join(outputs.messages)


#
# DEQRegistrationLogic
#


class DEQRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """Scripted-module logic: ``RegistrationLogic`` plus Slicer's parameter node and dialogs.

    Usable without the GUI::

        logic = DEQRegistrationLogic()
        outputs = logic.register(fixedNode, movingNode, maxSteps=48)
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        app = getattr(slicer, "app", None)
        RegistrationLogic.__init__(self, processEvents=app.processEvents if app is not None else None)

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        ParameterNode(node).setDefaults()
        return node

    def ensureDependencies(self):
        """Install missing packages (after confirmation) and PyTorch through the PyTorch extension."""
        from DEQRegistrationSlicerLib.dependencies import MissingDependency, ensureDependencies
        try:
            with slicer.util.WaitCursor():
                ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay, pipInstall=slicer.util.pip_install)
            return True
        except MissingDependency as exc:
            slicer.util.errorDisplay(str(exc))
            return False

    def register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None,
                 showOutputs=False, **kwargs):
        """``RegistrationLogic.register``; with ``showOutputs`` also lays the outputs out in the views."""
        if showOutputs:
            kwargs["outputVolume"] = self._prepareShownOutput(kwargs.get("outputVolume"), fixedVolumeNode,
                                                              movingVolumeNode)
        outputs = RegistrationLogic.register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode,
                                             movingLabelsNode, **kwargs)
        if showOutputs:
            slicer.util.setSliceViewerLayers(background=fixedVolumeNode, foreground=outputs.warpedVolume,
                                             foregroundOpacity=0.5)
            slicer.modules.plots.logic().ShowChartInLayout(outputs.chart)
        for message in outputs.messages:
            logging.info(message)
        return outputs

    def _prepareShownOutput(self, outputVolume, fixedVolumeNode, movingVolumeNode):
        """Create the warped volume before the solve so the views show it updating live."""
        if outputVolume is None:
            outputVolume = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(movingVolumeNode.GetName() + " warped"))
        self._liveForeground = outputVolume
        self._liveFixed = fixedVolumeNode
        return outputVolume

    def _showState(self, *args, **kwargs):
        first = getattr(self, "_liveForeground", None) is not None
        RegistrationLogic._showState(self, *args, **kwargs)
        if first:
            slicer.util.setSliceViewerLayers(background=self._liveFixed, foreground=self._liveForeground,
                                             foregroundOpacity=0.5)
            self._liveForeground = None


#
# DEQRegistrationTest
#


class DEQRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload and Test, and CTest through slicer_add_python_unittest)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RecoverTranslation()

    def test_RecoverTranslation(self):
        """A smooth volume shifted by a known RAS translation is registered back; outputs checked."""
        import numpy as np
        from DEQRegistrationSlicerLib import testing

        self.delayDisplay("Creating an oblique, anisotropic pair with a known RAS shift")
        shift = np.array([3.0, -1.5, 2.0])
        centres = np.array([[0.0, 0.0, 0.0], [9.0, -7.0, 5.0], [-8.0, 6.0, -4.0], [6.0, 8.0, -7.0]])
        fixedShape, movingShape = (24, 32, 32), (30, 30, 34)
        fixedAffine = testing.centred_affine(fixedShape, (1.5, 1.4, 2.0), 20.0)
        movingAffine = testing.centred_affine(movingShape, (1.8, 1.9, 1.6), -12.0, axis=(0.1, 0.9, 0.3))
        blobs = testing.blob_function(centres, 5.0)
        fixed = testing.add_sampled_volume(blobs, fixedShape, fixedAffine, "DEQReg test fixed")
        moving = testing.add_sampled_volume(lambda p: blobs(p - shift), movingShape, movingAffine, "DEQReg test moving")
        movingBefore = slicer.util.arrayFromVolume(moving).copy()

        self.delayDisplay("Registering")
        logic = DEQRegistrationLogic()
        steps = []
        outputs = logic.register(fixed, moving, update="gradient", maxSteps=45, refreshEvery=5,
                                 callback=lambda progress: steps.append(progress.step))
        self.assertEqual(steps, list(range(1, outputs.result.steps + 1)))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), movingBefore)
        self.assertIsNone(moving.GetTransformNodeID())
        self.assertEqual(outputs.traceTable.GetNumberOfRows(), outputs.result.steps)

        # The transform's RAS displacement, weighted by the fixed image, is the shift.
        displacement = slicer.util.arrayFromGridTransform(outputs.transform).reshape(-1, 3)
        weights = slicer.util.arrayFromVolume(fixed).reshape(-1).astype(float)
        mean = (displacement * weights[:, None]).sum(0) / weights.sum()
        self.assertLess(np.linalg.norm(mean - shift), 0.8, f"mean displacement {mean}")
        self.assertLess(outputs.foldingPercent, 0.1)
        self.delayDisplay("Test passed")
