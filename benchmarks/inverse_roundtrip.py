"""Forward then inverse: how far do brain voxels land from where they started?

    deqreg register FIXED MOVING --fixed-seg FSEG --moving-seg MSEG --inverse --out DIR
    python benchmarks/inverse_roundtrip.py DIR FIXED FSEG MOVING [--json]

Every voxel of the fixed label map's foreground (the brain) is mapped into
the moving space with the saved forward field (as ``deqreg apply`` maps
points), then back with the inverse two ways:

* ``solved at the points`` — ``deqreg apply --inverse`` on points: the fixed
  point v = -u(q + v) solved at each mapped point;
* ``saved grid, interpolated`` — the saved ``inverse.*`` (exact at the moving
  grid's voxels) interpolated linearly at the mapped points, which is what a
  tool reading the inverse file (ITK, Slicer) does with points.

Distances are in fixed-grid voxels; percentiles over the brain voxels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from DEQRegistrationLib import apply, io  # noqa: E402
from DEQRegistrationLib.geometry import physical_to_voxel_points, voxel_to_physical_points  # noqa: E402
from DEQRegistrationLib.sampling import Sampler  # noqa: E402


def stats(err):
    p50, p95, p99 = np.percentile(err, [50, 95, 99])
    return dict(p50=float(p50), p95=float(p95), p99=float(p99), max=float(err.max()), n=int(err.size))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("fixed")
    ap.add_argument("fixed_seg")
    ap.add_argument("moving")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    fixed, moving = io.load_image(a.fixed, "fixed image"), io.load_image(a.moving, "moving image")
    brain = np.argwhere(io.load_labels(a.fixed_seg, like=fixed).data > 0).astype(np.float64)
    fwd = apply.load(a.result, fixed)
    inv = apply.load(a.result, moving, inverse=True)
    x = voxel_to_physical_points(brain, fixed.affine)
    y, _ = fwd.points(x)
    t0 = time.perf_counter()
    back, info = fwd.points(y, inverse=True)
    seconds = time.perf_counter() - t0
    out = {"solved at the points": stats(np.linalg.norm(physical_to_voxel_points(back, fixed.affine, 3) - brain, axis=1))}
    out["solved at the points"].update(seconds=seconds, steps=info["steps"], residual=info["residual"])
    if inv.inverse is not None:
        m = physical_to_voxel_points(y, moving.affine, 3)
        p = Sampler(moving.shape, moving.affine, fixed.affine, world=inv.world_inv).points(m, inv.inverse)
        out["saved grid, interpolated"] = stats(np.linalg.norm(p - brain, axis=1))
        out["saved inverse"] = inv.inverse_info
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{len(brain)} brain voxels; distance back after forward then inverse, fixed voxels:")
    for name in ("solved at the points", "saved grid, interpolated"):
        if name in out:
            s = out[name]
            print(f"  {name:26s} p50 {s['p50']:.2e}  p95 {s['p95']:.2e}  p99 {s['p99']:.2e}  max {s['max']:.3g}")
    s = out["solved at the points"]
    print(f"  (points solve: {s['steps']} steps, residual {s['residual']:.2e}, {s['seconds']:.1f} s)")
    if "saved inverse" in out:
        i = out["saved inverse"]
        print(f"  saved inverse: {i['steps']} steps, residual {i['residual']:.2e}, error p95 {i['error_mm_p95']:.2e} mm, "
              f"unreliable {i['unreliable_percent']:.3f}% of moving voxels, forward folded "
              f"{i['forward_folded_percent']:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
