"""``deqreg batch PAIRS.csv --out DIR``: a cohort, each pair registered exactly as ``deqreg register`` does.

One row of PAIRS.csv is one call of ``cli.cmd_register`` into ``DIR/<id>/``:
the same loading and checks, settings, metrics and atomic ``publish``, so a
pair folder either is complete or does not exist. On top of that, this module
only decides *which* pairs run *where*, and collects what happened:

* **resume**: a pair whose folder holds a ``metrics.json`` for the same fixed
  and moving files is skipped; a killed run leaves at most a hidden
  ``.<id>.partial-*`` folder (removed at the end of the next run), never a
  half-written pair folder, so running the same command again finishes the rest;
* **failure isolation**: any error of one pair becomes its row in
  ``summary.csv`` (status ``failed`` and the one-line message) and the others
  go on; the exit code is ``cli.EXIT_SOME_FAILED`` when a pair failed or did
  not run;
* **local workers** (``jobs``): N spawned processes, each with
  ``cores // (N * local ranks)`` torch threads (or OMP_NUM_THREADS when set),
  fed one pair at a time;
* **torchrun**: with WORLD_SIZE/RANK/LOCAL_RANK set, rank r takes rows
  r, r + W, r + 2W, ... (``shard``), uses ``cuda:LOCAL_RANK`` when a GPU is
  present and ``--device`` is auto or cuda, appends each finished row to its
  own ``DIR/.deqreg-batch/<run>/rank-<r>.csv`` (what survives if a rank
  dies), and rank 0 merges them after a barrier into ``summary.csv``,
  ``summary.md`` and ``summary.json``. The coordination (a run token, a
  barrier, the exit code) goes through a gloo group on every machine: it
  exchanges no tensors, so nccl would add nothing.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from . import cli
from .errors import InputError

#: the columns of PAIRS.csv that name files of one pair; each is the ``deqreg register`` argument of that name
PAIR_COLUMNS = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks",
                "fixed_mask", "moving_mask")
ID_COLUMN = "id"
#: register's arguments that batch sets per pair (from the CSV, or the pair's folder), never from the command line
PER_PAIR = PAIR_COLUMNS + ("out", "overwrite")

SUMMARY_CSV, SUMMARY_MD, SUMMARY_JSON = "summary.csv", "summary.md", "summary.json"
STATE_DIR = ".deqreg-batch"   # per-run, per-rank partial summaries
OK, SKIPPED, FAILED, NOT_RUN = "ok", "skipped", "failed", "not-run"
STATUSES = (OK, SKIPPED, FAILED, NOT_RUN)
#: summary column <- metrics.json key
METRIC_COLUMNS = {"dice_before": "dice_before", "dice_after": "dice_mean", "hd95_before": "hd95_before",
                  "hd95": "hd95", "tre_before_mm": "tre_before_mm", "tre_mm": "tre_mm",
                  "folding_percent": "folding_percent", "steps": "steps", "converged": "converged",
                  "final_residual": "final_residual", "register_seconds": "seconds", "device": "device"}
FIELDS = ["id", "status", "error", *METRIC_COLUMNS, "seconds", "rank", "pid", "fixed", "moving"]
#: columns averaged in the summary table (over pairs with status ok or skipped)
STAT_COLUMNS = [c for c in METRIC_COLUMNS if c not in ("converged", "device")] + ["seconds"]
#: how long finished ranks wait at the barrier for the slowest one
BARRIER_TIMEOUT = timedelta(days=7)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".mha", ".mhd")


# --- the pairs -------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    row: int                          # 1-based data row of PAIRS.csv
    line: int                         # its line in the file (for messages)
    id: str                           # the name of its output folder
    files: Dict[str, Optional[str]]   # every PAIR_COLUMNS name: a path (read from the CSV's folder) or None


def read_pairs(path, supported=PAIR_COLUMNS) -> List[Pair]:
    """Read and check PAIRS.csv; every problem with the file itself is an ``InputError`` before any work.

    ``supported``: the pair columns ``deqreg register`` takes; a column it does
    not take (masks, before they exist) is refused when it holds a value.
    Problems with the files a row names (missing, unreadable, mismatched) are
    that pair's failure, found when it runs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() == ".json":  # a Learn2Reg dataset JSON: its pairs, masks and keypoints
        return _dataset_pairs(path, supported)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            lines = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text CSV file") from None
    except csv.Error as exc:
        raise InputError(f"{path}: {exc}") from None
    lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]
    if not lines:
        raise InputError(f"{path} is empty; expected a header line with at least the columns fixed,moving")
    header = [name.strip().lower().replace("-", "_") for name in lines[0][1]]
    known = (ID_COLUMN,) + PAIR_COLUMNS
    unknown = [name for name in header if name not in known]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(repr(u) for u in unknown)}; the columns are "
                         f"{', '.join(known)}")
    for name in set(header):
        if header.count(name) > 1:
            raise InputError(f"{path}: column {name!r} appears twice in the header")
    missing = [name for name in ("fixed", "moving") if name not in header]
    if missing:
        raise InputError(f"{path}: no {' and no '.join(missing)} column; the header must name at least fixed,moving")
    base = path.resolve().parent
    pairs, seen = [], {}
    for row_number, (line, cells) in enumerate(lines[1:], start=1):
        if len(cells) > len(header):
            raise InputError(f"{path}: line {line} has {len(cells)} fields but the header has {len(header)}")
        values = {name: cell.strip() for name, cell in zip(header, cells)}
        for name in ("fixed", "moving"):
            if not values.get(name):
                raise InputError(f"{path}: line {line} has no {name} image")
        for name in PAIR_COLUMNS:
            if values.get(name) and name not in supported:
                raise InputError(f"{path}: column {name} is not supported by this version of 'deqreg register'; "
                                 f"remove it (line {line} uses it)")
        files = {name: (str(_resolve(values[name], base)) if values.get(name) else None) for name in PAIR_COLUMNS}
        pair_id = values.get(ID_COLUMN) or default_id(row_number, files["fixed"], files["moving"])
        _check_id(pair_id, path, line)
        if pair_id in seen:
            raise InputError(f"{path}: lines {seen[pair_id]} and {line} have the same id {pair_id!r}; every pair "
                             "needs its own output folder")
        seen[pair_id] = line
        pairs.append(Pair(row_number, line, pair_id, files))
    if not pairs:
        raise InputError(f"{path} has a header but no pairs")
    return pairs


