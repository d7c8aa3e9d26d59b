"""The sending end of a session: the async driver around :class:`~viamillipede.txcore.Dispatcher`.

One task reads the source into chunks (:class:`~viamillipede.txsource.ChunkReader`); each of
``threads`` connection tasks opens its connection, says HELLO, and then sends whatever the
dispatcher tells it to, while a reader task hands every frame the receiver sends back to the
dispatcher and a watcher drops the connection when it stalls.  What a frame means and which
connection sends what next are decided in :mod:`viamillipede.txcore`; this module has the
tasks, the waiting and the bytes.

A connection that breaks, stalls, or whose receiver breaks the protocol is dropped: its chunks
go back to the front of the queue, and it reconnects with capped exponential backoff (so a dead
target is re-probed, never hammered).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable

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
    ViamillipedeError,
)
from .framing import STREAM_ERRORS, FrameReader, Notifier, first_error, why
from .keying import AuthFailed, TxKeying
from .monitor import NOTE, Reminder
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    default_window,
    encode_checkphrase,
)
from .squeeze import (
    MAX_LEVEL,
    MIN_LEVEL,
    AdaptivePolicy,
    CompressionCounters,
    CompressionStats,
    CpuMeter,
    FixedPolicy,
    Policy,
    Squeezer,
    compress_workers,
)
from .stats import Counters, LinkCounters, Report, TransferStats, link_stats, target_stats
from .streams import ConnectFailed
from .txcore import (
    FILL_BELOW_RTT,
    FILL_WINDOW_BYTES,
    Backoff,
    Dispatcher,
    Released,
    Step,
    Wakes,
    fill_threshold,
)
from .txsource import Chunk, ChunkReader, ChunkSender, Source
from .wire import (
    ERROR_MEANING,
    WELCOME_MEANING,
    Ack,
    Auth,
    Bye,
    ByeOk,
    ConnectionClosed,
    Decoder,
    Error,
    ErrorCode,
    Event,
    Feature,
    Fin,
    Hello,
    Mode,
    ProtocolError,
    RemoteProtocolError,
    Welcome,
    WelcomeStatus,
    encode,
)
from .wire.secure import INLINE_SEAL_BYTES, ChunkSealer, Tagger, password

__all__ = ["Connector", "Source", "Transmitter"]

log = logging.getLogger("viamillipede.tx")

#: Opens connection number ``index`` (0-based); raises ConnectFailed if it cannot.
Connector = Callable[[int], Awaitable[anyio.abc.ByteStream]]

@dataclasses.dataclass(slots=True)
class _Job:
    """A chunk being compressed and sealed by a worker."""

    seq: int
    level: int | None
    chunk: Chunk | None = None
    ready: anyio.Event = dataclasses.field(default_factory=anyio.Event)


class NotAReceiver(LinkBroken):
    """Whatever answered the connection did not complete a handshake: it said something that
    is not our protocol, or nothing at all before the deadline."""


#: How long a send that is only a courtesy (ERROR when failing, FIN after success) may take:
#: the receiver finds out by its own timeout or linger time if it does not arrive.
BEST_EFFORT_TIMEOUT = 2.0


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
        checkphrase: str | bytes = DEFAULT_CHECKPHRASE,
        key: bytes | None = None,
        plaintext: bool = False,
        idle_timeout: float = DEFAULT_TIMEOUT,
        describe: Callable[[int], str] | None = None,
        target: Callable[[int], str] | None = None,
        rank: Callable[[int], int] | None = None,
        session_id: bytes | None = None,
        compress: int | str | Policy | None = None,
    ) -> None:
        if not 1 <= threads <= 64:
            raise ValueError("threads must be between 1 and 64")
        window = window if window is not None else default_window(threads)
        self._connect = connect
        self._threads = threads
        self._window = window
        self._timeout = idle_timeout
        self._describe = describe or (lambda i: f"connection {i}")
        self.session_id = session_id if session_id is not None else os.urandom(16)
        algorithm = checksums.DEFAULT if checksum is True else int(checksum)
        if algorithm and not plaintext:
            log.info("checksum: not needed, every sealed chunk's tag already covers it")
            algorithm = 0
        # Compression: ``"auto"``, a zstd level, a Policy, or None (off).
        self._policy: Policy | None = None
        self._compression: CompressionCounters | None = None
        if compress == "auto":
            self._policy = AdaptivePolicy(window, idle=CpuMeter().idle)
        elif isinstance(compress, int) and not isinstance(compress, bool):
            if not MIN_LEVEL <= compress <= MAX_LEVEL or compress == 0:
                raise ValueError(f"zstd level {compress} is out of range ({MIN_LEVEL} to -1, "
                                 f"1 to {MAX_LEVEL})")
            self._policy = FixedPolicy(compress)
        elif compress is not None and not isinstance(compress, str | bool):
            self._policy = compress  # a policy of the caller's own
        elif compress is not None:
            raise ValueError(f"compress is 'auto', a zstd level, a policy or None, not "
                             f"{compress!r}")
        if self._policy is not None:
            self._compression = CompressionCounters(self._policy.describe())
            algorithm |= Feature.COMPRESSION_ZSTD
        self._hello = Hello(mode=int(Mode.PLAINTEXT) if plaintext else 0,
                            session_id=self.session_id, conn_index=0, chunk_size=chunk_size,
                            window=window, features=algorithm)
        keying = TxKeying(password(encode_checkphrase(checkphrase), key), self.session_id)
        ranks = [rank(i) if rank else 0 for i in range(threads)]
        fill = fill_threshold(window, chunk_size, below=FILL_BELOW_RTT,
                              per_bytes=FILL_WINDOW_BYTES)
        checksum_id = algorithm & Feature.CHECKSUM_MASK
        digest = checksums.ALGORITHMS[checksum_id][1] if checksum_id else None
        self._counters = Counters("tx")
        name_target = target or (lambda i: "receiver")
        self._target_of = [name_target(i) for i in range(threads)]
        # Most preferred first, each once: the order the waiting notices name them in.
        self._targets = sorted(dict.fromkeys(self._target_of),
                               key=lambda t: ranks[self._target_of.index(t)])
        self._links = {i: LinkCounters(i, self._target_of[i]) for i in range(threads)}
        sealers: list[ChunkSealer] = []

        async def sealer() -> ChunkSealer:
            """The session's sealer, once the first connection's key exchange is done."""
            if not sealers:
                await self._shared.keyed.wait()
                assert keying.keys is not None
                sealers.append(ChunkSealer(keying.keys.data_tx, self.session_id, chunk_size))
            return sealers[0]

        self._shared = _Shared(
            Dispatcher(window, ranks, fill_below=fill),
            ChunkReader(source, chunk_size, keep=window + threads, checksum=digest,
                        sealer=None if plaintext else sealer, compress=compress is not None),
            self._counters, self._links, keying)
        self._error: ViamillipedeError | None = None
        self._last_connect_error = ""
        self._trouble: dict[str, str] = {}  # target -> why its last attempt failed
        self._not_receivers: dict[str, str] = {}  # target -> what it did instead of WELCOME

    # -- public --------------------------------------------------------------------------

    def statistics(self) -> TransferStats:
        snap = self._counters.snapshot()
        return dataclasses.replace(snap, retransmits=self._shared.core.window.retransmits)

    def report(self) -> Report:
        now = anyio.current_time()
        sw = self._shared.core.window
        links = [link_stats(link, sw.inflight(i), now) for i, link in self._links.items()]
        return Report(
            totals=self.statistics(),
            window=self._window,
            window_used=sw.next_seq - sw.written,
            reorder_depth=0,
            connections=tuple(links),
            targets=target_stats(links),
            compression=self._compression.snapshot() if self._compression else None,
        )

    def compression(self) -> CompressionStats | None:
        """What compression did so far; None when it is off."""
        return self._compression.snapshot() if self._compression else None

    def abort(self, reason: str = "interrupted") -> None:
        """Stop the session from outside (e.g. on Ctrl-C); the receiver is told why."""
        self._fail(Interrupted(reason))

    async def run(self) -> TransferStats:
        """Send the whole source; return only once the receiver confirmed every byte."""
        done = self._shared.done
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guard, self._read_source)
            tg.start_soon(self._guard, self._watchdog)
            tg.start_soon(self._report_waiting)
            for i in range(self._threads):
                tg.start_soon(self._guard, self._connection_loop, i)
            await done.wait()
            if self._error is not None:
                await self._shared.tell_receiver(self._error)
            tg.cancel_scope.cancel()
        if self._error is not None:
            raise self._error
        return self.statistics()

    # -- plumbing ------------------------------------------------------------------------

    def _fail(self, exc: ViamillipedeError) -> None:
        if self._error is None:
            self._error = exc
        self._shared.done.set()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await fn(*args)
        except ViamillipedeError as exc:
            self._fail(exc)

    async def _read_source(self) -> None:
        if self._policy is not None:
            await self._read_compressing(self._policy)
            return
        shared = self._shared
        core, chunks, counters = shared.core, shared.chunks, self._counters
        while True:
            while not core.can_add():
                await shared.acked.wait()
            chunk = await chunks.next(core.window.next_seq)
            if chunk is None:
                shared.wake(core.end_of_stream(anyio.current_time()))
                log.debug("end of input after %d bytes in %d chunks", core.nbytes,
                          core.window.next_seq)
                return
            counters.chunks += 1
            counters.nbytes += chunk.raw
            shared.wake(core.add(chunk, chunk.raw, anyio.current_time()))

    async def _read_compressing(self, policy: Policy) -> None:
        """The source, compressed and sealed by a few workers in parallel (the sidechain),
        added to the window in order.

        One task reads; each chunk read goes to a worker thread, at most ``workers`` at once,
        and into a queue of the same length; this task takes them from the queue in order as
        they are done.  What the reader waits for (room in the window, or a free worker) is
        what the policy learns from.  Chunks being prepared count against the window, so the
        memory bound stays ``window x chunk`` plus one buffer per worker.
        """
        shared = self._shared
        core, chunks, counters = shared.core, shared.chunks, self._counters
        stats = self._compression
        assert stats is not None
        shared.policy = policy
        squeezer = Squeezer()
        adaptive = policy if isinstance(policy, AdaptivePolicy) else None
        told = 0
        workers = compress_workers()
        free = anyio.Semaphore(workers)
        send, receive = anyio.create_memory_object_stream[_Job](workers)

        async def prepare(job: _Job, buf: bytearray, n: int, sealer: ChunkSealer | None) -> None:
            try:
                job.chunk = await anyio.to_thread.run_sync(
                    chunks.prepare, job.seq, buf, n, job.level, squeezer, sealer)
            finally:
                free.release()
                job.ready.set()

        queued = 0  # jobs in the queue, not yet added to the window

        def accept(level: int | None, chunk: Chunk) -> None:
            """Chunk ``seq`` is ready and every chunk before it is in the window: add it."""
            nonlocal told
            now = anyio.current_time()
            policy.done(level, chunk.raw, chunk.length, now)
            if adaptive is not None and told < adaptive.decided:
                for line in list(adaptive.decisions)[told - adaptive.decided:]:
                    log.debug("compression at %s", line)
                told = adaptive.decided
            stats.count(chunk.raw, chunk.length, chunk.length < chunk.raw)
            stats.setting = policy.describe()
            counters.chunks += 1
            counters.nbytes += chunk.raw
            shared.wake(core.add(chunk, chunk.raw, now))

        async def feed(tg: anyio.abc.TaskGroup) -> None:
            nonlocal queued
            async with send:
                seq = core.window.next_seq
                while True:
                    asked = anyio.current_time()
                    while not core.can_add(seq - core.window.next_seq) or (
                            (cap := policy.read_ahead()) is not None
                            and seq >= core.window.written + cap):
                        await shared.acked.wait()
                    room = anyio.current_time()
                    raw = await chunks.read_raw()
                    if raw is None:
                        return
                    sealer = await chunks.sealer()
                    read = anyio.current_time()
                    policy.waited(read, window=room - asked)
                    job = _Job(seq, policy.level(read))
                    seq += 1
                    if job.level is None and raw[1] <= INLINE_SEAL_BYTES:
                        # Not compressed: sealed here, as without compression (a worker's
                        # hop costs more than the seal); straight into the window if no
                        # chunk before it is still being prepared.
                        chunk = chunks.prepare(job.seq, raw[0], raw[1], None, squeezer, sealer)
                        if not queued:
                            accept(None, chunk)
                            continue
                        job.chunk = chunk
                        job.ready.set()
                    else:
                        await free.acquire()
                        policy.waited(anyio.current_time(),
                                      worker=anyio.current_time() - read)
                        tg.start_soon(prepare, job, raw[0], raw[1], sealer)
                    queued += 1
                    await send.send(job)

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed, tg)
            async with receive:
                async for job in receive:
                    await job.ready.wait()
                    queued -= 1
                    if job.chunk is None:  # its worker failed: the task group has the error
                        return
                    accept(job.level, job.chunk)
        shared.wake(core.end_of_stream(anyio.current_time()))
        log.debug("end of input after %d bytes in %d chunks; %s", core.nbytes,
                  core.window.next_seq, stats.snapshot().summary())

    async def _watchdog(self) -> None:
        core = self._shared.core
        started = anyio.current_time()
        while True:
            now = anyio.current_time()
            idle = core.idle_for(now)
            if self._counters.connections == 0:
                idle = max(idle, now - started)
            if idle >= self._timeout:
                raise self._timeout_error()
            await anyio.sleep(self._timeout - idle)

    async def _report_waiting(self) -> None:
        """Say at the default verbosity that no connection is up, and what each target did,
        at growing intervals (a typo and a slow start look alike otherwise)."""
        shared = self._shared
        reminder = Reminder()
        while True:
            since = shared.down_since
            if since is None:
                await shared.went_down.wait()
                continue
            due = reminder.due(since)
            if anyio.current_time() < due:
                await anyio.sleep_until(due)
                continue
            reminder.told()
            log.log(NOTE, "%s", self._waiting_line(anyio.current_time() - since))

    def _waiting_line(self, waited: float) -> str:
        tried = "; ".join(f"{t} ({self._trouble.get(t, 'connecting')})" for t in self._targets)
        if self._counters.connections == 0:
            return f"no receiver has answered for {waited:.0f} s; trying {tried}"
        sw = self._shared.core.window
        return (f"no connection to the receiver for {waited:.0f} s "
                f"({sw.written} of {sw.next_seq} chunks confirmed written); trying {tried}")

    def _not_a_receiver(self, target: str, why: str) -> None:
        """``target`` failed a handshake that way; once every target has and none ever
        answered, nothing there is a receiver and waiting out the timeout helps nobody."""
        self._not_receivers[target] = why
        if self._counters.connections or set(self._targets) - set(self._not_receivers):
            return
        if len(self._targets) == 1:
            raise ProtocolViolation(f"{target} is not a viamillipede receiver: {why}")
        raise ProtocolViolation("no target is a viamillipede receiver: " + "; ".join(
            f"{t} ({self._not_receivers[t]})" for t in self._targets))

    def _timeout_error(self) -> PeerTimeout:
        if self._counters.connections == 0:
            return PeerTimeout(
                f"could not reach any receiver for {self._timeout:g} s "
                f"(last error: {self._last_connect_error or 'none'})"
            )
        sw = self._shared.core.window
        return PeerTimeout(
            f"no progress from the receiver for {self._timeout:g} s "
            f"({sw.written} of {sw.next_seq} chunks confirmed written); is it still running?"
        )

    # -- connections ---------------------------------------------------------------------

    async def _connection_loop(self, conn: int) -> None:
        """Keep connection ``conn`` up until the session ends, reconnecting with backoff."""
        backoff = Backoff()
        name = self._describe(conn)
        target = self._target_of[conn]
        link = self._links[conn]
        hello = dataclasses.replace(self._hello, conn_index=conn)
        done = self._shared.done
        connected = False
        while True:
            link.state, link.next_try = "connecting", None
            held = await _Held.exchange(self._shared)
            if held.exchanging and target in self._not_receivers and (
                    set(self._targets) - set(self._not_receivers)):
                # This target failed a key exchange already: a target not yet tried goes
                # first, or a silent one would hold the exchange for every connection it has.
                held.release()
                delay = backoff.next()
                link.state, link.next_try = "backoff", anyio.current_time() + delay
                await anyio.sleep(delay)
                continue
            try:
                stream = await self._connect(conn)
            except BaseException as exc:
                held.release()
                if not isinstance(exc, ConnectFailed):
                    raise
                self._last_connect_error = str(exc)
                self._trouble[target] = exc.reason
                delay = backoff.next()
                log.info("%s: %s; next try in %.1f s", name, exc, delay)
                link.state, link.next_try = "down", anyio.current_time() + delay
                await anyio.sleep(delay)
                continue
            self._trouble[target] = "connected; no answer to HELLO yet"
            if connected:
                self._counters.reconnects += 1
                link.reconnects += 1
            connected = True
            connection = _Connection(self._shared, conn, name, stream,
                                     lambda: self._trouble.pop(target, None))
            try:
                async with stream:
                    await connection.run(hello, held)
                return  # the session is over
            except LinkBroken as exc:
                self._trouble[target] = str(exc)
                if isinstance(exc, NotAReceiver):
                    self._not_a_receiver(target, str(exc))
                if connection.progressed:
                    backoff.reset()  # it worked for a while: a quick reconnect is fair
                delay = backoff.next()
                # When a receiver fails it hangs up on every connection and sends ERROR on
                # some: wait out the backoff first, so that a session ending this way is
                # reported once, by its reason, not by every connection it took down.
                link.state, link.next_try = "backoff", anyio.current_time() + delay
                with anyio.move_on_after(delay):
                    await done.wait()
                if done.is_set():
                    return
                log.warning("%s broke: %s; its chunks went to the other connections", name,
                            why(exc))


class _Held:
    """The key exchange, held by the connection that will run it (or nothing, for a join).

    One connection at a time exchanges keys; the others wait for it *before* they connect:
    a connection opened meanwhile would sit silent, and the receiver drops a connection that
    says nothing for its handshake timeout, which a key exchange with a target that is not a
    receiver takes to fail.  Released once, by whichever comes first: the handshake's end or
    a failure to connect."""

    def __init__(self, lock: anyio.Lock | None) -> None:
        self._lock = lock

    @classmethod
    async def exchange(cls, shared: _Shared) -> _Held:
        if shared.keying.keys is not None:
            return cls(None)
        await shared.key_exchange.acquire()
        if shared.keying.keys is not None:  # another connection agreed them meanwhile
            shared.key_exchange.release()
            return cls(None)
        return cls(shared.key_exchange)

    @property
    def exchanging(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _Shared:
    """What the tasks of one transmitter share: the dispatcher, the chunks, the wake-ups."""

    def __init__(self, core: Dispatcher[Chunk], chunks: ChunkReader, counters: Counters,
                 links: dict[int, LinkCounters], keying: TxKeying) -> None:
        self.core = core
        self.keying = keying
        self.keyed = anyio.Event()  # the first connection's key exchange is confirmed
        self.key_exchange = anyio.Lock()  # one at a time: the others then join
        self.chunks = chunks
        self.counters = counters
        self.links = links
        self.acked = Notifier()  # a useful ACK arrived: window or in-flight room may be free
        self.turns: dict[int, anyio.Event] = {}  # idle connections, each woken by its event
        self.done = anyio.Event()
        # Handshaken streams by connection, with the tagger of their control frames.
        self.live: dict[int, tuple[anyio.abc.ByteStream, Tagger]] = {}
        self.down_since: float | None = anyio.current_time()  # since when none is live
        self.went_down = Notifier()
        self.mid_send: set[int] = set()  # connections whose stream is inside a frame
        self.policy: Policy | None = None  # compression's, told how fast chunks are acked

    def up(self, conn: int, stream: anyio.abc.ByteStream, tagger: Tagger) -> None:
        self.live[conn] = (stream, tagger)
        self.down_since = None

    def down(self, conn: int) -> None:
        self.live.pop(conn, None)
        if not self.live and self.down_since is None:
            self.down_since = anyio.current_time()
            self.went_down.notify()

    def wake(self, conns: Wakes) -> None:
        for conn in conns:
            event = self.turns.pop(conn, None)
            if event is not None:
                event.set()

    async def wait_turn(self, conn: int) -> None:
        """Wait until the dispatcher wakes ``conn`` (it said IDLE just now)."""
        event = anyio.Event()
        self.turns[conn] = event
        try:
            await event.wait()
        finally:
            if self.turns.get(conn) is event:
                del self.turns[conn]

    def released(self, result: Released[Chunk]) -> None:
        """Chunks were acknowledged: reuse their buffers once no send of them is running."""
        items, wakes = result
        for chunk in items:
            chunk.acked = True
            if chunk.sending == 0:
                self.chunks.release(chunk)
        if self.policy is not None and items:
            self.policy.acked(sum(chunk.raw for chunk in items), anyio.current_time())
        self.acked.notify()
        self.wake(wakes)

    async def confirm(self, stream: anyio.abc.ByteStream, tagger: Tagger) -> None:
        """Tell the receiver we know it is done (FIN), so it can stop listening; then finish.

        Best effort: if FIN is lost too, the receiver stops waiting after its linger time.
        """
        with anyio.move_on_after(BEST_EFFORT_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
            await stream.send(encode(Fin(*self.core.totals()), tagger))
        self.done.set()

    async def await_reason(self) -> None:
        """A tagged WELCOME said the receiver's session has failed: it says why (ERROR) on the
        connections it still has, which may be read a moment later than this one.  Wait for
        that (briefly), so that the session ends with the receiver's reason, not with "see its
        error"."""
        if self.live:
            with anyio.move_on_after(BEST_EFFORT_TIMEOUT):
                await self.done.wait()

    async def tell_receiver(self, error: ViamillipedeError) -> None:
        """Best effort: say ERROR on every connection that sits at a frame boundary, so the
        receiver stops at once instead of waiting out its timeout."""
        if isinstance(error, (RemoteFailure, PeerRejected)):
            return  # the receiver ended it, or will not talk to us
        code = ErrorCode.ABORTED if isinstance(error, Interrupted) else ErrorCode.SOURCE_FAILED
        error_frame = Error(int(code), str(error))
        with anyio.move_on_after(BEST_EFFORT_TIMEOUT):
            for conn, (stream, tagger) in list(self.live.items()):
                if conn not in self.mid_send:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await stream.send(encode(error_frame, tagger))


