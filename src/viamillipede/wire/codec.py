"""Sans-IO codec: bytes in, typed events out; events in, bytes out.

Modelled on h11: the caller feeds whatever it read with :meth:`Decoder.receive_data` and pulls
events with :meth:`Decoder.next_event` until it says :data:`NEED_DATA`.  No I/O and no async
here, so every rule of the protocol can be tested with plain bytes, and garbage can only ever
raise :class:`ProtocolError`.

Two ways to take DATA payloads:

* non-streaming (default): :meth:`next_event` returns a whole :class:`Data` once the payload is
  buffered.  Simple, used by tests and by small peers.
* streaming: :meth:`next_event` returns :class:`DataHeader` and the caller moves the payload
  itself -- first what the decoder already holds (:meth:`take_payload_into`), then straight from
  the socket into its chunk buffer, reporting that with :meth:`payload_consumed`.  This is how
  the receiver avoids copying 2 MiB chunks through an intermediate buffer.
  :meth:`read_hint` says how many bytes may be read without crossing into the next frame.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

from construct import ConstructError

from .errors import RemoteProtocolError, TamperedFrame
from .events import (
    Ack,
    Auth,
    Bye,
    ByeOk,
    ConnectionClosed,
    Data,
    DataHeader,
    Error,
    Event,
    Fin,
    Hello,
    Welcome,
)
from .frames import (
    ACK_FRAME,
    AUTH_BODY,
    BODIES,
    BYE_BODY,
    BYE_OK_BODY,
    DATA_HEADER,
    ERROR_BODY,
    FIN_BODY,
    FIXED_SIZE,
    HELLO_BODY,
    MAGIC,
    MAX_ERROR_TEXT,
    T_ACK,
    T_AUTH,
    T_BYE,
    T_BYE_OK,
    T_DATA,
    T_DATA_Z,
    T_ERROR,
    T_FIN,
    T_HELLO,
    T_WELCOME,
    TAGGED,
    WELCOME_BODY,
)
from .secure import TAG_SIZE, AuthFailed, TagChecker, Tagger


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Decoder.next_event` when more bytes are needed.
NEED_DATA: Final = _NeedData.NEED_DATA

#: Largest DATA payload any decoder accepts, whatever was negotiated (keeps a hostile HELLO
#: from making us allocate gigabytes).
ABSOLUTE_MAX_PAYLOAD = 256 * 1024 * 1024

_FRAME_NAMES = {
    T_HELLO: "HELLO",
    T_WELCOME: "WELCOME",
    T_DATA: "DATA",
    T_DATA_Z: "DATA_Z",
    T_ACK: "ACK",
    T_BYE: "BYE",
    T_BYE_OK: "BYE_OK",
    T_FIN: "FIN",
    T_ERROR: "ERROR",
    T_AUTH: "AUTH",
}


class _State(Enum):
    EXPECT_OPENING = "expect-opening"
    OPEN = "open"
    PAYLOAD = "payload"
    FINISHED = "finished"


class Decoder:
    """Decodes the frames one side of a connection receives.

    Use :meth:`for_receiver` on the receiving end (it decodes what a transmitter sends: HELLO,
    then DATA/BYE/ERROR) and :meth:`for_transmitter` on the sending end (WELCOME, then
    ACK/BYE_OK/ERROR).  Frames in the wrong order or direction are protocol errors.
    """

    __slots__ = (
        "_allowed",
        "_buf",
        "_eof",
        "_opening",
        "_pending_header",
        "_pos",
        "_remaining",
        "_state",
        "_stream_payload",
        "checker",
        "max_payload",
    )

    def __init__(
        self,
        opening: frozenset[int],
        allowed: frozenset[int],
        *,
        max_payload: int = ABSOLUTE_MAX_PAYLOAD,
        stream_payload: bool = False,
    ) -> None:
        self._opening = opening
        self._allowed = allowed
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._state = _State.EXPECT_OPENING
        self._stream_payload = stream_payload
        self._remaining = 0
        self._pending_header: DataHeader | None = None
        #: Set once the handshake is done: control frames must then carry valid tags.
        self.checker: TagChecker | None = None
        #: DATA frames longer than this are protocol errors; set it from the HELLO.
        self.max_payload = min(max_payload, ABSOLUTE_MAX_PAYLOAD)

    @classmethod
    def for_receiver(cls, *, max_payload: int = ABSOLUTE_MAX_PAYLOAD,
                     stream_payload: bool = False) -> Decoder:
        return cls(frozenset({T_HELLO}), frozenset({T_AUTH, T_DATA, T_DATA_Z, T_BYE, T_FIN,
                                                         T_ERROR}),
                   max_payload=max_payload, stream_payload=stream_payload)

    @classmethod
    def for_transmitter(cls) -> Decoder:
        # A refusal is a WELCOME at once; otherwise AUTH comes first, then a tagged WELCOME.
        return cls(frozenset({T_AUTH, T_WELCOME}),
                   frozenset({T_WELCOME, T_ACK, T_BYE_OK, T_ERROR}))

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data() after end of stream")
            return
        if not data:
            self._eof = True
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes fed but not yet decoded: after a protocol error, what the peer
        sent instead (so an error can say "answered with HTTP")."""
        return bytes(self._buf[self._pos : self._pos + n])

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet turned into events (or payload not yet taken)."""
        return len(self._buf) - self._pos

    def read_hint(self) -> int:
        """How many bytes the caller may read next without passing the end of this frame.

        Reading at most this much keeps payload bytes out of the decoder's buffer, so the next
        payload can be received straight into its destination.
        """
        if self._state is _State.PAYLOAD:
            return max(self._remaining - self.buffered, 0)
        have = self.buffered
        if have == 0:
            types = self._opening if self._state is _State.EXPECT_OPENING else self._allowed
            return min(FIXED_SIZE[t] for t in types)
        ftype = self._buf[self._pos]
        size = FIXED_SIZE.get(ftype, 1)
        return max(size - have, 1)

    # -- streaming payloads --------------------------------------------------------------

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current DATA frame the caller has yet to take (streaming)."""
        return self._remaining if self._state is _State.PAYLOAD else 0

    def take_payload_into(self, dest: memoryview) -> int:
        """Copy already-buffered payload bytes into ``dest``; return how many."""
        if self._state is not _State.PAYLOAD:
            raise RuntimeError("no DATA payload is pending")
        n = min(len(dest), self._remaining, self.buffered)
        if n:
            dest[:n] = self._buf[self._pos : self._pos + n]
            self._pos += n
            self._remaining -= n
            self._maybe_end_payload()
        return n

    def payload_consumed(self, n: int) -> None:
        """Record that the caller received ``n`` payload bytes itself, bypassing the decoder."""
        if self._state is not _State.PAYLOAD or n > self._remaining or self.buffered:
            raise RuntimeError("payload_consumed() out of step with the decoder")
        self._remaining -= n
        self._maybe_end_payload()

    def _maybe_end_payload(self) -> None:
        if self._remaining == 0:
            self._state = _State.OPEN

    # -- output --------------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """The next complete event, :data:`NEED_DATA`, or :class:`ProtocolError`."""
        if self._state is _State.PAYLOAD:
            if self._eof and self.buffered < self._remaining:
                raise RemoteProtocolError("connection closed inside a DATA payload")
            raise RuntimeError("take the pending DATA payload before asking for the next event")
        have = self.buffered
        if have == 0:
            if self._eof:
                return ConnectionClosed()
            return NEED_DATA
        if self._state is _State.FINISHED:
            raise RemoteProtocolError("bytes after the final frame of the connection")
        buf = self._buf
        pos = self._pos
        ftype = buf[pos]
        expected = self._opening if self._state is _State.EXPECT_OPENING else self._allowed
        if ftype not in expected:
            name = _FRAME_NAMES.get(ftype)
            if name is None:
                raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
            raise RemoteProtocolError(f"unexpected {name} frame in state {self._state.value}")
        size = FIXED_SIZE[ftype]
        tail = TAG_SIZE if self.checker is not None and ftype in TAGGED else 0
        if have < size + (tail if ftype != T_ERROR else 0):
            return self._need(f"truncated {_FRAME_NAMES[ftype]} frame")
        if ftype in (T_DATA, T_DATA_Z):
            _, seq, length, checksum = DATA_HEADER.unpack_from(buf, pos)
            if length == 0:
                raise RemoteProtocolError("DATA frame with no payload")
            if length > self.max_payload:
                raise RemoteProtocolError(
                    f"DATA frame of {length} bytes exceeds the negotiated {self.max_payload}"
                )
            if self._stream_payload:
                self._pos = pos + size
                if length:
                    self._state = _State.PAYLOAD
                    self._remaining = length
                return DataHeader(seq, length, checksum, ftype == T_DATA_Z)
            if have < size + length:
                return self._need("truncated DATA payload")
            start = pos + size
            self._pos = start + length
            return Data(seq, checksum, bytes(buf[start : start + length]), ftype == T_DATA_Z)
        if ftype == T_ACK:
            self._verify(pos, pos + size, tail)
            _, seq, written = ACK_FRAME.unpack_from(buf, pos)
            return Ack(seq, written)
        if ftype == T_ERROR:
            parsed = ERROR_BODY.parse(bytes(buf[pos + 1 : pos + size]))
            length = parsed.length
            if length > MAX_ERROR_TEXT:
                raise RemoteProtocolError(f"ERROR text of {length} bytes is too long")
            if have < size + length + tail:
                return self._need("truncated ERROR frame")
            self._verify(pos, pos + size + length, tail)
            text = bytes(buf[pos + size : pos + size + length]).decode("utf-8", "replace")
            self._state = _State.FINISHED
            return Error(parsed.code, text)
        body = bytes(buf[pos + 1 : pos + size])
        self._verify(pos, pos + size, tail)
        if ftype == T_AUTH:
            a = AUTH_BODY.parse(body)
            self._state = _State.OPEN
            return Auth(a.kind, a.nonce, a.pake, a.proof)
        if ftype == T_HELLO:
            if body[:4] != MAGIC:
                raise RemoteProtocolError("bad magic: the peer does not speak viamillipede")
            try:
                h = HELLO_BODY.parse(body)
            except ConstructError as exc:  # pragma: no cover - the magic check comes first
                raise RemoteProtocolError(f"malformed HELLO: {exc}") from None
            self._state = _State.OPEN
            return Hello(
                mode=h.mode,
                session_id=h.session_id,
                conn_index=h.conn_index,
                chunk_size=h.chunk_size,
                window=h.window,
                features=h.features,
                version=h.version,
            )
        if ftype == T_WELCOME:
            w = WELCOME_BODY.parse(body)
            self._state = _State.OPEN
            return Welcome(w.status, w.session_id, w.written)
        if ftype == T_BYE:
            b = BYE_BODY.parse(body)
            return Bye(b.chunks, b.nbytes)
        if ftype == T_FIN:
            f = FIN_BODY.parse(body)
            self._state = _State.FINISHED
            return Fin(f.chunks, f.nbytes)
        assert ftype == T_BYE_OK
        b = BYE_OK_BODY.parse(body)
        self._state = _State.FINISHED
        return ByeOk(b.chunks, b.nbytes)

    def _verify(self, start: int, end: int, tail: int) -> None:
        """Consume the frame at ``start:end`` and its tag, if it carries one; raise
        TamperedFrame if the tag does not verify."""
        self._pos = end + tail
        if tail:
            assert self.checker is not None
            buf = self._buf
            try:
                self.checker.check(bytes(buf[start:end]), bytes(buf[end : end + tail]))
            except AuthFailed:
                name = _FRAME_NAMES[buf[start]]
                raise TamperedFrame(f"{name} frame with a tag that does not verify") from None

    def _need(self, what: str) -> _NeedData:
        if self._eof:
            raise RemoteProtocolError(f"connection closed inside a frame ({what})")
        return NEED_DATA


