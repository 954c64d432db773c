"""Registration time per solver step and in total, on CPU and (when present) CUDA.

Synthetic mode: for each device and volume size it times one step of each
update operator (gradient: LNCC + diffusion descent; learned: the U-Net
update, untrained weights, same cost as trained ones) and one whole
``register()`` call with the mode's defaults on a synthetic pair of that size.

Real-pair mode (``--oasis DIR``): on the OASIS pair (OAS1_0001 fixed,
OAS1_0002 moving, 35 labels) it runs, in one process and one run, ANTs SyNOnly
(antspyx defaults; when antspyx is installed: ``pip install 'deqreg[peers]'``),
this project's ``register()`` and the whole ``deqreg register`` command (a
subprocess: start-up, reading, registration, metrics, writing), and prints
Dice (mean over the labels present in both maps), % folded voxels, the wall
time and CPU time (all threads; the subprocess's for the command) and their
ratios to ANTs'. CPU time is the steadier figure on a shared machine. Ratios are within one run: the machine may be
shared, so absolute times are noisy; ``--repeats`` interleaves the methods and
reports each one's median. CUDA rows are added when a GPU is present.

    python benchmarks/speed.py                       # 80x96x112 and 160x192x224
    python benchmarks/speed.py --json
    python benchmarks/speed.py --sizes 80x96x112 --no-total
    python benchmarks/speed.py --oasis ../shared/data/oasis3d [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from DEQRegistrationLib import Image, register  # noqa: E402  (first: it sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

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


# --- the real pair: ANTs vs register() vs the whole command ----------------------------------

PAIR = ("OAS1_0001_norm.nii.gz", "OAS1_0002_norm.nii.gz", "OAS1_0001_seg35.nii.gz", "OAS1_0002_seg35.nii.gz")


def _dice_and_folding(fixed_seg, warped_seg, moving_seg, disp):
    from DEQRegistrationLib import metrics

    labels = metrics.common_labels(fixed_seg, moving_seg)
    jac = metrics.jacobian_determinant(disp)
    return metrics.mean_dice(fixed_seg, warped_seg, labels), metrics.folding_percent(jac)


def run_ants(paths, threads):
    """ANTs SyNOnly with antspyx defaults; None when antspyx is not installed."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    try:
        import ants
    except ImportError:
        return None
    from DEQRegistrationLib.geometry import lps_to_ras, physical_field_to_voxel
    import nibabel as nib

    f, m, fs, ms = (ants.image_read(str(p)) for p in paths)
    t, c = time.perf_counter(), time.process_time()
    reg = ants.registration(f, m, type_of_transform="SyNOnly")
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    warped_seg = ants.apply_transforms(f, ms, reg["fwdtransforms"], interpolator="genericLabel").numpy()
    # the forward warp: LPS millimetres on the fixed grid -> voxel units, for the same Jacobian as ours
    warp = ants.image_read(reg["fwdtransforms"][0]).numpy()
    affine = nib.load(str(paths[0])).affine
    disp = physical_field_to_voxel(lps_to_ras(warp), affine, 3)
    dice, folding = _dice_and_folding(fs.numpy().astype(np.int64), np.rint(warped_seg).astype(np.int64),
                                      ms.numpy().astype(np.int64), disp)
    return dict(method="ANTs SyNOnly (antspyx)", device="cpu", dice=dice, folding_percent=folding,
                converged=None, steps=None, seconds=seconds, cpu_seconds=cpu)


def run_library(paths, device):
    import nibabel as nib

    def load(p):
        img = nib.load(str(p))
        return Image(np.asarray(img.dataobj), img.affine)

    f, m, fs, ms = (load(p) for p in paths)
    t, c = time.perf_counter(), time.process_time()
    res = register(f, m, moving_labels=ms.data, device=device)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    dice, folding = _dice_and_folding(fs.data, res.warped_labels, ms.data, res.displacement)
    return dict(method="register() (library)", device=device, dice=dice, folding_percent=folding,
                converged=res.converged, steps=res.steps, seconds=seconds, cpu_seconds=cpu)


