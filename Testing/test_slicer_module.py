"""The scripted module file, its .ui, its dependencies handling and the extension's packaging files.

slicer-core has no Qt, no ctk and no ``slicer.ScriptedLoadableModule``, so this
file stands them in with the smallest honest test doubles:

* ``qt`` and ``ctk``: empty modules (the module file imports them but uses
  them only inside the widget, which needs a real Qt application);
* ``slicer.ScriptedLoadableModule``: the four base classes. The logic's
  ``getParameterNode`` does what Slicer's does (one vtkMRMLScriptedModuleNode
  per module, found or added in the scene); the test base class is
  ``unittest.TestCase`` with ``delayDisplay`` logging the message.

With those, the module's logic and its real Slicer self-test run against real
MRML. The widget's GUI <-> parameter-node code runs against plain attribute
stand-ins for the .ui widgets (no signals, no rendering): it checks the
mapping and the Register/Cancel switch, not the look of the panel.
"""
import importlib
import json
import os
import re
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


# --- stand-ins ------------------------------------------------------------------------------


def _scripted_module_standin():
    m = types.ModuleType("slicer.ScriptedLoadableModule")

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

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(m, cls.__name__, cls)
    return m


@pytest.fixture(scope="module")
def module():
    saved = {k: sys.modules.get(k) for k in ("qt", "ctk", "slicer.ScriptedLoadableModule", "DEQRegistration")}
    sys.modules["qt"] = types.ModuleType("qt")
    sys.modules["ctk"] = types.ModuleType("ctk")
    sys.modules["slicer.ScriptedLoadableModule"] = _scripted_module_standin()
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


# --- module file ----------------------------------------------------------------------------


