"""SerenBox configuration: typed, validated in one place.

The YAML mirrors these dataclasses. An unknown key, a wrong type or an out-of-range value
raises `ConfigError` naming the dotted key (for example `camera.fps`). Secrets may come from
the environment: `SERENBOX_MQTT_USERNAME` / `SERENBOX_MQTT_PASSWORD` override the file.

A box runs unattended for months, so a value that would crash it later, or silently do the
wrong thing (a NaN, an identifier the broker drops, a path that is empty), is refused here, once,
with one line. The YAML reader is bounded too: no aliases (a "billion laughs" file), no nesting
deeper than any real configuration, no duplicate keys (which one would win?), at most 1 MiB.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 20  # real configurations nest 3 deep
# Frames per second: below this a frame every 10 s is as good as paused, and the loop must still
# come round to commands, the watchdog and stats (camera.fps and the `fps` command).
MIN_FPS, MAX_FPS = 0.1, 120.0
SHOW_CHARS = 60  # of a bad value in an error message: enough to recognise it, never megabytes

DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# mqtt.hosts entries: a name or IPv4 address, or an IPv6 address in brackets; an optional :port.
NODE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?")
MAX_NODES = 32


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """A value for an error message, cut short: a 1 MB string or a huge structure stays one line."""
    if isinstance(value, dict | list):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


def _f(default: Any, **check: Any) -> Any:
    """A dataclass field carrying its range check in metadata."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=check)
    return field(default=default, metadata=check)


@dataclass
class ModelConfig:
    # None: the model that ships inside the package (device/models/).
    path: str | None = _f(None, kind="path")
    num_threads: int = _f(1, **_range(1, 64))
    # Average each face with its mirror image: more accurate, twice the classification time.
    flip_tta: bool = False


@dataclass
class CameraConfig:
    # "picamera2", "demo", a /dev/video index ("0") or path, a video file, an rtsp/http URL, or an image folder.
    source: str = _f("picamera2", kind="text")
    fps: float = _f(10.0, **_range(MIN_FPS, MAX_FPS))
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
    # Turn each face upright by its eye line before the emotion classifier sees it (faces with
    # landmarks: blazeface's; haar's have none). Measured in bench_detectors: docs/model-card.md.
    align: bool = True
    # haar only
    scale_factor: float = _f(1.1, **_range(1.01, 2.0))
    min_neighbors: int = _f(5, **_range(1, 50))
    # blazeface only: "short" (runs at any input size) or "full" (fixed 192×192 input: slower and finds
    # fewer faces in bench_detectors, but fewer false ones; docs/model-card.md, "Faces")
    blazeface_model: Literal["short", "full"] = "short"
    # null: the model's own (short 0.35, with the second look; full 0.5); lower finds more faces and more non-faces
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
    ca_file: str | None = _f(None, kind="path")
    cert_file: str | None = _f(None, kind="path")
    key_file: str | None = _f(None, kind="path")
    insecure: bool = False  # skip certificate verification (testing only)


@dataclass
class SpoolConfig:
    path: str | None = _f(None, kind="path")  # None: <state_dir>/spool.sqlite
    max_events: int = _f(100_000, **_range(1, 10_000_000))
    max_age_s: float = _f(7 * 24 * 3600.0, **_range(1, 365 * 24 * 3600.0))


# Defaults that depend on `mqtt.hosts` (see MqttConfig).
ACK_TIMEOUT_S, CLUSTER_ACK_TIMEOUT_S = 30.0, 5.0
WINDOW, CLUSTER_WINDOW = 20, 1


