"""The model manifest: the JSON beside a .tflite that says what the model is and how to feed it.

The converter writes it; the device reads it and refuses a model that does not match it
(missing manifest, changed file, other labels, other input/output details), because a
silently mismatched model gives confident wrong emotions. No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from serenbox.device.labels import LABELS

FORMAT = "serenbox-model/1"
# Keys in the documented order, easiest to read by eye.
_KEY_ORDER = (
    "format",
    "model_file",
    "sha256",
    "labels",
    "input",
    "output",
    "source_model",
    "calibration",
    "tools",
    "created",
)
INT_DTYPES = ("int8", "uint8")
ACTIVATIONS = ("softmax", "none")


class ManifestError(ValueError):
    """A manifest that is missing, malformed or does not match its model; the message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    scale: float
    zero_point: int


@dataclass(frozen=True)
class InputSpec(TensorSpec):
    height: int = 0
    width: int = 0
    channels: int = 1


@dataclass(frozen=True)
class OutputSpec(TensorSpec):
    activation: str = "softmax"
    # The logits are divided by this before the softmax (temperature scaling, fitted on PublicTest):
    # it makes the reported confidences calibrated without changing any top emotion. Optional in
    # the file; manifests from before it existed mean 1.
    temperature: float = 1.0


@dataclass(frozen=True)
class Manifest:
    model_file: str
    sha256: str
    input: InputSpec
    output: OutputSpec
    labels: tuple[str, ...] = LABELS
    source_model: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return {k: d[k] for k in _KEY_ORDER}


def manifest_path(tflite_path: str | Path) -> Path:
    return Path(tflite_path).with_suffix(".json")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def readable_by_all(path: str | Path) -> None:
    """Give a mkstemp file (mode 0600) the mode a normal write would: the service user must read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write atomically (temp file in the same folder, then rename): never a half-written manifest."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_dict(), f, indent=2)
            f.write("\n")
        readable_by_all(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _get(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing key {key!r}")
    value = d[key]
    # bool is an int in Python; a manifest saying `"height": true` is still wrong.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManifestError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _tensor(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be an object")
    dtype = _get(d, "dtype", str, where)
    if dtype not in INT_DTYPES:
        raise ManifestError(f"{where}: dtype {dtype!r} is not one of {', '.join(INT_DTYPES)}")
    scale = float(_get(d, "scale", (int, float), where))
    if not scale > 0:
        raise ManifestError(f"{where}: scale must be positive, got {scale}")
    return {"dtype": dtype, "scale": scale, "zero_point": _get(d, "zero_point", int, where)}


def parse_manifest(data: Any, where: str) -> Manifest:
    """A Manifest from its JSON object; `where` (the file name) prefixes every error."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{where}: format {fmt!r} is not {FORMAT!r}")
    inp = _tensor(data.get("input"), f"{where}: input")
    for key in ("height", "width", "channels"):
        inp[key] = _get(data["input"], key, int, f"{where}: input")
        if inp[key] < 1:
            raise ManifestError(f"{where}: input {key} must be positive")
    if inp["channels"] not in (1, 3):
        raise ManifestError(f"{where}: input channels must be 1 or 3, got {inp['channels']}")
    out = _tensor(data.get("output"), f"{where}: output")
    out["activation"] = _get(data["output"], "activation", str, f"{where}: output")
    if out["activation"] not in ACTIVATIONS:
        raise ManifestError(f"{where}: output activation {out['activation']!r} is not one of {', '.join(ACTIVATIONS)}")
    if "temperature" in data["output"]:
        out["temperature"] = float(_get(data["output"], "temperature", (int, float), f"{where}: output"))
        if not 0.05 <= out["temperature"] <= 20:
            raise ManifestError(f"{where}: output temperature must be between 0.05 and 20, got {out['temperature']}")
    labels = _get(data, "labels", list, where)
    if tuple(labels) != LABELS:
        raise ManifestError(f"{where}: labels {labels} differ from the project's {list(LABELS)}")
    return Manifest(
        model_file=_get(data, "model_file", str, where),
        sha256=_get(data, "sha256", str, where).lower(),
        input=InputSpec(**inp),
        output=OutputSpec(**out),
        labels=tuple(labels),
        source_model=data.get("source_model") or {},
        calibration=data.get("calibration") or {},
        tools=data.get("tools") or {},
        created=str(data.get("created", "")),
    )


def load_manifest(tflite_path: str | Path) -> Manifest:
    """The manifest beside `tflite_path`, verified against the file (name, sha256, labels, format)."""
    model = Path(tflite_path)
    path = manifest_path(model)
    if not model.is_file():
        raise ManifestError(f"{model}: model file does not exist")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest missing beside {model.name} (convert the model with serenbox-convert)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    manifest = parse_manifest(data, str(path))
    if manifest.model_file != model.name:
        raise ManifestError(f"{path}: describes {manifest.model_file!r}, not {model.name!r}")
    actual = sha256_of(model)
    if actual != manifest.sha256:
        raise ManifestError(f"{path}: sha256 {manifest.sha256[:12]}... does not match {model.name} ({actual[:12]}...)")
    return manifest


def _quant(detail: dict) -> tuple[float, int]:
    q = detail.get("quantization") or (0.0, 0)
    return float(q[0]), int(q[1])


def _compare(spec: TensorSpec, detail: dict, side: str, where: str) -> None:
    dtype = np.dtype(detail["dtype"]).name
    if dtype != spec.dtype:
        raise ManifestError(f"{where}: {side} dtype is {spec.dtype} in the manifest but {dtype} in the model")
    scale, zero_point = _quant(detail)
    # The converter copies these numbers from the interpreter; float32 → JSON → float round trips
    # may differ in the last bits only.
    if not np.isclose(scale, spec.scale, rtol=1e-6, atol=0) or zero_point != spec.zero_point:
        raise ManifestError(
            f"{where}: {side} quantization is scale={spec.scale:g} zero_point={spec.zero_point} in the manifest "
            f"but scale={scale:g} zero_point={zero_point} in the model"
        )


def check_against_interpreter(manifest: Manifest, interpreter: Any, where: str = "") -> None:
    """Refuse a manifest whose input/output shape, dtype or quantization differ from the model's."""
    where = where or manifest.model_file
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ManifestError(f"{where}: model has {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1")
    shape = tuple(int(s) for s in inputs[0]["shape"])
    want = (1, manifest.input.height, manifest.input.width, manifest.input.channels)
    if shape[1:] != want[1:]:
        raise ManifestError(f"{where}: input shape is {want[1:]} in the manifest but {shape[1:]} in the model")
    _compare(manifest.input, inputs[0], "input", where)
    out_shape = tuple(int(s) for s in outputs[0]["shape"])
    if out_shape[-1:] != (len(manifest.labels),) or len(out_shape) != 2:
        raise ManifestError(f"{where}: output shape is {out_shape}, expected (1, {len(manifest.labels)})")
    _compare(manifest.output, outputs[0], "output", where)
