"""The rate limit: the token bucket as a pure object, its source and sink wrappers under Trio's
mock clock, and a limited session through the API on both backends.

What a limit promises: over a long run the stream moves at the rate (within 2% here), and at no
moment is it more than one burst (at most a chunk) ahead of it, even right after a pause:
over any stretch of time ``[a, b]`` at most ``burst + rate * (b - a)`` bytes go.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import pytest
import trio

from harness import run_mock
from viamillipede import BufferSink, BytesSource, Receiver, Transmitter, receive, send
from viamillipede.cli import largest_chunk
from viamillipede.errors import PeerTimeout
from viamillipede.ratelimit import (
    MIN_BURST,
    RateLimitedSink,
    RateLimitedSource,
    TokenBucket,
    burst_for,
    limit_sink,
    limit_source,
)
from viamillipede.stats import LimitStats
from viamillipede.streams import SpliceSink, SpliceSource
from viamillipede.testing import MemoryNetwork

CHUNK = 64 * 1024
RATE = 1_000_000.0

Events = list[tuple[float, int]]
"""(time, bytes) of each piece handed on."""


def most_ahead(events: Events, rate: float) -> float:
    """The most bytes handed on in any stretch ``[a, b]`` beyond ``rate * (b - a)``."""
    worst = 0.0
    times = [t for t, _ in events]
    sizes = [n for _, n in events]
    for i in range(len(events)):
        total = 0
        for j in range(i, len(events)):
            total += sizes[j]
            worst = max(worst, total - rate * (times[j] - times[i]))
    return worst


def average_rate(events: Events) -> float:
    """Bytes after the first piece over the time they took: the first piece goes at once."""
    total = sum(n for _, n in events[1:])
    return total / (events[-1][0] - events[0][0])


# -- the bucket as a pure object ----------------------------------------------------------------


def greedy(bucket: TokenBucket, sizes: list[int], gaps: list[float] | None = None) -> Events:
    """A taker that asks for each size as soon as the previous one went (after ``gaps[i]`` of
    idling, if given); returns when each went."""
    now = 0.0
    events: Events = []
    for i, n in enumerate(sizes):
        now += gaps[i] if gaps else 0.0
        now = bucket.reserve(n, now)
        events.append((now, n))
    return events


def test_a_long_run_keeps_the_rate_within_2_percent() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    events = greedy(bucket, [CHUNK] * 2000)
    assert average_rate(events) == pytest.approx(RATE, rel=0.02)
    assert most_ahead(events[:300], RATE) <= CHUNK + 1e-6


def test_never_more_than_one_chunk_ahead_even_after_pauses() -> None:
    """Pauses of up to 3 s (longer than a window takes at the rate) earn no burst beyond one
    chunk; requests of any size up to a chunk."""
    rng = random.Random(7)
    sizes = [rng.randint(1, CHUNK) for _ in range(500)]
    gaps = [rng.choice([0.0, 0.0, 0.0, 0.01, 0.5, 3.0]) for _ in range(500)]
    events = greedy(TokenBucket(RATE, CHUNK), sizes, gaps)
    assert most_ahead(events, RATE) <= CHUNK + 1e-6


def test_without_pauses_the_rate_is_exact_after_the_first_burst() -> None:
    rng = random.Random(3)
    sizes = [rng.randint(1000, CHUNK) for _ in range(3000)]
    events = greedy(TokenBucket(RATE, CHUNK), sizes)
    assert average_rate(events) == pytest.approx(RATE, rel=0.02)


def test_a_request_larger_than_the_burst_waits_for_the_difference() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    assert bucket.reserve(3 * CHUNK, 10.0) == pytest.approx(10.0 + 2 * CHUNK / RATE)
    assert bucket.waited == pytest.approx(2 * CHUNK / RATE)


def test_concurrent_takers_queue_in_order() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    first = bucket.reserve(CHUNK, 0.0)
    second = bucket.reserve(CHUNK, 0.0)
    third = bucket.reserve(CHUNK, 0.0)
    assert (first, second, third) == pytest.approx((0.0, CHUNK / RATE, 2 * CHUNK / RATE))


def test_a_refund_never_fills_the_bucket_beyond_its_burst() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    bucket.refund(10 * CHUNK, 0.0)
    assert bucket.reserve(2 * CHUNK, 0.0) == pytest.approx(CHUNK / RATE)


def test_a_refund_gives_back_what_did_not_go() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    bucket.reserve(CHUNK, 0.0)
    bucket.refund(CHUNK, 0.0)
    assert bucket.reserve(CHUNK, 0.0) == 0.0


def test_stats() -> None:
    bucket = TokenBucket(RATE, CHUNK)
    bucket.reserve(2 * CHUNK, 0.0)
    assert bucket.stats() == LimitStats(rate=RATE, waited=pytest.approx(CHUNK / RATE))


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_nonsense_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@pytest.mark.parametrize(
    ("rate", "chunk", "burst"),
    [
        (1e9, 2 * 1024 * 1024, 2 * 1024 * 1024),  # fast: one chunk
        (1e9, CHUNK, CHUNK),
        (10e6, 2 * 1024 * 1024, 1_000_000),  # 0.1 s of traffic, less than a chunk
        (1000.0, 2 * 1024 * 1024, MIN_BURST),  # slow: no pieces smaller than MIN_BURST
        (1000.0, 4096, 4096),  # ... unless the chunk is smaller still
    ],
)
def test_the_burst_is_at_most_one_chunk(rate: float, chunk: int, burst: int) -> None:
    assert burst_for(rate, chunk) == burst


# -- the wrappers, under a mock clock -----------------------------------------------------------


def test_a_limited_source_is_read_at_the_rate() -> None:
    data = random.Random(1).randbytes(5 * 1024 * 1024)

    async def main() -> tuple[Events, bytes]:
        source = limit_source(BytesSource(data), RATE, CHUNK)
        assert source.bucket.burst == CHUNK
        events: Events = []
        got = bytearray()
        buf = bytearray(256 * 1024)  # a bigger view than the burst: still one burst a read
        while n := await source.readinto(memoryview(buf)):
            assert n <= CHUNK
            events.append((trio.current_time(), n))
            got += buf[:n]
        return events, bytes(got)

    events, got = run_mock(main)
    assert got == data
    assert average_rate(events) == pytest.approx(RATE, rel=0.02)
    assert most_ahead(events, RATE) <= CHUNK + 1e-6


class TrickleSource:
    """Yields ``piece`` bytes a read, ``pieces`` times."""

    cancel_safe = True

    def __init__(self, piece: int, pieces: int) -> None:
        self.piece = piece
        self.left = pieces
        self.asked: list[int] = []

    async def readinto(self, view: memoryview) -> int:
        self.asked.append(len(view))
        await trio.lowlevel.checkpoint()
        if not self.left:
            return 0
        self.left -= 1
        n = min(self.piece, len(view))
        view[:n] = b"t" * n
        return n


def test_short_reads_are_charged_only_for_what_they_read() -> None:
    """A source that gives 1000 bytes a read, though asked for a chunk, pays for 1000 bytes:
    500 reads at 1 MB/s take 0.5 s, not the 32 s that 500 whole chunks would."""

    async def main() -> float:
        inner = TrickleSource(1000, 500)
        source = RateLimitedSource(inner, TokenBucket(RATE, CHUNK))
        start = trio.current_time()
        buf = memoryview(bytearray(CHUNK))
        while await source.readinto(buf):
            pass
        assert inner.asked and max(inner.asked) == CHUNK
        return trio.current_time() - start

    assert run_mock(main) == pytest.approx(0.5, abs=0.01)


class PlainSource:
    """A source that does not say whether a cancelled read loses bytes."""

    async def readinto(self, view: memoryview) -> int:
        return 0


def test_the_wrapper_is_as_cancel_safe_as_its_source() -> None:
    """Only then may a transmitter give up a read to send a partial chunk."""
    assert RateLimitedSource(TrickleSource(1, 1), TokenBucket(RATE, CHUNK)).cancel_safe
    assert not RateLimitedSource(PlainSource(), TokenBucket(RATE, CHUNK)).cancel_safe


def test_a_read_cancelled_while_waiting_takes_nothing() -> None:
    async def main() -> tuple[float, bytes]:
        source = RateLimitedSource(BytesSource(b"a" * 4 * CHUNK), TokenBucket(RATE, CHUNK))
        buf = memoryview(bytearray(CHUNK))
        assert await source.readinto(buf) == CHUNK  # the burst: at once
        with trio.move_on_after(0.01):  # the next chunk is due at 0.0655 s
            await source.readinto(buf)
            pytest.fail("the read did not wait for the rate")
        start = trio.current_time()
        assert await source.readinto(buf) == CHUNK
        return trio.current_time() - start, bytes(buf)

    waited, got = run_mock(main)
    # The cancelled request paid nothing: the next one waits only for the rest of its chunk.
    assert waited == pytest.approx(CHUNK / RATE - 0.01, abs=1e-6)
    assert got == b"a" * CHUNK


class RecordingSink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: Events = []
        self.flushed = False
        self.nbytes = 0

    async def write(self, data: memoryview) -> None:
        self.writes.append((trio.current_time(), len(data)))
        self.data += data
        self.nbytes += len(data)
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        self.flushed = True


def test_a_limited_sink_is_written_at_the_rate_in_pieces_of_one_burst() -> None:
    data = random.Random(2).randbytes(4 * 1024 * 1024)
    inner = RecordingSink()

    async def main() -> None:
        sink = limit_sink(inner, RATE)
        assert sink.bucket.burst == 100_000  # 0.1 s of 1 MB/s: less than a default chunk
        for start in range(0, len(data), 256 * 1024):  # chunks of 256 KiB, bigger than a burst
            await sink.write(memoryview(data)[start : start + 256 * 1024])
        await sink.flush()
        assert sink.nbytes == len(data)

    run_mock(main)
    assert inner.data == data and inner.flushed
    assert max(n for _, n in inner.writes) <= 100_000
    assert average_rate(inner.writes) == pytest.approx(RATE, rel=0.02)
    assert most_ahead(inner.writes, RATE) <= 100_000 + 1e-6


def test_a_sink_without_a_count_reports_none() -> None:
    assert RateLimitedSink(BufferSink(), TokenBucket(RATE, CHUNK)).nbytes is None


class SplicingSink(RecordingSink):
    """Stands in for a pipe or file output: takes bytes from a connection by splice."""

    can_splice = True

    async def splice_from(
        self, stream: SpliceSource, count: int, moved: Callable[[int], None]
    ) -> None:
        self.writes.append((trio.current_time(), count))
        moved(count)
        await trio.lowlevel.checkpoint()


def test_a_splicing_sink_keeps_splicing_at_the_rate() -> None:
    inner = SplicingSink()
    sink = RateLimitedSink(inner, TokenBucket(RATE, CHUNK))
    assert isinstance(sink, SpliceSink) and sink.can_splice
    assert not RateLimitedSink(BufferSink(), TokenBucket(RATE, CHUNK)).can_splice
    moved: list[int] = []

    async def main() -> None:
        for _ in range(40):
            await sink.splice_from(None, 3 * CHUNK, moved.append)  # type: ignore[arg-type]

    run_mock(main)
    assert sum(moved) == 40 * 3 * CHUNK
    assert max(n for _, n in inner.writes) == CHUNK
    assert average_rate(inner.writes) == pytest.approx(RATE, rel=0.02)
    assert most_ahead(inner.writes, RATE) <= CHUNK + 1e-6


# -- a limited session under a mock clock: chunks must pass within the timeout ---------------


class FileLikeSource(BytesSource):
    """Like a regular file: it does not promise that a cancelled read loses nothing, so the
    transmitter fills every chunk before sending it (a pipe's partial chunks go after 0.2 s)."""

    cancel_safe = False


def limited_session(side: str, rate: float, chunk: int, timeout: float, data: bytes
                    ) -> tuple[dict[str, BaseException | None], bytes, float]:
    """A session limited at one end to ``rate``, with idle timeouts of ``timeout`` at both;
    what each end raised, what arrived, and how long it took (mock seconds)."""

    async def main() -> tuple[dict[str, BaseException | None], bytes, float]:
        net = MemoryNetwork()
        sink = BufferSink()
        source = FileLikeSource(data)
        tx_source = limit_source(source, rate, chunk) if side == "tx" else source
        rx_sink = limit_sink(sink, rate) if side == "rx" else sink
        tx = Transmitter(tx_source, net.connect, threads=2, chunk_size=chunk,
                         idle_timeout=timeout)
        rx = Receiver(rx_sink, idle_timeout=timeout)
        ended: dict[str, BaseException | None] = {}

        async def run(name: str, fn: Callable[[], object]) -> None:
            try:
                await fn()  # type: ignore[misc]
                ended[name] = None
            except Exception as exc:
                ended[name] = exc

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "rx", lambda: rx.serve(net))
            nursery.start_soon(run, "tx", tx.run)
        return ended, bytes(sink.data), trio.current_time() - start

    return run_mock(main, limit=3600)


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_at_a_low_limit_chunks_that_fit_the_timeout_get_through(side: str) -> None:
    """20 kB/s and timeouts of 8 s: chunks of what the rate carries in 1 s (as the command
    line chooses) arrive in time; the session takes as long as the rate says."""
    rate, timeout = 20_000.0, 8.0
    chunk = largest_chunk(rate, timeout)
    assert chunk == 16384
    data = random.Random(9).randbytes(200_000)
    ended, got, took = limited_session(side, rate, chunk, timeout, data)
    assert ended == {"tx": None, "rx": None}
    assert got == data
    assert took == pytest.approx(len(data) / rate, rel=0.1)


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_at_a_low_limit_a_chunk_slower_than_the_timeout_fails(side: str) -> None:
    """Why the command line shrinks a limited transmitter's chunks: a 256 KiB chunk takes
    13 s at 20 kB/s, longer than the 8 s without progress either end tolerates."""
    data = random.Random(9).randbytes(600_000)
    ended, _, _ = limited_session(side, 20_000.0, 256 * 1024, 8.0, data)
    assert any(isinstance(e, PeerTimeout) for e in ended.values()), ended


# -- a limited session through the API, both backends ----------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("side", ["tx", "rx"])
async def test_a_limited_session_through_the_api(side: str) -> None:
    """Over loopback: the stream arrives intact, and not sooner than the rate allows."""
    data = random.Random(5).randbytes(800_000)
    rate = 2e6
    sink = BufferSink()
    tx_limit, rx_limit = (rate, None) if side == "tx" else (None, rate)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda task_status: receive(
                sink, 0, host="127.0.0.1", limit=rx_limit, task_status=task_status))
            start = anyio.current_time()
            await send(BytesSource(data), [("127.0.0.1", port)], threads=3, chunk_size=CHUNK,
                       limit=tx_limit)
            took = anyio.current_time() - start
    assert sink.data == data
    burst = burst_for(rate, CHUNK) if side == "tx" else burst_for(rate)
    assert took >= (len(data) - burst) / rate * 0.95
