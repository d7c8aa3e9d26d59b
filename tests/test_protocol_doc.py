"""The vectors of ``docs/protocol.md`` agree with the code.

Golden vectors (section 9) agree with the encoder and both decoders.  Derived vectors (section
10) agree with the Python listed in the document, which computes them from fixed inputs with
nothing but the standard library, ``cryptography`` and ``spake2``; and the handshake and sealing
code, given the same inputs, produces the same bytes and accepts the frames.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from viamillipede import wire
from viamillipede.keying import Channel, TxKeying, rx_attempt
from viamillipede.wire import frames, secure

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

VECTOR = re.compile(
    r"^<!-- vector: (?P<name>[a-z0-9-]+) -->\n"
    r"event: (?P<event>.+)\n"
    r"```hex\n(?P<hex>(?:[0-9a-f]{2}(?: [0-9a-f]{2}){0,15}\n)+)```$",
    re.MULTILINE,
)

#: The Python of section 10 that computes the derived vectors: exactly one such block.
DERIVATION = re.compile(r"^<!-- derivation -->\n```python\n(?P<code>.*?)^```$",
                        re.MULTILINE | re.DOTALL)

#: A derived vector (section 10): a ``<!-- derived: NAME -->`` line, a ``value: VARIABLE`` line
#: naming the variable of the derivation that holds it, then its bytes as a hex block.
DERIVED = re.compile(
    r"^<!-- derived: (?P<name>[a-z0-9-]+) -->\n"
    r"value: (?P<value>[a-z_][a-z0-9_]*)\n"
    r"```hex\n(?P<hex>(?:[0-9a-f]{2}(?: [0-9a-f]{2}){0,15}\n)+)```$",
    re.MULTILINE,
)

#: Frame types a receiver decodes (sent by the transmitter) and a transmitter decodes.
TO_RECEIVER = (wire.Hello, wire.Auth, wire.Data, wire.Bye, wire.Fin, wire.Error)
TO_TRANSMITTER = (wire.Auth, wire.Welcome, wire.Ack, wire.ByeOk, wire.Error)
FRAME_TYPES = (
    wire.Hello, wire.Auth, wire.Welcome, wire.Data, wire.Ack, wire.Bye, wire.ByeOk, wire.Fin,
    wire.Error,
)

#: Every frame type code declared in frames.py, by name ("BYE_OK": 0x62, ...).
TYPE_CODES = {name[2:]: code for name, code in vars(frames).items() if name.startswith("T_")}


def _hex(name: str, block: str) -> bytes:
    lines = block.splitlines()
    assert all(len(line.split()) == 16 for line in lines[:-1]), f"{name}: 16 bytes a line"
    return bytes.fromhex(block)


def _load() -> dict[str, tuple[wire.Event, bytes]]:
    text = DOC.read_text(encoding="utf-8")
    vectors: dict[str, tuple[wire.Event, bytes]] = {}
    for m in VECTOR.finditer(text):
        name = m["name"]
        assert name not in vectors, f"vector {name} appears twice"
        event = eval(m["event"], dict(vars(wire)))  # the doc is ours; names from wire only
        vectors[name] = (event, _hex(name, m["hex"]))
    # A vector the regex cannot read must fail loudly, not vanish from the checks.
    assert len(vectors) == text.count("<!-- vector:"), "a vector in docs/protocol.md is malformed"
    return vectors


def _load_derived() -> tuple[dict[str, object], dict[str, tuple[str, bytes]]]:
    """The namespace the document's derivation leaves, and each derived vector as (variable,
    documented bytes)."""
    text = DOC.read_text(encoding="utf-8")
    blocks = list(DERIVATION.finditer(text))
    assert len(blocks) == 1 == text.count("<!-- derivation -->"), \
        "docs/protocol.md needs exactly one well-formed derivation block"
    namespace: dict[str, object] = {"__name__": "protocol_md_derivation"}
    exec(compile(blocks[0]["code"], f"{DOC}:derivation", "exec"), namespace)  # the doc is ours
    derived: dict[str, tuple[str, bytes]] = {}
    for m in DERIVED.finditer(text):
        name = m["name"]
        assert name not in derived, f"derived vector {name} appears twice"
        derived[name] = (m["value"], _hex(name, m["hex"]))
    assert len(derived) == len(re.findall(r"^<!-- derived:", text, re.MULTILINE)), \
        "a derived vector in docs/protocol.md is malformed"
    return namespace, derived


VECTORS = _load()
DERIVATION_NS, DERIVED_VECTORS = _load_derived()


def _decode(decoder: wire.Decoder, data: bytes) -> list[wire.Event]:
    decoder.receive_data(data)
    decoder.receive_data(b"")
    events: list[wire.Event] = []
    while not isinstance(event := decoder.next_event(), wire.ConnectionClosed):
        assert event is not wire.NEED_DATA
        events.append(event)
    return events


def _decoders_for(event: wire.Event) -> list[tuple[wire.Decoder, wire.Event | None]]:
    """Fresh decoders that must accept ``event``, each with the opening frame to feed first."""
    hello = VECTORS["hello-basic"][0]
    welcome = VECTORS["welcome-accepted"][0]
    out: list[tuple[wire.Decoder, wire.Event | None]] = []
    if isinstance(event, TO_RECEIVER):
        out.append((wire.Decoder.for_receiver(), None if isinstance(event, wire.Hello) else hello))
    if isinstance(event, TO_TRANSMITTER):
        opening = None if isinstance(event, (wire.Welcome, wire.Auth)) else welcome
        out.append((wire.Decoder.for_transmitter(), opening))
    return out


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_encodes_to_documented_bytes(name: str) -> None:
    event, data = VECTORS[name]
    assert wire.encode(event) == data


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_decodes_to_documented_event(name: str) -> None:
    event, data = VECTORS[name]
    decoders = _decoders_for(event)
    assert decoders, f"{name}: no decoder takes {type(event).__name__}"
    for decoder, opening in decoders:
        prefix = b"" if opening is None else wire.encode(opening)
        expected = [event] if opening is None else [opening, event]
        assert _decode(decoder, prefix + data) == expected


def test_every_frame_type_has_a_vector() -> None:
    have = {type(event) for event, _ in VECTORS.values()}
    missing = [t.__name__ for t in FRAME_TYPES if t not in have]
    assert not missing, f"no golden vector for {missing}"
    # A type code added to frames.py without a vector here fails too.
    codes = {data[0] for _, data in VECTORS.values()}
    assert codes == set(TYPE_CODES.values()) == set(frames.BODIES)


def test_session_over_vector_is_answered_by_the_fin_vector() -> None:
    """The lost-BYE_OK example: SESSION_OVER for our session, all chunks written, and FIN."""
    welcome, _ = VECTORS["welcome-session-over"]
    fin, _ = VECTORS["fin-basic"]
    bye, _ = VECTORS["bye-basic"]
    hello, _ = VECTORS["hello-basic"]
    assert isinstance(welcome, wire.Welcome) and isinstance(fin, wire.Fin)
    assert isinstance(bye, wire.Bye) and isinstance(hello, wire.Hello)
    assert welcome.status == wire.WelcomeStatus.SESSION_OVER
    assert welcome.session_id == hello.session_id
    assert welcome.written == fin.chunks == bye.chunks
    assert fin.nbytes == bye.nbytes


def test_data_vector_checksums_are_crc32() -> None:
    event, _ = VECTORS["data-crc32"]
    assert isinstance(event, wire.Data)
    assert event.checksum == zlib.crc32(event.payload)
    hello, _ = VECTORS["hello-basic"]
    assert isinstance(hello, wire.Hello)
    assert hello.features & wire.Feature.CHECKSUM_MASK == 1


def test_data_z_vector_decodes_to_its_checksummed_chunk() -> None:
    """The DATA_Z vector's payload is one zstd frame that our own decoder takes, and its
    checksum is that of the decoded chunk (not of the compressed bytes)."""
    from viamillipede.squeeze import Squeezer

    event, data = VECTORS["data-z-crc32"]
    assert isinstance(event, wire.Data) and event.compressed and data[0] == ord("Z")
    out = bytearray(1000)
    n = Squeezer().decompress_into(memoryview(event.payload), memoryview(out))
    assert bytes(out[:n]) == b"millipede " * 12
    assert event.checksum == zlib.crc32(out[:n]) != zlib.crc32(event.payload)


def test_error_vectors_carry_text() -> None:
    errors = [e for e, _ in VECTORS.values() if isinstance(e, wire.Error)]
    assert errors and all(e.message for e in errors)
    assert any(not e.message.isascii() for e in errors), "keep one non-ASCII ERROR text"


def test_documented_sizes_match_frames() -> None:
    """The framing table has a row for every type code, with the declared fixed size, and
    section 2 a heading for it."""
    text = DOC.read_text(encoding="utf-8")
    assert set(TYPE_CODES) == {
        "HELLO", "AUTH", "WELCOME", "DATA", "DATA_Z", "ACK", "BYE", "BYE_OK", "FIN", "ERROR"}
    for name, code in TYPE_CODES.items():
        row = re.search(rf"^\| {name} \| `0x{code:02x}` \| `{chr(code)}` \|.*?\| (\d+) \|", text,
                        re.MULTILINE)
        assert row, f"no framing-table row for {name}"
        assert int(row[1]) == frames.FIXED_SIZE[code], name
        heading = rf"^### 2\.\d+ {name} \(`0x{code:02x}`, {frames.FIXED_SIZE[code]} bytes"
        assert re.search(heading, text, re.MULTILINE), f"no section 2 heading for {name}"


def _accepts(factory: Callable[[], wire.Decoder], opening: wire.Event, data: bytes) -> bool:
    """Whether a fresh decoder takes ``data`` as its first frame or right after ``opening``."""
    for prefix in (b"", wire.encode(opening)):
        decoder = factory()
        decoder.receive_data(prefix + data)
        try:
            if prefix:
                decoder.next_event()
            if decoder.next_event() is not wire.NEED_DATA:
                return True
        except wire.ProtocolError:
            pass
    return False


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_documented_direction_matches_the_decoders(name: str) -> None:
    """The direction column of the framing table says which decoder takes the frame."""
    _, data = VECTORS[name]
    kind = next(k for k, code in TYPE_CODES.items() if code == data[0])
    text = DOC.read_text(encoding="utf-8")
    row = re.search(rf"^\| {kind} \| [^|]+\| [^|]+\| ([^|]+) \|", text, re.MULTILINE)
    assert row, kind
    direction = row[1].strip()
    to_receiver = _accepts(wire.Decoder.for_receiver, VECTORS["hello-basic"][0], data)
    to_transmitter = _accepts(wire.Decoder.for_transmitter, VECTORS["welcome-accepted"][0], data)
    expected = {
        "transmitter → receiver": (True, False),
        "receiver → transmitter": (False, True),
        "either way": (True, True),
    }
    assert (to_receiver, to_transmitter) == expected[direction], f"{kind}: {direction}"


def test_documented_tags_match_frames() -> None:
    """The framing table's last column says which frames carry a tag after the handshake."""
    text = DOC.read_text(encoding="utf-8")
    for name, code in TYPE_CODES.items():
        row = re.search(rf"^\| {name} \| `0x{code:02x}` \|.*\| ([^|]+) \|$", text, re.MULTILINE)
        assert row, f"no framing-table row for {name}"
        tagged = row[1].strip() == f"{secure.TAG_SIZE} bytes"
        assert tagged == (code in frames.TAGGED), f"{name}: tag column says {row[1].strip()!r}"


