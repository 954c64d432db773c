"""DEQRegistration: deformable registration with Deep Equilibrium Models, in 3D Slicer.

This file holds only what needs Slicer's application, Qt or the scripted-module
base classes (module description, panel, Slicer self-test). Everything else is
``DEQRegistrationSlicerLib`` (Qt-free, tested on slicer-core): the parameter
node and its mapping to the library's settings, the registration logic, the
run in a worker thread, the live layout. Torch and ``DEQRegistrationLib`` are
imported only when a registration starts, so loading the module costs nothing.
"""
import importlib.util
import os
import time

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
from DEQRegistrationSlicerLib.layout import LiveLayout
from DEQRegistrationSlicerLib.logic import RegistrationLogic
from DEQRegistrationSlicerLib.parameters import ParameterNode

#: the extension's contributors, "Firstname Lastname (Organization)"; the same list is in ../CMakeLists.txt
CONTRIBUTORS = ["DEQRegistration Maintainers (DEQRegistration project)"]
#: parameter (parameters.PARAMETERS) -> the .ui widget that edits it; a parameter with a ``label`` and no
#: entry here gets a widget built by ``makeParameterWidget`` at the end of the "Advanced" section
PARAMETER_WIDGETS = {
    "Update": "updateComboBox",
    "MaxSteps": "maxStepsSpinBox",
    "Tolerance": "toleranceSpinBox",
    "Solver": "solverComboBox",
    "Model": "modelComboBox",
    "ModelPath": "modelPathLineEdit",
    "Device": "deviceComboBox",
    "Similarity": "similarityComboBox",
    "DiffusionWeight": "diffusionWeightSpinBox",
    "RefreshEvery": "refreshEverySpinBox",
}
#: node reference role -> the .ui selector
NODE_WIDGETS = {
    "FixedVolume": "fixedVolumeSelector",
    "MovingVolume": "movingVolumeSelector",
    "FixedLabels": "fixedLabelsSelector",
    "MovingLabels": "movingLabelsSelector",
    "FixedMask": "fixedMaskSelector",
    "MovingMask": "movingMaskSelector",
    "OutputVolume": "outputVolumeSelector",
    "OutputTransform": "outputTransformSelector",
    "OutputFolding": "outputFoldingSelector",
    "OutputChart": "outputChartSelector",
}
#: sections the user cannot edit while a registration runs
SECTIONS = ("inputsCollapsibleButton", "settingsCollapsibleButton", "advancedCollapsibleButton",
            "outputsCollapsibleButton", "sampleDataButton")
#: a Cancel click this soon after Register is the second click of a double click, not a cancel
DOUBLE_CLICK_SECONDS = 0.5
#: the poll timer: every 20 ms a tick polls, then waits up to 40 ms for the solver with the GIL released
POLL_INTERVAL_MS = 20
YIELD_SECONDS = 0.04


def choiceLabels():
    """What the panel shows for each stored value (translated; the values stay untranslated identifiers)."""
    return {
        "gradient": _("Gradient (no weights)"),
        "learned": _("Learned (trained network)"),
        "hybrid": _("Hybrid (gradient + network)"),
        "features": _("Gradient + learned feature similarity"),
        "auto": _("Automatic"),
        "anderson": _("Anderson acceleration"),
        "fixed-point": _("Fixed-point iteration"),
        "default": _("Shipped model"),
        "file": _("Checkpoint file"),
        "cpu": _("CPU"),
        "cuda": _("GPU (CUDA)"),
        "lncc": _("Local normalized cross-correlation"),
        "mse": _("Mean squared error"),
        "mind": _("MIND-SSC descriptors (multi-modal)"),
        "affine": _("Affine (rigid, then scaling and shear)"),
        "rigid": _("Rigid (rotation and translation)"),
        "center": _("Centres of mass"),
        "none": _("None (trust the image positions)"),
        "ncc": _("Normalized cross-correlation"),
        "mi": _("Mutual information (another contrast)"),
        "custom": _("Custom (the settings below)"),
        "brain-mri": _("Brain MRI, same sequence"),
        "multimodal": _("Another contrast or scanner"),
        "lung-ct": _("Lung CT, inhale/exhale"),
    }


