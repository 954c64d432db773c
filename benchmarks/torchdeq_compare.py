"""Our DEQ solver and phantom gradient against TorchDEQ 0.1.0, on one small problem.

Optional comparison (TorchDEQ is not a project dependency): it backs the design
note "own fixed-point solver and phantom gradient instead of TorchDEQ". The
problem is the DEQReg update f(z) = z + U(fixed, moving o z, z) with an
untrained U-Net (final_init=1e-2) on a pair of random smooth images. It checks:

1. n_states states returned when the solver stops early (tol before budget);
2. the relative residual each reports, and which iterate is returned;
3. whether a per-iteration callback that can stop the solve exists;
4. forward / backward time of one training step;
5. parameter-gradient agreement of the two phantom gradients on the same
   states (plain fixed-point steps, no early stop);
6. Anderson: TorchDEQ's absolute lam=1e-4 vs our relative regulariser.

    pip install torchdeq            # optional; --no-deps if it would replace torch
    python benchmarks/torchdeq_compare.py                 # 2D 64x64
    python benchmarks/torchdeq_compare.py --json          # same, as JSON
    python benchmarks/torchdeq_compare.py --ndim 3 --size 16   # 3D: over 3 min on 2 CPU threads
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from DEQRegistrationLib.deq import DEQ  # noqa: E402
from DEQRegistrationLib.networks import UNet  # noqa: E402
from DEQRegistrationLib.operators import LearnedUpdate  # noqa: E402
from DEQRegistrationLib.solvers import anderson, fixed_point_iteration, relative_residual  # noqa: E402
from DEQRegistrationLib.transforms import warp  # noqa: E402


def smooth_image(shape, seed):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1, *[max(2, n // 8) for n in shape], generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(small, size=shape, mode=mode, align_corners=False)


def make_problem(ndim, size, seed=0):
    torch.manual_seed(seed)
    shape = (size,) * ndim
    net = UNet(ndim=ndim, in_channels=2 + ndim, out_channels=ndim, final_init=1e-2)
    op = LearnedUpdate(net)
    fixed, moving = smooth_image(shape, 1), smooth_image(shape, 2)
    z0 = torch.zeros(1, ndim, *shape)

    def f(z):
        return op(z, fixed, moving)

    def loss_fn(states):
        return sum(((warp(moving, z) - fixed) ** 2).mean() + 0.1 * (z ** 2).mean() for z in states) / len(states)

    return op, f, z0, loss_fn


def theirs(torchdeq, **kw):
    base = dict(ift=False, grad=5, tau=0.8, n_states=4, f_stop_mode="rel")
    base.update(kw)
    deq = torchdeq.get_deq(**base)
    deq.train()
    return deq


def param_grad(op):
    return torch.cat([p.grad.flatten() for p in op.parameters()])


# 1. states after an early stop ---------------------------------------------------
def check_states(torchdeq, f, z0, budget, tol):
    """One training-mode forward (grad on); nfe counts every f call, phantom steps included."""
    calls = [0]

    def g(z):
        calls[0] += 1
        return f(z)

    out = {}
    for core in ("indexing", "sliced"):
        deq = theirs(torchdeq, core=core, f_solver="fixed_point_iter", f_max_iter=budget, f_tol=tol)
        calls[0] = 0
        states, info = deq(g, z0)
        out[f"torchdeq-{core}"] = dict(states=len(states), nfe=calls[0],
                                       all_have_grad=all(s.requires_grad for s in states))
    ours = DEQ(solver="fixed-point", max_steps=budget, tol=tol, phantom_k=5, phantom_damping=0.8, n_states=4)
    calls[0] = 0
    o = ours(g, z0)
    out["ours"] = dict(states=len(o.states), nfe=calls[0], all_have_grad=all(s.requires_grad for s in o.states),
                       solver_steps=o.info.steps)
    return out


# 2. residual definition, reported residual, returned iterate ----------------------
def check_residual(torchdeq, f, z0, budget):
    """Anderson, no early stop (tol=0): the residual is not monotone there."""
    deq = torchdeq.get_deq(core="indexing", f_solver="anderson", f_max_iter=budget, f_tol=0.0, f_stop_mode="rel")
    deq.eval()
    with torch.no_grad():
        (z_t,), info = deq(f, z0, solver_kwargs=dict(lam=1e-8))  # small lam so it is not stalled (see 6)
        trace = info["rel_trace"][0, 1:]  # [0] is the 1e8 placeholder
        r_t = relative_residual(f(z_t), z_t)
        res = anderson(f, z0, max_steps=budget, tol=0.0)
        r_o = relative_residual(f(res.z), res.z)
    return {
        "torchdeq": dict(definition="||f(z)-z|| / (||f(z)||+1e-9) per item, max over batch ('rel'; default 'abs' = ||f(z)-z||)",
                         reported=float(info["rel_lowest"].max()), reported_as="rel_lowest (lowest seen)",
                         last_trace=float(trace[-1]), returned_step=int(info["nstep"].max()),
                         steps_run=int(trace.numel()) + 2, returned="lowest-residual iterate",
                         residual_of_returned=r_t),
        "ours": dict(definition="||f(z)-z|| / ||f(z)|| per item, max over batch",
                     reported=res.final_residual, reported_as="residual of the last step",
                     last_trace=res.residuals[-1], returned_step=res.steps, steps_run=res.steps,
                     returned="last iterate", residual_of_returned=r_o),
    }


# 3. callback ----------------------------------------------------------------------
def check_callback(torchdeq, f, z0):
    calls = []
    deq = theirs(torchdeq, core="indexing", f_solver="fixed_point_iter", f_max_iter=8, f_tol=0.0)
    deq.eval()
    with torch.no_grad():
        deq(f, z0, solver_kwargs=dict(callback=lambda *a: calls.append(a) or True))
    params = set()
    for name in ("fixed_point_iter", "anderson", "broyden"):
        params |= set(inspect.signature(torchdeq.solver.get_solver(name)).parameters)
    params |= set(inspect.signature(type(deq).forward).parameters)
    mine = []
    with torch.no_grad():
        r = fixed_point_iteration(f, z0, max_steps=8, tol=0.0, callback=lambda s, res, z: mine.append(s) or s >= 3)
    return {
        "torchdeq": dict(callback_param=any("callback" in p for p in params),
                         passed_callback_calls=len(calls),
                         note="solver_kwargs={'callback': ...} is swallowed by **kwargs, never called; "
                              "only route: register_solver() with your own solver"),
        "ours": dict(callback_param=True, passed_callback_calls=len(mine), stopped_at=r.steps, stopped=r.stopped),
    }


# 4. timing -----------------------------------------------------------------------
def one_step(run, op, loss_fn):
    op.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(run())
    t1 = time.perf_counter()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def check_timing(torchdeq, op, f, z0, loss_fn, budget, repeats):
    """Runs interleaved (A B C A B C ...) and reports min and median: robust to shared-CPU noise."""
    runs = {}
    for core in ("indexing", "sliced"):
        deq = theirs(torchdeq, core=core, f_solver="fixed_point_iter", f_max_iter=budget, f_tol=0.0)
        runs[f"torchdeq-{core}"] = (lambda d: lambda: d(f, z0)[0])(deq)
    ours = DEQ(solver="fixed-point", max_steps=budget, tol=0.0, phantom_k=5, phantom_damping=0.8, n_states=4)
    runs["ours"] = lambda: ours(f, z0).states
    times = {k: [] for k in runs}
    for i in range(repeats + 1):
        for k, run in runs.items():
            t = one_step(run, op, loss_fn)
            if i:  # first round is warm-up
                times[k].append(t)
    out = {}
    for k, ts in times.items():
        fw, bw = sorted(t[0] for t in ts), sorted(t[1] for t in ts)
        out[k] = dict(forward_min_s=fw[0], forward_med_s=fw[len(fw) // 2],
                      backward_min_s=bw[0], backward_med_s=bw[len(bw) // 2])
    return out


# 5. gradient agreement -------------------------------------------------------------
def check_gradients(torchdeq, op, f, z0, loss_fn, budget):
    ours = DEQ(solver="fixed-point", max_steps=budget, tol=0.0, phantom_k=5, phantom_damping=0.8, n_states=4)
    op.zero_grad(set_to_none=True)
    s_o = ours(f, z0).states
    loss_fn(s_o).backward()
    g_o = param_grad(op).clone()
    out = {}
    for core in ("indexing", "sliced"):
        deq = theirs(torchdeq, core=core, f_solver="fixed_point_iter", f_max_iter=budget, f_tol=0.0)
        op.zero_grad(set_to_none=True)
        s_t, _ = deq(f, z0)
        s_cmp = [x.detach() for x in s_t]
        loss_fn(s_t).backward()
        g_t = param_grad(op)
        s_ref = [x.detach() for x in s_o]
        state_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(s_cmp, s_ref))
        out[f"torchdeq-{core}"] = dict(
            cosine=float(F.cosine_similarity(g_t, g_o, dim=0)),
            rel_diff=float((g_t - g_o).norm() / g_o.norm()),
            state_rel_diff=state_diff, n_states=len(s_t))
    return out


# 6. Anderson regularisation --------------------------------------------------------
def check_anderson(torchdeq, f, z0, steps):
    solver = torchdeq.solver.get_solver("anderson")
    out = {}
    with torch.no_grad():
        for lam in (1e-4, 1e-8):
            z, _, info = solver(f, z0, max_iter=steps, tol=0.0, stop_mode="rel", lam=lam, m=5)
            out[f"torchdeq lam={lam:g} (absolute)"] = dict(
                residual_last=float(info["rel_trace"][0, -1]), residual_returned=relative_residual(f(z), z),
                returned_step=int(info["nstep"].max()))
        r = anderson(f, z0, max_steps=steps, tol=0.0, memory=5, ridge=1e-4)
        out["ours ridge=1e-4 (relative)"] = dict(residual_last=r.final_residual,
                                               residual_returned=relative_residual(f(r.z), r.z), returned_step=r.steps)
        r = fixed_point_iteration(f, z0, max_steps=steps, tol=0.0)
        out["plain fixed point"] = dict(residual_last=r.final_residual,
                                        residual_returned=relative_residual(f(r.z), r.z))
        G = f(z0) - z0
        out["scale"] = dict(first_residual_sq_norm=float(G.flatten().norm() ** 2))
    return out


def fmt(x):
    if isinstance(x, float):
        return f"{x:.3g}" if x == x and not math.isinf(x) else str(x)
    return str(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ndim", type=int, default=2, choices=(2, 3))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--budget", type=int, default=40, help="solver steps (n_states=4 divides it)")
    ap.add_argument("--tol", type=float, default=0.05, help="early-stop tol for check 1")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        import torchdeq
        import torchdeq.solver  # noqa: F401
    except ImportError:
        print("torchdeq is not installed: skipping the comparison (optional; `pip install torchdeq`, "
              "with --no-deps if it would replace torch).")
        return 0
    torch.set_num_threads(args.threads)
    op, f, z0, loss_fn = make_problem(args.ndim, args.size)
    t0 = time.perf_counter()
    res = dict(
        setup=dict(torch=torch.__version__, torchdeq=getattr(torchdeq, "__version__", "0.1.0"), ndim=args.ndim,
                   size=args.size, budget=args.budget, tol=args.tol, threads=args.threads,
                   params=sum(p.numel() for p in op.parameters())),
        states_after_early_stop=check_states(torchdeq, f, z0, args.budget, args.tol),
        residual=check_residual(torchdeq, f, z0, 30),
        callback=check_callback(torchdeq, f, z0),
        timing=check_timing(torchdeq, op, f, z0, loss_fn, args.budget, args.repeats),
        gradients=check_gradients(torchdeq, op, f, z0, loss_fn, args.budget),
        anderson_30_steps=check_anderson(torchdeq, f, z0, 30),
    )
    res["setup"]["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    s = res["setup"]
    print(f"torch {s['torch']}, torchdeq {s['torchdeq']}; {s['ndim']}D {s['size']}^{s['ndim']}, "
          f"U-Net {s['params']} params, budget {s['budget']}, n_states 4, phantom 5 x tau 0.8, "
          f"{s['threads']} threads, {s['wall_s']:.0f} s")
    for section, rows in res.items():
        if section == "setup":
            continue
        print(f"\n[{section}]")
        for name, row in rows.items():
            print(f"  {name:34s} " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