class _Connection:
    """One stream of connection ``conn``: HELLO, then chunks out and ACKs in, until it is
    dropped (:meth:`run` raises LinkBroken) or the session ends."""

    def __init__(self, shared: _Shared, conn: int, name: str,
                 stream: anyio.abc.ByteStream, on_up: Callable[[], object]) -> None:
        self._shared = shared
        self._on_up = on_up
        self._conn = conn
        self._name = name
        self._stream = stream
        self.progressed = False  # a useful ACK arrived here: reconnect quickly if it breaks
        self._tagger: Tagger | None = None

    async def run(self, hello: Hello, held: _Held) -> None:
        """Returns once the session is over; raises LinkBroken to have the connection dropped
        (a broken stream, a stall, a frame the receiver had no business sending)."""
        shared, core, conn = self._shared, self._shared.core, self._conn
        reader = FrameReader(self._stream, Decoder.for_transmitter(), greedy=True)
        try:  # with the key exchange held (no keys yet), or a join
            handshake = await self._handshake(reader, hello)
        finally:
            held.release()  # the others that waited for the keys join at once
        welcome, tagger = handshake
        self._tagger = tagger
        if welcome.status == WelcomeStatus.SESSION_OVER:
            # Our BYE_OK was lost with its connection; this WELCOME says the same thing.
            core.on_session_over(welcome.written)
            log.debug("the receiver reports the session complete")
            await shared.confirm(self._stream, tagger)
            return
        try:
            shared.released(core.on_welcome(conn, welcome.written, anyio.current_time()))
            shared.counters.connections += 1
            shared.links[conn].state = "up"
            shared.up(conn, self._stream, tagger)
            self._on_up()
            log.info("%s: connected", self._name)
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_acks, reader)
                    tg.start_soon(self._watch_stall)
                    await self._send_loop()
        except RemoteProtocolError as exc:
            raise LinkBroken(f"protocol violation: {exc}") from exc
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        finally:
            shared.down(conn)
            shared.mid_send.discard(conn)  # the next stream of this index starts clean
            lost = core.window.inflight(conn)
            shared.wake(core.connection_lost(conn))
            shared.links[conn].retransmits += lost

    async def _handshake(self, reader: FrameReader, hello: Hello) -> tuple[Welcome, Tagger]:
        """HELLO and the key exchange (or join); the receiver's WELCOME, checked, and the
        tagger for our control frames on this connection."""
        keying = self._shared.keying
        hello_frame = encode(hello)
        attempt = keying.start(hello_frame)
        limit = self._shared.core.handshake_limit()
        try:
            with anyio.fail_after(limit):
                await self._stream.send(hello_frame + encode(attempt.auth))
                answer = await reader.next_event()
        except TimeoutError:
            raise NotAReceiver(f"no answer to HELLO in {limit:g} s") from None
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        except ProtocolError as exc:
            # Not a flaky link: whatever listens there does not speak our protocol.
            raise NotAReceiver(what_answered(reader.decoder.peek(24), exc)) from exc
        if not isinstance(answer, Auth):
            if keying.keys is not None and isinstance(answer, Welcome):
                # Anyone on the path can say this: only a proven WELCOME may end a session.
                raise LinkBroken(f"refused without proof (status {answer.status})")
            check_welcome(answer, hello)
            raise ProtocolViolation("the receiver accepted a connection without a handshake")
        try:
            proof = attempt.answer(answer)
        except AuthFailed:
            if attempt.joining:
                raise LinkBroken("the receiver could not prove it holds the session's keys; "
                                 "is someone in the middle?") from None
            raise PeerRejected("the receiver does not share our checkphrase or key (its proof "
                               "failed); both ends must use the same") from None
        channel = attempt.channel()
        reader.decoder.checker = channel.checker
        try:
            with anyio.fail_after(limit):
                await self._stream.send(encode(proof))
                answer = await reader.next_event()
        except TimeoutError:
            raise LinkBroken("no WELCOME after the handshake") from None
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        except ProtocolError as exc:
            raise LinkBroken(f"handshake: {exc}") from exc
        if isinstance(answer, Welcome) and answer.status == WelcomeStatus.SESSION_FAILED:
            # The receiver says why right behind it (a tagged ERROR); an older one does not,
            # but may still say it on the connections we have up.
            with anyio.move_on_after(BEST_EFFORT_TIMEOUT):
                with contextlib.suppress(*STREAM_ERRORS, ProtocolError):
                    reason = await reader.next_event()
                    if isinstance(reason, Error):
                        raise remote_failure(reason)
            await self._shared.await_reason()
        welcome = check_welcome(answer, hello)
        attempt.welcomed()
        if not self._shared.keyed.is_set():
            log.debug("session keys agreed (%s)", "plaintext data" if hello.mode else "sealed")
            self._shared.keyed.set()
        return welcome, channel.tagger

    def _control(self, event: Bye) -> bytes:
        assert self._tagger is not None
        return encode(event, self._tagger)

    async def _send_loop(self) -> None:
        """Do what the dispatcher says, until the connection fails."""
        shared, core, conn = self._shared, self._shared.core, self._conn
        sender = ChunkSender(self._stream, shared.chunks)
        link = shared.links[conn]
        done = shared.done
        while True:
            if done.is_set():
                await anyio.sleep_forever()  # the end: only ERROR may still go out
            step, taken, wakes = core.step(conn, anyio.current_time())
            if wakes:
                shared.wake(wakes)
            if step is Step.SEND_CHUNK:
                assert taken is not None
                await self._send_chunk(sender, taken[1], link)
            elif step is Step.BUSY:
                await shared.acked.wait()  # busy: leave new chunks to other connections
            elif step is Step.IDLE:
                await shared.wait_turn(conn)
            elif step is Step.SEND_BYE:
                shared.mid_send.add(conn)
                await self._stream.send(self._control(Bye(*core.totals())))
                shared.mid_send.discard(conn)
            else:
                await anyio.sleep_forever()  # the session succeeded

    async def _send_chunk(self, sender: ChunkSender, chunk: Chunk, link: LinkCounters) -> None:
        shared = self._shared
        chunk.sending += 1
        shared.mid_send.add(self._conn)
        try:
            await sender.send(chunk)
            shared.mid_send.discard(self._conn)  # only a completed send ends the frame
            link.chunks += 1
            link.nbytes += chunk.length
        finally:
            chunk.sending -= 1
            if chunk.acked and chunk.sending == 0:
                shared.chunks.release(chunk)

    async def _read_acks(self, reader: FrameReader) -> None:
        shared, core, conn = self._shared, self._shared.core, self._conn
        while True:
            event = await reader.next_event()
            if isinstance(event, Ack):
                result = core.on_ack(conn, event.seq, event.written, anyio.current_time())
                if result is not None:
                    self.progressed = True
                    shared.released(result)
            elif isinstance(event, ByeOk):
                core.on_bye_ok(conn, event.chunks, event.nbytes)
                log.debug("receiver confirmed %d bytes", event.nbytes)
                assert self._tagger is not None
                await shared.confirm(reader.stream, self._tagger)
                return
            elif isinstance(event, Error):
                raise remote_failure(event)
            elif isinstance(event, ConnectionClosed):
                raise LinkBroken("the receiver closed the connection")
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} from the receiver")

    async def _watch_stall(self) -> None:
        core, conn = self._shared.core, self._conn
        while True:
            stalled, limit = core.stall(conn, anyio.current_time())
            if stalled >= limit:
                raise LinkBroken(f"stalled: no acknowledgement for {stalled:.1f} s")
            # A floor, or float rounding near the deadline could make this loop spin.
            await anyio.sleep(min(max(limit - stalled, 0.01), 1.0))


