"""Command line: ``deqreg register FIXED MOVING --out DIR``, ``deqreg apply``, ``deqreg batch PAIRS.csv --out DIR``,
``deqreg demo``.

A thin layer over ``register()``: it reads and checks the files (``io``), runs
the registration with a progress bar on stderr, computes the evaluation
metrics and writes every output into a temporary folder beside ``DIR`` that is
renamed into place only when complete, so an interrupted run leaves nothing
half-written. ``deqreg apply`` reuses a saved result (``apply``) on another
image, label map or points file, forward or inverse. Any problem with the
user's input ends in one line, ``deqreg: error: ...``, and exit code 2; never
a traceback.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from .config import INIT_SIMILARITIES, INITS, PRESETS, SIMILARITIES, SOLVER_NAMES, UPDATES, Settings, make_settings
from .errors import AlignmentWarning, ContrastWarning, InputError
from .image import Image
from .io import OUTPUT_FORMATS
from .solvers import RESIDUAL_DEFINITION

PROG = "deqreg"
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_SOME_FAILED = 3  # deqreg batch: some pairs failed or did not run (summary.csv says which)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``deqreg: error:`` line and exit 2 like every other error."""

    def error(self, message):
        raise InputError(f"{message} (see '{self.prog} --help')")


#: --model when not given: the weight-free gradient update, the most accurate mode on a CPU today (README)
DEFAULT_MODEL = "none"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description="Deformable image registration with Deep Equilibrium Models.")
    sub = parser.add_subparsers(dest="command", metavar="{register,apply,demo,batch}", parser_class=_OneLineParser)
    sub.required = True

    reg = sub.add_parser("register", help="register MOVING onto FIXED and write the results to a folder",
                         description="Register MOVING onto FIXED (2D or 3D; NIfTI .nii/.nii.gz, .mgz, NRRD "
                                     ".nrrd/.nhdr, MetaImage .mha/.mhd or a DICOM series folder).")
    reg.add_argument("fixed", metavar="FIXED", help="fixed (reference) image")
    reg.add_argument("moving", metavar="MOVING", help="moving image, resampled into the fixed grid")
    reg.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    reg.add_argument("--fixed-seg", metavar="F", help="label map on the fixed grid (for Dice/HD95)")
    reg.add_argument("--moving-seg", metavar="M", help="label map on the moving grid (warped alongside)")
    reg.add_argument("--fixed-landmarks", metavar="F", help="fixed landmarks: voxel CSV, .fcsv or .mrk.json")
    reg.add_argument("--moving-landmarks", metavar="M", help="moving landmarks, same row order as the fixed ones")
    _add_common(reg)
    reg.add_argument("--model", default=None,
                     help="'none' (no weights, gradient update), 'default' (shipped weights) or a .pt path "
                          f"(default: {DEFAULT_MODEL})")
    reg.add_argument("--update", choices=UPDATES, default=None,
                     help="update rule (default: the model's own with a model, gradient without)")
    reg.add_argument("--solver", choices=SOLVER_NAMES, default=None,
                     help="root solver (default: anderson for the gradient update, a model's own otherwise)")
    reg.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                     help="total solver steps over all levels")
    reg.add_argument("--tol", type=_positive_float, default=None, metavar="X",
                     help="stop when the relative residual falls below X; residual = " + RESIDUAL_DEFINITION)
    reg.add_argument("--pyramid", type=_positive_int, nargs="+", default=None, metavar="F",
                     help="the deformable stage's levels as downsampling factors of the fixed grid, coarse to fine "
                          "(default: from the grid's size and spacing, e.g. 4 2 for a 1 mm brain, a 2 mm working "
                          "grid; 4 2 1 adds the full grid: on the OASIS pair Dice 0.755 -> 0.767 in 5x the time)")
    reg.add_argument("--preset", choices=tuple(PRESETS), default=None,
                     help="a bundle of the options below for a common case; options given beside it win: "
                          + "; ".join(f"{k}: {v['about']}" for k, v in PRESETS.items()))
    reg.add_argument("--init", choices=INITS, default=None,
                     help="linear alignment before the deformable stage (default: affine)")
    reg.add_argument("--init-similarity", choices=INIT_SIMILARITIES, default=None,
                     help="the alignment's similarity (default: ncc; mse with --similarity mse; with "
                          "--similarity mind both ncc and mi, mi's pose kept when the contrasts differ)")
    reg.add_argument("--similarity", choices=SIMILARITIES, default=None,
                     help="the deformable stage's similarity, gradient update (default: lncc)")
    reg.add_argument("--fixed-mask", metavar="F", help="label map or binary image (any grid): where the similarity "
                                                      "is measured on the fixed image; folding is also reported inside it")
    reg.add_argument("--moving-mask", metavar="M", help="label map or binary image (any grid) on the moving side")
    reg.add_argument("--format", choices=tuple(OUTPUT_FORMATS), default="nii",
                     help="file format of the output images and fields (default: nii, i.e. .nii.gz)")
    reg.add_argument("--inverse", action="store_true",
                     help="also write the inverse transform (moving -> fixed space), solved as a fixed point")
    reg.add_argument("--memory-check", choices=("error", "warn", "off"), default="error",
                     help="before registering, compare the estimated peak memory with the memory available: "
                          "'error' stops (with what would make it fit) when it does not fit, 'warn' only warns "
                          "(default: error)")

    ap = sub.add_parser("apply", help="apply a saved registration to an image, a label map or points",
                        description="Apply the transform saved by 'deqreg register' to INPUT. Forward: a "
                                    "moving-space image or label map is resampled onto the fixed grid "
                                    "(--reference FIXED); fixed-space points are mapped into the moving space. "
                                    "--inverse: a fixed-space image onto the moving grid (--reference MOVING); "
                                    "moving-space points into the fixed space.")
    ap.add_argument("transform", metavar="TRANSFORM",
                    help="a 'deqreg register' output folder (or its transform.json), or an ITK displacement field")
    ap.add_argument("input", metavar="INPUT",
                    help="image, label map (with --labels) or points (.csv voxel coordinates, .fcsv, .mrk.json)")
    ap.add_argument("--reference", required=True, metavar="IMAGE",
                    help="the grid the transform was computed on: the fixed image (the moving image with "
                         "--inverse); the output grid for images, the grid of .csv voxel points")
    ap.add_argument("--out", required=True, metavar="FILE",
                    help="output file: .nii.gz/.nii/.nrrd/.mha for images, the input's format for points")
    ap.add_argument("--labels", action="store_true", help="INPUT is a label map: nearest neighbour, labels kept")
    ap.add_argument("--interpolation", choices=("linear", "bspline"), default="linear",
                    help="for images (default: linear; bspline = cubic B-spline)")
    ap.add_argument("--inverse", action="store_true",
                    help="apply the inverse transform (moving -> fixed space); computed if the result has none")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    demo = sub.add_parser("demo", help="offline demo on a real brain template shipped by nilearn, with a plot",
                          description="Offline demo on real anatomy: the MNI ICBM152 2009a T1 template shipped "
                                      "in the nilearn wheel, registered to a known smooth deformation of "
                                      "itself, with tissue labels for Dice.")
    demo.add_argument("--out", default="deqreg_demo", metavar="DIR", help="output folder (default: deqreg_demo)")
    _add_common(demo)
    demo.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                      help="total solver steps (default: the demo's budget, about a minute on 2 CPU cores)")

    from .batch import share_register_options

    bat = sub.add_parser("batch", help="register every pair listed in a CSV file, one output folder per pair",
                         description="Register every pair of PAIRS.csv (columns fixed, moving and optional "
                                     "fixed_seg, moving_seg, fixed_landmarks, moving_landmarks, id) into "
                                     "DIR/<id>/, exactly as 'deqreg register' would. Finished pairs are "
                                     "skipped, so re-running the command resumes; a failed pair does not stop "
                                     "the others. Writes DIR/summary.csv, summary.md and summary.json. Under "
                                     "torchrun every rank takes its share of the rows.")
    bat.add_argument("pairs", metavar="PAIRS.csv", help="one pair per row; relative paths are read from the "
                                                        "CSV's folder")
    bat.add_argument("--out", required=True, metavar="DIR", help="folder of the pair folders and the summary")
    bat.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                     help="local worker processes, the CPU threads split among them (default: 1)")
    share_register_options(reg, bat)  # last: every register option defined above, one definition
    return parser


