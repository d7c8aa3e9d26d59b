"""Compressed sessions: the codec of one chunk, round trips of every kind of data at every
level (sealed and plaintext, under chaos), re-sends that are the very bytes sent first, and
hostile frames a receiver must refuse."""

from __future__ import annotations

import os
import random
import zlib

import anyio
import pytest
import zstandard

from harness import chaos_endpoints, run_session
from hostile import (
    _KEYINGS,
    CHECKPHRASE,
    Peer,
    hello,
    make_hello,
    poll_until,
    start_receiver,
)
from procs import Procs, compressible_text, free_port
from viamillipede import BytesSource
from viamillipede.chaos import ChaosScheduler, FaultKind
from viamillipede.cli import UsageError, parse
from viamillipede.errors import ProtocolViolation
from viamillipede.squeeze import (
    MAX_LEVEL,
    MIN_GAIN,
    MIN_LEVEL,
    AdaptivePolicy,
    BadFrame,
    CompressionCounters,
    Squeezer,
    parse_compress,
)
from viamillipede.stats import Counters, Report
from viamillipede.testing import MemoryNetwork, PassThrough
from viamillipede.transmitter import Transmitter
from viamillipede.wire import (
    DATA_HEADER_SIZE,
    Ack,
    Data,
    Error,
    Feature,
    Mode,
    WelcomeStatus,
    encode,
    pack_data_header,
)
from viamillipede.wire.frames import DATA_HEADER, T_DATA, T_DATA_Z
from viamillipede.wire.secure import SEAL_OVERHEAD, ChunkSealer

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
WORDS = [w.encode() for w in (
    "the", "millipede", "walks", "on", "many", "legs", "over", "network", "in", "order",
    "and", "keeps", "going", "when", "a", "link", "dies", "zfs", "send", "receive", "pool",
    "snapshot", "dataset", "stream", "chunk", "window", "sequence",
)]


def text(n: int, seed: int = 1) -> bytes:
    """``n`` bytes of word salad: zstd takes it to about a third."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(WORDS, k=512)) + b"\n"
    return bytes(out[:n])


def noise(n: int, seed: int = 2) -> bytes:
    return random.Random(seed).randbytes(n)


def mixed(n: int) -> bytes:
    """Runs of text and of noise, each a few chunks long, so some chunks shrink and some do
    not, and some straddle the two."""
    out = bytearray()
    i = 0
    while len(out) < n:
        run = (2 + i % 3) * CHUNK + 12345
        out += text(run, seed=i) if i % 2 == 0 else noise(run, seed=i)
        i += 1
    return bytes(out[:n])


DATA = {"text": text(20 * CHUNK + 99), "noise": noise(12 * CHUNK + 7), "mixed": mixed(30 * CHUNK)}


# -- one chunk ---------------------------------------------------------------------------------


def frame_of(data: bytes, level: int = 3, **options: bool) -> bytes:
    return zstandard.ZstdCompressor(level=level, **options).compress(data)  # type: ignore[arg-type]


def test_a_chunk_round_trips_at_every_level_in_place() -> None:
    squeezer = Squeezer()
    data = text(CHUNK)
    for level in [*range(MIN_LEVEL, 0), *range(1, MAX_LEVEL + 1)]:
        buf = bytearray(data)
        n = squeezer.compress_into(level, memoryview(buf), memoryview(buf))
        assert 0 < n <= MIN_GAIN * len(data), level
        out = bytearray(CHUNK)
        assert squeezer.decompress_into(memoryview(buf)[:n], memoryview(out)) == len(data)
        assert out == data


def test_a_chunk_that_does_not_shrink_is_not_compressed() -> None:
    buf = bytearray(noise(CHUNK))
    before = bytes(buf)
    assert Squeezer().compress_into(1, memoryview(buf), memoryview(buf)) == 0
    assert buf == before, "a chunk sent raw must be left as it was"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "not a zstd frame"),
        (b"\x00" * 64, "not a zstd frame"),
        (frame_of(b"x" * 5000), "announcing 5000 bytes"),  # more than the 4096 allowed
        (frame_of(b"x" * 100, write_content_size=False), "announcing -1 bytes"),
        (frame_of(b""), "announcing 0 bytes"),
        (frame_of(text(3000))[:-5], "decode"),
        (frame_of(text(3000))[:20] + bytes(200), "decode"),
    ],
    ids=["empty", "zeros", "too-big", "no-size", "zero-size", "truncated", "garbled"],
)
def test_hostile_frames_are_refused_without_decoding_past_the_buffer(payload: bytes,
                                                                     why: str) -> None:
    out = bytearray(4096)
    with pytest.raises(BadFrame, match=why):
        Squeezer().decompress_into(memoryview(payload), memoryview(out))


def test_a_frame_that_lies_about_its_size_is_refused() -> None:
    """A frame header saying 100 bytes in front of a frame of 3000: decoding stops at the
    buffer's end, and the lie is caught."""
    good = bytearray(frame_of(text(3000), write_checksum=False))
    small = frame_of(text(100), write_checksum=False)
    header = zstandard.frame_header_size(small)
    lie = small[:header] + good[zstandard.frame_header_size(bytes(good)):]
    with pytest.raises(BadFrame):
        Squeezer().decompress_into(memoryview(lie), memoryview(bytearray(4096)))


