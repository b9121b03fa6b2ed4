"""Peak memory of `serenbox classify` on the largest photos it accepts and on ones it refuses.

    python benchmarks/bench_images.py

Each photo is classified by its own `serenbox classify` process; the figure is that process's
peak resident set (ru_maxrss from wait4), with the time it took and how it ended.
"""

from __future__ import annotations

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

from device.images import MAX_IMAGE_PIXELS  # noqa: E402
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
            [sys.executable, "-m", "device", "classify", str(path)], cwd=ROOT, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the children's maximum
        took = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, lines = out.read(), [ln for ln in err.read().splitlines() if not ln.startswith("INFO: Created")]
    what = lines[0].split(": ", 2)[-1] if lines else f"{stdout.count('emotion')} face(s)"
    return usage.ru_maxrss / 1024, took, proc.returncode, what


def main() -> None:
    side = int((MAX_IMAGE_PIXELS * 4 / 3) ** 0.5)
    width, height = side, MAX_IMAGE_PIXELS // side  # 4:3, just under the limit
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        cases = {}
        image = photo(width, height)
        cases[f"largest accepted JPEG {width}x{height}"] = folder / "max.jpg"
        cv2.imwrite(str(cases[f"largest accepted JPEG {width}x{height}"]), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cases[f"largest accepted PNG {width}x{height}"] = folder / "max.png"
        cv2.imwrite(str(cases[f"largest accepted PNG {width}x{height}"]), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        del image
        cases["small photo 640x480"] = folder / "small.jpg"
        cv2.imwrite(str(cases["small photo 640x480"]), photo(640, 480))
        cases["refused: 74-byte PNG claiming 65535x65535"] = folder / "bomb.png"
        cases["refused: 74-byte PNG claiming 65535x65535"].write_bytes(png_claiming(65535, 65535))
        big = photo(8000, 6000)
        cases["refused: real JPEG 8000x6000 (48 MP)"] = folder / "big.jpg"
        cv2.imwrite(str(cases["refused: real JPEG 8000x6000 (48 MP)"]), big)
        del big
        print(f"{'case':46} {'file MB':>8} {'peak RSS MB':>12} {'s':>6} {'exit':>5}  result")
        for name in cases:
            path = cases[name]
            rss, took, code, what = classify(path)
            mb = path.stat().st_size / 1e6
            print(f"{name:46} {mb:8.2f} {rss:12.1f} {took:6.2f} {code:5d}  {what[:60]}")


if __name__ == "__main__":
    main()
