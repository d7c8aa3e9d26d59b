"""Chunks spliced from the socket straight into the output (a file or a pipe), and the
bookkeeping when such a splice is cut short: no byte lost, none written twice.

Only a plaintext session (both ends) splices: a sealed chunk must be opened in memory before
it is written.  The sessions here are plaintext.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from viamillipede import BytesSource, Receiver
from viamillipede.api import serve_tcp, tcp_transmitter
from viamillipede.transport import FdSink, SocketStream, _PagePipe

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
DATA = os.urandom(50 * CHUNK + 321)


async def transfer(sink: FdSink, *, threads: int = 3, receiver: Receiver | None = None,
                   plaintext: bool = True) -> Receiver:
    """A session of DATA into ``sink``, through ``receiver`` (which must be in the same mode)."""
    rx = receiver or Receiver(sink, plaintext=plaintext)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_tcp, rx, 0)
        tx = tcp_transmitter(BytesSource(DATA), [("127.0.0.1", port)], threads=threads,
                             chunk_size=CHUNK, plaintext=plaintext)
        await tx.run()
    return rx


async def splice_into(path: Path, flags: int) -> None:
    """A whole transfer into ``path``, which must take the splice path."""
    fd = os.open(path, flags)
    try:
        sink = FdSink(fd)
        assert sink.can_splice
        with anyio.fail_after(30):
            rx = await transfer(sink)
        await sink.aclose()
    finally:
        os.close(fd)
    assert sink.nbytes == len(DATA)
    assert rx.spliced > 0, "no chunk took the splice path"


async def test_chunks_are_spliced_into_a_file(tmp_path: Path) -> None:
    out = anyio.Path(tmp_path / "out.bin")
    await splice_into(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert await out.read_bytes() == DATA


async def test_a_sealed_session_opens_every_chunk_in_memory(tmp_path: Path) -> None:
    """The default, encrypted session never splices, even into a sink that could take it."""
    out = anyio.Path(tmp_path / "out.bin")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        sink = FdSink(fd)
        assert sink.can_splice
        with anyio.fail_after(30):
            rx = await transfer(sink, plaintext=False)
        await sink.aclose()
    finally:
        os.close(fd)
    assert await out.read_bytes() == DATA
    assert rx.spliced == 0


async def test_chunks_are_spliced_into_a_pipe() -> None:
    r, w = os.pipe()
    received = bytearray()

    async def drain() -> None:
        while True:
            await anyio.wait_readable(r)
            block = os.read(r, 1 << 20)
            if not block:
                return
            received.extend(block)

    try:
        os.set_blocking(r, False)
        sink = FdSink(w)
        assert sink.can_splice
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                rx = await transfer(sink)
                await sink.aclose()
                os.close(w)
                w = -1
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert bytes(received) == DATA
    assert rx.spliced > 0, "no chunk took the splice path"


class CutOnce(FdSink):
    """The first splice moves part of its chunk, then the link "breaks"."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.cut = False

    async def splice_from(
        self, stream: SocketStream, count: int, moved: Callable[[int], None]
    ) -> None:
        if not self.cut:
            self.cut = True
            await super().splice_from(stream, count // 3, moved)
            raise anyio.BrokenResourceError("cut on purpose")
        await super().splice_from(stream, count, moved)


@pytest.mark.parametrize("again", ["spliced", "buffered"])
async def test_a_chunk_cut_short_is_completed_from_its_resend(tmp_path: Path, again: str) -> None:
    """The resent chunk's first bytes are already out: they are dropped, whichever way the
    resend takes (spliced again, or buffered and written by the writer task)."""
    out = anyio.Path(tmp_path / "out.bin")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        sink = CutOnce(fd)
        rx = Receiver(sink, plaintext=True)
        if again == "buffered":
            real_turn = rx.output.my_turn

            async def turn(*args: object) -> bool:
                return not sink.cut and await real_turn(*args)  # type: ignore[arg-type]

            rx.output.my_turn = turn  # type: ignore[method-assign, assignment]
        with anyio.fail_after(30):
            await transfer(sink, receiver=rx)
        await sink.aclose()
    finally:
        os.close(fd)
    assert sink.cut
    assert await out.read_bytes() == DATA
    assert sink.nbytes == len(DATA)
    assert rx.statistics().nbytes == len(DATA)


def test_devices_and_appending_files_are_not_spliced(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        assert not FdSink(fd).can_splice
    finally:
        os.close(fd)
    for device in ("/dev/null", "/dev/zero"):
        fd = os.open(device, os.O_WRONLY)
        try:
            assert not FdSink(fd).can_splice
        finally:
            os.close(fd)


@pytest.mark.parametrize("vmsplice", ["works", "forbidden"])
async def test_send_pages_hands_a_buffer_larger_than_its_pipe_to_a_slow_reader(
    monkeypatch: pytest.MonkeyPatch, vmsplice: str
) -> None:
    """``send_pages`` goes through a pipe of at most 1 MiB and a socket that fills up: the
    payload is cut into pipe-sized pieces and the socket waited for, and every byte arrives
    in order after its header.  Where vmsplice is forbidden (seccomp), the bytes are copied
    instead, from then on."""
    monkeypatch.setattr(_PagePipe, "unavailable", False)
    if vmsplice == "forbidden":
        def refuse(self: _PagePipe, view: memoryview) -> int:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(_PagePipe, "fill", refuse)
    payload = bytearray(os.urandom(3 * 1024 * 1024 + 77))
    header = b"HDR:"
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # fills long before the end
    tx, rx = SocketStream(a), SocketStream(b)
    received = bytearray()

    async def read_all() -> None:
        buf = memoryview(bytearray(256 * 1024))
        while len(received) < len(header) + 2 * len(payload):
            n = await rx.receive_into(buf)
            assert n, "the stream ended early"
            received.extend(buf[:n])

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            await tx.send_pages(memoryview(header), memoryview(payload))
            await tx.send_pages(memoryview(b""), memoryview(payload))  # the pipe is reused
    await tx.aclose()
    await rx.aclose()
    assert received == header + payload + payload
    assert _PagePipe.unavailable == (vmsplice == "forbidden")
    assert (tx._open_pages() is None) == (vmsplice == "forbidden")
