"""The scripted module file, its .ui, its dependencies handling and the extension's packaging files.

slicer-core has no Qt, no ctk, no ``slicer.app`` and no
``slicer.ScriptedLoadableModule``, so this file stands them in with the
smallest honest test doubles (``STANDINS``, also used in subprocesses):

* ``qt`` and ``ctk``: empty modules (the module file imports them; the panel
  needs a real Qt application);
* ``slicer.ScriptedLoadableModule``: the four base classes. The logic's
  ``getParameterNode`` does what Slicer's does (one vtkMRMLScriptedModuleNode
  per module, found or added in the scene); the test base class is
  ``unittest.TestCase`` with ``delayDisplay`` printing the message.

With those, the module's logic and its real Slicer self-test run against
real MRML. The widget's code runs against attribute stand-ins for the .ui
widgets (no signals, no rendering) and a stand-in ``slicer.app`` that only
hands out the application logic of ``testing.LayoutManagerStandIn``; the
poll timer is stood in by calling ``onPoll()`` (what its timeout does), and
the dependency dialogs by recording functions. That checks the panel's
state logic, not its look.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "DEQRegistration")
sys.path[:0] = [MODULE_DIR, ROOT]

slicer = pytest.importorskip("slicer")
import slicer.util  # noqa: E402

UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "DEQRegistration.ui")
MODULE_FILE = os.path.join(MODULE_DIR, "DEQRegistration.py")

STANDINS = '''
import sys, types, unittest
import slicer
sys.modules["qt"] = types.ModuleType("qt")
sys.modules["ctk"] = types.ModuleType("ctk")
_m = types.ModuleType("slicer.ScriptedLoadableModule")

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent

class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent

class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[: -len("Logic")]

    def getParameterNode(self):
        scene = slicer.mrmlScene
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            node = scene.GetNthNodeByClass(n, "vtkMRMLScriptedModuleNode")
            if node.GetModuleName() == self.moduleName:
                return node
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetModuleName(self.moduleName)
        node.SetName(self.moduleName)
        return scene.AddNode(node)

class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)

for _cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
             ScriptedLoadableModuleTest):
    setattr(_m, _cls.__name__, _cls)
sys.modules["slicer.ScriptedLoadableModule"] = _m
'''


def run_python(code, block_torch=False):
    """Run ``code`` in a fresh interpreter with the module's paths and the stand-ins (torch importable or not)."""
    prefix = "import sys\n"
    if block_torch:  # as on the extension factory and in a Slicer without the PyTorch extension
        prefix += "sys.modules['torch'] = None\n"
    prefix += f"sys.path[:0] = [{MODULE_DIR!r}, {ROOT!r}]\n" + STANDINS
    # what Slicer sets up before a test runs: the scene, and the layout manager's nodes
    prefix += ("slicer.mrmlScene = slicer.vtkMRMLScene()\n"
               "from DEQRegistrationSlicerLib.testing import LayoutManagerStandIn\n"
               "_layoutManager = LayoutManagerStandIn(slicer.mrmlScene)\n")
    return subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def module():
    saved = {k: sys.modules.get(k) for k in ("qt", "ctk", "slicer.ScriptedLoadableModule", "DEQRegistration")}
    exec(STANDINS, {})
    sys.modules.pop("DEQRegistration", None)
    mod = importlib.import_module("DEQRegistration")
    yield mod
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene


# --- module file and self-test ------------------------------------------------------------------


def test_module_load_imports_nothing_heavy():
    """Loading the module must not import torch or the registration library (Slicer start-up cost)."""
    out = run_python("import DEQRegistration\n"
                     "print('HEAVY', [m for m in ('torch', 'DEQRegistrationLib', 'scipy') if m in sys.modules])")
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_self_test_passes_without_torch_as_on_the_extension_factory():
    """Issue 9 (6): the factory's CTest runs the self-test where torch is not installed."""
    out = run_python("import unittest, DEQRegistration\n"
                     "r = unittest.TextTestRunner(verbosity=0).run(DEQRegistration.DEQRegistrationTest('runTest'))\n"
                     "print('OK' if r.wasSuccessful() else r.errors + r.failures)\n"
                     "print('TORCH', 'torch' in sys.modules and sys.modules['torch'] is not None)",
                     block_torch=True)
    assert "OK" in out.stdout and "TORCH False" in out.stdout, out.stdout + out.stderr
    assert "registration test is skipped" in out.stdout


