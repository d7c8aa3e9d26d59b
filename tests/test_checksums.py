"""The checksum algorithms compute what docs/protocol.md says, and both work in a session."""

from __future__ import annotations

import os

import pytest

from harness import run_session
from viamillipede.checksums import ALGORITHMS, DEFAULT
from viamillipede.wire import Feature


@pytest.mark.parametrize(
    ("algorithm", "check"),
    [(Feature.CHECKSUM_CRC32, 0xCBF43926), (Feature.CHECKSUM_XXH3, 0x67A17DFF)],
)
def test_check_values(algorithm: int, check: int) -> None:
    _name, fn = ALGORITHMS[algorithm]
    assert fn(memoryview(b"123456789")) == check


def test_default_is_xxh3() -> None:
    assert DEFAULT == Feature.CHECKSUM_XXH3


@pytest.mark.anyio
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
async def test_sessions_with_each_algorithm(algorithm: int) -> None:
    data = os.urandom(50_000)
    session = await run_session(data, threads=2, chunk_size=4096, checksum=algorithm, limit=20)
    assert session.received == data
    assert session.rx_stats is not None and session.rx_stats.nbytes == len(data)
