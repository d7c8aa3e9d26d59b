"""Compression of chunks (the sidechain): zstd per chunk, in worker threads, and the policy that
decides chunk by chunk whether, and how hard, to compress.

Why one zstd frame per chunk: chunks arrive in any order, on any connection, and a re-send must
be the very bytes sealed the first time, so each chunk has to decode alone.  The frame header
carries the chunk's size, which also bounds what a receiver will ever decompress.

Why a policy: zstd at level 1 runs at ~450 MB/s per core here and decompresses at ~1 GB/s.  On
a 200 Mbit link that multiplies the stream; on a fast LAN or loopback it slows it down, because
the CPU and not the network is what holds the stream back.  :class:`AdaptivePolicy` watches
which of the two the stream waits for, like ``zstd --adapt``, and checks that each step it
takes actually made the stream faster.  It is pure (the caller passes ``now`` and reports what
happened), so its tests run under a fake clock.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "DEFAULT_LEVEL",
    "LADDER",
    "MAX_LEVEL",
    "MIN_GAIN",
    "MIN_LEVEL",
    "AdaptivePolicy",
    "BadFrame",
    "CompressionCounters",
    "CpuMeter",
    "CompressionStats",
    "FixedPolicy",
    "Policy",
    "Squeezer",
    "compress_workers",
    "parse_compress",
]

#: The levels ``auto`` moves between, fastest first.
LADDER: tuple[int, ...] = (-5, -1, 1, 3, 6)
#: The level ``auto`` turns compression on at (it starts off): cheap enough that its cost
#: shows within a period where it does not pay, strong enough to matter at once on a slow link.
START_LEVEL = 1
#: ``zstd`` without a level, as the zstd command has it.
DEFAULT_LEVEL = 3
#: The levels ``zstd:LEVEL`` accepts: zstd's negative (fast) levels down to -7, and up to 19
#: (20 to 22 need windows far larger than a chunk for nothing).
MIN_LEVEL = -7
MAX_LEVEL = 19
#: A chunk goes compressed only if it shrinks to this fraction of its size or less; otherwise
#: the receiver would pay a decompression for next to nothing.
MIN_GAIN = 0.97


def compress_workers() -> int:
    """Chunks compressed (or decompressed) at once: one per core, since zstd releases the
    GIL; at most four."""
    return max(1, min(os.cpu_count() or 1, 4))


class BadFrame(ValueError):
    """A compressed payload that does not decode to one chunk of the announced size."""


class Squeezer:
    """Compresses and decompresses single chunks.  Thread-safe: each worker thread keeps its
    own zstd contexts (a context is not safe to share, and making one per chunk costs more
    than a small chunk's compression)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _zstd(self) -> Any:
        """The zstandard module, imported at the first chunk that needs it: the import costs
        ~35 ms of CPU, which a session whose ``auto`` never compresses should not pay (on a
        2-core loopback that was 3% of a 1 GiB transfer)."""
        import zstandard

        return zstandard

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache: dict[int, zstandard.ZstdCompressor] | None = getattr(self._local, "c", None)
        if cache is None:
            cache = self._local.c = {}
        ctx = cache.get(level)
        if ctx is None:
            # The content size goes in the frame header (the receiver's bound); no zstd
            # checksum: the seal, or the session's checksum, already covers the bytes.
            ctx = cache[level] = self._zstd.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False)
        return ctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        ctx: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if ctx is None:
            ctx = self._local.d = self._zstd.ZstdDecompressor()
        return ctx

    def compress_into(self, level: int, src: memoryview, dst: memoryview) -> int:
        """Compress ``src`` into ``dst`` (which may be ``src`` itself: the frame is made
        before it is copied); return its length, or 0 if it would not shrink to
        :data:`MIN_GAIN` of ``src`` (send it raw).  Runs with the GIL released."""
        frame = self._compressor(level).compress(src)
        n = len(frame)
        if n > MIN_GAIN * len(src) or n > len(dst):
            return 0
        dst[:n] = frame
        return n

    def announced(self, src: memoryview) -> int:
        """The size the frame in ``src`` says it decodes to (-1 if it says nothing or is no
        frame): cheap, for deciding where to decode it."""
        try:
            return int(self._zstd.frame_content_size(src))
        except self._zstd.ZstdError:
            return -1

    def decompress_into(self, src: memoryview, dst: memoryview) -> int:
        """Decode one frame from ``src`` into ``dst``; return the chunk's length.  Raises
        BadFrame for anything but one frame whose announced size is 1 to ``len(dst)`` bytes and
        which decodes to exactly that: a hostile frame cannot make us decode more than ``dst``
        holds."""
        zstd = self._zstd
        try:
            size = zstd.frame_content_size(src)
        except zstd.ZstdError as exc:
            raise BadFrame(f"not a zstd frame ({exc})") from None
        if not 1 <= size <= len(dst):
            raise BadFrame(f"a frame announcing {size} bytes (at most {len(dst)} allowed)")
        try:
            reader = self._decompressor().stream_reader(src, read_across_frames=False)
            n = 0
            while n < size:
                got = reader.readinto(dst[n:size])
                if not got:
                    break
                n += got
            extra = reader.read(1)
        except zstd.ZstdError as exc:
            raise BadFrame(f"the frame does not decode ({exc})") from None
        if n != size or extra:
            raise BadFrame(f"the frame decodes to {n + len(extra)}{'+' if extra else ''} "
                           f"bytes, not the {size} it announces")
        return n


