"""Train an update operator: ``python -m Training.train --method deqreg --data synthetic ...``.

One loop for every method (see ``methods``). AdamW, LNCC window 5 +
diffusion (+ a soft Dice label loss), a tqdm progress bar, a CSV log, and
atomic checkpoints (``checkpoint.save_checkpoint``) that carry the
optimiser, every RNG state and the step, so ``--resume`` continues
bit-for-bit. ``--val-subjects`` holds subjects out: every ``--val-every``
steps the model registers the validation pairs through ``register()`` (what
a user gets), ``val.csv`` logs step, mean Dice, whether it is the best so far
and mean % folded voxels, and ``best.pt`` keeps the best (with
``--val-max-folding``, the best among validations folding at most that).

Under ``torchrun`` each process draws its own pairs and the gradients are
averaged across processes after each step's backward passes. Not
DistributedDataParallel: DEQReg back-propagates once per intermediate state
inside one step, and DDP's reducer expects exactly one backward per forward
(it would all-reduce, or refuse, at every state).

Examples::

    python -m Training.train --method deqreg --data synthetic --ndim 2 --shape 64 64 --steps 500 --out runs/a
    torchrun --nproc_per_node 2 -m Training.train --method unroll --data learn2reg --json OASIS_dataset.json ...
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from DEQRegistrationLib import metrics, register
from DEQRegistrationLib.checkpoint import read_checkpoint, save_checkpoint
from DEQRegistrationLib.image import Image

from .data import FolderPairs, build_source, labels_to_working_grid, subject_tokens, to_working_grid
from .methods import LEVEL_METHODS, METHODS, TrainStep, build_operator, make_config, relative_levels

LAMBDA_DEFAULTS = {"brain": 1.0, "lung": 0.125}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, default="deqreg")
    ap.add_argument("--data", default="synthetic",
                    help="synthetic | folder | learn2reg | synthetic+folder | synthetic+learn2reg")
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=2)
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 64], help="synthetic working-grid shape")
    ap.add_argument("--max-disp", type=float, default=4.0, help="synthetic deformation amplitude (voxels)")
    ap.add_argument("--folder", help="folder of NIfTI images (--data folder)")
    ap.add_argument("--glob", nargs="+", default=["*.nii.gz", "*.nii"], help="image patterns in --folder")
    ap.add_argument("--label-sub", nargs=2, default=None, metavar=("PATTERN", "REPL"),
                    help="--data folder: regex turning an image name into its label map's name (labels are "
                         "then loaded and used by --label-weight), e.g. _slice _DKT31_CMA_labels_slice")
    ap.add_argument("--subjects", nargs="+", default=None,
                    help="--data folder: train on images whose name has one of these tokens (e.g. 1 2 3 4 5)")
    ap.add_argument("--val-subjects", nargs="+", default=None,
                    help="--data folder: held-out subjects; validation pairs = every ordered pair with one of them")
    ap.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: never)")
    ap.add_argument("--val-max-folding", type=float, default=None,
                    help="best.pt only among validations whose mean %% of folded voxels is at most this")
    ap.add_argument("--n-val", type=int, default=None,
                    help="--data learn2reg: validation subjects held out of training (default 10%%)")
    ap.add_argument("--flip", type=int, nargs="*", default=None, help="augment: axes flipped jointly at random (e.g. 0)")
    ap.add_argument("--rotate", type=float, default=0.0, help="augment: max rotation (degrees) per image")
    ap.add_argument("--scale", type=float, default=0.0, help="augment: max log isotropic scaling per image")
    ap.add_argument("--gamma", type=float, default=0.0, help="augment: std of the log intensity gamma per image")
    ap.add_argument("--elastic", type=float, nargs=2, default=None, metavar=("SPACING_MM", "MAX_MM"),
                    help="augment: a random smooth invertible deformation per image (fixed and moving drawn "
                         "independently, applied to image and labels alike): control-point spacing and largest "
                         "displacement in mm (e.g. 16 4); scaling and squaring of a smoothed random velocity")
    ap.add_argument("--json", help="Learn2Reg {name}_dataset.json (--data learn2reg)")
    ap.add_argument("--mix", type=float, default=0.5, help="probability of the first source when mixing")
    ap.add_argument("--factor", type=int, default=1, help="working grid = image grid pooled by this (stored in the model)")
    ap.add_argument("--update", choices=["learned", "hybrid", "features"], default="learned",
                    help="deqreg operator: learned (the paper's), hybrid (gradient-mode step + learned correction) or "
                         "features (gradient-mode step on LNCC + beta x SSD of a small siamese CNN's features)")
    ap.add_argument("--op-diffusion-weight", type=float, default=None,
                    help="hybrid/features: diffusion weight inside the operator's gradient step (default: hybrid 0.5, "
                         "features 0.45 = gradient mode's LNCC)")
    ap.add_argument("--cnn-layers", type=int, default=None, help="cnn/features net: layers (default 5; features: 4)")
    ap.add_argument("--cnn-channels", type=int, default=None,
                    help="cnn/features net: channels (default 32; features: 16)")
    ap.add_argument("--feature-channels", type=int, default=4, help="features: K, phi's output channels")
    ap.add_argument("--feature-activation", choices=("none", "softmax"), default="none",
                    help="features: phi's output activation (softmax: a phi pretrained as a segmentation network)")
    ap.add_argument("--feature-dilations", type=int, nargs="+", default=None,
                    help="features: one dilation per layer of phi (default all 1)")
    ap.add_argument("--feature-init", type=float, default=1.0, help="features: std of phi's last layer at the start")
    ap.add_argument("--feature-beta", type=float, default=0.0,
                    help="features: beta, the feature term's weight, at the start (0: the model starts as gradient "
                         "mode); ignored with --init")
    ap.add_argument("--tau", type=float, default=None,
                    help="hybrid: initial (trainable) step of the operator's gradient step (default 1; gradient "
                         "mode's LNCC: 0.5)")
    ap.add_argument("--sigma", type=float, default=None,
                    help="hybrid: Gaussian smoothing of the operator's gradient (default 1; gradient mode: 1.5)")
    ap.add_argument("--pyramid", type=int, nargs="+", default=None,
                    help="inference pyramid stored in the model, coarse to fine (e.g. 4 2); default: --factor alone")
    ap.add_argument("--level-solve", action="store_true",
                    help="deqreg: train on the solve register() runs: the --pyramid levels coarser than the "
                         "training grid solved first (no graph), T split equally over the levels")
    ap.add_argument("--label-weight", type=float, default=0.0,
                    help="weight of a soft Dice loss on label maps when the data has them (synthetic does)")
    ap.add_argument("--fold-weight", type=float, default=0.0,
                    help="weight of a folding penalty mean(relu(-det J)) on every supervised state")
    ap.add_argument("--enc", type=int, nargs="+", default=[16, 32, 32])
    ap.add_argument("--dec", type=int, nargs="+", default=[32, 32, 16])
    ap.add_argument("--max-steps", type=int, default=48, help="deqreg: solver budget T (the paper: 48)")
    ap.add_argument("--n-states", type=int, default=4, help="deqreg: supervised states at equal intervals")
    ap.add_argument("--phantom-k", type=int, default=3, help="deqreg: phantom-gradient steps per state")
    ap.add_argument("--phantom-damping", type=float, default=0.8)
    ap.add_argument("--unroll-steps", type=int, default=6, help="riir: K (the RIIR paper: 6)")
    ap.add_argument("--levels", type=int, nargs="+", default=[4, 2, 1],
                    help="unroll/gradirn: pyramid relative to the working grid, coarse to fine")
    ap.add_argument("--repeats", type=int, default=3, help="unroll/gradirn: steps per level")
    ap.add_argument("--net", choices=["unet", "cnn"], default=None,
                    help="update network (default: unet for deqreg/voxelmorph/riir, GraDIRN's cnn for unroll/gradirn)")
    ap.add_argument("--hidden", type=int, default=8, help="riir: hidden-state channels")
    ap.add_argument("--solver", default="fixed-point", choices=["fixed-point", "anderson"],
                    help="deqreg's solver, stored in the model (the paper: fixed-point)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--lam", type=float, default=None, help="diffusion weight (default from --task)")
    ap.add_argument("--task", choices=sorted(LAMBDA_DEFAULTS), default="brain")
    ap.add_argument("--steps", type=int, default=1000, help="total optimiser steps")
    ap.add_argument("--time-limit", type=float, default=0, help="stop (and save) after this many minutes")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", required=True, help="run folder: last.pt, log.csv")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--init", help="start from this checkpoint's weights (same U-Net), e.g. an unrolled model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--save-replicas", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _rng_state(gen: torch.Generator) -> dict:
    """Every RNG the loop may touch, as tensors and ints (loadable with weights_only=True)."""
    return {"torch": torch.get_rng_state(), "data": gen.get_state(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.int64).astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))


def op_diffusion_weight(args) -> float:
    """The diffusion weight inside a hybrid or features operator's gradient step (0 for the others)."""
    if args.update not in ("hybrid", "features"):
        return 0.0
    if args.op_diffusion_weight is not None:
        return float(args.op_diffusion_weight)
    return 0.5 if args.update == "hybrid" else 0.45


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def train(args) -> dict:
    world, rank = _dist_info()
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device if not args.device.startswith("cuda") or not distributed
                       else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    out = Path(args.out)
    lam = args.lam if args.lam is not None else LAMBDA_DEFAULTS[args.task]
    augment = {}
    if args.flip is not None or args.rotate or args.scale or args.gamma or args.elastic:
        augment = dict(flip_axes=list(args.flip or ()), rotate=args.rotate, scale=args.scale, gamma=args.gamma,
                       elastic=args.elastic)
    cfg = make_config(args.method, args.ndim, enc=args.enc, dec=args.dec, factor=args.factor,
                      max_steps=args.max_steps, unroll_steps=args.unroll_steps, levels=args.levels,
                      repeats=args.repeats, net=args.net, hidden=args.hidden,
                      n_states=args.n_states, phantom_k=args.phantom_k, phantom_damping=args.phantom_damping,
                      update=args.update, diffusion_weight=op_diffusion_weight(args),
                      cnn_layers=args.cnn_layers, cnn_channels=args.cnn_channels,
                      feature_channels=args.feature_channels, feature_activation=args.feature_activation,
                      feature_dilations=args.feature_dilations, feature_init=args.feature_init,
                      tau=args.tau, sigma=args.sigma,
                      pyramid=args.pyramid, label_weight=args.label_weight, level_solve=args.level_solve, fold_weight=args.fold_weight,
                      loss_diffusion_weight=lam, lr=args.lr, data=args.data, solver=args.solver,
                      init=str(args.init or ""), subjects=[str(x) for x in args.subjects or []],
                      val_subjects=[str(x) for x in args.val_subjects or []], augment=augment,
                      extra=dict(seed=args.seed, val_max_folding=args.val_max_folding))
    # every process starts from the same weights; data randomness differs per rank
    torch.manual_seed(args.seed)
    op = build_operator(cfg).to(dev)
    if args.init:
        op.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=False)["state_dict"])
    elif args.update == "features" and args.feature_beta:
        with torch.no_grad():
            op.beta.fill_(float(args.feature_beta) / op.beta_unit)
    step_module = TrainStep(op, cfg, lam=lam).to(dev)
    opt = torch.optim.AdamW(op.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    torch.manual_seed(args.seed * 1000 + rank)
    np.random.seed(args.seed * 1000 + rank)
    random.seed(args.seed * 1000 + rank)
    start = 0
    best = float("-inf")
    if args.resume and (out / "last.pt").is_file():
        payload = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        op.load_state_dict(payload["state_dict"])
        opt.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
        best = float(payload.get("best_val", best))
        rng = payload["rng"][rank] if isinstance(payload["rng"], list) else payload["rng"]
        _set_rng_state(rng, gen)
    if distributed:  # identical start on every rank (the seeds agree; make it explicit)
        for p in op.parameters():
            dist.broadcast(p.data, 0)
    source = build_source(args.data, ndim=args.ndim, shape=args.shape, folder=args.folder, patterns=args.glob,
                          json_path=args.json, mix=args.mix, max_disp=args.max_disp, label_sub=args.label_sub,
                          subjects=args.subjects, n_val=args.n_val, augment=augment or None)
    multiple = op.multiple * (max(relative_levels(cfg)) if args.method in LEVEL_METHODS or args.level_solve else 1)
    prefactored = getattr(source, "prefactored", False)
    val_pairs = validation_pairs(args) if args.val_every else []

    log_path = out / "log.csv"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (args.resume and log_path.is_file()):
            with open(log_path, "w", newline="") as fh:
                csv.writer(fh).writerow(["step", "loss", "lncc", "diffusion", "solver_steps", "seconds", "dice_loss"])

    def save(step, path=None):
        rngs = [None] * world
        state = _rng_state(gen)
        if distributed:
            dist.all_gather_object(rngs, state)
        else:
            rngs = state
        if rank == 0:
            save_checkpoint(path or out / "last.pt", op, cfg, optimizer=opt.state_dict(), rng=rngs, step=step,
                            best_val=best)

    t0 = time.perf_counter()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.no_progress or rank != 0,
               desc=args.method, dynamic_ncols=True)
    done = start
    for step in bar:
        sample = source.sample(gen)
        fixed, moving = (x.to(dev) for x in to_working_grid(sample, args.factor, multiple, prefactored))
        onehots = ()
        if args.label_weight and "fixed_labels" in sample and "moving_labels" in sample:
            onehots = tuple(x.to(dev) for x in labels_to_working_grid(sample, args.factor, multiple, prefactored))
        opt.zero_grad(set_to_none=True)
        lv, stats = step_module.backward(fixed, moving, *onehots)
        if distributed:
            average_gradients(op.parameters(), world)
        opt.step()
        solver_steps = getattr(step_module, "last_solver_steps", "")
        if rank == 0:
            with open(log_path, "a", newline="") as fh:
                csv.writer(fh).writerow([step + 1, f"{lv:.6f}", f"{stats['lncc']:.6f}",
                                         f"{stats['diffusion']:.6f}", solver_steps,
                                         f"{time.perf_counter() - t0:.1f}", stats["dice_loss"]])
            bar.set_postfix(loss=f"{lv:.4f}", lncc=f"{stats['lncc']:.4f}")
        done = step + 1
        stop = bool(args.time_limit and time.perf_counter() - t0 > 60 * args.time_limit)
        if distributed:
            flag = torch.tensor([float(stop)], device=dev)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        if val_pairs and rank == 0 and (done % args.val_every == 0 or done == args.steps or stop):
            dice, folding = validate(op, cfg, val_pairs, dev)
            eligible = args.val_max_folding is None or folding <= args.val_max_folding
            new_best = eligible and dice > best
            best = max(best, dice) if eligible else best
            with open(out / "val.csv", "a", newline="") as fh:
                csv.writer(fh).writerow([done, f"{dice:.5f}", int(new_best), f"{folding:.4f}"])
            if new_best:
                save(done, out / "best.pt")
            bar.set_postfix(loss=f"{lv:.4f}", val_dice=f"{dice:.4f}")
        if done % args.save_every == 0 or done == args.steps or stop:
            save(done)
        if stop:
            break
    bar.close()
    if args.save_replicas:
        torch.save(op.state_dict(), out / f"replica_rank{rank}.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": done, "checkpoint": str(out / "last.pt")}


