"""Unit and property tests of the sans-IO wire codec (``viamillipede.wire``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import viamillipede.wire.frames as frames
from viamillipede import wire
from viamillipede.wire import (
    Ack,
    Auth,
    Bye,
    ByeOk,
    Data,
    DataHeader,
    Error,
    Event,
    Fin,
    Hello,
    Welcome,
)
from viamillipede.wire.codec import encode_ack, pack_data_header

ConnectionClosed = wire.ConnectionClosed

PROPERTY = settings(max_examples=300, deadline=None)


def uint(bits: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**bits - 1)


u8, u16, u32, u64 = uint(8), uint(16), uint(32), uint(64)
ids = st.binary(min_size=16, max_size=16)

FRAMES: dict[str, st.SearchStrategy[Event]] = {
    "HELLO": st.builds(
        Hello, mode=st.integers(0, 2**32 - 1), session_id=ids, conn_index=u16,
        chunk_size=u32, window=u32, features=u32, version=u16,
    ),
    "WELCOME": st.builds(Welcome, status=u8, session_id=ids, written=u64),
    "AUTH": st.builds(
        Auth, kind=u8, nonce=st.binary(min_size=32, max_size=32),
        pake=st.binary(min_size=33, max_size=33), proof=st.binary(min_size=32, max_size=32),
    ),
    "DATA": st.builds(Data, seq=u64, checksum=u32, payload=st.binary(min_size=1, max_size=200)),
    "DATA_Z": st.builds(Data, seq=u64, checksum=u32, payload=st.binary(min_size=1, max_size=200),
                        compressed=st.just(True)),
    "ACK": st.builds(Ack, seq=u64, written=u64),
    "BYE": st.builds(Bye, chunks=u64, nbytes=u64),
    "BYE_OK": st.builds(ByeOk, chunks=u64, nbytes=u64),
    "FIN": st.builds(Fin, chunks=u64, nbytes=u64),
    # 256 characters are at most 1024 bytes of UTF-8: never truncated.
    "ERROR": st.builds(Error, code=u16, message=st.text(max_size=256)),
}

HELLO = Hello(0, bytes(range(16)), conn_index=0, chunk_size=1 << 21, window=8, features=1)
WELCOME = Welcome(wire.WelcomeStatus.ACCEPTED, bytes(range(16)), written=0)

#: Which decoder reads a frame: its side's factory and the opening frame to feed before it.
RECEIVER = (wire.Decoder.for_receiver, HELLO)
TRANSMITTER = (wire.Decoder.for_transmitter, WELCOME)
SIDES: dict[type, list[tuple[Callable[..., wire.Decoder], Event]]] = {
    Hello: [RECEIVER], Data: [RECEIVER], Bye: [RECEIVER], Fin: [RECEIVER],
    Welcome: [TRANSMITTER], Ack: [TRANSMITTER], ByeOk: [TRANSMITTER],
    Error: [RECEIVER, TRANSMITTER], Auth: [RECEIVER, TRANSMITTER],
}


Stream = tuple[Callable[..., wire.Decoder], list[Event]]


@st.composite
def streams(draw: st.DrawFn, receiver: bool | None = None) -> Stream:
    """A valid sequence of frames for one direction of a connection, with its decoder."""
    if receiver is None:
        receiver = draw(st.booleans())
    if receiver:
        factory: Callable[..., wire.Decoder] = wire.Decoder.for_receiver
        # HELLO, then the key exchange or join proof (AUTH), then the data
        opening = [draw(FRAMES["HELLO"]), *draw(st.lists(FRAMES["AUTH"], max_size=2))]
        body = draw(st.lists(FRAMES["DATA"] | FRAMES["BYE"], max_size=8))
        last = draw(st.none() | FRAMES["FIN"] | FRAMES["ERROR"])
    else:
        factory = wire.Decoder.for_transmitter
        # the receiver's AUTH then WELCOME, or a WELCOME alone (a refusal)
        opening = [*draw(st.lists(FRAMES["AUTH"], max_size=1)), draw(FRAMES["WELCOME"])]
        body = draw(st.lists(FRAMES["ACK"], max_size=8))
        last = draw(st.none() | FRAMES["BYE_OK"] | FRAMES["ERROR"])
    return factory, [*opening, *body, *([] if last is None else [last])]


def decoder_for(factory: Callable[..., wire.Decoder], streaming: bool) -> wire.Decoder:
    """A fresh decoder; streaming only where it exists (on the receiving side)."""
    if streaming and factory == wire.Decoder.for_receiver:
        return factory(stream_payload=True)
    return factory()


def encode_all(events: Iterable[Event]) -> bytes:
    return b"".join(wire.encode(e) for e in events)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class Reader:
    """Feeds a decoder the way a connection task would and collects whole events.

    In streaming mode DATA arrives as a DataHeader; the payload is taken with
    ``take_payload_into`` in pieces of at most ``take`` bytes and reassembled into a Data.
    """

    def __init__(self, decoder: wire.Decoder, take: int = 1 << 30) -> None:
        self.decoder = decoder
        self.take = take
        self.events: list[Event] = []
        self.eof = False
        self._header: DataHeader | None = None
        self._payload = bytearray()

    def feed(self, data: bytes) -> None:
        self.eof = self.eof or not data
        self.decoder.receive_data(data)
        self.drain()

    def drain(self) -> None:
        d = self.decoder
        while True:
            if self._header is not None:
                while d.payload_remaining and d.buffered:
                    piece = bytearray(min(self.take, d.payload_remaining))
                    n = d.take_payload_into(memoryview(piece))
                    self._payload += piece[:n]
                if d.payload_remaining and not self.eof:
                    return
                if not d.payload_remaining:
                    self._complete()
            event = d.next_event()  # at EOF inside a payload this must raise ProtocolError
            if event is wire.NEED_DATA:
                return
            if isinstance(event, DataHeader):
                self._header = event
                continue
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                return

    def _complete(self) -> None:
        header, self._header = self._header, None
        assert header is not None and len(self._payload) == header.length
        self.events.append(Data(header.seq, header.checksum, bytes(self._payload)))
        self._payload = bytearray()


def read_events(decoder: wire.Decoder, pieces: Iterable[bytes], take: int = 1 << 30) -> list[Event]:
    reader = Reader(decoder, take)
    for piece in pieces:
        if piece:  # b"" would mean EOF
            reader.feed(piece)
    reader.feed(b"")
    return reader.events


def decode_all(decoder: wire.Decoder, data: bytes) -> list[Event]:
    return read_events(decoder, [data])


def one_event(decoder: wire.Decoder, data: bytes) -> Event | object:
    decoder.receive_data(data)
    return decoder.next_event()


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FRAMES))
@PROPERTY
@given(data=st.data())
def test_round_trip(kind: str, data: st.DataObject) -> None:
    event = data.draw(FRAMES[kind])
    for factory, opening in SIDES[type(event)]:
        # Openings come first; so does the receiver's AUTH, read by a transmitter before WELCOME.
        first = isinstance(event, Hello | Welcome) or (
            isinstance(event, Auth) and opening == WELCOME
        )
        prefix = [] if first else [opening]
        assert decode_all(factory(), encode_all([*prefix, event])) == [
            *prefix, event, ConnectionClosed()
        ]


@pytest.mark.parametrize("streaming", [False, True])
@PROPERTY
@given(data=st.data())
def test_any_split_gives_the_same_events(streaming: bool, data: st.DataObject) -> None:
    """Whole, byte by byte or cut anywhere, a stream decodes to the same events; in streaming
    mode the payloads, taken in pieces, reassemble into the same DATA events."""
    factory, events = data.draw(streams(receiver=True if streaming else None))
    raw = encode_all(events)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    take = data.draw(st.integers(1, 64))
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))], split(raw, cuts)):
        decoder = decoder_for(factory, streaming)
        assert read_events(decoder, pieces, take) == [*events, ConnectionClosed()]


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_data_frame_is_refused(streaming: bool) -> None:
    """No transmitter sends a chunk of nothing; a DATA frame without payload is a peer's
    error, refused at the decoder before any state can depend on it."""
    d = wire.Decoder.for_receiver(stream_payload=streaming)
    d.receive_data(encode_all([HELLO, Data(9, 0, b""), Bye(10, 0)]))
    assert d.next_event() == HELLO
    with pytest.raises(wire.RemoteProtocolError, match="no payload"):
        d.next_event()


# -- read_hint ---------------------------------------------------------------------------------


def read_by_hints(decoder: wire.Decoder, raw: bytes, caps: list[int], direct: bool) -> list[Event]:
    """Read like a socket user who never asks for more than ``read_hint()`` bytes.

    A streamed payload goes either straight "from the socket" into the chunk
    (``direct``: ``payload_consumed``) or through the decoder (``take_payload_into``).  Checks on
    the way that no read ever crossed a frame boundary.
    """
    cap = itertools.cycle(caps)
    pos = 0
    events: list[Event] = []
    header: DataHeader | None = None
    payload = bytearray()
    while True:
        if decoder.payload_remaining:
            assert decoder.buffered == 0, "bytes past the DATA header were buffered"
            n = min(decoder.read_hint(), next(cap))
            assert 0 < n <= decoder.payload_remaining
            if direct:
                payload += raw[pos : pos + n]
                decoder.payload_consumed(n)
            else:
                decoder.receive_data(raw[pos : pos + n])
                dest = bytearray(n)
                assert decoder.take_payload_into(memoryview(dest)) == n
                payload += dest
            pos += n
            if decoder.payload_remaining:
                continue
            assert header is not None
            events.append(Data(header.seq, header.checksum, bytes(payload)))
            header, payload = None, bytearray()
        event = decoder.next_event()
        if event is wire.NEED_DATA:
            hint = decoder.read_hint()
            assert hint > 0
            piece = raw[pos : pos + min(hint, next(cap))]
            pos += len(piece)
            decoder.receive_data(piece)
            continue
        assert decoder.buffered == 0, f"read past the end of {event!r}"
        if isinstance(event, ConnectionClosed):
            assert pos == len(raw)
            return [*events, event]
        if isinstance(event, DataHeader) and event.length:
            header = event
        elif isinstance(event, DataHeader):
            events.append(Data(event.seq, event.checksum, b""))
        else:
            events.append(event)


@PROPERTY
@given(
    stream=streams(),
    caps=st.lists(st.integers(1, 50) | st.just(1 << 30), min_size=1, max_size=8),
    streaming=st.booleans(),
    direct=st.booleans(),
)
def test_read_hint_never_crosses_a_frame_boundary(
    stream: Stream, caps: list[int], streaming: bool, direct: bool
) -> None:
    """Reading at most (or exactly: cap 2**30) read_hint() bytes at a time never leaves bytes of
    the next frame in the decoder, in particular none while a payload is pending."""
    factory, events = stream
    decoder = decoder_for(factory, streaming)
    assert read_by_hints(decoder, encode_all(events), caps, direct) == [*events, ConnectionClosed()]


# -- fast struct paths agree with the construct declarations ------------------------------------


@PROPERTY
@given(seq=u64, length=u32, checksum=u32)
def test_data_header_fast_path_matches_construct(seq: int, length: int, checksum: int) -> None:
    body = frames.BODIES[frames.T_DATA]
    declared = bytes([frames.T_DATA]) + body.build(
        {"seq": seq, "length": length, "checksum": checksum}
    )
    assert frames.DATA_HEADER.pack(frames.T_DATA, seq, length, checksum) == declared
    buf = bytearray(b"\xaa" * (frames.DATA_HEADER_SIZE + 3))
    pack_data_header(buf, seq, length, checksum)
    assert bytes(buf) == declared + b"\xaa" * 3, "header written exactly, payload untouched"
    pack_data_header(memoryview(buf), seq, length, checksum)
    assert bytes(buf[: frames.DATA_HEADER_SIZE]) == declared
    assert wire.encode(DataHeader(seq, length, checksum)) == declared
    assert frames.DATA_HEADER.unpack(declared) == (frames.T_DATA, seq, length, checksum)
    parsed = body.parse(declared[1:])
    assert (parsed.seq, parsed.length, parsed.checksum) == (seq, length, checksum)


@PROPERTY
@given(seq=u64, written=u64)
def test_ack_fast_path_matches_construct(seq: int, written: int) -> None:
    body = frames.BODIES[frames.T_ACK]
    declared = bytes([frames.T_ACK]) + body.build({"seq": seq, "written": written})
    assert frames.ACK_FRAME.pack(frames.T_ACK, seq, written) == declared
    assert encode_ack(seq, written) == declared
    assert wire.encode(Ack(seq, written)) == declared
    assert frames.ACK_FRAME.unpack(declared) == (frames.T_ACK, seq, written)


@PROPERTY
@given(chunks=u64, nbytes=u64)
def test_bye_bye_ok_and_fin_differ_only_in_the_type_byte(chunks: int, nbytes: int) -> None:
    """The three end-of-session frames share one body layout: chunks u64, nbytes u64."""
    body = chunks.to_bytes(8, "big") + nbytes.to_bytes(8, "big")
    assert wire.encode(Bye(chunks, nbytes)) == bytes([frames.T_BYE]) + body
    assert wire.encode(ByeOk(chunks, nbytes)) == bytes([frames.T_BYE_OK]) + body
    assert wire.encode(Fin(chunks, nbytes)) == bytes([frames.T_FIN]) + body
    assert frames.FIN_BODY.parse(body) == frames.BYE_BODY.parse(body)


def test_fixed_sizes() -> None:
    assert frames.FIXED_SIZE == {
        frames.T_HELLO: 41, frames.T_WELCOME: 26, frames.T_DATA: 17, frames.T_DATA_Z: 17,
        frames.T_ACK: 17,
        frames.T_BYE: 17, frames.T_BYE_OK: 17, frames.T_FIN: 17, frames.T_ERROR: 5,
        frames.T_AUTH: 1 + 1 + 32 + 33 + 32,
    }
    assert frames.DATA_HEADER.size == frames.ACK_FRAME.size == 17
    assert (frames.T_FIN, chr(frames.T_FIN)) == (0x46, "F")


def test_every_frame_type_is_covered_by_these_tests() -> None:
    """A type code added to frames.py must get a strategy here and a decoding side."""
    codes = {name[2:]: code for name, code in vars(frames).items() if name.startswith("T_")}
    assert set(codes.values()) == set(frames.BODIES)
    assert set(FRAMES) == set(codes)
    examples: dict[str, Event] = {
        "HELLO": HELLO, "WELCOME": WELCOME, "DATA": Data(0, 0, b"x"),
        "DATA_Z": Data(0, 0, b"x", compressed=True), "ACK": Ack(0, 0),
        "BYE": Bye(0, 0), "BYE_OK": ByeOk(0, 0), "FIN": Fin(0, 0), "ERROR": Error(0, ""),
        "AUTH": Auth(wire.AuthKind.PAKE),
    }
    for name, event in examples.items():
        assert wire.encode(event)[0] == codes[name], name
    assert set(SIDES) == {type(event) for event in examples.values()}


# -- protocol violations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "frame"),
    [
        (wire.Decoder.for_receiver, Data(0, 0, b"x")),
        (wire.Decoder.for_receiver, Bye(0, 0)),
        (wire.Decoder.for_receiver, Fin(0, 0)),
        (wire.Decoder.for_receiver, Error(1, "too early")),
        (wire.Decoder.for_receiver, WELCOME),
        (wire.Decoder.for_receiver, Auth(wire.AuthKind.PAKE)),
        (wire.Decoder.for_transmitter, Ack(0, 0)),
        (wire.Decoder.for_transmitter, ByeOk(0, 0)),
        (wire.Decoder.for_transmitter, Error(1, "too early")),
        (wire.Decoder.for_transmitter, HELLO),
        (wire.Decoder.for_transmitter, Fin(0, 0)),
    ],
)
def test_frame_before_the_opening_frame(factory: Callable[[], wire.Decoder], frame: Event) -> None:
    with pytest.raises(wire.ProtocolError):
        one_event(factory(), wire.encode(frame))


@pytest.mark.parametrize(
    ("side", "frame"),
    [
        (RECEIVER, Ack(1, 1)),
        (RECEIVER, ByeOk(1, 1)),
        (RECEIVER, WELCOME),
        (RECEIVER, HELLO),  # a second opening frame
        (TRANSMITTER, Data(1, 0, b"x")),
        (TRANSMITTER, Bye(1, 1)),
        (TRANSMITTER, Fin(1, 1)),
        (TRANSMITTER, HELLO),
        # A second WELCOME passes the decoder (AUTH, then WELCOME, may open a connection);
        # the transmitter's session core refuses it (test_tx_core's reconnect backoff test).
    ],
)
def test_frame_in_the_wrong_direction_or_twice(
    side: tuple[Callable[[], wire.Decoder], Event], frame: Event
) -> None:
    factory, opening = side
    d = factory()
    assert one_event(d, wire.encode(opening)) == opening
    with pytest.raises(wire.ProtocolError, match="unexpected"):
        one_event(d, wire.encode(frame))


@pytest.mark.parametrize("side", [RECEIVER, TRANSMITTER], ids=["receiver", "transmitter"])
def test_unknown_type_is_rejected_at_its_first_byte(
    side: tuple[Callable[[], wire.Decoder], Event],
) -> None:
    factory, opening = side
    for code in sorted(set(range(256)) - set(frames.BODIES)):
        d = factory()
        with pytest.raises(wire.ProtocolError, match="unknown frame type"):
            one_event(d, bytes([code]))
        d = factory()
        assert one_event(d, wire.encode(opening)) == opening
        with pytest.raises(wire.ProtocolError, match="unknown frame type"):
            one_event(d, bytes([code]))


@pytest.mark.parametrize("magic", [b"VMPX", b"vmpd", b"\0\0\0\0", b"GET "])
def test_bad_magic(magic: bytes) -> None:
    raw = bytearray(wire.encode(HELLO))
    raw[1:5] = magic
    with pytest.raises(wire.ProtocolError, match="magic"):
        one_event(wire.Decoder.for_receiver(), bytes(raw))


@pytest.mark.parametrize("streaming", [False, True])
def test_oversized_data_is_rejected_before_its_payload(streaming: bool) -> None:
    d = wire.Decoder.for_receiver(max_payload=100, stream_payload=streaming)
    assert one_event(d, wire.encode(HELLO)) == HELLO
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        one_event(d, wire.encode(DataHeader(seq=0, length=101, checksum=0)))

    d = wire.Decoder.for_receiver(max_payload=100, stream_payload=streaming)
    assert one_event(d, wire.encode(HELLO)) == HELLO
    expected = DataHeader(0, 100, 0) if streaming else wire.NEED_DATA
    assert one_event(d, wire.encode(DataHeader(seq=0, length=100, checksum=0))) == expected


def test_max_payload_is_capped_at_the_absolute_limit() -> None:
    d = wire.Decoder.for_receiver(max_payload=2**40)
    assert d.max_payload == wire.ABSOLUTE_MAX_PAYLOAD
    assert one_event(d, wire.encode(HELLO)) == HELLO
    with pytest.raises(wire.ProtocolError):
        one_event(d, wire.encode(DataHeader(0, wire.ABSOLUTE_MAX_PAYLOAD + 1, 0)))


@pytest.mark.parametrize("side", [RECEIVER, TRANSMITTER], ids=["receiver", "transmitter"])
def test_error_text_too_long_is_rejected_before_the_text(
    side: tuple[Callable[[], wire.Decoder], Event],
) -> None:
    factory, opening = side
    d = factory()
    assert one_event(d, wire.encode(opening)) == opening
    header = frames.ERROR_BODY.build({"code": 3, "length": frames.MAX_ERROR_TEXT + 1})
    with pytest.raises(wire.ProtocolError, match="too long"):
        one_event(d, bytes([frames.T_ERROR]) + header)


def test_longest_error_text_is_accepted() -> None:
    error = Error(wire.ErrorCode.ABORTED, "x" * frames.MAX_ERROR_TEXT)
    assert decode_all(wire.Decoder.for_transmitter(), encode_all([WELCOME, error]))[1] == error


@PROPERTY
@given(message=st.text(min_size=200, max_size=1200))
def test_encoder_truncates_error_text_at_a_character_boundary(message: str) -> None:
    raw = wire.encode(Error(wire.ErrorCode.PROTOCOL, message))
    text = raw[frames.FIXED_SIZE[frames.T_ERROR] :]
    assert len(text) <= frames.MAX_ERROR_TEXT
    decoded = text.decode("utf-8")  # strict: the encoder never emits a split character
    assert message.startswith(decoded)
    assert len(text) > frames.MAX_ERROR_TEXT - 4 or decoded == message


def test_invalid_utf8_error_text_is_replaced() -> None:
    raw = bytes([frames.T_ERROR]) + frames.ERROR_BODY.build({"code": 1, "length": 2}) + b"\xff!"
    d = wire.Decoder.for_transmitter()
    assert one_event(d, wire.encode(WELCOME) + raw) == WELCOME
    assert d.next_event() == Error(1, "\ufffd!")


@pytest.mark.parametrize("streaming", [False, True])
@PROPERTY
@given(stream=streams(), data=st.data())
def test_eof_inside_a_frame_is_a_protocol_error(
    streaming: bool, stream: Stream, data: st.DataObject
) -> None:
    factory, events = stream
    sizes = [len(wire.encode(e)) for e in events]
    boundaries = [0, *itertools.accumulate(sizes)]
    raw = encode_all(events)
    frame = data.draw(st.integers(0, len(events) - 1))
    cut = boundaries[frame] + data.draw(st.integers(0, sizes[frame] - 1))
    decoder = decoder_for(factory, streaming)
    if cut in boundaries:
        done = boundaries.index(cut)
        assert read_events(decoder, [raw[:cut]]) == [*events[:done], ConnectionClosed()]
    else:
        with pytest.raises(wire.ProtocolError, match="closed inside"):
            read_events(decoder, [raw[:cut]])


def test_eof_at_a_frame_boundary_is_a_clean_close() -> None:
    for factory in (wire.Decoder.for_receiver, wire.Decoder.for_transmitter):
        d = factory()
        assert d.next_event() is wire.NEED_DATA
        d.receive_data(b"")
        assert d.next_event() == ConnectionClosed()
        assert d.next_event() == ConnectionClosed()
    d = wire.Decoder.for_receiver()
    d.receive_data(wire.encode(HELLO))
    d.receive_data(b"")
    assert [d.next_event(), d.next_event()] == [HELLO, ConnectionClosed()]


def test_eof_inside_a_streamed_payload() -> None:
    d = wire.Decoder.for_receiver(stream_payload=True)
    d.receive_data(encode_all([HELLO, Data(0, 0, b"abcdef")])[:-2])
    assert [d.next_event(), d.next_event()] == [HELLO, DataHeader(0, 6, 0)]
    assert d.take_payload_into(memoryview(bytearray(6))) == 4
    d.receive_data(b"")
    with pytest.raises(wire.ProtocolError, match="closed inside a DATA payload"):
        d.next_event()


@pytest.mark.parametrize(
    ("side", "final", "extra"),
    [
        (TRANSMITTER, ByeOk(3, 30), Ack(2, 3)),
        (TRANSMITTER, Error(4, "stop"), Ack(2, 3)),
        (TRANSMITTER, ByeOk(3, 30), ByeOk(3, 30)),
        (RECEIVER, Error(2, "source failed"), Data(0, 0, b"late")),
        (RECEIVER, Error(2, "source failed"), Bye(1, 4)),
        (RECEIVER, Error(2, "source failed"), Fin(1, 4)),
        (RECEIVER, Fin(1, 4), Data(0, 0, b"late")),
        (RECEIVER, Fin(1, 4), Bye(1, 4)),
        (RECEIVER, Fin(1, 4), Fin(1, 4)),
        (RECEIVER, Fin(1, 4), Error(4, "too late")),
        (RECEIVER, Fin(1, 4), HELLO),
    ],
)
def test_bytes_after_a_final_frame(
    side: tuple[Callable[[], wire.Decoder], Event], final: Event, extra: Event
) -> None:
    factory, opening = side
    for trailer in (wire.encode(extra), b"\0"):
        d = factory()
        d.receive_data(encode_all([opening, final]) + trailer)
        assert [d.next_event(), d.next_event()] == [opening, final]
        with pytest.raises(wire.ProtocolError, match="after the final frame"):
            d.next_event()


def test_final_frame_then_clean_close() -> None:
    d = wire.Decoder.for_transmitter()
    d.receive_data(encode_all([WELCOME, ByeOk(1, 1)]))
    d.receive_data(b"")
    assert [d.next_event(), d.next_event(), d.next_event()] == [
        WELCOME, ByeOk(1, 1), ConnectionClosed()
    ]
    d = wire.Decoder.for_receiver()
    d.receive_data(encode_all([HELLO, Bye(1, 1), Fin(1, 1)]))
    d.receive_data(b"")
    assert [d.next_event(), d.next_event(), d.next_event(), d.next_event()] == [
        HELLO, Bye(1, 1), Fin(1, 1), ConnectionClosed()
    ]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "events",
    [
        # The usual end: the last chunks, BYE, and FIN once BYE_OK has arrived.
        [HELLO, Data(0, 0, b"abc"), Data(1, 0, b"d"), Bye(2, 4), Fin(2, 4)],
        # BYE_OK arrives on every connection: FIN may come where no BYE was sent...
        [HELLO, Data(5, 0, b"xyz"), Fin(9, 99)],
        # ...or right after the HELLO, answering a WELCOME SESSION_OVER.
        [HELLO, Fin(9, 99)],
    ],
    ids=["after-bye", "after-data", "after-hello"],
)
def test_fin_ends_a_receiving_connection(streaming: bool, events: list[Event]) -> None:
    raw = encode_all(events)
    d = decoder_for(wire.Decoder.for_receiver, streaming)
    assert read_events(d, [raw]) == [*events, ConnectionClosed()]
    d = decoder_for(wire.Decoder.for_receiver, streaming)
    assert read_events(d, [raw[i : i + 1] for i in range(len(raw))]) == [
        *events, ConnectionClosed()
    ]
    d = decoder_for(wire.Decoder.for_receiver, streaming)
    d.receive_data(raw + b"F")
    while not isinstance(event := d.next_event(), Fin):
        if isinstance(event, DataHeader) and event.length:
            d.take_payload_into(memoryview(bytearray(event.length)))
    with pytest.raises(wire.ProtocolError, match="after the final frame"):
        d.next_event()


def test_api_misuse_is_a_runtime_error_not_a_protocol_error() -> None:
    d = wire.Decoder.for_receiver(stream_payload=True)
    with pytest.raises(RuntimeError):
        d.take_payload_into(memoryview(bytearray(1)))
    with pytest.raises(RuntimeError):
        d.payload_consumed(1)
    d.receive_data(encode_all([HELLO, Data(0, 0, b"abc")])[:-1])
    assert [d.next_event(), d.next_event()] == [HELLO, DataHeader(0, 3, 0)]
    with pytest.raises(RuntimeError):
        d.next_event()  # payload still pending
    with pytest.raises(RuntimeError):
        d.payload_consumed(1)  # two payload bytes are still in the decoder's buffer
    d.receive_data(b"")
    with pytest.raises(RuntimeError):
        d.receive_data(b"more")


def test_encode_rejects_non_events() -> None:
    with pytest.raises(TypeError):
        wire.encode(ConnectionClosed())
