"""Training augmentation (training/augment.py) and the batches train.py and qat.py fit on."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from serenbox.training.augment import Augmentation, affine_matrix, augment_batch
from serenbox.training.train import FitData, Recipe, training_batches

NONE = Augmentation(rotation=0, shift=0, zoom=0, brightness=0, contrast=0)


def _faces(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1)).astype(np.float32)


def test_without_magnitudes_each_face_is_kept_or_mirrored_exactly():
    x = _faces(32)
    out = augment_batch(x, np.random.default_rng(1), NONE)
    kept = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(kept | mirrored)
    assert kept.any() and mirrored.any()


def test_output_keeps_shape_dtype_and_gray_range():
    x = _faces(64)
    out = augment_batch(x, np.random.default_rng(2))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, x)


def test_same_seed_same_batch_other_seed_other_batch():
    x = _faces()
    a = augment_batch(x, np.random.default_rng(3))
    assert np.array_equal(a, augment_batch(x, np.random.default_rng(3)))
    assert not np.array_equal(a, augment_batch(x, np.random.default_rng(4)))


def test_contrast_both_lowers_and_raises():
    # Keras 3.15's RandomContrast(0.25) draws its factor from [1.0, 1.25]: it only ever raises.
    x = np.full((200, 48, 48, 1), 100.0, np.float32)
    x[:, ::2] = 140.0
    out = augment_batch(x, np.random.default_rng(5), Augmentation(rotation=0, shift=0, zoom=0, brightness=0))
    ratio = out.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
    assert ratio.min() < 0.8 and ratio.max() > 1.2
    assert np.all((ratio > 0.74) & (ratio < 1.26))


def test_a_shift_moves_the_face_by_that_many_pixels():
    img = np.zeros((48, 48), np.float32)
    img[20, 10] = 255.0
    m = affine_matrix(48, 0.0, (5.0, -3.0), 1.0)
    out = cv2.warpAffine(img, m, (48, 48), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert np.unravel_index(out.argmax(), out.shape) == (17, 15)


def test_zoom_above_one_makes_the_face_smaller():
    img = np.zeros((48, 48), np.float32)
    img[14:34, 14:34] = 255.0  # a 20-pixel square in the middle
    out = cv2.warpAffine(img, affine_matrix(48, 0.0, (0, 0), 1.1), (48, 48), flags=cv2.WARP_INVERSE_MAP)
    assert (out > 127).sum() < (img > 127).sum() * 0.9


def test_rotation_is_about_the_centre():
    img = np.zeros((48, 48), np.float32)
    img[23:25, 23:25] = 255.0  # the centre stays put
    img[23:25, 40] = 255.0  # a point to the right moves off its row
    out = cv2.warpAffine(img, affine_matrix(48, np.pi / 2, (0, 0), 1.0), (48, 48), flags=cv2.WARP_INVERSE_MAP)
    assert out[23:25, 23:25].min() > 200
    assert out[23:25, 40].max() < 50 and out[:, 23:25].max() > 200


def _fit_data(n: int) -> FitData:
    x = _faces(n, seed=7)
    ids = np.arange(n, dtype=np.float32)
    # The target and weight carry each image's id, to check they travel with their image.
    return FitData(x=x, y=np.repeat(ids[:, None], 7, 1), weights=ids.copy(), val_x=x[:2], val_y=np.zeros((2, 7)))


def test_an_epoch_of_batches_covers_every_image_once_with_its_own_target():
    d = _fit_data(50)
    batches = training_batches(d, Recipe(batch_size=16, augment=False))
    assert len(batches) == 4
    seen = []
    for i in range(len(batches)):
        x, y, w = batches[i]
        assert np.array_equal(y[:, 0], w)
        assert np.array_equal(x, d.x[w.astype(int)])
        seen.extend(w.astype(int))
    assert sorted(seen) == list(range(50))


def test_batches_repeat_within_an_epoch_and_reshuffle_after_it():
    d = _fit_data(64)
    batches = training_batches(d, Recipe(batch_size=16, seed=11))
    first = batches[1]
    assert np.array_equal(first[0], batches[1][0])  # a worker thread asking again gets the same batch
    batches.on_epoch_end()
    assert not np.array_equal(first[2], batches[1][2])


@pytest.mark.parametrize("augment", [True, False])
def test_batches_are_augmented_only_when_the_recipe_says(augment: bool):
    d = _fit_data(32)
    x, _, w = training_batches(d, Recipe(batch_size=32, augment=augment))[0]
    assert np.array_equal(x, d.x[w.astype(int)]) is not augment


def test_random_erasing_blanks_one_rectangle_of_one_gray_per_face():
    x = _faces(64)
    plain = augment_batch(x, np.random.default_rng(7), NONE)
    erased = augment_batch(x, np.random.default_rng(7), replace(NONE, erase=1.0))
    for before, after in zip(plain[..., 0], erased[..., 0], strict=True):
        rows, cols = np.nonzero(before != after)
        box = after[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert np.all(box == box[0, 0])  # one rectangle, one gray level, nothing outside it
        assert len(rows) == box.size
        assert 0.01 <= box.size / before.size <= 0.21


def test_random_erasing_hits_its_share_of_faces_and_leaves_the_other_draws_alone():
    x = _faces(400)
    plain = augment_batch(x, np.random.default_rng(8))
    erased = augment_batch(x, np.random.default_rng(8), Augmentation(erase=0.5))
    hit = np.any(plain != erased, axis=(1, 2, 3))
    assert 0.4 < hit.mean() < 0.6
    # Faces it skipped are the very faces augmentation without erasing makes from the same seed.
    assert np.array_equal(plain[~hit], erased[~hit])


def test_the_recipes_erase_reaches_the_batches():
    d = _fit_data(64)
    plain, _, w = training_batches(d, Recipe(batch_size=64))[0]
    erased, _, w2 = training_batches(d, Recipe(batch_size=64, erase=1.0))[0]
    assert np.array_equal(w, w2)
    for before, after in zip(plain, erased, strict=True):
        changed = after[before != after]
        assert changed.size > 0 and np.all(changed == changed[0])  # each face: one flat patch
