"""Readers for the FER2013 layouts users have: Kaggle CSV, image folders, the .npz archive.

Every reader returns the same `Fer2013` arrays with labels in the project's order
(`device.labels.LABELS`) and splits coded 0 Training, 1 PublicTest, 2 PrivateTest.
Bad input raises `DatasetError` naming the file and the line or path, so a user can fix
the one bad row instead of guessing.

    python -m serenbox.training.fer2013 PATH      # counts per split and class
"""

from __future__ import annotations

import argparse
import csv
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serenbox.device.labels import LABELS

SPLITS: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
SIZE = 48
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm"}

# Kaggle's CSV codes emotions in its own order; this maps them onto LABELS.
_CSV_CODE_TO_LABEL = {0: "angry", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"}
_CSV_CODES = np.array([LABELS.index(_CSV_CODE_TO_LABEL[c]) for c in range(7)], dtype=np.uint8)


class DatasetError(ValueError):
    """A data set that cannot be read; the message names the file and where."""


@dataclass(frozen=True)
class Fer2013:
    images: np.ndarray  # uint8 (N, 48, 48) gray
    labels: np.ndarray  # uint8 (N,), index into LABELS
    splits: np.ndarray  # uint8 (N,), index into SPLITS
    source: str
    votes: np.ndarray | None = None  # uint8 (N, 10) FER+ vote counts (training/ferplus.py), if attached

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray, source: str | None = None) -> Fer2013:
        """The rows a boolean mask or index array selects, votes included."""
        votes = None if self.votes is None else self.votes[keep]
        return Fer2013(self.images[keep], self.labels[keep], self.splits[keep], source or self.source, votes)

    def with_votes(self, votes: np.ndarray) -> Fer2013:
        return Fer2013(self.images, self.labels, self.splits, self.source, votes)

    def split(self, name: str) -> Fer2013:
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.subset(self.splits == SPLITS.index(name), f"{self.source}[{name}]")

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class (every split and class present, zeros included)."""
        table = np.zeros((len(SPLITS), len(LABELS)), dtype=np.int64)
        np.add.at(table, (self.splits, self.labels), 1)
        return {s: {c: int(table[i, j]) for j, c in enumerate(LABELS)} for i, s in enumerate(SPLITS)}

    def require(self, split: str, all_classes: bool = True) -> Fer2013:
        """The split, refused when it is empty or (optionally) lacks a class."""
        part = self.split(split)
        if len(part) == 0:
            raise DatasetError(f"{self.source}: no {split} images")
        if all_classes:
            missing = [c for c, n in part.counts()[split].items() if n == 0]
            if missing:
                raise DatasetError(f"{self.source}: {split} split has no images of class {', '.join(missing)}")
        return part


def load(path: str | Path) -> Fer2013:
    """Read FER2013 from an .npz, a Kaggle .csv, or a folder with train/ and test/."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: data path does not exist")
    if p.is_dir():
        for name in ("fer2013.npz", "fer2013.csv"):
            if (p / name).is_file():
                return load(p / name)
        return read_folders(p)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return read_npz(p)
    if suffix == ".csv":
        return read_csv(p)
    raise DatasetError(f"{p}: not a FER2013 .npz, .csv or image folder")


def read_npz(path: Path) -> Fer2013:
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        archive = np.load(path)
    except unreadable as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a lone .npy array under an .npz name
        raise DatasetError(f"{path}: not an .npz archive of x, y, split")
    with archive:
        missing = [k for k in ("x", "y", "split") if k not in archive.files]
        if missing:
            raise DatasetError(f"{path}: archive lacks array(s) {', '.join(missing)} (needs x, y, split)")
        try:
            x, y, split = archive["x"], archive["y"], archive["split"]
        except unreadable as e:  # a damaged member inside an intact zip directory
            raise DatasetError(f"{path}: not a readable .npz archive ({e})") from None
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE) or len(y) != len(x) or len(split) != len(x):
        raise DatasetError(f"{path}: expected x (N,48,48), y (N,), split (N,); got {x.shape}, {y.shape}, {split.shape}")
    if len(y) and (y.max() >= len(LABELS) or split.max() >= len(SPLITS)):
        raise DatasetError(f"{path}: label or split code out of range")
    return Fer2013(x.astype(np.uint8), y.astype(np.uint8), split.astype(np.uint8), str(path))