@pytest.mark.parametrize(
    ("text_", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("off", None), ("zstd", 3), ("zstd:1", 1),
     ("zstd:-7", -7), ("zstd:19", 19)],
)
def test_compress_values(text_: str, expected: object) -> None:
    assert parse_compress(text_) == expected


@pytest.mark.parametrize("bad", ["zstd:0", "zstd:20", "zstd:-8", "zstd:fast", "lz4", "gzip"])
def test_bad_compress_values_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match=r"level|unknown compression"):
        parse_compress(bad)
    with pytest.raises(UsageError, match="compress"):
        parse(["tx", "h", "1", "--compress", bad])


def test_the_command_line_forms() -> None:
    def compress(*argv: str) -> object:
        cfg = parse(list(argv))
        assert not isinstance(cfg, str)
        return cfg.compress

    assert compress("tx", "h", "1") is None
    assert compress("tx", "h", "1", "compress") == "auto"
    assert compress("compress", "tx", "h", "1") == "auto", "the word alone leaves tx alone"
    assert compress("tx", "h", "1", "compress", "zstd:5", "threads", "2") == 5
    assert compress("tx", "h", "1", "--compress=zstd") == 3
    assert compress("tx", "h", "1", "--compress", "off") is None
    with pytest.raises(UsageError, match="compress goes with tx"):
        parse(["rx", "1", "compress"])
    with pytest.raises(UsageError, match="level 30"):
        parse(["tx", "h", "1", "compress", "zstd:30"])


def test_a_transmitter_refuses_levels_zstd_has_not() -> None:
    for bad in (0, 20, -8, True):
        with pytest.raises(ValueError, match=r"level|compress"):
            Transmitter(BytesSource(b""), MemoryNetwork().connect, compress=bad)


