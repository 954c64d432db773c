"""Issue 14: a CT-sized pair and the OASIS pair through `deqreg register`, in one run.

Builds the CT-sized smooth synthetic pair itself (``ct_pair.py``: 512x512x300,
0.8x0.8x1 mm, the moving image shifted by 3 voxels; no download), then runs
the whole ``deqreg register`` command (a subprocess each, one after the
other: never two big runs at once) on the OASIS pair (OAS1_0001 fixed,
OAS1_0002 moving, 35 labels) and on the CT pair, and prints per pair:
voxels, the time inside ``register()`` (metrics.json "seconds"), the
command's wall and CPU time (all threads, from wait4), its peak resident
memory (ru_maxrss) and bytes per fixed-grid voxel, and the CT/OASIS ratios.
Then the live-display cost on the CT pair (a subprocess running
``register()`` with a callback): CPU time of one solver step on the finest
level, of the full refresh the Slicer module does today
(``progress.displacement()``, ``warped()``, ``jacobian()``) and of
``progress.preview()`` (its default lattice of at most 2^18 voxels, and one full-resolution slice; ``preview.py``).

The machine may be shared: ratios are within one run, and CPU time is the
steadier figure. Goals (issue 14): CT peak <= 40 bytes/voxel with every
output written; CT ``register()`` time <= 12x OASIS's.

    python benchmarks/large.py --oasis ../shared/data/oasis3d [--data DIR] [--shape 256x256x150] [--json]
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ct_pair  # noqa: E402


def run_command(argv, env=None) -> dict:
    """Run a command to completion; wall time, CPU time and peak RSS of that process (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    # drain the pipes in threads so a chatty child cannot block; wait4 gives this child's own rusage
    import threading

    out, err = [], []
    threads = [threading.Thread(target=lambda f, b: b.append(f.read()), args=(proc.stdout, out)),
               threading.Thread(target=lambda f, b: b.append(f.read()), args=(proc.stderr, err))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stderr = b"".join(err).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {stderr[-2000:]}")
    return dict(wall=wall, cpu=usage.ru_utime + usage.ru_stime, peak=usage.ru_maxrss * 1024,
                stdout=b"".join(out).decode(errors="replace"), stderr=stderr)


def register_pair(name, fixed, moving, out, extra=()) -> dict:
    argv = [sys.executable, "-m", "DEQRegistrationLib.cli", "register", fixed, moving, "--out", out,
            "--overwrite", *extra]
    r = run_command(argv, env=dict(os.environ, PYTHONPATH=ROOT))
    with open(os.path.join(out, "metrics.json")) as fh:
        m = json.load(fh)
    import nibabel as nib

    voxels = 1
    for n in nib.load(fixed).shape[:3]:
        voxels *= int(n)
    files = sorted(os.listdir(out))
    return dict(pair=name, voxels=voxels, register_s=m["seconds"], wall_s=r["wall"], cpu_s=r["cpu"],
                peak_bytes=r["peak"], bytes_per_voxel=r["peak"] / voxels, steps=m["steps"], converged=m["converged"],
                dice=m.get("dice_mean"), folding_percent=m["folding_percent"], files=files,
                levels=[(lv["factor"], lv.get("spacing_mm")) for lv in m["plan"]["levels"]])


def shift_recovered(out) -> float:
    """Median motion along array axis 0 (voxels) in the centre of the CT pair's whole transform (expected 3):
    the deformation (displacement.nii.gz, LPS mm) then the linear part W (metrics.json "affine", RAS)."""
    import json

    import nibabel as nib
    import numpy as np

    img = nib.load(os.path.join(out, "displacement.nii.gz"))
    n = img.shape
    sl = tuple(slice(k // 4, 3 * k // 4, 4) for k in n[:3])
    d_ras = np.asarray(img.dataobj[sl + (0,)], dtype=np.float64) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    idx = np.stack(np.meshgrid(*[np.arange(n[a])[sl[a]] for a in range(3)], indexing="ij"), -1)
    p = idx @ img.affine[:3, :3].T + img.affine[:3, 3]  # the header's RAS of those voxels
    with open(os.path.join(out, "metrics.json")) as fh:
        W = np.asarray(json.load(fh).get("affine") or np.eye(4), dtype=np.float64)
    moved = (p + d_ras) @ W[:3, :3].T + W[:3, 3] - p
    return float(np.median(moved[..., 0] / abs(img.affine[0, 0])))  # axis 0 is RAS x here


# --- live display (a worker subprocess) -----------------------------------------------------


def live_worker(fixed_path, moving_path, probe_step: int = 3) -> dict:
    """register() on the pair with a callback that measures, on the finest level, one solver step's CPU time,
    the module's full refresh and a preview; stops there."""
    import numpy as np

    from DEQRegistrationLib import io, register

    fixed, moving = io.load_image(fixed_path), io.load_image(moving_path)
    marks, out = {}, {}

    def cpu():
        return time.process_time()

    def callback(p):
        enter = cpu()
        finest = p.stage == "deformable" and p.level == p.n_levels - 1  # the alignment has levels too
        if finest:
            marks.setdefault("first", p.step)
            k = p.step - marks["first"]
            if k >= 1 and "last_exit" in marks and "step_cpu" not in out:
                out["step_cpu"] = enter - marks["last_exit"]
            if k == probe_step:
                t = cpu()
                pv = [p.preview() for _ in range(3)]
                out["preview_cpu"] = (cpu() - t) / 3
                out["preview_shape"] = list(pv[0].warped.shape)
                out["preview_step"] = list(pv[0].step)
                t = cpu()
                d = p.displacement()
                w = p.warped()
                j = p.jacobian()
                out["full_refresh_cpu"] = cpu() - t
                out["full_shape"] = list(w.shape)
                del d, w, j
                t = cpu()
                region = (slice(p._sampler.fixed_shape[0] // 2, p._sampler.fixed_shape[0] // 2 + 1),
                          slice(None), slice(None))
                p.preview(region=region, max_voxels=10 ** 9)
                out["slice_preview_cpu"] = cpu() - t
                return True
        marks["last_exit"] = cpu()
        return False

    register(fixed, moving, callback=callback, field_only=True)
    out["ratio_full_to_step"] = out["full_refresh_cpu"] / out["step_cpu"]
    out["ratio_preview_to_step"] = out["preview_cpu"] / out["step_cpu"]
    out["ratio_slice_preview_to_step"] = out["slice_preview_cpu"] / out["step_cpu"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--oasis", default=os.path.join(ROOT, "..", "shared", "data", "oasis3d"),
                   help="folder of the OASIS pair (OAS1_0001/0002 _norm and _seg35 .nii.gz)")
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "deqreg-large-bench"),
                   help="where the synthetic CT pair is written (reused when present)")
    p.add_argument("--shape", default="x".join(map(str, ct_pair.CT_SHAPE)), help="CT grid (default 512x512x300)")
    p.add_argument("--no-live", action="store_true", help="skip the live-display measurement")
    p.add_argument("--json", action="store_true")
    p.add_argument("--from-json", metavar="FILE", help="print the table of a saved --json run")
    p.add_argument("--live-worker", nargs=2, metavar=("FIXED", "MOVING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.live_worker:
        print(json.dumps(live_worker(*args.live_worker)))
        return 0
    if args.from_json:
        with open(args.from_json) as fh:
            doc = json.load(fh)
        print_table(doc["rows"], doc["ratios"], doc["live"])
        return 0

    shape = tuple(int(n) for n in args.shape.split("x"))
    t = time.perf_counter()
    ct_fixed, ct_moving = ct_pair.write_pair(args.data, shape)
    print(f"CT-sized pair ready in {time.perf_counter() - t:.0f} s: {ct_fixed}", file=sys.stderr)
    o = args.oasis
    rows = []
    with tempfile.TemporaryDirectory(prefix="deqreg-large-") as tmp:
        rows.append(register_pair("OASIS", f"{o}/OAS1_0001_norm.nii.gz", f"{o}/OAS1_0002_norm.nii.gz",
                                  os.path.join(tmp, "oasis"),
                                  ["--fixed-seg", f"{o}/OAS1_0001_seg35.nii.gz",
                                   "--moving-seg", f"{o}/OAS1_0002_seg35.nii.gz"]))
        print(f"OASIS done: {rows[-1]['register_s']:.1f} s", file=sys.stderr)
        rows.append(register_pair("CT-sized", ct_fixed, ct_moving, os.path.join(tmp, "ct")))
        rows[-1]["shift_recovered_voxels"] = shift_recovered(os.path.join(tmp, "ct"))
        print(f"CT done: {rows[-1]['register_s']:.1f} s", file=sys.stderr)
    live = None
    if not args.no_live:
        r = run_command([sys.executable, os.path.abspath(__file__), "--live-worker", ct_fixed, ct_moving],
                        env=dict(os.environ, PYTHONPATH=ROOT))
        live = json.loads(r["stdout"].strip().splitlines()[-1])
        live["peak_bytes"] = r["peak"]
    oasis, ct = rows
    ratios = dict(voxels=ct["voxels"] / oasis["voxels"], register_time=ct["register_s"] / oasis["register_s"],
                  command_cpu=ct["cpu_s"] / oasis["cpu_s"], command_wall=ct["wall_s"] / oasis["wall_s"],
                  peak=ct["peak_bytes"] / oasis["peak_bytes"])
    if args.json:
        print(json.dumps(dict(rows=rows, ratios=ratios, live=live), indent=2))
        return 0
    print_table(rows, ratios, live)
    return 0


def print_table(rows, ratios, live):
    oasis, ct = rows
    print("| pair | voxels | register() s | command wall s | command CPU s | peak MB | bytes/voxel | steps | "
          "Dice | folded % | levels (factor: mm) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        levels = "; ".join(f"{f}: {'x'.join(f'{v:g}' for v in mm)}" for f, mm in r["levels"])
        dice = "-" if r["dice"] is None else f"{r['dice']:.3f}"
        print(f"| {r['pair']} | {r['voxels'] / 1e6:.1f} M | {r['register_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['peak_bytes'] / 2**20:.0f} | {r['bytes_per_voxel']:.1f} | {r['steps']}"
              f"{'' if r['converged'] else ' (not converged)'} | {dice} | {r['folding_percent']:.3f} | {levels} |")
    print(f"\nCT / OASIS: voxels {ratios['voxels']:.1f}x, register() time {ratios['register_time']:.2f}x "
          f"(goal <= 12x), command CPU {ratios['command_cpu']:.2f}x, command wall {ratios['command_wall']:.2f}x, "
          f"peak memory {ratios['peak']:.2f}x")
    print(f"CT peak: {ct['bytes_per_voxel']:.1f} bytes per fixed-grid voxel (goal <= 40), outputs: "
          f"{', '.join(ct['files'])}")
    print(f"CT shift recovered: median {ct['shift_recovered_voxels']:.2f} voxels along axis 0 in the centre "
          f"(true shift {ct_pair.CT_SHIFT:g})")
    if live is not None:
        print(f"Live display on the CT pair (CPU s): one finest-level solver step {live['step_cpu']:.2f}; "
              f"full refresh (displacement + warped + Jacobian, {'x'.join(map(str, live['full_shape']))}) "
              f"{live['full_refresh_cpu']:.2f} ({live['ratio_full_to_step']:.2f} steps); preview "
              f"({'x'.join(map(str, live['preview_shape']))}, every {live['preview_step'][0]}th voxel) "
              f"{live['preview_cpu']:.3f} ({live['ratio_preview_to_step']:.3f} steps); one displayed slice at full "
              f"resolution {live['slice_preview_cpu']:.3f} ({live['ratio_slice_preview_to_step']:.3f} steps); "
              f"worker peak {live['peak_bytes'] / 2**20:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