def test_sealed_hello_vectors_announce_no_checksum() -> None:
    """A sealed session's transmitter drops the checksum (the GCM tag covers every byte), so a
    HELLO vector with a checksum must be a plaintext one."""
    hellos = [e for e, _ in VECTORS.values() if isinstance(e, wire.Hello)]
    assert any(h.mode & wire.Mode.PLAINTEXT for h in hellos)
    assert any(not h.mode & wire.Mode.PLAINTEXT for h in hellos)
    for hello in hellos:
        if not hello.mode & wire.Mode.PLAINTEXT:
            assert not hello.features & wire.Feature.CHECKSUM_MASK, hello


# -- derived vectors (section 10) --------------------------------------------------------------

#: The session of section 10: sealed, 64 KiB chunks, a window of 8, chunk 5 sealed, a BYE of six
#: chunks.  The fixed inputs (session id, phrase, entropy) come from the document's derivation.
CHUNK_SIZE = 65536
WINDOW = 8
SEQ = 5
PLAIN = b"hello, world"
BYE = wire.Bye(chunks=6, nbytes=5 * CHUNK_SIZE + len(PLAIN))

Entropy = Callable[[int], bytes]


def _doc_bytes(name: str) -> bytes:
    value = DERIVATION_NS[name]
    assert isinstance(value, bytes), f"the derivation's {name} is not bytes"
    return value


