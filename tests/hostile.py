"""Crafted peers for the hostile-peer tests, and harnesses that run real session ends beside them.

A crafted peer is a plain loopback TCP connection that speaks frames built with the project's own
codec (``encode``, ``pack_data_header``) and parses what comes back with a ``Decoder``: it can
send anything the wire format can express, including what no honest peer would send.  The real
receiver and transmitter are driven only through their public API.

Every wait here is bounded by the caller's ``anyio.fail_after`` or by an explicit deadline;
waits on another task's progress use events, or polling with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc

from viamillipede import BufferSink, Receiver, TransferStats
from viamillipede.api import serve_tcp
from viamillipede.keying import AuthFailed, TxKeying, rx_attempt
from viamillipede.wire import (
    DATA_HEADER_SIZE,
    NEED_DATA,
    Ack,
    Auth,
    AuthKind,
    Bye,
    ByeOk,
    ConnectionClosed,
    Data,
    Decoder,
    Error,
    Event,
    Fin,
    Hello,
    Mode,
    ProtocolError,
    Welcome,
    WelcomeStatus,
    encode,
    pack_data_header,
)
from viamillipede.wire.secure import SessionKeys, Tagger, password

T = TypeVar("T")

HOST = "127.0.0.1"
CHECKPHRASE = b"yoes"
NO_SESSION = bytes(16)
MAX_SEQ = 2**64 - 1

#: What a dead or reset connection raises, whichever backend and stream.
STREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


# -- frames ------------------------------------------------------------------------------------


def make_hello(**fields: Any) -> Hello:
    """A HELLO; every field not given is that of a plausible transmitter of a fresh session."""
    values: dict[str, Any] = {
        "mode": Mode.PLAINTEXT,  # crafted peers send plain DATA; see start_receiver
        "session_id": os.urandom(16),
        "conn_index": 0,
        "chunk_size": 4096,
        "window": 4,
        "features": 0,
    }
    values.update(fields)
    return Hello(**values)


def data_frame(seq: int, payload: bytes, checksum: int = 0) -> bytes:
    return encode(Data(seq, checksum, payload))


def data_header(seq: int, length: int, checksum: int = 0) -> bytes:
    """Only the fixed part of a DATA frame, announcing ``length`` payload bytes (any value,
    zero included: the header is packed by hand, past any check an encoder might make)."""
    header = bytearray(DATA_HEADER_SIZE)
    pack_data_header(header, seq, length, checksum)
    return bytes(header)


# -- one crafted connection --------------------------------------------------------------------


class NoWelcome(AssertionError):
    """The receiver did not answer a HELLO with WELCOME."""


class Peer:
    """One connection: sends frames or raw bytes, decodes what the other end sends.

    A reset or a clean close both read as :class:`ConnectionClosed`; ``broken`` tells which.
    """

    def __init__(self, stream: anyio.abc.ByteStream, decoder: Decoder) -> None:
        self.stream = stream
        self.decoder = decoder
        self.closed = False
        self.broken = ""
        self.tagger: Tagger | None = None  # set by the handshake: control frames are tagged

    @classmethod
    async def connect(cls, port: int, *, decoder: Decoder | None = None,
                      deadline: float = 20.0) -> Peer:
        """Connect to ``port`` (retried while nothing listens yet, up to ``deadline`` s); the
        default decoder is a transmitter's, for talking to a receiver."""
        give_up = time.monotonic() + deadline
        while True:
            try:
                stream = await anyio.connect_tcp(HOST, port)
                break
            except OSError:
                if time.monotonic() > give_up:
                    raise
                await anyio.sleep(0.01)  # polling for the listener, with a deadline
        return cls(stream, decoder or Decoder.for_transmitter())

    def encode(self, frame: Event | bytes) -> bytes:
        """A frame's bytes: control frames tagged once the handshake is done; raw bytes as
        they are."""
        if isinstance(frame, bytes):
            return frame
        tagged = isinstance(frame, (Welcome, Ack, Bye, ByeOk, Fin, Error))
        return encode(frame, self.tagger if tagged else None)

    async def send(self, *frames: Event | bytes) -> None:
        """Send events (encoded) and raw bytes, in order, in one write."""
        await self.stream.send(b"".join(self.encode(f) for f in frames))

    async def try_send(self, *frames: Event | bytes) -> bool:
        """:meth:`send`, but a connection the other end already dropped is not an error."""
        try:
            await self.send(*frames)
        except STREAM_ERRORS as exc:
            self.broken = self.broken or f"{type(exc).__name__}: {exc}"
            return False
        return True

    async def next_event(self) -> Event:
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                if isinstance(event, ConnectionClosed):
                    self.closed = True
                return event
            try:
                data = await self.stream.receive(65536)
            except anyio.EndOfStream:
                data = b""
            except STREAM_ERRORS as exc:
                self.closed = True
                self.broken = f"{type(exc).__name__}: {exc}"
                return ConnectionClosed()
            self.decoder.receive_data(data)

    async def events_until_closed(self, patience: float) -> tuple[list[Event], bool]:
        """Every event up to the other end's close; and whether it closed within ``patience``
        seconds."""
        events: list[Event] = []
        with anyio.move_on_after(patience):
            while True:
                event = await self.next_event()
                if isinstance(event, ConnectionClosed):
                    return events, True
                events.append(event)
        return events, False

    async def drain(self) -> None:
        """Read (and drop) whatever arrives until the connection ends."""
        with contextlib.suppress(ProtocolError):
            while not isinstance(await self.next_event(), ConnectionClosed):
                pass

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stream.aclose()


