"""Hostile peers over real loopback sockets.

Crafted peers (tests/hostile.py) speak frames built with the project's own codec to a real
receiver, or play a lying receiver to a real transmitter.  What is checked:

* Refused HELLOs (protocol version, checkphrase, session) leak neither the session id nor the
  receiver's progress, and the live transfer goes on unharmed.
* A stranger without the session id cannot join a live session, whatever it sends after its
  HELLO (DATA, BYE, ERROR), even with what a refusal told it.
* A HELLO with a wrong checkphrase before the real transmitter does not bind the receiver.
* DATA that is empty, or whose seq is 2**64-1 or far beyond the window, on a connection of
  the session, costs that connection only (dropped with a one-line reason); the session
  completes on a new connection.
* A second HELLO, a BYE_OK or a WELCOME sent to the receiver, or garbage after the HELLO,
  drop the connection; ``serve`` raises nothing but the project's own errors.
* DATA frames announced in full but never sent hold the receiver's memory to its window, and
  one session has at most 64 connections.
* A fake receiver cannot make the transmitter report success (BYE_OK before BYE), crash it
  (an ACK of seq 2**64-1), or keep it waiting forever (no ACK at all; a flood of empty ACKs).
* Checkphrase guesses are answered slowly after a small burst and logged in aggregate, while
  the right checkphrase is still answered at once.

The slowest of these (the transmitter's idle timeout, the guessing storm, the receiver
process's memory) run on Trio only; what they check does not depend on the backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest

from hostile import (
    HOST,
    MAX_SEQ,
    NO_SESSION,
    Behaviour,
    FakeReceiver,
    GatedSource,
    NoWelcome,
    Outcome,
    Peer,
    ServedReceiver,
    accept_handshake,
    complete_session,
    data_frame,
    data_header,
    hello,
    make_hello,
    next_data,
    poll_for,
    poll_until,
    rss_kib,
    serve_loopback,
    single_error,
    start_receiver,
)
from procs import Procs, free_port, procs_fixture  # noqa: F401  (the ``procs`` fixture)
from viamillipede import BytesSource, Receiver, TransferStats
from viamillipede.api import send, tcp_transmitter
from viamillipede.errors import (
    PeerRejected,
    PeerTimeout,
    ProtocolViolation,
    RemoteFailure,
    ViamillipedeError,
)
from viamillipede.options import HANDSHAKE_TIMEOUT
from viamillipede.receiver import MAX_TAMPERED
from viamillipede.wire import (
    PROTOCOL_VERSION,
    Ack,
    Auth,
    AuthKind,
    Bye,
    ByeOk,
    Decoder,
    Error,
    ErrorCode,
    Event,
    Feature,
    Hello,
    Welcome,
    WelcomeStatus,
    encode,
)

pytestmark = pytest.mark.anyio

CHUNK = 4096
WINDOW = 4  # what a transmitter with threads=2 announces (the default window)
MiB = 1024 * 1024

trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])


def refused_without_leak(status: WelcomeStatus) -> Welcome:
    """The only WELCOME a refused, unauthenticated HELLO may get."""
    return Welcome(int(status), NO_SESSION, 0)


# -- a real session kept alive mid-transfer ----------------------------------------------------

HELD_CHUNKS = 3  # chunks through before the source pauses


def live_payload() -> bytes:
    return os.urandom(HELD_CHUNKS * CHUNK + 5 * CHUNK + 17)


async def during_live_session(
    data: bytes, attack: Callable[[ServedReceiver], Awaitable[None]], *,
    patience: float = 20.0,
) -> tuple[ServedReceiver, Outcome[TransferStats]]:
    """Run a real receiver and a real transmitter (threads 2) over loopback; once
    ``HELD_CHUNKS`` chunks are on the sink and the source is paused (the session is live and
    mid-transfer), ``await attack(served)``; then let the source run to its end and wait for
    both ends.  Returns the receiver and the transmitter's outcome."""
    tx_outcome: Outcome[TransferStats] = Outcome()
    with single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg)
            source = GatedSource(data, HELD_CHUNKS * CHUNK)
            tx = tcp_transmitter(source, [(HOST, served.port)], threads=2, chunk_size=CHUNK,
                                 plaintext=True)
            tg.start_soon(tx_outcome.capture, tx.run)
            await poll_until(
                lambda: len(served.sink.data) >= HELD_CHUNKS * CHUNK
                or tx_outcome.done.is_set() or served.outcome.done.is_set(),
                10, "the first chunks of the real session")
            assert len(served.sink.data) == HELD_CHUNKS * CHUNK, (
                f"the real session did not start: transmitter {tx_outcome.describe()}, "
                f"receiver {served.outcome.describe()}")
            await attack(served)
            source.release()
            await tx_outcome.wait(patience)
            await served.outcome.wait(patience)
            tg.cancel_scope.cancel()
    return served, tx_outcome


