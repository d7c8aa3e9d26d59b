"""The chaos wrapper: each fault kind on a stream, its log, and a correct stream when it
injects nothing.

Timing-dependent faults (delay, stall) run under Trio's MockClock with autojump, so they take no
wall-clock time and nothing synchronises by sleeping.  Which fault each operation gets is
test_chaos_scheduler.py's subject; whole sessions under chaos are test_chaos_sessions.py's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import ALL_KINDS, always, receive_exactly, run_mock
from viamillipede.chaos import ChaosScheduler, ChaosStream, Direction, FaultKind, FaultLog
from viamillipede.testing import MemoryByteStream, memory_stream_pair
from viamillipede.transport import ReceiveInto
from viamillipede.wire.frames import T_ACK, T_DATA


class IntoStream(MemoryByteStream):
    """A memory stream with the ``receive_into`` fast path, as TCP streams have."""

    async def receive_into(self, view: memoryview) -> int:
        try:
            data = await self.receive(len(view))
        except anyio.EndOfStream:
            return 0
        view[: len(data)] = data
        return len(data)


def into_pair(buffer: int = 64) -> tuple[IntoStream, IntoStream]:
    a_send: MemoryObjectSendStream[bytes]
    b_receive: MemoryObjectReceiveStream[bytes]
    a_send, b_receive = anyio.create_memory_object_stream[bytes](buffer)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](buffer)
    return IntoStream(a_send, a_receive, "right"), IntoStream(b_send, b_receive, "left")


# -- what the wrapper offers -------------------------------------------------------------------


def test_receive_into_is_offered_exactly_when_the_inner_stream_has_it() -> None:
    sched = ChaosScheduler(1)
    plain = sched.wrap(memory_stream_pair()[0], side="tx", conn=0)
    fast = sched.wrap(into_pair()[0], side="tx", conn=1)
    assert not isinstance(plain, ReceiveInto)
    assert isinstance(fast, ReceiveInto) and isinstance(fast, ChaosStream)


def test_peer_name_and_attributes_come_from_the_inner_stream() -> None:
    inner = memory_stream_pair(names=("a", "b"))[0]
    wrapped = ChaosScheduler(1).wrap(inner, side="rx", conn=0)
    assert wrapped.peer == inner.peer == "b"
    assert wrapped.extra_attributes == inner.extra_attributes


# -- each fault kind ---------------------------------------------------------------------------


def test_reset_breaks_the_stream_and_the_peer_sees_end_of_stream() -> None:
    async def main() -> None:
        sched = always(FaultKind.RESET)
        a, b = memory_stream_pair()
        tx = sched.wrap(a, side="tx", conn=3, generation=1)
        with pytest.raises(anyio.BrokenResourceError):
            await tx.send(b"hello")
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await tx.send(b"again")  # stays broken; not another fault
        with pytest.raises(anyio.BrokenResourceError):
            await tx.receive()
        await tx.aclose()
        await tx.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await tx.send(b"closed")
        assert sched.log.lines() == ["chaos tx conn 3 gen 1 send 0: reset"]

    anyio.run(main)


def seed_where(
    rate: float, kinds: Iterable[FaultKind], want: dict[tuple[Direction, int], FaultKind | None]
) -> ChaosScheduler:
    """The first scheduler whose ``tx conn 0 gen 0`` decisions match ``want``."""
    for seed in range(10_000):
        sched = ChaosScheduler(seed, rate=rate, kinds=kinds)
        got = {
            (d, op): (f.kind if (f := sched.decide("tx", 0, 0, d, op)) else None) for d, op in want
        }
        if got == want:
            return sched
    raise AssertionError("no seed found")  # pragma: no cover


async def error_of_blocked_receive(
    stream: anyio.abc.ByteStream, interrupt: Callable[[], Awaitable[object]]
) -> Exception:
    """What a receive blocked in one task gets once another task has run ``interrupt``."""
    errors: list[Exception] = []

    async def reader() -> None:
        try:
            await stream.receive()
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await interrupt()
    (error,) = errors
    return error


def test_reset_wakes_a_receive_blocked_in_another_task() -> None:
    async def main() -> None:
        want: dict[tuple[Direction, int], FaultKind | None] = {
            ("recv", 0): None,
            ("send", 0): FaultKind.RESET,
        }
        sched = seed_where(0.5, {FaultKind.RESET}, want)
        a, _b = memory_stream_pair()
        tx = sched.wrap(a, side="tx", conn=0)

        async def send_and_reset() -> None:
            with pytest.raises(anyio.BrokenResourceError):
                await tx.send(b"x")

        error = await error_of_blocked_receive(tx, send_and_reset)
        assert isinstance(error, anyio.BrokenResourceError)

    run_mock(main)


def test_stall_blocks_until_the_caller_gives_up() -> None:
    async def main() -> None:
        sched = always(FaultKind.STALL)
        a, b = memory_stream_pair()
        tx = sched.wrap(a, side="tx", conn=0)
        start = trio.current_time()
        with trio.move_on_after(3600) as scope:
            await tx.send(b"lost")
        assert scope.cancelled_caught
        assert trio.current_time() - start == pytest.approx(3600)
        with trio.move_on_after(1) as peer_scope:
            await b.receive()
        assert peer_scope.cancelled_caught  # the peer saw nothing at all
        assert sched.log.lines() == ["chaos tx conn 0 gen 0 send 0: stall"]

    run_mock(main)


def test_closing_wakes_a_stalled_operation() -> None:
    async def main() -> None:
        rx = always(FaultKind.STALL).wrap(memory_stream_pair()[1], side="rx", conn=0)
        error = await error_of_blocked_receive(rx, rx.aclose)
        assert isinstance(error, anyio.ClosedResourceError)

    run_mock(main)


@pytest.mark.parametrize("direction", ["send", "recv"])
def test_delay_passes_data_intact_after_the_logged_time(direction: str) -> None:
    async def main() -> None:
        sched = always(FaultKind.DELAY)
        a, b = memory_stream_pair()
        payload = bytes(range(256)) * 4
        start = trio.current_time()
        if direction == "send":
            await sched.wrap(a, side="tx", conn=0).send(payload)
            got = await b.receive()
        else:
            await a.send(payload)
            got = await sched.wrap(b, side="rx", conn=0).receive()
        elapsed = trio.current_time() - start
        assert got == payload
        (record,) = sched.log.records
        assert record.kind is FaultKind.DELAY
        ms = int(record.detail.removesuffix(" ms"))
        assert 1 <= ms <= 200
        assert elapsed == pytest.approx(ms / 1000)

    run_mock(main)


def test_short_send_arrives_intact_in_pieces() -> None:
    async def main() -> None:
        sched = always(FaultKind.SHORT)
        a, b = memory_stream_pair(buffer=64)
        tx = sched.wrap(a, side="tx", conn=0)
        payload = os.urandom(10_000)
        await tx.send(payload)
        (record,) = sched.log.records
        sizes = [int(n) for n in record.detail.split("+")]
        assert 2 <= len(sizes) <= 4 and sum(sizes) == len(payload) and min(sizes) > 0
        # The memory stream keeps each inner send as one message, which shows the pieces.
        pieces = [await b.receive(len(payload)) for _ in sizes]
        assert [len(p) for p in pieces] == sizes
        assert b"".join(pieces) == payload
        await tx.send(b"x")  # one byte cannot be split: sent whole, nothing logged
        assert await b.receive() == b"x"
        assert len(sched.log) == 1

    anyio.run(main)


@pytest.mark.parametrize("fast", [False, True], ids=["receive", "receive_into"])
def test_short_receive_returns_fewer_bytes_than_asked(fast: bool) -> None:
    async def main() -> None:
        sched = always(FaultKind.SHORT)
        a, b = into_pair() if fast else memory_stream_pair()
        rx = sched.wrap(b, side="rx", conn=0)
        assert isinstance(rx, ReceiveInto) == fast

        async def read(n: int) -> bytes:
            if isinstance(rx, ReceiveInto):
                buf = bytearray(n)
                return bytes(buf[: await rx.receive_into(memoryview(buf))])
            return await rx.receive(n)

        payload = os.urandom(10_000)
        await a.send(payload)
        first = await read(len(payload))
        assert 0 < len(first) < len(payload)
        assert sched.log.lines()[0] == f"chaos rx conn 0 gen 0 recv 0: short {len(first)}/10000"
        got = first
        while len(got) < len(payload):
            got += await read(len(payload) - len(got))
        assert got == payload
        if fast:
            await a.send_eof()
            assert await read(10) == b""

    anyio.run(main)


def test_corrupt_flips_one_bit_past_the_header_and_spares_the_callers_buffer() -> None:
    async def main() -> None:
        sched = always(FaultKind.CORRUPT)
        a, b = memory_stream_pair()
        tx = sched.wrap(a, side="tx", conn=0)
        payload = bytearray(bytes([T_DATA]) + os.urandom(4095))  # a DATA frame
        original = bytes(payload)
        await tx.send(memoryview(payload))
        got = await b.receive(len(payload))
        assert payload == original
        diff = [i for i in range(len(got)) if got[i] != original[i]]
        assert len(diff) == 1 and diff[0] >= 64
        assert bin(got[diff[0]] ^ original[diff[0]]).count("1") == 1
        (record,) = sched.log.records
        assert record.detail.startswith(f"byte {diff[0]} of 4096 bit ")
        # At most 64 bytes: nothing past the header to damage, so it goes out unchanged.
        await tx.send(original[:64])
        assert await b.receive() == original[:64]
        assert len(sched.log) == 1

    anyio.run(main)


def test_corrupt_spares_sends_that_are_not_data_frames() -> None:
    """Damage to a handshake or a tagged control frame is tampering (a refused session, a
    dropped connection), not the payload damage a checksum or a seal catches and recovers from."""

    async def main() -> None:
        sched = always(FaultKind.CORRUPT)
        a, b = memory_stream_pair()
        tx = sched.wrap(a, side="tx", conn=0)
        control = bytes([T_ACK]) + os.urandom(4095)
        await tx.send(control)
        assert await b.receive(len(control)) == control
        (record,) = sched.log.records
        assert record.detail == "skipped: not a DATA frame"

    anyio.run(main)


# -- the fault log -----------------------------------------------------------------------------


def test_every_fault_is_logged_once_on_the_chaos_logger(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> FaultLog:
        sched = ChaosScheduler(11, rate=1.0, kinds={FaultKind.DELAY, FaultKind.SHORT})
        a, _b = memory_stream_pair(buffer=64)
        tx = sched.wrap(a, side="tx", conn=2)
        for i in range(10):
            await tx.send(bytes(100 + i))
        return sched.log

    with caplog.at_level(logging.WARNING, logger="viamillipede.chaos"):
        fault_log = run_mock(main)
    messages = [r.getMessage() for r in caplog.records if r.name == "viamillipede.chaos"]
    assert messages == fault_log.lines()
    assert len(messages) == 10
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    summary = fault_log.summary()
    assert summary[FaultKind.DELAY] + summary[FaultKind.SHORT] == 10
    assert summary[FaultKind.RESET] == summary[FaultKind.STALL] == summary[FaultKind.CORRUPT] == 0


# -- with nothing to inject, a correct stream --------------------------------------------------


def test_without_faults_the_wrapper_is_transparent_on_asyncio_too() -> None:
    async def main() -> None:
        sched = ChaosScheduler(5, rate=0.0, kinds=ALL_KINDS)
        a, b = into_pair()
        tx = sched.wrap(a, side="tx", conn=0)
        rx = sched.wrap(b, side="rx", conn=0)
        assert isinstance(rx, ReceiveInto)
        await tx.send(b"abc")
        await tx.send(bytearray(b"def"))
        await tx.send(memoryview(b"ghi"))
        assert await receive_exactly(rx, 9) == b"abcdefghi"
        await tx.send(b"xyz")
        buf = bytearray(3)
        assert await rx.receive_into(memoryview(buf)) == 3 and buf == b"xyz"
        await tx.send_eof()
        with pytest.raises(anyio.ClosedResourceError):
            await tx.send(b"after eof")
        with pytest.raises(anyio.EndOfStream):
            await rx.receive()
        await rx.send(b"back")
        assert await tx.receive() == b"back"
        await tx.aclose()
        await rx.aclose()
        assert len(sched.log) == 0

    anyio.run(main, backend="asyncio")


ErrorMap = dict[type[Exception], Callable[[str], Exception]]

#: Trio's stream errors and anyio's mean the same things under different names.
TO_ANYIO: ErrorMap = {
    trio.BrokenResourceError: anyio.BrokenResourceError,
    trio.ClosedResourceError: anyio.ClosedResourceError,
    trio.BusyResourceError: anyio.BusyResourceError,
}
TO_TRIO: ErrorMap = {
    anyio.BrokenResourceError: trio.BrokenResourceError,
    anyio.ClosedResourceError: trio.ClosedResourceError,
    anyio.BusyResourceError: trio.BusyResourceError,
}


@contextlib.contextmanager
def translated(table: ErrorMap) -> Iterator[None]:
    try:
        yield
    except tuple(table) as exc:
        raise next(make(str(exc)) for t, make in table.items() if isinstance(exc, t)) from exc


class TrioToAnyio(anyio.abc.ByteStream):
    """A Trio stream seen as an anyio byte stream: the inner stream the wrapper expects."""

    def __init__(self, stream: trio.StapledStream[Any, Any]) -> None:
        self.stream = stream

    async def send(self, item: bytes) -> None:
        with translated(TO_ANYIO):
            await self.stream.send_all(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with translated(TO_ANYIO):
            data = await self.stream.receive_some(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return bytes(data)

    async def send_eof(self) -> None:
        with translated(TO_ANYIO):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class TrioToAnyioInto(TrioToAnyio):
    async def receive_into(self, view: memoryview) -> int:
        with translated(TO_ANYIO):
            data = await self.stream.receive_some(len(view))
        view[: len(data)] = data
        return len(data)


class AnyioToTrio(trio.abc.HalfCloseableStream):
    """An anyio byte stream seen as a Trio stream, so Trio's own checkers can judge it."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        with translated(TO_TRIO):
            await self.stream.send(data)  # type: ignore[arg-type]

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = 65536
        max_bytes = operator.index(max_bytes)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._closed:
            raise trio.ClosedResourceError
        with translated(TO_TRIO):
            if isinstance(self.stream, ReceiveInto):
                buf = bytearray(max_bytes)
                n = await self.stream.receive_into(memoryview(buf))
                return bytes(buf[:n])
            try:
                return await self.stream.receive(max_bytes)
            except anyio.EndOfStream:
                return b""

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        with translated(TO_TRIO):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()


