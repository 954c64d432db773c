"""The linear alignment stage: a world transform W (fixed RAS -> moving RAS) found before the deformable stage.

``init`` says how far it goes:

* ``none``: W = I (the images' headers are trusted);
* ``center``: a translation taking the fixed image's intensity centre of mass to the moving one's;
* ``rigid``: the best start among the identity, the centre-of-mass translation and a principal-axes
  rotation about the centres (scored by the similarity on the coarsest level), checked against far
  orientations by the orientation search (``Aligner._search``), then rotation + translation;
* ``affine`` (the default): ``rigid``, then a full affine (rotation, scaling, shear, translation).

Each rigid or affine stage is a fixed-point problem solved, coarse to fine, by
the same root solvers as the deformable stage (``solvers.solve``): the
**state** is the stage's transform in a local frame (linear part scaled by the
object's radius so that all entries are millimetres, then the translation),
the **operator** one preconditioned descent step:

1. the gradient g of the similarity w.r.t. a small update S(theta) composed on the
   fixed side, T <- T o S(theta), at theta = 0 (autograd over the few parameters);
2. the direction delta = -H^-1 g, H the Gauss-Newton matrix of the *fixed* image's
   gradients under S (computed once per level: composing on the fixed side keeps it
   constant, as in inverse-compositional Lucas-Kanade), which puts rotations,
   translations and scalings in the same units;
3. the step length from one trial evaluation at the trust radius (one voxel of the
   level, root-mean-square motion of the fixed points): a quadratic through E(0),
   E'(0) and the trial value, capped at the radius.

A fixed point is a stationary point of the similarity (g = 0 gives delta = 0),
just as the gradient update's fixed points are stationary points of its energy.
The relative residual of the state is the motion of the step relative to the
object's size, so the tolerance reads the same for every image.

Similarities (``init_similarity``): ``lncc`` (1 - squared local NCC,
window 5 on the level's grid), ``ncc`` (global), ``mse`` and ``mi`` (normalised
mutual information from a Parzen-window joint histogram, 32 bins: for multi-modal
pairs). All are weighted by the fixed mask and by the moving mask carried
through the current W; all but ``mi`` also by the part of the fixed grid that
maps inside the moving image (``mi`` compares the moving image's outside as
background, so its samples do not change with the pose).

A stage whose result is not finite, whose linear part folds or scales by more
than ``MAX_SCALE``, or that leaves the similarity worse than the start, is
undone and reported (``Alignment.message``); the identity is kept when
nothing improved on it. Never NaN.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import INIT_SIMILARITIES as ALIGN_SIMILARITIES, INITS
from .geometry import pooled_affine, voxel_to_physical_points
from .image import Image
from . import contrast, similarity
from .masks import pooled
from .operators import gaussian_smooth
from .preprocess import normalize_intensity, pad_to_multiple, to_tensor
from .sampling import Sampler
from .solvers import solve
from .transforms import downsample_image, inside, sample

#: solver steps per stage and level (rigid and affine each), and the tolerance on the relative residual
STEPS_PER_LEVEL = 25
#: a level has converged when a step moves the fixed points by less than this fraction of its voxel (RMS)
TOL_VOXELS = 0.02
#: the finest alignment level has at most this many voxels (the deformable stage refines the rest)
MAX_LEVEL_VOXELS = 1 << 20
#: coarser levels are added while their smallest side keeps this many voxels, up to MAX_LEVELS
MIN_LEVEL_SIDE = 16
MAX_LEVELS = 3
#: a linear part scaling any axis by more than this (or folding) is a diverged alignment
MAX_SCALE = 3.0
MI_BINS = 32
#: a principal-axes start turning by more than this is not the default start (see ``_principal_axes``); it is
#: one of the orientation search's candidates
MAX_PRINCIPAL_AXES_DEGREES = 45.0
#: the orientation search (``Aligner._search``): this many of the far orientations, best by their coarse energy,
#: are refined beside the default start; a far candidate must be farther than SEARCH_MIN_DEGREES from it
SEARCH_REFINED = 3
SEARCH_MIN_DEGREES = 30.0
#: trial evaluations of the step length per step, at most
LINE_TRIALS = 3
#: Gaussian smoothing (level voxels) of both images on every level: a smoother energy, fewer spurious minima
SMOOTH_VOXELS = 1.0
#: the affine stage runs on this many of the finest alignment levels (coarse grids constrain 12 parameters badly)
AFFINE_LEVELS = 1
#: global similarities are evaluated at this many fixed voxels per level at most (a fixed random subset)
MAX_POINTS = 1 << 15
LNCC_WINDOW = 5

Callback = Callable[[str, int, int, float, np.ndarray], Optional[bool]]


@dataclass
class Alignment:
    """What the alignment stage found and how."""

    init: str
    matrix: np.ndarray                 # 4x4, fixed RAS -> moving RAS (the Sampler's ``world``)
    similarity: str = ""
    start: str = "identity"            # the candidate the rigid stage started from
    levels: List[int] = field(default_factory=list)
    stages: List[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    message: str = ""                  # non-empty: something went wrong and was undone
    stopped: bool = False              # the callback asked to stop

    def as_dict(self) -> dict:
        return dict(init=self.init, matrix=np.asarray(self.matrix).tolist(), similarity=self.similarity,
                    start=self.start, levels=list(self.levels), stages=list(self.stages), steps=self.steps,
                    seconds=self.seconds, message=self.message)


def identity(init: str = "none") -> Alignment:
    return Alignment(init=init, matrix=np.eye(4))


def alignment_pyramid(shape: Sequence[int]) -> List[int]:
    """Factors of the fixed grid the alignment runs on, coarse to fine (160x192x224: (8, 4))."""
    nd = len(shape)
    f = 1
    while np.prod(shape) / f ** nd > MAX_LEVEL_VOXELS:
        f *= 2
    factors = [f]
    while len(factors) < MAX_LEVELS and min(shape) / (factors[-1] * 2) >= MIN_LEVEL_SIDE:
        factors.append(factors[-1] * 2)
    return factors[::-1]


def schedule(init: str, n_levels: int) -> List[Tuple[str, int]]:
    """(stage, level index) in the order they run: rigid on every level, affine on the finest ``AFFINE_LEVELS``."""
    if init not in ("rigid", "affine"):
        return []
    out = [("rigid", i) for i in range(n_levels)]
    if init == "affine":
        out += [("affine", i) for i in range(max(0, n_levels - AFFINE_LEVELS), n_levels)]
    return out


def planned_steps(init: str, shape: Sequence[int]) -> int:
    """The alignment's step budget (what Progress.max_steps adds for it): the orientation search's coarse runs
    (the default start and ``SEARCH_REFINED`` far ones), then the schedule."""
    stages = schedule(init, len(alignment_pyramid(shape)))
    return STEPS_PER_LEVEL * (len(stages) + (1 + SEARCH_REFINED if stages else 0))


def turn_degrees(R: np.ndarray) -> float:
    """The angle of a d x d rotation (2D or 3D)."""
    d = len(R)
    cos = (np.trace(R) - 1) / 2 if d == 3 else np.trace(R) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _sign_choices(d: int) -> np.ndarray:
    """Every vector of d signs (+1 / -1), one per row."""
    return np.array(np.meshgrid(*[[1, -1]] * d)).T.reshape(-1, d)


def _float32_margin(energy: float) -> float:
    """How much two energies summed in float32 may differ by rounding alone."""
    return 1e-5 + 1e-4 * abs(energy)


def axis_rotations(d: int) -> List[np.ndarray]:
    """The rotations taking the coordinate axes to themselves (signed permutations with determinant 1): 4 in
    2D, 24 in 3D. Every orientation is within 63 degrees of one of them in 3D (45 in 2D)."""
    out = []
    for perm in itertools.permutations(range(d)):
        for signs in _sign_choices(d):
            R = np.zeros((d, d))
            R[np.arange(d), list(perm)] = signs
            if np.linalg.det(R) > 0:
                out.append(R)
    return out


# --------------------------------------------------------------------------- similarities


def energy(name: str, fixed: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The alignment's similarity as an energy (lower is better): a weighted mean over voxels.

    Every measure comes from ``similarity``: LNCC and MSE are the deformable
    stage's own classes (their weighted sums, divided by the weight), global
    NCC and mutual information its global measures. Differentiable in ``warped``.
    """
    if name in ("lncc", "mse"):
        sim = _LOCAL[name]
        total, _ = sim.compare(fixed, warped, weight, derivative=False)
        return total.sum() / weight.sum().clamp_min(1e-8)
    if name == "ncc":
        return 1.0 - similarity.global_ncc(fixed, warped, weight)
    if name == "mi":
        return -similarity.mutual_information(fixed, warped, weight, MI_BINS)
    raise ValueError(f"unknown alignment similarity {name!r}")


