"""Shared test machinery: sessions over in-memory streams, Trio under a mock clock, chaos at
both ends of a session, and the switch that makes a missing lab requirement a failure.

Only the public API is used (``viamillipede``, ``viamillipede.api``, ``viamillipede.chaos``,
``viamillipede.testing``), so these helpers do not care how the two ends work inside.

Scheduling and replay
---------------------
:func:`run_mock` runs Trio with a :class:`trio.testing.MockClock` that jumps ahead whenever
every task is waiting on it, so timeouts, stalls and delays cost no real time.  It does *not*
fix the order in which Trio runs tasks that are ready at the same moment: Trio randomises that
order on purpose and offers no public way to fix it.  So what a test may claim is:

- a chaos seed decides, for every operation a run performs, whether and how it is faulted (a
  pure function of the seed and the operation's position); which operations a session performs
  can depend on the task order when several tasks are involved;
- one task on its own (a scripted exchange) replays exactly;
- inside a Hypothesis example a whole session replays exactly: Hypothesis seeds every PRNG
  registered with it at the start of each example, and Trio registers its scheduler's.  That is
  what lets Hypothesis shrink and replay a failing chaos session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from viamillipede import BufferSink, BytesSource, Receiver, TransferStats, Transmitter, receive
from viamillipede.chaos import ChaosScheduler, FaultKind
from viamillipede.testing import MemoryNetwork

T = TypeVar("T")

Connector = Callable[[int], Awaitable[anyio.abc.ByteStream]]
"""What a :class:`~viamillipede.Transmitter` opens connection ``index`` with."""

ServerWrapper = Callable[[int, anyio.abc.ByteStream], anyio.abc.ByteStream]
"""``wrap(accept number, stream)``: what :func:`viamillipede.receive` takes as ``wrap``."""

ALL_KINDS = frozenset(FaultKind)


class Listener(Protocol):
    async def accept(self) -> anyio.abc.ByteStream: ...


# -- the lab switch -----------------------------------------------------------------------------

REQUIRE_LAB = "VIAMILLIPEDE_REQUIRE_LAB"
"""Set to 1 (CI does) and a test that would skip for want of root, namespaces, ``ss -K``,
groff or man fails instead, with the same reason."""


def lab_required() -> bool:
    """Whether the environment asks for every lab test to run (``VIAMILLIPEDE_REQUIRE_LAB``)."""
    return os.environ.get(REQUIRE_LAB, "").strip().lower() in {"1", "true", "yes", "on"}


def require_or_skip(missing: str | None) -> None:
    """Skip the calling test because of ``missing`` (what this machine lacks, in words), or,
    when :func:`lab_required`, fail it with that reason.  ``None``: nothing is missing."""
    __tracebackhide__ = True  # report the test's line, not this one
    if missing is None:
        return
    if lab_required():
        pytest.fail(f"{missing} ({REQUIRE_LAB}=1: this test must run, not skip)", pytrace=False)
    pytest.skip(missing)


# -- Trio under a mock clock --------------------------------------------------------------------


def run_mock(fn: Callable[[], Awaitable[T]], *, limit: float = 1e6) -> T:
    """Run ``fn()`` on Trio with a clock that jumps whenever every task waits on it.

    ``limit`` is a deadline in virtual seconds: a hang (say, a close that fails to wake a
    waiter) becomes a quick :class:`trio.TooSlowError` instead of a stuck test run.  See the
    module docstring for what this does and does not make reproducible.
    """

    async def bounded() -> T:
        with trio.fail_after(limit):
            return await fn()

    return trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


# -- streams ------------------------------------------------------------------------------------


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    """Exactly ``n`` bytes from ``stream``, however it splits them."""
    got = b""
    while len(got) < n:
        got += await stream.receive(n - len(got))
    return got


class WrappingListener:
    """A listener whose accepted streams are handed to ``wrap(accept number, stream)`` first,
    as :func:`viamillipede.receive` does with its ``wrap`` hook."""

    def __init__(self, listener: Listener, wrap: ServerWrapper) -> None:
        self.listener = listener
        self.wrap = wrap
        self._accepted = itertools.count()

    async def accept(self) -> anyio.abc.ByteStream:
        return self.wrap(next(self._accepted), await self.listener.accept())


def chaos_endpoints(
    sched: ChaosScheduler, net: MemoryNetwork
) -> tuple[WrappingListener, Connector]:
    """Both ends of ``net`` under ``sched``, as ``viamillipede chaos SEED`` puts them: the
    receiver's streams numbered in accept order, the transmitter's by connection index and
    reconnect generation.  Returns ``(listener, connector)``."""
    return WrappingListener(net, sched.receiver_wrapper()), sched.wrap_connector(net.connect)


# -- sources and sinks -------------------------------------------------------------------------


class WatchedSink(BufferSink):
    """A :class:`~viamillipede.BufferSink` whose progress can be awaited."""

    def __init__(self) -> None:
        super().__init__()
        self._more = anyio.Event()

    async def write(self, data: memoryview) -> None:
        await super().write(data)
        self._more.set()
        self._more = anyio.Event()

    async def wait_for(self, nbytes: int) -> None:
        """Return once at least ``nbytes`` have been written."""
        while len(self.data) < nbytes:
            await self._more.wait()


class OpenPipeSource:
    """A pipe whose writer stays: a read returns what was fed and not yet read, or waits for
    more (and the transfer with it) until :meth:`close` ends the stream."""

    def __init__(self, data: bytes = b"") -> None:
        self.fed = bytearray(data)
        self._unread = bytearray(data)
        self._more = anyio.Event()
        self._closed = False

    def feed(self, data: bytes) -> None:
        self.fed += data
        self._unread += data
        self._more.set()

    def close(self) -> None:
        self._closed = True
        self._more.set()

    async def readinto(self, view: memoryview) -> int:
        while not self._unread and not self._closed:
            self._more = anyio.Event()
            await self._more.wait()
        n = min(len(view), len(self._unread))
        view[:n] = self._unread[:n]
        del self._unread[:n]
        return n


class PacedSource:
    """``total`` pseudo-random bytes (``seed``) written into a pipe at ``rate`` bytes per second
    of the running clock, in ``block``-sized writes, as tests/procs.py's Feeder does; a read
    returns what has been written and not yet read, waiting for the next write if nothing has.
    ``data`` holds every byte it will yield."""

    def __init__(self, rate: float, total: int, *, seed: int = 1, block: int = 64 * 1024) -> None:
        self.rate = rate
        self.block = block
        self.data = random.Random(seed).randbytes(total)
        self._pos = 0
        self._blocks = 0  # blocks written so far: block k is written at start + k * block / rate
        self._start = 0.0

    def _written(self) -> int:
        now = anyio.current_time()
        while (self._blocks * self.block < len(self.data)
               and self._start + self._blocks * self.block / self.rate <= now):
            self._blocks += 1
        return min(len(self.data), self._blocks * self.block)

    async def readinto(self, view: memoryview) -> int:
        if self._pos >= len(self.data):
            return 0
        if self._blocks == 0:
            self._start = anyio.current_time()
        written = self._written()
        if written <= self._pos:  # the writer's next block is due at:
            await anyio.sleep_until(self._start + self._blocks * self.block / self.rate)
            written = self._written()
        n = min(len(view), written - self._pos)
        view[:n] = self.data[self._pos : self._pos + n]
        self._pos += n
        return n


# -- whole sessions -----------------------------------------------------------------------------


@dataclass
class Session:
    """A finished session: both ends, the sink, and what each end reported."""

    tx: Transmitter
    rx: Receiver
    sink: BufferSink
    tx_stats: TransferStats
    rx_stats: TransferStats | None
    """None when the receiver was stopped rather than waited for."""

    @property
    def received(self) -> bytes:
        return bytes(self.sink.data)


async def run_session(
    source: bytes | Any,
    *,
    net: MemoryNetwork | None = None,
    sink: BufferSink | None = None,
    connect: Connector | None = None,
    listener: Listener | None = None,
    rx_options: dict[str, Any] | None = None,
    wait_for_receiver: bool = True,
    limit: float = 30.0,
    **tx_options: Any,
) -> Session:
    """Run a :class:`~viamillipede.Transmitter` against a :class:`~viamillipede.Receiver` over
    in-memory streams, on whatever anyio backend (or mock clock) is running.

    ``source`` is bytes or any source; ``tx_options`` and ``rx_options`` go to the two
    constructors.  ``connect`` and ``listener`` default to ``net`` (a new
    :class:`~viamillipede.testing.MemoryNetwork` unless given).  The transmitter must succeed;
    then the receiver's ``serve`` must return too, unless ``wait_for_receiver`` is false, in
    which case it is stopped.  ``limit`` bounds the whole session, in seconds (virtual ones
    under a mock clock).
    """
    net = net if net is not None else MemoryNetwork()
    sink = sink if sink is not None else BufferSink()
    if isinstance(source, bytes | bytearray | memoryview):
        source = BytesSource(source)
    rx = Receiver(sink, **(rx_options or {}))
    tx = Transmitter(source, connect or net.connect, **tx_options)
    rx_stats: list[TransferStats] = []

    async def serve() -> None:
        rx_stats.append(await rx.serve(listener or net))

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            tx_stats = await tx.run()
            if not wait_for_receiver:
                tg.cancel_scope.cancel()
    return Session(tx, rx, sink, tx_stats, rx_stats[0] if rx_stats else None)


@dataclass
class LoopbackReceiver:
    """A receiver serving one session on 127.0.0.1 (see :func:`loopback_receiver`)."""

    port: int
    scope: anyio.CancelScope

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.port)]

    def stop(self) -> None:
        """Stop the receiver now instead of waiting for its session to end."""
        self.scope.cancel()


@contextlib.asynccontextmanager
async def loopback_receiver(
    sink: BufferSink, *, limit: float = 30.0, **options: Any
) -> AsyncIterator[LoopbackReceiver]:
    """:func:`viamillipede.receive` on a free loopback port, listening before the body runs.

    Leaving the block waits for the receiver's session to end (call ``stop()`` first when it
    will not); ``limit`` bounds the whole block, in seconds.
    """
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda task_status: receive(
                sink, 0, host="127.0.0.1", task_status=task_status, **options))
            yield LoopbackReceiver(port, tg.cancel_scope)


# -- chaos --------------------------------------------------------------------------------------


def always(kind: FaultKind | str, **options: Any) -> ChaosScheduler:
    """A scheduler that gives every operation the same fault (where it applies)."""
    return ChaosScheduler(seed=1, rate=1.0, kinds=[kind], **options)


# -- a session interrupted mid-transfer ----------------------------------------------------


@dataclass
class Ends:
    """Both ends of an in-memory session under way (see :func:`mid_transfer`)."""

    tx: Transmitter
    rx: Receiver
    source: OpenPipeSource
    net: MemoryNetwork
    scopes: dict[str, trio.CancelScope]
    accepted: list[anyio.abc.ByteStream]

    def kill(self, side: str) -> None:
        """What SIGKILL does to one end: it stops without a word, the kernel closes its
        connections, and nothing answers on its behalf any more."""
        self.net.refuse = True
        self.scopes[side].cancel()


async def _close_all(streams: list[anyio.abc.ByteStream]) -> None:
    for stream in streams:
        await anyio.aclose_forcefully(stream)


def mid_transfer(
    act: Callable[[Ends], None], *, tx_timeout: float = 30.0, rx_timeout: float = 30.0,
    chunk: int = 64 * 1024,
) -> dict[str, tuple[BaseException | None, float]]:
    """An in-memory session whose source stays open after 10 chunks; once the receiver has
    written them, ``act(ends)`` runs.  Returns, per end (``"tx"``, ``"rx"``), what its run
    raised (None if it was killed or succeeded) and how many seconds of mock time after
    ``act`` it ended."""
    ended: dict[str, tuple[BaseException | None, float]] = {}

    async def main() -> None:
        net = MemoryNetwork()
        sink = WatchedSink()
        first = os.urandom(10 * chunk)
        accepted: list[anyio.abc.ByteStream] = []

        def keep(_: int, stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
            accepted.append(stream)
            return stream

        source = OpenPipeSource(first)
        ends = Ends(
            tx=Transmitter(source, net.connect, threads=2, chunk_size=chunk,
                           idle_timeout=tx_timeout),
            rx=Receiver(sink, idle_timeout=rx_timeout),
            source=source,
            net=net,
            scopes={"tx": trio.CancelScope(), "rx": trio.CancelScope()},
            accepted=accepted,
        )
        acted_at = [0.0]
        runs: dict[str, Callable[[], Awaitable[object]]] = {
            "tx": ends.tx.run, "rx": lambda: ends.rx.serve(WrappingListener(net, keep)),
        }

        async def run(side: str) -> None:
            error: BaseException | None = None
            try:
                with ends.scopes[side]:
                    await runs[side]()
            except Exception as exc:
                error = exc
            if side == "rx" and ends.scopes[side].cancel_called:
                await _close_all(accepted)  # the receiver's connections close with it
            ended[side] = (error, trio.current_time() - acted_at[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "rx")
            nursery.start_soon(run, "tx")
            await sink.wait_for(len(first))
            assert bytes(sink.data) == first
            acted_at[0] = trio.current_time()
            act(ends)

    run_mock(main, limit=600)  # virtual seconds: a hang fails fast
    return ended
