"""Learn2Reg datasets: the pairs a ``*_dataset.json`` lists, as ``deqreg batch`` rows.

A Learn2Reg task folder (e.g. NLST) holds ``imagesTr/``, optionally
``masksTr/`` and ``keypointsTr/`` (same file names; keypoints as ``.csv``
voxel coordinates), and ``{TASK}_dataset.json`` whose ``registration_val``
(or ``training_paired_images``, ``registration_test``) entries name each
pair's ``fixed`` and ``moving`` image, paths relative to the JSON. The
``training`` entries give an image's ``mask`` and ``keypoints`` when listed;
otherwise the files of the same name in ``masksTr/`` and ``keypointsTr/``
are used when they exist. ``deqreg batch TASK_dataset.json`` then registers
every pair with its masks and measures keypoint TRE.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from .errors import InputError

#: pair lists looked for in the dataset JSON, in this order
PAIR_LISTS = ("registration_val", "training_paired_images", "registration_test")


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _companion(base: Path, image: str, folder: str, suffix: str) -> Optional[str]:
    """``masksTr/NAME.nii.gz`` or ``keypointsTr/NAME.csv`` beside ``imagesTr/NAME.nii.gz``, if it exists."""
    p = base / image
    candidate = p.parent.parent / folder / (_stem(image) + suffix)
    return str(candidate) if candidate.is_file() else None


def dataset_rows(path) -> List[Dict[str, Optional[str]]]:
    """One dict per pair: id, fixed, moving, fixed_mask, moving_mask, fixed_landmarks, moving_landmarks
    (absolute paths or None). Refuses a JSON without any pair list."""
    path = Path(path).expanduser()
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as a Learn2Reg dataset JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a Learn2Reg dataset JSON is an object with a {PAIR_LISTS[0]} list")
    pairs = next((doc[k] for k in PAIR_LISTS if isinstance(doc.get(k), list) and doc[k]), None)
    if not pairs:
        raise InputError(f"{path}: no pairs ({' / '.join(PAIR_LISTS)} are missing or empty)")
    base = path.resolve().parent
    listed = {Path(e["image"]).as_posix(): e for e in doc.get("training", []) + doc.get("test", [])
              if isinstance(e, dict) and "image" in e}
    rows = []
    for n, pair in enumerate(pairs, start=1):
        if not isinstance(pair, dict) or not pair.get("fixed") or not pair.get("moving"):
            raise InputError(f"{path}: pair {n} does not name a fixed and a moving image")
        row = dict(id=f"{_stem(pair['fixed'])}_{_stem(pair['moving']).rsplit('_', 1)[-1]}")
        for role in ("fixed", "moving"):
            image = pair[role]
            entry = listed.get(Path(image).as_posix(), {})
            row[role] = str(base / image)
            mask = entry.get("mask") or _companion(base, image, "masksTr", ".nii.gz")
            points = entry.get("keypoints") or _companion(base, image, "keypointsTr", ".csv")
            row[f"{role}_mask"] = None if mask is None else str(base / mask)
            row[f"{role}_landmarks"] = None if points is None else str(base / points)
        for kind in ("mask", "landmarks"):  # both sides or neither, as deqreg register asks
            if (row[f"fixed_{kind}"] is None) != (row[f"moving_{kind}"] is None):
                row[f"fixed_{kind}"] = row[f"moving_{kind}"] = None
        rows.append(row)
    return rows
