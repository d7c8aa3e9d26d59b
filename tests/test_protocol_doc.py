"""The golden vectors of ``docs/protocol.md`` agree with the encoder and both decoders."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from viamillipede import wire
from viamillipede.wire import frames

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

VECTOR = re.compile(
    r"^<!-- vector: (?P<name>[a-z0-9-]+) -->\n"
    r"event: (?P<event>.+)\n"
    r"```hex\n(?P<hex>(?:[0-9a-f]{2}(?: [0-9a-f]{2}){0,15}\n)+)```$",
    re.MULTILINE,
)

#: Frame types a receiver decodes (sent by the transmitter) and a transmitter decodes.
TO_RECEIVER = (wire.Hello, wire.Data, wire.Bye, wire.Fin, wire.Error)
TO_TRANSMITTER = (wire.Welcome, wire.Ack, wire.ByeOk, wire.Error)
FRAME_TYPES = (
    wire.Hello, wire.Welcome, wire.Data, wire.Ack, wire.Bye, wire.ByeOk, wire.Fin, wire.Error
)

#: Every frame type code declared in frames.py, by name ("BYE_OK": 0x62, ...).
TYPE_CODES = {name[2:]: code for name, code in vars(frames).items() if name.startswith("T_")}


def _load() -> dict[str, tuple[wire.Event, bytes]]:
    text = DOC.read_text(encoding="utf-8")
    vectors: dict[str, tuple[wire.Event, bytes]] = {}
    for m in VECTOR.finditer(text):
        name = m["name"]
        assert name not in vectors, f"vector {name} appears twice"
        lines = m["hex"].splitlines()
        assert all(len(line.split()) == 16 for line in lines[:-1]), f"{name}: 16 bytes a line"
        event = eval(m["event"], dict(vars(wire)))  # the doc is ours; names from wire only
        vectors[name] = (event, bytes.fromhex(m["hex"]))
    # A vector the regex cannot read must fail loudly, not vanish from the checks.
    assert len(vectors) == text.count("<!-- vector:"), "a vector in docs/protocol.md is malformed"
    return vectors


VECTORS = _load()


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
        opening = None if isinstance(event, wire.Welcome) else welcome
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


def test_error_vectors_carry_text() -> None:
    errors = [e for e, _ in VECTORS.values() if isinstance(e, wire.Error)]
    assert errors and all(e.message for e in errors)
    assert any(not e.message.isascii() for e in errors), "keep one non-ASCII ERROR text"


def test_documented_sizes_match_frames() -> None:
    """The framing table has a row for every type code, with the declared fixed size, and
    section 2 a heading for it."""
    text = DOC.read_text(encoding="utf-8")
    assert set(TYPE_CODES) == {"HELLO", "WELCOME", "DATA", "ACK", "BYE", "BYE_OK", "FIN", "ERROR"}
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
