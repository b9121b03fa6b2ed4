"""SerenBox's pipeline against the `fer` package's, on the same clip and the same core, in one run.

    python benchmarks/bench_vs_fer.py FER_PYTHON [--faces 1 3] [--rounds 2] [--seconds 10] [--core 1]

FER_PYTHON is the python of a throwaway environment with `fer` installed (it pulls TensorFlow,
which SerenBox never needs): for example `python3.11 -m venv /tmp/fer-venv && /tmp/fer-venv/bin/pip
install fer`. The clips are bench_pipeline.py's (the astronaut's face, 1 or 3 copies, drifting
over a plain background, 640×480 MJPG). Each run is a fresh process pinned to one core with
taskset; the two pipelines alternate, round after round, so that a busy neighbour slows both.

- SerenBox: `bench_pipeline.py CLIP` as it is (the daemon's Pipeline with its default detector,
  classifier and tracker, 1 thread): its "fps" line.
- fer: `FER()` with its defaults, as its README uses it (OpenCV's Haar cascade, min_face_size 50,
  its TFLite emotion model), `detect_emotions(frame)` on every BGR frame read with OpenCV. Its
  model loading and one warm-up call are not timed (SerenBox's first frames are: in its favour).

Prints fps side by side and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs inside the fer environment: reads the clip, times detect_emotions on every frame.
FER_RUN = r"""
import json, sys, time
import cv2
from fer.fer import FER

detector = FER()
capture = cv2.VideoCapture(sys.argv[1])
ok, frame = capture.read()
detector.detect_emotions(frame)  # warm-up, untimed (TensorFlow builds its graph on the first call)
capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
frames = faces = 0
start = time.perf_counter()
while True:
    ok, frame = capture.read()
    if not ok:
        break
    faces += len(detector.detect_emotions(frame))
    frames += 1
elapsed = time.perf_counter() - start
print(json.dumps({"frames": frames, "seconds": elapsed, "faces": faces}))
"""


def pinned(core: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *command]


def make_clip(path: Path, faces: int, seconds: float) -> None:
    child = [sys.executable, str(HERE / "bench_pipeline.py"), "--make-clip", str(path), "--faces", str(faces)]
    subprocess.run([*child, "--seconds", str(seconds)], check=True)


def serenbox_fps(clip: Path, core: int) -> tuple[float, str]:
    done = subprocess.run(
        pinned(core, [sys.executable, str(HERE / "bench_pipeline.py"), str(clip)]),
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"^fps\s+([\d.]+)", done.stdout, re.MULTILINE)
    if not match:
        raise SystemExit(f"bench_vs_fer: no fps line from bench_pipeline.py:\n{done.stdout}{done.stderr}")
    frames = re.search(r"^frames\s+(.*)$", done.stdout, re.MULTILINE)
    return float(match.group(1)), frames.group(1) if frames else ""


def fer_fps(python: str, clip: Path, core: int) -> tuple[float, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)  # fer's environment, not this checkout
    done = subprocess.run(pinned(core, [python, "-c", FER_RUN, str(clip)]), capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench_vs_fer: fer failed in {python} (exit {done.returncode}): {tail}")
    result = json.loads(lines[-1])
    return result["frames"] / result["seconds"], f"{result['frames']} frames, {result['faces']} faces found"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fer_python", help="python of an environment where `fer` is installed")
    parser.add_argument("--faces", type=int, nargs="+", choices=(1, 3), default=[1, 3])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each pipeline per clip, alternating")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="clip length at 30 fps (bench_pipeline.py's default)"
    )
    parser.add_argument("--core", type=int, default=1, help="the CPU both pipelines are pinned to")
    args = parser.parse_args(argv)
    if not Path(args.fer_python).is_file():
        print(f"bench_vs_fer: {args.fer_python}: no such file (the fer environment's python)", file=sys.stderr)
        return 2
    if args.core not in os.sched_getaffinity(0):
        print(f"bench_vs_fer: --core {args.core}: not a CPU this process may use", file=sys.stderr)
        return 2

    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    summary = []
    with tempfile.TemporaryDirectory(prefix="serenbox-vs-fer-") as tmp:
        for faces in args.faces:
            clip = Path(tmp) / f"astronaut-{faces}.avi"
            make_clip(clip, faces, args.seconds)
            ours, theirs = [], []
            for r in range(args.rounds):
                fps, note = serenbox_fps(clip, args.core)
                ours.append(fps)
                print(f"{faces} face(s) round {r + 1}: serenbox {fps:6.1f} fps ({note})")
                fps, note = fer_fps(args.fer_python, clip, args.core)
                theirs.append(fps)
                print(f"{faces} face(s) round {r + 1}: fer      {fps:6.1f} fps ({note})")
            summary.append((faces, statistics.median(ours), statistics.median(theirs)))
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = f"{'clip':<10}{'serenbox fps':>14}{'fer fps':>10}{'ratio':>8}"
    print(f"\n{header}   (medians of {args.rounds} runs, core {args.core})")
    for faces, ours_fps, fer in summary:
        print(f"{faces} face{'s' if faces > 1 else '':<5}{ours_fps:>14.1f}{fer:>10.2f}{ours_fps / fer:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
