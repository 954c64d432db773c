"""Reading and writing files: images, label maps, displacement fields, landmarks.

Everything a user hands the library from disk comes through here, so this is
where bad input is caught and turned into a one-line ``InputError`` before any
registration work starts. Files are only ever read; outputs go to new paths.

Images, label maps and masks are NIfTI (.nii, .nii.gz) or MGZ (.mgz, .mgh),
read with nibabel, or NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM
series (a folder, or one .dcm file of the series), read with SimpleITK
(``formats``, an optional extra). Whatever the format, the array comes back
in (i, j[, k]) axis order and the affine maps voxels to RAS mm (see
``image``). A 2D image may be stored as H x W or H x W x 1; it is returned as
H x W with the full 4x4 affine. Outputs are NIfTI unless the path asks for
.nrrd or .mha.

The displacement field is written the way ITK (and so ANTs and Slicer) reads a
displacement-field transform: vectors in LPS millimetres on the fixed grid; as
NIfTI a 5D (X, Y, Z, 1, 3) float32 image with intent NIFTI_INTENT_VECTOR
(1007), as NRRD/MetaImage a 3-component vector image.
"""
from __future__ import annotations

import csv
import io as _stdio
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .geometry import lps_to_ras, physical_field_to_voxel, physical_to_voxel_points, ras_to_lps
from .image import Image

from . import formats

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + formats.ITK_SUFFIXES + formats.DICOM_SUFFIXES
IMAGE_FORMATS_TEXT = ".nii, .nii.gz, .mgz, .nrrd, .nhdr, .mha, .mhd, or a DICOM series folder"
#: --format: the suffix every output image of a run gets
OUTPUT_FORMATS = {"nii": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
# Intent 1007 (vector) with LPS components is what ANTs writes and ITK/Slicer
# read as-is. 1006 (displacement vector) makes ITK's NIfTI reader convert the
# components from RAS, so LPS data read through it maps points wrongly
# (checked with Slicer's transform reader in Testing/test_io.py).
NIFTI_INTENT_VECTOR = 1007
#: read only: ITK (and so Slicer, saving a grid transform as .nii.gz) writes RAS components with this intent
NIFTI_INTENT_DISPVECT = 1006


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in (".nii.gz", ".mrk.json") + IMAGE_SUFFIXES + (".fcsv", ".csv", ".json"):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _check_readable(path, what: str, folder_ok: bool = False) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what}: file not found: {path}")
    if path.is_dir() and not folder_ok:
        raise InputError(f"{what}: is a folder, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what}: file is not readable (permissions): {path}")
    return path


