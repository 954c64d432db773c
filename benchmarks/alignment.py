"""The scans users have, on the real OASIS pair: aligned, moved in world space, another contrast.

Cases (OAS1_0001 fixed, OAS1_0002 moving, 35 labels; every Dice is the mean
over the labels present in both maps):

* ``aligned``: the pair as distributed, ``deqreg register`` with its defaults
  (and ``--init none``, the pipeline before the alignment stage existed;
  ``aligned-full``: ``--pyramid 4 2 1``, a last level at the full 1 mm grid);
* ``moved``: the moving scan turned about a random axis and shifted
  (``synthetic.move_rigidly``: resampled, so the header does not say so).
  Dice through the *original* moving labels (the saved transform, then the
  known motion undone: one nearest-neighbour resampling, as for the aligned
  pair) and through the moved labels (two resamplings: what a user measures,
  and what ANTs is given);
* ``contrast``: the moving scan under a non-monotonic intensity map
  (``synthetic.contrast_change``), with ``--similarity lncc`` and ``mind``
  (``--preset multimodal``: MIND-SSC after a rigid mutual-information stage; ``-alone``: ``--similarity mind``
  with nothing else, its affine stage by NCC or MI as the contrasts ask; ``contrast-mind-full``: the same with
  ``--pyramid 4 2 1``);
* ``moved-contrast``: both at once (the motion of ``moved``, then the map of
  ``contrast``), ``--preset multimodal``, Dice as for ``moved``;
* ``t2``: the same with a T2-like map (``synthetic.t2_like``: CSF brightest,
  white matter darkest, background 0);
* ANTs ``SyN`` (affine stage + SyN, antspyx defaults) beside the moved and
  aligned cases, when antspyx is installed;
* ConvexAdam (``convexadam``, the weight-free MIND-SSC method of Learn2Reg, its
  defaults) beside the contrast and T2-like cases, when it is installed:
  ``convexadam-contrast``, ``convexadam-t2``.

Each case is one ``deqreg register`` call in this process (``cli.main``);
times are wall seconds on whatever else the machine is doing.

    python benchmarks/alignment.py --oasis ../shared/data/oasis3d [--cases aligned,moved] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from DEQRegistrationLib import io, metrics  # noqa: E402
from DEQRegistrationLib.apply import load as load_saved  # noqa: E402
from DEQRegistrationLib.cli import main  # noqa: E402
from DEQRegistrationLib.image import Image  # noqa: E402
from DEQRegistrationLib.sampling import Sampler  # noqa: E402
from DEQRegistrationLib.synthetic import contrast_change, grid_centre, move_rigidly, rigid_motion, t2_like  # noqa: E402

import numpy as np  # noqa: E402

CASES = ("aligned", "aligned-none", "aligned-full", "moved", "moved-contrast", "contrast-lncc", "contrast-mind",
         "contrast-mind-alone", "contrast-mind-full", "t2-lncc", "t2-mind", "t2-mind-alone", "ants-moved", "ants-aligned",
         "convexadam-contrast", "convexadam-t2")
#: the working grids of the "-full" cases: the default 3D brain plan (4, 2) ends at 2 mm; this one adds 1 mm
FULL_RESOLUTION = ("--pyramid", "4", "2", "1")


def random_motion(moving: Image, seed: int, degrees: float = 18.0, mm: float = 18.0) -> np.ndarray:
    """A rigid motion about a random axis through the scan's centre, then a random shift of ``mm``."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    shift = rng.normal(size=3)
    return rigid_motion(axis, degrees, mm * shift / np.linalg.norm(shift), grid_centre(moving))


