"""Python dependencies of the registration library inside Slicer.

PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks a
wheel matching the computer's CUDA; installing torch with plain pip into
Slicer's Python is what breaks most set-ups. Other packages are pip-installed
only after the user agrees. The confirmation dialog, the installer and the
"busy" indicator (a wait cursor in Slicer) are passed in, so this file needs
no Qt and tests can stand them in. The busy indicator covers only the
installing itself, never a question to the user.

Every failure is a ``MissingDependency`` with a one-line message saying what
to do, whether it comes from a declined confirmation, the PyTorch
extension's installer, pip, or a too old torch; scripted users without
torch get the same kind of message from ``requireLibrary()`` instead of a
bare ``ModuleNotFoundError``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
from typing import Callable, ContextManager, Optional

MINIMUM_TORCH = "2.1"
TORCH_REQUIREMENT = ">=" + MINIMUM_TORCH
#: import name -> pip requirement (numpy ships with Slicer).
PIP_REQUIREMENTS = {"scipy": "scipy>=1.9"}
#: the one-click sample pair is built from the MNI template that nilearn's wheel ships
DEMO_REQUIREMENTS = {"nilearn": "nilearn>=0.10"}
HOW_TO_GET_TORCH = ("install the 'PyTorch' extension (Extensions Manager), restart Slicer, then click Register "
                    "in the DEQ Registration module once, or run "
                    "DEQRegistration.DEQRegistrationLogic().ensureDependencies() in the Python console")


class MissingDependency(RuntimeError):
    """A dependency is missing, too old, or could not be installed; the message is one line."""


def _no_busy():
    return contextlib.nullcontext()


def version_at_least(version: str, minimum: str) -> bool:
    """'2.13.0+cpu' >= '2.1': compares the leading numeric components (no packaging needed)."""
    def numbers(text):
        out = []
        for part in str(text).split("."):
            m = re.match(r"\d+", part)
            if not m:
                break
            out.append(int(m.group()))
        return out
    have, need = numbers(version), numbers(minimum)
    return have + [0] * (len(need) - len(have)) >= need


def missingPackages(requirements=None):
    requirements = PIP_REQUIREMENTS if requirements is None else requirements
    return {name: req for name, req in requirements.items() if importlib.util.find_spec(name) is None}


def checkTorchVersion(torch):
    version = getattr(torch, "__version__", "0")
    if not version_at_least(version, MINIMUM_TORCH):
        raise MissingDependency(f"PyTorch {version} is installed but DEQRegistration needs {TORCH_REQUIREMENT}: "
                                "install a newer one with the PyTorch Utils module (version requirement "
                                f"'{TORCH_REQUIREMENT}'), restart Slicer, and try again")
    return torch


def requireLibrary():
    """Raise ``MissingDependency`` (what to do, in one line) unless torch and the library's packages import."""
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("PyTorch is not installed; DEQRegistration needs it: " + HOW_TO_GET_TORCH)
    missing = missingPackages()
    if missing:
        raise MissingDependency("DEQRegistration needs these Python packages: " + ", ".join(missing.values())
                                + "; click Register in the module to install them, or run "
                                "DEQRegistration.DEQRegistrationLogic().ensureDependencies()")
    checkTorchVersion(importlib.import_module("torch"))


def ensureTorch(torchUtilsModule: Optional[object] = None):
    """Import torch, installing it through the PyTorch extension when missing; check its version.

    ``torchUtilsModule`` is the ``PyTorchUtils`` module (imported here when None);
    its ``installTorch`` asks the user for confirmation itself.
    """
    if importlib.util.find_spec("torch") is not None:
        return checkTorchVersion(importlib.import_module("torch"))
    if torchUtilsModule is None:
        try:
            torchUtilsModule = importlib.import_module("PyTorchUtils")
        except ImportError:
            raise MissingDependency("PyTorch is missing: install the 'PyTorch' extension from the "
                                    "Extensions Manager, restart Slicer, and try again") from None
    try:
        logic = torchUtilsModule.PyTorchUtilsLogic()
        if logic.torchInstalled():
            return checkTorchVersion(logic.torch)
        torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    except MissingDependency:
        raise
    except Exception as exc:  # the installer's own failures (network, pip, CUDA detection)
        raise MissingDependency(f"Installing PyTorch failed ({type(exc).__name__}: {exc}); try again, or install it "
                                "with the PyTorch Utils module") from exc
    if torch is None:
        raise MissingDependency("PyTorch was not installed; registration needs it")
    return checkTorchVersion(torch)


def ensurePackages(confirm: Callable[[str], bool], pipInstall: Callable[[str], None], requirements=None,
                   busy: Callable[[], ContextManager] = _no_busy):
    """pip-install missing packages after ``confirm(message)`` returns True (``busy()`` only while installing)."""
    missing = missingPackages(requirements)
    if not missing:
        return []
    message = ("DEQRegistration needs these Python packages: " + ", ".join(missing.values())
               + ". Install them now? (This can take a few minutes.)")
    if not confirm(message):
        raise MissingDependency("Missing Python packages: " + ", ".join(missing))
    try:
        with busy():
            pipInstall(" ".join(missing.values()))
    except Exception as exc:
        raise MissingDependency(f"Installing {', '.join(missing.values())} failed ({type(exc).__name__}: {exc})") \
            from exc
    importlib.invalidate_caches()
    still = missingPackages(missing)
    if still:
        raise MissingDependency("Could not install: " + ", ".join(still))
    return list(missing)


def ensureDependencies(confirm, pipInstall, torchUtilsModule=None, busy: Callable[[], ContextManager] = _no_busy,
                       requirements=None):
    """Everything ``DEQRegistrationLib`` needs (plus ``requirements``); returns the torch module."""
    ensurePackages(confirm, pipInstall, dict(PIP_REQUIREMENTS, **(requirements or {})), busy)
    return ensureTorch(torchUtilsModule)
