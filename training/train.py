"""Train the SerenBox emotion model: ImageNet MobileNetV2 transfer-learned on FER2013.

    python training/train.py --data ../shared/fer2013/fer2013.npz \
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \
        --out runs/mnv2-96

Schedule: the head alone on a frozen backbone, then the whole network at a lower, cosine-
decayed learning rate. Model selection, early stopping and the final report use PublicTest:
PrivateTest is read once, by training/evaluate.py, for the figures a model ships with
(--report-split PrivateTest makes this report on it instead).

Labels (--labels): FER2013's own single labels, or FER+'s crowd votes (training/ferplus.py,
--ferplus, by default ferplus.npz beside --data) as the official majority, a label drawn from
the vote distribution every epoch (probability) or the distribution itself (crossentropy);
--mix W mixes in W of the FER2013 one-hot. With FER+ labels, selection is by accuracy on
PublicTest's FER+ majority set and the report gives FER+ next to FER2013.

An interrupted run continues with --resume. Any Keras 3 backend trains: KERAS_BACKEND=jax on a
GPU machine without TensorFlow (README).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from serenbox.device.labels import LABELS
from serenbox.training import ferplus
from serenbox.training.fer2013 import DatasetError, Fer2013, load
from serenbox.training.report import classification_report, format_report, save_confusion_png, write_json_atomic
from serenbox.training.teacher import TeacherError


class TrainError(Exception):
    pass


@dataclass
class Recipe:
    input_size: int = 112  # chosen by measurement: docs/model-card.md, "Choosing the input size"
    batch_size: int = 64
    head_epochs: int = 1
    epochs: int = 24  # fine-tuning epochs after the head
    head_lr: float = 1e-3
    lr: float = 3e-4
    label_smoothing: float = 0.1
    class_weight_power: float = 0.5  # 0: none, 1: full inverse frequency
    dropout: float = 0.3
    patience: int = 8
    augment: bool = True
    erase: float = 0.0  # random erasing: chance per training face (training/augment.py)
    seed: int = 1234
    limit_per_class: int = 0  # 0: all images
    init: str = ""  # a trained .keras model to start from (no head stage); "": ImageNet backbone
    teacher: str = ""  # soft targets from training/teacher.py; "": hard labels only
    teacher_weight: float = 0.7  # share of the teacher's targets in the training target
    labels: str = "fer2013"  # one of LABEL_SOURCES
    contempt: str = "image"  # FER+ contempt policy (training/ferplus.py)
    mix: float = 0.0  # share of the FER2013 one-hot in a FER+ target


LABEL_SOURCES: tuple[str, ...] = ("fer2013", *(f"ferplus-{m}" for m in ferplus.MODES))

# Recipe fields added after runs were made, with the value those runs had: they still resume.
RECIPE_ADDED = {"erase": 0.0, "labels": "fer2013", "contempt": "image", "mix": 0.0}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Recipe]:
    d = Recipe()
    p = argparse.ArgumentParser(description="Train MobileNetV2 on FER2013 (any layout the readers support).")
    p.add_argument("--data", required=True, help="fer2013.npz, Kaggle CSV, or train/ test/ image folders")
    p.add_argument("--weights", required=True, help="ImageNet MobileNetV2 no-top h5 file, or 'none' for random init")
    p.add_argument("--out", required=True, type=Path, help="output folder (model, history, report)")
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs)
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs after the head stage")
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--lr", type=float, default=d.lr, help="peak fine-tuning learning rate (cosine decay)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--class-weight-power", type=float, default=d.class_weight_power)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--erase", type=float, default=d.erase, help="random erasing: chance per training face")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit-per-class", type=int, default=0, help="use at most N images per class and split")
    p.add_argument("--init", default="", help="start from this trained .keras model instead of the head stage")
    p.add_argument("--teacher", default="", help="distil: soft targets file from training/teacher.py")
    p.add_argument("--teacher-weight", type=float, default=d.teacher_weight, help="teacher's share of the target")
    p.add_argument("--labels", choices=LABEL_SOURCES, default=d.labels, help="training targets (see above)")
    p.add_argument("--ferplus", default="", help="FER+ votes file (default: ferplus.npz beside --data)")
    p.add_argument("--contempt", choices=ferplus.CONTEMPT_POLICIES, default=d.contempt, help="FER+ contempt policy")
    p.add_argument("--mix", type=float, default=d.mix, help="share of the FER2013 one-hot in a FER+ target")
    p.add_argument(
        "--report-split", default="PublicTest", help="split for the final evaluation report (PrivateTest: see above)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small subset, input 32, one short epoch")
    a = p.parse_args(argv)
    r = Recipe(
        input_size=a.input_size,
        batch_size=a.batch_size,
        head_epochs=a.head_epochs,
        epochs=a.epochs,
        head_lr=a.head_lr,
        lr=a.lr,
        label_smoothing=a.label_smoothing,
        class_weight_power=a.class_weight_power,
        dropout=a.dropout,
        patience=a.patience,
        augment=not a.no_augment,
        erase=a.erase,
        seed=a.seed,
        limit_per_class=a.limit_per_class,
        init=a.init,
        teacher=a.teacher,
        teacher_weight=a.teacher_weight,
        labels=a.labels,
        contempt=a.contempt,
        mix=a.mix,
    )
    if a.quick:
        # Small defaults; options given explicitly still win.
        given = {arg.split("=")[0] for arg in (argv if argv is not None else sys.argv[1:])}
        for flag, attr, value in (
            ("--input-size", "input_size", 32),
            ("--batch-size", "batch_size", 16),
            ("--head-epochs", "head_epochs", 0),
            ("--epochs", "epochs", 1),
            ("--limit-per-class", "limit_per_class", 12),
        ):
            if flag not in given:
                setattr(r, attr, value)
    if r.input_size < 32:
        p.error("--input-size must be at least 32 (MobileNetV2's smallest input)")
    if not 0.0 <= r.teacher_weight <= 1.0:
        p.error("--teacher-weight must be between 0 and 1")
    if not 0.0 <= r.erase <= 1.0:
        p.error("--erase must be between 0 and 1")
    if not 0.0 <= r.mix <= 1.0:
        p.error("--mix must be between 0 and 1")
    if r.mix and r.labels == "fer2013":
        p.error("--mix mixes FER2013 into FER+ targets: it needs --labels ferplus-*")
    return a, r


def limit(data: Fer2013, per_class: int, seed: int) -> Fer2013:
    if per_class <= 0:
        return data
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(data.splits):
        for c in range(len(LABELS)):
            idx = np.flatnonzero((data.splits == s) & (data.labels == c))
            keep.extend(rng.permutation(idx)[:per_class])
    return data.subset(np.sort(np.array(keep, dtype=np.int64)))


def load_data(data_path: str, r: Recipe, ferplus_path: str = "") -> Fer2013:
    """The data set, with FER+ votes attached when the recipe trains on them."""
    data = load(data_path)
    if r.labels != "fer2013":
        data = ferplus.attach(data, ferplus_path or ferplus.default_path(data_path))
    return limit(data, r.limit_per_class, r.seed)


@dataclass
class LabelledSets:
    """Training faces with their label targets, and the selection split with the labels selection uses."""

    train: Fer2013  # labels: the target's hard class (for class weights)
    targets: np.ndarray  # (N, 7) float32, before any teacher
    val: Fer2013  # PublicTest; with FER+ labels its official majority set and class


def labelled_sets(data: Fer2013, r: Recipe) -> LabelledSets:
    train = data.require("Training")
    val = data.require("PublicTest", all_classes=False)
    if r.labels == "fer2013":
        return LabelledSets(train, np.eye(len(LABELS), dtype=np.float32)[train.labels], val)
    keep, y = ferplus.targets(train.votes, r.labels.removeprefix("ferplus-"), r.contempt)
    y = (1.0 - r.mix) * y[keep] + r.mix * np.eye(len(LABELS), dtype=np.float32)[train.labels[keep]]
    kept = train.subset(keep)
    hard = Fer2013(kept.images, y.argmax(1).astype(np.uint8), kept.splits, kept.source, kept.votes)
    val = ferplus.official(val)
    if len(hard) == 0 or len(val) == 0:
        raise TrainError(f"{data.source}: FER+ keeps no Training or no PublicTest images")
    return LabelledSets(hard, y.astype(np.float32), val)


def class_weights(labels: np.ndarray, power: float) -> dict[int, float]:
    counts = np.bincount(labels, minlength=len(LABELS)).astype(float)
    w = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    w = w / (w * counts).sum() * counts.sum()  # mean weight per image stays 1
    return {i: float(w[i]) for i in range(len(LABELS))}


def training_targets(train: Fer2013, y: np.ndarray, r: Recipe) -> np.ndarray:
    """The label targets `y`, or with a teacher the mix (1 − w)·y + w·teacher (distillation)."""
    if not r.teacher:
        return y
    from serenbox.training.teacher import targets_for

    return ((1.0 - r.teacher_weight) * y + r.teacher_weight * targets_for(r.teacher, train.images)).astype(np.float32)


@dataclass
class FitData:
    """Training and validation arrays of 48×48 faces (`training_batches` augments the first,
    `with_input_pipeline` makes both into the model's input)."""

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray  # per image: the hard label's class weight
    val_x: np.ndarray
    val_y: np.ndarray


def fit_data(sets: LabelledSets, r: Recipe) -> FitData:
    """Per-image class weights of the hard labels: Keras' class_weight would take the argmax of a
    teacher's soft target instead."""
    train, val = sets.train, sets.val
    cw = class_weights(train.labels, r.class_weight_power)
    return FitData(
        x=train.images[..., None].astype(np.float32),
        y=training_targets(train, sets.targets, r),
        weights=np.array([cw[int(c)] for c in train.labels], np.float32),
        val_x=val.images[..., None].astype(np.float32),
        val_y=np.eye(len(LABELS), dtype=np.float32)[val.labels],
    )


def training_batches(d: FitData, r: Recipe):
    """Shuffled training batches (faces, target, weight), augmented on the host (training/augment.py)
    for Keras' fit on any backend. A batch's randomness comes from (seed, epoch, batch) alone, not
    from which worker thread makes it. Under TensorFlow every epoch sees every face once; under JAX
    Keras can fetch a batch ahead across the epoch boundary, so it follows the previous epoch's
    order (seen: 1 batch in 13 in one of four epochs, 8 workers): a face or two seen twice in
    that epoch, harmless to SGD. A resumed run starts the shuffles again from epoch 0."""
    import keras
    from serenbox.training.augment import Augmentation, augment_batch

    aug = Augmentation(erase=r.erase)
    draw = r.labels == "ferplus-probability"

    @functools.lru_cache(maxsize=2)  # the epoch being made, and the next one fetched ahead
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([r.seed, epoch]).permutation(len(d.x))

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=max(1, min(8, (os.cpu_count() or 1) // 2)), use_multiprocessing=False)
            self.epoch = 0

        def __len__(self) -> int:
            return int(np.ceil(len(d.x) / r.batch_size))

        def __getitem__(self, i: int):
            idx = np.sort(order(self.epoch)[i * r.batch_size : (i + 1) * r.batch_size])
            x, y = d.x[idx], d.y[idx]
            rng = np.random.default_rng([r.seed, self.epoch, i])
            if r.augment:
                x = augment_batch(x, rng, aug)
            if draw:  # FER+ 'probability': a fresh label from each face's distribution every epoch
                y = ferplus.sample_labels(y, rng)
            return x, y, d.weights[idx]

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return Batches()


def with_input_pipeline(model, r: Recipe):
    """`model` behind the device's input step: 48×48 faces in, upscaled and rounded as the device
    makes them. Built from Keras ops, it compiles into the training step on any backend
    (TensorFlow on a CPU, JAX on a GPU)."""
    import keras

    inputs = keras.Input((48, 48, 1), name="face48")
    return keras.Model(inputs, model(device_pixels(inputs, r.input_size)), name=f"train_{model.name}")


def device_pixels(x, size: int):
    """48×48 faces (float, batched) → the model's input as the device makes it: bilinear upscale,
    then whole gray levels 0..255. The device's resized faces are uint8; a model trained on the
    unrounded values lost 0.8 PublicTest points to that rounding alone (docs/model-card.md)."""
    from keras import ops

    return ops.clip(ops.round(ops.image.resize(x, (size, size), interpolation="bilinear")), 0.0, 255.0)


def predict_probs(model, images: np.ndarray, size: int, batch: int = 256) -> np.ndarray:
    from keras import ops

    out = []
    for i in range(0, len(images), batch):
        x = device_pixels(images[i : i + batch, ..., None].astype(np.float32), size)
        out.append(ops.convert_to_numpy(model(x, training=False)))
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)


def make_best_keeper(out: Path, patience: int, model):
    """Keep the best `model` (the network inside the training pipeline) by PublicTest accuracy
    (on FER+'s majority set when training on FER+) across stages and resumes (Keras' own
    ModelCheckpoint and EarlyStopping forget their best value when a run is resumed)."""
    import keras

    class BestKeeper(keras.callbacks.Callback):
        def __init__(self, stage: str):
            super().__init__()
            self.stage = stage
            self.state_file = out / "best.json"

        def _state(self) -> dict:
            if self.state_file.exists():
                return json.loads(self.state_file.read_text())
            return {"val_accuracy": -1.0}

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            acc = float(logs.get("val_accuracy", -1.0))
            best = self._state()
            if acc > best["val_accuracy"]:
                tmp = out / "model.tmp.keras"
                model.save(tmp)
                tmp.replace(out / "model.keras")
                best = {"val_accuracy": acc, "stage": self.stage, "epoch": epoch + 1}
                write_json_atomic(best, self.state_file)
                print(f"[{self.stage}] epoch {epoch + 1}: new best PublicTest accuracy {acc:.4f}", flush=True)
            elif self.stage == best.get("stage") and epoch + 1 - best["epoch"] >= patience:
                print(f"[{self.stage}] no improvement for {patience} epochs: stopping early", flush=True)
                self.model.stop_training = True

    return BestKeeper


def start_from(model, path: Path) -> None:
    """Copy a trained model's weights into `model` (continuing, e.g. to distil, skips the head)."""
    import keras

    try:
        model.set_weights(keras.models.load_model(path).get_weights())
    except ValueError as e:
        # A foreign file and a model of another input size both end here.
        raise TrainError(f"{path}: not usable as --init for this recipe's model ({e})".splitlines()[0]) from e


def stage_fit(pipeline, model, stage: str, d: FitData, r: Recipe, epochs: int, out: Path) -> None:
    import keras

    if epochs <= 0:
        return
    BestKeeper = make_best_keeper(out, r.patience, model)
    callbacks = [
        # Saves weights, optimizer and epoch every epoch; deleted once the stage finishes.
        keras.callbacks.BackupAndRestore(str(out / "checkpoints" / stage)),
        keras.callbacks.CSVLogger(str(out / f"history_{stage}.csv"), append=True),
        BestKeeper(stage),
    ]
    pipeline.fit(
        training_batches(d, r),
        validation_data=(d.val_x, d.val_y),
        validation_batch_size=r.batch_size,
        epochs=epochs,
        callbacks=callbacks,
        verbose=2,
    )


def distribution_scope():
    """Several GPUs under TensorFlow: replicate. One device (a CPU, or one GPU under JAX, the
    backend an accelerator machine without TensorFlow trains with): the default."""
    import contextlib

    import keras

    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return (tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()).scope()


def train(args: argparse.Namespace, r: Recipe) -> dict:
    import keras
    from serenbox.training.model import backbone_of, build_model

    weights = None if args.weights.lower() == "none" else Path(args.weights)
    if weights is not None and not weights.is_file():
        raise TrainError(f"{weights}: weights file does not exist")
    if r.init and not Path(r.init).is_file():
        raise TrainError(f"{r.init}: --init model file does not exist")
    data = load_data(args.data, r, args.ferplus)
    sets = labelled_sets(data, r)
    train_set, val_set = sets.train, sets.val
    report_set = data.require(args.report_split, all_classes=False)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "train_config.json"
    config = {"recipe": asdict(r), "data": str(args.data), "weights": str(args.weights), "counts": data.counts()}
    if r.labels != "fer2013":
        config["ferplus"] = str(args.ferplus or ferplus.default_path(args.data))
        config["ferplus_kept"] = {"Training": len(train_set), "PublicTest": len(val_set)}
    if args.resume and config_file.exists():
        previous = json.loads(config_file.read_text())
        if {**RECIPE_ADDED, **previous["recipe"]} != config["recipe"]:
            raise TrainError(f"{config_file}: --resume with a different recipe; use the same options or a new --out")
    elif (out / "model.keras").exists() and not args.resume:
        raise TrainError(f"{out}: already holds a trained model; pass --resume to continue or choose a new --out")
    write_json_atomic(config, config_file)

    keras.utils.set_random_seed(r.seed)
    d = fit_data(sets, r)
    cw = class_weights(train_set.labels, r.class_weight_power)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=r.label_smoothing)
    steps = int(np.ceil(len(train_set) / r.batch_size))
    print(
        f"train {len(train_set)}  val {len(val_set)}  input {r.input_size}  class weights "
        + " ".join(f"{LABELS[i]}={w:.2f}" for i, w in cw.items()),
        flush=True,
    )

    t0 = time.time()
    with distribution_scope():
        model = build_model(r.input_size, None if r.init else weights, dropout=r.dropout)
        pipeline = with_input_pipeline(model, r)
        head_done = out / "head.weights.h5"
        if r.init:
            start_from(model, Path(r.init))
        elif head_done.exists():
            model.load_weights(head_done)
        else:
            backbone_of(model).trainable = False
            pipeline.compile(keras.optimizers.Adam(r.head_lr), loss=loss, metrics=["accuracy"])
            stage_fit(pipeline, model, "head", d, r, r.head_epochs, out)
            model.save_weights(head_done)
        backbone_of(model).trainable = True
        schedule = (
            keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, steps * r.epochs - steps // 2), warmup_target=r.lr, warmup_steps=steps // 2
            )
            if r.epochs > 0
            else r.lr
        )
        pipeline.compile(keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"])
        stage_fit(pipeline, model, "finetune", d, r, r.epochs, out)
    elapsed = time.time() - t0

    history = {}
    for stage in ("head", "finetune"):
        f = out / f"history_{stage}.csv"
        if f.exists():
            rows = [line.split(",") for line in f.read_text().strip().splitlines()]
            history[stage] = [dict(zip(rows[0], map(float, row), strict=True)) for row in rows[1:]]
    write_json_atomic(history, out / "history.json")

    if not (out / "model.keras").exists():
        raise TrainError("training produced no model (no epoch finished)")
    best = keras.models.load_model(out / "model.keras")
    probs = predict_probs(best, report_set.images, r.input_size)
    report = classification_report(report_set.labels, probs.argmax(1))
    if report_set.votes is not None:
        keep, labels = ferplus.majority(report_set.votes)
        report["ferplus"] = classification_report(labels[keep], probs[keep].argmax(1))
    report.update(
        split=args.report_split,
        data=str(args.data),
        train_seconds=round(elapsed, 1),
        selected=json.loads((out / "best.json").read_text()),
    )
    write_json_atomic(report, out / "report.json")
    save_confusion_png(
        report,
        out / "confusion_matrix.png",
        f"{args.report_split}: accuracy {report['accuracy'] * 100:.1f}% (float, input {r.input_size})",
    )
    print(format_report(report, f"{args.report_split} (best model by PublicTest accuracy)"), flush=True)
    if "ferplus" in report:
        print(format_report(report["ferplus"], f"{args.report_split}, FER+ majority labels"), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args, recipe = parse_args(argv)
    try:
        train(args, recipe)
    except (TrainError, TeacherError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