def session_problems(served: ServedReceiver, tx: Outcome[TransferStats], data: bytes) -> list[str]:
    """What went wrong with the real session: either end not succeeding, or the output."""
    problems = []
    if not tx.ok:
        problems.append(f"the real transmitter {tx.describe()}")
    if not served.outcome.ok:
        problems.append(f"the receiver's serve() {served.outcome.describe()}")
    out = bytes(served.sink.data)
    if out != data:
        first = next((i for i, (a, b) in enumerate(zip(out, data, strict=False)) if a != b),
                     min(len(out), len(data)))
        problems.append(f"the output differs from the input: {len(out)} bytes for "
                        f"{len(data)}, first difference at byte {first}")
    return problems


# -- no leaks before authentication ------------------------------------------------------------

PROBES: dict[str, tuple[dict[str, Any], WelcomeStatus]] = {
    "unknown-version": ({"version": PROTOCOL_VERSION + 1}, WelcomeStatus.BAD_VERSION),
    # A key exchange is offered only before a session's first DATA: a live session refuses
    # any other session id before anything is computed, whatever the phrase.
    "wrong-checkphrase": ({"phrase": b"nope"}, WelcomeStatus.WRONG_SESSION),
    "wrong-session": ({}, WelcomeStatus.WRONG_SESSION),  # right checkphrase, fresh session id
}


@pytest.mark.parametrize("probe", list(PROBES))
async def test_a_refused_hello_leaks_nothing_of_a_live_session(probe: str) -> None:
    fields, status = PROBES[probe]
    data = live_payload()
    answers: list[Welcome] = []

    async def attack(served: ServedReceiver) -> None:
        peer = await Peer.connect(served.port)
        try:
            answers.append(await hello(peer, conn_index=7, chunk_size=CHUNK, window=WINDOW,
                                       **fields))
        finally:
            await peer.aclose()

    with anyio.fail_after(30):
        served, tx = await during_live_session(data, attack)

    assert answers == [refused_without_leak(status)], (
        f"a {probe} HELLO was answered {answers[0]!r} while {HELD_CHUNKS} chunks of a live "
        "session were written; a refusal must carry neither its session id nor its progress")
    problems = session_problems(served, tx, data)
    assert not problems, "\n".join(problems)


# -- a stranger cannot join --------------------------------------------------------------------

SNIFFED = "the real id, sniffed"

INJECTIONS: dict[str, bytes] = {
    # The next chunk the receiver waits for, as long as the real one: a silent corruption.
    "data": data_frame(HELD_CHUNKS, b"!" * CHUNK),
    # "The stream ends here": a truncated output the receiver would confirm.
    "bye": encode(Bye(HELD_CHUNKS, HELD_CHUNKS * CHUNK)),
    "error": encode(Error(int(ErrorCode.ABORTED), "a stranger says stop")),
}


