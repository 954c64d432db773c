"""register(): the one entry point the CLI, the Slicer module and scripts share.

Pipeline: check inputs -> resample moving into the fixed grid (through both
affines) and normalise -> pad so every level divides exactly -> for each level
(coarse to fine) solve z = op(z) with the chosen root solver, upsampling the
field between levels -> final field on the fixed grid -> warp the *original*
moving image once, through both affines.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from . import metrics
from .checkpoint import load_operator
from .errors import InputError
from .geometry import ras_to_lps, voxel_field_to_physical, voxel_to_voxel_affine
from .image import Image
from .operators import GradientUpdate, UpdateOperator
from .preprocess import check_pair, fixed_to_moving_matrix, normalize_intensity, pad_to_multiple, to_tensor
from .solvers import solve
from .transforms import downsample_image, upsample_field, warp

# Weight-free mode: two levels, 1/4 and 1/2 of the fixed grid, the field
# upsampled to full resolution at the end. On the OASIS pair a full-resolution
# third level costs ~10x the time of the other two for little Dice (see README).
# lam = 0.5: the paper's lam = 1 regularises a *network's* training loss; as a
# classical energy it over-smooths (Dice 0.58 vs 0.67-0.77 at 0.5-0.25 in 2D).
GRADIENT_DEFAULTS = dict(factors=None, level_weights=None, max_steps=120, tol=1e-3,
                         step=1.0, lam=0.5, sigma=1.0, window=5)


def auto_factors(shape) -> List[int]:
    """The weight-free mode's pyramid, coarse to fine, as downsampling factors.

    Large 3D volumes (every side >= 96) finish at half resolution, two levels:
    (4, 2) for a 160x192x224 brain. Anything smaller finishes at full
    resolution with up to three levels. A level is kept only if its smallest
    side still has 12 voxels.
    """
    finest = 2 if len(shape) == 3 and min(shape) >= 96 else 1
    n_levels = 2 if finest == 2 else 3
    factors = [finest * 2 ** i for i in range(n_levels)]
    factors = [f for f in factors if f == finest or min(shape) / f >= 12]
    return factors[::-1]
LEARNED_DEFAULTS = dict(max_steps=48, tol=1e-3)


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


@dataclass
class Progress:
    """What the callback sees after every solver step. Methods resample: call them sparingly."""

    step: int
    max_steps: int
    level: int
    n_levels: int
    residual: float
    seconds: float
    _field_fn: Callable[[], torch.Tensor] = field(repr=False, default=None)
    _warp_fn: Callable[[torch.Tensor], np.ndarray] = field(repr=False, default=None)

    def displacement(self) -> np.ndarray:
        return self._field_fn()[0].cpu().numpy()

    def warped(self) -> np.ndarray:
        return self._warp_fn(self._field_fn())

    def jacobian(self) -> np.ndarray:
        return metrics.jacobian_determinant(self.displacement())

    def warp_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map on the moving grid warped (nearest) by the current field: live Dice."""
        labels = np.asarray(labels)
        data = torch.as_tensor(labels.astype(np.float32))[None, None]
        return self._warp_fn(self._field_fn(), data, "nearest").astype(labels.dtype)


@dataclass
class RegistrationResult:
    warped: Image
    displacement: np.ndarray
    fixed_affine: np.ndarray
    moving_affine: np.ndarray
    jacobian: np.ndarray
    trace: List[dict]
    steps: int
    converged: bool
    final_residual: float
    seconds: float
    device: str
    cancelled: bool = False
    warped_labels: Optional[np.ndarray] = None
    _moving_shape: tuple = ()

    def displacement_mm(self, lps: bool = False) -> np.ndarray:
        """(*S, 3) physical displacement in RAS mm (LPS with lps=True)."""
        d = voxel_field_to_physical(self.displacement, self.fixed_affine)
        return ras_to_lps(d).astype(np.float32) if lps else d

    def _apply(self, data: np.ndarray, order: int) -> np.ndarray:
        data = np.asarray(data)
        if data.shape != self._moving_shape:
            raise InputError(f"array shape {data.shape} does not match the moving image {self._moving_shape}")
        A = voxel_to_voxel_affine(self.fixed_affine, self.moving_affine, self.displacement.shape[0])
        disp = torch.as_tensor(self.displacement)[None]
        with torch.no_grad():
            out = warp(to_tensor(data, "cpu"), disp, mode="nearest" if order == 0 else "bilinear",
                       padding_mode="zeros", fixed_to_moving=A)[0, 0].numpy()
        return out.astype(data.dtype) if order == 0 else out.astype(np.float32)

    def warp_image(self, data: np.ndarray) -> np.ndarray:
        return self._apply(data, 1)

    def warp_labels(self, labels: np.ndarray) -> np.ndarray:
        return self._apply(labels, 0)


