"""Typed protocol events.

Frozen so that an event seen by one task cannot be changed under another; slotted because the
receiver builds one per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens a connection: who we are (session), what we speak, and the limits we will keep."""

    mode: int
    session_id: bytes
    conn_index: int
    chunk_size: int
    window: int
    features: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """The receiver's answer to HELLO.

    ``written`` tells a (re)connecting transmitter how many chunks are already on the sink, so
    that chunks it still holds for those sequences can be dropped at once.
    """

    status: int
    session_id: bytes
    written: int


@dataclass(frozen=True, slots=True)
class Auth:
    """A step of the handshake after HELLO: the transmitter's nonce and key exchange message,
    the receiver's with its proof, then the transmitter's proof (fields not used are zero)."""

    kind: int
    nonce: bytes = bytes(32)
    pake: bytes = bytes(33)
    proof: bytes = bytes(32)


@dataclass(frozen=True, slots=True)
class DataHeader:
    """The fixed part of a DATA frame; produced only by a decoder in streaming mode, where the
    caller moves the payload itself (e.g. ``recv_into`` straight into a chunk buffer)."""

    seq: int
    length: int
    checksum: int
    compressed: bool = False  # a DATA_Z frame: the payload is one zstd frame


@dataclass(frozen=True, slots=True)
class Data:
    """A whole DATA frame, payload included (non-streaming decoders and tests)."""

    seq: int
    checksum: int
    payload: bytes
    compressed: bool = False  # a DATA_Z frame: the payload is one zstd frame


@dataclass(frozen=True, slots=True)
class Ack:
    """Chunk ``seq`` has arrived intact; every chunk below ``written`` is on the sink.

    Two numbers because they answer two questions: ``seq`` lets the transmitter free that
    chunk's buffer, ``written`` lets it advance its window (back-pressure from the sink).
    """

    seq: int
    written: int


@dataclass(frozen=True, slots=True)
class Bye:
    """End of stream: the totals the receiver must have written before it may answer."""

    chunks: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ByeOk:
    """Everything announced by BYE is written and flushed: the session succeeded."""

    chunks: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Fin:
    """The transmitter heard that the session succeeded (BYE_OK, or a WELCOME saying so).

    Without it a receiver cannot tell a transmitter that hung up satisfied from one that
    hung up on a connection it gave up on, so it would not know when it may stop listening.
    """

    chunks: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Error:
    """The sender of this frame is abandoning the session, and says why."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly at a frame boundary."""


Event = (
    Hello | Auth | Welcome | DataHeader | Data | Ack | Bye | ByeOk | Fin | Error | ConnectionClosed
)
