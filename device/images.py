"""Still images from files or bytes, checked before they are decoded.

A photo's header says how large it is; decoding trusts it. A 74-byte PNG can claim
65535×65535 pixels (12 GB to decode), so the size is read from the header first (Pillow reads
headers without decoding) and anything over `MAX_IMAGE_PIXELS` is refused with one line.
Large photos are decoded reduced where the format allows it (JPEG's DCT scaling) and scaled
down to `MAX_SIDE` for detection: faces in a 40-megapixel photo are hundreds of pixels tall.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# 40 megapixels: what current cameras take. Decoding one takes about 200 MB on top of the daemon;
# a SerenBox unit may use 512 MB, a Pi has 2 to 8 GB.
MAX_IMAGE_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 << 20
# The longest side an image keeps for face detection.
MAX_SIDE = 1920
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(ValueError):
    """An image that cannot or will not be read; the message names it and says why."""


def header_size(data: bytes, name: str) -> tuple[int, int, str]:
    """Width, height and format from the header alone; ImageError if it is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0], im.size[1], str(im.format)
    except Image.DecompressionBombError:
        # Pillow stops reading at twice its own limit, so the exact size is not known here.
        claimed = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(
            f"{name}: the image claims more than {claimed:,} pixels; the limit is {MAX_IMAGE_PIXELS:,}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{name}: not an image (unknown format or damaged header)") from None


def _truncated(data: bytes, fmt: str) -> bool:
    # Decoders fill the missing rest with gray and print warnings; a face half missing is no face.
    tail = data[-1024:].rstrip(b"\0")
    if fmt == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in tail
    return False


def decode(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """A BGR image at most MAX_SIDE on its longest side, and the full size (width, height)."""
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{name}: {len(data) >> 20} MB file; at most {MAX_FILE_BYTES >> 20} MB")
    width, height, fmt = header_size(data, name)
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}×{height} is {width * height:,} pixels; the limit is {max_pixels:,}")
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is empty ({width}×{height})")
    if _truncated(data, fmt):
        raise ImageError(f"{name}: the {fmt} file is truncated (incomplete download or copy?)")
    reduce = 1
    if fmt == "JPEG":
        while reduce < 8 and max(width, height) // (reduce * 2) >= MAX_SIDE:
            reduce *= 2
    buffer = np.frombuffer(data, np.uint8)
    try:
        image = cv2.imdecode(buffer, _REDUCED[reduce] if reduce > 1 else cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise ImageError(f"{name}: the {fmt} image does not decode (damaged?)")
    long_side = max(image.shape[:2])
    if long_side > MAX_SIDE:
        f = MAX_SIDE / long_side
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    return image, (width, height)


def read(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode` of a file; ImageError for a missing, unreadable or unacceptable file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: not a file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    return decode(data, str(path), max_pixels)
