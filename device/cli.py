"""`serenbox`: the daemon (`run`), the single-photo service (`classify`), `ha-remove`, and `watch`.

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
from serenbox.device.classifier import Classifier, ModelError
from serenbox.device.classifier import from_config as classifier_from_config
from serenbox.device.config import Config, ConfigError, load
from serenbox.device.logs import setup_logging
from serenbox.device.photos import Photo, classify_photo, open_photo, result_line
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
    classify = sub.add_parser(
        "classify",
        help="emotions of the faces in photos, one JSON line per image",
        description="Emotions of the faces in photos, one JSON line per image. From Python: serenbox.classify(image).",
    )
    classify.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="an image file, a folder (its image files, in name order) or - (one image on stdin)",
    )
    classify.add_argument(
        "--crop",
        action="store_true",
        help="each image is one already-cropped face (e.g. FER2013's 48×48): no face detection",
    )
    classify.add_argument("--config", help="YAML configuration (model and detector settings)")
    ha_remove = sub.add_parser(
        "ha-remove", help="remove this box from Home Assistant (clears its retained MQTT discovery config)"
    )
    ha_remove.add_argument("--config", required=True, help="YAML configuration (device_id, mqtt, homeassistant)")
    watch = sub.add_parser("watch", help="a live view of every SerenBox on an MQTT broker")
    watch.add_argument("--host", required=True, help="the MQTT broker")
    watch.add_argument("--port", type=_positive_int, help="default 1883, or 8883 with --tls")
    watch.add_argument("--device", default="+", help="one box's device_id (default: every box)")
    watch.add_argument("--prefix", default="serenbox", help="mqtt.topic_prefix of the boxes")
    watch.add_argument("--plain", action="store_true", help="one line per change (the default when not a TTY)")
    watch.add_argument("--username", help="broker user (password from SERENBOX_MQTT_PASSWORD)")
    watch.add_argument("--tls", action="store_true", help="connect over TLS (system CAs unless --ca-file)")
    watch.add_argument("--ca-file", help="the CA that signed the broker's certificate (implies --tls)")
    watch.add_argument("--seconds", type=float, help=argparse.SUPPRESS)  # tests: stop after this long
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
    return classifier_from_config(cfg.model)


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

STDIN = "-"


def check_image_path(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if not p.is_file() and not p.is_dir():
        raise UsageError(f"{path}: not a file")


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """IMAGE arguments → the images to classify (a folder gives its image files in name order), what
    was skipped in folders (not images: said, not failed), and errors (missing paths, empty folders)."""
    if list(args).count(STDIN) > 1:
        raise UsageError("- (standard input) may be given once: it holds one image")
    found: list[str] = []
    skipped: list[str] = []
    errors: list[str] = []
    for arg in args:
        if arg == STDIN:
            found.append(arg)
            continue
        try:
            check_image_path(arg)  # before the model loads, so a typo costs no time
            found.extend(_folder_images(Path(arg), skipped) if Path(arg).is_dir() else [arg])
        except UsageError as e:
            errors.append(str(e))
    return found, skipped, errors


def _folder_images(folder: Path, skipped: list[str]) -> list[str]:
    from serenbox.device.cameras.folder import IMAGE_SUFFIXES, natural_key

    try:
        entries = sorted(folder.iterdir(), key=natural_key)
    except OSError as e:
        raise UsageError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    found = []
    for entry in entries:
        if entry.is_dir():
            skipped.append(f"skipped {entry}: a folder (folders are not searched recursively)")
        elif entry.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"skipped {entry}: not an image file name (image files end in {_suffixes()})")
        else:
            found.append(str(entry))
    if not found:
        raise UsageError(f"{folder}: no image files in the folder (image files end in {_suffixes()})")
    return found


def _suffixes() -> str:
    from serenbox.device.cameras.folder import IMAGE_SUFFIXES

    return ", ".join(sorted(IMAGE_SUFFIXES))


def read_photo(name: str) -> Photo:
    """A path, or `-` for one image's bytes on standard input; images.ImageError if it is unusable."""
    if name == STDIN:
        image, (width, height) = images.read_stream(sys.stdin.buffer, "standard input")
        return Photo(STDIN, image, width, height)
    return open_photo(name)


def cmd_classify(args: argparse.Namespace) -> int:
    from serenbox.device.faces import build_detector

    cfg = load_config(args.config)
    # A one-shot command: its output is the JSON; progress chatter only when asked to debug.
    setup_logging("DEBUG" if cfg.log_level == "DEBUG" else "WARNING")
    inputs, skipped, errors = expand_inputs(args.images)
    for line in skipped + errors:
        print(f"serenbox classify: {line}", file=sys.stderr)
    status = EXIT_USAGE if errors else EXIT_OK
    if not inputs:
        return status
    classifier = build_classifier(cfg)
    detector = None if args.crop else build_detector(cfg.detector)
    hinted = False
    for name in inputs:
        try:
            photo = read_photo(name)
        except images.ImageError as e:
            # The other images still get their answer; the exit code tells a script one failed.
            print(f"serenbox classify: {e}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        faces = classify_photo(photo, classifier, detector, cfg.detector.margin, cfg.detector.align)
        print(json.dumps(result_line(photo, faces), separators=(",", ":")), flush=True)
        if not faces and detector is not None and not hinted and photo.looks_like_crop():
            # Once per run: a folder of 900 crops needs the hint once, not 900 times.
            print(
                f"serenbox classify: no face found in {photo.name} ({photo.width}×{photo.height}); "
                "for already-cropped faces use --crop",
                file=sys.stderr,
            )
            hinted = True
    return status


# --- ha-remove -------------------------------------------------------------------------------


def cmd_ha_remove(args: argparse.Namespace) -> int:
    from serenbox.device.sinks.ha_removal import remove_discovery

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


# --- watch -----------------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    import serenbox.client
    from serenbox import watch

    setup_logging("ERROR")  # the view is the output; a lost connection shows in it
    tls = serenbox.client.Tls(ca_file=args.ca_file) if args.tls or args.ca_file else None
    if args.ca_file and not Path(args.ca_file).is_file():
        raise UsageError(f"--ca-file: {args.ca_file} does not exist")
    port = args.port or (8883 if tls else 1883)
    try:
        client = serenbox.client.connect(
            args.host,
            port,
            device=args.device,
            prefix=args.prefix,
            persistent=False,  # a live view: nothing needs keeping while it is closed
            username=args.username,
            password=os.environ.get("SERENBOX_MQTT_PASSWORD"),
            tls=tls,
        )
    except (ConnectionError, ValueError) as e:
        raise UsageError(str(e)) from None
    # Ctrl-C (SIGINT) and SIGTERM end the view between messages (the terminal gets its cursor
    # back). Our own handlers: a view started as a background job inherits SIGINT ignored, and
    # Python then raises no KeyboardInterrupt; and a flag, not an exception thrown into paho's code.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    plain = args.plain or not watch.is_tty(sys.stdout)
    title = f"serenbox watch {args.host}:{port} device {args.device}"
    try:
        watch.watch(client, sys.stdout, plain, title, args.seconds, stop)
    except BrokenPipeError:  # `serenbox watch | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "ha-remove":
            return cmd_ha_remove(args)
        if args.command == "watch":
            return cmd_watch(args)
        return cmd_classify(args)
    except (ConfigError, ModelError, UsageError) as e:
        print(f"serenbox {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
