"""Events as JSON lines on stdout: the sink for a box with no broker, and for `--print-events`."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from typing import Any, TextIO

from serenbox.device.sinks.base import Sink


class StdoutSink(Sink):
    """One compact JSON object per line, flushed at once so a reader (a pipe, journald) sees it live.

    Only events go to stdout: state and stats are for MQTT dashboards, and logs go to stderr,
    so stdout stays a clean event stream.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        stream = self._stream or sys.stdout  # looked up late: tests and the CLI may swap sys.stdout
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except BrokenPipeError:
                pass  # the reader went away (`serenbox run | head`); nothing else to tell it

    def close(self) -> None:
        stream = self._stream or sys.stdout
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError):  # reader gone, or stream closed
            stream.flush()
