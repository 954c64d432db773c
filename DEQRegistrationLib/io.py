"""Reading and writing files: images, label maps, displacement fields, landmarks.

Everything a user hands the library from disk comes through here, so this is
where bad input is caught and turned into a one-line ``InputError`` before any
registration work starts. Files are only ever read; outputs go to new paths.

Images and label maps are NIfTI (.nii, .nii.gz) or MGZ (.mgz, .mgh), read with
nibabel: the array keeps nibabel's (i, j[, k]) axis order and the affine maps
voxels to RAS mm (see ``image``). A 2D image may be stored as H x W or
H x W x 1; it is returned as H x W with the full 4x4 affine.

The displacement field is written the way ITK (and so ANTs and Slicer) reads a
displacement-field transform: a 5D NIfTI (X, Y, Z, 1, 3), float32, intent
NIFTI_INTENT_VECTOR (1007), vectors in LPS millimetres, on the fixed grid.
"""
from __future__ import annotations

import csv
import json
import os
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .geometry import lps_to_ras, physical_field_to_voxel, physical_to_voxel_points, ras_to_lps
from .image import Image

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
# Intent 1007 (vector) with LPS components is what ANTs writes and ITK/Slicer
# read as-is. 1006 (displacement vector) makes ITK's NIfTI reader convert the
# components from RAS, so LPS data read through it maps points wrongly
# (checked with Slicer's transform reader in Testing/test_io.py).
NIFTI_INTENT_VECTOR = 1007


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in (".nii.gz", ".mrk.json") + IMAGE_SUFFIXES + (".fcsv", ".csv", ".json"):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _check_readable(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what}: file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what}: is a folder, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what}: file is not readable (permissions): {path}")
    return path


def _read_nibabel(path: Path, what: str):
    """Open a file with nibabel; any failure becomes one line naming the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    suf = _suffix(path)
    if suf not in IMAGE_SUFFIXES:
        raise InputError(f"{what}: not an image file (expected .nii, .nii.gz or .mgz): {path}")
    try:
        img = nib.load(str(path))
        # Read the voxels now so a truncated or corrupt file fails here, not later.
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError, TypeError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what}: cannot read {path} as an image ({reason})") from None
    if not hasattr(img, "affine") or img.affine is None:
        raise InputError(f"{what}: {path} has no spatial geometry (affine)")
    return img, data


def _spatial(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Reduce stored shapes to the library's 2D (H, W) or 3D arrays, refusing the rest.

    Trailing singleton axes beyond the third are dropped (NIfTI often stores a
    3D volume as X x Y x Z x 1), then H x W x 1 becomes H x W; the affine is
    kept whole, so voxel (i, j) still sits at k = 0.
    """
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise InputError(f"{what}: {path} is {data.ndim}D with shape {shape}; only 2D or 3D images can be registered")
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim < 2:
        raise InputError(f"{what}: {path} is {data.ndim}D with shape {shape}; only 2D or 3D images can be registered")
    if data.size == 0:
        raise InputError(f"{what}: {path} is empty (shape {shape})")
    if min(data.shape) < 2:
        raise InputError(f"{what}: {path} has shape {shape}; a 2D image must be stored as HxW or HxWx1 "
                         "and every image axis needs at least 2 voxels")
    return data