def average_gradients(params, world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes, in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def validation_pairs(args) -> list:
    """Loaders of the validation pairs (each returns a pair dict with label maps).

    ``--data learn2reg``: the Learn2Reg split "val" (subjects held out of
    "train", see ``data.Learn2RegDataset``). ``--data folder``: every ordered
    pair with a ``--val-subjects`` subject as fixed or moving.
    """
    if "learn2reg" in args.data.split("+"):
        from .data import Learn2RegDataset

        ds = Learn2RegDataset(args.json, split="val", n_val=args.n_val)
        return [lambda k=k: ds.pair(k) for k in range(len(ds.pairs))]
    if not args.val_subjects:
        raise SystemExit("--val-every needs --val-subjects (--data folder with --label-sub) or --data learn2reg")
    overlap = set(args.val_subjects) & set(args.subjects or ())
    if overlap:
        raise SystemExit(f"subjects {sorted(overlap)} are in both --subjects and --val-subjects")
    src = FolderPairs(args.folder, args.glob, label_sub=args.label_sub,
                      subjects=list(args.val_subjects) + list(args.subjects or []))
    held = [i for i, e in enumerate(src.entries) if set(args.val_subjects) & set(subject_tokens(e["image"]))]
    n = len(src.entries)
    return [lambda i=i, j=j: src.pair(i, j) for i in range(n) for j in range(n) if i != j and (i in held or j in held)]


def validate(op, cfg, pairs, device="cpu"):
    """(mean Dice, mean % folded voxels) of the validation pairs, each registered through register() as a
    user would; Dice over the labels present in both the fixed and the moving map (the evaluation's
    default ``pair`` set)."""
    was_training = op.training
    op.eval()
    op.config = cfg
    scores, folds = [], []
    for load in pairs:
        s = load()
        fixed = Image(np.asarray(s["fixed"], np.float32), s["fixed_affine"])
        moving = Image(np.asarray(s["moving"], np.float32), s["fixed_affine"])
        res = register(fixed, moving, update=cfg.update, model=op, device=str(device),
                       moving_labels=s["moving_labels"])
        ids = metrics.common_labels(s["fixed_labels"], s["moving_labels"])
        scores.append(metrics.mean_dice(s["fixed_labels"], res.warped_labels, ids))
        folds.append(metrics.folding_percent(res.jacobian))
    op.train(was_training)
    return float(np.mean(scores)), float(np.mean(folds))


def export(src, dst, max_steps: Optional[int] = None, tol: Optional[float] = None) -> None:
    """Strip training state (optimiser, RNG) from a checkpoint: the file the library ships.

    ``max_steps``/``tol`` set the inference defaults stored in the model (a
    DEQ may be trained with short solves and run to convergence).
    """
    payload = read_checkpoint(src)
    cfg = payload["config"]
    op = build_operator(cfg)
    op.load_state_dict(payload["state_dict"])
    cfg.training.optimizer_steps = int(payload.get("step", 0))
    if max_steps is not None:
        cfg.max_steps = int(max_steps)
    if tol is not None:
        cfg.tol = float(tol)
    save_checkpoint(dst, op, cfg.validate())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        ap = argparse.ArgumentParser(prog="python -m Training.train export",
                                     description="write a shippable model (weights + config) from a run checkpoint")
        ap.add_argument("src")
        ap.add_argument("dst")
        ap.add_argument("--max-steps", type=int, default=None, help="inference step budget stored in the model")
        ap.add_argument("--tol", type=float, default=None, help="inference tolerance stored in the model")
        a = ap.parse_args(argv[1:])
        export(a.src, a.dst, a.max_steps, a.tol)
        return 0
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
