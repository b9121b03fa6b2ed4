"""The FER2013 readers on generated files in each layout: round trips, label mapping, and every refusal."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from serenbox.device.labels import LABELS
from serenbox.training.fer2013 import SPLITS, DatasetError, Fer2013, format_counts, load, main

from tests.tinymodels import make_dataset, write_csv, write_folders, write_npz

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = {"Training": 4, "PublicTest": 2, "PrivateTest": 1}
HEADER = "emotion,pixels,Usage\n"


@pytest.fixture(scope="module")
def data() -> Fer2013:
    return make_dataset(PER_CLASS, seed=3)


def pixels(value: int = 7, count: int = 48 * 48) -> str:
    return " ".join([str(value)] * count)


def write_rows(path: Path, *rows: str, header: str = HEADER) -> Path:
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def assert_same(got: Fer2013, want: Fer2013) -> None:
    # Readers may order images differently (folders sort by name); compare as sorted (split, label, bytes).
    def keyed(d: Fer2013) -> list[tuple[int, int, bytes]]:
        return sorted(zip(d.splits.tolist(), d.labels.tolist(), (im.tobytes() for im in d.images), strict=True))

    assert got.images.dtype == np.uint8 and got.images.shape[1:] == (48, 48)
    assert keyed(got) == keyed(want)


@pytest.mark.parametrize("layout", ["npz", "csv", "folders", "folder-with-npz"])
def test_each_layout_reads_back_what_was_written(layout: str, data: Fer2013, tmp_path: Path) -> None:
    if layout == "npz":
        path = write_npz(data, tmp_path / "fer.npz")
    elif layout == "csv":
        path = write_csv(data, tmp_path / "fer.csv")
    elif layout == "folders":
        path = write_folders(data, tmp_path / "fer")
    else:
        write_npz(data, tmp_path / "fer2013.npz")
        path = tmp_path
    got = load(path)
    assert_same(got, data)
    assert got.counts() == {s: {c: PER_CLASS[s] for c in LABELS} for s in SPLITS}


def test_csv_maps_kaggle_codes_onto_project_labels(tmp_path: Path) -> None:
    # Kaggle's order: 0 Angry 1 Disgust 2 Fear 3 Happy 4 Sad 5 Surprise 6 Neutral; each row a distinct pixel value.
    rows = [f"{code},{pixels(code * 10)},PublicTest" for code in range(7)]
    got = load(write_rows(tmp_path / "k.csv", *rows))
    names = [LABELS[k] for k in got.labels]
    assert names == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert [int(im[0, 0]) for im in got.images] == [0, 10, 20, 30, 40, 50, 60]
    assert set(got.splits.tolist()) == {SPLITS.index("PublicTest")}


def test_csv_without_usage_is_all_training_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    got = load(write_rows(tmp_path / "k.csv", f"3,{pixels()}", "", f"4,{pixels()}", header="emotion,pixels\n"))
    assert len(got) == 2 and got.counts()["Training"]["happy"] == 1 and got.counts()["Training"]["sad"] == 1


def test_folders_take_split_from_prefix_resize_and_skip_non_images(tmp_path: Path) -> None:
    root = tmp_path / "fer"
    for top, cls, name, size in [
        ("train", "happy", "a.png", 48),
        ("test", "sad", "PrivateTest_1.png", 48),
        ("test", "sad", "PublicTest_2.png", 48),
        ("test", "fear", "plain.jpg", 96),  # no prefix: PublicTest; other size: resized to 48×48
    ]:
        (root / top / cls).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / top / cls / name), np.full((size, size), 100, np.uint8))
    (root / "train" / "happy" / "notes.txt").write_text("not an image")
    got = load(root)
    counts = got.counts()
    assert counts["Training"]["happy"] == 1
    assert counts["PrivateTest"]["sad"] == 1 and counts["PublicTest"]["sad"] == 1
    assert counts["PublicTest"]["fear"] == 1
    assert len(got) == 4 and got.images.shape == (4, 48, 48)
    assert np.abs(got.images.astype(int) - 100).max() <= 2  # jpeg may move a level or two


@pytest.mark.parametrize(
    ("rows", "line", "needle"),
    [
        ([f"0,{pixels()},Training", f"0,{pixels()}"], 3, "expected 3 fields, got 2"),
        ([f"x,{pixels()},Training"], 2, "emotion 'x' is not a number"),
        ([f"0,{pixels()},Training", f"7,{pixels()},Training"], 3, "unknown emotion code 7"),
        ([f"0,{pixels(count=48 * 48 - 1)},Training"], 2, "2303 pixels, expected 2304"),
        ([f"0,{pixels(256)},Training"], 2, "pixel values must be 0..255"),
        ([f"0,{pixels()[:-1]}x,Training"], 2, "pixels must be space-separated integers"),
        ([f"0,{pixels()},Validation"], 2, "unknown Usage 'Validation'"),
        ([f"0,{pixels()},Training", f"1,{'1' * 200_000},Training"], 3, "field larger than field limit"),
    ],
    ids=["fields", "emotion", "code", "pixel-count", "pixel-range", "pixel-text", "usage", "huge-field"],
)
def test_malformed_csv_row_is_refused_with_file_and_line(
    rows: list[str], line: int, needle: str, tmp_path: Path
) -> None:
    path = write_rows(tmp_path / "bad.csv", *rows)
    with pytest.raises(DatasetError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert needle in str(e.value)


def test_csv_bad_header_empty_body_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r":1: header must name columns emotion,pixels"):
        load(write_rows(tmp_path / "h.csv", f"0,{pixels()},Training", header="label,data,Usage\n"))
    with pytest.raises(DatasetError, match=r"e\.csv: no data rows"):
        load(write_rows(tmp_path / "e.csv"))
    bad = tmp_path / "latin.csv"
    bad.write_bytes((HEADER + f"0,{pixels()},Training\n").encode() + b"1,\xff\xfe,Training\n")
    with pytest.raises(DatasetError, match=rf"^{bad}:3: not UTF-8 text$"):
        load(bad)


def test_folder_refusals_name_the_path(tmp_path: Path) -> None:
    root = tmp_path / "fer"
    (root / "train" / "happy").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images found under train/"):
        load(root)
    broken = root / "train" / "happy" / "Training_1.png"
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=rf"^{broken}: unreadable image$"):
        load(root)
    broken.unlink()
    (root / "test" / "contempt").mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"^{root / 'test' / 'contempt'}: unknown class 'contempt'"):
        load(root)
    with pytest.raises(DatasetError, match=r"no train/ or test/ folder"):
        load(tmp_path / "fer" / "train")  # a folder of class folders, one level too deep


def test_npz_refusals(data: Fer2013, tmp_path: Path) -> None:
    good = write_npz(data, tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(DatasetError, match=r"truncated\.npz: not a readable \.npz archive"):
        load(truncated)
    np.savez(tmp_path / "nokey.npz", x=data.images, y=data.labels)
    with pytest.raises(DatasetError, match=r"nokey\.npz: archive lacks array\(s\) split \(needs"):
        load(tmp_path / "nokey.npz")
    np.savez(tmp_path / "shape.npz", x=data.images[:, :40], y=data.labels, split=data.splits)
    with pytest.raises(DatasetError, match=r"shape\.npz: expected x \(N,48,48\)"):
        load(tmp_path / "shape.npz")
    np.savez(tmp_path / "code.npz", x=data.images, y=data.labels + 7, split=data.splits)
    with pytest.raises(DatasetError, match=r"code\.npz: label or split code out of range"):
        load(tmp_path / "code.npz")
    np.save(tmp_path / "lone.npy", data.images)
    (tmp_path / "lone.npy").rename(tmp_path / "lone.npz")
    with pytest.raises(DatasetError, match=r"lone\.npz: not an \.npz archive of x, y, split"):
        load(tmp_path / "lone.npz")


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothing: data path does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "fer.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"fer\.txt: not a FER2013 \.npz, \.csv or image folder"):
        load(tmp_path / "fer.txt")


def test_split_require_and_counts(data: Fer2013) -> None:
    public = data.require("PublicTest")
    assert len(public) == 7 * PER_CLASS["PublicTest"] and set(public.splits.tolist()) == {1}
    no_fear = Fer2013(data.images, data.labels, np.where(data.labels == 2, 1, data.splits).astype(np.uint8), "gen")
    with pytest.raises(DatasetError, match=r"gen: Training split has no images of class fear"):
        no_fear.require("Training")
    assert len(no_fear.require("Training", all_classes=False)) == 6 * PER_CLASS["Training"]
    only_train = Fer2013(data.images, data.labels, np.zeros_like(data.splits), "gen")
    with pytest.raises(DatasetError, match=r"gen: no PrivateTest images"):
        only_train.require("PrivateTest")
    with pytest.raises(DatasetError, match=r"unknown split 'Validation'"):
        data.split("Validation")
    table = format_counts(data).splitlines()
    assert table[-1].split() == ["total", "28", "14", "7"]
    assert table[LABELS.index("disgust") + 1].split() == ["disgust", "4", "2", "1"]


def test_count_command(data: Fer2013, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(write_csv(data, tmp_path / "fer.csv"))]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["total", "28", "14", "7"]
    bad = write_rows(tmp_path / "bad.csv", f"9,{pixels()},Training")
    # A real process: the exit code and the one-line error a user sees, no traceback.
    run = subprocess.run(
        [sys.executable, "-m", "serenbox.training.fer2013", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {bad}:2: unknown emotion code 9 (Kaggle codes are 0..6)"
    assert run.stdout == ""


def test_writers_match_the_public_layouts(data: Fer2013, tmp_path: Path) -> None:
    """The test helpers write what users have: Kaggle's header and codes, train/ and test/ with prefixes."""
    with write_csv(data, tmp_path / "fer.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["emotion", "pixels", "Usage"]
    first_sad = next(r for r, lab in zip(rows[1:], data.labels, strict=True) if LABELS[lab] == "sad")
    assert first_sad[0] == "4"
    root = write_folders(data, tmp_path / "fer")
    assert {p.parent.parent.name for p in root.rglob("*.png")} == {"train", "test"}
    assert all(p.name.startswith("Training_") for p in (root / "train").rglob("*.png"))
