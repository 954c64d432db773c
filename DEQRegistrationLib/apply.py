"""A saved registration result, and applying it to images, label maps and points (``deqreg apply``).

What ``deqreg register --out DIR`` saves, and this module reads back:

* ``displacement.nii.gz`` (or .nrrd/.mha): the forward displacement field d on
  the fixed grid, an ITK displacement field in LPS mm (see ``io``).
* ``affine.tfm``: *when an alignment stage found one*, the linear world
  transform W (fixed RAS -> moving RAS) as an ITK affine; absent means identity.
* ``inverse.nii.gz`` (``--inverse``): the inverse field w on the moving grid
  (``inverse``), with ``inverse_unreliable.nii.gz`` marking where it is not to
  be trusted.
* ``transform.json``: the manifest naming those files and both grids (shape
  and voxel-to-RAS affine, at full precision).

Directions (the ITK convention: a transform maps points of the space an
image is resampled *into* to the space it is sampled *from*):

    forward  fixed point x   ->  moving point  W (x + d(x))
    inverse  moving point y  ->  fixed point   W^-1 (y + w(y))

so the forward transform warps moving-space images onto the fixed grid and
carries fixed-space landmarks into the moving space (where TRE is measured);
the inverse warps fixed-space images onto the moving grid and carries moving
landmarks into the fixed space. In ITK terms the forward transform is a
composite that applies the displacement field first, then the affine.

Exactness: the CLI derives ``warped``, ``warped_seg`` and its metrics from
the field *as saved* (``saved_result``), through the same functions ``apply``
uses, so applying the saved result to the same inputs reproduces them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import io
from .errors import InputError
from .geometry import physical_to_voxel_points, voxel_to_physical_points
from .image import Image
from .sampling import Sampler

MANIFEST = "transform.json"
FORMAT_NAME = "deqreg-transform"
VERSION = 1
#: a reference grid agrees with a transform's grid when every affine entry is within this (mm)
GRID_ATOL = 1e-3
CONVENTION = ("forward: fixed RAS point x -> moving RAS point W(x + d(x)) (displacement field first, then the "
              "affine W; identity when 'affine' is null); inverse: moving RAS point y -> W^-1(y + w(y)). Fields "
              "are ITK displacement fields (LPS mm) on the grid named beside them.")


@dataclass
class Grid:
    """A voxel grid: array shape and voxel-to-RAS affine."""
    shape: tuple
    affine: np.ndarray

    @classmethod
    def of(cls, image: Image) -> "Grid":
        return cls(tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64))

    def as_dict(self) -> dict:
        return dict(shape=list(self.shape), affine_ras=[[float(v) for v in row] for row in self.affine])

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(int(n) for n in d["shape"]), np.asarray(d["affine_ras"], dtype=np.float64))

    def describe(self) -> str:
        return "x".join(str(n) for n in self.shape)

    def check(self, other: "Grid", what: str, role: str) -> None:
        """Refuse ``other`` (the user's reference) unless it is this grid."""
        if tuple(other.shape) != tuple(self.shape):
            raise InputError(f"{what}: the transform is defined on a {self.describe()} grid ({role}), but the "
                             f"reference is {other.describe()}; give the {role} the registration used")
        diff = float(np.abs(np.asarray(other.affine) - self.affine).max())
        if diff > GRID_ATOL:
            raise InputError(f"{what}: the reference has the {role}'s shape but another geometry (affines differ "
                             f"by up to {diff:.3g} mm); give the {role} the registration used")


@dataclass
class SavedTransform:
    """A registration result as saved: forward field, optional affine, optional inverse, both grids."""
    fixed: Grid
    displacement: np.ndarray                 # (ndim, *fixed.shape), fixed voxel units, as the file holds it
    moving: Optional[Grid] = None
    world: Optional[np.ndarray] = None       # W, fixed RAS -> moving RAS; None: identity
    inverse: Optional[np.ndarray] = None     # (ndim, *moving.shape), moving voxel units (Sampler form, world W^-1)
    inverse_info: Optional[dict] = None
    source: str = ""
    displacement_lps: Optional[np.ndarray] = None  # (*fixed.shape, 3) float32 LPS mm: the file's values
    field_file: Optional[Path] = None  # the forward field already written there (its LPS array then released)

    def __post_init__(self):
        if self.displacement_lps is None and self.field_file is None:
            from .chunked import field_as_saved

            self.displacement_lps = field_as_saved(self.displacement, self.fixed.affine)[0]

    @property
    def ndim(self) -> int:
        return self.displacement.shape[0]

    @property
    def world_inv(self) -> Optional[np.ndarray]:
        return None if self.world is None else np.linalg.inv(self.world)

    # --- images and label maps --------------------------------------------------------

    def warp(self, data: np.ndarray, data_affine: np.ndarray, order: int = 1, inverse: bool = False) -> np.ndarray:
        """Resample ``data`` (with its own voxel-to-RAS affine) onto the fixed grid, or the moving grid with
        ``inverse``. order 0 nearest (labels), 1 linear, 3 B-spline."""
        import torch

        if inverse:
            if self.inverse is None:
                raise ValueError("this transform has no inverse field; compute one with with_inverse()")
            sampler = Sampler(self.moving.shape, self.moving.affine, data_affine, world=self.world_inv)
            field = self.inverse
        else:
            sampler = Sampler(self.fixed.shape, self.fixed.affine, data_affine, world=self.world)
            field = self.displacement
        with torch.no_grad():
            return sampler.resample(np.asarray(data), field, order=order)

    def output_grid(self, inverse: bool = False) -> Grid:
        return self.moving if inverse else self.fixed

    # --- points ------------------------------------------------------------------------

    def points(self, points_ras: np.ndarray, inverse: bool = False):
        """Map RAS points (N, 3): fixed -> moving space, or moving -> fixed with ``inverse``.

        Forward: the field is interpolated linearly at the points (as the TRE
        in metrics.json). Inverse: the fixed point v = -u(q + v) is solved at
        the points themselves (``inverse.invert_points``), which is exact up
        to the solver's tolerance; interpolating the gridded inverse between
        voxels would add its interpolation error. Returns (points, info or None).
        """
        pts = np.asarray(points_ras, dtype=np.float64)
        if inverse:
            from .inverse import invert_points

            return invert_points(self.displacement, self.fixed.affine, pts, world=self.world)
        target = self.moving.affine if self.moving is not None else self.fixed.affine
        sampler = Sampler(self.fixed.shape, self.fixed.affine, target, world=self.world)
        p = physical_to_voxel_points(pts, self.fixed.affine, self.ndim)
        return voxel_to_physical_points(sampler.points(p, self.displacement), target), None

    # --- inverse -----------------------------------------------------------------------

    def with_inverse(self, grid: Optional[Grid] = None, **solver):
        """(copy with the inverse computed on ``grid`` (default: the moving grid), InverseResult)."""
        from .inverse import invert

        grid = grid or self.moving
        if grid is None:
            raise InputError("the moving grid is unknown (no transform.json): give the moving image as --reference")
        res = invert(self.displacement, self.fixed.affine, grid.shape, grid.affine, world=self.world, **solver)
        out = dataclasses.replace(self, moving=grid, inverse=res.displacement, inverse_info=res.summary())
        return out, res


def map_points_file(t: SavedTransform, pf, reference: Image, inverse: bool = False):
    """(mapped values to write back in ``pf``'s format, inverse info or None) for an ``io.PointsFile``.

    .csv files hold voxel coordinates: of ``reference`` on input, of the other
    grid (moving forward, fixed inverse) on output. .fcsv/.mrk.json hold RAS
    points (``io`` converts their stored system).
    """
    if pf.kind != "csv":
        return t.points(pf.points, inverse=inverse)
    if pf.points.shape[1] != reference.ndim:
        raise InputError(f"points: {pf.path} has {pf.points.shape[1]} columns but the reference is "
                         f"{reference.ndim}D")
    target = t.fixed if inverse else t.moving
    if target is None:
        raise InputError("points: voxel .csv points are written on the moving grid, which a bare displacement "
                         "field does not name; give the 'deqreg register' output folder, or use .fcsv/.mrk.json "
                         "points (RAS/LPS mm)")
    moved, info = t.points(voxel_to_physical_points(pf.points, reference.affine), inverse=inverse)
    return physical_to_voxel_points(moved, target.affine, len(target.shape)), info


# --- from a registration result -----------------------------------------------------------


def field_as_saved(displacement: np.ndarray, fixed_affine: np.ndarray, in_place: bool = False):
    """(float32 LPS mm as the ITK file stores it, the voxel field reading that file back gives).

    Computed in slabs (``chunked.field_as_saved``, the same numbers); with
    ``in_place`` the voxel field overwrites ``displacement``.
    """
    from .chunked import field_as_saved as slabbed

    return slabbed(displacement, fixed_affine, in_place=in_place)


def saved_result(result, moving: Image, moving_labels: Optional[np.ndarray] = None, reuse_field: bool = False,
                 on_field=None):
    """(result re-derived from the field as saved, SavedTransform).

    The displacement becomes exactly what ``displacement.*`` holds once read
    back; warped image, warped labels and Jacobian are computed from it the
    way ``deqreg apply`` computes them. The differences to ``result`` are at
    float32 rounding level; what they buy is that the files are reproducible.
    ``reuse_field``: the saved field overwrites ``result.displacement`` (a
    caller that drops ``result`` saves a full-size copy); the Jacobian is
    computed in slabs either way (``chunked``). ``on_field(transform)`` runs
    before anything is warped: the CLI writes the field file there and
    releases its LPS array (``memory.FieldSpill``).
    """
    from . import chunked

    fixed = Grid(tuple(result.displacement.shape[1:]), np.asarray(result.fixed_affine, dtype=np.float64))
    world = getattr(result, "world", None)
    if world is not None and np.allclose(world, np.eye(4), atol=0, rtol=0):
        world = None
    disp = result.displacement
    in_place = bool(reuse_field and isinstance(disp, np.ndarray) and disp.dtype == np.float32 and disp.flags.writeable)
    lps, vox = field_as_saved(disp, fixed.affine, in_place=in_place)
    t = SavedTransform(fixed, vox, Grid.of(moving), world, displacement_lps=lps)
    del lps
    if on_field is not None:
        on_field(t)
    warped = t.warp(moving.data, moving.affine, order=1)
    labels = None if moving_labels is None else t.warp(moving_labels, moving.affine, order=0)
    new = dataclasses.replace(result, displacement=t.displacement,
                              warped=Image(warped, fixed.affine.copy()), warped_labels=labels,
                              jacobian=chunked.jacobian_determinant(t.displacement))
    return new, t


# --- files ---------------------------------------------------------------------------


def save(folder: Path, t: SavedTransform, fmt: str = "nii", inverse=None, compresslevel=None) -> dict:
    """Write the transform's files and ``transform.json`` into ``folder``; returns the manifest.

    ``inverse`` is an ``inverse.InverseResult`` on the moving grid (or None);
    ``compresslevel`` applies to the displacement fields' .nii.gz (``io``).
    """
    from .geometry import ras_to_lps

    folder = Path(folder)
    disp_name = io.output_name("displacement", fmt)
    if t.field_file is None or Path(t.field_file) != folder / disp_name:  # not already written there
        if t.displacement_lps is None:
            raise ValueError(f"the field was written to {t.field_file}, not into {folder}")
        io.save_itk_displacement(t.displacement_lps, t.fixed.affine, folder / disp_name, compresslevel=compresslevel)
    affine_name = None
    if t.world is not None:
        affine_name = "affine.tfm"
        io.save_itk_affine(t.world, folder / affine_name)
    doc = dict(format=FORMAT_NAME, version=VERSION, convention=CONVENTION,
               fixed_grid=t.fixed.as_dict(), moving_grid=None if t.moving is None else t.moving.as_dict(),
               forward=dict(displacement=disp_name, affine=affine_name), inverse=None)
    if inverse is not None:
        inv_name, mask_name = io.output_name("inverse", fmt), io.output_name("inverse_unreliable", fmt)
        io.save_itk_displacement(ras_to_lps(inverse.displacement_ras), inverse.target_affine, folder / inv_name,
                                 compresslevel=compresslevel)
        io.save_labels(inverse.mask, inverse.target_affine, folder / mask_name)
        doc["inverse"] = dict(displacement=inv_name, unreliable_mask=mask_name,
                              mask_values={"0": "reliable", "1": "unreliable (error above threshold, or folded)",
                                           "2": "pre-image outside the fixed grid"},
                              **inverse.summary())
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def load(path, reference: Image, inverse: bool = False, what: str = "transform") -> SavedTransform:
    """Read a saved result: a ``deqreg register`` folder, its transform.json, or a bare displacement field.

    ``reference`` is the image the user named as the output grid (the fixed
    image; the moving image with ``inverse``); it must be the grid the
    transform was computed on. A bare field has no manifest: its own header
    gives the fixed grid (checked against the reference, whose affine is then
    used at full precision) and the moving grid is unknown.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what}: not found: {path}")
    manifest = path / MANIFEST if path.is_dir() else (path if path.name.endswith(".json") else None)
    if path.is_dir() and not manifest.is_file():
        raise InputError(f"{what}: {path} is a folder without {MANIFEST}; give a 'deqreg register' output "
                         "folder or a displacement field file")
    ref = Grid.of(reference)
    if manifest is None:
        return _load_bare(path, ref, inverse, what)
    try:
        doc = json.loads(manifest.read_text())
        if doc.get("format") != FORMAT_NAME:
            raise KeyError("format")
        if int(doc.get("version", 0)) > VERSION:
            raise InputError(f"{what}: {manifest} is version {doc['version']}; this deqreg reads up to {VERSION}")
        fixed = Grid.from_dict(doc["fixed_grid"])
        moving = Grid.from_dict(doc["moving_grid"]) if doc.get("moving_grid") else None
        forward = doc["forward"]
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what}: {manifest} is not a deqreg transform manifest ({type(exc).__name__}: "
                         f"{exc})") from None
    base = manifest.parent
    if inverse:
        if moving is not None:
            moving.check(ref, what, "moving image")
    else:
        fixed.check(ref, what, "fixed image")
    lps, faff = io.load_itk_displacement(base / forward["displacement"], f"{what} field")
    _check_field(lps, faff, fixed, what)
    world = io.load_itk_affine(base / forward["affine"], f"{what} affine") if forward.get("affine") else None
    t = SavedTransform(fixed, io.itk_displacement_to_voxel(lps, fixed.affine), moving, world, source=str(path),
                       displacement_lps=lps)
    inv = doc.get("inverse")
    if inverse and inv:
        ilps, iaff = io.load_itk_displacement(base / inv["displacement"], f"{what} inverse field")
        _check_field(ilps, iaff, moving, what)
        t.inverse = io.itk_displacement_to_voxel(ilps, moving.affine)
        t.inverse_info = {k: v for k, v in inv.items() if k not in ("displacement", "unreliable_mask")}
    return t


def _check_field(lps, file_affine, grid: Grid, what):
    shape = tuple(lps.shape[:-1])
    if shape != tuple(grid.shape) or np.abs(file_affine - grid.affine).max() > GRID_ATOL:
        raise InputError(f"{what}: the field file does not lie on the grid its manifest names "
                         f"({'x'.join(map(str, shape))} vs {grid.describe()})")


def _load_bare(path: Path, ref: Grid, inverse: bool, what: str) -> SavedTransform:
    if io._suffix(path) in (".tfm", ".txt", ".mat", ".h5", ".hdf5"):
        raise InputError(f"{what}: {path} is a transform file deqreg does not apply on its own; give the "
                         "'deqreg register' output folder or a displacement field (.nii.gz, .nrrd, .mha)")
    lps, faff = io.load_itk_displacement(path, what)
    field_grid = Grid(tuple(lps.shape[:-1]), faff)
    if inverse:
        # the field is a forward one on the fixed grid; the reference is the moving image (any grid)
        fixed = field_grid
    else:
        field_grid.check(ref, what, "fixed image")
        fixed = Grid(field_grid.shape, ref.affine)  # the reference's affine at full precision
    return SavedTransform(fixed, io.itk_displacement_to_voxel(lps, fixed.affine), None, None, source=str(path),
                          displacement_lps=lps)
