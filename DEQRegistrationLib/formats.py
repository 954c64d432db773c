"""NRRD, MetaImage and DICOM series, through SimpleITK (the optional ``formats`` extra).

SimpleITK is what Slicer itself bundles to read these files, so a volume
saved from Slicer comes back here with the geometry Slicer gave it. It is an
optional dependency (``pip install "deqreg[formats]"``): without it NIfTI and
MGZ still work and these formats fail with one line naming the extra.

Geometry. ITK keeps an image's origin, spacing and direction in **LPS**
(whatever the file says: a NRRD in "right-anterior-superior" space is
converted by the reader), and its arrays in (k, j, i) order. The library
wants (i, j[, k]) arrays and a voxel-to-**RAS** affine (``image``):

    affine_RAS = diag(-1, -1, 1, 1) @ [[direction @ diag(spacing), origin], [0, 1]]

and the array is transposed. Vector images (displacement fields) keep their
components last, as stored (ITK's are LPS vectors). Writing does the reverse;
a 2D (H, W) image is written as an H x W x 1 volume with its full 4x4
affine, as the NIfTI writer does.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .errors import InputError

#: read and written through SimpleITK (.nhdr/.mhd keep their voxels in a separate file)
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
EXTRA = "formats"
INSTALL_HINT = f'pip install "deqreg[{EXTRA}]" (SimpleITK)'

#: RAS <-> LPS for homogeneous 4x4 matrices (its own inverse)
FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def simpleitk(what: str, path, purpose: str = "read"):
    """The SimpleITK module, or one ``InputError`` line naming the extra that provides it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(f"{what}: to {purpose} {path} install the optional extra: {INSTALL_HINT}") from None
    return sitk