#: The crafted transmitters' keys, by session id and phrase: a session's first handshake
#: exchanges keys, every later one joins with them, as a real transmitter does.
_KEYINGS: dict[tuple[bytes, bytes], TxKeying] = {}


async def hello(peer: Peer, *, phrase: bytes = CHECKPHRASE, **fields: Any) -> Welcome:
    """Say HELLO (see :func:`make_hello` for the defaults) and run the handshake with
    ``phrase``; return the WELCOME (a refusal, or the tagged answer to a proven handshake)."""
    h = make_hello(**fields)
    keying = _KEYINGS.setdefault((h.session_id, phrase), TxKeying(password(phrase), h.session_id))
    frame = encode(h)
    attempt = keying.start(frame)
    await peer.send(frame, attempt.auth)
    event = await peer.next_event()
    if isinstance(event, Auth):
        try:
            proof = attempt.answer(event)
        except AuthFailed:
            proof = Auth(attempt.auth.kind)  # a guess that failed: prove nothing
        else:
            channel = attempt.channel()
            peer.decoder.checker = channel.checker
            peer.tagger = channel.tagger
        await peer.send(proof)
        event = await peer.next_event()
        if isinstance(event, Welcome) and event.status == WelcomeStatus.ACCEPTED:
            attempt.welcomed()
    if not isinstance(event, Welcome):
        raise NoWelcome(f"expected WELCOME, got {event!r} {peer.broken}".rstrip())
    return event


async def complete_session(
    port: int,
    session_id: bytes,
    chunks: list[bytes],
    *,
    conn_index: int = 0,
    chunk_size: int = 4096,
    window: int = 4,
    features: int = 0,
    checksum: Callable[[bytes], int] | None = None,
) -> Welcome:
    """Act as the rest of a transmitter of ``session_id``: join on a new connection, send every
    chunk from the WELCOME's ``written`` on (one at a time, each ACKed), then BYE; expect BYE_OK
    with the right totals and answer FIN.  Raises AssertionError on anything unexpected."""
    peer = await Peer.connect(port, deadline=2.0)
    try:
        welcome = await hello(peer, session_id=session_id, conn_index=conn_index,
                              chunk_size=chunk_size, window=window, features=features)
        if welcome.status != WelcomeStatus.ACCEPTED:
            raise AssertionError(f"the session's own HELLO was refused: {welcome!r}")
        for seq in range(welcome.written, len(chunks)):
            crc = checksum(chunks[seq]) if checksum else 0
            await peer.send(data_frame(seq, chunks[seq], crc))
            while True:
                event = await peer.next_event()
                if isinstance(event, Ack) and event.seq == seq:
                    break
                if not isinstance(event, Ack):
                    raise AssertionError(f"expected the ACK of chunk {seq}, got {event!r}")
        total = sum(len(c) for c in chunks)
        await peer.send(Bye(len(chunks), total))
        while isinstance(event := await peer.next_event(), Ack):
            pass
        if event != ByeOk(len(chunks), total):
            raise AssertionError(f"expected BYE_OK({len(chunks)}, {total}), got {event!r}")
        await peer.send(Fin(len(chunks), total))
        return welcome
    finally:
        await peer.aclose()


