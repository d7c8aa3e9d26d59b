"""A regular file as the source: chunks are regions of it, sent with sendfile, re-read on loss."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc
import pytest

from viamillipede import BufferSink, Receiver, Transmitter, receive
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
    """Passes ``send_file`` through to a real socket stream, but the first generation of each
    connection breaks after ``after`` regions: their chunks must be re-read from the file."""

    def __init__(self, inner: anyio.abc.ByteStream, after: int | None, log: list[str]) -> None:
        super().__init__(inner)
        self.after, self.log = after, log

    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        if self.after is not None:
            if self.after == 0:
                self.log.append("broke")
                await self.inner.aclose()
                raise anyio.BrokenResourceError("broken on purpose")
            self.after -= 1
        self.log.append(f"region {offset}")
        await self.inner.send_file(header, fd, offset, count)  # type: ignore[attr-defined]

    async def receive_into(self, view: memoryview) -> int:
        return await self.inner.receive_into(view)  # type: ignore[attr-defined, no-any-return]


async def test_a_file_is_sent_from_the_page_cache_and_lost_regions_are_reread(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    f, data, _path = payload
    log: list[str] = []
    sink = BufferSink()
    with anyio.fail_after(30):
        source = FdSource(f.fileno())
        assert source.file_fd == f.fileno()
        async with anyio.create_task_group() as tg:
            port = await tg.start(receive, sink, 0)
            tx = tcp_transmitter(
                source, [("127.0.0.1", port)], threads=3, chunk_size=CHUNK,
                wrap=lambda i, gen, s: Breaking(s, 2 if gen == 0 and i < 2 else None, log),
            )
            stats = await tx.run()
        assert f.tell() == len(data), "the file position is left where a read would leave it"
    assert sink.data == data
    assert log.count("broke") == 2
    assert stats.retransmits >= 1
    assert sum(1 for entry in log if entry.startswith("region")) >= len(data) // CHUNK + 1


async def test_a_file_over_streams_without_sendfile_is_read_into_buffers(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    f, data, _path = payload
    sink = BufferSink()
    with anyio.fail_after(30):
        f.seek(1000)  # a file handed over part-read is sent from where it stands
        net = MemoryNetwork()
        tx = Transmitter(FdSource(f.fileno()), net.connect, threads=2, chunk_size=CHUNK)
        async with anyio.create_task_group() as tg:
            tg.start_soon(Receiver(sink).serve, net)
            await tx.run()
            tg.cancel_scope.cancel()
    assert sink.data == data[1000:]


@pytest.mark.parametrize("checksum", [False, True])
async def test_a_file_changed_under_a_checksummed_transfer_fails_loudly(
    payload: tuple[BinaryIO, bytes, Path], checksum: bool
) -> None:
    """Without checksums a region is read when it is sent, as by any file copier.  With them,
    a region is hashed when claimed; changed before it is sent, the receiver refuses it, and
    the re-send finds the change: an error, not a chunk failing its checksum for ever."""
    f, data, _path = payload
    taken = anyio.Event()

    class Watched(FdSource):
        def claim(self, size: int) -> tuple[int, int]:
            region = super().claim(size)
            if not checksum:
                taken.set()
            return region

        async def pread(self, view: memoryview, offset: int) -> None:
            await super().pread(view, offset)
            taken.set()  # with checksums: the region has been read for its hash

    net = MemoryNetwork()
    sink = BufferSink()
    changed = b"X" * 10 + data[10:]

    modified = []

    async def connect(index: int) -> anyio.abc.ByteStream:
        if not modified:
            await taken.wait()  # the first chunk is claimed (and hashed): nothing sent yet
            os.pwrite(f.fileno(), b"X" * 10, 0)
            modified.append(True)
        return await net.connect(index)

    tx = Transmitter(Watched(f.fileno()), connect, threads=1, chunk_size=CHUNK,
                     checksum=checksum)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Receiver(sink).serve, net)
            if checksum:
                with pytest.raises(LocalIOError, match="changed while it was being sent"):
                    await tx.run()
            else:
                await tx.run()
            tg.cancel_scope.cancel()
    if checksum:
        assert not sink.data.startswith(b"X"), "a changed chunk reached the output"
    else:
        assert sink.data == changed


async def test_a_file_that_shrinks_while_sent_fails_loudly(
    payload: tuple[BinaryIO, bytes, Path],
) -> None:
    f, _data, path = payload

    class Truncating(Breaking):
        async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
            os.truncate(path, 0)
            await super().send_file(header, fd, offset, count)

    sink = BufferSink()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(receive, sink, 0)
            tx = tcp_transmitter(FdSource(f.fileno()), [("127.0.0.1", port)], threads=2,
                                 chunk_size=CHUNK,
                                 wrap=lambda i, gen, s: Truncating(s, None, []))
            with pytest.raises(LocalIOError, match="shrank"):
                await tx.run()
            tg.cancel_scope.cancel()
