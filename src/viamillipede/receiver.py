"""The receiving end of a session.

Each accepted connection gets a handler that checks the HELLO, receives DATA payloads straight
into pooled chunk buffers, verifies checksums, files chunks in the reorder buffer and queues
ACKs.  One writer task drains the reorder buffer to the sink strictly in sequence.  All frames a
connection sends back go through that connection's own sender task, so the writer never blocks
on a slow or dead connection and no two tasks ever write to one stream.

A receiver serves exactly one session: the first accepted HELLO binds it.  It finishes with
success only after a BYE whose totals match what was written and flushed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc

from .checksums import ALGORITHMS, Checksum
from .errors import (
    Interrupted,
    LinkBroken,
    LocalIOError,
    PeerTimeout,
    ProtocolViolation,
    RemoteFailure,
    TruncatedStream,
    ViamillipedeError,
)
from .framing import STREAM_ERRORS, BufferPool, FrameReader, Notifier, first_error
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_CHUNK_SIZE,
    MAX_RECEIVER_BUFFER,
    encode_checkphrase,
)
from .stats import Counters, LinkCounters, Report, TransferStats, link_stats
from .transport import SocketStream
from .window import Offer, ReorderBuffer
from .wire import (
    PROTOCOL_VERSION,
    Bye,
    ByeOk,
    ConnectionClosed,
    Data,
    DataHeader,
    Decoder,
    Error,
    ErrorCode,
    Feature,
    Fin,
    Hello,
    ProtocolError,
    Welcome,
    WelcomeStatus,
    encode,
    encode_ack,
)

log = logging.getLogger("viamillipede.rx")

#: How long a receiver that has written everything waits for the transmitter to confirm it
#: heard so, before exiting anyway.
LINGER = 10.0

#: How long a chunk that arrives before its turn may wait in its socket for that turn, to go
#: to the sink without a copy, before it is read into a buffer after all.  On loopback and fast
#: LANs the chunks ahead of it finish well within this; on slower paths it soon gives up, so a
#: waiting chunk does not hold its connection's flow for long.
PARK_LIMIT = 0.02


class Sink(Protocol):
    """Where the ordered stream goes."""

    async def write(self, data: memoryview) -> None: ...

    async def flush(self) -> None: ...


class Listener(Protocol):
    async def accept(self) -> anyio.abc.ByteStream: ...


class _Conn:
    """One accepted connection: its stream, its outgoing frame queue and its cancel scope."""

    __slots__ = (
        "_out", "_wake", "closed", "drained", "finished", "index", "link", "name", "scope",
        "stream",
    )

    def __init__(self, stream: anyio.abc.ByteStream, name: str) -> None:
        self.stream = stream
        self.name = name
        self.index = -1
        self.scope = anyio.CancelScope()
        self._out: list[bytes | int] = []  # an int is "ACK this seq with the current written"
        self._wake = Notifier()
        self.drained = Notifier()
        self.closed = False
        self.link = LinkCounters(-1, name, state="up")
        self.finished = False  # BYE_OK is queued: nothing may follow it on this connection

    def queue(self, item: bytes | int, *, final: bool = False) -> None:
        if self.finished:
            return
        self.finished = final
        self._out.append(item)
        self._wake.notify()

    @property
    def idle(self) -> bool:
        return not self._out

    async def sender(self, written: Callable[[], int]) -> None:
        """The only task that writes to this stream after the WELCOME."""
        while True:
            while not self._out:
                self.drained.notify()
                await self._wake.wait()
            items, self._out = self._out, []
            w = written()
            data = b"".join(encode_ack(i, w) if isinstance(i, int) else i for i in items)
            await self.stream.send(data)


class Receiver:
    """Accepts connections for one session and writes the stream, in order, to ``sink``."""

    def __init__(
        self,
        sink: Sink,
        *,
        checkphrase: str = DEFAULT_CHECKPHRASE,
        idle_timeout: float = DEFAULT_TIMEOUT,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        max_buffer: int = MAX_RECEIVER_BUFFER,
    ) -> None:
        self._sink = sink
        self._checkphrase = encode_checkphrase(checkphrase)
        self._timeout = idle_timeout
        self._max_chunk_size = max_chunk_size
        self._max_buffer = max_buffer

        self.session_id: bytes | None = None
        self._chunk_size = 0
        self._window = 0
        self._checksum: Checksum | None = None
        self._features = 0
        self._pool: BufferPool | None = None

        self._reorder: ReorderBuffer[tuple[bytearray, int, _Conn]] = ReorderBuffer(1)
        # Chunks go to the sink by splice (no copy) when sink and connection allow it; the
        # sink then has two users, the writer task and a connection's direct chunk, in turn.
        self._splice = bool(getattr(sink, "can_splice", False))
        self._direct = False  # this session may splice (no checksum to verify)
        self._sink_busy = False
        self._partial = 0  # bytes of chunk `written` already in the sink (a splice cut short)
        self._splicing = -1  # the chunk on its way to the sink directly, if any
        self.spliced = 0  # chunks that went to the sink without a copy
        self._parked: dict[int, Notifier] = {}  # connections waiting for a chunk's turn, by seq
        self._arrived = Notifier()
        self._progress = Notifier()
        self._conns: dict[int, _Conn] = {}
        self._conn_closed = Notifier()
        self._confirmed = anyio.Event()
        self._complete = anyio.Event()
        self._succeeded = False
        self._error: ViamillipedeError | None = None
        self._last_activity = 0.0
        self._tg: anyio.abc.TaskGroup | None = None
        self._counters = Counters("rx")

    # -- public --------------------------------------------------------------------------

    def statistics(self) -> TransferStats:
        snap = self._counters.snapshot()
        # A sink that counts its own bytes knows better: a write cut short by the end of the
        # session still put some of its bytes out.
        delivered = getattr(self._sink, "nbytes", None)
        if isinstance(delivered, int):
            snap = dataclasses.replace(snap, nbytes=delivered)
        return snap

    def report(self) -> Report:
        now = anyio.current_time()
        links = [link_stats(c.link, 0, now) for c in sorted(
            self._conns.values(), key=lambda c: c.index)]
        return Report(
            totals=self.statistics(),
            window=self._window,
            window_used=len(self._reorder),
            reorder_depth=len(self._reorder),
            connections=tuple(links),
            targets=(),
        )

    def abort(self, reason: str = "interrupted") -> None:
        """Stop the session from outside (e.g. on Ctrl-C); the transmitter is told why."""
        self._fail(Interrupted(reason))

    async def serve(self, listener: Listener) -> TransferStats:
        """Accept connections until the session completes; return its statistics."""

        async def accept_loop(tg: anyio.abc.TaskGroup) -> None:
            while True:
                stream = await listener.accept()
                tg.start_soon(self.handle, stream)

        return await self.run(accept_loop)

    async def run(
        self, feeder: Callable[[anyio.abc.TaskGroup], Coroutine[Any, Any, None]] | None = None
    ) -> TransferStats:
        """Run the session; ``feeder`` (if any) starts :meth:`handle` tasks in the group.

        Without a feeder, call :meth:`handle` from elsewhere (e.g. with in-memory streams).
        """
        self._last_activity = anyio.current_time()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._guard, self._writer)
            tg.start_soon(self._guard, self._watchdog)
            if feeder is not None:
                tg.start_soon(feeder, tg)
            await self._complete.wait()
            if self._error is not None:
                await self._tell_everyone(Error(_error_code(self._error), str(self._error)))
            tg.cancel_scope.cancel()
        for conn in list(self._conns.values()):
            await _close(conn.stream)
        if self._error is not None:
            raise self._error
        return self._counters.snapshot()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one connection until it closes, breaks or the session ends."""
        name = getattr(stream, "peer", None) or "peer"
        conn = _Conn(stream, name)
        try:
            await self._handle(conn)
        except (LinkBroken, *STREAM_ERRORS) as exc:
            # Once the session is over, peers hanging up on us is expected, not news.
            level = logging.DEBUG if self._complete.is_set() else logging.WARNING
            log.log(level, "connection from %s broke: %s", name, exc)
        except ProtocolError as exc:
            self._counters.rejected += 1
            log.warning("dropped connection from %s: %s", name, exc)
        except ViamillipedeError as exc:
            self._fail(exc)
            # This connection leaves the live set below, before run() says ERROR to the
            # others: say it here, on the connection that carried the bad news.
            with anyio.move_on_after(1.0), contextlib.suppress(*STREAM_ERRORS):
                await stream.send(encode(Error(_error_code(exc), str(exc))))
        finally:
            conn.closed = True
            self._conn_closed.notify()
            if self._conns.get(conn.index) is conn:
                del self._conns[conn.index]
            await _close(stream)

    # -- plumbing ------------------------------------------------------------------------

    def _fail(self, exc: ViamillipedeError) -> None:
        if self._error is None and not self._succeeded:
            self._error = exc
        self._complete.set()


    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except ViamillipedeError as exc:
            self._fail(exc)

    async def _tell_everyone(self, error: Error) -> None:
        """Best effort: queue ERROR on every live connection and give them a moment to send."""
        frame = encode(error)
        conns = [c for c in self._conns.values() if not c.closed]
        for conn in conns:
            conn.queue(frame)
        with anyio.move_on_after(1.0):
            for conn in conns:
                while not conn.idle and not conn.closed:
                    await conn.drained.wait()
        # Half-close and let the transmitter hang up first: closing a socket that still holds
        # unread data sends a reset, which can destroy the ERROR frame before it is read.
        for conn in conns:
            with contextlib.suppress(*STREAM_ERRORS):
                await conn.stream.send_eof()
        with anyio.move_on_after(1.0):
            while any(not c.closed for c in conns):
                await self._conn_closed.wait()

    async def _watchdog(self) -> None:
        while True:
            deadline = self._last_activity + self._timeout
            now = anyio.current_time()
            if now < deadline:
                await anyio.sleep_until(deadline)
                continue
            if self.session_id is not None:
                raise PeerTimeout(
                    f"the transmitter has been silent for {self._timeout:g} s; "
                    f"{self.statistics().nbytes} bytes were delivered"
                )
            # Nobody has connected yet: a receiver may be started long before its transmitter.
            self._last_activity = now

    # -- admission -----------------------------------------------------------------------

    def _admit(self, hello: Hello) -> WelcomeStatus:
        if hello.version != PROTOCOL_VERSION:
            return WelcomeStatus.BAD_VERSION
        if hello.checkphrase != self._checkphrase:
            return WelcomeStatus.BAD_CHECKPHRASE
        if self._succeeded:
            return WelcomeStatus.SESSION_OVER
        if self._complete.is_set():
            return WelcomeStatus.SESSION_FAILED
        if self.session_id is not None:
            if hello.session_id != self.session_id:
                return WelcomeStatus.WRONG_SESSION
            same = (hello.chunk_size, hello.window, hello.features) == (
                self._chunk_size,
                self._window,
                self._features,
            )
            return WelcomeStatus.ACCEPTED if same else WelcomeStatus.BAD_PARAMETERS
        checksum = hello.features & Feature.CHECKSUM_MASK
        if (
            not 1 <= hello.chunk_size <= self._max_chunk_size
            or not 1 <= hello.window <= 4096
            or hello.chunk_size * hello.window > self._max_buffer
            or (checksum and checksum not in ALGORITHMS)
            or hello.features & ~Feature.CHECKSUM_MASK
        ):
            return WelcomeStatus.BAD_PARAMETERS
        self.session_id = hello.session_id
        self._counters.started = time.monotonic()
        self._chunk_size = hello.chunk_size
        self._window = hello.window
        self._features = hello.features
        self._checksum = ALGORITHMS[checksum][1] if checksum else None
        self._direct = self._splice and self._checksum is None
        self._pool = BufferPool(hello.chunk_size, keep=hello.window + 8)
        self._reorder = ReorderBuffer(hello.window)
        log.info(
            "session %s: chunk %d bytes, window %d, checksum %s",
            hello.session_id.hex()[:12],
            hello.chunk_size,
            hello.window,
            ALGORITHMS[checksum][0] if checksum else "off",
        )
        return WelcomeStatus.ACCEPTED

    # -- one connection ------------------------------------------------------------------

    async def _handle(self, conn: _Conn) -> None:
        stream = conn.stream
        reader = FrameReader(stream, Decoder.for_receiver(stream_payload=True), greedy=False)
        with anyio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
            hello = await reader.next_event()
        if handshake.cancelled_caught:
            self._counters.rejected += 1
            log.warning("dropped connection from %s: no HELLO within %g s", conn.name,
                        HANDSHAKE_TIMEOUT)
            return
        if isinstance(hello, ConnectionClosed):
            return
        assert isinstance(hello, Hello)  # the decoder accepts nothing else first
        status = self._admit(hello)
        await stream.send(encode(Welcome(int(status), self.session_id or bytes(16),
                                         self._reorder.written)))
        if status == WelcomeStatus.SESSION_OVER and hello.session_id == self.session_id:
            # Our transmitter reconnected after losing BYE_OK: the WELCOME told it that every
            # chunk is written; its FIN confirms it heard that.
            log.info("told a reconnecting connection that the session is complete")
            await self._await_hangup(reader)
            return
        if status != WelcomeStatus.ACCEPTED:
            self._counters.rejected += 1
            # A late connection of the session that just finished is routine.
            level = logging.INFO if status == WelcomeStatus.SESSION_OVER else logging.WARNING
            log.log(level, "rejected connection from %s: %s", conn.name, _REASONS[status])
            return
        self._last_activity = anyio.current_time()
        self._counters.connections += 1
        reader.decoder.max_payload = self._chunk_size
        conn.index = conn.link.index = hello.conn_index
        old = self._conns.get(conn.index)
        if old is not None:
            log.info("connection %d from %s replaces a stale one", conn.index, conn.name)
            old.scope.cancel()
            self._counters.reconnects += 1
        self._conns[conn.index] = conn
        log.info("connection %d from %s accepted", conn.index, conn.name)
        with conn.scope, first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._conn_sender, conn, tg.cancel_scope)
                await self._receive_loop(conn, reader)
                tg.cancel_scope.cancel()

    async def _conn_sender(self, conn: _Conn, scope: anyio.CancelScope) -> None:
        try:
            await conn.sender(lambda: self._reorder.written)
        except STREAM_ERRORS as exc:
            level = logging.DEBUG if self._complete.is_set() else logging.WARNING
            log.log(level, "connection %d from %s broke: %s", conn.index, conn.name, exc)
            conn.closed = True
            scope.cancel()

    async def _receive_loop(self, conn: _Conn, reader: FrameReader) -> None:
        assert self._pool is not None
        pool = self._pool
        while True:
            event = await reader.next_event()
            self._last_activity = anyio.current_time()
            if isinstance(event, DataHeader):
                if self._direct and await self._my_turn(conn, reader, event.seq):
                    self._splicing = event.seq
                    try:
                        await self._splice_chunk(conn, reader, event)
                    finally:
                        self._splicing = -1
                        self._release_sink()
                    continue
                buf = pool.get()
                try:
                    view = memoryview(buf)[: event.length]
                    await reader.read_payload_into(view)
                    if self._checksum and self._checksum(view) != event.checksum:
                        raise LinkBroken(f"checksum mismatch in chunk {event.seq}; discarded")
                except BaseException:
                    pool.put(buf)
                    raise
                self._file_chunk(event.seq, buf, event.length, conn)
                conn.queue(event.seq)
                conn.link.chunks += 1
                conn.link.nbytes += event.length
            elif isinstance(event, Bye):
                await self._finish(conn, event)
                await self._await_hangup(reader)
                return
            elif isinstance(event, Fin):
                if self._succeeded:
                    self._confirmed.set()
                return
            elif isinstance(event, Error):
                raise RemoteFailure(f"the transmitter aborted: {event.message}")
            elif isinstance(event, ConnectionClosed):
                log.info("connection %d from %s closed", conn.index, conn.name)
                return
            else:  # pragma: no cover - Data only comes from non-streaming decoders
                assert isinstance(event, Data)
                raise ProtocolError("unexpected whole DATA event")

    # -- chunks straight to the sink -----------------------------------------------------

    async def _my_turn(self, conn: _Conn, reader: FrameReader, seq: int) -> bool:
        """Wait (a little) until chunk ``seq`` is the next to write and the sink is free; then
        hold the sink and say True.  False: take the buffered path after all.

        Leaving the payload in the socket meanwhile is what lets it skip our memory; the
        kernel's socket buffer holds it, and the transmitter's window bounds how much.
        """
        if not isinstance(conn.stream, SocketStream) or reader.decoder.buffered:
            return False
        reorder = self._reorder
        if not reorder.written <= seq < reorder.written + reorder.window:
            return False  # a duplicate or a violation: the buffered path knows what to do
        # Woken only when this chunk's turn may have come, not at every chunk written.
        turn = self._parked.setdefault(seq, Notifier())
        try:
            with anyio.move_on_after(PARK_LIMIT):
                while reorder.written < seq or self._sink_busy:
                    await turn.wait()
        finally:
            if self._parked.get(seq) is turn:
                del self._parked[seq]
        if reorder.written != seq or self._sink_busy or reorder.ready() is not None:
            return False
        self._sink_busy = True
        return True

    def _next_turn(self) -> None:
        """The sink is free: wake the connection holding the next chunk, if one waits."""
        turn = self._parked.get(self._reorder.written)
        if turn is not None:
            turn.notify()

    def _release_sink(self) -> None:
        self._sink_busy = False
        self._next_turn()
        self._arrived.notify()  # the writer may hold the next chunk already

    async def _splice_chunk(self, conn: _Conn, reader: FrameReader, header: DataHeader) -> None:
        """Move chunk ``header.seq`` (our turn, sink held) from the socket to the sink."""
        assert isinstance(conn.stream, SocketStream) and self._pool is not None
        length = header.length
        if self._partial:
            # A splice of this chunk broke off earlier: its first bytes are out already.
            if length < self._partial:
                raise ProtocolViolation(
                    f"chunk {header.seq} came again shorter ({length} bytes) than the "
                    f"{self._partial} bytes already written of it"
                )
            scratch = self._pool.get()
            try:
                await reader.read_payload_into(memoryview(scratch)[: self._partial])
            finally:
                self._pool.put(scratch)

        def moved(n: int) -> None:
            reader.decoder.payload_consumed(n)
            self._partial += n

        try:
            await self._sink.splice_from(  # type: ignore[attr-defined]  # can_splice said so
                conn.stream, length - self._partial, moved
            )
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        self._partial = 0
        self.spliced += 1
        self._reorder.skip()
        self._chunk_written(header.seq, length, conn)
        conn.link.chunks += 1
        conn.link.nbytes += length

    def _chunk_written(self, seq: int, length: int, conn: _Conn) -> None:
        self._counters.nbytes += length
        self._counters.chunks += 1
        self._progress.notify()
        # Tell the transmitter the window moved, on a connection that still lives.
        target = conn if not conn.closed else next(
            (c for c in self._conns.values() if not c.closed), None
        )
        if target is not None:
            target.queue(seq)

    def _file_chunk(self, seq: int, buf: bytearray, length: int, conn: _Conn) -> None:
        assert self._pool is not None
        if seq == self._splicing:  # another copy is going to the sink right now
            verdict = Offer.DUPLICATE
        else:
            verdict = self._reorder.offer(seq, (buf, length, conn))
        if verdict is Offer.ACCEPTED:
            if seq == self._reorder.written:
                self._arrived.notify()
            return
        self._pool.put(buf)
        if verdict is Offer.DUPLICATE:
            self._counters.duplicates += 1
            return
        raise ProtocolError(
            f"chunk {seq} is beyond the window ({self._reorder.written} + {self._window})"
        )

    async def _finish(self, conn: _Conn, bye: Bye) -> None:
        missing = self._reorder.missing(bye.chunks)
        if missing or bye.chunks < self._reorder.written:
            raise TruncatedStream(
                f"the transmitter ended the stream at {bye.chunks} chunks but "
                f"{len(missing) or 'extra'} chunks disagree; output is incomplete"
            )
        while self._reorder.written < bye.chunks:
            await self._progress.wait()
        if self._counters.nbytes != bye.nbytes:
            raise TruncatedStream(
                f"wrote {self._counters.nbytes} bytes, the transmitter sent {bye.nbytes}"
            )
        await self._sink.flush()
        frame = encode(ByeOk(bye.chunks, bye.nbytes))
        if self._succeeded:  # a BYE sent again after its connection broke
            conn.queue(frame, final=True)
            return
        self._succeeded = True
        # On every live connection, so that one lost reply cannot leave the transmitter
        # unsure of a complete transfer.
        for other in self._conns.values():
            if not other.closed:
                other.queue(frame, final=True)
        # Started before any await: this connection may be cancelled from here on (replaced
        # by a reconnect, or broken), and the end of the session must not depend on it.
        assert self._tg is not None
        self._tg.start_soon(self._linger)
        log.debug("BYE_OK queued after %d bytes; %d of %d chunks were spliced to the output",
                  bye.nbytes, self.spliced, bye.chunks)

    async def _await_hangup(self, reader: FrameReader) -> None:
        """Wait for the transmitter's FIN: proof that it knows the session is complete, and
        so the last thing the receiver waits for before it exits."""
        with contextlib.suppress(LinkBroken, ProtocolError):
            if isinstance(await reader.next_event(), Fin):
                self._confirmed.set()

    async def _linger(self) -> None:
        """Stay reachable a little while after success, until the transmitter confirms.

        Normally its FIN arrives at once.  If BYE_OK was lost with its connection, the
        transmitter reconnects and learns from the WELCOME that all is written.
        """
        with anyio.move_on_after(LINGER):
            await self._confirmed.wait()
        self._complete.set()

    # -- the writer ----------------------------------------------------------------------

    async def _writer(self) -> None:
        sink = self._sink
        while True:
            reorder = self._reorder  # replaced when the session is bound
            if self._sink_busy or (ready := reorder.ready()) is None:
                await self._arrived.wait()
                continue
            # Stays in the reorder buffer while being written, so BYE sees it as present.
            buf, length, conn = ready
            if length < self._partial:
                raise ProtocolViolation(
                    f"chunk {reorder.written} came again shorter ({length} bytes) than the "
                    f"{self._partial} bytes already written of it"
                )
            self._sink_busy = True
            try:
                await sink.write(memoryview(buf)[self._partial : length])
            finally:
                self._sink_busy = False
            self._partial = 0
            seq = reorder.written
            reorder.advance()
            assert self._pool is not None
            self._pool.put(buf)
            self._chunk_written(seq, length, conn)
            self._next_turn()


def _error_code(error: ViamillipedeError) -> int:
    """The ERROR code that tells the transmitter why the receiver gives up."""
    if isinstance(error, LocalIOError):
        return int(ErrorCode.SINK_FAILED)
    if isinstance(error, PeerTimeout):
        return int(ErrorCode.TIMEOUT)
    if isinstance(error, TruncatedStream):
        return int(ErrorCode.TOTALS_MISMATCH)
    return int(ErrorCode.ABORTED)


_REASONS: dict[WelcomeStatus, str] = {
    WelcomeStatus.BAD_VERSION: "unsupported protocol version",
    WelcomeStatus.BAD_CHECKPHRASE: "wrong checkphrase",
    WelcomeStatus.WRONG_SESSION: "it belongs to another session (a second or stale transmitter)",
    WelcomeStatus.BAD_PARAMETERS: "chunk size, window or features out of bounds",
    WelcomeStatus.SESSION_OVER: "the session is already complete",
    WelcomeStatus.SESSION_FAILED: "the session has failed",
}


async def _close(stream: Any) -> None:
    # Closing a dead stream may fail in many ways; none of them matter any more.
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.aclose()