def test_console_user_without_torch_gets_a_clear_message_and_no_nodes():
    """Issue 9 (7): scripted use without torch used to end in a bare ModuleNotFoundError."""
    out = run_python(
        "import numpy as np, slicer, slicer.util, DEQRegistration\n"
        "from DEQRegistrationSlicerLib.dependencies import MissingDependency\n"
        "slicer.mrmlScene = slicer.vtkMRMLScene()\n"
        "f = slicer.util.addVolumeFromArray(np.ones((4, 4, 4), np.float32), np.eye(4), 'f')\n"
        "m = slicer.util.addVolumeFromArray(np.ones((4, 4, 4), np.float32), np.eye(4), 'm')\n"
        "n = slicer.mrmlScene.GetNumberOfNodes()\n"
        "try:\n"
        "    DEQRegistration.DEQRegistrationLogic().register(f, m)\n"
        "except MissingDependency as e:\n"
        "    print('MESSAGE', e)\n"
        "print('NODES', slicer.mrmlScene.GetNumberOfNodes() - n)", block_torch=True)
    assert "MESSAGE PyTorch is not installed" in out.stdout and "PyTorch' extension" in out.stdout, \
        out.stdout + out.stderr
    assert "NODES 0" in out.stdout


def test_module_description(module):
    parent = types.SimpleNamespace()
    module.DEQRegistration(parent)
    assert parent.categories == ["Registration"]
    assert "DEQ" in parent.title and "live layout" in parent.helpText and "Restore layout" in parent.helpText
    assert parent.contributors == module.CONTRIBUTORS


def test_logic_parameter_node_has_defaults(module):
    logic = module.DEQRegistrationLogic()
    node = logic.getParameterNode()
    assert node.GetParameter("Solver") == "auto" and node.GetParameter("RefreshEvery") == "5"
    assert node.GetParameter("Update") == "gradient"
    assert logic.getParameterNode() is node


def test_scripting_snippet_without_gui(module):
    """The README snippet: DEQRegistrationLogic().register(fixed, moving, max_steps=..., callback=...)."""
    pytest.importorskip("torch")
    from DEQRegistrationSlicerLib import testing
    shape = (20, 24, 24)
    A = testing.centred_affine(shape, (2.0, 1.5, 1.5), 10.0)
    f = testing.blob_function([[0, 0, 0], [6, -5, 3]], 5.0)
    fixedNode = testing.add_sampled_volume(f, shape, A, "fixed")
    movingNode = testing.add_sampled_volume(lambda p: f(p - [2.0, 0, 0]), shape, A, "moving")
    steps = []
    logic = module.DEQRegistrationLogic()
    outputs = logic.register(fixedNode, movingNode, max_steps=12, callback=lambda progress: steps.append(progress.step))
    assert steps == list(range(1, outputs.result.steps + 1))
    assert outputs.warpedVolume.GetScene() is slicer.mrmlScene
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    assert outputs.messages and outputs.messages[-1].startswith("Done")


def test_slicer_self_test_runs_on_real_mrml(module):
    """The ScriptedLoadableModuleTest that Slicer runs (CTest / Reload and Test), here on slicer-core."""
    pytest.importorskip("torch")
    result = unittest.TextTestRunner(verbosity=0).run(module.DEQRegistrationTest("runTest"))
    assert result.wasSuccessful(), result.errors + result.failures


# --- .ui ------------------------------------------------------------------------------------


def _ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def _referenced_widgets(module=None):
    source = open(MODULE_FILE).read()
    names = set(re.findall(r"self\.ui\.(\w+)", source))
    if module is not None:
        names |= set(module.PARAMETER_WIDGETS.values()) | set(module.NODE_WIDGETS.values()) | set(module.SECTIONS)
    return names


