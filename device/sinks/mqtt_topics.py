"""MQTT topic names and the `set` command parser (pure functions, no network)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

COMMANDS = ("pause", "resume", "fps")
# Enough of a bad payload to recognise it in the error topic without echoing megabytes.
RAW_ECHO_CHARS = 200


@dataclass(frozen=True)
class Topics:
    base: str

    @classmethod
    def for_device(cls, prefix: str, device_id: str) -> Topics:
        return cls(f"{prefix.rstrip('/')}/{device_id}")

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def set(self) -> str:
        return f"{self.base}/set"

    @property
    def error(self) -> str:
        return f"{self.base}/error"


class CommandError(ValueError):
    """A `set` payload that is not a valid command; the message says why."""


def parse_command(payload: bytes) -> dict[str, Any]:
    """`{"command": "pause"|"resume"}` or `{"command": "fps", "value": <number > 0>}`."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise CommandError(f"payload is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, dict):
        raise CommandError(f"expected a JSON object, got {type(data).__name__}")
    command = data.get("command")
    if not isinstance(command, str):
        raise CommandError('missing "command" (one of: ' + ", ".join(COMMANDS) + ")")
    if command not in COMMANDS:
        raise CommandError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    if command == "fps":
        value = data.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise CommandError('"fps" needs a positive number in "value"')
        return {"command": "fps", "value": float(value)}
    return {"command": command}


def error_payload(reason: str, raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    if len(text) > RAW_ECHO_CHARS:
        text = text[:RAW_ECHO_CHARS] + "…"
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"error": reason, "payload": text, "timestamp": now})