@dataclass
class MqttConfig:
    host: str | None = _f(None, kind="host")  # None: no MQTT; events go to stdout
    port: int = _f(1883, **_range(1, 65535))
    # A broker cluster: "host:port" per node (port defaults to `port`); the box fails over in turn.
    hosts: list[str] = field(default_factory=list, metadata={"kind": "node", "max_items": MAX_NODES})
    topic_prefix: str = _f("serenbox", kind="topic")
    client_id: str | None = _f(None, kind="text", max_len=128)  # None: serenbox-<device_id>
    keepalive: int = _f(30, **_range(5, 3600))
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    username: str | None = _f(None, kind="text", max_len=1024)
    password: str | None = _f(None, kind="secret", max_len=1024)
    tls: TlsConfig = field(default_factory=TlsConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    state_interval_s: float = _f(5.0, **_range(0.1, 3600))
    stats_interval_s: float = _f(60.0, **_range(1, 86400))
    reconnect_min_s: float = _f(1.0, **_range(0.1, 600))
    reconnect_max_s: float = _f(30.0, **_range(0.1, 3600))
    # Events handed to the broker and no PUBACK for this long: the connection is dropped and made
    # again (on the next node of `hosts`); a broker that stalls must not hold the spool forever.
    # None: 30 s with one broker; 5 s with `hosts` (NATS's gateway gives up on a store after 4 s
    # and never answers it, so waiting longer only delays the failover).
    ack_timeout_s: float | None = _f(None, **_range(1, 3600))
    # Events handed to the broker at once without their PUBACK. None: 20 with one broker; 1 with
    # `hosts`, because a node that gives up on one event's store still stores the next ones of the
    # connection, and the resent event would then arrive after them (out of order).
    window: int | None = _f(None, **_range(1, 1000))

    def cluster(self) -> bool:
        return len(self.hosts) > 1

    def effective_ack_timeout_s(self) -> float:
        if self.ack_timeout_s is not None:
            return self.ack_timeout_s
        return CLUSTER_ACK_TIMEOUT_S if self.cluster() else ACK_TIMEOUT_S

    def effective_window(self) -> int:
        if self.window is not None:
            return self.window
        return CLUSTER_WINDOW if self.cluster() else WINDOW

    def nodes(self) -> list[tuple[str, int]]:
        """The brokers to connect to, in failover order: `hosts`, or `host` alone; empty: no MQTT."""
        if self.hosts:
            return [split_node(f"mqtt.hosts[{i}]", text, self.port) for i, text in enumerate(self.hosts)]
        return [(self.host, self.port)] if self.host else []


def split_node(key: str, text: str, default_port: int) -> tuple[str, int]:
    """ "host", "host:port", "[v6]" or "[v6]:port" -> (host, port); ConfigError naming `key` otherwise."""
    match = NODE.fullmatch(text)
    if not match:
        raise ConfigError(f"{key}: {show(text)} is not host:port (an IPv6 address goes in brackets: [::1]:1883)")
    host = match["v6"] or match["name"]
    port = int(match["port"]) if match["port"] else default_port
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} is out of range (1 to 65535)")
    return host, port


@dataclass
class HomeAssistantConfig:
    # None: on whenever mqtt.host is set (Home Assistant ignores the message if it does not listen).
    discovery: bool | None = None
    prefix: str = _f("homeassistant", kind="topic")  # Home Assistant's discovery prefix


@dataclass
class DebugConfig:
    # Frames and face crops never touch disk unless an operator turns this on explicitly.
    save_crops: bool = False
    dir: str | None = _f(None, kind="path")


