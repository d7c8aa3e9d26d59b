"""What protocol version 2 promises about keys, proofs, tags and sealing, tested at the layer
that keeps each promise (``wire/secure.py`` and ``keying.py``), without sockets.

``docs/protocol.md`` (sections 2.2, 2.4 and 4) and ``docs/security.md`` say what must hold; the
golden vectors of ``test_protocol_doc.py`` pin the bytes and ``test_mitm.py`` attacks whole
processes.  Here each promise gets a test that fails when it is broken: keys agree only on the
same phrase or key, and a wrong one is caught at the proof, never used for data; no session or
connection shares keys; a malformed key exchange message is an ``AuthFailed``; a sealed chunk
opens only unchanged, at its own sequence number, in its own session; tags catch forged,
replayed, reordered, reflected and cross-connection control frames; a recorded join proves
nothing later; the data key rolls over before ``REKEY_BYTES``.  Two state machines then drive
the handshake and the record layer with a hostile network in the middle.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import replace

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from spake2.ed25519_basic import NotOnCurve, decodepoint

from viamillipede.keying import Channel, RxAttempt, TxAttempt, TxKeying, rx_attempt
from viamillipede.options import DEFAULT_CHUNK_SIZE
from viamillipede.wire import (
    DATA_HEADER_SIZE,
    NEED_DATA,
    Ack,
    Auth,
    AuthKind,
    Decoder,
    Event,
    Hello,
    ProtocolError,
    TamperedFrame,
    Welcome,
    WelcomeStatus,
    encode,
    pack_data_header,
)
from viamillipede.wire.frames import DATA_HEADER
from viamillipede.wire.secure import (
    INLINE_SEAL_BYTES,
    KEY_SIZE,
    PAKE_SIZE,
    REKEY_BYTES,
    SEAL_OVERHEAD,
    TAG_SIZE,
    AuthFailed,
    ChunkSealer,
    PakeRx,
    PakeTx,
    SessionKeys,
    TagChecker,
    Tagger,
    check_proof,
    password,
    transcript,
)

SESSION = bytes(range(16))
PHRASE = password(checkphrase=b"correct horse battery")
WRONG = password(checkphrase=b"correct horse battery!")
KEY = bytes(range(100, 100 + KEY_SIZE))


class Entropy:
    """A deterministic stand-in for ``os.urandom``: Hypothesis must be able to replay a failing
    run byte for byte, and each party draws from its own stream so none shares a nonce."""

    def __init__(self, label: bytes) -> None:
        self._label = label
        self._count = 0

    def __call__(self, n: int) -> bytes:
        self._count += 1
        return hashlib.shake_256(self._label + struct.pack("!Q", self._count)).digest(n)


def hello(conn_index: int = 0, session_id: bytes = SESSION) -> Hello:
    return Hello(mode=0, session_id=session_id, conn_index=conn_index, chunk_size=1 << 20,
                 window=8)


def handshake(keying: TxKeying, rx_password: bytes, rx_keys: SessionKeys | None,
              conn_index: int = 0) -> tuple[SessionKeys, SessionKeys, Channel, Channel]:
    """One whole connection between honest ends, the WELCOME going through a real decoder:
    (the transmitter's keys, the receiver's, the transmitter's channel, the receiver's)."""
    frame = encode(hello(conn_index))
    attempt = keying.start(frame)
    rx = rx_attempt(frame, attempt.auth, keys=rx_keys, password=rx_password, session_id=SESSION)
    proof = attempt.answer(rx.auth)
    tx_channel = attempt.channel()
    rx_channel = rx.check(proof)
    decoder = Decoder.for_transmitter()
    decoder.checker = tx_channel.checker
    decoder.receive_data(encode(Welcome(WelcomeStatus.ACCEPTED, SESSION, 0), rx_channel.tagger))
    assert decoder.next_event() == Welcome(WelcomeStatus.ACCEPTED, SESSION, 0)
    return attempt.welcomed(), rx.keys, tx_channel, rx_channel


def keyed_session() -> tuple[TxKeying, SessionKeys]:
    """A transmitter and receiver that finished their key exchange; joins come next."""
    keying = TxKeying(PHRASE, SESSION)
    tx_keys, rx_keys, _, _ = handshake(keying, PHRASE, None)
    assert keying.keys == rx_keys == tx_keys
    return keying, rx_keys


def channels_talk(a: Channel, b: Channel) -> None:
    """Each end's tagger is the other end's checker: frames verify both ways."""
    for frame in (b"ACK 1", b"ACK 2"):
        b.checker.check(frame, a.tagger.tag(frame))
        a.checker.check(frame, b.tagger.tag(frame))


def key_fields(keys: SessionKeys) -> list[bytes]:
    return [keys.confirm_tx, keys.confirm_rx, keys.data_tx, keys.control_tx, keys.control_rx,
            keys.join_tx, keys.join_rx]


# -- agreeing on keys ----------------------------------------------------------------------


@pytest.mark.parametrize("pw", [PHRASE, password(key=KEY), password(checkphrase=b"yoes")],
                         ids=["phrase", "key-file", "default-phrase"])
def test_same_secret_agrees(pw: bytes) -> None:
    """Both ends derive the same seven keys and their tags interoperate: the whole session
    rests on this."""
    keying = TxKeying(pw, SESSION)
    tx_keys, rx_keys, tx_channel, rx_channel = handshake(keying, pw, None)
    assert tx_keys == rx_keys
    assert len(set(key_fields(tx_keys))) == 7  # seven distinct keys, none reused
    channels_talk(tx_channel, rx_channel)
    sealed = seal_frame(ChunkSealer(tx_keys.data_tx, SESSION, 4096), 0, b"chunk")
    assert open_frame(ChunkSealer(rx_keys.data_tx, SESSION, 4096), sealed) == b"chunk"


@pytest.mark.parametrize(("tx_pw", "rx_pw"), [
    (PHRASE, WRONG),
    (password(key=KEY), password(key=bytes(KEY_SIZE))),
    (password(key=KEY), password(checkphrase=KEY)),  # a phrase equal to the key's bytes
    (password(checkphrase=b"yoes"), PHRASE),
], ids=["phrase", "key-file", "phrase-is-not-key", "default-vs-secret"])
def test_different_secret_fails_at_the_proof(tx_pw: bytes, rx_pw: bytes) -> None:
    """Another phrase or key is not detected by SPAKE2 itself (both ends finish it with
    different keys); it must be caught by the proofs, before either end uses its keys: the
    transmitter refuses the receiver's proof and adopts no keys, and the receiver refuses any
    proof the transmitter could make."""
    keying = TxKeying(tx_pw, SESSION)
    frame = encode(hello())
    attempt = keying.start(frame)
    rx = rx_attempt(frame, attempt.auth, keys=None, password=rx_pw, session_id=SESSION)
    with pytest.raises(AuthFailed):
        attempt.answer(rx.auth)
    assert keying.keys is None
    with pytest.raises(AssertionError):  # the failed answer's keys cannot be adopted
        attempt.welcomed()
    with pytest.raises(AuthFailed):
        rx.check(Auth(AuthKind.PAKE, proof=bytes(32)))

    # The same at the level below: SPAKE2 completes, the keys differ, each proof is refused.
    a, b = PakeTx(tx_pw), PakeRx(rx_pw)
    tx_keys = SessionKeys.derive(a.finish(b.message), SESSION, bytes(32), bytes(32))
    rx_keys = SessionKeys.derive(b.finish(a.message), SESSION, bytes(32), bytes(32))
    assert not set(key_fields(tx_keys)) & set(key_fields(rx_keys))
    th = transcript(b"hello", b"tx auth", b"rx auth")
    with pytest.raises(AuthFailed):
        check_proof(tx_keys.prove_rx(th, join=False), rx_keys.prove_rx(th, join=False))
    with pytest.raises(AuthFailed):
        check_proof(rx_keys.prove_tx(th, join=False), tx_keys.prove_tx(th, join=False))


def test_fresh_nonces_fresh_keys() -> None:
    """Two sessions on the same phrase and even the same session id share no key: the SPAKE2
    secrets and both nonces are fresh, so a recorded session never helps with another."""
    first, _, _, _ = handshake(TxKeying(PHRASE, SESSION), PHRASE, None)
    second, _, _, _ = handshake(TxKeying(PHRASE, SESSION), PHRASE, None)
    assert not set(key_fields(first)) & set(key_fields(second))


def test_every_input_of_the_key_schedule_matters() -> None:
    """The SPAKE2 key, the session id and each end's nonce go into every key (HKDF is
    deterministic, so the same inputs give the same keys)."""
    shared, nt, nr = b"k" * 32, b"t" * 32, b"r" * 32
    base = SessionKeys.derive(shared, SESSION, nt, nr)
    assert SessionKeys.derive(shared, SESSION, nt, nr) == base
    for other in (SessionKeys.derive(b"K" * 32, SESSION, nt, nr),
                  SessionKeys.derive(shared, bytes(16), nt, nr),
                  SessionKeys.derive(shared, SESSION, b"T" * 32, nr),
                  SessionKeys.derive(shared, SESSION, nt, b"R" * 32)):
        assert all(x != y for x, y in zip(key_fields(base), key_fields(other), strict=True))


def test_password_keeps_phrase_and_key_apart() -> None:
    """A phrase that happens to equal a key's bytes is another password; a key is exactly
    KEY_SIZE bytes; something is needed."""
    assert password(checkphrase=KEY) != password(key=KEY)
    with pytest.raises(ValueError, match="bytes"):
        password(key=KEY[:-1])
    with pytest.raises(ValueError, match="needed"):
        password()


# -- malformed key exchange messages -------------------------------------------------------


def off_curve(side: bytes) -> bytes:
    """A 33-byte message whose 32 bytes decode to no point of Ed25519."""
    for i in range(256):
        point = bytes([i]) + bytes(30) + b"\x01"
        try:
            decodepoint(point)
        except NotOnCurve:
            return side + point
    raise AssertionError("no off-curve encoding found")  # pragma: no cover


Q = 2**255 - 19


def bad_messages(own: bytes, peer: bytes) -> dict[str, bytes]:
    """Messages an end must refuse, given its own message and the honest peer's."""
    side, point = peer[:1], peer[1:]
    return {
        "off-curve": off_curve(side),
        "identity": side + (1).to_bytes(32, "little"),
        "order-2": side + (Q - 1).to_bytes(32, "little"),
        "own": own,
        "reflected": side + own[1:],
        "unknown-side": b"C" + point,
        "empty": b"",
        "side-only": side,
        "short": peer[:-1],
        "long": peer + b"\x00",
        "doubled": peer + point,
    }