def _doc_entropy(name: str) -> Entropy:
    value = DERIVATION_NS[name]
    assert callable(value), f"the derivation's {name} is not a function"
    return lambda n: bytes(value(n))


def _documented() -> dict[str, bytes]:
    """The documented derived bytes, by the derivation variable that holds them."""
    return {value: data for value, data in DERIVED_VECTORS.values()}


@pytest.mark.parametrize("name", sorted(DERIVED_VECTORS))
def test_derived_vector_matches_its_derivation(name: str) -> None:
    value, data = DERIVED_VECTORS[name]
    assert value in DERIVATION_NS, f"{name}: the derivation defines no {value!r}"
    assert DERIVATION_NS[value] == data, f"{name}: {value} differs from the documented bytes"


@dataclass
class _Run:
    """Section 10's session, run through ``keying`` and ``wire.secure``."""

    values: dict[str, bytes]  # by the name of the derivation variable each one matches
    session_id: bytes
    keys: secure.SessionKeys
    sealer: secure.ChunkSealer
    tx_channel: Channel  # connection 0, transmitter's end
    rx_channel: Channel  # connection 0, receiver's end
    rx1_channel: Channel  # connection 1, receiver's end
    hello_1: bytes
    tx1_auth: wire.Auth
    tx1_proof: wire.Auth


