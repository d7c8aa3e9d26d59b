"""The public library API: send a byte source to receivers, or serve one session to a sink.

Everything is written against anyio, so these coroutines run in a Trio program or an asyncio
program alike.  The command line is a thin shell over :func:`send` and :func:`receive`.
Each half is imported when first used, so a process pays only for the end it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from .options import (
    CONNECT_TIMEOUT,
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
)
from .stats import TransferStats
from .transport import ConnectFailed, connect, listen

if TYPE_CHECKING:
    from .receiver import Receiver, Sink
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
    checkphrase: str = DEFAULT_CHECKPHRASE,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ClientWrapper | None = None,
) -> TransferStats:
    """Send everything ``source`` yields to the receiver(s) at ``targets``.

    ``targets`` are in preference order: the first is filled before the next gets chunks.
    Returns once the receiver confirmed that every byte was written; raises a
    :class:`~viamillipede.errors.ViamillipedeError` subclass otherwise.
    """
    tx = tcp_transmitter(
        source, targets, threads=threads, chunk_size=chunk_size, window=window,
        checksum=checksum, checkphrase=checkphrase, idle_timeout=idle_timeout, wrap=wrap,
    )
    return await tx.run()


def tcp_transmitter(
    source: Source,
    targets: Sequence[Target],
    *,
    threads: int = DEFAULT_THREADS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int | None = None,
    checksum: bool | int = False,
    checkphrase: str = DEFAULT_CHECKPHRASE,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ClientWrapper | None = None,
) -> Transmitter:
    """The transmitter :func:`send` runs, for callers that want its reports or to abort it."""
    plan = spread(targets, threads)
    generations = [0] * threads

    async def open_connection(index: int) -> anyio.abc.ByteStream:
        host, port = plan[index]
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                stream: anyio.abc.ByteStream = await connect(host, port)
        except TimeoutError:
            raise ConnectFailed(f"connecting to {host} port {port} timed out") from None
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
        idle_timeout=idle_timeout,
        describe=lambda i: f"connection {i} to {plan[i][0]}:{plan[i][1]}",
        target=lambda i: f"{plan[i][0]}:{plan[i][1]}",
        rank=lambda i: list(targets).index(plan[i]),
    )


async def receive(
    sink: Sink,
    port: int,
    *,
    host: str | None = None,
    checkphrase: str = DEFAULT_CHECKPHRASE,
    idle_timeout: float = DEFAULT_TIMEOUT,
    wrap: ServerWrapper | None = None,
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> TransferStats:
    """Listen on ``port`` and write one session's stream, in order, to ``sink``.

    Use with ``await task_group.start(receive, sink, 0)`` to learn the bound port (0 picks a
    free one) once the socket is listening.
    """
    from .receiver import Receiver

    receiver = Receiver(sink, checkphrase=checkphrase, idle_timeout=idle_timeout)
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
    tcp = listen(port, host)
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
