"""Evaluate models on image/label pairs: a Table-1-style table and a convergence study.

``python -m Training.evaluate table --models gradient runs/a/last.pt ... --pairs-folder DIR ... --out DIR``
writes ``table.md`` / ``table.csv``: Dice over a label set (``--label-set``,
named in the table; default the labels present in both the fixed and the
moving map), HD95 (voxels, the Learn2Reg convention), % folded voxels (det J <= 0), std log J
(conventional, interior), TRE (mm, when keypoints exist), training-step peak
memory (fresh subprocess per model, the benchmarks/memory.py approach) and
inference time. Every registration goes through ``register()``, so the
figures are what a user gets. ``ants-cc`` (ANTs SyN, CC metric) and the other
``peers.ANTS_CONFIGS`` run when antspyx is installed and are skipped otherwise.

``python -m Training.evaluate convergence --models ... --multipliers 0.25 0.5 1 2 3 4``
runs every model with ``max_steps = m x trained steps`` and ``tol = 0`` (exactly
that many steps) and writes ``convergence.csv``, ``convergence.md`` (trained
steps vs best steps, the paper's Table 2) and ``convergence.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from DEQRegistrationLib import metrics
from DEQRegistrationLib.checkpoint import read_checkpoint
from DEQRegistrationLib.image import Image
from DEQRegistrationLib import register

from .data import Learn2RegDataset, folder_entries, load_pair
from .methods import describe
from .peers import ANTS_CONFIGS, ants_available, ants_register

LABEL_SETS = {
    "pair": "labels present in both the fixed and the moving label map (0 excluded), the same for every method",
    "fixed": "labels present in the fixed label map (0 excluded); a label the warp loses scores 0",
    "warped": "labels present in both the fixed and the warped label map (0 excluded; the earlier tables)",
}


def label_set(kind: str, fixed_labels, moving_labels, warped_labels) -> np.ndarray:
    """The label ids Dice and HD95 average over: ``pair``, ``fixed``, ``warped`` or ``ids:1,2,3`` / a file of ids."""
    if kind == "pair":
        return metrics.common_labels(fixed_labels, moving_labels)
    if kind == "warped":
        return metrics.common_labels(fixed_labels, warped_labels)
    if kind == "fixed":
        ids = np.unique(np.asarray(fixed_labels))
        return ids[ids != 0]
    if kind.startswith("ids:"):
        return np.array([int(v) for v in kind[4:].split(",") if v.strip()], dtype=np.int64)
    if os.path.isfile(kind):
        return np.array([int(v) for v in Path(kind).read_text().split()], dtype=np.int64)
    raise ValueError(f"unknown label set {kind!r}: pair, fixed, warped, ids:1,2,... or a file of label ids")


def describe_label_set(kind: str) -> str:
    if kind in LABEL_SETS:
        return f"{kind} ({LABEL_SETS[kind]})"
    return f"{kind} (a fixed list of label ids)"


# --------------------------------------------------------------------------- pairs


def folder_pairs(folder, image_glob: str, label_sub: tuple, subjects: Optional[List[str]] = None,
                 both_directions: bool = True):
    """(name, fixed entry, moving entry) for every ordered pair of images in a folder.

    ``label_sub`` = (pattern, replacement) turns an image file name into its
    label file name (a regular-expression substitution). ``subjects``: keep
    only files whose name contains one of these strings, matched as whole
    dash/underscore-delimited tokens (``data.folder_entries``).
    """
    entries = folder_entries(folder, [image_glob], label_sub, subjects)
    out = []
    for i, a in enumerate(entries):
        for j, b in enumerate(entries):
            if i == j or (not both_directions and j < i):
                continue
            out.append((f"{Path(b['image']).name}->{Path(a['image']).name}", a, b))
    return out


def learn2reg_pairs(json_path):
    ds = Learn2RegDataset(json_path, split="test")
    return [(f"{Path(m).name}->{Path(f).name}", ds.entry(f), ds.entry(m)) for f, m in ds.pairs]


# --------------------------------------------------------------------------- models


def model_spec(spec: str) -> dict:
    """'gradient' (weight-free), an ANTs peer ('ants-cc', ...) or a checkpoint path.

    A checkpoint runs as its config says (register() reads the solver,
    pyramid and budget it was trained with); its row is named by how it was
    trained (``methods.describe``).
    """
    if spec == "gradient":
        return dict(name="gradient (no weights)", update="gradient", model=None, method="gradient",
                    trained_steps=None, cfg=None)
    if spec in ANTS_CONFIGS:
        return dict(name=f"ANTs SyN ({spec})", update="ants", model=spec, method=spec, trained_steps=None, cfg=None)
    cfg = read_checkpoint(spec)["config"]
    return dict(name=f"{describe(cfg)} [{Path(spec).name}]", update=cfg.update, model=spec, method=cfg.method,
                trained_steps=int(cfg.trained_steps or cfg.max_steps), cfg=cfg)


def run_pair(m: dict, pair, max_steps=None, tol=None, labels: str = "pair") -> Dict[str, float]:
    name, fe, me = pair
    data = load_pair(fe, me)
    if m["update"] == "ants":
        res = ants_register(data["fixed"], data["moving"], data.get("moving_labels"), m["model"])
        disp, warped_labels, seconds, steps = res["displacement"], res.get("warped_labels"), res["seconds"], None
        jac = metrics.jacobian_determinant(disp)
    else:
        fixed = Image(np.asarray(data["fixed"], np.float32), data["fixed_affine"])
        moving = Image(np.asarray(data["moving"], np.float32), data["fixed_affine"])  # already on the fixed grid
        # a model runs with the solver, pyramid and budget its config names, unless overridden here
        res = register(fixed, moving, update=m["update"], model=m["model"], max_steps=max_steps, tol=tol,
                       device="cpu", moving_labels=data.get("moving_labels"))
        disp, warped_labels, seconds, steps, jac = res.displacement, res.warped_labels, res.seconds, res.steps, res.jacobian
    row = dict(pair=name, seconds=seconds, steps=steps,
               folding_pct=metrics.folding_percent(jac),
               sdlogj=metrics.std_log_jacobian(jac))
    if "fixed_labels" in data:
        ids = label_set(labels, data["fixed_labels"], data["moving_labels"], warped_labels)
        row["dice"] = metrics.mean_dice(data["fixed_labels"], warped_labels, ids)
        row["dice_before"] = metrics.mean_dice(data["fixed_labels"], data["moving_labels"], ids)
        row["hd95"] = metrics.hd95(data["fixed_labels"], warped_labels, labels=ids)
        row["n_labels"] = int(len(ids))
    if "fixed_keypoints" in data:
        # the moving keypoints are voxels of the moving image's own grid, whatever grid it was resampled to
        tre = metrics.target_registration_error(data["fixed_keypoints"], data["moving_keypoints"], disp,
                                                data["fixed_affine"], data["moving_affine"])
        row["tre_mm"] = float(tre.mean())
    return row


# --------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(spec: str, shape: List[int]) -> float:
    """Peak RSS increase (MB) of one training step of this model's method, in this process."""
    from .methods import TrainStep, build_operator

    torch.manual_seed(0)
    cfg = read_checkpoint(spec)["config"]
    op = build_operator(cfg)
    step = TrainStep(op, cfg, lam=cfg.training.loss_diffusion_weight)
    fixed = torch.rand(1, 1, *shape)
    moving = torch.rand(1, 1, *shape)
    # warm-up: one network application with a graph and its backward, so torch's lazy
    # initialisation is not counted as the step's (as in benchmarks/memory.py)
    step.state_loss(op.for_level(len(cfg.pyramid) - 1)(step.z0(fixed), fixed, moving), fixed, moving)[0].backward()
    op.zero_grad(set_to_none=True)
    base = _rss_mb()
    step.backward(fixed, moving)  # the step as training runs it (DEQReg: streamed, one state's graph at a time)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def train_memory(spec: str, shape: List[int]) -> float:
    if spec == "gradient" or spec in ANTS_CONFIGS:
        return float("nan")
    out = subprocess.run([sys.executable, "-m", "Training.evaluate", "memory-worker", spec, *map(str, shape)],
                         capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]))
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- outputs


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _mean_std(rows, key):
    vals = np.array([r[key] for r in rows if key in r and r[key] is not None], dtype=float)
    if vals.size == 0:
        return float("nan"), float("nan")
    return float(np.nanmean(vals)), float(np.nanstd(vals))