def test_ui_parses_and_every_referenced_widget_exists(module):
    widgets = _ui_widgets()
    referenced = _referenced_widgets(module)
    missing = sorted(referenced - set(widgets))
    assert not missing, missing
    from DEQRegistrationSlicerLib import parameters as P
    generated = {spec.name for spec in module.generatedParameters()}
    assert generated and not generated & set(module.PARAMETER_WIDGETS)
    assert set(module.PARAMETER_WIDGETS) | generated == set(P.BY_NAME)  # every parameter has its widget
    assert set(module.NODE_WIDGETS) == set(P.NODE_REFERENCES)
    for name in ("registerButton", "progressBar", "statusLabel", "advancedCollapsibleButton", "restoreLayoutButton",
                 "sampleDataButton"):
        assert name in widgets, name


def test_ui_advanced_collapsed_and_selectors_typed():
    widgets = _ui_widgets()

    def prop(widget, name):
        for p in widget.findall("property"):
            if p.get("name") == name:
                return p
        return None

    assert prop(widgets["advancedCollapsibleButton"], "collapsed").find("bool").text == "true"
    for name in ("solverComboBox", "modelComboBox", "deviceComboBox", "modelPathLineEdit", "refreshEverySpinBox",
                 "similarityComboBox", "diffusionWeightSpinBox"):
        # advanced settings live inside the collapsed section
        assert any(w.get("name") == name for w in widgets["advancedCollapsibleButton"].iter("widget")), name
    types_ = [s.text for s in prop(widgets["fixedLabelsSelector"], "nodeTypes").iter("string")]
    assert types_ == ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"]
    assert prop(widgets["fixedVolumeSelector"], "showChildNodeTypes").find("bool").text == "false"  # no label maps
    assert [s.text for s in prop(widgets["outputTransformSelector"], "nodeTypes").iter("string")] == [
        "vtkMRMLGridTransformNode"]
    # every node selector gets the scene through a connection
    receivers = {c.find("receiver").text for c in ET.parse(UI_FILE).iter("connection")}
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors <= receivers


# --- the panel against attribute stand-ins --------------------------------------------------------


class _Attr:
    def __init__(self, **kw):
        self.__dict__.update(text="", enabled=True, toolTip="", value=0, currentPath="", checked=False)
        self.__dict__.update(kw)


class _Selector(_Attr):
    def __init__(self):
        super().__init__(node=None)

    def setCurrentNode(self, node):
        self.node = node

    def currentNode(self):
        return self.node


class _Combo(_Attr):
    def __init__(self):
        super().__init__(items=[], texts=[], currentIndex=-1)

    def addItem(self, text, data):
        self.texts.append(text)
        self.items.append(data)

    def findData(self, data):
        return self.items.index(data) if data in self.items else -1

    def itemData(self, i):
        return self.items[i]

    def setCurrentIndex(self, i):
        self.currentIndex = i

    def select(self, data):
        self.currentIndex = self.findData(data)


class _Timer:
    """Stands in for the QTimer; the test calls the widget's onPoll() where its timeout would."""

    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def _widget_with_standin_ui(module):
    w = module.DEQRegistrationWidget.__new__(module.DEQRegistrationWidget)
    w._updatingGUIFromParameterNode = False
    w._startedAt = 0.0
    ui = types.SimpleNamespace()
    for name in _referenced_widgets(module):
        widget = (_Selector() if name.endswith("Selector") else _Combo() if name.endswith("ComboBox") else _Attr())
        setattr(ui, name, widget)
    w.ui = ui
    w.parameterWidgets = {name: getattr(ui, widgetName) for name, widgetName in module.PARAMETER_WIDGETS.items()}
    for spec in module.generatedParameters():  # what setup() builds with makeParameterWidget
        w.parameterWidgets[spec.name] = _Combo() if spec.choices else _Attr()
    w.fillChoices()
    w.logic = module.DEQRegistrationLogic()
    w.logic.statusCallback = w.onStatus
    w._pollTimer = _Timer()
    w._parameterNode = w.logic.getParameterNode()
    return w


