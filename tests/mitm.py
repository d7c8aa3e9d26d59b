"""A man in the middle for real sessions over loopback: a TCP proxy that parses both directions
with the project's own decoder, so that a test can flip, drop, duplicate, hold back, inject or
cut exactly the frame it means, and replay what it recorded.

The proxy has no keys.  It still splits the stream into frames because the wire format says how
long each frame is; the only thing it cannot see is where tags start, so it tells its decoders
that tags are there (and accepts them unread) from the moment an honest peer starts sending
them.  Bytes it cannot parse (an end that gave up mid-frame, a refusal after a failed proof)
are passed on as they are.

Frames are forwarded whole: a frame is held until its last byte arrived.  Nothing in the
protocol waits for a reply in the middle of a frame, so this changes timing only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from hostile import HOST, STREAM_ERRORS, serve_loopback
from viamillipede.wire import (
    NEED_DATA,
    Auth,
    ConnectionClosed,
    Decoder,
    Event,
    ProtocolError,
)
from viamillipede.wire.secure import TagChecker

TO_RX = "tx>rx"
TO_TX = "rx>tx"


class _AnyTag(TagChecker):
    """Lets a decoder step over tags it has no key for."""

    def __init__(self) -> None:
        pass

    def check(self, frame: bytes, tag: bytes) -> None:
        return None


class Splitter:
    """Cuts one direction of a connection into frames, each with its exact bytes."""

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.decoder = Decoder.for_receiver() if direction == TO_RX else Decoder.for_transmitter()
        self.raw = False  # the decoder gave up: everything further passes as it is
        self._held = bytearray()
        self._auths = 0

    def feed(self, data: bytes) -> list[tuple[Event | None, bytes]]:
        """What ``data`` completes: (event, its bytes); (None, bytes) for what does not parse.
        ``b""`` is the end of the stream."""
        if self.raw:
            return [(None, bytes(data))] if data else []
        self._held += data
        self.decoder.receive_data(data)
        out: list[tuple[Event | None, bytes]] = []
        while True:
            try:
                event = self.decoder.next_event()
            except ProtocolError:
                self.raw = True
                if self._held:
                    out.append((None, bytes(self._held)))
                    self._held.clear()
                return out
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return out
            size = len(self._held) - self.decoder.buffered
            out.append((event, bytes(self._held[:size])))
            del self._held[:size]
            if isinstance(event, Auth):
                # Tags start after the transmitter's proof (its second AUTH) one way, and
                # with the frame after the receiver's AUTH the other way.
                self._auths += 1
                if self._auths == (2 if self.direction == TO_RX else 1):
                    self.decoder.checker = _AnyTag()


@dataclass(eq=False)
class Frame:
    """One frame as it came from its sender, before the proxy did anything to it."""

    event: Event | None
    raw: bytes
    link: Link
    direction: str
    nth: int  # how many frames of this kind went this way before it, over all connections

    @property
    def kind(self) -> str:
        return type(self.event).__name__ if self.event is not None else "raw"


@dataclass(eq=False)
class Link:
    """One connection through the proxy (``index``: in accept order)."""

    index: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    frames: list[Frame] = field(default_factory=list)
    received: dict[str, bytearray] = field(
        default_factory=lambda: {TO_RX: bytearray(), TO_TX: bytearray()})
    forwarded: dict[str, bytearray] = field(
        default_factory=lambda: {TO_RX: bytearray(), TO_TX: bytearray()})
    #: Bytes still to forward each way before the proxy hangs up on both ends.
    budget: dict[str, int] = field(default_factory=dict)
    ended: bool = False
    impersonated: bool = False  # the transmitter talked to a recording, not to the receiver
    _cut: bool = False

    def cut(self) -> None:
        """Hang up on both ends once the frame being handled is forwarded."""
        self._cut = True

    def sent(self, direction: str, kind: str) -> list[Frame]:
        return [f for f in self.frames if f.direction == direction and f.kind == kind]


#: Decides what is forwarded in place of one frame (``[frame.raw]``: the frame unchanged).
Tamper = Callable[[Frame], Sequence[bytes]]


def flip(raw: bytes, offset: int, bit: int = 0) -> bytes:
    """``raw`` with one bit changed (``offset`` from the end if negative)."""
    changed = bytearray(raw)
    changed[offset] ^= 1 << bit
    return bytes(changed)


class Mitm:
    """Listens on 127.0.0.1 and relays each connection to the receiver at ``upstream``."""

    def __init__(self, upstream: int, tamper: Tamper | None = None, *,
                 on_link: Callable[[Link], None] | None = None) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.on_link = on_link
        self.port = 0
        self.links: list[Link] = []
        self.frames: list[Frame] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._scripts: list[bytes] = []
        self._changed = anyio.Event()

    async def start(self, tg: anyio.abc.TaskGroup) -> int:
        self.port = await serve_loopback(tg, self._handle)
        return self.port

    # -- what the tests look at ----------------------------------------------------------

    def sent(self, direction: str, kind: str) -> list[Frame]:
        return [f for f in self.frames if f.direction == direction and f.kind == kind]

    def captured(self) -> bytes:
        """Every byte that crossed the proxy, both ways, as sent and as passed on."""
        parts = [bytes(b) for link in self.links
                 for side in (link.received, link.forwarded) for b in side.values()]
        return b"".join(parts)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition`` holds; checked whenever a frame passes or a link ends
        (the caller bounds the wait)."""
        while not condition():
            await self._changed.wait()

    def impersonate_next(self, recording: bytes) -> None:
        """Answer the next connection with ``recording`` (what a receiver once sent) instead
        of relaying it: the transmitter meets a replayed receiver."""
        self._scripts.append(recording)

    # -- relaying ------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _record(self, link: Link, direction: str, event: Event | None, raw: bytes) -> Frame:
        kind = type(event).__name__ if event is not None else "raw"
        nth = self._counts.get((direction, kind), 0)
        self._counts[(direction, kind)] = nth + 1
        frame = Frame(event, raw, link, direction, nth)
        link.frames.append(frame)
        self.frames.append(frame)
        return frame

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        link = Link(len(self.links))
        self.links.append(link)
        if self.on_link is not None:
            self.on_link(link)
        try:
            with link.scope:
                if self._scripts:
                    await self._impersonate(link, client, self._scripts.pop(0))
                    return
                try:
                    upstream = await anyio.connect_tcp(HOST, self.upstream)
                except OSError:
                    return
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, link, TO_RX, client, upstream)
                        tg.start_soon(self._pump, link, TO_TX, upstream, client)
                finally:
                    await anyio.aclose_forcefully(upstream)
        finally:
            await anyio.aclose_forcefully(client)
            link.ended = True
            self._notify()

    async def _impersonate(self, link: Link, client: anyio.abc.SocketStream,
                           recording: bytes) -> None:
        """Play ``recording`` once the transmitter has said HELLO and AUTH, and take down
        whatever it says until it hangs up."""
        link.impersonated = True
        splitter = Splitter(TO_RX)
        answered = False
        while True:
            try:
                data = await client.receive(65536)
            except anyio.EndOfStream:
                data = b""
            except STREAM_ERRORS:
                return
            link.received[TO_RX] += data
            for event, raw in splitter.feed(data):
                self._record(link, TO_RX, event, raw)
            self._notify()
            if not data:
                return
            if not answered and len(link.sent(TO_RX, "Auth")) >= 1:
                answered = True
                with contextlib.suppress(*STREAM_ERRORS):
                    await client.send(recording)
                link.forwarded[TO_TX] += recording

    async def _pump(self, link: Link, direction: str, src: anyio.abc.ByteStream,
                    dst: anyio.abc.ByteStream) -> None:
        splitter = Splitter(direction)
        while True:
            try:
                data = await src.receive(65536)
            except anyio.EndOfStream:
                data = b""
            except STREAM_ERRORS:
                link.scope.cancel()
                return
            link.received[direction] += data
            out = bytearray()
            for event, raw in splitter.feed(data):
                frame = self._record(link, direction, event, raw)
                out += b"".join(self.tamper(frame)) if self.tamper else raw
                if link._cut:
                    break
            cut = link._cut
            budget = link.budget.get(direction)
            if budget is not None:
                if len(out) >= budget:
                    out, cut = out[:budget], True
                link.budget[direction] = budget - len(out)
            try:
                if out:
                    await dst.send(bytes(out))
                    link.forwarded[direction] += out
                if not data and not cut:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await dst.send_eof()
            except STREAM_ERRORS:
                cut = True
            self._notify()
            if cut:
                link.scope.cancel()
                return
            if not data:
                return


async def replay_to_receiver(port: int, recording: bytes, patience: float
                             ) -> tuple[list[tuple[Event | None, bytes]], bool]:
    """Open a new connection to the receiver and send ``recording`` on it in one go; return
    what the receiver answered, frame by frame, and whether it hung up within ``patience``
    seconds."""
    splitter = Splitter(TO_TX)
    answers: list[tuple[Event | None, bytes]] = []
    stream = await anyio.connect_tcp(HOST, port)
    try:
        with contextlib.suppress(*STREAM_ERRORS):
            await stream.send(recording)
        with anyio.move_on_after(patience):
            while True:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                except STREAM_ERRORS:
                    return answers, True
                answers += splitter.feed(data)
                if not data:
                    return answers, True
        return answers, False
    finally:
        await anyio.aclose_forcefully(stream)