def _dataset_pairs(path: Path, supported) -> List[Pair]:
    from .learn2reg import dataset_rows

    pairs = []
    for n, row in enumerate(dataset_rows(path), start=1):
        files = {name: (row.get(name) if name in supported else None) for name in PAIR_COLUMNS}
        _check_id(row["id"], path, n)
        pairs.append(Pair(n, n, row["id"], files))
    return pairs


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9+_-]+", "-", name).strip("-") or "image"


def default_id(row: int, fixed: str, moving: str) -> str:
    """The folder name of a pair without an id: data row number and the two file stems, e.g. ``0003_sub3_atlas``."""
    return f"{row:04d}_{_stem(fixed)}_{_stem(moving)}"


def _check_id(pair_id: str, path: Path, line: int) -> None:
    bad = (pair_id in (SUMMARY_CSV, SUMMARY_MD, SUMMARY_JSON, STATE_DIR) or pair_id.startswith(".")
           or any(c in pair_id for c in "/\\") or any(ord(c) < 32 for c in pair_id) or len(pair_id) > 200)
    if bad:
        raise InputError(f"{path}: line {line}: id {pair_id!r} cannot name an output folder (no '/' or '\\', "
                         f"no leading '.', not {SUMMARY_CSV}/{SUMMARY_MD}/{SUMMARY_JSON}, at most 200 characters)")


def shard(n: int, world: int, rank: int) -> List[int]:
    """The rows rank ``rank`` of ``world`` registers: every world-th from its own; together, each row once."""
    return list(range(rank, n, world))


# --- register's options ------------------------------------------------------------


def share_register_options(register_parser: argparse.ArgumentParser, batch_parser: argparse.ArgumentParser) -> None:
    """Give ``deqreg batch`` every option of ``deqreg register`` but the per-pair ones (columns, --out, --overwrite).

    The same argparse actions are added (as ``parents=`` does), so each option
    has one definition and an option added to ``register`` reaches ``batch``.
    """
    for action in register_parser._actions:
        if action.option_strings and action.dest not in PER_PAIR and action.dest != "help":
            batch_parser._add_action(action)


