"""The sending end's session logic, without I/O.

Everything a receiver (or anything that answers on its port) sends back is judged here, against
the state the session is in: which ACK is believable, which is useless, when BYE is due, when a
BYE_OK or a WELCOME saying "session over" means success.  The async driver in
``transmitter.py`` reads frames, moves chunk bytes and sleeps; it asks this core what each frame
means and what each connection should do next, and does what it answers.  Kept pure (no async,
no clock of its own: callers pass ``now``) so that a state-machine test can throw any frame at
any moment at it, as a hostile receiver would.

**Who sends what is decided in one place**: the "dispatch" section of :class:`Dispatcher`.
:meth:`Dispatcher.step` tells a connection that asks what to do (BYE first, then its share of
the window, re-sends before fresh chunks), and :meth:`Dispatcher._wake` picks which idle
connections are asked next (best target rank first).  The driver never chooses; it only wakes
the connections it is told to wake.

The policy, in words.  Which connection sends a chunk follows the target preference order: an
idle connection to an earlier target is always woken first, and a connection counts as busy
while it has its share of the window in flight.  So a slow source uses the first link only, and
a fast one spills over to the next links.  On a path so fast that chunks are acknowledged within
``FILL_BELOW_RTT`` (longer for a window of more than ``FILL_WINDOW_BYTES``), a connection's
share is the whole window: it takes chunks for as long as it keeps up, and the others get only
what it cannot take (spreading chunks there only makes the transmitter do the receiving
kernel's work for every connection the receiver is not reading).  This is why chunks are not
handed out through a plain memory channel: a channel serves whichever receiver waited longest,
and cannot put re-sent chunks ahead of fresh ones.

What a receiver can get wrong, and what follows (:class:`RemoteProtocolError` means: drop that
connection, reconnect with backoff; the session's idle timeout ends a receiver that keeps it up):

* an ACK of a chunk never sent, or saying more chunks are written than were sent: violation;
* more than ``4 * window + 64`` ACKs in a row on one connection that tell nothing new: violation
  (each costs O(1) to read; a real receiver repeats itself only for duplicate chunks);
* a WELCOME saying more chunks are written than were sent: violation;
* a BYE_OK before any BYE was sent: violation; after one, with other totals than ours:
  :class:`~viamillipede.errors.TruncatedStream` (the session fails);
* a WELCOME ``SESSION_OVER`` that cannot be true (stream not ended, chunks unacknowledged, no
  BYE sent, another chunk count): :class:`~viamillipede.errors.TruncatedStream`.

Progress, for the session's idle timeout, is the receiver's ``written`` advancing, or nothing
being outstanding: every chunk read so far written, no BYE unanswered (waiting on a slow source
is not the receiver's fault).  An ACK of a chunk is not progress by itself: a receiver that
acknowledges chunks but never writes them holds the window full, and times out.  Handshakes are not
progress: a receiver that accepts connections and never acknowledges anything times out.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Generic, TypeAlias, TypeVar

from .errors import TruncatedStream
from .options import HANDSHAKE_TIMEOUT
from .window import SendWindow
from .wire import RemoteProtocolError

T = TypeVar("T")

#: While chunks are acknowledged faster than this (smoothed), the path is fast enough that
#: spreading chunks over connections buys nothing: one connection takes chunks for as long as
#: it keeps up, and the others only get what it cannot take.  A path whose flows are limited
#: (a 2 MiB chunk takes 100 ms at 20 MB/s) stays far above it and keeps every connection to its
#: share of the window.
FILL_BELOW_RTT = 0.010
#: ...per this many bytes of window: a larger window (more threads, bigger chunks) takes
#: longer to drain even on loopback, where the ACK of a chunk waits for those ahead of it.
FILL_WINDOW_BYTES = 16 << 20

#: First and longest pause between attempts to (re)connect one connection.
BACKOFF_START = 0.1
BACKOFF_CAP = 10.0

#: Useless ACKs (nothing released, ``written`` not advanced) tolerated in a row on one
#: connection, beyond four per chunk of the window.
USELESS_ACK_SLACK = 64

#: What waiting connections to wake: connection numbers, best first.
Wakes: TypeAlias = Sequence[int]
_NO_WAKES: tuple[int, ...] = ()

#: What an acknowledgement freed: the released items and the connections to wake.
Released: TypeAlias = tuple[list[T], Wakes]


class ByeState(Enum):
    """Where the end-of-stream handshake is."""

    NONE = "none"  # the stream has not ended, or chunks are unacknowledged
    PENDING = "pending"  # everything is acknowledged: the next free connection sends BYE
    SENT = "sent"  # BYE is out on one connection, waiting for BYE_OK
    CONFIRMED = "confirmed"  # BYE_OK (or SESSION_OVER) with our totals: the session succeeded


class Step(Enum):
    """What a connection does next, as :meth:`Dispatcher.step` tells it."""

    SEND_BYE = "send-bye"
    SEND_CHUNK = "send-chunk"
    BUSY = "busy"  # it holds its share of the window in flight: wait for an ACK
    IDLE = "idle"  # nothing to send: wait to be woken for a turn
    DONE = "done"  # the session succeeded


def fill_threshold(window: int, chunk_size: int, *, below: float = FILL_BELOW_RTT,
                   per_bytes: int = FILL_WINDOW_BYTES) -> float:
    """The smoothed round trip under which one connection fills the whole window."""
    return below * max(1.0, window * chunk_size / per_bytes)


class Backoff:
    """Pauses between attempts to (re)connect one connection.

    ``BACKOFF_START`` first, doubling up to ``BACKOFF_CAP``: a dead target is re-probed, never
    hammered.  After a connection that made progress the next attempt is quick again.
    """

    __slots__ = ("_cap", "_next", "_start")

    def __init__(self, start: float = BACKOFF_START, cap: float = BACKOFF_CAP) -> None:
        self._start = start
        self._cap = cap
        self._next = start

    def next(self) -> float:
        """The pause before the next attempt (and double the one after it)."""
        delay = self._next
        self._next = min(delay * 2, self._cap)
        return delay

    def reset(self) -> None:
        """The connection made progress: retry quickly once it breaks."""
        self._next = self._start


class Dispatcher(Generic[T]):
    """One session's sending state.  ``T`` is whatever the driver files with a chunk.

    ``ranks[i]`` is the preference of connection ``i``'s target (0 = most preferred); there are
    ``len(ranks)`` connections.  Every method that can make work for a waiting connection
    returns the connections to wake.
    """

    def __init__(self, window: int, ranks: Sequence[int], *,
                 fill_below: float = FILL_BELOW_RTT) -> None:
        if not ranks:
            raise ValueError("at least one connection")
        self.window: SendWindow[T] = SendWindow(window)
        self.connections = len(ranks)
        self._ranks = list(ranks)
        #: Connections in order of preference: the order idle ones are woken in.
        self._order = sorted(range(len(ranks)), key=lambda c: (ranks[c], c))
        self._per_conn = max(2, window // len(ranks))
        self._fill_below = fill_below
        self._idle: dict[int, int] = {}  # conn -> rank: waiting to be woken for a turn
        self._running: dict[int, int] = {}  # conn -> rank: took a chunk and will take more
        self._woken: set[int] = set()  # woken for a turn and not yet back to ask
        self._useless = [0] * len(ranks)  # useless ACKs in a row, by conn
        self._sending_since = [-1.0] * len(ranks)  # when its current send began, by conn
        self._max_useless = 4 * window + USELESS_ACK_SLACK
        self.eof = False
        self.nbytes = 0
        self.bye = ByeState.NONE
        self.bye_sent = False  # BYE went out at least once
        self._bye_conn = -1
        self._bye_sent_at = 0.0
        self.progress_at = 0.0

    # -- the source ----------------------------------------------------------------------

    def can_add(self, ahead: int = 0) -> bool:
        return self.window.can_add(ahead)

    def add(self, item: T, length: int, now: float) -> Wakes:
        """A chunk of ``length`` bytes was read (its sequence is ``window.next_seq``)."""
        if not self.outstanding():
            self.progress_at = now  # the receiver owes us something from now on
        self.window.add(item)
        self.nbytes += length
        return self._wake_for_chunk()

    def end_of_stream(self, now: float) -> Wakes:
        if not self.outstanding():
            self.progress_at = now
        self.eof = True
        return self._maybe_bye()

    def totals(self) -> tuple[int, int]:
        """(chunks, bytes) of the stream so far: what BYE announces once it has ended."""
        return self.window.next_seq, self.nbytes

    # -- dispatch: who sends what ---------------------------------------------------------

    def filling(self) -> bool:
        """Is the path so fast that one connection should take the whole window?"""
        srtt = self.window.srtt
        return srtt is not None and srtt < self._fill_below

    def step(self, conn: int, now: float) -> tuple[Step, tuple[int, T] | None, Wakes]:
        """What ``conn`` (connected, at a frame boundary) does next; with SEND_CHUNK, the
        chunk (seq, item), now in flight on it."""
        self._woken.discard(conn)
        self._idle.pop(conn, None)
        self._sending_since[conn] = -1.0  # asking again: its last send is over
        if self.bye is ByeState.CONFIRMED:
            return Step.DONE, None, _NO_WAKES
        if self.bye is ByeState.PENDING:
            self.bye = ByeState.SENT
            self.bye_sent = True
            self._bye_conn = conn
            self._bye_sent_at = now
            self._sending_since[conn] = now
            return Step.SEND_BYE, None, _NO_WAKES
        sw = self.window
        share = sw.window if self.filling() else self._per_conn
        if sw.inflight(conn) >= share:
            wakes: Wakes = _NO_WAKES
            if self._running.pop(conn, None) is not None and sw.has_work():
                wakes = self._wake(1)  # it took what it may: the rest goes elsewhere
            return Step.BUSY, None, wakes
        taken = sw.take(conn, now)
        if taken is None:
            self._running.pop(conn, None)
            self._idle[conn] = self._ranks[conn]
            return Step.IDLE, None, _NO_WAKES
        self._running[conn] = self._ranks[conn]
        self._sending_since[conn] = now
        return Step.SEND_CHUNK, taken, _NO_WAKES

    def _wake_for_chunk(self) -> Wakes:
        """Wake an idle connection for a new chunk, unless (on a fast path) a running one of
        no worse rank will take it."""
        if self.filling() and self._running:
            best = self._best_idle()
            if best is None or self._ranks[best] >= min(self._running.values()):
                return _NO_WAKES
        woken = self._wake(1)
        for conn in woken:
            # Running from now on, not once it gets to run: a second chunk added before
            # then must wait for it too, not wake the next idle connection (which would
            # hand the other connections a good part of the chunks on a fast path).
            self._running[conn] = self._ranks[conn]
        return woken

    def _best_idle(self) -> int | None:
        idle = self._idle
        return next((c for c in self._order if c in idle), None)

    def _wake(self, n: int) -> Wakes:
        """Take the ``n`` best idle connections off the idle list; the caller wakes them."""
        idle = self._idle
        if n <= 0 or not idle:
            return _NO_WAKES
        woken: list[int] = []
        for conn in self._order:
            if conn in idle:
                del idle[conn]
                self._woken.add(conn)
                woken.append(conn)
                if len(woken) == n:
                    break
        return woken

    def _maybe_bye(self) -> Wakes:
        if self.eof and self.bye is ByeState.NONE and self.window.all_acked():
            self.bye = ByeState.PENDING
            return self._wake(1)
        return _NO_WAKES

    # -- what the receiver says ----------------------------------------------------------

    def on_welcome(self, conn: int, written: int, now: float) -> Released[T]:
        """Connection ``conn`` was accepted; the receiver has ``written`` chunks.

        Not progress for the idle timeout (a receiver that only accepts must time out), though
        what it reports as written is released."""
        sw = self.window
        if written > sw.sent:
            raise RemoteProtocolError(
                f"WELCOME says {written} chunks are written; only {sw.sent} were sent")
        self._useless[conn] = 0
        released: list[T] = []
        sw.advance(written, released)
        return released, self._maybe_bye()

    def on_ack(self, conn: int, seq: int, written: int, now: float) -> Released[T] | None:
        """An ACK arrived on ``conn``.  Returns what it released and whom to wake, or None if
        it was useless (told nothing new): that costs O(1) and changes no state but a count.
        Raises RemoteProtocolError for an ACK no receiver sends."""
        sw = self.window
        sent = sw.sent
        if seq >= sent:
            raise RemoteProtocolError(f"ACK of chunk {seq}, which was never sent ({sent} sent)")
        if written > sent:
            raise RemoteProtocolError(
                f"ACK says {written} chunks are written; only {sent} were sent")
        before = sw.written
        released = sw.on_ack(conn, seq, written, now)
        if released is None:
            useless = self._useless[conn] + 1
            if useless > self._max_useless:
                raise RemoteProtocolError(f"{useless} ACKs in a row acknowledged nothing new")
            self._useless[conn] = useless
            return None
        self._useless[conn] = 0
        if sw.written > before:
            self.progress_at = now
        return released, self._maybe_bye()

    def on_bye_ok(self, conn: int, chunks: int, nbytes: int) -> None:
        """BYE_OK arrived on ``conn``: the session succeeded if it answers our BYE."""
        if not self.bye_sent:
            raise RemoteProtocolError("BYE_OK before any BYE was sent")
        expected_chunks, expected_bytes = self.totals()
        if (chunks, nbytes) != (expected_chunks, expected_bytes):
            raise TruncatedStream(
                f"the receiver confirmed {nbytes} bytes in {chunks} chunks, we sent "
                f"{expected_bytes} in {expected_chunks}")
        self.bye = ByeState.CONFIRMED
        # Every chunk is written, whatever the ACKs lost with their connections said.
        self.window.advance(chunks, [])

    def session_over_ok(self, written: int) -> bool:
        """Can a WELCOME saying our session is over, with ``written`` chunks, be true?

        Only after the stream ended, every chunk was acknowledged and BYE went out (its
        BYE_OK was lost with its connection), and with exactly our chunk count."""
        sw = self.window
        return (self.eof and sw.all_acked() and self.bye_sent
                and written == sw.next_seq == sw.sent)

    def on_session_over(self, written: int) -> None:
        """A WELCOME says our session is over: success if it can be true, else a truncated
        stream (the receiver stopped at ``written`` chunks)."""
        if not self.session_over_ok(written):
            raise TruncatedStream(
                f"the receiver ended the session after {written} chunks "
                f"of {self.window.next_seq}")
        self.bye = ByeState.CONFIRMED
        self.window.advance(written, [])

    # -- connections ---------------------------------------------------------------------

    def connection_lost(self, conn: int) -> Wakes:
        """``conn`` is gone: its chunks, its BYE and its turn go to the others."""
        sw = self.window
        turns = sw.connection_lost(conn)  # one per chunk it had in flight
        self._idle.pop(conn, None)
        was_running = self._running.pop(conn, None) is not None
        self._useless[conn] = 0
        self._sending_since[conn] = -1.0
        if conn in self._woken:
            self._woken.discard(conn)
            turns += 1  # it was woken for a turn it will not take
        if self.bye is ByeState.SENT and self._bye_conn == conn:
            self.bye = ByeState.PENDING
            turns += 1
        if was_running and not turns and sw.has_work():
            turns = 1  # on a fast path the queued chunks were waiting for it
        return self._wake(turns)

    def stall(self, conn: int, now: float) -> tuple[float, float]:
        """(how long ``conn`` has held something unanswered, how long it may): chunks
        without a useful ACK, the BYE it carries without BYE_OK, or a send that does not
        finish (its chunk may have been acknowledged by way of another connection)."""
        sw = self.window
        stalled = sw.stalled_for(conn, now)
        if self.bye is ByeState.SENT and self._bye_conn == conn:
            stalled = max(stalled, now - self._bye_sent_at)
        since = self._sending_since[conn]
        if since >= 0:
            stalled = max(stalled, now - since)
        return stalled, sw.stall_timeout()

    def handshake_limit(self) -> float:
        """How long to wait for the WELCOME: once the path is measured, no longer than a
        stall (a receiver that completed the session lingers only so long for us)."""
        if self.window.srtt is None:
            return HANDSHAKE_TIMEOUT
        return min(HANDSHAKE_TIMEOUT, self.window.stall_timeout())

    # -- progress ------------------------------------------------------------------------

    def outstanding(self) -> bool:
        """Does the receiver owe us something: an ACK, the ``written`` of chunks it
        acknowledged (a full window waits for it), or a BYE_OK?"""
        sw = self.window
        return sw.written < sw.next_seq or self.bye in (ByeState.PENDING, ByeState.SENT)

    def idle_for(self, now: float) -> float:
        """Seconds without progress from the receiver (0 while it owes nothing)."""
        return now - self.progress_at if self.outstanding() else 0.0

    # -- for tests and reports -----------------------------------------------------------

    def idle(self) -> set[int]:
        """The connections waiting to be woken."""
        return set(self._idle)

    def running(self) -> set[int]:
        return set(self._running)
