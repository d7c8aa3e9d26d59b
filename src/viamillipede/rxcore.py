"""The receiving end's session logic, without I/O.

Everything a transmitter (or anyone who reaches the port) can send is judged here, against the
state the session is in: who may join, which DATA frame earns a buffer, what is a duplicate, when
a BYE is believable and when the session has succeeded.  The async driver in ``receiver.py``
reads frames, moves payload bytes and runs the sink; it asks this core what each frame means and
does what it answers.  Kept pure (no async, no clock of its own) so that a state-machine test can
throw any frame at any moment at it, as a hostile peer would.

Why the receiver cannot be bloated: a chunk buffer is handed out only for a DATA frame whose
sequence is inside the window and not already held, so buffers in use never exceed the window
plus a few re-sends arriving while the first copy is still on its way
(:data:`EXTRA_BUFFERS`), however many connections announce chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from .checksums import ALGORITHMS
from .errors import ProtocolViolation, TruncatedStream
from .options import MAX_THREADS
from .window import Offer, ReorderBuffer
from .wire import (
    PROTOCOL_VERSION,
    WELCOME_MEANING,
    AuthKind,
    Bye,
    ByeOk,
    Feature,
    Hello,
    Mode,
    RemoteProtocolError,
    Welcome,
    WelcomeStatus,
)
from .wire.secure import SEAL_OVERHEAD, SessionKeys

T = TypeVar("T")

#: Buffers beyond the window, for chunks arriving again while their first copy is still being
#: received (a re-send after a stall): they neither crowd out the chunks that follow nor wait
#: for a first copy stuck on a dead link.  Copies beyond the bound are read into scratch and
#: dropped.
EXTRA_BUFFERS = 4

#: The most connections one session may have (connection numbers 0 .. MAX_CONNECTIONS-1).
MAX_CONNECTIONS = MAX_THREADS

#: Largest window (in chunks) a receiver agrees to.
MAX_WINDOW = 4096

_NO_SESSION = bytes(16)


class RxState(Enum):
    """Where a receiver's session is; what a frame means depends on it."""

    LISTENING = "listening"  # no transmitter has bound the session yet
    RECEIVING = "receiving"  # chunks arrive and are written in order
    ENDING = "ending"  # a believable BYE arrived: the last chunks are being written
    SUCCEEDED = "succeeded"  # everything written and flushed, BYE_OK sent
    FAILED = "failed"


