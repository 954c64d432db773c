"""register(): the one entry point the CLI, the Slicer module and scripts share.

Pipeline: check inputs and map the masks onto their images' grids -> the
linear alignment stage (``alignment``: a world transform W, fixed RAS ->
moving RAS, itself solved as fixed-point problems) -> resample moving into the
fixed grid through W (``Sampler``) and normalise -> pad so every level
divides exactly -> for each level of the plan (``levels``), coarse to fine,
solve z = op(z) with the chosen root solver, upsampling the field between
levels (``coarse_to_fine``, the loop training shares) -> final field on the
fixed grid, composed with W into one displacement -> warp the *original*
moving image once, through both affines, W and the field.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from . import chunked, contrast, masks
from .alignment import Aligner, Alignment, identity as identity_alignment, planned_steps
from .checkpoint import load_operator
from .coarse_to_fine import solve_levels
from .config import (GRADIENT_ANDERSON_MEMORY, GRADIENT_ANDERSON_RESTART, GRADIENT_MAX_STEPS,
                     GRADIENT_TOL, ModelConfig, Settings, make_settings)
from .errors import AlignmentWarning, ContrastWarning, InputError
from .geometry import ras_to_lps, voxel_field_to_physical
from .image import Image
from .levels import Level, auto_pyramid, describe_rule, plan_levels
from .operators import GradientUpdate, UpdateOperator
from .preprocess import check_pair, normalize_intensity, pad_to_multiple, to_tensor
from .sampling import Sampler
from .solvers import SolverResult, solve
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
    """What the callback sees after every solver step, and while MIND's descriptors are computed.

    ``stage``: "alignment" (the linear stage), "features" (a similarity's
    full-resolution features before the deformable stage: no solver step, so
    ``step`` is the steps done so far, ``residual`` NaN and ``fraction`` how
    far the features are, 0-1) or "deformable". Returning True from the
    callback stops in any stage. Methods resample: call them sparingly.
    """

    step: int
    max_steps: int
    level: int
    n_levels: int
    residual: float
    seconds: float
    stage: str = "deformable"  # "alignment", "features" or "deformable"
    fraction: Optional[float] = None  # the "features" stage only: how far, 0-1
    _field: Callable[[], torch.Tensor] = field(repr=False, default=None)
    _sampler: Sampler = field(repr=False, default=None)
    _moving: torch.Tensor = field(repr=False, default=None)
    _z: torch.Tensor = field(repr=False, default=None)   # the working-grid deformation and its factor (previews)
    _factor: int = field(repr=False, default=1)
    _world_sampler: Sampler = field(repr=False, default=None)  # through the current linear alignment W (previews)

    def displacement(self) -> np.ndarray:
        """The current transform as one field (alignment and deformation), (ndim, *fixed.shape), fixed voxels."""
        return self._field()[0].cpu().numpy()

    def warped(self) -> np.ndarray:
        """The moving image warped by the current field, on the fixed grid."""
        with torch.no_grad():
            return self._sampler.image(self._moving, self._field())[0, 0].cpu().numpy()

    def jacobian(self) -> np.ndarray:
        return chunked.jacobian_determinant(self.displacement())  # metrics' numbers, in slabs

    def preview(self, region=None, max_voxels: Optional[int] = None):
        """Warped image, Jacobian and field at a lattice of the fixed grid only (``preview.Preview``).

        ``region``: one slice per fixed-grid axis (e.g. the displayed slices),
        None for the whole grid; every axis is strided so at most
        ``max_voxels`` voxels are computed. Costs a small fraction of a solver
        step where ``warped()`` + ``jacobian()`` on a CT-sized grid cost more than one.
        """
        from .preview import DEFAULT_MAX_VOXELS, preview

        return preview(self._z, self._factor, self._world_sampler, self._moving, region,
                       DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels)

    def world(self) -> np.ndarray:
        """The current linear alignment W (4x4, fixed RAS -> moving RAS); ``preview()``'s field comes before it."""
        return self._world_sampler.world.copy()

    def warp_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map on the moving grid warped (nearest) by the current field: live Dice."""
        with torch.no_grad():
            return self._sampler.labels(np.asarray(labels), self.displacement())


@dataclass
class RegistrationResult:
    """The transform found: x (fixed RAS) -> W (x + d(x)), the deformation ``displacement`` d first, then
    the linear alignment ``world`` W, as ITK composes a displacement field and an affine (``apply``);
    ``total_displacement()`` is both as one field."""

    warped: Optional[Image]  # None (as jacobian) with register(..., field_only=True)
    displacement: np.ndarray
    fixed_affine: np.ndarray
    moving_affine: np.ndarray
    jacobian: Optional[np.ndarray]
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
    world: np.ndarray = field(default_factory=lambda: np.eye(4))  # the linear part W: fixed RAS -> moving RAS
    alignment: Optional[Alignment] = None  # how W was found (None: init none)
    fixed_mask: Optional[np.ndarray] = None  # the fixed mask on the fixed grid (bool), when one was given
    warnings: List[str] = field(default_factory=list)  # what the user should know (alignment undone, contrast)

    def world_lps(self) -> np.ndarray:
        """W as ITK stores it (affine.tfm): fixed LPS -> moving LPS."""
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.world @ flip

    def displacement_mm(self, lps: bool = False) -> np.ndarray:
        """(*S, 3) physical displacement d in RAS mm (LPS with lps=True); W is not in it."""
        d = voxel_field_to_physical(self.displacement, self.fixed_affine)
        return ras_to_lps(d).astype(np.float32) if lps else d

    def total_displacement(self) -> np.ndarray:
        """The whole transform (d, then W) as one field, (ndim, *S) fixed voxels, with no world transform:
        what a single grid transform (Slicer) needs."""
        with torch.no_grad():
            return self.sampler.composed_displacement(torch.as_tensor(self.displacement)[None])[0].numpy()

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.displacement.shape[1:], self.fixed_affine, self.moving_affine, world=self.world)

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
        op = GradientUpdate(step_size=settings.operator_value("step_size", ndim),
                            diffusion_weight=settings.operator_value("diffusion_weight", ndim),
                            sigma=settings.sigma, window=settings.window, similarity=settings.similarity,
                            image_gradient=settings.similarity_image_gradient,
                            smooth_field=settings.smooth_field)
        return op, None
    model = "default" if settings.model is None else settings.model
    if isinstance(model, UpdateOperator):
        op, config = model, getattr(model, "config", None)
        if config is not None and config.ndim != ndim:
            raise InputError(f"the model is for {config.ndim}D images, the input is {ndim}D")
    else:
        op, config = load_operator(str(model), ndim)
    # "learned": whatever trained model is given, run as it was trained (the shipped one is a features model)
    if settings.update not in ("learned", op.update):
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
    grid: Optional[dict] = None  # fixed grid and where the pyramid came from (``levels.describe_rule``): metrics.json

    @property
    def max_steps(self) -> int:
        return sum(level.steps for level in self.levels)

    def as_dict(self) -> dict:
        out = dict(solver=self.solver, tol=self.tol, max_steps=self.max_steps,
                   solver_options=dict(self.solver_options),
                   levels=[dict(factor=lv.factor, steps=lv.steps) for lv in self.levels])
        if self.grid is not None:
            shape, spacing = self.grid["shape"], self.grid["spacing_mm"]
            for lv in out["levels"]:  # the working grid (before padding) and its voxel size
                lv["shape"] = [-(-n // lv["factor"]) for n in shape]
                lv["spacing_mm"] = [round(s * lv["factor"], 4) for s in spacing]
            out["pyramid_rule"] = dict(self.grid)
        return out


def make_plan(settings: Settings, op: UpdateOperator, config: Optional[ModelConfig], shape,
              spacing=None) -> Plan:
    """Settings first, then the model's stored values, then the mode's defaults.

    ``spacing`` (mm per array axis of the fixed grid) lets the gradient mode
    plan its pyramid by physical size (``levels.auto_pyramid``).
    """
    if settings.update == "gradient":
        defaults = dict(solver="anderson", max_steps=GRADIENT_MAX_STEPS, tol=GRADIENT_TOL,
                        pyramid=auto_pyramid(shape, spacing), level_weights=None)
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
    # the features update is gradient mode's step plus a learned term: it runs with gradient mode's Anderson
    gradient_anderson = op.update in ("gradient", "features") and solver == "anderson"
    options = dict(memory=GRADIENT_ANDERSON_MEMORY, restart=GRADIENT_ANDERSON_RESTART) if gradient_anderson else {}
    grid = None
    if spacing is not None:
        source = ("settings" if settings.pyramid is not None else "model" if settings.update != "gradient"
                  else "auto")
        grid = dict(shape=[int(n) for n in shape], spacing_mm=[round(float(v), 4) for v in spacing], source=source)
        if source == "auto":
            grid.update(describe_rule(shape, spacing))
    return Plan(solver=solver, tol=float(pick("tol")), levels=levels,
                multiple=op.multiple, solver_options=options, grid=grid)


def register(fixed: Image, moving: Image, settings: Optional[Settings] = None, *,
             callback: Optional[Callable[[Progress], Optional[bool]]] = None,
             moving_labels: Optional[np.ndarray] = None,
             on_fallback: Optional[Callable[[str], None]] = None,
             fixed_mask=None, moving_mask=None, field_only: bool = False,
             **overrides) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see docs/API.md for every setting and field.

    ``settings`` (a ``config.Settings``) and/or keyword overrides of its
    fields; an unknown name raises ``InputError`` listing the valid ones.
    ``callback(progress)`` runs after every solver step; returning True stops
    the solve and the state reached is the result. When the GPU runs out of
    memory and ``settings.cpu_fallback`` is on, the whole registration reruns
    on the CPU: ``on_fallback(message)`` is called first (the callback then
    sees step 1 again).

    ``fixed_mask`` / ``moving_mask``: the voxels the similarity may use, each a
    label map or binary array on its image's grid or an ``Image`` on its own
    grid (``masks``). The fixed mask weights the fixed grid; the moving mask is
    carried into it through the linear alignment. ``field_only``: the result's
    warped image, Jacobian and warped labels are left None (a caller that
    derives them from the saved field itself, like the CLI, saves their time
    and memory).
    """
    settings = make_settings(settings, **overrides)
    check_pair(fixed, moving)
    if moving_labels is not None and np.shape(moving_labels) != moving.shape:
        raise InputError(f"moving label map shape {np.shape(moving_labels)} does not match the moving image "
                         f"{moving.shape}")
    fixed_mask = masks.on_grid(fixed_mask, fixed, "fixed mask")
    moving_mask = masks.on_grid(moving_mask, moving, "moving mask")
    if (fixed_mask is not None or moving_mask is not None) and settings.update != "gradient":
        raise InputError(f"masks weight the gradient update's similarity; the {settings.update} update's "
                         "network has no mask input (use --model none, or no mask)")
    device = resolve_device(settings.device)

    def run(dev):
        return _Registration(fixed, moving, settings, dev, callback, moving_labels, fixed_mask, moving_mask,
                             field_only).run()

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


