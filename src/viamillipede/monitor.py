"""Watching a running session: reports on a signal, a progress line, the JSON summary.

Part of the statistics role; separate from stats.py because these parts need a clock, the
terminal and signals, while the counters and snapshots do not.  Everything goes to stderr or
to a named file -- stdout carries the payload only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import anyio

from .stats import Report

log = logging.getLogger("viamillipede")

STATS_SCHEMA_VERSION = 1


class Reporting(Protocol):
    def report(self) -> Report: ...

    def abort(self, reason: str = "interrupted") -> None: ...


class RateMeter:
    """Current rate: bytes over the time since the previous reading (at least 0.5 s)."""

    def __init__(self) -> None:
        self._t = time.monotonic()
        self._bytes = 0
        self.rate: float | None = None

    def update(self, nbytes: int) -> float | None:
        now = time.monotonic()
        if now - self._t >= 0.5:
            self.rate = (nbytes - self._bytes) / (now - self._t)
            self._t, self._bytes = now, nbytes
        return self.rate


def verbosity_level(verbose: int) -> int:
    """0 errors only; 1 warnings, reconnects and the summary; 2 connection events; 3+ debug."""
    return {0: logging.ERROR, 1: NOTE, 2: logging.INFO}.get(verbose, logging.DEBUG)


NOTE = 25
logging.addLevelName(NOTE, "NOTE")


class Reminder:
    """When to say, at the default verbosity, that a session is still waiting for its peer.

    A user must be able to tell a typo from a slow start without a line per attempt: the first
    notice comes ``first`` seconds into a wait, the next ones at doubling intervals (elapsed
    2, 4, 8, 16 ... s) up to ``longest`` apart.  A wait is named by when it began; a new
    beginning starts the schedule over.  Pure: the caller owns the clock.
    """

    __slots__ = ("_first", "_longest", "_next", "_since")

    def __init__(self, first: float = 2.0, longest: float = 300.0) -> None:
        self._first = first
        self._longest = longest
        self._since: float | None = None
        self._next = 0.0

    def due(self, since: float) -> float:
        """When the next notice about the wait that began at ``since`` is due."""
        if since != self._since:
            self._since = since
            self._next = since + self._first
        return self._next

    def told(self) -> None:
        """The notice that was due has been given."""
        assert self._since is not None
        self._next += min(self._next - self._since, self._longest)


#: The signal that stopped this process's session, once one has (SIGINT or SIGTERM).
interrupted_by: str | None = None


async def watch_signals(
    session: Reporting, verbose: int, meter: RateMeter, stderr: IO[str] | None = None
) -> None:
    """SIGUSR1 (and SIGINFO where it exists): print a report.  SIGUSR2: next verbosity level,
    wrapping to 0 after 3.  SIGINT/SIGTERM: stop cleanly, telling the peer."""
    out = stderr or sys.stderr
    wanted = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM]
    info = getattr(signal, "SIGINFO", None)
    if info is not None:  # pragma: no cover - BSD and macOS only
        wanted.append(info)
    with anyio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum in (signal.SIGINT, signal.SIGTERM):
                global interrupted_by
                name = interrupted_by = signal.Signals(signum).name
                log.error("%s: stopping and telling the peer", name)
                session.abort(f"interrupted by {name}")
            elif signum == signal.SIGUSR2:
                verbose = (verbose + 1) % 4
                log.setLevel(verbosity_level(verbose))
                out.write(f"viamillipede: verbosity now {verbose}\n")
            else:
                report = session.report()
                # On a terminal, first wipe a --progress line the report would run into.
                clear = "\r\x1b[K" if out.isatty() else ""
                out.write(clear + report.render(meter.update(report.totals.nbytes)) + "\n")
            out.flush()


def known_size(fd: int) -> int | None:
    """Bytes left to read from ``fd`` when it is a regular file, else None."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    except OSError:
        return None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(nbytes: int, elapsed: float, rate: float | None, size: int | None) -> str:
    line = f"{nbytes / 1e6:10.1f} MB  {((rate or 0) / 1e6):7.1f} MB/s  {_clock(elapsed)}"
    if size:
        pct = min(100.0, 100.0 * nbytes / size)
        eta = max(size - nbytes, 0) / rate if rate and rate > 0 else math.inf
        line += f"  {pct:5.1f}%  ETA {_clock(eta) if eta != math.inf else '?:??:??'}"
    return line


async def show_progress(
    report: Callable[[], Report],
    size: int | None,
    meter: RateMeter,
    stderr: IO[str] | None = None,
) -> None:
    """Like pv: one self-rewriting line on a terminal; a plain line every 10 s otherwise."""
    out = stderr or sys.stderr
    tty = out.isatty()
    try:
        while True:
            await anyio.sleep(0.5 if tty else 10.0)
            totals = report().totals
            line = progress_line(totals.nbytes, totals.elapsed, meter.update(totals.nbytes), size)
            out.write(f"\r{line}\x1b[K" if tty else line + "\n")
            out.flush()
    finally:
        if tty:
            out.write("\n")
            out.flush()


def write_stats_json(
    path: str,
    report: Report | None,
    *,
    exit_code: int,
    error: str | None,
    chaos: dict[str, Any] | None,
) -> None:
    """The machine-readable summary; its schema is docs/stats.schema.json."""
    doc: dict[str, Any] = {
        "schema": STATS_SCHEMA_VERSION,
        "exit_code": exit_code,
        "error": error,
        "report": report.to_dict() if report is not None else None,
        "chaos": chaos,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