def _read_nibabel(path: Path, what: str):
    """Open a file with nibabel; any failure becomes one line naming the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        # mmap=False: the voxels are read into memory now, so a truncated or corrupt file fails
        # here, and the array never aliases the file (an in-place rewrite of the file cannot change it).
        img = nib.load(str(path), mmap=False)
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError, TypeError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what}: cannot read {path} as an image ({reason})") from None
    if not hasattr(img, "affine") or img.affine is None:
        raise InputError(f"{what}: {path} has no spatial geometry (affine)")
    return img, data


def read_array(path, what: str = "image"):
    """(array as stored, RAS affine, nibabel image or None) of any supported image file or DICOM folder.

    The array is (i, j[, k], ...) in every format; nothing is checked beyond
    readability (callers reduce and check it).
    """
    path = _check_readable(path, what, folder_ok=True)
    if path.is_dir():
        if not os.access(path, os.X_OK):
            raise InputError(f"{what}: folder is not readable (permissions): {path}")
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            raise InputError(f"{what}: is a folder, not a file: {path} (a DICOM series folder can be read with "
                             f"the optional extra: {formats.INSTALL_HINT})") from None
        data, affine = formats.read_dicom(path, what)
        return data, affine, None
    suf = _suffix(path)
    if suf in NIBABEL_SUFFIXES:
        img, data = _read_nibabel(path, what)
        return data, np.asarray(img.affine, dtype=np.float64), img
    if suf in formats.ITK_SUFFIXES:
        data, affine = formats.read(path, what)
        return data, affine, None
    if suf in formats.DICOM_SUFFIXES:
        data, affine = formats.read_dicom(path, what)
        return data, affine, None
    raise InputError(f"{what}: not an image file (expected {IMAGE_FORMATS_TEXT}): {path}")


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
    raw, affine, _ = read_array(path, what)
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
    return Image(data, affine)


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
    raw, affine, _ = read_array(path, what)
    raw = _spatial(raw, path, what)
    labels = as_label_array(raw, what, path)
    out = Image(labels, affine)
    if like is not None and out.shape != like.shape:
        raise InputError(f"{what}: {path} has shape {out.shape} but its image has shape {like.shape}; "
                         "a label map must be on its image's grid")
    if like is not None and not np.allclose(out.affine, like.affine, atol=1e-2):
        # Same shape but different geometry: almost always the wrong file.
        raise InputError(f"{what}: {path} has a different affine (voxel-to-world geometry) than its image")
    return out


def load_mask(path, what: str = "mask") -> Image:
    """Read a mask (label map or binary image) on its own grid; ``masks`` decides what is inside."""
    raw, affine, _ = read_array(path, what)
    raw = _spatial(raw, path, what)
    from .masks import binary

    return Image(binary(raw, f"{what} {path}"), np.asarray(affine, dtype=np.float64))


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


def _write(img, path: Path, compresslevel: Optional[int]) -> None:
    """A NIfTI ``img`` to ``path``; a .gz file at ``compresslevel`` (None: nibabel's default, 1).

    Level 0 stores the data in a valid gzip file without compressing it: float
    fields shrink by only 8-20 % at level 1, for seconds of CPU on a brain.
    """
    if not str(path).endswith(".gz"):
        with open(str(path), "wb") as fh:
            _to_stream(img, fh)
        return
    import gzip

    with gzip.GzipFile(str(path), "wb", compresslevel=1 if compresslevel is None else int(compresslevel)) as fh:
        _to_stream(img, fh)


#: arrays of at least this many voxels are written in blocks of one (x, y) plane (``_to_stream``)
STREAM_MIN_VOXELS = 1 << 22


def _to_stream(img, fh, min_voxels: Optional[int] = None) -> None:
    """Write a NIfTI-1 ``img`` (header, then data) to an open binary file, the bytes nibabel would write.

    nibabel writes the data in slices along its slowest axis, which for a
    displacement field (X, Y, Z, 1, 3) is one whole component at a time, and
    copied more than once on the way (about 0.9 GB of temporaries for a
    512x512x300 field). Large arrays without scaling are written here plane
    by plane instead (1 MB at a time); the header is nibabel's own.
    """
    from nibabel.arraywriters import get_slope_inter, make_array_writer
    from nibabel.volumeutils import seek_tell

    data = np.asanyarray(img.dataobj)
    limit = STREAM_MIN_VOXELS if min_voxels is None else min_voxels
    if data.size < limit or data.ndim < 3:
        img.to_stream(fh)
        return
    img.get_data_dtype(finalize=True)
    img.update_header()
    hdr = img.header
    out_dtype = hdr.get_data_dtype()
    writer = make_array_writer(data, out_dtype, hdr.has_data_slope, hdr.has_data_intercept)
    slope, inter = get_slope_inter(writer)
    if not (slope in (1.0, None) or np.isnan(slope)) or not (inter in (0.0, None) or np.isnan(inter)):
        img.to_stream(fh)  # scaled data: nibabel's own path
        return
    hdr.set_slope_inter(slope, inter)
    hdr.write_to(fh)
    seek_tell(fh, hdr.get_data_offset(), write0=True)
    trailing = data.shape[2:]
    for rev in np.ndindex(*trailing[::-1]):  # Fortran order: the first two axes fastest, the last slowest
        plane = data[(slice(None), slice(None)) + rev[::-1]]
        fh.write(np.ascontiguousarray(plane.T, dtype=out_dtype).tobytes())


def _spatial_for_file(data: np.ndarray) -> np.ndarray:
    """2D arrays are written as H x W x 1, which every reader takes as a one-slice volume."""
    return data[:, :, None] if data.ndim == 2 else data


def check_image_output(path) -> str:
    """'nifti' or 'itk' from an output path's suffix; anything else is refused."""
    return _writer(Path(path))


def _writer(path: Path) -> str:
    """'nifti' or 'itk' from the output path's suffix; anything else is refused."""
    suf = _suffix(path)
    if suf in (".nii", ".nii.gz"):
        return "nifti"
    if suf in (".nrrd", ".mha"):
        return "itk"
    raise InputError(f"cannot write {path}: output images are .nii.gz, .nii, .nrrd or .mha")


def output_name(stem: str, fmt: str = "nii") -> str:
    """``stem`` with the suffix of output format ``fmt`` (``OUTPUT_FORMATS``)."""
    try:
        return stem + OUTPUT_FORMATS[fmt]
    except KeyError:
        raise InputError(f"unknown output format {fmt!r}; choose {', '.join(OUTPUT_FORMATS)}") from None


def save_image(image: Image, path, compresslevel: Optional[int] = None) -> Path:
    """Write an intensity image as float32 with its affine (NIfTI, or NRRD/MetaImage by suffix)."""
    path = Path(path)
    data = _spatial_for_file(np.asarray(image.data, dtype=np.float32))
    if _writer(path) == "itk":
        return formats.write(data, image.affine, path)
    _write(_nifti(data, image.affine), path, compresslevel)
    return path


def _label_dtype(labels: np.ndarray):
    top = int(labels.max(initial=0))
    for dt in (np.uint8, np.uint16, np.int32):
        if top <= np.iinfo(dt).max:
            return dt
    return np.int64


def save_labels(labels, affine, path, compresslevel: Optional[int] = None) -> Path:
    """Write a label map with the smallest integer dtype that holds its labels (NIfTI, NRRD or MetaImage)."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(bool)):
        labels = as_label_array(labels)  # checked (integers, >= 0) as int32; small unsigned maps need no check
    data = _spatial_for_file(labels.astype(_label_dtype(labels), copy=False))
    if _writer(path) == "itk":
        return formats.write(data, affine, path)
    img = _nifti(data, affine)
    img.header.set_intent("label")
    _write(img, path, compresslevel)
    return path


def save_itk_displacement(disp_mm_lps: np.ndarray, fixed_affine, path,
                          compresslevel: Optional[int] = None) -> Path:
    """Write a (*S, 3) LPS-millimetre displacement as an ITK displacement field.

    NIfTI: shape (X, Y, Z, 1, 3) (2D: (X, Y, 1, 1, 3)), float32, intent
    vector; NRRD/MetaImage: a 3-component float32 vector image. The affine is
    the grid's (the fixed image's for the forward field), so ITK/ANTs/Slicer
    read it as a transform that maps points of that grid's space into the
    other image's space.
    """
    path = Path(path)
    disp = np.asarray(disp_mm_lps, dtype=np.float32)
    if disp.shape[-1] != 3 or disp.ndim not in (3, 4):
        raise ValueError(f"expected a (*S, 3) displacement in mm, got shape {disp.shape}")
    if disp.ndim == 3:  # 2D grid
        disp = disp[:, :, None, :]
    if _writer(path) == "itk":
        return formats.write(disp, fixed_affine, path, vector=True)
    data = disp[:, :, :, None, :]
    img = _nifti(data, fixed_affine)
    img.header.set_intent("vector", (), name="DEQReg displacement")
    _write(img, path, compresslevel)
    return path


def load_itk_displacement(path, what: str = "displacement field") -> Tuple[np.ndarray, np.ndarray]:
    """Read an ITK displacement field (NIfTI, NRRD or MetaImage): ((*S, 3) LPS mm, 4x4 RAS affine).

    ``S`` is 2D when the file has a single slice, matching how 2D images are read.
    """
    path = _check_readable(path, what)
    raw, affine, img = read_array(path, what)
    if img is not None:  # NIfTI / MGZ
        if raw.ndim != 5 or raw.shape[3] != 1 or raw.shape[4] != 3:
            raise InputError(f"{what}: {path} has shape {raw.shape}; an ITK displacement field is (X, Y, Z, 1, 3)")
        code = int(img.header["intent_code"]) if "intent_code" in img.header else None
        if code is not None and code not in (NIFTI_INTENT_VECTOR, NIFTI_INTENT_DISPVECT):
            raise InputError(f"{what}: {path} has intent code {code}, not {NIFTI_INTENT_VECTOR} (vector) or "
                             f"{NIFTI_INTENT_DISPVECT} (displacement vector)")
        data = np.asarray(raw, dtype=np.float32)[:, :, :, 0, :]
        if code == NIFTI_INTENT_DISPVECT:  # RAS components, as ITK reads (and Slicer writes) them
            data = ras_to_lps(data).astype(np.float32)
    else:
        if raw.ndim == 3 and raw.shape[-1] == 3:  # a 2D vector image
            raw = raw[:, :, None, :]
        if raw.ndim != 4 or raw.shape[-1] != 3:
            raise InputError(f"{what}: {path} has shape {raw.shape}; an ITK displacement field has 3 "
                             "components per voxel")
        data = np.asarray(raw, dtype=np.float32)
    if data.shape[2] == 1:
        data = data[:, :, 0, :]
    return data, affine


def itk_displacement_to_voxel(disp_mm_lps: np.ndarray, affine) -> np.ndarray:
    """LPS-mm field (*S, 3) back to the library's voxel field (ndim, *S)."""
    ndim = disp_mm_lps.ndim - 1
    return physical_field_to_voxel(lps_to_ras(disp_mm_lps), affine, ndim)


