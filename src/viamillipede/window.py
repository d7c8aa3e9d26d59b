"""The bookkeeping of a session, without I/O: what is sent where, what is acknowledged, what
must be sent again, and what may be written next.

Kept pure (no async, no clock of its own: callers pass ``now``) so that every interleaving of
sends, arrivals, duplicates, losses and reconnects can be explored by a state-machine test,
and so the async tasks in transmitter.py and receiver.py stay thin.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")

#: Bounds of the adaptive stall timeout, in seconds.
MIN_STALL = 2.0
MAX_STALL = 30.0


class SendWindow(Generic[T]):
    """The transmitter's side: chunks from reading until acknowledgement.

    A chunk is *unacked* from :meth:`add` until an ACK names it or the receiver's ``written``
    passes it.  While unacked it is either queued (fresh, or re-queued after a loss) or in
    flight on exactly one connection.  :meth:`connection_lost` puts a connection's in-flight
    chunks back at the front of the queue, lowest sequence first, because the receiver's
    writer is waiting on the lowest one.

    Fresh chunks are taken in sequence order, so the chunks sent at least once are exactly
    those below :attr:`sent`; nothing at or above it can have been acknowledged.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.next_seq = 0  # chunks added
        self.sent = 0  # chunks sent at least once: the fresh queue is sent .. next_seq - 1
        self.written = 0
        self.unacked: dict[int, T] = {}
        self._retry: deque[int] = deque()
        self._inflight: dict[int, dict[int, float]] = {}  # conn -> {seq: sent at}
        self._last_progress: dict[int, float] = {}
        self.srtt: float | None = None
        self.retransmits = 0

    # -- reading -------------------------------------------------------------------------

    def can_add(self, ahead: int = 0) -> bool:
        """May another chunk be read (with ``ahead`` read and not added yet)?  Not past
        ``written + window``: that is back-pressure."""
        return self.next_seq + ahead < self.written + self.window

    def add(self, item: T) -> int:
        if not self.can_add():
            raise RuntimeError("window full")
        seq = self.next_seq
        self.next_seq += 1
        self.unacked[seq] = item
        return seq

    # -- sending -------------------------------------------------------------------------

    def has_work(self) -> bool:
        self._drop_acked_retries()
        return bool(self._retry) or self.sent < self.next_seq

    def _drop_acked_retries(self) -> None:
        while self._retry and self._retry[0] not in self.unacked:
            self._retry.popleft()

    def take(self, conn: int, now: float) -> tuple[int, T] | None:
        """The next chunk for ``conn`` to send (re-sends first), now in flight on it."""
        self._drop_acked_retries()
        if self._retry:
            seq = self._retry.popleft()
        elif self.sent < self.next_seq:
            seq = self.sent
            self.sent += 1
        else:
            return None
        flight = self._inflight.get(conn)
        if flight is None:
            flight = self._inflight[conn] = {}
        if not flight:
            self._last_progress[conn] = now
        flight[seq] = now
        return seq, self.unacked[seq]

    def accounted(self) -> list[int]:
        """Where every unacked chunk is: one entry per queue place or flight it occupies.

        Each unacked sequence must appear exactly once (queued or in flight on one
        connection); tests check that.  Re-queued entries already acknowledged are left out
        (they are dropped lazily, when they reach the front)."""
        seqs = [s for s in self._retry if s in self.unacked]
        seqs.extend(range(self.sent, self.next_seq))
        for flight in self._inflight.values():
            seqs.extend(flight)
        return seqs

    def inflight(self, conn: int) -> int:
        return len(self._inflight.get(conn, ()))

    def sizes(self) -> tuple[int, int, int, int]:
        """Sizes of the internal structures (unacked, queued again, in flight, clocks)."""
        flights = sum(len(f) for f in self._inflight.values())
        return len(self.unacked), len(self._retry), flights, len(self._last_progress)

    # -- acknowledgements ----------------------------------------------------------------

    def on_ack(self, conn: int, seq: int, written: int, now: float) -> list[T] | None:
        """Apply an ACK that arrived on ``conn``; return the items it released, or None if it
        told nothing new (no chunk released, ``written`` not advanced).

        A useless ACK costs O(1) and changes nothing, not even the connection's stall clock.
        ``written`` is capped at :attr:`sent` (a caller that cares rejects more first).
        """
        item = self.unacked.pop(seq, None)
        if item is None and written <= self.written:
            return None
        released: list[T] = []
        if item is not None:
            released.append(item)
            flight = self._inflight.get(conn)
            sent_at = flight.pop(seq, None) if flight is not None else None
            if sent_at is None:
                self._forget(seq)  # it was in flight elsewhere (or only queued again)
            else:
                sample = now - sent_at
                self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        if written > self.written:
            self.advance(written, released)
        self._last_progress[conn] = now
        return released

    def advance(self, written: int, released: list[T]) -> None:
        """The receiver has ``written`` chunks: release those below it into ``released``.

        At most a window of sequences is visited: the unacked ones all lie in
        ``[written, next_seq)``, and ``written`` is capped at :attr:`sent`."""
        written = min(written, self.sent)
        unacked = self.unacked
        for s in range(self.written, written):
            item = unacked.pop(s, None)
            if item is not None:
                released.append(item)
                self._forget(s)
        self.written = max(self.written, written)

    def _forget(self, seq: int) -> None:
        """Take an acknowledged ``seq`` out of whichever flight holds it."""
        for flight in self._inflight.values():
            if flight.pop(seq, None) is not None:
                return

    def connection_lost(self, conn: int) -> int:
        """Re-queue what ``conn`` had in flight; return how many chunks that was."""
        flight = self._inflight.pop(conn, {})
        self._last_progress.pop(conn, None)
        lost = sorted(s for s in flight if s in self.unacked)
        self._retry.extendleft(reversed(lost))
        self.retransmits += len(lost)
        return len(lost)

    # -- stalls --------------------------------------------------------------------------

    def stall_timeout(self) -> float:
        """How long a connection may hold chunks without any acknowledgement.

        Eight smoothed chunk round trips (send to ACK, so it includes the time to push a chunk
        through the link), bounded to [2 s, 30 s]: fast links notice a black hole quickly,
        slow links are not abandoned for being slow.
        """
        if self.srtt is None:
            return MAX_STALL / 2
        return min(max(8 * self.srtt, MIN_STALL), MAX_STALL)

    def stalled_for(self, conn: int, now: float) -> float:
        """Seconds ``conn`` has held chunks without a useful ACK (0 if it holds none)."""
        if not self._inflight.get(conn):
            return 0.0
        return now - self._last_progress.get(conn, now)

    # -- the end -------------------------------------------------------------------------

    def all_acked(self) -> bool:
        return not self.unacked