def load_image(path, what: str = "image") -> Image:
    """Read a 2D/3D intensity image as float32, refusing what cannot be registered.

    Refused: missing/unreadable files, non-images, 4D data, empty or constant
    images, NaN/inf voxels, complex or RGB voxels.
    """
    path = _check_readable(path, what)
    img, raw = _read_nibabel(path, what)
    if raw.dtype.fields is not None or np.iscomplexobj(raw):
        raise InputError(f"{what}: {path} does not hold scalar real voxels (dtype {raw.dtype})")
    raw = _spatial(raw, path, what)
    data = np.asarray(raw, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{what}: {path} has {bad} NaN or infinite voxels")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError(f"{what}: {path} is constant (every voxel is {lo:g}); nothing to register")
    return Image(data, np.asarray(img.affine, dtype=np.float64))


def as_label_array(data: np.ndarray, what: str = "label map", path="") -> np.ndarray:
    """Integer labels from any stored dtype; non-integer, negative or NaN values are refused."""
    where = f" {path}" if path else ""
    data = np.asarray(data)
    if data.dtype.fields is not None or np.iscomplexobj(data):
        raise InputError(f"{what}:{where} does not hold scalar label values (dtype {data.dtype})")
    if np.issubdtype(data.dtype, np.bool_):
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise InputError(f"{what}:{where} has NaN or infinite values; a label map holds integers")
        if not np.all(data == np.round(data)):
            raise InputError(f"{what}:{where} has non-integer values; is it an intensity image, not a label map?")
    if data.size and data.min() < 0:
        raise InputError(f"{what}:{where} has negative labels")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise InputError(f"{what}:{where} has labels too large for int32")
    return data.astype(np.int32, copy=False) if data.dtype != np.int32 else data


def load_labels(path, like: Optional[Image] = None, what: str = "label map") -> Image:
    """Read a label map (values as stored, then checked to be integers), as int32.

    With ``like``, its shape must match that image's (same grid) and its
    dimensionality must agree.
    """
    path = _check_readable(path, what)
    img, raw = _read_nibabel(path, what)
    raw = _spatial(raw, path, what)
    labels = as_label_array(raw, what, path)
    out = Image(labels, np.asarray(img.affine, dtype=np.float64))
    if like is not None and out.shape != like.shape:
        raise InputError(f"{what}: {path} has shape {out.shape} but its image has shape {like.shape}; "
                         "a label map must be on its image's grid")
    if like is not None and not np.allclose(out.affine, like.affine, atol=1e-2):
        # Same shape but different geometry: almost always the wrong file.
        raise InputError(f"{what}: {path} has a different affine (voxel-to-world geometry) than its image")
    return out


def load_mask(path, what: str = "mask") -> Image:
    """Read a mask (label map or binary image) on its own grid; ``masks`` decides what is inside."""
    path = _check_readable(path, what)
    img, raw = _read_nibabel(path, what)
    raw = _spatial(raw, path, what)
    from .masks import binary

    return Image(binary(raw, f"{what} {path}"), np.asarray(img.affine, dtype=np.float64))


# --- writing ------------------------------------------------------------------------


def _nifti(data: np.ndarray, affine: np.ndarray):
    """A NIfTI-1 image whose qform and sform both hold the affine (code 1, scanner).

    ITK, Slicer and nibabel then agree on the geometry whichever form they prefer.
    """
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _spatial_for_file(data: np.ndarray) -> np.ndarray:
    """2D arrays are written as H x W x 1, which every reader takes as a one-slice volume."""
    return data[:, :, None] if data.ndim == 2 else data


def save_image(image: Image, path) -> Path:
    """Write an intensity image as float32 NIfTI with its affine."""
    path = Path(path)
    data = _spatial_for_file(np.asarray(image.data, dtype=np.float32))
    _nifti(data, image.affine).to_filename(str(path))
    return path


def _label_dtype(labels: np.ndarray):
    top = int(labels.max(initial=0))
    for dt in (np.uint8, np.uint16, np.int32):
        if top <= np.iinfo(dt).max:
            return dt
    return np.int64


def save_labels(labels, affine, path) -> Path:
    """Write a label map as NIfTI with the smallest integer dtype that holds its labels."""
    path = Path(path)
    labels = as_label_array(labels)
    data = _spatial_for_file(labels.astype(_label_dtype(labels)))
    img = _nifti(data, affine)
    img.header.set_intent("label")
    img.to_filename(str(path))
    return path


def save_itk_displacement(disp_mm_lps: np.ndarray, fixed_affine, path) -> Path:
    """Write a (*S, 3) LPS-millimetre displacement as an ITK displacement-field NIfTI.

    Shape (X, Y, Z, 1, 3) (2D: (X, Y, 1, 1, 3)), float32, intent vector,
    affine = the fixed image's, so ITK/ANTs/Slicer read it as a transform that
    maps fixed physical points into the moving image.
    """
    path = Path(path)
    disp = np.asarray(disp_mm_lps, dtype=np.float32)
    if disp.shape[-1] != 3 or disp.ndim not in (3, 4):
        raise ValueError(f"expected a (*S, 3) displacement in mm, got shape {disp.shape}")
    if disp.ndim == 3:  # 2D grid
        disp = disp[:, :, None, :]
    data = disp[:, :, :, None, :]
    img = _nifti(data, fixed_affine)
    img.header.set_intent("vector", (), name="DEQReg displacement")
    img.to_filename(str(path))
    return path


def load_itk_displacement(path, what: str = "displacement field") -> Tuple[np.ndarray, np.ndarray]:
    """Read an ITK displacement-field NIfTI: ((*S, 3) LPS mm, 4x4 affine).

    ``S`` is 2D when the file has a single slice, matching how 2D images are read.
    """
    path = _check_readable(path, what)
    img, raw = _read_nibabel(path, what)
    if raw.ndim != 5 or raw.shape[3] != 1 or raw.shape[4] != 3:
        raise InputError(f"{what}: {path} has shape {raw.shape}; an ITK displacement field is (X, Y, Z, 1, 3)")
    code = int(img.header["intent_code"]) if "intent_code" in img.header else None
    if code is not None and code != NIFTI_INTENT_VECTOR:
        raise InputError(f"{what}: {path} has intent code {code}, not {NIFTI_INTENT_VECTOR} (vector)")
    data = np.asarray(raw, dtype=np.float32)[:, :, :, 0, :]
    if data.shape[2] == 1:
        data = data[:, :, 0, :]
    return data, np.asarray(img.affine, dtype=np.float64)


def save_itk_affine(matrix_ras: np.ndarray, path) -> Path:
    """Write a 4x4 RAS world transform (fixed -> moving points) as an ITK transform file (.tfm / .txt).

    ITK (and so ANTs and Slicer) stores transforms in LPS and, like the
    displacement field, in the resampling direction: it maps fixed physical
    points to moving ones. Written as ``AffineTransform_double_3_3`` with
    centre 0: Parameters are the 3x3 matrix row by row, then the translation.
    """
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = flip @ np.asarray(matrix_ras, dtype=np.float64) @ flip
    values = " ".join(repr(float(v)) for v in list(m[:3, :3].ravel()) + list(m[:3, 3]))
    path = Path(path)
    path.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                    f"Parameters: {values}\nFixedParameters: 0 0 0\n")
    return path


