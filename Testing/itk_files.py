"""Test files written the way other tools write them (SimpleITK/GDCM, hand-written headers), not by deqreg.

``write_dicom_series`` builds a classic one-file-per-slice DICOM series with
SimpleITK's GDCM writer, geometry from a RAS affine (converted here, by hand,
to DICOM's LPS ImagePositionPatient / ImageOrientationPatient / PixelSpacing).
"""
from __future__ import annotations

import locale
from pathlib import Path

import numpy as np


def lps_geometry(affine):
    """(origin, spacing, direction 3x3) in LPS of a RAS voxel-to-world affine (no deqreg code involved)."""
    lps = np.array(affine, dtype=np.float64)
    lps[:2, :] *= -1  # RAS rows -> LPS rows
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3], spacing, lps[:3, :3] / spacing


def write_dicom_series(folder, data, affine, uid="1.2.826.0.1.3680043.2.1125.7.1", description="deqreg test",
                       slope=None, modality="CT"):
    """Write (i, j, k) ``data`` as one DICOM file per k-slice; returns the file paths.

    ``slope``: float data are stored as int16 = round(value / slope) with
    RescaleSlope = slope (GDCM does the scaling); integer data are stored as is.
    The direction must be orthonormal (DICOM has no shear). With modality
    "CT" GDCM writes classic CT Image Storage files; with "MR" and float data
    it writes Enhanced MR files (geometry in functional group sequences).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    origin, spacing, direction = lps_geometry(affine)
    data = np.asarray(data)
    float_data = slope is not None
    arr = data.transpose(2, 1, 0).astype(np.float64 if float_data else np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(tuple(origin))
    img.SetSpacing(tuple(spacing))
    img.SetDirection(tuple(direction.ravel()))
    row, col = direction[:, 0], direction[:, 1]
    tags = [("0008|0060", modality), ("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|103e", description),
            ("0020|0037", "\\".join(f"{v:.12f}" for v in (*row, *col))), ("0010|0020", "deqreg-test")]
    if float_data:
        tags += [("0028|1053", repr(float(slope))), ("0028|1052", "0"), ("0028|0100", "16"), ("0028|0101", "16"),
                 ("0028|0102", "15"), ("0028|0103", "1")]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(sitk, writer, img, tags, uid, folder, paths)
    finally:  # GDCM's writer sets LC_ALL to "C": Python would then write text files as ASCII
        locale.setlocale(locale.LC_ALL, saved_locale)
    return paths


def _write_slices(sitk, writer, img, tags, uid, folder, paths):
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in tags:
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0008|0018", f"{uid}.2.{k}")
        path = folder / f"{uid.rsplit('.', 1)[-1]}_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(s)
        paths.append(path)


def dicom_affine_from_tags(files):
    """RAS affine of a series computed from its DICOM tags with pydicom (independent of ITK), slices
    ordered along the normal row x col as DICOM readers do."""
    import pydicom

    ds = [pydicom.dcmread(str(f)) for f in files]
    iop = np.asarray(ds[0].ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = sorted((np.asarray(d.ImagePositionPatient, dtype=np.float64) for d in ds), key=lambda p: p @ normal)
    dr, dc = (float(v) for v in ds[0].PixelSpacing)  # row spacing (between rows), column spacing
    lps = np.eye(4)
    lps[:3, 0] = row * dc           # i runs along a row (columns)
    lps[:3, 1] = col * dr           # j runs down the rows
    lps[:3, 2] = pos[1] - pos[0]    # k: slice to slice
    lps[:3, 3] = pos[0]
    ras = lps.copy()
    ras[:2, :] *= -1
    return ras