def test_module_load_imports_nothing_heavy():
    """Loading the module must not import torch or the registration library (Slicer start-up cost)."""
    import subprocess
    code = f"""
import sys, types
sys.path[:0] = [{MODULE_DIR!r}, {ROOT!r}]
sys.modules['qt'] = types.ModuleType('qt'); sys.modules['ctk'] = types.ModuleType('ctk')
sm = types.ModuleType('slicer.ScriptedLoadableModule')
for n in ('ScriptedLoadableModule', 'ScriptedLoadableModuleWidget', 'ScriptedLoadableModuleLogic',
          'ScriptedLoadableModuleTest'):
    setattr(sm, n, type(n, (), {{}}))
sys.modules['slicer.ScriptedLoadableModule'] = sm
import DEQRegistration
heavy = [m for m in ('torch', 'DEQRegistrationLib', 'scipy') if m in sys.modules]
print('HEAVY', heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_module_description(module):
    parent = types.SimpleNamespace()
    module.DEQRegistration(parent)
    assert parent.categories == ["Registration"]
    assert "DEQ" in parent.title and parent.helpText


def test_logic_parameter_node_has_defaults(module):
    logic = module.DEQRegistrationLogic()
    node = logic.getParameterNode()
    assert node.GetParameter("Solver") == "auto" and node.GetParameter("RefreshEvery") == "5"
    assert logic.getParameterNode() is node


def test_scripting_snippet_without_gui(module):
    """The README snippet: DEQRegistrationLogic().register(fixed, moving, maxSteps=..., callback=...)."""
    from DEQRegistrationSlicerLib import testing
    shape = (20, 24, 24)
    A = testing.centred_affine(shape, (2.0, 1.5, 1.5), 10.0)
    f = testing.blob_function([[0, 0, 0], [6, -5, 3]], 5.0)
    fixedNode = testing.add_sampled_volume(f, shape, A, "fixed")
    movingNode = testing.add_sampled_volume(lambda p: f(p - [2.0, 0, 0]), shape, A, "moving")
    steps = []
    logic = module.DEQRegistrationLogic()
    outputs = logic.register(fixedNode, movingNode, maxSteps=12, callback=lambda progress: steps.append(progress.step))
    assert steps == list(range(1, outputs.result.steps + 1))
    assert outputs.warpedVolume.GetScene() is slicer.mrmlScene
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    assert outputs.messages and outputs.messages[-1].startswith("Done")


def test_slicer_self_test_runs_on_real_mrml(module):
    """The ScriptedLoadableModuleTest that Slicer runs (CTest / Reload and Test), here on slicer-core."""
    result = unittest.TextTestRunner(verbosity=0).run(module.DEQRegistrationTest("runTest"))
    assert result.wasSuccessful(), result.errors + result.failures


# --- .ui ------------------------------------------------------------------------------------


def _ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def test_ui_parses_and_every_referenced_widget_exists():
    widgets = _ui_widgets()
    source = open(MODULE_FILE).read()
    referenced = set(re.findall(r"self\.ui\.(\w+)", source))
    assert referenced, "module file references no widgets?"
    missing = sorted(referenced - set(widgets))
    assert not missing, missing
    # the panel the issue asks for
    for name in ("fixedVolumeSelector", "movingVolumeSelector", "fixedLabelsSelector", "movingLabelsSelector",
                 "maxStepsSpinBox", "toleranceSpinBox", "solverComboBox", "updateModeComboBox", "modelComboBox",
                 "modelPathLineEdit", "deviceComboBox", "refreshEverySpinBox", "registerButton", "progressBar",
                 "statusLabel", "advancedCollapsibleButton"):
        assert name in widgets, name


def test_ui_advanced_collapsed_and_selectors_typed():
    widgets = _ui_widgets()

    def prop(widget, name):
        for p in widget.findall("property"):
            if p.get("name") == name:
                return p
        return None

    assert prop(widgets["advancedCollapsibleButton"], "collapsed").find("bool").text == "true"
    for name in ("solverComboBox", "modelComboBox", "deviceComboBox", "modelPathLineEdit", "refreshEverySpinBox"):
        # advanced settings live inside the collapsed section
        assert any(w.get("name") == name for w in widgets["advancedCollapsibleButton"].iter("widget")), name
    types_ = [s.text for s in prop(widgets["fixedLabelsSelector"], "nodeTypes").iter("string")]
    assert types_ == ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"]
    assert [s.text for s in prop(widgets["outputTransformSelector"], "nodeTypes").iter("string")] == [
        "vtkMRMLGridTransformNode"]
    # every node selector gets the scene through a connection
    receivers = {c.find("receiver").text for c in ET.parse(UI_FILE).iter("connection")}
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors <= receivers


# --- widget logic against attribute stand-ins ------------------------------------------------------


class _Attr:
    def __init__(self, **kw):
        self.__dict__.update(text="", enabled=True, toolTip="", value=0, currentPath="")
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
        super().__init__(items=[], currentIndex=-1)

    def addItem(self, text, data):
        self.items.append(data)

    def findData(self, data):
        return self.items.index(data) if data in self.items else -1

    def itemData(self, i):
        return self.items[i]

    def setCurrentIndex(self, i):
        self.currentIndex = i


def _widget_with_standin_ui(module):
    from DEQRegistrationSlicerLib import parameters as P
    w = module.DEQRegistrationWidget.__new__(module.DEQRegistrationWidget)
    w._updatingGUIFromParameterNode = False
    names = set(re.findall(r"self\.ui\.(\w+)", open(MODULE_FILE).read()))
    ui = types.SimpleNamespace()
    for name in names:
        if name.endswith("Selector"):
            setattr(ui, name, _Selector())
        elif name.endswith("ComboBox"):
            setattr(ui, name, _Combo())
        else:
            setattr(ui, name, _Attr())
    for combo, values in ((ui.solverComboBox, P.SOLVERS), (ui.updateModeComboBox, P.UPDATE_MODES),
                          (ui.modelComboBox, P.MODELS), (ui.deviceComboBox, P.DEVICES)):
        for v in values:
            combo.addItem(v, v)
    w.ui = ui
    w.logic = module.DEQRegistrationLogic()
    w._parameterNode = w.logic.getParameterNode()
    return w


def test_widget_gui_and_parameter_node_round_trip(module):
    from DEQRegistrationSlicerLib.parameters import ParameterNode
    w = _widget_with_standin_ui(module)
    fixed = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "f")
    moving = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), np.eye(4), "m")
    w.updateGUIFromParameterNode()
    assert w.ui.registerButton.enabled is False  # no inputs yet
    w.ui.fixedVolumeSelector.setCurrentNode(fixed)
    w.ui.movingVolumeSelector.setCurrentNode(moving)
    w.ui.maxStepsSpinBox.value = 48
    w.ui.toleranceSpinBox.value = 0.002
    w.ui.refreshEverySpinBox.value = 3
    w.ui.updateModeComboBox.setCurrentIndex(w.ui.updateModeComboBox.findData("learned"))
    w.ui.solverComboBox.setCurrentIndex(w.ui.solverComboBox.findData("fixed-point"))
    w.ui.modelComboBox.setCurrentIndex(w.ui.modelComboBox.findData("default"))
    w.ui.deviceComboBox.setCurrentIndex(w.ui.deviceComboBox.findData("cpu"))
    w.updateParameterNodeFromGUI()
    p = ParameterNode(w._parameterNode)
    assert (p.get("MaxSteps"), p.get("Tolerance"), p.get("RefreshEvery")) == (48, 0.002, 3)
    assert (p.get("UpdateMode"), p.get("Solver"), p.get("Device")) == ("learned", "fixed-point", "cpu")
    assert p.getNode("FixedVolume") is fixed and p.getNode("MovingVolume") is moving
    # and back: a fresh GUI shows the stored settings
    w2 = _widget_with_standin_ui(module)
    w2.updateGUIFromParameterNode()
    assert w2.ui.maxStepsSpinBox.value == 48 and w2.ui.fixedVolumeSelector.currentNode() is fixed
    assert w2.ui.solverComboBox.itemData(w2.ui.solverComboBox.currentIndex) == "fixed-point"
    assert w2.ui.registerButton.enabled is True and w2.ui.registerButton.text == "Register"
    assert w2.ui.modelComboBox.enabled is True  # learned mode uses a model


def test_register_button_turns_into_cancel(module):
    w = _widget_with_standin_ui(module)
    w.logic.isRunning = True
    w.updateGUIFromParameterNode()
    assert w.ui.registerButton.text == "Cancel" and w.ui.registerButton.enabled
    w.onRegisterButton()  # clicked while running: cancels, does not start another run
    assert w.logic._cancelRequested
    assert w.ui.registerButton.text.startswith("Cancelling")


# --- dependencies -----------------------------------------------------------------------------


def test_packages_installed_only_after_confirmation():
    from DEQRegistrationSlicerLib import dependencies as D
    asked, installed = [], []
    req = {"surely_not_installed_pkg_x": "surely-not-installed-pkg-x>=1"}
    with pytest.raises(D.MissingDependency, match="Missing"):
        D.ensurePackages(lambda m: asked.append(m) or False, installed.append, req)
    assert asked and not installed
    with pytest.raises(D.MissingDependency, match="Could not install"):
        D.ensurePackages(lambda m: True, installed.append, req)
    assert installed == ["surely-not-installed-pkg-x>=1"]
    assert D.ensurePackages(lambda m: pytest.fail("nothing to ask"), installed.append, {"numpy": "numpy"}) == []


def test_torch_comes_from_the_pytorch_extension(monkeypatch):
    from DEQRegistrationSlicerLib import dependencies as D
    real_find = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None if name == "torch" else real_find(name))
    calls = []

    class FakeLogic:  # stands in for PyTorchUtils.PyTorchUtilsLogic (PyTorch extension)
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append((askConfirmation, torchVersionRequirement))
            return "torch-module"

    fake = types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic)
    assert D.ensureTorch(fake) == "torch-module"
    assert calls == [(True, D.TORCH_REQUIREMENT)]
    FakeLogic.installTorch = lambda self, **kw: None  # the user declined
    with pytest.raises(D.MissingDependency):
        D.ensureTorch(fake)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension installed
    with pytest.raises(D.MissingDependency, match="PyTorch"):
        D.ensureTorch()


# --- packaging ----------------------------------------------------------------------------------


def _cmake_set(text, name):
    m = re.search(r"set\(%s\s+(\"[^\"]*\"|\S+)\)" % name, text)
    return m.group(1).strip('"') if m else None


def test_extension_cmake_and_catalog_entry():
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
    entry = json.load(open(os.path.join(ROOT, project + ".json")))  # file name == project()
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "build_dependencies", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Registration" and entry["build_dependencies"] == ["PyTorch"]
    assert "slicer-extension-catalog-entry-schema-v1.0.2.json" in entry["$schema"]
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
