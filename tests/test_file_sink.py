"""A regular file as the sink: blocks allocated ahead of the writer, nothing left beyond the end."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from viamillipede.transport import FdSink, _Preallocator

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
AHEAD = 8 * MiB


@pytest.fixture(params=["disk", "tmpfs"])
def out_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "disk":
        return tmp_path / "out.bin"
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return tmp_path / "out.bin"  # the same test again rather than a skip
    path = shm / f"viamillipede-test-{os.getpid()}-{tmp_path.name}"
    request.addfinalizer(lambda: path.unlink(missing_ok=True))
    return path


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


async def test_blocks_are_allocated_ahead_and_trimmed_at_the_end(out_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        sink = FdSink(fd, preallocate=AHEAD)
        prealloc = sink._prealloc
        assert prealloc is not None
        for i in range(0, len(data), MiB):
            await sink.write(memoryview(data)[i : i + MiB])
            assert os.fstat(fd).st_size == min(i + MiB, len(data)), "the size shows only writes"
        assert await anyio.to_thread.run_sync(prealloc.caught_up, 10.0)
        # At least AHEAD - STEP beyond the writer: it is woken only every STEP bytes.
        assert allocated(fd) >= len(data) + AHEAD - _Preallocator.STEP, "nothing allocated ahead"
        await sink.aclose()
        assert os.fstat(fd).st_size == len(data)
        assert allocated(fd) <= len(data) + 64 * 1024, "the blocks beyond the end were kept"
    finally:
        os.close(fd)
    assert await anyio.Path(out_path).read_bytes() == data


async def test_an_output_opened_mid_file_is_written_from_there(out_path: Path) -> None:
    """Nothing the file held before or beyond our stretch is touched."""
    await anyio.Path(out_path).write_bytes(b"h" * 100 + b"t" * (3 * MiB))
    data = os.urandom(MiB + 1)
    fd = os.open(out_path, os.O_WRONLY)
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        sink = FdSink(fd, preallocate=AHEAD)
        await sink.write(memoryview(data))
        await sink.aclose()
    finally:
        os.close(fd)
    expected = b"h" * 100 + data + b"t" * (3 * MiB - len(data))
    assert await anyio.Path(out_path).read_bytes() == expected


async def test_an_appending_output_is_not_preallocated(out_path: Path) -> None:
    await anyio.Path(out_path).write_bytes(b"before")
    data = os.urandom(MiB)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)  # appends go to the end whatever the position
        sink = FdSink(fd, preallocate=AHEAD)
        assert sink._prealloc is None
        await sink.write(memoryview(data))
        await sink.aclose()
    finally:
        os.close(fd)
    assert await anyio.Path(out_path).read_bytes() == b"before" + data
