"""The two configurations of the library, each defined once, with defaults and validation.

* ``ModelConfig``: what a trained update operator *is* and how it runs
  (network, update rule, pyramid, solver, budget), written by training into
  the checkpoint and read back by every consumer (``register()``, evaluation,
  the Slicer module). Versioned; version-1 checkpoints are converted on load.
* ``Settings``: what one call of ``register()`` is asked to do. Every caller
  (Python, CLI, Slicer module, evaluation) builds one through
  ``make_settings``, which refuses names it does not know instead of ignoring
  them.

Names used throughout (each means one thing):
``update`` the kind of operator (learned | gradient | hybrid | features); ``method`` the
training method that produced a model (deqreg, voxelmorph, ...);
``pyramid`` the downsampling factors of the fixed grid the solver runs on,
coarse to fine; ``level_weights`` how the step budget is split over them;
``step_size`` the gradient operator's descent step; ``diffusion_weight`` the
weight of the diffusion regulariser; ``sigma`` the Gaussian preconditioner's
width in voxels; ``window`` the LNCC window.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, List, Optional, Sequence

from .errors import InputError

UPDATES = ("learned", "gradient", "hybrid", "features")
MODEL_UPDATES = ("learned", "hybrid", "features")
SOLVER_NAMES = ("anderson", "fixed-point")
SIMILARITIES = ("lncc", "mse", "mind")  # similarity.SIMILARITIES (a test keeps them equal)
#: the similarity step's image gradient (similarity.IMAGE_GRADIENTS, a test keeps them equal); each similarity's
#: default is in SIMILARITY_DEFAULTS
IMAGE_GRADIENTS = ("moving", "warped", "symmetric")
#: the linear alignment stage (alignment.py): how far it goes, and its similarities
INITS = ("none", "center", "rigid", "affine")
INIT_SIMILARITIES = ("lncc", "ncc", "mse", "mi")
#: --preset: named bundles of settings for common cases; settings given beside a preset win over it.
#: Each is measured in README.md ("Scans as users have them"); the Slicer panel offers them first.
PRESETS = {
    "brain-mri": dict(about="same-sequence brain MRI: affine alignment (global NCC), then LNCC (the defaults)",
                      settings=dict(init="affine", init_similarity=None, similarity="lncc")),
    "multimodal": dict(about="another contrast or scanner: rigid alignment by mutual information, then "
                             "MIND-SSC",
                       settings=dict(init="rigid", init_similarity="mi", similarity="mind")),
    "lung-ct": dict(about="inhale/exhale CT of one patient, best with lung masks: rigid alignment (global NCC), "
                          "then MIND-SSC",
                    settings=dict(init="rigid", init_similarity="ncc", similarity="mind")),
}
NETWORKS = ("unet", "cnn", "features")
CONFIG_VERSION = 2


def _check_pyramid(pyramid, what: str) -> List[int]:
    try:
        out = [int(f) for f in pyramid]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of positive integers, got {pyramid!r}") from None
    if not out or any(f < 1 or f != g for f, g in zip(out, pyramid)):
        raise InputError(f"{what} must be a non-empty list of positive integers, got {list(pyramid)!r}")
    if any(a <= b for a, b in zip(out, out[1:])):
        raise InputError(f"{what} must go from coarse to fine (strictly decreasing factors), got {out}")
    return out


def _check_weights(weights, n: Optional[int], what: str) -> List[float]:
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of positive numbers, got {weights!r}") from None
    if not out or any(not (w > 0 and math.isfinite(w)) for w in out):
        raise InputError(f"{what} must be positive numbers, got {out}")
    if n is not None and len(out) != n:
        raise InputError(f"{what} has {len(out)} entries but the pyramid has {n} levels")
    return out


def _check_solver(solver: str, what: str = "solver") -> str:
    if solver not in SOLVER_NAMES:
        raise InputError(f"unknown {what} {solver!r}; choose one of {', '.join(SOLVER_NAMES)}")
    return solver


# --------------------------------------------------------------------------- model


@dataclass
class TrainingRecord:
    """How a model was trained: read by the trainer on resume, never by inference."""

    factor: int = 1                   # the grid the network trained on: the fixed grid pooled by this
    loss_diffusion_weight: float = 1.0  # lambda of the training loss (LNCC + lambda diffusion)
    label_weight: float = 0.0         # weight of the soft-Dice loss on label maps
    fold_weight: float = 0.0          # weight of the folding penalty mean(relu(-det J))
    lr: float = 1e-4
    data: str = ""
    n_states: int = 4                 # DEQ: supervised intermediate states
    phantom_k: int = 3                # DEQ: phantom-gradient steps per state (the paper's memory figures: ~3)
    phantom_damping: float = 0.8      # DEQ: damping of those steps
    solver_tol: float = 1e-3          # DEQ: tolerance of the training solve
    level_solve: bool = False         # DEQ: the training solve runs the stored pyramid's coarser levels first
                                      # (no graph, as register() does) and supervises the training-grid level
    gamma: float = 0.8                # RIIR: state weights gamma^(K-1-i)
    init: str = ""                    # checkpoint the weights started from
    optimizer_steps: int = 0
    subjects: List[str] = field(default_factory=list)      # folder data: the subjects trained on
    val_subjects: List[str] = field(default_factory=list)  # held out for model selection
    label_set: str = "pair"           # the labels the validation Dice averages over (see Training.evaluate)
    augment: dict = field(default_factory=dict)            # Training.data.Augment keywords
    extra: dict = field(default_factory=dict)  # other facts worth keeping (free-form)


@dataclass
class ModelConfig:
    """Everything needed to rebuild and run a trained update operator."""

    update: str                       # learned | hybrid | features
    ndim: int
    unet: dict                        # the network's constructor arguments (networks.UNet, ConvNet or FeatureNet)
    pyramid: List[int] = field(default_factory=lambda: [1])
    level_weights: Optional[List[float]] = None   # None: equal split
    solver: str = "fixed-point"       # the solver it was trained with and runs with
    max_steps: int = 48               # inference budget over all levels
    tol: float = 1e-3                 # inference tolerance on the relative residual
    scale: float = 1.0                # multiplies the network's output
    similarity: str = "lncc"          # the similarity it was trained with (hybrid, features: also its gradient step)
    window: int = 5
    tau: float = 1.0                  # hybrid: initial descent step (trainable); features: the (fixed) step
    sigma: float = 1.0                # hybrid, features: Gaussian preconditioner
    diffusion_weight: float = 0.0     # hybrid, features: diffusion term inside the operator's gradient step
    method: str = "deqreg"            # deqreg | voxelmorph | unroll | riir | gradirn
    trained_steps: Optional[int] = None
    network: str = "unet"             # the class ``unet`` holds the arguments of: unet | cnn (GraDIRN's) | features
    per_level_networks: bool = False  # one operator (network, tau) per pyramid level (GraDIRN, unroll)
    recurrent_hidden: int = 0         # RIIR: hidden-state channels carried beside the field (0: none)
    second_order: bool = False        # hybrid/RIIR: training differentiates through the similarity gradient
    training: TrainingRecord = field(default_factory=TrainingRecord)

    def __post_init__(self):
        if isinstance(self.training, dict):
            self.training = _from_fields(TrainingRecord, self.training, "model config 'training'")
        self.validate()

    def validate(self) -> "ModelConfig":
        if self.update not in MODEL_UPDATES:
            raise InputError(f"model config: unknown update {self.update!r}; a model is one of {MODEL_UPDATES}")
        if self.ndim not in (2, 3):
            raise InputError(f"model config: ndim must be 2 or 3, got {self.ndim!r}")
        if not isinstance(self.unet, dict) or self.unet.get("ndim", self.ndim) != self.ndim:
            raise InputError("model config: 'unet' must be the U-Net's arguments, for the model's ndim")
        self.pyramid = _check_pyramid(self.pyramid, "model config 'pyramid'")
        if self.level_weights is not None:
            self.level_weights = _check_weights(self.level_weights, len(self.pyramid), "model config 'level_weights'")
        _check_solver(self.solver, "model config solver")
        if int(self.max_steps) < 1:
            raise InputError("model config: max_steps must be at least 1")
        if not (self.tol >= 0):
            raise InputError("model config: tol must be >= 0")
        if self.similarity not in SIMILARITIES:
            raise InputError(f"model config: unknown similarity {self.similarity!r}")
        if self.network not in NETWORKS:
            raise InputError(f"model config: unknown network {self.network!r}; choose one of {', '.join(NETWORKS)}")
        if int(self.recurrent_hidden) < 0 or (self.recurrent_hidden and self.update != "learned"):
            raise InputError("model config: recurrent_hidden must be >= 0, and only a learned update carries one")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, version: int = CONFIG_VERSION) -> "ModelConfig":
        """Read a checkpoint's config; version 1 (before this class) is converted."""
        if version == 1:
            data = _from_version_1(data)
        elif version != CONFIG_VERSION:
            raise InputError(f"model config version {version} is not supported (this library reads 1 and "
                             f"{CONFIG_VERSION}); update DEQRegistration")
        return _from_fields(cls, data, "model config")


