"""Masks: a lesion with no counterpart no longer drags the field once masked out; masks map across grids."""
import numpy as np
import pytest

from DEQRegistrationLib import Image, InputError, register
from DEQRegistrationLib.masks import on_grid


def texture(shape, seed=0):
    """Smooth random texture in [0, 1] (sum of Gaussian blobs)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    out = np.zeros(shape, np.float32)
    for _ in range(60):
        c = rng.uniform(0, np.array(shape))
        w = rng.uniform(2.5, 5.0)
        out += np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c)) / (2 * w * w))
    return out / out.max()


SHAPE = (80, 80)
CENTRE, RADIUS = np.array([40.0, 40.0]), 7.0


def lesion_pair():
    """Fixed and moving show the same anatomy (the true field is zero); the moving one has a bright blob."""
    fixed = texture(SHAPE)
    yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    r = np.hypot(yy - CENTRE[0], xx - CENTRE[1])
    moving = np.maximum(fixed, 1.5 * np.exp(-(r / (RADIUS / 1.5)) ** 2) * (r <= RADIUS))
    return Image(fixed, np.eye(4)), Image(moving.astype(np.float32), np.eye(4)), r


def test_a_masked_out_lesion_no_longer_drags_the_field():
    fixed, moving, r = lesion_pair()
    near = r <= RADIUS + 6            # the lesion and its surroundings, where it pulls the field
    far = r >= RADIUS + 20            # anatomy away from it
    kw = dict(device="cpu", init="none", max_steps=60)
    plain = register(fixed, moving, **kw)
    masked = register(fixed, moving, moving_mask=~(r <= RADIUS + 2), **kw)
    mag_plain = np.linalg.norm(plain.displacement, axis=0)
    mag_masked = np.linalg.norm(masked.displacement, axis=0)
    print(f"|u| near the lesion: {mag_plain[near].mean():.3f} -> {mag_masked[near].mean():.3f} voxels; "
          f"far: {mag_plain[far].mean():.3f} -> {mag_masked[far].mean():.3f}")
    assert mag_plain[near].mean() > 0.15 > 20 * mag_plain[far].mean()  # unmasked, the blob drags the field
    assert mag_masked[near].mean() < 0.2 * mag_plain[near].mean()
    assert mag_masked[far].mean() < 0.1 and mag_plain[far].mean() < 0.1  # the rest of the image is unaffected


def test_a_mask_on_another_grid_is_mapped_through_both_affines():
    image = Image(np.zeros((20, 30), np.float32), np.diag([2.0, 2.0, 1.0, 1.0]))
    coarse = np.zeros((10, 15), np.uint8)
    coarse[2:5, 3:9] = 3                               # a label value, not just 1
    affine = np.diag([4.0, 4.0, 1.0, 1.0])
    affine[:2, 3] = 1.0                                # coarse voxel centres sit between fine ones
    mapped = on_grid(Image(coarse, affine), image, "mask")
    ras = np.stack(np.nonzero(mapped), 1) * 2.0
    coarse_idx = np.rint((ras - 1.0) / 4.0).astype(int)
    assert mapped.sum() > 0 and np.all(coarse[tuple(coarse_idx.T)] == 3)


def test_masks_with_a_learned_model_are_refused_before_any_work():
    img = Image(texture((32, 32)), np.eye(4))
    with pytest.raises(InputError, match="masks weight the gradient update"):
        register(img, img, update="learned", model="default", fixed_mask=np.ones((32, 32), bool))
