"""The receiving end of a session: the async driver around :mod:`viamillipede.rxcore`.

Each accepted connection gets a handler that reads frames and asks the core what they mean:
whether the HELLO is admitted, whether a DATA payload earns a buffer, is dropped or may go
straight to the sink, whether a BYE is believable.  The handler moves the bytes; one writer
task drains the core's reorder buffer to the sink strictly in sequence.  All frames a
connection sends back go through that connection's own sender task, so the writer never blocks
on a slow or dead connection and no two tasks ever write to one stream.

A receiver serves exactly one session: the first admitted HELLO binds it.  It finishes with
success only after a BYE whose totals match what was written and flushed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc

from .checksums import ALGORITHMS, Checksum
from .errors import (
    Interrupted,
    LinkBroken,
    LocalIOError,
    PeerRejected,
    PeerTimeout,
    ProtocolViolation,
    RemoteFailure,
    TruncatedStream,
    ViamillipedeError,
)
from .framing import STREAM_ERRORS, BufferPool, FrameReader, Notifier, first_error, why
from .keying import AuthFailed, rx_attempt
from .monitor import NOTE, Reminder
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_CHUNK_SIZE,
    MAX_RECEIVER_BUFFER,
    encode_checkphrase,
)
from .rxcore import Admission, AuthThrottle, Claim, ReceiverCore, RxState
from .squeeze import (
    BadFrame,
    CompressionCounters,
    CompressionStats,
    Squeezer,
    compress_workers,
)
from .stats import Counters, LinkCounters, Report, TransferStats, link_stats
from .streams import SpliceSink, SpliceTo
from .wire import (
    DATA_HEADER_SIZE,
    WELCOME_MEANING,
    Auth,
    AuthKind,
    Bye,
    ConnectionClosed,
    DataHeader,
    Decoder,
    Error,
    ErrorCode,
    Fin,
    Hello,
    ProtocolError,
    RemoteProtocolError,
    TamperedFrame,
    Welcome,
    WelcomeStatus,
    encode,
    encode_ack,
    pack_data_header,
)
from .wire.secure import INLINE_SEAL_BYTES, SEAL_OVERHEAD, ChunkSealer, Tagger, password

log = logging.getLogger("viamillipede.rx")

#: How long a receiver that has written everything waits for the transmitter to confirm it
#: heard so, before exiting anyway.
LINGER = 10.0

#: How long a chunk that arrives before its turn may wait in its socket for that turn, to go
#: to the sink without a copy, before it is read into a buffer after all.  On fast paths the
#: chunks ahead of it finish well within this; on slower ones it soon gives up, so a waiting
#: chunk does not hold its connection's flow for long.
PARK_LIMIT = 0.02
#: Compressed chunks that decode to at most this are decompressed on the event loop (a hop to
#: a worker thread costs ~150 us, more than decoding them).
INLINE_INFLATE_BYTES = 64 * 1024

#: How long a best-effort send (an ERROR on the way out) may take before we stop trying.
BEST_EFFORT_TIMEOUT = 1.0

#: Connections that have not yet said HELLO, and refused ones waiting out their delay: beyond
#: these, new ones are closed at once, so strangers cannot make the receiver hold much.
MAX_PENDING = 64
MAX_DELAYED = 32

#: Key exchanges that may fail before the receiver gives up (exit 3): a transmitter with
#: the wrong phrase fails once; more is someone guessing.
MAX_FAILED_KEY_EXCHANGES = 5

#: Chunks or control frames that may fail to verify before the session is ended as tampered
#: with.  Each failure drops its connection and the chunk is sent again; a few can be a
#: broken link, many cannot.
MAX_TAMPERED = 16
#: ...in a burst: each failure is forgiven after this many seconds, so a link that damages a
#: frame now and then over an hours-long session is survived, and a tamperer is not.
TAMPER_FORGIVE_S = 60.0

#: Refusals after the first of each kind are reported in one line at most this often.
REPORT_EVERY = 60.0

#: Scratch space for payloads that are read only to be dropped.
SCRATCH_SIZE = 64 * 1024


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
        "spliceable", "stream", "tagger",
    )

    def __init__(self, stream: anyio.abc.ByteStream, name: str) -> None:
        self.stream = stream
        self.spliceable = isinstance(stream, SpliceTo)  # asked once, not per chunk
        self.name = name
        self.index = -1
        self.scope = anyio.CancelScope()
        self._out: list[bytes | int] = []  # an int is "ACK this seq with the current written"
        self.tagger: Tagger | None = None  # set by the handshake: every frame after it is tagged
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
            frames = [encode_ack(i, w) if isinstance(i, int) else i for i in items]
            tagger = self.tagger
            if tagger is not None:  # in send order: the tags count the frames
                frames = [part for f in frames for part in (f, tagger.tag(f))]
            await self.stream.send(b"".join(frames))


class _Gate:
    """Admission at the door: how many strangers we hold, and how refusals are answered and
    logged (slowly, for a wrong checkphrase; in aggregate, not one WARNING each)."""

    def __init__(self) -> None:
        self.pending = 0
        self.delayed = 0
        self.throttle = AuthThrottle()
        self.failed_key_exchanges = 0
        self._refused: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._last = ""
        self._reported_at = 0.0

    async def answer_refusal(self, admission: Admission, name: str) -> bool:
        """Count and log a refusal; False: drop it unanswered."""
        if admission.welcome.status == WelcomeStatus.SESSION_FAILED:
            # The session's own transmitter, still connecting while the receiver shuts down:
            # the failure is reported once, by its reason, not again for every connection.
            log.info("rejected connection from %s: %s", name, admission.reason)
            return True
        self._count(admission.reason, name, anyio.current_time())
        return True

    async def before_key_exchange(self) -> None:
        """Key exchanges are answered slowly after the first few, however many connections
        ask: each is one guess at the phrase for whoever runs it."""
        now = anyio.current_time()
        when = self.throttle.failure(now)
        if when <= now:
            return
        if self.delayed >= MAX_DELAYED:
            raise LinkBroken("too many key exchanges waiting")
        self.delayed += 1
        try:
            await anyio.sleep_until(when)
        finally:
            self.delayed -= 1

    def key_exchange_failed(self, name: str) -> PeerRejected | None:
        """A key exchange did not end in a valid proof.  After MAX_FAILED_KEY_EXCHANGES the
        receiver gives up: a transmitter with the wrong phrase, or someone guessing."""
        self.failed_key_exchanges += 1
        n = self.failed_key_exchanges
        log.warning("key exchange with %s failed: another checkphrase or key (%d of %d)",
                    name, n, MAX_FAILED_KEY_EXCHANGES)
        if n < MAX_FAILED_KEY_EXCHANGES:
            return None
        return PeerRejected(
            f"{n} key exchanges failed: the transmitter uses another checkphrase or key, "
            "or someone is guessing")

    def _count(self, reason: str, name: str, now: float) -> None:
        self._last = name
        if reason not in self._seen:
            self._seen.add(reason)
            self._reported_at = now
            log.warning("rejected connection from %s: %s", name, reason)
            return
        self._refused[reason] += 1
        if now - self._reported_at >= REPORT_EVERY:
            self.report(now)

    def report(self, now: float) -> None:
        """Say in one line how many refusals went unreported."""
        self._reported_at = now
        total = sum(self._refused.values())
        if total:
            detail = ", ".join(f"{reason}: {n}" for reason, n in self._refused.items())
            log.warning("rejected %d more connections (%s; the last from %s)", total, detail,
                        self._last)
            self._refused.clear()


class Receiver:
    """Accepts connections for one session and writes the stream, in order, to ``sink``."""

    def __init__(
        self,
        sink: Sink,
        *,
        checkphrase: str | bytes = DEFAULT_CHECKPHRASE,
        key: bytes | None = None,
        plaintext: bool = False,
        idle_timeout: float = DEFAULT_TIMEOUT,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        max_buffer: int = MAX_RECEIVER_BUFFER,
    ) -> None:
        self._sink = sink
        self._timeout = idle_timeout
        self._password = password(encode_checkphrase(checkphrase), key)
        self._core: ReceiverCore[tuple[bytearray, int, _Conn]] = ReceiverCore(
            max_chunk_size=max_chunk_size, max_buffer=max_buffer, plaintext=plaintext)
        self._sealer: ChunkSealer | None = None  # opens chunks; None in plaintext
        self._tampered = 0  # chunks and frames that failed to verify
        self._tamper_level = 0.0  # the same, less one per TAMPER_FORGIVE_S
        self._tamper_at = 0.0
        self._gate = _Gate()
        self._checksum: Checksum | None = None
        self._pool: BufferPool | None = None
        self._scratch = memoryview(bytearray(SCRATCH_SIZE))
        # Chunks go to the sink by splice (no copy) when sink and connection allow it; the
        # sink then has two users, the writer task and a connection's direct chunk, in turn.
        self.output = _Output(self, sink)
        self._connections = _Connections(self)
        self._direct = False  # this session may splice (no checksum to verify)
        self._progress = Notifier()
        self._conns: dict[int, _Conn] = {}
        self._conn_closed = Notifier()
        self._confirmed = anyio.Event()
        self._complete = anyio.Event()
        self._error: ViamillipedeError | None = None
        self._last_activity = 0.0
        self._tg: anyio.abc.TaskGroup | None = None
        self._counters = Counters("rx")
        # Compressed chunks (the transmitter announced zstd): decoded in worker threads, at
        # most one per core at once, each into a second pooled buffer.
        self._squeezer: Squeezer | None = None
        self._inflating = anyio.CapacityLimiter(compress_workers())
        self._compression: CompressionCounters | None = None

    # -- public --------------------------------------------------------------------------

    @property
    def session_id(self) -> bytes | None:
        return self._core.params.session_id if self._core.params else None

    @property
    def state(self) -> RxState:
        return self._core.state

    @property
    def spliced(self) -> int:
        """Chunks that went to the sink without a copy."""
        return self.output.spliced

    @property
    def peak_buffer_bytes(self) -> int:
        """The most memory chunk buffers ever held at once (bounded by the window)."""
        params = self._core.params
        return self._core.peak_buffers * params.chunk_size if params else 0

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
        window = self._core.params.window if self._core.params else 0
        held = len(self._core.reorder)
        return Report(totals=self.statistics(), window=window, window_used=held,
                      reorder_depth=held, connections=tuple(links), targets=(),
                      compression=self.compression())

    def compression(self) -> CompressionStats | None:
        """What the transmitter's compression did, as received; None when it was off."""
        return self._compression.snapshot() if self._compression else None

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
            tg.start_soon(self._guard, self.output.writer)
            tg.start_soon(self._guard, self._watchdog)
            if feeder is not None:
                tg.start_soon(feeder, tg)
            await self._complete.wait()
            if self._error is not None:
                await self._tell_everyone(Error(_error_code(self._error), str(self._error)))
            tg.cancel_scope.cancel()
        self._gate.report(anyio.current_time())
        for conn in list(self._conns.values()):
            await _close(conn.stream)
        if self._error is not None:
            raise self._error
        return self._counters.snapshot()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one connection until it closes, breaks or the session ends."""
        name = str(getattr(stream, "peer", None) or "peer")
        if self._gate.pending >= MAX_PENDING:
            self._counters.rejected += 1
            await _close(stream)
            return
        conn = _Conn(stream, name)
        try:
            await self._connections.handle(conn)
        except (LinkBroken, *STREAM_ERRORS) as exc:
            # Once the session is over, peers hanging up on us is expected, not news.
            level = logging.DEBUG if self._complete.is_set() else logging.WARNING
            log.log(level, "connection from %s broke: %s", name, why(exc))
        except TamperedFrame as exc:
            try:
                self.tampered(f"dropped connection from {name}: {exc}")
            except ViamillipedeError as fatal:
                self._fail(fatal)
        except ProtocolError as exc:
            self._counters.rejected += 1
            log.warning("dropped connection from %s: %s", name, exc)
        except ViamillipedeError as exc:
            self._fail(exc)
            # This connection leaves the live set below, before run() says ERROR to the
            # others: say it here, on the connection that carried the bad news.
            with anyio.move_on_after(BEST_EFFORT_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
                await stream.send(encode(Error(_error_code(exc), str(exc)), conn.tagger))
        finally:
            conn.closed = True
            self._conn_closed.notify()
            if self._conns.get(conn.index) is conn:
                del self._conns[conn.index]
            await _close(stream)

    # -- plumbing ------------------------------------------------------------------------

    def _fail(self, exc: ViamillipedeError) -> None:
        if self._error is None and self._core.state is not RxState.SUCCEEDED:
            self._error = exc
            self._core.fail()
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
        with anyio.move_on_after(BEST_EFFORT_TIMEOUT):
            for conn in conns:
                while not conn.idle and not conn.closed:
                    await conn.drained.wait()
        # Half-close and let the transmitter hang up first: closing a socket that still holds
        # unread data sends a reset, which can destroy the ERROR frame before it is read.
        for conn in conns:
            with contextlib.suppress(*STREAM_ERRORS):
                await conn.stream.send_eof()
        with anyio.move_on_after(BEST_EFFORT_TIMEOUT):
            while any(not c.closed for c in conns):
                await self._conn_closed.wait()

    async def _watchdog(self) -> None:
        """Give up on a silent transmitter; say at growing intervals that we are waiting.

        Nobody connecting yet is not an error (a receiver may be started long before its
        transmitter), but it is said, so a wrong port on the other end does not go unseen.
        """
        started = anyio.current_time()
        reminder = Reminder()
        while True:
            now = anyio.current_time()
            bound = self._core.params is not None
            deadline = self._last_activity + self._timeout
            if bound and now >= deadline:
                raise PeerTimeout(
                    f"the transmitter has been silent for {self._timeout:g} s; "
                    f"{self.statistics().nbytes} bytes were delivered"
                )
            since = self._last_activity if bound else started
            due = reminder.due(since)
            if now >= due:
                reminder.told()
                if self._core.state in (RxState.SUCCEEDED, RxState.ENDING):
                    continue  # lingering for a FIN, or writing the last chunks: not waiting
                log.log(NOTE, "%s", self._waiting_line(now - since, bound))
                continue
            await anyio.sleep_until(min(due, deadline) if bound else due)

    def _waiting_line(self, waited: float, bound: bool) -> str:
        if not bound:
            return f"no transmitter has connected yet ({waited:.0f} s)"
        live = len(self._conns)
        return (f"nothing from the transmitter for {waited:.0f} s "
                f"({live} connection{'' if live == 1 else 's'} open, "
                f"{self._counters.nbytes / 1e6:.1f} MB written); "
                f"giving up after {self._timeout:g} s of silence")

    # -- admission -----------------------------------------------------------------------


    def _keyed(self) -> None:
        """The session's keys were agreed (or agreed again before any DATA)."""
        keys, params = self._core.keys, self._core.params
        assert keys is not None and params is not None
        if not self._core.plaintext:
            self._sealer = ChunkSealer(keys.data_tx, params.session_id, params.chunk_size)

    def tampered(self, what: str) -> None:
        """Something failed to verify: drop it (the caller drops its connection); too many
        and someone is tampering with the session, which ends it."""
        now = anyio.current_time()
        forgiven = (now - self._tamper_at) / TAMPER_FORGIVE_S if self._tampered else 0.0
        self._tamper_level = max(self._tamper_level - forgiven, 0.0) + 1
        self._tamper_at = now
        self._tampered += 1
        log.warning("%s", what)
        if self._tamper_level >= MAX_TAMPERED:
            raise ProtocolViolation(
                f"{self._tampered} frames failed to verify: someone is tampering with the "
                "connections, or a link corrupts data")

    def _bound(self) -> None:
        """The first admitted HELLO fixed the session's parameters: set up for them."""
        params = self._core.params
        assert params is not None
        self._counters.started = time.monotonic()
        self._checksum = ALGORITHMS[params.checksum][1] if params.checksum else None
        self._direct = (self.output.splice_sink is not None and self._checksum is None
                        and self._core.plaintext)
        extra = 0
        if params.compression:
            self._squeezer = Squeezer()
            self._compression = CompressionCounters("zstd")
            extra = compress_workers()  # the buffers chunks are decompressed into
        self._pool = BufferPool(params.chunk_size + self._core.overhead,
                                keep=self._core.max_buffers + extra)
        log.info("session %s: chunk %d bytes, window %d, checksum %s",
                 params.session_id.hex()[:12], params.chunk_size, params.window,
                 ALGORITHMS[params.checksum][0] if params.checksum else "off")




    # -- one connection ------------------------------------------------------------------




    # -- chunks straight to the sink -----------------------------------------------------





    def _chunk_written(self, length: int, conn: _Conn, *, buffered: bool) -> None:
        seq = self._core.written(length, buffered=buffered)
        self._counters.nbytes += length
        self._counters.chunks += 1
        self._progress.notify()
        # Tell the transmitter the window moved, on a connection that still lives.
        target = conn if not conn.closed else next(
            (c for c in self._conns.values() if not c.closed), None
        )
        if target is not None:
            target.queue(seq)

    # -- the end -------------------------------------------------------------------------



    async def _linger(self) -> None:
        """Stay reachable a little while after success, until the transmitter confirms.

        Normally its FIN arrives at once.  If BYE_OK was lost with its connection, the
        transmitter reconnects and learns from the WELCOME that all is written.
        """
        with anyio.move_on_after(LINGER):
            await self._confirmed.wait()
        self._complete.set()

    # -- the writer ----------------------------------------------------------------------