@pytest.mark.parametrize("case", list(bad_messages(bytes(33), bytes(33))))
def test_bad_pake_message_is_auth_failed(case: str) -> None:
    """A SPAKE2 message that is off the curve, of low order, the end's own (reflected), from
    an unknown side, or not PAKE_SIZE bytes long (even the peer's genuine message with a byte
    more or less) fails as AuthFailed on both ends: an end that reads it must refuse the
    connection, not crash on another exception, and never go on with a key computed from
    bytes its peer did not send."""
    tx, rx = PakeTx(PHRASE), PakeRx(PHRASE)
    with pytest.raises(AuthFailed):
        tx.finish(bad_messages(tx.message, rx.message)[case])
    with pytest.raises(AuthFailed):
        rx.finish(bad_messages(rx.message, tx.message)[case])


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=PAKE_SIZE), extra=st.binary(max_size=PAKE_SIZE),
       noise=st.binary(max_size=2 * PAKE_SIZE), tx_side=st.booleans())
def test_any_pake_message_fails_only_as_auth_failed(cut: int, extra: bytes, noise: bytes,
                                                    tx_side: bool) -> None:
    """Whatever bytes arrive as a SPAKE2 message (the peer's genuine one cut or extended, or
    noise), the only failure is AuthFailed, and only a PAKE_SIZE message yields a key."""
    peer = (PakeRx(PHRASE) if tx_side else PakeTx(PHRASE)).message
    for message in (peer[:cut] + extra, noise):
        end = PakeTx(PHRASE) if tx_side else PakeRx(PHRASE)
        try:
            key = end.finish(message)
        except AuthFailed:
            continue
        assert len(message) == PAKE_SIZE and len(key) == 32


def test_keying_refuses_bad_pake_and_unknown_kinds() -> None:
    """The handshake objects pass a bad key exchange message or an unknown kind on as
    AuthFailed (the receiver closes, the transmitter stops), never another exception."""
    frame = encode(hello())
    attempt = TxKeying(PHRASE, SESSION).start(frame)
    with pytest.raises(AuthFailed):
        rx_attempt(frame, replace(attempt.auth, pake=off_curve(b"A")), keys=None,
                   password=PHRASE, session_id=SESSION)
    for kind in (0, 3, 255):
        with pytest.raises(AuthFailed):
            rx_attempt(frame, replace(attempt.auth, kind=kind), keys=None, password=PHRASE,
                       session_id=SESSION)
    rx = rx_attempt(frame, attempt.auth, keys=None, password=PHRASE, session_id=SESSION)
    with pytest.raises(AuthFailed):
        attempt.answer(replace(rx.auth, pake=off_curve(b"B")))
    with pytest.raises(AuthFailed):
        attempt.answer(replace(rx.auth, kind=AuthKind.JOIN))
    genuine = TxKeying(PHRASE, SESSION).start(frame)
    rx = rx_attempt(frame, genuine.auth, keys=None, password=PHRASE, session_id=SESSION)
    proof = genuine.answer(rx.auth)
    for kind in (AuthKind.JOIN, 0, 3):  # the right proof under another kind
        with pytest.raises(AuthFailed):
            rx.check(replace(proof, kind=kind))
    rx.check(replace(proof, nonce=bytes(range(32))))  # unused fields: not looked at (2.2)
    rx.check(proof)