_LOCAL = {"lncc": similarity.LNCC(window=LNCC_WINDOW), "mse": similarity.MSE()}


# --------------------------------------------------------------------------- parameterisations


def _skew_basis(d: int, dtype) -> torch.Tensor:
    """Generators of rotations in d dimensions, (d(d-1)/2, d, d)."""
    gens = []
    for i in range(d):
        for j in range(i + 1, d):
            g = torch.zeros(d, d, dtype=dtype)
            g[i, j], g[j, i] = -1.0, 1.0
            gens.append(g)
    return torch.stack(gens)


class _Kind:
    """A stage's small update S(theta) on the fixed side, as a (d+1)x(d+1) homogeneous matrix."""

    def __init__(self, kind: str, d: int, dtype=torch.float32):
        self.kind, self.d = kind, d
        self.gens = _skew_basis(d, dtype)
        self.n = (len(self.gens) if kind == "rigid" else d * d) + d

    def derivative(self) -> torch.Tensor:
        """dS/dtheta at theta = 0, (n, d, d+1): a generator per parameter."""
        d = self.d
        lin = list(self.gens) if self.kind == "rigid" else [
            torch.zeros(d, d).index_put_((torch.tensor(i), torch.tensor(j)), torch.tensor(1.0))
            for i in range(d) for j in range(d)]
        out = [torch.cat([g, torch.zeros(d, 1)], 1) for g in lin]
        for i in range(d):
            t = torch.zeros(d, d + 1)
            t[i, d] = 1.0
            out.append(t)
        return torch.stack(out)

    def matrix(self, theta: torch.Tensor) -> torch.Tensor:
        d = self.d
        if self.kind == "rigid":
            k = len(self.gens)
            lin = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", theta[:k], self.gens.to(theta)))
        else:
            k = d * d
            lin = torch.eye(d, dtype=theta.dtype, device=theta.device) + theta[:k].view(d, d)
        top = torch.cat([lin, theta[k:].view(d, 1)], 1)
        bottom = torch.zeros(1, d + 1, dtype=theta.dtype, device=theta.device)
        bottom[0, d] = 1
        return torch.cat([top, bottom], 0)


