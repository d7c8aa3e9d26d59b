"""A regular file as the source: chunks are regions of it, sent with sendfile, re-read on loss.

Regions go by reference only in plaintext mode (given to both ends): a sealed chunk must be in
memory to be sealed, so an encrypted session reads a file like a pipe.  The tests of the
zero-copy paths run in plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc
import pytest

from harness import loopback_receiver, run_session
from viamillipede import BufferSink
from viamillipede.api import tcp_transmitter
from viamillipede.errors import LocalIOError
from viamillipede.testing import MemoryNetwork, PassThrough
from viamillipede.transport import FdSource

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024


@pytest.fixture
def payload(tmp_path: Path) -> Iterator[tuple[BinaryIO, bytes, Path]]:
    """The input file, opened (async tests may not open files), its bytes and its path."""
    data = os.urandom(40 * CHUNK + 123)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    with open(path, "r+b") as f:
        yield f, data, path


class Breaking(PassThrough):
    """Passes ``send_file`` and ``send_pages`` through to a real socket stream, but the first
    generation of each connection breaks after ``after`` chunks: their chunks must be sent
    again (re-read from the file, or from the buffer that still holds them)."""

    def __init__(self, inner: anyio.abc.ByteStream, after: int | None, log: list[str]) -> None:
        super().__init__(inner)
        self.after, self.log = after, log

    async def _count(self, entry: str) -> None:
        if self.after is not None:
            if self.after == 0:
                self.log.append("broke")
                await self.inner.aclose()
                raise anyio.BrokenResourceError("broken on purpose")
            self.after -= 1
        self.log.append(entry)

    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        await self._count(f"region {offset}")
        await self.inner.send_file(header, fd, offset, count)  # type: ignore[attr-defined]

    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        await self._count("pages")
        await self.inner.send_pages(header, payload)  # type: ignore[attr-defined]

    async def receive_into(self, view: memoryview) -> int:
        return await self.inner.receive_into(view)  # type: ignore[attr-defined, no-any-return]


async def test_a_file_is_sent_from_the_page_cache_and_lost_regions_are_reread(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    f, data, _path = payload
    log: list[str] = []
    sink = BufferSink()
    source = FdSource(f.fileno())
    assert source.file_fd == f.fileno()
    async with loopback_receiver(sink, plaintext=True) as rx:
        tx = tcp_transmitter(
            source, rx.targets, threads=3, chunk_size=CHUNK, plaintext=True,
            wrap=lambda i, gen, s: Breaking(s, 2 if gen == 0 and i < 2 else None, log),
        )
        stats = await tx.run()
    assert f.tell() == len(data), "the file position is left where a read would leave it"
    assert sink.data == data
    assert log.count("broke") == 2
    assert stats.retransmits >= 1
    assert sum(1 for entry in log if entry.startswith("region")) >= len(data) // CHUNK + 1


async def test_with_checksums_a_file_is_read_once_and_sent_by_reference(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    """With checksums each region is read (and hashed) once into a buffer, whose pages then go
    to the socket by reference; the buffer outlives the send until the chunk is acknowledged, so
    chunks lost with a broken connection are sent again from it, and no reuse of a buffer
    shows in the output."""
    f, data, _path = payload
    log: list[str] = []
    reads: list[int] = []

    class Counted(FdSource):
        async def pread(
            self, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
        ) -> int:
            reads.append(offset)
            return await super().pread(view, offset, digest)

    sink = BufferSink()
    async with loopback_receiver(sink, plaintext=True) as rx:
        tx = tcp_transmitter(
            Counted(f.fileno()), rx.targets, threads=3, chunk_size=CHUNK, checksum=True,
            plaintext=True,
            wrap=lambda i, gen, s: Breaking(s, 2 if gen == 0 and i < 2 else None, log),
        )
        stats = await tx.run()
    assert sink.data == data
    assert log.count("broke") == 2
    assert stats.retransmits >= 1
    assert sorted(reads) == list(range(0, len(data), CHUNK)), "each region read exactly once"
    # Every region went out whole at least once by reference, the two that broke mid-send
    # included; not "reads + retransmits": a chunk re-queued with its connection may be
    # released by a later cumulative ACK (the receiver had it) before it is sent again.
    assert log.count("pages") >= len(reads)


@pytest.mark.parametrize("plaintext", [True, False], ids=["regions", "sealed"])
async def test_a_file_over_streams_without_sendfile_is_read_into_buffers(
    payload: tuple[BinaryIO, bytes, Path], plaintext: bool
) -> None:
    """In plaintext each region is read (pread) when it is sent; sealed, the file is read in
    order like a pipe."""
    f, data, _path = payload
    f.seek(1000)  # a file handed over part-read is sent from where it stands
    session = await run_session(FdSource(f.fileno()), threads=2, chunk_size=CHUNK,
                                plaintext=plaintext, rx_options={"plaintext": plaintext})
    assert session.received == data[1000:]


@pytest.mark.parametrize("checksum", [False, True])
async def test_a_file_changed_under_the_transfer_arrives_as_it_was_read(
    payload: tuple[BinaryIO, bytes, Path], checksum: bool
) -> None:
    """Without checksums a region is read when it is sent, as by any file copier, so a change
    made before that shows.  With them, a region is read once, when claimed, to be hashed, and
    sent from that copy: what arrives is what was read and hashed, never a mix of the two."""
    f, data, _path = payload
    taken = anyio.Event()

    class Watched(FdSource):
        def claim(self, size: int) -> tuple[int, int]:
            region = super().claim(size)
            if not checksum:
                taken.set()
            return region

        async def pread(
            self, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
        ) -> int:
            crc = await super().pread(view, offset, digest)
            taken.set()  # with checksums: the region has been read and hashed
            return crc

    net = MemoryNetwork()
    modified = []

    async def connect(index: int) -> anyio.abc.ByteStream:
        if not modified:
            await taken.wait()  # the first chunk is claimed (and read): nothing sent yet
            os.pwrite(f.fileno(), b"X" * 10, 0)
            modified.append(True)
        return await net.connect(index)

    session = await run_session(Watched(f.fileno()), net=net, connect=connect, threads=1,
                                chunk_size=CHUNK, checksum=checksum, plaintext=True,
                                rx_options={"plaintext": True})
    assert session.received == (data if checksum else b"X" * 10 + data[10:])


async def test_a_file_that_shrinks_while_sent_fails_loudly(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    f, _data, path = payload

    class Truncating(Breaking):
        async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
            os.truncate(path, 0)
            await super().send_file(header, fd, offset, count)

    async with loopback_receiver(BufferSink(), plaintext=True) as rx:
        tx = tcp_transmitter(FdSource(f.fileno()), rx.targets, threads=2, chunk_size=CHUNK,
                             plaintext=True, wrap=lambda i, gen, s: Truncating(s, None, []))
        with pytest.raises(LocalIOError, match="shrank"):
            await tx.run()
        rx.stop()
