"""device/logs.py: journald priorities on every line, native libraries' chatter kept out of the log.

The journal side is a real child process whose stderr is a file named by $JOURNAL_STREAM, exactly
what systemd's check (device and inode of fd 2) sees; the chatter is the real TFLite runtime and
the real OpenCV/FFmpeg. A real journald reading these prefixes is proven by systemd/testbed.sh.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from serenbox.device.logs import JournalFormatter, stderr_is_journal, syslog_priority

from tests import media

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, stderr_path: Path, journal: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` with stderr going to a file; with journal=True, $JOURNAL_STREAM names that file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOURNAL_STREAM", "OPENCV_"))}
    env["PYTHONPATH"] = str(ROOT)
    with open(stderr_path, "wb") as err:
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
    return proc


LOG_SOME = """
    import logging, sys
    from serenbox.device.logs import setup_logging
    setup_logging(sys.argv[1])
    log = logging.getLogger("serenbox")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("an error with a traceback")
    log.critical("a critical line")
"""


def test_each_line_carries_its_journal_priority(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    proc = run_python(LOG_SOME, err, True, "DEBUG")
    assert proc.returncode == 0
    lines = err.read_text().splitlines()
    assert lines[0] == "<7>DEBUG serenbox: a debug line"
    assert lines[1] == "<6>INFO serenbox: an info line"
    assert lines[2] == "<4>WARNING serenbox: a warning line"
    assert lines[3] == "<3>ERROR serenbox: an error with a traceback"
    # journald splits a record into lines: the traceback's lines keep the error's priority.
    traceback = lines[4:-1]
    assert traceback[0] == "<3>Traceback (most recent call last):"
    assert traceback[-1] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in traceback)
    assert lines[-1] == "<2>CRITICAL serenbox: a critical line"


def test_no_prefixes_outside_the_journal(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    run_python(LOG_SOME, err, False, "INFO")
    text = err.read_text()
    assert "<" not in text.split("Traceback")[0]
    lines = text.splitlines()
    # A terminal or a file gets a timestamp (the journal has its own), and the level threshold holds.
    assert "INFO serenbox: an info line" in lines[0] and lines[0][:4].isdigit()
    assert not any("a debug line" in line for line in lines)


def test_an_inherited_journal_stream_of_another_file_is_ignored(tmp_path: Path) -> None:
    # A child started by the daemon with stderr redirected elsewhere inherits $JOURNAL_STREAM.
    with open(tmp_path / "journal", "wb") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, other) is False
        assert stderr_is_journal({"JOURNAL_STREAM": "garbage"}, other) is False
        assert stderr_is_journal({}, other) is False
        with open(tmp_path / "journal", "a") as same:
            assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, same) is True


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, 7), (logging.INFO, 6), (25, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)],
)
def test_syslog_priorities(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority
    record = logging.LogRecord("x", level, __file__, 1, "one\ntwo", None, None)
    assert JournalFormatter("%(message)s").format(record) == f"<{priority}>one\n<{priority}>two"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photo")
    return media.write_image(folder / "face.png", media.scene([(220, 140, 200)]))


def classify(photo: Path, tmp_path: Path, log_level: str, journal: bool) -> tuple[str, str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"log_level": log_level, "state_dir": str(tmp_path / "state")}))
    err = tmp_path / "stderr"
    code = "import sys; from serenbox.device.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(code, err, journal, "classify", "--config", str(config), str(photo))
    assert proc.returncode == 0, err.read_text()
    return proc.stdout, err.read_text()


def test_the_tflite_delegate_line_stays_out_of_the_log(photo: Path, tmp_path: Path) -> None:
    stdout, stderr = classify(photo, tmp_path, "INFO", journal=True)
    assert stdout.count("\n") == 1  # the answer is there
    assert "XNNPACK" not in stderr
    assert stderr == ""


def test_the_tflite_delegate_line_is_a_debug_record_when_debugging(photo: Path, tmp_path: Path) -> None:
    _, stderr = classify(photo, tmp_path, "DEBUG", journal=True)
    lines = [line for line in stderr.splitlines() if "XNNPACK" in line]
    assert lines == [
        "<7>DEBUG serenbox.device.interpreter: tflite: INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    ]
    # Nothing reaches the journal without its priority.
    assert all(line.startswith("<") for line in stderr.splitlines())


OPEN_BAD_VIDEOS = """
    import sys, cv2
    from serenbox.device.logs import setup_logging
    setup_logging(sys.argv[1])
    print(cv2.VideoCapture(sys.argv[2], cv2.CAP_FFMPEG).isOpened(), cv2.VideoCapture(97).isOpened())
"""


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_opencv_and_ffmpeg_chatter_is_kept_out(level: str, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"ftyp" + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    err = tmp_path / "stderr"
    proc = run_python(OPEN_BAD_VIDEOS, err, True, level, str(bad))
    assert proc.stdout.split() == ["False", "False"]
    assert err.read_text() == ""


def test_opencv_and_ffmpeg_speak_when_debugging(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"ftyp")
    err = tmp_path / "stderr"
    run_python(OPEN_BAD_VIDEOS, err, True, "DEBUG", str(bad))
    text = err.read_text()
    assert "moov atom not found" in text  # FFmpeg
    assert "can't open camera by index" in text  # OpenCV's videoio