def generatedParameters():
    """The parameters whose widget the module builds (a ``label``, no widget in the .ui), in table order."""
    return [spec for spec in P.PARAMETERS if spec.label and spec.name not in PARAMETER_WIDGETS]


def makeParameterWidget(spec):
    """A Qt widget for a parameter row: combo box (choices), check box (bool), spin box (int/float), line edit."""
    if spec.choices:
        widget = qt.QComboBox()
    elif spec.kind is bool:
        widget = qt.QCheckBox()
    elif spec.kind is int:
        widget = qt.QSpinBox()
    elif spec.kind is float:
        widget = qt.QDoubleSpinBox()
        if len(spec.limits) > 3:
            widget.decimals = spec.limits[3]
    else:
        widget = qt.QLineEdit()
    if spec.limits and spec.kind in (int, float):
        widget.minimum, widget.maximum, widget.singleStep = spec.limits[:3]
        if spec.auto is not None and spec.auto == spec.limits[0]:
            widget.specialValueText = _("auto")  # the lowest value means "the library's own"
    widget.toolTip = _(spec.tooltip)
    widget.objectName = spec.name[0].lower() + spec.name[1:] + type(widget).__name__[1:]
    return widget


def widgetSignal(spec):
    """The widget's signal that tells the parameter node its value changed."""
    return ("currentIndexChanged(int)" if spec.choices else "toggled(bool)" if spec.kind is bool
            else "valueChanged(int)" if spec.kind is int else "valueChanged(double)" if spec.kind is float
            else "currentPathChanged(QString)" if spec.name == "ModelPath" else "editingFinished()")


def widgetValue(widget, spec):
    """The value a parameter's widget shows (None: nothing chosen)."""
    if spec.choices:
        return widget.itemData(widget.currentIndex) if widget.currentIndex >= 0 else None
    if spec.kind is bool:
        return bool(widget.checked)
    if spec.kind is str:
        return widget.currentPath if spec.name == "ModelPath" else widget.text
    return widget.value


def setWidgetValue(widget, spec, value):
    if spec.choices:
        widget.setCurrentIndex(widget.findData(value))
    elif spec.kind is bool:
        widget.checked = bool(value)
    elif spec.kind is str:
        if spec.name == "ModelPath":
            widget.currentPath = value
        else:
            widget.text = value
    else:
        widget.value = value


def defaultModelAvailable(ndim):
    """Whether the library ships a default model for ``ndim`` (without importing torch)."""
    spec = importlib.util.find_spec("DEQRegistrationLib")
    if spec is None or not spec.submodule_search_locations:
        return False
    return os.path.isfile(os.path.join(spec.submodule_search_locations[0], "models", f"default_{ndim}d.pt"))


