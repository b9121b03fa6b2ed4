"""The emotion model: ImageNet MobileNetV2 with a 7-way head, honouring the model contract.

Contract (the converter and the device rely on it): input is face pixels 0..255 at the
model's input size, gray when it has 1 channel; all normalisation happens inside; the
output is 7 probabilities in `LABELS` order.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers
from serenbox.device.labels import LABELS

BACKBONE_NAME = "mobilenetv2_1.00"
NORMALIZE_NAME = "to_minus1_1"


def build_model(
    input_size: int, weights: str | Path | None, dropout: float = 0.3, alpha: float = 1.0, bn_momentum: float = 0.99
) -> keras.Model:
    """MobileNetV2 backbone (`weights`: a local Keras h5 file, or None for random) plus head."""
    inputs = keras.Input((input_size, input_size, 1), name="pixels")
    x = pixels_to_rgb_unit_range()(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3),
        alpha=alpha,
        include_top=False,
        weights=None,
        name=BACKBONE_NAME,
    )
    if weights is not None:
        backbone.load_weights(str(weights))
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            # Keras' 0.999 keeps ImageNet statistics for thousands of steps, so evaluation
            # (and model selection) lag the weights by epochs on a short FER2013 schedule.
            layer.momentum = bn_momentum
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(len(LABELS), activation="softmax", name="emotion")(x)
    return keras.Model(inputs, outputs, name=f"serenbox_emotion_{input_size}")


def pixels_to_rgb_unit_range() -> layers.Layer:
    """Gray pixels 0..255 → 3 equal channels (p − 128) / 128, as one fixed 1×1 convolution.

    MobileNetV2 expects −1..1 RGB (the seed fed 0..1, a silent mismatch with its ImageNet
    weights); gray faces repeat their channel inside the model so the device sends one. Why a
    convolution, and why 128: in full int8 this is one CONV_2D whose every output is exact
    ((p − 128) / 128 is an int8 with scale 1/128 and zero point 0). Keras' Rescaling(1/127.5, −1)
    became MUL + ADD whose int8 outputs cannot hold (2p − 255) / 255 (the zero point must be
    an integer), adding about a gray level of rounding noise to every pixel; with this layer the
    int8 drop on PublicTest fell from 1.73 to 1.00 points (docs/model-card.md).
    """
    return layers.Conv2D(
        3,
        1,
        name=NORMALIZE_NAME,
        trainable=False,
        kernel_initializer=keras.initializers.Constant(1 / 128),
        bias_initializer=keras.initializers.Constant(-1.0),
    )


def with_exact_normalization(model: keras.Model) -> keras.Model:
    """A model trained with the older Concatenate + Rescaling(1/127.5, −1) front, rebuilt with
    `pixels_to_rgb_unit_range` and the same trained layers; what the backbone sees moves by
    at most one gray level ((p − 128)/128 against (p − 127.5)/127.5)."""
    front = model.get_layer(NORMALIZE_NAME)
    if isinstance(front, layers.Conv2D):
        return model
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = pixels_to_rgb_unit_range()(inputs)
    x = model.get_layer(BACKBONE_NAME)(x)
    for name in ("pool", "dropout", "emotion"):
        x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name=model.name)


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)