class Claim(Enum):
    """What to do with the payload of an accepted DATA header."""

    RECEIVE = "receive"  # read it into a buffer: a chunk we need
    DISCARD_ACK = "discard-ack"  # we have it already: read it, drop it, acknowledge it again
    DISCARD = "discard"  # a copy is on its way and no buffer is spare: drop it unacknowledged


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to a HELLO: the WELCOME to send and what the connection becomes."""

    welcome: Welcome
    reason: str  # why it was refused, "" if accepted

    @property
    def accepted(self) -> bool:
        return self.welcome.status == WelcomeStatus.ACCEPTED

    @property
    def session_over(self) -> bool:
        """Our own transmitter reconnected after the session completed (it lost BYE_OK)."""
        return self.welcome.status == WelcomeStatus.SESSION_OVER


@dataclass(frozen=True, slots=True)
class Params:
    """What the binding HELLO announced; every later connection must announce the same."""

    session_id: bytes
    chunk_size: int
    window: int
    features: int

    @property
    def checksum(self) -> int:
        return self.features & Feature.CHECKSUM_MASK

    @property
    def compression(self) -> int:
        return self.features & Feature.COMPRESSION_MASK


class ReceiverCore(Generic[T]):
    """One session's receiving state.  ``T`` is whatever the driver files with a chunk."""

    def __init__(self, *, max_chunk_size: int, max_buffer: int, plaintext: bool = False) -> None:
        self.plaintext = plaintext
        self.keys: SessionKeys | None = None
        self._data_seen = False  # a DATA header was judged: the keys can no longer change
        self._max_chunk_size = max_chunk_size
        self._max_buffer = max_buffer
        self.state = RxState.LISTENING
        self.params: Params | None = None
        self.reorder: ReorderBuffer[T] = ReorderBuffer(1)
        self._receiving: dict[int, int] = {}  # seq -> copies being received into buffers
        self.buffers = 0  # chunk buffers handed out and not yet given back
        self.peak_buffers = 0
        self.nbytes = 0  # bytes written to the sink
        self._bye: Bye | None = None
        self._direct = -1  # the chunk on its way from a socket straight to the sink
        self.partial = 0  # bytes of chunk ``reorder.written`` in the sink already

    # -- admission -----------------------------------------------------------------------

    def admit(self, hello: Hello, kind: int) -> Admission | None:
        """Judge a HELLO and the kind of handshake its AUTH asks for.  None: go on and
        authenticate (a key exchange, or a join with the session's keys); else the refusal
        to send.  A refusal tells the client neither the session id nor the progress."""
        refusal = self.screen(hello)
        if refusal is not None:
            return refusal
        params = self.params
        if params is not None and hello.session_id != params.session_id:
            return self._refuse(WelcomeStatus.WRONG_SESSION)
        if self.state is RxState.FAILED:
            return self._refuse(WelcomeStatus.SESSION_FAILED)
        if self.state is RxState.SUCCEEDED and kind == AuthKind.JOIN:
            return None  # its transmitter, back for the BYE_OK it lost: parameters moot
        if not self._acceptable(hello):
            return self._refuse(WelcomeStatus.BAD_PARAMETERS)
        if kind == AuthKind.PAKE:
            # The session's first connection, or its transmitter again because the first
            # WELCOME was lost: keys may be agreed anew only while no DATA has come.
            if params is None or (self.state is RxState.RECEIVING and not self._data_seen):
                return None
        elif kind == AuthKind.JOIN and self.keys is not None:
            return None
        return self._refuse(WelcomeStatus.WRONG_SESSION)

    def screen(self, hello: Hello) -> Admission | None:
        """What a HELLO settles on its own, so it is answered before any AUTH is awaited: a
        version-1 transmitter sends none and would otherwise wait out the handshake timeout
        instead of hearing "protocol version".  Mode bits this version does not know are
        refused rather than ignored, so a later meaning cannot be silently dropped."""
        if hello.version != PROTOCOL_VERSION:
            return self._refuse(WelcomeStatus.BAD_VERSION)
        if hello.mode & ~Mode.PLAINTEXT:
            return self._refuse(WelcomeStatus.BAD_PARAMETERS)
        if bool(hello.mode & Mode.PLAINTEXT) != self.plaintext:
            return self._refuse(WelcomeStatus.BAD_MODE)
        return None

    def authenticated(self, hello: Hello, keys: SessionKeys) -> Welcome:
        """The connection proved itself with ``keys``: the WELCOME it gets.  A key exchange
        binds the session (or re-keys it while no DATA has come)."""
        if self.keys is not keys:
            if self.params is None:
                self._bind(hello)
            self.keys = keys
        if self.state is RxState.SUCCEEDED:
            return Welcome(int(WelcomeStatus.SESSION_OVER), hello.session_id,
                           self.reorder.written)
        if self.state is RxState.FAILED:
            return Welcome(int(WelcomeStatus.SESSION_FAILED), hello.session_id, 0)
        return Welcome(int(WelcomeStatus.ACCEPTED), hello.session_id, self.reorder.written)

    @property
    def overhead(self) -> int:
        """Bytes a sealed chunk carries beyond its plaintext."""
        return 0 if self.plaintext else SEAL_OVERHEAD

    def _refuse(self, status: WelcomeStatus) -> Admission:
        return Admission(Welcome(int(status), _NO_SESSION, 0), WELCOME_MEANING[status])

    def _acceptable(self, hello: Hello) -> bool:
        if not 0 <= hello.conn_index < MAX_CONNECTIONS:
            return False
        if self.params is not None:
            return (hello.chunk_size, hello.window, hello.features) == (
                self.params.chunk_size, self.params.window, self.params.features)
        checksum = hello.features & Feature.CHECKSUM_MASK
        compression = hello.features & Feature.COMPRESSION_MASK
        return (
            1 <= hello.chunk_size <= self._max_chunk_size
            and 1 <= hello.window <= MAX_WINDOW
            and hello.chunk_size * hello.window <= self._max_buffer
            and (not checksum or checksum in ALGORITHMS)
            and compression in (0, Feature.COMPRESSION_ZSTD)
            and not hello.features & ~(Feature.CHECKSUM_MASK | Feature.COMPRESSION_MASK)
        )

    def _bind(self, hello: Hello) -> None:
        self.params = Params(hello.session_id, hello.chunk_size, hello.window, hello.features)
        self.reorder = ReorderBuffer(hello.window)
        self.state = RxState.RECEIVING

    @property
    def max_buffers(self) -> int:
        """The most chunk buffers this session can ever hold at once."""
        return self.params.window + EXTRA_BUFFERS if self.params else 0

    # -- data ----------------------------------------------------------------------------

    def data(self, seq: int, length: int, compressed: bool = False) -> Claim:
        """Judge a DATA header; raises RemoteProtocolError for one no transmitter sends."""
        params = self.params
        if params is None or self.state is RxState.LISTENING:  # pragma: no cover - no HELLO
            raise RemoteProtocolError("DATA before the session was bound")
        if compressed and not params.compression:
            raise RemoteProtocolError(
                f"chunk {seq} is compressed, but the session did not announce compression")
        self._data_seen = True
        overhead = self.overhead
        if not 1 + overhead <= length <= params.chunk_size + overhead:
            raise RemoteProtocolError(
                f"chunk {seq} is {length} bytes; the session's chunks are {1 + overhead} to "
                f"{params.chunk_size + overhead}")
        written = self.reorder.written
        if seq >= written + params.window:
            raise RemoteProtocolError(
                f"chunk {seq} is beyond the window ({written} + {params.window})")
        if self._bye is not None and seq >= self._bye.chunks:
            raise RemoteProtocolError(
                f"chunk {seq} is past the end the transmitter announced ({self._bye.chunks})")
        if seq == self._direct:
            return Claim.DISCARD  # acknowledged once the copy on its way to the sink is out
        if seq < written or self.reorder.holds(seq):
            return Claim.DISCARD_ACK
        # First copies fit in the window and copies of a chunk whose first copy is still on
        # its way (a re-send after a stall) in the reserve, at most EXTRA_BUFFERS of them at
        # once: so the re-send of the chunk everything waits for gets a buffer even when the
        # window is full because its first copy is stuck on a dead link.  Past the hard bound
        # even a first copy is dropped, unacknowledged, and comes again once its connection
        # is found stalled.
        if self.buffers >= self.max_buffers or (
                seq in self._receiving and self._second_copies() >= EXTRA_BUFFERS):
            return Claim.DISCARD
        self._receiving[seq] = self._receiving.get(seq, 0) + 1
        self.buffers += 1
        self.peak_buffers = max(self.peak_buffers, self.buffers)
        return Claim.RECEIVE

    def _second_copies(self) -> int:
        return sum(copies - 1 for copies in self._receiving.values())

    def received(self, seq: int, item: T) -> Claim:
        """A claimed chunk arrived whole.  RECEIVE: it is filed.  DISCARD_ACK: another copy
        was here first; give the buffer back, acknowledge it.  DISCARD: another copy is on
        its way to the sink right now; give the buffer back and do not acknowledge, for if
        that copy fails the transmitter must still hold the chunk."""
        self._unclaim(seq)
        if seq == self._direct or (self._bye is not None and seq >= self._bye.chunks):
            self.buffers -= 1
            return Claim.DISCARD
        verdict = self.reorder.offer(seq, item)
        if verdict is Offer.ACCEPTED:
            return Claim.RECEIVE
        self.buffers -= 1
        return Claim.DISCARD_ACK

    def abandoned(self, seq: int) -> None:
        """A claimed chunk will not arrive (its connection broke or its checksum failed)."""
        self._unclaim(seq)
        self.buffers -= 1

    def _unclaim(self, seq: int) -> None:
        left = self._receiving.pop(seq) - 1
        if left:
            self._receiving[seq] = left

    def take_turn(self, seq: int) -> bool:
        """Chunk ``seq`` (claimed) is next: may it go from its socket straight to the sink?
        If so its claim gives back the buffer it no longer needs, and other copies that
        arrive meanwhile are dropped unacknowledged (if this one fails, they are re-sent)."""
        if seq != self.reorder.written or self.reorder.ready() is not None:
            return False
        if self._bye is not None and seq >= self._bye.chunks:
            return False  # past the end: it lands in a buffer, to be dropped
        self.abandoned(seq)
        self._direct = seq
        return True

    def turn_over(self) -> None:
        self._direct = -1

    def written(self, length: int, *, buffered: bool) -> int:
        """The next chunk is on the sink; returns its sequence number."""
        seq = self.reorder.written
        self.partial = 0
        if buffered:
            self.reorder.advance()
            self.buffers -= 1
        else:
            self.reorder.skip()
        self.nbytes += length
        return seq

    # -- the end -------------------------------------------------------------------------

    def bye(self, bye: Bye) -> None:
        """A BYE arrived: believe it only if it asks for no less than what is written and
        nothing is missing below it.  Raises TruncatedStream otherwise (the session fails)."""
        if self.state is RxState.SUCCEEDED:
            return  # sent again after its connection broke: answered the same
        if self.state is not RxState.RECEIVING and self.state is not RxState.ENDING:
            raise RemoteProtocolError(f"BYE while the session is {self.state.value}")
        if self._bye is not None and self._bye != bye:
            raise RemoteProtocolError(f"a second BYE with other totals ({bye} after {self._bye})")
        written = self.reorder.written
        if bye.chunks < written:
            raise TruncatedStream(
                f"the transmitter ended the stream at {bye.chunks} chunks but {written} are "
                "written already")
        if bye.chunks > written + (self.params.window if self.params else 0):
            raise TruncatedStream(
                f"the transmitter ended the stream at {bye.chunks} chunks, beyond the window "
                f"({written} written); output is incomplete")
        if (self.reorder.holds_from(bye.chunks) or self._direct >= bye.chunks
                or (self.partial and written >= bye.chunks)):
            raise TruncatedStream(
                f"the transmitter ended the stream at {bye.chunks} chunks but chunks beyond "
                "that arrived; the stream cannot be trusted")
        missing = self.reorder.missing(bye.chunks)
        if missing:
            raise TruncatedStream(
                f"the transmitter ended the stream at {bye.chunks} chunks but {len(missing)} "
                "of them never arrived; output is incomplete")
        self._bye = bye
        self.state = RxState.ENDING

    def bye_answer(self) -> ByeOk | None:
        """Once every chunk the BYE announced is written: the BYE_OK (after checking the
        byte total), else None.  The driver flushes the sink, then calls :meth:`succeed`."""
        bye = self._bye
        if bye is None or self.reorder.written < bye.chunks:
            return None
        if self.nbytes != bye.nbytes:
            raise TruncatedStream(f"wrote {self.nbytes} bytes, the transmitter sent {bye.nbytes}")
        return ByeOk(bye.chunks, bye.nbytes)

    def succeed(self) -> bool:
        """The sink is flushed after a believed BYE; True the first time only."""
        if self.state is not RxState.ENDING:
            return False
        self.state = RxState.SUCCEEDED
        return True

    # -- a chunk cut short on its way to the sink ----------------------------------------

    def resume(self, seq: int, length: int) -> int:
        """How many leading bytes of chunk ``seq`` (arriving again, ``length`` bytes) are in
        the sink already, from a direct write that broke off.  A copy shorter than that
        cannot be the same chunk: the output is damaged, the session must fail."""
        if seq != self.reorder.written or not self.partial:
            return 0
        if length < self.partial:
            raise ProtocolViolation(
                f"chunk {seq} came again shorter ({length} bytes) than the {self.partial} "
                "bytes already written of it")
        return self.partial

    def fail(self) -> None:
        if self.state is not RxState.SUCCEEDED:
            self.state = RxState.FAILED


class AuthThrottle:
    """Failed authentications are answered slowly.

    A token bucket over all connections: a few mistakes are answered at once (a user who
    mistyped the phrase learns it promptly), after that one answer per ``1/rate`` seconds, so
    the WELCOME cannot serve as a fast guessing oracle however many connections are opened.
    """

    def __init__(self, *, rate: float = 2.0, burst: float = 3.0) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = -math.inf
        self.failures = 0

    def failure(self, now: float) -> float:
        """Count a failure; return when (clock time) it may be answered."""
        self.failures += 1
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        self._tokens -= 1
        if self._tokens >= 0:
            return now
        return now - self._tokens / self._rate
