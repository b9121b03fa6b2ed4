"""`serenbox`: the daemon (`run`), the single-photo service (`classify`), and `ha-remove`.

Errors a user can fix (configuration, model, image, source) are one line on stderr naming the
problem and exit 2; no traceback. Logs go to stderr; stdout carries only JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serenbox.device import __version__, images
from serenbox.device.classifier import Classifier, ModelError, resolve_model_path, to_gray
from serenbox.device.config import Config, ConfigError, load
from serenbox.device.events import dominant, normalised_box, rounded_probabilities
from serenbox.device.logs import setup_logging
from serenbox.device.signals import SignalThread

log = logging.getLogger("serenbox")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STOP_DEADLINE_S = 4.5  # systemd and the brief allow 5 s from SIGTERM to exit


class UsageError(Exception):
    """A problem the user can fix (bad source, bad image); the message is the whole story."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serenbox", description="SerenBox edge emotion runtime.")
    parser.add_argument("--version", action="version", version=f"serenbox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon: camera → faces → emotions → events")
    run.add_argument("--config", required=True, help="YAML configuration (see configs/serenbox.yaml)")
    run.add_argument("--source", help="override camera.source (picamera2, demo, 0, /dev/video0, a file, a URL)")
    run.add_argument("--print-events", action="store_true", help="also print events as JSON lines to stdout")
    run.add_argument("--max-frames", type=_positive_int, help="stop after this many processed frames")
    classify = sub.add_parser("classify", help="emotions of the faces in photos, one JSON line per image")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--config", help="YAML configuration (model and detector settings)")
    ha_remove = sub.add_parser(
        "ha-remove", help="remove this box from Home Assistant (clears its retained MQTT discovery config)"
    )
    ha_remove.add_argument("--config", required=True, help="YAML configuration (device_id, mqtt, homeassistant)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def load_config(path: str | None, source: str | None = None) -> Config:
    from serenbox.device.config import from_dict

    cfg = load(path) if path else from_dict({})
    if source is not None:
        cfg.camera.source = source
    return cfg


def build_classifier(cfg: Config) -> Classifier:
    path = resolve_model_path(cfg.model.path)
    if not path.is_file():
        if cfg.model.path:
            raise ModelError(f"model.path: {path} does not exist")
        raise ModelError(f"model.path: not set, and the shipped model {path} is missing (set model.path to a .tflite)")
    return Classifier(path, cfg.model.num_threads, flip_tta=cfg.model.flip_tta)


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from serenbox.device.cameras import CameraError, ReopeningSource, open_source
    from serenbox.device.faces import build_detector
    from serenbox.device.notify import Notifier
    from serenbox.device.pipeline import Pipeline
    from serenbox.device.sinks import build_sinks

    cfg = load_config(args.config, args.source)
    setup_logging(cfg.log_level)
    _check_debug_dir(cfg)
    # The source first: a mistyped path is reported before seconds of model loading.
    try:
        source = ReopeningSource(open_source(cfg.camera.source, cfg.camera), cfg.camera)
    except (CameraError, ValueError) as e:
        raise UsageError(f"camera.source: {e}") from None
    # The sinks before the model: a second daemon on the same spool is refused at once.
    sinks = build_sinks(cfg, args.print_events)
    classifier = build_classifier(cfg)
    detector = build_detector(cfg.detector)
    notifier = Notifier()
    pipeline = Pipeline(
        cfg,
        source,
        detector,
        classifier,
        sinks,
        notifier=notifier,
        max_frames=args.max_frames,
        reload=lambda: load_config(args.config, args.source),
        detector_factory=build_detector,
    )
    signals = _signal_thread(pipeline).start()
    for sink in sinks:
        sink.start()
    try:
        reason = pipeline.run()
    except CameraError as e:
        # A file or folder broke mid-run (live sources are reopened instead).
        raise UsageError(f"camera.source: {e}") from None
    finally:
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)
        notifier.close()
        signals.close()
    _explain_no_events(pipeline, cfg)
    log.info("done: %s", reason)
    return EXIT_FAILED if pipeline.failure else EXIT_OK