# --- ITK affine transform files ---------------------------------------------------


_ITK_AFFINE_TYPES = ("AffineTransform_double_3_3", "AffineTransform_float_3_3",
                     "MatrixOffsetTransformBase_double_3_3", "MatrixOffsetTransformBase_float_3_3")


def save_itk_affine(world_ras: np.ndarray, path) -> Path:
    """Write a 4x4 RAS world transform (fixed RAS -> moving RAS) as an ITK text transform (.tfm).

    ITK transforms map points of the fixed (output) space to the moving space
    in LPS, so the file holds diag(-1,-1,1) W diag(-1,-1,1), centre 0.
    """
    path = Path(path)
    lps = formats.FLIP_XY @ np.asarray(world_ras, dtype=np.float64) @ formats.FLIP_XY
    params = " ".join(repr(float(v)) for v in list(lps[:3, :3].ravel()) + list(lps[:3, 3]))
    path.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                    f"Parameters: {params}\nFixedParameters: 0 0 0\n")
    return path


def load_itk_affine(path, what: str = "affine transform") -> np.ndarray:
    """The 4x4 RAS matrix of a one-transform ITK text file (.tfm/.txt) holding a 3D affine."""
    path = _check_readable(path, what)
    fields = {}
    try:
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                fields.setdefault(key.strip(), value.strip())
        kind = fields.get("Transform")
        if kind not in _ITK_AFFINE_TYPES:
            raise InputError(f"{what}: {path} holds a {kind or 'unknown'} transform; expected a 3D affine "
                             f"({_ITK_AFFINE_TYPES[0]})")
        params = np.array([float(v) for v in fields["Parameters"].split()], dtype=np.float64)
        centre = np.array([float(v) for v in fields.get("FixedParameters", "0 0 0").split()], dtype=np.float64)
        if params.size != 12 or centre.size != 3:
            raise ValueError("wrong number of parameters")
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{what}: cannot read {path} as an ITK affine transform ({exc})") from None
    A = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = A
    lps[:3, 3] = params[9:] + centre - A @ centre  # ITK: T(x) = A (x - c) + t + c
    return formats.FLIP_XY @ lps @ formats.FLIP_XY


