"""Fuzzing the decoders: whatever a peer sends, in whatever pieces, only ProtocolError comes out.

Also checks that a decoder never holds more than it was fed, never more than one legal frame
while it waits for data, and rejects an absurd length as soon as the header is in.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viamillipede import wire
from viamillipede.wire import frames
from viamillipede.wire.events import Ack, Bye, ByeOk, Data, DataHeader, Error, Fin, Hello, Welcome

FUZZ = settings(max_examples=250, deadline=None)

SMALL_PAYLOAD = 64

HELLO = wire.encode(Hello(0, bytes(16), conn_index=1, chunk_size=SMALL_PAYLOAD, window=4))
WELCOME = wire.encode(Welcome(wire.WelcomeStatus.ACCEPTED, bytes(16), written=0))

#: name -> (decoder factory, the opening frame of its direction)
KINDS: dict[str, tuple[Callable[[], wire.Decoder], bytes]] = {
    "receiver": (wire.Decoder.for_receiver, HELLO),
    "receiver-streaming": (lambda: wire.Decoder.for_receiver(stream_payload=True), HELLO),
    "receiver-small": (
        lambda: wire.Decoder.for_receiver(max_payload=SMALL_PAYLOAD, stream_payload=True), HELLO
    ),
    "transmitter": (wire.Decoder.for_transmitter, WELCOME),
}
RECEIVER_KINDS = sorted(k for k in KINDS if k.startswith("receiver"))


def longest_frame(decoder: wire.Decoder) -> int:
    return max(
        frames.FIXED_SIZE[frames.T_HELLO],
        frames.DATA_HEADER_SIZE + decoder.max_payload,
        frames.FIXED_SIZE[frames.T_ERROR] + frames.MAX_ERROR_TEXT,
    )


def pump(decoder: wire.Decoder, pieces: list[bytes], eof: bool) -> None:
    """Feed ``pieces`` (then EOF), pulling every event and taking every streamed payload."""
    fed = 0
    sink = memoryview(bytearray(37))  # odd size: payloads are taken in several pieces
    for piece in [*pieces, b""] if eof else pieces:
        decoder.receive_data(piece)
        fed += len(piece)
        while True:
            assert decoder.buffered <= fed
            assert len(decoder._buf) <= fed  # the internal buffer, compacted or not
            while decoder.payload_remaining and decoder.buffered:
                decoder.take_payload_into(sink)
            if decoder.payload_remaining and piece:
                break  # wait for more payload (at EOF, next_event must raise)
            event = decoder.next_event()
            if event is wire.NEED_DATA:
                assert decoder.buffered < longest_frame(decoder)
                break
            if isinstance(event, wire.ConnectionClosed):
                assert eof and not piece
                break
            assert isinstance(event, Hello | Welcome | Data | DataHeader | Ack | Bye | ByeOk
                              | Fin | Error)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def survive(kind: str, data: bytes, cuts: list[int], eof: bool) -> None:
    """Run the decoder of ``kind`` over ``data``; ProtocolError is the only acceptable failure."""
    factory, _ = KINDS[kind]
    with contextlib.suppress(wire.ProtocolError):
        pump(factory(), split(data, cuts), eof)


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)
kinds = pytest.mark.parametrize("kind", sorted(KINDS))


@kinds
@FUZZ
@given(data=st.binary(max_size=300), cuts=cuts, eof=st.booleans())
def test_arbitrary_bytes(kind: str, data: bytes, cuts: list[int], eof: bool) -> None:
    survive(kind, data, cuts, eof)


@kinds
@FUZZ
@given(data=st.binary(max_size=300), cuts=cuts, eof=st.booleans())
def test_arbitrary_bytes_after_a_valid_opening(
    kind: str, data: bytes, cuts: list[int], eof: bool
) -> None:
    survive(kind, KINDS[kind][1] + data, cuts, eof)


def typed_frame(ftype: int) -> st.SearchStrategy[bytes]:
    """A frame of type ``ftype`` with random field values but a plausible tail length."""
    body = frames.BODIES[ftype]
    size = body.sizeof()
    if ftype in (frames.T_DATA, frames.T_ERROR):
        # A DATA frame carries at least one byte: an empty one is refused.
        least = 1 if ftype == frames.T_DATA else 0
        return st.binary(min_size=least, max_size=SMALL_PAYLOAD).flatmap(
            lambda tail: st.binary(min_size=size, max_size=size).map(
                lambda fixed: bytes([ftype]) + _with_length(ftype, fixed, len(tail)) + tail
            )
        )
    return st.binary(min_size=size, max_size=size).map(lambda fixed: bytes([ftype]) + fixed)


def _with_length(ftype: int, fixed: bytes, length: int) -> bytes:
    """Patch the length field of a DATA or ERROR body."""
    if ftype == frames.T_DATA:
        return fixed[:8] + length.to_bytes(4, "big") + fixed[12:]
    return fixed[:2] + length.to_bytes(2, "big")


@st.composite
def valid_streams(draw: st.DrawFn, kind: str, final: bool | None = None) -> bytes:
    """Opening, body frames, and a final frame if ``final`` (drawn when None)."""
    body: tuple[int, ...]
    finals: tuple[int, ...]
    if kind == "transmitter":
        body, finals = (frames.T_ACK,), (frames.T_BYE_OK, frames.T_ERROR)
    else:
        body, finals = (frames.T_DATA, frames.T_BYE), (frames.T_FIN, frames.T_ERROR)
    parts = [KINDS[kind][1]]
    parts += draw(st.lists(st.sampled_from(body).flatmap(typed_frame), max_size=6))
    if draw(st.booleans()) if final is None else final:
        parts.append(draw(st.sampled_from(finals).flatmap(typed_frame)))
    return b"".join(parts)


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
              st.integers(min_value=0, max_value=1 << 16), st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        i = where % (len(buf) + 1)
        if op == "insert":
            buf[i:i] = bytes([value])
        elif op == "truncate":
            del buf[i:]
        elif i < len(buf):
            if op == "flip":
                buf[i] ^= value or 0x80
            else:
                del buf[i]
    return bytes(buf)


@kinds
@FUZZ
@given(data=st.data(), cuts=cuts, eof=st.booleans())
def test_valid_streams_decode(kind: str, data: st.DataObject, cuts: list[int], eof: bool) -> None:
    """The unmutated streams are valid: they must go through without any error at all
    (which also proves the mutation test below starts from meaningful input)."""
    factory, _ = KINDS[kind]
    stream = data.draw(valid_streams(kind))
    pump(factory(), split(stream, cuts), eof)


@kinds
@FUZZ
@given(data=st.data(), trailer=st.binary(min_size=1, max_size=64), cuts=cuts, eof=st.booleans())
def test_bytes_after_a_final_frame(
    kind: str, data: st.DataObject, trailer: bytes, cuts: list[int], eof: bool
) -> None:
    """After BYE_OK, FIN or ERROR any byte at all is a protocol error, however it arrives."""
    factory, _ = KINDS[kind]
    stream = data.draw(valid_streams(kind, final=True))
    with pytest.raises(wire.ProtocolError, match="after the final frame"):
        pump(factory(), split(stream + trailer, cuts), eof)


@kinds
@FUZZ
@given(data=st.data(), ops=mutations, cuts=cuts, eof=st.booleans())
def test_mutated_valid_streams(
    kind: str, data: st.DataObject, ops: list[tuple[str, int, int]], cuts: list[int], eof: bool
) -> None:
    survive(kind, mutate(data.draw(valid_streams(kind)), ops), cuts, eof)


@pytest.mark.parametrize("kind", RECEIVER_KINDS)
@FUZZ
@given(data=st.data(), seq=st.integers(0, 2**64 - 1))
def test_huge_data_length_is_rejected_without_waiting(
    kind: str, data: st.DataObject, seq: int
) -> None:
    factory, opening = KINDS[kind]
    decoder = factory()
    length = data.draw(st.integers(decoder.max_payload + 1, 2**32 - 1))
    decoder.receive_data(opening + wire.encode(DataHeader(seq, length, 0)))
    decoder.next_event()
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        decoder.next_event()
    assert decoder.buffered < longest_frame(decoder)


@kinds
@FUZZ
@given(code=st.integers(0, 2**16 - 1), length=st.integers(frames.MAX_ERROR_TEXT + 1, 2**16 - 1))
def test_huge_error_length_is_rejected_without_waiting(kind: str, code: int, length: int) -> None:
    factory, opening = KINDS[kind]
    decoder = factory()
    header = bytes([frames.T_ERROR]) + frames.ERROR_BODY.build({"code": code, "length": length})
    decoder.receive_data(opening + header)
    decoder.next_event()
    with pytest.raises(wire.ProtocolError, match="too long"):
        decoder.next_event()