def _add_common(p):
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --- the job ------------------------------------------------------------------------


@dataclass
class Job:
    """Everything one registration needs, already loaded and checked."""
    fixed: Image
    moving: Image
    fixed_seg: Optional[np.ndarray] = None
    moving_seg: Optional[np.ndarray] = None
    fixed_points: Optional[np.ndarray] = None
    moving_points: Optional[np.ndarray] = None
    fixed_mask: Optional[np.ndarray] = None   # boolean, on the fixed image's grid
    moving_mask: Optional[np.ndarray] = None  # boolean, on the moving image's grid
    settings: Settings = field(default_factory=Settings)
    inputs: Dict = field(default_factory=dict)
    output_format: str = "nii"   # io.OUTPUT_FORMATS key
    inverse: bool = False        # also solve and write the inverse transform


def resolve_model(model: Optional[str], update: Optional[str], ndim: int):
    """(model argument for register(), update rule), refusing combinations that cannot run."""
    from .checkpoint import model_path, read_checkpoint

    model = DEFAULT_MODEL if model is None else model
    if model.lower() == "none":
        update = update or "gradient"
        if update != "gradient":
            raise InputError(f"--update {update} needs trained weights; give --model default or --model PATH")
        return None, update
    path = model_path(model, ndim)
    return ("default" if model == "default" else str(path)), update or read_checkpoint(path)["config"].update