def volumeDimension(volumeNode):
    """2 for a single-slice volume, 3 otherwise (what the library registers)."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        return None
    return 2 if sorted(image.GetDimensions())[0] == 1 else 3


def registerProblem(p):
    """Why Register cannot run with these settings (translated sentence), or None."""
    fixed, moving = p.getNode("FixedVolume"), p.getNode("MovingVolume")
    if fixed is None or moving is None:
        return _("Select fixed and moving volumes.")
    if (p.getNode("FixedLabels") is None) != (p.getNode("MovingLabels") is None):
        return _("Select both fixed and moving labels, or neither.")
    if p.get("Update") != "gradient":
        ndim = volumeDimension(fixed)
        if p.get("Model") == "default" and ndim is not None and not defaultModelAvailable(ndim):
            return _("No shipped model for {ndim}D images: use the gradient update or a checkpoint file.").format(
                ndim=ndim)
        if p.get("Model") == "file" and not os.path.isfile(p.get("ModelPath")):
            return _("Choose a checkpoint file for the learned, hybrid or features update.")
    return None


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
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            "Deformable registration of a moving volume to a fixed volume as the fixed point of a "
            "Deep Equilibrium Model (DEQReg). On Register the module switches to its live layout: the fixed "
            "volume in green with the warped moving volume in magenta (grey where they agree), the folding map "
            "(Jacobian determinant; folds in red) over the fixed volume, and the convergence chart, all updated "
            "every few solver steps while the panel stays usable; Register turns into Cancel. "
            "'Restore layout' brings back the layout you had. Outputs: a warped volume, a grid transform (apply it "
            "to the moving volume or its segmentation), the folding map and the chart. "
            "'Load sample pair' loads a brain template and a deformed copy to try it. "
            "See <a href='https://github.com/deqreg/SlicerDEQRegistration'>the project page</a>.")
        self.parent.acknowledgementText = _(
            "DEQReg follows 'Deep Equilibrium Models for Image Registration'. Registration core: "
            "DEQRegistrationLib (PyTorch). Sample pair: the MNI ICBM152 2009a template as shipped in nilearn.")
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "connect"):
            app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The sample pair in the Sample Data module (built locally from nilearn's template, no download)."""
    try:
        import SampleData
    except ImportError:
        return
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Registration", sampleName="DEQReg MNI pair", uris=[], fileNames=[], nodeNames=[],
        thumbnailFileName=os.path.join(iconsPath, "DEQRegistration.png"),
        customDownloader=lambda source: DEQRegistrationLogic().loadSampleDataInteractively())


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
        self._pollTimer = None
        self._startedAt = 0.0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DEQRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.parameterWidgets = {name: getattr(self.ui, widgetName) for name, widgetName in PARAMETER_WIDGETS.items()}
        for spec in generatedParameters():
            widget = makeParameterWidget(spec)
            if spec.name == "Preset":  # offered first, above the settings it bundles
                self.ui.settingsCollapsibleButton.layout().insertRow(0, _(spec.label), widget)
            else:
                self.ui.advancedCollapsibleButton.layout().addRow(_(spec.label), widget)
            self.parameterWidgets[spec.name] = widget
        self.fillChoices()

        self.logic = DEQRegistrationLogic()
        self.logic.statusCallback = self.onStatus

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for name in NODE_WIDGETS.values():
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        for name, widget in self.parameterWidgets.items():
            widget.connect(widgetSignal(P.BY_NAME[name]), self.updateParameterNodeFromGUI)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.restoreLayoutButton.connect("clicked(bool)", self.onRestoreLayout)
        self.ui.sampleDataButton.connect("clicked(bool)", self.onLoadSampleData)

        self.initializeParameterNode()

    def fillChoices(self):
        labels = choiceLabels()
        for name, widget in self.parameterWidgets.items():
            for value in P.BY_NAME[name].choices:
                widget.addItem(labels[value], value)

    def cleanup(self):
        if self.logic is not None and self.logic.isRunning:
            self.logic.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        # a running registration stops by itself when the scene closes (it observes the scene)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node <-> GUI ------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        ParameterNode(self._parameterNode).selectDefaultInputs(slicer.mrmlScene)

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
            for role, widgetName in NODE_WIDGETS.items():
                getattr(self.ui, widgetName).setCurrentNode(p.getNode(role))
            for name, widget in self.parameterWidgets.items():
                setWidgetValue(widget, P.BY_NAME[name], p.get(name))
            gradient = p.get("Update") == "gradient"
            self.ui.modelComboBox.enabled = not gradient
            self.ui.modelPathLineEdit.enabled = not gradient and p.get("Model") == "file"
            for name, widget in self.parameterWidgets.items():
                spec = P.BY_NAME[name]
                enabled = gradient or not spec.gradient_only
                if spec.only_with:
                    enabled = enabled and p.get(spec.only_with[0]) == spec.only_with[1]
                if spec.gradient_only or spec.only_with:
                    widget.enabled = enabled
        finally:
            self._updatingGUIFromParameterNode = False
        self.updateRunState()

    def updateRunState(self):
        """Register/Cancel/Cancelling..., editable sections and Restore layout, from the logic's run (one source)."""
        running = self.logic is not None and self.logic.isRunning
        for name in SECTIONS:
            getattr(self.ui, name).enabled = not running
        self.ui.restoreLayoutButton.enabled = LiveLayout(slicer.mrmlScene).previousLayout() is not None
        button = self.ui.registerButton
        if running:
            cancelling = self.logic.run.cancelRequested
            button.text = _("Cancelling...") if cancelling else _("Cancel")
            button.toolTip = _("Stop after the current step, keeping the state reached.")
            button.enabled = not cancelling
            return
        button.text = _("Register")
        problem = registerProblem(ParameterNode(self._parameterNode)) if self._parameterNode is not None \
            else _("Select fixed and moving volumes.")
        button.toolTip = problem or _("Register the moving volume to the fixed volume, showing it live.")
        button.enabled = problem is None

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            p = ParameterNode(self._parameterNode)
            for role, widgetName in NODE_WIDGETS.items():
                p.setNode(role, getattr(self.ui, widgetName).currentNode())
            for name, widget in self.parameterWidgets.items():
                value = widgetValue(widget, P.BY_NAME[name])
                # only what the user changed: a preset then sets its parameters, and a parameter changed
                # after it makes it custom (``ParameterNode.set``), whatever the order of the widgets
                if value is not None and value != p.get(name):
                    p.set(name, value)
        finally:
            self._parameterNode.EndModify(wasModified)

    # --- running --------------------------------------------------------------------------

    def onStatus(self, text, fraction):
        self.ui.statusLabel.text = text
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))

    def onRegisterButton(self):
        if self.logic.isRunning:
            if time.monotonic() - self._startedAt > DOUBLE_CLICK_SECONDS:
                self.logic.cancel()
            self.updateRunState()
            return
        if not self.logic.ensureDependencies():
            return
        p = ParameterNode(self._parameterNode)
        self.ui.progressBar.value = 0
        try:  # p.settings(): the library's settings as a plain dict, passed through to register()
            run = self.logic.start(p.getNode("FixedVolume"), p.getNode("MovingVolume"),
                                   refreshEvery=p.get("RefreshEvery"), **p.nodes(), **p.settings(),
                                   liveLayout=LiveLayout(slicer.mrmlScene, slicer.app.applicationLogic()))
        except ValueError as exc:  # the library's InputError (or a malformed list): one line, no traceback
            slicer.util.errorDisplay(_("Cannot register: {reason}").format(reason=exc))
            return
        except Exception as exc:
            import traceback
            slicer.util.errorDisplay(_("Registration failed: {reason}").format(reason=exc),
                                     detailedText=traceback.format_exc())
            return
        self._startedAt = time.monotonic()
        p.rememberOutputs(run.nodes)
        self._pollTimer.start()
        self.updateRunState()

    def onPoll(self):
        run = self.logic.run
        if run is None or not run.tick(YIELD_SECONDS):
            self.updateRunState()
            return
        self._pollTimer.stop()
        self.onFinished(run)

    def onFinished(self, run):
        if run.error is not None:
            if isinstance(run.error, ValueError):
                slicer.util.errorDisplay(_("Cannot register: {reason}").format(reason=run.error))
            else:
                slicer.util.errorDisplay(_("Registration failed: {reason}").format(reason=run.error),
                                         detailedText=run.errorDetails)
        self.ui.statusLabel.text = "\n".join(run.messages)
        self.updateRunState()

    def onRestoreLayout(self):
        LiveLayout(slicer.mrmlScene).restore()
        self.updateRunState()

    def onLoadSampleData(self):
        pair = self.logic.loadSampleDataInteractively()
        if pair is None:
            return
        p = ParameterNode(self._parameterNode)
        wasModified = self._parameterNode.StartModify()
        p.setNode("FixedVolume", pair.fixed)
        p.setNode("MovingVolume", pair.moving)
        p.setNode("FixedLabels", pair.fixedLabels)
        p.setNode("MovingLabels", pair.movingLabels)
        self._parameterNode.EndModify(wasModified)
        self.ui.statusLabel.text = pair.description


