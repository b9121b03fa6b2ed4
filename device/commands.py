"""Remote commands (`set`): what the pipeline accepts, checked before it is queued.

A command arrives from anyone who may publish on the broker, so a bad one is refused with a
short message and never reaches the loop: values are bounded so that no command can make the
loop wait on its camera for long (see `SOURCE_MIN_FPS`) or overflow a clock.
"""

from __future__ import annotations

import math
from typing import Any

from serenbox.device.config import MAX_FPS, MIN_FPS, show

NAMES = ("pause", "resume", "fps")
# Sources never run slower than this, whatever fps is asked for: read() must return within half
# a second, or commands, stats and watchdog pings queue up behind it. A lower fps is applied by
# the pipeline, which thins the frames by their time instead.
SOURCE_MIN_FPS = 2.0


class CommandError(ValueError):
    """A command that is refused; the message says why in one short line."""


def validate_command(command: Any) -> dict[str, Any]:
    """A command dict, checked; CommandError with a message for a bad one."""
    if not isinstance(command, dict):
        raise CommandError(f"a command is an object, got {type(command).__name__}")
    name = command.get("command")
    if not isinstance(name, str):
        raise CommandError(f'missing "command" (one of: {", ".join(NAMES)})')
    if name in ("pause", "resume"):
        return {"command": name}
    if name == "fps":
        value = command.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CommandError('"fps" needs a number in "value"')
        if not MIN_FPS <= value <= MAX_FPS:
            raise CommandError(f'"fps" value must be between {MIN_FPS:g} and {MAX_FPS:g}, got {show(value)}')
        return {"command": "fps", "value": float(value)}
    raise CommandError(f"unknown command {show(name, 40)} (known: {', '.join(NAMES)})")