def load_job(args) -> Job:
    """Read and check every input of ``deqreg register`` before any work starts."""
    from . import io
    from .preprocess import check_pair

    fixed = io.load_image(args.fixed, "fixed image")
    moving = io.load_image(args.moving, "moving image")
    check_pair(fixed, moving)
    if bool(args.fixed_seg) != bool(args.moving_seg):
        raise InputError("give both --fixed-seg and --moving-seg, or neither")
    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    job = Job(fixed, moving)
    if args.fixed_seg:
        job.fixed_seg = io.load_labels(args.fixed_seg, like=fixed, what="fixed label map").data
        job.moving_seg = io.load_labels(args.moving_seg, like=moving, what="moving label map").data
    if args.fixed_landmarks:
        job.fixed_points = io.load_landmarks(args.fixed_landmarks, fixed, "fixed landmarks")
        job.moving_points = io.load_landmarks(args.moving_landmarks, moving, "moving landmarks")
        io.check_landmark_pair(job.fixed_points, job.moving_points)
    from .masks import on_grid

    for role, image in (("fixed", fixed), ("moving", moving)):
        path = getattr(args, f"{role}_mask", None)
        if path:
            # mapped onto its image's grid now, so a mask that cannot be used is refused before any work
            setattr(job, f"{role}_mask", on_grid(io.load_mask(path, f"{role} mask"), image, f"{role} mask {path}"))
    job.inputs = {k: str(Path(v).resolve()) for k, v in
                  dict(fixed=args.fixed, moving=args.moving, fixed_seg=args.fixed_seg, moving_seg=args.moving_seg,
                       fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
                       fixed_mask=getattr(args, "fixed_mask", None),
                       moving_mask=getattr(args, "moving_mask", None)).items() if v}
    return job


class ProgressBar:
    """register()'s callback drawn as a tqdm bar on stderr: step, level and residual.

    The bar appears at the first step, so an input error raised before any
    work leaves stderr with just its one line.
    """

    def __init__(self, desc="register", file=None):
        self.desc, self.file, self.bar = desc, file, None

    def __call__(self, p):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.max_steps, desc=self.desc, unit="step", file=self.file or sys.stderr,
                            dynamic_ncols=True, leave=True, mininterval=0.2)
        if self.bar.total != p.max_steps:
            self.bar.total = p.max_steps
        self.bar.update(p.step - self.bar.n)
        stage = getattr(p, "stage", "deformable")
        if stage == "features":  # no solver step: the full-resolution descriptors, before the deformable stage
            self.bar.set_postfix_str(f"descriptors {100 * (p.fraction or 0):.0f}%", refresh=True)
            return None
        stage = "alignment " if stage == "alignment" else ""
        self.bar.set_postfix_str(f"{stage}level {p.level + 1}/{p.n_levels} residual {p.residual:.2e}", refresh=False)
        return None

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_register(job: Job, progress: Optional[Callable] = None):
    """register() with the job's settings and labels; returns the RegistrationResult."""
    from .registration import register  # imported when first needed: torch is heavy

    # field_only: execute() derives warped image, labels and Jacobian from the field as saved
    return register(job.fixed, job.moving, job.settings, callback=progress, moving_labels=job.moving_seg,
                    fixed_mask=job.fixed_mask, moving_mask=job.moving_mask, field_only=True)


