"""Convert a trained Keras emotion model to a calibrated full-int8 TFLite model that proves itself.

    python converter/convert.py --model runs/mnv2-96/model.keras \
        --data ../shared/fer2013/fer2013.npz --out device/models/emotion_int8.tflite

Steps: check the model contract, calibrate on a class-stratified Training sample, convert
with int8 builtins only, check every op is integer, then run the float and the int8 model
side by side on a held-out split (the proof; with --ferplus also on FER+'s majority labels,
where the same --max-drop applies). OUT.tflite and its manifest OUT.json appear
only when all of it succeeded; the proof's report (OUT.report.json) is written either way.
Exit codes: 0 done, 1 the int8 model lost more than --max-drop accuracy points, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from serenbox.converter.contract import ContractError, check_contract, load_keras_model, model_input, one_line
from serenbox.converter.proof import format_table, gate_failures, prove
from serenbox.converter.quantize import IO_TYPES, QuantizeError, check_integer_only, convert_int8, stratified_sample
from serenbox.device.labels import LABELS
from serenbox.device.manifest import (
    InputSpec,
    Manifest,
    OutputSpec,
    manifest_path,
    readable_by_all,
    sha256_of,
    utc_now,
    write_manifest,
)
from serenbox.training import ferplus as ferplus_votes
from serenbox.training.fer2013 import SPLITS, DatasetError, load
from serenbox.training.report import write_json_atomic


class ConvertError(Exception):
    """Bad input (exit code 2): the message is the one line the user sees."""

    exit_code = 2


class ProofFailed(ConvertError):
    """The int8 model lost more accuracy than allowed (exit code 1); nothing but the report is written."""

    exit_code = 1

    def __init__(self, message: str, report: dict[str, Any], report_path: Path) -> None:
        super().__init__(message)
        self.report = report
        self.report_path = report_path


@dataclass(frozen=True)
class ConvertResult:
    tflite: Path
    manifest: Path
    report_path: Path
    report: dict[str, Any]
    manifest_data: Manifest


def report_path_for(out: Path) -> Path:
    return out.with_suffix(".report.json")


def _writable_dir(folder: Path, what: str) -> None:
    if folder.exists() and not folder.is_dir():  # mkdir would say "File exists", which misleads
        raise ConvertError(f"{folder}: cannot write the {what} there (a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConvertError(f"{folder}: cannot write the {what} there ({e.strerror or one_line(e)})") from None


def _check_arguments(
    model: Path, data: Path, out: Path, io: str, calibration_size: int, split: str, threads: int, report: Path
) -> None:
    """The cheap checks, before TensorFlow is even imported."""
    if out.suffix != ".tflite":
        raise ConvertError(f"{out}: the output file must end in .tflite")
    if io not in IO_TYPES:
        raise ConvertError(f"--io must be one of {', '.join(IO_TYPES)}, got {io!r}")
    if calibration_size < 1:
        raise ConvertError(f"--calibration-size must be at least 1, got {calibration_size}")
    if threads < 1:
        raise ConvertError(f"--threads must be at least 1, got {threads}")
    if split not in SPLITS:
        raise ConvertError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if not model.is_file():
        raise ConvertError(f"{model}: model file does not exist")
    if not data.exists():
        raise ConvertError(f"{data}: data path does not exist")
    # A report written over one of these would silently replace a file the user needs.
    taken = {
        out: "the output model",
        manifest_path(out): "the output's manifest",
        model: "the input model",
        data: "the data",
    }
    for path, what in taken.items():
        if report.resolve() == path.resolve():
            raise ConvertError(f"{report}: --report would overwrite {what}; choose another path")
    _writable_dir(out.parent, "model")
    _writable_dir(report.parent, "report")


def span_pixel_range(pixels: np.ndarray) -> np.ndarray:
    """The calibration pixels with one corner pixel set to 0 and one to 255 where the set lacks them.

    The input tensor's quantization comes from the range calibration saw; a set without pure
    black or white would give a scale below 1 and clip real pixels at the ends. One pixel
    each moves no other tensor's range noticeably, and makes the input scale exactly 1.
    """
    pixels = pixels.copy()
    if pixels.min() > 0:
        pixels[0, 0, 0, :] = 0
    if pixels.max() < 255:
        pixels[-1, -1, -1, :] = 255
    return pixels


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf
    from serenbox.device.interpreter import runtime_version

    try:
        serenbox = version("serenbox")
    except PackageNotFoundError:
        serenbox = "unknown"
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "serenbox": serenbox,
        "interpreter": runtime_version(),
    }


def _manifest_for(
    tflite: Path, name: str, io: str, info: Any, source: Path, calibration: dict, temperature: float = 1.0
) -> Manifest:
    from serenbox.device.interpreter import load_interpreter

    interpreter = load_interpreter(str(tflite), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    return Manifest(
        model_file=name,
        sha256=sha256_of(tflite),
        input=InputSpec(
            dtype=io,
            scale=float(inp["quantization"][0]),
            zero_point=int(inp["quantization"][1]),
            height=info.height,
            width=info.width,
            channels=info.channels,
        ),
        output=OutputSpec(
            dtype=io,
            scale=float(out["quantization"][0]),
            zero_point=int(out["quantization"][1]),
            activation=info.activation,
            temperature=temperature,
        ),
        labels=LABELS,
        source_model={"file": source.name, "sha256": sha256_of(source)},
        calibration=calibration,
        tools=_versions(),
        created=utc_now(),
    )


def convert(
    model_path: str | Path,
    data: str | Path,
    out_path: str | Path,
    io: str = "int8",
    calibration_size: int = 300,
    proof_split: str = "PublicTest",
    max_drop: float = 1.0,
    seed: int = 0,
    threads: int = 1,
    report_path: str | Path | None = None,
    log: Callable[[str], None] = lambda line: None,
    ferplus: str | Path | None = None,
    temperature: float = 1.0,
) -> ConvertResult:
    """Convert, verify and prove; raise ConvertError (bad input) or ProofFailed (accuracy lost)."""
    model_path, data, out = Path(model_path), Path(data), Path(out_path)
    report_file = Path(report_path) if report_path is not None else report_path_for(out)
    _check_arguments(model_path, data, out, io, calibration_size, proof_split, threads, report_file)
    started = time.perf_counter()

    if not 0.05 <= temperature <= 20:
        raise ConvertError(f"--temperature must be between 0.05 and 20, got {temperature:g}")
    if ferplus is not None and not Path(ferplus).is_file():
        raise ConvertError(f"{ferplus}: FER+ votes file does not exist (ferplus.npz)")
    try:
        dataset = load(data)
        if ferplus is not None:
            dataset = ferplus_votes.attach(dataset, ferplus)
        train = dataset.require("Training")
        held = dataset.require(proof_split)
    except DatasetError as e:
        raise ConvertError(str(e)) from None
    log(f"data: {dataset.source}: {len(train)} Training, {len(held)} {proof_split} images")

    try:
        model = load_keras_model(model_path)
        picked = stratified_sample(train.labels, calibration_size, seed)
        info = check_contract(model, str(model_path), train.images[picked[:16]])
    except ContractError as e:
        raise ConvertError(str(e)) from None
    log(f"model: input {info.height}x{info.width}x{info.channels}, output 7 ({info.activation})")

    per_class = {c: int((train.labels[picked] == k).sum()) for k, c in enumerate(LABELS)}
    calibration = {
        "split": "Training",
        "images": len(picked),
        "per_class": per_class,
        "seed": seed,
        "data": str(data),
        "data_sha256": sha256_of(data) if data.is_file() else None,
        "input_range": [0, 255],
    }
    log(f"calibrating on {len(picked)} Training images (stratified by class, seed {seed}) and converting ...")
    t0 = time.perf_counter()
    try:
        tflite_bytes = convert_int8(model, span_pixel_range(model_input(train.images[picked], info)), io)
    except QuantizeError as e:
        raise ConvertError(f"{model_path}: {e}") from None
    conversion_s = time.perf_counter() - t0

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tflite_bytes)
        readable_by_all(tmp)
        try:
            ops = check_integer_only(tmp, io)
        except QuantizeError as e:
            raise ConvertError(f"{model_path}: {e}") from None
        log(f"converted in {conversion_s:.1f} s: {len(ops)} ops, all integer; proving on {proof_split} ...")

        t0 = time.perf_counter()
        fp_labels = ferplus_votes.majority(held.votes)[1] if held.votes is not None else None
        proof = prove(model, info, tmp, held.images, held.labels, threads, fp_labels)
        proof_s = time.perf_counter() - t0
        failed = gate_failures(proof, max_drop)
        passed = not failed
        report = {
            "model": str(model_path),
            "model_sha256": sha256_of(model_path),
            "tflite": str(out),
            "tflite_sha256": sha256_of(tmp),
            "written": passed,
            "data": str(data),
            "ferplus": str(ferplus) if ferplus is not None else None,
            "split": proof_split,
            "io": io,
            "input": {"height": info.height, "width": info.width, "channels": info.channels},
            "activation": info.activation,
            "calibration": calibration,
            "ops": {name: ops.count(name) for name in sorted(set(ops))},
            "sizes": {"keras_bytes": model_path.stat().st_size, "tflite_bytes": len(tflite_bytes)},
            "timing_s": {
                "conversion": conversion_s,
                "proof": proof_s,
                "total": time.perf_counter() - started,
            },
            "max_drop": max_drop,
            "passed": passed,
            "proof": proof,
            "created": utc_now(),
        }
        write_json_atomic(report, report_file)
        log(format_table(report))
        if not passed:
            raise ProofFailed(
                f"{'; '.join(failed)} (allowed {max_drop:g}); {out.name} not written, see {report_file}",
                report,
                report_file,
            )
        manifest = _manifest_for(tmp, out.name, io, info, model_path, calibration, temperature)
        os.replace(tmp, out)
        try:
            write_manifest(manifest, manifest_path(out))
        except BaseException:
            out.unlink(missing_ok=True)  # a model without its manifest would be refused anyway
            raise
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out}, {manifest_path(out)} and {report_file}")
    return ConvertResult(out, manifest_path(out), report_file, report, manifest)


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send fd 2 to `path`: TensorFlow's C++ logs bypass Python and would bury the one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(target, 2)
        # Python-level warnings too, also when sys.stderr is not fd 2 (an embedding program, pytest).
        with open(os.dup(target), "w", closefd=True) as log, contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serenbox-convert",
        description="Convert a Keras emotion model to a calibrated full-int8 TFLite model, with manifest and proof.",
    )
    p.add_argument("--model", required=True, type=Path, help="trained Keras model (.keras)")
    p.add_argument("--data", required=True, type=Path, help="FER2013: .npz, Kaggle .csv, or train/ test/ folders")
    p.add_argument("--out", required=True, type=Path, help="output .tflite (manifest .json and report beside it)")
    p.add_argument("--io", choices=IO_TYPES, default="int8", help="input/output tensor type (default int8)")
    p.add_argument("--calibration-size", type=int, default=300, help="Training images for calibration (300)")
    p.add_argument("--split", default="PublicTest", choices=SPLITS, help="held-out split for the proof")
    p.add_argument("--max-drop", type=float, default=1.0, help="allowed int8 accuracy loss in points (1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads for the proof (1, like the device)")
    p.add_argument("--report", type=Path, default=None, help="proof report JSON (default OUT.report.json)")
    p.add_argument(
        "--ferplus", type=Path, default=None, help="FER+ votes (ferplus.npz): add FER+ agreement to the proof"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="calibration temperature for the manifest (training/evaluate.py --fit-temperature on PublicTest)",
    )
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's own log output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = dict(
        io=args.io,
        calibration_size=args.calibration_size,
        proof_split=args.split,
        max_drop=args.max_drop,
        seed=args.seed,
        threads=args.threads,
        report_path=args.report,
        ferplus=args.ferplus,
        temperature=args.temperature,
        log=lambda line: print(line, flush=True),
    )
    fd, log_name = tempfile.mkstemp(prefix="serenbox-convert-", suffix=".log")
    os.close(fd)
    log_file = Path(log_name)
    keep_log = False
    try:
        quiet = contextlib.nullcontext() if args.verbose else native_stderr_to(log_file)
        with quiet:
            try:
                convert(args.model, args.data, args.out, **options)
                return 0
            except ConvertError as e:
                error, code = e, e.exit_code
            except Exception as e:  # a bug or a TensorFlow failure: still one line, the details in the log
                import traceback

                traceback.print_exc()  # into the log file
                keep_log = not args.verbose
                error, code = RuntimeError(f"conversion failed: {one_line(e)} (details in {log_file})"), 1
        print(f"error: {error}", file=sys.stderr)
        return code
    finally:
        if not keep_log:
            log_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