def pack_data_header(buf: bytearray | memoryview, seq: int, length: int, checksum: int,
                     compressed: bool = False) -> None:
    """Write a DATA (or DATA_Z) header into the first :data:`DATA_HEADER_SIZE` bytes of ``buf``.

    The transmitter keeps header space in front of every chunk buffer, so header and payload go
    out in one ``send`` without concatenation.
    """
    DATA_HEADER.pack_into(buf, 0, T_DATA_Z if compressed else T_DATA, seq, length, checksum)


def encode_ack(seq: int, written: int) -> bytes:
    return ACK_FRAME.pack(T_ACK, seq, written)


def _build(body: Any, ftype: int, fields: dict[str, Any]) -> bytes:
    return bytes([ftype]) + bytes(body.build(fields))


def encode(event: Event, tagger: Tagger | None = None) -> bytes:
    """The bytes of one frame, with its tag if ``tagger`` is given (control frames after the
    handshake).  DATA payloads are concatenated here: fine for tests and small frames; the
    transmitter's hot path uses :func:`pack_data_header` instead."""
    frame = _encode(event)
    if tagger is None:
        return frame
    if frame[0] not in TAGGED:
        raise ValueError(f"{type(event).__name__} frames carry no tag")
    return frame + tagger.tag(frame)