def _from_fields(cls, data: dict, what: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{what}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


_V1_TRAINING_KEYS = {"lam": "loss_diffusion_weight", "label_weight": "label_weight", "lr": "lr", "data": "data",
                     "n_states": "n_states", "phantom_k": "phantom_k", "phantom_damping": "phantom_damping",
                     "train_tol": "solver_tol", "gamma": "gamma", "init": "init",
                     "trained_optimizer_steps": "optimizer_steps"}


def _from_version_1(old: dict) -> dict:
    """Version-1 configs: one flat dict whose keys were read with scattered defaults.

    ``factor``/``factors``/``levels`` become one ``pyramid``; ``op_lam`` the
    hybrid ``diffusion_weight``; the training solver (stored as ``solver``)
    becomes the model's solver for DEQ models, while the unrolled methods ran
    plain iteration; the rest of the training facts go into ``training``.
    """
    old = dict(old)
    method = old.pop("method", "deqreg")
    factor = int(old.pop("factor", 1))
    factors = old.pop("factors", None)
    levels = old.pop("levels", None)
    repeats = old.pop("repeats", None)
    if factors:
        pyramid = [int(f) for f in factors]
    elif levels:
        pyramid = [factor * int(lv) for lv in levels]
    else:
        pyramid = [factor]
    train_solver = old.pop("solver", "anderson")
    training = {new: old.pop(key) for key, new in _V1_TRAINING_KEYS.items() if key in old}
    training["factor"] = factor
    cfg = dict(update=old.pop("update", "learned"), ndim=old.pop("ndim"), unet=old.pop("unet"), pyramid=pyramid,
               level_weights=old.pop("level_weights", None),
               solver=train_solver.replace("_", "-") if method == "deqreg" else "fixed-point",
               max_steps=int(old.pop("max_steps", 48)), tol=float(old.pop("tol", 1e-3)),
               scale=float(old.pop("scale", 1.0)), window=int(old.pop("window", 5)),
               tau=float(old.pop("tau", 1.0)), sigma=float(old.pop("sigma", 1.0)),
               diffusion_weight=float(old.pop("op_lam", 0.0)), method=method,
               trained_steps=old.pop("trained_steps", None))
    if repeats is not None:
        old["repeats"] = repeats
    training["extra"] = old  # anything left is kept, not interpreted
    cfg["training"] = training
    return cfg


# --------------------------------------------------------------------------- register()


@dataclass(frozen=True)
class Settings:
    """What ``register()`` does. ``None`` means "the mode's own default" (see ``resolve``)."""

    update: str = "gradient"          # gradient | learned (any trained model, as it was trained) | hybrid | features
    model: Any = None                 # not gradient: "default", a checkpoint path or an UpdateOperator
    solver: Optional[str] = None      # anderson | fixed-point (gradient: anderson; a model: its own)
    max_steps: Optional[int] = None   # total over all levels (gradient: 200; a model: its own)
    tol: Optional[float] = None       # on the relative residual (see solvers.py)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    cpu_fallback: bool = True         # rerun on the CPU when the GPU runs out of memory
    pyramid: Optional[Sequence[int]] = None         # gradient: from the image size; a model: its own
    level_weights: Optional[Sequence[float]] = None  # split of max_steps over the pyramid (default equal)
    # the gradient (weight-free) operator; a model keeps what it was trained with
    step_size: Optional[float] = None         # None: the similarity's own (SIMILARITY_DEFAULTS)
    diffusion_weight: Optional[float] = None  # None: the similarity's own
    sigma: float = 1.5
    window: int = 5
    similarity: str = "lncc"
    image_gradient: Optional[str] = None  # moving | symmetric | warped (below); None: the similarity's own
    # the linear alignment before the deformable stage (any update rule)
    init: str = "affine"              # none | center | rigid | affine
    init_similarity: Optional[str] = None  # lncc | ncc | mse | mi; None: the similarity's own
    preset: Optional[str] = None      # the PRESETS entry these settings started from (recorded, see make_settings)

    def validate(self) -> "Settings":
        if self.update not in UPDATES:
            raise InputError(f"unknown update {self.update!r}; choose one of {', '.join(UPDATES)}")
        if self.update == "gradient" and not _no_model(self.model):
            raise InputError("a model is used by the learned, hybrid and features updates; the gradient update has no "
                             "weights (give update='learned', or no model)")
        if self.solver is not None:
            _check_solver(self.solver)
        if self.max_steps is not None and (not float(self.max_steps).is_integer() or int(self.max_steps) < 1):
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.tol is not None and not (float(self.tol) >= 0 and math.isfinite(float(self.tol))):
            raise InputError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not isinstance(self.device, str):
            raise InputError(f"device must be a string (auto, cpu, cuda), got {self.device!r}")
        n = None
        if self.pyramid is not None:
            n = len(_check_pyramid(self.pyramid, "pyramid"))
        if self.level_weights is not None:
            _check_weights(self.level_weights, n, "level_weights")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise InputError(f"step_size must be positive, got {self.step_size!r}")
        if self.diffusion_weight is not None and not (self.diffusion_weight >= 0
                                                      and math.isfinite(self.diffusion_weight)):
            raise InputError(f"diffusion_weight must be >= 0, got {self.diffusion_weight!r}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise InputError(f"sigma must be >= 0, got {self.sigma!r}")
        if int(self.window) != self.window or self.window < 1 or self.window % 2 == 0:
            raise InputError(f"window must be an odd positive integer, got {self.window!r}")
        if self.similarity not in SIMILARITIES:
            raise InputError(f"unknown similarity {self.similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if self.image_gradient is not None and self.image_gradient not in IMAGE_GRADIENTS:
            raise InputError(f"unknown image_gradient {self.image_gradient!r}; choose one of "
                             f"{', '.join(IMAGE_GRADIENTS)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.init_similarity is not None and self.init_similarity not in INIT_SIMILARITIES:
            raise InputError(f"unknown init_similarity {self.init_similarity!r}; choose one of "
                             f"{', '.join(INIT_SIMILARITIES)}")
        if self.update != "gradient":
            changed = [name for name in GRADIENT_OPERATOR_SETTINGS if getattr(self, name) != _DEFAULTS[name]]
            if changed:
                raise InputError(f"{', '.join(changed)} set the gradient update; a {self.update} model keeps the "
                                 "values it was trained with")
        return self

    @property
    def similarity_defaults(self) -> "SimilarityDefaults":
        """The similarity's own defaults (SIMILARITY_DEFAULTS): what None resolves to below."""
        return SIMILARITY_DEFAULTS[self.similarity]

    def operator_value(self, name: str, ndim: int) -> float:
        """``step_size`` or ``diffusion_weight`` as the gradient operator uses it on ``ndim``-D images: the
        setting, or the similarity's own default (MIND-SSC's gradient is ~20x smaller than LNCC's: same
        balance, same speed; MIND's diffusion weight differs in 2D and 3D)."""
        value = getattr(self, name)
        if value is None:
            defaults = self.similarity_defaults
            is_3d_weight = name == "diffusion_weight" and ndim == 3
            value = defaults.diffusion_weight_3d if is_3d_weight else getattr(defaults, name)
        return float(value)

    @property
    def similarity_image_gradient(self) -> str:
        """The image gradient the similarity step uses: ``image_gradient``, or the similarity's own."""
        return self.image_gradient or self.similarity_defaults.image_gradient

    @property
    def smooth_field(self) -> bool:
        """Whether the gradient operator's field is its state box-smoothed (the similarity's own choice)."""
        return self.similarity_defaults.smooth_field

    @property
    def alignment_measures(self) -> List[str]:
        """The measures the alignment stage runs, in order: ``alignment_similarity``, then, for a rigid or affine
        init without a given ``init_similarity``, the similarity's measure for other contrasts (``_align`` in
        registration.py keeps one of their poses)."""
        first = self.alignment_similarity
        other = None if self.init_similarity else self.similarity_defaults.init_similarity_other_contrast
        searched = self.init in ("rigid", "affine")  # "center" compares nothing
        return [first, other] if other not in (None, first) and searched else [first]

    @property
    def alignment_similarity(self) -> str:
        """The similarity the alignment stage uses: ``init_similarity``, or the one matching ``similarity``."""
        return self.init_similarity or self.similarity_defaults.init_similarity

    def as_dict(self) -> dict:
        """JSON-friendly copy (a model object is named by its class)."""
        out = asdict(self)
        if not isinstance(self.model, (str, type(None))):
            out["model"] = type(self.model).__name__
        for key in ("pyramid", "level_weights"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


GRADIENT_OPERATOR_SETTINGS = ("step_size", "diffusion_weight", "sigma", "window", "similarity", "image_gradient")
@dataclass(frozen=True)
class SimilarityDefaults:
    """What a similarity brings when the caller does not say: the gradient operator's parameters and the linear
    alignment's measure (``Settings.operator_value``, ``similarity_image_gradient``, ``smooth_field``,
    ``alignment_similarity`` read them; one row per similarity in SIMILARITY_DEFAULTS)."""

    step_size: float
    diffusion_weight: float         # 2D images
    diffusion_weight_3d: float      # 3D images
    image_gradient: str = "moving"  # IMAGE_GRADIENTS
    smooth_field: bool = False      # GradientUpdate(smooth_field)
    init_similarity: str = "ncc"    # INIT_SIMILARITIES; mi alone only when asked (the multimodal preset)
    #: a second alignment measure run after ``init_similarity``'s; its pose is kept unless the pair's intensities
    #: follow a line at the first's pose and the best curve explains as much there (``registration._align``)
    init_similarity_other_contrast: Optional[str] = None


#: Why each row holds what it holds, field by field.
#: step_size, diffusion_weight: the gradient operator's (README, "Scans as users have them" and design notes, "Why
#: the step is 0.5"; MSE not re-tuned).
#: MIND's diffusion weight is 0.1, chosen on the 2D OASIS-TRT-20 slices of subjects 1-6 (six pairs, moving under
#: synthetic.contrast_change, multimodal preset, pyramid (4, 2) like the 3D brain's 2 mm plan): 0.02 folded 1.15 %
#: of the voxels (mean Dice 0.400), 0.05 0.19 % (0.426); 0.1, 0.2, 0.3 and 0.5 all gave 0.441-0.442 with <= 0.006 %;
#: 0.1 is the weakest on that plateau. Re-checked when each level's descriptors came to be pooled from the
#: full-resolution MIND (radius 1, dilation 2; ``similarity.mind_ssc_pooled``), same six pairs: 0.03 0.448 with
#: 0.31 % folded, 0.05 0.452 / 0.08 %, 0.07 0.451 / 0.011 %, 0.1 0.452 / 0 % (all six converged), 0.15 0.450,
#: 0.2 0.448: 0.1 stays. MIND's plain iteration at step 4 does not 2-cycle (no voxel with consecutive
#: residuals at cosine < -0.9 on a 2 mm 2D pair; at step 8 some do), so its step stays 4
#: LNCC's step is 0.5: at 1.0 the map is not a contraction where LNCC's curvature is high (OASIS after the
#: affine stage: ~1300 voxels 2-cycle, consecutive residuals at cosine -0.9999, plain iteration's residual
#: rises from 3.6e-3 to 6.9e-3 and Anderson stalls at 1.5e-3); at 0.5 plain iteration decreases monotonically;
#: its diffusion 0.45 (OASIS, affine stage: Dice 0.750 at 0.5, 0.755 at 0.45 with 0.028 % folded)
#: diffusion_weight_3d: MIND's 3D diffusion weight is ConvexAdam's (Siebert, Hansen & Heinrich
#: 2021; the weight-free MIND-SSC method of Learn2Reg): its default lambda 1.25 multiplies the mean over voxels
#: *and the 3 components* of the squared differences, against the sum over the 12 channels of the descriptor
#: difference; in this energy's scale (mean over channels, sums over voxels and components) that is
#: 1.25 / 36 = 0.035. A 2D slice registration needs more (0.035 folds 0.3 % on the 2D slices above; out-of-plane
#: anatomy a 2D field can only fake), so 2D keeps 0.1
#: smooth_field: the gradient operator parameterises the field as three 3-voxel box filters of the state
#: (``operators.GradientUpdate(smooth_field=True)``): ConvexAdam's parameterisation, which its MIND-SSC weight
#: (above) was set with. Measured with the multimodal preset: the OASIS pair under the contrast map
#: 0.7123 -> 0.7160 (0.008 -> 0.002 % folded), under the T2-like map 0.7064 -> 0.7085 (0.018 -> 0.007 %), the
#: 30 ordered 2D pairs of subjects 1-6 under the contrast map 0.4499 -> 0.4505 (all converged, 0.047 % folded
#: either way). Not for LNCC: the aligned OASIS pair 0.7546 -> 0.7469
#: image_gradient: "moving" (the energy's exact gradient) or "symmetric" (the mean of the warped moving image's
#: and the fixed image's: ESM, the demons' symmetric forces). Measured against "moving": higher Dice and less folding on
#: the 3D OASIS pair (LNCC 0.7546 -> 0.7596, MIND under the contrast map 0.7123 -> 0.7147, T2-like 0.7064 ->
#: 0.7147), and on a 48^3 interior crop (0.6728 -> 0.6799) but in 135 steps instead of 72; on 2D OASIS-TRT-20
#: subjects 1-6 (six pairs) LNCC 0.5021 -> 0.5084, MIND 0.4524 -> 0.4541 with 4 of 6 solves converged instead of
#: 6 (pair 1-2: 0.5027 -> 0.4944, not converged in 200 steps); all 30 ordered pairs of subjects 1-6 at the default
#: settings, LNCC: 0.5092 -> 0.5074, 0.172 -> 0.061 % folded, 28 -> 20 of 30 converged. Not LNCC's default: it
#: converges less reliably there and its gain is not general. MIND-SSC's default since its field is box-smoothed
#: (smooth_field), which made it converge: multimodal preset, "moving" -> "symmetric", the OASIS pair under
#: the contrast map 0.7160 -> 0.7186 (0.002 -> 0.000 % folded), under the T2-like map 0.7085 -> 0.7152
#: (0.007 -> 0.003 %), the 30 ordered 2D pairs of subjects 1-6 under the contrast map 0.4506 -> 0.4525
#: (0.047 -> 0.010 % folded, 30 of 30 converged either way).
#: init_similarity: a global measure matching the deformable stage's similarity (MSE aligns by MSE; MIND-SSC by
#: global NCC: README, Honest limits, says which others were measured and why they are not the default).
#: init_similarity_other_contrast: MIND-SSC is asked for pairs of other contrasts, where NCC's alignment is wrong:
#: --similarity mind with NCC alone reached Dice 0.6975 on the OASIS pair under synthetic.t2_like (its affine
#: stage turned the scan 2.5 degrees and scaled it by 1.11) and 0.152 on the 30 ordered 2D pairs of subjects 1-6
#: under t2_like; aligned by (normalised) MI, 0.7133 and 0.461. Both measures run and NCC's pose is kept where the
#: pair's intensities follow a line and the best curve explains as much as at MI's (registration._align), so an
#: image aligned to itself, or a pair of one contrast, keeps NCC's exact answer. After NCC's alignment r^2 / eta^2
#: on the contrast check's lattice was 0.86-0.99 for same-contrast pairs (2D six pairs; 3D 0.94, moved or not),
#: 0.29-0.63 under contrast_change (3D 0.55-0.57), 0.07-0.31 under t2_like (3D 0.28): contrast.LINEAR_SHARE_MIN
#: = 0.7 separates them
SIMILARITY_DEFAULTS = {
    "lncc": SimilarityDefaults(step_size=0.5, diffusion_weight=0.45, diffusion_weight_3d=0.45),
    "mse": SimilarityDefaults(step_size=1.0, diffusion_weight=0.5, diffusion_weight_3d=0.5, init_similarity="mse"),
    "mind": SimilarityDefaults(step_size=4.0, diffusion_weight=0.1, diffusion_weight_3d=0.035,
                               image_gradient="symmetric", smooth_field=True, init_similarity_other_contrast="mi"),
}
_DEFAULTS = {f.name: f.default for f in fields(Settings)}
#: the gradient mode's budget and tolerance when the caller gives none
GRADIENT_MAX_STEPS = 200  # a budget, not a target: the solver stops at tolerance (OASIS after the affine stage: 61)
GRADIENT_TOL = 1e-3
#: Anderson's history in the gradient mode (5 plateaus near 1e-3 on brain MRI; learned models keep the solver's 5)
GRADIENT_ANDERSON_MEMORY = 8
#: Anderson restarts from its best iterate when a step's residual exceeds this multiple of the best seen
#: (the solver's default, 10, let extrapolations wander: a 48^3 brain crop's 12^3 level sat at 4e-2 for 150
#: steps, where plain iteration reaches 3e-3 in 80; at 2 it converges in 37)
GRADIENT_ANDERSON_RESTART = 2.0


def _no_model(model) -> bool:
    return model is None or (isinstance(model, str) and model.lower() == "none")


def setting_names() -> List[str]:
    return [f.name for f in fields(Settings)]


def make_settings(base: Optional[Settings] = None, **overrides) -> Settings:
    """``base`` (or the defaults) with ``overrides``; unknown names raise, naming the valid ones.

    ``preset=NAME`` first applies ``PRESETS[NAME]``'s settings, then the other overrides (they win).
    """
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(repr(u) for u in unknown)}; valid settings: "
                         f"{', '.join(setting_names())}")
    if base is not None and not isinstance(base, Settings):
        raise InputError(f"settings must be a DEQRegistrationLib.config.Settings, got {type(base).__name__}")
    preset = overrides.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        overrides = {**PRESETS[preset]["settings"], **overrides}
    settings = replace(base or Settings(), **overrides)
    if _no_model(settings.model) and settings.model is not None:
        settings = replace(settings, model=None)
    return settings.validate()
