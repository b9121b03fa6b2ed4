"""MQTT topic names and the `set` command parser (pure functions, no network)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from serenbox.device.commands import CommandError, validate_command

__all__ = ["CommandError", "Topics", "error_payload", "parse_command"]

# Enough of a bad payload to recognise it in the error topic without echoing megabytes.
RAW_ECHO_CHARS = 200
REASON_CHARS = 300
# A command is a few dozen bytes; anything far larger is refused before it is parsed.
MAX_COMMAND_BYTES = 1024


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


def parse_command(payload: bytes) -> dict[str, Any]:
    """`{"command": "pause"|"resume"}` or `{"command": "fps", "value": <number>}`, checked."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload is {len(payload)} bytes; a command is at most {MAX_COMMAND_BYTES}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise CommandError(f"payload is not valid JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:
        raise CommandError("payload is nested too deeply") from None
    return validate_command(data)


def error_payload(reason: str, raw: bytes) -> str:
    text = raw[: RAW_ECHO_CHARS * 4].decode("utf-8", errors="replace")
    if len(text) > RAW_ECHO_CHARS:
        text = text[:RAW_ECHO_CHARS] + "…"
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"error": reason[:REASON_CHARS], "payload": text, "timestamp": now})
