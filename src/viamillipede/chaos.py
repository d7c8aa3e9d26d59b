"""Deterministic fault injection for byte streams.

A session survives broken links only if every recovery path actually runs, and a recovery bug
found once must be reproducible on demand.  So faults are injected by a stream wrapper that sits
under the session (it knows nothing about frames), and every decision is a pure function of a
seed and the position of the operation -- never of time, scheduling or Python's per-process
``hash()`` salt.  ``chaos 7`` today and ``chaos 7`` next month, on another host, break the same
operations of the same connections in the same way.

Where an operation is: the session *side* (``"tx"`` or ``"rx"``), the connection index *conn*,
its reconnect *generation* (0 for the first stream of a connection index, then 1, 2, ...), the
*direction* (``"send"`` or ``"recv"``), and the operation number *op* within that direction of
that stream, counted from 0.  ``send``, ``send_file`` and ``send_pages`` are sends;
``receive``, ``receive_into``, ``receive_exactly_into`` and ``splice_to`` are receives: the
zero-copy methods of :mod:`viamillipede.streams` are forwarded when the inner stream has them,
and each call is one operation like any other.  Sends and receives are numbered separately
because a session reads and writes one stream from two tasks: their interleaving depends on the
scheduler (Trio even randomises it), each direction's own sequence does not.  ``send_eof`` and
``aclose`` are never counted nor faulted.

Fault kinds, and why each exists:

* ``reset`` -- the connection dies: the inner stream is closed (the peer sees end of stream)
  and the operation raises :class:`anyio.BrokenResourceError`; so does everything after it.
* ``stall`` -- a black-holed path: the operation blocks until the caller gives up (cancels or
  times out); the peer sees nothing.  Opt-in, because only a caller with a per-connection
  liveness timeout can get past it.
* ``delay`` -- latency: the operation waits a seeded 1-200 ms, then proceeds unchanged.
* ``short`` -- fragmentation: a send reaches the inner stream as 2-4 smaller sends (of the same
  kind: a ``send_file`` as several ``send_file`` calls); a receive asks the inner stream for
  fewer bytes than its caller did.  Where the caller was promised every byte it asked for
  (``receive_exactly_into``, ``splice_to``), the rest follows in a second inner call.
* ``corrupt`` -- a single flipped bit in a send that starts with a DATA frame, to prove a
  checksum or a seal catches it and the chunk comes again.  Opt-in,
  because without a checksum it silently damages the stream.  It never touches the first
  ``corrupt_skip`` (64) bytes of a send: that is where a framed protocol keeps its header, and
  a flipped header tests the decoder, not the checksum.  By default it only hits the ``tx``
  side, whose payloads are the checksummed ones.  Bytes that ``send_file`` or ``send_pages``
  would hand to the kernel by reference cannot be damaged on their way, so a corrupted one is
  sent as a damaged copy through plain ``send``: the peer sees what a flipped bit would give.

How often: ``rate`` is the chance that one operation gets a fault at all; the fault's kind is
then drawn among the enabled kinds that apply to that operation, in proportion to
:data:`DEFAULT_WEIGHTS` (resets and stalls are rarer than delays and fragmentation, so a
session spends most of its time making progress).  A drawn fault that cannot apply to the
actual operation (fragmenting a one-byte send, corrupting a short one) is skipped and not
logged.

Usage::

    sched = ChaosScheduler(seed=7, rate=0.05)
    stream = sched.wrap(await connect(host, port), side="tx", conn=3)   # generation counted
    ...
    for line in sched.log.lines():
        print(line)                        # "chaos tx conn 3 gen 0 send 17: reset"
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from .streams import (
    ReceiveExactlyInto,
    ReceiveInto,
    SendFile,
    SendPages,
    SpliceSink,
    SpliceTo,
)
from .transport import read_at
from .wire.frames import T_DATA as _DATA_TYPE

__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_RATE",
    "DEFAULT_WEIGHTS",
    "ChaosScheduler",
    "ChaosStream",
    "Direction",
    "Fault",
    "FaultKind",
    "FaultLog",
    "FaultRecord",
    "Side",
]

log = logging.getLogger("viamillipede.chaos")

Side = Literal["tx", "rx"]
Direction = Literal["send", "recv"]

_T = TypeVar("_T")


class FaultKind(enum.StrEnum):
    RESET = "reset"
    STALL = "stall"
    DELAY = "delay"
    SHORT = "short"
    CORRUPT = "corrupt"


#: Faults a session is expected to survive without any help: stall needs a liveness timeout
#: and corrupt needs checksums, so both must be asked for.
DEFAULT_KINDS: Final[frozenset[FaultKind]] = frozenset(
    {FaultKind.RESET, FaultKind.DELAY, FaultKind.SHORT}
)

#: One fault per 50 operations: dense enough that a short test run meets every kind, sparse
#: enough that a reconnected stream usually gets some chunks through before its next reset.
DEFAULT_RATE: Final = 0.02

#: Relative frequency of the kinds once an operation is picked for a fault.
DEFAULT_WEIGHTS: Final[Mapping[FaultKind, float]] = MappingProxyType(
    {
        FaultKind.RESET: 1.0,
        FaultKind.STALL: 1.0,
        FaultKind.DELAY: 4.0,
        FaultKind.SHORT: 4.0,
        FaultKind.CORRUPT: 2.0,
    }
)

#: Changing how decisions are derived changes every seed's meaning, so the derivation is
#: versioned; bump it rather than silently re-mapping old seeds.
_PERSON: Final = b"vmp-chaos-v1"
_DRAWS: Final = 8
_SIDES: Final = ("tx", "rx")
_DIRECTIONS: Final = ("send", "recv")


@dataclass(frozen=True, slots=True)
class Fault:
    """A decision for one operation, before it meets the operation's actual size.

    ``u`` holds seeded uniform numbers in [0, 1); the stream turns them into byte offsets and
    piece sizes once it knows how long the send or receive is, so the decision itself stays
    independent of the data.
    """

    kind: FaultKind
    delay_ms: int
    u: tuple[float, ...]


@dataclass(frozen=True, slots=True, order=True)
class FaultRecord:
    """One fault that was actually injected.

    Ordered by position, so logs of concurrent connections can be compared across runs after
    sorting, whatever order the tasks happened to run in.
    """

    side: Side
    conn: int
    generation: int
    direction: Direction
    op: int
    kind: FaultKind
    detail: str

    def line(self) -> str:
        head = (
            f"chaos {self.side} conn {self.conn} gen {self.generation} "
            f"{self.direction} {self.op}: {self.kind.value}"
        )
        return f"{head} {self.detail}" if self.detail else head


class FaultLog:
    """Every injected fault, in injection order, each also logged once at WARNING.

    A failing chaos run is only useful if its faults can be read back and replayed, so the lines
    carry no timestamps or addresses: the same seed gives the same text.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._records: list[FaultRecord] = []

    def record(self, entry: FaultRecord) -> None:
        self._records.append(entry)
        self._logger.warning("%s", entry.line())

    @property
    def records(self) -> tuple[FaultRecord, ...]:
        return tuple(self._records)

    def lines(self, *, ordered: bool = False) -> list[str]:
        """The log lines; ``ordered`` sorts them by position for run-to-run comparison."""
        records = sorted(self._records) if ordered else self._records
        return [r.line() for r in records]

    def summary(self) -> dict[FaultKind, int]:
        counts = dict.fromkeys(FaultKind, 0)
        for r in self._records:
            counts[r.kind] += 1
        return counts

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[FaultRecord]:
        return iter(tuple(self._records))