def _reason(exc: BaseException) -> str:
    """The informative line of an ITK exception (they span several lines and start with a source path)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ITK ERROR" in ln or "Description" in ln or not ln.startswith(("/", "Exception thrown")):
            return ln.split("ITK ERROR:")[-1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


class _Quiet:
    """Around a SimpleITK call: silence ITK's warning window (its warnings would break the one-line error
    output) and give the process its C locale back (GDCM's DICOM writer sets LC_ALL to "C", after which
    Python writes text files as ASCII)."""

    def __init__(self, sitk):
        self.sitk = sitk

    def __enter__(self):
        import locale

        self.before = self.sitk.ProcessObject.GetGlobalWarningDisplay()
        self.locale = locale.setlocale(locale.LC_ALL)
        self.sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc):
        import locale

        self.sitk.ProcessObject.SetGlobalWarningDisplay(self.before)
        if locale.setlocale(locale.LC_ALL) != self.locale:
            locale.setlocale(locale.LC_ALL, self.locale)


# --- geometry ----------------------------------------------------------------------


def affine_from_sitk(img) -> np.ndarray:
    """The voxel (i, j[, k]) to RAS affine of a SimpleITK image (2D: the plane z = 0 of LPS)."""
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction @ np.diag(spacing)
    lps[:dim, 3] = img.GetOrigin()
    return FLIP_XY @ lps


def _affine_3d(affine: np.ndarray) -> np.ndarray:
    """A non-singular 4x4 affine: a 2D image's missing third column becomes the unit plane normal."""
    affine = np.array(affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        n = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = n / max(np.linalg.norm(n), 1e-12)
    return affine


def sitk_geometry(affine: np.ndarray) -> Tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in LPS of a 3D SimpleITK image with this RAS affine."""
    lps = FLIP_XY @ _affine_3d(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def array_from_sitk(img) -> np.ndarray:
    """(i, j[, k][, component]) array of a SimpleITK image (a copy)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (k, j, i[, c])
    dim = img.GetDimension()
    order = tuple(range(dim - 1, -1, -1)) + tuple(range(dim, arr.ndim))
    return np.ascontiguousarray(arr.transpose(order))


# --- reading -----------------------------------------------------------------------


def read(path: Path, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """(array (i, j[, k][, c]), RAS affine) of a NRRD or MetaImage file."""
    sitk = simpleitk(what, path)
    try:
        with _Quiet(sitk):
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{what}: cannot read {path} as an image ({_reason(exc)})") from None
    return _checked(img, path, what)


def _checked(img, path, what):
    if img.GetDimension() not in (2, 3):
        raise InputError(f"{what}: {path} is {img.GetDimension()}D; only 2D or 3D images can be registered")
    affine = affine_from_sitk(img)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{what}: {path} has a degenerate geometry (spacing or direction)")
    return array_from_sitk(img), affine


def _series_summary(sitk, folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    desc = ""
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(files[0])
        r.ReadImageInformation()
        if r.HasMetaDataKey("0008|103e"):
            desc = r.GetMetaData("0008|103e").strip()
    except RuntimeError:
        pass
    return f"{uid} ({len(files)} files{', ' + repr(desc) if desc else ''})"


def series_ids(folder: Path, what: str) -> List[str]:
    sitk = simpleitk(what, folder)
    with _Quiet(sitk):
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_dicom(path: Path, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """The one DICOM series in folder ``path`` (or the series a ``.dcm`` file belongs to).

    Several series in one folder: an error listing them (give one file of the
    series to pick it). Slices must be evenly spaced along the slice normal
    (a missing slice would otherwise silently stretch the geometry).
    """
    sitk = simpleitk(what, path)
    folder = path if path.is_dir() else path.parent
    with _Quiet(sitk):
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        if path.is_dir():
            if not ids:
                raise InputError(f"{what}: {path} is a folder with no DICOM series in it (or its files cannot be "
                                 "read as DICOM)")
            if len(ids) > 1:
                listed = "; ".join(_series_summary(sitk, folder, uid) for uid in ids)
                raise InputError(f"{what}: {path} holds {len(ids)} DICOM series, give one file of the one you mean "
                                 f"instead of the folder: {listed}")
            uid = ids[0]
        else:
            uid = _uid_of_file(sitk, path, what)
            if uid not in ids:
                raise InputError(f"{what}: cannot read {path} as part of a DICOM series")
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        try:
            _check_even_slices(sitk, files, path, what)
        except InputError as exc:
            # GDCM leaves out files it cannot parse: a broken slice shows up as a gap
            listed = {str(Path(f).resolve()) for i in ids
                      for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i)}
            unread = sorted(p.name for p in folder.iterdir() if p.is_file() and str(p.resolve()) not in listed)
            if not unread:
                raise
            names = ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else "")
            raise InputError(f"{exc}; cannot read {len(unread)} file(s) in {folder} as DICOM: {names}") from None
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{what}: cannot read the DICOM series in {folder} ({_reason(exc)})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what}: the DICOM series in {folder} is not a scalar (greyscale) image")
    return _checked(img, path, what)


def _uid_of_file(sitk, path: Path, what: str) -> str:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{what}: cannot read {path} as DICOM ({_reason(exc)})") from None
    if not r.HasMetaDataKey("0020|000e"):
        raise InputError(f"{what}: {path} has no series instance UID; is it a DICOM image?")
    return r.GetMetaData("0020|000e").strip().rstrip("\x00")


def _check_even_slices(sitk, files: List[str], path: Path, what: str) -> None:
    """Refuse series whose slice positions are not evenly spaced (missing or repeated slices)."""
    if len(files) < 3:
        return
    pos, normal = [], None
    for name in files:
        r = sitk.ImageFileReader()
        r.SetFileName(name)
        try:
            r.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{what}: cannot read {name} in the DICOM series of {path} ({_reason(exc)})") from None
        if r.GetDimension() == 3 and r.GetSize()[2] > 1:
            return  # multi-frame files: the reader checks its own frames
        origin = np.asarray(r.GetOrigin(), dtype=np.float64)
        if normal is None:
            d = np.asarray(r.GetDirection(), dtype=np.float64).reshape(r.GetDimension(), r.GetDimension())
            normal = np.cross(d[:3, 0], d[:3, 1]) if d.shape[0] == 3 else None
            if normal is None:
                return
        pos.append(float(origin[:3] @ normal))
    steps = np.diff(np.sort(pos))
    if steps.min() <= 1e-6 * max(1.0, abs(steps).max()):
        raise InputError(f"{what}: the DICOM series in {path} has several slices at the same position")
    if steps.max() - steps.min() > 1e-3 * max(1.0, steps.mean()):
        raise InputError(f"{what}: the DICOM series in {path} has unevenly spaced slices (spacing "
                         f"{steps.min():.4g} to {steps.max():.4g} mm; missing slices?)")


# --- writing -----------------------------------------------------------------------


def write(data: np.ndarray, affine: np.ndarray, path: Path, vector: bool = False) -> Path:
    """Write an (i, j[, k]) array (``vector``: components last) with its RAS affine as NRRD or MetaImage."""
    sitk = simpleitk("output", path, "write")
    data = np.asarray(data)
    spatial = data.ndim - (1 if vector else 0)
    if spatial == 2:
        data = data[:, :, None]
    order = (2, 1, 0) + ((3,) if vector else ())
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(order)), isVector=vector)
    origin, spacing, direction = sitk_geometry(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    with _Quiet(sitk):
        sitk.WriteImage(img, str(path), useCompression=True)
    return path
