"""What a SIGHUP reload may change while running, and what waits for a restart.

The pipeline keeps one configuration: the one that is in effect. A reloaded file's live keys
replace the running ones; its restart-only keys are set aside and reported, never stored, so
a second reload that reverts them finds nothing pending (the running values never changed).
"""

from __future__ import annotations

import copy
from typing import Any

from serenbox.device.config import Config

# Read once at start (the camera, model, broker connection, spool and identity).
RESTART_ONLY = (
    "device_id",
    "state_dir",
    "model",
    "mqtt",
    "camera.source",
    "camera.width",
    "camera.height",
    "camera.loop",
    "camera.reopen_initial_s",
    "camera.reopen_max_s",
)


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set(cfg: Config, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target: Any = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


def merge(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to run after a reload, and the restart-only keys the file changed."""
    applied = copy.deepcopy(new)
    pending = []
    for key in RESTART_ONLY:
        if _get(new, key) != _get(running, key):
            pending.append(key)
        _set(applied, key, copy.deepcopy(_get(running, key)))
    return applied, pending