#: What well-known services say first, so a wrong port is named by what is listening there.
#: A web server answers a request line that names no HTTP version (HTTP/0.9) with a bare page.
_GREETINGS = {b"HTTP/": "HTTP", b"<!DOCTYPE": "HTTP", b"<html": "HTTP", b"SSH-": "SSH",
              b"220 ": "an FTP or SMTP greeting", b"+OK": "a POP3 greeting",
              b"* OK": "an IMAP greeting", b"\x15\x03": "TLS"}


def what_answered(seen: bytes, exc: ProtocolError) -> str:
    """Say what a peer that is not a receiver sent instead of WELCOME."""
    for prefix, service in _GREETINGS.items():
        if seen.startswith(prefix):
            line = seen.split(b"\r", 1)[0].split(b"\n", 1)[0]
            shown = line.decode("ascii", "replace") if line.isascii() else ""
            return f"answered with {service}" + (f" ({shown!r})" if shown else "")
    return f"answered with bytes that are not a WELCOME ({seen[:8].hex(' ')}: {exc})"


def remote_failure(error: Error) -> RemoteFailure:
    """What an ERROR from the receiver ends the session with."""
    if error.code == ErrorCode.SINK_FAILED:
        return RemoteFailure(f"{ERROR_MEANING[ErrorCode.SINK_FAILED]}: {error.message}")
    return RemoteFailure(f"the receiver aborted: {error.message}")