class _Connections:
    """What happens on each connection of the session: the handshake, then frames read and
    judged by the core, payloads moved, acknowledgements queued."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx

    async def _opening(self, conn: _Conn, reader: FrameReader) -> tuple[Hello, Auth] | None:
        """The connection's HELLO and first AUTH, or None if it said nothing useful in time."""
        self.rx._gate.pending += 1
        try:
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                hello = await reader.next_event()
                if isinstance(hello, ConnectionClosed):
                    return None
                assert isinstance(hello, Hello)  # the decoder accepts nothing else first
                refusal = self.rx._core.screen(hello)
                if refusal is not None:
                    await self._refuse(conn, refusal)
                    return None
                auth = await reader.next_event()
                if isinstance(auth, ConnectionClosed):
                    return None
                if not isinstance(auth, Auth):
                    raise RemoteProtocolError(f"{type(auth).__name__} where AUTH belongs")
                return hello, auth
        finally:
            self.rx._gate.pending -= 1
        self.rx._counters.rejected += 1
        log.warning("dropped connection from %s: no handshake within %g s", conn.name,
                    HANDSHAKE_TIMEOUT)
        return None

    async def _refuse(self, conn: _Conn, admission: Admission) -> None:
        self.rx._counters.rejected += 1
        if await self.rx._gate.answer_refusal(admission, conn.name):
            await conn.stream.send(encode(admission.welcome))

    async def _authenticate(self, conn: _Conn, reader: FrameReader, hello: Hello,
                            auth: Auth) -> Welcome | None:
        """Run the handshake after HELLO; the WELCOME to send, tags set up, or None if the
        connection did not prove itself (then it has been answered or dropped)."""
        rx, core = self.rx, self.rx._core
        refusal = core.admit(hello, auth.kind)
        if refusal is not None:
            await self._refuse(conn, refusal)
            return None
        pake = auth.kind == AuthKind.PAKE
        if pake:
            await rx._gate.before_key_exchange()
        try:
            attempt = rx_attempt(encode(hello), auth, keys=core.keys, password=rx._password,
                                 session_id=hello.session_id)
        except AuthFailed as exc:
            raise RemoteProtocolError(str(exc)) from None
        await conn.stream.send(encode(attempt.auth))
        proof: object = None  # stays None when the peer goes quiet or hangs up
        with anyio.move_on_after(HANDSHAKE_TIMEOUT):
            proof = await reader.next_event()
        try:
            if not isinstance(proof, Auth):
                raise AuthFailed("no proof")
            channel = attempt.check(proof)
        except AuthFailed:
            if pake:  # a wrong phrase, or a guess: counted, answered slowly, bounded
                failure = rx._gate.key_exchange_failed(conn.name)
                if failure is not None:
                    rx._fail(failure)
                await self._refuse(conn, Admission(
                    Welcome(int(WelcomeStatus.BAD_CHECKPHRASE), bytes(16), 0),
                    WELCOME_MEANING[WelcomeStatus.BAD_CHECKPHRASE]))
            elif not isinstance(proof, ConnectionClosed | None):
                # a join that hangs up or goes quiet before its proof (a cut link) forged nothing
                rx.tampered(f"connection from {conn.name} failed to prove it joins the session")
            return None
        unbound = core.params is None
        known = core.keys
        welcome = core.authenticated(hello, attempt.keys)
        if unbound:
            rx._bound()  # before any await: the next connection may bring DATA at once
        if core.keys is not known:
            rx._keyed()
        reader.decoder.checker = channel.checker
        conn.tagger = channel.tagger
        return welcome

    async def handle(self, conn: _Conn) -> None:
        reader = FrameReader(conn.stream, Decoder.for_receiver(stream_payload=True), greedy=False)
        opening = await self._opening(conn, reader)
        if opening is None:
            return
        hello, auth = opening
        welcome = await self._authenticate(conn, reader, hello, auth)
        if welcome is None:
            return
        said = encode(welcome, conn.tagger)
        if welcome.status == WelcomeStatus.SESSION_FAILED and self.rx._error is not None:
            # Why, right behind it: the transmitter may have no other connection to hear it on.
            error = self.rx._error
            said += encode(Error(_error_code(error), str(error)), conn.tagger)
        await conn.stream.send(said)
        if welcome.status == WelcomeStatus.SESSION_FAILED:
            return
        if welcome.status == WelcomeStatus.SESSION_OVER:
            # Our transmitter reconnected after losing BYE_OK: the WELCOME told it that every
            # chunk is written; its FIN confirms it heard that.
            log.info("told a reconnecting connection that the session is complete")
            await self._await_hangup(reader)
            return
        self._join(conn, hello)
        reader.decoder.max_payload = hello.chunk_size + self.rx._core.overhead
        with conn.scope, first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._conn_sender, conn, tg.cancel_scope)
                await self._receive_loop(conn, reader)
                tg.cancel_scope.cancel()

    def _join(self, conn: _Conn, hello: Hello) -> None:
        self.rx._last_activity = anyio.current_time()
        self.rx._counters.connections += 1
        conn.index = conn.link.index = hello.conn_index
        old = self.rx._conns.get(conn.index)
        if old is not None:
            log.info("connection %d from %s replaces a stale one", conn.index, conn.name)
            old.scope.cancel()
            self.rx._counters.reconnects += 1
        self.rx._conns[conn.index] = conn
        log.info("connection %d from %s accepted", conn.index, conn.name)

    async def _conn_sender(self, conn: _Conn, scope: anyio.CancelScope) -> None:
        try:
            await conn.sender(lambda: self.rx._core.reorder.written)
        except STREAM_ERRORS as exc:
            level = logging.DEBUG if self.rx._complete.is_set() else logging.WARNING
            log.log(level, "connection %d from %s broke: %s", conn.index, conn.name, why(exc))
            conn.closed = True
            scope.cancel()

    async def _receive_loop(self, conn: _Conn, reader: FrameReader) -> None:
        while True:
            event = await reader.next_event()
            self.rx._last_activity = anyio.current_time()
            if isinstance(event, DataHeader):
                await self._on_data(conn, reader, event)
            elif isinstance(event, Bye):
                await self._on_bye(conn, event)
                await self._await_hangup(reader)
                return
            elif isinstance(event, Fin):
                if self.rx._core.state is RxState.SUCCEEDED:
                    self.rx._confirmed.set()
                return
            elif isinstance(event, Error):
                raise RemoteFailure(f"the transmitter aborted: {event.message}")
            elif isinstance(event, ConnectionClosed):
                log.info("connection %d from %s closed", conn.index, conn.name)
                return
            else:  # pragma: no cover - a streaming receiver decoder yields nothing else
                raise ProtocolError(f"unexpected {type(event).__name__}")

    async def _on_data(self, conn: _Conn, reader: FrameReader, header: DataHeader) -> None:
        claim = self.rx._core.data(header.seq, header.length, header.compressed)
        if claim is not Claim.RECEIVE:
            await _discard(reader, self.rx._scratch, header.length)
            if claim is Claim.DISCARD_ACK:
                self.rx._counters.duplicates += 1
                conn.queue(header.seq)
            return
        if (self.rx._direct and not header.compressed
                and await self.rx.output.my_turn(conn, reader, header.seq)):
            try:
                await self.rx.output.splice_chunk(conn, reader, header)
            finally:
                self.rx._core.turn_over()
                self.rx.output.release()
            return
        assert self.rx._pool is not None
        buf = self.rx._pool.get()
        length = header.length
        try:
            view = memoryview(buf)[:length]
            await reader.read_payload_into(view)
            if self.rx._sealer is not None:
                length -= SEAL_OVERHEAD
                await self._open(conn, header, view)
            if header.compressed:
                buf, length = await self._inflate(conn, header, buf, length)
            if (self.rx._checksum and
                    self.rx._checksum(memoryview(buf)[:length]) != header.checksum):
                raise LinkBroken(f"checksum mismatch in chunk {header.seq}; discarded")
        except BaseException:
            self.rx._core.abandoned(header.seq)
            self.rx._pool.put(buf)
            raise
        filed = self.rx._core.received(header.seq, (buf, length, conn))
        if filed is Claim.RECEIVE:
            if self.rx._compression is not None:
                wire = header.length - (SEAL_OVERHEAD if self.rx._sealer else 0)
                self.rx._compression.count(length, wire, header.compressed)
            if header.seq == self.rx._core.reorder.written:
                self.rx.output.arrived.notify()
        else:
            self.rx._pool.put(buf)
            self.rx._counters.duplicates += 1
        if filed is not Claim.DISCARD:
            conn.queue(header.seq)
        conn.link.chunks += 1
        conn.link.nbytes += header.length



    async def _inflate(self, conn: _Conn, header: DataHeader, buf: bytearray,
                       length: int) -> tuple[bytearray, int]:
        """Decompress the ``length`` bytes in ``buf`` into another pooled buffer, in a worker
        thread; give ``buf`` back and return the other one and the chunk's length.  ``buf``
        stays the caller's if this raises."""
        rx = self.rx
        assert rx._squeezer is not None
        src = memoryview(buf)[:length]
        if 0 <= rx._squeezer.announced(src) <= INLINE_INFLATE_BYTES:
            return await self._inflate_into(conn, header, buf, src, threaded=False)
        # The second buffer only once a worker is free: waiting connections hold none.
        async with rx._inflating:
            return await self._inflate_into(conn, header, buf, src, threaded=True)

    async def _inflate_into(self, conn: _Conn, header: DataHeader, buf: bytearray,
                            src: memoryview, *, threaded: bool) -> tuple[bytearray, int]:
        rx = self.rx
        assert rx._pool is not None and rx._squeezer is not None and rx._core.params
        out = rx._pool.get()
        try:
            dst = memoryview(out)[: rx._core.params.chunk_size]
            if threaded:
                n = await anyio.to_thread.run_sync(rx._squeezer.decompress_into, src, dst)
            else:
                n = rx._squeezer.decompress_into(src, dst)
        except BadFrame as exc:
            rx._pool.put(out)
            if rx._sealer is not None:
                # It verified: the transmitter itself made it.  Sending it again cannot help.
                raise ProtocolViolation(
                    f"chunk {header.seq} from {conn.name} does not decompress: {exc}") from None
            rx.tampered(f"chunk {header.seq} from {conn.name} does not decompress ({exc}); "
                        "dropped with its connection, it will be sent again")
            raise LinkBroken(f"chunk {header.seq} does not decompress") from None
        except BaseException:
            rx._pool.put(out)
            raise
        rx._pool.put(buf)
        return out, n

    async def _open(self, conn: _Conn, header: DataHeader, view: memoryview) -> None:
        """Open a sealed chunk in place: on the event loop up to INLINE_SEAL_BYTES, else in a
        worker thread (the GIL is released while it runs, so other connections go on).  A
        chunk that fails to verify is dropped with its connection and comes again; too many
        such and the session ends."""
        sealer = self.rx._sealer
        assert sealer is not None
        head = bytearray(DATA_HEADER_SIZE)
        pack_data_header(head, header.seq, header.length, header.checksum, header.compressed)
        plain = view[: header.length - SEAL_OVERHEAD]
        try:
            if header.length <= INLINE_SEAL_BYTES:
                sealer.open_into(header.seq, bytes(head), view, plain)
            else:
                await anyio.to_thread.run_sync(sealer.open_into, header.seq, bytes(head), view,
                                               plain)
        except AuthFailed:
            self.rx.tampered(f"chunk {header.seq} from {conn.name} failed to verify; dropped "
                             "with its connection, it will be sent again")
            raise LinkBroken(f"chunk {header.seq} failed to verify") from None

    async def _on_bye(self, conn: _Conn, bye: Bye) -> None:
        core = self.rx._core
        core.bye(bye)
        while (answer := core.bye_answer()) is None:
            await self.rx._progress.wait()
        if core.state is not RxState.SUCCEEDED:
            await self.rx._sink.flush()
        frame = encode(answer)
        if not core.succeed():  # a BYE sent again after its connection broke
            conn.queue(frame, final=True)
            return
        # On every live connection, so that one lost reply cannot leave the transmitter
        # unsure of a complete transfer.
        for other in self.rx._conns.values():
            if not other.closed:
                other.queue(frame, final=True)
        # Started before any await: this connection may be cancelled from here on (replaced
        # by a reconnect, or broken), and the end of the session must not depend on it.
        assert self.rx._tg is not None
        self.rx._tg.start_soon(self.rx._linger)
        log.debug("BYE_OK queued after %d bytes; %d of %d chunks were spliced to the output",
                  bye.nbytes, self.rx.output.spliced, bye.chunks)

    async def _await_hangup(self, reader: FrameReader) -> None:
        """Wait for the transmitter's FIN: proof that it knows the session is complete, and
        so the last thing the receiver waits for before it exits."""
        with contextlib.suppress(LinkBroken, ProtocolError):
            if isinstance(await reader.next_event(), Fin):
                self.rx._confirmed.set()


