"""Peak memory of one training step of each method, at the same volume (one run, fresh processes).

Each row is one optimiser step's gradient computation exactly as
``Training.train`` runs it (``TrainStep.backward``: LNCC window 5 + diffusion),
in a fresh subprocess so one configuration's allocator cache cannot hide
another's peak. Two figures per row:

* ``peak MB``: on CPU the step's peak resident memory above the process's
  resident memory just before it (model, data and torch itself excluded); on
  CUDA max_memory_allocated during the step. Real, but noisy on a shared CPU.
* ``graph MB``: the tensors autograd saves for the backward pass that is alive
  at the peak (unique storages, counted with ``saved_tensors_hooks``): the
  whole graph for BPTT methods, one state's phantom graph for streamed
  DEQReg. Deterministic; it is what grows with steps and volume.

Rows: ``voxelmorph`` (one step), ``deqreg`` at several solver budgets T
(fixed-point iteration without a graph, 4 states x k = 3 phantom steps, each
state's loss back-propagated before the next: the peak is one state's graph,
flat in T), ``deqreg-all`` (the same 4 x 3 phantom graphs held at once, for
comparison), ``riir`` at K steps (BPTT, recurrent update with gradient input),
``gradirn`` (3 levels x 3 steps, second-order similarity gradient). The U-Net
(16/32/32) is the network of voxelmorph, deqreg and riir; gradirn runs with
its paper's per-level 5-layer 32-channel CNN (``gradirn``) and, for the
same-network comparison, with the U-Net per level (``gradirn-unet``).

    python benchmarks/memory.py                 # table
    python benchmarks/memory.py --json          # the same rows as JSON
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

METHODS = ("voxelmorph", "deqreg", "deqreg-all", "riir", "unroll", "gradirn", "gradirn-unet")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def config(method: str, steps: int, ndim: int) -> dict:
    from Training.methods import make_config

    if method in ("deqreg", "deqreg-all"):
        return make_config("deqreg", ndim, max_steps=steps, n_states=4, phantom_k=3, final_init=1e-2)
    if method == "riir":
        return make_config("riir", ndim, unroll_steps=steps, final_init=1e-2)
    if method == "gradirn-unet":
        return make_config("gradirn", ndim, net="unet", final_init=1e-2)
    return make_config(method, ndim, final_init=1e-2)


def worker(method: str, steps: int, size: int, ndim: int, device: str) -> dict:
    """One training step in this process; returns the measured row."""
    import torch

    from Training.methods import TrainStep, build_operator, describe

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    cfg = config(method, steps, ndim)
    op = build_operator(cfg).to(dev)
    step = TrainStep(op, cfg).to(dev)
    shape = (size,) * ndim
    fixed = torch.rand(1, 1, *shape, device=dev)
    moving = torch.rand(1, 1, *shape, device=dev)
    # Warm-up: one network application with a graph and its backward, so torch's lazy
    # initialisation (thread pools, kernel caches) is not counted as the step's.
    level_op = op.for_level(len(cfg.pyramid) - 1)
    step.state_loss(level_op(step.z0(fixed), fixed, moving), fixed, moving)[0].backward()
    op.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    if method == "deqreg-all":
        loss, _ = step(fixed, moving)  # every state's phantom graph at once
        loss.backward()
    else:
        step.backward(fixed, moving)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    # the graph alive at the peak: one state's for streamed DEQReg, the whole objective's otherwise
    if method == "deqreg":
        f = step._f(fixed, moving)
        state = step.deq.solve(f, step.z0(fixed)).states[-1]
        graph = saved_mb(lambda: step.state_loss(step.deq.attach(f, state), fixed, moving)[0])
    else:
        graph = saved_mb(lambda: step(fixed, moving)[0])
    label = describe(cfg) + (", all states' graphs at once" if method == "deqreg-all" else "")
    return {"method": method, "steps": cfg.trained_steps, "row": label, "peak_mb": round(peak, 1),
            "graph_mb": round(graph, 1), "device": dev.type, "size": size, "ndim": ndim}


def saved_mb(fn) -> float:
    """MB of the unique tensor storages autograd saves while ``fn`` builds its graph."""
    import torch

    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def plan(args):
    rows = []
    for method in args.methods:
        if method in ("deqreg", "deqreg-all"):
            rows += [(method, k) for k in (args.deq_steps if method == "deqreg" else [48])]
        elif method == "riir":
            rows += [(method, k) for k in args.riir_steps]
        else:
            rows.append((method, 0))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    ap.add_argument("--methods", nargs="+", default=["voxelmorph", "deqreg", "deqreg-all", "riir", "gradirn",
                                                     "gradirn-unet"], choices=METHODS)
    ap.add_argument("--deq-steps", type=int, nargs="+", default=[6, 12, 24, 48], help="deqreg solver budgets T")
    ap.add_argument("--riir-steps", type=int, nargs="+", default=[6, 12], help="riir K")
    ap.add_argument("--size", type=int, default=48, help="volume side (multiple of 8; 4 x 8 for the pyramids)")
    ap.add_argument("--ndim", type=int, default=3, choices=(2, 3))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.size, args.ndim, args.device)))
        return 0
    rows = []
    for method, k in plan(args):
        out = subprocess.run([sys.executable, __file__, "--worker", method, str(k), "--size", str(args.size),
                              "--ndim", str(args.ndim), "--device", args.device], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    vm = next((r for r in rows if r["method"] == "voxelmorph"), None)
    print(f"one training step, {args.size}^{args.ndim} volume, device {rows[0]['device']}; peak memory above the "
          "step's start, and the autograd graph alive at the peak")
    print("| method | steps | peak MB | x VoxelMorph | graph MB | x VoxelMorph |\n|---|---|---|---|---|---|")
    for r in rows:
        ratios = [f"{r[k] / vm[k]:.2f}" if vm and vm[k] else "-" for k in ("peak_mb", "graph_mb")]
        print(f"| {r['row']} | {r['steps']} | {r['peak_mb']:.1f} | {ratios[0]} | {r['graph_mb']:.1f} | {ratios[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
