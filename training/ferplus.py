"""FER+ crowd labels (Microsoft's re-annotation of FER2013, 10 taggers per image) for our 7 classes.

`ferplus.npz` holds each FER2013 row's vote counts in FER+'s column order (`COLUMNS`), aligned
row by row to `fer2013.npz` (../shared/fer2013/FERPLUS-PROVENANCE.txt says how). This module
reads it onto a `Fer2013` (`attach`), applies FER+'s official majority rule (`majority`), and
makes the training targets of each mode (`targets`):

- the official rule (FER+'s `src/ferplus.py`, 'majority' mode): counts of 1 are dropped as
  outliers, then the top column needs more than half of the remaining votes; images whose top is
  unknown or NF (not a face) are dropped, and for 7 classes so are those whose top is contempt.
  It keeps 24,940 Training, 3,186 PublicTest and 3,136 PrivateTest images: evaluation and model
  selection always use it.
- `majority`: one-hot of the official rule's class;
- `crossentropy`: the vote distribution over the 7 emotions after dropping counts of 1 (the FER+
  paper's best mode);
- `probability`: the same distribution, from which training draws one label per face and epoch.

Images FER+ marks unclear are dropped on purpose: those whose top column (after dropping single
votes; ties go to the first column, an emotion) is unknown or NF, and those with no votes left.
For the distribution modes the unknown/NF votes of kept images are removed, not spread.

Contempt, which our 7 outputs lack, has two policies (`CONTEMPT_POLICIES`):
- `image` (default): contempt counts in the rule as an 8th class and images that would need it are
  dropped: for `majority` those whose majority is contempt (the official 7-class rule), for the
  distribution modes those with any contempt votes left;
- `vote`: contempt votes are removed before the rule, as if those taggers had not voted.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import DatasetError, Fer2013

COLUMNS: tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
# FER+ column → index into LABELS, for the 7 emotions both share (columns 0..6).
_COLUMN_LABEL = {
    "neutral": "neutral",
    "happiness": "happy",
    "surprise": "surprise",
    "sadness": "sad",
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fear",
}
TO_LABEL = np.array([LABELS.index(_COLUMN_LABEL[c]) for c in COLUMNS[:7]], dtype=np.int64)
CONTEMPT, UNKNOWN, NOT_A_FACE = 7, 8, 9
MODES: tuple[str, ...] = ("majority", "probability", "crossentropy")
CONTEMPT_POLICIES: tuple[str, ...] = ("image", "vote")
FILE_NAME = "ferplus.npz"


def default_path(data_path: str | Path) -> Path:
    """Where ferplus.npz sits by default: beside fer2013.npz (or inside the data folder)."""
    p = Path(data_path)
    return (p if p.is_dir() else p.parent) / FILE_NAME


def read_votes(path: str | Path, rows: int) -> np.ndarray:
    """The (rows, 10) uint8 vote counts; refused in one line when missing, unreadable or misaligned."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: FER+ votes file does not exist (ferplus.npz)")
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        with np.load(p) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile) or "votes" not in archive.files:
                raise DatasetError(f"{p}: not a FER+ archive (needs a votes array)")
            votes = archive["votes"]
    except unreadable as e:
        raise DatasetError(f"{p}: not a readable .npz archive ({e})") from None
    except TypeError:  # np.load of a lone .npy gives an array, which is no context manager
        raise DatasetError(f"{p}: not a FER+ archive (needs a votes array)") from None
    if votes.ndim != 2 or votes.shape[1] != len(COLUMNS):
        raise DatasetError(f"{p}: votes must be (N, {len(COLUMNS)}) in FER+ column order; got {votes.shape}")
    if len(votes) != rows:
        raise DatasetError(f"{p}: {len(votes)} rows of votes for {rows} images; not aligned to this data set")
    if votes.size and (votes.min() < 0 or votes.sum(axis=1).max() > 255):
        raise DatasetError(f"{p}: vote counts out of range")
    return votes.astype(np.uint8)


def attach(data: Fer2013, path: str | Path) -> Fer2013:
    """`data` (whole, as read from its file) with its FER+ votes."""
    return data.with_votes(read_votes(path, len(data)))


def _kept_votes(votes: np.ndarray, contempt: str) -> np.ndarray:
    if contempt not in CONTEMPT_POLICIES:
        raise ValueError(f"contempt policy {contempt!r}; expected one of {', '.join(CONTEMPT_POLICIES)}")
    v = np.asarray(votes, np.float64).reshape(-1, len(COLUMNS)).copy()
    v[v <= 1] = 0.0  # FER+ drops single votes as outliers
    if contempt == "vote":
        v[:, CONTEMPT] = 0.0
    return v


def majority(votes: np.ndarray, contempt: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """The official majority rule: (kept mask, label index into LABELS, -1 where dropped).
    With contempt='image' this is FER+'s 7-class evaluation set."""
    v = _kept_votes(votes, contempt)
    total = v.sum(axis=1)
    top = v.argmax(axis=1)  # ties → the first column, as np.argmax in FER+'s code
    keep = (v.max(axis=1) > 0.5 * total) & (total > 0) & (top < CONTEMPT)
    labels = np.where(keep, TO_LABEL[np.minimum(top, 6)], -1)
    return keep, labels


def distribution(votes: np.ndarray, contempt: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, (N, 7) vote shares in LABELS order, zeros where dropped) after dropping single
    votes, unclear images (top unknown/NF, or nothing left) and per `contempt`."""
    v = _kept_votes(votes, contempt)
    emotions = v[:, :7]
    keep = (v.argmax(axis=1) < UNKNOWN) & (emotions.sum(axis=1) > 0)
    if contempt == "image":
        keep &= v[:, CONTEMPT] == 0
    shares = np.zeros((len(v), len(LABELS)), np.float64)
    shares[:, TO_LABEL] = emotions
    sums = shares.sum(axis=1, keepdims=True)
    shares = np.divide(shares, sums, out=np.zeros_like(shares), where=keep[:, None] & (sums > 0))
    return keep, shares.astype(np.float32)


def targets(votes: np.ndarray, mode: str, contempt: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Training targets of a mode: (kept mask, (N, 7) float32 targets; rows of dropped images are zeros).
    `probability` returns the distribution; the label is drawn from it at training time."""
    if mode == "majority":
        keep, labels = majority(votes, contempt)
        y = np.zeros((len(keep), len(LABELS)), np.float32)
        y[np.flatnonzero(keep), labels[keep]] = 1.0
        return keep, y
    if mode in ("probability", "crossentropy"):
        return distribution(votes, contempt)
    raise ValueError(f"FER+ mode {mode!r}; expected one of {', '.join(MODES)}")


def sample_labels(shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One-hot labels drawn from each row's distribution (the 'probability' mode)."""
    cum = np.cumsum(shares, axis=1)
    u = rng.random((len(shares), 1)) * cum[:, -1:]
    picked = np.minimum((cum <= u).sum(axis=1), shares.shape[1] - 1)
    return np.eye(shares.shape[1], dtype=np.float32)[picked]


def official(data: Fer2013) -> Fer2013:
    """The images the official 7-class majority rule keeps, labelled with its class."""
    if data.votes is None:
        raise DatasetError(f"{data.source}: no FER+ votes attached")
    keep, labels = majority(data.votes)
    part = data.subset(keep)
    return Fer2013(part.images, labels[keep].astype(np.uint8), part.splits, f"{data.source}+FER+", part.votes)
