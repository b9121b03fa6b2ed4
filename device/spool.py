"""Durable event spool: SQLite (WAL) on disk, oldest first, bounded by count and age.

An event is appended (and committed) before anyone tries to publish it and deleted only once the
broker has acknowledged it, so a crash, a power cut or a long broker outage loses nothing that
fits within the bounds. Rowids come from AUTOINCREMENT so they never repeat: they are the
publication order, even across restarts.

A damaged spool file (SD cards do fail) must not stop the daemon nor cost the events that are
still readable: the file is moved aside, every readable row is copied into a fresh spool with its
original id, and the count of unreadable ones is logged.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO, TypeVar

from serenbox.device.config import ConfigError

log = logging.getLogger("serenbox.spool")
T = TypeVar("T")

# Age bounds are enforced on append, but a scan per event would be wasted work.
_AGE_CHECK_EVERY_S = 30.0
# SQLite's primary result codes for a damaged file (a malformed page, or not a database at all).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
# Salvage probes ids one by one past a damaged page; give up after this many unreadable in a row.
_SALVAGE_BLIND_PROBES = 100_000
# The WAL grows by a few pages per event even when every event is deleted a moment later, and
# SQLite never shrinks it by default: checkpoint every 64 pages and cut the file back to 256 KiB,
# so a spool that is empty takes almost no disk and frees what it took once it empties.
_WAL_AUTOCHECKPOINT_PAGES = 64
_WAL_LIMIT_BYTES = 256 * 1024
_TRUNCATE_EVERY_S = 5.0
SQLITE_HEADER = b"SQLite format 3\0"


class SpoolError(ConfigError):
    """The spool cannot be opened or written (a path or permission problem, not a bug)."""


class _Corrupt(Exception):
    """The spool file is damaged; the message says how."""


def _is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class Spool:
    """Thread-safe FIFO of JSON payloads. One writer thread and one reader thread share it."""

    def __init__(self, path: str | Path, max_events: int, max_age_s: float, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.durable = durable
        self.dropped = 0  # events removed by the bounds during this run
        self.lost_to_corruption = 0  # unreadable rows of a damaged spool file, this run
        self._lock = threading.Lock()
        self._last_age_check = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"{self.path}: cannot open the event spool ({e})") from None
        if _not_sqlite(self.path):
            raise SpoolError(
                f"{self.path}: exists and is not an event spool (not a SQLite database); "
                "refusing to touch it: set mqtt.spool.path to a new file"
            )
        self._lock_file = _lock(self.path)
        self._last_truncate = 0.0
        with self._lock:
            try:
                self._open()
            except _Corrupt as e:
                self._recover(e)
            except sqlite3.Error as e:
                self._lock_file.close()
                raise SpoolError(f"{self.path}: cannot open the event spool ({e})") from None
            self._enforce_bounds(time.time())
        if self._count:
            log.info("spool %s holds %d unsent event(s) from an earlier run; they go out first", self.path, self._count)

    def _open(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives a power cut, not only a killed process (NORMAL would).
            self._db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS events ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, payload TEXT NOT NULL)"
            )
            # quick_check reads every page once: damage is found now, not halfway through a replay.
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                self._db.close()
                raise _Corrupt(f"integrity check: {check}")
            self._count = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.DatabaseError as e:
            self._db.close()
            if _is_corruption(e):
                raise _Corrupt(str(e)) from e
            raise

    def _recover(self, cause: Exception) -> None:
        """Move the damaged file aside and start afresh with every row that can still be read. Needs `_lock`."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):  # SQLite finds the WAL by name: move them together
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(f"{aside}{suffix}")
        rows, lost, top = _salvage_copy(aside)
        try:
            self._open()
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events (id, created, payload) VALUES (?, ?, ?)", rows)
            # New ids must stay above every id handed out before the damage: a publisher's cursor
            # may already be past the last salvaged row.
            self._db.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
            seq = max([top or 0, *(r[0] for r in rows[-1:])])
            self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))
            self._db.execute("COMMIT")
        except (sqlite3.Error, _Corrupt) as e:
            raise SpoolError(f"{self.path}: cannot create a new event spool ({e})") from None
        self._count = len(rows)
        self.lost_to_corruption += lost
        lost_text = f"lost up to {lost}" if top is not None else "could not tell how many were lost"
        log.error(
            "spool %s was damaged (%s): kept %d event(s), %s; the damaged file is kept as %s",
            self.path,
            cause,
            len(rows),
            lost_text,
            aside.name,
        )

    def __len__(self) -> int:
        return max(0, self._count)

    def append(self, payload: str, now: float | None = None) -> int:
        """Store one payload durably; returns its rowid (the publication order)."""
        now = time.time() if now is None else now
        with self._lock:
            try:
                cur = self._retry_if_corrupt(
                    lambda: self._db.execute("INSERT INTO events (created, payload) VALUES (?, ?)", (now, payload))
                )
                self._count += 1
                self._enforce_bounds(now)
            except sqlite3.Error as e:
                raise SpoolError(f"{self.path}: cannot write to the event spool ({e})") from None
            return int(cur.lastrowid)

    def after(self, rowid: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` rows with an id greater than `rowid`, oldest first."""
        with self._lock:
            try:
                # A long outage with a paused pipeline appends nothing: expire by age on the way out too.
                self._enforce_bounds(time.time())
                return self._retry_if_corrupt(
                    lambda: self._db.execute(
                        "SELECT id, payload FROM events WHERE id > ? ORDER BY id LIMIT ?", (rowid, limit)
                    ).fetchall()
                )
            except sqlite3.Error as e:
                raise SpoolError(f"{self.path}: cannot read the event spool ({e})") from None

    def delete(self, rowids: Iterable[int]) -> None:
        ids = [(i,) for i in rowids]
        if not ids:
            return
        with self._lock:

            def run() -> int:
                try:
                    self._db.execute("BEGIN")
                    cur = self._db.executemany("DELETE FROM events WHERE id = ?", ids)
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                return max(cur.rowcount, 0)

            try:
                self._count -= self._retry_if_corrupt(run)
            except sqlite3.Error as e:
                raise SpoolError(f"{self.path}: cannot delete from the event spool ({e})") from None
            self._truncate_wal_when_empty()

    def _truncate_wal_when_empty(self) -> None:
        """Give the disk back: with nothing unsent, the WAL is cut to zero (at most every few seconds)."""
        now = time.monotonic()
        if self._count > 0 or now - self._last_truncate < _TRUNCATE_EVERY_S:
            return
        self._last_truncate = now
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.debug("spool checkpoint failed: %s", e)

    def _retry_if_corrupt(self, op: Callable[[], T]) -> T:
        """Run `op`; if the file turns out damaged mid-run, recover it and run `op` once more."""
        try:
            return op()
        except sqlite3.DatabaseError as e:
            if not _is_corruption(e):
                raise
            self._db.close()
            self._recover(e)
        return op()

    def _enforce_bounds(self, now: float) -> None:
        dropped = 0
        if self._count > self.max_events:
            cur = self._db.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                (self._count - self.max_events,),
            )
            dropped += max(cur.rowcount, 0)
        if not 0 <= now - self._last_age_check < _AGE_CHECK_EVERY_S:  # also when the clock went back
            self._last_age_check = now
            cur = self._db.execute("DELETE FROM events WHERE created < ?", (now - self.max_age_s,))
            dropped += max(cur.rowcount, 0)
        if dropped:
            self._count -= dropped
            self.dropped += dropped
            log.warning("spool full or events too old: dropped the %d oldest unsent event(s)", dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()


def _lock(path: Path) -> TextIO:
    """An exclusive lock beside the spool: two daemons on one spool would send and delete each
    other's events (duplicates, reordering, a count below zero). The lock goes with the process."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        f = open(lock_path, "a+")  # noqa: SIM115 - held until close()
    except OSError as e:
        raise SpoolError(f"{path}: cannot open the event spool's lock file {lock_path} ({e.strerror})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SpoolError(
            f"{path}: the event spool is in use by another serenbox (pid {holder}); "
            "two daemons must not share a state directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _not_sqlite(path: Path) -> bool:
    """An existing, non-empty file that is not a SQLite database at all (not a damaged spool)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        return True
    except OSError:
        return False  # unreadable: sqlite3 says why
    # A spool damaged by the SD card or a power cut still starts like SQLite, or with zeros;
    # anything else is somebody else's file, and moving it aside would lose it.
    return len(head) > 0 and head != SQLITE_HEADER and head.strip(b"\0") != b""


def _salvage_copy(aside: Path) -> tuple[list[tuple[int, float, str]], int, int | None]:
    """`_salvage` on a copy cut to whole pages and whose header says so.

    A file cut short (a full disk, a torn copy) still says in its header how many pages it had;
    SQLite then refuses to read even the schema. With the page count mended, every row on the
    pages that remain can be read. The damaged file itself is kept untouched for inspection."""
    work = aside.with_name(aside.name + ".salvage")
    try:
        data = bytearray(aside.read_bytes())
        if data.startswith(SQLITE_HEADER) and len(data) >= 100:
            page = int.from_bytes(data[16:18], "big")
            page = 65536 if page == 1 else page
            if page >= 512:
                pages = len(data) // page
                del data[pages * page :]
                data[28:32] = pages.to_bytes(4, "big")
        work.write_bytes(bytes(data))
        wal = Path(f"{aside}-wal")
        if wal.exists():
            Path(f"{work}-wal").write_bytes(wal.read_bytes())
        return _salvage(work)
    except OSError as e:
        log.error("spool salvage failed: %s", e)
        return [], 0, None
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work}{suffix}").unlink(missing_ok=True)


def _salvage(path: Path) -> tuple[list[tuple[int, float, str]], int, int | None]:
    """Every readable row of a damaged spool in id order, how many ids could not be read, the highest id."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
    except sqlite3.Error:
        return [], 0, None
    rows: list[tuple[int, float, str]] = []
    lost = 0
    try:
        top = _highest_id(db)
        next_id, misses = 1, 0
        while misses < _SALVAGE_BLIND_PROBES and (top is None or next_id <= top):
            try:
                # Scan forward from next_id until the scan hits damage (or the end of the table).
                for row in db.execute("SELECT id, created, payload FROM events WHERE id >= ? ORDER BY id", (next_id,)):
                    if not (isinstance(row[1], float | int) and isinstance(row[2], str)):
                        raise sqlite3.DatabaseError("malformed row")
                    rows.append((int(row[0]), float(row[1]), row[2]))
                    next_id, misses = int(row[0]) + 1, 0
                break  # reached the end cleanly
            except sqlite3.DatabaseError as e:
                if getattr(e, "sqlite_errorcode", 0) & 0xFF == _SQLITE_NOTADB:
                    break  # the header itself is gone: nothing can be read
                # The row at next_id (or the page holding it) is unreadable: step over it.
                next_id += 1
                misses += 1
                lost += 1
    finally:
        db.close()
    # Without the highest id the number lost is unknown: count none rather than the probes.
    lost = max(0, min(lost, top - len(rows))) if top is not None else 0
    return rows, lost, top


def _highest_id(db: sqlite3.Connection) -> int | None:
    for sql in ("SELECT seq FROM sqlite_sequence WHERE name = 'events'", "SELECT MAX(id) FROM events"):
        try:
            row = db.execute(sql).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row and row[0] is not None:
            return int(row[0])
    return None