class _Output:
    """Who writes to the sink, and when: the writer task, in sequence, from the reorder buffer;
    or, when a chunk arrives exactly in its turn, its connection, straight from the socket
    (splice, no copy).  One at a time: ``busy`` says the sink is taken."""

    def __init__(self, rx: Receiver, sink: Sink) -> None:
        self.rx = rx
        self.sink = sink
        self.splice_sink = sink if isinstance(sink, SpliceSink) and sink.can_splice else None
        self.busy = False
        self.spliced = 0  # chunks that went to the sink without a copy
        self.parked: dict[int, Notifier] = {}  # connections waiting for a chunk's turn, by seq
        self.arrived = Notifier()

    async def my_turn(self, conn: _Conn, reader: FrameReader, seq: int) -> bool:
        """Wait (a little) until chunk ``seq`` is the next to write and the sink is free; then
        hold the sink and say True.  False: take the buffered path after all.

        Leaving the payload in the socket meanwhile is what lets it skip our memory; the
        kernel's socket buffer holds it, and the transmitter's window bounds how much.
        """
        if not conn.spliceable or reader.decoder.buffered:
            return False
        reorder = self.rx._core.reorder
        # Woken only when this chunk's turn may have come, not at every chunk written.
        turn = self.parked.setdefault(seq, Notifier())
        try:
            with anyio.move_on_after(PARK_LIMIT):
                while reorder.written < seq or self.busy:
                    await turn.wait()
        finally:
            if self.parked.get(seq) is turn:
                del self.parked[seq]
        if self.busy or not self.rx._core.take_turn(seq):
            return False
        self.busy = True
        return True

    def next_turn(self) -> None:
        """The sink is free: wake the connection holding the next chunk, if one waits."""
        turn = self.parked.get(self.rx._core.reorder.written)
        if turn is not None:
            turn.notify()

    def release(self) -> None:
        self.busy = False
        self.next_turn()
        self.arrived.notify()  # the writer may hold the next chunk already

    async def splice_chunk(self, conn: _Conn, reader: FrameReader, header: DataHeader) -> None:
        """Move chunk ``header.seq`` (our turn, sink held) from the socket to the sink."""
        assert isinstance(conn.stream, SpliceTo) and self.splice_sink is not None
        core = self.rx._core
        length = header.length
        done = core.resume(header.seq, length)
        if done:  # a splice of this chunk broke off earlier: its first bytes are out already
            await _discard(reader, self.rx._scratch, done)

        def moved(n: int) -> None:
            reader.decoder.payload_consumed(n)
            core.partial += n

        try:
            await conn.stream.splice_to(self.splice_sink, length - done, moved)
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        self.spliced += 1
        if self.rx._compression is not None:
            self.rx._compression.count(length, length, compressed=False)
        self.rx._chunk_written(length, conn, buffered=False)
        conn.link.chunks += 1
        conn.link.nbytes += length

    async def writer(self) -> None:
        sink = self.sink
        core = self.rx._core
        while True:
            if self.busy or (ready := core.reorder.ready()) is None:
                await self.arrived.wait()
                continue
            # Stays in the reorder buffer while being written, so BYE sees it as present.
            buf, length, conn = ready
            done = core.resume(core.reorder.written, length)
            self.busy = True
            try:
                await sink.write(memoryview(buf)[done:length])
            finally:
                self.busy = False
            self.rx._chunk_written(length, conn, buffered=True)
            assert self.rx._pool is not None
            self.rx._pool.put(buf)
            self.next_turn()


async def _discard(reader: FrameReader, scratch: memoryview, length: int) -> None:
    """Read and drop a payload we do not need, through a small scratch buffer."""
    while length:
        n = min(length, SCRATCH_SIZE)
        await reader.read_payload_into(scratch[:n])
        length -= n


def _error_code(error: ViamillipedeError) -> int:
    """The ERROR code that tells the transmitter why the receiver gives up."""
    if isinstance(error, LocalIOError):
        return int(ErrorCode.SINK_FAILED)
    if isinstance(error, PeerTimeout):
        return int(ErrorCode.TIMEOUT)
    if isinstance(error, TruncatedStream):
        return int(ErrorCode.TOTALS_MISMATCH)
    return int(ErrorCode.ABORTED)


async def _close(stream: Any) -> None:
    # Closing a dead stream may fail in many ways; none of them matter any more.
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.aclose()