@pytest.mark.parametrize("inject", list(INJECTIONS))
async def test_a_stranger_cannot_join_a_live_session(inject: str) -> None:
    """The stranger first asks with a made-up session id and learns what the refusal says;
    then it tries that id, the all-zero id, another random one, and the real one (as if it had
    read it off the wire), with the session's parameters, asking to join and sending its frame
    right behind the HELLO and AUTH, without waiting to be challenged."""
    data = live_payload()
    tries: list[tuple[str, Welcome | None, list[Event], bool]] = []

    async def attack(served: ServedReceiver) -> None:
        params = {"chunk_size": CHUNK, "window": WINDOW, "features": 0}
        scout = await Peer.connect(served.port)
        try:
            told = await hello(scout, **params)
        finally:
            await scout.aclose()
        assert served.receiver.session_id is not None
        candidates = {"the id a refusal told": told.session_id, "the zero id": NO_SESSION,
                      "a random id": os.urandom(16),
                      SNIFFED: served.receiver.session_id}
        for name, session_id in candidates.items():
            try:
                peer = await Peer.connect(served.port, deadline=0)
            except OSError:
                tries.append((name, None, [], True))  # the receiver is gone already
                continue
            try:
                await peer.try_send(make_hello(session_id=session_id, conn_index=7, **params),
                                    Auth(AuthKind.JOIN, os.urandom(32)), INJECTIONS[inject])
                event = await peer.next_event()
                welcome = event if isinstance(event, Welcome) else None
                events, closed = await peer.events_until_closed(5)
                if welcome is None:
                    events = [event, *events]
                tries.append((name, welcome, events, closed))
            finally:
                await peer.aclose()

    with anyio.fail_after(40):
        served, tx = await during_live_session(data, attack)

    problems = []
    for name, welcome, events, closed in tries:
        if name == SNIFFED:
            # Challenged with a fresh nonce, it cannot prove it holds the session's keys: the
            # receiver drops it without a WELCOME (and counts it as tampering).
            if welcome is not None or not events or not isinstance(events[0], Auth):
                problems.append(f"a join with the sniffed id got {welcome!r}, {events}")
            welcome = Welcome(int(WelcomeStatus.WRONG_SESSION), NO_SESSION, 0)
            events = events[1:]
        if welcome is None and served.outcome.done.is_set():
            problems.append(f"a stranger's HELLO with {name} found no receiver any more")
        elif welcome is None or welcome.status != WelcomeStatus.WRONG_SESSION:
            problems.append(f"a stranger's HELLO with {name} was answered {welcome!r}")
        if welcome is not None and welcome.session_id != NO_SESSION:
            problems.append(f"the refusal of {name} carried a session id")
        if any(isinstance(e, (Ack, ByeOk)) for e in events):
            problems.append(f"the {inject} a stranger sent with {name} was answered: {events}")
        if not closed:
            problems.append(f"the stranger's connection with {name} was not closed")
    problems += session_problems(served, tx, data)
    assert not problems, "\n".join(problems)


async def test_joins_that_hang_up_before_their_proof_are_not_counted_as_tampering() -> None:
    """A link cut mid-join leaves a join without its proof.  That forged nothing; counted as
    tampering, a flaky link (or anyone who read the session id off the wire) would end a
    healthy session after MAX_TAMPERED of them.  Twice that many hang-ups change nothing."""
    data = live_payload()
    challenged = 0

    async def attack(served: ServedReceiver) -> None:
        nonlocal challenged
        assert served.receiver.session_id is not None
        for _ in range(2 * MAX_TAMPERED):
            peer = await Peer.connect(served.port)
            try:
                await peer.send(make_hello(session_id=served.receiver.session_id, conn_index=7,
                                           chunk_size=CHUNK, window=WINDOW),
                                Auth(AuthKind.JOIN, os.urandom(32)))
                challenged += isinstance(await peer.next_event(), Auth)
            finally:
                await peer.aclose()  # before any proof

    with anyio.fail_after(40):
        served, tx = await during_live_session(data, attack)

    assert challenged == 2 * MAX_TAMPERED
    problems = session_problems(served, tx, data)
    assert not problems, "\n".join(problems)


# -- squatting ---------------------------------------------------------------------------------


