"""HD95 from surface voxels (KD-trees) equals HD95 from distance transforms of the surfaces."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from DEQRegistrationLib import metrics


def hd95_by_distance_transforms(a, b, spacing, labels):
    """The textbook route: per label, distance transforms of each surface, read on the other surface."""
    out = {}
    for lab in labels:
        ma, mb = a == lab, b == lab
        sa = ma & ~ndimage.binary_erosion(ma, border_value=0)
        sb = mb & ~ndimage.binary_erosion(mb, border_value=0)
        da = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
        db = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
        out[int(lab)] = max(np.percentile(da, 95), np.percentile(db, 95))
    return out


def blobby_labels(shape, seed, n=5):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((n,) + shape), sigma=[0] + [2.0] * len(shape))
    labels = field.argmax(0) + 1
    labels[field.max(0) < np.percentile(field.max(0), 20)] = 0  # some background, labels touch the border
    return labels.astype(np.uint8)


@pytest.mark.parametrize("shape,spacing", [((30, 26, 22), (1.2, 0.9, 2.0)), ((40, 36), (1.0, 1.5))])
def test_hd95_matches_distance_transforms(shape, spacing):
    a, b = blobby_labels(shape, 0), blobby_labels(shape, 1)
    labels = metrics.common_labels(a, b)
    expected = hd95_by_distance_transforms(a, b, np.asarray(spacing), labels)
    got = metrics.hd95_per_label(a, b, spacing, labels)
    assert set(got) == set(expected)
    for lab in expected:
        assert got[lab] == pytest.approx(expected[lab], rel=1e-9, abs=1e-9)
    # one fixed map, several warped maps: the same numbers as separate calls
    sd = metrics.SurfaceDistance(a, spacing)
    assert sd.hd95(b, labels) == pytest.approx(metrics.hd95(a, b, spacing, labels))
    assert sd.hd95(a, labels) == 0.0
    assert np.isnan(sd.hd95_per_label(np.where(b == labels[0], 0, b), labels)[int(labels[0])])