def compute_metrics(job: Job, result) -> Dict:
    """The numbers of metrics.json; conventions as in ``metrics`` (Dice over labels in both maps, no 0)."""
    from . import metrics as M
    from .chunked import jacobian_summary

    jac = np.asarray(result.jacobian)
    out = jacobian_summary(jac)  # folding, SDlogJ, min, max (slabs on large grids)
    if getattr(result, "fixed_mask", None) is not None:
        inside = np.asarray(result.fixed_mask, dtype=bool)
        out.update(folding_percent_mask=M.folding_percent(jac[inside]),
                   std_log_jacobian_mask=float(np.log(np.clip(jac[inside], 1e-9, 1e9)).std()))
    out.update(dice_before=None, dice_mean=None, dice_per_label=None, dice_before_per_label=None,
               hd95=None, hd95_before=None, tre_mm=None, tre_before_mm=None)
    if job.fixed_seg is not None:
        from .sampling import Sampler

        labels = M.common_labels(job.fixed_seg, job.moving_seg)
        before = Sampler.between(job.fixed, job.moving).labels(job.moving_seg)
        after = np.asarray(result.warped_labels)
        surface = M.SurfaceDistance(job.fixed_seg, job.fixed.spacing)  # the fixed side once, for both maps
        d_before = M.dice_per_label(job.fixed_seg, before, labels)
        d_after = M.dice_per_label(job.fixed_seg, after, labels)
        out.update(
            labels=[int(v) for v in labels],
            dice_before=_nanmean(d_before.values()),
            dice_mean=_nanmean(d_after.values()),
            dice_per_label={str(k): v for k, v in d_after.items()},
            dice_before_per_label={str(k): v for k, v in d_before.items()},
            hd95=surface.hd95(after, labels),
            hd95_before=surface.hd95(before, labels),
        )
    if job.fixed_points is not None:
        disp = np.asarray(result.displacement)
        tre = M.target_registration_error(job.fixed_points, job.moving_points, disp,
                                          job.fixed.affine, job.moving.affine, world=result.world)
        tre0 = M.target_registration_error(job.fixed_points, job.moving_points, np.zeros_like(disp),
                                           job.fixed.affine, job.moving.affine)
        out.update(tre_mm=float(tre.mean()), tre_before_mm=float(tre0.mean()),
                   tre_median_mm=float(np.median(tre)), tre_per_landmark_mm=[float(v) for v in tre],
                   n_landmarks=int(len(tre)))
    stages = [row.get("stage", "deformable") for row in result.trace]
    out.update(steps=stages.count("deformable"), alignment_steps=stages.count("alignment"),
               converged=bool(result.converged),
               final_residual=float(result.final_residual), seconds=float(result.seconds),
               device=str(result.device), cancelled=bool(getattr(result, "cancelled", False)))
    alignment = getattr(result, "alignment", None)
    out.update(affine=np.asarray(result.world).tolist(),
               alignment=None if alignment is None else alignment.as_dict(),
               warnings=list(getattr(result, "warnings", [])))
    out["conventions"] = {
        "dice": "per label present in both input label maps, background 0 excluded; dice_mean = nanmean",
        "dice_before": "fixed labels vs moving labels resampled into the fixed grid with identity (nearest)",
        "hd95": "mean over labels of the 95th-percentile symmetric surface distance, mm",
        "folding_percent": "% of fixed-grid voxels with det(Jacobian) <= 0",
        "std_log_jacobian": "std(log(clip(detJ))) over the interior (2 voxels cropped per side)",
        "std_log_jacobian_l2r": "Learn2Reg code's variant std(log(detJ + 3))",
        "tre_mm": "mean landmark distance in mm in the moving image's physical space",
        "displacement": "displacement.*: ITK displacement field d, LPS mm, fixed grid, applied before the affine: "
                        "a fixed point x maps to W(x + d(x)); transform.json names the files of the saved "
                        "transform and its direction (deqreg apply reads it)",
        "affine": "W, the linear alignment alone, fixed RAS -> moving RAS (4x4; affine.tfm holds it in LPS for "
                  "ITK, written when the alignment stage ran); identity with --init none",
        "folding_percent_mask": "folding_percent and SDlogJ (no crop) over the fixed mask only, when one is given",
        "jacobian": "of the deformation d alone (W scales every determinant by det W, folding unchanged)",
        "warnings": "what the run warned about, one line each (an alignment undone; intensities a linear map "
                    "does not relate, with LNCC or MSE)",
    }
    return out