def write_table(summary: List[dict], out: Path, title: str, note: str = "") -> None:
    cols = [("dice", "Dice", 3), ("dice_before", "Dice before", 3), ("hd95", "HD95 (vox)", 2),
            ("folding_pct", "% folded", 3), ("sdlogj", "SD log J", 3), ("tre_mm", "TRE (mm)", 2),
            ("train_mem_mb", "train-step peak MB (CPU RSS)", 0), ("seconds", "inference s", 2),
            ("steps", "steps", 1)]
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "pairs"] + [c for k, _, _ in cols for c in (k, k + "_std")])
        for s in summary:
            w.writerow([s["model"], s["pairs"]] + [_fmt(s.get(k), 6) for k, _, _ in cols for k in (k, k + "_std")])
    lines = [f"### {title}", ""] + ([note, ""] if note else []) + ["| model | pairs | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for s in summary:
        cells = []
        for k, _, d in cols:
            if s.get(k) is None or np.isnan(s.get(k, float("nan"))):
                cells.append("-")
            elif k + "_std" in s and not np.isnan(s[k + "_std"]) and k not in ("train_mem_mb", "steps"):
                cells.append(f"{s[k]:.{d}f} ± {s[k + '_std']:.{d}f}")
            else:
                cells.append(f"{s[k]:.{d}f}")
        lines.append(f"| {s['model']} | {s['pairs']} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def cmd_table(args, pairs) -> List[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, all_rows = [], []
    for spec in args.models:
        if spec in ANTS_CONFIGS and not ants_available():
            print(f"{spec}: skipped (antspyx is not installed; pip install antspyx)", flush=True)
            continue
        m = model_spec(spec)
        rows = [run_pair(m, p, max_steps=args.max_steps, tol=args.tol, labels=args.label_set) for p in pairs]
        for r in rows:
            all_rows.append(dict(model=m["name"], **r))
        s = dict(model=m["name"], pairs=len(rows))
        for k in ("dice", "dice_before", "hd95", "folding_pct", "sdlogj", "tre_mm", "seconds", "steps"):
            s[k], s[k + "_std"] = _mean_std(rows, k)
        s["train_mem_mb"] = train_memory(spec, args.memory_shape) if args.memory_shape else float("nan")
        summary.append(s)
        print(f"{m['name']}: dice {s['dice']:.4f} (before {s['dice_before']:.4f}) fold {s['folding_pct']:.4f}% "
              f"time {s['seconds']:.2f}s", flush=True)
    write_table(summary, out, args.title, note=f"Dice and HD95 over label set: {describe_label_set(args.label_set)}.")
    with open(out / "pairs.json", "w") as fh:
        json.dump(all_rows, fh, indent=1)
    return summary


def cmd_convergence(args, pairs) -> List[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models:
        m = model_spec(spec)
        trained = m["trained_steps"] or 1
        budgets = sorted({max(1, int(round(trained * x))) for x in args.multipliers})
        for k in budgets:
            res = [run_pair(m, p, max_steps=k, tol=0.0, labels=args.label_set) for p in pairs]
            row = dict(model=m["name"], method=m["method"], trained_steps=trained, steps=k,
                       dice=_mean_std(res, "dice")[0], folding_pct=_mean_std(res, "folding_pct")[0],
                       sdlogj=_mean_std(res, "sdlogj")[0], seconds=_mean_std(res, "seconds")[0])
            rows.append(row)
            print(f"{m['name']} steps {k}: dice {row['dice']:.4f} fold {row['folding_pct']:.4f}", flush=True)
    with open(out / "convergence.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| method | trained steps | Dice at trained | best steps | Dice at best | Dice at 4x | % folded at best |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        at = next(r for r in mine if r["steps"] == r["trained_steps"]) if any(
            r["steps"] == r["trained_steps"] for r in mine) else mine[0]
        best = max(mine, key=lambda r: r["dice"])
        last = max(mine, key=lambda r: r["steps"])
        lines.append(f"| {name} | {at['trained_steps']} | {at['dice']:.4f} | {best['steps']} | {best['dice']:.4f} | "
                     f"{last['dice']:.4f} | {best['folding_pct']:.3f} |")
    lines += ["", f"Dice over label set: {describe_label_set(args.label_set)}."]
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    plot_convergence(rows, out / "convergence.png")
    return rows


def plot_convergence(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["steps"])
        x = [r["steps"] / r["trained_steps"] for r in mine]
        for ax, key in zip(axes, ("dice", "folding_pct", "sdlogj")):
            ax.plot(x, [r[key] for r in mine], "o-", label=f"{name} (trained {mine[0]['trained_steps']})")
    for ax, t in zip(axes, ("mean Dice", "% folded voxels", "std log Jacobian")):
        ax.set_xlabel("inference steps / trained steps")
        ax.set_title(t)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["table", "convergence"])
    ap.add_argument("--models", nargs="+", required=True,
                    help="'gradient', ANTs peers (" + ", ".join(ANTS_CONFIGS) + "; need antspyx) and/or checkpoint paths")
    ap.add_argument("--label-set", default="pair",
                    help="labels Dice/HD95 average over: " + "; ".join(f"{k}: {v}" for k, v in LABEL_SETS.items())
                         + "; or ids:1,2,3 or a file of ids")
    ap.add_argument("--pairs-folder", help="folder of images + label maps")
    ap.add_argument("--image-glob", default="*.nii.gz")
    ap.add_argument("--label-sub", nargs=2, default=[r"_slice", r"_DKT31_CMA_labels_slice"],
                    metavar=("PATTERN", "REPL"), help="regex turning an image name into its label name")
    ap.add_argument("--subjects", nargs="+", help="keep images whose name has one of these tokens")
    ap.add_argument("--one-direction", action="store_true", help="each unordered pair once")
    ap.add_argument("--json", help="Learn2Reg dataset JSON: evaluate its registration_val pairs")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--multipliers", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 3, 4])
    ap.add_argument("--memory-shape", type=int, nargs="*", default=None,
                    help="working-grid shape for the training-step memory column (omit to skip)")
    ap.add_argument("--title", default="Evaluation")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["memory-worker"]:
        print(memory_worker(argv[1], [int(v) for v in argv[2:]]))
        return 0
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.json:
        pairs = learn2reg_pairs(args.json)
    elif args.pairs_folder:
        pairs = folder_pairs(args.pairs_folder, args.image_glob, tuple(args.label_sub), args.subjects,
                             not args.one_direction)
    else:
        raise SystemExit("give --json or --pairs-folder")
    if not pairs:
        raise SystemExit("no pairs found")
    (cmd_table if args.command == "table" else cmd_convergence)(args, pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
