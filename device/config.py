"""SerenBox configuration: typed, validated in one place.

The YAML mirrors these dataclasses. An unknown key, a wrong type or an out-of-range value
raises `ConfigError` naming the dotted key (for example `camera.fps`). Secrets may come from
the environment: `SERENBOX_MQTT_USERNAME` / `SERENBOX_MQTT_PASSWORD` override the file.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def _f(default: Any, **check: Any) -> Any:
    """A dataclass field carrying its range check in metadata."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=check)
    return field(default=default, metadata=check)


@dataclass
class ModelConfig:
    # None: the model that ships inside the package (device/models/).
    path: str | None = None
    num_threads: int = _f(1, **_range(1, 64))
    # Average each face with its mirror image: more accurate, twice the classification time.
    flip_tta: bool = False


@dataclass
class CameraConfig:
    # "picamera2", "demo", a /dev/video index ("0") or path, a video file, an rtsp/http URL, or an image folder.
    source: str = "demo"
    fps: float = _f(10.0, **_range(0, 120, lo_open=True))
    width: int = _f(640, **_range(16, 8192))
    height: int = _f(480, **_range(16, 8192))
    reopen_initial_s: float = _f(1.0, **_range(0, 600, lo_open=True))
    reopen_max_s: float = _f(30.0, **_range(0, 3600, lo_open=True))
    loop: bool = False  # replay a video file or folder forever instead of ending the run


@dataclass
class DetectorConfig:
    kind: Literal["haar", "blazeface"] = "blazeface"
    min_face: int = _f(40, **_range(8, 4096))  # pixels, shorter side of the face box
    max_faces: int = _f(5, **_range(1, 64))
    margin: float = _f(0.15, **_range(0, 1))  # crop margin around the box, fraction of its size
    # haar only
    scale_factor: float = _f(1.1, **_range(1.01, 2.0))
    min_neighbors: int = _f(5, **_range(1, 50))
    # blazeface only: "short" (runs at any input size) or "full" (fixed 192×192 input: slower and finds
    # fewer faces in bench_detectors, but fewer false ones; docs/model-card.md, "Faces")
    blazeface_model: Literal["short", "full"] = "short"
    # null: the model's own (short 0.4, with the second look; full 0.5); lower finds more faces and more non-faces
    score_threshold: float | None = _f(None, **_range(0, 1, lo_open=True))
    # short only: a candidate is kept only if a second, centred look scores this much (0: no second look)
    verify_threshold: float = _f(0.7, **_range(0, 1))
    nms_iou: float = _f(0.3, **_range(0, 1, lo_open=True))  # boxes overlapping more than this are one face
    num_threads: int = _f(1, **_range(1, 64))  # TFLite interpreter threads for the detector


@dataclass
class TrackerConfig:
    iou_match: float = _f(0.3, **_range(0, 1, lo_open=True))  # minimum overlap to continue a track
    smoothing_s: float = _f(0.5, **_range(0, 60))  # time constant of the probability smoothing
    confirm_frames: int = _f(3, **_range(1, 1000))  # detections before a track emits `new`
    switch_after_s: float = _f(1.0, **_range(0, 600))  # a new emotion must lead this long to emit `update`
    end_after_s: float = _f(2.0, **_range(0, 3600, lo_open=True))  # face gone this long: `end`


@dataclass
class TlsConfig:
    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip certificate verification (testing only)


@dataclass
class SpoolConfig:
    path: str | None = None  # None: <state_dir>/spool.sqlite
    max_events: int = _f(100_000, **_range(1, 10_000_000))
    max_age_s: float = _f(7 * 24 * 3600.0, **_range(1, 365 * 24 * 3600.0))


@dataclass
class MqttConfig:
    host: str | None = None  # None: no MQTT; events go to stdout
    port: int = _f(1883, **_range(1, 65535))
    topic_prefix: str = "serenbox"
    client_id: str | None = None  # None: serenbox-<device_id>
    keepalive: int = _f(30, **_range(5, 3600))
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    username: str | None = None
    password: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    state_interval_s: float = _f(5.0, **_range(0.1, 3600))
    stats_interval_s: float = _f(60.0, **_range(1, 86400))
    reconnect_min_s: float = _f(1.0, **_range(0.1, 600))
    reconnect_max_s: float = _f(30.0, **_range(0.1, 3600))


@dataclass
class DebugConfig:
    # Frames and face crops never touch disk unless an operator turns this on explicitly.
    save_crops: bool = False
    dir: str | None = None


@dataclass
class Config:
    device_id: str = "serenbox"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # systemd's StateDirectory= sets $STATE_DIRECTORY; that wins over this default.
    state_dir: str = "/var/lib/serenbox"
    model: ModelConfig = field(default_factory=ModelConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `protocol: 5` in YAML is a number
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)  # `source: 0` is a camera index written as a number
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(fields)})")
        value = _check_type(dotted, value, hints[key])
        check = fields[key].metadata
        if check and value is not None:
            lo, hi = check.get("lo"), check.get("hi")
            if lo is not None and (value < lo or (check.get("lo_open") and value == lo)):
                raise ConfigError(
                    f"{dotted}: {value} is out of range (must be {'>' if check.get('lo_open') else '>='} {lo})"
                )
            if hi is not None and value > hi:
                raise ConfigError(f"{dotted}: {value} is out of range (must be <= {hi})")
        kwargs[key] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    if not cfg.device_id or any(c in cfg.device_id for c in "/+#"):
        raise ConfigError(f"device_id: {cfg.device_id!r} must be non-empty without MQTT wildcards or '/'")
    if not cfg.mqtt.topic_prefix or any(c in cfg.mqtt.topic_prefix for c in "+#"):
        raise ConfigError(f"mqtt.topic_prefix: {cfg.mqtt.topic_prefix!r} must be non-empty without '+' or '#'")
    if cfg.mqtt.reconnect_min_s > cfg.mqtt.reconnect_max_s:
        raise ConfigError("mqtt.reconnect_min_s: must not exceed mqtt.reconnect_max_s")
    if cfg.camera.reopen_initial_s > cfg.camera.reopen_max_s:
        raise ConfigError("camera.reopen_initial_s: must not exceed camera.reopen_max_s")
    tls = cfg.mqtt.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("mqtt.tls.cert_file: a client certificate needs both cert_file and key_file")
    if cfg.debug.save_crops and not cfg.debug.dir:
        raise ConfigError("debug.dir: required when debug.save_crops is true")


def from_dict(data: dict | None, env: dict[str, str] | None = None) -> Config:
    cfg = _build(Config, data)
    env = os.environ if env is None else env
    if env.get("SERENBOX_MQTT_USERNAME"):
        cfg.mqtt.username = env["SERENBOX_MQTT_USERNAME"]
    if env.get("SERENBOX_MQTT_PASSWORD"):
        cfg.mqtt.password = env["SERENBOX_MQTT_PASSWORD"]
    if env.get("STATE_DIRECTORY"):
        # systemd may pass several colon-separated directories; the first is ours.
        cfg.state_dir = env["STATE_DIRECTORY"].split(":")[0]
    _cross_checks(cfg)
    return cfg


def load(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file does not exist") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    try:
        return from_dict(data, env)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