@dataclass
class Config:
    device_id: str = _f("serenbox", kind="device_id")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # systemd's StateDirectory= sets $STATE_DIRECTORY; that wins over this default.
    state_dir: str = _f("/var/lib/serenbox", kind="path")
    model: ModelConfig = field(default_factory=ModelConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _check_type(key: str, value: Any, tp: Any, secret: bool = False) -> Any:
    got = "" if secret else f", got {show(value)}"  # a password never appears in a message or log
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(key, value, option, secret)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `protocol: 5` in YAML is a number
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{key}: {show(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false{got}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer{got}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number{got}")
        if not math.isfinite(value):
            # NaN slips through every range check (every comparison is false) and poisons what it touches.
            raise ConfigError(f"{key}: expected a finite number{got}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string{got}")
        return str(value)  # `source: 0` is a camera index written as a number
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list{got}")
        (item,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, item, secret) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_text(key: str, value: str, kind: str, max_len: int | None) -> str:
    """Strings end up in topics, file names, sockets and logs: refuse what would break any of them."""
    shown = "" if kind == "secret" else f" {show(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key}:{shown} is not valid Unicode (a lone surrogate)") from None
    if "\0" in value:
        raise ConfigError(f"{key}:{shown} contains a NUL character")
    if kind == "secret":
        if max_len is not None and len(value) > max_len:
            raise ConfigError(f"{key}: longer than {max_len} characters")
        return value
    if kind == "path":
        if not value.strip():
            raise ConfigError(f"{key}: empty path (use null for the default)")
        if len(value) > 4096:
            raise ConfigError(f"{key}: path longer than 4096 characters")
        return os.path.expanduser(value)
    if _CONTROL.search(value):
        raise ConfigError(f"{key}:{shown} contains a control character (newline, tab, ...)")
    if kind == "device_id" and not DEVICE_ID.fullmatch(value):
        raise ConfigError(f"{key}:{shown} must be 1 to 64 letters, digits, '_' or '-' (it names MQTT topics)")
    if kind == "topic":
        value = value.rstrip("/")
        levels = value.split("/")
        if len(value) > 128 or not all(TOPIC_LEVEL.fullmatch(level) for level in levels):
            raise ConfigError(
                f"{key}:{shown} must be topic levels of letters, digits, '_', '.' or '-' joined by '/' "
                "(at most 128 characters; no wildcards, no empty levels)"
            )
        if value.startswith("$"):
            raise ConfigError(f"{key}:{shown} must not start with '$' (brokers reserve those topics)")
    if kind == "node" and (not value or " " in value or len(value) > 260):
        raise ConfigError(f"{key}:{shown} is not host:port")
    if kind == "host" and (not value or " " in value or len(value) > 253):
        raise ConfigError(f"{key}:{shown} is not a host name or address (use null to turn MQTT off)")
    if kind == "text" and not value.strip():
        raise ConfigError(f"{key}: empty (use null for the default)")
    if max_len is not None and len(value) > max_len:
        raise ConfigError(f"{key}: {show(value)} is longer than {max_len} characters")
    return value


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
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{show(dotted)}: unknown key (known: {', '.join(fields)})")
        check = fields[key].metadata
        kind = check.get("kind")
        value = _check_type(dotted, value, hints[key], secret=kind == "secret")
        if kind and isinstance(value, str):
            value = _check_text(dotted, value, kind, check.get("max_len"))
        if isinstance(value, list):
            if len(value) > check.get("max_items", len(value)):
                raise ConfigError(f"{dotted}: more than {check['max_items']} entries")
            if kind:
                value = [_check_text(f"{dotted}[{i}]", v, kind, check.get("max_len")) for i, v in enumerate(value)]
        if check and value is not None and not isinstance(value, str):
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
    if cfg.mqtt.host and cfg.mqtt.hosts:
        raise ConfigError("mqtt.hosts: set either mqtt.host (one broker) or mqtt.hosts (a cluster), not both")
    nodes = cfg.mqtt.nodes()  # raises on a malformed host:port
    if len(set(nodes)) != len(nodes):
        raise ConfigError("mqtt.hosts: the same node is listed twice")
    if cfg.mqtt.reconnect_min_s > cfg.mqtt.reconnect_max_s:
        raise ConfigError("mqtt.reconnect_min_s: must not exceed mqtt.reconnect_max_s")
    if cfg.camera.reopen_initial_s > cfg.camera.reopen_max_s:
        raise ConfigError("camera.reopen_initial_s: must not exceed camera.reopen_max_s")
    tls = cfg.mqtt.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("mqtt.tls.cert_file: a client certificate needs both cert_file and key_file")
    if cfg.debug.save_crops and not cfg.debug.dir:
        raise ConfigError("debug.dir: required when debug.save_crops is true")


def _from_env(cfg: Config, env: typing.Mapping[str, str]) -> None:
    """Secrets and systemd's state directory; checked like the file's values."""
    overrides = (
        ("SERENBOX_MQTT_USERNAME", "mqtt.username", "text"),
        ("SERENBOX_MQTT_PASSWORD", "mqtt.password", "secret"),
    )
    for name, key, kind in overrides:
        if env.get(name):
            value = _check_text(f"{key} (from ${name})", env[name], kind, 1024)
            setattr(cfg.mqtt, key.split(".")[1], value)
    if env.get("STATE_DIRECTORY"):
        # systemd may pass several colon-separated directories; the first is ours.
        cfg.state_dir = _check_text(
            "state_dir (from $STATE_DIRECTORY)", env["STATE_DIRECTORY"].split(":")[0], "path", None
        )


def from_dict(data: dict | None, env: typing.Mapping[str, str] | None = None) -> Config:
    cfg = _build(Config, data)
    _from_env(cfg, os.environ if env is None else env)
    _cross_checks(cfg)
    return cfg


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without the features that let a small file cost gigabytes or recursion."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "aliases (*name) are not supported", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(raw: bytes, name: str) -> Any:
    """The YAML document in `raw`, or ConfigError with one line naming the file and the problem."""
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB; not a SerenBox configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        # A truncated or blanked file must not quietly run the box on defaults.
        raise ConfigError(f"{name}: the configuration is empty (write {{}} to run on the defaults)")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{name}{where}: not valid YAML ({show(getattr(e, 'problem', None) or e, 120)})") from None
    except RecursionError:
        raise ConfigError(f"{name}: not valid YAML (nested too deeply)") from None


def load(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a configuration file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration ({e.strerror})") from None
    data = parse_yaml(raw, str(p))
    try:
        return from_dict(data, env)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