def _make_operator(update: str, model, shape: tuple, options: dict):
    """The operator and its level plan for the requested mode."""
    ndim = len(shape)
    if update not in ("learned", "gradient", "hybrid"):
        raise InputError(f"unknown update mode {update!r}; choose learned, gradient or hybrid")
    if isinstance(model, str) and model.lower() == "none":
        model = None
    if update == "gradient":
        cfg = {**GRADIENT_DEFAULTS, **{k: v for k, v in options.items() if k in GRADIENT_DEFAULTS}}
        op = GradientUpdate(step=cfg["step"], lam=cfg["lam"], sigma=cfg["sigma"], window=cfg["window"])
        factors = list(cfg["factors"] or auto_factors(shape))
        return op, dict(factors=factors, level_weights=list(cfg["level_weights"] or [1] * len(factors)),
                        max_steps=cfg["max_steps"], tol=cfg["tol"], multiple=1)
    if model is None:
        model = "default"
    if isinstance(model, UpdateOperator):
        op, cfg = model, dict(getattr(model, "config", {}))
    else:
        op, cfg = load_operator(str(model), ndim)
    if update != cfg.get("update", op.kind):
        raise InputError(f"update mode {update!r} does not match the model, which is {cfg.get('update', op.kind)!r}")
    # a model may carry its own coarse-to-fine pyramid ("factors"); else one level
    factors = [int(f) for f in (cfg.get("factors") or [cfg.get("factor", 1)])]
    multiple = op.net.multiple if hasattr(op, "net") else 1
    weights = list(cfg.get("level_weights") or [1] * len(factors))
    return op, dict(factors=factors, level_weights=weights, max_steps=cfg.get("max_steps", LEARNED_DEFAULTS["max_steps"]),
                    tol=cfg.get("tol", LEARNED_DEFAULTS["tol"]), multiple=multiple)


def _split_budget(total: int, weights) -> List[int]:
    w = np.asarray(weights, dtype=float)
    steps = np.maximum(1, np.floor(total * w / w.sum())).astype(int)
    steps[-1] += max(0, total - steps.sum())
    return steps.tolist()