async def test_a_wrong_checkphrase_before_the_transmitter_does_not_bind_the_receiver() -> None:
    """The squatter's HELLO names another session and other parameters: had it bound the
    receiver, the real transmitter would be refused (WRONG_SESSION or BAD_PARAMETERS)."""
    data = os.urandom(20 * CHUNK + 3)
    tx: Outcome[TransferStats] = Outcome()
    with anyio.fail_after(30), single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg)
            squatter = await Peer.connect(served.port)
            try:
                welcome = await hello(squatter, phrase=b"nope", chunk_size=2 * CHUNK,
                                      window=5, features=int(Feature.CHECKSUM_CRC32))
                _, closed = await squatter.events_until_closed(5)
            finally:
                await squatter.aclose()
            await tx.capture(lambda: send(BytesSource(data), [(HOST, served.port)], threads=2,
                                          chunk_size=CHUNK, plaintext=True))
            await served.outcome.wait(20)
            tg.cancel_scope.cancel()

    assert welcome == refused_without_leak(WelcomeStatus.BAD_CHECKPHRASE)
    assert closed, "the receiver kept the squatter's refused connection open"
    problems = session_problems(served, tx, data)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("fields", "status"), [
    ({"version": 1}, WelcomeStatus.BAD_VERSION),  # version 1 had no AUTH: it waits for WELCOME
    ({"mode": 0}, WelcomeStatus.BAD_MODE),  # sealed, to a receiver started with plaintext
    ({"mode": 0x8000_0001}, WelcomeStatus.BAD_PARAMETERS),  # a mode bit not known
])
async def test_a_hello_without_auth_is_answered_at_once_when_it_alone_is_refused(
    fields: dict[str, Any], status: WelcomeStatus,
) -> None:
    """An older transmitter sends HELLO and waits: it must hear why it is refused, not be
    dropped after the handshake timeout with nothing said."""
    data = os.urandom(3 * CHUNK + 5)
    tx: Outcome[TransferStats] = Outcome()
    with anyio.fail_after(30), single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg)
            old = await Peer.connect(served.port)
            try:
                await old.send(make_hello(conn_index=0, chunk_size=CHUNK, window=WINDOW,
                                          **fields))
                with anyio.fail_after(HANDSHAKE_TIMEOUT / 4):
                    answer = await old.next_event()
                    _, closed = await old.events_until_closed(HANDSHAKE_TIMEOUT / 4)
            finally:
                await old.aclose()
            await tx.capture(lambda: send(BytesSource(data), [(HOST, served.port)], threads=2,
                                          chunk_size=CHUNK, plaintext=True))
            await served.outcome.wait(20)
            tg.cancel_scope.cancel()

    assert answer == refused_without_leak(status)
    assert closed, "the receiver kept a refused connection open"
    problems = session_problems(served, tx, data)
    assert not problems, "\n".join(problems)


# -- a connection of the session misbehaves ----------------------------------------------------


def session_chunks() -> list[bytes]:
    return [os.urandom(CHUNK) for _ in range(5)] + [os.urandom(17)]


class Misbehaviour:
    """What happened when a connection of the session sent something hostile."""

    def __init__(self) -> None:
        self.welcome: Welcome | None = None
        self.answers: list[Event] = []  # frames the receiver sent after the hostile bytes
        self.dropped = False
        self.records: list[logging.LogRecord] = []  # receiver log records after them
        self.completion: str = "not tried"
        self.served: ServedReceiver | None = None
        self.chunks: list[bytes] = []


async def misbehave(hostile: bytes | Callable[[Hello], bytes],
                    caplog: pytest.LogCaptureFixture, *, with_hello: bool = False
                    ) -> Misbehaviour:
    """A crafted transmitter joins a fresh receiver (it is the session), gets chunk 0
    through, then sends ``hostile`` (or sends it in the same write as its HELLO; a function
    makes it from that HELLO).  If the receiver is still serving once that connection is
    gone, the session is completed on a new connection (the remaining chunks, BYE, BYE_OK,
    FIN)."""
    caplog.set_level(logging.INFO, logger="viamillipede.rx")
    m = Misbehaviour()
    m.chunks = chunks = session_chunks()
    session = os.urandom(16)
    params = {"session_id": session, "chunk_size": CHUNK, "window": WINDOW}
    if callable(hostile):
        hostile = hostile(make_hello(**params))
    with single_error():
        async with anyio.create_task_group() as tg:
            m.served = served = await start_receiver(tg)
            peer = await Peer.connect(served.port)
            try:
                if with_hello:
                    await peer.send(make_hello(**params), hostile)
                    event = await peer.next_event()
                    m.welcome = event if isinstance(event, Welcome) else None
                    mark = 0
                else:
                    m.welcome = await hello(peer, **params)
                    await peer.send(data_frame(0, chunks[0]))
                    ack = await peer.next_event()
                    assert isinstance(ack, Ack) and ack.seq == 0, ack
                    mark = len(caplog.records)
                    await peer.try_send(hostile)
                m.answers, m.dropped = await peer.events_until_closed(5)
            finally:
                await peer.aclose()
            m.records = [r for r in caplog.records[mark:] if r.name.startswith("viamillipede")]
            if served.outcome.done.is_set():
                m.completion = "not tried: serve() had ended"
            else:
                try:
                    await complete_session(served.port, session, chunks, chunk_size=CHUNK,
                                           window=WINDOW)
                    m.completion = "completed"
                except (AssertionError, OSError, anyio.BrokenResourceError) as exc:
                    m.completion = f"failed: {type(exc).__name__}: {exc}"
                await served.outcome.wait(10)
            tg.cancel_scope.cancel()
    return m


