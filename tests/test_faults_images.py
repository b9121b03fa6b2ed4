"""Fault suite: images that lie about their size, end early or are not images at all. Each is
refused with one line naming the file, before a byte of pixels is allocated; a folder source
skips them and goes on; the good images around them still get their answer."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from serenbox.device import images

from tests import media
from tests.daemon import Daemon, write_config


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header and an empty image: 74 bytes that claim width × height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def real_png_of_zeros(side: int) -> bytes:
    """A complete, valid side × side gray PNG: a few hundred kB that decode to side² bytes."""
    z = zlib.compressobj(9)
    row = bytes(side + 1)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".jpg", media.astronaut_bgr())[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".bmp", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its one-line error must say)."""
    d = tmp_path_factory.mktemp("bad")
    photo = cv2.imencode(".jpg", media.astronaut_bgr())[1].tobytes()
    png = cv2.imencode(".png", media.astronaut_bgr())[1].tobytes()
    made: dict[str, tuple[bytes, str, str]] = {
        "png_bomb": (png_claiming(65535, 65535), ".png", "the limit is"),
        "png_20000": (png_claiming(20000, 20000), ".png", "the limit is"),
        "png_real_9000": (real_png_of_zeros(9000), ".png", "the limit is"),
        "jpeg_bomb": (jpeg_claiming(65000, 65000), ".jpg", "the limit is"),
        "jpeg_big": (jpeg_claiming(9000, 9000), ".jpg", "the limit is"),
        "bmp_bomb": (bmp_claiming(60000, 60000), ".bmp", "the limit is"),
        "jpeg_truncated": (photo[: len(photo) // 2], ".jpg", "truncated"),
        "png_truncated": (png[: len(png) // 2], ".png", "truncated"),
        "empty": (b"", ".png", "not an image"),
        "text": (b"these are my notes, not a photo\n" * 20, ".jpg", "not an image"),
        "random": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), ".png", "not an image"),
        "png_zero_width": (png_claiming(0, 10), ".png", "not an image"),
    }
    out = {}
    for name, (data, suffix, words) in made.items():
        path = d / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = (path, words)
    # A folder is read as a folder of images (`serenbox classify FOLDER`); this one holds none.
    (d / "folder.jpg").mkdir()
    out["directory"] = (d / "folder.jpg", "no image files in the folder")
    return out


def test_every_bad_image_is_one_line_and_the_good_ones_still_answer(
    bad_images: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    assert len(bad_images) >= 10
    good = media.write_image(tmp_path / "good.jpg", media.astronaut_bgr())
    gray16 = tmp_path / "gray16.png"
    cv2.imwrite(str(gray16), (cv2.cvtColor(media.astronaut_bgr(), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257))
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(good).convert("CMYK").save(cmyk)
    files = [good, *(p for p, _ in bad_images.values()), gray16, cmyk]
    proc = subprocess.run(
        [sys.executable, "-m", "serenbox", "classify", *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: Created TensorFlow Lite")]
    assert len(errors) == len(bad_images), proc.stderr  # one line each, no decoder noise
    by_path = {line.split(": ")[1]: line for line in errors}
    for path, words in bad_images.values():
        assert words in by_path[str(path)], by_path[str(path)]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["image"] for a in answers] == [str(good), str(gray16), str(cmyk)]
    assert all(len(a["faces"]) == 1 for a in answers)  # the astronaut, in every encoding


def test_the_size_limit_is_checked_before_decoding() -> None:
    with pytest.raises(images.ImageError, match="the limit is"):
        images.decode(png_claiming(8000, 6000), "x.png")  # 48 MP: refused from 74 bytes
    image, size = images.decode(cv2.imencode(".jpg", np.zeros((4000, 6000, 3), np.uint8))[1].tobytes(), "24mp.jpg")
    assert size == (6000, 4000) and max(image.shape[:2]) == images.MAX_SIDE  # decoded reduced


def test_a_folder_source_skips_bad_images_and_goes_on(bad_images: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    frame = media.scene([(220, 140, 200)])
    for i in range(8):
        media.write_image(folder / f"frame{2 * i:02d}.jpg", frame)
        bad, _ = list(bad_images.values())[i]
        if bad.is_file():
            (folder / f"frame{2 * i + 1:02d}{bad.suffix}").write_bytes(bad.read_bytes())
    daemon = Daemon(write_config(tmp_path, folder))
    code = daemon.finish(timeout=120)
    assert code == 0 and "Traceback" not in daemon.stderr, daemon.stderr[-3000:]
    assert daemon.stderr.count("; skipped") >= 7
    assert [e["type"] for e in daemon.events][:1] == ["new"]  # the good frames made a track


def test_single_photos_in_a_folder_say_why_there_are_no_events(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    media.write_image(folder / "one.jpg", media.scene([(100, 100, 200)]))
    media.write_image(folder / "two.jpg", media.scene([(300, 200, 180)]))
    daemon = Daemon(write_config(tmp_path, folder, tracker={"confirm_frames": 3}))
    assert daemon.finish(timeout=120) == 0
    assert daemon.events == [] and "serenbox classify" in daemon.stderr and "confirm_frames" in daemon.stderr


def test_stop_works_while_reading_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "loop"
    folder.mkdir()
    media.write_image(folder / "a.jpg", media.scene([(220, 140, 200)]))
    daemon = Daemon(write_config(tmp_path, folder, camera={"loop": True}))
    daemon.wait_events(1)
    assert daemon.finish(signal.SIGTERM, timeout=5) == 0