@pytest.fixture
def app(monkeypatch):
    """A stand-in ``slicer.app`` (application logic only) and recorded dialogs."""
    from DEQRegistrationSlicerLib import testing
    manager = testing.LayoutManagerStandIn(slicer.mrmlScene)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(applicationLogic=lambda: manager.appLogic),
                        raising=False)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    return types.SimpleNamespace(manager=manager, errors=errors)


def test_choices_are_shown_with_words_not_identifiers(module):
    """Issue 9 (11): "fixed-point", "cuda" were shown as they are stored."""
    w = _widget_with_standin_ui(module)
    for name, widgetName in module.PARAMETER_WIDGETS.items():
        combo = getattr(w.ui, widgetName)
        if isinstance(combo, _Combo):
            assert combo.items and all(text != value for text, value in zip(combo.texts, combo.items)), name
    assert "fixed-point" not in w.ui.solverComboBox.texts and "cuda" not in w.ui.deviceComboBox.texts


def test_widget_gui_and_parameter_node_round_trip(module):
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    fixed = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "f")
    moving = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "m")
    w.updateGUIFromParameterNode()
    assert w.ui.registerButton.enabled is False  # no inputs yet
    assert w.ui.registerButton.toolTip == "Select fixed and moving volumes."
    w.ui.fixedVolumeSelector.setCurrentNode(fixed)
    w.ui.movingVolumeSelector.setCurrentNode(moving)
    w.ui.maxStepsSpinBox.value = 48
    w.ui.toleranceSpinBox.value = 0.002
    w.ui.refreshEverySpinBox.value = 3
    w.ui.diffusionWeightSpinBox.value = 1.25
    w.ui.updateComboBox.select("gradient")
    w.ui.solverComboBox.select("fixed-point")
    w.ui.modelComboBox.select("default")
    w.ui.deviceComboBox.select("cpu")
    w.ui.similarityComboBox.select("mse")
    built = w.parameterWidgets  # the Advanced rows the module builds from the parameter table
    built["Window"].value, built["StepSize"].value, built["Sigma"].value = 7, 0.5, 1.0
    built["Pyramid"].text, built["CpuFallback"].checked = "4, 2,1", False
    w.updateParameterNodeFromGUI()
    p = ParameterNode(w._parameterNode)
    assert (p.get("MaxSteps"), p.get("Tolerance"), p.get("RefreshEvery")) == (48, 0.002, 3)
    assert (p.get("Update"), p.get("Solver"), p.get("Device"), p.get("Similarity")) == (
        "gradient", "fixed-point", "cpu", "mse")
    assert p.getNode("FixedVolume") is fixed and p.getNode("MovingVolume") is moving
    assert p.settings() == {"update": "gradient", "max_steps": 48, "tol": 0.002, "solver": "fixed-point",
                            "device": "cpu", "similarity": "mse", "diffusion_weight": 1.25, "window": 7,
                            "step_size": 0.5, "sigma": 1.0, "pyramid": [4, 2, 1], "cpu_fallback": False,
                            "init": "affine"}
    # and back: a fresh GUI shows the stored settings
    w2 = _widget_with_standin_ui(module)
    w2.updateGUIFromParameterNode()
    assert w2.ui.maxStepsSpinBox.value == 48 and w2.ui.fixedVolumeSelector.currentNode() is fixed
    assert w2.ui.solverComboBox.itemData(w2.ui.solverComboBox.currentIndex) == "fixed-point"
    assert w2.ui.registerButton.enabled is True and w2.ui.registerButton.text == "Register"
    assert w2.ui.modelComboBox.enabled is False and w2.ui.similarityComboBox.enabled is True
    built2 = w2.parameterWidgets
    assert (built2["Window"].value, built2["Pyramid"].text, built2["CpuFallback"].checked) == (7, "4, 2,1", False)
    assert built2["Window"].enabled is False and built2["StepSize"].enabled is True  # the window is LNCC's
    p.set("Similarity", "lncc")
    w2.updateGUIFromParameterNode()
    assert built2["Window"].enabled is True
    p.set("Update", "learned")
    w2.updateGUIFromParameterNode()
    assert w2.ui.modelComboBox.enabled is True and w2.ui.similarityComboBox.enabled is False
    assert built2["Window"].enabled is False and built2["Sigma"].enabled is False  # the model keeps its own
    assert built2["Pyramid"].enabled is True and built2["CpuFallback"].enabled is True
    assert "step_size" not in p.settings() and p.settings()["pyramid"] == [4, 2, 1]


