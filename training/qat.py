"""Quantization-aware fine-tuning: teach a trained model to survive full-int8 conversion.

    python training/qat.py --model runs/mnv2-96/model.keras --data ../shared/fer2013/fer2013.npz \
        --out runs/mnv2-96-qat

Post-training int8 rounds every weight and every activation. A FER2013 model is fragile enough
that this costs points (the 24-epoch model lost 0.98 PublicTest points to int8; after 6 epochs
here its int8 model scored 0.59 above its float one), so this fine-tunes the model with the
rounding simulated in the forward pass and passed straight through in the backward pass:

- weights of Conv2D, DepthwiseConv2D and Dense: symmetric int8, one scale per output channel,
  as the converter quantizes them. Per-channel max-abs rounding is unchanged by the converter's
  folding of BatchNormalization into the kernel (a per-channel scale), so the unfolded kernel
  can be rounded here;
- activations where the int8 graph stores a tensor: after ReLU6 on the fixed 0..6 range the
  converter gives every ReLU6 output; after each linear bottleneck's BatchNormalization, after
  residual Adds and after pooling, asymmetric 8-bit over a range that follows the batches'
  min/max by moving average, as calibration would measure it.

Training data are made as in `train.py` (augmented, upscaled, rounded to whole gray levels), with
`train.py`'s default augmentation whatever the model was trained with (no random erasing: this
step adapts the model to int8 on the usual faces, it does not continue the training recipe). A
model trained before `training/model.py` had its exact int8 input normalization is moved onto
it first (`--epochs 0` does only that). The output is a plain model (same layers, same contract,
no fake-quant ops), so `converter/convert.py` converts it unchanged. Selection is by PublicTest
accuracy of the simulated-int8 model: on FER+'s majority set when `--labels ferplus-*` trains on
FER+ targets, as in `train.py` (same --labels, --ferplus, --contempt and --mix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from serenbox.training import ferplus
from serenbox.training.fer2013 import DatasetError
from serenbox.training.report import write_json_atomic
from serenbox.training.teacher import TeacherError
from serenbox.training.train import (
    LABEL_SOURCES,
    Recipe,
    TrainError,
    fit_data,
    labelled_sets,
    load_data,
    training_batches,
    with_input_pipeline,
)


class QatError(Exception):
    pass


def _fake_quant_weight(kernel, channel_axes: tuple[int, ...]):
    import tensorflow as tf

    reduce_axes = [a for a in range(len(kernel.shape)) if a not in channel_axes]
    scale = tf.maximum(tf.reduce_max(tf.abs(kernel), axis=reduce_axes, keepdims=True), 1e-8) / 127.0
    q = tf.clip_by_value(tf.round(kernel / scale), -127.0, 127.0) * scale
    return kernel + tf.stop_gradient(q - kernel)  # straight-through estimator


def qat_layer_classes():
    """The fake-quant subclasses, built lazily so importing this module needs no Keras."""
    import keras
    import tensorflow as tf
    from keras import layers

    class ActivationRange(keras.layers.Layer):
        """Moving min/max of a tensor and its 8-bit fake quantization."""

        def __init__(self, momentum: float = 0.99, fixed: tuple[float, float] | None = None, **kw):
            super().__init__(**kw)
            self.momentum = momentum
            self.fixed = tuple(fixed) if fixed is not None else None

        def build(self, input_shape):
            if self.fixed is not None:
                return
            zero = keras.initializers.Zeros()
            self.lo = self.add_weight(name="lo", shape=(), initializer=zero, trainable=False)
            self.hi = self.add_weight(name="hi", shape=(), initializer=zero, trainable=False)
            self.seen = self.add_weight(name="seen", shape=(), initializer=zero, trainable=False)

        def call(self, x, training=None):
            if self.fixed is not None:
                return tf.quantization.fake_quant_with_min_max_args(x, *self.fixed, num_bits=8)
            if training:
                lo_b = tf.minimum(tf.reduce_min(x), 0.0)
                hi_b = tf.maximum(tf.reduce_max(x), 0.0)
                m = tf.where(self.seen > 0, self.momentum, 0.0)
                self.lo.assign(m * self.lo + (1 - m) * lo_b)
                self.hi.assign(m * self.hi + (1 - m) * hi_b)
                self.seen.assign(1.0)
            hi = tf.maximum(self.hi, self.lo + 1e-3)
            return tf.quantization.fake_quant_with_min_max_vars(x, self.lo, hi, num_bits=8)

        def get_config(self):
            return {**super().get_config(), "momentum": self.momentum, "fixed": self.fixed}

    def _with_output_range(base):
        # Keras binds call arguments by signature, so each base keeps its own.
        def build(self, input_shape):
            base.build(self, input_shape)
            # The converter stores every ReLU6 output on the fixed 0..6 range (step 6/255 even
            # where the values stay far below 6), not on a calibrated one.
            relu6 = base is layers.ReLU and self.max_value == 6.0
            self.output_range = ActivationRange(name=f"{self.name}_range", fixed=(0.0, 6.0) if relu6 else None)
            self.output_range.build(None)

        if base is layers.BatchNormalization:

            def call(self, inputs, training=None, mask=None):
                return self.output_range(base.call(self, inputs, training=training, mask=mask), training=training)

        else:

            def call(self, inputs, training=None):
                return self.output_range(base.call(self, inputs), training=training)

        return type(f"Quantized{base.__name__}", (base,), {"build": build, "call": call})

    class QuantizedConv2D(layers.Conv2D):
        @property
        def kernel(self):
            return _fake_quant_weight(self._kernel, (3,))

    class QuantizedDense(layers.Dense):
        @property
        def kernel(self):
            return _fake_quant_weight(self._kernel, (1,))

    class QuantizedDepthwiseConv2D(layers.DepthwiseConv2D):
        def call(self, inputs):
            if self.use_bias or self.activation not in (None, keras.activations.linear):
                raise QatError(f"{self.name}: depthwise convolution with bias or activation is not supported")
            return keras.ops.depthwise_conv(
                inputs,
                _fake_quant_weight(self.kernel, (2, 3)),
                strides=self.strides,
                padding=self.padding,
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )

    return {
        "ReLU": _with_output_range(layers.ReLU),
        "BatchNormalization": _with_output_range(layers.BatchNormalization),
        "Add": _with_output_range(layers.Add),
        "GlobalAveragePooling2D": _with_output_range(layers.GlobalAveragePooling2D),
        "Conv2D": QuantizedConv2D,
        "Dense": QuantizedDense,
        "DepthwiseConv2D": QuantizedDepthwiseConv2D,
    }


def _stores_output(layer) -> bool:
    """BatchNormalization outputs are stored only where no ReLU6 follows (linear bottlenecks);
    elsewhere the converter fuses BN and ReLU6 into the convolution and the ReLU stores it."""
    if type(layer).__name__ != "BatchNormalization":
        return True
    return "project" in layer.name


def make_qat_model(model):
    """A twin of `model` whose forward pass rounds as the int8 graph will; shares no state."""
    import keras

    classes = qat_layer_classes()

    def clone(layer):
        cls = classes.get(type(layer).__name__)
        if cls is None or not _stores_output(layer):
            return layer.__class__.from_config(layer.get_config())
        return cls.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy_weights(model, twin)
    return twin


def _layers(model) -> dict:
    out = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.update(_layers(layer))
        else:
            out[layer.name] = layer
    return out


def copy_weights(src, dst) -> None:
    """Copy each layer's own weights by layer name; fake-quant ranges are left alone."""
    s, d = _layers(src), _layers(dst)
    if set(s) != set(d):
        raise QatError("models differ in layers: " + ", ".join(sorted(set(s) ^ set(d))[:5]))
    for name, layer in s.items():
        src_w, dst_w = _own_weights(layer), _own_weights(d[name])
        if len(src_w) != len(dst_w):
            raise QatError(f"{name}: {len(src_w)} weights vs {len(dst_w)}")
        for a, b in zip(src_w, dst_w, strict=True):
            b.assign(a)


