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


# --- preflight ------------------------------------------------------------------------------

#: the interpreter, torch, numpy, nibabel: resident before any voxel (measured: 0.25-0.45 GB)
BASE_BYTES = 450 * 2**20
#: solve memory per voxel of the finest working grid (operator temporaries, Anderson's history, pooled
#: levels); the learned U-Net keeps 16-32 channels of activations per voxel
WORK_BYTES_PER_VOXEL = {"gradient": 700, "learned": 1500, "hybrid": 2200}
#: after the solve, per fixed-grid voxel: the field as voxels (12) and as LPS mm (12, written at once
#: on large grids), the warped moving image (4), the Jacobian (4), the folding mask and slab temporaries
OUTPUT_BYTES_PER_VOXEL = 30
#: MIND-SSC's descriptors are computed on the full-resolution image before the solve (``similarity.mind_ssc_pooled``):
#: per full-resolution voxel computed at once (whole up to ``chunked.MIND_WHOLE_VOXELS``, else a slab of
#: ``chunked.MIND_SLAB_VOXELS``); OASIS, 6.9 M voxels: peak 1.58 GB with MIND, 0.87 GB with LNCC
MIND_BYTES_PER_VOXEL = 110
#: a warning above this share of the available memory; an error above all of it
WARN_SHARE = 0.8


@dataclass
class Estimate:
    need: int        # bytes, peak
    available: int   # bytes, now
    parts: dict      # bytes per part

    def gb(self, n) -> str:
        return f"{n / 2**30:.1f} GB"

    def describe(self) -> str:
        parts = ", ".join(f"{k} {self.gb(v)}" for k, v in self.parts.items())
        return f"about {self.gb(self.need)} ({parts}) of {self.gb(self.available)} available"


def available_bytes() -> int:
    """MemAvailable, lowered to the cgroup's limit headroom when the process runs in a limited cgroup."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                used = int(fh.read().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(avail)


def estimate(fixed_shape, moving_shape, update: str = "gradient", working_voxels: Optional[int] = None,
             labels: bool = False, resident: int = 0, similarity: str = "lncc") -> Estimate:
    """Peak memory of ``deqreg register`` on a pair of this size (see the constants), minus what is already
    ``resident`` (the loaded inputs), against what is available now."""
    from .chunked import MIND_SLAB_VOXELS, MIND_WHOLE_VOXELS

    nf, nm = int(np.prod(fixed_shape)), int(np.prod(moving_shape))
    working = nf if working_voxels is None else int(working_voxels)
    inputs = 4 * (nf + nm) + (8 * (nf + nm) if labels else 0)
    solve = inputs + WORK_BYTES_PER_VOXEL.get(update, WORK_BYTES_PER_VOXEL["learned"]) * working + 12 * nf
    if update == "gradient" and similarity == "mind":
        solve += MIND_BYTES_PER_VOXEL * (nf if nf <= MIND_WHOLE_VOXELS else MIND_SLAB_VOXELS)
    outputs = 4 * nm + OUTPUT_BYTES_PER_VOXEL * nf + (12 * nf if labels else 0)
    need = BASE_BYTES + max(solve, outputs)
    parts = {"inputs": inputs, "solve": solve - inputs, "outputs": outputs}
    return Estimate(need=need, available=available_bytes() + int(resident), parts=parts)


def working_voxels(fixed: Image, update: str, pyramid=None) -> int:
    """Voxels of the finest working grid: the gradient mode's physical plan, a caller's pyramid, else full."""
    from .levels import auto_pyramid

    if pyramid is not None:
        factor = min(int(f) for f in pyramid)
    elif update == "gradient":
        factor = min(auto_pyramid(fixed.shape, fixed.spacing))
    else:
        factor = 1  # a model's own pyramid is read when it loads; assume the worst
    return int(np.prod([-(-n // factor) for n in fixed.shape]))


def check(fixed: Image, moving: Image, update: str, labels: bool = False, pyramid=None, mode: str = "error",
          warn=None, model=None, similarity: str = "lncc") -> Optional[Estimate]:
    """The preflight: raise ``InputError`` (mode 'error') or warn when the estimate exceeds what is available.

    The message gives need vs available and what makes it fit: the gradient
    mode (``--model none``) when a model's solve is the problem, otherwise a
    fixed grid with coarser voxels, sized so the estimate fits.
    """
    from .errors import InputError

    if mode == "off":
        return None
    if pyramid is None and model is not None and update != "gradient":
        pyramid = _model_pyramid(model, fixed.ndim)
    resident = fixed.data.nbytes + moving.data.nbytes  # loaded already: counted in both need and available
    est = estimate(fixed.shape, moving.shape, update, working_voxels(fixed, update, pyramid), labels, resident,
                   similarity)
    if est.need <= WARN_SHARE * est.available:
        return est
    hint = _hint(fixed, moving, update, labels, est, similarity)
    text = (f"this registration needs {est.describe()} for a {'x'.join(map(str, fixed.shape))} fixed grid; {hint}")
    if est.need > est.available and mode == "error":
        raise InputError(text + " (--memory-check warn runs it anyway)")
    if warn is not None:
        warn(("warning: " if est.need <= est.available else "warning: likely to run out of memory: ") + text)
    return est


def _model_pyramid(model, ndim: int):
    from .checkpoint import model_path, read_checkpoint

    try:
        return list(read_checkpoint(model_path(model, ndim))["config"].pyramid)
    except Exception:  # the registration itself reports a bad model; the estimate assumes full resolution
        return None


def _hint(fixed: Image, moving: Image, update: str, labels: bool, est: Estimate, similarity: str = "lncc") -> str:
    if update != "gradient":
        g = estimate(fixed.shape, moving.shape, "gradient", working_voxels(fixed, "gradient"), labels,
                     similarity=similarity)
        if g.need <= WARN_SHARE * est.available:
            return f"with --model none (the gradient mode) it needs about {g.gb(g.need)}"
    for k in (1.25, 1.5, 2.0, 2.5, 3.0, 4.0):
        shape = [max(2, int(n / k)) for n in fixed.shape]
        g = estimate(shape, [max(2, int(n / k)) for n in moving.shape], "gradient",
                     working_voxels(Image(np.broadcast_to(np.float32(0), shape), fixed.affine), "gradient"), labels,
                     similarity=similarity)
        if g.need <= WARN_SHARE * est.available:
            spacing = ", ".join(f"{s * k:.2g}" for s in fixed.spacing)
            return (f"it fits (about {g.gb(g.need)}) with both images resampled to {k:g}x coarser voxels "
                    f"({spacing} mm for the fixed one), or on a machine with more free memory")
    return "free memory (close other programs) or use a machine with more"
