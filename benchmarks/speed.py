"""Registration time per solver step and in total, on CPU and (when present) CUDA.

For each device and volume size it times one step of each update operator
(gradient: LNCC + diffusion descent; learned: the U-Net update, untrained
weights, same cost as trained ones) and one whole ``register()`` call with the
mode's defaults on a synthetic pair of that size. Ratios are within one run.

    python benchmarks/speed.py                       # 80x96x112 and 160x192x224
    python benchmarks/speed.py --json
    python benchmarks/speed.py --sizes 80x96x112 --no-total
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from DEQRegistrationLib import Image, register  # noqa: E402
from DEQRegistrationLib.networks import UNet  # noqa: E402
from DEQRegistrationLib.operators import GradientUpdate, LearnedUpdate  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def smooth_volume(shape, seed):
    """A smooth random 'anatomy': low-pass noise, so LNCC has structure to use."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1, *[max(2, n // 8) for n in shape], generator=g)
    return torch.nn.functional.interpolate(small, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def time_steps(op, shape, dev, repeats):
    fixed = torch.as_tensor(smooth_volume(shape, 0), device=dev)[None, None]
    moving = torch.as_tensor(smooth_volume(shape, 1), device=dev)[None, None]
    z = torch.zeros(1, 3, *shape, device=dev)
    with torch.no_grad():
        z = op(z, fixed, moving)  # warm-up
        _sync(dev)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            z = op(z, fixed, moving)
            _sync(dev)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=["80x96x112", "160x192x224"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-total", action="store_true", help="skip the whole-registration timing")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CI machines have 2 cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        for size in args.sizes:
            shape = tuple(int(n) for n in size.split("x"))
            ops = {"gradient": GradientUpdate(diffusion_weight=0.25).to(dev), "learned": LearnedUpdate(UNet(3, 5, 3)).to(dev)}
            for mode, op in ops.items():
                row = {"device": dev.type, "size": size, "mode": mode,
                       "seconds_per_step": round(time_steps(op, shape, dev, args.repeats), 4)}
                if not args.no_total and mode == "gradient":
                    f = Image(smooth_volume(shape, 0), np.eye(4))
                    m = Image(smooth_volume(shape, 1), np.eye(4))
                    res = register(f, m, update="gradient", device=dev.type)
                    row.update(total_seconds=round(res.seconds, 2), total_steps=res.steps)
                if not args.no_total and mode == "learned":
                    f = Image(smooth_volume(shape, 0), np.eye(4))
                    m = Image(smooth_volume(shape, 1), np.eye(4))
                    op.config = {"update": "learned", "factor": 1, "max_steps": 48, "tol": 0.0}
                    res = register(f, m, update="learned", model=op, device=dev.type, max_steps=48, tol=0.0)
                    row.update(total_seconds=round(res.seconds, 2), total_steps=res.steps)
                rows.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'device':<6} {'size':<12} {'mode':<9} {'s/step':>8} {'total s':>8} {'steps':>6}")
    for r in rows:
        print(f"{r['device']:<6} {r['size']:<12} {r['mode']:<9} {r['seconds_per_step']:>8.3f} "
              f"{r.get('total_seconds', float('nan')):>8.2f} {r.get('total_steps', '-'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