#
# DEQRegistrationLogic
#


class DEQRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """Scripted-module logic: ``RegistrationLogic`` plus Slicer's parameter node, dialogs and views.

    Usable without the GUI (waits for the result; ``wait=False`` returns the running job)::

        logic = DEQRegistrationLogic()
        outputs = logic.register(fixedNode, movingNode, max_steps=48)
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        app = getattr(slicer, "app", None)
        RegistrationLogic.__init__(self, processEvents=getattr(app, "processEvents", None))

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        ParameterNode(node).setDefaults()
        return node

    def ensureDependencies(self, requirements=None):
        """Install missing packages and PyTorch (after confirmation); False after showing why it failed.

        No wait cursor over the confirmations: only the installing itself shows one.
        """
        from DEQRegistrationSlicerLib.dependencies import MissingDependency, ensureDependencies
        try:
            ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay, pipInstall=slicer.util.pip_install,
                               busy=slicer.util.WaitCursor, requirements=requirements)
            return True
        except MissingDependency as exc:
            slicer.util.errorDisplay(str(exc))
            return False

    def register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode=None, movingLabelsNode=None,
                 showLive=False, **kwargs):
        """``RegistrationLogic.register``; with ``showLive`` the module's live layout shows it (GUI only)."""
        if showLive and getattr(slicer, "app", None) is not None:
            kwargs["liveLayout"] = LiveLayout(slicer.mrmlScene, slicer.app.applicationLogic())
        return RegistrationLogic.register(self, fixedVolumeNode, movingVolumeNode, fixedLabelsNode,
                                          movingLabelsNode, **kwargs)

    def loadSampleDataInteractively(self):
        """The sample pair (after installing what it needs), or None after showing why not."""
        from DEQRegistrationSlicerLib.dependencies import DEMO_REQUIREMENTS
        from DEQRegistrationSlicerLib.sampledata import loadSamplePair
        if not self.ensureDependencies(DEMO_REQUIREMENTS):
            return None
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not load the sample pair."), waitCursor=True):
                pair = loadSamplePair(slicer.mrmlScene)
                slicer.util.setSliceViewerLayers(background=pair.fixed, fit=True)
        except Exception:  # shown by tryWithErrorDisplay, which raises again
            return None
        return pair


