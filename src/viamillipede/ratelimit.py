"""A rate limit for a whole session: one token bucket in front of the source or the sink.

``limit RATE`` caps the stream itself, not each connection: on the transmitter the bucket sits
between the source and the chunks read from it, on the receiver between the reorder buffer
and the output.  Whatever the number of connections, the stream then moves at the rate, and
at no moment more than one burst ahead of it: starting at time ``t0``, the bytes handed on by
time ``t`` never exceed ``burst + rate * (t - t0)``.  The burst is at most one chunk (and
smaller at low rates, about 0.1 s of traffic), never a window: after a pause the stream does not
catch up in a rush.

The clock is :func:`anyio.current_time`, so the bucket runs under a mock clock as it does on a
real one, and :class:`TokenBucket` itself is a pure object (``reserve`` takes the time as an
argument) that tests can drive with any sequence of instants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .options import DEFAULT_CHUNK_SIZE
from .stats import LimitStats
from .streams import SpliceSink, SpliceSource

if TYPE_CHECKING:
    from .receiver import Sink
    from .transmitter import Source

#: The smallest burst: below this, reads and writes would get too small to be worth their cost.
MIN_BURST = 16 * 1024
#: The burst is about this much of the rate's traffic, when that is less than a chunk.
BURST_SECONDS = 0.1


def burst_for(rate: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The burst a session limited to ``rate`` bytes/s allows: at most one chunk, about 0.1 s
    of traffic at low rates, never below :data:`MIN_BURST` (nor above the chunk)."""
    return max(1, min(chunk_size, max(MIN_BURST, int(rate * BURST_SECONDS))))


class TokenBucket:
    """``rate`` tokens (bytes) per second, holding at most ``burst``; starts full.

    A taker may run into debt: :meth:`reserve` takes ``n`` tokens at once and says when they are
    paid for, so concurrent takers queue up in the order they asked, and one request larger
    than the burst simply waits longer.  Bytes handed on no earlier than that moment keep the
    stream within ``burst + rate * elapsed``.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0:
            raise ValueError(f"the rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"the burst must be at least one byte, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None
        #: Seconds the stream was held back by the limit, summed over every request.
        self.waited = 0.0

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens at time ``now``; return the time from which the ``n`` bytes may go
        (``now`` itself if the bucket held enough)."""
        self._refill(now)
        self._tokens -= n
        if self._tokens >= 0:
            return now
        delay = -self._tokens / self.rate
        self.waited += delay
        return now + delay

    def refund(self, n: int, now: float) -> None:
        """Give back tokens taken for bytes that did not go after all (a short read, a
        cancelled request); the bucket still holds at most ``burst``."""
        self._refill(now)
        self._tokens = min(float(self.burst), self._tokens + n)

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may go.  If cancelled while waiting, the tokens are given
        back: nothing went."""
        at = self.reserve(n, anyio.current_time())
        try:
            await anyio.sleep_until(at)
        except BaseException:
            self.refund(n, anyio.current_time())
            raise

    def stats(self) -> LimitStats:
        return LimitStats(rate=self.rate, waited=self.waited)


class RateLimitedSource:
    """A source read through a :class:`TokenBucket`: each read asks for at most one burst.

    A file source is read like a pipe here (its regions are not offered for ``sendfile``): the
    limit decides the pace, not the copy.  As safe to cancel as the source it wraps: a request
    cancelled while it waits for tokens has read nothing.
    """

    def __init__(self, source: Source, bucket: TokenBucket) -> None:
        self.inner = source
        self.bucket = bucket
        self.cancel_safe = bool(getattr(source, "cancel_safe", False))

    async def readinto(self, view: memoryview) -> int:
        want = min(len(view), self.bucket.burst)
        if want == 0:
            return await self.inner.readinto(view)
        await self.bucket.take(want)
        got = 0
        try:
            got = await self.inner.readinto(view[:want])
        finally:
            if got < want:  # end of stream, a short read, or a failure: those bytes did not go
                self.bucket.refund(want - got, anyio.current_time())
        return got


class RateLimitedSink:
    """A sink written through a :class:`TokenBucket`, in pieces of at most one burst.

    A sink that can take bytes by splice keeps doing so, piece by piece, and a sink that counts
    its own bytes (``nbytes``) still reports them.
    """

    def __init__(self, sink: Sink, bucket: TokenBucket) -> None:
        self.inner = sink
        self.bucket = bucket
        self._splice = sink if isinstance(sink, SpliceSink) and sink.can_splice else None

    @property
    def nbytes(self) -> int | None:
        count = getattr(self.inner, "nbytes", None)
        return count if isinstance(count, int) else None

    async def write(self, data: memoryview) -> None:
        step = self.bucket.burst
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            await self.bucket.take(len(piece))
            await self.inner.write(piece)

    async def flush(self) -> None:
        await self.inner.flush()

    @property
    def can_splice(self) -> bool:
        return self._splice is not None

    async def splice_from(
        self, stream: SpliceSource, count: int, moved: Callable[[int], None]
    ) -> None:
        assert self._splice is not None
        step = self.bucket.burst
        while count:
            piece = min(count, step)
            await self.bucket.take(piece)
            await self._splice.splice_from(stream, piece, moved)
            count -= piece


def limit_source(source: Source, rate: float, chunk_size: int) -> RateLimitedSource:
    """``source`` read at no more than ``rate`` bytes per second (see :func:`burst_for`)."""
    return RateLimitedSource(source, TokenBucket(rate, burst_for(rate, chunk_size)))


def limit_sink(sink: Sink, rate: float) -> RateLimitedSink:
    """``sink`` written at no more than ``rate`` bytes per second.  The receiver does not know
    the chunk size before the session starts: the burst is at most the default chunk."""
    return RateLimitedSink(sink, TokenBucket(rate, burst_for(rate)))