def test_advanced_rows_are_built_from_the_parameter_table(module, monkeypatch):
    """makeParameterWidget (Qt in Slicer; here a recording stand-in of the four Qt classes it uses)."""
    from DEQRegistrationSlicerLib import parameters as P

    class QWidget:
        def __init__(self):
            self.decimals = None

    fake = types.SimpleNamespace(**{name: type(name, (QWidget,), {}) for name in
                                    ("QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit")})
    monkeypatch.setattr(module, "qt", fake)
    made = {spec.name: module.makeParameterWidget(spec) for spec in module.generatedParameters()}
    assert type(made["Window"]).__name__ == "QSpinBox" and (made["Window"].minimum, made["Window"].singleStep) == (3, 2)
    assert type(made["Sigma"]).__name__ == "QDoubleSpinBox" and made["Sigma"].decimals == 2
    assert type(made["CpuFallback"]).__name__ == "QCheckBox" and type(made["Pyramid"]).__name__ == "QLineEdit"
    for name, widget in made.items():
        assert widget.toolTip == P.BY_NAME[name].tooltip and widget.objectName
    assert module.widgetSignal(P.BY_NAME["CpuFallback"]) == "toggled(bool)"
    assert module.widgetSignal(P.BY_NAME["Pyramid"]) == "editingFinished()"


def test_malformed_level_list_is_refused_with_its_name_and_creates_nothing(module, app):
    pytest.importorskip("torch")
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    w.logic.ensureDependencies = lambda requirements=None: True
    p = ParameterNode(w._parameterNode)
    p.setNode("FixedVolume", slicer.util.addVolumeFromArray(np.ones((6, 6, 6), np.float32), np.eye(4), "f"))
    p.setNode("MovingVolume", slicer.util.addVolumeFromArray(np.ones((6, 6, 6), np.float32), np.eye(4), "m"))
    n = slicer.mrmlScene.GetNumberOfNodes()
    for text, reason in (("4, two, 1", "Pyramid must be numbers"), ("1, 2", "coarse to fine")):
        p.set("Pyramid", text)
        w.onRegisterButton()
        assert app.errors and reason in app.errors[-1] and not w.logic.isRunning, app.errors
        assert slicer.mrmlScene.GetNumberOfNodes() == n


def test_learned_mode_on_a_3d_volume_without_a_3d_model_disables_register(module):
    """Issue 9 (4), in the panel: say why instead of failing after creating nodes."""
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    p = ParameterNode(w._parameterNode)
    for shape, ndim in (((6, 6, 6), 3), ((1, 6, 6), 2)):
        p.setNode("FixedVolume", slicer.util.addVolumeFromArray(np.zeros(shape, np.float32), np.eye(4), "f"))
        p.setNode("MovingVolume", slicer.util.addVolumeFromArray(np.zeros(shape, np.float32), np.eye(4), "m"))
        p.set("Update", "hybrid")
        w.updateGUIFromParameterNode()
        assert w.ui.registerButton.enabled is module.defaultModelAvailable(ndim), ndim
        if not module.defaultModelAvailable(ndim):
            assert f"No shipped model for {ndim}D" in w.ui.registerButton.toolTip
    pytest.importorskip("torch")
    from DEQRegistrationLib.checkpoint import default_model_path
    for ndim in (2, 3):  # the panel's check agrees with the library's
        assert module.defaultModelAvailable(ndim) == default_model_path(ndim).is_file()