def _check_debug_dir(cfg: Config) -> None:
    """debug.save_crops writes faces to disk: say so at start, and fail now, not at the first face."""
    if not cfg.debug.save_crops or not cfg.debug.dir:
        return
    folder = Path(cfg.debug.dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe."):
            pass
    except OSError as e:
        raise UsageError(f"debug.dir: cannot write face crops to {folder} ({e.strerror or e})") from None
    log.warning("debug.save_crops is on: face crops are written to %s", folder)


def _explain_no_events(pipeline: Any, cfg: Config) -> None:
    # Separate photos in a folder are single frames: the tracker never sees a face twice.
    if pipeline.faces_seen and not pipeline.events_emitted:
        log.warning(
            "%d face(s) seen in %d frame(s) but no events: a face becomes a track after "
            "tracker.confirm_frames=%d consecutive frames; for separate photos use `serenbox classify`",
            pipeline.faces_seen,
            pipeline.frames,
            cfg.tracker.confirm_frames,
        )


def _signal_thread(pipeline: Any) -> SignalThread:
    """Stop and reload run in a thread of their own, never inside a signal handler (device/signals.py)."""

    def stop() -> None:
        log.info("stop signal: stopping")
        pipeline.stop()
        # The loop stops between frames; if a camera read hangs in C code it never gets there.
        # Exiting late breaks systemd's stop timeout, so give up on a clean stop after a deadline.
        timer = threading.Timer(STOP_DEADLINE_S, _stop_deadline_passed)
        timer.daemon = True
        timer.start()

    def reload() -> None:
        log.info("SIGHUP: reloading the configuration")
        pipeline.request_reload()

    return SignalThread({signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload})


def _stop_deadline_passed() -> None:
    log.error("the processing loop did not stop within %.1f s (camera hung?); exiting now", STOP_DEADLINE_S)
    logging.shutdown()
    os._exit(EXIT_FAILED)


# --- classify --------------------------------------------------------------------------------


def check_image_path(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if not p.is_file():
        raise UsageError(f"{path}: not a file")


def classify_image(path: str, classifier: Classifier, detector: Any, cfg: Config) -> dict[str, Any]:
    try:  # images.read names a missing file or a folder as check_image_path does
        image, (full_width, full_height) = images.read(path)
    except images.ImageError as e:
        raise UsageError(str(e)) from None
    gray = to_gray(image)
    height, width = gray.shape[:2]
    faces = detector.detect(gray)
    boxes = [(float(f.x), float(f.y), float(f.w), float(f.h)) for f in faces]
    probs = classifier.classify(gray, boxes, cfg.detector.margin)
    out = []
    for box, p_face in zip(boxes, probs, strict=True):
        probabilities = rounded_probabilities(p_face)
        emotion = dominant(p_face)  # the largest published value too (rounded_probabilities sees to it)
        out.append(
            {
                "box": normalised_box(box, width, height),
                "emotion": emotion,
                "confidence": probabilities[emotion],
                "probabilities": probabilities,
            }
        )
    return {"image": path, "width": full_width, "height": full_height, "faces": out}


def cmd_classify(args: argparse.Namespace) -> int:
    from serenbox.device.faces import build_detector

    cfg = load_config(args.config)
    # A one-shot command: its output is the JSON; progress chatter only when asked to debug.
    setup_logging("DEBUG" if cfg.log_level == "DEBUG" else "WARNING")
    status = EXIT_OK
    images = []
    for path in args.images:
        try:
            check_image_path(path)  # before the model loads, so a typo costs no time
            images.append(path)
        except UsageError as e:
            print(f"serenbox classify: {e}", file=sys.stderr)
            status = EXIT_USAGE
    if not images:
        return status
    classifier = build_classifier(cfg)
    detector = build_detector(cfg.detector)
    for path in images:
        try:
            line = classify_image(path, classifier, detector, cfg)
        except UsageError as e:
            # The other images still get their answer; the exit code tells a script one failed.
            print(f"serenbox classify: {e}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        print(json.dumps(line, separators=(",", ":")), flush=True)
    return status


# --- ha-remove -------------------------------------------------------------------------------


def cmd_ha_remove(args: argparse.Namespace) -> int:
    from serenbox.device.sinks.mqtt import remove_discovery

    cfg = load_config(args.config)
    setup_logging("WARNING")
    if not cfg.mqtt.nodes():
        # Without a broker nothing was ever announced: nothing to remove is not a failure.
        print("serenbox ha-remove: mqtt.host is not set; nothing to remove", file=sys.stderr)
        return EXIT_OK
    try:
        topic, where = remove_discovery(cfg)
    except ConnectionError as e:
        raise UsageError(str(e)) from None
    print(f"serenbox ha-remove: cleared {topic} on {where}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "ha-remove":
            return cmd_ha_remove(args)
        return cmd_classify(args)
    except (ConfigError, ModelError, UsageError) as e:
        print(f"serenbox {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
