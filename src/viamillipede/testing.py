"""In-memory networking for tests: whole sessions without sockets, on any anyio backend.

Public because applications embedding viamillipede want to test their own code the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .streams import ConnectFailed


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-memory, bounded (so back-pressured) bidirectional byte stream."""

    def __init__(
        self,
        send: MemoryObjectSendStream[bytes],
        receive: MemoryObjectReceiveStream[bytes],
        peer: str,
    ) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""
        self.peer = peer

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        if item:
            await self._send.send(bytes(item))
        else:
            await anyio.lowlevel.checkpoint()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._receive.receive()
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}


class PassThrough(anyio.abc.ByteStream):
    """A stream wrapper that hands everything to ``inner``: subclass it and override the one
    operation a test wants to watch or break."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def memory_stream_pair(
    buffer: int = 16, names: tuple[str, str] = ("left", "right")
) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-memory byte streams, each buffering at most ``buffer`` writes."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    return (
        MemoryByteStream(a_send, a_receive, names[1]),
        MemoryByteStream(b_send, b_receive, names[0]),
    )


class MemoryNetwork:
    """A listener and a connector joined in memory.

    ``connect(index)`` hands the server end to ``accept()``; set ``refuse`` to make connects
    fail as a refused TCP connect would, and ``wrap`` to put any stream wrapper (e.g. fault
    injection) on the client end.
    """

    def __init__(self, buffer: int = 16) -> None:
        self._buffer = buffer
        self._send, self._receive = anyio.create_memory_object_stream[MemoryByteStream](64)
        self.refuse = False
        self.connections: list[MemoryByteStream] = []
        self.wrap: Callable[[int, anyio.abc.ByteStream], anyio.abc.ByteStream] | None = None

    async def connect(self, index: int) -> anyio.abc.ByteStream:
        if self.refuse:
            await anyio.lowlevel.checkpoint()
            raise ConnectFailed("connection refused (memory network)")
        client, server = memory_stream_pair(self._buffer, (f"tx{index}", "rx"))
        self.connections.append(client)
        await self._send.send(server)
        return self.wrap(index, client) if self.wrap else client

    async def accept(self) -> anyio.abc.ByteStream:
        return await self._receive.receive()
