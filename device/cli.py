"""`serenbox`: the daemon (`run`) and the single-photo service (`classify`).

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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device import __version__
from device.classifier import Classifier, ModelError, resolve_model_path, to_gray
from device.config import Config, ConfigError, load
from device.events import normalised_box, rounded_probabilities
from device.labels import LABELS

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
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself; elsewhere a timestamp helps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)


def load_config(path: str | None, source: str | None = None) -> Config:
    from device.config import from_dict

    cfg = load(path) if path else from_dict({})
    if source is not None:
        cfg.camera.source = source
    return cfg


def build_classifier(cfg: Config) -> Classifier:
    path = resolve_model_path(cfg.model.path)
    if not path.is_file():
        where = "model.path" if cfg.model.path else "the shipped model"
        raise ModelError(f"{where}: {path} does not exist (set model.path to a converted .tflite)")
    return Classifier(path, cfg.model.num_threads)


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from device.cameras import CameraError, ReopeningSource, open_source
    from device.faces import build_detector
    from device.notify import Notifier
    from device.pipeline import Pipeline
    from device.sinks import build_sinks

    cfg = load_config(args.config, args.source)
    setup_logging(cfg.log_level)
    classifier = build_classifier(cfg)
    detector = build_detector(cfg.detector)
    try:
        source = ReopeningSource(open_source(cfg.camera.source, cfg.camera), cfg.camera)
    except (CameraError, ValueError) as e:
        raise UsageError(f"camera.source: {e}") from None
    sinks = build_sinks(cfg, args.print_events)
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
    _install_signal_handlers(pipeline)
    for sink in sinks:
        sink.start()
    try:
        reason = pipeline.run()
    finally:
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)
        notifier.close()
    log.info("done: %s", reason)
    return EXIT_OK


def _install_signal_handlers(pipeline: Any) -> None:
    def stop(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        pipeline.stop()
        # The loop stops between frames; if a camera read hangs in C code it never gets there.
        # Exiting late breaks systemd's stop timeout, so give up on a clean stop after a deadline.
        timer = threading.Timer(STOP_DEADLINE_S, _stop_deadline_passed)
        timer.daemon = True
        timer.start()

    def reload(_signum: int, _frame: Any) -> None:
        log.info("SIGHUP: reloading the configuration")
        pipeline.request_reload()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)


def _stop_deadline_passed() -> None:
    log.error("the processing loop did not stop within %.1f s (camera hung?); exiting now", STOP_DEADLINE_S)
    logging.shutdown()
    os._exit(EXIT_FAILED)


# --- classify --------------------------------------------------------------------------------


def classify_image(path: str, classifier: Classifier, detector: Any, cfg: Config) -> dict[str, Any]:
    import cv2

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if not p.is_file():
        raise UsageError(f"{path}: not a file")
    image = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if image is None:
        raise UsageError(f"{path}: not a readable image")
    gray = to_gray(image)
    height, width = gray.shape[:2]
    faces = detector.detect(gray)
    boxes = [(float(f.x), float(f.y), float(f.w), float(f.h)) for f in faces]
    probs = classifier.classify(gray, boxes, cfg.detector.margin)
    out = []
    for box, p_face in zip(boxes, probs, strict=True):
        probabilities = rounded_probabilities(p_face)
        emotion = LABELS[int(max(range(len(LABELS)), key=lambda i: p_face[i]))]
        out.append(
            {
                "box": normalised_box(box, width, height),
                "emotion": emotion,
                "confidence": probabilities[emotion],
                "probabilities": probabilities,
            }
        )
    return {"image": path, "width": width, "height": height, "faces": out}


def cmd_classify(args: argparse.Namespace) -> int:
    from device.faces import build_detector

    cfg = load_config(args.config)
    setup_logging(cfg.log_level if args.config else "WARNING")
    classifier = build_classifier(cfg)
    detector = build_detector(cfg.detector)
    status = EXIT_OK
    for path in args.images:
        try:
            line = classify_image(path, classifier, detector, cfg)
        except UsageError as e:
            # The other images still get their answer; the exit code tells a script one failed.
            print(f"serenbox classify: {e}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        print(json.dumps(line, separators=(",", ":")), flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_classify(args)
    except (ConfigError, ModelError, UsageError) as e:
        print(f"serenbox {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
