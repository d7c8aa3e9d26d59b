"""A man in the middle between a real transmitter and a real receiver, over loopback.

The proxy (tests/mitm.py) cuts both directions into frames with the project's own decoder, so
each attack hits exactly the frame it means.  Sessions are sealed (the default), on the public
phrase unless a test says otherwise: the proxy takes no part in the key exchange, which is the
attacker docs/security.md says the default protects against.  What is checked:

* One flipped bit anywhere -- HELLO, each AUTH of a key exchange and of a join, WELCOME, DATA
  header and payload, ACK, BYE, BYE_OK, FIN -- is detected: the session either recovers to
  byte-identical output or fails loudly; never success with wrong or short output.  Past the
  key exchange the protocol promises recovery, and that is required too.
* A connection recorded earlier in the session and replayed mid-session, to either end, is
  refused and changes nothing.
* Frames duplicated, swapped, moved to another sequence number, copied from another connection
  or from an earlier session change nothing.
* Connections cut after a number of bytes never leave either end reporting success on a short
  output.
* No 32-byte run of the payload crosses the wire, either way.
* A wrong checkphrase or key file makes the transmitter fail with exit code 3 (PeerRejected)
  before it proves anything or sends a chunk, and the receiver writes nothing.

Most sessions run on Trio only: what they check is the protocol, not the backend; the wrong
credentials run on both.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from spake2.ed25519_basic import NotOnCurve, decodepoint

from harness import WatchedSink
from hostile import (
    HOST,
    GatedSource,
    Outcome,
    ServedReceiver,
    single_error,
    start_receiver,
)
from mitm import TO_RX, TO_TX, Frame, Link, Mitm, Tamper, flip, replay_to_receiver
from procs import Procs, bytes_file, free_port
from viamillipede import BufferSink, BytesSource, TransferStats
from viamillipede.api import tcp_transmitter
from viamillipede.errors import ExitCode, PeerRejected, ProtocolViolation, ViamillipedeError
from viamillipede.receiver import MAX_TAMPERED, TAMPER_FORGIVE_S, Receiver
from viamillipede.wire import (
    DATA_HEADER_SIZE,
    Ack,
    Auth,
    AuthKind,
    ByeOk,
    Data,
    Event,
    Welcome,
    WelcomeStatus,
    encode,
    pack_data_header,
)

pytestmark = pytest.mark.anyio

trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])

KiB = 1024
CHUNK = 16 * KiB
CHUNKS = 16
#: A short last chunk: the totals and the last seal must cover an odd length too.
PAYLOAD_SIZE = CHUNKS * CHUNK - 123
#: Either end's idle timeout: what a stalled session costs before it fails loudly.
IDLE = 6.0
#: How long a test waits for an end that should be done; a hang fails instead.
PATIENCE = 20.0
ZEROS = bytes(32)


def payload(size: int = PAYLOAD_SIZE) -> bytes:
    return os.urandom(size)


# -- one session through the proxy -------------------------------------------------------------


@dataclass
class Run:
    data: bytes
    tx: Outcome[TransferStats]
    served: ServedReceiver
    mitm: Mitm

    @property
    def out(self) -> bytes:
        return bytes(self.served.sink.data)

    @property
    def rx(self) -> Outcome[TransferStats]:
        return self.served.outcome


During = Callable[[Mitm, ServedReceiver], Awaitable[None]]


async def through_mitm(
    data: bytes,
    tamper: Tamper | None = None,
    *,
    threads: int = 2,
    idle: float = IDLE,
    source: Any = None,
    sink: BufferSink | None = None,
    during: During | None = None,
    on_link: Callable[[Link], None] | None = None,
    tx_options: dict[str, Any] | None = None,
    rx_options: dict[str, Any] | None = None,
) -> Run:
    """A real receiver and a real transmitter (``threads`` connections, 16 KiB chunks), the
    proxy between them.  ``during`` runs while the session is live (with a gated ``source``
    it is mid-transfer).  Waits for the transmitter to end; then for the receiver, whenever
    it could still end by itself (it is bound to a session: an ERROR or its idle timeout ends
    it); an unbound receiver is stopped."""
    tx: Outcome[TransferStats] = Outcome()
    with anyio.fail_after(during_limit(idle)), single_error():
        async with anyio.create_task_group() as tg:
            served = await start_receiver(tg, sink=sink, idle_timeout=idle,
                                          **{"plaintext": False, **(rx_options or {})})
            mitm = Mitm(served.port, tamper, on_link=on_link)
            await mitm.start(tg)
            transmitter = tcp_transmitter(
                source if source is not None else BytesSource(data), [(HOST, mitm.port)],
                threads=threads, chunk_size=CHUNK, idle_timeout=idle, **(tx_options or {}))
            tg.start_soon(tx.capture, transmitter.run)
            if during is not None:
                await during(mitm, served)
            await transmitter_done(tx, served.outcome)
            if tx.ok or served.receiver.session_id is not None:
                await served.outcome.wait(PATIENCE)
            tg.cancel_scope.cancel()
    return Run(data, tx, served, mitm)


async def transmitter_done(tx: Outcome[TransferStats], rx: Outcome[TransferStats]) -> None:
    """Wait for the transmitter to end, but not once the receiver has failed: nothing can
    then make the transmitter succeed, and it would only retry until its idle timeout."""
    with anyio.move_on_after(PATIENCE):
        async with anyio.create_task_group() as tg:

            async def ended() -> None:
                await tx.done.wait()
                tg.cancel_scope.cancel()

            async def failed() -> None:
                await rx.done.wait()
                if rx.error is not None:
                    tg.cancel_scope.cancel()

            tg.start_soon(ended)
            tg.start_soon(failed)


def during_limit(idle: float) -> float:
    return 2 * PATIENCE + 2 * idle


def difference(out: bytes, data: bytes) -> str:
    if len(out) != len(data):
        return f"{len(out)} bytes were written for {len(data)}"
    first = next(i for i, (a, b) in enumerate(zip(out, data, strict=True)) if a != b)
    return f"the output differs from the input from byte {first} on"


def problems(run: Run, *, recover: bool) -> list[str]:
    """Everything that breaks "recovers to byte-identical output, or fails loudly"; with
    ``recover``, failing loudly is a problem too."""
    found = []
    out = run.out
    for name, end in (("transmitter", run.tx), ("receiver", run.rx)):
        if end.ok and out != run.data:
            found.append(f"the {name} reported success, but {difference(out, run.data)}")
        if end.error is not None and not isinstance(end.error, ViamillipedeError):
            found.append(f"the {name} crashed: {end.describe()}")
    if not run.tx.done.is_set():
        if run.rx.ok or not run.rx.done.is_set():
            found.append(f"the transmitter neither finished nor failed in {PATIENCE:g} s")
    elif run.tx.ok and not run.rx.ok:
        found.append(f"the transmitter succeeded, but the receiver {run.rx.describe()}")
    if recover and not (run.tx.ok and run.rx.ok):
        found.append(f"no recovery: the transmitter {run.tx.describe()}, the receiver "
                     f"{run.rx.describe()}")
    return found


# -- 1. one flipped bit ------------------------------------------------------------------------


def auth_is(kind: AuthKind, *, proof: bool) -> Callable[[Event | None], bool]:
    """The transmitter's AUTH of that kind that opens (no proof) or proves a handshake."""

    def match(event: Event | None) -> bool:
        return (isinstance(event, Auth) and event.kind == kind
                and (event.proof != ZEROS) == proof)

    return match