def drop_problems(m: Misbehaviour, what: str) -> list[str]:
    problems = []
    if not m.dropped:
        problems.append(f"the connection that sent {what} was not dropped")
    # Chunk 0 may be ACKed again once written; anything else answers the hostile frame.
    acks = [e for e in m.answers if isinstance(e, ByeOk) or (isinstance(e, Ack) and e.seq)]
    if acks:
        problems.append(f"{what} was answered: {acks}")
    return problems


def completion_problems(m: Misbehaviour) -> list[str]:
    assert m.served is not None
    problems = []
    if m.completion != "completed":
        problems.append(f"the session could not be completed afterwards: {m.completion}")
    if not m.served.outcome.ok:
        problems.append(f"serve() {m.served.outcome.describe()}")
    if bytes(m.served.sink.data) != b"".join(m.chunks):
        problems.append(f"the output is {len(m.served.sink.data)} bytes, not the "
                        f"{sum(map(len, m.chunks))} bytes of the chunks")
    return problems


HOSTILE_DATA: dict[str, bytes] = {
    "empty": data_header(1, 0),  # the next chunk, with no payload
    "seq-2**64-1": data_frame(MAX_SEQ, b"x" * CHUNK),
    "seq-beyond-window": data_frame(1 + WINDOW + 1000, b"x" * CHUNK),
}


@pytest.mark.parametrize("kind", list(HOSTILE_DATA))
async def test_hostile_data_drops_its_connection_and_the_session_completes(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(30):
        m = await misbehave(HOSTILE_DATA[kind], caplog)

    problems = drop_problems(m, f"DATA ({kind})")
    warnings = [r for r in m.records if r.levelno >= logging.WARNING]
    if not warnings:
        problems.append("no warning says why the connection was dropped")
    for r in m.records:
        if r.exc_info or "\n" in r.getMessage() or "Traceback" in r.getMessage():
            problems.append(f"not a one-line reason: {r.getMessage()!r} (exc_info {r.exc_info})")
    problems += completion_problems(m)
    assert not problems, "\n".join(problems)


HOSTILE_FRAMES: dict[str, tuple[bytes | Callable[[Hello], bytes], bool]] = {
    "second-hello": (encode, False),  # the connection's own HELLO, again
    "bye-ok-to-receiver": (encode(ByeOk(1, CHUNK)), False),
    "welcome-to-receiver": (encode(Welcome(int(WelcomeStatus.ACCEPTED), bytes(16), 0)), False),
    "garbage-after-hello": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)), True),
}


