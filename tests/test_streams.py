"""Stream capabilities as protocols: the real classes have the ones they claim, the socket
stream keeps the stream contract, and the chaos wrapper forwards (and faults) exactly the
capabilities of the stream it wraps."""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from viamillipede.chaos import ChaosScheduler, ChaosStream, FaultKind, FaultRecord
from viamillipede.streams import (
    ConnectFailed,
    ReceiveExactlyInto,
    ReceiveInto,
    SendFile,
    SendPages,
    SpliceSink,
    SpliceSource,
    SpliceTo,
)
from viamillipede.testing import MemoryByteStream, PassThrough, memory_stream_pair
from viamillipede.transport import FdSink, SocketStream, connect, listen
from viamillipede.wire.frames import T_DATA

#: What a stream may offer on top of the ByteStream contract.
STREAM_CAPABILITIES: tuple[type, ...] = (
    ReceiveInto,
    ReceiveExactlyInto,
    SendFile,
    SendPages,
    SpliceTo,
)

#: 24 bytes, like a DATA header (its type byte first: the chaos wrapper corrupts only DATA sends)
HEADER = bytes([T_DATA, *range(101, 124)])
WINDOW = 10.0  # seconds any single test may take before it counts as hung


async def tcp_pair() -> tuple[SocketStream, SocketStream]:
    """A connected loopback pair, made the way sessions make theirs."""
    listener = listen(0, "127.0.0.1")
    try:
        client = await connect("127.0.0.1", listener.port)
        server = await listener.accept()
    finally:
        await listener.aclose()
    return client, server


@contextlib.asynccontextmanager
async def opened_pair() -> Any:
    a, b = await tcp_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def run(fn: Callable[[], Awaitable[Any]], backend: str = "trio") -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(WINDOW):
            return await fn()

    return anyio.run(bounded, backend=backend)


def only(kind: FaultKind | str, seed: int = 1) -> ChaosScheduler:
    """A scheduler that gives every operation the same fault."""
    return ChaosScheduler(seed=seed, rate=1.0, kinds=[kind])


