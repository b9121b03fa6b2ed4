"""The emotion model's front: exact pixel normalization, and migrating models trained before it."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_front_maps_gray_pixels_to_three_equal_channels_on_the_int8_grid():
    import keras
    from serenbox.training.model import NORMALIZE_NAME, build_model

    model = build_model(32, None)
    front = keras.Model(model.input, model.get_layer(NORMALIZE_NAME).output)
    pixels = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
    pixels = np.pad(pixels, ((0, 0), (0, 16), (0, 16), (0, 0)))
    out = front(pixels).numpy()
    expected = (pixels - 128) / 128
    assert out.shape == (1, 32, 32, 3)
    for c in range(3):
        assert np.allclose(out[..., c : c + 1], expected, atol=1e-6)
    assert not model.get_layer(NORMALIZE_NAME).trainable_weights


def test_legacy_front_is_replaced_and_the_rest_kept():
    import keras
    from keras import layers
    from serenbox.training.model import BACKBONE_NAME, NORMALIZE_NAME, build_model, with_exact_normalization

    keras.utils.set_random_seed(0)
    new = build_model(32, None)
    # The front models were trained with before: Concatenate + Rescaling(1/127.5, -1).
    inputs = keras.Input((32, 32, 1), name="pixels")
    x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name=NORMALIZE_NAME)(x)
    x = new.get_layer(BACKBONE_NAME)(x, training=False)
    for name in ("pool", "dropout", "emotion"):
        x = new.get_layer(name)(x)
    legacy = keras.Model(inputs, x)

    migrated = with_exact_normalization(legacy)
    assert isinstance(migrated.get_layer(NORMALIZE_NAME), layers.Conv2D)
    assert migrated.get_layer(BACKBONE_NAME) is legacy.get_layer(BACKBONE_NAME)
    for name in ("pool", "dropout", "emotion"):
        assert migrated.get_layer(name) is legacy.get_layer(name)
    # What the backbone sees moves by at most one gray level: (p-128)/128 vs (p-127.5)/127.5.
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1)).astype(np.float32)

    def front(model):
        return keras.Model(model.input, model.get_layer(NORMALIZE_NAME).output)(x).numpy()

    assert np.abs(front(legacy) - front(migrated)).max() <= 1 / 128 + 1e-6
    assert with_exact_normalization(migrated) is migrated
