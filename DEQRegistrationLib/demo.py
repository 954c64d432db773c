"""``deqreg demo``: the whole job, offline, on real anatomy, with a picture.

The pair comes from ``demo_data`` (the MNI152 template that nilearn's wheel
ships, and the same template under a known smooth deformation, with a tissue
label map warped alongside), so a fresh machine with no data and no network
can see Dice before/after, the error against the known field, the folding
map and the convergence curve. The outputs are those of ``deqreg register``
plus ``demo.png`` and the inputs (``inputs/``), so the run can be repeated with
``deqreg register``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

DEMO_VOXEL_MM = 2
# Step budget over the 3 levels: the gradient mode's default, which the solve needs to reach its
# tolerance on this pair (77 steps measured; it stopped short at the former 60).
DEMO_MAX_STEPS = 120


def _slice(a: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k, transposed so that (RAS-aligned) anterior is up and right is right with origin='lower'."""
    return np.asarray(a)[:, :, k].T


def plot_demo(path: Path, pair, result, metrics: Dict) -> Path:
    """fixed | moving | warped / differences | Jacobian with folds | convergence, as one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fixed, moving, warped = pair.fixed.data, pair.moving.data, np.asarray(result.warped.data)
    k = int(np.argmax(pair.brain_mask.sum(axis=(0, 1))))  # the axial slice with the most brain
    show = dict(cmap="gray", origin="lower", vmin=0, vmax=float(np.percentile(fixed, 99.5)))
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    d0, d1 = metrics.get("dice_before"), metrics.get("dice_mean")
    for ax, img, title in zip(axes[0], (fixed, moving, warped),
                              ("fixed: MNI152 template", f"moving (Dice {d0:.3f})", f"warped (Dice {d1:.3f})")):
        ax.imshow(_slice(img, k), **show)
        ax.set_title(title)
    diff = np.concatenate([_slice(np.abs(fixed - moving), k), _slice(np.abs(fixed - warped), k)], axis=1)
    axes[1, 0].imshow(diff, cmap="magma", origin="lower", vmin=0, vmax=float(np.percentile(np.abs(fixed - moving), 99)))
    axes[1, 0].set_title("|fixed - moving|   |   |fixed - warped|")
    jac = np.asarray(result.jacobian)
    im = axes[1, 1].imshow(_slice(jac, k), cmap="RdBu_r", origin="lower", vmin=0, vmax=2)
    folds = _slice(jac <= 0, k)
    if folds.any():
        ys, xs = np.nonzero(folds)
        axes[1, 1].scatter(xs, ys, s=4, c="k", marker="s", label="det J <= 0")
        axes[1, 1].legend(loc="lower right", fontsize=8)
    axes[1, 1].set_title(f"Jacobian determinant (folding {metrics['folding_percent']:.3f}%)")
    fig.colorbar(im, ax=axes[1, 1], fraction=0.046)
    for ax in list(axes[0]) + [axes[1, 0], axes[1, 1]]:
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[1, 2]
    steps = np.array([t["step"] for t in result.trace])
    res = np.array([t["residual"] for t in result.trace])
    levels = np.array([(t.get("stage", "deformable"), t["level"]) for t in result.trace], dtype=object)
    for key in dict.fromkeys(map(tuple, levels)):
        sel = np.array([tuple(v) == key for v in levels])
        name = f"level {key[1] + 1}" if key[0] == "deformable" else f"alignment {key[1] + 1}"
        ax.semilogy(steps[sel], res[sel], ".-", ms=3, label=name)
    ax.set_xlabel("solver step")
    ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||")  # solvers.RESIDUAL_DEFINITION (without its floor)
    ax.set_title(f"convergence ({result.steps} steps, {result.seconds:.0f} s, {result.device})")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(f"deqreg demo: {pair.description}", 150)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_demo(out: Path, device: str = "auto", max_steps: Optional[int] = None) -> Dict:
    """Build the pair, register it through the CLI's shared job code, write outputs + PNG; returns metrics."""
    from . import io
    from .cli import Job, execute
    from .config import make_settings
    from .demo_data import make_demo_pair

    t0 = time.perf_counter()
    print("deqreg demo: building the pair from the MNI152 template shipped in nilearn (offline) ...",
          file=sys.stderr)
    pair = make_demo_pair(voxel_mm=DEMO_VOXEL_MM)
    job = Job(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels,
              settings=make_settings(max_steps=max_steps or DEMO_MAX_STEPS, device=device),
              inputs=dict(source=pair.description))

    def extra_metrics(result):
        """End-point error against the known field, inside the brain, in mm."""
        spacing = pair.fixed.spacing.reshape(3, 1)
        brain = pair.brain_mask
        err = np.linalg.norm((result.displacement[:, brain] - pair.true_displacement[:, brain]) * spacing, axis=0)
        before = np.linalg.norm(pair.true_displacement[:, brain] * spacing, axis=0)
        return dict(demo_true_field_error_mm=float(err.mean()), demo_true_field_error_before_mm=float(before.mean()),
                    demo_description=pair.description)

    def extra_files(folder: Path, result, metrics):
        plot_demo(folder / "demo.png", pair, result, metrics)
        inputs = folder / "inputs"
        inputs.mkdir()
        io.save_image(pair.fixed, inputs / "fixed.nii.gz")
        io.save_image(pair.moving, inputs / "moving.nii.gz")
        io.save_labels(pair.fixed_labels, pair.fixed.affine, inputs / "fixed_seg.nii.gz")
        io.save_labels(pair.moving_labels, pair.moving.affine, inputs / "moving_seg.nii.gz")

    _, metrics = execute(job, out, desc="demo", extra_metrics=extra_metrics, extra_files=extra_files)
    metrics["total_seconds"] = time.perf_counter() - t0
    print(f"deqreg demo: Dice {metrics['dice_before']:.3f} -> {metrics['dice_mean']:.3f}, error vs the known field "
          f"{metrics['demo_true_field_error_before_mm']:.2f} -> {metrics['demo_true_field_error_mm']:.2f} mm, "
          f"total {metrics['total_seconds']:.0f} s", file=sys.stderr)
    return metrics