@pytest.mark.parametrize("kind", list(HOSTILE_FRAMES))
async def test_out_of_place_frames_drop_the_connection_and_nothing_escapes(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile, with_hello = HOSTILE_FRAMES[kind]
    with anyio.fail_after(30):
        m = await misbehave(hostile, caplog, with_hello=with_hello)

    assert m.served is not None
    problems = drop_problems(m, kind)
    error = m.served.outcome.error
    if error is not None and not isinstance(error, ViamillipedeError):
        problems.append(f"serve() raised {type(error).__name__}: {error!r}")
    elif error is None:
        problems += completion_problems(m)
    assert not problems, "\n".join(problems)


# -- memory is bounded by the window -----------------------------------------------------------

BIG_CHUNK = 1 * MiB
BIG_WINDOW = 4
CONNECTIONS = 200
MAX_CONNECTIONS = 64
BIG_PARAMS: dict[str, Any] = {"chunk_size": BIG_CHUNK, "window": BIG_WINDOW,
                            "features": int(Feature.CHECKSUM_CRC32)}


async def first_chunk_through(port: int, session: bytes) -> Peer:
    """As the session's transmitter (right checkphrase, its own session id, CRC-32): join on
    connection 0 and get a full chunk 0 written; returns that connection."""
    control = await Peer.connect(port)
    welcome = await hello(control, session_id=session, conn_index=0, **BIG_PARAMS)
    assert welcome.status == WelcomeStatus.ACCEPTED, welcome
    chunk0 = os.urandom(BIG_CHUNK)
    await control.send(data_frame(0, chunk0, zlib.crc32(chunk0)))
    ack = await control.next_event()
    assert isinstance(ack, Ack) and ack.seq == 0, ack
    return control


async def announce_and_stall(port: int, session: bytes, peers: list[Peer]) -> dict[int, int]:
    """Open connections 1 .. 199 of the session and, on each one accepted, announce a full
    chunk inside the window (seqs 1-4, each many times over) but send only one byte of it.
    The connections are left open in ``peers``; returns each one's WELCOME status."""
    statuses: dict[int, int] = {}

    async def one(index: int) -> None:
        peer = await Peer.connect(port)
        peers.append(peer)
        try:
            welcome = await hello(peer, session_id=session, conn_index=index, **BIG_PARAMS)
        except NoWelcome:
            statuses[index] = -1
            return
        statuses[index] = welcome.status
        if welcome.status == WelcomeStatus.ACCEPTED:
            seq = 1 + index % BIG_WINDOW
            await peer.try_send(data_header(seq, BIG_CHUNK, 0x12345678), b"\x00")

    async with anyio.create_task_group() as tg:
        for index in range(1, CONNECTIONS):
            tg.start_soon(one, index)
    return statuses


def connection_bound_problems(statuses: dict[int, int]) -> list[str]:
    problems = []
    accepted = [i for i, s in statuses.items() if s == WelcomeStatus.ACCEPTED]
    if len(accepted) + 1 > MAX_CONNECTIONS:  # + connection 0
        problems.append(f"{len(accepted) + 1} connections of one session were accepted "
                        f"(at most {MAX_CONNECTIONS} may be)")
    # -1: closed unanswered, because more strangers than the receiver holds at once were
    # waiting to be admitted; also a refusal.
    wrong = {i: s for i, s in statuses.items()
             if i >= MAX_CONNECTIONS and s not in (WelcomeStatus.BAD_PARAMETERS, -1)}
    if wrong:
        problems.append(f"{len(wrong)} connections with conn_index >= {MAX_CONNECTIONS} were "
                        f"not refused with BAD_PARAMETERS (status by conn_index, e.g. "
                        f"{sorted(wrong.items())[:3]})")
    return problems


@trio_only
async def test_chunks_announced_but_never_sent_hold_memory_to_the_window(procs: Procs) -> None:
    """Against a real ``viamillipede rx`` process, whose resident memory is read from /proc:
    200 connections announce 1 MiB chunks and send one byte of each.  The receiver may hold
    (window + 4) chunk buffers; 8 MiB more are allowed for the interpreter's own growth
    (connections, tasks).  Without a bound it grows by one buffer per connection."""
    port = free_port()
    rx = procs.rx(port, "plaintext")
    session = os.urandom(16)
    peers: list[Peer] = []
    limit_kib = (BIG_WINDOW + 4 + 8) * 1024
    growth_kib = 0
    with anyio.fail_after(40):
        try:
            peers.append(await first_chunk_through(port, session))
            baseline = rss_kib(rx.popen.pid)
            statuses = await announce_and_stall(port, session, peers)

            def sample() -> bool:
                nonlocal growth_kib
                growth_kib = max(growth_kib, rss_kib(rx.popen.pid) - baseline)
                return False

            await poll_for(sample, 1.0)  # the largest growth over a second
            alive = rx.running()
        finally:
            for peer in peers:
                await peer.aclose()

    problems = []
    if growth_kib >= limit_kib:
        problems.append(f"the receiver's memory grew by {growth_kib / 1024:.0f} MiB, more than "
                        f"{limit_kib // 1024} MiB ((window {BIG_WINDOW} + 4) x 1 MiB chunks + "
                        "8 MiB)")
    problems += connection_bound_problems(statuses)
    if not alive:
        problems.append(f"the receiver died:\n{rx.stderr}")
    assert not problems, "\n".join(problems)


class NullSink:
    """Drops everything."""

    async def write(self, data: memoryview) -> None:
        await anyio.lowlevel.checkpoint()

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()


def buffer_counter(receiver: Receiver) -> int | None:
    """The receiver's public count of (peak) chunk buffer bytes, if it has one."""
    names = ("peak_buffer_bytes", "buffer_bytes_peak", "buffer_bytes")
    for source in (receiver.statistics(), receiver):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    return None


async def test_the_receivers_buffer_counter_stays_within_the_window() -> None:
    """The same attack against an in-process receiver, read through its public counter of
    chunk buffer bytes (skipped where the receiver has none)."""
    if buffer_counter(Receiver(NullSink())) is None:
        pytest.skip("the receiver has no public buffer counter (peak_buffer_bytes)")
    session = os.urandom(16)
    peers: list[Peer] = []
    limit = (BIG_WINDOW + 4) * BIG_CHUNK
    peak = 0
    with anyio.fail_after(30), single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg)
            try:
                peers.append(await first_chunk_through(served.port, session))
                statuses = await announce_and_stall(served.port, session, peers)

                def sample() -> bool:
                    nonlocal peak
                    peak = max(peak, buffer_counter(served.receiver) or 0)
                    return False

                await poll_for(sample, 1.0)  # the peak over a second
            finally:
                for peer in peers:
                    await peer.aclose()
            tg.cancel_scope.cancel()

    problems = []
    if peak > limit:
        problems.append(f"the receiver held {peak / MiB:.0f} MiB of chunk buffers, more than "
                        f"(window {BIG_WINDOW} + 4) x 1 MiB")
    problems += connection_bound_problems(statuses)
    assert not problems, "\n".join(problems)