# -- whole sessions ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("level", [-7, -1, 1, 3, 9, 19])
@pytest.mark.parametrize("mode", ["sealed", "plaintext", "plaintext-checksum"])
async def test_round_trips(kind: str, level: int, mode: str) -> None:
    data = DATA[kind]
    plaintext = mode != "sealed"
    session = await run_session(
        data, threads=3, chunk_size=CHUNK, compress=level, plaintext=plaintext,
        checksum=mode.endswith("checksum"), rx_options={"plaintext": plaintext})
    assert session.received == data
    tx, rx = session.tx.compression(), session.rx.compression()
    assert tx is not None and rx is not None
    assert tx.raw_bytes == rx.raw_bytes == len(data)
    assert tx.wire_bytes == rx.wire_bytes
    assert tx.chunks == rx.chunks == -(-len(data) // CHUNK)
    assert tx.setting == f"zstd:{level}" and rx.setting == "zstd"
    if kind == "noise":
        assert tx.chunks_raw == tx.chunks and tx.ratio == 1.0
    elif kind == "text":
        assert tx.chunks_raw <= 1 and tx.ratio < 0.5  # the 99-byte tail may not shrink
    else:
        assert 0 < tx.chunks_raw < tx.chunks
    assert session.tx_stats.nbytes == len(data)


@pytest.mark.parametrize("level", [*range(MIN_LEVEL, 0), *range(1, MAX_LEVEL + 1)])
def test_every_level_carries_mixed_data(level: int) -> None:
    """Every level zstd:LEVEL accepts, a whole sealed session each, on Trio (the matrix above
    takes a few of them through every mode and both backends)."""
    data = DATA["mixed"]

    async def main() -> None:
        session = await run_session(data, threads=2, chunk_size=CHUNK, compress=level)
        assert session.received == data
        stats = session.tx.compression()
        assert stats is not None and 0 < stats.chunks_raw < stats.chunks

    anyio.run(main, backend="trio")


@pytest.mark.parametrize("size", [0, 1, 100, CHUNK, CHUNK + 1])
async def test_small_streams(size: int) -> None:
    data = text(size)
    session = await run_session(data, threads=2, chunk_size=CHUNK, compress=1)
    assert session.received == data


class FastLinkBusyHost(AdaptivePolicy):
    """``auto`` on a host whose cores are all busy."""

    def __init__(self, window: int) -> None:
        super().__init__(window, idle=lambda: 0.0)


class Paced(PassThrough):
    """A link of ``rate`` bytes a second (the sleep is the link's clock, as a real link's
    bandwidth is)."""

    rate = 8e6

    async def send(self, item: bytes) -> None:
        await anyio.sleep(len(item) / self.rate)
        await super().send(item)


async def test_auto_compresses_over_a_slow_link_with_cores_to_spare() -> None:
    """A real session: two links of 8 MB/s, a host with idle cores: auto turns compression
    on, and the stream takes well under what it would raw."""
    data = text(96 * CHUNK)
    net = MemoryNetwork()

    async def connect(i: int) -> Paced:
        return Paced(await net.connect(i))

    policy = AdaptivePolicy(8, idle=lambda: 1.5)
    session = await run_session(data, net=net, connect=connect, threads=2, chunk_size=CHUNK,
                                window=8, compress=policy, limit=60)
    assert session.received == data
    stats = session.tx.compression()
    assert stats is not None
    # Off while it measures the stream without (a period), then on for the rest.
    assert stats.chunks - stats.chunks_raw >= 30, stats
    assert any("network-bound" in line for line in policy.decisions), list(policy.decisions)
    assert not any("slower" in line for line in policy.decisions), list(policy.decisions)
    assert stats.setting.startswith("auto (zstd:")


async def test_auto_stays_off_where_the_host_has_no_core_to_spare() -> None:
    data = text(96 * CHUNK)
    net = MemoryNetwork()

    async def connect(i: int) -> Paced:
        return Paced(await net.connect(i))

    policy = FastLinkBusyHost(8)
    session = await run_session(data, net=net, connect=connect, threads=2, chunk_size=CHUNK,
                                window=8, compress=policy, limit=60)
    assert session.received == data
    stats = session.tx.compression()
    assert stats is not None and stats.chunks_raw == stats.chunks
    assert stats.setting == "auto (off)"


@pytest.mark.parametrize("seed", [3, 17, 1731])
@pytest.mark.parametrize("plaintext", [False, True])
async def test_compressed_sessions_survive_chaos(seed: int, plaintext: bool) -> None:
    data = DATA["mixed"]
    net = MemoryNetwork()
    kinds = [FaultKind.RESET, FaultKind.DELAY, FaultKind.SHORT]
    if not plaintext:
        kinds.append(FaultKind.CORRUPT)
    sched = ChaosScheduler(seed=seed, rate=0.05, kinds=kinds)
    listener, connect = chaos_endpoints(sched, net)
    session = await run_session(
        data, net=net, connect=connect, listener=listener, threads=4, chunk_size=CHUNK,
        compress=1, plaintext=plaintext, checksum=plaintext,
        rx_options={"plaintext": plaintext}, limit=60)
    assert session.received == data, f"chaos seed {seed}"
    assert sched.log.summary(), "no fault was injected"


class Recorder(PassThrough):
    """Keeps every DATA and DATA_Z frame the transmitter sends, by seq (a chunk goes out as
    one frame in one send); and, while ``breaks`` lasts, cuts the connection right after its
    third chunk went out, so chunks it had in flight are sent again."""

    def __init__(self, inner: object, frames: dict[int, list[bytes]], breaks: list[int]) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.frames = frames
        self.breaks = breaks
        self.sent = 0

    async def send(self, item: bytes) -> None:
        raw = bytes(item)
        chunk = raw[:1] in (bytes([T_DATA]), bytes([T_DATA_Z])) and len(raw) >= DATA_HEADER_SIZE
        if chunk:
            _, seq, length, _ = DATA_HEADER.unpack_from(raw)
            if len(raw) == DATA_HEADER_SIZE + length:
                self.frames.setdefault(seq, []).append(raw)
        await super().send(item)
        if chunk:
            self.sent += 1
            if self.sent == 3 and self.breaks:
                self.breaks.pop()
                await self.aclose()
                raise anyio.BrokenResourceError("cut by the test")


@pytest.mark.parametrize("plaintext", [False, True])
async def test_a_resent_chunk_is_the_frame_sent_first_byte_for_byte(plaintext: bool) -> None:
    """Connections are cut with chunks in flight, so chunks go out again: every copy of a
    chunk is the same frame (compressed or not, sealed once), never compressed or sealed
    anew."""
    data = DATA["mixed"]
    net = MemoryNetwork()
    frames: dict[int, list[bytes]] = {}
    breaks = list(range(8))

    async def connect(i: int) -> Recorder:
        return Recorder(await net.connect(i), frames, breaks)

    session = await run_session(
        data, net=net, connect=connect, threads=4, chunk_size=CHUNK, compress=1,
        plaintext=plaintext, rx_options={"plaintext": plaintext}, limit=60)
    assert session.received == data
    assert not breaks, "fewer cuts than planned"
    again = {seq: copies for seq, copies in frames.items() if len(copies) > 1}
    assert again, "no chunk was sent twice"
    assert any(c[0][0] == T_DATA_Z for c in again.values()), "no compressed chunk re-sent"
    for seq, copies in again.items():
        assert all(c == copies[0] for c in copies), f"chunk {seq} changed between sends"
    assert set(frames) == set(range(-(-len(data) // CHUNK)))


# -- hostile frames ----------------------------------------------------------------------------


def z_frame(seq: int, payload: bytes, checksum: int = 0) -> bytes:
    return encode(Data(seq, checksum, payload, compressed=True))


async def refused_with_no_ack(peer: Peer) -> None:
    events, closed = await peer.events_until_closed(5.0)
    assert closed, "the receiver kept a connection that sent a bad chunk"
    assert not any(isinstance(e, Ack) for e in events), events


async def test_unknown_compression_in_hello_is_refused() -> None:
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg)
        peer = await Peer.connect(served.port)
        for features in (0x20, 0xF0, Feature.COMPRESSION_ZSTD | 0x1000):
            welcome = await hello(peer, features=features)
            assert welcome.status == WelcomeStatus.BAD_PARAMETERS, features
            await peer.aclose()
            peer = await Peer.connect(served.port)
        await peer.aclose()
        tg.cancel_scope.cancel()


async def test_compressed_chunk_in_place_of_the_handshake_is_refused() -> None:
    """A DATA_Z right after HELLO, before any key exchange: the connection goes, nothing is
    written, and the receiver still serves a real session afterwards."""
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg)
        peer = await Peer.connect(served.port)
        await peer.send(encode(make_hello(features=Feature.COMPRESSION_ZSTD)),
                        z_frame(0, frame_of(b"sneaky " * 100)))
        events, closed = await peer.events_until_closed(5.0)
        assert closed and not any(isinstance(e, Ack) for e in events), events
        await peer.aclose()
        peer = await Peer.connect(served.port)
        welcome = await hello(peer, features=Feature.COMPRESSION_ZSTD)
        assert welcome.status == WelcomeStatus.ACCEPTED
        assert served.sink.data == b""
        await peer.aclose()
        tg.cancel_scope.cancel()


async def test_compressed_chunk_in_a_session_that_did_not_announce_it_drops_the_connection(
) -> None:
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg)
        peer = await Peer.connect(served.port)
        welcome = await hello(peer, features=0)
        assert welcome.status == WelcomeStatus.ACCEPTED
        await peer.send(z_frame(0, frame_of(b"hello " * 50)))
        await refused_with_no_ack(peer)
        assert served.sink.data == b""
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    "payload",
    [b"\x28\xb5\x2f\xfd" + bytes(40), frame_of(b"y" * 5000), frame_of(b"z" * 10,
                                                                       write_content_size=False)],
    ids=["garbled", "bigger-than-a-chunk", "no-size"],
)
async def test_plaintext_chunk_that_does_not_decode_is_dropped_and_can_come_again(
        payload: bytes) -> None:
    """In clear, a bad frame may be damage on the way: the connection goes, no ACK, nothing
    written; the chunk sent again (well formed) on a new connection is taken."""
    session_id = os.urandom(16)
    good = b"hello millipede " * 200
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg)
        peer = await Peer.connect(served.port)
        hello_fields = {"session_id": session_id, "features": Feature.COMPRESSION_ZSTD}
        assert (await hello(peer, **hello_fields)).status == WelcomeStatus.ACCEPTED
        await peer.send(z_frame(0, payload))
        await refused_with_no_ack(peer)
        peer = await Peer.connect(served.port)
        assert (await hello(peer, conn_index=1, **hello_fields)).status == \
            WelcomeStatus.ACCEPTED
        await peer.send(z_frame(0, frame_of(good)))
        event = await peer.next_event()
        assert event == Ack(0, 0) or (isinstance(event, Ack) and event.seq == 0), event
        await poll_until(lambda: bytes(served.sink.data) == good, 5.0, "the good copy written")
        await peer.aclose()
        tg.cancel_scope.cancel()


