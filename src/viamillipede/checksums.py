"""Per-chunk checksum algorithms, by the number the HELLO's feature bits carry.

XXH3 is the default because it costs about 50 µs per 2 MiB chunk here (39 GB/s), against
250 µs for hardware CRC-32C and 1 ms for zlib's CRC-32: at loopback speeds the latter would
cost a third of the throughput.  CRC-32 stays accepted for peers that ask for it.  The wire
field is 32 bits wide, so XXH3's 64-bit value is cut to its low half -- still a 1 in 4 billion
chance for a damaged chunk to pass, and TCP's own checksum has already caught most damage.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import xxhash

from .wire import Feature

Checksum = Callable[[memoryview], int]


def _xxh3_low32(data: memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


ALGORITHMS: dict[int, tuple[str, Checksum]] = {
    int(Feature.CHECKSUM_CRC32): ("crc32", zlib.crc32),
    int(Feature.CHECKSUM_XXH3): ("xxh3", _xxh3_low32),
}

DEFAULT = int(Feature.CHECKSUM_XXH3)