# -- the transmitter is not fooled -------------------------------------------------------------

TX_CHUNK = 64 * 1024
TX_CHUNKS = 4
TX_DATA = os.urandom(TX_CHUNKS * TX_CHUNK)
IDLE = 3.0
#: "Within the idle timeout plus a few seconds".
PROMPT = IDLE + 3.0


async def against_fake(
    behave: Behaviour, *, threads: int, patience: float
) -> Outcome[TransferStats]:
    """Run a real transmitter (4 chunks of 64 KiB, idle timeout 3 s) against a
    :class:`FakeReceiver`; give it ``patience`` seconds to finish."""
    fake = FakeReceiver(behave)
    tx: Outcome[TransferStats] = Outcome()
    with anyio.fail_after(patience + 10), single_error():
        async with anyio.create_task_group() as tg:
            port = await fake.start(tg)
            transmitter = tcp_transmitter(BytesSource(TX_DATA), [(HOST, port)], threads=threads,
                                          chunk_size=TX_CHUNK, idle_timeout=IDLE)
            tg.start_soon(tx.capture, transmitter.run)
            await tx.wait(patience)
            tg.cancel_scope.cancel()
    return tx


@pytest.mark.parametrize("with_reason", [True, False], ids=["with-error", "bare"])
async def test_a_failed_session_is_reported_with_the_reason_that_follows_it(
    with_reason: bool,
) -> None:
    """A receiver whose session has failed answers a proven connection with a tagged
    WELCOME(SESSION_FAILED) and its tagged ERROR right behind: the transmitter ends with that
    reason even with no other connection to hear it on; without one, it still fails, saying so."""
    keys: dict[bytes, Any] = {}

    async def handle(stream: anyio.abc.ByteStream) -> None:
        peer = Peer(stream, Decoder.for_receiver())
        with contextlib.suppress(Exception):
            if await accept_handshake(peer, keys, status=WelcomeStatus.SESSION_FAILED):
                if with_reason:
                    await peer.send(Error(int(ErrorCode.SINK_FAILED), "zfs recv: disk full"))
                await peer.events_until_closed(5)
        await peer.aclose()

    tx: Outcome[TransferStats] = Outcome()
    with anyio.fail_after(30), single_error():
        async with anyio.create_task_group() as tg:
            port = await serve_loopback(tg, handle)
            transmitter = tcp_transmitter(BytesSource(TX_DATA), [(HOST, port)], threads=1,
                                          chunk_size=TX_CHUNK, idle_timeout=IDLE)
            await tx.capture(transmitter.run)
            tg.cancel_scope.cancel()
    assert isinstance(tx.error, RemoteFailure), tx.describe()
    said = "zfs recv: disk full" if with_reason else "the receiver's session has failed"
    assert said in str(tx.error), tx.describe()


def must_fail(tx: Outcome[TransferStats], allowed: tuple[type[Exception], ...],
              within: float, what: str) -> None:
    """The transmitter ended within ``within`` seconds by raising one of ``allowed``."""
    names = " or ".join(t.__name__ for t in allowed)
    assert tx.done.is_set(), (
        f"{what}: the transmitter was still running when the test gave up on it")
    assert tx.error is not None, (
        f"{what}: the transmitter reported success ({tx.describe()}); it must raise {names}")
    assert isinstance(tx.error, allowed), (
        f"{what}: the transmitter raised {type(tx.error).__name__}: {tx.error!r}, not {names}")
    assert tx.elapsed <= within, f"{what}: it took {tx.elapsed:.1f} s (at most {within:g})"