async def test_plaintext_checksum_covers_the_decoded_chunk() -> None:
    good = b"checked " * 300
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg)
        peer = await Peer.connect(served.port)
        features = Feature.COMPRESSION_ZSTD | Feature.CHECKSUM_CRC32
        assert (await hello(peer, features=features)).status == WelcomeStatus.ACCEPTED
        # The checksum of the compressed bytes is the wrong one: refused.
        compressed = frame_of(good)
        await peer.send(z_frame(0, compressed, zlib.crc32(compressed)))
        await refused_with_no_ack(peer)
        assert served.sink.data == b""
        tg.cancel_scope.cancel()


async def test_sealed_chunk_that_opens_but_does_not_decode_fails_the_session() -> None:
    """Sealed, a chunk that verifies was made by the transmitter itself: sending it again
    cannot help, so the receiver ends the session with an ERROR and fails."""
    session_id = os.urandom(16)
    async with anyio.create_task_group() as tg:
        served = await start_receiver(tg, plaintext=False)
        peer = await Peer.connect(served.port)
        welcome = await hello(peer, session_id=session_id, mode=0, chunk_size=4096,
                              features=Feature.COMPRESSION_ZSTD)
        assert welcome.status == WelcomeStatus.ACCEPTED
        keys = _KEYINGS[(session_id, CHECKPHRASE)].keys
        assert keys is not None
        sealer = ChunkSealer(keys.data_tx, session_id, 4096)
        plain = b"\x28\xb5\x2f\xfd" + bytes(60)  # opens fine, is no zstd frame
        frame = bytearray(DATA_HEADER_SIZE + len(plain) + SEAL_OVERHEAD)
        pack_data_header(frame, 0, len(plain) + SEAL_OVERHEAD, 0, compressed=True)
        header = bytes(frame[:DATA_HEADER_SIZE])
        body = memoryview(frame)[DATA_HEADER_SIZE:]
        sealer.seal_into(0, header, plain, body)
        await peer.send(bytes(frame))
        events, closed = await peer.events_until_closed(5.0)
        assert closed
        assert any(isinstance(e, Error) and "does not decompress" in e.message
                   for e in events), events
        assert await served.outcome.wait(5.0)
        assert isinstance(served.outcome.error, ProtocolViolation), served.outcome.describe()
        assert served.sink.data == b""
        tg.cancel_scope.cancel()


