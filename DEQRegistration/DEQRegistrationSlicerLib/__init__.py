"""Qt-free parts of the DEQRegistration Slicer module.

Everything here works on MRML nodes only (no ``slicer.app``, no Qt), so it
runs and is tested on the ``slicer-core`` wheel as well as inside Slicer. The
module file ``DEQRegistration.py`` keeps only the GUI and the Slicer base
classes. Nothing heavy (torch, the registration library) is imported here at
module load; ``logic`` imports it inside the methods that need it.
"""
from .parameters import PARAMETERS, NODE_REFERENCES, ParameterNode  # noqa: F401
from .logic import RegistrationLogic, RegistrationOutputs  # noqa: F401