def seq_is(seq: int) -> Callable[[Event | None], bool]:
    return lambda event: isinstance(event, Data) and event.seq == seq


class Flip:
    """Flips one bit of the ``nth`` frame of ``kind`` going ``direction`` that ``where``
    accepts (or of every such frame); ``hits`` are the frames it flipped."""

    def __init__(self, direction: str, kind: str, offset: int, bit: int = 0, *, nth: int = 0,
                 where: Callable[[Event | None], bool] | None = None,
                 every: bool = False) -> None:
        self.direction, self.kind, self.offset, self.bit = direction, kind, offset, bit
        self.nth, self.where, self.every = nth, where, every
        self.seen = 0
        self.hits: list[Frame] = []

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if (frame.direction != self.direction or frame.kind != self.kind
                or (self.where is not None and not self.where(frame.event))):
            return [frame.raw]
        index = self.seen
        self.seen += 1
        if not self.every and index != self.nth:
            return [frame.raw]
        self.hits.append(frame)
        return [flip(frame.raw, *self.choose(frame.raw))]

    def choose(self, raw: bytes) -> tuple[int, int]:
        """Which bit of ``raw`` to flip: (offset, bit)."""
        return self.offset, self.bit


def on_curve(point: bytes) -> bool:
    try:
        decodepoint(point)
    except NotOnCurve:
        return False
    return True


#: Where an AUTH holds the point of its SPAKE2 message (after the side byte).
POINT = slice(35, 67)


class SpakeFlip(Flip):
    """Flips the first bit of an AUTH's SPAKE2 point that leaves it on the curve (``on``) or
    takes it off.  Each is about half of all bits, and which half depends on the random point:
    chosen, not drawn, so that each case always tests the same thing."""

    def __init__(self, direction: str, where: Callable[[Event | None], bool], *,
                 on: bool) -> None:
        super().__init__(direction, "Auth", POINT.start, where=where)
        self.on = on

    def choose(self, raw: bytes) -> tuple[int, int]:
        for offset in range(POINT.start, POINT.stop):
            for bit in range(8):
                if on_curve(flip(raw, offset, bit)[POINT]) == self.on:
                    return offset, bit
        raise AssertionError("no bit of the point does that")  # pragma: no cover


PAKE_OPEN = auth_is(AuthKind.PAKE, proof=False)
PAKE_PROOF = auth_is(AuthKind.PAKE, proof=True)
JOIN_OPEN = auth_is(AuthKind.JOIN, proof=False)
JOIN_PROOF = auth_is(AuthKind.JOIN, proof=True)


