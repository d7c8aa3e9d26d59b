"""Keys, proofs and sealing of protocol version 2: pure computation, no sockets, no async.

Why each piece is what it is (``docs/security.md`` has the threat model):

* **SPAKE2** turns the checkphrase (or a key file) into a strong shared key without ever sending
  it: someone who records a session cannot test guesses offline, and an active attacker gets
  exactly one guess per handshake it starts.  The default phrase is public, so by default this
  keeps out eavesdroppers and off-path attackers; a secret phrase also keeps out a
  man in the middle.
* **Fresh nonces from both ends** go into every key (HKDF salt), so no two sessions share keys
  even with a key file, and a recorded handshake cannot be replayed into a new one.
* **Every connection proves itself** with a MAC over a transcript that includes a fresh nonce
  from the receiver: a recorded connection replayed later proves nothing.
* **Each chunk is sealed once** (AES-256-GCM) under a nonce made of the direction and the
  sequence number, with the session id and the DATA header as associated data.  A sequence
  number never seals two plaintexts, so the sealed bytes can be kept and re-sent on any
  connection byte for byte.  Keys roll over every :data:`REKEY_BYTES` of sequence space, well
  before AES-GCM's limits.
* **Control frames carry a tag**: HMAC-SHA256 over a per-connection, per-direction counter and
  the frame, keyed per connection, so no ACK, end or abort can be forged, replayed from another
  connection, or reordered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.spake2 import SPAKEError

__all__ = [
    "KEY_SIZE",
    "MAC_SIZE",
    "NONCE_SIZE",
    "PAKE_SIZE",
    "REKEY_BYTES",
    "SEAL_OVERHEAD",
    "TAG_SIZE",
    "AuthFailed",
    "ChunkSealer",
    "PakeRx",
    "PakeTx",
    "SessionKeys",
    "TagChecker",
    "Tagger",
    "password",
    "transcript",
]

NONCE_SIZE = 32  # each end's fresh handshake nonce
PAKE_SIZE = 33  # a SPAKE2 (Ed25519) message
MAC_SIZE = 32  # handshake proofs: full HMAC-SHA256
TAG_SIZE = 16  # control-frame tags
KEY_SIZE = 32  # a key file holds this many random bytes
SEAL_OVERHEAD = 16  # the AES-GCM tag after each sealed chunk
# Up to this, a chunk is sealed or opened on the event loop; larger ones in a worker thread.
# AES-GCM does 2 MiB in ~0.26 ms here; a hop to a thread and back, with the GIL handed over
# twice, cost more than that in all: with 2 MiB chunks sealed and opened inline, 1 GiB from a
# pipe took 0.85x the wall time and 0.86x the CPU of doing it in threads (farm-bench, 9 pairs,
# t4; 0.95x at t8), and took 1.05x the time of plaintext.  Past a few MiB a chunk would hold
# the loop for milliseconds: those still go to threads, several at once (the GIL is released).
INLINE_SEAL_BYTES = 4 * 1024 * 1024

#: Sequence space sealed under one key, in plaintext bytes.  TLS 1.3 allows about 2^38.5 bytes
#: per AES-GCM key (2^24.5 records of 16 KiB) for a safe margin; we roll over 6x sooner.
REKEY_BYTES = 1 << 36

_ID_TX = b"viamillipede transmitter"
_ID_RX = b"viamillipede receiver"
_NONCE_TX = b"tx->"  # the first 4 bytes of every AES-GCM nonce of the tx -> rx direction


class AuthFailed(Exception):
    """A proof, tag or sealed chunk did not verify."""


def password(checkphrase: bytes | None = None, key: bytes | None = None) -> bytes:
    """What SPAKE2 runs on.  A key file and a phrase are kept apart, so a phrase that happens
    to equal a key's bytes is not that key."""
    if key is not None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes, not {len(key)}")
        return b"key:" + key
    if checkphrase is None:
        raise ValueError("a checkphrase or a key is needed")
    return b"phrase:" + checkphrase


def transcript(*parts: bytes) -> bytes:
    """A hash of the handshake so far; each part is length-prefixed, so the cut between two
    parts cannot be moved."""
    h = hashlib.sha256(b"viamillipede v2 transcript")
    for part in parts:
        h.update(struct.pack("!I", len(part)))
        h.update(part)
    return h.digest()


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(key, label + data, hashlib.sha256).digest()


def _check_length(peer: bytes) -> None:
    """spake2 decodes a point from whatever follows the side byte, ignoring bytes past 32 and
    taking fewer as a smaller number: a message of another length must not yield a key."""
    if len(peer) != PAKE_SIZE:
        raise AuthFailed(f"bad key exchange message: {len(peer)} bytes, not {PAKE_SIZE}")


class PakeTx:
    """The transmitter's side of SPAKE2 (role A)."""

    def __init__(self, pw: bytes, entropy: Callable[[int], bytes] = os.urandom) -> None:
        self._s = SPAKE2_A(pw, idA=_ID_TX, idB=_ID_RX, entropy_f=entropy)
        self.message = self._s.start()

    def finish(self, peer: bytes) -> bytes:
        _check_length(peer)
        try:
            return bytes(self._s.finish(peer))
        except (SPAKEError, NotOnCurve, ValueError) as exc:  # NotOnCurve: not a ValueError
            raise AuthFailed(f"bad key exchange message: {exc}") from None


