"""The checksum algorithms compute what docs/protocol.md says, and both work in a session."""

from __future__ import annotations

import os

import anyio
import pytest

from viamillipede import BufferSink, BytesSource, Receiver, Transmitter
from viamillipede.checksums import ALGORITHMS, DEFAULT
from viamillipede.testing import MemoryNetwork
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
    net = MemoryNetwork()
    sink = BufferSink()
    tx = Transmitter(BytesSource(data), net.connect, threads=2, chunk_size=4096,
                     checksum=algorithm)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(Receiver(sink).serve, net)
            await tx.run()
            tg.cancel_scope.cancel()
    assert bytes(sink.data) == data
