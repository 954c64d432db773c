"""register(): the one entry point the CLI, the Slicer module and scripts share.

Pipeline: check inputs -> resample moving into the fixed grid (``Sampler``)
and normalise -> pad so every level divides exactly -> for each level of the
plan (``levels``), coarse to fine, solve z = op(z) with the chosen root
solver, upsampling the field between levels -> final field on the fixed grid
-> warp the *original* moving image once, through both affines.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from . import metrics
from .checkpoint import load_operator
from .config import GRADIENT_ANDERSON_MEMORY, GRADIENT_MAX_STEPS, GRADIENT_TOL, ModelConfig, Settings, make_settings
from .errors import InputError
from .geometry import ras_to_lps, voxel_field_to_physical
from .image import Image
from .levels import Level, auto_pyramid, plan_levels
from .operators import GradientUpdate, UpdateOperator
from .preprocess import check_pair, normalize_intensity, pad_to_multiple, to_tensor
from .sampling import Sampler
from .solvers import solve
from .transforms import downsample_image, jacobian_determinant, upsample_field

#: what a bare operator object (no stored ModelConfig) runs with
BARE_OPERATOR_PLAN = dict(solver="anderson", max_steps=48, tol=1e-3)


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
    _field: Callable[[], torch.Tensor] = field(repr=False, default=None)
    _sampler: Sampler = field(repr=False, default=None)
    _moving: torch.Tensor = field(repr=False, default=None)

    def displacement(self) -> np.ndarray:
        """The current field, (ndim, *fixed.shape), fixed-grid voxel units."""
        return self._field()[0].cpu().numpy()

    def warped(self) -> np.ndarray:
        """The moving image warped by the current field, on the fixed grid."""
        with torch.no_grad():
            return self._sampler.image(self._moving, self._field())[0, 0].cpu().numpy()

    def jacobian(self) -> np.ndarray:
        return metrics.jacobian_determinant(self.displacement())

    def warp_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map on the moving grid warped (nearest) by the current field: live Dice."""
        with torch.no_grad():
            return self._sampler.labels(np.asarray(labels), self.displacement())


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
    settings: Settings   # what was asked
    plan: "Plan"         # what ran: solver, tolerance, levels and their budgets
    cancelled: bool = False
    warped_labels: Optional[np.ndarray] = None
    moving_shape: tuple = ()

    def displacement_mm(self, lps: bool = False) -> np.ndarray:
        """(*S, 3) physical displacement in RAS mm (LPS with lps=True)."""
        d = voxel_field_to_physical(self.displacement, self.fixed_affine)
        return ras_to_lps(d).astype(np.float32) if lps else d

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.displacement.shape[1:], self.fixed_affine, self.moving_affine)

    def warp(self, data: np.ndarray, order: int = 1) -> np.ndarray:
        """Apply the result to another array on the moving grid: order 1 linear, 0 nearest (labels)."""
        data = np.asarray(data)
        if data.shape != tuple(self.moving_shape):
            raise InputError(f"array shape {data.shape} does not match the moving image {tuple(self.moving_shape)}")
        with torch.no_grad():
            return self.sampler.resample(data, self.displacement, order=order)


def make_operator(settings: Settings, ndim: int) -> Tuple[UpdateOperator, Optional[ModelConfig]]:
    """The update operator ``settings`` asks for, and the config of a trained one."""
    if settings.update == "gradient":
        op = GradientUpdate(step_size=settings.step_size, diffusion_weight=settings.diffusion_weight,
                            sigma=settings.sigma, window=settings.window, similarity=settings.similarity)
        return op, None
    model = "default" if settings.model is None else settings.model
    if isinstance(model, UpdateOperator):
        op, config = model, getattr(model, "config", None)
        if config is not None and config.ndim != ndim:
            raise InputError(f"the model is for {config.ndim}D images, the input is {ndim}D")
    else:
        op, config = load_operator(str(model), ndim)
    if op.update != settings.update:
        raise InputError(f"update {settings.update!r} does not match the model, which is {op.update!r}")
    return op, config