class PakeRx:
    """The receiver's side of SPAKE2 (role B)."""

    def __init__(self, pw: bytes, entropy: Callable[[int], bytes] = os.urandom) -> None:
        self._s = SPAKE2_B(pw, idA=_ID_TX, idB=_ID_RX, entropy_f=entropy)
        self.message = self._s.start()

    def finish(self, peer: bytes) -> bytes:
        _check_length(peer)
        try:
            return bytes(self._s.finish(peer))
        except (SPAKEError, NotOnCurve, ValueError) as exc:  # NotOnCurve: not a ValueError
            raise AuthFailed(f"bad key exchange message: {exc}") from None


_LABELS = ("confirm tx", "confirm rx", "data tx", "control tx", "control rx", "join tx",
           "join rx")


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Every key of a session, derived once from the SPAKE2 key, both nonces and the id."""

    session_id: bytes
    confirm_tx: bytes
    confirm_rx: bytes
    data_tx: bytes
    control_tx: bytes
    control_rx: bytes
    join_tx: bytes
    join_rx: bytes

    @classmethod
    def derive(cls, shared: bytes, session_id: bytes, tx_nonce: bytes,
               rx_nonce: bytes) -> SessionKeys:
        okm = HKDF(algorithm=hashes.SHA256(), length=32 * len(_LABELS), salt=tx_nonce + rx_nonce,
                   info=b"viamillipede v2 keys " + session_id).derive(shared)
        keys = [okm[i * 32 : (i + 1) * 32] for i in range(len(_LABELS))]
        return cls(session_id, *keys)

    # -- handshake proofs ------------------------------------------------------------------

    def prove_rx(self, th: bytes, *, join: bool) -> bytes:
        """The receiver's proof that it holds the session's keys (so the WELCOME that follows,
        and ``written`` in it, can be trusted)."""
        return _mac(self.join_rx if join else self.confirm_rx, b"rx proof", th)

    def prove_tx(self, th: bytes, *, join: bool) -> bytes:
        return _mac(self.join_tx if join else self.confirm_tx, b"tx proof", th)

    # -- per-connection control keys -------------------------------------------------------

    def control(self, th: bytes) -> tuple[bytes, bytes]:
        """(tx -> rx, rx -> tx) tag keys of the connection whose handshake hashed to ``th``:
        a frame recorded on one connection does not verify on another."""
        return (_mac(self.control_tx, b"connection", th),
                _mac(self.control_rx, b"connection", th))


def check_proof(expected: bytes, got: bytes) -> None:
    if not hmac.compare_digest(expected, got):
        raise AuthFailed("the proof does not match: wrong checkphrase or key")


class Tagger:
    """Tags the control frames one end sends on one connection, in order."""

    __slots__ = ("_count", "_key")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._count = 0

    def tag(self, frame: bytes) -> bytes:
        t = hmac.new(self._key, struct.pack("!Q", self._count) + frame, hashlib.sha256).digest()
        self._count += 1
        return t[:TAG_SIZE]


class TagChecker:
    """Checks the tags of the control frames a peer sends on one connection, in order: a
    dropped, replayed or reordered frame fails, as does a forged one."""

    __slots__ = ("_tagger",)

    def __init__(self, key: bytes) -> None:
        self._tagger = Tagger(key)

    def check(self, frame: bytes, tag: bytes) -> None:
        if not hmac.compare_digest(self._tagger.tag(frame), tag):
            raise AuthFailed("a control frame's tag does not verify")


class ChunkSealer:
    """Seals and opens the chunks of one session (AES-256-GCM, the tx -> rx direction).

    Pure and thread-safe: the session calls it from worker threads, several at once.  Each
    call writes into a buffer the caller owns (a pooled one): no per-chunk allocation.
    """

    __slots__ = ("_aeads", "_epoch_chunks", "_key", "_session_id")

    def __init__(self, data_key: bytes, session_id: bytes, chunk_size: int) -> None:
        self._key = data_key
        self._session_id = session_id
        self._epoch_chunks = max(1, REKEY_BYTES // chunk_size)
        self._aeads: OrderedDict[int, AESGCM] = OrderedDict()

    def _aead(self, seq: int) -> AESGCM:
        epoch = seq // self._epoch_chunks
        aead = self._aeads.get(epoch)
        if aead is None:
            key = _mac(self._key, b"epoch", struct.pack("!Q", epoch))
            aead = AESGCM(key)
            self._aeads[epoch] = aead
            while len(self._aeads) > 4:  # a window never spans more than a couple
                self._aeads.popitem(last=False)
        return aead

    def epoch_key(self, seq: int) -> bytes:
        """The key chunk ``seq`` is sealed under (for the golden vectors)."""
        return _mac(self._key, b"epoch", struct.pack("!Q", seq // self._epoch_chunks))

    @staticmethod
    def nonce(seq: int) -> bytes:
        return _NONCE_TX + struct.pack("!Q", seq)

    def aad(self, header: bytes) -> bytes:
        return self._session_id + header

    def seal_into(self, seq: int, header: bytes, plain: memoryview | bytes,
                  out: memoryview | bytearray) -> None:
        """``out`` (exactly ``len(plain) + SEAL_OVERHEAD`` bytes) gets the sealed chunk;
        ``header`` is the DATA header that will go in front of it."""
        self._aead(seq).encrypt_into(self.nonce(seq), plain, self.aad(header), out)

    def open_into(self, seq: int, header: bytes, sealed: memoryview | bytes,
                  out: memoryview | bytearray) -> None:
        """``out`` (exactly ``len(sealed) - SEAL_OVERHEAD`` bytes) gets the plaintext; raises
        AuthFailed if anything about the chunk or its header was changed."""
        try:
            self._aead(seq).decrypt_into(self.nonce(seq), sealed, self.aad(header), out)
        except InvalidTag:
            raise AuthFailed(f"chunk {seq} does not verify") from None
