"""Memory: what a registration of a given size needs, what the machine has, and releasing what is done.

Measured (``benchmarks/large.py``), ``deqreg register --model none`` peaks at
about ``CLI_BYTES_PER_VOXEL`` bytes per fixed-grid voxel on large grids once
the outputs are written (displacement field as voxels and as LPS mm, warped
image, Jacobian, folding mask), plus the inputs and the interpreter. The
preflight (``check``) compares that estimate with the memory available
before any work starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .image import Image


def grid_only(image: Image) -> Image:
    """``image`` with its voxels released: the same shape, dtype and affine, no memory (a broadcast zero)."""
    data = np.broadcast_to(np.zeros((), dtype=image.data.dtype), image.shape)
    return Image(data, image.affine)


#: fixed grids from this size on write their field as soon as it exists (``FieldSpill``)
SPILL_MIN_VOXELS = 1 << 24


class FieldSpill:
    """Writes a transform's forward field to a file beside the output folder at once, then frees its LPS array.

    The CLI's outputs hold the field twice for a while: as LPS millimetres (the
    file's values) and as voxels (what warping, the Jacobian and the metrics
    use). Writing the file first and keeping only the voxel field saves 12
    bytes per fixed-grid voxel at the peak. ``move_into`` puts the file into
    the (temporary) output folder, where ``apply.save`` finds it; ``cleanup``
    removes what is left after a failure.
    """

    def __init__(self, out, fmt: str = "nii"):
        import tempfile
        from pathlib import Path

        from . import io

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.name = io.output_name("displacement", fmt)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.field-", dir=out.parent))
        self.path = None
        self.transform = None

    def __call__(self, transform) -> None:
        from . import io

        path = self.folder / self.name
        io.save_itk_displacement(transform.displacement_lps, transform.fixed.affine, path, compresslevel=0)
        transform.displacement_lps = None
        transform.field_file = self.path = path
        self.transform = transform

    def move_into(self, folder, transform) -> None:
        """Move the written field into ``folder`` and tell ``transform`` (the one saved there) where it is."""
        import os

        if self.path is None:
            return
        target = folder / self.name
        os.replace(self.path, target)
        transform.field_file = self.path = target

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