def _pake_answer(event: Event | None) -> bool:
    return isinstance(event, Auth) and event.kind == AuthKind.PAKE


def _join_answer(event: Event | None) -> bool:
    return isinstance(event, Auth) and event.kind == AuthKind.JOIN


# Offsets are from the frame's type byte (docs/protocol.md, section 2); negative ones from its
# end, i.e. in the tag.  Names: where, which field.  The last item says whether the protocol
# promises recovery: the key exchange of the first connection may instead end the session
# (a refusal or a failed proof there is fatal by design); everything after it is re-sent or
# reconnected.
FLIPS: dict[str, tuple[Callable[[], Flip], bool]] = {
    # The key exchange: HELLO, the transmitter's AUTH, the receiver's answer, the proof.
    "hello-type": (lambda: Flip(TO_RX, "Hello", 0), False),
    "hello-magic": (lambda: Flip(TO_RX, "Hello", 3, 2), False),
    "hello-version": (lambda: Flip(TO_RX, "Hello", 6), False),
    "hello-mode": (lambda: Flip(TO_RX, "Hello", 10), False),
    "hello-session-id": (lambda: Flip(TO_RX, "Hello", 20, 5), False),
    "hello-chunk-size": (lambda: Flip(TO_RX, "Hello", 32), False),
    "hello-window": (lambda: Flip(TO_RX, "Hello", 36, 1), False),
    "hello-features": (lambda: Flip(TO_RX, "Hello", 40), False),
    "pake-open-kind": (lambda: Flip(TO_RX, "Auth", 1, where=PAKE_OPEN), False),
    "pake-open-nonce": (lambda: Flip(TO_RX, "Auth", 10, 3, where=PAKE_OPEN), False),
    "pake-open-spake2-on-curve": (lambda: SpakeFlip(TO_RX, PAKE_OPEN, on=True), False),
    "pake-open-spake2-off-curve": (lambda: SpakeFlip(TO_RX, PAKE_OPEN, on=False), False),
    "pake-open-proof-field": (lambda: Flip(TO_RX, "Auth", 80, where=PAKE_OPEN), False),
    "pake-answer-nonce": (lambda: Flip(TO_TX, "Auth", 10, where=_pake_answer), False),
    "pake-answer-spake2-on-curve": (lambda: SpakeFlip(TO_TX, _pake_answer, on=True), False),
    "pake-answer-spake2-off-curve": (lambda: SpakeFlip(TO_TX, _pake_answer, on=False), False),
    "pake-answer-proof": (lambda: Flip(TO_TX, "Auth", 80, 7, where=_pake_answer), False),
    "pake-proof-proof": (lambda: Flip(TO_RX, "Auth", 80, where=PAKE_PROOF), True),
    "pake-proof-unused-nonce": (lambda: Flip(TO_RX, "Auth", 10, where=PAKE_PROOF), True),
    "pake-welcome-status": (lambda: Flip(TO_TX, "Welcome", 1, 2, nth=0), True),
    "pake-welcome-written": (lambda: Flip(TO_TX, "Welcome", 25, nth=0), True),
    "pake-welcome-tag": (lambda: Flip(TO_TX, "Welcome", -1, nth=0), True),
    # A join: the second connection's handshake.
    "join-hello-session-id": (lambda: Flip(TO_RX, "Hello", 20, nth=1), True),
    "join-hello-conn-index": (lambda: Flip(TO_RX, "Hello", 28, nth=1), True),
    "join-hello-version": (lambda: Flip(TO_RX, "Hello", 6, nth=1), True),
    "join-open-kind": (lambda: Flip(TO_RX, "Auth", 1, where=JOIN_OPEN), True),
    "join-open-nonce": (lambda: Flip(TO_RX, "Auth", 33, 7, where=JOIN_OPEN), True),
    "join-answer-nonce": (lambda: Flip(TO_TX, "Auth", 2, where=_join_answer), True),
    "join-answer-proof": (lambda: Flip(TO_TX, "Auth", 98, where=_join_answer), True),
    "join-proof-proof": (lambda: Flip(TO_RX, "Auth", 67, where=JOIN_PROOF), True),
    "join-welcome-tag": (lambda: Flip(TO_TX, "Welcome", -16, nth=1), True),
    # DATA headers: type, seq (into the window, beyond it, onto a chunk already written),
    # length, checksum (0 in a sealed session, but in the associated data).
    "data-type": (lambda: Flip(TO_RX, "Data", 0, where=seq_is(3)), True),
    "data-seq-next": (lambda: Flip(TO_RX, "Data", 8, 0, where=seq_is(4)), True),
    "data-seq-far": (lambda: Flip(TO_RX, "Data", 8, 7, where=seq_is(5)), True),
    "data-seq-written": (lambda: Flip(TO_RX, "Data", 8, 0, where=seq_is(7)), True),
    "data-seq-high": (lambda: Flip(TO_RX, "Data", 1, 7, where=seq_is(2)), True),
    "data-length-longer": (lambda: Flip(TO_RX, "Data", 12, 0, where=seq_is(6)), True),
    "data-length-shorter": (lambda: Flip(TO_RX, "Data", 12, 4, where=seq_is(6)), True),
    "data-checksum": (lambda: Flip(TO_RX, "Data", 16, where=seq_is(1)), True),
    # DATA payloads: the first byte, the middle, the last chunk, the GCM tag.
    "data-payload-first": (lambda: Flip(TO_RX, "Data", DATA_HEADER_SIZE, where=seq_is(0)),
                           True),
    "data-payload-middle": (lambda: Flip(TO_RX, "Data", DATA_HEADER_SIZE + CHUNK // 2, 4,
                                         where=seq_is(8)), True),
    "data-payload-last-chunk": (lambda: Flip(TO_RX, "Data", 100, where=seq_is(CHUNKS - 1)),
                                True),
    "data-payload-gcm-tag": (lambda: Flip(TO_RX, "Data", -1, 7, where=seq_is(9)), True),
    # Control frames after the handshake, both ways.
    "ack-seq": (lambda: Flip(TO_TX, "Ack", 8, nth=3), True),
    "ack-written": (lambda: Flip(TO_TX, "Ack", 16, 1, nth=5), True),
    "ack-tag": (lambda: Flip(TO_TX, "Ack", -1, nth=7), True),
    "bye-chunks": (lambda: Flip(TO_RX, "Bye", 8, 0), True),
    "bye-nbytes": (lambda: Flip(TO_RX, "Bye", 16, 3), True),
    "bye-tag": (lambda: Flip(TO_RX, "Bye", -5), True),
    "bye-ok-chunks": (lambda: Flip(TO_TX, "ByeOk", 8, 0), True),
    "bye-ok-tag": (lambda: Flip(TO_TX, "ByeOk", -1), True),
    "every-bye-ok": (lambda: Flip(TO_TX, "ByeOk", 16, every=True), True),
    "fin-chunks": (lambda: Flip(TO_RX, "Fin", 8, every=True), True),
}