def deqreg(folder: Path, fixed, moving, fixed_seg, moving_seg, *options) -> dict:
    t0 = time.perf_counter()
    argv = ["register", str(fixed), str(moving), "--out", str(folder), "--overwrite", "--fixed-seg", str(fixed_seg),
            "--moving-seg", str(moving_seg), *options]
    assert main(argv) == 0
    m = json.loads((folder / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def ants_syn(fixed, moving, fixed_seg, moving_seg) -> dict:
    import ants

    f, m = ants.image_read(str(fixed)), ants.image_read(str(moving))
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="SyN")
    seconds = time.perf_counter() - t0
    warped = ants.apply_transforms(f, ants.image_read(str(moving_seg)), reg["fwdtransforms"],
                                   interpolator="genericLabel").numpy()
    fs = io.load_labels(fixed_seg).data
    return dict(dice_mean=metrics.mean_dice(fs, np.rint(warped).astype(np.int32)), seconds=seconds,
                folding_percent=None)


def convex_adam(fixed: Image, moving: Image, fixed_seg, moving_seg) -> dict:
    """ConvexAdam with its defaults; its (H, W, D, 3) voxel displacement maps fixed voxel x to moving x + u(x)."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    t0 = time.perf_counter()
    disp = convex_adam_pt(fixed.data, moving.data, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    disp = np.moveaxis(np.asarray(disp, np.float32), -1, 0)
    warped = Sampler.between(fixed, moving).labels(moving_seg, disp)  # same grids: x + u(x) in moving voxels
    return dict(dice_mean=metrics.mean_dice(fixed_seg, warped), seconds=seconds,
                folding_percent=metrics.folding_percent(metrics.jacobian_determinant(disp)))


def run(oasis: Path, cases, work: Path, seed: int) -> dict:
    fixed_p, moving_p = oasis / "OAS1_0001_norm.nii.gz", oasis / "OAS1_0002_norm.nii.gz"
    fseg_p, mseg_p = oasis / "OAS1_0001_seg35.nii.gz", oasis / "OAS1_0002_seg35.nii.gz"
    fixed, moving = io.load_image(fixed_p), io.load_image(moving_p)
    fseg, mseg = io.load_labels(fseg_p), io.load_labels(mseg_p)
    rows = {}

    def report(name, m, **extra):
        row = dict(dice=m.get("dice_mean"), folding_percent=m.get("folding_percent"),
                   seconds=m.get("seconds"), alignment_steps=m.get("alignment_steps"), steps=m.get("steps"),
                   converged=m.get("converged"), alignment_similarity=(m.get("alignment") or {}).get("similarity"),
                   **extra)
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    if "aligned" in cases:
        report("aligned", deqreg(work / "aligned", fixed_p, moving_p, fseg_p, mseg_p))
    if "aligned-none" in cases:
        report("aligned-none", deqreg(work / "aligned_none", fixed_p, moving_p, fseg_p, mseg_p, "--init", "none"))
    if "aligned-full" in cases:
        report("aligned-full", deqreg(work / "aligned_full", fixed_p, moving_p, fseg_p, mseg_p, *FULL_RESOLUTION))
    motion = random_motion(moving, seed)
    moved_p, moved_seg_p = work / "moved.nii.gz", work / "moved_seg.nii.gz"
    if any(c in cases for c in ("moved", "ants-moved")):
        moved, moved_seg = move_rigidly(moving, motion, labels=mseg.data)
        io.save_image(moved, moved_p)
        io.save_labels(moved_seg, moved.affine, moved_seg_p)
        before = metrics.mean_dice(fseg.data, Sampler.between(fixed, moved).labels(moved_seg))
        rows["moved-before"] = dict(dice=before, angle_deg=18.0, shift_mm=18.0, seed=seed,
                                    motion=np.round(motion, 5).tolist())
        print(f"moved-before: {json.dumps(rows['moved-before'])}", flush=True)

    def through_original_labels(folder: Path) -> float:
        """Dice of the saved transform with the known motion undone, through the original moving labels."""
        saved = load_saved(folder, fixed)
        world = np.linalg.inv(motion) @ (np.eye(4) if saved.world is None else saved.world)
        warped = Sampler(fixed.shape, fixed.affine, moving.affine, world=world).labels(mseg.data, saved.displacement)
        return metrics.mean_dice(fseg.data, warped)

    if "moved" in cases:
        m = deqreg(work / "moved", fixed_p, moved_p, fseg_p, moved_seg_p)
        report("moved", m, dice_original_labels=through_original_labels(work / "moved"))
    if "moved-contrast" in cases:
        moved_c, moved_c_seg = move_rigidly(Image(contrast_change(moving.data), moving.affine), motion,
                                            labels=mseg.data)
        moved_c_p, moved_c_seg_p = work / "moved_contrast.nii.gz", work / "moved_contrast_seg.nii.gz"
        io.save_image(moved_c, moved_c_p)
        io.save_labels(moved_c_seg, moved_c.affine, moved_c_seg_p)
        m = deqreg(work / "moved_contrast", fixed_p, moved_c_p, fseg_p, moved_c_seg_p, "--preset", "multimodal")
        report("moved-contrast", m, dice_original_labels=through_original_labels(work / "moved_contrast"))
    try:
        import convexAdam  # noqa: F401
        have_convex_adam = True
    except ImportError:
        have_convex_adam = False
    if have_convex_adam and "convexadam-contrast" in cases:
        report("convexadam-contrast", convex_adam(fixed, Image(contrast_change(moving.data), moving.affine),
                                                  fseg.data, mseg.data))
    if have_convex_adam and "convexadam-t2" in cases:
        report("convexadam-t2", convex_adam(fixed, Image(t2_like(moving.data), moving.affine), fseg.data, mseg.data))
    if any(c in cases for c in ("contrast-lncc", "contrast-mind", "contrast-mind-alone", "contrast-mind-full")):
        contrast_p = work / "contrast.nii.gz"
        io.save_image(Image(contrast_change(moving.data), moving.affine), contrast_p)
        if "contrast-lncc" in cases:
            report("contrast-lncc", deqreg(work / "contrast_lncc", fixed_p, contrast_p, fseg_p, mseg_p,
                                           "--similarity", "lncc"))
        if "contrast-mind" in cases:
            report("contrast-mind", deqreg(work / "contrast_mind", fixed_p, contrast_p, fseg_p, mseg_p,
                                           "--preset", "multimodal"))
        if "contrast-mind-alone" in cases:
            report("contrast-mind-alone", deqreg(work / "contrast_mind_alone", fixed_p, contrast_p, fseg_p, mseg_p,
                                                 "--similarity", "mind"))
        if "contrast-mind-full" in cases:
            report("contrast-mind-full", deqreg(work / "contrast_mind_full", fixed_p, contrast_p, fseg_p, mseg_p,
                                                "--similarity", "mind", *FULL_RESOLUTION))
    if any(c in cases for c in ("t2-lncc", "t2-mind", "t2-mind-alone")):
        t2_p = work / "t2.nii.gz"
        io.save_image(Image(t2_like(moving.data), moving.affine), t2_p)
        if "t2-lncc" in cases:
            report("t2-lncc", deqreg(work / "t2_lncc", fixed_p, t2_p, fseg_p, mseg_p, "--similarity", "lncc"))
        if "t2-mind" in cases:
            report("t2-mind", deqreg(work / "t2_mind", fixed_p, t2_p, fseg_p, mseg_p, "--preset", "multimodal"))
        if "t2-mind-alone" in cases:
            report("t2-mind-alone", deqreg(work / "t2_mind_alone", fixed_p, t2_p, fseg_p, mseg_p, "--similarity", "mind"))
    try:
        import ants  # noqa: F401
        have_ants = True
    except ImportError:
        have_ants = False
    if have_ants and "ants-aligned" in cases:
        report("ants-aligned", ants_syn(fixed_p, moving_p, fseg_p, mseg_p))
    if have_ants and "ants-moved" in cases:
        report("ants-moved", ants_syn(fixed_p, moved_p, fseg_p, moved_seg_p))
    return rows


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oasis", required=True, type=Path, help="folder of OAS1_000{1,2}_norm/seg35.nii.gz")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--seed", type=int, default=12, help="the random motion's seed")
    ap.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    cases = set(args.cases.split(","))
    unknown = cases - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; choose from {CASES}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run(args.oasis, cases, work, args.seed)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
