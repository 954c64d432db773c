"""Evaluation when the moving image lives on another grid than the fixed one."""
from __future__ import annotations

import numpy as np

from conftest import blob_volume, write_nifti
from Training import evaluate


def test_tre_compares_moving_keypoints_in_the_moving_images_own_space(tmp_path):
    """The moving scan is the fixed one on a grid shifted by 6 mm: the same anatomy, so with (near) no
    deformation the keypoints coincide in physical space and TRE is ~0 mm. Reading the moving
    keypoints through the fixed affine (the old bug) would report the 6 mm grid shift instead."""
    shape = (24, 24, 24)
    vol = blob_volume(shape)
    fixed_affine = np.eye(4)
    moving_affine = np.eye(4)
    moving_affine[0, 3] = 6.0            # moving voxel i sits at x = i + 6 mm
    # the moving volume's voxel i shows the fixed volume's voxel i + 6 (same physical point)
    moving = np.zeros_like(vol)
    moving[:-6] = vol[6:]
    fk = np.array([[12.0, 11.0, 12.0], [10.0, 13.0, 9.0], [14.0, 12.0, 13.0]])
    mk = fk - [6.0, 0.0, 0.0]            # the same physical points in moving voxel coordinates
    f = {"image": str(write_nifti(tmp_path / "f.nii.gz", vol, fixed_affine)), "keypoints": str(tmp_path / "f.csv")}
    m = {"image": str(write_nifti(tmp_path / "m.nii.gz", moving, moving_affine)), "keypoints": str(tmp_path / "m.csv")}
    np.savetxt(f["keypoints"], fk, delimiter=",")
    np.savetxt(m["keypoints"], mk, delimiter=",")
    row = evaluate.run_pair(evaluate.model_spec("gradient"), ("m->f", f, m), max_steps=3)
    assert row["tre_mm"] < 0.5, row
