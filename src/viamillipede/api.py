"""The public library API: send a byte source to receivers, or serve one session to a sink.

Everything is written against anyio, so these coroutines run in a Trio program or an asyncio
program alike.  The command line is a thin shell over :func:`send` and :func:`receive`.
Each half is imported when first used, so a process pays only for the end it runs.

Failures reach the caller as one :class:`~viamillipede.errors.ViamillipedeError` subclass,
never as an exception group: whatever a caller's source or sink raises (from ``readinto``,
``write`` or ``flush``) ends the session as a :class:`~viamillipede.errors.LocalIOError` whose
``__cause__`` is the original, and the peer is told at once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from .errors import CannotListen, LocalIOError, ViamillipedeError, cannot_resolve
from .framing import leaves
from .options import (
    CONNECT_TIMEOUT,
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
)
from .ratelimit import limit_sink, limit_source
from .stats import TransferStats
from .transport import ConnectFailed, FdSink, FdSource, connect, listen

if TYPE_CHECKING:
    from .receiver import Receiver, Sink
    from .squeeze import Policy
    from .transmitter import Source, Transmitter

Target = tuple[str, int]


#: Puts a wrapper (e.g. fault injection) around a new transmitter connection:
#: ``wrap(connection index, reconnect generation, stream)``.
ClientWrapper = Callable[[int, int, anyio.abc.ByteStream], anyio.abc.ByteStream]
#: The same for the receiver: ``wrap(accept counter, stream)``.
ServerWrapper = Callable[[int, anyio.abc.ByteStream], anyio.abc.ByteStream]


def spread(targets: Sequence[Target], threads: int) -> list[Target]:
    """Which target each connection uses: round-robin over the list, as the C original does,
    so a target named twice gets twice the share."""
    if not targets:
        raise ValueError("at least one target is needed")
    return [targets[i % len(targets)] for i in range(threads)]


async def send(
    source: Source,
    targets: Sequence[Target],
    *,
    threads: int = DEFAULT_THREADS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int | None = None,
    checksum: bool | int = False,
    checkphrase: str | bytes = DEFAULT_CHECKPHRASE,
    key: bytes | None = None,
    plaintext: bool = False,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ClientWrapper | None = None,
    limit: float | None = None,
    retry_resolve: bool = False,
    compress: int | str | Policy | None = None,
) -> TransferStats:
    """Send everything ``source`` yields to the receiver(s) at ``targets``.

    ``targets`` are in preference order: the first is filled before the next gets chunks.
    Every target's name is resolved first: one that does not resolve raises
    :class:`~viamillipede.errors.CannotResolve` at once, unless ``retry_resolve`` asks to keep
    trying (until ``idle_timeout``).  ``limit`` caps the stream at that many bytes per second.
    The session is encrypted and authenticated with keys agreed from ``checkphrase`` (or the
    32-byte ``key``); ``plaintext`` sends the data in clear (the receiver must say so too).
    ``compress`` is ``"auto"`` (compress while the network, not the CPU, holds the stream
    back), a zstd level, or None; the receiver follows without being told.
    Returns once the receiver confirmed that every byte was written; raises a
    :class:`~viamillipede.errors.ViamillipedeError` subclass otherwise.
    """
    with single_error():
        if not retry_resolve:
            await resolve_targets(targets)
        tx = tcp_transmitter(
            source, targets, threads=threads, chunk_size=chunk_size, window=window,
            checksum=checksum, checkphrase=checkphrase, key=key, plaintext=plaintext,
            idle_timeout=idle_timeout, wrap=wrap, limit=limit, compress=compress,
        )
        return await tx.run()


async def resolve_targets(targets: Sequence[Target]) -> None:
    """Check that every target's host name resolves; raise
    :class:`~viamillipede.errors.CannotResolve` naming the first that does not."""
    for host in dict.fromkeys(host for host, _port in targets):
        try:
            await anyio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise cannot_resolve(host, exc) from exc


def tcp_transmitter(
    source: Source,
    targets: Sequence[Target],
    *,
    threads: int = DEFAULT_THREADS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int | None = None,
    checksum: bool | int = False,
    checkphrase: str | bytes = DEFAULT_CHECKPHRASE,
    key: bytes | None = None,
    plaintext: bool = False,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ClientWrapper | None = None,
    limit: float | None = None,
    compress: int | str | Policy | None = None,
) -> Transmitter:
    """The transmitter :func:`send` runs, for callers that want its reports or to abort it.

    Its names are not resolved beforehand (see :func:`resolve_targets`): a target that does not
    resolve is retried like one that does not answer.
    """
    plan = spread(targets, threads)
    source = guarded_source(source)
    if limit is not None:
        source = limit_source(source, limit, chunk_size)
    generations = [0] * threads

    async def open_connection(index: int) -> anyio.abc.ByteStream:
        host, port = plan[index]
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                stream: anyio.abc.ByteStream = await connect(host, port)
        except TimeoutError:
            raise ConnectFailed(f"connecting to {host} port {port} timed out",
                                "connecting timed out") from None
        generation = generations[index]
        generations[index] += 1
        return wrap(index, generation, stream) if wrap else stream

    from .transmitter import Transmitter

    return Transmitter(
        source,
        open_connection,
        threads=threads,
        chunk_size=chunk_size,
        window=window,
        checksum=checksum,
        checkphrase=checkphrase,
        key=key,
        plaintext=plaintext,
        idle_timeout=idle_timeout,
        describe=lambda i: f"connection {i} to {plan[i][0]}:{plan[i][1]}",
        target=lambda i: f"{plan[i][0]}:{plan[i][1]}",
        rank=lambda i: list(targets).index(plan[i]),
        compress=compress,
    )


async def receive(
    sink: Sink,
    port: int,
    *,
    host: str | None = None,
    checkphrase: str | bytes = DEFAULT_CHECKPHRASE,
    key: bytes | None = None,
    plaintext: bool = False,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ServerWrapper | None = None,
    limit: float | None = None,
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> TransferStats:
    """Listen on ``port`` and write one session's stream, in order, to ``sink``.

    Use with ``await task_group.start(receive, sink, 0)`` to learn the bound port (0 picks a
    free one) once the socket is listening.  ``limit`` caps the writes to ``sink`` at that many
    bytes per second (and so, by back-pressure, the whole session).  Raises a
    :class:`~viamillipede.errors.ViamillipedeError` subclass if the session fails.
    """
    from .receiver import Receiver

    out = guarded_sink(sink)
    if limit is not None:
        out = limit_sink(out, limit)
    with single_error():
        receiver = Receiver(out, checkphrase=checkphrase, key=key, plaintext=plaintext,
                            idle_timeout=idle_timeout)
        return await serve_tcp(receiver, port, host=host, wrap=wrap, task_status=task_status)


async def serve_tcp(
    receiver: Receiver,
    port: int,
    *,
    host: str | None = None,
    wrap: ServerWrapper | None = None,
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> TransferStats:
    """Serve ``receiver``'s session on a TCP port (what :func:`receive` does with its own)."""
    try:
        tcp = listen(port, host)
    except CannotListen as exc:
        if host is None:
            raise
        raise CannotListen(str(exc).replace(" on port ", f" on {host} port ", 1)) from exc
    except OSError as exc:  # the address does not resolve
        raise CannotListen(
            f"cannot listen on {host} port {port}: {cannot_resolve(str(host), exc)}"
        ) from exc
    accepted = 0

    class _Wrapped:
        async def accept(self) -> anyio.abc.ByteStream:
            nonlocal accepted
            stream: anyio.abc.ByteStream = await tcp.accept()
            accepted += 1
            return wrap(accepted - 1, stream) if wrap else stream

    try:
        task_status.started(tcp.port)
        return await receiver.serve(_Wrapped())
    finally:
        await tcp.aclose()


