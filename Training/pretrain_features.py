"""Pretrain the ``features`` update's phi as a segmentation network (issue 13, seventh attempt, variant b).

phi (``networks.FeatureNet`` with a softmax) learns to predict, per voxel, the label of the training subjects'
label maps (every label present in them, background included: K classes), from one normalised image as
register() sees it, with the training augmentation (rotation, scaling, gamma; ``Training.data.Augment``).
Loss: cross-entropy + soft Dice over the classes. Checkpoints are chosen on the validation subjects' images
(segmentation Dice, mean over the classes present). The result is written as a ``features`` operator
checkpoint (beta given by ``--beta``) that ``Training.train --init`` and register() read; phi's features are
then the K class probabilities, compared by SSD inside the gradient-mode step.

    python -m Training.pretrain_features --folder D --glob G --label-sub _slice _DKT31_CMA_labels_slice \\
        --subjects 1 2 3 4 5 --val-subjects 6 --out runs/phi_seg --time-limit 15
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from DEQRegistrationLib.checkpoint import save_checkpoint
from DEQRegistrationLib.preprocess import normalize_intensity
from Training.data import FolderPairs, build_source, subject_tokens
from Training.methods import build_operator, make_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--glob", nargs="+", required=True)
    ap.add_argument("--label-sub", nargs=2, required=True)
    ap.add_argument("--subjects", nargs="+", required=True)
    ap.add_argument("--val-subjects", nargs="+", required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 8, 16, 1])
    ap.add_argument("--rotate", type=float, default=10.0)
    ap.add_argument("--scale", type=float, default=0.08)
    ap.add_argument("--gamma", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--crop", type=int, default=128, help="train on random crops of this size (0: whole images)")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--time-limit", type=float, default=15.0, help="minutes")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--beta", type=float, default=1.0, help="the feature term's weight in the written operator")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--pyramid", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def _image(x) -> torch.Tensor:
    return normalize_intensity(torch.as_tensor(np.asarray(x, dtype=np.float32)))[None, None]


def _classes(labels, ids: np.ndarray) -> torch.Tensor:
    """Class index per voxel; labels outside ``ids`` become -1 (ignored)."""
    lab = np.asarray(labels).astype(np.int64)
    idx = np.searchsorted(ids, lab).clip(0, len(ids) - 1)
    idx = np.where(ids[idx] == lab, idx, -1)
    return torch.as_tensor(idx)[None]


def seg_dice(prob: torch.Tensor, target: torch.Tensor, K: int) -> float:
    """Mean hard Dice over the classes present in the target (background excluded)."""
    pred = prob.argmax(1)
    d = []
    for k in range(1, K):
        t = target == k
        if t.any():
            p = pred == k
            d.append(2.0 * float((p & t).sum()) / float(p.sum() + t.sum()))
    return float(np.mean(d))


def loss_fn(logits, target, K):
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    prob = torch.softmax(logits, 1)
    valid = (target >= 0).unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), K).movedim(-1, 1).float() * valid
    inter = (prob * onehot * valid).flatten(2).sum(-1)
    denom = (prob * valid).flatten(2).sum(-1) + onehot.flatten(2).sum(-1)
    present = onehot.flatten(2).sum(-1) > 0
    dice = (2 * inter / denom.clamp_min(1e-6))[present].mean()
    return ce + (1 - dice), float(ce.detach()), float(dice.detach())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_src = FolderPairs(args.folder, args.glob, label_sub=args.label_sub, subjects=args.subjects)
    n = len(train_src.entries)
    ids = np.unique(np.concatenate([np.unique(np.asarray(train_src.pair(i, (i + 1) % n)["fixed_labels"]))
                                    for i in range(n)])).astype(np.int64)
    K = len(ids)
    val_src = FolderPairs(args.folder, args.glob, label_sub=args.label_sub,
                          subjects=list(args.val_subjects) + list(args.subjects))
    held = [i for i, e in enumerate(val_src.entries) if set(args.val_subjects) & set(subject_tokens(e["image"]))]
    val = []
    for i in held:
        p = val_src.pair(i, (i + 1) % len(val_src.entries))
        val.append((_image(p["fixed"]), _classes(p["fixed_labels"], ids)))
    source = build_source("folder", folder=args.folder, patterns=args.glob, label_sub=args.label_sub,
                          subjects=args.subjects,
                          augment=dict(flip_axes=[], rotate=args.rotate, scale=args.scale, gamma=args.gamma))
    cfg = make_config("deqreg", 2, update="features", diffusion_weight=0.45, solver="anderson",
                      max_steps=args.max_steps, pyramid=args.pyramid, feature_channels=K, feature_activation="softmax",
                      feature_dilations=args.dilations, cnn_layers=args.layers, cnn_channels=args.channels,
                      feature_init=0.1, n_states=2, phantom_k=2, level_solve=True, data="folder",
                      subjects=[str(s) for s in args.subjects], val_subjects=[str(s) for s in args.val_subjects],
                      extra=dict(pretrain="Training.pretrain_features", label_ids=[int(i) for i in ids]))
    op = build_operator(cfg)
    with torch.no_grad():
        op.beta.fill_(args.beta / op.beta_unit)
    net = op.net
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    (out / "labels.json").write_text(json.dumps([int(i) for i in ids]))
    log = open(out / "log.csv", "w", newline="")
    w = csv.writer(log)
    w.writerow(["step", "loss", "ce", "soft_dice", "val_dice", "seconds"])
    best, t0 = -1.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        s = source.sample(gen)
        x = torch.cat([_image(s["fixed"]), _image(s["moving"])], 0)
        y = torch.cat([_classes(s["fixed_labels"], ids), _classes(s["moving_labels"], ids)], 0)
        if args.crop:  # a random crop (the same for both images; they are independently augmented anyway)
            c = [min(args.crop, n) for n in x.shape[2:]]
            o = [int(torch.randint(0, n - ci + 1, (1,), generator=gen)) for n, ci in zip(x.shape[2:], c)]
            x = x[:, :, o[0]:o[0] + c[0], o[1]:o[1] + c[1]]
            y = y[:, o[0]:o[0] + c[0], o[1]:o[1] + c[1]]
        opt.zero_grad()
        loss, ce, sd = loss_fn(net.logits(x), y, K)
        loss.backward()
        opt.step()
        vd = ""
        done = (time.perf_counter() - t0) / 60 > args.time_limit
        if step % args.val_every == 0 or done:
            with torch.no_grad():
                vd = float(np.mean([seg_dice(net(xi), yi, K) for xi, yi in val]))
            if vd > best:
                best = vd
                save_checkpoint(out / "best.pt", op, cfg, step=step, val_seg_dice=vd)
            save_checkpoint(out / "last.pt", op, cfg, step=step, val_seg_dice=vd)
        w.writerow([step, f"{float(loss.detach()):.5f}", f"{ce:.5f}", f"{sd:.5f}", vd, f"{time.perf_counter() - t0:.1f}"])
        log.flush()
        if done:
            break
    print(f"K={K} classes; best validation segmentation Dice {best:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
