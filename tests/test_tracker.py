"""The tracker: IoU matching into stable ids, smoothing, confirmation, hysteresis, end and summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from serenbox.device.config import TrackerConfig
from serenbox.device.labels import LABELS
from serenbox.device.tracker import Detection, Tracker, iou

FPS = 10
DT = 1.0 / FPS


def one_hot(label: str, weight: float = 1.0) -> np.ndarray:
    """Probabilities with `weight` on `label`, the rest spread evenly."""
    p = np.full(len(LABELS), (1.0 - weight) / (len(LABELS) - 1))
    p[LABELS.index(label)] = weight
    return p


def feed(tracker: Tracker, frames: list[list[Detection]], t0: float = 0.0) -> list[tuple[float, object]]:
    """Frames at 10 fps from t0; (t, event) for every event, in order."""
    out = []
    for i, dets in enumerate(frames):
        t = t0 + i * DT
        out.extend((t, e) for e in tracker.update(dets, t))
    return out


FACE = (100.0, 100.0, 80.0, 80.0)


def test_iou_of_known_boxes() -> None:
    assert iou(FACE, FACE) == pytest.approx(1.0)
    assert iou((0, 0, 10, 10), (20, 20, 10, 10)) == 0.0
    # Half of each box overlaps: intersection 50, union 150.
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_moving_faces_keep_their_ids_and_a_far_face_gets_a_new_one() -> None:
    tracker = Tracker(TrackerConfig(confirm_frames=1, iou_match=0.3))
    a, b = (50.0, 50.0, 80.0, 80.0), (400.0, 60.0, 80.0, 80.0)
    events = tracker.update([Detection(a, one_hot("happy")), Detection(b, one_hot("sad"))], 0.0)
    assert [e.kind for e in events] == ["new", "new"]
    ids = {e.emotion: e.track_id for e in events}
    assert ids["happy"] != ids["sad"]
    # Both drift by 8 px per frame, listed in the other order: matching is by overlap, not position in the list.
    for i in range(1, 10):
        dx = 8.0 * i
        moved_a, moved_b = (a[0] + dx, a[1], a[2], a[3]), (b[0] - dx, b[1], b[2], b[3])
        assert tracker.update([Detection(moved_b, one_hot("sad")), Detection(moved_a, one_hot("happy"))], i * DT) == []
    assert sorted(tracker.tracks) == sorted(ids.values())
    assert tracker.tracks[ids["happy"]].box == (a[0] + 72.0, a[1], a[2], a[3])
    # A face that appears somewhere without overlap is a new person, even if an old track is nearby in time.
    events = tracker.update([Detection((50.0, 300.0, 80.0, 80.0), one_hot("neutral"))], 1.0)
    assert [(e.kind, e.emotion) for e in events] == [("new", "neutral")]
    assert events[0].track_id not in ids.values()


def test_track_is_announced_only_after_confirm_frames() -> None:
    tracker = Tracker(TrackerConfig(confirm_frames=3))
    events = feed(tracker, [[Detection(FACE, one_hot("happy"))]] * 5)
    assert [(t, e.kind) for t, e in events] == [(pytest.approx(2 * DT), "new")]
    assert events[0][1].emotion == "happy"
    # A face seen for fewer frames than confirm_frames vanishes without any event.
    tracker = Tracker(TrackerConfig(confirm_frames=3, end_after_s=0.5))
    events = feed(tracker, [[Detection(FACE, one_hot("happy"))]] * 2 + [[]] * 10)
    assert events == []
    assert tracker.tracks == {}


def test_probabilities_are_smoothed_with_the_time_constant() -> None:
    tau = 0.5
    tracker = Tracker(TrackerConfig(confirm_frames=1, smoothing_s=tau))
    first, second = one_hot("neutral", 0.9), one_hot("happy", 0.9)
    tracker.update([Detection(FACE, first)], 0.0)
    tracker.update([Detection(FACE, second)], DT)
    (track,) = tracker.tracks.values()
    alpha = 1 - math.exp(-DT / tau)
    np.testing.assert_allclose(track.probabilities, (1 - alpha) * first + alpha * second)
    # No smoothing: the latest frame's probabilities as they are.
    tracker = Tracker(TrackerConfig(confirm_frames=1, smoothing_s=0.0))
    tracker.update([Detection(FACE, first)], 0.0)
    tracker.update([Detection(FACE, second)], DT)
    np.testing.assert_allclose(next(iter(tracker.tracks.values())).probabilities, second)


def test_one_frame_flip_is_not_an_event_but_a_lasting_change_is_after_switch_after_s() -> None:
    cfg = TrackerConfig(confirm_frames=1, smoothing_s=0.0, switch_after_s=0.5, end_after_s=5.0)
    tracker = Tracker(cfg)
    happy, sad = Detection(FACE, one_hot("happy")), Detection(FACE, one_hot("sad"))
    # Flicker: single sad frames (and a short run of 3, shorter than 0.5 s) inside a happy stream.
    frames = [[happy]] * 5 + [[sad]] + [[happy]] * 5 + [[sad]] * 3 + [[happy]] * 5
    events = feed(tracker, frames)
    assert [e.kind for _, e in events] == ["new"]
    # A lasting change: sad from frame 20 on; reported once it has led for 0.5 s (frame 25).
    tracker = Tracker(cfg)
    events = feed(tracker, [[happy]] * 20 + [[sad]] * 15)
    assert [(e.kind, e.emotion) for _, e in events] == [("new", "happy"), ("update", "sad")]
    t_update = events[1][0]
    assert t_update == pytest.approx(25 * DT)
    assert events[1][1].probabilities[LABELS.index("sad")] == pytest.approx(1.0)


def test_smoothing_alone_absorbs_a_one_frame_flip() -> None:
    # With switch_after_s=0 only the smoothing stands between a flip and an event.
    tracker = Tracker(TrackerConfig(confirm_frames=1, smoothing_s=1.0, switch_after_s=0.0))
    happy, sad = Detection(FACE, one_hot("happy", 0.8)), Detection(FACE, one_hot("sad", 0.8))
    events = feed(tracker, [[happy]] * 10 + [[sad]] + [[happy]] * 5)
    assert [e.kind for _, e in events] == ["new"]


def test_track_ends_after_absence_with_duration_and_summary() -> None:
    cfg = TrackerConfig(confirm_frames=1, smoothing_s=0.0, switch_after_s=0.0, end_after_s=1.0)
    tracker = Tracker(cfg)
    happy, sad = Detection(FACE, one_hot("happy")), Detection(FACE, one_hot("sad"))
    # 3 s happy (frames 0..30), then 1 s sad (frames 31..40), then gone.
    frames = [[happy]] * 31 + [[sad]] * 10 + [[]] * 15
    events = feed(tracker, frames)
    kinds = [(e.kind, e.emotion) for _, e in events]
    assert kinds == [("new", "happy"), ("update", "sad"), ("end", "sad")]
    t_end, end = events[-1]
    # Last seen at frame 40 (4.0 s); ends on the first frame at least 1 s later.
    assert t_end == pytest.approx(5.0)
    assert end.duration_s == pytest.approx(4.0)
    assert end.summary["dominant"] == "happy"
    share = end.summary["share"]
    assert set(share) == set(LABELS)
    assert share["happy"] == pytest.approx(3.1 / 4.0, abs=1e-3)
    assert share["sad"] == pytest.approx(0.9 / 4.0, abs=1e-3)
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3)
    assert tracker.tracks == {}


def test_a_short_absence_continues_the_track_and_a_long_one_starts_a_new_id() -> None:
    tracker = Tracker(TrackerConfig(confirm_frames=1, end_after_s=1.0))
    face = [Detection(FACE, one_hot("neutral"))]
    events = feed(tracker, [face] * 3 + [[]] * 5 + [face] * 3)  # gone 0.6 s: same track
    assert [e.kind for _, e in events] == ["new"]
    events = feed(tracker, [[]] * 12 + [face], t0=1.1)  # gone 1.2 s: end, then a new track
    assert [e.kind for _, e in events] == ["end", "new"]
    assert events[1][1].track_id != events[0][1].track_id


def test_close_ends_confirmed_tracks_only() -> None:
    tracker = Tracker(TrackerConfig(confirm_frames=2))
    tracker.update([Detection(FACE, one_hot("happy")), Detection((400.0, 0.0, 50.0, 50.0), one_hot("sad"))], 0.0)
    events = tracker.update([Detection(FACE, one_hot("happy"))], DT)  # the second face stays tentative
    assert [(e.kind, e.emotion) for e in events] == [("new", "happy")]
    ended = tracker.close()
    assert [(e.kind, e.emotion) for e in ended] == [("end", "happy")]
    assert ended[0].summary["dominant"] == "happy"
    assert tracker.tracks == {}
