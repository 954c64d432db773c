"""The lung path end to end: a breathing-like synthetic CT pair in the Learn2Reg layout, through
``deqreg batch TASK_dataset.json`` with the lung-ct preset, lung masks and keypoint TRE."""
import json

import numpy as np
import pytest

from DEQRegistrationLib import io
from DEQRegistrationLib.batch import read_pairs
from DEQRegistrationLib.cli import main
from DEQRegistrationLib.synthetic import breathing_pair, write_learn2reg


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("l2r")
    pair = breathing_pair(shape=(40, 32, 40), spacing_mm=3.5, amplitude_mm=12.0, n_keypoints=40)
    return folder, write_learn2reg(folder, [pair]), pair


def test_the_files_follow_the_learn2reg_layout(task):
    folder, dataset, pair = task
    doc = json.loads(dataset.read_text())
    assert doc["registration_val"] == [{"fixed": "./imagesTr/SyntheticLung_0001_0000.nii.gz",
                                        "moving": "./imagesTr/SyntheticLung_0001_0001.nii.gz"}]
    kp = np.loadtxt(folder / "keypointsTr" / "SyntheticLung_0001_0000.csv", delimiter=",")
    np.testing.assert_allclose(kp, pair["fixed_keypoints"], atol=1e-6)  # voxel coordinates, no header
    mask = io.load_labels(folder / "masksTr" / "SyntheticLung_0001_0001.nii.gz")
    assert set(np.unique(mask.data)) == {0, 1}
    (p,) = read_pairs(dataset)
    assert p.files["fixed_mask"].endswith("masksTr/SyntheticLung_0001_0000.nii.gz")
    assert p.files["moving_landmarks"].endswith("keypointsTr/SyntheticLung_0001_0001.csv")


def test_lung_preset_with_masks_halves_the_keypoint_error(task, tmp_path):
    folder, dataset, pair = task
    out = tmp_path / "runs"
    assert main(["batch", str(dataset), "--out", str(out), "--preset", "lung-ct", "--device", "cpu"]) == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 1
    m = json.loads((out / "SyntheticLung_0001_0000_0001" / "metrics.json").read_text())
    print(f"keypoint TRE {m['tre_before_mm']:.2f} -> {m['tre_mm']:.2f} mm, folding {m['folding_percent']:.3f} %, "
          f"inside the lungs {m['folding_percent_mask']:.3f} %")
    assert m["inputs"]["fixed_mask"].endswith("SyntheticLung_0001_0000.nii.gz")
    assert m["settings"]["similarity"] == "mind" and m["settings"]["preset"] == "lung-ct"
    assert m["tre_before_mm"] > 2.0 and m["tre_mm"] <= 0.5 * m["tre_before_mm"]
    assert m["folding_percent"] < 0.1