def _encode(event: Event) -> bytes:
    if isinstance(event, Auth):
        fields = {"kind": event.kind, "nonce": event.nonce, "pake": event.pake,
                  "proof": event.proof}
        return _build(AUTH_BODY, T_AUTH, fields)
    if isinstance(event, Hello):
        fields = {
            "version": event.version,
            "mode": event.mode,
            "session_id": event.session_id,
            "conn_index": event.conn_index,
            "chunk_size": event.chunk_size,
            "window": event.window,
            "features": event.features,
        }
        return _build(HELLO_BODY, T_HELLO, fields)
    if isinstance(event, Welcome):
        fields = {"status": event.status, "session_id": event.session_id, "written": event.written}
        return _build(WELCOME_BODY, T_WELCOME, fields)
    if isinstance(event, Data):
        fields = {"seq": event.seq, "length": len(event.payload), "checksum": event.checksum}
        ftype = T_DATA_Z if event.compressed else T_DATA
        return _build(BODIES[ftype], ftype, fields) + event.payload
    if isinstance(event, DataHeader):
        fields = {"seq": event.seq, "length": event.length, "checksum": event.checksum}
        ftype = T_DATA_Z if event.compressed else T_DATA
        return _build(BODIES[ftype], ftype, fields)
    if isinstance(event, Ack):
        return _build(BODIES[T_ACK], T_ACK, {"seq": event.seq, "written": event.written})
    if isinstance(event, Bye):
        return _build(BYE_BODY, T_BYE, {"chunks": event.chunks, "nbytes": event.nbytes})
    if isinstance(event, ByeOk):
        return _build(BYE_OK_BODY, T_BYE_OK, {"chunks": event.chunks, "nbytes": event.nbytes})
    if isinstance(event, Fin):
        return _build(FIN_BODY, T_FIN, {"chunks": event.chunks, "nbytes": event.nbytes})
    if isinstance(event, Error):
        # Cut at a character boundary: a split UTF-8 sequence would not be valid text.
        text = event.message.encode("utf-8")[:MAX_ERROR_TEXT].decode("utf-8", "ignore").encode()
        return _build(ERROR_BODY, T_ERROR, {"code": event.code, "length": len(text)}) + text
    raise TypeError(f"cannot encode {event!r}")
