"""The MQTT sink's backlog: the durable spool first, memory when the disk refuses.

Events are kept until the broker acknowledges them. The spool (device/spool.py) is where they
live; when it cannot take one (the disk is full, the SD card went read-only), events wait in
memory instead, up to `MEMORY_EVENTS`, so a full disk with the broker up loses nothing. Order is
kept: once an event is in memory, later ones follow it there until memory has drained, and the
publisher sends spooled events before memory ones. Only beyond the memory bound is the oldest
one dropped, and counted.

Keys name an event: `(0, rowid)` when spooled, `(1, n)` when in memory. A publisher's cursor
is a pair, the last rowid and the last memory number it has handed on (`advance`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from serenbox.device.spool import Spool, SpoolError

log = logging.getLogger("serenbox.mqtt")

MEMORY_EVENTS = 10_000  # about 5 MB of events
Key = tuple[int, int]
# A delete that failed (disk full) is retried at most this often; the rows are not re-sent meanwhile.
RETRY_DELETE_S = 1.0


class Backlog:
    def __init__(self, spool: Spool, memory_events: int = MEMORY_EVENTS) -> None:
        self.spool = spool
        self.memory_events = memory_events
        self._lock = threading.Lock()
        self._memory: OrderedDict[int, str] = OrderedDict()
        self._next_memory = 1
        self._undeleted: list[int] = []  # acknowledged rowids whose delete failed; retried
        self._last_delete_try = 0.0
        self.memory_dropped = 0
        self.write_errors = 0  # events that went to memory because the spool refused them
        # Writes and deletes fail and recover apart (a delete can fail while appends still fit in
        # the WAL), and each must be told once per outage: one flag for both hid the memory fallback.
        self._write_error: str | None = None
        self._delete_error: str | None = None

    def __len__(self) -> int:
        with self._lock:
            return max(0, len(self.spool) - len(self._undeleted)) + len(self._memory)

    @property
    def dropped(self) -> int:
        return self.spool.dropped + self.spool.lost_to_corruption + self.memory_dropped

    def append(self, payload: str) -> None:
        """Keep one event; never raises, never blocks on anything but the local disk."""
        with self._lock:
            if not self._memory:
                try:
                    self.spool.append(payload)
                except SpoolError as e:
                    self._disk_failed(e)
                else:
                    if self._write_error is not None:
                        log.warning("event spool writable again; events are stored on disk")
                        self._write_error = None
                    return
            self.write_errors += 1
            self._memory[self._next_memory] = payload
            self._next_memory += 1
            if len(self._memory) > self.memory_events:
                self._memory.popitem(last=False)
                self.memory_dropped += 1
                if self.memory_dropped == 1 or self.memory_dropped % 1000 == 0:
                    log.error("event memory full too: dropped the oldest unsent event (%d so far)", self.memory_dropped)

    def _disk_failed(self, error: SpoolError) -> None:
        if self._write_error is None:  # once per outage, not once per event
            self._write_error = str(error)
            log.error("%s; keeping events in memory (up to %d) until it can be written", error, self.memory_events)

    def after(self, cursor: tuple[int, int], limit: int) -> list[tuple[Key, str]]:
        """Up to `limit` events past `cursor` (last rowid, last memory number), oldest first.

        Spooled events always come first: while memory holds any event, every spooled one is
        older (new events follow into memory until it has drained)."""
        try:
            rows = self.spool.after(cursor[0], limit)
        except SpoolError as e:
            log.error("%s", e)
            rows = []
        out: list[tuple[Key, str]] = [((0, rowid), payload) for rowid, payload in rows]
        if len(out) == limit:
            return out
        with self._lock:
            for n, payload in self._memory.items():
                if len(out) >= limit:
                    break
                if n > cursor[1]:
                    out.append(((1, n), payload))
        return out

    def ack(self, keys: Iterable[Key]) -> None:
        """The broker has these: forget them."""
        rowids = []
        with self._lock:
            for tier, n in keys:
                if tier == 0:
                    rowids.append(n)
                else:
                    self._memory.pop(n, None)
            rowids = self._undeleted + rowids
            self._undeleted = []
        self._delete(rowids)

    def has_undeleted(self) -> bool:
        return bool(self._undeleted)

    def retry_deletes(self) -> None:
        if self._undeleted and time.monotonic() - self._last_delete_try >= RETRY_DELETE_S:
            with self._lock:
                rowids, self._undeleted = self._undeleted, []
            self._delete(rowids)

    def _delete(self, rowids: list[int]) -> None:
        if not rowids:
            return
        self._last_delete_try = time.monotonic()
        try:
            self.spool.delete(rowids)
        except SpoolError as e:
            # Sent and acknowledged, but still on disk: kept out of this connection's sends by the
            # cursor; after a reconnect they may go out again (consumers dedupe on the event id).
            with self._lock:
                self._undeleted = rowids + self._undeleted
                first = self._delete_error is None
                self._delete_error = self._delete_error or str(e)
            if first:
                log.error("%s; acknowledged events stay on disk until it can be written", e)
        else:
            if self._delete_error is not None:
                log.warning("event spool deletes work again; acknowledged events removed from disk")
                self._delete_error = None

    def close(self) -> None:
        with self._lock:
            memory, self._memory = list(self._memory.values()), OrderedDict()
        for i, payload in enumerate(memory):  # the disk may take them now; they are the newest
            try:
                self.spool.append(payload)
            except SpoolError:
                log.error("%d event(s) held in memory (the disk refused them) are lost at exit", len(memory) - i)
                self.memory_dropped += len(memory) - i
                break
        self.spool.close()


def advance(cursor: tuple[int, int], key: Key) -> tuple[int, int]:
    """The cursor after handing on the event `key`."""
    return (key[1], cursor[1]) if key[0] == 0 else (cursor[0], key[1])
