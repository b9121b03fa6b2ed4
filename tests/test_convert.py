"""The converter end to end on tiny models and generated data: int8 model, manifest, proof, and every refusal.

Models are built once per session (a few seconds each); the conversions run in-process where a
test asserts on results, and as real processes where it asserts on what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serenbox.converter.contract import ModelInfo
from serenbox.converter.convert import ConvertError, ConvertResult, ProofFailed, convert, main
from serenbox.converter.proof import prove, run_int8
from serenbox.converter.quantize import QuantizeError, check_integer_only, stratified_sample
from serenbox.device.interpreter import load_interpreter
from serenbox.device.labels import LABELS
from serenbox.device.manifest import ManifestError, check_against_interpreter, load_manifest, sha256_of
from serenbox.device.preprocess import dequantize, quantize, resize_face
from serenbox.training.fer2013 import Fer2013

from tests.tinymodels import (
    BAND_EDGES,
    BRIGHTNESS_OF,
    brightness_model,
    convert_tiny,
    edit_manifest,
    expected_emotion,
    make_dataset,
    tiny_cnn,
    write_csv,
    write_folders,
    write_npz,
)

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "converter" / "convert.py")]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- fixtures (built once per session)


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def data() -> Fer2013:
    return make_dataset(seed=0)


@pytest.fixture(scope="session")
def npz(data: Fer2013, work: Path) -> Path:
    return write_npz(data, work / "fer.npz")


@pytest.fixture(scope="session")
def keras_model(data: Fer2013) -> Any:
    return tiny_cnn(data)


@pytest.fixture(scope="session")
def keras_file(keras_model: Any, work: Path) -> Path:
    path = work / "tiny.keras"
    keras_model.save(path)
    return path


@pytest.fixture(scope="session")
def converted(keras_file: Path, npz: Path, work: Path) -> ConvertResult:
    lines: list[str] = []
    result = convert(keras_file, npz, work / "out" / "emotion_int8.tflite", calibration_size=140, log=lines.append)
    result.report["log"] = lines  # the printed table, for the report test
    return result


@pytest.fixture(scope="session")
def bright(work: Path) -> Path:
    return convert_tiny(brightness_model(), work / "bright")


def run_cli(*args: str | Path, exe: list[str] = CONVERT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*exe, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False
    )


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


# ---------------------------------------------------------------- the int8 model and its manifest


def test_model_is_full_int8_with_int8_io(converted: ConvertResult) -> None:
    interpreter = load_interpreter(str(converted.tflite), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert np.dtype(inp["dtype"]) == np.int8 and np.dtype(out["dtype"]) == np.int8
    assert tuple(inp["shape"]) == (1, 32, 32, 1) and tuple(out["shape"]) == (1, 7)
    # Calibration spans 0..255 exactly, so every pixel value maps to its own int8 step.
    assert inp["quantization"] == (1.0, -128)
    ops = check_integer_only(converted.tflite, "int8")  # raises on any op reading or writing float
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops


def test_manifest_describes_the_model(converted: ConvertResult, keras_file: Path, npz: Path) -> None:
    m = json.loads(converted.manifest.read_text())
    assert converted.manifest == converted.tflite.with_suffix(".json")
    assert m["format"] == "serenbox-model/1"
    assert m["model_file"] == "emotion_int8.tflite"
    assert m["sha256"] == sha256_of(converted.tflite)
    assert m["labels"] == list(LABELS)
    interpreter = load_interpreter(str(converted.tflite))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert m["input"] == {
        "dtype": "int8",
        "scale": pytest.approx(float(inp["quantization"][0])),
        "zero_point": int(inp["quantization"][1]),
        "height": 32,
        "width": 32,
        "channels": 1,
    }
    assert m["output"]["dtype"] == "int8" and m["output"]["activation"] == "softmax"
    assert m["output"]["scale"] == pytest.approx(float(out["quantization"][0]))
    assert m["output"]["zero_point"] == int(out["quantization"][1])
    assert m["source_model"] == {"file": "tiny.keras", "sha256": sha256_of(keras_file)}
    cal = m["calibration"]
    assert cal["split"] == "Training" and cal["images"] == 140 and cal["seed"] == 0
    assert cal["per_class"] == {c: 20 for c in LABELS}  # stratified: 140 over 7 equal classes
    assert cal["data_sha256"] == sha256_of(npz)
    assert set(m["tools"]) >= {"tensorflow", "keras", "numpy", "serenbox", "interpreter"}
    assert m["created"].endswith("Z")
    # The device's own reader accepts it, against the file and the interpreter.
    manifest = load_manifest(converted.tflite)
    check_against_interpreter(manifest, interpreter)


def test_output_files_are_readable_by_the_service_user(converted: ConvertResult) -> None:
    # mkstemp makes 0600 files; the daemon runs as another user than the one who converted.
    for path in (converted.tflite, converted.manifest):
        assert path.stat().st_mode & 0o044 == 0o044


def test_stratified_sample_keeps_class_shares_and_rare_classes() -> None:
    labels = np.repeat(np.arange(7), [400, 10, 100, 100, 100, 100, 190])
    picked = stratified_sample(labels, 100, seed=0)
    counts = np.bincount(labels[picked], minlength=7)
    assert counts.sum() == 100 and len(set(picked.tolist())) == 100
    assert counts[0] == 40 and counts[1] == 1 and counts[6] == 19  # proportional, the rare class kept
    assert (stratified_sample(labels, 100, seed=0) == picked).all()
    assert (stratified_sample(labels, 100, seed=1) != picked).any()


# ---------------------------------------------------------------- the device refuses a mismatched manifest


def copy_model(result: ConvertResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(result.tflite, folder / result.tflite.name)
    shutil.copy(result.manifest, folder / result.manifest.name)
    return folder / result.tflite.name


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"labels": ["happy", *[c for c in LABELS if c != "happy"]]}, "differ from the project's"),
        ({"format": "serenbox-model/0"}, "format"),
        ({"model_file": "other.tflite"}, "describes 'other.tflite'"),
        ({"sha256": "0" * 64}, "does not match"),
        ({"input.height": 48}, "input shape"),
        ({"input.channels": 3}, "input shape"),
        ({"input.dtype": "uint8"}, "input dtype"),
        ({"input.scale": 0.5}, "input quantization"),
        ({"output.zero_point": 0}, "output quantization"),
        ({"output.activation": "sigmoid"}, "activation"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_device_refuses_a_manifest_that_does_not_match(
    converted: ConvertResult, tmp_path: Path, edit: dict[str, Any], needle: str
) -> None:
    model = copy_model(converted, tmp_path)
    edit_manifest(model, edit)
    with pytest.raises(ManifestError, match=needle):
        check_against_interpreter(load_manifest(model), load_interpreter(str(model)))


def test_device_refuses_a_changed_model_or_missing_manifest(
    converted: ConvertResult, bright: Path, tmp_path: Path
) -> None:
    model = copy_model(converted, tmp_path / "changed")
    with model.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"sha256 .* does not match emotion_int8\.tflite"):
        load_manifest(model)
    # Another model's manifest beside it (same file name): the hash tells them apart.
    other = copy_model(converted, tmp_path / "swapped")
    shutil.copy(bright.with_suffix(".json"), other.with_suffix(".json"))
    with pytest.raises(ManifestError, match="does not match"):
        load_manifest(other)
    bare = copy_model(converted, tmp_path / "bare")
    bare.with_suffix(".json").unlink()
    with pytest.raises(ManifestError, match="manifest missing"):
        load_manifest(bare)
    bare.with_suffix(".json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"not valid JSON \(line 1"):
        load_manifest(bare)


# ---------------------------------------------------------------- the proof


def test_int8_agrees_with_float_on_held_out_data(converted: ConvertResult, keras_model: Any) -> None:
    held = make_dataset({"PublicTest": 30}, seed=7)  # never seen by training or calibration
    proof = prove(keras_model, ModelInfo(32, 32, 1, "softmax"), converted.tflite, held.images, held.labels)
    assert proof["n"] == 210
    assert proof["float"]["accuracy"] >= 0.9  # the tiny model learnt the task
    assert proof["agreement"] >= 0.97
    assert proof["int8"]["accuracy"] >= proof["float"]["accuracy"] - 0.03
    assert proof["mean_abs_prob_diff"] < 0.02


def test_proof_feeds_the_interpreter_as_the_device_does(converted: ConvertResult, keras_model: Any) -> None:
    """run_int8 against a hand-driven interpreter: same quantize, same invoke, same dequantize."""
    held = make_dataset({"PublicTest": 2}, seed=9)
    pixels = np.stack([resize_face(im, 32, 32) for im in held.images]).astype(np.float32)[..., None]
    scores, seconds = run_int8(converted.tflite, pixels, threads=1)
    interpreter = load_interpreter(str(converted.tflite), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    for x, want in zip(pixels, scores, strict=True):
        interpreter.set_tensor(inp["index"], quantize(x[None], *inp["quantization"], np.int8))
        interpreter.invoke()
        np.testing.assert_array_equal(dequantize(interpreter.get_tensor(out["index"])[0], *out["quantization"]), want)
    assert len(seconds) == len(pixels) and min(seconds) > 0


def test_report_has_the_figures_the_issue_asks_for(converted: ConvertResult) -> None:
    saved = json.loads(converted.report_path.read_text())
    assert converted.report_path == converted.tflite.with_suffix(".report.json")
    assert saved["split"] == "PublicTest" and saved["passed"] and saved["written"]
    assert saved["max_drop"] == 1.0  # the default
    proof = saved["proof"]
    assert proof["n"] == 105 and proof["threads"] == 1
    assert sum(proof["support"].values()) == 105
    for side in ("float", "int8"):
        assert 0.9 <= proof[side]["accuracy"] <= 1.0
        assert set(proof[side]["recall"]) == set(LABELS)
        assert proof[side]["latency"]["median_ms"] > 0 and proof[side]["latency"]["p95_ms"] >= 0
    assert proof["int8"]["latency"]["n"] == 105
    assert 0.95 <= proof["agreement"] <= 1.0 and 0 <= proof["mean_abs_prob_diff"] < 0.05
    assert proof["accuracy_drop_points"] == pytest.approx(
        (proof["float"]["accuracy"] - proof["int8"]["accuracy"]) * 100
    )
    assert saved["sizes"] == {
        "keras_bytes": Path(saved["model"]).stat().st_size,
        "tflite_bytes": converted.tflite.stat().st_size,
    }
    assert saved["tflite_sha256"] == sha256_of(converted.tflite)
    table = "\n".join(converted.report["log"])
    assert "float" in table and "int8" in table and "top-1 agreement" in table and "PASS" in table
    for c in LABELS:
        assert f"recall {c} (n=15)" in table


def test_proof_adds_ferplus_agreement_when_given_votes(
    bright: Path, npz: Path, data: Fer2013, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # FER+ says 'happy' (6 of 10) for every other image and is unclear about the rest (unknown 6 of 10).
    votes = np.zeros((len(data), 10), np.uint8)
    votes[::2, 1], votes[::2, 0] = 6, 4
    votes[1::2, 8], votes[1::2, 0] = 6, 4
    np.savez(tmp_path / "ferplus.npz", votes=votes)
    out = tmp_path / "b.tflite"
    code = main(["--model", str(bright.with_suffix(".keras")), "--data", str(npz), "--out", str(out),
                 "--calibration-size", "21", "--ferplus", str(tmp_path / "ferplus.npz")])  # fmt: skip
    assert code == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    fp = report["proof"]["ferplus"]
    public = np.flatnonzero(data.splits == 1)
    assert fp["n"] == int((public % 2 == 0).sum())
    # The brightness model answers happy exactly where a face is bright: FER+ accuracy is that share.
    held = data.images[public[public % 2 == 0]]
    bright_share = np.mean([expected_emotion(float(resize_face(im, 32, 32).mean())) == "happy" for im in held])
    assert fp["int8"]["accuracy"] == pytest.approx(bright_share, abs=2 / fp["n"])
    assert fp["float"]["report"]["labels"] == list(LABELS) and 0.9 <= fp["agreement"] <= 1.0
    assert report["ferplus"] == str(tmp_path / "ferplus.npz")
    assert "FER+ top-1 agreement" in capsys.readouterr().out

    code = main(["--model", str(bright.with_suffix(".keras")), "--data", str(npz), "--out", str(tmp_path / "c.tflite"),
                 "--ferplus", str(tmp_path / "nope.npz")])  # fmt: skip
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'nope.npz'}: FER+ votes file does not exist (ferplus.npz)"
    )


def fragile_model(keras_model: Any) -> Any:
    """The tiny CNN's output plus a huge term equal for all classes: float argmax unchanged, int8 loses it.

    Adding the same value to every score keeps the float ranking, but the int8 output tensor must then
    span ~0..25000 in 256 steps, so the real differences (< 1) vanish: accuracy collapses on purpose.
    """
    import keras
    from keras import layers

    inputs = keras.Input((32, 32, 1))
    offset = layers.Dense(len(LABELS), kernel_initializer="ones", use_bias=False)
    shifted = layers.Add()([keras_model(inputs), offset(layers.GlobalAveragePooling2D()(inputs) * 100.0)])
    return keras.Model(inputs, shifted)


def test_accuracy_drop_beyond_max_drop_fails_and_writes_no_model(
    keras_model: Any, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "fragile.keras"
    fragile_model(keras_model).save(source)
    out = tmp_path / "out" / "fragile.tflite"
    out.parent.mkdir()
    out.write_bytes(b"the previous model")  # must survive a failed conversion
    code = main(["--model", str(source), "--data", str(npz), "--out", str(out), "--calibration-size", "70"])
    captured = capsys.readouterr()
    assert code == 1
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: int8 accuracy") and "points below float" in line and "allowed 1" in line
    assert "FAIL" in captured.out
    assert out.read_bytes() == b"the previous model"
    assert files_in(out.parent) == {"fragile.tflite", "fragile.report.json"}  # no manifest, no temp file
    report = json.loads((out.parent / "fragile.report.json").read_text())
    assert not report["passed"] and not report["written"]
    assert report["activation"] == "none"  # scores that are not probabilities are read as logits
    assert report["proof"]["float"]["accuracy"] >= 0.9 and report["proof"]["accuracy_drop_points"] > 20


def test_uint8_io_other_split_and_calibration_size(bright: Path, npz: Path, tmp_path: Path) -> None:
    source = bright.with_suffix(".keras")  # convert_tiny keeps the source model beside its output
    result = convert(source, npz, tmp_path / "b.tflite", io="uint8", calibration_size=21, proof_split="PrivateTest")
    interpreter = load_interpreter(str(result.tflite))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert np.dtype(inp["dtype"]) == np.uint8 and np.dtype(out["dtype"]) == np.uint8
    assert inp["quantization"] == (1.0, 0)
    check_integer_only(result.tflite, "uint8")
    m = json.loads(result.manifest.read_text())
    assert m["input"]["dtype"] == m["output"]["dtype"] == "uint8"
    assert m["calibration"]["images"] == 21 and set(m["calibration"]["per_class"].values()) == {3}
    assert result.report["split"] == "PrivateTest" and result.report["proof"]["n"] == 35
    check_against_interpreter(load_manifest(result.tflite), interpreter)


# ---------------------------------------------------------------- the brightness model the device tests use


def classify_levels(model: Path, levels: list[int], noise: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Faces of these mean brightnesses through a fresh interpreter, fed as the device feeds it."""
    rng = np.random.default_rng(0)
    interpreter = load_interpreter(str(model), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    h, w = int(inp["shape"][1]), int(inp["shape"][2])
    raw = []
    for level in levels:
        face = np.clip(np.round(level + rng.normal(0, noise, (64, 64))), 0, 255).astype(np.uint8)
        x = resize_face(face, h, w).astype(np.float32)[None, ..., None]
        interpreter.set_tensor(inp["index"], quantize(x, *inp["quantization"], inp["dtype"]))
        interpreter.invoke()
        raw.append(interpreter.get_tensor(out["index"])[0].copy())
    raw_scores = np.stack(raw)
    names = [LABELS[int(k)] for k in dequantize(raw_scores, *out["quantization"]).argmax(axis=1)]
    return names, raw_scores


def test_brightness_model_follows_mean_brightness_deterministically(bright: Path) -> None:
    levels = [v for v in range(256) if min(abs(v - e) for e in BAND_EDGES) >= 2]
    names, raw = classify_levels(bright, levels)
    assert names == [expected_emotion(v) for v in levels]
    _, again = classify_levels(bright, levels)  # another interpreter, same bytes out
    np.testing.assert_array_equal(raw, again)
    for emotion, level in BRIGHTNESS_OF.items():
        textured, _ = classify_levels(bright, [level] * 5, noise=20.0)
        assert textured == [emotion] * 5
    with pytest.raises(ValueError, match=r"outside 0\.\.255"):
        expected_emotion(300)


def test_brightness_model_converts_to_a_manifest_the_device_accepts(bright: Path) -> None:
    manifest = load_manifest(bright)
    check_against_interpreter(manifest, load_interpreter(str(bright)))
    assert manifest.input.dtype == "int8" and manifest.output.activation == "softmax"
    assert (manifest.input.height, manifest.input.width, manifest.input.channels) == (32, 32, 1)


# ---------------------------------------------------------------- the command line and each layout


def test_cli_converts_image_folders(keras_file: Path, data: Fer2013, tmp_path: Path) -> None:
    folders = write_folders(data, tmp_path / "fer")
    out = tmp_path / "models" / "m.tflite"
    run = run_cli("--model", keras_file, "--data", folders, "--out", out, "--calibration-size", "70")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # TensorFlow's own log lines go to a temp log, not over the table
    assert "accuracy drop" in run.stdout and "PASS" in run.stdout and f"wrote {out}" in run.stdout
    assert files_in(out.parent) == {"m.tflite", "m.json", "m.report.json"}
    check_against_interpreter(load_manifest(out), load_interpreter(str(out)))


def test_convert_reads_kaggle_csv(keras_file: Path, data: Fer2013, tmp_path: Path) -> None:
    csv_path = write_csv(data, tmp_path / "fer2013.csv")
    result = convert(keras_file, csv_path, tmp_path / "m.tflite", calibration_size=70)
    assert result.report["data"] == str(csv_path) and result.report["proof"]["n"] == 105
    assert result.manifest_data.calibration["data_sha256"] == sha256_of(csv_path)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


@pytest.fixture(scope="session")
def broken(work: Path, data: Fer2013) -> dict[str, Path]:
    """Models and data sets that each break one rule."""
    import keras
    from keras import layers

    folder = work / "broken"
    folder.mkdir()
    paths: dict[str, Path] = {}
    inputs = keras.Input((32, 32, 1))
    five = keras.Model(inputs, layers.Dense(5, activation="softmax")(layers.Flatten()(inputs)))
    five.save(paths.setdefault("five_outputs", folder / "five.keras"))
    inputs = keras.Input((32, 32, 2))
    two = keras.Model(inputs, layers.Dense(7, activation="softmax")(layers.Flatten()(inputs)))
    two.save(paths.setdefault("two_channels", folder / "two.keras"))
    paths["corrupt"] = folder / "corrupt.keras"
    paths["corrupt"].write_bytes(b"PK\x03\x04 truncated")
    no_disgust = (data.labels != LABELS.index("disgust")) | (data.splits != 0)
    thin = Fer2013(data.images[no_disgust], data.labels[no_disgust], data.splits[no_disgust], "gen")
    paths["no_disgust"] = write_npz(thin, folder / "no_disgust.npz")
    public = data.splits == 1
    paths["no_public"] = write_npz(
        Fer2013(data.images[~public], data.labels[~public], data.splits[~public], "gen"), folder / "no_public.npz"
    )
    paths["empty"] = folder / "empty"
    paths["empty"].mkdir()
    paths["a_file"] = folder / "a_file"
    paths["a_file"].write_text("a file, not a folder")
    return paths


BAD_INPUTS = [
    ("missing-model", "{work}/nothing.keras", "{npz}", "nothing.keras: model file does not exist"),
    ("corrupt-model", "{corrupt}", "{npz}", "corrupt.keras: not a Keras .keras archive"),
    ("five-outputs", "{five_outputs}", "{npz}", "five.keras: output shape (None, 5) is not (None, 7)"),
    ("wrong-input", "{two_channels}", "{npz}", "two.keras: input has 2 channels"),
    ("missing-data", "{keras}", "{work}/nowhere", "nowhere: data path does not exist"),
    ("empty-data", "{keras}", "{empty}", "empty: no train/ or test/ folder"),
    ("data-lacks-class", "{keras}", "{no_disgust}", "no_disgust.npz: Training split has no images of class disgust"),
    ("data-lacks-split", "{keras}", "{no_public}", "no_public.npz: no PublicTest images"),
]


@pytest.mark.parametrize(("model", "data_path", "needle"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(
    broken: dict[str, Path],
    keras_file: Path,
    npz: Path,
    work: Path,
    tmp_path: Path,
    model: str,
    data_path: str,
    needle: str,
) -> None:
    names = {**{k: str(v) for k, v in broken.items()}, "keras": str(keras_file), "npz": str(npz), "work": str(work)}
    out = tmp_path / "out" / "m.tflite"
    run = run_cli("--model", model.format(**names), "--data", data_path.format(**names), "--out", out)
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line
    assert "Traceback" not in run.stderr + run.stdout
    assert files_in(out.parent) == set()


def test_unwritable_output_and_bad_options(keras_file: Path, npz: Path, broken: dict[str, Path]) -> None:
    checks = [
        (["--out", broken["a_file"] / "m.tflite"], "a_file: cannot write the model there (a file, not a folder)"),
        (["--out", "/work/x.bin"], "x.bin: the output file must end in .tflite"),
        (["--out", "m.tflite", "--report", broken["a_file"] / "r.json"], "cannot write the report there"),
        (["--out", "m.tflite", "--calibration-size", "0"], "--calibration-size must be at least 1, got 0"),
        (["--out", "m.tflite", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["--out", "m.tflite", "--report", "m.json"], "m.json: --report would overwrite the output's manifest"),
        (["--out", "m.tflite", "--report", keras_file], "--report would overwrite the input model"),
    ]
    for extra, needle in checks:
        run = run_cli("--model", keras_file, "--data", npz, *extra)
        assert run.returncode == 2, (extra, run.stderr)
        (line,) = run.stderr.strip().splitlines()
        assert needle in line and "Traceback" not in run.stderr
    usage = run_cli("--model", keras_file, "--data", npz, "--out", "m.tflite", "--io", "float32")
    assert usage.returncode == 2 and "invalid choice: 'float32'" in usage.stderr
    assert not (ROOT / "m.tflite").exists()


def test_console_script_is_installed(npz: Path, keras_file: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "serenbox-convert"
    if not script.exists():
        pytest.skip("project not installed (pip install -e .): no serenbox-convert script")
    run = run_cli(
        "--model", keras_file, "--data", tmp_path / "nowhere", "--out", tmp_path / "m.tflite", exe=[str(script)]
    )
    assert run.returncode == 2 and run.stderr.strip() == f"error: {tmp_path / 'nowhere'}: data path does not exist"


def unquantizable(op: str) -> Any:
    """A model with an op that has no int8 kernel: Erf fails conversion, Sin would stay float."""
    import keras
    from keras import layers

    class Op(layers.Layer):
        def call(self, x: Any) -> Any:
            return getattr(keras.ops, op)(x)

    inputs = keras.Input((32, 32, 1))
    x = Op()(layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, layers.Dense(len(LABELS), activation="softmax")(layers.Flatten()(x)))


def test_an_op_that_cannot_be_int8_is_named(npz: Path, tmp_path: Path) -> None:
    from serenbox.converter.quantize import convert_int8

    model = unquantizable("erf")
    pixels = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype(np.float32)
    with pytest.raises(QuantizeError, match=r"op\(s\) tf\.Erf cannot be quantized to int8"):
        convert_int8(model, pixels, "int8")
    # Sin converts, but only by staying float between QUANTIZE/DEQUANTIZE: the check names it.
    (tmp_path / "sin.tflite").write_bytes(convert_int8(unquantizable("sin"), pixels, "int8"))
    with pytest.raises(QuantizeError, match=r"left in float after quantization \(no int8 kernel\): SIN \(float32\)$"):
        check_integer_only(tmp_path / "sin.tflite", "int8")


def test_convert_refuses_a_float_op_with_exit_2_and_no_output(npz: Path, tmp_path: Path) -> None:
    import keras

    model = unquantizable("sin")
    # The layer class is local: save as the converter would get it, then load back with the class known.
    source = tmp_path / "sin.keras"
    model.save(source)
    out = tmp_path / "out" / "sin.tflite"
    with keras.saving.custom_object_scope({"Op": type(model.layers[2])}), pytest.raises(ConvertError) as e:
        convert(source, npz, out, calibration_size=14)
    assert e.value.exit_code == 2 and not isinstance(e.value, ProofFailed)
    assert "SIN" in str(e.value) and str(e.value).startswith(str(source))
    assert files_in(out.parent) == set()


def test_a_model_that_keeps_fer2013_but_loses_ferplus_accuracy_fails_the_proof(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Four faces whose mean brightness sits on the brightness model's sad/neutral edge (85):
    # int8 rounding sends some of them the other way. FER+ keeps only those faces, labelled with
    # the float answer: FER+ accuracy falls 100 points while FER2013's moves a few at most.
    import keras
    from serenbox.converter.contract import model_input
    from serenbox.training.ferplus import TO_LABEL

    data = make_dataset(seed=0)
    public = np.flatnonzero(data.splits == 1)
    rng = np.random.default_rng(0)
    for j, i in enumerate(public[:4]):
        mean = 84.97 + j * 0.02
        face = np.full(48 * 48, int(mean), np.uint8)
        face[rng.permutation(48 * 48)[: round((mean - int(mean)) * 48 * 48)]] += 1
        data.images[i] = face.reshape(48, 48)
    npz = write_npz(data, tmp_path / "edge.npz")
    model = tmp_path / "bright.keras"
    brightness_model().save(model)
    first = tmp_path / "first.tflite"
    assert main(["--model", str(model), "--data", str(npz), "--out", str(first), "--max-drop", "100"]) == 0
    pixels = model_input(data.images[public], ModelInfo(height=32, width=32, channels=1, activation="softmax"))
    float_pred = keras.models.load_model(model).predict(pixels, verbose=0).argmax(1)
    int8_pred = run_int8(first, pixels, 1)[0].argmax(1)
    parted = np.flatnonzero(float_pred != int8_pred)
    assert 0 < len(parted) <= 4, len(parted)  # the premise
    column = {int(label): c for c, label in enumerate(TO_LABEL)}
    votes = np.zeros((len(data), 10), np.uint8)
    votes[:, 8] = 10  # unknown: outside FER+'s majority set
    for i in parted:
        votes[public[i]] = 0
        votes[public[i], column[int(float_pred[i])]] = 10
    np.savez(tmp_path / "ferplus.npz", votes=votes)
    capsys.readouterr()

    out = tmp_path / "second.tflite"
    code = main(["--model", str(model), "--data", str(npz), "--out", str(out), "--max-drop", "5",
                 "--ferplus", str(tmp_path / "ferplus.npz")])  # fmt: skip
    captured = capsys.readouterr()
    proof = json.loads(out.with_suffix(".report.json").read_text())["proof"]
    assert proof["accuracy_drop_points"] <= 5 and proof["ferplus"]["accuracy_drop_points"] == 100
    assert code == 1 and not out.exists()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: int8 FER+ accuracy 0.00% is 100.00 points below float 100.00%"), line