CONFORMANCE = [
    pytest.param(0.0, ALL_KINDS, id="rate-0"),
    pytest.param(1.0, (), id="no-kinds"),
    pytest.param(1.0, {FaultKind.DELAY, FaultKind.SHORT}, id="always-delay-or-short"),
]


@pytest.mark.parametrize("fast", [False, True], ids=["receive", "receive_into"])
@pytest.mark.parametrize("rate, kinds", CONFORMANCE)
def test_trio_stream_conformance(rate: float, kinds: Iterable[FaultKind], fast: bool) -> None:
    """Trio's own checkers: ordering, EOF, half-close, close wakes waiters, cancellation."""
    inner_type = TrioToAnyioInto if fast else TrioToAnyio

    async def maker() -> tuple[AnyioToTrio, AnyioToTrio]:
        sched = ChaosScheduler(99, rate=rate, kinds=kinds)
        left, right = trio.testing.memory_stream_pair()
        return (
            AnyioToTrio(sched.wrap(inner_type(left), side="tx", conn=0)),
            AnyioToTrio(sched.wrap(inner_type(right), side="rx", conn=0)),
        )

    run_mock(lambda: trio.testing.check_half_closeable_stream(maker, None))


# -- delays and fragmentation never change the bytes -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64),
    rate=st.floats(min_value=0.0, max_value=1.0),
    writes=st.lists(st.binary(max_size=3000), max_size=15),
    reads=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=10),
    fast=st.booleans(),
)
def test_delay_and_short_never_change_the_bytes(
    seed: int, rate: float, writes: list[bytes], reads: list[int], fast: bool
) -> None:
    async def main() -> bytes:
        sched = ChaosScheduler(seed, rate=rate, kinds={FaultKind.DELAY, FaultKind.SHORT})
        a, b = into_pair(buffer=4) if fast else memory_stream_pair(buffer=4)
        tx = sched.wrap(a, side="tx", conn=0)
        rx = sched.wrap(b, side="rx", conn=0)
        got = bytearray()

        async def sender() -> None:
            for w in writes:
                await tx.send(w)
            await tx.send_eof()

        async def receiver() -> None:
            for size in itertools.cycle(reads):
                if isinstance(rx, ReceiveInto):
                    buf = bytearray(size)
                    n = await rx.receive_into(memoryview(buf))
                    if n == 0:
                        return
                    got.extend(buf[:n])
                else:
                    try:
                        got.extend(await rx.receive(size))
                    except anyio.EndOfStream:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
        return bytes(got)

    assert run_mock(main) == b"".join(writes)
