"""Real anatomy for ``deqreg demo``, offline: the MNI ICBM152 2009a template shipped in nilearn's wheel.

nilearn installs an ICBM152 2009a T1 template and its grey- and white-matter
probability maps inside the package (``nilearn/datasets/data/
mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``), so ``load_mni152_*``
needs no network. The demo pair is that template and the same template under
a known smooth deformation, with a 3-class tissue label map (CSF / GM / WM
from the template's own probability maps) warped alongside, so Dice before
and after, and the error against the known field, mean something.

Licence: nilearn is BSD-3-Clause; the ICBM152 templates are the McConnell
Brain Imaging Centre's (MNI), distributed under its permissive copyright
notice. Nothing of them is stored in this repository; the demo reads them from
the installed nilearn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .image import Image

TEMPLATE_NAME = "MNI ICBM152 2009a T1 template (as shipped in nilearn)"
TISSUES = {1: "CSF", 2: "grey matter", 3: "white matter"}


@dataclass
class DemoPair:
    fixed: Image
    moving: Image
    fixed_labels: np.ndarray
    moving_labels: np.ndarray
    true_displacement: np.ndarray  # (3, *fixed.shape) voxels: fixed p -> moving p + u(p)
    brain_mask: np.ndarray
    description: str


def _nilearn_template():
    """T1, GM, WM probability and brain mask at 1 mm, as (arrays, affine)."""
    try:
        from nilearn import datasets
    except ImportError:
        raise InputError("the demo needs the nilearn package (pip install nilearn, or pip install 'deqreg[demo]')") from None
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    arrays = [np.asarray(img.get_fdata(dtype=np.float32)) for img in (t1, gm, wm, mask)]
    return arrays, np.asarray(t1.affine, dtype=np.float64)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Average f x f x f blocks (shape already divisible): an exact 1 mm -> f mm downsampling."""
    s = a.shape
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def _crop_and_downsample(arrays, affine, mask, factor: int, margin_mm: int = 6):
    """Crop to the brain (plus a margin) so each axis divides by ``factor``, then block-average.

    Coarse voxel c covers fine voxels factor*c .. factor*c + factor-1, so its
    centre sits at fine index factor*c + (factor-1)/2: that goes into the affine.
    """
    idx = np.nonzero(mask > 0.5)
    lo = np.array([max(int(i.min()) - margin_mm, 0) for i in idx])
    hi = np.array([min(int(i.max()) + 1 + margin_mm, n) for i, n in zip(idx, mask.shape)])
    size = (hi - lo) // factor * factor
    sl = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, size))
    out = [_block_mean(np.ascontiguousarray(a[sl]), factor) for a in arrays]
    step = np.eye(4)
    step[:3, :3] *= factor
    step[:3, 3] = lo + (factor - 1) / 2.0
    return out, affine @ step


def smooth_deformation(shape, amplitude_vox: float, seed: int = 0, n_waves: int = 4) -> np.ndarray:
    """A smooth random field (3, *shape) in voxels: a few low-frequency sine waves per component.

    Deterministic (seeded) and smooth enough to be folding-free for
    amplitudes of a few voxels on a ~40-voxel wavelength.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) / n for n in shape], indexing="ij")
    field = np.zeros((3,) + tuple(shape))
    for c in range(3):
        for _ in range(n_waves):
            k = rng.uniform(0.5, 1.5, size=3) * rng.choice([-1, 1], size=3)
            phase = rng.uniform(0, 2 * np.pi)
            field[c] += np.sin(2 * np.pi * sum(ki * g for ki, g in zip(k, grids)) + phase)
    field *= amplitude_vox / np.abs(field).max()
    return field.astype(np.float32)


def _sample(data: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0)


def invert_field(w: np.ndarray, iterations: int = 20) -> np.ndarray:
    """u with (p + u(p)) + w(p + u(p)) = p: the inverse of the map p -> p + w(p), by fixed-point iteration."""
    ident = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in w.shape[1:]], indexing="ij"))
    u = -w.astype(np.float64)
    for _ in range(iterations):
        u = -np.stack([_sample(w[c], ident + u, 1) for c in range(3)])
    return u.astype(np.float32)


def make_demo_pair(voxel_mm: int = 2, amplitude_mm: float = 5.0, noise: float = 0.02, seed: int = 0) -> DemoPair:
    """The demo's fixed/moving pair at ``voxel_mm`` resolution (see the module docstring)."""
    (t1, gm, wm, mask), affine = _nilearn_template()
    (t1, gm, wm, mask), affine = _crop_and_downsample([t1, gm, wm, mask], affine, mask, voxel_mm)
    brain = mask > 0.5
    csf = np.clip(1.0 - gm - wm, 0.0, None)
    labels = np.where(brain, 1 + np.argmax(np.stack([csf, gm, wm]), axis=0), 0).astype(np.uint8)
    t1 = (t1 / t1.max()).astype(np.float32)

    # Moving image: m(q) = t1(q + w(q)); then fixed p corresponds to moving p + u(p) with u = inverse of w.
    w = smooth_deformation(t1.shape, amplitude_mm / voxel_mm, seed=seed)
    ident = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in t1.shape], indexing="ij"))
    moving = _sample(t1, ident + w, 1).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    moving = np.clip(moving + noise * rng.standard_normal(moving.shape).astype(np.float32), 0, None)
    moving_labels = _sample(labels, ident + w, 0).astype(np.uint8)
    truth = invert_field(w)
    desc = (f"{TEMPLATE_NAME} at {voxel_mm} mm, shape {t1.shape}; moving = the template under a known smooth "
            f"deformation (max {amplitude_mm:g} mm) plus {noise:g} noise; labels: CSF/GM/WM from the template's "
            "probability maps")
    return DemoPair(Image(t1, affine), Image(moving, affine.copy()), labels, moving_labels, truth, brain, desc)