def run_command(paths, device):
    """``deqreg register`` as a user runs it: a new process, files in, files out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        cmd = [sys.executable, "-m", "DEQRegistrationLib.cli", "register", str(paths[0]), str(paths[1]),
               "--fixed-seg", str(paths[2]), "--moving-seg", str(paths[3]), "--out", out, "--device", device]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(f"deqreg register failed: {proc.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(out, "metrics.json")) as fh:
            m = json.load(fh)
    return dict(method="deqreg register (whole command)", device=device, dice=m["dice_mean"],
                folding_percent=m["folding_percent"], converged=m["converged"], steps=m["steps"], seconds=seconds,
                cpu_seconds=cpu)


def oasis_comparison(folder, repeats, threads):
    paths = [os.path.join(folder, name) for name in PAIR]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"speed.py: missing {', '.join(missing)}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs = {}
    for _ in range(repeats):  # interleaved, so a busy spell of the machine hits every method
        for key, fn in [("ants", lambda: run_ants(paths, threads))] + \
                       [((name, d), (lambda fn=fn, d=d: fn(paths, d))) for d in devices
                        for name, fn in (("library", run_library), ("command", run_command))]:
            row = fn()
            if row is not None:
                runs.setdefault(key, []).append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    rows = []
    for key, rs in runs.items():
        row = dict(rs[int(np.argsort([r["seconds"] for r in rs])[len(rs) // 2])])  # the median run
        row["seconds_all"] = [round(r["seconds"], 2) for r in rs]
        rows.append(row)
    ants = next((r for r in rows if r["method"].startswith("ANTs")), None)
    for r in rows:
        r["ratio_to_ants"] = None if ants is None else r["seconds"] / ants["seconds"]
        r["cpu_ratio_to_ants"] = None if ants is None else r["cpu_seconds"] / ants["cpu_seconds"]
    return rows


def print_oasis(rows):
    print(f"{'method':<34} {'device':<6} {'Dice':>6} {'folded %':>9} {'conv.':>6} {'steps':>6} "
          f"{'seconds':>8} {'x ANTs':>7} {'CPU s':>7} {'x ANTs':>7}")
    for r in rows:
        conv = "-" if r["converged"] is None else ("yes" if r["converged"] else "no")
        ratio = "-" if r["ratio_to_ants"] is None else f"{r['ratio_to_ants']:.2f}"
        cpu_ratio = "-" if r["cpu_ratio_to_ants"] is None else f"{r['cpu_ratio_to_ants']:.2f}"
        print(f"{r['method']:<34} {r['device']:<6} {r['dice']:>6.3f} {r['folding_percent']:>9.3f} {conv:>6} "
              f"{r['steps'] if r['steps'] is not None else '-':>6} {r['seconds']:>8.1f} {ratio:>7} "
              f"{r['cpu_seconds']:>7.1f} {cpu_ratio:>7}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oasis", metavar="DIR", help="the real-pair comparison on DIR (OASIS pair, see above)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=["80x96x112", "160x192x224"])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per row (default: 3 per operator step; 1 per method with --oasis)")
    ap.add_argument("--no-total", action="store_true", help="skip the whole-registration timing")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CI machines have 2 cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.oasis:
        load = os.getloadavg()[0]
        rows = oasis_comparison(args.oasis, args.repeats or 1, args.threads)
        load = (load, os.getloadavg()[0])
        if args.json:
            print(json.dumps(dict(rows=rows, load_average=load, threads=args.threads), indent=1))
        else:
            print(f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; 1-minute load "
                  f"average {load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} cores)")
            print_oasis(rows)
        return 0
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        for size in args.sizes:
            shape = tuple(int(n) for n in size.split("x"))
            ops = {"gradient": GradientUpdate(diffusion_weight=0.25).to(dev), "learned": LearnedUpdate(UNet(3, 5, 3)).to(dev)}
            for mode, op in ops.items():
                row = {"device": dev.type, "size": size, "mode": mode,
                       "seconds_per_step": round(time_steps(op, shape, dev, args.repeats or 3), 4)}
                if not args.no_total and mode == "gradient":
                    f = Image(smooth_volume(shape, 0), np.eye(4))
                    m = Image(smooth_volume(shape, 1), np.eye(4))
                    res = register(f, m, update="gradient", device=dev.type)
                    row.update(total_seconds=round(res.seconds, 2), total_steps=res.steps)
                if not args.no_total and mode == "learned":
                    f = Image(smooth_volume(shape, 0), np.eye(4))
                    m = Image(smooth_volume(shape, 1), np.eye(4))
                    # a bare operator (no stored ModelConfig) runs one level with the budget given here
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