class ChaosScheduler:
    """Decides, from a seed alone, which operation of which stream gets which fault."""

    def __init__(
        self,
        seed: int,
        rate: float = DEFAULT_RATE,
        kinds: Iterable[FaultKind | str] = DEFAULT_KINDS,
        *,
        weights: Mapping[FaultKind, float] = DEFAULT_WEIGHTS,
        delay_ms: tuple[int, int] = (1, 200),
        corrupt_skip: int = 64,
        corrupt_sides: Iterable[str] = ("tx",),
        log: FaultLog | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"chaos rate must be between 0 and 1, not {rate}")
        lo, hi = delay_ms
        if not 0 <= lo <= hi:
            raise ValueError(f"bad delay range {delay_ms}")
        if corrupt_skip < 0:
            raise ValueError("corrupt_skip must not be negative")
        self.seed = seed
        self.rate = rate
        self.kinds = frozenset(FaultKind(k) for k in kinds)
        self.delay_ms = (lo, hi)
        self.corrupt_skip = corrupt_skip
        self.corrupt_sides = frozenset(corrupt_sides)
        self.log = log if log is not None else FaultLog()
        self._weights = {k: float(weights.get(k, 0.0)) for k in FaultKind}
        if any(w < 0 or math.isnan(w) for w in self._weights.values()):
            raise ValueError("fault weights must not be negative")
        self._generations: dict[tuple[str, int], int] = {}
        # Per (side, direction) the kinds that can apply, fixed at construction so a decision
        # never depends on anything but its key.
        self._candidates = {
            (side, direction): [
                (k, self._weights[k])
                for k in FaultKind
                if k in self.kinds and self._weights[k] > 0 and self._applies(k, side, direction)
            ]
            for side in _SIDES
            for direction in _DIRECTIONS
        }

    def _applies(self, kind: FaultKind, side: str, direction: str) -> bool:
        if kind is FaultKind.CORRUPT:
            return direction == "send" and side in self.corrupt_sides
        return True

    @property
    def active(self) -> bool:
        """False when no operation can ever be faulted: the wrapper is then a pass-through."""
        return self.rate > 0 and any(self._candidates.values())

    def decide(
        self, side: Side, conn: int, generation: int, direction: Direction, op: int
    ) -> Fault | None:
        """The fault for one operation: a pure function of the seed and these five values."""
        candidates = self._candidates[(side, direction)]
        if self.rate <= 0 or not candidates:
            return None
        key = f"{self.seed}\0{side}\0{conn}\0{generation}\0{direction}\0{op}".encode()
        digest = hashlib.blake2b(key, digest_size=8 * _DRAWS, person=_PERSON).digest()
        u = tuple(
            int.from_bytes(digest[8 * i : 8 * i + 8], "big") / 2.0**64 for i in range(_DRAWS)
        )
        if u[0] >= self.rate:
            return None
        total = sum(w for _, w in candidates)
        pick = u[1] * total
        kind = candidates[-1][0]
        for k, w in candidates:
            if pick < w:
                kind = k
                break
            pick -= w
        delay = 0
        if kind is FaultKind.DELAY:
            lo, hi = self.delay_ms
            delay = lo + min(int(u[2] * (hi - lo + 1)), hi - lo)
        return Fault(kind, delay, u[2:])

    def next_generation(self, side: Side, conn: int) -> int:
        """Number the streams of one connection index in the order they were opened.

        Deterministic as long as each connection index reconnects sequentially, which is how
        the transmitter's per-connection loop works.
        """
        key = (side, conn)
        gen = self._generations.get(key, 0)
        self._generations[key] = gen + 1
        return gen

    def wrap(
        self,
        stream: anyio.abc.ByteStream,
        *,
        side: Side,
        conn: int,
        generation: int | None = None,
    ) -> ChaosStream:
        """Put ``stream`` under this scheduler; ``generation=None`` counts reconnects itself."""
        if generation is None:
            generation = self.next_generation(side, conn)
        return ChaosStream(stream, self, side, conn, generation, self.log)

    def transmitter_wrapper(
        self,
    ) -> Callable[[int, int, anyio.abc.ByteStream], anyio.abc.ByteStream]:
        """The ``wrap`` hook of :func:`viamillipede.send`: (index, generation, stream)."""

        def wrap(index: int, generation: int, stream: anyio.abc.ByteStream) -> ChaosStream:
            return self.wrap(stream, side="tx", conn=index, generation=generation)

        return wrap

    def receiver_wrapper(self) -> Callable[[int, anyio.abc.ByteStream], anyio.abc.ByteStream]:
        """The ``wrap`` hook of :func:`viamillipede.receive`: (accept counter, stream).

        The receiver cannot know a connection's index before its HELLO, so its streams are
        numbered in accept order, each with generation 0.  Over real sockets that order depends
        on the network, so receiver-side faults replay exactly only where accepts are ordered.
        """

        def wrap(accepted: int, stream: anyio.abc.ByteStream) -> ChaosStream:
            return self.wrap(stream, side="rx", conn=accepted, generation=0)

        return wrap

    def wrap_connector(
        self,
        connect: Callable[[int], Awaitable[anyio.abc.ByteStream]],
        side: Side = "tx",
    ) -> Callable[[int], Awaitable[anyio.abc.ByteStream]]:
        """Wrap every stream a connector opens, numbered by connection index and reconnect."""

        async def chaotic_connect(index: int) -> anyio.abc.ByteStream:
            return self.wrap(await connect(index), side=side, conn=index)

        return chaotic_connect