def test_register_runs_in_the_background_and_the_panel_follows_it(module, app):
    """Register -> Cancel (inputs locked) -> a parameter change keeps "Cancelling..." -> finished, unlocked."""
    pytest.importorskip("torch")
    from DEQRegistrationSlicerLib import layout, testing
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    w.logic.ensureDependencies = lambda requirements=None: True  # the install dialogs need Qt
    shape = (16, 20, 20)
    A = testing.centred_affine(shape, (1.5, 1.5, 1.5), 0.0)
    f = testing.blob_function([[0, 0, 0], [5, -4, 3]], 4.0)
    p = ParameterNode(w._parameterNode)
    p.setNode("FixedVolume", testing.add_sampled_volume(f, shape, A, "fixed"))
    p.setNode("MovingVolume", testing.add_sampled_volume(lambda q: f(q - [1.5, 0, 0]), shape, A, "moving"))
    p.set("MaxSteps", 400)
    p.set("RefreshEvery", 2)
    w.updateGUIFromParameterNode()
    w.onRegisterButton()
    assert w.logic.isRunning and w._pollTimer.active
    assert w.ui.registerButton.text == "Cancel" and w.ui.registerButton.enabled
    assert all(getattr(w.ui, name).enabled is False for name in module.SECTIONS)  # issue 9 (11): inputs locked
    assert LiveLayoutActive(app.manager, layout)
    run = w.logic.run
    assert p.getNode("OutputVolume") is run.nodes.warpedVolume  # remembered at once: selectors show the outputs
    w.onRegisterButton()  # the second click of a double click: neither a nested run nor a cancel
    assert w.logic.run is run and not run.cancelRequested
    w._startedAt -= 10  # later: a real Cancel click
    w.onRegisterButton()
    assert w.ui.registerButton.text == "Cancelling..." and not w.ui.registerButton.enabled
    p.set("RefreshEvery", 3)  # issue 9 (11): a parameter change used to reset "Cancelling..."
    assert w.ui.registerButton.text == "Cancelling..."
    while w._pollTimer.active:
        w.onPoll()
    assert not w.logic.isRunning and run.outputs.result.cancelled
    assert w.ui.registerButton.text == "Register" and w.ui.registerButton.enabled
    assert all(getattr(w.ui, name).enabled is True for name in module.SECTIONS)
    assert "Cancelled" in w.ui.statusLabel.text and not app.errors
    assert w.ui.restoreLayoutButton.enabled
    w.onRestoreLayout()
    assert not w.ui.restoreLayoutButton.enabled


def LiveLayoutActive(manager, layout):
    return manager.layoutNode.GetViewArrangement() == layout.LAYOUT_ID


def test_refused_registration_shows_the_reason_and_creates_nothing(module, app):
    pytest.importorskip("torch")
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    w.logic.ensureDependencies = lambda requirements=None: True
    p = ParameterNode(w._parameterNode)
    fixed = slicer.util.addVolumeFromArray(np.ones((6, 6, 6), np.float32), np.eye(4), "f")
    p.setNode("FixedVolume", fixed)
    p.setNode("MovingVolume", fixed)
    p.setNode("OutputVolume", fixed)  # an output that is an input
    n = slicer.mrmlScene.GetNumberOfNodes()
    w.onRegisterButton()
    assert app.errors and "is an input" in app.errors[0] and not w.logic.isRunning
    assert slicer.mrmlScene.GetNumberOfNodes() == n


# --- dependencies -----------------------------------------------------------------------------


def test_packages_installed_only_after_confirmation_and_the_wait_cursor_never_covers_a_question():
    from contextlib import contextmanager
    from DEQRegistrationSlicerLib import dependencies as D
    log = []

    @contextmanager
    def busy():
        log.append("busy on")
        yield
        log.append("busy off")

    req = {"surely_not_installed_pkg_x": "surely-not-installed-pkg-x>=1"}
    with pytest.raises(D.MissingDependency, match="Missing"):
        D.ensurePackages(lambda m: log.append("asked") or False, lambda r: log.append("installed"), req, busy)
    assert log == ["asked"]
    log.clear()
    with pytest.raises(D.MissingDependency, match="Could not install"):
        D.ensurePackages(lambda m: log.append("asked") or True, lambda r: log.append("installed " + r), req, busy)
    assert log == ["asked", "busy on", "installed surely-not-installed-pkg-x>=1", "busy off"]

    def failing_pip(requirement):
        raise RuntimeError("pip: no network")

    with pytest.raises(D.MissingDependency, match="failed.*no network"):
        D.ensurePackages(lambda m: True, failing_pip, req, busy)
    assert D.ensurePackages(lambda m: pytest.fail("nothing to ask"), failing_pip, {"numpy": "numpy"}) == []


