"""Test cases built from a real scan: rigid moves in world space, contrast changes, lesions.

Used by the tests and ``benchmarks/alignment.py`` to ask the questions users'
scans ask: a moving scan positioned differently (``move_rigidly``), acquired
with another contrast (``contrast_change``), or holding a structure with no
counterpart in the fixed scan (``add_lesion``). Every case keeps the truth
(the world transform applied), so results can be checked against it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .geometry import voxel_to_physical_points
from .image import Image
from .sampling import Sampler


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (RAS) by ``degrees`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def rigid_motion(axis: Sequence[float], degrees: float, translation_mm: Sequence[float],
                 centre: Sequence[float]) -> np.ndarray:
    """4x4 RAS transform: rotate about ``centre`` by ``degrees`` around ``axis``, then translate."""
    R = rotation(axis, degrees)
    c = np.asarray(centre, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = c + np.asarray(translation_mm, dtype=np.float64) - R @ c
    return out


def grid_centre(image: Image) -> np.ndarray:
    """RAS position of the grid's centre."""
    return voxel_to_physical_points(np.array([[(n - 1) / 2 for n in image.shape]]), image.affine)[0]


def move_rigidly(image: Image, motion: np.ndarray, labels: Optional[np.ndarray] = None, margin: int = 24,
                 order: int = 3) -> Tuple[Image, Optional[np.ndarray]]:
    """The scan with its content moved by ``motion`` (RAS -> RAS) in world space, resampled.

    A point y of the anatomy appears at ``motion @ y`` in the result, whose
    grid has the same orientation and spacing as the input, enlarged by
    ``margin`` voxels on every side so nothing leaves the field of view; the
    header therefore says nothing about the motion. Intensities are
    resampled with cubic splines (``order``), labels by nearest neighbour.
    A registration of the result onto a scan aligned with the input should
    recover ``motion`` as its linear part.
    """
    nd = image.ndim
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, :nd] @ np.full(nd, margin)
    shape = tuple(n + 2 * margin for n in image.shape)
    # new grid voxel -> the input's voxel that shows the same anatomy: world = motion^-1
    coords = Sampler(shape, affine, image.affine, world=np.linalg.inv(motion)).coords()[0].numpy()
    data = ndimage.map_coordinates(image.data.astype(np.float32), coords, order=order, mode="constant")
    data = np.clip(data, float(image.data.min()), float(image.data.max())).astype(np.float32)
    moved_labels = None
    if labels is not None:
        moved_labels = ndimage.map_coordinates(np.asarray(labels), coords, order=0, mode="constant").astype(
            np.asarray(labels).dtype)
    return Image(data, affine), moved_labels


def _unit_range(data: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 1] between their 0.5th and 99.5th percentiles (the contrast maps' input)."""
    x = np.asarray(data, dtype=np.float32)
    lo, hi = float(np.percentile(x, 0.5)), float(np.percentile(x, 99.5))
    return np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)


def contrast_change(data: np.ndarray) -> np.ndarray:
    """A non-monotonic intensity map: on intensities scaled to [0, 1], x -> |sin(1.5 pi x)| (background stays 0).

    Dark stays dark, mid-grey becomes brightest and the brightest tissue turns
    mid-grey, so grey/white-matter contrast is inverted while the background is
    kept: what another MR sequence does to the same anatomy, roughly. A
    similarity that assumes a linear intensity relation (LNCC, MSE) is misled.
    """
    return np.abs(np.sin(1.5 * np.pi * _unit_range(data))).astype(np.float32)


def t2_like(data: np.ndarray, csf: float = 0.3, white: float = 0.25) -> np.ndarray:
    """A T2-weighted look for a T1-weighted brain: on intensities scaled to [0, 1], background stays 0, the
    CSF range (around ``csf``) becomes brightest and brighter tissue darkens linearly to ``white`` at 1.

    Piecewise linear: x / csf below ``csf``, then 1 - (1 - white) (x - csf) / (1 - csf). On a T1 slice
    (OASIS-TRT-20 subject 1) CSF sits near 0.3-0.4, grey matter 0.55, white matter 0.85, which become
    about 1, 0.7 and 0.4: the order of T2 contrast. Non-monotonic like ``contrast_change``, but the
    realistic case: the background and the CSF, dark next to each other in T1, are far apart here.
    """
    u = _unit_range(data)
    out = np.where(u < csf, u / csf, 1.0 - (1.0 - white) * (u - csf) / (1.0 - csf))
    return out.astype(np.float32)


