"""Logging for the daemon and the CLI: one format, journald priorities, native libraries kept quiet.

Under systemd, stderr is a stream into the journal, which gives every line the unit's default
priority (info) unless the line starts with a syslog-style `<N>` prefix (`SyslogLevelPrefix=`,
on by default). Without the prefix `journalctl -p warning` would show nothing at all, so each
line of a record carries its level's prefix when stderr is the journal stream.

Native libraries write to fd 2 behind Python's back: the TFLite runtime announces
`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.` (from C++, no environment variable
silences it in ai-edge-litert 2.x) and OpenCV/FFmpeg log their own warnings. Those are kept out
of the log unless log_level is DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO

# syslog(3) priorities, which journald reads from a `<N>` line prefix.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# FFmpeg's av_log level "fatal", read by OpenCV from $OPENCV_FFMPEG_LOGLEVEL when it first opens a
# video; unset, OpenCV shows FFmpeg's errors.
_FFMPEG_FATAL = 8


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level; levels between the named ones round down in severity."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record (a traceback included) with its `<N>` priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> bool:
    """True when stderr is the journal stream systemd connected (sd_journal_stream_fd's check).

    $JOURNAL_STREAM alone is not enough: a child whose stderr was redirected inherits the variable.
    """
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    stream = sys.stderr if stream is None else stream
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(level: str) -> None:
    """Configure the root logger on stderr at `level` (DEBUG, INFO, WARNING or ERROR)."""
    journal = stderr_is_journal()
    # The journal stamps each line itself; elsewhere a timestamp helps.
    fmt = "%(levelname)s %(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(fmt) if journal else logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    quiet_native_libraries(debug=level == "DEBUG")


def quiet_native_libraries(debug: bool) -> None:
    """OpenCV's own logging: errors only, everything when debugging; FFmpeg's: silent unless
    debugging (the daemon reports a source it cannot read itself, naming it).

    An operator's explicit OPENCV_LOG_LEVEL / OPENCV_FFMPEG_LOGLEVEL wins.
    """
    if not debug:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", str(_FFMPEG_FATAL))
    if "OPENCV_LOG_LEVEL" in os.environ:
        return
    try:
        import cv2
    except ImportError:
        return
    levels = cv2.utils.logging
    levels.setLogLevel(levels.LOG_LEVEL_DEBUG if debug else levels.LOG_LEVEL_ERROR)


@contextmanager
def native_stderr_to_log(logger: logging.Logger, what: str) -> Iterator[None]:
    """Inside the block, whatever native code writes to fd 2 is caught and re-logged through
    `logger` once the block ends: lines starting with `INFO:` at DEBUG, anything else at WARNING,
    so a real error from the library stays visible. Meant for a short single-threaded step (loading
    a model): other threads' stderr output during the block is caught too, and re-logged."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a test's capture): nothing to catch
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode("utf-8", errors="replace")
            for line in text.splitlines():
                if line.strip():
                    logger.log(logging.DEBUG if line.startswith("INFO:") else logging.WARNING, "%s: %s", what, line)