class BytesSource:
    """A source over an in-memory buffer (tests, small payloads)."""

    cancel_safe = True  # a cancelled read has taken nothing

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    async def readinto(self, view: memoryview) -> int:
        await anyio.lowlevel.checkpoint()
        n = min(len(view), len(self._view) - self._pos)
        view[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class StreamSource:
    """A source over any anyio byte stream (a subprocess's stdout, a TLS stream...)."""

    cancel_safe = True  # anyio streams lose nothing when a receive is cancelled

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._pending = b""

    async def readinto(self, view: memoryview) -> int:
        if not self._pending:
            try:
                self._pending = await self._stream.receive(len(view))
            except anyio.EndOfStream:
                return 0
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class BufferSink:
    """A sink that keeps everything in memory (tests, small payloads)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.flushed = False

    async def write(self, data: memoryview) -> None:
        self.data += data
        await anyio.lowlevel.checkpoint()

    async def flush(self) -> None:
        self.flushed = True


class StreamSink:
    """A sink over any anyio byte stream; copies each chunk, since chunk buffers are reused."""

    def __init__(self, stream: anyio.abc.ByteSendStream) -> None:
        self._stream = stream

    async def write(self, data: memoryview) -> None:
        await self._stream.send(bytes(data))

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()


# -- a caller's source and sink ------------------------------------------------------------


def _failed(what: str, exc: Exception) -> LocalIOError:
    error = LocalIOError(f"{what} failed: {exc!r}")
    error.__cause__ = exc
    return error


class GuardedSource:
    """A caller's source whose every failure is a :class:`~viamillipede.errors.LocalIOError`
    (the original as its ``__cause__``), so the session ends as a local I/O failure and the
    receiver is told, instead of the exception tearing the transmitter's tasks down."""

    def __init__(self, source: Source) -> None:
        self.inner = source
        self.cancel_safe = bool(getattr(source, "cancel_safe", False))

    async def readinto(self, view: memoryview) -> int:
        try:
            return await self.inner.readinto(view)
        except ViamillipedeError:
            raise
        except Exception as exc:
            raise _failed("the source", exc) from exc


class GuardedSink:
    """A caller's sink whose every failure is a :class:`~viamillipede.errors.LocalIOError`
    (the original as its ``__cause__``): the receiver tells the transmitter that its output
    failed, and both ends stop at once."""

    def __init__(self, sink: Sink) -> None:
        self.inner = sink

    @property
    def nbytes(self) -> int | None:
        count = getattr(self.inner, "nbytes", None)
        return count if isinstance(count, int) else None

    async def write(self, data: memoryview) -> None:
        try:
            await self.inner.write(data)
        except ViamillipedeError:
            raise
        except Exception as exc:
            raise _failed("the sink", exc) from exc

    async def flush(self) -> None:
        try:
            await self.inner.flush()
        except ViamillipedeError:
            raise
        except Exception as exc:
            raise _failed("the sink", exc) from exc


def guarded_source(source: Source) -> Source:
    """``source`` with its failures turned into ``LocalIOError``; a descriptor source of this
    package is returned as it is (it reports its failures so already, and a regular file must
    stay a file the kernel can send from)."""
    if isinstance(source, FdSource | GuardedSource):
        return source
    return GuardedSource(source)


def guarded_sink(sink: Sink) -> Sink:
    """``sink`` with its failures turned into ``LocalIOError``; a descriptor sink of this
    package is returned as it is (it reports its failures so already, and keeps splicing)."""
    if isinstance(sink, FdSink | GuardedSink):
        return sink
    return GuardedSink(sink)


@contextmanager
def single_error() -> Iterator[None]:
    """Let no exception group out: a group (from a task group) is replaced by the one error in
    it that matters, a :class:`~viamillipede.errors.ViamillipedeError` if there is one.  That
    error keeps its own ``__cause__``."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = list(leaves(group))
        real = [e for e in found if isinstance(e, Exception)]  # not cancellations
        ours = [e for e in real if isinstance(e, ViamillipedeError)]
        error = (ours or real or found)[0]
        error.__suppress_context__ = True  # the group is noise; a __cause__ is still shown
        raise error  # noqa: B904  # deliberately not "from": that would erase its __cause__