def _first_undecodable_line(path: Path) -> int:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def read_csv(path: Path) -> Fer2013:
    try:
        return _read_csv(path)
    except UnicodeDecodeError:
        # The decoder works on blocks, so the csv reader's line number is not where the bad byte is.
        raise DatasetError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 text") from None


def _read_csv(path: Path) -> Fer2013:
    images, labels, splits = [], [], []
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        try:
            col_e, col_p = header.index("emotion"), header.index("pixels")
        except ValueError:
            raise DatasetError(f"{path}:1: header must name columns emotion,pixels[,Usage]; got {header}") from None
        col_u = header.index("usage") if "usage" in header else None
        for row in _rows(reader, path):
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            try:
                code = int(row[col_e])
            except ValueError:
                raise DatasetError(f"{path}:{line}: emotion {row[col_e]!r} is not a number") from None
            if code not in _CSV_CODE_TO_LABEL:
                raise DatasetError(f"{path}:{line}: unknown emotion code {code} (Kaggle codes are 0..6)")
            try:
                pixels = np.array(row[col_p].split(), dtype=np.int64)
            except ValueError:
                raise DatasetError(f"{path}:{line}: pixels must be space-separated integers") from None
            if pixels.size != SIZE * SIZE:
                raise DatasetError(f"{path}:{line}: {pixels.size} pixels, expected {SIZE * SIZE}")
            if pixels.min() < 0 or pixels.max() > 255:
                raise DatasetError(f"{path}:{line}: pixel values must be 0..255")
            usage = row[col_u].strip() if col_u is not None else "Training"
            if usage not in SPLITS:
                raise DatasetError(f"{path}:{line}: unknown Usage {usage!r}; expected {', '.join(SPLITS)}")
            images.append(pixels.astype(np.uint8).reshape(SIZE, SIZE))
            labels.append(_CSV_CODES[code])
            splits.append(SPLITS.index(usage))
    if not images:
        raise DatasetError(f"{path}: no data rows")
    return Fer2013(np.stack(images), np.array(labels, np.uint8), np.array(splits, np.uint8), str(path))


def _rows(reader: Any, path: Path) -> Iterator[list[str]]:
    """The reader's rows; a csv.Error (NUL byte, oversized field) becomes a DatasetError naming the line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DatasetError(f"{path}:{reader.line_num}: {e}") from None
        yield row


def _split_of(file: Path, top: str) -> int:
    if top == "train":
        return 0
    # The public layout keeps both test splits in test/, told apart by file-name prefix.
    return 2 if file.name.startswith("PrivateTest") else 1


def read_folders(root: Path) -> Fer2013:
    tops = [t for t in ("train", "test") if (root / t).is_dir()]
    if not tops:
        raise DatasetError(f"{root}: no train/ or test/ folder (expected train/<class>/*.jpg, test/<class>/*.jpg)")
    images, labels, splits = [], [], []
    for top in tops:
        for class_dir in sorted(d for d in (root / top).iterdir() if d.is_dir()):
            name = class_dir.name.lower()
            if name not in LABELS:
                raise DatasetError(f"{class_dir}: unknown class {class_dir.name!r}; expected {', '.join(LABELS)}")
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                img = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
                if img is None:
                    raise DatasetError(f"{file}: unreadable image")
                if img.shape != (SIZE, SIZE):
                    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                images.append(img)
                labels.append(LABELS.index(name))
                splits.append(_split_of(file, top))
    if not images:
        raise DatasetError(f"{root}: no images found under {', '.join(t + '/' for t in tops)}")
    return Fer2013(np.stack(images), np.array(labels, np.uint8), np.array(splits, np.uint8), str(root))


def format_counts(data: Fer2013) -> str:
    counts = data.counts()
    width = max(len(c) for c in LABELS)
    lines = [f"{'':<{width}} " + " ".join(f"{s:>11}" for s in SPLITS)]
    for c in LABELS:
        lines.append(f"{c:<{width}} " + " ".join(f"{counts[s][c]:>11}" for s in SPLITS))
    lines.append(f"{'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>11}" for s in SPLITS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count FER2013 images per split and class.")
    parser.add_argument("path", help="fer2013.npz, a Kaggle CSV, or a folder with train/ and test/")
    args = parser.parse_args(argv)
    try:
        data = load(args.path)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_counts(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
