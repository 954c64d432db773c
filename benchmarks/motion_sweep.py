"""Many rigid motions of the real OASIS moving scan, on a 3 mm copy: does the default pipeline bring each back?

The pair is block-averaged to 3 mm (labels by majority, as in
``Testing/test_oasis_alignment.py``), registered as distributed (the
reference Dice), then the moving scan is turned about a random axis by a
random angle and shifted by a random distance (``synthetic.move_rigidly``:
resampled, so the header does not say so) and registered again with
``register()``'s defaults. Dice goes through the *original* moving labels
(the result, then the known motion undone: one nearest-neighbour
resampling, as for the reference), so the gap to the reference is the
pipeline's, not the resampling's.

    python benchmarks/motion_sweep.py --oasis ../shared/data/oasis3d [--seed 1] [--n 6] [--max-angle 20] [--max-shift 20]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from test_oasis_alignment import _downsampled  # noqa: E402  (the test's 3 mm copy, one definition)

from DEQRegistrationLib import metrics, register  # noqa: E402
from DEQRegistrationLib.sampling import Sampler  # noqa: E402
from DEQRegistrationLib.synthetic import grid_centre, move_rigidly, rigid_motion  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oasis", required=True, type=Path, help="folder of OAS1_000{1,2}_norm/seg35.nii.gz")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=6, help="number of motions")
    ap.add_argument("--max-angle", type=float, default=20.0, help="degrees (drawn from 5 to this)")
    ap.add_argument("--max-shift", type=float, default=20.0, help="mm (drawn from 5 to this)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    d = args.oasis
    fixed, moving = _downsampled(d / "OAS1_0001_norm.nii.gz"), _downsampled(d / "OAS1_0002_norm.nii.gz")
    fixed_seg = _downsampled(d / "OAS1_0001_seg35.nii.gz", labels=True).data
    moving_seg = _downsampled(d / "OAS1_0002_seg35.nii.gz", labels=True).data
    ref = register(fixed, moving, moving_labels=moving_seg, device="cpu")
    reference = metrics.mean_dice(fixed_seg, ref.warped_labels)
    rows = [dict(case="aligned", dice=reference, folding_percent=metrics.folding_percent(ref.jacobian),
                 converged=ref.converged, steps=ref.steps)]
    print(f"aligned: Dice {reference:.4f}, converged {ref.converged}", flush=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.n):
        axis = rng.normal(size=3)
        angle = float(rng.uniform(5, args.max_angle))
        shift = rng.normal(size=3)
        shift = shift / np.linalg.norm(shift) * rng.uniform(5, args.max_shift)
        motion = rigid_motion(axis, angle, shift, grid_centre(moving))
        moved, _ = move_rigidly(moving, motion, margin=8)
        res = register(fixed, moved, device="cpu")
        world = np.linalg.inv(motion) @ res.world
        warped = Sampler(fixed.shape, fixed.affine, moving.affine, world=world).labels(moving_seg, res.displacement)
        dice = metrics.mean_dice(fixed_seg, warped)
        row = dict(case=f"motion {i}", angle_deg=angle, shift_mm=float(np.linalg.norm(shift)), dice=dice,
                   gap=dice - reference, folding_percent=metrics.folding_percent(res.jacobian),
                   converged=res.converged, steps=res.steps)
        rows.append(row)
        print(f"motion {i}: {angle:.1f} deg, {row['shift_mm']:.1f} mm: Dice {dice:.4f} ({dice - reference:+.4f}), "
              f"folding {row['folding_percent']:.3f} %, converged {res.converged}, {res.steps} steps", flush=True)
    gaps = [r["gap"] for r in rows[1:]]
    if gaps:
        print(f"worst gap {min(gaps):+.4f}, mean {np.mean(gaps):+.4f}; converged {sum(r['converged'] for r in rows[1:])}"
              f"/{len(gaps)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