@trio_only
@pytest.mark.parametrize("case", list(FLIPS))
async def test_one_flipped_bit_is_detected(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A receiver whose FIN was spoiled waits out its linger before it may exit; shortening it
    # keeps that case fast without changing what it ends with.
    monkeypatch.setattr("viamillipede.receiver.LINGER", 1.0)
    make, recover = FLIPS[case]
    tamper = make()
    data = payload()
    run = await through_mitm(data, tamper)

    assert tamper.hits, f"the session never sent the frame {case} aims at"
    found = problems(run, recover=recover)
    assert not found, f"{case}: " + "\n".join(found)


# -- 2. a recorded connection replayed ---------------------------------------------------------

HELD = 4  # chunks through before the source pauses


def first_link(mitm: Mitm, kind: AuthKind) -> Link:
    """The first connection whose handshake was of ``kind``."""
    return next(link for link in mitm.links
                if any(isinstance(f.event, Auth) and f.event.kind == kind
                       for f in link.sent(TO_RX, "Auth")))


def answered_with(answers: list[tuple[Event | None, bytes]], kind: type) -> list[Event]:
    return [e for e, _ in answers if isinstance(e, kind)]


REPLAYS = ["key-exchange-after-data", "key-exchange-before-data", "join"]


@trio_only
@pytest.mark.parametrize("which", REPLAYS)
async def test_a_recorded_connection_replayed_to_the_receiver_is_refused(which: str) -> None:
    """Everything the transmitter sent on one connection so far (HELLO, both AUTHs and, after
    data, chunks) is sent again, in one go, on a new connection while the session is live."""
    data = payload()
    before_data = which == "key-exchange-before-data"
    source = GatedSource(data, 0 if before_data else HELD * CHUNK)
    sink = WatchedSink()
    seen: dict[str, Any] = {}

    async def replay(mitm: Mitm, served: ServedReceiver) -> None:
        if before_data:  # both connections keyed, no chunk sent yet
            await mitm.wait_until(lambda: len(mitm.sent(TO_TX, "Welcome")) >= 2)
        else:
            await sink.wait_for(HELD * CHUNK)
        link = first_link(mitm, AuthKind.JOIN if which == "join" else AuthKind.PAKE)
        recording = bytes(link.received[TO_RX])
        seen["answers"], seen["closed"] = await replay_to_receiver(served.port, recording, 5.0)
        seen["their nonce"] = next(f.event.nonce for f in link.sent(TO_TX, "Auth")
                                   if isinstance(f.event, Auth))
        source.release()

    run = await through_mitm(data, source=source, sink=sink, during=replay)

    answers, closed = seen["answers"], seen["closed"]
    found = problems(run, recover=True)
    if answered_with(answers, Ack) or answered_with(answers, ByeOk):
        found.append(f"the replay's chunks or frames were acknowledged: {answers}")
    welcomes = answered_with(answers, Welcome)
    if any(w.status == WelcomeStatus.ACCEPTED for w in welcomes):
        found.append(f"the replay was welcomed: {answers}")
    if not closed:
        found.append("the receiver kept the replayed connection open")
    challenges = answered_with(answers, Auth)
    if which == "key-exchange-after-data":
        # A key exchange once chunks have arrived is refused before anything is computed.
        if [e for e, _ in answers] != [Welcome(WelcomeStatus.WRONG_SESSION, bytes(16), 0)]:
            found.append(f"expected only an untagged WRONG_SESSION, got {answers}")
    else:
        # Challenged with a fresh nonce, the recorded proof proves nothing.
        if len(challenges) != 1 or challenges[0].nonce == seen["their nonce"]:
            found.append(f"expected one challenge with a fresh nonce, got {answers}")
        if before_data:
            refusal = encode(Welcome(WelcomeStatus.BAD_CHECKPHRASE, bytes(16), 0))
            if [raw for e, raw in answers if e is None] != [refusal]:
                found.append(f"expected the failed proof's untagged refusal, got {answers}")
    if run.tx.ok and run.tx.result is not None and run.tx.result.reconnects:
        found.append(f"the real connections were disturbed: {run.tx.result.reconnects} "
                     "reconnects")
    assert not found, "\n".join(found)


@trio_only
async def test_a_recorded_receiver_replayed_to_the_transmitter_is_refused() -> None:
    """What the receiver said on a join (its challenge, WELCOME, ACKs) is played back to the
    transmitter when that connection comes back: the transmitter must check the receiver's
    proof before it proves anything or sends a chunk."""
    data = payload()
    source = GatedSource(data, HELD * CHUNK)
    sink = WatchedSink()

    async def impersonate(mitm: Mitm, served: ServedReceiver) -> None:
        await sink.wait_for(HELD * CHUNK)
        link = first_link(mitm, AuthKind.JOIN)
        mitm.impersonate_next(bytes(link.received[TO_TX]))
        link.scope.cancel()  # the transmitter reconnects that slot, to the recording
        await mitm.wait_until(lambda: any(x.impersonated and x.ended for x in mitm.links))
        source.release()

    run = await through_mitm(data, source=source, sink=sink, during=impersonate)

    found = problems(run, recover=True)
    fake = next(link for link in run.mitm.links if link.impersonated)
    said = [f.event for f in fake.frames if f.direction == TO_RX]
    opening = [type(e).__name__ for e in said]
    if opening != ["Hello", "Auth"] or not JOIN_OPEN(said[1]):
        found.append(f"to a replayed receiver the transmitter said {said}; only its HELLO and "
                     "the join's opening AUTH may go before the receiver's proof checks out")
    assert not found, "\n".join(found)


# -- 3. injected, reordered and duplicated frames ----------------------------------------------


def data_frame(seq: int, sealed: bytes) -> bytes:
    """A DATA frame with ``seq`` in its header around another frame's sealed payload."""
    header = bytearray(DATA_HEADER_SIZE)
    pack_data_header(header, seq, len(sealed), 0)
    return bytes(header) + sealed


def payload_of(frame: Frame) -> bytes:
    return frame.raw[DATA_HEADER_SIZE:]


class Meddler:
    """Base of the frame games below: ``done`` lists what was actually done, so a test can
    tell a game that never found its moment from one that changed nothing."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        return [frame.raw]


class DuplicateData(Meddler):
    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if seq_is(5)(frame.event) and not self.done:
            self.done.append("chunk 5 sent twice")
            return [frame.raw, frame.raw]
        return [frame.raw]


class Swap(Meddler):
    """Holds back the first frame ``first`` accepts until the next frame of the same kind on
    the same connection, and sends that one first."""

    def __init__(self, direction: str, kind: str, first: Callable[[Frame], bool]) -> None:
        super().__init__()
        self.direction, self.kind, self.first = direction, kind, first
        self.held: Frame | None = None

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if frame.direction != self.direction or frame.kind != self.kind or self.done:
            return [frame.raw]
        if self.held is None and self.first(frame):
            self.held = frame
            return []
        if self.held is not None and frame.link is self.held.link:
            self.done.append(f"{self.held.event} after {frame.event}")
            return [frame.raw, self.held.raw]
        return [frame.raw]


class MovedData(Meddler):
    """Chunk ``source``'s sealed payload under ``seq``'s header, sent right after chunk
    ``source``, or in place of chunk ``seq`` with ``replace``."""

    def __init__(self, source: int, seq: int, *, replace: bool = False) -> None:
        super().__init__()
        self.source, self.seq, self.replace = source, seq, replace
        self.sealed: bytes | None = None

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if not isinstance(frame.event, Data) or self.done:
            return [frame.raw]
        if frame.event.seq == self.source and self.sealed is None:
            self.sealed = payload_of(frame)
            if not self.replace:
                self.done.append(f"chunk {self.source} injected as chunk {self.seq}")
                return [frame.raw, data_frame(self.seq, self.sealed)]
        if self.replace and frame.event.seq == self.seq and self.sealed is not None:
            self.done.append(f"chunk {self.seq} replaced by chunk {self.source}")
            return [data_frame(self.seq, self.sealed)]
        return [frame.raw]


class Inject(Meddler):
    """Sends ``frames`` right after the ``after``-th frame ``where`` accepts."""

    def __init__(self, frames: Callable[[Frame], list[bytes]], where: Callable[[Frame], bool],
                 after: int = 0) -> None:
        super().__init__()
        self.frames, self.where, self.after = frames, where, after
        self.seen = 0

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if self.done or not self.where(frame):
            return [frame.raw]
        self.seen += 1
        if self.seen <= self.after:
            return [frame.raw]
        extra = self.frames(frame)
        if not extra:
            return [frame.raw]
        self.done.append(f"{len(extra)} frames injected after {frame.event}")
        return [frame.raw, *extra]


def is_ack(frame: Frame) -> bool:
    return frame.direction == TO_TX and frame.kind == "Ack"


def tagged_from_another_connection() -> Inject:
    """The latest tagged frame of another connection (an ACK, else its WELCOME), tag and
    all, copied in behind an ACK."""
    last: dict[int, Frame] = {}

    def other(frame: Frame) -> list[bytes]:
        found = [f for index, f in last.items() if index != frame.link.index]
        found.sort(key=lambda f: f.kind != "Ack")
        return [found[0].raw] if found else []

    def remember(frame: Frame) -> bool:
        if frame.direction == TO_TX and frame.kind in ("Ack", "Welcome"):
            last[frame.link.index] = frame
        return is_ack(frame)

    return Inject(other, remember)


@dataclass
class Earlier:
    """Frames recorded from an earlier session with the same phrase."""

    data: dict[int, bytes]  # sealed payloads by seq
    bye_ok: bytes
    ack: bytes


async def earlier_session() -> Earlier:
    run = await through_mitm(payload(6 * CHUNK), threads=1)
    assert run.tx.ok and run.out == run.data, run.tx.describe()
    data = {f.event.seq: payload_of(f) for f in run.mitm.sent(TO_RX, "Data")
            if isinstance(f.event, Data)}
    return Earlier(data, run.mitm.sent(TO_TX, "ByeOk")[0].raw, run.mitm.sent(TO_TX, "Ack")[0].raw)


INJECTIONS: dict[str, tuple[Callable[[Earlier], Meddler], int]] = {
    # name: (the game, given an earlier session's frames; connections).  The source pauses
    # after two chunks until both connections are welcomed, so games that need both have
    # frames of both to play with.
    "duplicate-data": (lambda _: DuplicateData(), 2),
    "swap-data": (lambda _: Swap(TO_RX, "Data", lambda f: seq_is(2)(f.event)), 1),
    "data-moved-forward": (lambda _: MovedData(3, 4), 2),
    "data-moved-onto-written": (lambda _: MovedData(6, 0), 2),
    "data-in-place-of-another": (lambda _: MovedData(5, 6, replace=True), 2),
    "data-from-earlier-session": (lambda old: Inject(
        lambda f: [data_frame(4, old.data[4])], lambda f: seq_is(3)(f.event)), 2),
    "duplicate-ack": (lambda _: Inject(lambda f: [f.raw], is_ack, after=2), 2),
    "swap-acks": (lambda _: Swap(TO_TX, "Ack", lambda f: f.nth == 2), 1),
    "tagged-frame-from-another-connection": (lambda _: tagged_from_another_connection(), 2),
    "ack-from-earlier-session": (lambda old: Inject(lambda f: [old.ack], is_ack, after=1), 2),
    "bye-ok-from-earlier-session": (lambda old: Inject(lambda f: [old.bye_ok], is_ack,
                                                       after=3), 2),
    "duplicate-bye": (lambda _: Inject(lambda f: [f.raw], lambda f: f.kind == "Bye"), 2),
}


@trio_only
@pytest.mark.parametrize("case", list(INJECTIONS))
async def test_injected_reordered_or_duplicated_frames_change_nothing(case: str) -> None:
    make, threads = INJECTIONS[case]
    old = await earlier_session() if "earlier" in case else Earlier({}, b"", b"")
    meddler = make(old)
    data = payload()
    source = GatedSource(data, 2 * CHUNK)

    async def both_connections_up(mitm: Mitm, served: ServedReceiver) -> None:
        await mitm.wait_until(lambda: len(mitm.sent(TO_TX, "Welcome")) >= threads)
        source.release()

    run = await through_mitm(data, meddler, threads=threads, source=source,
                             during=both_connections_up)

    assert meddler.done, f"{case}: the moment to meddle never came"
    found = problems(run, recover=True)
    assert not found, f"{case} ({'; '.join(meddler.done)}):\n" + "\n".join(found)


# -- 4. connections cut after a number of bytes ------------------------------------------------

HANDSHAKE_TO_RX = 41 + 99 + 99  # HELLO and two AUTHs
HANDSHAKE_TO_TX = 99 + 26 + 16  # AUTH and a tagged WELCOME

CUTS: dict[str, tuple[str, int, bool, bool]] = {
    # name: (direction, bytes passed on before the cut, every connection or the first only,
    # recovery promised)
    "every-in-hello": (TO_RX, 30, True, False),
    "every-in-the-proof": (TO_RX, HANDSHAKE_TO_RX - 40, True, False),
    "every-in-the-first-chunk": (TO_RX, HANDSHAKE_TO_RX + 5000, True, False),
    "every-after-three-chunks": (TO_RX, HANDSHAKE_TO_RX + 3 * (CHUNK + 33) + 7, True, False),
    "every-in-the-challenge": (TO_TX, 60, True, False),
    "every-after-a-few-acks": (TO_TX, HANDSHAKE_TO_TX + 4 * 33 + 3, True, False),
    "first-in-the-second-chunk": (TO_RX, HANDSHAKE_TO_RX + CHUNK + 1000, False, True),
    "first-in-the-welcome": (TO_TX, 99 + 10, False, True),
    "first-in-an-ack": (TO_TX, HANDSHAKE_TO_TX + 2 * 33 + 20, False, True),
}


@trio_only
@pytest.mark.parametrize("case", list(CUTS))
async def test_cut_connections_never_yield_success_on_a_short_output(case: str) -> None:
    direction, after, every, recover = CUTS[case]
    cut: list[int] = []

    def budget(link: Link) -> None:
        if every or link.index == 0:
            link.budget[direction] = after
            cut.append(link.index)

    data = payload()
    # A session that can never progress fails by its idle timeout: kept short here.
    run = await through_mitm(data, on_link=budget, idle=IDLE if recover else 2.0)

    assert cut, "no connection was cut"
    found = problems(run, recover=recover)
    assert not found, f"{case}: " + "\n".join(found)


class CutAt(Meddler):
    """Drops the first frame ``where`` accepts (or every one) and hangs up on both ends
    instead."""

    def __init__(self, where: Callable[[Frame], bool], *, every: bool = False) -> None:
        super().__init__()
        self.where = where
        self.every = every

    def __call__(self, frame: Frame) -> Sequence[bytes]:
        if not self.where(frame) or (self.done and not self.every):
            return [frame.raw]
        self.done.append(f"cut instead of {frame.event}")
        frame.link.cut()
        return []


@trio_only
@pytest.mark.parametrize("frame_kind", ["Bye", "ByeOk"])
async def test_a_cut_at_the_end_of_the_session_recovers(frame_kind: str) -> None:
    """The BYE, or every BYE_OK (one goes out on each connection), is lost with its
    connection: the transmitter must come back for the end of the session (a BYE again, or a
    tagged SESSION_OVER)."""
    meddler = CutAt(lambda f: f.kind == frame_kind, every=frame_kind == "ByeOk")
    data = payload()
    run = await through_mitm(data, meddler)

    assert meddler.done, f"no {frame_kind} was sent"
    found = problems(run, recover=True)
    assert not found, "\n".join(found)


@trio_only
async def test_a_path_that_damages_every_chunk_ends_the_session_loudly() -> None:
    """Each chunk that fails to open drops its connection and comes again; when they keep
    failing, someone is tampering: the receiver ends the session saying so, before either
    end's idle timeout would have."""
    flip = Flip(TO_RX, "Data", DATA_HEADER_SIZE + 5, every=True)
    data = payload()
    run = await through_mitm(data, flip, threads=8, idle=60.0)

    assert len(flip.hits) >= MAX_TAMPERED
    assert run.out == b""
    assert isinstance(run.rx.error, ProtocolViolation), run.rx.describe()
    assert "failed to verify" in str(run.rx.error) and "tampering" in str(run.rx.error)
    assert not run.tx.ok, run.tx.describe()  # failed, or stopped once the receiver had
    found = problems(run, recover=False)
    assert not found, "\n".join(found)


def test_failures_to_verify_are_forgiven_over_time() -> None:
    """The limit is on a burst: 15 failures, then 15 more a few minutes later, do not end an
    hours-long session; 16 in a row do."""

    async def main() -> None:
        receiver = Receiver(BufferSink())
        for _ in range(MAX_TAMPERED - 1):
            receiver.tampered("a chunk failed to verify")
        clock.jump((MAX_TAMPERED - 1) * TAMPER_FORGIVE_S)
        for _ in range(MAX_TAMPERED - 1):
            receiver.tampered("a chunk failed to verify")
        with pytest.raises(ProtocolViolation, match=f"^{2 * MAX_TAMPERED - 1} frames failed"):
            receiver.tampered("a chunk failed to verify")

    clock = trio.testing.MockClock()
    trio.run(main, clock=clock)


# -- 5. what an eavesdropper sees --------------------------------------------------------------

WINDOW = 32


def shared_run(data: bytes, wire: bytes, size: int = WINDOW) -> int | None:
    """An offset in ``wire`` where ``size`` bytes of ``data`` appear, or None.

    Any such run holds one of the half-size blocks of ``data`` that start at a multiple of the
    half size, so only those are looked up, then grown both ways.
    """
    half = size // 2
    blocks = {data[i : i + half]: i for i in range(0, len(data) - half + 1, half)}
    for j in range(len(wire) - half + 1):
        i = blocks.get(wire[j : j + half])
        if i is None:
            continue
        left = 0
        while left < min(i, j) and data[i - left - 1] == wire[j - left - 1]:
            left += 1
        right = 0
        while (i + half + right < len(data) and j + half + right < len(wire)
               and data[i + half + right] == wire[j + half + right]):
            right += 1
        if left + half + right >= size:
            return j - left
    return None


@trio_only
@pytest.mark.parametrize("mode", ["sealed", "plaintext"])
async def test_the_wire_carries_no_window_of_the_payload(mode: str) -> None:
    """Plaintext is the control: there the same search must find the payload, or it would
    prove nothing about the sealed session."""
    plaintext = mode == "plaintext"
    data = payload(1024 * KiB)
    options = {"plaintext": plaintext}
    run = await through_mitm(data, tx_options=options, rx_options=options)

    found = problems(run, recover=True)
    assert not found, "\n".join(found)
    wire = b"".join(bytes(side) for link in run.mitm.links for side in link.received.values())
    assert len(wire) > len(data)
    assert all(link.received == link.forwarded for link in run.mitm.links)
    leak = shared_run(data, wire)
    if plaintext:
        assert leak is not None, "the search did not find the payload sent in clear"
    else:
        assert leak is None, (f"{WINDOW} bytes of the payload crossed the wire in clear, at "
                              f"byte {leak} of the capture")


# -- 6. wrong checkphrase or key ---------------------------------------------------------------

KEY_A = os.urandom(32)
KEY_B = os.urandom(32)

CREDENTIALS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (transmitter's, receiver's)
    "public-vs-secret-phrase": ({}, {"checkphrase": "correct horse battery"}),
    "two-secret-phrases": ({"checkphrase": "wrong horse battery"},
                           {"checkphrase": "correct horse battery"}),
    "two-keys": ({"key": KEY_A}, {"key": KEY_B}),
    "key-vs-phrase": ({"key": KEY_A}, {"checkphrase": "correct horse battery"}),
}