@trio_only
@pytest.mark.parametrize("totals", ["right", "wrong"])
async def test_a_bye_ok_before_the_bye_is_no_success(totals: str) -> None:
    """The fake receiver takes the 4 chunks without ACKing them and answers BYE_OK at once
    (a BYE can only follow ACKs, so none was sent), on every connection."""
    right = (TX_CHUNKS, len(TX_DATA))
    bye_ok = ByeOk(*right) if totals == "right" else ByeOk(TX_CHUNKS + 1, len(TX_DATA) + 1)

    async def behave(peer: Peer, opening: Hello) -> None:
        for _ in range(TX_CHUNKS):
            if await next_data(peer) is None:
                return
        await peer.send(bye_ok)
        await peer.drain()

    tx = await against_fake(behave, threads=1, patience=12)
    must_fail(tx, (PeerTimeout, ProtocolViolation), 10, f"BYE_OK with the {totals} totals "
              "before any BYE")


@trio_only
@pytest.mark.parametrize("written", [0, MAX_SEQ])
async def test_an_ack_of_seq_2_64_minus_1_is_a_clean_failure(written: int) -> None:
    async def behave(peer: Peer, opening: Hello) -> None:
        if await next_data(peer) is None:
            return
        await peer.send(Ack(MAX_SEQ, written))
        await peer.drain()

    tx = await against_fake(behave, threads=1, patience=12)
    must_fail(tx, (ViamillipedeError,), 10, f"ACK(seq=2**64-1, written={written})")


@trio_only
async def test_a_receiver_that_never_acks_times_out_though_it_keeps_accepting() -> None:
    """Each connection is accepted, holds the chunks 2 s without a word, then hangs up: the
    transmitter reconnects again and again, and none of those handshakes is progress."""

    async def behave(peer: Peer, opening: Hello) -> None:
        with anyio.move_on_after(2.0):  # how long this fake holds a connection
            await peer.drain()

    tx = await against_fake(behave, threads=2, patience=PROMPT + 10)
    must_fail(tx, (PeerTimeout,), PROMPT, "no ACK ever")


async def test_a_flood_of_empty_acks_is_no_progress() -> None:
    """After the first chunk arrives the fake receiver sends ACK(seq=0, written=0) again and
    again (tens of thousands), while reading whatever comes."""
    sent = [0]

    async def behave(peer: Peer, opening: Hello) -> None:
        if await next_data(peer) is None:
            return
        batch = b"".join(peer.encode(Ack(0, 0)) for _ in range(1000))
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer.drain)
            while await peer.try_send(batch):
                sent[0] += 1000
            tg.cancel_scope.cancel()

    tx = await against_fake(behave, threads=1, patience=PROMPT + 6)
    must_fail(tx, (PeerTimeout,), PROMPT, f"a flood of {sent[0]} empty ACKs")


# -- checkphrase guessing ----------------------------------------------------------------------

GUESSES = 8


@trio_only
async def test_checkphrase_guesses_are_slowed_and_end_the_receiver_after_five(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each key exchange is one online guess at the phrase (SPAKE2 gives no offline test):
    after a burst of 3 they are answered at about 2 a second however many connections ask,
    and after 5 failures the receiver gives up (exit 3) rather than be guessed at forever."""
    caplog.set_level(logging.INFO, logger="viamillipede.rx")
    answered: list[float] = []

    async def guess(i: int, t0: float) -> None:
        peer = await Peer.connect(port)
        try:
            with contextlib.suppress(NoWelcome):
                await hello(peer, phrase=f"g{i:03d}".encode())
            answered.append(anyio.current_time() - t0)
        finally:
            await peer.aclose()

    with anyio.fail_after(30), single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg)
            port = served.port
            t0 = anyio.current_time()
            async with anyio.create_task_group() as storm:
                for i in range(GUESSES):
                    storm.start_soon(guess, i, t0)
            assert await served.outcome.wait(10), "the receiver went on after the guesses"
            tg.cancel_scope.cancel()

    problems = []
    early = [t for t in answered if t < 0.9]
    if len(early) > 5:
        problems.append(f"{len(early)} of {GUESSES} guesses were answered within 0.9 s "
                        "(a burst of 3, then 2 a second)")
    if not isinstance(served.outcome.error, PeerRejected) or "5 key exchanges failed" not in str(
            served.outcome.error):
        problems.append(f"the receiver {served.outcome.describe()}; it must give up after 5")
    if served.sink.data:
        problems.append("the receiver wrote something")
    warnings = [r for r in caplog.records if r.name.startswith("viamillipede.rx")
                and r.levelno >= logging.WARNING and "key exchange" in r.getMessage()]
    if not 1 <= len(warnings) <= 5:
        problems.append(f"{len(warnings)} warnings about failed key exchanges (1 to 5)")
    assert not problems, "\n".join(problems)