class ChaosStream(anyio.abc.ByteStream):
    """A byte stream that injects the scheduler's faults into another one.

    The wrapper has each capability of :mod:`viamillipede.streams` that the inner stream has
    (constructing a ``ChaosStream`` then yields an instance of a subclass with those methods):
    sessions choose their paths by capability, and chaos must exercise the paths production
    takes -- receiving into buffers, sending from files and by reference, splicing -- rather
    than the plain ``send``/``receive`` fallbacks.  Each such call is one operation, numbered
    and faulted like a ``send`` (``send_file``, ``send_pages``) or a receive
    (``receive_into``, ``receive_exactly_into``, ``splice_to``).  The wrapper is never a
    :class:`~viamillipede.streams.SpliceSource`: a sink splicing from the descriptor directly
    would bypass it.

    A reset or ``aclose`` wakes every other operation blocked in this wrapper (a stall, or a
    receive the peer will never answer), as closing a real socket wakes its waiters.
    """

    def __new__(
        cls,
        inner: anyio.abc.ByteStream,
        scheduler: ChaosScheduler,
        side: Side,
        conn: int,
        generation: int,
        log: FaultLog | None = None,
    ) -> ChaosStream:
        chosen: type[ChaosStream] = cls
        if cls is ChaosStream:
            chosen = _variant(
                tuple(ops for capability, ops in _FORWARDED if isinstance(inner, capability))
            )
        return super().__new__(chosen)

    def __init__(
        self,
        inner: anyio.abc.ByteStream,
        scheduler: ChaosScheduler,
        side: Side,
        conn: int,
        generation: int,
        log: FaultLog | None = None,
    ) -> None:
        if side not in _SIDES:
            raise ValueError(f"side must be 'tx' or 'rx', not {side!r}")
        self.inner = inner
        self.scheduler = scheduler
        self.side: Side = side
        self.conn = conn
        self.generation = generation
        self.log = log if log is not None else scheduler.log
        self._ops = {"send": 0, "recv": 0}
        self._state: Literal["open", "broken", "closed"] = "open"
        self._eof_sent = False
        self._inner_closed = False
        self._inflight: set[anyio.CancelScope] = set()

    @property
    def peer(self) -> str | None:
        peer = getattr(self.inner, "peer", None)
        return None if peer is None else str(peer)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes

    # -- the operations ------------------------------------------------------------------

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        fault, op = self._next_send()
        inner = self.inner
        if fault is None:
            await self._guarded(lambda: inner.send(item))  # type: ignore[arg-type]
            return
        view = memoryview(item).cast("B")

        async def copy() -> bytearray:
            return bytearray(view)

        await self._faulty_send(
            fault,
            op,
            len(view),
            whole=lambda: inner.send(item),  # type: ignore[arg-type]
            in_pieces=lambda pieces: _send_pieces(inner, view, pieces),
            copy=copy,
        )

    async def receive(self, max_bytes: int = 65536) -> bytes:
        inner = self.inner
        return await self._faulty_receive(
            max_bytes,
            whole=lambda: inner.receive(max_bytes),
            fewer=lambda limit: inner.receive(limit),
        )

    async def send_eof(self) -> None:
        self._check_usable()
        self._eof_sent = True
        await self.inner.send_eof()

    async def aclose(self) -> None:
        if self._state != "closed":
            self._state = "closed"
            self._wake_others()
        if self._inner_closed:
            await checkpoint()
            return
        self._inner_closed = True
        await self.inner.aclose()

    # -- machinery -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state == "closed":
            raise anyio.ClosedResourceError
        if self._state == "broken":
            raise anyio.BrokenResourceError("connection reset by chaos")

    def _next(self, direction: Direction) -> tuple[Fault | None, int]:
        op = self._ops[direction]
        self._ops[direction] = op + 1
        fault = self.scheduler.decide(self.side, self.conn, self.generation, direction, op)
        return fault, op

    def _next_send(self) -> tuple[Fault | None, int]:
        """Check that sending is allowed, then number and decide the send."""
        self._check_usable()
        if self._eof_sent:
            raise anyio.ClosedResourceError
        return self._next("send")

    def _record(self, direction: Direction, op: int, kind: FaultKind, detail: str = "") -> None:
        self.log.record(
            FaultRecord(self.side, self.conn, self.generation, direction, op, kind, detail)
        )

    async def _faulty_send(
        self,
        fault: Fault,
        op: int,
        size: int,
        *,
        whole: Callable[[], Awaitable[None]],
        in_pieces: Callable[[list[int]], Awaitable[None]],
        copy: Callable[[], Awaitable[bytearray]],
    ) -> None:
        """Apply ``fault`` to a send of ``size`` bytes, whichever method sends them.

        ``whole`` sends unchanged, ``in_pieces`` sends the same bytes as the given pieces, and
        ``copy`` returns the bytes themselves, to be damaged and sent with a plain ``send``.
        """
        if fault.kind is FaultKind.SHORT and size >= 2:
            pieces = _cuts(size, fault.u)
            self._record("send", op, fault.kind, "+".join(str(n) for n in pieces))
            await self._guarded(lambda: in_pieces(pieces))
            return
        if fault.kind is FaultKind.CORRUPT and size > self.scheduler.corrupt_skip:
            skip = self.scheduler.corrupt_skip
            offset = skip + min(int(fault.u[0] * (size - skip)), size - skip - 1)
            bit = min(int(fault.u[1] * 8), 7)
            inner = self.inner

            async def send_damaged() -> None:
                # A copy: the caller may send the very same buffer again on another connection.
                damaged = await copy()
                if damaged[0] != _DATA_TYPE:
                    # A handshake or a tagged control frame: damage there is tampering by
                    # design (wrong keys, a dropped connection), not what a checksum or a seal
                    # is to catch and recover from.
                    self._record("send", op, fault.kind, "skipped: not a DATA frame")
                    await inner.send(bytes(damaged))
                    return
                self._record("send", op, fault.kind, f"byte {offset} of {size} bit {bit}")
                damaged[offset] ^= 1 << bit
                await inner.send(bytes(damaged))

            await self._guarded(send_damaged)
            return
        await self._common(fault, "send", op, whole)

    async def _faulty_receive(
        self,
        size: int,
        *,
        whole: Callable[[], Awaitable[_T]],
        fewer: Callable[[int], Awaitable[_T]],
    ) -> _T:
        """Number, decide and apply the fault of a receive of up to ``size`` bytes.

        ``whole`` receives as asked; ``fewer(limit)`` asks the inner stream for only ``limit``
        bytes at first (and for the rest after, if the caller was promised all of them).
        """
        self._check_usable()
        fault, op = self._next("recv")
        if fault is None:
            return await self._guarded(whole)
        if fault.kind is FaultKind.SHORT and size >= 2:
            limit = _limit(size, fault.u)
            self._record("recv", op, fault.kind, f"{limit}/{size}")
            return await self._guarded(lambda: fewer(limit))
        return await self._common(fault, "recv", op, whole)

    async def _common(
        self, fault: Fault, direction: Direction, op: int, call: Callable[[], Awaitable[_T]]
    ) -> _T:
        """The faults that do not care which operation they hit."""
        kind = fault.kind
        if kind is FaultKind.RESET:
            self._record(direction, op, kind)
            await self._reset()
            raise anyio.BrokenResourceError("connection reset by chaos")
        if kind is FaultKind.STALL:
            self._record(direction, op, kind)
            await self._guarded(anyio.sleep_forever)
            raise AssertionError("unreachable: sleep_forever returned")  # pragma: no cover
        if kind is FaultKind.DELAY:
            self._record(direction, op, kind, f"{fault.delay_ms} ms")

            async def delayed() -> _T:
                await anyio.sleep(fault.delay_ms / 1000)
                return await call()

            return await self._guarded(delayed)
        # Drawn but inapplicable here (fragmenting one byte, corrupting a receive): no fault.
        return await self._guarded(call)

    async def _guarded(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run one operation so that a reset or close from another task can interrupt it."""
        scope = anyio.CancelScope()
        self._inflight.add(scope)
        try:
            with scope:
                return await call()
        finally:
            self._inflight.discard(scope)
        # Only reached when our own scope was cancelled, i.e. by _wake_others.
        self._check_usable()
        raise anyio.BrokenResourceError  # pragma: no cover - the state always explains it

    def _wake_others(self) -> None:
        for scope in list(self._inflight):
            scope.cancel()

    async def _reset(self) -> None:
        self._state = "broken"
        self._wake_others()
        if not self._inner_closed:
            self._inner_closed = True
            await anyio.aclose_forcefully(self.inner)


# -- the capabilities a wrapper forwards -----------------------------------------------------
#
# One subclass per capability; ChaosStream.__new__ combines those the inner stream has.  Each
# is chosen only when ``isinstance(inner, <capability>)`` held, which is what the casts rely on.


class _ChaosStreamInto(ChaosStream):
    async def receive_into(self, view: memoryview) -> int:
        """Receive into ``view``; 0 means end of stream.  Faults may return fewer bytes."""
        inner = cast(ReceiveInto, self.inner)
        return await self._faulty_receive(
            len(view),
            whole=lambda: inner.receive_into(view),
            fewer=lambda limit: inner.receive_into(view[:limit]),
        )


class _ChaosStreamExactlyInto(ChaosStream):
    async def receive_exactly_into(self, view: memoryview) -> int:
        """Fill ``view`` as promised; a ``short`` fault splits it into two inner calls."""
        inner = cast(ReceiveExactlyInto, self.inner)

        async def in_two(limit: int) -> int:
            got = await inner.receive_exactly_into(view[:limit])
            if got < limit:  # the stream ended
                return got
            return got + await inner.receive_exactly_into(view[limit:])

        return await self._faulty_receive(
            len(view), whole=lambda: inner.receive_exactly_into(view), fewer=in_two
        )


class _ChaosStreamSpliceTo(ChaosStream):
    async def splice_to(
        self, sink: SpliceSink, count: int, moved: Callable[[int], None]
    ) -> None:
        """Splice as asked; a ``short`` fault splits it into two inner splices.

        The bytes go from socket to sink inside the kernel, so there is nothing to corrupt
        here (corruption is a send-side fault anyway).
        """
        inner = cast(SpliceTo, self.inner)

        async def in_two(limit: int) -> None:
            await inner.splice_to(sink, limit, moved)
            await inner.splice_to(sink, count - limit, moved)

        await self._faulty_receive(
            count, whole=lambda: inner.splice_to(sink, count, moved), fewer=in_two
        )


class _ChaosStreamSendFile(ChaosStream):
    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        """Send ``header`` and a file region as one operation.

        ``short`` splits the frame with the cuts a ``send`` of the same size would get, and
        sends each piece with ``send_file`` (or ``send`` for a piece of header alone).  The
        kernel moves sendfile's bytes without our seeing them, so ``corrupt`` cannot damage
        them in flight: it reads the region instead and sends the damaged frame with a plain
        ``send``, which is what the peer would receive from a flipped bit on the way.
        """
        fault, op = self._next_send()
        inner = cast(SendFile, self.inner)
        if fault is None:
            await self._guarded(lambda: inner.send_file(header, fd, offset, count))
            return
        head = len(header)

        async def in_pieces(pieces: list[int]) -> None:
            async def payload(part: memoryview, first: int, last: int) -> None:
                await inner.send_file(part, fd, offset + first, last - first)

            await _send_split(self.inner, header, pieces, payload)

        async def copy() -> bytearray:
            frame = bytearray(head + count)
            frame[:head] = header
            await read_at(fd, memoryview(frame)[head:], offset)
            return frame

        await self._faulty_send(
            fault,
            op,
            head + count,
            whole=lambda: inner.send_file(header, fd, offset, count),
            in_pieces=in_pieces,
            copy=copy,
        )


class _ChaosStreamSendPages(ChaosStream):
    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        """Send ``header`` and ``payload`` (by reference) as one operation.

        ``short`` splits the frame with the cuts a ``send`` of the same size would get, and
        sends each piece with ``send_pages`` (or ``send`` for a piece of header alone).
        ``corrupt`` must not touch the caller's pages (the caller may send them again), so it
        sends a damaged copy with a plain ``send``.
        """
        fault, op = self._next_send()
        inner = cast(SendPages, self.inner)
        if fault is None:
            await self._guarded(lambda: inner.send_pages(header, payload))
            return
        head = len(header)

        async def in_pieces(pieces: list[int]) -> None:
            async def pages(part: memoryview, first: int, last: int) -> None:
                await inner.send_pages(part, payload[first:last])

            await _send_split(self.inner, header, pieces, pages)

        async def copy() -> bytearray:
            return bytearray(header) + payload

        await self._faulty_send(
            fault,
            op,
            head + len(payload),
            whole=lambda: inner.send_pages(header, payload),
            in_pieces=in_pieces,
            copy=copy,
        )


#: Which subclass forwards which capability, in a fixed order (the combined class's MRO).
_FORWARDED: Final[tuple[tuple[type, type[ChaosStream]], ...]] = (
    (ReceiveInto, _ChaosStreamInto),
    (ReceiveExactlyInto, _ChaosStreamExactlyInto),
    (SpliceTo, _ChaosStreamSpliceTo),
    (SendFile, _ChaosStreamSendFile),
    (SendPages, _ChaosStreamSendPages),
)


@functools.cache
def _variant(parts: tuple[type[ChaosStream], ...]) -> type[ChaosStream]:
    """The ChaosStream subclass with exactly the capabilities of ``parts`` (made once)."""
    if not parts:
        return ChaosStream
    if len(parts) == 1:
        return parts[0]
    name = "ChaosStream" + "".join(p.__name__.removeprefix("_ChaosStream") for p in parts)
    return cast("type[ChaosStream]", type(name, parts, {"__module__": __name__}))


async def _send_split(
    plain: anyio.abc.ByteStream,
    header: memoryview,
    pieces: list[int],
    send_part: Callable[[memoryview, int, int], Awaitable[None]],
) -> None:
    """Send a frame of ``header`` + payload cut at ``pieces``: a piece of header alone goes by
    ``send``; any other by ``send_part(header part, payload start, payload end)``."""
    head = len(header)
    start = 0
    for n in pieces:
        end = start + n
        part = header[min(start, head) : min(end, head)]
        first, last = max(start, head) - head, max(end, head) - head
        if first == last:
            await plain.send(part)  # type: ignore[arg-type]
        else:
            await send_part(part, first, last)
        start = end


async def _send_pieces(
    inner: anyio.abc.ByteStream, view: memoryview, pieces: list[int]
) -> None:
    start = 0
    for n in pieces:
        await inner.send(view[start : start + n])  # type: ignore[arg-type]
        start += n


def _cuts(size: int, u: tuple[float, ...]) -> list[int]:
    """Split ``size`` (>= 2) bytes into 2-4 non-empty pieces at seeded places."""
    wanted = 2 + min(int(u[0] * 3), 2)
    points = sorted({1 + min(int(x * (size - 1)), size - 2) for x in u[1:wanted]})
    bounds = [0, *points, size]
    return [b - a for a, b in itertools.pairwise(bounds)]


def _limit(size: int, u: tuple[float, ...]) -> int:
    """A seeded read size in [1, size - 1]: always fewer bytes than the caller asked for."""
    return 1 + min(int(u[0] * (size - 1)), size - 2)