@dataclass(frozen=True)
class Plan:
    """How the solve runs: solver, tolerance and levels (budget already split)."""
    solver: str
    tol: float
    levels: List[Level]
    multiple: int  # every working grid must divide by this (the U-Net's)
    solver_options: dict = field(default_factory=dict)  # passed to the solver (gradient mode: Anderson's memory)

    @property
    def max_steps(self) -> int:
        return sum(level.steps for level in self.levels)

    def as_dict(self) -> dict:
        return dict(solver=self.solver, tol=self.tol, max_steps=self.max_steps,
                    solver_options=dict(self.solver_options),
                    levels=[dict(factor=lv.factor, steps=lv.steps) for lv in self.levels])


def make_plan(settings: Settings, op: UpdateOperator, config: Optional[ModelConfig], shape) -> Plan:
    """Settings first, then the model's stored values, then the mode's defaults."""
    if settings.update == "gradient":
        defaults = dict(solver="anderson", max_steps=GRADIENT_MAX_STEPS, tol=GRADIENT_TOL,
                        pyramid=auto_pyramid(shape), level_weights=None)
    elif config is not None:
        defaults = dict(solver=config.solver, max_steps=config.max_steps, tol=config.tol,
                        pyramid=config.pyramid, level_weights=config.level_weights)
    else:
        defaults = dict(BARE_OPERATOR_PLAN, pyramid=[1], level_weights=None)

    def pick(name):
        value = getattr(settings, name)
        return defaults[name] if value is None else value

    pyramid = [int(f) for f in pick("pyramid")]
    weights = pick("level_weights")
    if settings.pyramid is not None and settings.level_weights is None:
        weights = None  # the caller's pyramid: equal split unless told otherwise
    if weights is not None and len(weights) != len(pyramid):
        raise InputError(f"level_weights has {len(weights)} entries but the pyramid {pyramid} has {len(pyramid)}")
    levels = plan_levels(pyramid, int(pick("max_steps")), weights)
    solver = pick("solver")
    options = dict(memory=GRADIENT_ANDERSON_MEMORY) if settings.update == "gradient" and solver == "anderson" else {}
    return Plan(solver=solver, tol=float(pick("tol")), levels=levels, multiple=op.multiple, solver_options=options)