class _Stopped(Exception):
    """The callback said stop during the "features" stage (raised out of ``level_inputs``, caught in ``run``)."""


class _Registration:
    """One run of the pipeline on one device; ``run()`` returns the result."""

    def __init__(self, fixed: Image, moving: Image, settings: Settings, device: torch.device,
                 callback, moving_labels, fixed_mask=None, moving_mask=None, field_only: bool = False):
        self.fixed, self.moving, self.settings, self.device = fixed, moving, settings, device
        self.callback, self.moving_labels, self.field_only = callback, moving_labels, field_only
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        op, config = make_operator(settings, fixed.ndim)
        self.op = op.to(device)
        # the similarity the deformable stage compares with (a trained model: the one it was trained with)
        self.similarity = config.similarity if config is not None else settings.similarity
        self.warnings: List[str] = []  # what the user should know about this run (``RegistrationResult.warnings``)
        self.plan = make_plan(settings, op, config, fixed.shape, fixed.spacing)
        # the alignment's budget for Progress: twice when a second measure is tried (``_align``)
        self.align_steps = len(settings.alignment_measures) * planned_steps(settings.init, fixed.shape)
        self.base_sampler = Sampler.between(fixed, moving)  # no linear part: composed fields go through it
        self.sampler = self.base_sampler                    # through W once the alignment has run
        self.moving_t = to_tensor(moving.data.astype(np.float32, copy=False), device)
        self.trace: List[dict] = []
        self.t0 = time.perf_counter()
        # each mask on its own grid, before any work (the product is checked again once W is known)
        multiple = max(level.factor for level in self.plan.levels) * self.plan.multiple
        for what, mask in (("the fixed mask", fixed_mask), ("the moving mask", moving_mask)):
            if mask is not None:
                padded, _ = pad_to_multiple(to_tensor(mask.astype(np.float32), "cpu"), multiple)
                masks.check_levels(padded, [level.factor for level in self.plan.levels], what)

    def _prepare(self) -> Tuple[list, tuple]:
        """Every level's (fixed, moving, weight) triple, normalised and padded so every level divides; the
        crop undoing it.

        One full-resolution image at a time, normalised in place and dropped
        once its levels are pooled: the solve keeps only the working grids.
        The weight (None: every voxel) is the fixed mask times the moving mask
        carried into the fixed grid through W (not through the field, so the
        weight is fixed while the solver runs); padding has weight 0.
        """
        multiple = max(level.factor for level in self.plan.levels) * self.plan.multiple
        with torch.no_grad():
            fixed_t = to_tensor(self.fixed.data.astype(np.float32, copy=False), self.device)
            fixed_n = normalize_intensity(fixed_t.clone() if fixed_t.data_ptr() == self._data_ptr(self.fixed)
                                          else fixed_t, inplace=True)
            del fixed_t
            fixed_p, crop = pad_to_multiple(fixed_n, multiple)
            checked = contrast.applies(self.similarity)
            fixed_s = contrast.subsample(fixed_n) if checked else None  # a lattice for the contrast check, below
            del fixed_n
            factors = [lv.factor for lv in self.plan.levels]
            fixed_levels = self.op.level_inputs(fixed_p, factors, self._features_hook(0))
            del fixed_p
            moving_n = normalize_intensity(self.sampler.image(self.moving_t), inplace=True)
            moving_p, _ = pad_to_multiple(moving_n, multiple)
            moving_s = contrast.subsample(moving_n) if checked else None
            del moving_n
            moving_levels = self.op.level_inputs(moving_p, factors, self._features_hook(1))
            del moving_p
            weight = None
            if self.fixed_mask is not None:
                weight = to_tensor(self.fixed_mask.astype(np.float32), self.device)
            if self.moving_mask is not None:
                carried = torch.as_tensor(self.sampler.labels(self.moving_mask.astype(np.uint8)) > 0,
                                          dtype=torch.float32, device=self.device)[None, None]
                weight = carried if weight is None else weight * carried
            weight_levels = [None] * len(self.plan.levels)
            if weight is not None:
                weight_p, _ = pad_to_multiple(weight, multiple)  # zero padding: outside counts for nothing
                masks.check_levels(weight_p, [level.factor for level in self.plan.levels],
                                   "the masks (fixed mask and moving mask carried into the fixed grid)")
                weight_levels = [downsample_image(weight_p, lv.factor) for lv in self.plan.levels]
            message = None if not checked else contrast.check(
                fixed_s, moving_s, None if weight is None else contrast.subsample(weight), self.similarity)
        if message is not None:
            self._warn(message, ContrastWarning)
        return list(zip(fixed_levels, moving_levels, weight_levels)), crop

    def _warn(self, message: str, category) -> None:
        """A warning for the user: Python's (``warnings``) and the result's list (the CLI and Slicer show it)."""
        self.warnings.append(message)
        warnings.warn(message, category)

    def _features_hook(self, which: int):
        """``level_inputs``' progress hook for the fixed (0) or moving (1) image: each half of the "features"
        stage, reported to the callback; raises ``_Stopped`` when it says stop (None: nothing to report)."""
        if self.callback is None or not self.op.costly_inputs:
            return None

        def hook(fraction: float):
            if self._report_features((which + min(max(float(fraction), 0.0), 1.0)) / 2):
                raise _Stopped()

        return hook

    def _report_features(self, fraction: float) -> bool:
        """The "features" stage: no step, so nothing recorded; the callback sees the linear alignment so far."""
        step = len(self.trace)
        return self._show(Progress(step, step + self.plan.max_steps, 0, len(self.plan.levels), float("nan"),
                                   time.perf_counter() - self.t0, "features", fraction),
                          self._linear_field(self.sampler), self.sampler)

    def _linear_field(self, sampler: Sampler) -> Callable[[], torch.Tensor]:
        """A linear alignment alone (``sampler``'s W) as one field on the fixed grid, made when asked."""
        def full_field():
            with torch.no_grad():
                return sampler.composed_displacement().to(self.device)

        return full_field

    def _show(self, progress: Progress, full_field, world_sampler: Sampler, z: Optional[torch.Tensor] = None,
              factor: int = 1) -> bool:
        """Give ``progress`` what its methods resample from and show it to the callback; True: stop."""
        progress._field, progress._sampler, progress._moving = full_field, self.base_sampler, self.moving_t
        progress._z, progress._factor, progress._world_sampler = z, factor, world_sampler
        return bool(self.callback(progress))

    @staticmethod
    def _data_ptr(image: Image) -> int:
        data = image.data
        return data.__array_interface__["data"][0] if isinstance(data, np.ndarray) else -1

    def _full(self, z: torch.Tensor, factor: int) -> torch.Tensor:
        """A working-grid state's field (its first ndim channels) as a field on the whole fixed grid."""
        return upsample_field(self.op.field(z), factor)[self.crop]

    def _report(self, stage: str, level_index: int, n_levels: int, residual: float, full_field,
                world_sampler: Sampler, z: Optional[torch.Tensor] = None, factor: int = 1) -> bool:
        """Record one step of either stage and show it to the callback; True: stop.

        ``full_field`` makes the whole transform as one field (for ``Progress.displacement``); ``z`` (the
        working-grid deformation, None in the alignment stage) and ``world_sampler`` (through the current
        W) serve ``Progress.preview`` without building the full field."""
        step = len(self.trace) + 1
        seconds = time.perf_counter() - self.t0
        self.trace.append(dict(step=step, stage=stage, level=level_index, residual=residual, seconds=seconds))
        if self.callback is None:
            return False
        # the deformable stage's budget after the alignment's planned (then actual) steps
        done = sum(row["stage"] == "alignment" for row in self.trace)
        total = (self.align_steps if stage == "alignment" else done) + self.plan.max_steps
        return self._show(Progress(step, total, level_index, n_levels, residual, seconds, stage),
                          full_field, world_sampler, z, factor)

    def _on_step(self, level_index: int, factor: int, residual: float, z: torch.Tensor) -> bool:
        return self._report("deformable", level_index, len(self.plan.levels), residual,
                            lambda: self.sampler.composed_displacement(self._full(z, factor)), self.sampler,
                            self.op.field(z) if self.callback is not None else None, factor)

    def _on_alignment_step(self, kind: str, level_index: int, n_levels: int, residual: float, W: np.ndarray) -> bool:
        sampler = Sampler.between(self.fixed, self.moving, W)
        return self._report("alignment", level_index, n_levels, residual, self._linear_field(sampler), sampler)

    def _align(self) -> Alignment:
        """The alignment stage. A similarity with a measure for other contrasts (MIND-SSC: mutual information)
        is aligned by both its measures; the first's pose is kept when the intensities follow a line there
        (``contrast.nonlinear``) and the best curve explains about as much as at the second's pose
        (``contrast.CURVE_MARGIN``), else the second's: NCC assumes one contrast, MI moves an image aligned to
        itself by a fraction of a voxel."""
        if self.settings.init == "none":
            return identity_alignment()
        measures = self.settings.alignment_measures
        first_aligner = self._aligner(measures[0])
        result = first_aligner.run()
        if len(measures) == 2 and not result.stopped:
            first = result
            first_share = first_aligner.intensity_relation(first.matrix)
            del first_aligner  # its full-resolution copies of both images
            second_aligner = self._aligner(measures[1])
            second = second_aligner.run()
            share = (first_share, None if second.stopped else second_aligner.intensity_relation(second.matrix))
            keep_first = not second.stopped and (share[0] is None or share[1] is None or (
                not contrast.nonlinear(share[0]) and share[0][1] >= share[1][1] - contrast.CURVE_MARGIN))
            result, other_run = (first, second) if keep_first else (second, first)
            result.stages.insert(0, dict(
                name="measure", chosen=result.similarity, measures=[first.similarity, second.similarity],
                r2=[None if s is None else s[0] for s in share], eta2=[None if s is None else s[1] for s in share],
                other_steps=other_run.steps, other_message=other_run.message))
            result.steps += other_run.steps
            result.seconds += other_run.seconds
            result.stopped = second.stopped
        if result.message:
            self._warn(result.message, AlignmentWarning)
        return result

    def _aligner(self, similarity: str) -> Aligner:
        return Aligner(self.fixed, self.moving, self.settings.init, similarity, self.fixed_mask, self.moving_mask,
                       self.device, callback=self._on_alignment_step)

    def run(self) -> RegistrationResult:
        ndim = self.fixed.ndim
        self.alignment = self._align()
        self.sampler = Sampler.between(self.fixed, self.moving, self.alignment.matrix)
        if self.alignment.stopped:  # cancelled during the alignment: the transform reached, no deformation
            return self._result(np.zeros((ndim, *self.fixed.shape), np.float32), False, True)
        try:
            pyramid, self.crop = self._prepare()
        except _Stopped:  # cancelled while MIND's descriptors were computed: the alignment reached, no deformation
            return self._result(np.zeros((ndim, *self.fixed.shape), np.float32), False, True)
        with torch.no_grad():
            # the state: the field (+ a recurrent model's hidden state), zero on the coarsest grid
            z0 = torch.zeros(1, self.op.state_channels(ndim), *pyramid[0][0].shape[2:], device=self.device)
            out = solve_levels(self.plan.levels, z0, lambda i, z, steps: self._solve_level(pyramid, i, z, steps))
        del pyramid, z0
        # the final field (``op.field``: a recurrent model's hidden state dropped, a smoothed parameterisation
        # applied) straight into a float32 array on the fixed grid, slab by slab (``chunked``)
        disp_np = chunked.upsample_field_into(self.op.field(out.z), out.factor, self.fixed.shape)
        converged, stopped = out.converged, out.stopped
        del out
        return self._result(disp_np, converged, stopped)

    def _solve_level(self, pyramid: list, index: int, z: torch.Tensor, steps: int) -> SolverResult:
        """One level of the plan: its images (taken out of ``pyramid``, so each is freed once its level is
        done), its operator, the plan's solver, every step reported (``_on_step``; the callback can stop)."""
        fl, ml, wl = pyramid[index]
        pyramid[index] = None
        op = self.op.for_level(index)  # each level runs its own operator
        f = (lambda zz: op(zz, fl, ml)) if wl is None else (lambda zz: op(zz, fl, ml, weight=wl))
        factor = self.plan.levels[index].factor
        return solve(f, z, self.plan.solver, max_steps=steps, tol=self.plan.tol, **self.plan.solver_options,
                     callback=lambda _, r, zc: self._on_step(index, factor, r, zc))

    def _result(self, disp_np: np.ndarray, converged: bool, stopped: bool) -> RegistrationResult:
        warped = jacobian = warped_labels = None
        if not self.field_only:
            with torch.no_grad():
                disp = torch.from_numpy(disp_np)[None].to(self.device)
                warped = Image(self.sampler.image(self.moving_t, disp)[0, 0].cpu().numpy().astype(np.float32, copy=False),
                               self.fixed.affine.copy())
                jacobian = chunked.jacobian_determinant(disp, fn=jacobian_determinant)[0].cpu().numpy()
                del disp
            if self.moving_labels is not None:
                warped_labels = self.sampler.labels(np.asarray(self.moving_labels), disp_np)
        deformable = [row for row in self.trace if row["stage"] == "deformable"]
        return RegistrationResult(
            warped=warped,
            displacement=disp_np,
            fixed_affine=self.fixed.affine.copy(),
            moving_affine=self.moving.affine.copy(),
            jacobian=jacobian,
            trace=self.trace,
            steps=len(self.trace),
            converged=bool(converged),
            final_residual=float(deformable[-1]["residual"]) if deformable else float("nan"),
            seconds=time.perf_counter() - self.t0,
            device=str(self.device),
            settings=self.settings,
            plan=self.plan,
            cancelled=stopped,
            warped_labels=warped_labels,
            moving_shape=tuple(self.moving.shape),
            world=np.asarray(self.alignment.matrix, dtype=np.float64).copy(),
            alignment=None if self.settings.init == "none" else self.alignment,
            fixed_mask=self.fixed_mask,
            warnings=list(self.warnings),
        )