def register(fixed: Image, moving: Image, *, update: str = "gradient", model=None, solver: str = "anderson",
             max_steps: Optional[int] = None, tol: Optional[float] = None, device: str = "auto",
             callback: Optional[Callable[[Progress], Optional[bool]]] = None,
             moving_labels: Optional[np.ndarray] = None, cpu_fallback: bool = True,
             **options) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see docs/API.md for every argument and field.

    ``options`` overrides the gradient mode's settings (``factors``, ``step``,
    ``lam``, ``sigma``, ``window``, ``level_weights``). With ``cpu_fallback``
    a CUDA out-of-memory error reruns the whole registration on the CPU (the
    callback then sees step 1 again); callers that keep per-step state, like
    the Slicer module, pass False and handle the retry themselves.
    """
    check_pair(fixed, moving)
    if moving_labels is not None and np.shape(moving_labels) != moving.shape:
        raise InputError(f"moving label map shape {np.shape(moving_labels)} does not match the moving image {moving.shape}")
    dev = resolve_device(device)
    try:
        return _register(fixed, moving, update, model, solver, max_steps, tol, dev, callback, moving_labels, options)
    except torch.cuda.OutOfMemoryError:
        if dev.type != "cuda" or not cpu_fallback:
            raise
        torch.cuda.empty_cache()
        warnings.warn("GPU out of memory; registering on the CPU instead")
        return _register(fixed, moving, update, model, solver, max_steps, tol, torch.device("cpu"), callback,
                         moving_labels, options)


def _register(fixed, moving, update, model, solver, max_steps, tol, dev, callback, moving_labels, options):
    t0 = time.perf_counter()
    ndim = fixed.ndim
    op, plan = _make_operator(update, model, fixed.shape, options)
    op = op.to(dev)
    budget = int(max_steps if max_steps is not None else plan["max_steps"])
    if budget < 1:
        raise InputError("max_steps must be at least 1")
    tol = float(tol if tol is not None else plan["tol"])
    factors = plan["factors"]
    per_level = _split_budget(budget, plan["level_weights"]) if len(factors) > 1 else [budget]

    A = fixed_to_moving_matrix(fixed, moving)
    moving_t = to_tensor(moving.data.astype(np.float32, copy=False), dev)
    with torch.no_grad():
        fixed_n = normalize_intensity(to_tensor(fixed.data.astype(np.float32, copy=False), dev))
        moving_in_fixed = warp(moving_t, torch.zeros(1, ndim, *fixed.shape, device=dev), padding_mode="zeros",
                               fixed_to_moving=A)
        moving_n = normalize_intensity(moving_in_fixed)
        multiple = max(factors) * plan["multiple"]
        fixed_p, crop = pad_to_multiple(fixed_n, multiple)
        moving_p, _ = pad_to_multiple(moving_n, multiple)

    def full_field(z: torch.Tensor, factor: int) -> torch.Tensor:
        return upsample_field(z, factor)[crop]

    def warp_moving(disp: torch.Tensor, data=moving_t, mode="bilinear") -> np.ndarray:
        data = data.to(dev)
        with torch.no_grad():
            return warp(data, disp, mode=mode, padding_mode="zeros", fixed_to_moving=A)[0, 0].cpu().numpy()

    trace: List[dict] = []
    state = dict(step=0, stopped=False, converged=False, residual=float("nan"))
    z = None
    prev_factor = None
    for level, (factor, steps) in enumerate(zip(factors, per_level)):
        with torch.no_grad():
            fl = downsample_image(fixed_p, factor)
            ml = downsample_image(moving_p, factor)
            z = torch.zeros(1, ndim, *fl.shape[2:], device=dev) if z is None else upsample_field(z, prev_factor // factor)

        def f(zz, fl=fl, ml=ml):
            return op(zz, fl, ml)

        def on_step(step, residual, zcur, level=level, factor=factor):
            state["step"] += 1
            state["residual"] = residual
            seconds = time.perf_counter() - t0
            trace.append(dict(step=state["step"], level=level, residual=residual, seconds=seconds))
            if callback is None:
                return False
            progress = Progress(state["step"], budget, level, len(factors), residual, seconds,
                                _field_fn=lambda: full_field(zcur, factor), _warp_fn=warp_moving)
            return bool(callback(progress))

        with torch.no_grad():
            res = solve(f, z, solver, max_steps=steps, tol=tol, callback=on_step)
        z, prev_factor = res.z, factor
        state["converged"] = res.converged
        if res.stopped:
            state["stopped"] = True
            break

    with torch.no_grad():
        disp = full_field(z, prev_factor)
        warped = warp_moving(disp)
        warped_labels = None
        if moving_labels is not None:
            lab = np.asarray(moving_labels)
            warped_labels = warp_moving(disp, to_tensor(lab.astype(np.float32), dev), mode="nearest").astype(lab.dtype)
    disp_np = disp[0].cpu().numpy().astype(np.float32)
    return RegistrationResult(
        warped=Image(warped.astype(np.float32), fixed.affine.copy()),
        displacement=disp_np,
        fixed_affine=fixed.affine.copy(),
        moving_affine=moving.affine.copy(),
        jacobian=metrics.jacobian_determinant(disp_np),
        trace=trace,
        steps=state["step"],
        converged=bool(state["converged"]),
        final_residual=float(state["residual"]),
        seconds=time.perf_counter() - t0,
        device=str(dev),
        cancelled=bool(state["stopped"]),
        warped_labels=warped_labels,
        _moving_shape=tuple(moving.shape),
    )