def itk_displacement_to_voxel(disp_mm_lps: np.ndarray, affine) -> np.ndarray:
    """LPS-mm field (*S, 3) back to the library's voxel field (ndim, *S)."""
    ndim = disp_mm_lps.ndim - 1
    return physical_field_to_voxel(lps_to_ras(disp_mm_lps), affine, ndim)


# --- landmarks ---------------------------------------------------------------------


def _parse_float_rows(rows, path: Path, what: str) -> np.ndarray:
    try:
        pts = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError:
        raise InputError(f"{what}: {path} has non-numeric coordinates") from None
    return pts


def _read_csv_voxels(path: Path, what: str) -> np.ndarray:
    """Learn2Reg keypoints: one voxel coordinate per row, comma-separated, optional header."""
    with open(path, newline="") as fh:
        rows = [[c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)]
    if rows:
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            rows = rows[1:]  # a header line
    if not rows:
        raise InputError(f"{what}: {path} holds no points")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(f"{what}: {path} has rows of different lengths {sorted(widths)}")
    return _parse_float_rows(rows, path, what)


def _read_fcsv(path: Path, what: str) -> np.ndarray:
    """Slicer's markups CSV: '#' header lines name the coordinate system and columns."""
    system = "RAS"
    columns = None
    rows = []
    with open(path, newline="") as fh:
        for line in fh:
            s = line.strip()
            if not s:
                continue
            if s.startswith("#"):
                body = s.lstrip("#").strip()
                key, _, value = body.partition("=")
                key, value = key.strip().lower(), value.strip()
                if key == "coordinatesystem":
                    system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
                elif key == "columns":
                    columns = [c.strip().lower() for c in value.split(",")]
                continue
            rows.append(next(csv.reader([s])))
    if not rows:
        raise InputError(f"{what}: {path} holds no points")
    idx = [columns.index(c) for c in ("x", "y", "z")] if columns and {"x", "y", "z"} <= set(columns) else [1, 2, 3]
    if any(len(r) <= max(idx) for r in rows):
        raise InputError(f"{what}: {path} has rows without x, y, z columns")
    pts = _parse_float_rows([[r[i] for i in idx] for r in rows], path, what)
    return _to_ras(pts, system, path, what)


