"""Typed SerenBox MQTT messages: what `serenbox.client` yields (pure parsing, no network).

Each topic under `<prefix>/<device_id>/` becomes one frozen dataclass (docs/mqtt.md, docs/events.md):
`events` → `Event`, `state` → `State`, `stats` → `Stats`, `availability` → `Availability`,
`error` → `CommandError`. Every one keeps the topic and the raw payload; keys this version does not
know are kept in `extra` (the schema may grow within `serenbox.event/1`), never an error. A payload
that cannot be read raises `MalformedMessage` with one line saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

EVENT_SCHEMA = "serenbox.event/1"
# Subscription order: retained availability and state arrive before the rest on (re)connect.
KINDS = ("availability", "state", "stats", "events", "error")


class MalformedMessage(ValueError):
    """A payload that is not what its topic promises; the message says why in one line."""


@dataclass(frozen=True)
class Box:
    """A face as fractions 0..1 of the frame, top left origin."""

    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Summary:
    """An `end` event's summary: the track's dominant emotion and its share of each emotion."""

    dominant: str
    share: dict[str, float]


@dataclass(frozen=True)
class Event:
    """One `serenbox.event/1` event (docs/events.md)."""

    id: str
    type: str
    device_id: str
    run_id: str
    seq: int
    track_id: int
    timestamp: datetime
    emotion: str
    confidence: float
    probabilities: dict[str, float]
    box: Box | None
    duration_s: float | None = None
    summary: Summary | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    topic: str = ""
    raw: bytes = b""


@dataclass(frozen=True)
class Track:
    """One face in `State.tracks`."""

    track_id: int
    emotion: str
    confidence: float
    box: Box | None


@dataclass(frozen=True)
class State:
    """The retained summary of now: who is there and what they feel."""

    device_id: str
    faces: int
    dominant: str | None
    probabilities: dict[str, float] | None
    tracks: tuple[Track, ...]
    paused: bool
    extra: dict[str, Any] = field(default_factory=dict)
    topic: str = ""
    raw: bytes = b""


@dataclass(frozen=True)
class Stats:
    """Runtime figures; fields a box did not send are None (older versions, stdout-only runs)."""

    device_id: str
    fps: float | None
    frames: int | None
    spool_depth: int | None
    spool_dropped: int | None
    mqtt_connected: bool | None
    stats_interval_s: float | None
    uptime_s: float | None
    cpu_temp_c: float | None
    latency_ms: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    topic: str = ""
    raw: bytes = b""


@dataclass(frozen=True)
class Availability:
    """`online` or `offline` (retained; `offline` is also the box's Last Will)."""

    device_id: str
    online: bool
    topic: str = ""
    raw: bytes = b""


@dataclass(frozen=True)
class CommandError:
    """A box's answer on `error` to a command it rejected."""

    device_id: str
    error: str
    payload: str
    timestamp: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    topic: str = ""
    raw: bytes = b""


Message = Event | State | Stats | Availability | CommandError

_EVENT_KEYS = {"schema", *Event.__dataclass_fields__} - {"extra", "topic", "raw"}
_STATE_KEYS = {"faces", "dominant", "probabilities", "tracks", "paused"}
_STATS_KEYS = {
    "fps",
    "frames",
    "spool_depth",
    "spool_dropped",
    "mqtt_connected",
    "stats_interval_s",
    "uptime_s",
    "cpu_temp_c",
    "latency_ms",
}


def split_topic(topic: str) -> tuple[str, str]:
    """(device_id, kind) of `<prefix...>/<device_id>/<kind>`."""
    parts = topic.rsplit("/", 2)
    if len(parts) < 3:
        raise MalformedMessage(f"topic {topic!r} is not <prefix>/<device_id>/<kind>")
    return parts[1], parts[2]


def parse(topic: str, payload: bytes) -> Message:
    """The typed message for a payload received on `topic`; MalformedMessage if it cannot be read."""
    device_id, kind = split_topic(topic)
    if kind == "availability":
        text = payload.decode("utf-8", errors="replace").strip()
        if text not in ("online", "offline"):
            raise MalformedMessage(f"{topic}: availability is {text[:40]!r}, not online/offline")
        return Availability(device_id, text == "online", topic, payload)
    data = _json_object(topic, payload)
    if kind == "events":
        return _event(data, topic, payload)
    if kind == "state":
        return _state(device_id, data, topic, payload)
    if kind == "stats":
        return _stats(device_id, data, topic, payload)
    if kind == "error":
        return CommandError(
            device_id,
            _get(data, "error", str, topic),
            str(data.get("payload", "")),
            _opt(data, "timestamp", str, topic),
            _extra(data, {"error", "payload", "timestamp"}),
            topic,
            payload,
        )
    raise MalformedMessage(f"{topic}: unknown kind {kind!r} (known: {', '.join(KINDS)})")


def _json_object(topic: str, payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedMessage(f"{topic}: payload is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise MalformedMessage(f"{topic}: payload is not JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:
        raise MalformedMessage(f"{topic}: payload is nested too deeply") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"{topic}: payload is a JSON {type(data).__name__}, not an object")
    return data


def _get(data: dict[str, Any], key: str, tp: type | tuple[type, ...], topic: str) -> Any:
    if key not in data:
        raise MalformedMessage(f"{topic}: missing key {key!r}")
    return _checked(data[key], key, tp, topic)


def _opt(data: dict[str, Any], key: str, tp: type | tuple[type, ...], topic: str) -> Any:
    value = data.get(key)
    return None if value is None else _checked(value, key, tp, topic)


def _checked(value: Any, key: str, tp: type | tuple[type, ...], topic: str) -> Any:
    # bool is an int in Python; a `true` where a number belongs is a broken payload.
    if not isinstance(value, tp) or (isinstance(value, bool) and bool not in (tp if isinstance(tp, tuple) else (tp,))):
        raise MalformedMessage(f"{topic}: {key!r} is {type(value).__name__} {str(value)[:40]!r}")
    return float(value) if tp == (int, float) else value


def _probabilities(value: Any, key: str, topic: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise MalformedMessage(f"{topic}: {key!r} is not an object of numbers")
    return {str(k): float(v) for k, v in value.items()}


def _box(value: Any, topic: str) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{topic}: 'box' is not an object")
    return Box(*(_get(value, k, (int, float), topic) for k in ("x", "y", "w", "h")))


def _timestamp(value: str, topic: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedMessage(f"{topic}: timestamp {value[:40]!r} is not ISO-8601") from None


def _extra(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _event(data: dict[str, Any], topic: str, payload: bytes) -> Event:
    schema = data.get("schema")
    if schema != EVENT_SCHEMA:
        raise MalformedMessage(f"{topic}: schema {str(schema)[:40]!r} is not {EVENT_SCHEMA!r}")
    summary = data.get("summary")
    if summary is not None:
        if not isinstance(summary, dict):
            raise MalformedMessage(f"{topic}: 'summary' is not an object")
        share = _probabilities(summary.get("share", {}), "share", topic)
        summary = Summary(_get(summary, "dominant", str, topic), share)
    return Event(
        id=_get(data, "id", str, topic),
        type=_get(data, "type", str, topic),
        device_id=_get(data, "device_id", str, topic),
        run_id=_get(data, "run_id", str, topic),
        seq=_get(data, "seq", int, topic),
        track_id=_get(data, "track_id", int, topic),
        timestamp=_timestamp(_get(data, "timestamp", str, topic), topic),
        emotion=_get(data, "emotion", str, topic),
        confidence=_get(data, "confidence", (int, float), topic),
        probabilities=_probabilities(data.get("probabilities", {}), "probabilities", topic),
        box=_box(data.get("box"), topic),
        duration_s=_opt(data, "duration_s", (int, float), topic),
        summary=summary,
        extra=_extra(data, _EVENT_KEYS),
        topic=topic,
        raw=payload,
    )


def _state(device_id: str, data: dict[str, Any], topic: str, payload: bytes) -> State:
    tracks = _get(data, "tracks", list, topic)
    parsed = []
    for t in tracks:
        if not isinstance(t, dict):
            raise MalformedMessage(f"{topic}: a track is not an object")
        parsed.append(
            Track(
                _get(t, "track_id", int, topic),
                _get(t, "emotion", str, topic),
                _get(t, "confidence", (int, float), topic),
                _box(t.get("box"), topic),
            )
        )
    probabilities = data.get("probabilities")
    return State(
        device_id=device_id,
        faces=_get(data, "faces", int, topic),
        dominant=_opt(data, "dominant", str, topic),
        probabilities=None if probabilities is None else _probabilities(probabilities, "probabilities", topic),
        tracks=tuple(parsed),
        paused=bool(_opt(data, "paused", bool, topic)),
        extra=_extra(data, _STATE_KEYS),
        topic=topic,
        raw=payload,
    )


def _stats(device_id: str, data: dict[str, Any], topic: str, payload: bytes) -> Stats:
    latency = data.get("latency_ms")
    return Stats(
        device_id=device_id,
        fps=_opt(data, "fps", (int, float), topic),
        frames=_opt(data, "frames", int, topic),
        spool_depth=_opt(data, "spool_depth", int, topic),
        spool_dropped=_opt(data, "spool_dropped", int, topic),
        mqtt_connected=_opt(data, "mqtt_connected", bool, topic),
        stats_interval_s=_opt(data, "stats_interval_s", (int, float), topic),
        uptime_s=_opt(data, "uptime_s", (int, float), topic),
        cpu_temp_c=_opt(data, "cpu_temp_c", (int, float), topic),
        latency_ms=latency if isinstance(latency, dict) else {},
        extra=_extra(data, _STATS_KEYS),
        topic=topic,
        raw=payload,
    )
