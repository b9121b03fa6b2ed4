"""Emotion events (`serenbox.event/1`): the one JSON shape every sink receives.

The schema is documented in docs/events.md; change it only additively, or bump the version.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from serenbox.device.labels import LABELS

SCHEMA = "serenbox.event/1"
EVENT_TYPES = ("new", "update", "end")
DECIMALS = 4


def utc_timestamp(now: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds and `Z`, e.g. 2026-11-24T10:00:00.123Z."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rounded_probabilities(probs: Sequence[float] | np.ndarray) -> dict[str, float]:
    """All 7 labels rounded to 4 decimals, still summing to 1.

    Rounding each value alone can leave the sum off by a few 1e-4; consumers check the sum,
    so the residue goes to the largest entry, where it matters least relatively.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if p.shape != (len(LABELS),):
        raise ValueError(f"expected {len(LABELS)} probabilities, got {p.shape[0]}")
    p = np.clip(p, 0.0, None)
    total = p.sum()
    p = p / total if total > 0 else np.full(len(LABELS), 1.0 / len(LABELS))
    r = np.round(p, DECIMALS)
    top = int(np.argmax(p))  # the dominant emotion: the first of exact ties, as everywhere
    residue = round(1.0 - float(r.sum()), DECIMALS)
    target = top
    if residue < 0:
        # Taking the residue from the dominant entry could drop it below a tied one, and readers
        # that pick the largest published value would then name another emotion.
        tied = [i for i in range(len(r)) if i != top and r[i] == r[top]]
        target = tied[-1] if tied else top
    r[target] = round(r[target] + residue, DECIMALS)
    return {label: float(v) for label, v in zip(LABELS, r, strict=True)}


def dominant(probs: Sequence[float] | np.ndarray) -> str:
    """The emotion with the highest probability; exact ties go to the first in LABELS order.

    int8 scores come in steps of 1/256, so exact ties happen (3 of 927 faces of one test set):
    the command line, the tracker and the Python API all break them this one way, and
    `rounded_probabilities` keeps this emotion's published value the largest."""
    return LABELS[int(np.argmax(np.asarray(probs, dtype=np.float64).reshape(-1)))]


def normalised_box(box: Sequence[float], frame_width: int, frame_height: int) -> dict[str, float]:
    """A pixel box (x, y, w, h) as fractions of the frame, clipped to 0..1."""
    x, y, w, h = (float(v) for v in box)
    x0, y0 = min(max(x / frame_width, 0.0), 1.0), min(max(y / frame_height, 0.0), 1.0)
    x1, y1 = min(max((x + w) / frame_width, 0.0), 1.0), min(max((y + h) / frame_height, 0.0), 1.0)
    return {key: round(v, DECIMALS) for key, v in (("x", x0), ("y", y0), ("w", x1 - x0), ("h", y1 - y0))}


class EventFactory:
    """Builds events for one daemon run: one run_id, a sequence number from 1, thread-safe."""

    def __init__(self, device_id: str, run_id: str | None = None) -> None:
        self.device_id = device_id
        self.run_id = run_id or str(uuid.uuid4())
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def make(
        self,
        kind: str,
        track_id: int,
        emotion: str,
        probabilities: Sequence[float] | np.ndarray,
        box: Sequence[float],
        frame_size: tuple[int, int],
        duration_s: float | None = None,
        summary: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if kind not in EVENT_TYPES:
            raise ValueError(f"unknown event type {kind!r}")
        probs = rounded_probabilities(probabilities)
        with self._lock:
            seq = next(self._seq)
        event: dict[str, Any] = {
            "schema": SCHEMA,
            "id": str(uuid.uuid4()),
            "type": kind,
            "device_id": self.device_id,
            "run_id": self.run_id,
            "seq": seq,
            "track_id": int(track_id),
            "timestamp": utc_timestamp(),
            "emotion": emotion,
            "confidence": probs[emotion],
            "probabilities": probs,
            "box": normalised_box(box, *frame_size),
        }
        if kind == "end":
            event["duration_s"] = round(float(duration_s or 0.0), 3)
            event["summary"] = summary or {}
        return event