def register_arguments() -> Dict[str, Any]:
    """Every argument of ``deqreg register`` with its default (the parser is their one definition)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in sub.choices["register"]._actions if a.dest != "help"}


def check_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """register's defaults with ``options`` on top; per-pair and unknown names are refused."""
    per_pair = sorted(set(options) & set(PER_PAIR))
    if per_pair:
        raise InputError(f"{', '.join(per_pair)}: set per pair by batch (PAIRS.csv columns, DIR/<id>), not an option")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = sorted(set(defaults) - set(PER_PAIR))
        raise InputError(f"unknown option(s) {', '.join(unknown)}; 'deqreg register' takes {', '.join(valid)}")
    return {**defaults, **options}


def pair_args(pair: Pair, folder: Path, options: Mapping[str, Any]) -> argparse.Namespace:
    """The arguments ``deqreg register`` would have parsed for this pair."""
    return argparse.Namespace(**{**options, **pair.files, "out": str(folder), "overwrite": False})


# --- one pair ----------------------------------------------------------------------


def finished(folder: Path, pair: Pair) -> Optional[Dict]:
    """metrics.json of this pair's complete output folder; None when there is no folder.

    Raises ``InputError`` when the folder is something else: not a finished
    output, or the registration of other fixed/moving files (a reused id).
    Other inputs and the settings are not compared: remove a folder to redo it.
    """
    if not (folder.exists() or folder.is_symlink()):
        return None
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        inputs = metrics["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{folder} exists but is not a finished deqreg output (no readable metrics.json); "
                         "remove it to register this pair") from None
    for key in ("fixed", "moving"):
        want = str(Path(pair.files[key]).resolve())
        if inputs.get(key) != want:
            raise InputError(f"{folder} holds a registration of {key} {inputs.get(key)}, not {want}; "
                             "remove it or give this pair another id")
    return metrics


def metric_columns(metrics: Mapping) -> Dict[str, Any]:
    return {col: metrics.get(key) for col, key in METRIC_COLUMNS.items()}


def describe(exc: BaseException) -> str:
    """One line for a failed pair, as ``deqreg register`` would have printed it."""
    if isinstance(exc, InputError):
        text = str(exc)
    elif isinstance(exc, MemoryError):
        text = "out of memory; try --device cpu or smaller images"
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}" + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
    else:
        text = f"unexpected {type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _row(pair: Pair, rank, **fields) -> Dict[str, Any]:
    row = dict(id=pair.id, rank=rank, pid=os.getpid(), fixed=pair.files["fixed"], moving=pair.files["moving"])
    row.update(fields)
    return row


def _quiet(progress) -> None:
    return None


def run_pair(pair: Pair, out_dir: Path, options: Mapping[str, Any], rank: int = 0,
             progress: Optional[Callable] = None) -> Dict[str, Any]:
    """``deqreg register`` of one pair into ``out_dir/<id>``; its summary row. Only Ctrl-C escapes."""
    start = time.perf_counter()
    folder = out_dir / pair.id
    try:
        cli.cmd_register(pair_args(pair, folder, options), progress=progress or _quiet)
        row = _row(pair, rank, status=OK, **metric_columns(json.loads((folder / "metrics.json").read_text())))
    except Exception as exc:  # this pair's problem, whatever it is; the others go on
        if os.environ.get("DEQREG_DEBUG"):
            traceback.print_exc()
        row = _row(pair, rank, status=FAILED, error=describe(exc))
    row["seconds"] = time.perf_counter() - start
    return row


# --- where pairs run -----------------------------------------------------------------