def _nearest_rotation(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a)
    r = u @ vh
    if torch.det(r) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
        r = u @ vh
    return r


# --------------------------------------------------------------------------- levels


@dataclass
class _Level:
    """One alignment level: where the similarity is evaluated and the metric points."""

    factor: int
    sampler: Sampler               # this level's fixed grid -> this level's moving grid
    moving: torch.Tensor           # (1, 1, *Sm) normalised moving, pooled on its own grid
    moving_mask: Optional[torch.Tensor]
    voxel_mm: float
    # global similarities: values at a fixed subset of the weighted voxels, (1, 1, N, 1[, 1]);
    # lncc: the whole level grid (1, 1, *S) (a local measure needs neighbourhoods)
    fixed: torch.Tensor
    weight: torch.Tensor
    at: Optional[torch.Tensor]     # (N, d) fixed-level voxel coordinates of that subset (None: the grid)
    points: torch.Tensor           # (N, d) local coordinates (mm) of the subset, for the metric
    grads: torch.Tensor            # (N, d) fixed image gradient there, local frame, per mm


def _pool_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    xp, _ = pad_to_multiple(x, factor)
    return downsample_image(xp, factor)


def _no_worse(energy: float, reference: float) -> bool:
    """``energy`` is not above ``reference`` beyond float32 rounding (energies are O(1): 1 - NCC, MSE of
    [0, 1] intensities, -MI), so an image aligned to itself keeps its transform without a warning."""
    return energy <= reference + 1e-6 * max(abs(reference), 1.0)


