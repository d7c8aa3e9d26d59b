"""Glue between the sans-IO codec and an anyio byte stream, shared by both session ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.abc

from .errors import LinkBroken
from .streams import ReceiveExactlyInto, ReceiveInto
from .wire import NEED_DATA, Decoder, Event

#: Errors that mean "this connection is gone", whatever stream implementation raised them.
STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionError,
)


@contextmanager
def first_error() -> Iterator[None]:
    """Re-raise the first real error out of a task group's exception group.

    Task groups wrap even a single failure in an ExceptionGroup; the session code reasons about
    one failure at a time (a broken link, a fatal error), so it unwraps here.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        found = list(leaves(group))
        real = [e for e in found if not isinstance(e, anyio.get_cancelled_exc_class())]
        error = (real or found)[0]
        error.__suppress_context__ = True  # the group is noise; the error's __cause__ is not
        raise error  # noqa: B904  # not "from None": that would erase its __cause__


def why(exc: BaseException) -> str:
    """An exception as the end of a log line: anyio's broken and closed streams carry no
    message, and "broke: " with nothing after it says nothing."""
    return str(exc) or f"{type(exc).__name__} (the other end went away)"


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every exception inside ``exc``, however deeply grouped."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


class Notifier:
    """Wakes every waiter when some shared state changed; waiters re-check their condition.

    Checking the condition and calling :meth:`wait` happen without a checkpoint in between, so
    no wake-up is lost (the ParkingLot pattern, expressed with anyio events).
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class FrameReader:
    """Pulls events off a stream.

    With ``greedy=False`` it never reads past the current frame, so DATA payloads can be
    received straight into their chunk buffers (see :meth:`read_payload_into`).
    """

    __slots__ = ("_exactly", "_greedy", "_into", "decoder", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, decoder: Decoder, *, greedy: bool) -> None:
        self.stream = stream
        self.decoder = decoder
        self._greedy = greedy
        # The stream's capabilities, looked up once rather than for every payload.
        self._exactly = stream if isinstance(stream, ReceiveExactlyInto) else None
        self._into = stream if isinstance(stream, ReceiveInto) else None

    async def next_event(self) -> Event:
        dec = self.decoder
        while True:
            event = dec.next_event()
            if event is not NEED_DATA:
                return event
            want = 4096 if self._greedy else max(dec.read_hint(), 1)
            try:
                data = await self.stream.receive(want)
            except anyio.EndOfStream:
                data = b""
            except STREAM_ERRORS as exc:
                raise LinkBroken(str(exc) or type(exc).__name__) from exc
            dec.receive_data(data)

    async def read_payload_into(self, view: memoryview) -> None:
        """Fill ``view`` (exactly the pending payload) with as few copies as the stream allows."""
        dec = self.decoder
        got = dec.take_payload_into(view)
        size = len(view)
        stream = self.stream
        exactly, into = self._exactly, self._into
        try:
            if exactly is not None and got < size:
                n = await exactly.receive_exactly_into(view[got:])
                dec.payload_consumed(n)
                got += n
                if got < size:
                    raise LinkBroken("connection closed inside a DATA frame")
            while got < size:
                if into is not None:
                    n = await into.receive_into(view[got:])
                    if n == 0:
                        raise LinkBroken("connection closed inside a DATA frame")
                else:
                    data = await stream.receive(size - got)
                    n = len(data)
                    view[got : got + n] = data
                dec.payload_consumed(n)
                got += n
        except anyio.EndOfStream:
            raise LinkBroken("connection closed inside a DATA frame") from None
        except STREAM_ERRORS as exc:
            raise LinkBroken(str(exc) or type(exc).__name__) from exc


class BufferPool:
    """Reuses chunk buffers: fresh 2 MiB allocations cost page faults on every chunk."""

    __slots__ = ("_free", "_keep", "made", "size")

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self.made = 0  # buffers ever allocated: bounded by the window, not the stream

    def get(self) -> bytearray:
        if self._free:
            return self._free.pop()
        self.made += 1
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buf)