def _own_weights(layer) -> list:
    return [w for w in layer.weights if not w.path.endswith(("/lo", "/hi", "/seen"))]


def fine_tune(args: argparse.Namespace) -> dict:
    import keras
    from serenbox.training.model import with_exact_normalization

    if not Path(args.model).is_file():
        raise QatError(f"{args.model}: model file does not exist")
    out: Path = args.out
    if (out / "model.keras").exists():
        raise QatError(f"{out}: already holds a model; choose a new --out")
    # Models trained before the exact int8 input normalization get it here.
    base = with_exact_normalization(keras.models.load_model(args.model))
    size = int(base.input_shape[1])
    r = Recipe(
        input_size=size,
        batch_size=args.batch_size,
        seed=args.seed,
        limit_per_class=args.limit_per_class,
        teacher=args.teacher,
        teacher_weight=args.teacher_weight,
        labels=args.labels,
        contempt=args.contempt,
        mix=args.mix,
    )
    sets = labelled_sets(load_data(args.data, r, args.ferplus), r)
    train_set = sets.train
    out.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(r.seed)
    d = fit_data(sets, r)
    qat = make_qat_model(base)
    pipeline = with_input_pipeline(qat, r)
    steps = int(np.ceil(len(train_set) / r.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=max(1, steps * args.epochs))
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=r.label_smoothing)
    pipeline.compile(keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"])

    # Simulated-int8 accuracy before any update, after a pass that measures activation ranges.
    batches = training_batches(d, r)
    for i in range(min(args.calibration_batches, len(batches))):
        pipeline(batches[i][0], training=True)  # updates ranges and BN statistics (no weight update)
    copy_weights(base, qat)  # restore the BN statistics that pass moved; ranges stay measured
    start = pipeline.evaluate(d.val_x, d.val_y, batch_size=r.batch_size, verbose=0, return_dict=True)["accuracy"]
    print(f"[qat] simulated int8 PublicTest accuracy before fine-tuning {start:.4f}", flush=True)

    best = {"val_accuracy": float(start), "epoch": 0}

    class Keep(keras.callbacks.Callback):
        """`base` holds the best weights so far; written once at the end, so an interrupted run
        leaves no model behind and can simply be started again."""

        def on_epoch_end(self, epoch, logs=None):
            acc = float((logs or {}).get("val_accuracy", -1))
            if acc > best["val_accuracy"]:
                copy_weights(qat, base)
                best.update(val_accuracy=acc, epoch=epoch + 1)
                print(f"[qat] epoch {epoch + 1}: new best simulated int8 PublicTest accuracy {acc:.4f}", flush=True)

    t0 = time.time()
    if args.epochs > 0:  # 0: only move the model onto the exact input normalization
        pipeline.fit(
            batches,
            validation_data=(d.val_x, d.val_y),
            validation_batch_size=r.batch_size,
            epochs=args.epochs,
            callbacks=[keras.callbacks.CSVLogger(str(out / "history_qat.csv")), Keep()],
            verbose=2,
        )
    base.save(out / "model.tmp.keras")
    (out / "model.tmp.keras").replace(out / "model.keras")
    result = {
        "source_model": str(args.model),
        "data": str(args.data),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": r.batch_size,
        "seed": r.seed,
        "limit_per_class": r.limit_per_class,
        "teacher": r.teacher,
        "teacher_weight": r.teacher_weight if r.teacher else 0.0,
        "labels": r.labels,
        "contempt": r.contempt if r.labels != "fer2013" else "",
        "mix": r.mix,
        "selection": "PublicTest FER+ majority" if r.labels != "fer2013" else "PublicTest FER2013",
        "simulated_int8_val_accuracy_before": float(start),
        "best": best,
        "train_seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(result, out / "qat.json")
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Quantization-aware fine-tuning of a trained SerenBox model.")
    p.add_argument("--model", required=True, type=Path, help="trained .keras model (training/train.py output)")
    p.add_argument("--data", required=True, help="FER2013 in any layout the readers support")
    p.add_argument("--out", required=True, type=Path, help="output folder (model.keras, qat.json)")
    p.add_argument("--epochs", type=int, default=6, help="0: only rebuild the input normalization")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (cosine decay)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calibration-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--limit-per-class", type=int, default=0)
    p.add_argument("--teacher", default="", help="distil: soft targets file from training/teacher.py")
    p.add_argument("--teacher-weight", type=float, default=Recipe.teacher_weight, help="teacher's share of the target")
    p.add_argument("--labels", choices=LABEL_SOURCES, default=Recipe.labels, help="training targets, as train.py")
    p.add_argument("--ferplus", default="", help="FER+ votes file (default: ferplus.npz beside --data)")
    p.add_argument("--contempt", choices=ferplus.CONTEMPT_POLICIES, default=Recipe.contempt)
    p.add_argument("--mix", type=float, default=Recipe.mix, help="share of the FER2013 one-hot in a FER+ target")
    args = p.parse_args(argv)
    if not 0.0 <= args.teacher_weight <= 1.0:
        p.error("--teacher-weight must be between 0 and 1")
    if not 0.0 <= args.mix <= 1.0:
        p.error("--mix must be between 0 and 1")
    if args.mix and args.labels == "fer2013":
        p.error("--mix mixes FER2013 into FER+ targets: it needs --labels ferplus-*")
    try:
        fine_tune(args)
    except (QatError, TeacherError, DatasetError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