def add_lesion(image: Image, centre_vox: Sequence[float], radius_vox: float, intensity: float) -> Tuple[Image, np.ndarray]:
    """A bright smooth ball (a lesion-like blob) added to the scan; returns it and its mask (radius + 2 voxels)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in image.shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre_vox))
    blob = np.exp(-r2 / (2 * (radius_vox / 2) ** 2)) * (r2 <= radius_vox ** 2)
    data = np.maximum(image.data, intensity * blob).astype(np.float32)
    mask = r2 <= (radius_vox + 2) ** 2
    return Image(data, image.affine.copy()), mask


# --------------------------------------------------------------------------- a breathing thorax


def _lung_field(points: np.ndarray, amplitude_mm: float, extent: np.ndarray) -> np.ndarray:
    """Inhale -> exhale displacement (mm) at RAS points: the diaphragm rises, the chest flattens.

    Smooth everywhere: a superior shift growing from 0 at the lung apices to
    ``amplitude_mm`` at their base, a posterior shift of a third of that
    growing towards the front, both fading out beyond the lungs.
    """
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    ex, ey, ez = extent
    base = np.clip((ez - z) / (2 * ez), 0, 1)              # 0 at the apex (z = +ez), 1 at the base (z = -ez)
    front = np.clip((y + ey) / (2 * ey), 0, 1)             # 0 at the back, 1 at the front
    fade = np.exp(-0.5 * ((x / (1.6 * ex)) ** 2 + (y / (1.6 * ey)) ** 2))
    d = np.zeros(points.shape, dtype=np.float64)
    d[..., 2] = amplitude_mm * base ** 1.5 * fade
    d[..., 1] = -amplitude_mm / 3 * front * base * fade
    return d


def breathing_pair(shape: Sequence[int] = (64, 56, 64), spacing_mm: float = 2.5, amplitude_mm: float = 15.0,
                   n_keypoints: int = 80, seed: int = 0) -> dict:
    """A synthetic CT thorax at inhale (fixed) and exhale (moving), with lung masks and keypoints.

    Hounsfield-like values: air -1000 outside the body, soft tissue 40, a spine
    400 at the back, two lungs at -850 (inhale) / -780 (exhale: denser) holding
    vessel-like bright blobs whose centres are the keypoints. The exhale scan
    is the inhale anatomy pushed by ``_lung_field`` and rendered exactly (no
    resampling); the moving keypoints are where the field takes the fixed ones.
    Returns images, lung masks (uint8), keypoints (voxel coordinates, as
    Learn2Reg's CSVs) and the true displacement at the fixed keypoints (mm).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -spacing_mm * (np.asarray(shape) - 1) / 2
    half = spacing_mm * (np.asarray(shape) - 1) / 2
    body = np.array([0.92 * half[0], 0.75 * half[1]])
    lung_c = np.array([0.42 * half[0], 0.05 * half[1], 0.1 * half[2]])
    lung_r = np.array([0.34 * half[0], 0.55 * half[1], 0.7 * half[2]])
    n_vessels = 400
    side = rng.choice([-1, 1], n_vessels)
    u = rng.normal(size=(n_vessels, 3))
    u = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0, 0.85, (n_vessels, 1)) ** (1 / 3)
    centres = np.c_[side * lung_c[0], np.full(n_vessels, lung_c[1]), np.full(n_vessels, lung_c[2])] + u * lung_r
    radii = rng.uniform(1.2, 3.0, n_vessels) * spacing_mm / 2.5
    extent = np.array([half[0], lung_r[1], lung_r[2]])
    tree = cKDTree(centres)

    def anatomy(p: np.ndarray, exhale: bool) -> Tuple[np.ndarray, np.ndarray]:
        x, y = p[..., 0], p[..., 1]
        inside_body = (x / body[0]) ** 2 + (y / body[1]) ** 2 <= 1
        hu = np.where(inside_body, 40.0, -1000.0)
        spine = ((x / (0.12 * half[0])) ** 2 + ((y + 0.6 * half[1]) / (0.12 * half[1])) ** 2) <= 1
        hu = np.where(spine, 400.0, hu)
        lungs = np.zeros(p.shape[:-1], dtype=bool)
        for s in (-1, 1):
            c = lung_c * np.array([s, 1, 1])
            lungs |= (((p - c) / lung_r) ** 2).sum(-1) <= 1
        hu = np.where(lungs, -780.0 if exhale else -850.0, hu)
        # the brightest of the nearest few blobs (a k-d tree: every point, a few blobs each)
        dist, near = tree.query(p.reshape(-1, 3), k=6)
        vessels = np.exp(-(dist ** 2 / (2 * radii[near] ** 2)).min(1)).reshape(p.shape[:-1])
        hu = np.where(lungs, hu + 800.0 * vessels, hu)
        return hu.astype(np.float32), lungs.astype(np.uint8)

    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    grid = voxel_to_physical_points(idx, affine)
    fixed, fixed_mask = anatomy(grid, False)
    # exhale voxel y shows the inhale point x with x + d(x) = y: fixed-point iteration x <- y - d(x)
    x = grid.copy()
    for _ in range(30):
        x = grid - _lung_field(x, amplitude_mm, extent)
    moving, moving_mask = anatomy(x, True)
    # keypoints: vessel centres well inside the lungs
    rel = (centres - lung_c * np.c_[np.sign(centres[:, 0]), np.ones(n_vessels), np.ones(n_vessels)]) / lung_r
    keep = np.flatnonzero((rel ** 2).sum(1) <= 0.6)
    kp = centres[keep[:n_keypoints]]
    true = _lung_field(kp, amplitude_mm, extent)
    inv = np.linalg.inv(affine)
    to_vox = lambda p: p @ inv[:3, :3].T + inv[:3, 3]  # noqa: E731
    return dict(fixed=Image(fixed.reshape(shape), affine), moving=Image(moving.reshape(shape), affine.copy()),
                fixed_mask=fixed_mask.reshape(shape), moving_mask=moving_mask.reshape(shape),
                fixed_keypoints=to_vox(kp), moving_keypoints=to_vox(kp + true), true_displacement_mm=true)


