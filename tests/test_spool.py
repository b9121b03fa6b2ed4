"""The durable spool: order, bounds, survival across processes (a SIGKILLed writer)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serenbox.device.spool import Spool, SpoolError


def test_fifo_order_and_delete(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", max_events=100, max_age_s=3600)
    ids = [s.append(f"e{i}") for i in range(5)]
    assert ids == sorted(ids) and len(s) == 5
    assert [p for _, p in s.after(0, 3)] == ["e0", "e1", "e2"]
    assert [p for _, p in s.after(ids[2], 10)] == ["e3", "e4"]
    s.delete(ids[:2])
    assert len(s) == 3 and [p for _, p in s.after(0, 10)] == ["e2", "e3", "e4"]
    s.delete(ids[:2])  # deleting twice (a late duplicate ack) changes nothing
    assert len(s) == 3
    s.close()


def test_rowids_never_repeat_after_emptying(tmp_path: Path) -> None:
    # A reused rowid would sort before an event already sent and could be skipped.
    path = tmp_path / "s.sqlite"
    s = Spool(path, 100, 3600)
    last = s.append("a")
    s.delete([last])
    s.close()
    s = Spool(path, 100, 3600)
    assert s.append("b") > last
    s.close()


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", max_events=3, max_age_s=3600)
    for i in range(5):
        s.append(f"e{i}")
    assert [p for _, p in s.after(0, 10)] == ["e2", "e3", "e4"]
    assert s.dropped == 2 and len(s) == 3
    s.close()


def test_age_bound_drops_old_events(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", max_events=100, max_age_s=60)
    t0 = time.time() - 100
    s.append("old1", now=t0)
    s.append("old2", now=t0 + 1)
    s.append("new", now=t0 + 100)  # old1/old2 are now older than 60 s
    assert [p for _, p in s.after(0, 10)] == ["new"]
    assert s.dropped == 2
    s.close()


def test_age_bound_applies_while_nothing_is_appended(tmp_path: Path) -> None:
    # A paused pipeline during a long outage appends nothing; stale events must not go out later.
    s = Spool(tmp_path / "s.sqlite", max_events=100, max_age_s=60)
    s.append("stale", now=time.time() - 100)
    assert len(s) == 1
    assert s.after(0, 10) == [] and s.dropped == 1 and len(s) == 0
    s.close()


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    code = (
        "import os, signal, sys\n"
        "from serenbox.device.spool import Spool\n"
        f"s = Spool({str(path)!r}, 1000, 3600)\n"
        "for i in range(50): s.append(f'e{i}')\n"
        "print('written', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL and "written" in p.stdout
    s = Spool(path, 1000, 3600)
    assert [p for _, p in s.after(0, 100)] == [f"e{i}" for i in range(50)]
    s.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_acknowledged_deletes_survive_sigkill(tmp_path: Path) -> None:
    # An acknowledged event's delete is kept by a killed process: no resend after a crash.
    path = tmp_path / "s.sqlite"
    code = (
        "import os, signal\n"
        "from serenbox.device.spool import Spool\n"
        f"s = Spool({str(path)!r}, 1000, 3600)\n"
        "ids = [s.append(f'e{i}') for i in range(10)]\n"
        "for i in ids[:7]: s.delete([i])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    s = Spool(path, 1000, 3600)
    assert [p for _, p in s.after(0, 100)] == ["e7", "e8", "e9"] and len(s) == 3
    s.close()


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match="cannot open the event spool"):
        Spool(blocker / "sub" / "s.sqlite", 10, 60)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(SpoolError):
        Spool(d / "s.sqlite", 10, 60)


@pytest.mark.parametrize(
    "damage",
    [
        b"SQLite format 3\0" + b"torn write" * 400,  # a spool whose first page was cut short
        bytes(4096 * 3),  # zeroed by a power cut
    ],
    ids=["torn", "zeroed"],
)
def test_a_damaged_spool_file_is_moved_aside_and_a_new_spool_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(damage)
    s = Spool(path, 100, 3600)
    assert len(s) == 0
    assert s.append("fresh") >= 1 and [p for _, p in s.after(0, 10)] == ["fresh"]
    s.close()
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("s.sqlite.corrupt-")
    assert (tmp_path / aside[0]).read_bytes() == damage
    assert "was damaged" in caplog.text


def test_a_file_that_is_not_a_spool_is_never_touched(tmp_path: Path) -> None:
    # spool.path pointed at the configuration file by mistake: refuse, never rename or replace it.
    path = tmp_path / "serenbox.yaml"
    text = b"device_id: livingroom\nmqtt:\n  host: broker\n"
    path.write_bytes(text)
    with pytest.raises(SpoolError, match="not an event spool"):
        Spool(path, 100, 3600)
    assert path.read_bytes() == text
    assert [p.name for p in tmp_path.iterdir()] == ["serenbox.yaml"]


def test_damaged_page_keeps_every_readable_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.sqlite"
    s = Spool(path, 10_000, 3600)
    payloads = [f"e{i:04d}-" + "x" * 300 for i in range(600)]  # ~13 rows per 4 KiB page, ~46 pages
    ids = [s.append(p) for p in payloads]
    s.delete(ids[:5])  # some already acknowledged, as in real life
    s.close()  # the last connection checkpoints the WAL into the main file
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    size = path.stat().st_size
    assert size // page > 30
    with path.open("r+b") as f:  # one page in the middle turns to garbage, as a failing SD card does
        f.seek((size // page // 2) * page)
        f.write(bytes(range(256)) * (page // 256))

    s = Spool(path, 10_000, 3600)
    kept = [p for _, p in s.after(0, 10_000)]
    assert "was damaged" in caplog.text and s.lost_to_corruption > 0
    assert kept[0] == payloads[5] and kept[-1] == payloads[-1]  # both sides of the damage survive
    assert 595 - 2 * 13 <= len(kept) < 595  # only about one page worth is gone
    assert kept == [p for p in payloads[5:] if p in set(kept)]  # original order, nothing invented
    assert len(s) == len(kept)
    assert s.append("after") > ids[-1]  # ids stay above everything handed out before the damage
    s.close()
    s = Spool(path, 10_000, 3600)  # the rebuilt file is healthy: no second recovery
    assert len(s) == len(kept) + 1 and caplog.text.count("was damaged") == 1
    s.close()


def test_a_spool_cut_short_keeps_what_remains_and_counts_the_rest(tmp_path: Path) -> None:
    # A full disk or a torn copy leaves half a file whose header still claims every page:
    # SQLite then refuses even the schema, and every event used to be lost uncounted.
    path = tmp_path / "s.sqlite"
    s = Spool(path, 100_000, 3600)
    for i in range(2000):
        s.append(f"e{i:05d}-" + "x" * 200)
    s.close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    s = Spool(path, 100_000, 3600)
    kept = [p for _, p in s.after(0, 5000)]
    assert 500 < len(kept) < 2000 and kept == sorted(kept) and kept[0].startswith("e00000")
    assert s.lost_to_corruption == 2000 - len(kept)  # counted in stats.spool_dropped
    s.close()