@pytest.mark.parametrize("field", ["hello", "tx-nonce", "tx-pake", "rx-nonce", "rx-pake"])
def test_every_handshake_field_is_bound(field: str) -> None:
    """The proofs cover the HELLO and both first AUTH frames: a field changed on the way to
    one end makes the proofs disagree, so the change ends in AuthFailed."""
    keying = TxKeying(PHRASE, SESSION)
    frame = encode(hello())
    attempt = keying.start(frame)
    tx_auth = attempt.auth
    rx_frame = encode(replace(hello(), window=9)) if field == "hello" else frame
    if field == "tx-nonce":
        tx_auth = replace(tx_auth, nonce=bytes(32))
    if field == "tx-pake":  # another valid point: a fresh message of the right side
        tx_auth = replace(tx_auth, pake=PakeTx(PHRASE).message)
    rx = rx_attempt(rx_frame, tx_auth, keys=None, password=PHRASE, session_id=SESSION)
    answer = rx.auth
    if field == "rx-nonce":
        answer = replace(answer, nonce=bytes(32))
    if field == "rx-pake":
        answer = replace(answer, pake=PakeRx(PHRASE).message)
    with pytest.raises(AuthFailed):
        attempt.answer(answer)


# -- sealed chunks -------------------------------------------------------------------------


def seal_frame(sealer: ChunkSealer, seq: int, plain: bytes) -> bytes:
    """A sealed DATA frame built as the transmitter builds it: header in front, chunk sealed
    in place in the same buffer."""
    n = len(plain)
    buf = bytearray(DATA_HEADER_SIZE + n + SEAL_OVERHEAD)
    view = memoryview(buf)
    pack_data_header(view, seq, n + SEAL_OVERHEAD, 0)
    payload = view[DATA_HEADER_SIZE:]
    payload[:n] = plain
    sealer.seal_into(seq, bytes(view[:DATA_HEADER_SIZE]), payload[:n], payload)
    return bytes(buf)


def open_frame(opener: ChunkSealer, frame: bytes) -> bytes:
    """Open a DATA frame as the receiver does: in place, at the seq its header names, the
    header as associated data."""
    header = frame[:DATA_HEADER_SIZE]
    _, seq, _, _ = DATA_HEADER.unpack(header)
    buf = bytearray(frame[DATA_HEADER_SIZE:])
    view = memoryview(buf)
    plain = view[: max(len(buf) - SEAL_OVERHEAD, 0)]
    opener.open_into(seq, header, view, plain)
    return bytes(plain)


