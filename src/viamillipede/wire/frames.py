"""The wire format, declared once with ``construct``.

These declarations are the single source of truth for the byte layout: ``docs/protocol.md`` is
written from them and its golden vectors are checked against them by the tests.  The hot path
does not run construct on payload-bearing frames (construct copies through BytesIO and costs
microseconds per header); it uses the ``struct`` formats at the bottom of this file, and a test
proves that both agree byte for byte.

Every frame starts with a one-byte type code followed by fixed big-endian fields.  DATA is
followed by ``length`` payload bytes and ERROR by ``length`` bytes of UTF-8 text; no other frame
has a variable part, so a reader always knows how many bytes it needs next.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct

MAGIC = b"VMPD"
PROTOCOL_VERSION = 2

#: The first byte of every frame.
T_HELLO = 0x48  # "H"  transmitter -> receiver, first frame of every connection
T_WELCOME = 0x57  # "W"  receiver -> transmitter, answer to HELLO
T_DATA = 0x44  # "D"  transmitter -> receiver
T_DATA_Z = 0x5A  # "Z"  transmitter -> receiver: DATA whose payload is one zstd frame
T_ACK = 0x41  # "A"  receiver -> transmitter
T_BYE = 0x42  # "B"  transmitter -> receiver, end of stream
T_BYE_OK = 0x62  # "b"  receiver -> transmitter, everything written
T_ERROR = 0x45  # "E"  either way, fatal for the session
T_FIN = 0x46  # "F"  transmitter -> receiver, "I have your BYE_OK": the receiver may exit
T_AUTH = 0x4B  # "K"  both ways, during the handshake: key exchange and proofs


class WelcomeStatus(IntEnum):
    """Why a receiver accepted or refused a connection (the WELCOME ``status`` byte)."""

    ACCEPTED = 0
    BAD_VERSION = 1
    BAD_CHECKPHRASE = 2
    WRONG_SESSION = 3
    BAD_PARAMETERS = 4
    SESSION_OVER = 5
    SESSION_FAILED = 6
    BAD_MODE = 7  # one end was started with plaintext, the other without


class AuthKind(IntEnum):
    """What an AUTH frame opens: the session's key exchange, or one more connection of it."""

    PAKE = 1
    JOIN = 2


class Mode(IntEnum):
    """Bits of the HELLO ``mode`` word."""

    PLAINTEXT = 0x00000001  # DATA travels in clear (the handshake and control frames do not)


class ErrorCode(IntEnum):
    """Why a peer aborts the whole session (the ERROR ``code`` field)."""

    SINK_FAILED = 1
    SOURCE_FAILED = 2
    PROTOCOL = 3
    ABORTED = 4
    TOTALS_MISMATCH = 5
    TIMEOUT = 6


class Feature(IntEnum):
    """Bits of the HELLO ``features`` word.

    The low nibble names the checksum algorithm, the next one the compression DATA_Z frames may
    use (a receiver that did not see it announced refuses them); the third is reserved for
    encryption so that later versions can negotiate it without a new frame layout.
    """

    CHECKSUM_MASK = 0x0000000F
    CHECKSUM_CRC32 = 0x00000001
    CHECKSUM_XXH3 = 0x00000002  # XXH3-64, low 32 bits
    COMPRESSION_MASK = 0x000000F0
    COMPRESSION_ZSTD = 0x00000010  # DATA_Z payloads are single zstd frames
    ENCRYPTION_MASK = 0x00000F00


#: What each WELCOME status tells the transmitter, in one place for both ends' messages.  Only
#: ACCEPTED, and SESSION_OVER for the transmitter's own session, carry the session id and
#: progress: anything else is an answer to a client that has not proved it belongs.
WELCOME_MEANING: dict[WelcomeStatus, str] = {
    WelcomeStatus.ACCEPTED: "accepted into the session",
    WelcomeStatus.BAD_VERSION: "unsupported protocol version",
    WelcomeStatus.BAD_CHECKPHRASE: "wrong checkphrase",
    WelcomeStatus.WRONG_SESSION: "it belongs to another session (a second or stale transmitter)",
    WelcomeStatus.BAD_PARAMETERS: "chunk size, window, features or connection number out of bounds",
    WelcomeStatus.SESSION_OVER: "the session is already complete",
    WelcomeStatus.SESSION_FAILED: "the session has failed",
    WelcomeStatus.BAD_MODE: "one end was started with plaintext and the other without",
}

#: Why a peer abandons the session, as the other end reports it.
ERROR_MEANING: dict[ErrorCode, str] = {
    ErrorCode.SINK_FAILED: "the receiver's output failed",
    ErrorCode.SOURCE_FAILED: "the transmitter's input failed",
    ErrorCode.PROTOCOL: "the peer broke the protocol",
    ErrorCode.ABORTED: "the peer aborted",
    ErrorCode.TOTALS_MISMATCH: "the totals at the end disagree",
    ErrorCode.TIMEOUT: "the peer timed out waiting for us",
}


HELLO_BODY = Struct(
    "magic" / Const(MAGIC),
    "version" / Int16ub,
    "mode" / Int32ub,
    "session_id" / Bytes(16),
    "conn_index" / Int16ub,
    "chunk_size" / Int32ub,
    "window" / Int32ub,
    "features" / Int32ub,
)

WELCOME_BODY = Struct(
    "status" / Int8ub,
    "session_id" / Bytes(16),
    "written" / Int64ub,
)

AUTH_BODY = Struct(
    "kind" / Int8ub,
    "nonce" / Bytes(32),
    "pake" / Bytes(33),
    "proof" / Bytes(32),
)

DATA_BODY = Struct(
    "seq" / Int64ub,
    "length" / Int32ub,
    "checksum" / Int32ub,
)

ACK_BODY = Struct(
    "seq" / Int64ub,
    "written" / Int64ub,
)

BYE_BODY = Struct(
    "chunks" / Int64ub,
    "nbytes" / Int64ub,
)

BYE_OK_BODY = BYE_BODY

FIN_BODY = BYE_BODY

ERROR_BODY = Struct(
    "code" / Int16ub,
    "length" / Int16ub,
)

#: The fixed part of each frame body (after the type byte), by type code.
BODIES = {
    T_HELLO: HELLO_BODY,
    T_WELCOME: WELCOME_BODY,
    T_DATA: DATA_BODY,
    T_DATA_Z: DATA_BODY,
    T_ACK: ACK_BODY,
    T_BYE: BYE_BODY,
    T_BYE_OK: BYE_OK_BODY,
    T_FIN: FIN_BODY,
    T_ERROR: ERROR_BODY,
    T_AUTH: AUTH_BODY,
}

#: Frames followed by a 16-byte tag once a connection's handshake is complete.
TAGGED = frozenset({T_WELCOME, T_ACK, T_BYE, T_BYE_OK, T_FIN, T_ERROR})

#: Type byte + fixed body, by type code.
FIXED_SIZE: dict[int, int] = {t: 1 + int(body.sizeof()) for t, body in BODIES.items()}

#: Longest ERROR text accepted, so that a hostile peer cannot make us buffer much.
MAX_ERROR_TEXT = 1024

#: Fast path: the full DATA header (type byte + body), packed in front of the payload buffer.
DATA_HEADER = struct.Struct("!BQII")
DATA_HEADER_SIZE = DATA_HEADER.size
#: Fast path for the receiver's ACK frames.
ACK_FRAME = struct.Struct("!BQQ")

assert FIXED_SIZE[T_DATA] == FIXED_SIZE[T_DATA_Z] == DATA_HEADER_SIZE
assert FIXED_SIZE[T_ACK] == ACK_FRAME.size
