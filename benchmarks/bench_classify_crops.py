"""`serenbox classify` on a folder of FER2013's 48×48 face crops: with and without --crop.

    python benchmarks/bench_classify_crops.py [--data ../shared/fer2013/fer2013.npz] [--split PublicTest] [--limit N]

Writes the split's faces as PNG files into a temporary folder, runs the command on the folder
as a user would (one process), and prints how many faces it classified, its accuracy against
the FER2013 labels, the time it took, and what the same folder gives without --crop (the
detector's faces and the hint). Then `serenbox.classify(..., crop=True)` on the same pixels in
this process: its time per face and whether it agrees with the command on every face.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serenbox.device.labels import LABELS  # noqa: E402

SPLITS = {"Training": 0, "PublicTest": 1, "PrivateTest": 2}


def run(folder: Path, *flags: str) -> tuple[list[dict], list[str], float, int]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "classify", *flags, str(folder)], capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - started
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: Created TensorFlow Lite")]
    return [json.loads(line) for line in proc.stdout.splitlines()], ours, took, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "fer2013" / "fer2013.npz")
    parser.add_argument("--split", choices=sorted(SPLITS), default="PublicTest")
    parser.add_argument("--limit", type=int, help="only the first N faces of the split")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"bench_classify_crops: {args.data} does not exist (FER2013 .npz from ../shared)")
    with np.load(args.data) as data:
        pixels, labels, splits = data["x"], data["y"], data["split"]
    rows = np.flatnonzero(splits == SPLITS[args.split])[: args.limit]
    print(f"{args.split}: {len(rows)} FER2013 faces, 48×48 PNG files in one folder")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for row in rows:
            cv2.imwrite(str(folder / f"{row:05d}.png"), pixels[row])
        lines, stderr, took, code = run(folder, "--crop")
        predicted = np.array([LABELS.index(line["faces"][0]["emotion"]) for line in lines if len(line["faces"]) == 1])
        classified = len(predicted)
        accuracy = float(np.mean(predicted == labels[rows])) if classified == len(rows) else float("nan")
        print(
            f"  serenbox classify --crop: exit {code}, {len(lines)} lines, {classified} classified, "
            f"accuracy {100 * accuracy:.2f} %, {took:.1f} s ({len(rows) / took:.0f} images/s, model loading included)"
        )
        for line in stderr:
            print(f"    stderr: {line}")
        plain, stderr, took, code = run(folder)
        found = sum(1 for line in plain if line["faces"])
        print(f"  serenbox classify (no --crop): exit {code}, a face found in {found} of {len(plain)}, {took:.1f} s")
        for line in stderr:
            print(f"    stderr: {line}")

    import serenbox

    serenbox.classify(pixels[rows[0]], crop=True)  # the model loads on the first call: not timed
    started = time.perf_counter()
    api = [serenbox.classify(pixels[row], crop=True)[0] for row in rows]
    took = time.perf_counter() - started
    same = sum(a.to_dict() == line["faces"][0] for a, line in zip(api, lines, strict=True))
    print(
        f"  serenbox.classify(crop=True): {1000 * took / len(rows):.3f} ms per face; "
        f"the same result as the command for {same} of {len(rows)}"
    )


if __name__ == "__main__":
    main()