@pytest.mark.parametrize("case", list(CREDENTIALS))
async def test_wrong_credentials_are_rejected_before_anything_is_sent(case: str) -> None:
    tx_options, rx_options = CREDENTIALS[case]
    run = await through_mitm(payload(), tx_options=tx_options, rx_options=rx_options)

    found = problems(run, recover=False)
    error = run.tx.error
    if not isinstance(error, PeerRejected) or error.exit_code != ExitCode.PEER_REJECTED:
        found.append(f"the transmitter {run.tx.describe()}; it must raise PeerRejected "
                     "(exit code 3)")
    if run.out:
        found.append(f"the receiver wrote {len(run.out)} bytes")
    if run.rx.ok:
        found.append("the receiver reported success")
    # The transmitter checks the receiver's proof before it proves anything itself.
    auths = run.mitm.sent(TO_RX, "Auth")
    if not auths or any(PAKE_PROOF(f.event) or JOIN_OPEN(f.event) for f in auths):
        found.append(f"the transmitter sent {[f.event for f in auths]}: a proof, or a join, "
                     "to a receiver that could not prove it holds the same phrase")
    if run.mitm.sent(TO_RX, "Data"):
        found.append("chunks crossed the wire")
    assert not found, f"{case}: " + "\n".join(found)


CLI_CREDENTIALS: dict[str, tuple[list[str], list[str]]] = {
    "phrase": (["checkphrase", "wrong horse battery"], ["checkphrase", "correct horse battery"]),
    "key-file": (["key", "a.key"], ["key", "b.key"]),
}


@pytest.mark.parametrize("case", list(CLI_CREDENTIALS))
def test_the_command_line_exits_3_on_wrong_credentials(case: str, procs: Procs) -> None:
    for name in ("a.key", "b.key"):
        procs.start(f"keygen-{name}", ["keygen", str(procs.dir / name)]).finish(0)
    tx_words, rx_words = CLI_CREDENTIALS[case]

    def resolve(words: list[str]) -> list[str]:
        return [str(procs.dir / w) if w.endswith(".key") else w for w in words]

    port = free_port()
    rx = procs.rx(port, "--listen", HOST, *resolve(rx_words), "timeout", "20")
    source = bytes_file(procs.dir / "in", payload())
    tx = procs.tx(port, *resolve(tx_words), "threads", "2", "timeout", "20",
                  stdin=Path(source.path))
    err = tx.finish(int(ExitCode.PEER_REJECTED), timeout=30)

    assert "checkphrase or key" in err, err
    assert rx.running(), f"one failed key exchange ended the receiver:\n{rx.stderr}"
    assert rx.out_size() == 0, f"the receiver wrote {rx.out_size()} bytes"