def _run() -> _Run:
    session_id = _doc_bytes("session_id")
    pw = secure.password(_doc_bytes("phrase"))

    def hello(conn_index: int) -> bytes:
        return wire.encode(wire.Hello(mode=0, session_id=session_id, conn_index=conn_index,
                                      chunk_size=CHUNK_SIZE, window=WINDOW))

    # Connection 0: the key exchange.
    hello_0 = hello(0)
    tx = TxKeying(pw, session_id, entropy=_doc_entropy("tx_entropy")).start(hello_0)
    assert not tx.joining
    rx = rx_attempt(hello_0, tx.auth, keys=None, password=pw, session_id=session_id,
                    entropy=_doc_entropy("rx_entropy"))
    tx_proof = tx.answer(rx.auth)
    rx_channel = rx.check(tx_proof)
    tx_channel = tx.channel()
    keys = tx.welcomed()
    assert keys == rx.keys
    pake_rx = secure.PakeRx(pw, _doc_entropy("rx_entropy"))
    shared = secure.PakeTx(pw, _doc_entropy("tx_entropy")).finish(pake_rx.message)
    unproven = wire.Auth(rx.auth.kind, rx.auth.nonce, rx.auth.pake)
    th = secure.transcript(hello_0, wire.encode(tx.auth), wire.encode(unproven))
    welcome = wire.encode(wire.Welcome(wire.WelcomeStatus.ACCEPTED, session_id, 0),
                          rx_channel.tagger)
    ack = wire.encode(wire.Ack(SEQ, 0), rx_channel.tagger)

    # Chunk 5, sealed in place as the transmitter seals it.
    sealer = secure.ChunkSealer(keys.data_tx, session_id, CHUNK_SIZE)
    frame = bytearray(wire.DATA_HEADER_SIZE + len(PLAIN) + secure.SEAL_OVERHEAD)
    wire.pack_data_header(frame, SEQ, len(PLAIN) + secure.SEAL_OVERHEAD, 0)
    frame[wire.DATA_HEADER_SIZE : wire.DATA_HEADER_SIZE + len(PLAIN)] = PLAIN
    payload = memoryview(frame)[wire.DATA_HEADER_SIZE :]
    sealer.seal_into(SEQ, bytes(frame[: wire.DATA_HEADER_SIZE]), payload[: len(PLAIN)], payload)

    # Connection 1 joins the keyed session.
    hello_1 = hello(1)
    joining = TxKeying(pw, session_id, entropy=_doc_entropy("join_tx_entropy"))
    joining.keys = keys
    tx1 = joining.start(hello_1)
    assert tx1.joining
    rx1 = rx_attempt(hello_1, tx1.auth, keys=keys, password=pw, session_id=session_id,
                     entropy=_doc_entropy("join_rx_entropy"))
    tx1_proof = tx1.answer(rx1.auth)
    rx1_channel = rx1.check(tx1_proof)
    bye = wire.encode(BYE, tx1.channel().tagger)

    values = {
        "hello_0": hello_0, "tx_auth": wire.encode(tx.auth), "rx_auth": wire.encode(rx.auth),
        "tx_proof": wire.encode(tx_proof), "shared": shared, "th": th, "data_tx": keys.data_tx,
        "epoch_key": sealer.epoch_key(SEQ), "rx_tag_key": keys.control(th)[1],
        "welcome": welcome, "ack": ack, "sealed": bytes(frame),
        "join_tx_auth": wire.encode(tx1.auth), "join_rx_auth": wire.encode(rx1.auth),
        "join_tx_proof": wire.encode(tx1_proof), "bye": bye,
    }
    return _Run(values, session_id, keys, sealer, tx_channel, rx_channel, rx1_channel, hello_1,
                tx1.auth, tx1_proof)


