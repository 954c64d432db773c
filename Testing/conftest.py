"""Shared fixtures: the real data folder (or a clean skip) and small synthetic NIfTI files.

Synthetic volumes are tiny (24^3, 32^2) so the whole suite runs in seconds on
two CPU cores; the real OASIS data lives outside the repository in
../shared/data and tests that need it skip when it is absent.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the real data folder; DEQREG_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("DEQREG_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (relative to the repository root), or skip with the reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it is not part of the repository)")
    return SHARED_DATA


def oblique_affine(spacing=(1.2, 0.9, 2.0), angles=(0.3, -0.2, 0.5), origin=(-20.0, 15.0, 7.5)) -> np.ndarray:
    """A rotated, anisotropic voxel-to-RAS affine, the case where RAS/LPS and spacing bugs show."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def blob_volume(shape=(24, 24, 24), centre_shift=(0.0, 0.0, 0.0), radius=6.0) -> np.ndarray:
    """A smooth bright ellipsoid on a dark background (something worth registering)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    local = [g - (n - 1) / 2 - s for g, n, s in zip(grids, shape, centre_shift)]
    r2 = sum((x / radius) ** 2 for x in local)
    # texture that moves with the blob: LNCC (contrast-invariant) needs structure, a lone blob is ill-posed
    texture = np.prod([np.sin(0.9 * x + k) for k, x in enumerate(local)], axis=0)
    return (np.exp(-r2) * (1 + 0.3 * texture) + 0.05 * grids[0] / shape[0]).astype(np.float32)


def blob_labels(vol: np.ndarray) -> np.ndarray:
    """Two nested labels from thresholds of a blob volume."""
    return ((vol > 0.2).astype(np.uint8) + (vol > 0.6).astype(np.uint8)).astype(np.uint8)


def write_nifti(path, data, affine=None, dtype=None) -> Path:
    import nibabel as nib

    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.to_filename(str(path))
    return Path(path)


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def pair3d(tmp_path):
    """Fixed/moving 24^3 volumes with label maps on disk: dict of paths."""
    fixed = blob_volume()
    moving = blob_volume(centre_shift=(1.5, -1.0, 1.0))
    paths = {
        "fixed": write_nifti(tmp_path / "fixed.nii.gz", fixed, np.diag([1.5, 1.5, 1.5, 1.0])),
        "moving": write_nifti(tmp_path / "moving.nii.gz", moving, np.diag([1.5, 1.5, 1.5, 1.0])),
        "fixed_seg": write_nifti(tmp_path / "fixed_seg.nii.gz", blob_labels(fixed), np.diag([1.5, 1.5, 1.5, 1.0])),
        "moving_seg": write_nifti(tmp_path / "moving_seg.nii.gz", blob_labels(moving), np.diag([1.5, 1.5, 1.5, 1.0])),
    }
    return paths


@pytest.fixture
def pair2d(tmp_path):
    """Fixed/moving 32x32 slices stored as HxWx1, with label maps."""
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    fixed = blob_volume((32, 32), radius=7.0)
    moving = blob_volume((32, 32), centre_shift=(2.0, -1.5), radius=7.0)
    return {
        "fixed": write_nifti(tmp_path / "fixed2d.nii.gz", fixed[:, :, None], aff),
        "moving": write_nifti(tmp_path / "moving2d.nii.gz", moving[:, :, None], aff),
        "fixed_seg": write_nifti(tmp_path / "fixed2d_seg.nii.gz", blob_labels(fixed)[:, :, None], aff),
        "moving_seg": write_nifti(tmp_path / "moving2d_seg.nii.gz", blob_labels(moving)[:, :, None], aff),
    }
