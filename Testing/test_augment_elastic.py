"""Elastic augmentation (``--elastic``): labels follow their image, draws are reproducible, resume stays exact."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from DEQRegistrationLib.transforms import jacobian_determinant
from Training import train
from Training.data import Augment, SyntheticPairs, elastic_field


class _Painted:
    """One label map and its "painted" image (label k has intensity table[k]), as fixed and moving."""

    prefactored = False

    def __init__(self, shape=(48, 56)):
        s = SyntheticPairs(shape, n_labels=6, label_scale=10).sample(torch.Generator().manual_seed(0))
        self.labels = s["fixed_labels"].astype(np.int16)
        self.table = np.array([0.0, 0.15, 0.3, 0.5, 0.7, 0.9], dtype=np.float32)
        self.image = self.table[self.labels]

    def sample(self, gen):
        return dict(fixed=self.image.copy(), moving=self.image.copy(), fixed_labels=self.labels.copy(),
                    moving_labels=self.labels.copy(), spacing=np.ones(2))


def _agreement(img, lab, table):
    """Fraction of voxels whose (linearly resampled) intensity is exactly their label's painted value."""
    return float(np.mean(np.abs(img - table[lab]) < 1e-4))


def test_elastic_field_is_smooth_bounded_and_invertible():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        u = elastic_field(gen, (64, 80), (1.0, 1.0), 12.0, 4.0)
        peak = float(u.pow(2).sum(1).sqrt().max())
        assert u.shape == (1, 2, 64, 80) and 0.5 < peak < 4.0 * 1.3
        assert float(jacobian_determinant(u).min()) > 0  # scaling and squaring: no fold
    # anisotropic voxels: the largest displacement is in mm (2 mm voxels along axis 0 halve its voxel units)
    u = elastic_field(torch.Generator().manual_seed(2), (32, 64), (2.0, 1.0), 12.0, 4.0)
    mm = u * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1)
    assert float(mm.pow(2).sum(1).sqrt().max()) < 4.0 * 1.3


def test_elastic_moves_labels_with_their_image_and_is_reproducible():
    src = _Painted()
    aug = Augment(src, flip_axes=(), rotate=8, scale=0.05, elastic=(12, 4))
    a = aug.sample(torch.Generator().manual_seed(3))
    b = aug.sample(torch.Generator().manual_seed(3))
    for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
        np.testing.assert_array_equal(a[k], b[k])  # same seed, same sample
    for which in ("fixed", "moving"):
        img, lab = a[which], a[f"{which}_labels"]
        assert lab.dtype == src.labels.dtype and set(np.unique(lab)) <= set(np.unique(src.labels))
        assert np.mean(lab != src.labels) > 0.02  # the deformation did move the anatomy
        # image (linear) and labels (nearest) went through the same coordinates: away from label edges
        # the resampled intensity is exactly the painted value of the resampled label
        assert _agreement(img, lab, src.table) > 0.75
    # the other image's labels do not fit: fixed and moving were deformed independently
    assert not np.array_equal(a["fixed_labels"], a["moving_labels"])
    assert _agreement(a["fixed"], a["moving_labels"], src.table) < _agreement(a["fixed"], a["fixed_labels"], src.table) - 0.05
    c = aug.sample(torch.Generator().manual_seed(4))
    assert not np.array_equal(a["fixed_labels"], c["fixed_labels"])


def test_elastic_draws_continue_from_a_saved_generator_state():
    aug = Augment(_Painted(), flip_axes=(0,), elastic=(12, 4), gamma=0.1)
    gen = torch.Generator().manual_seed(5)
    aug.sample(gen)
    state = gen.get_state()
    first = [aug.sample(gen) for _ in range(2)]
    gen2 = torch.Generator()
    gen2.set_state(state)
    again = [aug.sample(gen2) for _ in range(2)]
    for x, y in zip(first, again):
        for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
            np.testing.assert_array_equal(x[k], y[k])


def test_elastic_off_adds_no_draws():
    """Without --elastic the generator sees exactly the draws it saw before the option existed."""
    src = _Painted()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    Augment(src, flip_axes=(0,), rotate=5, gamma=0.1).sample(g1)
    Augment(src, flip_axes=(0,), rotate=5, gamma=0.1, elastic=None).sample(g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def _folder(root):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 4):
        s = SyntheticPairs((32, 32), n_labels=4, label_scale=8).sample(torch.Generator().manual_seed(i))
        nib.save(nib.Nifti1Image(s["fixed"].astype(np.float32), np.eye(4)), str(root / f"sub-{i}_img.nii.gz"))
        nib.save(nib.Nifti1Image(s["fixed_labels"].astype(np.int16), np.eye(4)), str(root / f"sub-{i}_lab.nii.gz"))
    return root


def _args(data, out, steps, extra=()):
    return train.parse_args(["--method", "deqreg", "--data", "folder", "--folder", str(data), "--glob", "*_img.nii.gz",
                             "--label-sub", "_img", "_lab", "--label-weight", "1", "--rotate", "5",
                             "--elastic", "8", "2", "--shape", "32", "32", "--enc", "4", "4", "4", "--dec", "4", "4",
                             "4", "--max-steps", "4", "--lr", "1e-3", "--steps", str(steps), "--save-every", "100",
                             "--out", str(out), "--no-progress", "--threads", "1", *extra])


def test_training_with_elastic_resumes_exactly(tmp_path):
    data = _folder(tmp_path / "data")
    train.train(_args(data, tmp_path / "full", 4))
    train.train(_args(data, tmp_path / "half", 2))
    train.train(_args(data, tmp_path / "half", 4, ["--resume"]))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert list(a["config"]["training"]["augment"]["elastic"]) == [8.0, 2.0]