def parse_compress(text: str) -> int | str | None:
    """``auto``, ``zstd[:LEVEL]`` or ``off`` (any case) as: "auto", a level, or None (off).
    Raises ValueError with a sentence for anything else."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("off", "no", "none"):
        return None
    if word == "zstd":
        return DEFAULT_LEVEL
    if word.startswith("zstd:"):
        try:
            level = int(word[5:])
        except ValueError:
            raise ValueError(f"compression level {word[5:]!r} is not a number") from None
        if not MIN_LEVEL <= level <= MAX_LEVEL or level == 0:
            raise ValueError(f"compression level {level} is out of range: zstd levels "
                             f"{MIN_LEVEL} to -1 (fast) and 1 to {MAX_LEVEL}")
        return level
    raise ValueError(f"unknown compression {text!r}: say auto, zstd, zstd:LEVEL or off")


# -- the policy --------------------------------------------------------------------------------


class Policy(Protocol):
    """Decides the level of each chunk; told what the stream waited for and what each chunk
    became."""

    def level(self, now: float) -> int | None:
        """The level to compress the next chunk at, or None to send it as it is."""

    def waited(self, now: float, *, window: float = 0.0, worker: float = 0.0) -> None:
        """The reader waited ``window`` seconds for room in the window (the network or the
        receiver holds the stream back) or ``worker`` seconds for a free compressor (the
        CPU does)."""

    def done(self, level: int | None, raw: int, wire: int, now: float) -> None:
        """A chunk of ``raw`` bytes, tried at ``level``, goes out as ``wire`` bytes (``raw``
        when sent as it is)."""

    def acked(self, raw: int, now: float) -> None:
        """Chunks of ``raw`` bytes in all were acknowledged: the stream's rate, measured
        where it counts (reading is faster while the window fills)."""

    def read_ahead(self) -> int | None:
        """How many chunks the reader may be ahead of the receiver's output for now, if
        fewer than the window."""

    def describe(self) -> str:
        """The level in use, for reports."""


class FixedPolicy:
    """``zstd:LEVEL``: every chunk at that level (still sent raw when it does not shrink)."""

    def __init__(self, level: int) -> None:
        self._level = level

    def level(self, now: float) -> int | None:
        return self._level

    def waited(self, now: float, *, window: float = 0.0, worker: float = 0.0) -> None:
        pass

    def done(self, level: int | None, raw: int, wire: int, now: float) -> None:
        pass

    def acked(self, raw: int, now: float) -> None:
        pass

    def read_ahead(self) -> int | None:
        return None

    def describe(self) -> str:
        return f"zstd:{self._level}"


#: A decision is taken every PERIOD seconds of stream, once at least MIN_CHUNKS chunks were
#: prepared in it (fewer say nothing about a rate).
PERIOD = 0.2
MIN_CHUNKS = 4
#: The first decision comes sooner: until then the reader is held to a few chunks ahead.
FIRST_PERIOD = 0.05
#: The reader waited for a compressor this share of the period: the CPU holds the stream back.
CPU_BUSY = 0.10
#: The reader waited for room in the window this share of the period: the network does.
NET_BUSY = 0.50
#: Idle cores on this host (all processes): below IDLE_LOW compression competes with the rest
#: of the work (the receiver, on loopback) and steps down; it steps up only with IDLE_ROOM.
IDLE_LOW = 0.25
IDLE_ROOM = 0.5
#: Turning compression on must keep at least this share of the rate without it, measured once
#: the window has turned over, or it is turned off again.
KEEP_RATE = 0.97
#: ... and not tried again for this long, doubling each time it fails.
BAR_FIRST, BAR_MAX = 2.0, 60.0
#: After MISSES chunks in a row that did not shrink, compression stops; one chunk is tried
#: again after PROBE_FIRST chunks, then doubling up to PROBE_MAX (a try costs ~0.5 ms on
#: incompressible data, so the cost stays ~1% at the most).
MISSES = 4
PROBE_FIRST, PROBE_MAX = 8, 64


class CpuMeter:
    """Idle cores of this host since the last reading, from ``/proc/stat`` (None where there
    is no such file).  The whole host, not this process: on loopback the receiver's work is
    what compression would take the CPU from."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        self._last = self._read()

    def _read(self) -> tuple[int, int, int] | None:
        try:
            with open(self._path, "rb") as f:
                text = f.read(8192)
        except OSError:
            return None
        cores = text.count(b"\ncpu")
        fields = text.split(b"\n", 1)[0].split()
        if fields[:1] != [b"cpu"] or len(fields) < 6 or not cores:
            return None
        ticks = [int(x) for x in fields[1:]]
        return sum(ticks[:8]), ticks[3] + ticks[4], cores  # total, idle + iowait, cores

    def idle(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return (now[1] - last[1]) / (now[0] - last[0]) * now[2]


class AdaptivePolicy:
    """``compress`` / ``compress auto``.

    Starts off.  Every :data:`PERIOD` it looks at what the reader waited for: for room in the
    window (the network, or the receiver, holds the stream back) or for a free compressor
    (the CPU does), and at how many cores of this host are idle.  Network-bound with cores to
    spare: one step up :data:`LADDER` (from off, straight to :data:`START_LEVEL`).  CPU-bound,
    or no core to spare: one step down, to off at the bottom.  Turning compression on is then
    judged once the window has turned over (the chunks in flight were made without it): if the
    stream is slower than it was without, it goes off again and stays off for a while, so a
    path where compression does not pay (the receiver's CPU is the limit, say) does not see it
    tried over and over.  Data that does not compress stops compression within a few chunks,
    whatever the level, and is probed now and then.
    """

    def __init__(self, window: int, *, idle: Callable[[], float | None] | None = None,
                 ladder: tuple[int, ...] = LADDER, start: int = START_LEVEL) -> None:
        self._ladder = ladder
        self._origin: float | None = None  # the first time seen: decisions are told from it
        self._first = True  # no decision taken yet
        self._start_index = ladder.index(start)
        self._window = max(1, window)
        self._idle = idle or (lambda: None)
        self.index = -1  # -1: off, else a place on the ladder
        self._begin(0.0)
        self._settle = 0  # chunks still to prepare before a period's rate counts
        self._rate_off: float | None = None  # raw bytes/s measured with compression off
        self._judging = False  # compression was turned on; is the stream faster for it?
        self._undone_at: float | None = None  # the rate with compression, when it was undone
        self._barred_until = 0.0
        self._bar = BAR_FIRST / 2
        self._misses = 0
        self.incompressible = False
        self._probe_in = 0  # chunks until the next probe
        self._probe_every = PROBE_FIRST
        self._asked = 0  # calls of level(); done() is called once for each, in the same order
        self._answered = 0
        self._probe = 0  # the call of level() that asked for a probe (0: none pending)
        self.steps = 0  # level changes
        #: The last few decisions with what they were based on, for the debug log, and how
        #: many there were in all.
        self.decisions: deque[str] = deque(maxlen=32)
        self.decided = 0

    # -- what the caller asks ------------------------------------------------------------

    def level(self, now: float) -> int | None:
        if self._origin is None:
            self._origin = self._start = now
        self._maybe_decide(now)
        self._asked += 1
        if self.incompressible:
            if self._probe_in <= 0 and not self._probe:
                self._probe = self._asked
                return self._ladder[max(self.index, self._start_index)]
            return None
        return self._ladder[self.index] if self.index >= 0 else None

    def describe(self) -> str:
        if self.incompressible:
            return "auto (off: the data does not compress)"
        if self.index < 0:
            return "auto (off)"
        return f"auto (zstd:{self._ladder[self.index]})"

    # -- what the caller tells -----------------------------------------------------------

    def waited(self, now: float, *, window: float = 0.0, worker: float = 0.0) -> None:
        self._wait_window += window
        self._wait_worker += worker

    def acked(self, raw: int, now: float) -> None:
        self._acked += raw

    def read_ahead(self) -> int | None:
        """Until the first decision, a few chunks: the reader would otherwise fill the whole
        window before anything is known, and on a slow link a window of chunks sent as they
        are takes long (16 chunks of 2 MiB: 0.7 s at 400 Mbit)."""
        return max(MIN_CHUNKS, self._window // 4) if self._first else None

    def done(self, level: int | None, raw: int, wire: int, now: float) -> None:
        self._answered += 1
        self._chunks += 1
        if self._settle:
            self._settle -= 1
            if not self._settle:
                self._begin(now)
        if level is None:
            if self.incompressible:
                self._probe_in -= 1
            return
        shrank = wire < raw
        if self._probe and self._answered == self._probe:
            self._probe = 0
            if shrank:
                self.incompressible = False
                self._misses = 0
                self._probe_every = PROBE_FIRST
                self._note(now, "the data compresses again")
                self._changed(now)
            else:
                self._probe_every = min(2 * self._probe_every, PROBE_MAX)
                self._probe_in = self._probe_every
            return
        if shrank:
            self._misses = 0
            return
        self._misses += 1
        if self._misses >= MISSES and not self.incompressible:
            self.incompressible = True
            self._judging = False
            self._probe_in = self._probe_every
            self._note(now, f"{MISSES} chunks in a row did not shrink: off, probing")
            self._changed(now)

    # -- deciding ------------------------------------------------------------------------

    def _begin(self, now: float) -> None:
        self._start = now
        self._acked = 0
        self._chunks = 0
        self._wait_window = 0.0
        self._wait_worker = 0.0

    def _changed(self, now: float) -> None:
        """The level changed: the window holds chunks made at the old one; a rate counts only
        once it has turned over."""
        self.steps += 1
        self._settle = self._window
        self._begin(now)

    def _note(self, now: float, what: str) -> None:
        origin = self._origin if self._origin is not None else now
        self.decisions.append(f"{now - origin:.2f} s: {what}")
        self.decided += 1

    def _move(self, now: float, index: int, why: str) -> None:
        self.index = index
        where = f"zstd:{self._ladder[index]}" if index >= 0 else "off"
        self._note(now, f"{where} ({why})")
        self._changed(now)

    def _maybe_decide(self, now: float) -> None:
        elapsed = now - self._start
        period = FIRST_PERIOD if self._first else PERIOD
        if self.incompressible or elapsed < period or self._chunks < MIN_CHUNKS:
            return
        settled = not self._settle
        rate = self._acked / elapsed
        cpu = self._wait_worker / elapsed
        net = self._wait_window / elapsed
        idle = self._idle()
        signals = (f"{rate / 1e6:.0f} MB/s, waited for the window {100 * net:.0f}%, for a "
                   f"compressor {100 * cpu:.0f}%, idle cores "
                   f"{'?' if idle is None else f'{idle:.2f}'}")
        self._first = False
        here = self.index
        if settled and here < 0:
            self._rate_off = rate
        if here < 0 and self._undone_at is not None and rate < KEEP_RATE * self._undone_at:
            # Slower off than it was on (even before the window has turned over, while some
            # compressed chunks still speed it up): the rate it was judged against was stale,
            # the path slowed down meanwhile, and the judgement was wrong.
            self._undone_at = None
            self._rate_off = rate  # if anything, more than the rate off really is
            self._barred_until = now
            self._bar = BAR_FIRST / 2
            self._note(now, f"off is slower than on was: {signals}; may turn on again")
        if self._judging and settled:
            self._judging = False
            if rate < KEEP_RATE * (self._rate_off or 0.0):
                self._bar = min(2 * self._bar, BAR_MAX)
                self._barred_until = now + self._bar
                self._undone_at = rate
                self._move(now, -1, f"slower than without: {signals}; not again for "
                                    f"{self._bar:g} s")
                return
            self._bar = BAR_FIRST / 2
        # Compressors busy now and then while the window is what the reader mostly waits
        # for is the bursty arrival of ACKs, not a CPU that cannot keep up.
        busy = (cpu > CPU_BUSY and cpu > net) or (idle is not None and idle < IDLE_LOW)
        room = cpu <= CPU_BUSY and (idle is None or idle >= IDLE_ROOM)
        if busy and here >= 0:
            self._move(now, here - 1, f"CPU-bound: {signals}")
        elif net > NET_BUSY and room and here + 1 < len(self._ladder) and not self._judging:
            if here >= 0:
                self._move(now, here + 1, f"network-bound: {signals}")
            elif now >= self._barred_until and self._rate_off is not None:
                self._judging = True
                self._move(now, self._start_index, f"network-bound: {signals}")
            else:
                self._begin(now)
        else:
            self._begin(now)


# -- counting ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompressionStats:
    """What compression did to the stream so far (both ends: the receiver counts what it
    decompressed)."""

    setting: str
    """The level in use (for ``auto``, the level it is at now)."""
    raw_bytes: int
    """Bytes of the stream."""
    wire_bytes: int
    """What they became on the wire (payloads, before sealing)."""
    ratio: float
    """``wire_bytes / raw_bytes``."""
    chunks: int
    chunks_raw: int
    """Chunks sent as they were: not tried, or they did not shrink enough."""
    raw_share: float
    """``chunks_raw / chunks``."""

    def summary(self) -> str:
        return (f"compression {self.setting}: {self.raw_bytes} bytes as {self.wire_bytes} "
                f"(ratio {self.ratio:.3f}), {100 * self.raw_share:.0f}% of {self.chunks} "
                "chunks sent raw")


@dataclass(slots=True)
class CompressionCounters:
    setting: str
    raw_bytes: int = 0
    wire_bytes: int = 0
    chunks: int = 0
    chunks_raw: int = 0

    def count(self, raw: int, wire: int, compressed: bool) -> None:
        self.raw_bytes += raw
        self.wire_bytes += wire
        self.chunks += 1
        if not compressed:
            self.chunks_raw += 1

    def snapshot(self) -> CompressionStats:
        return CompressionStats(
            setting=self.setting, raw_bytes=self.raw_bytes, wire_bytes=self.wire_bytes,
            ratio=self.wire_bytes / self.raw_bytes if self.raw_bytes else 1.0,
            chunks=self.chunks, chunks_raw=self.chunks_raw,
            raw_share=self.chunks_raw / self.chunks if self.chunks else 0.0)