class Offer(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    BEYOND_WINDOW = "beyond-window"


class ReorderBuffer(Generic[T]):
    """The receiver's side: chunks that arrived out of order wait here for their turn."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.written = 0
        self._held: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, seq: int, item: T) -> Offer:
        if seq < self.written or seq in self._held:
            return Offer.DUPLICATE
        if seq >= self.written + self.window:
            return Offer.BEYOND_WINDOW
        self._held[seq] = item
        return Offer.ACCEPTED

    def holds(self, seq: int) -> bool:
        return seq in self._held

    def holds_from(self, seq: int) -> bool:
        """Is any chunk at or after ``seq`` waiting here?"""
        return any(s >= seq for s in self._held)

    def ready(self) -> T | None:
        """The chunk to write next, if it has arrived (it stays held until :meth:`advance`)."""
        return self._held.get(self.written)

    def advance(self) -> T:
        """Mark the next chunk written and give it back (so its buffer can be reused)."""
        item = self._held.pop(self.written)
        self.written += 1
        return item

    def skip(self) -> None:
        """Mark the next chunk written that never waited here (it went to the sink directly)."""
        assert self.written not in self._held
        self.written += 1

    def missing(self, upto: int) -> list[int]:
        """Sequences below ``upto`` that are neither written nor held."""
        return [s for s in range(self.written, upto) if s not in self._held]