def _read_mrk_json(path: Path, what: str) -> np.ndarray:
    """Slicer's markups JSON: every control point of every markup, in its coordinate system."""
    try:
        doc = json.loads(path.read_text())
        pts = []
        for markup in doc["markups"]:
            system = str(markup.get("coordinateSystem", "LPS")).upper()
            for cp in markup.get("controlPoints", []):
                pts.append(_to_ras(np.asarray([cp["position"]], dtype=np.float64), system, path, what)[0])
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputError(f"{what}: {path} is not a Slicer markups JSON file ({type(exc).__name__}: {exc})") from None
    if not pts:
        raise InputError(f"{what}: {path} holds no points")
    return np.asarray(pts, dtype=np.float64)


def _to_ras(pts: np.ndarray, system: str, path: Path, what: str) -> np.ndarray:
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"{what}: {path} points must have 3 coordinates")
    if system == "RAS":
        return pts
    if system == "LPS":
        return lps_to_ras(pts)
    raise InputError(f"{what}: {path} uses coordinate system {system!r}; expected RAS or LPS")


def load_landmarks(path, image: Image, what: str = "landmarks") -> np.ndarray:
    """Landmarks as voxel coordinates (N, ndim) of ``image``.

    ``.csv``: voxel coordinates already (Learn2Reg keypoints); a 2D image
    accepts 2 columns, or 3 whose last is 0. ``.fcsv`` / ``.mrk.json``: Slicer
    markups in physical RAS/LPS mm, mapped through the image's affine.
    """
    path = _check_readable(path, what)
    suf = _suffix(path)
    try:
        if suf == ".csv":
            pts = _read_csv_voxels(path, what)
            if pts.shape[1] == 3 and image.ndim == 2 and np.allclose(pts[:, 2], 0):
                pts = pts[:, :2]
            if pts.shape[1] != image.ndim:
                raise InputError(f"{what}: {path} has {pts.shape[1]} columns but the image is {image.ndim}D")
        elif suf == ".fcsv":
            pts = physical_to_voxel_points(_read_fcsv(path, what), image.affine, image.ndim)
        elif suf in (".mrk.json", ".json"):
            pts = physical_to_voxel_points(_read_mrk_json(path, what), image.affine, image.ndim)
        else:
            raise InputError(f"{what}: {path} is not a landmark file (expected .csv, .fcsv or .mrk.json)")
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is not a text file") from None
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{what}: {path} has NaN or infinite coordinates")
    return pts


def check_landmark_pair(fixed_points: np.ndarray, moving_points: np.ndarray) -> None:
    if len(fixed_points) != len(moving_points):
        raise InputError(f"landmark counts differ: {len(fixed_points)} fixed vs {len(moving_points)} moving; "
                         "they must be corresponding pairs, one per row")


def save_landmarks_csv(points: np.ndarray, path) -> Path:
    """Write voxel landmarks the Learn2Reg way (no header, comma-separated)."""
    path = Path(path)
    np.savetxt(path, np.asarray(points, dtype=np.float64), delimiter=",", fmt="%.6f")
    return path


__all__ = [
    "load_image", "load_labels", "as_label_array", "save_image", "save_labels",
    "save_itk_displacement", "load_itk_displacement", "itk_displacement_to_voxel", "save_itk_affine", "load_mask",
    "load_landmarks", "check_landmark_pair", "save_landmarks_csv", "ras_to_lps",
]