def check_welcome(answer: Event, hello: Hello) -> Welcome:
    """The answer to ``hello`` if it lets the connection go on (ACCEPTED, or SESSION_OVER for
    our session); otherwise raises what the session ends with."""
    if isinstance(answer, Error):
        raise remote_failure(answer)
    if isinstance(answer, ConnectionClosed):
        raise LinkBroken("the receiver closed the connection during the handshake")
    if not isinstance(answer, Welcome):  # pragma: no cover - the decoder forbids it
        raise ProtocolViolation(f"expected WELCOME, got {answer!r}")
    status = answer.status
    ours = answer.session_id == hello.session_id
    if status == WelcomeStatus.ACCEPTED:
        if not ours:
            raise PeerRejected(
                "the receiver answered for another session; is another transmitter using it?")
        return answer
    if status == WelcomeStatus.SESSION_OVER:
        if not ours:
            raise PeerRejected("the receiver has already finished another session")
        return answer
    if status == WelcomeStatus.BAD_CHECKPHRASE:
        raise PeerRejected("the receiver does not share our checkphrase or key; "
                           "both ends must use the same")
    if status == WelcomeStatus.BAD_MODE:
        mine = "with" if hello.mode & Mode.PLAINTEXT else "without"
        raise PeerRejected(f"the receiver was not started {mine} plaintext; give plaintext to "
                           "both ends or to neither")
    if status == WelcomeStatus.WRONG_SESSION:
        raise PeerRejected("the receiver is busy with another session; start a fresh receiver")
    if status == WelcomeStatus.BAD_VERSION:
        raise PeerRejected("the receiver speaks another protocol version; upgrade both ends")
    if status == WelcomeStatus.BAD_PARAMETERS:
        raise PeerRejected(
            f"the receiver refused chunk size {hello.chunk_size} / window {hello.window} "
            f"({WELCOME_MEANING[WelcomeStatus.BAD_PARAMETERS]})")
    if status == WelcomeStatus.SESSION_FAILED:
        raise RemoteFailure("the receiver's session has failed; see its error")
    raise PeerRejected(f"the receiver refused the connection (status {status})")
