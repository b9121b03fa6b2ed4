"""The sink interface: where emotion events, state and stats go.

Backends (stdout, MQTT) implement this; the pipeline only ever sees `Sink`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

CommandHandler = Callable[[dict[str, Any]], None]


class Sink(ABC):
    def start(self) -> None:
        """Open connections; must never block on an unreachable peer."""

    @abstractmethod
    def emit(self, event: dict[str, Any]) -> None:
        """Deliver one event (`new`/`update`/`end`); called in pipeline order."""

    def state(self, state: dict[str, Any]) -> None:
        """The current summary (faces present, dominant emotion); sinks may rate-limit."""

    def stats(self, stats: dict[str, Any]) -> None:
        """Periodic runtime figures (fps, latency); sinks may add their own counters."""

    def counters(self) -> dict[str, Any]:
        """Sink-side figures to merge into stats (spool depth, dropped events)."""
        return {}

    def problem(self) -> str | None:
        """Why this sink can no longer deliver (a worker thread died), or None; checked every second."""
        return None

    def on_command(self, handler: CommandHandler) -> None:
        """Register the pipeline's handler for remote commands (pause, resume, fps)."""

    def close(self) -> None:
        """Flush and release; after close no method is called again."""