def test_torch_comes_from_the_pytorch_extension_and_its_failures_are_reported(monkeypatch):
    from DEQRegistrationSlicerLib import dependencies as D
    real_find = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None if name == "torch" else real_find(name))
    calls = []

    class FakeLogic:  # stands in for PyTorchUtils.PyTorchUtilsLogic (PyTorch extension, needs Slicer)
        torch = None

        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append((askConfirmation, torchVersionRequirement))
            return types.SimpleNamespace(__version__="2.4.1+cu121")

    fake = types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic)
    assert D.ensureTorch(fake).__version__ == "2.4.1+cu121"
    assert calls == [(True, D.TORCH_REQUIREMENT)]
    FakeLogic.installTorch = lambda self, **kw: None  # the user declined
    with pytest.raises(D.MissingDependency, match="not installed"):
        D.ensureTorch(fake)

    def broken(self, **kw):  # issue 9 (7): a failure inside the installer showed no dialog
        raise OSError("could not reach download.pytorch.org")

    FakeLogic.installTorch = broken
    with pytest.raises(D.MissingDependency, match="Installing PyTorch failed.*download.pytorch.org"):
        D.ensureTorch(fake)
    FakeLogic.torchInstalled = lambda self: True  # issue 9 (7): an installed torch was not version-checked
    FakeLogic.torch = types.SimpleNamespace(__version__="1.13.1")
    with pytest.raises(D.MissingDependency, match="PyTorch 1.13.1 is installed but DEQRegistration needs >=2.1"):
        D.ensureTorch(fake)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension installed
    with pytest.raises(D.MissingDependency, match="PyTorch"):
        D.ensureTorch()


def test_version_comparison():
    from DEQRegistrationSlicerLib.dependencies import version_at_least
    assert version_at_least("2.13.0+cpu", "2.1") and version_at_least("2.1", "2.1")
    assert not version_at_least("2.0.1", "2.1") and not version_at_least("1.13", "2.1")
    assert version_at_least("3", "2.1")


# --- sample data ----------------------------------------------------------------------------------


def test_sample_pair_loads_real_anatomy_and_the_panel_selects_it(module, app):
    """The one-click "try it" pair: the MNI template (nilearn's wheel, offline) and its deformed copy, loaded
    through the panel's "Load sample pair" (the dialogs and wait cursor around it need Qt) and selected."""
    pytest.importorskip("torch")
    pytest.importorskip("nilearn")
    from DEQRegistrationLib import metrics
    from DEQRegistrationSlicerLib import mrml, sampledata
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    loaded = []
    w.logic.loadSampleDataInteractively = lambda: loaded.append(sampledata.loadSamplePair(slicer.mrmlScene)) or \
        loaded[-1]
    w.onLoadSampleData()
    w.updateGUIFromParameterNode()  # what the parameter node's observer does in Slicer
    pair = loaded[0]
    fixed, fixedAffine = mrml.volume_to_library(pair.fixed)
    moving, movingAffine = mrml.volume_to_library(pair.moving)
    labels, _ = mrml.volume_to_library(pair.fixedLabels)
    movingLabels, _ = mrml.volume_to_library(pair.movingLabels)
    assert fixed.ndim == 3 and min(fixed.shape) > 40 and fixed.shape == moving.shape
    np.testing.assert_allclose(np.abs(np.diag(fixedAffine)[:3]), [2, 2, 2])
    np.testing.assert_allclose(fixedAffine, movingAffine)
    assert pair.fixedLabels.IsA("vtkMRMLLabelMapVolumeNode") and set(np.unique(labels)) == {0, 1, 2, 3}
    assert 0.5 < metrics.mean_dice(labels, movingLabels) < 0.95  # deformed, not a copy
    assert "MNI" in pair.description and pair.fixed.GetName() == "MNI152 template"
    # the panel: the four nodes selected as inputs, the description shown, Register ready
    p = ParameterNode(w._parameterNode)
    assert [p.getNode(role) for role in ("FixedVolume", "MovingVolume", "FixedLabels", "MovingLabels")] == \
        [pair.fixed, pair.moving, pair.fixedLabels, pair.movingLabels]
    assert "MNI" in w.ui.statusLabel.text
    assert w.ui.registerButton.enabled and w.ui.registerButton.text == "Register"


