"""Still images from files, bytes, a stream or a caller's array, checked before they are decoded.

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
from typing import BinaryIO

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
    return fit(image), (width, height)


def fit(image: np.ndarray) -> np.ndarray:
    """The image scaled down to MAX_SIDE on its longest side (unchanged if it is not longer)."""
    long_side = max(image.shape[:2])
    if long_side <= MAX_SIDE:
        return image
    f = MAX_SIDE / long_side
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)


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


def read_stream(stream: BinaryIO, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode` of one image's bytes from a stream (standard input), read no further than the size limit."""
    try:
        data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    if not data:
        raise ImageError(f"{name}: no data (expected one image's bytes)")
    return decode(data, name, max_pixels)


def from_array(
    array: np.ndarray, name: str, rgb: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """A caller's pixels, checked as a file's are: uint8 gray (H, W) or (H, W, 1), or colour (H, W, 3) BGR
    as OpenCV gives it (RGB with `rgb=True`), or (H, W, 4) with alpha, which is ignored.

    Returns a gray or BGR image at most MAX_SIDE on its longest side, and the full size (width, height)."""
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        # Floats in 0..1 or 0..255, or 16-bit: guessing the range would silently change the answer.
        raise ImageError(f"{name}: pixels must be uint8 (0..255), got {array.dtype}; convert with .astype(np.uint8)")
    channels = 1 if array.ndim == 2 else array.shape[-1] if array.ndim == 3 else None
    if channels not in (1, 3, 4):
        raise ImageError(f"{name}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    height, width = array.shape[:2]
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is empty ({width}×{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}×{height} is {width * height:,} pixels; the limit is {max_pixels:,}")
    if channels == 1:
        image = array.reshape(height, width)
    elif channels == 3:
        image = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array
    else:
        image = cv2.cvtColor(array, cv2.COLOR_RGBA2BGR if rgb else cv2.COLOR_BGRA2BGR)
    return fit(np.ascontiguousarray(image)), (width, height)
