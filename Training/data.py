"""Training pair sources: synthetic (SynthMorph-style), a NIfTI folder, a Learn2Reg dataset JSON.

Every source answers ``sample(gen)`` with a dict of full-resolution numpy
arrays on the fixed grid (``fixed``, ``moving``, optional ``fixed_labels``,
``moving_labels``, keypoints ...) so one preprocessing step
(``to_working_grid``) serves them all and matches what ``register()`` does at
inference: percentile normalisation to [0, 1], replicate padding, average
pooling by the model's ``factor``. All randomness comes from one
``torch.Generator``, whose state a checkpoint stores for exact resume.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from DEQRegistrationLib.io import load_image, load_labels
from DEQRegistrationLib.operators import gaussian_smooth
from DEQRegistrationLib.preprocess import normalize_intensity, pad_to_multiple
from DEQRegistrationLib.sampling import Sampler
from DEQRegistrationLib.transforms import downsample_image, warp


def _randint(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=gen))


def _uniform(gen: torch.Generator, lo: float, hi: float, *shape) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*(shape or (1,)), generator=gen)


# --------------------------------------------------------------------------- synthetic


class SyntheticPairs:
    """Random smooth label maps rendered with random intensities, warped by a random smooth field.

    The SynthMorph idea: a network that only ever sees arbitrary shapes and
    contrasts cannot overfit to anatomy or scanner, and needs no data. The
    label map is the argmax of smooth noise channels; the moving map is the
    argmax of the same noise *warped* by a smooth random field (so shapes
    deform smoothly, with no nearest-neighbour stair steps). Both images get
    the same label-to-intensity table (the training loss is LNCC, a
    mono-modal similarity), independent noise, blur and bias.

    ``prefactored``: the images are generated directly on the model's working
    grid (``to_working_grid`` then skips pooling), cheap in 3D.
    """

    prefactored = True

    def __init__(self, shape: Sequence[int], n_labels: int = 16, label_scale: int = 8,
                 max_disp: float = 4.0, field_scale: int = 16):
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.n_labels, self.label_scale = n_labels, label_scale
        self.max_disp, self.field_scale = max_disp, field_scale

    def _smooth_noise(self, gen, channels: int, scale: int) -> torch.Tensor:
        coarse = [max(2, math.ceil(s / scale)) for s in self.shape]
        noise = torch.randn(1, channels, *coarse, generator=gen)
        mode = "trilinear" if self.ndim == 3 else "bilinear"
        return F.interpolate(noise, size=self.shape, mode=mode, align_corners=True)

    def sample(self, gen: torch.Generator) -> Dict[str, np.ndarray]:
        noise = self._smooth_noise(gen, self.n_labels, self.label_scale)
        field = self._smooth_noise(gen, self.ndim, self.field_scale)
        field = field / field.abs().amax().clamp_min(1e-6) * float(_uniform(gen, 0.3, 1.0)) * self.max_disp
        fixed_lab = noise.argmax(1)
        moving_lab = warp(noise, field).argmax(1)
        table = torch.rand(self.n_labels, generator=gen)
        images = []
        for lab in (fixed_lab, moving_lab):
            img = table[lab].unsqueeze(1)
            img = img + float(_uniform(gen, 0.0, 0.08)) * torch.randn(img.shape, generator=gen)
            img = gaussian_smooth(img, float(_uniform(gen, 0.3, 1.2)))
            bias = self._smooth_noise(gen, 1, 32) * float(_uniform(gen, 0.0, 0.2))
            images.append((img * bias.exp())[0, 0].numpy())
        return dict(fixed=images[0], moving=images[1], fixed_labels=fixed_lab[0].numpy().astype(np.int32),
                    moving_labels=moving_lab[0].numpy().astype(np.int32), spacing=np.ones(self.ndim))


# --------------------------------------------------------------------------- files


def _load(entry: Dict[str, Optional[str]]) -> Dict[str, object]:
    """Read one volume's files; labels and masks must be on the image's grid."""
    img = load_image(entry["image"])
    out = {"image": img}
    if entry.get("label"):
        out["label"] = load_labels(entry["label"], like=img).data
    if entry.get("mask"):
        out["mask"] = load_labels(entry["mask"], like=img, what="mask").data
    if entry.get("keypoints"):
        out["keypoints"] = np.loadtxt(entry["keypoints"], delimiter=",", ndmin=2)
    return out


def load_pair(fixed_entry: dict, moving_entry: dict) -> Dict[str, np.ndarray]:
    """A pair as arrays on the fixed grid (moving resampled through both affines when they differ)."""
    f, m = _load(fixed_entry), _load(moving_entry)
    fi, mi = f["image"], m["image"]
    same = fi.shape == mi.shape and np.allclose(fi.affine, mi.affine, atol=1e-4)
    sampler = Sampler.between(fi, mi)
    moving = mi.data if same else sampler.image(mi.data)
    out = dict(fixed=fi.data, moving=moving, fixed_affine=fi.affine, moving_affine=mi.affine,
               spacing=np.sqrt((fi.affine[:3, :fi.ndim] ** 2).sum(0)))
    if "label" in f and "label" in m:
        out["fixed_labels"] = f["label"]
        out["moving_labels"] = m["label"] if same else sampler.labels(m["label"])
    if "mask" in f:
        out["fixed_mask"] = f["mask"]
    if "keypoints" in f and "keypoints" in m:
        out["fixed_keypoints"], out["moving_keypoints"] = f["keypoints"], m["keypoints"]
    return out


def subject_tokens(path) -> List[str]:
    """The dash/underscore/dot-delimited tokens of a file name ("OASIS-TRT-20-7_slice118" -> ..., "7", ...)."""
    return re.split(r"[-_.]", os.path.basename(str(path)))


def folder_entries(folder, patterns: Sequence[str] = ("*.nii.gz", "*.nii"), label_sub: Optional[Sequence[str]] = None,
                   subjects: Optional[Sequence[str]] = None,
                   exclude: Sequence[str] = ("label", "seg", "mask")) -> List[Dict[str, Optional[str]]]:
    """``{"image", "label"}`` entries for the images of a folder.

    Files whose name contains label/seg/mask are not images. ``label_sub`` =
    (pattern, replacement) turns an image file name into its label file name
    (a regular-expression substitution; label None when that file is absent).
    ``subjects``: keep files whose name has one of these strings as a whole
    dash/underscore-delimited token ("7" keeps "OASIS-TRT-20-7_slice118", not
    "...-17_...").
    """
    files = sorted({p for pat in patterns for p in glob.glob(os.path.join(str(folder), pat))})
    files = [p for p in files if not any(x in os.path.basename(p).lower() for x in exclude)]
    if subjects:
        wanted = {str(s) for s in subjects}
        files = [p for p in files if wanted & set(subject_tokens(p))]
    out = []
    for f in files:
        lab = None
        if label_sub:
            cand = os.path.join(os.path.dirname(f), re.sub(label_sub[0], label_sub[1], os.path.basename(f)))
            lab = cand if os.path.isfile(cand) and cand != f else None
        out.append({"image": f, "label": lab})
    return out


class FolderPairs:
    """Random ordered pairs of the NIfTI images in a folder, with their label maps when ``label_sub`` finds them.

    ``subjects`` restricts the images (see ``folder_entries``): the training
    subjects, never the evaluation ones. Files are read once and kept.
    """

    prefactored = False

    def __init__(self, folder, patterns: Sequence[str] = ("*.nii.gz", "*.nii"),
                 exclude: Sequence[str] = ("label", "seg", "mask"), label_sub: Optional[Sequence[str]] = None,
                 subjects: Optional[Sequence[str]] = None):
        self.entries = folder_entries(folder, patterns, label_sub, subjects, exclude)
        self.files = [e["image"] for e in self.entries]
        if len(self.files) < 2:
            raise ValueError(f"need at least 2 images in {folder} matching {list(patterns)}"
                             f"{' for subjects ' + str(list(subjects)) if subjects else ''}, found {len(self.files)}")
        self._cache: Dict[tuple, dict] = {}

    def pair(self, i: int, j: int) -> Dict[str, np.ndarray]:
        key = (i, j)
        if key not in self._cache:
            self._cache[key] = load_pair(self.entries[i], self.entries[j])
        return dict(self._cache[key])

    def sample(self, gen: torch.Generator) -> Dict[str, np.ndarray]:
        i = _randint(gen, len(self.files))
        j = _randint(gen, len(self.files) - 1)
        j = j + 1 if j >= i else j
        return self.pair(i, j)


def elastic_field(gen: torch.Generator, shape: Sequence[int], spacing: Sequence[float], spacing_mm: float,
                  max_mm: float, squarings: int = 6) -> torch.Tensor:
    """A random smooth, invertible displacement (1, ndim, *shape) in voxel units of ``shape``.

    Gaussian noise on a control grid ``spacing_mm`` apart (at least 2 points
    per axis), upsampled linearly to the grid and smoothed (Gaussian, sigma a
    quarter of the spacing, which removes the linear kinks), is a velocity
    field; it is scaled so its largest displacement is U(0.3, 1) x ``max_mm``
    (per-axis voxel size ``spacing`` mm) and integrated by scaling and
    squaring (``squarings`` compositions with ``transforms.warp``), so the
    result is a diffeomorphism up to interpolation (its largest displacement
    stays close to the velocity's). Draws: the noise, then the amplitude.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    spacing = [float(v) for v in spacing]
    coarse = [max(2, int(math.ceil(n * sp / spacing_mm)) + 1) for n, sp in zip(shape, spacing)]
    noise = torch.randn(1, ndim, *coarse, generator=gen, dtype=torch.float32)
    mode = "trilinear" if ndim == 3 else "bilinear"
    v = F.interpolate(noise, size=shape, mode=mode, align_corners=True)
    v = gaussian_smooth(v, 0.25 * spacing_mm / min(spacing))
    mm = v * torch.tensor(spacing, dtype=v.dtype).view(1, ndim, *([1] * ndim))
    peak = mm.pow(2).sum(1).sqrt().amax().clamp_min(1e-6)
    amp = float(_uniform(gen, 0.3, 1.0)) * max_mm
    v = v * (amp / peak) / (2 ** squarings)
    for _ in range(squarings):
        v = v + warp(v, v)
    return v


class Augment:
    """Random augmentation of a source's pairs (full-resolution arrays, before the working grid).

    * ``flip``: each axis in ``flip_axes`` flipped with probability 1/2, the
      same flips for both images and their label maps (left-right symmetry:
      anatomy stays anatomy, the pair's correspondence is kept).
    * ``rotate`` degrees / ``scale``: a small random rotation (2D: in plane;
      3D: about each axis) and isotropic scaling about the centre, drawn
      *independently* for fixed and moving (more varied misalignments);
      images linear, label maps nearest.
    * ``elastic`` = (spacing_mm, max_mm): a random smooth deformation per
      image, drawn *independently* for fixed and moving (each image becomes a
      new plausible "subject"; see ``elastic_field``): Gaussian noise on a
      control grid of that spacing, upsampled and smoothed, scaled so its
      largest displacement is U(0.3, 1) x max_mm, integrated by scaling and
      squaring (a stationary velocity field: no folds). It is composed with
      the rotation/scaling into one resampling (image linear, labels nearest,
      the same coordinates for both).
    * ``gamma``: intensities mapped to [0, 1] (percentiles, as register()
      does) and raised to exp(N(0, gamma)), independently per image.
    All draws come from the training generator, so resume stays exact; with
    ``elastic`` off no draw is added (earlier runs reproduce unchanged).
    """

    def __init__(self, source, flip_axes: Sequence[int] = (0,), rotate: float = 0.0, scale: float = 0.0,
                 gamma: float = 0.0, elastic: Optional[Sequence[float]] = None):
        self.source, self.flip_axes = source, tuple(flip_axes)
        self.rotate, self.scale, self.gamma = rotate, scale, gamma
        self.elastic = tuple(float(v) for v in elastic) if elastic else None
        if self.elastic and (len(self.elastic) != 2 or min(self.elastic) <= 0):
            raise ValueError("elastic needs two positive numbers: control-point spacing (mm) and max displacement (mm)")
        self.prefactored = getattr(source, "prefactored", False)

    def _matrix(self, gen, ndim: int) -> torch.Tensor:
        angles = [float(_uniform(gen, -self.rotate, self.rotate)) * math.pi / 180 for _ in range(1 if ndim == 2 else 3)]
        R = torch.eye(ndim, dtype=torch.float64)
        planes = [(0, 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)]
        for a, (p, q) in zip(angles, planes):
            G = torch.eye(ndim, dtype=torch.float64)
            G[p, p] = G[q, q] = math.cos(a)
            G[p, q], G[q, p] = -math.sin(a), math.sin(a)
            R = G @ R
        return R * math.exp(float(_uniform(gen, -self.scale, self.scale)))

    @staticmethod
    def _sampler(shape, M: torch.Tensor) -> Sampler:
        """The one sampler, with M about the grid's centre as its world transform (voxel = world here)."""
        ndim = len(shape)
        c = np.array([(n - 1) / 2 for n in shape])
        W = np.eye(4)
        W[:ndim, :ndim] = M.numpy()
        W[:ndim, 3] = c - M.numpy() @ c
        return Sampler(shape, np.eye(4), np.eye(4), world=W)

    def sample(self, gen: torch.Generator) -> Dict[str, np.ndarray]:
        s = self.source.sample(gen)
        ndim = np.ndim(s["fixed"])
        flips = [ax for ax in self.flip_axes if float(torch.rand(1, generator=gen)) < 0.5]
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            if key in s and flips:
                s[key] = np.ascontiguousarray(np.flip(s[key], axis=tuple(flips)))
        spacing = np.asarray(s.get("spacing", np.ones(ndim)), dtype=np.float64).reshape(-1)[:ndim]
        for which in ("fixed", "moving"):
            if self.rotate or self.scale or self.elastic:
                shape = np.shape(s[which])
                M = self._matrix(gen, ndim) if (self.rotate or self.scale) else torch.eye(ndim, dtype=torch.float64)
                sampler = self._sampler(shape, M)
                disp = None
                if self.elastic:
                    disp = elastic_field(gen, shape, spacing, *self.elastic)[0].numpy()
                s[which] = sampler.image(np.asarray(s[which], dtype=np.float32), disp)
                if f"{which}_labels" in s:
                    s[f"{which}_labels"] = sampler.labels(np.asarray(s[f"{which}_labels"]), disp)
            if self.gamma:
                x = normalize_intensity(torch.as_tensor(np.asarray(s[which], dtype=np.float32)))
                g = math.exp(float(torch.randn(1, generator=gen)) * self.gamma)
                s[which] = (x ** g).numpy()
        return s


def learn2reg_subject(path: str) -> str:
    """The subject of a Learn2Reg file, ``{TASK}_{subject}_{timepoint}.nii.gz`` -> subject
    (OASIS: one volume per subject; NLST: a case's two time points share it)."""
    parts = Path(path).name.split(".")[0].split("_")
    return parts[-2] if len(parts) >= 3 else parts[-1]


class Learn2RegDataset:
    """The Learn2Reg ``{name}_dataset.json`` layout (OASIS, NLST, ...), split by subject.

    Paths in the JSON are relative to the JSON's folder ("./imagesTr/...").
    ``training`` lists volumes with optional ``label``/``mask``/``keypoints``
    files; ``registration_val`` lists (fixed, moving) pairs. The JSON's
    ``training`` list includes the ``registration_val`` subjects, so taking
    it as is would train on the evaluation pairs. The splits follow the
    paper's idea, train / val / test with no subject in two of them:

    * ``test``: the ``registration_val`` pairs (their subjects are the test subjects);
    * ``val``: the last ``n_val`` of the remaining subjects (sorted by id;
      default 10 %, at least 1), for model selection;
    * ``train``: every other subject.

    Within train and val, pairs are ``training_paired_images`` restricted to
    the split's subjects for paired tasks (NLST), else every ordered pair of
    distinct volumes of the split (OASIS). Keypoint CSVs hold one voxel
    coordinate per row.
    """

    prefactored = False
    SPLITS = ("train", "val", "test")

    def __init__(self, json_path, split: str = "train", n_val: Optional[int] = None):
        split = {"training": "train", "registration_val": "test"}.get(split, split)
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {self.SPLITS}")
        self.json_path = Path(json_path)
        self.root = self.json_path.parent
        with open(self.json_path) as fh:
            self.meta = json.load(fh)
        self.entries = {self._abs(e["image"]): {k: self._abs(v) for k, v in e.items() if isinstance(v, str)}
                        for e in self.meta.get("training", [])}
        test_pairs = [(self._abs(p["fixed"]), self._abs(p["moving"])) for p in self.meta.get("registration_val", [])]
        test = {learn2reg_subject(x) for pair in test_pairs for x in pair}
        rest = sorted({learn2reg_subject(p) for p in self.entries} - test)
        n_val = max(1, round(0.1 * len(rest))) if n_val is None else int(n_val)
        if split != "test" and n_val >= len(rest):
            raise ValueError(f"{json_path}: {len(rest)} non-test subjects cannot give {n_val} validation subjects "
                             "and a training set")
        val = set(rest[len(rest) - n_val:]) if n_val else set()
        self.subjects = {"train": set(rest) - val, "val": val, "test": test}
        self.split = split
        if split == "test":
            self.pairs = test_pairs
        else:
            mine = self.subjects[split]
            paired = self.meta.get("training_paired_images")
            if paired:
                pairs = [(self._abs(p["fixed"]), self._abs(p["moving"])) for p in paired]
                self.pairs = [(f, m) for f, m in pairs if learn2reg_subject(f) in mine and learn2reg_subject(m) in mine]
            else:
                imgs = [p for p in self.entries if learn2reg_subject(p) in mine]
                self.pairs = [(a, b) for a in imgs for b in imgs if a != b]
        if not self.pairs:
            raise ValueError(f"{json_path}: no pairs in split {split!r}")

    def _abs(self, rel: str) -> str:
        return str((self.root / rel).resolve())

    def entry(self, image_path: str) -> dict:
        return self.entries.get(image_path, {"image": image_path})

    def pair(self, index: int) -> Dict[str, np.ndarray]:
        f, m = self.pairs[index]
        return load_pair(self.entry(f), self.entry(m))

    def sample(self, gen: torch.Generator) -> Dict[str, np.ndarray]:
        return self.pair(_randint(gen, len(self.pairs)))


class MixedSource:
    """Draw from ``a`` with probability ``p``, else from ``b`` (synthetic + real)."""

    def __init__(self, a, b, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def sample(self, gen):
        src = self.a if float(torch.rand(1, generator=gen)) < self.p else self.b
        out = src.sample(gen)
        out["prefactored"] = src.prefactored
        return out


def _pad_and_pool(x: torch.Tensor, sample: dict, factor: int, multiple: int, prefactored: bool) -> torch.Tensor:
    """Pad to the pyramid's multiple and pool by the model's factor, unless the
    source already generated the pair on the working grid (``prefactored``)."""
    f = 1 if sample.get("prefactored", prefactored) else factor
    x, _ = pad_to_multiple(x, f * multiple)
    return downsample_image(x, f)


def to_working_grid(sample: dict, factor: int, multiple: int, prefactored: bool = False):
    """(fixed, moving) tensors (1, 1, *S) as register() sees them: normalised, padded, pooled."""
    out = []
    for key in ("fixed", "moving"):
        x = torch.as_tensor(np.ascontiguousarray(sample[key]), dtype=torch.float32)[None, None]
        out.append(_pad_and_pool(normalize_intensity(x), sample, factor, multiple, prefactored))
    return out


def labels_to_working_grid(sample: dict, factor: int, multiple: int, prefactored: bool = False):
    """(fixed, moving) one-hot label maps (1, L, *S) on the same grid as ``to_working_grid``.

    L covers the labels of both maps (0 included); pooling averages the
    one-hot channels, so coarse grids get soft, partial-volume labels.
    """
    fl, ml = (np.asarray(sample[k]).astype(np.int64) for k in ("fixed_labels", "moving_labels"))
    ids = np.union1d(np.unique(fl), np.unique(ml))
    out = []
    for lab in (fl, ml):
        idx = torch.as_tensor(np.searchsorted(ids, lab))
        onehot = F.one_hot(idx, len(ids)).movedim(-1, 0)[None].float()
        out.append(_pad_and_pool(onehot, sample, factor, multiple, prefactored))
    return out


def build_source(kind: str, *, ndim: int = 2, shape: Sequence[int] = (64, 64), folder: Optional[str] = None,
                 patterns: Sequence[str] = ("*.nii.gz", "*.nii"), json_path: Optional[str] = None,
                 mix: float = 0.5, max_disp: float = 4.0, label_sub: Optional[Sequence[str]] = None,
                 subjects: Optional[Sequence[str]] = None, split: str = "train", n_val: Optional[int] = None,
                 augment: Optional[dict] = None):
    """``kind``: synthetic | folder | learn2reg | synthetic+folder | synthetic+learn2reg.

    ``subjects`` restricts the folder's images; ``split`` and ``n_val`` pick
    the Learn2Reg split (training uses "train": never a validation or test
    subject); ``augment`` (``Augment`` keywords) wraps the real-image source.
    """
    parts: List[object] = []
    for k in kind.split("+"):
        if k == "synthetic":
            if len(shape) != ndim:
                raise ValueError(f"--shape needs {ndim} sizes")
            parts.append(SyntheticPairs(shape, max_disp=max_disp))
            continue
        if k == "folder":
            src = FolderPairs(folder, patterns, label_sub=label_sub, subjects=subjects)
        elif k == "learn2reg":
            src = Learn2RegDataset(json_path, split=split, n_val=n_val)
        else:
            raise ValueError(f"unknown data kind {k!r}")
        parts.append(Augment(src, **augment) if augment else src)
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return MixedSource(parts[0], parts[1], mix)
    raise ValueError("at most two sources can be mixed")
