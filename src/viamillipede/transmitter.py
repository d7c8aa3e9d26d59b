"""The sending end of a session.

One reader task fills chunk buffers from the source; ``threads`` connection tasks take chunks
and send them; each connection's ACK reader releases chunks the receiver has confirmed.  The
bookkeeping (what is unacked, what is in flight where, what must be sent again) lives in the
pure :class:`~viamillipede.window.SendWindow`; this module adds the tasks, the waiting and the
buffers.

Which connection sends a chunk follows the target preference order: an idle connection to an
earlier target is always woken first, and a connection counts as busy while it has its share
of the window in flight.  So a slow source uses the first link only, and a fast one spills
over to the next links.  On a path so fast that chunks are acknowledged within
``FILL_BELOW_RTT`` (longer for a window of more than ``FILL_WINDOW_BYTES``), a connection's
share is the whole window: it takes chunks for as long as it keeps up, and the others get only
what it cannot take.  This dispatch is why chunks are not handed out through a plain memory
channel: a channel serves whichever receiver waited longest, and cannot put re-sent chunks
ahead of fresh ones.

A connection that breaks, or holds chunks without any acknowledgement for longer than the
adaptive stall timeout, is abandoned: its chunks go back to the front of the queue, and it
reconnects with capped exponential backoff (so a dead target is re-probed, never hammered).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc

from . import checksums
from .errors import (
    Interrupted,
    LinkBroken,
    PeerRejected,
    PeerTimeout,
    ProtocolViolation,
    RemoteFailure,
    TruncatedStream,
    ViamillipedeError,
)
from .framing import STREAM_ERRORS, BufferPool, FrameReader, Notifier, first_error
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    default_window,
    encode_checkphrase,
)
from .stats import Counters, LinkCounters, Report, TransferStats, link_stats, target_stats
from .transport import ConnectFailed
from .window import SendWindow
from .wire import (
    DATA_HEADER_SIZE,
    Ack,
    Bye,
    ByeOk,
    ConnectionClosed,
    Decoder,
    Error,
    ErrorCode,
    Fin,
    Hello,
    ProtocolError,
    Welcome,
    WelcomeStatus,
    encode,
    pack_data_header,
)

log = logging.getLogger("viamillipede.tx")


class Source(Protocol):
    """Where the stream comes from: ``readinto`` returns 0 at end of stream."""

    async def readinto(self, view: memoryview) -> int: ...


class RegionSource(Protocol):
    """A source that is a file the kernel can send from (see ``FdSource``): chunks are regions
    of it, sent with ``SocketStream.send_file`` and re-read if they must be sent again."""

    file_fd: int | None

    def claim(self, size: int) -> tuple[int, int]: ...

    async def pread(
        self, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
    ) -> int: ...


#: Opens connection number ``index`` (0-based); raises ConnectFailed if it cannot.
Connector = Callable[[int], Awaitable[anyio.abc.ByteStream]]


class _Chunk:
    """A chunk in the window: its frame in a pooled ``buf``, or (``offset`` >= 0) only its
    header in ``buf`` and the payload in the source file at ``offset``."""

    __slots__ = ("acked", "buf", "length", "offset", "sending")

    def __init__(self, buf: bytearray, length: int, offset: int = -1) -> None:
        self.buf = buf
        self.length = length
        self.offset = offset
        self.sending = 0  # sends of this buffer in progress: it is not reused before 0
        self.acked = False

    def frame(self) -> memoryview:
        return memoryview(self.buf)[: DATA_HEADER_SIZE + self.length]

    def header(self) -> memoryview:
        return memoryview(self.buf)[:DATA_HEADER_SIZE]


class _SessionOver(Exception):
    """The receiver already completed our session when this connection arrived."""


class _Turns:
    """Idle connections waiting for something to send, woken best target rank first."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[int, anyio.Event]] = {}

    async def wait(self, conn: int, rank: int) -> None:
        event = anyio.Event()
        self._waiting[conn] = (rank, event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.wake(1)  # we were chosen but are leaving: hand the turn on
            raise
        finally:
            self._waiting.pop(conn, None)

    def wake(self, n: int) -> list[tuple[int, int]]:
        """Wake the ``n`` best idle connections; returns them as (conn, rank)."""
        best = sorted(self._waiting.items(), key=lambda item: (item[1][0], item[0]))[:n]
        for conn, (_rank, event) in best:
            del self._waiting[conn]
            event.set()
        return [(conn, rank) for conn, (rank, _event) in best]

    def best_rank(self) -> int | None:
        """The best rank among the idle connections, or None if none is idle."""
        return min((rank for rank, _ in self._waiting.values()), default=None)


#: How long a partly filled chunk waits for more input before it is sent as it is.
FLUSH_AFTER = 0.2

#: While chunks are acknowledged faster than this (smoothed), the path is fast enough that
#: spreading chunks over connections buys nothing: one connection takes chunks for as long as
#: it keeps up, and the others only get what it cannot take.  On loopback, spreading made
#: the transmitter do the receiving kernel's work for every connection the receiver was not
#: reading (1 GiB, threads 4: 1.17x -> 1.30x the C original; 1.71x once a woken connection
#: counted as running, see _wake_for_chunk); a path whose flows are limited
#: (a chunk takes 100 ms at 20 MB/s) keeps every connection to its share of the window.
FILL_BELOW_RTT = 0.010
#: ...per this many bytes of window: a larger window (more threads, bigger chunks) takes
#: longer to drain even on loopback, where the ACK of a chunk waits for those ahead of it
#: (threads 16: 64 MiB, about 20 ms).  A flow-limited path stays well above it: a 2 MiB
#: chunk alone takes 100 ms at 20 MB/s.
FILL_WINDOW_BYTES = 16 << 20

#: First and longest pause between attempts to (re)connect one connection.
BACKOFF_START = 0.1
BACKOFF_CAP = 10.0


class Transmitter:
    """Sends everything ``source`` yields over ``threads`` connections opened by ``connect``.

    ``rank(i)`` is the preference of connection ``i``'s target (0 = most preferred).
    """

    def __init__(
        self,
        source: Source,
        connect: Connector,
        *,
        threads: int = DEFAULT_THREADS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window: int | None = None,
        checksum: bool | int = False,
        checkphrase: str = DEFAULT_CHECKPHRASE,
        idle_timeout: float = DEFAULT_TIMEOUT,
        describe: Callable[[int], str] | None = None,
        target: Callable[[int], str] | None = None,
        rank: Callable[[int], int] | None = None,
        session_id: bytes | None = None,
    ) -> None:
        if not 1 <= threads <= 64:
            raise ValueError("threads must be between 1 and 64")
        self._source = source
        self._connect = connect
        self._threads = threads
        self._chunk_size = chunk_size
        self._window = window if window is not None else default_window(threads)
        self._per_conn = max(2, self._window // threads)
        self._fill_below = FILL_BELOW_RTT * max(1.0, self._window * chunk_size / FILL_WINDOW_BYTES)
        self._checkphrase_text = checkphrase
        self._checkphrase = encode_checkphrase(checkphrase)
        self._timeout = idle_timeout
        self._describe = describe or (lambda i: f"connection {i}")
        self._rank = rank or (lambda i: 0)
        self.session_id = session_id if session_id is not None else os.urandom(16)
        algorithm = checksums.DEFAULT if checksum is True else int(checksum)
        self._features = algorithm
        self._checksum_fn = checksums.ALGORITHMS[algorithm][1] if algorithm else None
        # A regular file is sent from the page cache.  With checksums each region is read
        # once, into a buffer kept until the chunk is acknowledged: hashed and re-sent from
        # that one copy, so what arrives is what was hashed even if the file changes.
        self._regions: RegionSource | None = None
        if getattr(source, "file_fd", None) is not None:
            self._regions = source  # type: ignore[assignment]  # checked just above
        # Only a checksummed file's chunks go by reference (send_pages).  From a pipe on stdin
        # it measured slower than send (1 GiB from cat, t4: 0.75-0.86 s against 0.70-0.75 s).
        self._by_reference = self._checksum_fn is not None and self._regions is not None

        self._pool = BufferPool(DATA_HEADER_SIZE + chunk_size, keep=self._window + threads)
        self._sw: SendWindow[_Chunk] = SendWindow(self._window)
        self._turns = _Turns()
        self._running: dict[int, int] = {}  # connections that took a chunk and will take more
        self._acked = Notifier()  # an ACK arrived: window or in-flight room may have opened
        self._eof = False
        self._total_bytes = 0
        self._bye_state = "none"  # none -> pending -> sent (-> pending again if its link broke)
        self._bye_conn = -1
        self._bye_sent_at = 0.0
        self._done = anyio.Event()
        self._error: ViamillipedeError | None = None
        self._last_progress = 0.0
        self._last_connect_error = ""
        self._counters = Counters("tx")
        name_target = target or (lambda i: "receiver")
        self._links = {i: LinkCounters(i, name_target(i)) for i in range(threads)}
        self._live: dict[int, anyio.abc.ByteStream] = {}  # handshaken streams, by connection
        self._mid_send: set[int] = set()  # connections whose stream is inside a frame

    # -- public --------------------------------------------------------------------------

    def statistics(self) -> TransferStats:
        snap = self._counters.snapshot()
        return dataclasses.replace(snap, retransmits=self._sw.retransmits)

    def report(self) -> Report:
        now = anyio.current_time()
        links = [link_stats(link, self._sw.inflight(i), now) for i, link in self._links.items()]
        return Report(
            totals=self.statistics(),
            window=self._window,
            window_used=self._sw.next_seq - self._sw.written,
            reorder_depth=0,
            connections=tuple(links),
            targets=target_stats(links),
        )

    def abort(self, reason: str = "interrupted") -> None:
        """Stop the session from outside (e.g. on Ctrl-C); the receiver is told why."""
        self._fail(Interrupted(reason))

    async def run(self) -> TransferStats:
        """Send the whole source; return only once the receiver confirmed every byte."""
        self._last_progress = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guard, self._read_source)
            tg.start_soon(self._guard, self._watchdog)
            for i in range(self._threads):
                tg.start_soon(self._guard, self._connection_loop, i)
            await self._done.wait()
            if self._error is not None:
                await self._tell_receiver(self._error)
            tg.cancel_scope.cancel()
        if self._error is not None:
            raise self._error
        return self.statistics()

    async def _tell_receiver(self, error: ViamillipedeError) -> None:
        """Best effort: say ERROR on every connection that sits at a frame boundary, so the
        receiver stops at once instead of waiting out its timeout."""
        if isinstance(error, (RemoteFailure, PeerRejected)):
            return  # the receiver ended it, or will not talk to us
        code = ErrorCode.ABORTED if isinstance(error, Interrupted) else ErrorCode.SOURCE_FAILED
        frame = encode(Error(int(code), str(error)))
        with anyio.move_on_after(1.0):
            for conn, stream in list(self._live.items()):
                if conn not in self._mid_send:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await stream.send(frame)

    # -- plumbing ------------------------------------------------------------------------

    def _fail(self, exc: ViamillipedeError) -> None:
        if self._error is None:
            self._error = exc
        self._done.set()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await fn(*args)
        except ViamillipedeError as exc:
            self._fail(exc)

    def _on_ack(self, conn: int, seq: int, written: int) -> None:
        now = anyio.current_time()
        self._last_progress = now
        for chunk in self._sw.on_ack(conn, seq, written, now):
            chunk.acked = True
            if chunk.sending == 0:
                self._release(chunk)
        self._acked.notify()
        self._maybe_finish()

    def _release(self, chunk: _Chunk) -> None:
        if chunk.offset < 0:
            self._pool.put(chunk.buf)

    def _maybe_finish(self) -> None:
        if self._eof and self._sw.all_acked() and self._bye_state == "none":
            self._bye_state = "pending"
            self._turns.wake(1)

    # -- source --------------------------------------------------------------------------

    def _add_chunk(self, chunk: _Chunk) -> None:
        sw = self._sw
        if sw.all_acked():
            self._last_progress = anyio.current_time()
        sw.add(chunk)
        self._counters.chunks += 1
        self._counters.nbytes += chunk.length
        self._total_bytes += chunk.length
        self._wake_for_chunk()

    def _filling(self) -> bool:
        srtt = self._sw.srtt
        return srtt is not None and srtt < self._fill_below

    def _wake_for_chunk(self) -> None:
        """Wake an idle connection for a new chunk, unless (on a fast path) a running one of
        no worse rank will take it."""
        if self._filling() and self._running:
            idle = self._turns.best_rank()
            if idle is None or idle >= min(self._running.values()):
                return
        for conn, rank in self._turns.wake(1):
            # Running from now on, not once it gets to run: a second chunk added before
            # then must wait for it too, not wake the next idle connection (that leak gave
            # the other connections 35-50% of the chunks on loopback).
            self._running[conn] = rank

    def _source_ended(self) -> None:
        self._eof = True
        log.debug("end of input after %d bytes in %d chunks", self._total_bytes,
                  self._sw.next_seq)
        self._maybe_finish()

    async def _read_source(self) -> None:
        if self._regions is not None:
            await self._claim_regions(self._regions)
            return
        size = self._chunk_size
        sw = self._sw
        while True:
            while not sw.can_add():
                await self._acked.wait()
            buf = self._pool.get()
            view = memoryview(buf)
            n = 0
            eof = False
            end = DATA_HEADER_SIZE + size
            # A trickling source (a log, a slow producer) must not wait for a whole chunk to
            # fill: once some bytes are in, a pause of FLUSH_AFTER sends what there is.  Only
            # where cancelling a read cannot lose bytes.
            patience = FLUSH_AFTER if getattr(self._source, "cancel_safe", False) else math.inf
            while n < size:
                with anyio.move_on_after(patience if n else math.inf):
                    got = await self._source.readinto(view[DATA_HEADER_SIZE + n : end])
                    if got == 0:
                        eof = True
                        break
                    n += got
                    continue
                break  # the source paused with a partial chunk in hand
            if n:
                payload = view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n]
                crc = self._checksum_fn(payload) if self._checksum_fn else 0
                pack_data_header(buf, sw.next_seq, n, crc)
                self._add_chunk(_Chunk(buf, n))
            else:
                self._pool.put(buf)
            if eof:
                self._source_ended()
                return

    async def _claim_regions(self, source: RegionSource) -> None:
        sw = self._sw
        while True:
            while not sw.can_add():
                await self._acked.wait()
            offset, n = source.claim(self._chunk_size)
            if n == 0:
                self._source_ended()
                return
            if self._checksum_fn is not None:
                # The bytes must be read to be hashed anyway: keep them, and send them from
                # memory.  Cheaper than sendfile'ing the file's pages afterwards (see
                # SocketStream.send_pages), and a re-send needs no second read.
                buf = self._pool.get()
                view = memoryview(buf)[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n]
                try:
                    crc = await source.pread(view, offset, self._checksum_fn)
                except BaseException:
                    self._pool.put(buf)
                    raise
                pack_data_header(buf, sw.next_seq, n, crc)
                self._add_chunk(_Chunk(buf, n))
                continue
            header = bytearray(DATA_HEADER_SIZE)
            pack_data_header(header, sw.next_seq, n, 0)
            self._add_chunk(_Chunk(header, n, offset))

    async def _watchdog(self) -> None:
        while True:
            deadline = self._last_progress + self._timeout
            now = anyio.current_time()
            if now < deadline:
                await anyio.sleep_until(deadline)
                continue
            if self._counters.connections == 0:
                raise PeerTimeout(
                    f"could not reach any receiver for {self._timeout:g} s "
                    f"(last error: {self._last_connect_error or 'none'})"
                )
            if not self._sw.all_acked() or self._bye_state != "none":
                raise PeerTimeout(
                    f"no progress from the receiver for {self._timeout:g} s "
                    f"({self._sw.written} of {self._sw.next_seq} chunks confirmed written); "
                    "is it still running?"
                )
            # Waiting on a slow source is not the receiver's fault.
            self._last_progress = now

    # -- connections ---------------------------------------------------------------------

    async def _connection_loop(self, index: int) -> None:
        delay = BACKOFF_START
        name = self._describe(index)
        first = True
        while True:
            link = self._links[index]
            link.state, link.next_try = "connecting", None
            try:
                stream = await self._connect(index)
            except ConnectFailed as exc:
                self._last_connect_error = str(exc)
                log.info("%s: %s; next try in %.1f s", name, exc, delay)
                link.state, link.next_try = "down", anyio.current_time() + delay
                await anyio.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            if not first:
                self._counters.reconnects += 1
                link.reconnects += 1
            first = False
            progressed = [False]
            try:
                async with stream:
                    try:
                        await self._serve(index, name, stream, progressed)
                    except _SessionOver:
                        await self._confirm(stream)
                        return
            except LinkBroken as exc:
                if progressed[0]:
                    delay = BACKOFF_START  # it worked for a while: a quick reconnect is fair
                # When a receiver fails it hangs up on every connection and sends ERROR on
                # some: wait out the backoff first, so that a session ending this way is
                # reported once, by its reason, not by every connection it took down.
                link.state, link.next_try = "backoff", anyio.current_time() + delay
                with anyio.move_on_after(delay):
                    await self._done.wait()
                if self._done.is_set():
                    return
                log.warning("%s broke: %s; its chunks went to the other connections", name, exc)
                delay = min(delay * 2, BACKOFF_CAP)

    async def _serve(
        self, index: int, name: str, stream: anyio.abc.ByteStream, progressed: list[bool]
    ) -> None:
        reader = FrameReader(stream, Decoder.for_transmitter(), greedy=True)
        hello = Hello(
            checkphrase=self._checkphrase,
            session_id=self.session_id,
            conn_index=index,
            chunk_size=self._chunk_size,
            window=self._window,
            features=self._features,
        )
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.send(encode(hello))
                welcome = await reader.next_event()
        except TimeoutError:
            raise LinkBroken("no answer to HELLO") from None
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        except ProtocolError as exc:
            # Not a flaky link: whatever listens there does not speak our protocol.
            raise ProtocolViolation(
                f"{name}: the peer is not a viamillipede receiver ({exc})"
            ) from exc
        self._check_welcome(welcome)
        assert isinstance(welcome, Welcome)
        self._counters.connections += 1
        self._links[index].state = "up"
        self._live[index] = stream
        log.info("%s: connected", name)
        self._on_ack(index, -1, welcome.written)

        try:
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_acks, index, reader, progressed)
                    tg.start_soon(self._watch_stall, index)
                    await self._send_chunks(index, stream)
        except (ProtocolError, *STREAM_ERRORS) as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        finally:
            self._live.pop(index, None)
            self._mid_send.discard(index)  # the next stream of this index starts clean
            if not self._done.is_set():
                lost = self._sw.connection_lost(index)
                self._links[index].retransmits += lost
                if lost:
                    self._turns.wake(lost)
                if self._bye_state == "sent" and self._bye_conn == index:
                    self._bye_state = "pending"
                    self._turns.wake(1)

    async def _send_chunks(self, conn: int, stream: anyio.abc.ByteStream) -> None:
        """Send what this connection is given, until the connection fails."""
        rank = self._rank(conn)
        try:
            await self._send_loop(conn, stream, rank, self._links[conn])
        finally:
            self._running.pop(conn, None)

    async def _send_loop(
        self, conn: int, stream: anyio.abc.ByteStream, rank: int, link: LinkCounters
    ) -> None:
        sw = self._sw
        while True:
            if self._done.is_set():
                await anyio.sleep_forever()  # the end: only ERROR may still go out
            if self._bye_state == "pending":
                self._bye_state = "sent"
                self._bye_conn = conn
                self._bye_sent_at = anyio.current_time()
                await stream.send(encode(Bye(sw.next_seq, self._total_bytes)))
                continue
            share = self._window if self._filling() else self._per_conn
            if sw.inflight(conn) >= share:
                if self._running.pop(conn, None) is not None and sw.has_work():
                    self._turns.wake(1)  # it took what it may: the rest goes elsewhere
                await self._acked.wait()  # busy: leave new chunks to other connections
                continue
            taken = sw.take(conn, anyio.current_time())
            if taken is None:
                self._running.pop(conn, None)
                await self._turns.wait(conn, rank)
                continue
            self._running[conn] = rank
            _seq, chunk = taken
            chunk.sending += 1
            self._mid_send.add(conn)
            try:
                if chunk.offset < 0:
                    await self._send_buffered(stream, chunk)
                else:
                    await self._send_region(stream, chunk)
                self._mid_send.discard(conn)  # only a completed send ends the frame
                link.chunks += 1
                link.nbytes += chunk.length
            finally:
                chunk.sending -= 1
                if chunk.acked and chunk.sending == 0:
                    self._release(chunk)

    async def _send_buffered(self, stream: anyio.abc.ByteStream, chunk: _Chunk) -> None:
        send_pages = getattr(stream, "send_pages", None)
        if send_pages is not None and self._by_reference:
            # The payload's pages go to the socket by reference, so the kernel reads them
            # after this returns; the buffer is reused only once the chunk is acknowledged, so
            # a receiver that reads a (stale, duplicate) copy later sees at worst bytes that
            # fail their checksum.  Without a checksum such bytes could be written: there a
            # receiver splicing the socket into a pipe passes the pages on to its consumer,
            # which may read them after the ACK.
            payload = memoryview(chunk.buf)[DATA_HEADER_SIZE : DATA_HEADER_SIZE + chunk.length]
            await send_pages(chunk.header(), payload)
            return
        await stream.send(chunk.frame())  # type: ignore[arg-type]  # any buffer works

    async def _send_region(self, stream: anyio.abc.ByteStream, chunk: _Chunk) -> None:
        source = self._regions
        assert source is not None and source.file_fd is not None
        send_file = getattr(stream, "send_file", None)
        if send_file is not None:
            await send_file(chunk.header(), source.file_fd, chunk.offset, chunk.length)
            return
        # A stream that wants the bytes themselves (in memory, or fault injection).
        buf = self._pool.get()
        try:
            view = memoryview(buf)[: DATA_HEADER_SIZE + chunk.length]
            view[:DATA_HEADER_SIZE] = chunk.header()
            await source.pread(view[DATA_HEADER_SIZE:], chunk.offset)
            await stream.send(view)  # type: ignore[arg-type]  # any buffer works
        finally:
            self._pool.put(buf)

    async def _confirm(self, stream: anyio.abc.ByteStream) -> None:
        """Tell the receiver we know it is done (FIN), so it can stop listening; then finish.

        Best effort: if FIN is lost too, the receiver stops waiting after its linger time.
        """
        with anyio.move_on_after(HANDSHAKE_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
            await stream.send(encode(Fin(self._sw.next_seq, self._total_bytes)))
        self._done.set()

    async def _watch_stall(self, conn: int) -> None:
        sw = self._sw
        while True:
            limit = sw.stall_timeout()
            now = anyio.current_time()
            stalled = sw.stalled_for(conn, now)
            if self._bye_state == "sent" and self._bye_conn == conn:
                stalled = now - self._bye_sent_at  # the BYE is in flight here
            if stalled >= limit:
                raise LinkBroken(f"stalled: no acknowledgement for {stalled:.1f} s")
            # A floor, or float rounding near the deadline could make this loop spin.
            await anyio.sleep(min(max(limit - stalled, 0.01), 1.0))

    def _check_welcome(self, welcome: object) -> None:
        if isinstance(welcome, Error):
            raise RemoteFailure(f"the receiver aborted: {welcome.message}")
        if isinstance(welcome, ConnectionClosed):
            raise LinkBroken("the receiver closed the connection during the handshake")
        if not isinstance(welcome, Welcome):  # pragma: no cover - the decoder forbids it
            raise ProtocolViolation(f"expected WELCOME, got {welcome!r}")
        status = welcome.status
        if status == WelcomeStatus.ACCEPTED:
            if welcome.session_id != self.session_id:
                raise PeerRejected(
                    "the receiver answered for another session; is another transmitter using it?"
                )
            return
        if status == WelcomeStatus.BAD_CHECKPHRASE:
            raise PeerRejected(
                f"the receiver rejected checkphrase {self._checkphrase_text!r}; "
                "both ends must use the same checkphrase"
            )
        if status == WelcomeStatus.WRONG_SESSION:
            raise PeerRejected(
                "the receiver is busy with another session; start a fresh receiver"
            )
        if status == WelcomeStatus.BAD_VERSION:
            raise PeerRejected("the receiver speaks another protocol version; upgrade both ends")
        if status == WelcomeStatus.BAD_PARAMETERS:
            raise PeerRejected(
                f"the receiver refused chunk size {self._chunk_size} / window {self._window}"
            )
        if status == WelcomeStatus.SESSION_FAILED:
            raise RemoteFailure("the receiver's session has failed; see its error")
        if status == WelcomeStatus.SESSION_OVER:
            if welcome.session_id != self.session_id:
                raise PeerRejected("the receiver has already finished another session")
            if self._eof and self._sw.all_acked() and welcome.written == self._sw.next_seq:
                # Our BYE_OK was lost with its connection; this WELCOME says the same thing.
                log.debug("the receiver reports the session complete")
                raise _SessionOver
            raise TruncatedStream(
                f"the receiver ended the session after {welcome.written} chunks "
                f"of {self._sw.next_seq}"
            )
        raise PeerRejected(f"the receiver refused the connection (status {status})")

    async def _read_acks(self, conn: int, reader: FrameReader, progressed: list[bool]) -> None:
        while True:
            event = await reader.next_event()
            if isinstance(event, Ack):
                progressed[0] = True
                self._on_ack(conn, event.seq, event.written)
            elif isinstance(event, ByeOk):
                if (event.chunks, event.nbytes) != (self._sw.next_seq, self._total_bytes):
                    raise TruncatedStream(
                        f"the receiver confirmed {event.nbytes} bytes, we sent {self._total_bytes}"
                    )
                log.debug("receiver confirmed %d bytes", event.nbytes)
                await self._confirm(reader.stream)
                return
            elif isinstance(event, Error):
                if event.code == ErrorCode.SINK_FAILED:
                    raise RemoteFailure(f"the receiver's output failed: {event.message}")
                raise RemoteFailure(f"the receiver aborted: {event.message}")
            elif isinstance(event, ConnectionClosed):
                raise LinkBroken("the receiver closed the connection")
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} from the receiver")
