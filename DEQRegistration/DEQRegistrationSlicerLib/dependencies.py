"""Python dependencies of the registration library inside Slicer.

PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks a
wheel matching the computer's CUDA; installing torch with plain pip into
Slicer's Python is what breaks most set-ups. Other packages are pip-installed
only after the user agrees. Both the confirmation dialog and the installer are
passed in, so this file needs no Qt and tests can stand them in.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

TORCH_REQUIREMENT = ">=2.1"
#: import name -> pip requirement (numpy ships with Slicer).
PIP_REQUIREMENTS = {"scipy": "scipy>=1.9"}


class MissingDependency(RuntimeError):
    """A dependency is missing and the user declined (or no installer exists); message is one line."""


def missingPackages(requirements=None):
    requirements = PIP_REQUIREMENTS if requirements is None else requirements
    return {name: req for name, req in requirements.items() if importlib.util.find_spec(name) is None}


def ensureTorch(torchUtilsModule: Optional[object] = None):
    """Import torch, installing it through the PyTorch extension when missing.

    ``torchUtilsModule`` is the ``PyTorchUtils`` module (imported here when None);
    its ``installTorch`` asks the user for confirmation itself.
    """
    if importlib.util.find_spec("torch") is not None:
        return importlib.import_module("torch")
    if torchUtilsModule is None:
        try:
            torchUtilsModule = importlib.import_module("PyTorchUtils")
        except ImportError:
            raise MissingDependency("PyTorch is missing: install the 'PyTorch' extension from the "
                                    "Extensions Manager, restart Slicer, and try again") from None
    logic = torchUtilsModule.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise MissingDependency("PyTorch was not installed; registration needs it")
        return torch
    return logic.torch


def ensurePackages(confirm: Callable[[str], bool], pipInstall: Callable[[str], None], requirements=None):
    """pip-install missing packages after ``confirm(message)`` returns True."""
    missing = missingPackages(requirements)
    if not missing:
        return []
    message = ("DEQRegistration needs these Python packages: " + ", ".join(missing.values())
               + ". Install them now? (This can take a few minutes.)")
    if not confirm(message):
        raise MissingDependency("Missing Python packages: " + ", ".join(missing))
    pipInstall(" ".join(missing.values()))
    importlib.invalidate_caches()
    still = missingPackages({k: v for k, v in missing.items()})
    if still:
        raise MissingDependency("Could not install: " + ", ".join(still))
    return list(missing)


def ensureDependencies(confirm, pipInstall, torchUtilsModule=None):
    """Everything ``DEQRegistrationLib`` needs; returns the torch module."""
    ensurePackages(confirm, pipInstall)
    return ensureTorch(torchUtilsModule)