# --- packaging ----------------------------------------------------------------------------------


def _cmake_set(text, name):
    m = re.search(r"set\(%s\s+(\"[^\"]*\"|\S+)\)" % name, text)
    return m.group(1).strip('"') if m else None


#: the Extensions Index's catalog entry schema v1.0.1 (what Slicer 5.10's index validates): allowed keys
CATALOG_ENTRY_KEYS_V1_0_1 = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                             "build_subdirectory", "enabled", "tier"}


def test_extension_cmake_and_catalog_entry(module):
    """Issue 9 (10): contributors' form, URLs that point at files of this repository, the 5.10 schema."""
    top = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    project = re.search(r"project\((\w+)\)", top).group(1)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert _cmake_set(top, var), var
    assert _cmake_set(top, "EXTENSION_CATEGORY") == "Registration"
    assert _cmake_set(top, "EXTENSION_DEPENDS") == "PyTorch"
    assert not project.startswith("Slicer")
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(DEQRegistration)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in top
    # contributors: "Firstname Lastname (Organization)", the same in CMake and in the module
    contributors = re.findall(r'"([^"]+)"', re.search(r"set\(EXTENSION_CONTRIBUTORS\s+(.*)\)", top).group(1))
    assert contributors == module.CONTRIBUTORS
    for c in contributors:
        assert re.fullmatch(r"[A-Z][\w.'-]*( [A-Z][\w.'-]*)+ \([^()]+\)", c), c
    # the catalog entry (file name == project()), valid against schema v1.0.1
    entry = json.load(open(os.path.join(ROOT, project + ".json")))
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert set(entry) <= CATALOG_ENTRY_KEYS_V1_0_1 and {"$schema", "category", "scm_url"} <= set(entry)
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["category"] == "Registration" and entry["build_dependencies"] == ["PyTorch"]
    # one repository behind every URL; icon and screenshot are raw files of it that exist here, as PNGs
    repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(\.git)?", entry["scm_url"]).group(1)
    assert re.fullmatch(r"https://github\.com/%s(#.*)?" % re.escape(repo), _cmake_set(top, "EXTENSION_HOMEPAGE"))
    urls = [_cmake_set(top, "EXTENSION_ICONURL")] + _cmake_set(top, "EXTENSION_SCREENSHOTURLS").split()
    from PIL import Image
    for url in urls:
        m = re.fullmatch(r"https://raw\.githubusercontent\.com/%s/%s/(.+\.png)" % (re.escape(repo),
                                                                                  entry["scm_revision"]), url)
        assert m, url
        with Image.open(os.path.join(ROOT, m.group(1))) as im:
            assert im.format == "PNG"
    assert os.path.exists(os.path.join(ROOT, "LICENSE.txt"))
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE.txt")).read(400)


def test_module_cmake_lists_every_file_and_installs_the_library():
    text = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    listed = set(re.findall(r"(DEQRegistrationSlicerLib/\w+\.py)", text))
    present = {"DEQRegistrationSlicerLib/" + f for f in os.listdir(os.path.join(MODULE_DIR, "DEQRegistrationSlicerLib"))
               if f.endswith(".py")}
    assert listed == present
    assert "Resources/UI/${MODULE_NAME}.ui" in text and "Resources/Icons/${MODULE_NAME}.png" in text
    assert "../DEQRegistrationLib" in text and 'PATTERN "*.pt"' in text and "${DEQREG_LIB_SOURCE_DIR}/models/*.pt" in text


def test_icons_are_128_pngs():
    from PIL import Image
    for path in ("DEQReg.png", "DEQRegistration/Resources/Icons/DEQRegistration.png"):
        with Image.open(os.path.join(ROOT, path)) as im:
            assert im.format == "PNG" and im.size == (128, 128), path