def write_learn2reg(folder, pairs: Sequence[dict], name: str = "SyntheticLung") -> "Path":
    """Write pairs in the Learn2Reg NLST layout; returns the path of ``{name}_dataset.json``.

    ``imagesTr/{name}_{case:04d}_0000.nii.gz`` (fixed) and ``_0001`` (moving),
    ``masksTr/`` the same names (lung masks), ``keypointsTr/`` the same stems
    ``.csv`` (one voxel coordinate per row, comma-separated, no header); the
    JSON lists every volume under ``training`` and every pair under
    ``registration_val`` (and ``training_paired_images``), paths relative to it.
    """
    import json
    from pathlib import Path

    from . import io

    folder = Path(folder)
    for sub in ("imagesTr", "masksTr", "keypointsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    training, paired = [], []
    for case, pair in enumerate(pairs, start=1):
        names = {}
        for index, role in enumerate(("fixed", "moving")):
            stem = f"{name}_{case:04d}_{index:04d}"
            io.save_image(pair[role], folder / "imagesTr" / f"{stem}.nii.gz")
            io.save_labels(pair[f"{role}_mask"], pair[role].affine, folder / "masksTr" / f"{stem}.nii.gz")
            io.save_landmarks_csv(pair[f"{role}_keypoints"], folder / "keypointsTr" / f"{stem}.csv")
            training.append({"image": f"./imagesTr/{stem}.nii.gz", "mask": f"./masksTr/{stem}.nii.gz",
                             "keypoints": f"./keypointsTr/{stem}.csv"})
            names[role] = f"./imagesTr/{stem}.nii.gz"
        paired.append(names)
    shape = list(pairs[0]["fixed"].shape)
    doc = {
        "name": name, "release": "1.0",
        "description": "Synthetic breathing thorax pairs (DEQRegistrationLib.synthetic.breathing_pair) in the "
                       "Learn2Reg NLST layout",
        "licence": "generated; no patient data", "reference": "", "pairings": "paired",
        "provided_data": {"0": ["image", "mask", "keypoints"]},
        "registration_direction": {"fixed": 0, "moving": 1},
        "modality": {"0": "CT", "1": "CT"}, "img_shift": {"fixed": "inhale", "moving": "exhale"},
        "labels": {}, "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": shape},
        "numTraining": len(training), "numTest": 0, "training": training, "test": [],
        "numPairedTraining": len(paired), "training_paired_images": paired,
        "numRegistration_val": len(paired), "registration_val": paired,
        "numRegistration_test": 0, "registration_test": [],
    }
    path = folder / f"{name}_dataset.json"
    path.write_text(json.dumps(doc, indent=4) + "\n")
    return path
