"""The one-click sample pair: real anatomy, offline, the same pair as ``deqreg demo``.

``DEQRegistrationLib.demo_data.make_demo_pair`` builds it from the MNI
ICBM152 2009a template that nilearn's wheel ships (no download): the fixed
volume is the template (2 mm), the moving one the same template under a known
smooth deformation, each with a CSF / grey matter / white matter label map,
so Dice before and after means something. Here the pair becomes four nodes.
Needs torch (the library) and nilearn; the module asks before installing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import mrml

NAMES = ("MNI152 template", "MNI152 deformed", "MNI152 tissues", "MNI152 deformed tissues")


@dataclass
class SamplePair:
    fixed: object
    moving: object
    fixedLabels: object
    movingLabels: object
    description: str


def loadSamplePair(scene, voxel_mm: int = 2) -> SamplePair:
    """Add the sample pair to ``scene`` (volumes and label maps); returns the nodes."""
    from DEQRegistrationLib.demo_data import make_demo_pair
    pair = make_demo_pair(voxel_mm=voxel_mm)
    arrays = (pair.fixed.data.astype(np.float32), pair.moving.data.astype(np.float32),
              pair.fixed_labels.astype(np.int16), pair.moving_labels.astype(np.int16))
    affines = (pair.fixed.affine, pair.moving.affine, pair.fixed.affine, pair.moving.affine)
    nodes = []
    for name, data, affine in zip(NAMES, arrays, affines):
        labelmap = data.dtype == np.int16
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(name))
        mrml.update_volume(node, data, affine)
        node.CreateDefaultDisplayNodes()
        node.SetAttribute("DEQReg.sample", pair.description)
        nodes.append(node)
    return SamplePair(*nodes, description=pair.description)