class Ranks:
    """This process among torchrun's (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE); alone without them."""

    def __init__(self, env: Mapping[str, str] = os.environ):
        try:
            self.world = int(env.get("WORLD_SIZE", 1))
            self.rank = int(env.get("RANK", 0))
            self.local_rank = int(env.get("LOCAL_RANK", 0))
            self.local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
        except ValueError:
            raise InputError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
        if not (self.world >= 1 and 0 <= self.rank < self.world and self.local_world >= 1):
            raise InputError(f"RANK {self.rank} is not in 0..WORLD_SIZE-1 ({self.world})")
        self.group, self.started = None, False

    def start(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():  # inside the caller's own group (maybe nccl): coordinate over a gloo one
            self.group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self.started = True

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> bool:
        """Wait for every rank; False (and a warning) when one has gone."""
        if self.world == 1:
            return True
        import torch.distributed as dist

        try:
            dist.barrier(group=self.group)
            return True
        except Exception as exc:  # a rank died: merge what is on disk
            print(f"{cli.PROG}: warning: rank {self.rank}: not every rank reached the end ({describe(exc)}); "
                  "summarising what is on disk", file=sys.stderr)
            return False

    def device(self, asked: Optional[str]) -> Optional[str]:
        """Under torchrun, ``auto``/``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``, when there is one."""
        if self.world == 1 or asked not in (None, "auto", "cuda"):
            return asked
        import torch

        if not torch.cuda.is_available():
            return asked
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"

    def tag(self) -> str:
        return f"rank {self.rank}/{self.world}: " if self.world > 1 else ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(jobs: int, local_world: int = 1, cores: Optional[int] = None,
                       env: Mapping[str, str] = os.environ) -> Optional[int]:
    """torch threads for each of ``jobs`` workers of each of ``local_world`` ranks on this machine.

    None when OMP_NUM_THREADS is set: that choice (the user's, or torchrun's
    default of 1 per process) stands.
    """
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, (cores or _cores()) // (jobs * local_world))


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _worker_init(threads: Optional[int]) -> None:
    # Ctrl-C reaches workers only while they register a pair (_worker_run), so an idle worker exits quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_threads(threads)


def _worker_run(pair: Pair, out_dir: Path, options: Mapping[str, Any], rank: int) -> Dict[str, Any]:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_pair(pair, out_dir, options, rank)
    except KeyboardInterrupt:
        return _row(pair, rank, status=NOT_RUN, error="interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_in_pool(pairs: List[Pair], jobs: int, threads: Optional[int], work: Callable, args: tuple,
                on_row: Callable[[Dict], None], rank: int = 0) -> None:
    """``work(pair, *args)`` for every pair in ``jobs`` spawned processes, at most one pair each at a time.

    ``on_row`` gets each row as it arrives. A worker that dies (killed, out of
    memory, a crash in native code) breaks the pool: the pairs it held are
    reported failed and a fresh pool takes the rest.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
    queue, running, pool = list(pairs), {}, None
    try:
        while queue or running:
            if pool is None:
                pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,))
            while queue and len(running) < jobs:
                pair = queue.pop(0)
                running[pool.submit(work, pair, *args)] = pair
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                pair = running.pop(future)
                try:
                    on_row(future.result())
                except BrokenProcessPool:
                    broken = True
                    on_row(_died(pair, rank))
            if broken:
                for pair in running.values():
                    on_row(_died(pair, rank))
                running.clear()
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _died(pair: Pair, rank: int) -> Dict[str, Any]:
    return _row(pair, rank, status=FAILED, pid="",
                error="a worker process died while this pair ran (killed, out of memory or a crash in native "
                      "code; with --jobs > 1 it may have been another pair's); rerun to retry it")


# --- the summary ---------------------------------------------------------------------


class RowLog:
    """A rank's summary rows, each flushed as it arrives: what is left if the rank dies."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.fh.flush()

    def add(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({k: _cell(v) for k, v in row.items()})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def merge_rows(pairs: List[Pair], state: Path, out_dir: Path) -> List[Dict[str, str]]:
    """One row per pair, in PAIRS.csv order, from every rank's partial summary in ``state``.

    A pair reported by several ranks keeps the last report, with every rank
    and pid joined by ';' (it shows an overlap); a pair no rank reported is
    ``ok`` when its folder is complete (its rank stopped just after) and
    ``not-run`` otherwise.
    """
    reports: Dict[str, List[Dict[str, str]]] = {}
    for path in sorted(state.glob("rank-*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                reports.setdefault(row["id"], []).append(row)
    rows = []
    for pair in pairs:
        got = reports.get(pair.id)
        if got:
            row = dict(got[-1])
            if len(got) > 1:
                row["rank"] = ";".join(r["rank"] for r in got)
                row["pid"] = ";".join(r["pid"] for r in got)
        else:
            try:
                metrics = finished(out_dir / pair.id, pair)
            except InputError:
                metrics = None
            if metrics is not None:
                row = _row(pair, "", status=OK, pid="", **metric_columns(metrics))
            else:
                row = _row(pair, "", status=NOT_RUN, pid="",
                           error="not run: the run was interrupted or its rank stopped early; rerun to finish")
        rows.append({k: _cell(row.get(k)) for k in FIELDS})
    return rows


def summarize(rows: List[Mapping[str, str]]) -> Dict[str, Any]:
    """Counts per status, convergence, and n/mean/median of each metric over the ok and skipped pairs."""
    good = [r for r in rows if r["status"] in (OK, SKIPPED)]
    stats = {}
    for col in STAT_COLUMNS:
        values = [v for v in (_number(r.get(col)) for r in good) if v is not None]
        if values:
            stats[col] = dict(n=len(values), mean=statistics.fmean(values), median=statistics.median(values))
    return dict(pairs=len(rows), counts={s: sum(r["status"] == s for r in rows) for s in STATUSES},
                converged=sum(r.get("converged") == "true" for r in good), metrics=stats,
                failed={r["id"]: r["error"] for r in rows if r["status"] in (FAILED, NOT_RUN)})


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: counts, then a table of mean and median per metric, then what failed."""
    c = summary["counts"]
    good = c[OK] + c[SKIPPED]
    lines = [f"{summary['pairs']} pairs: {c[OK]} ok, {c[SKIPPED]} skipped (finished earlier), {c[FAILED]} failed, "
             f"{c[NOT_RUN]} not run; {summary['converged']} of {good} converged", ""]
    if summary["metrics"]:
        lines += [f"Over the {good} registered pairs (ok and skipped):", "",
                  "| metric | n | mean | median |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['n']} | {s['mean']:.4g} | {s['median']:.4g} |"
                  for name, s in summary["metrics"].items()]
        lines.append("")
    if summary["failed"]:
        lines += ["Failed or not run:", ""] + [f"- {pid}: {err}" for pid, err in summary["failed"].items()] + [""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(rows: List[Dict[str, str]], out_dir: Path, pairs_csv: Path) -> Dict[str, Any]:
    """summary.csv (one row per pair), summary.md and summary.json; returns the summary."""
    summary = summarize(rows)
    summary.update(pairs_csv=str(pairs_csv), out=str(out_dir))
    with open(out_dir / f".{SUMMARY_CSV}.tmp-{os.getpid()}", "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(fh.name, out_dir / SUMMARY_CSV)
    _write_atomic(out_dir / SUMMARY_MD, f"# deqreg batch\n\n{pairs_csv} -> {out_dir}\n\n{summary_text(summary)}")
    _write_atomic(out_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def _remove_leftovers(pairs: List[Pair], out_dir: Path) -> int:
    """Temporary folders of pairs a killed run was writing (``publish`` removes its own otherwise)."""
    n = 0
    for pair in pairs:
        for tmp in out_dir.glob(f".{glob.escape(pair.id)}.partial-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            n += 1
    return n


# --- the run ---------------------------------------------------------------------------


def run_batch(pairs_csv, out, *, jobs: int = 1, options: Optional[Mapping[str, Any]] = None) -> int:
    """Register every pair of ``pairs_csv`` into ``out/<id>/``; returns the exit code.

    ``options``: ``deqreg register`` options by their argparse names
    (``max_steps``, ``tol``, ``solver``, ``device``, ``model``, ...), the rest
    at register's defaults. 0 when every pair is done, ``cli.EXIT_SOME_FAILED``
    when some failed or did not run, ``cli.EXIT_INTERRUPTED`` on Ctrl-C.
    Under torchrun call it on every rank.
    """
    if int(jobs) < 1:
        raise InputError(f"jobs must be a positive integer, got {jobs!r}")
    defaults = register_arguments()
    options = check_options(dict(options or {}), defaults)
    pairs = read_pairs(pairs_csv, supported=set(defaults))
    pairs_csv = Path(pairs_csv).expanduser().resolve()
    out_dir = Path(out).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = Ranks()
    ranks.start()
    try:
        return _run(pairs, pairs_csv, out_dir, options, int(jobs), ranks)
    finally:
        ranks.stop()


def _run(pairs: List[Pair], pairs_csv: Path, out_dir: Path, options: Dict[str, Any], jobs: int,
         ranks: Ranks) -> int:
    token = ranks.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" if ranks.rank == 0 else None)
    state = out_dir / STATE_DIR / token
    options = dict(options, device=ranks.device(options.get("device")))
    mine = [pairs[i] for i in shard(len(pairs), ranks.world, ranks.rank)]
    log = RowLog(state / f"rank-{ranks.rank}.csv")
    todo, counts = [], {OK: 0, SKIPPED: 0, FAILED: 0, NOT_RUN: 0}

    def record(row):
        log.add(row)
        counts[row["status"]] += 1
        if row["status"] == FAILED:
            _say(f"{ranks.tag()}pair {row['id']} failed: {row['error']}", bar)

    bar = None
    for pair in mine:
        try:
            metrics = finished(out_dir / pair.id, pair)
        except InputError as exc:
            record(_row(pair, ranks.rank, status=FAILED, error=describe(exc)))
            continue
        if metrics is None:
            todo.append(pair)
        else:
            record(_row(pair, ranks.rank, status=SKIPPED, **metric_columns(metrics)))
    jobs = max(1, min(jobs, len(todo)))
    threads = threads_per_worker(jobs, ranks.local_world)
    share = f"{len(mine)} of {len(pairs)} pairs" if ranks.world > 1 else f"{len(pairs)} pairs"
    _say(f"{ranks.tag()}{share}: {counts[SKIPPED]} already done (skipped), {len(todo)} to register "
         f"({jobs} process(es) x {threads or os.environ.get('OMP_NUM_THREADS')} thread(s))")

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"{ranks.tag()}pairs", unit="pair", file=sys.stderr, dynamic_ncols=True,
               disable=not todo or ranks.rank != 0, mininterval=0.5)

    def add(row):
        record(row)
        bar.update(1)

    interrupted = False
    try:
        if jobs == 1:
            _set_threads(threads)
            for pair in todo:
                add(run_pair(pair, out_dir, options, ranks.rank, progress=_compact(bar, pair)))
        else:
            run_in_pool(todo, jobs, threads, _worker_run, (out_dir, options, ranks.rank), add, ranks.rank)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        log.close()
    everyone = ranks.barrier()
    code = 0 if not (counts[FAILED] or counts[NOT_RUN]) else cli.EXIT_SOME_FAILED
    if ranks.rank == 0:
        code = _summarise(pairs, pairs_csv, out_dir, state, clean=everyone)
    if everyone:
        ranks.barrier()  # the others wait until rank 0 has written the summary
        if ranks.rank != 0:
            code = 0  # the cohort's exit code is rank 0's: torchrun stops every rank as soon as one exits non-zero
    if interrupted:
        _say(f"{ranks.tag()}interrupted; finished pairs are kept, run the same command again to do the rest")
        return cli.EXIT_INTERRUPTED
    return code


def _summarise(pairs: List[Pair], pairs_csv: Path, out_dir: Path, state: Path, clean: bool) -> int:
    """Rank 0, after the barrier: merge, write and print the summary; the exit code.

    ``clean`` (every rank reached the barrier): remove what killed runs left.
    """
    summary = write_summary(merge_rows(pairs, state, out_dir), out_dir, pairs_csv)
    if clean:  # every rank has finished: a temporary folder still there is a killed run's
        removed = _remove_leftovers(pairs, out_dir)
        if removed:
            _say(f"removed {removed} temporary folder(s) left by an interrupted run")
        # summary.csv now accounts for every pair, so earlier runs' partial summaries (kept when a run was
        # killed before its merge) are superseded too
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
    print(summary_text(summary), end="")
    print(f"{cli.PROG}: wrote {out_dir / SUMMARY_CSV}, {SUMMARY_MD}, {SUMMARY_JSON}")
    failed = summary["counts"][FAILED] + summary["counts"][NOT_RUN]
    return cli.EXIT_SOME_FAILED if failed else 0


def _compact(bar, pair: Pair) -> Callable:
    """Per-step progress of the pair running in this process, as the pairs bar's postfix."""
    def show(p):
        if getattr(p, "stage", "deformable") == "features":  # MIND's descriptors: no step, no residual yet
            bar.set_postfix_str(f"{pair.id} descriptors {100 * (p.fraction or 0):.0f}%", refresh=False)
        else:
            bar.set_postfix_str(f"{pair.id} step {p.step}/{p.max_steps} residual {p.residual:.1e}", refresh=False)
        bar.update(0)
    return show


def _say(message: str, bar=None) -> None:
    text = f"{cli.PROG}: {message}"
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)
