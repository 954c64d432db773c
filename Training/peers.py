"""Classical peers for the evaluation tables: ANTs SyN through antspyx (an optional extra).

``ants_register`` runs ANTs on arrays already on one grid (the evaluation's
pairs are), with unit spacing and identity direction, so ANTs' physical
displacement *is* the voxel displacement along the array axes: the same
convention as this library's fields (warped(x) = moving(x + u(x))). The
field comes back as (ndim, *S) so the same Jacobian metrics apply.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import numpy as np


def ants_available() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


# name -> antspyx registration keywords. "ants-cc": SyN with the CC metric as
# antspyx runs it when only the metric is named (CC radius = syn_sampling 32,
# iterations 40x20x0); "ants-cc4": the antsRegistrationSyN.sh-style settings
# (CC radius 4, iterations 100x70x50x20). Both deformable only (SyNOnly): the
# slices are already in one template space.
ANTS_CONFIGS = {
    "ants-cc": dict(type_of_transform="SyNOnly", syn_metric="CC"),
    "ants-cc4": dict(type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=4, reg_iterations=(100, 70, 50, 20)),
    "ants-mi": dict(type_of_transform="SyNOnly"),
}


def ants_register(fixed: np.ndarray, moving: np.ndarray, moving_labels: Optional[np.ndarray] = None,
                  config: str = "ants-cc", seed: int = 1, threads: int = 1) -> dict:
    """ANTs SyN of ``moving`` to ``fixed`` (same grid). Returns displacement (ndim, *S), warped labels, seconds."""
    import ants

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(threads))
    kw = dict(ANTS_CONFIGS[config])
    f = ants.from_numpy(np.asarray(fixed, np.float32))
    m = ants.from_numpy(np.asarray(moving, np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        reg = ants.registration(f, m, outprefix=os.path.join(tmp, "r"), random_seed=seed, **kw)
        seconds = time.perf_counter() - t0
        warp_file = [t for t in reg["fwdtransforms"] if t.endswith(".nii.gz")][0]
        disp = ants.image_read(warp_file).numpy()  # (*S, ndim), physical = voxel units here
        out = dict(displacement=np.moveaxis(disp, -1, 0).astype(np.float32), seconds=seconds,
                   warped=reg["warpedmovout"].numpy())
        if moving_labels is not None:
            lab = ants.from_numpy(np.asarray(moving_labels, np.float32))
            warped = ants.apply_transforms(f, lab, reg["fwdtransforms"], interpolator="nearestNeighbor")
            out["warped_labels"] = np.rint(warped.numpy()).astype(np.asarray(moving_labels).dtype)
    return out