def test_derived_vectors_match_the_implementation() -> None:
    """Every documented derived value, and no other, is what the handshake and sealing code
    computes from the same fixed inputs."""
    run = _run()
    documented = _documented()
    assert set(documented) == set(run.values), "section 10 and this test name other values"
    for value, data in documented.items():
        assert run.values[value] == data, f"{value}: the implementation computes other bytes"


def _handshaken_receiver(opening: bytes, channel: Channel,
                         max_payload: int = wire.ABSOLUTE_MAX_PAYLOAD) -> wire.Decoder:
    """A receiver's decoder past HELLO and two AUTH frames, checking tags with ``channel``."""
    decoder = wire.Decoder.for_receiver(max_payload=max_payload)
    decoder.receive_data(opening)
    assert [type(decoder.next_event()) for _ in range(3)] == [wire.Hello, wire.Auth, wire.Auth]
    decoder.checker = channel.checker
    return decoder


def test_derived_frames_decode_with_their_tags() -> None:
    """The derived frames decode at the end they are sent to, tags checked, and the sealed
    chunk opens to its plaintext."""
    run, doc = _run(), _documented()

    to_tx = wire.Decoder.for_transmitter()
    to_tx.receive_data(doc["rx_auth"])
    assert isinstance(to_tx.next_event(), wire.Auth)
    to_tx.checker = run.tx_channel.checker
    to_tx.receive_data(doc["welcome"] + doc["ack"])
    assert to_tx.next_event() == wire.Welcome(wire.WelcomeStatus.ACCEPTED, run.session_id, 0)
    assert to_tx.next_event() == wire.Ack(SEQ, 0)
    assert to_tx.next_event() is wire.NEED_DATA

    to_rx = _handshaken_receiver(doc["hello_0"] + doc["tx_auth"] + doc["tx_proof"],
                                 run.rx_channel, max_payload=CHUNK_SIZE + secure.SEAL_OVERHEAD)
    to_rx.receive_data(doc["sealed"])
    data = to_rx.next_event()
    assert isinstance(data, wire.Data) and data.seq == SEQ and data.checksum == 0
    opened = bytearray(len(PLAIN))
    run.sealer.open_into(SEQ, doc["sealed"][: wire.DATA_HEADER_SIZE], data.payload, opened)
    assert opened == PLAIN

    joined = _handshaken_receiver(run.hello_1 + doc["join_tx_auth"] + doc["join_tx_proof"],
                                  run.rx1_channel)
    joined.receive_data(doc["bye"])
    assert joined.next_event() == BYE


def test_derived_frames_do_not_verify_elsewhere() -> None:
    """What section 4 claims of replays: connection 1's tagged BYE does not verify on
    connection 0, a sealed chunk does not open under another seq, and a recorded join proof
    does not verify against a fresh receiver nonce."""
    run, doc = _run(), _documented()

    other = _handshaken_receiver(doc["hello_0"] + doc["tx_auth"] + doc["tx_proof"],
                                 run.rx_channel)
    other.receive_data(doc["bye"])
    with pytest.raises(wire.TamperedFrame):
        other.next_event()

    sealed = doc["sealed"]
    header = bytearray(sealed[: wire.DATA_HEADER_SIZE])
    header[1:9] = (SEQ + 1).to_bytes(8, "big")
    with pytest.raises(secure.AuthFailed):
        run.sealer.open_into(SEQ + 1, bytes(header), sealed[wire.DATA_HEADER_SIZE :],
                             bytearray(len(PLAIN)))

    replayed = rx_attempt(run.hello_1, run.tx1_auth, keys=run.keys, password=b"key:unused",
                          session_id=run.session_id, entropy=lambda n: bytes(n))
    with pytest.raises(secure.AuthFailed):
        replayed.check(run.tx1_proof)
