"""Chunks of the sending end: how the source becomes chunks, and how a chunk goes out.

A chunk is either a whole DATA frame in a pooled buffer, or (from a regular file without
checksums) only its header, its payload staying in the file until the kernel sends it from
there.  :class:`ChunkReader` is the only code that reads the source; :class:`ChunkSender` the
only code that puts a chunk's bytes on a connection, by the cheapest path that connection
offers (see :mod:`viamillipede.streams`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc

from .framing import BufferPool
from .squeeze import Squeezer
from .streams import SendFile, SendPages
from .wire import DATA_HEADER_SIZE, pack_data_header
from .wire.secure import INLINE_SEAL_BYTES, SEAL_OVERHEAD, ChunkSealer

#: How long a partly filled chunk waits for more input before it is sent as it is.
FLUSH_AFTER = 0.2


class Source(Protocol):
    """Where the stream comes from: ``readinto`` returns 0 at end of stream."""

    async def readinto(self, view: memoryview) -> int: ...


@runtime_checkable
class RegionSource(Protocol):
    """A source that is a file the kernel can send from (see ``FdSource``): chunks are regions
    of it, sent with ``SendFile.send_file`` and re-read if they must be sent again.  Only when
    ``file_fd`` is set: the same source type may be a pipe."""

    file_fd: int | None

    def claim(self, size: int) -> tuple[int, int]: ...

    async def pread(
        self, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
    ) -> int: ...


@runtime_checkable
class CancelSafe(Protocol):
    """A source that says whether a cancelled ``readinto`` loses nothing; only then may a
    read be abandoned to send a partly filled chunk."""

    cancel_safe: bool


class Chunk:
    """A chunk in the window: its frame in a pooled ``buf``, or (``offset`` >= 0) only its
    header in ``buf`` and the payload in the source file at ``offset``."""

    __slots__ = ("acked", "buf", "extra", "length", "offset", "raw", "sending")

    def __init__(self, buf: bytearray, length: int, offset: int = -1, extra: int = 0,
                 raw: int = -1) -> None:
        self.buf = buf
        self.length = length  # of the payload before sealing (compressed, if it is)
        self.extra = extra  # bytes the frame's payload has beyond it (the seal's tag)
        self.raw = length if raw < 0 else raw  # bytes of the stream it carries
        self.offset = offset
        self.sending = 0  # sends of this buffer in progress: it is not reused before 0
        self.acked = False

    def frame(self) -> memoryview:
        return memoryview(self.buf)[: DATA_HEADER_SIZE + self.length + self.extra]

    def header(self) -> memoryview:
        return memoryview(self.buf)[:DATA_HEADER_SIZE]

    def payload(self) -> memoryview:
        return memoryview(self.buf)[DATA_HEADER_SIZE : DATA_HEADER_SIZE + self.length]


def regions_of(source: object) -> RegionSource | None:
    """``source`` as a file to send regions of, or None if it is not one."""
    if isinstance(source, RegionSource) and source.file_fd is not None:
        return source
    return None


class ChunkReader:
    """Reads the source into chunks, one call per chunk, and takes back their buffers."""

    def __init__(self, source: Source, chunk_size: int, *, keep: int,
                 checksum: Callable[[memoryview], int] | None,
                 sealer: Callable[[], Awaitable[ChunkSealer]] | None = None,
                 compress: bool = False) -> None:
        self._source = source
        self._size = chunk_size
        self._checksum = checksum
        # Sealed chunks: each is sealed once, in place, when it is read (on the event loop, or
        # in a worker thread if larger than INLINE_SEAL_BYTES),
        # and its sealed bytes are what every send of it sends.  ``sealer`` waits for the
        # session's keys.
        self._sealer = sealer
        self._extra = SEAL_OVERHEAD if sealer is not None else 0
        self.pool = BufferPool(DATA_HEADER_SIZE + chunk_size + self._extra, keep=keep)
        # A regular file is sent from the page cache.  With checksums each region is read
        # once, into a buffer kept until the chunk is acknowledged: hashed and re-sent from
        # that one copy, so what arrives is what was hashed even if the file changes.  A
        # sealed or compressed chunk must be in memory anyway: read like a pipe.
        self.regions = regions_of(source) if sealer is None and not compress else None
        # Only a checksummed file's chunks go by reference (send_pages): for a pipe's chunks,
        # read into fresh buffers anyway, it measured slower than a plain send.
        self.by_reference = checksum is not None and self.regions is not None
        # A trickling source (a log, a slow producer) must not wait for a whole chunk to
        # fill: once some bytes are in, a pause of FLUSH_AFTER sends what there is.  Only
        # where cancelling a read cannot lose bytes.
        safe = isinstance(source, CancelSafe) and source.cancel_safe
        self._patience = FLUSH_AFTER if safe else math.inf
        self._ended = False  # a read returned 0: never read again (a terminal would wait)

    async def next(self, seq: int) -> Chunk | None:
        """Chunk ``seq``, or None at the end of the stream."""
        if self._ended:
            return None
        if self.regions is not None:
            return await self._claim(self.regions, seq)
        return await self._read(seq)

    # -- compressing: read, then prepare in a worker -------------------------------------------

    async def read_raw(self) -> tuple[bytearray, int] | None:
        """The next chunk's bytes, in a pooled buffer after the header space, not yet framed
        (:meth:`_read` frames them at once; a compressing session with :meth:`prepare`,
        perhaps in a worker thread); None at the end of the stream."""
        if self._ended:
            return None
        buf = self.pool.get()
        try:
            n = await self._fill(memoryview(buf))
        except BaseException:
            self.pool.put(buf)
            raise
        if not n:
            self.pool.put(buf)
            return None
        return buf, n

    async def sealer(self) -> ChunkSealer | None:
        """The session's sealer once its keys are agreed; None in plaintext."""
        return await self._sealer() if self._sealer is not None else None

    def prepare(self, seq: int, buf: bytearray, n: int, level: int | None,
                squeezer: Squeezer, sealer: ChunkSealer | None) -> Chunk:
        """Frame the ``n`` bytes read into ``buf`` as chunk ``seq``: compressed at ``level``
        (if given and it pays), then sealed.  Pure computation with the GIL released most of
        the time: called in worker threads, several at once.  The compressed bytes replace
        the raw ones in the same buffer, so a compressed chunk costs no second buffer."""
        view = memoryview(buf)
        payload = view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n]
        # The checksum (plaintext only) covers the stream's bytes, as the receiver's sink
        # gets them: it checks the decompression too.
        crc = self._checksum(payload) if self._checksum is not None else 0
        wire = squeezer.compress_into(level, payload, payload) if level is not None else 0
        compressed = wire > 0
        if not compressed:
            wire = n
        if sealer is None:
            pack_data_header(view, seq, wire, crc, compressed)
            return Chunk(buf, wire, raw=n)
        pack_data_header(view, seq, wire + SEAL_OVERHEAD, 0, compressed)
        header = bytes(view[:DATA_HEADER_SIZE])
        sealed = view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + wire + SEAL_OVERHEAD]
        sealer.seal_into(seq, header, sealed[:wire], sealed)
        return Chunk(buf, wire, extra=SEAL_OVERHEAD, raw=n)

    async def _fill(self, view: memoryview) -> int:
        """Read up to a chunk into ``view`` after the header space; 0 at the end."""
        size = self._size
        end = DATA_HEADER_SIZE + size
        n = 0
        while n < size:
            with anyio.move_on_after(self._patience if n else math.inf):
                got = await self._source.readinto(view[DATA_HEADER_SIZE + n : end])
                if got == 0:
                    self._ended = True
                    break
                n += got
                continue
            break  # the source paused with a partial chunk in hand
        return n

    def release(self, chunk: Chunk) -> None:
        """The chunk is acknowledged and no send of it is in progress."""
        if chunk.offset < 0:
            self.pool.put(chunk.buf)

    async def _read(self, seq: int) -> Chunk | None:
        raw = await self.read_raw()
        if raw is None:
            return None
        buf, n = raw
        view = memoryview(buf)
        if self._sealer is not None:
            try:
                await self._seal(view, seq, n)
            except BaseException:
                self.pool.put(buf)
                raise
            return Chunk(buf, n, extra=SEAL_OVERHEAD)
        crc = self._checksum(view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n]) if self._checksum \
            else 0
        pack_data_header(buf, seq, n, crc)
        return Chunk(buf, n)

    async def _seal(self, view: memoryview, seq: int, n: int) -> None:
        assert self._sealer is not None
        sealer = await self._sealer()
        pack_data_header(view, seq, n + SEAL_OVERHEAD, 0)
        header = bytes(view[:DATA_HEADER_SIZE])
        payload = view[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n + SEAL_OVERHEAD]
        if n <= INLINE_SEAL_BYTES:
            sealer.seal_into(seq, header, payload[:n], payload)
            return
        # Not abandoned on cancel: the thread writes into a pooled buffer.
        await anyio.to_thread.run_sync(sealer.seal_into, seq, header, payload[:n], payload)

    async def _claim(self, source: RegionSource, seq: int) -> Chunk | None:
        offset, n = source.claim(self._size)
        if n == 0:
            self._ended = True
            return None
        if self._checksum is None:
            header = bytearray(DATA_HEADER_SIZE)
            pack_data_header(header, seq, n, 0)
            return Chunk(header, n, offset)
        # The bytes must be read to be hashed anyway: keep them, and send them from memory.
        # Cheaper than sendfile'ing the file's pages afterwards (see SocketStream.send_pages),
        # and a re-send needs no second read.
        buf = self.pool.get()
        try:
            crc = await source.pread(memoryview(buf)[DATA_HEADER_SIZE : DATA_HEADER_SIZE + n],
                                     offset, self._checksum)
        except BaseException:
            self.pool.put(buf)
            raise
        pack_data_header(buf, seq, n, crc)
        return Chunk(buf, n)