def sealers(chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[ChunkSealer, ChunkSealer]:
    """The transmitter's sealer and the receiver's, made apart from the same key."""
    key = hashlib.sha256(b"data key").digest()
    return ChunkSealer(key, SESSION, chunk_size), ChunkSealer(key, SESSION, chunk_size)


@pytest.mark.parametrize("size", [0, 1, 17, INLINE_SEAL_BYTES - 1, INLINE_SEAL_BYTES,
                                  INLINE_SEAL_BYTES + 1, DEFAULT_CHUNK_SIZE])
def test_seal_open_round_trip(size: int) -> None:
    """A chunk comes back exactly, at every size the two code paths meet (inline below
    INLINE_SEAL_BYTES, threads above) up to a whole chunk; the in-place seal the transmitter
    uses gives the same bytes as sealing between separate buffers, and a sealed chunk is
    exactly SEAL_OVERHEAD longer."""
    tx, rx = sealers()
    plain = (hashlib.sha256(b"plain").digest() * (size // 32 + 1))[:size]
    seq = 7
    frame = seal_frame(tx, seq, plain)
    assert len(frame) == DATA_HEADER_SIZE + size + SEAL_OVERHEAD
    apart = bytearray(size + SEAL_OVERHEAD)
    tx.seal_into(seq, frame[:DATA_HEADER_SIZE], plain, apart)
    assert bytes(apart) == frame[DATA_HEADER_SIZE:]
    if size:
        assert plain not in frame  # encrypted, not just tagged
    assert open_frame(rx, frame) == plain
    out = bytearray(size)
    rx.open_into(seq, frame[:DATA_HEADER_SIZE], frame[DATA_HEADER_SIZE:], out)
    assert bytes(out) == plain


def test_sealing_and_opening_allocate_nothing_per_chunk() -> None:
    """Each chunk is sealed into, and opened into, a buffer the caller owns (a pooled one):
    twenty 2 MiB chunks through both ends allocate a few hundred bytes each (the nonce and
    the associated data), never a chunk."""
    import tracemalloc

    tx, rx = sealers()
    header = bytes(DATA_HEADER_SIZE)
    plain = bytearray(DEFAULT_CHUNK_SIZE)
    sealed = bytearray(DEFAULT_CHUNK_SIZE + SEAL_OVERHEAD)
    out = bytearray(DEFAULT_CHUNK_SIZE)
    tx.seal_into(0, header, plain, sealed)  # the epoch's key, made once
    rx.open_into(0, header, sealed, out)
    tracemalloc.start()
    try:
        for seq in range(1, 21):
            tx.seal_into(seq, header, memoryview(plain), sealed)
            rx.open_into(seq, header, memoryview(sealed), out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for 20 chunks of 2 MiB"


def test_every_flipped_bit_fails() -> None:
    """Any one bit changed anywhere in a sealed DATA frame (the header, bound as associated
    data; the ciphertext; the GCM tag) or in the session id makes it fail with AuthFailed."""
    tx, rx = sealers()
    frame = seal_frame(tx, 5, b"thirty-three bytes of plain chunk")
    assert open_frame(rx, frame) == b"thirty-three bytes of plain chunk"
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthFailed):
            open_frame(rx, bytes(flipped))
    for bit in range(len(SESSION) * 8):
        other = bytearray(SESSION)
        other[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthFailed):
            open_frame(ChunkSealer(hashlib.sha256(b"data key").digest(), bytes(other),
                                   DEFAULT_CHUNK_SIZE), frame)


def test_cut_or_extended_chunk_fails() -> None:
    """A sealed chunk cut short (down to nothing) or given extra bytes does not open."""
    tx, rx = sealers()
    frame = seal_frame(tx, 3, b"some chunk")
    header, payload = frame[:DATA_HEADER_SIZE], frame[DATA_HEADER_SIZE:]
    for cut in (*range(len(payload)), len(payload) + 1):
        sealed = (payload + b"\x00")[:cut]
        out = bytearray(max(cut - SEAL_OVERHEAD, 0))
        with pytest.raises(AuthFailed):
            rx.open_into(3, header, sealed, out)


def test_wrong_seq_session_or_key_fails() -> None:
    """A chunk opens only at its own seq (with its header or another's), in its own session,
    under the data key: the other keys of the session, including the other direction's
    control key, open nothing."""
    keys = SessionKeys.derive(b"k" * 32, SESSION, b"t" * 32, b"r" * 32)
    tx = ChunkSealer(keys.data_tx, SESSION, 4096)
    frame = seal_frame(tx, 10, b"chunk ten")
    header, sealed = frame[:DATA_HEADER_SIZE], frame[DATA_HEADER_SIZE:]
    moved = bytearray(header)
    pack_data_header(moved, 11, len(sealed), 0)
    rx = ChunkSealer(keys.data_tx, SESSION, 4096)
    for seq, head in ((11, header), (11, bytes(moved)), (9, header), (10 + 2**32, header)):
        with pytest.raises(AuthFailed):
            rx.open_into(seq, head, sealed, bytearray(len(sealed) - SEAL_OVERHEAD))
    for key in (keys.control_rx, keys.control_tx, keys.confirm_rx, keys.join_rx):
        with pytest.raises(AuthFailed):
            open_frame(ChunkSealer(key, SESSION, 4096), frame)
    with pytest.raises(AuthFailed):
        open_frame(ChunkSealer(keys.data_tx, bytes(16), 4096), frame)
    assert open_frame(rx, frame) == b"chunk ten"


def test_one_nonce_per_seq_and_resends_are_identical() -> None:
    """Each seq has its own nonce, which names the direction; sealing a chunk again (a
    re-send) gives the very same bytes, so a re-sent chunk never exposes a second ciphertext
    under its nonce; and the same chunk at two seqs gives unrelated ciphertexts."""
    nonces = {ChunkSealer.nonce(seq) for seq in (*range(1000), 2**32, 2**63, 2**64 - 1)}
    assert len(nonces) == 1003
    assert all(len(n) == 12 and n.startswith(b"tx->") for n in nonces)
    tx, _ = sealers()
    first = seal_frame(tx, 42, b"the same chunk")
    assert seal_frame(tx, 42, b"the same chunk") == first
    assert seal_frame(sealers()[0], 42, b"the same chunk") == first  # another thread's sealer
    other = seal_frame(tx, 43, b"the same chunk")
    assert other[DATA_HEADER_SIZE:-SEAL_OVERHEAD] != first[DATA_HEADER_SIZE:-SEAL_OVERHEAD]


# -- re-keying -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4096, DEFAULT_CHUNK_SIZE, 256 << 20, REKEY_BYTES,
                                        REKEY_BYTES * 2])
def test_rekey_before_the_limit(chunk_size: int) -> None:
    """The data key rolls over every REKEY_BYTES of sequence space (protocol.md 2.4: epoch
    ``seq // (2^36 // chunk_size)``, at least one chunk an epoch), far inside AES-GCM's
    ~2^38 bytes; the epoch key is the documented HMAC; the key really changes at the boundary
    and nowhere else."""
    assert REKEY_BYTES == 1 << 36 < 1 << 38
    key = hashlib.sha256(b"data key").digest()
    sealer = ChunkSealer(key, SESSION, chunk_size)
    per_epoch = max(1, (1 << 36) // chunk_size)
    assert per_epoch * chunk_size <= max(REKEY_BYTES, chunk_size)
    if chunk_size == DEFAULT_CHUNK_SIZE:
        assert per_epoch == 32768  # "with 2 MiB chunks an epoch is 32768 chunks"
    for epoch in (0, 1, 7, 2**20):
        first = epoch * per_epoch
        expected = hmac.new(key, b"epoch" + struct.pack("!Q", epoch), hashlib.sha256).digest()
        assert sealer.epoch_key(first) == expected
        assert sealer.epoch_key(first + per_epoch - 1) == expected
        assert sealer.epoch_key(first + per_epoch) != expected
        if first:
            assert sealer.epoch_key(first - 1) != expected


def test_both_ends_stay_in_step_across_rekeys() -> None:
    """Chunks sealed on both sides of several epoch boundaries open on a receiver that sees
    them in another order, long after its cache of epoch keys has moved on; a chunk past a
    boundary is really under the new key (the old one does not open it)."""
    chunk_size = REKEY_BYTES // 3  # three chunks an epoch: boundaries every few seqs
    tx, rx = sealers(chunk_size)
    per_epoch = 3
    seqs = [0, 1, 2, 3, 4, 5, 6, 29, 30, 31, 3000, 2**40, 2**40 + 1, 8, 0]
    frames = {seq: seal_frame(tx, seq, f"chunk {seq}".encode()) for seq in seqs}
    for seq in reversed(seqs):
        assert open_frame(rx, frames[seq]) == f"chunk {seq}".encode()
    boundary = frames[per_epoch]
    header, sealed = boundary[:DATA_HEADER_SIZE], boundary[DATA_HEADER_SIZE:]
    with pytest.raises(InvalidTag):
        AESGCM(tx.epoch_key(per_epoch - 1)).decrypt(ChunkSealer.nonce(per_epoch), sealed,
                                                    SESSION + header)
    assert AESGCM(tx.epoch_key(per_epoch)).decrypt(ChunkSealer.nonce(per_epoch), sealed,
                                                   SESSION + header) == b"chunk 3"


# -- tagged control frames -----------------------------------------------------------------


def connection_channels(keys: SessionKeys, th: bytes) -> tuple[Channel, Channel]:
    """The two ends' channels of the connection whose transcript hashed to ``th``, wired as
    keying.py wires them: (transmitter's, receiver's)."""
    to_rx, to_tx = keys.control(th)
    return (Channel(Tagger(to_rx), TagChecker(to_tx)), Channel(Tagger(to_tx), TagChecker(to_rx)))


FRAMES = [encode(Ack(seq, seq)) for seq in range(4)]


def test_tags_verify_in_order() -> None:
    """The baseline the failures below are measured against: in order, both ways, tags
    verify, and they are TAG_SIZE bytes."""
    keys = SessionKeys.derive(b"k" * 32, SESSION, b"t" * 32, b"r" * 32)
    tx, rx = connection_channels(keys, transcript(b"connection 1"))
    for frame in FRAMES:
        tag = rx.tagger.tag(frame)
        assert len(tag) == TAG_SIZE
        tx.checker.check(frame, tag)
        rx.checker.check(frame, tx.tagger.tag(frame))


@pytest.mark.parametrize("attack", ["other-connection", "replayed", "reflected", "reordered",
                                    "dropped", "changed", "forged-tag", "other-session"])
def test_tags_refuse(attack: str) -> None:
    """A control frame from another connection or session, replayed, sent back the other way,
    reordered, following a dropped one, changed, or with a made-up tag does not verify."""
    keys = SessionKeys.derive(b"k" * 32, SESSION, b"t" * 32, b"r" * 32)
    tx, rx = connection_channels(keys, transcript(b"connection 1"))
    tags = [rx.tagger.tag(frame) for frame in FRAMES]  # what the receiver sends, in order
    deliveries: list[tuple[bytes, bytes]] = list(zip(FRAMES, tags, strict=True))
    checker = tx.checker
    if attack == "other-connection":
        checker = connection_channels(keys, transcript(b"connection 2"))[0].checker
        deliveries = deliveries[:1]
    elif attack == "other-session":
        other = SessionKeys.derive(b"k" * 32, SESSION, b"t" * 32, b"R" * 32)
        checker = connection_channels(other, transcript(b"connection 1"))[0].checker
        deliveries = deliveries[:1]
    elif attack == "replayed":
        deliveries = [deliveries[0], deliveries[1], deliveries[1]]
    elif attack == "reflected":  # the transmitter's own frame comes back to it
        deliveries = [(FRAMES[0], tx.tagger.tag(FRAMES[0]))]
    elif attack == "reordered":  # frame 1 overtakes frame 0: refused as it arrives
        deliveries = [deliveries[1], deliveries[0]][:1]
    elif attack == "dropped":  # frame 1 lost: frame 2 is refused
        deliveries = [deliveries[0], deliveries[2]]
    elif attack == "changed":
        deliveries = [deliveries[0], (encode(Ack(1, 99)), tags[1])]
    elif attack == "forged-tag":
        deliveries = [deliveries[0], (FRAMES[1], bytes(TAG_SIZE))]
    *good, (last_frame, last_tag) = deliveries
    for frame, tag in good:
        checker.check(frame, tag)
    with pytest.raises(AuthFailed):
        checker.check(last_frame, last_tag)


def test_decoder_refuses_a_replayed_tagged_frame() -> None:
    """Through the codec, as the transmitter reads them: a tagged ACK replayed after itself
    is a TamperedFrame, not an event."""
    keys = SessionKeys.derive(b"k" * 32, SESSION, b"t" * 32, b"r" * 32)
    tx, rx = connection_channels(keys, transcript(b"connection 1"))
    decoder = Decoder.for_transmitter()
    decoder.checker = tx.checker
    welcome = encode(Welcome(WelcomeStatus.ACCEPTED, SESSION, 0), rx.tagger)
    ack = encode(Ack(0, 1), rx.tagger)
    decoder.receive_data(welcome + ack)
    assert isinstance(decoder.next_event(), Welcome)
    assert decoder.next_event() == Ack(0, 1)
    decoder.receive_data(ack)
    with pytest.raises(TamperedFrame):
        decoder.next_event()


# -- joins ---------------------------------------------------------------------------------


def test_join_agrees_and_gets_its_own_control_keys() -> None:
    """A join proves the session's keys and gives the connection control keys of its own:
    the connections' channels do not accept each other's frames."""
    keying, rx_keys = keyed_session()
    tx_a, rx_a, chan_tx_a, chan_rx_a = handshake(keying, PHRASE, rx_keys, conn_index=1)
    tx_b, rx_b, chan_tx_b, chan_rx_b = handshake(keying, PHRASE, rx_keys, conn_index=1)
    assert tx_a == rx_a == tx_b == rx_b == rx_keys  # a join derives no new session keys
    channels_talk(chan_tx_a, chan_rx_a)
    channels_talk(chan_tx_b, chan_rx_b)
    frame = b"BYE"
    with pytest.raises(AuthFailed):
        chan_rx_b.checker.check(frame, chan_tx_a.tagger.tag(frame))


def test_recorded_join_proves_nothing_later() -> None:
    """A join's proofs are bound to the receiver's fresh nonce (and the transmitter's): the
    whole recorded connection replayed to the receiver, the recorded answer replayed to the
    transmitter, or a recorded proof under another nonce, all fail with AuthFailed."""
    keying, rx_keys = keyed_session()
    frame = encode(hello(1))
    attempt = keying.start(frame)
    assert attempt.joining and attempt.auth.kind == AuthKind.JOIN
    rx1 = rx_attempt(frame, attempt.auth, keys=rx_keys, password=PHRASE, session_id=SESSION)
    proof = attempt.answer(rx1.auth)
    rx1.check(proof)  # the genuine join

    rx2 = rx_attempt(frame, attempt.auth, keys=rx_keys, password=PHRASE, session_id=SESSION)
    assert rx2.auth.nonce != rx1.auth.nonce
    with pytest.raises(AuthFailed):
        rx2.check(proof)

    later = keying.start(frame)
    with pytest.raises(AuthFailed):
        later.answer(rx1.auth)
    rx3 = rx_attempt(frame, later.auth, keys=rx_keys, password=PHRASE, session_id=SESSION)
    with pytest.raises(AuthFailed):
        later.answer(replace(rx3.auth, nonce=rx1.auth.nonce))
    with pytest.raises(AuthFailed):
        later.answer(replace(rx3.auth, proof=rx1.auth.proof))
    later.answer(rx3.auth)  # the genuine answer still passes

    # The join keys are not the key exchange's: the same transcript gets other proofs.
    th = transcript(b"some transcript")
    assert rx_keys.prove_rx(th, join=True) != rx_keys.prove_rx(th, join=False)
    assert rx_keys.prove_tx(th, join=True) != rx_keys.prove_tx(th, join=False)


def test_join_with_another_sessions_keys_fails() -> None:
    """A receiver keyed by another session (same phrase) cannot prove a join."""
    keying, _ = keyed_session()
    _, stranger_keys = keyed_session()
    frame = encode(hello(1))
    attempt = keying.start(frame)
    rx = rx_attempt(frame, attempt.auth, keys=stranger_keys, password=PHRASE,
                    session_id=SESSION)
    with pytest.raises(AuthFailed):
        attempt.answer(rx.auth)


# -- the handshake with a hostile network ----------------------------------------------------


@functools.cache
def earlier_run() -> tuple[bytes, ...]:
    """Every frame of an earlier, honest session on the same phrase and session id (a key
    exchange and a join), for the attacker to replay."""
    keying = TxKeying(PHRASE, SESSION, Entropy(b"earlier tx"))
    rx_entropy = Entropy(b"earlier rx")
    rx_keys: SessionKeys | None = None
    frames: list[bytes] = []
    for index in range(2):
        frame = encode(hello(index))
        attempt = keying.start(frame)
        rx = rx_attempt(frame, attempt.auth, keys=rx_keys, password=PHRASE, session_id=SESSION,
                        entropy=rx_entropy)
        proof = attempt.answer(rx.auth)
        channel = rx.check(proof)
        rx_keys = rx.keys
        attempt.channel()
        attempt.welcomed()
        frames += [frame, encode(attempt.auth), encode(rx.auth), encode(proof),
                   encode(Welcome(WelcomeStatus.ACCEPTED, SESSION, 0), channel.tagger)]
    return tuple(frames)


OPEN = ("hello", "auth", "proof", "answer", "welcome")  # states of an end still handshaking


class TxEnd:
    """The transmitter's side of one connection, driven as transmitter.py drives a
    TxAttempt."""

    def __init__(self, attempt: TxAttempt, hello_event: Hello) -> None:
        self.attempt = attempt
        self.hello = hello_event
        self.decoder = Decoder.for_transmitter()
        self.state = "answer"
        self.sent: list[bytes] = []  # frames, as they left this end
        self.got: list[bytes] = []  # frames, as they reached it while it was handshaking
        self.channel: Channel | None = None
        self.keys: SessionKeys | None = None


class RxEnd:
    """The receiver's side of one connection, driven as receiver.py drives rx_attempt."""

    def __init__(self) -> None:
        self.decoder = Decoder.for_receiver()
        self.state = "hello"
        self.hello: Hello | None = None
        self.attempt: RxAttempt | None = None
        self.sent: list[bytes] = []
        self.got: list[bytes] = []
        self.channel: Channel | None = None
        self.keys: SessionKeys | None = None


def unused_fields_cleared(frames: list[bytes]) -> list[bytes]:
    """The frames with the nonce and pake of the third AUTH zeroed: protocol.md 2.2 says the
    receiver does not look at them, so changing them is no tampering."""
    out = list(frames)
    if len(out) > 2:  # HELLO, AUTH, then the proof: the third frame the receiver reads
        out[2] = out[2][:2] + bytes(65) + out[2][67:]
    return out


def frame_kind(frame: bytes) -> str:
    return {0x48: "hello", 0x4B: "auth", 0x57: "welcome"}.get(frame[0], "other")


def flipped(frame: bytes, bit: int) -> bytes:
    """The frame with one bit flipped; ``bit`` counts from the type byte (small values, which
    Hypothesis favours, hit the type, kind and first fields)."""
    out = bytearray(frame)
    bit %= 8 * len(out)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


#: Byte offsets that land in every field of HELLO, AUTH and a tagged WELCOME (taken modulo
#: the frame's length): type, kind or status, magic, version, mode, ids, nonce, pake, proof,
#: counters, tag.  Uniform bits would almost never hit a one-byte field.
SPOTS = [0, 1, 2, 5, 8, 12, 20, 27, 30, 34, 37, 40, 50, 67, 80, 98]
bits = st.builds(lambda spot, bit: 8 * spot + bit, st.sampled_from(SPOTS),
                 st.integers(min_value=0, max_value=7))
settles = st.sampled_from([True, True, False])  # mostly follow an attack through
Plan = tuple[int, str, int]  # frames to let pass, what to do to the next, a bit or an index
plans = st.tuples(st.integers(min_value=0, max_value=6),
                  st.sampled_from(["flip", "replay", "duplicate", "drop"]),
                  bits).map(lambda plan: plan if plan[0] < 5 else None)  # 2 in 7: none
queues = st.booleans()  # True: towards the receiver
picks = st.integers(min_value=0, max_value=3)
MAX_CONNECTIONS = 4


class HostileHandshake(RuleBasedStateMachine):
    """An honest transmitter and receiver (same secret phrase) handshake connection after
    connection while the network in between delivers, drops, duplicates, reorders, flips bits
    in, injects made-up AUTH frames into, and replays HELLO, AUTH and WELCOME frames of this
    and an earlier session, and an impostor without the phrase answers or opens connections.
    Whatever happens: an end finishes only on the very frames its honest peer sent; both ends
    never finish with different keys; every failure is AuthFailed, a protocol error (the
    decoder's, a refused tag included) or a refusal, never another exception; and with
    nobody meddling, both ends finish.

    Each attack may be followed by the network behaving (``settle``), so that single attacks
    are followed through to the end of the handshake, where they must be caught."""

    def __init__(self) -> None:
        super().__init__()
        self.tx_entropy = Entropy(b"tx")
        self.rx_entropy = Entropy(b"rx")
        self.adversary = Entropy(b"adversary")
        self.keying = TxKeying(PHRASE, SESSION, self.tx_entropy)
        self.rx_keys: SessionKeys | None = None  # the receiver's session keys
        self.recorded: list[bytes] = list(earlier_run())
        self.connections = 0
        self.tx: TxEnd
        self.rx: RxEnd
        self.to_rx: list[bytes] = []
        self.to_tx: list[bytes] = []
        self.meddled = False
        self.probed = False
        self._then_settle = False
        self.plans: list[Plan] = []

    # -- the honest ends -------------------------------------------------------------------

    @initialize(plan=plans, settle=settles)
    def first_connection(self, plan: Plan | None, settle: bool) -> None:
        self._connect(plan, settle)

    @precondition(lambda self: self.connections < MAX_CONNECTIONS)
    @rule(plan=plans, settle=settles)
    def reconnect(self, plan: Plan | None, settle: bool) -> None:
        """The transmitter gives up on the connection (done, failed or stuck) and opens a
        new one: a join once its session is keyed, else the key exchange again."""
        self._connect(plan, settle)

    def _connect(self, plan: Plan | None, settle: bool) -> None:
        """A new connection.  ``plan``: the network lets ``wait`` frames of the connection
        pass, then flips a bit in, swaps for an earlier frame of the same kind, duplicates or
        drops the next one, whichever end sends it: so an attack can land on any step of the
        handshake (HELLO, AUTH, AUTH, AUTH, WELCOME).  ``settle``: the network then delivers
        everything, so the attack is followed through to where it must be caught."""
        event_hello = hello(self.connections % 2)
        frame = encode(event_hello)
        attempt = self.keying.start(frame)
        self.connections += 1
        self.tx, self.rx = TxEnd(attempt, event_hello), RxEnd()
        self.to_rx, self.to_tx = [], []
        self.probed = False
        self.meddled = plan is not None
        self.plans = [] if plan is None else [plan]
        self._send(True, frame)
        self._send(True, encode(attempt.auth))
        if settle:
            self._settle()

    def _send(self, to_rx: bool, frame: bytes) -> None:
        (self.tx if to_rx else self.rx).sent.append(frame)
        earlier = list(self.recorded)
        self.recorded.append(frame)
        queue = self.to_rx if to_rx else self.to_tx
        plans, self.plans = self.plans, []
        copies = 1
        for wait, how, arg in plans:
            if wait:
                self.plans.append((wait - 1, how, arg))
            elif how == "flip":
                frame = flipped(frame, arg)
            elif how == "replay":  # an earlier frame of the same kind, recent ones likelier
                seen = [f for f in earlier if frame_kind(f) == frame_kind(frame)]
                frame = seen[-1 - arg % 8 % len(seen)]
            else:
                copies = {"duplicate": 2, "drop": 0}[how] * copies
        queue += [frame] * copies

    def _tx_event(self, ev: Event) -> None:
        tx = self.tx
        if tx.state == "answer":
            if isinstance(ev, Welcome):  # an untagged refusal: give up on this connection
                tx.state = "refused"
                return
            assert isinstance(ev, Auth)  # the decoder lets nothing else open a connection
            proof = tx.attempt.answer(ev)
            tx.channel = tx.attempt.channel()
            tx.decoder.checker = tx.channel.checker
            tx.state = "welcome"
            self._send(True, encode(proof))
            return
        if not (isinstance(ev, Welcome) and ev.status == WelcomeStatus.ACCEPTED
                and ev.session_id == SESSION):  # transmitter.check_welcome
            tx.state = "protocol"
            return
        tx.keys = tx.attempt.welcomed()
        tx.state = "done"

    def _rx_event(self, ev: Event) -> None:
        rx = self.rx
        if rx.state == "hello":
            assert isinstance(ev, Hello)  # the decoder lets nothing else open a connection
            rx.hello = ev
            rx.state = "auth"
            return
        assert rx.hello is not None
        if rx.state == "auth":
            if not isinstance(ev, Auth):
                raise ProtocolError(f"{type(ev).__name__} where AUTH belongs")
            if ev.kind not in (AuthKind.PAKE, AuthKind.JOIN) or (
                    ev.kind == AuthKind.JOIN and self.rx_keys is None):
                self._refuse(WelcomeStatus.WRONG_SESSION)  # as rxcore.admit does
                return
            rx.attempt = rx_attempt(encode(rx.hello), ev, keys=self.rx_keys, password=PHRASE,
                                    session_id=rx.hello.session_id, entropy=self.rx_entropy)
            rx.state = "proof"
            self._send(False, encode(rx.attempt.auth))
            return
        assert rx.attempt is not None
        pake = rx.attempt.kind is AuthKind.PAKE
        try:
            if not isinstance(ev, Auth):
                raise AuthFailed("no proof")
            rx.channel = rx.attempt.check(ev)
        except AuthFailed:
            if pake:
                self._refuse(WelcomeStatus.BAD_CHECKPHRASE)
            raise
        rx.keys = rx.attempt.keys
        if pake:
            self.rx_keys = rx.keys
        rx.state = "done"
        welcome = Welcome(WelcomeStatus.ACCEPTED, rx.hello.session_id, 0)
        self._send(False, encode(welcome, rx.channel.tagger))

    def _refuse(self, status: WelcomeStatus) -> None:
        self._send(False, encode(Welcome(status, bytes(16), 0)))
        self.rx.state = "refused"

    def _arrive(self, to_rx: bool, frame: bytes) -> None:
        """Feed a frame to an end still handshaking; it may fail only with AuthFailed or a
        protocol error: anything else escapes and fails the test."""
        end: TxEnd | RxEnd = self.rx if to_rx else self.tx
        if end.state not in OPEN:
            return  # done (the data phase is not modelled here), or closed
        end.got.append(frame)
        try:
            end.decoder.receive_data(frame)
            while end.state in OPEN:
                ev = end.decoder.next_event()
                if ev is NEED_DATA:
                    break
                assert not isinstance(ev, type(NEED_DATA))
                (self._rx_event if to_rx else self._tx_event)(ev)
        except AuthFailed:
            end.state = "auth-failed"
        except ProtocolError:
            end.state = "protocol"

    def _settle(self) -> None:
        while self.to_rx or self.to_tx:
            if self.to_rx:
                self._arrive(True, self.to_rx.pop(0))
            if self.to_tx:
                self._arrive(False, self.to_tx.pop(0))

    def _meddle(self, to_rx: bool, settle: bool) -> list[bytes]:
        """Mark the connection as meddled with; the queue to meddle with."""
        self.meddled = True
        self._then_settle = settle
        return self.to_rx if to_rx else self.to_tx

    def _after(self) -> None:
        if self._then_settle:
            self._settle()

    # -- the network -----------------------------------------------------------------------

    @rule(to_rx=queues, pick=picks)
    def deliver(self, to_rx: bool, pick: int) -> None:
        """The next frame arrives, or (pick > 0) one sent after it overtakes it."""
        queue = self.to_rx if to_rx else self.to_tx
        if queue:
            index = pick % len(queue)
            self.meddled |= index > 0
            self._arrive(to_rx, queue.pop(index))

    @rule()
    def deliver_everything(self) -> None:
        """The network behaves for a while: everything in flight, and every answer to it,
        arrives in order."""
        self._settle()

    @rule(to_rx=queues, pick=picks, settle=st.booleans())
    def drop(self, to_rx: bool, pick: int, settle: bool) -> None:
        queue = self._meddle(to_rx, settle)
        if queue:
            del queue[pick % len(queue)]
        self._after()

    @rule(to_rx=queues, pick=picks, settle=st.booleans())
    def duplicate(self, to_rx: bool, pick: int, settle: bool) -> None:
        queue = self._meddle(to_rx, settle)
        if queue:
            index = pick % len(queue)
            queue.insert(index, queue[index])
        self._after()

    @rule(to_rx=queues, pick=picks, bit=bits, settle=st.booleans())
    def flip(self, to_rx: bool, pick: int, bit: int, settle: bool) -> None:
        queue = self._meddle(to_rx, settle)
        if queue:
            index = pick % len(queue)
            queue[index] = flipped(queue[index], bit)
        self._after()

    @rule(to_rx=queues, kind=st.sampled_from(["hello", "auth", "welcome", "other"]),
          which=st.integers(min_value=0, max_value=64), where=picks, settle=st.booleans())
    def replay(self, to_rx: bool, kind: str, which: int, where: int, settle: bool) -> None:
        """A HELLO, AUTH or WELCOME seen so far (recent ones likelier), on any connection of
        this or the earlier session, in either direction, goes in anywhere."""
        queue = self._meddle(to_rx, settle)
        seen = [f for f in self.recorded if frame_kind(f) == kind] or self.recorded
        queue.insert(where % (len(queue) + 1), seen[-1 - which % len(seen)])
        self._after()

    @rule(to_rx=queues, kind=st.integers(min_value=0, max_value=3),
          body=st.binary(min_size=97, max_size=97), where=picks, settle=st.booleans())
    def inject_auth(self, to_rx: bool, kind: int, body: bytes, where: int,
                    settle: bool) -> None:
        """A made-up AUTH: any kind, nonce, key exchange message and proof."""
        queue = self._meddle(to_rx, settle)
        frame = encode(Auth(kind, body[:32], body[32:65], body[65:]))
        queue.insert(where % (len(queue) + 1), frame)
        self._after()

    @rule(tag=st.binary(min_size=TAG_SIZE, max_size=TAG_SIZE), settle=st.booleans())
    def forge_welcome(self, tag: bytes, settle: bool) -> None:
        """A WELCOME accepting the transmitter, with a made-up tag, ahead of the real one."""
        queue = self._meddle(False, settle)
        queue.insert(0, encode(Welcome(WelcomeStatus.ACCEPTED, SESSION, 0)) + tag)
        self._after()

    @rule(settle=st.booleans())
    def impostor_answers(self, settle: bool) -> None:
        """Someone without the phrase answers the transmitter's first AUTH itself, running
        the key exchange (or a join) with a guess, ahead of the real receiver."""
        queue = self._meddle(False, settle)
        first = decode_auth(self.tx.sent[1])
        if first.kind == AuthKind.PAKE:
            fake = rx_attempt(self.tx.sent[0], first, keys=None, password=WRONG,
                              session_id=SESSION, entropy=self.adversary).auth
        else:
            fake = Auth(AuthKind.JOIN, self.adversary(32), proof=self.adversary(32))
        queue.insert(0, encode(fake))
        self._after()

    @rule(settle=st.booleans())
    def impostor_opens(self, settle: bool) -> None:
        """Someone without the phrase opens a key exchange with the receiver, ahead of the
        transmitter's frames."""
        queue = self._meddle(True, settle)
        frame = encode(hello())
        queue[:0] = [frame, encode(TxKeying(WRONG, SESSION, self.adversary).start(frame).auth)]
        self._after()

    # -- what must hold --------------------------------------------------------------------

    @invariant()
    def finished_only_on_genuine_frames(self) -> None:
        """An end that finished read exactly the frames its honest peer sent, byte for byte,
        nothing added, removed or altered (bar the fields nobody reads)."""
        if self.rx.state == "done":
            assert unused_fields_cleared(self.rx.got) == unused_fields_cleared(self.tx.sent)
        if self.tx.state == "done":
            assert self.tx.got == self.rx.sent

    @invariant()
    def never_different_keys(self) -> None:
        """A finished transmitter means a receiver finished with the very same keys on this
        connection (the WELCOME's tag proves it), and their tags work both ways; and the
        transmitter's session keys, once it has any, are the receiver's."""
        if self.tx.state == "done":
            assert self.rx.state == "done"
            assert self.tx.keys == self.rx.keys
            assert self.tx.channel is not None and self.rx.channel is not None
            if not self.probed:
                self.probed = True
                channels_talk(self.tx.channel, self.rx.channel)
        if self.keying.keys is not None:
            assert self.keying.keys == self.rx_keys

    @invariant()
    def honest_network_finishes(self) -> None:
        """Nobody meddled and nothing is in flight: both ends are through."""
        if not self.meddled and not self.to_rx and not self.to_tx:
            assert (self.tx.state, self.rx.state) == ("done", "done")


def decode_auth(frame: bytes) -> Auth:
    """An AUTH frame as the receiver's decoder reads it (after a HELLO)."""
    decoder = Decoder.for_transmitter()
    decoder.receive_data(frame)
    ev = decoder.next_event()
    assert isinstance(ev, Auth)
    return ev


TestHostileHandshake = HostileHandshake.TestCase
TestHostileHandshake.settings = settings(max_examples=60, stateful_step_count=30,
                                         deadline=None)


# -- the record layer with a hostile network -------------------------------------------------

WINDOW = 5
LAST_SEQ = 40
EPOCH_CHUNK_SIZE = REKEY_BYTES // 4  # four chunks an epoch: a window spans a rekey


class HostileRecords(RuleBasedStateMachine):
    """A transmitter seals chunks anywhere in its window (re-sending sealed ones byte for
    byte) as the window moves across several re-keys; the network delivers, drops,
    duplicates, reorders, flips bits in, truncates, swaps headers between, and brings frames
    of another session.  The receiver opens every frame that arrives: each one that opens is
    exactly what was sealed for its seq, and each altered one fails with AuthFailed."""

    def __init__(self) -> None:
        super().__init__()
        key = hashlib.sha256(b"record layer").digest()
        self.sealer = ChunkSealer(key, SESSION, EPOCH_CHUNK_SIZE)
        self.opener = ChunkSealer(key, SESSION, EPOCH_CHUNK_SIZE)
        self.stranger = ChunkSealer(key, bytes(16), EPOCH_CHUNK_SIZE)
        self.prober = ChunkSealer(key, SESSION, EPOCH_CHUNK_SIZE)  # never sends anything
        self.keystreams: dict[bytes, int] = {}
        self.base = 0  # the receiver's written: the window is [base, base + WINDOW)
        self.plain: dict[int, bytes] = {}
        self.sealed: dict[int, bytes] = {}
        self.channel: list[bytes] = []

    @rule(offset=st.integers(min_value=0, max_value=WINDOW - 1),
          data=st.binary(min_size=1, max_size=48))
    def send(self, offset: int, data: bytes) -> None:
        """Seal the chunk at a seq of the window, or re-send it if sealed already: a seq is
        sealed once, and sealing it again would give the same bytes anyway."""
        seq = self.base + offset
        if seq not in self.sealed:
            self.plain[seq] = data
            self.sealed[seq] = seal_frame(self.sealer, seq, data)
            # Each seq has a keystream of its own (nonce and epoch key): zeros sealed at it, by
            # a sealer that sends nothing, show it.  A repeat would be a reused nonce.
            stream = seal_frame(self.prober, seq, bytes(32))[DATA_HEADER_SIZE:-SEAL_OVERHEAD]
            assert self.keystreams.setdefault(stream, seq) == seq
        assert seal_frame(self.sealer, seq, self.plain[seq]) == self.sealed[seq]
        self.channel.append(self.sealed[seq])

    @precondition(lambda self: self.base < LAST_SEQ)
    @rule(n=st.integers(min_value=1, max_value=WINDOW))
    def advance(self, n: int) -> None:
        """The receiver wrote the chunks below: the window moves on, maybe into the next
        epoch."""
        self.base = min(self.base + n, LAST_SEQ)

    def _arrive(self, frame: bytes) -> None:
        """The receiver opens a frame that arrived: it opens if and only if it is exactly a
        frame the transmitter sealed, and then gives exactly that chunk; anything else fails
        with AuthFailed, and only with AuthFailed."""
        _, seq, _, _ = DATA_HEADER.unpack(frame[:DATA_HEADER_SIZE])
        genuine = self.sealed.get(seq) == frame
        try:
            plain = open_frame(self.opener, frame)
        except AuthFailed:
            assert not genuine, f"chunk {seq} as sealed did not open"
            return
        assert genuine, f"an altered frame opened as chunk {seq}"
        assert plain == self.plain[seq]

    @rule(pick=picks)
    def deliver(self, pick: int) -> None:
        """A frame arrives (pick > 0: out of order)."""
        if self.channel:
            self._arrive(self.channel.pop(pick % len(self.channel)))

    @rule()
    def deliver_everything(self) -> None:
        """Everything in flight arrives, in order."""
        while self.channel:
            self._arrive(self.channel.pop(0))

    @rule(pick=picks)
    def drop(self, pick: int) -> None:
        if self.channel:
            del self.channel[pick % len(self.channel)]

    @rule(pick=picks)
    def duplicate(self, pick: int) -> None:
        if self.channel:
            index = pick % len(self.channel)
            self.channel.insert(index, self.channel[index])

    @rule(pick=picks, field=st.sampled_from(["type", "seq", "length", "checksum", "sealed",
                                             "tag"]),
          offset=st.integers(min_value=0, max_value=63), bit=st.integers(min_value=0,
                                                                        max_value=7))
    def flip(self, pick: int, field: str, offset: int, bit: int) -> None:
        """One bit of a frame in flight flips, in the field named: each header field is
        associated data; ``sealed`` is anywhere in the ciphertext and tag, ``tag`` in the
        last 16 bytes."""
        if self.channel:
            index = pick % len(self.channel)
            frame = self.channel[index]
            tail = len(frame) - DATA_HEADER_SIZE
            at = {"type": 0, "seq": 1 + offset % 8, "length": 9 + offset % 4,
                  "checksum": 13 + offset % 4,
                  "sealed": DATA_HEADER_SIZE + offset % tail if tail else 0,
                  "tag": len(frame) - 1 - offset % min(SEAL_OVERHEAD, tail) if tail else 0,
                  }[field]
            self.channel[index] = flipped(frame, 8 * at + bit)

    @rule(pick=picks, keep=st.integers(min_value=0, max_value=80))
    def truncate(self, pick: int, keep: int) -> None:
        """The frame loses its tail (the header stays whole, so the seq is still read)."""
        if self.channel:
            index = pick % len(self.channel)
            frame = self.channel[index]
            if len(frame) > DATA_HEADER_SIZE:
                self.channel[index] = frame[: DATA_HEADER_SIZE
                                            + keep % (len(frame) - DATA_HEADER_SIZE)]

    @rule(first=picks, second=picks)
    def swap_headers(self, first: int, second: int) -> None:
        """Two frames in flight trade headers: each body now claims the other's seq."""
        if len(self.channel) >= 2:
            i, j = first % len(self.channel), second % len(self.channel)
            a, b = self.channel[i], self.channel[j]
            self.channel[i] = b[:DATA_HEADER_SIZE] + a[DATA_HEADER_SIZE:]
            self.channel[j] = a[:DATA_HEADER_SIZE] + b[DATA_HEADER_SIZE:]

    @rule(offset=st.integers(min_value=0, max_value=WINDOW - 1),
          data=st.binary(min_size=1, max_size=48))
    def other_session(self, offset: int, data: bytes) -> None:
        """A chunk sealed for the same seq under the same data key, but for another session
        id, is slipped in."""
        self.channel.append(seal_frame(self.stranger, self.base + offset, data))


TestHostileRecords = HostileRecords.TestCase
TestHostileRecords.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_entropy_is_deterministic_and_distinct() -> None:
    """The state machines rely on it: the same label replays the same bytes, another label
    gives others (so no two parties share a nonce)."""
    assert Entropy(b"a")(32) == Entropy(b"a")(32) != Entropy(b"b")(32)
    stream = Entropy(b"a")
    assert stream(32) != stream(32)
