"""The module's settings, kept on a vtkMRMLScriptedModuleNode.

Values live as strings (``SetParameter``) and node selections as node
references (``SetNodeReferenceID``), so they are saved with the scene and come
back on load. This small typed wrapper replaces ``parameterNodeWrapper``, which
needs Qt and therefore cannot run on ``slicer-core``.
"""
from __future__ import annotations

#: name -> (type, default). Max steps and tolerance 0 mean "the mode's default".
PARAMETERS = {
    "MaxSteps": (int, 0),
    "Tolerance": (float, 0.0),
    "Solver": (str, "auto"),            # "auto": the mode's own (anderson; a model's stored solver)
    "UpdateMode": (str, "gradient"),
    "Model": (str, "default"),          # "default" (shipped weights) or "file"
    "ModelPath": (str, ""),
    "Device": (str, "auto"),            # "auto" (GPU when available) | "cpu" | "cuda"
    "RefreshEvery": (int, 5),
}
SOLVERS = ("auto", "anderson", "fixed-point")
UPDATE_MODES = ("learned", "gradient", "hybrid")
DEVICES = ("auto", "cpu", "cuda")
MODELS = ("default", "file")

#: node reference roles: inputs, then outputs (created when empty, reused otherwise).
NODE_REFERENCES = ("FixedVolume", "MovingVolume", "FixedLabels", "MovingLabels",
                   "OutputVolume", "OutputTransform", "OutputFolding", "OutputChart")
INPUT_REFERENCES = NODE_REFERENCES[:4]
OUTPUT_REFERENCES = NODE_REFERENCES[4:]


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
        for name, (_, default) in PARAMETERS.items():
            if overwrite or not self.node.GetParameter(name):
                self.set(name, default)

    def get(self, name):
        kind, default = PARAMETERS[name]
        text = self.node.GetParameter(name)
        if not text:
            return default
        try:
            return kind(text)
        except ValueError:
            return default

    def set(self, name, value):
        kind, _ = PARAMETERS[name]
        value = kind(value)
        if name == "Solver" and value not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}")
        if name == "UpdateMode" and value not in UPDATE_MODES:
            raise ValueError(f"update mode must be one of {UPDATE_MODES}")
        if name == "Device" and value not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}")
        if name == "Model" and value not in MODELS:
            raise ValueError(f"model must be one of {MODELS}")
        self.node.SetParameter(name, repr(value) if kind is float else str(value))

    def getNode(self, role):
        assert role in NODE_REFERENCES, role
        return self.node.GetNodeReference(role)

    def setNode(self, role, mrmlNode):
        assert role in NODE_REFERENCES, role
        self.node.SetNodeReferenceID(role, mrmlNode.GetID() if mrmlNode is not None else None)

    def registrationKwargs(self):
        """Keyword arguments of ``RegistrationLogic.register`` from the stored settings."""
        model = None
        if self.get("UpdateMode") != "gradient":
            model = self.get("ModelPath") if self.get("Model") == "file" else "default"
        return dict(
            fixedLabelsNode=self.getNode("FixedLabels"),
            movingLabelsNode=self.getNode("MovingLabels"),
            maxSteps=self.get("MaxSteps") or None,
            tolerance=self.get("Tolerance") or None,
            solver=None if self.get("Solver") == "auto" else self.get("Solver"),
            update=self.get("UpdateMode"),
            model=model,
            device=self.get("Device"),
            refreshEvery=self.get("RefreshEvery"),
            outputVolume=self.getNode("OutputVolume"),
            outputTransform=self.getNode("OutputTransform"),
            outputFolding=self.getNode("OutputFolding"),
            outputChart=self.getNode("OutputChart"),
        )
