"""Peak memory of one training step: DEQ (phantom gradients) vs unrolled BPTT.

Each configuration runs in a fresh subprocess, so one run's allocator cache
cannot hide another's peak. On CPU the figure is the step's peak resident
memory above the process's resident memory just before the step (the model,
data and torch itself excluded); on CUDA it is max_memory_allocated during the
step. Same network, same volume, same loss; only the gradient method and the
number of solver steps K differ. Methods: ``deq`` (phantom gradients, 4
states x 5 steps), ``bptt`` (vanilla unrolling, Training's ``unroll``, loss on
4 states) and ``riir`` (unrolled, every state in the loss with exponentially
increasing weights).

    python benchmarks/memory.py            # table
    python benchmarks/memory.py --json     # the same rows as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, steps: int, size: int, device: str) -> dict:
    """One training step in this process; returns the measured row."""
    import torch

    from DEQRegistrationLib import losses
    from DEQRegistrationLib.deq import DEQ, equal_interval_steps, state_weights, unroll
    from DEQRegistrationLib.networks import UNet
    from DEQRegistrationLib.operators import LearnedUpdate
    from DEQRegistrationLib.transforms import warp

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    shape = (size,) * 3
    op = LearnedUpdate(UNet(3, 5, 3, final_init=1e-2)).to(dev)
    fixed = torch.rand(1, 1, *shape, device=dev)
    moving = torch.rand(1, 1, *shape, device=dev)
    z0 = torch.zeros(1, 3, *shape, device=dev)

    def f(z):
        return op(z, fixed, moving)

    def loss_of(states, weights=None):
        weights = state_weights(len(states)) if weights is None else weights
        total = 0.0
        for w, z in zip(weights, states):
            total = total + w * (losses.lncc_loss(fixed, warp(moving, z)) + losses.diffusion_loss(z))
        return total

    # Warm-up: one update with a graph and its backward, so torch's lazy
    # initialisation (thread pools, kernel caches) is not counted as the step's.
    losses.lncc_loss(fixed, warp(moving, f(z0))).backward()
    op.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    weights = None
    if method == "deq":
        states = DEQ(solver="fixed-point", max_steps=steps, tol=0.0, n_states=4, phantom_k=5, phantom_damping=0.8)(f, z0).states
    elif method == "bptt":  # vanilla unrolling, the intermediate-state loss on 4 states
        states = unroll(f, z0, steps, keep=equal_interval_steps(steps, 4))
    else:  # riir: every state in the loss, exponentially increasing weights
        states = unroll(f, z0, steps, keep=list(range(1, steps + 1)))
        weights = state_weights(steps, "exponential")
    loss_of(states, weights).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"method": method, "steps": steps, "peak_mb": round(peak, 1), "device": dev.type, "size": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--steps", type=int, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--methods", nargs="+", default=["deq", "bptt", "riir"], choices=["deq", "bptt", "riir"],
                    help="deq: phantom gradients; bptt: vanilla unrolling (Training's 'unroll'); riir: unrolled, all states")
    ap.add_argument("--size", type=int, default=48, help="cubic volume size (multiple of 8)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size, args.device)))
        return 0
    rows = []
    for method in args.methods:
        for k in args.steps:
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(k), "--size", str(args.size),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"one training step, {args.size}^3 volume, U-Net update, device {rows[0]['device']}, "
          "4 intermediate states; DEQ: 5 phantom steps each")
    print(f"{'method':<6} {'K':>4} {'peak MB':>9} {'x K=' + str(args.steps[0]):>8}")
    for r in rows:
        ref = next(x for x in rows if x["method"] == r["method"] and x["steps"] == args.steps[0])["peak_mb"]
        print(f"{r['method']:<6} {r['steps']:>4} {r['peak_mb']:>9.1f} {r['peak_mb'] / ref:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