async def receive_n(stream: anyio.abc.ByteStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await stream.receive(n - len(got))
    return bytes(got)


async def receive_to_end(stream: anyio.abc.ByteStream) -> bytes:
    got = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            got += await stream.receive()
    return bytes(got)


@pytest.fixture
def region_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An open file and its contents, for send_file."""
    data = os.urandom(300_000)
    path = tmp_path / "region.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, data
    finally:
        os.close(fd)


# -- each protocol against the real classes --------------------------------------------------


def test_socket_stream_has_every_stream_capability_and_is_a_splice_source() -> None:
    async def main() -> None:
        async with opened_pair() as (a, _b):
            for capability in (*STREAM_CAPABILITIES, SpliceSource):
                assert isinstance(a, capability), capability.__name__
            assert not isinstance(a, SpliceSink)

    run(main)


def test_memory_streams_have_no_capability() -> None:
    stream = memory_stream_pair()[0]
    for capability in (*STREAM_CAPABILITIES, SpliceSource, SpliceSink):
        assert not isinstance(stream, capability), capability.__name__


def test_fd_sink_is_a_splice_sink_that_says_where_splicing_works(tmp_path: Path) -> None:
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    regular = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    appending = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        sinks = {name: FdSink(fd) for name, fd in
                 [("pipe", w), ("null", null), ("file", regular), ("append", appending)]}
        for sink in sinks.values():
            assert isinstance(sink, SpliceSink)
            assert not isinstance(sink, SpliceSource)
        assert {n for n, s in sinks.items() if s.can_splice} == {"pipe", "file"}
        for sink in sinks.values():
            anyio.run(sink.aclose)
    finally:
        for fd in (r, w, null, regular, appending):
            os.close(fd)


def test_connect_failed_is_one_class_wherever_it_is_imported_from() -> None:
    from viamillipede import transport

    assert transport.ConnectFailed is ConnectFailed
    assert transport.ReceiveInto is ReceiveInto

    async def main() -> None:
        listener = listen(0, "127.0.0.1")
        port = listener.port
        await listener.aclose()  # nobody listens there any more
        with pytest.raises(ConnectFailed):
            await connect("127.0.0.1", port)

    run(main)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_send_file_sends_header_then_region_and_leaves_the_position(
    backend: str, region_file: tuple[int, bytes]
) -> None:
    fd, data = region_file

    async def main() -> None:
        async with opened_pair() as (a, b), anyio.create_task_group() as tg:
            tg.start_soon(a.send_file, memoryview(HEADER), fd, 1000, 200_000)
            got = await receive_n(b, len(HEADER) + 200_000)
        assert got == HEADER + data[1000:201_000]
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0

    run(main, backend)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_send_pages_sends_header_then_payload(backend: str) -> None:
    payload = bytearray(os.urandom(500_000))

    async def main() -> None:
        async with opened_pair() as (a, b), anyio.create_task_group() as tg:
            tg.start_soon(a.send_pages, memoryview(HEADER), memoryview(payload))
            got = await receive_n(b, len(HEADER) + len(payload))
        assert got == HEADER + payload

    run(main, backend)


def test_receive_exactly_into_fills_the_buffer_and_is_short_only_at_the_end() -> None:
    data = os.urandom(1_000_000)

    async def main() -> None:
        async with opened_pair() as (a, b):

            async def send() -> None:
                for i in range(0, len(data), 65536):  # many sends: several reads' worth
                    await a.send(data[i : i + 65536])
                await a.send_eof()

            buf = bytearray(len(data) + 10)
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                assert await b.receive_exactly_into(memoryview(buf)[:600_000]) == 600_000
                rest = await b.receive_exactly_into(memoryview(buf)[600_000:])
            assert rest == len(data) - 600_000
            assert bytes(buf[: len(data)]) == data

    run(main)


def test_splice_to_moves_the_next_bytes_into_a_pipe_sink_and_reports_them() -> None:
    data = os.urandom(200_000)
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)

        async def main() -> bytes:
            sink = FdSink(w)
            assert sink.can_splice
            reported: list[int] = []
            out = bytearray()

            async def drain() -> None:
                while len(out) < len(data):
                    await anyio.wait_readable(r)
                    out.extend(os.read(r, 1 << 20))

            async with opened_pair() as (a, b):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain)
                    tg.start_soon(a.send, data + b"tail")
                    await b.splice_to(sink, len(data), reported.append)
                assert await b.receive() == b"tail"  # the splice took no byte too many
            await sink.aclose()
            assert sum(reported) == len(data) == sink.nbytes
            return bytes(out)

        assert run(main) == data
    finally:
        os.close(r)
        os.close(w)


# -- the stream contract, judged by Trio's own checkers ---------------------------------------

TO_TRIO: dict[type[Exception], type[Exception]] = {
    anyio.BrokenResourceError: trio.BrokenResourceError,
    anyio.ClosedResourceError: trio.ClosedResourceError,
    anyio.BusyResourceError: trio.BusyResourceError,
}


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except tuple(TO_TRIO) as exc:
        raise next(t(str(exc)) for a, t in TO_TRIO.items() if isinstance(exc, a)) from exc


class AsTrioStream(trio.abc.HalfCloseableStream):
    """An anyio byte stream seen as a Trio stream, so Trio's checkers can judge it.

    Receives go through ``receive_into`` when the stream has it (the path sessions take).
    The checkers also want a second concurrent receive to fail with BusyResourceError;
    SocketStream does not watch for that (sessions read each stream from one task), so this
    adapter does, as Trio's own socket stream does with its conflict detector.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._closed = False
        self._receiving = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        with translated():
            await self.stream.send(data)  # type: ignore[arg-type]

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        max_bytes = 65536 if max_bytes is None else operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        try:
            with translated():
                if isinstance(self.stream, ReceiveInto):
                    buf = bytearray(max_bytes)
                    n = await self.stream.receive_into(memoryview(buf))
                    return bytes(buf[:n])
                try:
                    return await self.stream.receive(max_bytes)
                except anyio.EndOfStream:
                    return b""
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        self._check_open()
        with translated():
            await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()


class PlainReceive(PassThrough):
    """A SocketStream with its ``receive`` alone exposed (no capabilities)."""


def socket_maker(kind: str) -> Callable[[], Awaitable[tuple[AsTrioStream, AsTrioStream]]]:
    async def maker() -> tuple[AsTrioStream, AsTrioStream]:
        a, b = await tcp_pair()
        pair: tuple[anyio.abc.ByteStream, anyio.abc.ByteStream] = (a, b)
        if kind == "receive":
            pair = (PlainReceive(a), PlainReceive(b))
        elif kind.startswith("chaos"):
            sched = ChaosScheduler(5, rate=1.0 if kind == "chaos-short" else 0.0,
                                   kinds=[FaultKind.SHORT])
            pair = (sched.wrap(a, side="tx", conn=0), sched.wrap(b, side="rx", conn=0))
            assert all(isinstance(s, ReceiveInto) for s in pair)
        return AsTrioStream(pair[0]), AsTrioStream(pair[1])

    return maker


@pytest.mark.parametrize("kind", ["receive_into", "receive", "chaos-off", "chaos-short"])
@pytest.mark.parametrize(
    "checker",
    [trio.testing.check_two_way_stream, trio.testing.check_half_closeable_stream],
    ids=["two-way", "half-closeable"],
)
def test_socket_stream_conformance(kind: str, checker: Any) -> None:
    """Ordering, end of stream, half-close, errors after close, close waking a blocked
    receive, cancellation: over a real loopback connection, alone and under chaos."""

    async def main() -> None:
        with trio.fail_after(WINDOW):
            await checker(socket_maker(kind), None)

    trio.run(main)


# -- the chaos wrapper forwards what the inner stream has -------------------------------------


def test_chaos_over_a_socket_stream_has_its_stream_capabilities() -> None:
    async def main() -> None:
        async with opened_pair() as (a, _b):
            wrapped = ChaosScheduler(1).wrap(a, side="tx", conn=0)
            for capability in STREAM_CAPABILITIES:
                assert isinstance(wrapped, capability), capability.__name__
            # A sink splicing from the descriptor itself would get past every fault.
            assert not isinstance(wrapped, SpliceSource)
            twice = ChaosScheduler(2).wrap(wrapped, side="tx", conn=0)
            for capability in STREAM_CAPABILITIES:
                assert isinstance(twice, capability), capability.__name__

    run(main)


def test_chaos_over_a_memory_stream_has_none() -> None:
    wrapped = ChaosScheduler(1).wrap(memory_stream_pair()[0], side="tx", conn=0)
    assert type(wrapped) is ChaosStream
    for capability in (*STREAM_CAPABILITIES, SpliceSource, SpliceSink):
        assert not isinstance(wrapped, capability), capability.__name__


class WithPages(MemoryByteStream):
    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        await self.send(bytes(header) + bytes(payload))


class WithExactly(MemoryByteStream):
    async def receive_exactly_into(self, view: memoryview) -> int:
        got = 0
        with contextlib.suppress(anyio.EndOfStream):
            while got < len(view):
                data = await self.receive(len(view) - got)
                view[got : got + len(data)] = data
                got += len(data)
        return got


class WithFileAndExactly(WithExactly):
    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        await self.send(bytes(header) + os.pread(fd, count, offset))


@pytest.mark.parametrize(
    "inner_type, has",
    [
        (WithPages, {SendPages}),
        (WithExactly, {ReceiveExactlyInto}),
        (WithFileAndExactly, {ReceiveExactlyInto, SendFile}),
    ],
)
def test_chaos_forwards_exactly_the_capabilities_of_the_inner_stream(
    inner_type: type[MemoryByteStream], has: set[type]
) -> None:
    send, receive = anyio.create_memory_object_stream[bytes](4)
    inner = inner_type(send, receive, "peer")
    sched = ChaosScheduler(1)
    wrapped = sched.wrap(inner, side="tx", conn=0)
    assert {c for c in STREAM_CAPABILITIES if isinstance(wrapped, c)} == has
    assert isinstance(wrapped, ChaosStream)
    # Streams with the same capabilities share one class.
    again = sched.wrap(inner_type(send, receive, "peer"), side="tx", conn=1)
    assert type(again) is type(wrapped)
    send.close()
    receive.close()


# -- faults on the zero-copy operations -------------------------------------------------------


def seed_where(want: dict[int, FaultKind | None]) -> int:
    """The first seed whose first sends on ``tx conn 0 gen 0`` get the faults in ``want``."""
    for seed in range(10_000):
        sched = ChaosScheduler(seed, rate=0.5, kinds=[FaultKind.RESET, FaultKind.SHORT])
        got = {op: (f.kind if (f := sched.decide("tx", 0, 0, "send", op)) else None) for op in want}
        if got == want:
            return seed
    raise AssertionError("no seed found")  # pragma: no cover


@pytest.mark.parametrize("method", ["send_file", "send_pages"])
def test_a_seeded_reset_hits_zero_copy_sends_the_same_way_every_run(
    method: str, region_file: tuple[int, bytes]
) -> None:
    """Send 0 (the other zero-copy method) is fragmented, send 1 (``method``) is reset: the
    peer gets send 0 whole, then end of stream; every run logs the same records."""
    fd, data = region_file
    payload = bytearray(data[:100_000])
    seed = seed_where({0: FaultKind.SHORT, 1: FaultKind.RESET})

    async def send_file(stream: Any) -> None:
        assert isinstance(stream, SendFile)
        await stream.send_file(memoryview(HEADER), fd, 0, 100_000)

    async def send_pages(stream: Any) -> None:
        assert isinstance(stream, SendPages)
        await stream.send_pages(memoryview(HEADER), memoryview(payload))

    first, second = (send_pages, send_file) if method == "send_file" else (send_file, send_pages)

    async def once() -> tuple[FaultRecord, ...]:
        sched = ChaosScheduler(seed, rate=0.5, kinds=[FaultKind.RESET, FaultKind.SHORT])
        async with opened_pair() as (a, b):
            tx = sched.wrap(a, side="tx", conn=0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(first, tx)
                got = await receive_n(b, len(HEADER) + 100_000)
            assert got == HEADER + data[:100_000]
            with pytest.raises(anyio.BrokenResourceError):
                await second(tx)
            assert await receive_to_end(b) == b""  # the reset closed the connection
            with pytest.raises(anyio.BrokenResourceError):
                await tx.send(b"after")  # stays broken
        return sched.log.records

    records = run(once)
    assert [(r.direction, r.op, r.kind) for r in records] == [
        ("send", 0, FaultKind.SHORT),
        ("send", 1, FaultKind.RESET),
    ]
    assert records[1].line() == "chaos tx conn 0 gen 0 send 1: reset"
    assert run(once) == records


@pytest.mark.parametrize("method", ["receive_exactly_into", "splice_to"])
def test_a_reset_hits_zero_copy_receives(method: str) -> None:
    r, w = os.pipe()

    async def main() -> None:
        sched = only(FaultKind.RESET)
        sink = FdSink(w)
        async with opened_pair() as (a, b):
            rx = sched.wrap(b, side="rx", conn=2)
            await a.send(b"x" * 1000)
            with pytest.raises(anyio.BrokenResourceError):
                if method == "splice_to":
                    assert isinstance(rx, SpliceTo)
                    await rx.splice_to(sink, 1000, lambda n: None)
                else:
                    assert isinstance(rx, ReceiveExactlyInto)
                    await rx.receive_exactly_into(memoryview(bytearray(1000)))
            with pytest.raises(anyio.BrokenResourceError):
                await a.send(b"y" * 1_000_000)  # the peer has gone
        await sink.aclose()
        assert sched.log.lines() == ["chaos rx conn 2 gen 0 recv 0: reset"]
        assert sink.nbytes == 0

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


class Recorded(SocketStream):
    """A socket stream that notes which method each inner send came through."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.calls: list[tuple[str, int]] = []

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        self.calls.append(("send", memoryview(item).nbytes))
        await super().send(item)

    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        self.calls.append(("send_file", len(header) + count))
        await super().send_file(header, fd, offset, count)

    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        self.calls.append(("send_pages", len(header) + len(payload)))
        await super().send_pages(header, payload)


@contextlib.asynccontextmanager
async def recorded_pair() -> Any:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    a, b = Recorded(client), SocketStream(conn)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("method", ["send_file", "send_pages"])
def test_short_splits_a_zero_copy_send_into_zero_copy_pieces(
    method: str, region_file: tuple[int, bytes]
) -> None:
    fd, data = region_file
    payload = bytearray(data[:50_000])

    async def main() -> None:
        sched = only(FaultKind.SHORT, seed=3)
        async with recorded_pair() as (a, b):
            tx = sched.wrap(a, side="tx", conn=0)
            async with anyio.create_task_group() as tg:
                if method == "send_file":
                    assert isinstance(tx, SendFile)
                    tg.start_soon(tx.send_file, memoryview(HEADER), fd, 0, 50_000)
                else:
                    assert isinstance(tx, SendPages)
                    tg.start_soon(tx.send_pages, memoryview(HEADER), memoryview(payload))
                got = await receive_n(b, len(HEADER) + 50_000)
            assert got == HEADER + data[:50_000]
            (record,) = sched.log.records
            sizes = [int(n) for n in record.detail.split("+")]
            assert len(sizes) >= 2
            # A piece of header alone goes by plain send; every piece with payload bytes in it
            # goes the zero-copy way.
            ends = list(itertools.accumulate(sizes))
            assert a.calls == [
                ("send" if end <= len(HEADER) else method, n)
                for n, end in zip(sizes, ends, strict=True)
            ]

    run(main)


@pytest.mark.parametrize("method", ["send_file", "send_pages"])
def test_corrupt_on_a_zero_copy_send_flips_one_bit_of_a_copy(
    method: str, region_file: tuple[int, bytes]
) -> None:
    fd, data = region_file
    payload = bytearray(data[:4096])
    size = len(HEADER) + 4096

    async def main() -> None:
        sched = only(FaultKind.CORRUPT)
        async with recorded_pair() as (a, b):
            tx = sched.wrap(a, side="tx", conn=0)
            async with anyio.create_task_group() as tg:
                if method == "send_file":
                    assert isinstance(tx, SendFile)
                    tg.start_soon(tx.send_file, memoryview(HEADER), fd, 0, 4096)
                else:
                    assert isinstance(tx, SendPages)
                    tg.start_soon(tx.send_pages, memoryview(HEADER), memoryview(payload))
                got = await receive_n(b, size)
            expected = HEADER + data[:4096]
            diff = [i for i in range(size) if got[i] != expected[i]]
            assert len(diff) == 1 and diff[0] >= 64
            assert bin(got[diff[0]] ^ expected[diff[0]]).count("1") == 1
            (record,) = sched.log.records
            assert record.detail.startswith(f"byte {diff[0]} of {size} bit ")
            assert a.calls == [("send", size)]  # the damaged copy, by plain send
        assert payload == data[:4096]  # the caller's pages are untouched
        assert os.pread(fd, 4096, 0) == data[:4096]

    run(main)


def test_short_on_receive_exactly_into_still_fills_the_buffer() -> None:
    data = os.urandom(100_000)

    async def main() -> None:
        sched = only(FaultKind.SHORT)
        async with opened_pair() as (a, b):
            rx = sched.wrap(b, side="rx", conn=0)
            assert isinstance(rx, ReceiveExactlyInto)
            buf = bytearray(len(data))
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, data)
                assert await rx.receive_exactly_into(memoryview(buf)) == len(data)
            assert buf == data
            (line,) = sched.log.lines()
            limit = int(line.split("short ")[1].split("/")[0])
            assert line == f"chaos rx conn 0 gen 0 recv 0: short {limit}/{len(data)}"
            assert 0 < limit < len(data)

    run(main)


def test_short_on_splice_to_moves_every_byte_in_two_splices(tmp_path: Path) -> None:
    data = os.urandom(150_000)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    async def main() -> None:
        sched = only(FaultKind.SHORT)
        sink = FdSink(fd)
        assert sink.can_splice
        counts: list[int] = []

        class Counting:
            """The sink as the wrapper sees it, counting the splices it is asked for."""

            can_splice = True

            async def splice_from(
                self, stream: SpliceSource, count: int, moved: Callable[[int], None]
            ) -> None:
                counts.append(count)
                await sink.splice_from(stream, count, moved)

        async with opened_pair() as (a, b):
            rx = sched.wrap(b, side="rx", conn=0)
            assert isinstance(rx, SpliceTo)
            reported: list[int] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, data)
                await rx.splice_to(Counting(), len(data), reported.append)
        await sink.aclose()
        assert sum(reported) == len(data) == sum(counts) and len(counts) == 2
        (line,) = sched.log.lines()
        assert line == f"chaos rx conn 0 gen 0 recv 0: short {counts[0]}/{len(data)}"

    try:
        run(main)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
