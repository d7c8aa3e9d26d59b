"""The handshake of protocol version 2, both ends, as sans-IO objects.

Every connection goes HELLO, AUTH (transmitter: nonce and, on the session's first connection,
its SPAKE2 message), AUTH (receiver: nonce, SPAKE2 message, proof), AUTH (transmitter: proof),
then a tagged WELCOME.  The first connection of a session runs SPAKE2 on the checkphrase (or
key file) and derives the session's keys; every further connection *joins*, proving with the
session's join keys over a transcript that holds a fresh nonce from each end, so a recorded
connection cannot be replayed.  The async code in :mod:`viamillipede.transmitter` and
:mod:`viamillipede.receiver` only moves these objects' frames; what they mean is decided here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .wire import Auth, AuthKind, encode
from .wire.secure import (
    AuthFailed,
    PakeRx,
    PakeTx,
    SessionKeys,
    TagChecker,
    Tagger,
    check_proof,
    transcript,
)

__all__ = ["AuthFailed", "Channel", "RxAttempt", "TxAttempt", "TxKeying", "rx_attempt"]

Entropy = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class Channel:
    """A handshaken connection's control-frame tags: ``tagger`` for what this end sends,
    ``checker`` for what it receives."""

    tagger: Tagger
    checker: TagChecker


def _th(hello_frame: bytes, tx_auth: Auth, rx_auth: Auth) -> bytes:
    """The transcript both proofs cover: everything said before them (the receiver's AUTH
    without its proof)."""
    unproven = Auth(rx_auth.kind, rx_auth.nonce, rx_auth.pake)
    return transcript(hello_frame, encode(tx_auth), encode(unproven))


class TxKeying:
    """The transmitter's keys for one session: none until the first connection's key
    exchange is confirmed by a tagged WELCOME, then the session's, for every join."""

    def __init__(self, password: bytes, session_id: bytes, entropy: Entropy = os.urandom) -> None:
        self._password = password
        self._session_id = session_id
        self._entropy = entropy
        self.keys: SessionKeys | None = None

    def start(self, hello_frame: bytes) -> TxAttempt:
        """A connection's handshake: a join once the session is keyed, else the key exchange."""
        return TxAttempt(self, hello_frame)


class TxAttempt:
    """One connection's handshake, transmitter side."""

    def __init__(self, keying: TxKeying, hello_frame: bytes) -> None:
        self._keying = keying
        self._hello = hello_frame
        nonce = keying._entropy(32)
        if keying.keys is None:
            self._pake: PakeTx | None = PakeTx(keying._password, keying._entropy)
            self.auth = Auth(AuthKind.PAKE, nonce, self._pake.message)
        else:
            self._pake = None
            self.auth = Auth(AuthKind.JOIN, nonce)
        self._keys = keying.keys
        self._th = b""

    @property
    def joining(self) -> bool:
        return self._pake is None

    def answer(self, rx_auth: Auth) -> Auth:
        """Check the receiver's AUTH; return ours, with our proof.  Raises AuthFailed when the
        receiver cannot prove it holds the same phrase (or, joining, the session's keys)."""
        if rx_auth.kind != self.auth.kind:
            raise AuthFailed("the receiver answered another kind of handshake")
        th = _th(self._hello, self.auth, rx_auth)
        keys = self._keys
        if self._pake is not None:
            shared = self._pake.finish(rx_auth.pake)
            keys = SessionKeys.derive(shared, self._keying._session_id, self.auth.nonce,
                                      rx_auth.nonce)
        assert keys is not None
        check_proof(keys.prove_rx(th, join=self.joining), rx_auth.proof)
        # Only keys the receiver has proved are kept: channel() and welcomed() cannot adopt
        # the keys of an answer that failed.
        self._keys, self._th = keys, th
        return Auth(self.auth.kind, proof=keys.prove_tx(th, join=self.joining))

    def channel(self) -> Channel:
        """The connection's tags; the WELCOME is the first frame they check."""
        assert self._keys is not None and self._th
        to_rx, to_tx = self._keys.control(self._th)
        return Channel(Tagger(to_rx), TagChecker(to_tx))

    def welcomed(self) -> SessionKeys:
        """A tagged WELCOME verified: the receiver has these keys too.  From now on every
        connection joins."""
        assert self._keys is not None
        if self._keying.keys is None:
            self._keying.keys = self._keys
        return self._keys


class RxAttempt:
    """One connection's handshake, receiver side; made by :func:`rx_attempt`."""

    def __init__(self, hello_frame: bytes, tx_auth: Auth, keys: SessionKeys | None,
                 password: bytes, session_id: bytes, entropy: Entropy) -> None:
        nonce = entropy(32)
        self.kind = AuthKind(tx_auth.kind)
        if self.kind is AuthKind.PAKE:
            pake = PakeRx(password, entropy)
            shared = pake.finish(tx_auth.pake)
            keys = SessionKeys.derive(shared, session_id, tx_auth.nonce, nonce)
            unproven = Auth(self.kind, nonce, pake.message)
        else:
            unproven = Auth(self.kind, nonce)
        assert keys is not None
        self.keys = keys
        self._th = _th(hello_frame, tx_auth, unproven)
        join = self.kind is AuthKind.JOIN
        self.auth = Auth(self.kind, unproven.nonce, unproven.pake,
                         keys.prove_rx(self._th, join=join))

    def check(self, tx_auth: Auth) -> Channel:
        """Check the transmitter's proof; raises AuthFailed."""
        if tx_auth.kind != self.kind:
            raise AuthFailed("the transmitter changed the kind of handshake")
        check_proof(self.keys.prove_tx(self._th, join=self.kind is AuthKind.JOIN),
                    tx_auth.proof)
        to_rx, to_tx = self.keys.control(self._th)
        return Channel(Tagger(to_tx), TagChecker(to_rx))


def rx_attempt(hello_frame: bytes, tx_auth: Auth, *, keys: SessionKeys | None, password: bytes,
               session_id: bytes, entropy: Entropy = os.urandom) -> RxAttempt:
    """Answer the transmitter's first AUTH: a key exchange with ``password``, or a join with
    the session's ``keys``.  Raises AuthFailed on a malformed key exchange message."""
    if tx_auth.kind not in (AuthKind.PAKE, AuthKind.JOIN):
        raise AuthFailed(f"unknown handshake kind {tx_auth.kind}")
    return RxAttempt(hello_frame, tx_auth, keys, password, session_id, entropy)