def register(fixed: Image, moving: Image, settings: Optional[Settings] = None, *,
             callback: Optional[Callable[[Progress], Optional[bool]]] = None,
             moving_labels: Optional[np.ndarray] = None,
             on_fallback: Optional[Callable[[str], None]] = None,
             **overrides) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see docs/API.md for every setting and field.

    ``settings`` (a ``config.Settings``) and/or keyword overrides of its
    fields; an unknown name raises ``InputError`` listing the valid ones.
    ``callback(progress)`` runs after every solver step; returning True stops
    the solve and the state reached is the result. When the GPU runs out of
    memory and ``settings.cpu_fallback`` is on, the whole registration reruns
    on the CPU: ``on_fallback(message)`` is called first (the callback then
    sees step 1 again).
    """
    settings = make_settings(settings, **overrides)
    check_pair(fixed, moving)
    if moving_labels is not None and np.shape(moving_labels) != moving.shape:
        raise InputError(f"moving label map shape {np.shape(moving_labels)} does not match the moving image "
                         f"{moving.shape}")
    device = resolve_device(settings.device)

    def run(dev):
        return _Registration(fixed, moving, settings, dev, callback, moving_labels).run()

    return run_with_cpu_fallback(run, device, settings.cpu_fallback, on_fallback)


def run_with_cpu_fallback(run: Callable[[torch.device], object], device: torch.device, enabled: bool = True,
                          on_fallback: Optional[Callable[[str], None]] = None):
    """``run(device)``; on CUDA out-of-memory (and ``enabled``) ``run(cpu)`` after ``on_fallback(message)``."""
    try:
        return run(device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda" or not enabled:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    message = "GPU out of memory; registering on the CPU instead"
    warnings.warn(message)
    if on_fallback is not None:
        on_fallback(message)
    return run(torch.device("cpu"))


class _Registration:
    """One run of the pipeline on one device; ``run()`` returns the result."""

    def __init__(self, fixed: Image, moving: Image, settings: Settings, device: torch.device,
                 callback, moving_labels):
        self.fixed, self.moving, self.settings, self.device = fixed, moving, settings, device
        self.callback, self.moving_labels = callback, moving_labels
        op, config = make_operator(settings, fixed.ndim)
        self.op = op.to(device)
        self.plan = make_plan(settings, op, config, fixed.shape)
        self.sampler = Sampler.between(fixed, moving)
        self.moving_t = to_tensor(moving.data.astype(np.float32, copy=False), device)
        self.trace: List[dict] = []
        self.t0 = time.perf_counter()

    def _prepare(self) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
        """Normalised fixed and moving-in-fixed images, padded so every level divides; the crop undoing it."""
        with torch.no_grad():
            fixed_n = normalize_intensity(to_tensor(self.fixed.data.astype(np.float32, copy=False), self.device))
            moving_n = normalize_intensity(self.sampler.image(self.moving_t))
            multiple = max(level.factor for level in self.plan.levels) * self.plan.multiple
            fixed_p, crop = pad_to_multiple(fixed_n, multiple)
            moving_p, _ = pad_to_multiple(moving_n, multiple)
        return fixed_p, moving_p, crop

    def _full(self, z: torch.Tensor, factor: int) -> torch.Tensor:
        """A working-grid state's field (its first ndim channels) as a field on the whole fixed grid."""
        return upsample_field(z[:, : self.fixed.ndim], factor)[self.crop]

    def _on_step(self, level_index: int, factor: int, residual: float, z: torch.Tensor) -> bool:
        step = len(self.trace) + 1
        seconds = time.perf_counter() - self.t0
        self.trace.append(dict(step=step, level=level_index, residual=residual, seconds=seconds))
        if self.callback is None:
            return False
        progress = Progress(step, self.plan.max_steps, level_index, len(self.plan.levels), residual, seconds,
                            _field=lambda: self._full(z, factor), _sampler=self.sampler, _moving=self.moving_t)
        return bool(self.callback(progress))

    def run(self) -> RegistrationResult:
        ndim = self.fixed.ndim
        fixed_p, moving_p, self.crop = self._prepare()
        z, prev, converged, stopped = None, None, False, False
        spare = 0  # steps a level left unused (it converged early) go to the next one: the total stays the budget
        for index, level in enumerate(self.plan.levels):
            with torch.no_grad():
                fl = downsample_image(fixed_p, level.factor)
                ml = downsample_image(moving_p, level.factor)
                # the state: the field (+ a recurrent model's hidden state); each level runs its own operator
                z = (torch.zeros(1, self.op.state_channels(ndim), *fl.shape[2:], device=self.device) if z is None
                     else upsample_field(z, prev // level.factor))
                op = self.op.for_level(index)
                res = solve(lambda zz: op(zz, fl, ml), z, self.plan.solver, max_steps=level.steps + spare,
                            tol=self.plan.tol, **self.plan.solver_options,
                            callback=lambda _, r, zc, i=index, f=level.factor: self._on_step(i, f, r, zc))
            spare += level.steps - res.steps
            z, prev, converged = res.z, level.factor, res.converged
            if res.stopped:
                stopped = True
                break
        return self._result(self._full(z, prev), converged, stopped)

    def _result(self, disp: torch.Tensor, converged: bool, stopped: bool) -> RegistrationResult:
        with torch.no_grad():
            warped = self.sampler.image(self.moving_t, disp)[0, 0].cpu().numpy()
            jacobian = jacobian_determinant(disp)[0].cpu().numpy()
        disp_np = disp[0].cpu().numpy().astype(np.float32)
        warped_labels = None
        if self.moving_labels is not None:
            warped_labels = self.sampler.labels(np.asarray(self.moving_labels), disp_np)
        return RegistrationResult(
            warped=Image(warped.astype(np.float32), self.fixed.affine.copy()),
            displacement=disp_np,
            fixed_affine=self.fixed.affine.copy(),
            moving_affine=self.moving.affine.copy(),
            jacobian=jacobian,
            trace=self.trace,
            steps=len(self.trace),
            converged=bool(converged),
            final_residual=float(self.trace[-1]["residual"]) if self.trace else float("nan"),
            seconds=time.perf_counter() - self.t0,
            device=str(self.device),
            settings=self.settings,
            plan=self.plan,
            cancelled=stopped,
            warped_labels=warped_labels,
            moving_shape=tuple(self.moving.shape),
        )
