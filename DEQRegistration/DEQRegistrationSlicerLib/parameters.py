"""The module's settings, kept on a vtkMRMLScriptedModuleNode, and their one mapping to the library's Settings.

Values live as strings (``SetParameter``) and node selections as node
references (``SetNodeReferenceID``), so they are saved with the scene and come
back on load. ``PARAMETERS`` is the only table of them: each row names the
parameter, its type and default, its allowed values and the field of
``DEQRegistrationLib.config.Settings`` it sets. ``ParameterNode.settings()``
turns a node into the keyword arguments of ``register()`` (a plain dict,
passed through ``RegistrationLogic.start`` to the library's
``make_settings``, which refuses names it does not know); nothing else
translates between the two. Adding a library setting to the panel is one row
here: a row with a ``label`` and no widget in the .ui gets its widget built by
the module in the "Advanced" section (``DEQRegistration.py``,
``makeParameterWidget``); a row with choices also needs the words for them in
the module's ``choiceLabels`` (a test refuses identifiers shown as they are).
For example, once the library has them: ``Parameter("Init", str, "affine",
("none", "center", "rigid", "affine"), setting="init", label="Initial
alignment:")``.

This small typed wrapper replaces ``parameterNodeWrapper``, which needs Qt and
therefore cannot run on ``slicer-core``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

# The library's choices, repeated here because importing DEQRegistrationLib
# imports torch (the module must load without it); a test checks they match.
UPDATES = ("gradient", "learned", "hybrid", "features")
INITS = ("affine", "rigid", "center", "none")
SOLVERS = ("anderson", "fixed-point")
SIMILARITIES = ("lncc", "mse", "mind")
INIT_SIMILARITIES = ("ncc", "mi", "lncc", "mse")
CUSTOM = "custom"
#: the library's presets (config.PRESETS) as the panel's values; choosing one sets these parameters, and
#: changing one of them afterwards makes the choice "custom" again (``ParameterNode.set``)
PRESET_VALUES = {
    "brain-mri": {"Init": "affine", "InitSimilarity": "auto", "Similarity": "lncc"},
    "multimodal": {"Init": "rigid", "InitSimilarity": "mi", "Similarity": "mind"},
    "lung-ct": {"Init": "rigid", "InitSimilarity": "ncc", "Similarity": "mind"},
}
PRESETS = tuple(PRESET_VALUES)
DEVICES = ("auto", "cpu", "cuda")
MODELS = ("default", "file")
AUTO = "auto"


@dataclass(frozen=True)
class Parameter:
    name: str                       # key on the parameter node (saved with the scene)
    kind: type
    default: object
    choices: Tuple = ()             # allowed values (empty: any value of ``kind``)
    setting: Optional[str] = None   # the Settings field it sets; None: used by the module only
    auto: object = None             # the value meaning "the mode's own default" (not passed on)
    gradient_only: bool = False     # a setting of the weight-free update (a model keeps its own)
    # a row the module builds a widget for (no widget in the .ui): its label, tooltip and range
    label: str = ""
    tooltip: str = ""
    limits: Tuple = ()              # numbers: (minimum, maximum, single step[, decimals])
    only_with: Tuple = ()           # (parameter, value): the widget is enabled only when that parameter has it

    def parse(self, text):
        """The stored string as a value of ``kind`` (ValueError when it is not one; lists are checked by
        ``ParameterNode.settings``, so a malformed one is reported, not silently dropped)."""
        if self.kind is bool:
            if text not in ("True", "False"):
                raise ValueError(text)
            return text == "True"
        return self.kind(text)


def numbers(text: str, name: str = "value"):
    """A comma-separated list of numbers as ints (or floats); an empty text is None (the library's own)."""
    parts = [t.strip() for t in str(text).replace(";", ",").split(",") if t.strip()]
    if not parts:
        return None
    try:
        values = [float(t) for t in parts]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas, got {text!r}") from None
    return [int(v) if v.is_integer() else v for v in values]


#: settings given as a list of numbers (stored as text, e.g. "4, 2, 1")
LIST_SETTINGS = ("pyramid", "level_weights")


PARAMETERS = (
    # first in the panel: a bundle of the alignment and similarity rows below
    Parameter("Preset", str, CUSTOM, (CUSTOM,) + PRESETS, setting="preset", auto=CUSTOM, label="Preset:",
              tooltip="Settings for a common case: brain MRI of one sequence (affine alignment, LNCC), another "
                      "contrast or scanner (rigid alignment by mutual information, MIND-SSC), lung CT inhale/"
                      "exhale (rigid, MIND-SSC; add lung masks). Changing one of its settings makes it custom."),
    Parameter("Update", str, "gradient", UPDATES, setting="update"),
    Parameter("MaxSteps", int, 0, setting="max_steps", auto=0),
    Parameter("Tolerance", float, 0.0, setting="tol", auto=0.0),
    Parameter("Solver", str, AUTO, (AUTO,) + SOLVERS, setting="solver", auto=AUTO),
    Parameter("Model", str, "default", MODELS),          # with ModelPath: the "model" setting
    Parameter("ModelPath", str, ""),
    Parameter("Device", str, AUTO, DEVICES, setting="device"),
    Parameter("Similarity", str, "lncc", SIMILARITIES, setting="similarity", gradient_only=True),
    # 0 shows "auto": the similarity's own diffusion weight and step (the library's SIMILARITY_DEFAULTS)
    Parameter("DiffusionWeight", float, 0.0, setting="diffusion_weight", gradient_only=True, auto=0.0),
    Parameter("RefreshEvery", int, 5),
    # built by the module (no .ui widget): one row each
    Parameter("Window", int, 5, setting="window", gradient_only=True, label="LNCC window:",
              tooltip="Side of the local window of the LNCC similarity, in voxels (odd).", limits=(3, 15, 2),
              only_with=("Similarity", "lncc")),
    Parameter("StepSize", float, 0.0, setting="step_size", gradient_only=True, label="Step size:", auto=0.0,
              tooltip="Descent step of the gradient update (larger moves faster, may oscillate; auto: the "
                      "similarity's own).",
              limits=(0.0, 10.0, 0.1, 2)),
    Parameter("Init", str, "affine", INITS, setting="init", label="Initial alignment:",
              tooltip="The linear stage before the deformable one: none (trust the headers), centres of mass, "
                      "rigid, or affine (rigid, then scaling and shear)."),
    Parameter("InitSimilarity", str, AUTO, (AUTO,) + INIT_SIMILARITIES, setting="init_similarity", auto=AUTO,
              label="Alignment similarity:",
              tooltip="What the initial alignment compares: global normalized cross-correlation, mutual "
                      "information (another contrast), LNCC or mean squared error (auto: the one that suits the "
                      "deformable similarity; with MIND-SSC both global measures, keeping mutual information's pose "
                      "when the two scans' contrasts differ)."),
    Parameter("Sigma", float, 1.5, setting="sigma", gradient_only=True, label="Step smoothing:",
              tooltip="Width (voxels) of the Gaussian that smooths each step of the gradient update (0: none).",
              limits=(0.0, 10.0, 0.25, 2)),
    Parameter("Pyramid", str, "", setting="pyramid", auto="", label="Levels:",
              tooltip="Downsampling factor of each resolution level, coarse to fine, e.g. 4, 2, 1 (empty: the "
                      "update's own; a 1 mm brain gets 4, 2, a 2 mm working grid: 4, 2, 1 adds the full grid, "
                      "slower and more accurate)."),
    Parameter("LevelWeights", str, "", setting="level_weights", auto="", label="Level weights:",
              tooltip="How the step budget is split over the levels, e.g. 1, 1, 2 (empty: equal)."),
    Parameter("CpuFallback", bool, True, setting="cpu_fallback", label="CPU fallback:",
              tooltip="When the GPU runs out of memory, run the registration again on the CPU."),
)
BY_NAME = {p.name: p for p in PARAMETERS}
#: names a saved scene may hold from older versions -> today's name
RENAMED = {"UpdateMode": "Update"}

#: node reference roles: inputs, then outputs (created when empty, reused otherwise).
NODE_REFERENCES = ("FixedVolume", "MovingVolume", "FixedLabels", "MovingLabels", "FixedMask", "MovingMask",
                   "OutputVolume", "OutputTransform", "OutputFolding", "OutputChart")
INPUT_REFERENCES = NODE_REFERENCES[:6]
OUTPUT_REFERENCES = NODE_REFERENCES[6:]
#: output role -> keyword of ``RegistrationLogic.start``
OUTPUT_KEYWORDS = {"OutputVolume": "outputVolume", "OutputTransform": "outputTransform",
                   "OutputFolding": "outputFolding", "OutputChart": "outputChart"}


class ParameterNode:
    """Typed access to a vtkMRMLScriptedModuleNode's parameters and node references."""

    def __init__(self, node):
        self.node = node

    @staticmethod
    def create(scene, moduleName="DEQRegistration"):
        """A new parameter node in ``scene``, holding the defaults."""
        import slicer
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetName(scene.GenerateUniqueName(moduleName))
        node.SetModuleName(moduleName)
        scene.AddNode(node)
        wrapper = ParameterNode(node)
        wrapper.setDefaults()
        return wrapper

    def setDefaults(self, overwrite=False):
        for old, new in RENAMED.items():
            value = self.node.GetParameter(old)
            if value and not self.node.GetParameter(new):
                self.node.SetParameter(new, value)
            if value:
                self.node.UnsetParameter(old)
        for p in PARAMETERS:
            if overwrite or not self.node.GetParameter(p.name):
                self.set(p.name, p.default)

    def get(self, name):
        p = BY_NAME[name]
        text = self.node.GetParameter(name)
        if not text:
            return p.default
        try:
            value = p.parse(text)
        except ValueError:
            return p.default
        return value if not p.choices or value in p.choices else p.default

    def set(self, name, value):
        """Store one value. Choosing a preset sets its parameters; changing one of them from the preset's
        value makes the preset "custom" (so ``settings()`` never names a preset the values do not follow)."""
        p = BY_NAME[name]
        value = p.parse(str(value)) if p.kind is bool and isinstance(value, str) else p.kind(value)
        if p.choices and value not in p.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, p.choices))}, got {value!r}")
        wasModified = self.node.StartModify()
        try:
            self.node.SetParameter(name, repr(value) if p.kind is float else str(value))
            if name == "Preset" and value in PRESET_VALUES:
                for key, preset_value in PRESET_VALUES[value].items():
                    self.node.SetParameter(key, str(preset_value))
            elif self.get("Preset") in PRESET_VALUES and PRESET_VALUES[self.get("Preset")].get(name, value) != value:
                self.node.SetParameter("Preset", CUSTOM)
        finally:
            self.node.EndModify(wasModified)

    def getNode(self, role):
        assert role in NODE_REFERENCES, role
        return self.node.GetNodeReference(role)

    def setNode(self, role, mrmlNode):
        assert role in NODE_REFERENCES, role
        self.node.SetNodeReferenceID(role, mrmlNode.GetID() if mrmlNode is not None else None)

    # --- to the logic ------------------------------------------------------------------

    def settings(self) -> dict:
        """Keyword arguments of the library's ``Settings`` (``make_settings``) from the stored values.

        "auto" values are left out (the mode's own default applies); the
        weight-free update's own settings are left out for the learned and
        hybrid updates, whose model keeps the values it was trained with.
        Lists ("4, 2, 1") become lists of numbers; a malformed one raises
        ValueError naming the parameter.
        """
        update = self.get("Update")
        out = {}
        for p in PARAMETERS:
            if p.setting is None or (p.gradient_only and update != "gradient"):
                continue
            value = self.get(p.name)
            if p.auto is not None and value == p.auto:
                continue
            out[p.setting] = numbers(value, p.name) if p.setting in LIST_SETTINGS else value
        if update != "gradient":
            out["model"] = self.get("ModelPath") if self.get("Model") == "file" else "default"
        return out

    def nodes(self) -> dict:
        """Input nodes and the keyword arguments of the output nodes of ``RegistrationLogic.start``."""
        out = {keyword: self.getNode(role) for role, keyword in OUTPUT_KEYWORDS.items()}
        out.update(fixedLabelsNode=self.getNode("FixedLabels"), movingLabelsNode=self.getNode("MovingLabels"),
                   fixedMask=self.getNode("FixedMask"), movingMask=self.getNode("MovingMask"))
        return out

    def rememberOutputs(self, outputs):
        """Select the nodes a run writes (``RegistrationOutputs`` or ``OutputNodes``) as the outputs."""
        wasModified = self.node.StartModify()
        try:
            self.setNode("OutputVolume", outputs.warpedVolume)
            self.setNode("OutputTransform", outputs.transform)
            self.setNode("OutputFolding", outputs.foldingMap)
            self.setNode("OutputChart", outputs.chart)
        finally:
            self.node.EndModify(wasModified)

    def selectDefaultInputs(self, scene):
        """An empty fixed volume selection gets the scene's first intensity volume (never a label map or output)."""
        if self.getNode("FixedVolume") is not None:
            return None
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute("DEQReg.output") \
                    or node.GetHideFromEditors():
                continue
            self.setNode("FixedVolume", node)
            return node
        return None