# -- outcomes of tasks -------------------------------------------------------------------------


@dataclass
class Outcome(Generic[T]):
    """What a task came to: its result or its exception (cancellation passes through)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    result: T | None = None
    error: Exception | None = None
    elapsed: float = 0.0

    async def capture(self, fn: Callable[[], Awaitable[T]]) -> None:
        """Run ``fn``; ``done`` is set when it returns or raises, not when it is cancelled."""
        start = anyio.current_time()
        try:
            self.result = await fn()
        except Exception as exc:
            self.error = exc
        self.elapsed = anyio.current_time() - start
        self.done.set()

    async def wait(self, patience: float) -> bool:
        """Wait up to ``patience`` seconds; say whether the task finished."""
        with anyio.move_on_after(patience):
            await self.done.wait()
        return self.done.is_set()

    @property
    def ok(self) -> bool:
        return self.done.is_set() and self.error is None

    def describe(self) -> str:
        if not self.done.is_set():
            return "still running"
        if isinstance(self.error, BaseExceptionGroup):
            inner = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(self.error))
            return f"raised {type(self.error).__name__} of {inner}"
        if self.error is not None:
            return f"raised {type(self.error).__name__}: {self.error}"
        return f"returned after {self.elapsed:.2f} s"


async def poll_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` every 10 ms for up to ``seconds``; say whether it came to hold."""
    with anyio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 - state owned by others (a process, a socket)
            await anyio.sleep(0.01)
        return True
    return False