class Aligner:
    """Runs the alignment of one pair on one device (``run``)."""

    def __init__(self, fixed: Image, moving: Image, init: str = "affine", similarity: str = "lncc",
                 fixed_mask: Optional[np.ndarray] = None, moving_mask: Optional[np.ndarray] = None,
                 device=None, solver: str = "fixed-point", callback: Optional[Callback] = None):
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}")
        if similarity not in ALIGN_SIMILARITIES:
            raise ValueError(f"unknown alignment similarity {similarity!r}")
        self.fixed, self.moving, self.init, self.similarity = fixed, moving, init, similarity
        self.device = torch.device(device or "cpu")
        self.solver, self.callback = solver, callback
        self.d = fixed.ndim
        self.factors = alignment_pyramid(fixed.shape)
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.steps = 0
        self.stopped = False

    # --- frames: W = Q T P^-1, T acting on the first d local coordinates ---------------------------

    def _frames(self, c_fixed: np.ndarray, c_moving: np.ndarray):
        u, _, vh = np.linalg.svd(self.fixed.affine[:3, :3] if self.d == 3 else
                                 np.c_[self.fixed.affine[:3, :2], np.cross(*self.fixed.affine[:3, :2].T)])
        E = u @ vh  # the fixed grid's orientation, orthonormal; 2D: its plane first, then the normal
        if self.d == 2:
            n = E[:, 2:]
            c_moving = c_moving + (n @ n.T @ (c_fixed - c_moving))  # the moving centre, put in the fixed plane
        P = np.eye(4)
        P[:3, :3], P[:3, 3] = E, c_fixed
        Q = np.eye(4)
        Q[:3, :3], Q[:3, 3] = E, c_moving
        self.P_inv = torch.as_tensor(np.linalg.inv(P), dtype=torch.float32, device=self.device)
        self.Q = torch.as_tensor(Q, dtype=torch.float32, device=self.device)
        self.E = E

    def world(self, T: torch.Tensor) -> torch.Tensor:
        """The 4x4 world transform of a local (d+1)x(d+1) transform T."""
        d = self.d
        full = torch.eye(4, dtype=T.dtype, device=T.device)
        full = full.index_put((torch.arange(d).repeat_interleave(d), torch.arange(d).repeat(d)), T[:d, :d].flatten())
        full = full.index_put((torch.arange(d), torch.full((d,), 3)), T[:d, d])
        return self.Q.to(T.dtype) @ full @ self.P_inv.to(T.dtype)

    def local_of_world(self, W: np.ndarray) -> torch.Tensor:
        """The local T of a world transform that keeps the fixed plane (2D) - inverse of ``world``."""
        Q = self.Q.double().cpu().numpy()
        P_inv = self.P_inv.double().cpu().numpy()
        full = np.linalg.inv(Q) @ W @ np.linalg.inv(P_inv)
        d = self.d
        T = np.eye(d + 1)
        T[:d, :d], T[:d, d] = full[:d, :d], full[:d, 3]
        return torch.as_tensor(T, dtype=torch.float32, device=self.device)

    # --- data ----------------------------------------------------------------------------------------

    def _levels(self) -> List[_Level]:
        dev, d = self.device, self.d
        sp_f = float(np.mean(self.fixed.spacing))
        sp_m = float(np.mean(self.moving.spacing))
        levels = []
        gen = torch.Generator().manual_seed(0)
        for factor in self.factors:
            with torch.no_grad():
                fl = gaussian_smooth(_pool_to(self.fixed_n, factor), SMOOTH_VOXELS)
                weight = (torch.ones_like(fl) if self.fmask is None else
                          pooled(pad_to_multiple(self.fmask, factor)[0], factor))
                fm = max(1, int(round(factor * sp_f / sp_m)))
                ml = gaussian_smooth(_pool_to(self.moving_n, fm), SMOOTH_VOXELS)
                mml = None if self.mmask is None else _pool_to(self.mmask, fm)
                fa = pooled_affine(self.fixed.affine, factor, d)
                sampler = Sampler(fl.shape[2:], fa, pooled_affine(self.moving.affine, fm, d))
                # a fixed subset of the weighted voxels (deterministic: the operator is a function of the state)
                idx = torch.nonzero(weight[0, 0] > 0)
                if len(idx) > MAX_POINTS:
                    idx = idx[torch.randperm(len(idx), generator=gen)[:MAX_POINTS].sort().values]
                sel = tuple(idx.T)
                grads_vox = torch.stack(torch.gradient(fl[0, 0]), -1)[sel].double().cpu().numpy()
                ras = voxel_to_physical_points(idx.cpu().numpy().astype(np.float64), fa)
                local = (ras - self.c_fixed) @ self.E[:, :d]
                # d(intensity)/d(voxel) -> per mm along RAS: g_ras = pinv(A)^T g_vox
                g_local = grads_vox @ np.linalg.pinv(fa[:3, :d]) @ self.E[:, :d]
                if self.similarity == "lncc":
                    at, fixed_eval, weight_eval = None, fl, weight
                else:
                    shape = (1, 1, len(idx)) + (1,) * (d - 1)
                    at, fixed_eval, weight_eval = idx.float(), fl[0, 0][sel].view(shape), weight[0, 0][sel].view(shape)
            levels.append(_Level(factor, sampler, ml, mml, factor * sp_f, fixed_eval, weight_eval, at,
                                 torch.as_tensor(local, dtype=torch.float32, device=dev),
                                 torch.as_tensor(g_local, dtype=torch.float32, device=dev)))
        return levels

    def _centre(self, data: torch.Tensor, affine: np.ndarray, mask: Optional[torch.Tensor]) -> np.ndarray:
        w = data[0, 0] if mask is None else data[0, 0] * mask[0, 0]
        w = w.clamp_min(0).double().cpu().numpy()
        idx = np.argwhere(w > 0)
        if len(idx) == 0:
            idx = np.argwhere(np.ones_like(w, dtype=bool))
            ww = np.ones(len(idx))
        else:
            ww = w[tuple(idx.T)]
        ras = voxel_to_physical_points(idx.astype(np.float64), affine)
        return (ras * ww[:, None]).sum(0) / ww.sum(), ras, ww

    def _evaluate(self, level: _Level, W: torch.Tensor) -> torch.Tensor:
        coords = level.sampler.coords_through(W, level.at)
        warped = sample(level.moving, coords, padding_mode="zeros")
        with torch.no_grad():
            weight = level.weight
            if self.similarity != "mi":  # only where the moving image is
                weight = weight * inside(coords, level.moving.shape[2:]).to(weight.dtype)
            # mi: every fixed point, the moving image's outside as background (0), so the samples do not change
            # with the pose (the overlap is not a way to raise the measure)
            if level.moving_mask is not None:
                weight = weight * sample(level.moving_mask, coords, padding_mode="zeros")
        if float(weight.sum()) < 1:
            return torch.full((), float("inf"), device=W.device) + 0 * warped.sum()
        return energy(self.similarity, level.fixed, warped, weight)

    # --- one stage -----------------------------------------------------------------------------------

    def _metric(self, level: _Level, kind: _Kind) -> Tuple[torch.Tensor, torch.Tensor]:
        """(H, G): Gauss-Newton matrix of the fixed image under S, and the RMS-motion metric (mm^2)."""
        d = self.d
        dS = kind.derivative().to(self.device)                                     # (n, d, d+1) at theta = 0
        pts = level.points
        motion = torch.einsum("iaj,nj->nai", dS[:, :, :d], pts) + dS[:, :, d].T[None]   # (N, d, n)
        J = torch.einsum("na,nai->ni", level.grads, motion)
        N = max(len(pts), 1)
        H = J.T @ J / N
        G = torch.einsum("nai,naj->ij", motion, motion) / N
        return H, G

    def _stage(self, kind_name: str, T: torch.Tensor, levels: List[_Level]) -> torch.Tensor:
        d = self.d
        kind = _Kind(kind_name, d)
        plan = schedule(self.init, len(levels))
        for li, (_, index) in enumerate(plan):
            if plan[li][0] != kind_name:
                continue
            level = levels[index]
            H, G = self._metric(level, kind)
            H = H + 1e-6 * H.diagonal().mean().clamp_min(1e-12) * torch.eye(kind.n, device=H.device)
            radius = level.voxel_mm
            scale = float(level.points.norm(dim=1).pow(2).mean().sqrt().clamp_min(1.0))

            def to_state(Tm):
                return torch.cat([scale * Tm[:d, :d].flatten(), Tm[:d, d]])[None]

            def from_state(z):
                z = z[0]
                lin = z[: d * d].view(d, d) / scale
                if kind_name == "rigid":
                    lin = _nearest_rotation(lin)
                out = torch.eye(d + 1, dtype=z.dtype, device=z.device)
                out[:d, :d], out[:d, d] = lin, z[d * d:]
                return out

            def step(z, level=level, H=H, G=G, radius=radius):
                Tm = from_state(z)
                if not torch.isfinite(Tm).all():
                    return z
                theta = torch.zeros(kind.n, device=self.device, requires_grad=True)
                with torch.enable_grad():
                    e0 = self._evaluate(level, self.world(Tm @ kind.matrix(theta)))
                    if not torch.isfinite(e0):
                        return z
                    (g,) = torch.autograd.grad(e0, theta)
                delta = -torch.linalg.solve(H, g)
                motion = float(torch.sqrt((delta @ G @ delta).clamp_min(0)))
                slope = float(g @ delta)
                if not math.isfinite(motion) or motion < 1e-9 or not slope < 0:
                    return z
                a = radius / motion
                for _ in range(LINE_TRIALS):
                    # a quadratic through E(0), E'(0) and E(trial); a minimum far inside the trial
                    # interval is re-checked there (the energy is not quadratic over a whole voxel)
                    with torch.no_grad():
                        e1 = float(self._evaluate(level, self.world(Tm @ kind.matrix(a * delta))))
                    curv = 2 * (e1 - float(e0) - slope * a) / a ** 2
                    best = a if not (curv > 0 and math.isfinite(curv)) else min(a, -slope / curv)
                    if best > a / 3:
                        break
                    a = best
                return to_state(Tm @ kind.matrix(best * delta))

            def on_step(_, residual, z, li=li):
                self.steps += 1
                if self.callback is None:
                    return False
                W = self.world(from_state(z)).detach().double().cpu().numpy()
                return bool(self.callback(kind_name, li, len(plan), residual, W))

            z0 = to_state(T)
            tol = TOL_VOXELS * radius / float(z0.norm())  # the solvers' relative residual, as a fraction of a voxel
            with torch.no_grad():
                res = solve(step, z0, self.solver, max_steps=STEPS_PER_LEVEL, tol=tol, callback=on_step)
            T = from_state(res.z)
            if res.stopped:
                self.stopped = True
                break
        return T

    # --- the whole stage ----------------------------------------------------------------------------

    def run(self) -> Alignment:
        t0 = time.perf_counter()
        out = Alignment(init=self.init, matrix=np.eye(4), similarity=self.similarity, levels=list(self.factors))
        if self.init == "none":
            return out
        dev, d = self.device, self.d
        # centres of mass on the coarsest level (masked), then the frames
        with torch.no_grad():
            self.fixed_n = normalize_intensity(to_tensor(self.fixed.data.astype(np.float32, copy=False), dev))
            self.moving_n = normalize_intensity(to_tensor(self.moving.data.astype(np.float32, copy=False), dev))
            self.fmask = None if self.fixed_mask is None else to_tensor(self.fixed_mask.astype(np.float32), dev)
            self.mmask = None if self.moving_mask is None else to_tensor(self.moving_mask.astype(np.float32), dev)
            f0 = self.factors[0]
            fm0 = max(1, int(round(f0 * np.mean(self.fixed.spacing) / np.mean(self.moving.spacing))))
            fmask = None if self.fmask is None else _pool_to(self.fmask, f0)
            mmask = None if self.mmask is None else _pool_to(self.mmask, fm0)
            c_f, pts_f, w_f = self._centre(_pool_to(self.fixed_n, f0), pooled_affine(self.fixed.affine, f0, d), fmask)
            c_m, pts_m, w_m = self._centre(_pool_to(self.moving_n, fm0), pooled_affine(self.moving.affine, fm0, d),
                                           mmask)
        self.c_fixed = c_f
        self._frames(c_f, c_m)
        levels = self._levels()
        coarse, fine = levels[0], levels[-1]

        def score(level, T):
            with torch.no_grad():
                return float(self._evaluate(level, self.world(T)))

        ident = self.local_of_world(np.eye(4))
        centre = torch.eye(d + 1, device=dev)
        candidates = {"identity": ident, "center": centre}
        far = []  # the orientation search's candidates: rotations about the centres
        if self.init in ("rigid", "affine"):
            turns = self._principal_axes(pts_f, w_f, pts_m, w_m)
            if turns and turn_degrees(turns[0]) <= MAX_PRINCIPAL_AXES_DEGREES:
                candidates["principal axes"] = self._rotation(turns[0])
                turns = turns[1:]
            far = [(f"principal axes {i + 1}", R) for i, R in enumerate(turns)]
            far += [(f"axes {i}", R) for i, R in enumerate(axis_rotations(d)) if turn_degrees(R) > 0]
        if self.init == "center":
            start_name = "center"
        else:
            scores = {k: score(coarse, T) for k, T in candidates.items()}
            # the identity unless a candidate is better beyond rounding (identical centres give equal scores)
            margin = _float32_margin(scores["identity"])
            start_name = min(scores, key=lambda k: scores[k] + (0 if k == "identity" else margin))
        T = candidates[start_name]
        search = []
        if far:
            T, start_name, search = self._search(levels, start_name, T, far, score)
        out.start = start_name
        e_ident = score(fine, ident)
        e_start = score(fine, T)
        stages = {"center": [], "rigid": ["rigid"], "affine": ["rigid", "affine"]}[self.init]
        if self.stopped:  # cancelled during the search: the start reached
            stages = []
        messages, diverged = [], False
        for si, kind in enumerate(stages):
            before = score(fine, T)
            steps_before = self.steps
            T_new = self._stage(kind, T, levels)
            after = score(fine, T_new) if torch.isfinite(T_new).all() else float("nan")
            problem = self._diverged(T_new, after)
            worse = problem is None and not _no_worse(after, before)
            out.stages.append(dict(name=kind, steps=self.steps - steps_before, energy_before=before,
                                   energy_after=after if math.isfinite(after) else None,
                                   kept=problem is None and not worse))
            if problem is not None:  # a diverged stage: nothing of the alignment is trusted
                messages.append(f"the {kind} alignment stage diverged ({problem}); kept the identity")
                diverged = True
                break
            if worse:
                messages.append(f"the {kind} alignment stage made the similarity worse ({after:.4g} vs "
                                f"{before:.4g}); kept the transform before it")
            else:
                T = T_new
            if self.stopped:
                break
        final = score(fine, T)
        W = self.world(T.double()).detach().cpu().numpy()
        if diverged or not np.all(np.isfinite(W)):
            W = np.eye(4)
        elif not (_no_worse(final, e_ident) or self.init == "center" and math.isfinite(final)):
            messages.append(f"the alignment did not improve the similarity ({self.similarity} energy "
                            f"{final:.4g} vs {e_ident:.4g} at the identity); kept the identity")
            W = np.eye(4)
        out.message = "; ".join(messages)
        out.matrix = W
        out.steps, out.seconds, out.stopped = self.steps, time.perf_counter() - t0, self.stopped
        out.stages.insert(0, dict(name="start", candidate=start_name, energy_identity=e_ident, energy_start=e_start,
                                  search=search))
        return out

    def intensity_relation(self, W: np.ndarray) -> Optional[Tuple[float, float]]:
        """(r^2, eta^2) of the two images through the world transform W (``contrast.linear_share``: how much of
        the relation a linear map explains, how much the best curve does), at full resolution on the contrast
        check's lattice of fixed voxels (smoothing would blur another contrast into a near-linear relation);
        None when too few voxels show anything. Call after ``run``."""
        with torch.no_grad():
            stride = contrast.lattice_stride(self.fixed.shape)  # the lattice ``contrast.subsample`` keeps
            axes = [torch.arange(0, n, stride, device=self.device) for n in self.fixed.shape]
            idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, self.d).float()
            sampler = Sampler(self.fixed.shape, self.fixed.affine, self.moving.affine)
            coords = sampler.coords_through(torch.as_tensor(W, dtype=torch.float32, device=self.device), idx)
            warped = sample(self.moving_n, coords, padding_mode="zeros").flatten()
            weight = inside(coords, self.moving_n.shape[2:]).flatten().float()
            if self.fmask is not None:
                weight = weight * contrast.subsample(self.fmask).flatten()
            if self.mmask is not None:
                weight = weight * sample(self.mmask, coords, padding_mode="zeros").flatten()
            return contrast.linear_share(contrast.subsample(self.fixed_n).flatten(), warped, weight)

    def _rotation(self, R: np.ndarray) -> torch.Tensor:
        """The local transform turning by R about the centres (the ``center`` start turned)."""
        T = np.eye(self.d + 1)
        T[: self.d, : self.d] = R
        return torch.as_tensor(T, dtype=torch.float32, device=self.device)

    def _search(self, levels, name: str, T: torch.Tensor, far, score):
        """The orientation search: the default start and the ``SEARCH_REFINED`` far orientations best on the
        coarsest level (farther than ``SEARCH_MIN_DEGREES`` from the start), each refined by the rigid stage on
        that level; the start that ends lowest wins (the default on ties), and the pipeline runs from it.

        A local descent only finds the pose within some tens of degrees of where it starts (a scan turned by
        90 degrees about an oblique axis fell into a flipped pose); trying the far ones after a short descent,
        not by their raw energy, keeps a near-symmetric object from swapping axes. Returns (start, its name,
        the record for ``Alignment.stages``)."""
        coarse = levels[0]
        R0 = T[: self.d, : self.d].double().cpu().numpy()
        far = [(n, self._rotation(R)) for n, R in far if turn_degrees(R @ R0.T) > SEARCH_MIN_DEGREES]
        raw = {n: score(coarse, Tc) for n, Tc in far}
        tried = [(name, T)] + sorted(far, key=lambda c: raw[c[0]])[:SEARCH_REFINED]
        record, best = [], None
        for n, Tc in tried:
            Tr = self._stage("rigid", Tc, levels[:1])
            e = score(coarse, Tr) if torch.isfinite(Tr).all() else float("inf")
            e = e if math.isfinite(e) else float("inf")
            record.append(dict(candidate=n, energy=raw[n] if n in raw else score(coarse, Tc), refined=e))
            if self.stopped:  # cancelled: the pose the callback showed last is the alignment reached
                return Tr, n, record
            if best is None or e < best[2] - _float32_margin(best[2]):  # the default wins ties
                best = (n, Tc, e)
        return best[1], best[0], record

    def _diverged(self, T: torch.Tensor, energy_after: float) -> Optional[str]:
        """Why a stage's result cannot be a linear alignment (non-finite, folding, extreme scaling), or None."""
        d = self.d
        if not torch.isfinite(T).all() or not math.isfinite(energy_after):
            return "non-finite result"
        s = torch.linalg.svdvals(T[:d, :d].double())
        if torch.det(T[:d, :d].double()) <= 0:
            return "the linear part folds space"
        if s.max() > MAX_SCALE or s.min() < 1 / MAX_SCALE:
            return f"it scales by {s.min():.3g}..{s.max():.3g}"
        return None

    def _principal_axes(self, pts_f, w_f, pts_m, w_m) -> List[np.ndarray]:
        """The rotations taking the fixed principal axes to the moving ones, one per sign choice, the one nearest
        the identity first; none when two axes are near-degenerate."""
        d = self.d
        E = self.E[:, :d]

        def axes(pts, w, c):
            x = (pts - c) @ E
            cov = (x * w[:, None]).T @ x / w.sum()
            vals, vecs = np.linalg.eigh(cov)
            return vals, vecs

        cm = self.Q[:3, 3].double().cpu().numpy()
        vf, uf = axes(pts_f, w_f, self.c_fixed)
        vm, um = axes(pts_m, w_m, cm)
        gaps = np.diff(vf) / vf[1:].clip(1e-12)
        if np.any(gaps < 0.05):
            return []  # near-degenerate axes: no reliable rotation
        turns = [um @ np.diag(signs) @ uf.T for signs in _sign_choices(d)]
        # axes are known up to order and sign: a large turn is more likely two axes swapped (a near-symmetric
        # object) than how the patient lay, so only one within MAX_PRINCIPAL_AXES_DEGREES is a default start
        return sorted([R for R in turns if np.linalg.det(R) > 0], key=turn_degrees)


def align(fixed: Image, moving: Image, init: str = "affine", similarity: str = "lncc",
          fixed_mask: Optional[np.ndarray] = None, moving_mask: Optional[np.ndarray] = None, device=None,
          callback: Optional[Callback] = None, solver: str = "fixed-point") -> Alignment:
    """The linear alignment of ``moving`` to ``fixed`` (see the module's docstring)."""
    return Aligner(fixed, moving, init, similarity, fixed_mask, moving_mask, device, solver, callback).run()
