"""The processing loop: camera → faces → classifier → tracker → events → sinks, one direction.

One thread does all the work, in order, so events come out in a deterministic order and the
systemd watchdog is pinged from the loop itself (a hung camera read stops the pings). Other
threads only *ask*: commands from sinks, stop and reload requests are queued and applied by
the loop between frames. Frames and crops never leave this process.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serenbox.device import reload
from serenbox.device.classifier import Classifier, to_gray
from serenbox.device.commands import SOURCE_MIN_FPS, validate_command
from serenbox.device.config import Config
from serenbox.device.events import EventFactory, normalised_box, rounded_probabilities
from serenbox.device.faces.base import face_rolls
from serenbox.device.labels import LABELS
from serenbox.device.notify import Notifier
from serenbox.device.sinks.base import Sink
from serenbox.device.tracker import Detection, Tracker, TrackEvent

log = logging.getLogger(__name__)

THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
LATENCY_WINDOW = 300  # frames: ~30 s at the default 10 fps
FPS_WINDOW = 50
STATUS_INTERVAL_S = 5.0
FRAME_TIME_SLACK_S = 1e-3
HEALTH_CHECK_S = 1.0

__all__ = ["Pipeline", "validate_command"]


def cpu_temperature_c(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature where the kernel exposes it (a Pi does; containers often do not)."""
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def percentiles_ms(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(np.fromiter(samples, float), [50, 95])
    return {"p50": round(float(p50) * 1000, 2), "p95": round(float(p95) * 1000, 2)}


@dataclass
class StageTimes:
    detect: deque[float]
    classify: deque[float]
    track: deque[float]

    @classmethod
    def empty(cls) -> StageTimes:
        return cls(*(deque(maxlen=LATENCY_WINDOW) for _ in range(3)))


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        source: Any,  # a FrameSource (device.cameras): open(), read() -> Frame | None, close()
        detector: Any,  # a FaceDetector (serenbox.device.faces): detect(gray) -> list[Face]
        classifier: Classifier,
        sinks: list[Sink],
        notifier: Notifier | None = None,
        events: EventFactory | None = None,
        max_frames: int | None = None,
        reload: Callable[[], Config] | None = None,
        detector_factory: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.detector = detector
        self.classifier = classifier
        self.sinks = sinks
        self.notifier = notifier or Notifier(env={})
        self.events = events or EventFactory(cfg.device_id)
        self.tracker = Tracker(cfg.tracker)
        self.max_frames = max_frames
        self._reload_config = reload
        self._detector_factory = detector_factory
        self._clock = clock

        self.frames = 0
        self.skipped_frames = 0  # frames thinned out by an `fps` command below the source's rate
        self.times = StageTimes.empty()
        self._frame_clock: deque[float] = deque(maxlen=FPS_WINDOW)
        self._started = clock()
        self._last_stats = self._started
        self._last_status = -math.inf
        self._last_state_key: Any = None
        self._last_index: int | None = None
        self._source_drops = 0  # gaps in Frame.index: frames a live source dropped
        self._fps_limit: float | None = None
        self._next_frame_t = -math.inf
        self.paused = False
        self._camera_down = False
        self.failure: str | None = None  # why the loop gave up (a sink died): the daemon exits non-zero
        self._last_health = -math.inf
        self.faces_seen = 0
        self.events_emitted = 0
        if cfg.camera.fps < SOURCE_MIN_FPS:
            self._set_fps(cfg.camera.fps)

        self._stop = threading.Event()
        self._close_lock = threading.Lock()
        self._source_closed = False
        self._reload_requested = threading.Event()
        self._commands: queue.Queue[dict[str, Any]] = queue.Queue()
        for sink in sinks:
            sink.on_command(self.handle_command)
        if hasattr(source, "heartbeat"):
            # While a camera is being reopened the loop waits inside read(); keep the watchdog,
            # status, stats and commands going, or systemd would kill a healthy daemon.
            source.heartbeat = self._while_camera_down

    # --- requests from other threads and signal handlers -------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop (safe from signal handlers and other threads)."""
        self._stop.set()
        if getattr(self.source, "live", False):
            # A live camera's read() may wait seconds for a frame (or a reopen backoff); closing it
            # ends the wait now. Live sources allow close() from another thread; files do not
            # (OpenCV would release a capture mid-read), but they never block.
            threading.Thread(target=self._close_source, name="stop camera", daemon=True).start()

    def request_reload(self) -> None:
        self._reload_requested.set()

    def handle_command(self, command: dict[str, Any]) -> None:
        """Called by sinks from their own threads; validated here, applied by the loop."""
        self._commands.put(validate_command(command))

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> str:
        """Process until stopped, the source ends or max_frames; returns why it stopped."""
        reason = "stopped"
        self.source.open()
        # A live camera that is not there yet: the daemon is up and waiting for it, and says so.
        self._camera_down = getattr(self.source, "is_open", True) is False
        self.notifier.ready(self._status_text())
        log.info("running: run_id %s", self.events.run_id)
        try:
            while not self._stop.is_set():
                self._between_frames()
                if self.failure is not None:
                    reason = f"failed: {self.failure}"
                    break
                if self.paused:
                    self._stop.wait(0.05)
                    continue
                frame = self.source.read()
                if frame is None:
                    reason = "stopped" if self._stop.is_set() else "end of source"
                    break
                if self._stop.is_set():
                    break
                self._camera_down = False
                self.process(frame)
                if self.max_frames is not None and self.frames >= self.max_frames:
                    reason = "max frames"
                    break
        finally:
            self.notifier.stopping()
            log.info("stopping (%s) after %d frames", reason, self.frames)
            self._shutdown()
        return reason

    def process(self, frame: Any) -> None:
        """One frame through every stage; emits the events it causes."""
        if self._fps_limit is not None:
            interval = 1.0 / self._fps_limit
            # Media times like 0.1 * 2 are not exact; a frame a hair early is still on time.
            if frame.t < self._next_frame_t - FRAME_TIME_SLACK_S:
                self.skipped_frames += 1
                return
            # Keep the cadence; after a gap longer than one interval, restart it from this frame.
            behind = frame.t - self._next_frame_t > interval
            self._next_frame_t = (frame.t if behind else self._next_frame_t) + interval
        if self._last_index is not None and frame.index > self._last_index + 1:
            self._source_drops += frame.index - self._last_index - 1
        self._last_index = frame.index

        t0 = time.perf_counter()
        gray = to_gray(frame.image)
        faces = self.detector.detect(gray)
        t1 = time.perf_counter()
        boxes = [(float(f.x), float(f.y), float(f.w), float(f.h)) for f in faces]
        self.faces_seen += len(boxes)
        rolls = face_rolls(faces, self.cfg.detector.align)
        probs = self.classifier.classify(gray, boxes, self.cfg.detector.margin, rolls) if boxes else np.zeros((0, 7))
        t2 = time.perf_counter()
        track_events = self.tracker.update([Detection(b, p) for b, p in zip(boxes, probs, strict=True)], frame.t)
        t3 = time.perf_counter()

        self.times.detect.append(t1 - t0)
        self.times.classify.append(t2 - t1)
        self.times.track.append(t3 - t2)
        self.frames += 1
        self._frame_clock.append(self._clock())
        height, width = gray.shape[:2]
        self._frame_size = (width, height)
        self._emit(track_events)
        self._maybe_state()
        if self.cfg.debug.save_crops and boxes:
            self._save_crops(gray, boxes, rolls, frame.index)

    # --- between frames: commands, reload, watchdog, stats ---------------------------------------

    def _between_frames(self) -> None:
        self.notifier.watchdog()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            self._apply_command(command)
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload()
        now = self._clock()
        if now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            self.notifier.status(self._status_text())
        if now - self._last_stats >= self.cfg.mqtt.stats_interval_s:
            self._last_stats = now
            self._send_stats()
        if now - self._last_health >= HEALTH_CHECK_S:
            self._last_health = now
            self._check_sinks()

    def _check_sinks(self) -> None:
        # A sink whose worker thread died would lose every event from now on without a word;
        # ending the run (exit 1) lets systemd restart the daemon, and the spool keeps the events.
        for sink in self.sinks:
            try:
                problem = sink.problem()
            except Exception as e:
                problem = f"health check failed: {e}"
            if problem and self.failure is None:
                log.error("%s: %s; stopping so that the service restarts", type(sink).__name__, problem)
                self.failure = problem

    def _while_camera_down(self) -> None:
        if not self._camera_down:
            self._camera_down = True
            self.notifier.status(self._status_text())  # now, not at the next status interval
        self._between_frames()

    def _apply_command(self, command: dict[str, Any]) -> None:
        name = command["command"]
        log.info("command: %s", command)
        if name == "pause" and not self.paused:
            # Nothing is observed while paused, so open tracks end now rather than after a gap.
            self.paused = True
            self._emit(self.tracker.close())
            self._maybe_state()
        elif name == "resume" and self.paused:
            self.paused = False
            # A live source kept counting frames while nobody read them: not drops.
            self._last_index = None
            self._maybe_state()
        elif name == "fps":
            self._set_fps(command["value"])

    def _set_fps(self, fps: float) -> None:
        set_fps = getattr(self.source, "set_fps", None)
        if callable(set_fps):
            set_fps(max(fps, SOURCE_MIN_FPS))
        # Thin frames by frame time too: a source that cannot change its rate still gets limited.
        self._fps_limit = fps
        self._next_frame_t = -math.inf

    def _reload(self) -> None:
        if self._reload_config is None:
            return
        self.notifier.reloading()
        try:
            new = self._reload_config()
        except Exception as e:  # a bad file must never take the daemon down: keep running as is
            log.error("reload failed, keeping the running configuration: %s", e)
            self.notifier.ready(self._status_text())
            return
        old = self.cfg
        new, pending = reload.merge(old, new)
        logging.getLogger().setLevel(new.log_level)
        self.tracker.cfg = new.tracker
        if new.detector != old.detector and self._detector_factory is not None:
            try:
                self.detector = self._detector_factory(new.detector)
            except Exception as e:
                log.error("reload: detector not rebuilt, keeping the old one: %s", e)
                new.detector = old.detector
        if new.camera.fps != old.camera.fps:
            self._set_fps(new.camera.fps)
        for key in pending:
            log.warning("reload: %s changed; takes effect after a restart", key)
        self.cfg = new
        log.info("configuration reloaded")
        self.notifier.ready(self._status_text())

    # --- output ---------------------------------------------------------------------------------

    def _emit(self, track_events: list[TrackEvent]) -> None:
        for te in track_events:
            event = self.events.make(
                te.kind,
                te.track_id,
                te.emotion,
                te.probabilities,
                te.box,
                self._frame_size_or_default(),
                te.duration_s,
                te.summary,
            )
            self.events_emitted += 1
            for sink in self.sinks:
                try:
                    sink.emit(event)
                except Exception:  # one broken sink must not starve the others or stop the loop
                    log.exception("sink %s failed to emit", type(sink).__name__)

    def _frame_size_or_default(self) -> tuple[int, int]:
        return getattr(self, "_frame_size", (self.cfg.camera.width, self.cfg.camera.height))

    def state(self) -> dict[str, Any]:
        tracks = self.tracker.confirmed()
        size = self._frame_size_or_default()

        summary = [
            {
                "track_id": t.id,
                "emotion": t.label,
                # The same rounding as `probabilities`, so the two always agree.
                "confidence": rounded_probabilities(t.probabilities)[t.label],
                "box": normalised_box(t.box, *size),
            }
            for t in tracks
        ]
        dominant = None
        probabilities = None
        if tracks:
            weight = np.zeros(len(LABELS))
            for t in tracks:
                weight[t.emotion] += t.probabilities[t.emotion]
            dominant = LABELS[int(np.argmax(weight))]
            probabilities = rounded_probabilities(np.mean([t.probabilities for t in tracks], axis=0))
        return {
            "faces": len(tracks),
            "dominant": dominant,
            "probabilities": probabilities,
            "tracks": summary,
            "paused": self.paused,
        }

    def _maybe_state(self) -> None:
        # "On change" means who is there and what they feel, not every probability wiggle.
        key = (self.paused, tuple((t.id, t.emotion) for t in self.tracker.confirmed()))
        if key == self._last_state_key:
            return
        self._last_state_key = key
        state = self.state()
        for sink in self.sinks:
            try:
                sink.state(state)
            except Exception:
                log.exception("sink %s failed to take the state", type(sink).__name__)

    def fps(self) -> float:
        if len(self._frame_clock) < 2:
            return 0.0
        span = self._frame_clock[-1] - self._frame_clock[0]
        return (len(self._frame_clock) - 1) / span if span > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "fps": round(self.fps(), 2),
            "latency_ms": {name: percentiles_ms(getattr(self.times, name)) for name in ("detect", "classify", "track")},
            "frames": self.frames,
            "dropped_frames": self._source_drops + int(getattr(self.source, "dropped_frames", 0) or 0),
            "camera_errors": int(getattr(self.source, "camera_errors", 0) or 0),
            "uptime_s": round(self._clock() - self._started, 1),
            "cpu_temp_c": cpu_temperature_c(),
        }
        for sink in self.sinks:
            try:
                stats.update(sink.counters())
            except Exception:
                log.exception("sink %s failed to count", type(sink).__name__)
        return stats

    def _send_stats(self) -> None:
        stats = self.stats()
        for sink in self.sinks:
            try:
                sink.stats(stats)
            except Exception:
                log.exception("sink %s failed to take stats", type(sink).__name__)

    def _status_text(self) -> str:
        if self.paused:
            return "paused"
        if self._camera_down:
            return f"camera unavailable, reopening ({getattr(self.source, 'camera_errors', 0)} camera errors)"
        return f"{self.fps():.1f} fps, {len(self.tracker.confirmed())} faces"

    def _save_crops(
        self, gray: np.ndarray, boxes: list[tuple[float, float, float, float]], rolls: list[float | None], index: int
    ) -> None:
        """Debug only (debug.save_crops): the crops the classifier saw, as PNG, each written whole or not at all."""
        folder = Path(self.cfg.debug.dir or ".")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(self.classifier.crops(gray, boxes, self.cfg.detector.margin, rolls)):
                ok, png = cv2.imencode(".png", crop)
                if not ok:
                    continue
                fd, tmp = tempfile.mkstemp(prefix=".crop.", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(png.tobytes())
                    os.replace(tmp, folder / f"{self.events.run_id[:8]}-{index:08d}-{i}.png")
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError as e:
            # A debugging aid must never stop the box: turn it off and say so once.
            log.error("debug.save_crops: cannot write to %s (%s); saving crops is off until a reload", folder, e)
            self.cfg.debug.save_crops = False

    def _shutdown(self) -> None:
        self._emit(self.tracker.close())
        self._maybe_state()
        self._send_stats()
        self._close_source()

    def _close_source(self) -> None:
        with self._close_lock:
            if self._source_closed:
                return
            self._source_closed = True
        try:
            self.source.close()
        except Exception:
            log.exception("closing the camera failed")