async def poll_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until it holds; AssertionError after ``seconds``."""
    if not await poll_for(condition, seconds):
        raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise the one real exception out of a task group's exception group, so that a
    failed assertion inside a task group reads as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in leaves(group) if not isinstance(e, anyio.get_cancelled_exc_class())]
        if len(real) == 1:
            raise real[0] from None
        raise


# -- a real receiver on an ephemeral loopback port ---------------------------------------------


@dataclass
class ServedReceiver:
    port: int
    receiver: Receiver
    sink: BufferSink
    outcome: Outcome[TransferStats]


async def start_receiver(tg: anyio.abc.TaskGroup, *, sink: BufferSink | None = None,
                         **options: Any) -> ServedReceiver:
    """Run a real :class:`Receiver` (``options`` go to its constructor) through ``serve_tcp``
    on 127.0.0.1, on a port the system picks; whatever ``serve`` ends with is captured."""
    sink = sink if sink is not None else BufferSink()
    # Crafted peers send DATA in clear: the session logic is what these tests attack; the
    # sealing is attacked in test_mitm.
    options.setdefault("plaintext", True)
    receiver = Receiver(sink, **options)
    outcome: Outcome[TransferStats] = Outcome()

    async def run(*, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        await outcome.capture(
            lambda: serve_tcp(receiver, 0, host=HOST, task_status=task_status)
        )

    port: int = await tg.start(run)
    return ServedReceiver(port, receiver, sink, outcome)


class GatedSource:
    """A source that yields its first ``hold_at`` bytes, then nothing until :meth:`release`:
    keeps a real session alive, mid-transfer, for as long as a test needs."""

    cancel_safe = True  # a read cancelled while waiting has taken nothing

    def __init__(self, data: bytes, hold_at: int) -> None:
        self._data = data
        self._pos = 0
        self.hold_at = hold_at
        self._gate = anyio.Event()

    def release(self) -> None:
        self._gate.set()

    async def readinto(self, view: memoryview) -> int:
        if not self._gate.is_set() and self._pos >= self.hold_at:
            await self._gate.wait()
        else:
            await anyio.lowlevel.checkpoint()
        end = len(self._data) if self._gate.is_set() else self.hold_at
        n = max(0, min(len(view), end - self._pos))
        view[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# -- a fake receiver ---------------------------------------------------------------------------

#: What a fake receiver does on a connection once it has answered the HELLO.
Behaviour = Callable[["Peer", Hello], Awaitable[None]]


async def accept_handshake(peer: Peer, keys: dict[bytes, SessionKeys], *,
                           phrase: bytes = CHECKPHRASE,
                           status: WelcomeStatus = WelcomeStatus.ACCEPTED) -> Hello | None:
    """A receiver's side of one connection's handshake: read HELLO and AUTH, answer with
    ``phrase`` (or, for a join, with the session's keys, which ``keys`` holds by session id),
    check the transmitter's proof and send a tagged WELCOME ``status`` (ACCEPTED) echoing its
    session id (``written`` 0).  Returns the HELLO, or None if the transmitter opened with
    anything else; raises AuthFailed if its proof does not verify."""
    event = await peer.next_event()
    auth = await peer.next_event()
    if not isinstance(event, Hello) or not isinstance(auth, Auth):
        return None
    sid = event.session_id
    joined = keys.get(sid) if auth.kind == AuthKind.JOIN else None
    attempt = rx_attempt(encode(event), auth, keys=joined, password=password(phrase),
                         session_id=sid)
    await peer.send(attempt.auth)
    proof = await peer.next_event()
    if not isinstance(proof, Auth):
        return None
    channel = attempt.check(proof)
    keys[sid] = attempt.keys
    peer.decoder.checker = channel.checker
    peer.tagger = channel.tagger
    await peer.send(Welcome(status, sid, 0))
    return event


async def serve_loopback(tg: anyio.abc.TaskGroup,
                         handle: Callable[[anyio.abc.ByteStream], Awaitable[None]]) -> int:
    """Listen on 127.0.0.1, on a port the system picks, and ``handle`` every connection in
    ``tg``; returns the port."""
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)

    async def serve() -> None:
        async with listener:
            await listener.serve(handle)

    tg.start_soon(serve)
    return int(listener.extra(anyio.abc.SocketAttribute.local_port))


class FakeReceiver:
    """Listens on 127.0.0.1; answers every HELLO with the handshake and WELCOME ACCEPTED
    echoing its session id (``written`` 0, see :func:`accept_handshake`), then hands the
    connection to ``behave``."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.hellos: list[Hello] = []
        self.port = 0
        self._keys: dict[bytes, SessionKeys] = {}

    async def start(self, tg: anyio.abc.TaskGroup) -> int:
        self.port = await serve_loopback(tg, self._handle)
        return self.port

    async def _handle(self, stream: anyio.abc.ByteStream) -> None:
        peer = Peer(stream, Decoder.for_receiver())
        try:
            opening = await accept_handshake(peer, self._keys)
            if opening is None:
                return
            self.hellos.append(opening)
            await self.behave(peer, opening)
        except (ProtocolError, AuthFailed, *STREAM_ERRORS):
            pass
        finally:
            await peer.aclose()


async def next_data(peer: Peer) -> Data | None:
    """The next DATA frame a transmitter sends on ``peer``; None once it sends something that
    ends the connection (ERROR, FIN, a close)."""
    while True:
        event = await peer.next_event()
        if isinstance(event, Data):
            return event
        if not isinstance(event, Bye):
            return None


# -- process memory ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` (VmRSS), in KiB; 0 once it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0