# --- landmarks ---------------------------------------------------------------------


def _parse_float_rows(rows, path: Path, what: str) -> np.ndarray:
    try:
        pts = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError:
        raise InputError(f"{what}: {path} has non-numeric coordinates") from None
    return pts


def _parse_csv_voxels(path: Path, what: str):
    """Learn2Reg keypoints: one voxel coordinate per row, comma-separated, optional header.

    Returns (points (N, k), header row or None)."""
    with open(path, newline="") as fh:
        rows = [[c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)]
    header = None
    if rows:
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            header, rows = rows[0], rows[1:]
    if not rows:
        raise InputError(f"{what}: {path} holds no points")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(f"{what}: {path} has rows of different lengths {sorted(widths)}")
    return _parse_float_rows(rows, path, what), header


def _read_csv_voxels(path: Path, what: str) -> np.ndarray:
    return _parse_csv_voxels(path, what)[0]


def _parse_fcsv(path: Path, what: str):
    """Slicer's markups CSV: '#' header lines name the coordinate system and columns.

    Returns (RAS points (N, 3), system, lines, {line index: row}, x/y/z column indices)."""
    system = "RAS"
    columns = None
    rows = {}
    with open(path, newline="") as fh:
        lines = fh.read().splitlines()
    for n, line in enumerate(lines):
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
        rows[n] = next(csv.reader([s]))
    if not rows:
        raise InputError(f"{what}: {path} holds no points")
    idx = [columns.index(c) for c in ("x", "y", "z")] if columns and {"x", "y", "z"} <= set(columns) else [1, 2, 3]
    if any(len(r) <= max(idx) for r in rows.values()):
        raise InputError(f"{what}: {path} has rows without x, y, z columns")
    pts = _parse_float_rows([[r[i] for i in idx] for r in rows.values()], path, what)
    return _to_ras(pts, system, path, what), system, lines, rows, idx


def _read_fcsv(path: Path, what: str) -> np.ndarray:
    return _parse_fcsv(path, what)[0]