class ChunkSender:
    """Sends chunks on one stream, by the cheapest path it offers (looked up once)."""

    __slots__ = ("_file", "_pages", "_reader", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, reader: ChunkReader) -> None:
        self.stream = stream
        self._reader = reader
        self._pages = stream if reader.by_reference and isinstance(stream, SendPages) else None
        self._file = stream if isinstance(stream, SendFile) else None

    async def send(self, chunk: Chunk) -> None:
        if chunk.offset >= 0:
            await self._send_region(chunk)
        elif self._pages is not None:
            # The payload's pages go to the socket by reference, so the kernel reads them
            # after this returns; the buffer is reused only once the chunk is acknowledged,
            # so a receiver that reads a (stale, duplicate) copy later sees at worst bytes
            # that fail their checksum.  Without a checksum such bytes could be written:
            # there a receiver splicing the socket into a pipe passes the pages on to its
            # consumer, which may read them after the ACK.
            await self._pages.send_pages(chunk.header(), chunk.payload())
        else:
            await self.stream.send(chunk.frame())  # type: ignore[arg-type]  # any buffer

    async def _send_region(self, chunk: Chunk) -> None:
        source = self._reader.regions
        assert source is not None and source.file_fd is not None
        if self._file is not None:
            await self._file.send_file(chunk.header(), source.file_fd, chunk.offset,
                                       chunk.length)
            return
        # A stream that wants the bytes themselves (in memory, or fault injection).
        pool = self._reader.pool
        buf = pool.get()
        try:
            view = memoryview(buf)[: DATA_HEADER_SIZE + chunk.length]
            view[:DATA_HEADER_SIZE] = chunk.header()
            await source.pread(view[DATA_HEADER_SIZE:], chunk.offset)
            await self.stream.send(view)  # type: ignore[arg-type]  # any buffer works
        finally:
            pool.put(buf)