def test_make_hello_default_is_plaintext() -> None:
    """The crafted peers above rely on it (and say mode=0 for a sealed session)."""
    assert make_hello().mode == Mode.PLAINTEXT


# -- the command line, end to end --------------------------------------------------------------


def test_the_cli_compresses_reports_and_writes_valid_stats_json(procs: Procs) -> None:
    """Real processes over loopback, from a pipe: the output is the input, both ends' final
    summaries and --stats-json (checked against the schema) tell the same compression."""
    from test_operability import load_stats

    source = procs.dir / "in"
    source.write_bytes(compressible_text(6 * 1000 * 1000, seed=8) + noise(1_000_000))
    port = free_port()
    rx = procs.rx(port, "--stats-json", str(procs.dir / "rx.json"))
    cat = procs.cat(source)
    tx = procs.tx(port, "compress", "zstd:1", "--chunk-size", "256KiB", "--stats-json",
                  str(procs.dir / "tx.json"), stdin=cat.stdout)
    tx_err = tx.finish(0)
    rx_err = rx.finish(0)
    assert rx.out.read_bytes() == source.read_bytes()
    tx_doc = load_stats(procs.dir / "tx.json")["report"]["compression"]
    rx_doc = load_stats(procs.dir / "rx.json")["report"]["compression"]
    assert tx_doc["setting"] == "zstd:1" and rx_doc["setting"] == "zstd"
    for field in ("raw_bytes", "wire_bytes", "chunks", "chunks_raw"):
        assert tx_doc[field] == rx_doc[field], field
    assert tx_doc["raw_bytes"] == 7_000_000 and tx_doc["ratio"] < 0.6
    assert 0 < tx_doc["chunks_raw"] < tx_doc["chunks"], "the noise at the end went raw"
    assert f"as {tx_doc['wire_bytes']} (ratio" in tx_err
    assert f"as {rx_doc['wire_bytes']} (ratio" in rx_err


def test_a_report_renders_its_compression_line() -> None:
    counters = CompressionCounters("auto (zstd:1)")
    counters.count(2000, 500, compressed=True)
    counters.count(1000, 1000, compressed=False)
    report = Report(totals=Counters("tx").snapshot(), window=4, window_used=0,
                    reorder_depth=0, connections=(), targets=(),
                    compression=counters.snapshot())
    assert ("  compression auto (zstd:1): 3000 bytes as 1500 (ratio 0.500), 50% of 2 chunks "
            "sent raw") in report.render().splitlines()
    assert report.to_dict()["compression"]["raw_share"] == 0.5