#
# DEQRegistrationTest
#


class DEQRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload and Test, and CTest through slicer_add_python_unittest).

    The extension factory builds without torch: the parts that need it are
    skipped there (with a message), the rest always runs.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParametersAndLayout()
        self.setUp()
        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed here: the registration test is skipped")
            return
        self.test_RecoverTranslation()

    def test_ParametersAndLayout(self):
        """Parameter node defaults, their mapping to the library's settings, and the live layout description."""
        self.delayDisplay("Checking the parameter node and the live layout")
        logic = DEQRegistrationLogic()
        p = ParameterNode(logic.getParameterNode())
        self.assertEqual(p.get("Update"), "gradient")
        self.assertEqual(p.settings(), {"update": "gradient", "device": "auto", "similarity": "lncc",
                                        "window": 5, "sigma": 1.5, "init": "affine",
                                        "cpu_fallback": True})
        layoutNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layoutNode is not None:
            live = LiveLayout(slicer.mrmlScene)
            before = layoutNode.GetViewArrangement()
            self.assertTrue(live.activate())
            self.assertTrue(live.isActive())
            live.restore()
            self.assertEqual(layoutNode.GetViewArrangement(), before)

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
        outputs = logic.register(fixed, moving, update="gradient", max_steps=45, refreshEvery=5,
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
