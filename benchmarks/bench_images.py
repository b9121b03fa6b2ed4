"""Peak memory of `serenbox classify` on the largest photos it accepts and on ones it refuses.

    python benchmarks/bench_images.py

Each photo is classified by its own `serenbox classify` process; the figure is that process's
peak resident set (ru_maxrss from wait4), with the time it took and how it ended.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serenbox.device.images import MAX_IMAGE_PIXELS  # noqa: E402

from tests import media  # noqa: E402


def photo(width: int, height: int) -> np.ndarray:
    """A scene with the astronaut's head, scaled to width × height (a photo, not a flat image)."""
    scene = media.scene([(220, 140, 200)])
    return cv2.resize(scene, (width, height), interpolation=cv2.INTER_CUBIC)


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def classify(path: Path) -> tuple[float, float, int, str]:
    """(peak RSS in MB, seconds, exit code, the error line or the face count) of one process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "serenbox", "classify", str(path)], cwd=ROOT, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the children's maximum
        took = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, lines = out.read(), [ln for ln in err.read().splitlines() if not ln.startswith("INFO: Created")]
    what = lines[0].split(": ", 2)[-1] if lines else f"{stdout.count('emotion')} face(s)"
    return usage.ru_maxrss / 1024, took, proc.returncode, what


def make_cases(folder: Path) -> dict[str, Path]:
    """The test photos, written by a child process: a parent holding 40-megapixel arrays would
    pass its own peak on to every process it starts (ru_maxrss counts the memory a child shares
    with its parent until it execs), and the figures would be the parent's."""
    side = int((MAX_IMAGE_PIXELS * 4 / 3) ** 0.5)
    width, height = side, MAX_IMAGE_PIXELS // side  # 4:3, just under the limit
    cases = {
        f"largest accepted JPEG {width}x{height}": folder / "max.jpg",
        f"largest accepted PNG {width}x{height}": folder / "max.png",
        "small photo 640x480": folder / "small.jpg",
        "refused: 74-byte PNG claiming 65535x65535": folder / "bomb.png",
        "refused: real JPEG 8000x6000 (48 MP)": folder / "big.jpg",
    }
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_write_cases, args=(folder, width, height))
    child.start()
    child.join()
    return cases


def _write_cases(folder: Path, width: int, height: int) -> None:
    image = photo(width, height)
    cv2.imwrite(str(folder / "max.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(folder / "max.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    cv2.imwrite(str(folder / "small.jpg"), photo(640, 480))
    (folder / "bomb.png").write_bytes(png_claiming(65535, 65535))
    cv2.imwrite(str(folder / "big.jpg"), photo(8000, 6000))


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        cases = make_cases(Path(d))
        print(f"{'case':46} {'file MB':>8} {'peak RSS MB':>12} {'s':>6} {'exit':>5}  result")
        for name, path in cases.items():
            rss, took, code, what = classify(path)
            mb = path.stat().st_size / 1e6
            print(f"{name:46} {mb:8.2f} {rss:12.1f} {took:6.2f} {code:5d}  {what[:60]}")


if __name__ == "__main__":
    main()
