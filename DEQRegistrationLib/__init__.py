"""DEQRegistrationLib: deformable registration as a fixed point (DEQReg); torch, numpy, scipy, nibabel.

Never imports ``slicer``; the Slicer module is a thin shell over this package.
"""
from .errors import DEQRegError, InputError
from .image import Image
from .registration import Progress, RegistrationResult, register

__all__ = ["Image", "register", "RegistrationResult", "Progress", "DEQRegError", "InputError"]
__version__ = "0.1.0"
