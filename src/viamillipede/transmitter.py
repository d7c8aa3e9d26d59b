"""The sending end of a session.

One reader task fills chunk buffers from the source; ``threads`` connection tasks take chunks
from a shared outbox and send them; each connection's ACK reader releases chunks the receiver
has confirmed.  A chunk lives in ``_unacked`` from the moment it is read until an ACK names it
(or the receiver's ``written`` passes it), so whatever a broken connection had in flight is put
back at the front of the outbox for the others.

The outbox is a deque with a notifier rather than a memory channel because re-queued chunks
must jump ahead of fresh ones, which a FIFO channel cannot express.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc

from .errors import (
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
from .stats import Counters, TransferStats
from .transport import ConnectFailed
from .wire import (
    DATA_HEADER_SIZE,
    Ack,
    Bye,
    ByeOk,
    ConnectionClosed,
    Decoder,
    Error,
    ErrorCode,
    Feature,
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


#: Opens connection number ``index`` (0-based); raises ConnectFailed if it cannot.
Connector = Callable[[int], Awaitable[anyio.abc.ByteStream]]


class _Chunk:
    __slots__ = ("acked", "buf", "length", "sending", "seq")

    def __init__(self, seq: int, buf: bytearray, length: int) -> None:
        self.seq = seq
        self.buf = buf
        self.length = length
        self.sending = 0
        self.acked = False

    def frame(self) -> memoryview:
        return memoryview(self.buf)[: DATA_HEADER_SIZE + self.length]


class _SessionOver(Exception):
    """The receiver already completed our session when this connection arrived."""


class _Bye:
    """The token that tells whichever connection takes it to send BYE."""


_BYE = _Bye()


class _Outbox:
    __slots__ = ("_bye", "_changed", "_fresh", "_retry")

    def __init__(self) -> None:
        self._retry: deque[_Chunk] = deque()
        self._fresh: deque[_Chunk] = deque()
        self._bye = False
        self._changed = Notifier()

    def put(self, chunk: _Chunk) -> None:
        self._fresh.append(chunk)
        self._changed.notify()

    def requeue(self, chunks: list[_Chunk]) -> None:
        """Put chunks back in front, lowest sequence first: the receiver is waiting on those."""
        self._retry.extendleft(sorted(chunks, key=lambda c: c.seq, reverse=True))
        self._changed.notify()

    def put_bye(self) -> None:
        self._bye = True
        self._changed.notify()

    async def get(self) -> _Chunk | _Bye:
        while True:
            while self._retry:
                chunk = self._retry.popleft()
                if not chunk.acked:
                    return chunk
            if self._fresh:
                return self._fresh.popleft()
            if self._bye:
                self._bye = False
                return _BYE
            await self._changed.wait()


class Transmitter:
    """Sends everything ``source`` yields over ``threads`` connections opened by ``connect``."""

    def __init__(
        self,
        source: Source,
        connect: Connector,
        *,
        threads: int = DEFAULT_THREADS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window: int | None = None,
        checksum: bool = False,
        checkphrase: str = DEFAULT_CHECKPHRASE,
        idle_timeout: float = DEFAULT_TIMEOUT,
        describe: Callable[[int], str] | None = None,
        session_id: bytes | None = None,
    ) -> None:
        if not 1 <= threads <= 64:
            raise ValueError("threads must be between 1 and 64")
        self._source = source
        self._connect = connect
        self._threads = threads
        self._chunk_size = chunk_size
        self._window = window if window is not None else default_window(threads)
        self._checksum = checksum
        self._checkphrase_text = checkphrase
        self._checkphrase = encode_checkphrase(checkphrase)
        self._timeout = idle_timeout
        self._describe = describe or (lambda i: f"connection {i}")
        self.session_id = session_id if session_id is not None else os.urandom(16)
        self._features = int(Feature.CHECKSUM_CRC32) if checksum else 0

        self._pool = BufferPool(DATA_HEADER_SIZE + chunk_size, keep=self._window + threads)
        self._outbox = _Outbox()
        self._unacked: dict[int, _Chunk] = {}
        self._written = 0
        self._progress = Notifier()
        self._eof = False
        self._total_chunks = 0
        self._total_bytes = 0
        self._bye_queued = False
        self._done = anyio.Event()
        self._error: ViamillipedeError | None = None
        self._scope: anyio.CancelScope | None = None
        self._last_progress = 0.0
        self._last_connect_error = ""
        self._counters = Counters("tx")

    # -- public --------------------------------------------------------------------------

    def statistics(self) -> TransferStats:
        return self._counters.snapshot()

    async def run(self) -> TransferStats:
        """Send the whole source; return only once the receiver confirmed every byte."""
        self._last_progress = anyio.current_time()
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            tg.start_soon(self._guard, self._read_source)
            tg.start_soon(self._guard, self._watchdog)
            for i in range(self._threads):
                tg.start_soon(self._guard, self._connection_loop, i)
            await self._done.wait()
            tg.cancel_scope.cancel()
        if self._error is not None:
            raise self._error
        return self._counters.snapshot()

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

    def _on_ack(self, seq: int, written: int) -> None:
        self._last_progress = anyio.current_time()
        if written > self._written:
            self._written = written
            for s in [s for s in self._unacked if s < written]:
                self._release(self._unacked.pop(s))
            self._progress.notify()
        chunk = self._unacked.pop(seq, None)
        if chunk is not None:
            self._release(chunk)
        self._maybe_finish()

    def _release(self, chunk: _Chunk) -> None:
        chunk.acked = True
        if chunk.sending == 0:
            self._pool.put(chunk.buf)

    def _maybe_finish(self) -> None:
        if self._eof and not self._unacked and not self._bye_queued:
            self._bye_queued = True
            self._outbox.put_bye()

    # -- source --------------------------------------------------------------------------

    async def _read_source(self) -> None:
        size = self._chunk_size
        seq = 0
        while True:
            while seq >= self._written + self._window:
                await self._progress.wait()
            buf = self._pool.get()
            view = memoryview(buf)
            n = 0
            eof = False
            end = DATA_HEADER_SIZE + size
            while n < size:
                got = await self._source.readinto(view[DATA_HEADER_SIZE + n : end])
                if got == 0:
                    eof = True
                    break
                n += got
            if n:
                payload = view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n]
                crc = zlib.crc32(payload) if self._checksum else 0
                pack_data_header(buf, seq, n, crc)
                chunk = _Chunk(seq, buf, n)
                if not self._unacked:
                    self._last_progress = anyio.current_time()
                self._unacked[seq] = chunk
                self._outbox.put(chunk)
                self._counters.chunks += 1
                self._counters.nbytes += n
                self._total_bytes += n
                seq += 1
            else:
                self._pool.put(buf)
            if eof:
                self._total_chunks = seq
                self._eof = True
                log.debug("end of input after %d bytes in %d chunks", self._total_bytes, seq)
                self._maybe_finish()
                return

    async def _watchdog(self) -> None:
        while True:
            deadline = self._last_progress + self._timeout
            now = anyio.current_time()
            if now < deadline:
                await anyio.sleep(deadline - now)
                continue
            if self._counters.connections == 0:
                raise PeerTimeout(
                    f"could not reach any receiver for {self._timeout:g} s "
                    f"(last error: {self._last_connect_error or 'none'})"
                )
            if self._unacked or self._bye_queued:
                raise PeerTimeout(
                    f"no progress from the receiver for {self._timeout:g} s "
                    f"({self._written} chunks confirmed written); is it still running?"
                )
            # Waiting on a slow source is not the receiver's fault.
            self._last_progress = now

    # -- connections ---------------------------------------------------------------------

    async def _connection_loop(self, index: int) -> None:
        delay = 0.05
        name = self._describe(index)
        first = True
        while True:
            try:
                stream = await self._connect(index)
            except ConnectFailed as exc:
                self._last_connect_error = str(exc)
                log.info("%s: %s; retrying in %.2f s", name, exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not first:
                self._counters.reconnects += 1
            first = False
            try:
                async with stream:
                    await self._serve(index, name, stream)
            except _SessionOver:
                await self._done.wait()
                return
            except LinkBroken as exc:
                log.warning("%s broke: %s; its chunks go to the other connections", name, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _serve(self, index: int, name: str, stream: anyio.abc.ByteStream) -> None:
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
            await stream.send(encode(hello))
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                welcome = await reader.next_event()
        except TimeoutError:
            raise LinkBroken("no answer to HELLO") from None
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        except ProtocolError as exc:
            raise LinkBroken(f"the receiver speaks garbage: {exc}") from exc
        self._check_welcome(welcome)
        assert isinstance(welcome, Welcome)
        self._counters.connections += 1
        log.info("%s: connected", name)
        self._on_ack(-1, welcome.written)

        inflight: set[int] = set()
        bye_sent: list[bool] = []
        try:
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_acks, reader, inflight)
                    await self._send_chunks(stream, inflight, bye_sent)
        except (ProtocolError, *STREAM_ERRORS) as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc
        finally:
            if not self._done.is_set():
                lost = [self._unacked[s] for s in inflight if s in self._unacked]
                if lost:
                    self._counters.retransmits += len(lost)
                    self._outbox.requeue(lost)
                if bye_sent:
                    self._outbox.put_bye()

    async def _send_chunks(
        self, stream: anyio.abc.ByteStream, inflight: set[int], bye_sent: list[bool]
    ) -> None:
        """Take chunks from the outbox and send them, until the connection fails."""
        while True:
            item = await self._outbox.get()
            if isinstance(item, _Bye):
                bye_sent.append(True)
                await stream.send(encode(Bye(self._total_chunks, self._total_bytes)))
                continue
            # Recorded before sending: if the send fails half-way, the chunk is re-queued.
            inflight.add(item.seq)
            item.sending += 1
            try:
                await stream.send(item.frame())  # type: ignore[arg-type]  # any buffer works
            finally:
                item.sending -= 1
                if item.acked and item.sending == 0:
                    self._pool.put(item.buf)

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
        if status == WelcomeStatus.SESSION_OVER:
            if welcome.session_id == self.session_id:
                raise _SessionOver  # ours: BYE_OK is on its way over another connection
            raise PeerRejected("the receiver has already finished another session")
        raise PeerRejected(f"the receiver refused the connection (status {status})")

    async def _read_acks(self, reader: FrameReader, inflight: set[int]) -> None:
        while True:
            event = await reader.next_event()
            if isinstance(event, Ack):
                inflight.discard(event.seq)
                self._on_ack(event.seq, event.written)
            elif isinstance(event, ByeOk):
                if (event.chunks, event.nbytes) != (self._total_chunks, self._total_bytes):
                    raise TruncatedStream(
                        f"the receiver confirmed {event.nbytes} bytes, we sent {self._total_bytes}"
                    )
                log.debug("receiver confirmed %d bytes", event.nbytes)
                self._done.set()
                return
            elif isinstance(event, Error):
                if event.code == ErrorCode.SINK_FAILED:
                    raise RemoteFailure(f"the receiver's output failed: {event.message}")
                raise RemoteFailure(f"the receiver aborted: {event.message}")
            elif isinstance(event, ConnectionClosed):
                raise LinkBroken("the receiver closed the connection")
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} from the receiver")
