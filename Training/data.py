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


class FolderPairs:
    """Random ordered pairs of NIfTI images in a folder (unsupervised; label maps excluded by name)."""

    prefactored = False

    def __init__(self, folder, patterns: Sequence[str] = ("*.nii.gz", "*.nii"),
                 exclude: Sequence[str] = ("label", "seg", "mask")):
        files = sorted({p for pat in patterns for p in glob.glob(os.path.join(folder, pat))})
        self.files = [p for p in files if not any(x in os.path.basename(p).lower() for x in exclude)]
        if len(self.files) < 2:
            raise ValueError(f"need at least 2 images in {folder} matching {list(patterns)}, found {len(self.files)}")
        self._cache: Dict[str, dict] = {}

    def sample(self, gen: torch.Generator) -> Dict[str, np.ndarray]:
        i = _randint(gen, len(self.files))
        j = _randint(gen, len(self.files) - 1)
        j = j + 1 if j >= i else j
        return load_pair({"image": self.files[i]}, {"image": self.files[j]})


class Learn2RegDataset:
    """The Learn2Reg ``{name}_dataset.json`` layout (OASIS, NLST, ...).

    Paths in the JSON are relative to the JSON's folder ("./imagesTr/...").
    ``training`` lists volumes with optional ``label``/``mask``/``keypoints``
    files; training pairs are ``training_paired_images`` when the task is
    paired (NLST), otherwise every ordered pair of distinct training volumes
    (OASIS). ``registration_val`` lists the validation pairs (fixed, moving).
    Keypoint CSVs hold one voxel coordinate per row.
    """

    prefactored = False

    def __init__(self, json_path, split: str = "training"):
        self.json_path = Path(json_path)
        self.root = self.json_path.parent
        with open(self.json_path) as fh:
            self.meta = json.load(fh)
        self.entries = {self._norm(e["image"]): {k: self._abs(v) for k, v in e.items() if isinstance(v, str)}
                        for e in self.meta.get("training", [])}
        if split == "training":
            paired = self.meta.get("training_paired_images")
            if paired:
                self.pairs = [(self._abs(p["fixed"]), self._abs(p["moving"])) for p in paired]
            else:
                imgs = [e["image"] for e in self.entries.values()]
                self.pairs = [(a, b) for a in imgs for b in imgs if a != b]
        elif split in ("registration_val", "val"):
            self.pairs = [(self._abs(p["fixed"]), self._abs(p["moving"])) for p in self.meta["registration_val"]]
        else:
            raise ValueError(f"unknown split {split!r}")
        if not self.pairs:
            raise ValueError(f"{json_path}: no pairs in split {split!r}")

    def _abs(self, rel: str) -> str:
        return str((self.root / rel).resolve())

    def _norm(self, rel: str) -> str:
        return self._abs(rel)

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
                 mix: float = 0.5, max_disp: float = 4.0):
    """``kind``: synthetic | folder | learn2reg | synthetic+folder | synthetic+learn2reg."""
    parts: List[object] = []
    for k in kind.split("+"):
        if k == "synthetic":
            if len(shape) != ndim:
                raise ValueError(f"--shape needs {ndim} sizes")
            parts.append(SyntheticPairs(shape, max_disp=max_disp))
        elif k == "folder":
            parts.append(FolderPairs(folder, patterns))
        elif k == "learn2reg":
            parts.append(Learn2RegDataset(json_path))
        else:
            raise ValueError(f"unknown data kind {k!r}")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return MixedSource(parts[0], parts[1], mix)
    raise ValueError("at most two sources can be mixed")
