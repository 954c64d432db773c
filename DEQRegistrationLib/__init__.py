"""DEQRegistrationLib: deformable registration as a fixed point (DEQReg); torch, numpy, scipy, nibabel.

Never imports ``slicer``; the Slicer module is a thin shell over this package.
"""
import os as _os

# OpenMP threads that wait by spinning keep their cores busy between torch's many short parallel
# regions; when the machine is shared (more runnable processes than cores) each region then waits
# for a descheduled thread, and a registration ran 3.5x slower (OASIS pair, 2 cores, load 11: 76 s
# vs 22 s). Passive waiting costs little when the machine is idle. Takes effect only if torch
# is imported after this package and the user has not chosen a policy.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import DEQRegError, InputError
from .image import Image
from .registration import Progress, RegistrationResult, register

__all__ = ["Image", "register", "RegistrationResult", "Progress", "DEQRegError", "InputError"]
__version__ = "0.1.0"
