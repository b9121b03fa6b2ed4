"""Benchmark the on-device pipeline on a 640×480 video: per-stage latency, fps, memory, first event.

    python benchmarks/bench_pipeline.py [VIDEO] [--model M.tflite] [--faces 1|3] [--threads N] [--detector KIND]

Without VIDEO a clip is generated from scikit-image's astronaut photo (1 or 3 faces drifting
across a 640×480 frame), in a child process so that its imports do not count towards the
memory figure. Every frame of the clip is processed (camera.fps = the clip's rate), as fast
as the machine allows, exactly as `serenbox run --source VIDEO` would: the same Pipeline,
detector, classifier and tracker. Prints figures; asserts nothing.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: "time to first event" includes them

import argparse  # noqa: E402  (imports after the start mark on purpose)
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's device/, not whichever one is installed

WIDTH, HEIGHT = 640, 480


def make_clip(path: Path, faces: int, seconds: float, fps: float) -> None:
    """The astronaut's face (1 or 3 copies) drifting over a plain background, MJPG .avi."""
    import cv2
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    head = photo[20:280, 130:330]  # the face with hair and collar, 260×200
    scale = 1.0 if faces == 1 else 0.6
    head = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    hh, hw = head.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit("bench_pipeline: OpenCV cannot write MJPG video here")
    n = round(seconds * fps)
    slots = [WIDTH // 2 - hw // 2] if faces == 1 else [10 + i * (WIDTH - hw - 20) // 2 for i in range(3)]
    for i in range(n):
        frame = np.full((HEIGHT, WIDTH, 3), (92, 110, 120), np.uint8)
        phase = 2 * np.pi * i / n
        for k, x0 in enumerate(slots):
            x = int(np.clip(x0 + 25 * np.sin(phase + k), 0, WIDTH - hw))
            y = int(np.clip((HEIGHT - hh) // 2 + 20 * np.cos(phase + 2 * k), 0, HEIGHT - hh))
            frame[y : y + hh, x : x + hw] = head
        writer.write(frame)
    writer.release()


def percentiles(samples: deque[float]) -> str:
    if not samples:
        return "n/a"
    p50, p95 = np.percentile(np.fromiter(samples, float), [50, 95]) * 1000
    return f"p50 {p50:6.2f} ms   p95 {p95:6.2f} ms"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video", nargs="?", help="a video file (default: generate a clip from the astronaut photo)")
    parser.add_argument("--model", help="a .tflite with its manifest (default: the shipped model)")
    parser.add_argument("--faces", type=int, choices=(1, 3), default=1, help="faces in the generated clip")
    parser.add_argument("--threads", type=int, default=1, help="TFLite interpreter threads (model.num_threads)")
    parser.add_argument("--detector", choices=("haar", "blazeface"), help="detector.kind (default: the config default)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the generated clip")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of the generated clip")
    parser.add_argument("--make-clip", metavar="OUT", help=argparse.SUPPRESS)  # the child that draws the clip
    args = parser.parse_args(argv)
    if args.make_clip:
        make_clip(Path(args.make_clip), args.faces, args.seconds, args.fps)
        return 0

    import cv2
    from serenbox.device.classifier import Classifier, resolve_model_path
    from serenbox.device.config import from_dict

    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="serenbox-bench-")
    if args.video:
        video = Path(args.video)
    else:
        video = Path(tmp.name) / f"astronaut-{args.faces}.avi"
        child = [sys.executable, __file__, "--make-clip", str(video), "--faces", str(args.faces)]
        subprocess.run([*child, "--seconds", str(args.seconds), "--fps", str(args.fps)], check=True)
    capture = cv2.VideoCapture(str(video))
    clip_fps = capture.get(cv2.CAP_PROP_FPS) or args.fps
    clip_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    model = resolve_model_path(args.model)
    if not model.is_file():
        print(f"bench_pipeline: {model} does not exist (pass --model)", file=sys.stderr)
        return 2
    generated_s = time.perf_counter() - started

    from serenbox.device.cameras import open_source
    from serenbox.device.faces import build_detector
    from serenbox.device.pipeline import Pipeline, StageTimes
    from serenbox.device.sinks.base import Sink

    class FirstEvent(Sink):
        def __init__(self) -> None:
            self.first: float | None = None
            self.count = 0

        def emit(self, event: dict[str, Any]) -> None:
            self.count += 1
            if self.first is None:
                self.first = time.perf_counter()

    # The clock for "first event" starts here, as the daemon's would after parsing its config.
    t0 = time.perf_counter()
    cfg = from_dict(
        {
            "model": {"path": str(model), "num_threads": args.threads},
            "camera": {"source": str(video), "fps": clip_fps},
            "detector": {"kind": args.detector} if args.detector else {},
        },
        env={},
    )
    sink = FirstEvent()
    pipeline = Pipeline(
        cfg,
        open_source(cfg.camera.source, cfg.camera),
        build_detector(cfg.detector),
        Classifier(model, args.threads),
        [sink],
    )
    pipeline.times = StageTimes(deque(), deque(), deque())  # every frame, not the stats window
    t_loop = time.perf_counter()
    pipeline.run()
    elapsed = time.perf_counter() - t_loop

    print(f"video        {video.name}: {clip_frames} frames at {clip_fps:g} fps, {WIDTH}x{HEIGHT}")
    print(f"model        {model} ({args.threads} thread{'s' if args.threads != 1 else ''})")
    print(f"detector     {cfg.detector.kind}, min_face {cfg.detector.min_face}")
    print(f"frames       {pipeline.frames} in {elapsed:.2f} s, {sink.count} events")
    print(f"fps          {pipeline.frames / elapsed:.1f} end to end (camera read + all stages)")
    for stage in ("detect", "classify", "track"):
        print(f"{stage:<12} {percentiles(getattr(pipeline.times, stage))}")
    if sink.first is not None:
        print(
            f"first event  {sink.first - t0:.2f} s after start "
            f"({sink.first - PROCESS_START - generated_s:.2f} s including Python imports)"
        )
    else:
        print("first event  none (no face confirmed)")
    print(f"peak RSS     {peak_rss_mb():.1f} MB")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