def _parse_mrk_json(path: Path, what: str):
    """Slicer's markups JSON: every control point of every markup, in its coordinate system.

    Returns (RAS points (N, 3), the parsed document)."""
    try:
        doc = json.loads(path.read_text())
        pts = []
        for markup in doc["markups"]:
            system = str(markup.get("coordinateSystem", "LPS")).upper()
            for cp in markup.get("controlPoints", []):
                pts.append(_to_ras(np.asarray([cp["position"]], dtype=np.float64), system, path, what)[0])
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise InputError(f"{what}: {path} is not a Slicer markups JSON file ({type(exc).__name__}: {exc})") from None
    if not pts:
        raise InputError(f"{what}: {path} holds no points")
    return np.asarray(pts, dtype=np.float64), doc


def _read_mrk_json(path: Path, what: str) -> np.ndarray:
    return _parse_mrk_json(path, what)[0]


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


# --- points files, read and written back in their own format ---------------------------------


POINTS_SUFFIXES = (".csv", ".fcsv", ".mrk.json")


def points_kind(path) -> str:
    """"csv", "fcsv" or "mrk.json" (also for a plain .json), or "" for anything else."""
    suf = _suffix(Path(path))
    return {".csv": "csv", ".fcsv": "fcsv", ".mrk.json": "mrk.json", ".json": "mrk.json"}.get(suf, "")


def is_points_file(path) -> bool:
    return bool(points_kind(path))


@dataclass
class PointsFile:
    """A landmark file as read, so that moved points can be written back in the same format.

    ``kind`` "csv": ``points`` are voxel coordinates (N, k) of some image;
    "fcsv" / "mrk.json": RAS millimetres (N, 3), whatever system the file uses.
    """
    kind: str
    path: Path
    points: np.ndarray
    _extra: tuple = ()


def read_points(path, what: str = "points") -> PointsFile:
    path = _check_readable(path, what)
    suf = _suffix(path)
    try:
        if suf == ".csv":
            pts, header = _parse_csv_voxels(path, what)
            out = PointsFile("csv", path, pts, (header,))
        elif suf == ".fcsv":
            pts, system, lines, rows, idx = _parse_fcsv(path, what)
            out = PointsFile("fcsv", path, pts, (system, lines, rows, idx))
        elif suf in (".mrk.json", ".json"):
            pts, doc = _parse_mrk_json(path, what)
            out = PointsFile("mrk.json", path, pts, (doc,))
        else:
            raise InputError(f"{what}: {path} is not a points file (expected .csv, .fcsv or .mrk.json)")
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is not a text file") from None
    if not np.all(np.isfinite(out.points)):
        raise InputError(f"{what}: {path} has NaN or infinite coordinates")
    return out


def _from_ras(pts: np.ndarray, system: str) -> np.ndarray:
    return lps_to_ras(pts) if system == "LPS" else np.asarray(pts, dtype=np.float64)


def write_points(pf: PointsFile, points: np.ndarray, path) -> Path:
    """Write ``points`` (same meaning and order as ``pf.points``) in ``pf``'s format, keeping everything else."""
    path = Path(path)
    points = np.asarray(points, dtype=np.float64)
    if points.shape[0] != pf.points.shape[0]:
        raise ValueError(f"{points.shape[0]} points for a file of {pf.points.shape[0]}")
    if pf.kind == "csv":
        (header,) = pf._extra
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            if header is not None:
                w.writerow(header)
            w.writerows([[repr(float(v)) for v in row] for row in points])
    elif pf.kind == "fcsv":
        system, lines, rows, idx = pf._extra
        stored = _from_ras(points, system)
        lines = list(lines)
        for (n, row), p in zip(rows.items(), stored):
            row = list(row)
            for i, v in zip(idx, p):
                row[i] = repr(float(v))
            buf = _stdio.StringIO()
            csv.writer(buf, lineterminator="").writerow(row)
            lines[n] = buf.getvalue()
        path.write_text("\n".join(lines) + "\n")
    else:
        (doc,) = pf._extra
        doc = json.loads(json.dumps(doc))  # a copy
        k = 0
        for markup in doc["markups"]:
            system = str(markup.get("coordinateSystem", "LPS")).upper()
            for cp in markup.get("controlPoints", []):
                cp["position"] = [float(v) for v in _from_ras(points[k:k + 1], system)[0]]
                k += 1
        path.write_text(json.dumps(doc, indent=4) + "\n")
    return path


__all__ = [
    "load_image", "load_labels", "as_label_array", "save_image", "save_labels",
    "save_itk_displacement", "load_itk_displacement", "read_array", "output_name", "itk_displacement_to_voxel",
    "load_landmarks", "check_landmark_pair", "save_landmarks_csv", "ras_to_lps", "PointsFile", "read_points",
    "write_points", "save_itk_affine", "load_itk_affine", "load_mask",
]
