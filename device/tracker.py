"""Faces across frames: tracks with stable ids, smoothed probabilities, hysteresis.

Frame-to-frame emotion predictions flicker; events should not. A track's probabilities are
smoothed exponentially over time (time constant `smoothing_s`), and its reported emotion
changes only after another emotion has led the smoothed probabilities for `switch_after_s`.
All times are frame times (`Frame.t`), so a video file gives the same events on every run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from serenbox.device.config import TrackerConfig
from serenbox.device.labels import LABELS

Box = tuple[float, float, float, float]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Detection:
    box: Box
    probabilities: np.ndarray  # (7,), this frame's classifier output


@dataclass
class Track:
    id: int
    box: Box
    probabilities: np.ndarray  # smoothed
    first_t: float
    last_t: float
    emotion: int  # index into LABELS: the reported emotion (changes with hysteresis)
    hits: int = 1
    confirmed: bool = False
    candidate: int | None = None  # an emotion that leads but has not yet led long enough
    candidate_since: float = 0.0
    seconds_per_emotion: np.ndarray = field(default_factory=lambda: np.zeros(len(LABELS)))

    @property
    def label(self) -> str:
        return LABELS[self.emotion]

    @property
    def duration_s(self) -> float:
        return self.last_t - self.first_t

    def summary(self) -> dict:
        """Dominant emotion and the share of the track's time spent in each (reported) emotion."""
        total = float(self.seconds_per_emotion.sum())
        if total <= 0:
            share = np.zeros(len(LABELS))
            share[self.emotion] = 1.0
        else:
            share = self.seconds_per_emotion / total
        return {
            "dominant": LABELS[int(np.argmax(share))],
            "share": {label: round(float(s), 4) for label, s in zip(LABELS, share, strict=True)},
        }


@dataclass(frozen=True)
class TrackEvent:
    kind: str  # new | update | end
    track_id: int
    emotion: str
    probabilities: np.ndarray
    box: Box
    duration_s: float | None = None
    summary: dict | None = None


def iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


class Tracker:
    def __init__(self, cfg: TrackerConfig) -> None:
        self.cfg = cfg
        self.tracks: dict[int, Track] = {}
        self._ids = itertools.count(1)

    def confirmed(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.confirmed]

    def update(self, detections: list[Detection], t: float) -> list[TrackEvent]:
        """Feed one frame's faces (at frame time `t`); returns the events it causes: ends first, then new/update."""
        # Expire first, so a face that comes back after end_after_s gets a new track id.
        events: list[TrackEvent] = []
        for track in list(self.tracks.values()):
            if t - track.last_t >= self.cfg.end_after_s:
                if track.confirmed:
                    events.extend(self._finish(track))
                else:  # a tentative track was never announced, so it vanishes without a word
                    del self.tracks[track.id]
        matches = self._match(detections)
        matched_dets = set(matches.values())
        for track_id, det_index in matches.items():
            event = self._observe(self.tracks[track_id], detections[det_index], t)
            if event:
                events.append(event)
        for i, det in enumerate(detections):
            if i not in matched_dets:
                track = self._start(det, t)
                if track.confirmed:
                    events.append(self._event("new", track))
        return events

    def close(self) -> list[TrackEvent]:
        """End every open track (shutdown, pause): consumers see every track close."""
        events = [e for track in list(self.tracks.values()) if track.confirmed for e in self._finish(track)]
        self.tracks.clear()
        return events

    def _match(self, detections: list[Detection]) -> dict[int, int]:
        # Greedy by overlap: a few faces per frame, so the optimal assignment rarely differs.
        pairs = sorted(
            (
                (iou(track.box, det.box), track_id, i)
                for track_id, track in self.tracks.items()
                for i, det in enumerate(detections)
            ),
            reverse=True,
        )
        matches: dict[int, int] = {}
        used: set[int] = set()
        for overlap, track_id, i in pairs:
            if overlap < self.cfg.iou_match:
                break
            if track_id in matches or i in used:
                continue
            matches[track_id] = i
            used.add(i)
        return matches

    def _start(self, det: Detection, t: float) -> Track:
        probs = np.asarray(det.probabilities, np.float64)
        track = Track(
            id=next(self._ids), box=det.box, probabilities=probs, first_t=t, last_t=t, emotion=int(np.argmax(probs))
        )
        track.confirmed = track.hits >= self.cfg.confirm_frames
        self.tracks[track.id] = track
        return track

    def _observe(self, track: Track, det: Detection, t: float) -> TrackEvent | None:
        dt = max(0.0, t - track.last_t)
        tau = self.cfg.smoothing_s
        alpha = 1.0 if tau <= 0 else 1.0 - math.exp(-dt / tau)
        track.probabilities = (1 - alpha) * track.probabilities + alpha * np.asarray(det.probabilities, np.float64)
        # The interval since the last sighting is credited to the emotion reported during it.
        track.seconds_per_emotion[track.emotion] += dt
        track.box, track.last_t = det.box, t
        track.hits += 1
        leader = int(np.argmax(track.probabilities))
        if not track.confirmed:
            track.emotion = leader  # nothing reported yet, so nothing to hold steady
            if track.hits >= self.cfg.confirm_frames:
                track.confirmed = True
                return self._event("new", track)
            return None
        if leader == track.emotion:
            track.candidate = None
            return None
        if track.candidate != leader:
            track.candidate, track.candidate_since = leader, t
        if t - track.candidate_since >= self.cfg.switch_after_s:
            track.emotion, track.candidate = leader, None
            return self._event("update", track)
        return None

    def _finish(self, track: Track) -> list[TrackEvent]:
        self.tracks.pop(track.id, None)
        return [self._event("end", track, duration_s=track.duration_s, summary=track.summary())]

    @staticmethod
    def _event(kind: str, track: Track, duration_s: float | None = None, summary: dict | None = None) -> TrackEvent:
        return TrackEvent(kind, track.id, track.label, track.probabilities.copy(), track.box, duration_s, summary)