def _nanmean(values) -> Optional[float]:
    vals = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else None


def _json_safe(obj):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_outputs(folder: Path, job: Job, result, metrics: Dict, transform=None, inverse=None) -> None:
    """Every output file of a run, into ``folder`` (the temporary one).

    ``transform`` is the ``apply.SavedTransform`` of ``result`` (made here if
    None), ``inverse`` an ``inverse.InverseResult`` to save beside it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from . import apply, io

    fixed = job.fixed
    fmt = job.output_format
    if transform is None:
        _, transform = apply.saved_result(result, job.moving)
    jac = np.asarray(result.jacobian, dtype=np.float32)
    # NIfTI: the float fields are stored uncompressed inside their .gz (level 0: they shrink 8-20 % at
    # level 1 for most of the writing time); images and labels compress well at level 1. zlib releases
    # the GIL, so two threads write two files at once (NRRD/MetaImage go through SimpleITK: one thread).
    writes = [
        lambda: apply.save(folder, transform, fmt, inverse, compresslevel=0),
        lambda: io.save_image(Image(np.asarray(result.warped.data), fixed.affine),
                              folder / io.output_name("warped", fmt), compresslevel=1),
        lambda: io.save_image(Image(jac, fixed.affine), folder / io.output_name("jacobian", fmt), compresslevel=0),
        lambda: io.save_labels((jac <= 0).astype(np.uint8), fixed.affine,
                               folder / io.output_name("folding_mask", fmt), compresslevel=1),
    ]
    if result.warped_labels is not None:
        writes.append(lambda: io.save_labels(np.asarray(result.warped_labels), fixed.affine,
                                             folder / io.output_name("warped_seg", fmt), compresslevel=1))
    with ThreadPoolExecutor(max_workers=2 if fmt == "nii" else 1) as pool:
        for done in [pool.submit(w) for w in writes]:
            done.result()
    with open(folder / "convergence.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "stage", "level", "residual", "seconds"])
        for row in result.trace:
            w.writerow([row["step"], row.get("stage", "deformable"), row["level"], f"{row['residual']:.6g}",
                        f"{row['seconds']:.4f}"])
    doc = dict(metrics)
    doc["settings"] = job.settings.as_dict()
    doc["plan"] = result.plan.as_dict()
    doc["inputs"] = dict(job.inputs)
    (folder / "metrics.json").write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")


def check_out_dir(out: Path, overwrite: bool, inputs=()) -> Path:
    """Refuse an existing DIR unless --overwrite, and never one that holds the inputs."""
    out = Path(out).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"output folder {out} already exists; use --overwrite to replace it")
        if not out.is_dir() or out.is_symlink():
            raise InputError(f"{out} exists and is not a folder; refusing to replace it")
        real = out.resolve()
        for p in inputs:
            if p and real in Path(p).resolve().parents:
                raise InputError(f"refusing to --overwrite {out}: it contains the input {p}")
        if any(out.iterdir()) and not (out / "metrics.json").is_file():
            raise InputError(f"refusing to --overwrite {out}: it is not empty and not a deqreg output folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"cannot create {out}: {out.parent} is not a folder")
    return out


def publish(out: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp)`` on a fresh folder beside ``out``, then rename it to ``out``.

    On any failure (or Ctrl-C) the temporary folder is removed and an existing
    ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    old = None
    try:
        fill(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def execute(job: Job, out: Path, desc: str = "register", extra_metrics: Optional[Callable] = None,
            extra_files: Optional[Callable] = None, progress: Optional[Callable] = None):
    """Register, measure, write: the shared core of ``register`` and ``demo``. Returns (result, metrics).

    ``extra_metrics(result) -> dict`` adds entries to metrics.json;
    ``extra_files(folder, result, metrics)`` writes more files into the
    temporary folder, so they too appear only with a complete run.
    ``progress(p)``, when given, replaces the progress bar (``deqreg batch`` draws its own).
    """
    from .apply import saved_result
    from .memory import SPILL_MIN_VOXELS, FieldSpill, grid_only

    bar = ProgressBar(desc) if progress is None else None
    try:
        result = run_register(job, bar or progress)
    finally:
        if bar is not None:
            bar.close()
    # Outputs and metrics come from the field as saved, so 'deqreg apply' reproduces them. Input voxels
    # are released as soon as they are used: from here on the outputs need only the grids (``memory``).
    job.fixed = grid_only(job.fixed)
    spill = FieldSpill(out, job.output_format) if result.displacement[0].size >= SPILL_MIN_VOXELS else None
    try:
        result, transform = saved_result(result, job.moving, job.moving_seg, reuse_field=True, on_field=spill)
        job.moving = grid_only(job.moving)
        return _finish(job, out, result, transform, spill, extra_metrics, extra_files)
    finally:
        if spill is not None:
            spill.cleanup()


def _finish(job, out, result, transform, spill, extra_metrics, extra_files):
    """execute() after the field is saved: inverse, metrics, every file."""
    inverse = None
    if job.inverse:
        transform, inverse = transform.with_inverse()
        print(f"{PROG}: {inverse.message()}", file=sys.stderr)
    metrics = compute_metrics(job, result)
    if inverse is not None:
        metrics["inverse"] = inverse.summary()
    if extra_metrics is not None:
        metrics.update(extra_metrics(result))

    def fill(tmp):
        if spill is not None:  # the forward field, written early to bound memory (``memory.FieldSpill``)
            spill.move_into(tmp, transform)
        write_outputs(tmp, job, result, metrics, transform, inverse)
        if extra_files is not None:
            extra_files(tmp, result, metrics)

    publish(out, fill)
    return result, metrics


def summary_line(metrics: Dict) -> str:
    aligned = f"{metrics['alignment_steps']} alignment + " if metrics.get("alignment_steps") else ""
    parts = [f"{aligned}{metrics['steps']} steps", f"{metrics['seconds']:.1f} s on {metrics['device']}",
             f"residual {metrics['final_residual']:.2e}" + ("" if metrics["converged"] else " (not converged)")]
    if metrics.get("dice_mean") is not None:
        parts.append(f"Dice {metrics['dice_before']:.3f} -> {metrics['dice_mean']:.3f}")
    if metrics.get("tre_mm") is not None:
        parts.append(f"TRE {metrics['tre_before_mm']:.2f} -> {metrics['tre_mm']:.2f} mm")
    parts.append(f"folding {metrics['folding_percent']:.3f}%")
    return ", ".join(parts)


#: register options that are Settings fields of the same name (make_settings validates them)
REGISTER_SETTING_OPTIONS = ("preset", "init", "init_similarity", "similarity", "pyramid")


def cmd_register(args, progress: Optional[Callable] = None) -> int:
    """``deqreg register``; ``deqreg batch`` runs it per pair with its own ``progress`` and no closing line."""
    out = check_out_dir(Path(args.out), args.overwrite,
                        [args.fixed, args.moving, args.fixed_seg, args.moving_seg,
                         args.fixed_landmarks, args.moving_landmarks, args.fixed_mask, args.moving_mask])
    job = load_job(args)
    model, update = resolve_model(args.model, args.update, job.fixed.ndim)
    job.settings = make_settings(update=update, model=model, solver=args.solver, max_steps=args.max_steps,
                                 tol=args.tol, device=args.device,
                                 **{k: getattr(args, k) for k in REGISTER_SETTING_OPTIONS
                                    if getattr(args, k, None) is not None})
    job.output_format, job.inverse = args.format, args.inverse
    from .memory import check as memory_check

    memory_check(job.fixed, job.moving, update, labels=job.fixed_seg is not None, model=model,
                 mode=getattr(args, "memory_check", "error"), warn=lambda m: print(f"{PROG}: {m}", file=sys.stderr),
                 pyramid=job.settings.pyramid, similarity=job.settings.similarity)
    with warnings.catch_warnings():
        for category in (AlignmentWarning, ContrastWarning):  # reported below, from metrics.json, one line each
            warnings.simplefilter("ignore", category)
        _, metrics = execute(job, out, progress=progress)
    for message in metrics.get("warnings", []):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    if progress is None:
        print(f"{PROG}: wrote {out} ({summary_line(metrics)})")
    return 0


def cmd_batch(args) -> int:
    from .batch import run_batch

    options = {k: v for k, v in vars(args).items() if k not in ("command", "pairs", "out", "jobs")}
    return run_batch(args.pairs, args.out, jobs=args.jobs, options=options)


def cmd_demo(args) -> int:
    from .demo import run_demo

    out = check_out_dir(Path(args.out), args.overwrite)
    metrics = run_demo(out, device=args.device, max_steps=args.max_steps)
    print(f"{PROG}: wrote {out} ({summary_line(metrics)}); see {out / 'demo.png'}")
    return 0


def check_out_file(out: Path, overwrite: bool, inputs=()) -> Path:
    """Refuse an existing FILE unless --overwrite, and never one of the inputs."""
    out = Path(out).expanduser().absolute()
    for p in inputs:
        if p and Path(p).exists() and (out == Path(p).absolute() or (out.exists() and out.samefile(p))):
            raise InputError(f"refusing to write {out}: it is an input")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"output file {out} already exists; use --overwrite to replace it")
        if out.is_dir():
            raise InputError(f"{out} is a folder; --out names the output file")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"cannot create {out}: {out.parent} is not a folder")
    return out


def publish_file(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``out`` with the same suffix, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp = tmp_dir / out.name
        write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def cmd_apply(args) -> int:
    from . import apply, io

    points_in = io.is_points_file(args.input)
    out = check_out_file(Path(args.out), args.overwrite, [args.transform, args.input, args.reference])
    if points_in and (args.labels or args.interpolation != "linear"):
        raise InputError("--labels and --interpolation are for images; INPUT is a points file")
    if args.labels and args.interpolation != "linear":
        raise InputError("--labels uses nearest neighbour; --interpolation is for intensity images")
    if points_in:
        if io.points_kind(out) != io.points_kind(args.input):
            raise InputError(f"points are written in their input format: --out must be a "
                             f"{io.points_kind(args.input)} file like {Path(args.input).name}")
    else:
        io.check_image_output(out)  # refuses unknown output suffixes before any work
    reference = io.load_image(args.reference, "reference image")
    transform = apply.load(args.transform, reference, inverse=args.inverse)
    direction = "inverse (moving -> fixed)" if args.inverse else "forward (fixed -> moving)"

    if points_in:
        pf = io.read_points(args.input, "points")
        values, info = apply.map_points_file(transform, pf, reference, inverse=args.inverse)
        if info is not None:
            bad = int(np.count_nonzero(info["mask"] != 0))
            print(f"{PROG}: inverse at {len(values)} points: {info['steps']} steps, residual "
                  f"{info['residual']:.2e}, max error {float(info['error_mm'].max()):.3g} mm"
                  + (f"; {bad} point(s) unreliable (folded, unconverged or outside the fixed grid)" if bad else ""),
                  file=sys.stderr)
        publish_file(out, lambda tmp: io.write_points(pf, values, tmp))
        print(f"{PROG}: wrote {out} ({len(values)} points, {direction})")
        return 0

    what = "label map" if args.labels else "image"
    data = io.load_labels(args.input, what=what) if args.labels else io.load_image(args.input, what)
    if data.ndim != reference.ndim:
        raise InputError(f"{what} is {data.ndim}D but the reference is {reference.ndim}D")
    if args.inverse and transform.inverse is None:
        transform, inv = transform.with_inverse(transform.moving or apply.Grid.of(reference))
        print(f"{PROG}: {inv.message()}", file=sys.stderr)
    order = 0 if args.labels else (3 if args.interpolation == "bspline" else 1)
    warped = transform.warp(data.data, data.affine, order=order, inverse=args.inverse)
    grid = transform.output_grid(args.inverse)
    if args.labels:
        publish_file(out, lambda tmp: io.save_labels(warped, grid.affine, tmp))
    else:
        publish_file(out, lambda tmp: io.save_image(Image(warped, grid.affine), tmp))
    kind = "labels, nearest" if args.labels else args.interpolation
    print(f"{PROG}: wrote {out} ({what} on the {grid.describe()} grid, {kind}, {direction})")
    return 0


def _fail(message: str, code: int = EXIT_INPUT) -> int:
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Entry point of the ``deqreg`` console script; returns the exit code."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args.command == "register":
            return cmd_register(args)
        if args.command == "apply":
            return cmd_apply(args)
        if args.command == "batch":
            return cmd_batch(args)
        return cmd_demo(args)
    except InputError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        return _fail("out of memory; try --device cpu or smaller images", 1)
    except OSError as exc:
        # Disk full, permission denied on the output folder, ...
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return _fail(f"{exc.strerror or exc}{where}", 1)
    except Exception as exc:  # a bug, not the user's fault: still one line, traceback on request
        if os.environ.get("DEQREG_DEBUG"):
            raise
        return _fail(f"unexpected {type(exc).__name__}: {exc} (set DEQREG_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
