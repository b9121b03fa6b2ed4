"""The emotion model: ImageNet MobileNetV2 with a 7-way head, honouring the model contract.

Contract (the converter and the device rely on it): input is face pixels 0..255 at the
model's input size, gray when it has 1 channel; all normalisation happens inside; the
output is 7 probabilities in `LABELS` order.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from device.labels import LABELS

BACKBONE_NAME = "mobilenetv2_1.00"


def build_model(
    input_size: int, weights: str | Path | None, dropout: float = 0.3, alpha: float = 1.0, bn_momentum: float = 0.99
) -> keras.Model:
    """MobileNetV2 backbone (`weights`: a local Keras h5 file, or None for random) plus head."""
    inputs = keras.Input((input_size, input_size, 1), name="pixels")
    # Gray faces feed an RGB-pretrained backbone: repeat the channel inside the model so the
    # device sends one channel and quantization sees the real pixel range.
    x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    # MobileNetV2 expects -1..1 (the seed used 0..1, a silent mismatch with its ImageNet weights).
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1")(x)
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


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)
