"""The CT-sized smooth synthetic pair of issue 14, built here (no download).

512 x 512 x 300 voxels of 0.8 x 0.8 x 1 mm (78.6 million voxels), a smooth
body-like volume: an elliptic "trunk" with soft blobs and low-frequency
texture inside; the moving image is the same function shifted by 3 voxels
along the first array axis (evaluated analytically, no resampling). Built
slab by slab in float32 so the builder itself stays small; written as
uncompressed NIfTI (float32) for quick reading.

    python benchmarks/ct_pair.py OUT_DIR [--shape 256x256x150]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.8, 0.8, 1.0)
CT_SHIFT = 3.0  # voxels, along array axis 0


def ct_volume(shape=CT_SHAPE, spacing=CT_SPACING, shift=0.0, slab=32) -> np.ndarray:
    """The smooth synthetic volume (float32), evaluated at voxel i - shift along axis 0."""
    shape = tuple(int(n) for n in shape)
    sp = np.asarray(spacing, dtype=np.float32)
    extent = np.asarray(shape, dtype=np.float32) * sp  # mm
    rng = np.random.default_rng(14)
    centres = rng.uniform(0.25, 0.75, size=(12, 3)).astype(np.float32) * extent
    radii = rng.uniform(0.04, 0.12, size=(12, 1)).astype(np.float32) * extent.min()
    weights = rng.uniform(-0.6, 0.8, size=12).astype(np.float32)
    out = np.empty(shape, dtype=np.float32)
    y = (np.arange(shape[1], dtype=np.float32) * sp[1])[None, :, None]
    z = (np.arange(shape[2], dtype=np.float32) * sp[2])[None, None, :]
    for start in range(0, shape[0], slab):
        stop = min(shape[0], start + slab)
        x = ((np.arange(start, stop, dtype=np.float32) - shift) * sp[0])[:, None, None]
        # trunk: a soft ellipse in the (x, y) plane, the whole z extent
        r2 = ((x - extent[0] / 2) / (0.42 * extent[0])) ** 2 + ((y - extent[1] / 2) / (0.32 * extent[1])) ** 2
        v = 1.0 / (1.0 + np.exp((r2 - 1.0) * 12.0))
        v = v * (0.6 + 0.15 * np.sin(x / 23.0) * np.cos(y / 31.0) * np.cos(z / 19.0))
        for c, r, w in zip(centres, radii, weights):
            d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
            v = v + w * np.exp(-d2 / (2 * r[0] ** 2))
        out[start:stop] = v
    return out


def affine(spacing=CT_SPACING) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.diag(spacing)
    return a


def write_pair(folder, shape=CT_SHAPE, spacing=CT_SPACING, shift=CT_SHIFT):
    """(fixed path, moving path) of the pair written into ``folder`` (reused when already there)."""
    import nibabel as nib

    os.makedirs(folder, exist_ok=True)
    tag = "x".join(str(n) for n in shape)
    paths = []
    for name, s in (("fixed", 0.0), ("moving", shift)):
        path = os.path.join(folder, f"ct_{tag}_{name}.nii")
        if not os.path.exists(path):
            data = ct_volume(shape, spacing, s)
            tmp = path + ".partial.nii"
            nib.Nifti1Image(data, affine(spacing)).to_filename(tmp)
            del data
            os.replace(tmp, path)
        paths.append(path)
    return tuple(paths)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", default="x".join(map(str, CT_SHAPE)))
    args = p.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    print(*write_pair(args.out, shape), sep="\n")


if __name__ == "__main__":
    sys.exit(main())
