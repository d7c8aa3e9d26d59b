"""Waiting is said at the default verbosity, and a peer that is not a receiver is named.

A user must be able to tell a typo from a slow start: a transmitter with no connection says
which targets it is trying and what each did last, a receiver says it is waiting for its
transmitter and what it has written, both at growing intervals (never one line per attempt).
Something that accepts a connection but does not answer HELLO within the handshake deadline is
not a receiver: once every target has failed that way, the transmitter exits 8 saying what it
saw, instead of waiting out its timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest
import trio

from harness import Ends, WatchedSink, mid_transfer, run_mock
from procs import Procs, free_port, wait_until
from viamillipede import BytesSource, Receiver, Transmitter
from viamillipede.errors import PeerTimeout, ProtocolViolation
from viamillipede.monitor import NOTE, Reminder
from viamillipede.streams import ConnectFailed
from viamillipede.testing import MemoryNetwork, memory_stream_pair

CHUNK = 64 * 1024


class Notes(logging.Handler):
    """Lines logged at the default verbosity, with the (mock) time they were logged at."""

    def __init__(self) -> None:
        super().__init__(NOTE)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((trio.current_time(), record.getMessage()))

    def at(self) -> list[float]:
        return [round(t, 1) for t, _ in self.lines]


@contextlib.contextmanager
def notes(name: str) -> Iterator[Notes]:
    logger = logging.getLogger(name)
    handler, level = Notes(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # per-attempt lines are logged too: the handler drops them
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_reminder_doubles_up_to_its_longest_gap_and_starts_over_for_a_new_wait() -> None:
    reminder = Reminder(first=2.0, longest=300.0)
    due = []
    for _ in range(11):
        due.append(reminder.due(100.0) - 100.0)
        reminder.told()
    assert due == [2, 4, 8, 16, 32, 64, 128, 256, 512, 812, 1112]
    assert reminder.due(100.0) == 1512.0  # the same wait: the schedule goes on
    assert reminder.due(2000.0) == 2002.0  # a new wait: from the start


# -- the transmitter ---------------------------------------------------------------------------


TARGETS = ["a.example:1", "b.example:2"]


def two_targets(**kwargs: object) -> dict[str, object]:
    """Connections 0, 2, ... go to the first target, 1, 3, ... to the second."""
    return {"threads": 4, "chunk_size": CHUNK, "target": lambda i: TARGETS[i % 2],
            "rank": lambda i: i % 2, **kwargs}


def test_a_transmitter_that_cannot_connect_says_so_at_growing_intervals() -> None:
    attempts: list[float] = []

    async def refuse(index: int) -> anyio.abc.ByteStream:
        attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise ConnectFailed("cannot connect to x port 1: Connection refused",
                            "connection refused" if index % 2 == 0 else "no route to host")

    async def main() -> None:
        tx = Transmitter(BytesSource(b"x"), refuse, **two_targets(idle_timeout=60.0))
        with pytest.raises(PeerTimeout, match="could not reach any receiver"):
            await tx.run()

    with notes("viamillipede.tx") as seen:
        run_mock(main)
    assert seen.at() == [2, 4, 8, 16, 32]
    for _, line in seen.lines:
        assert line.endswith("trying a.example:1 (connection refused); "
                             "b.example:2 (no route to host)"), line
    assert len(attempts) > 4 * len(seen.lines)  # one line per interval, not per attempt


def test_the_waiting_line_says_a_connection_is_open_but_hello_is_unanswered() -> None:
    """Something accepts and reads but never answers: exit 8 at the handshake deadline, and
    the waiting lines before it say what is going on."""
    kept: list[anyio.abc.ByteStream] = []

    async def silent(index: int) -> anyio.abc.ByteStream:
        client, server = memory_stream_pair(buffer=1000)
        kept.append(server)  # nobody reads or answers; the HELLO fits in the buffer
        await trio.lowlevel.checkpoint()
        return client

    async def main() -> float:
        tx = Transmitter(BytesSource(b"x"), silent, threads=2, chunk_size=CHUNK,
                         target=lambda i: "quiet.example:80")
        with pytest.raises(ProtocolViolation) as caught:
            await tx.run()
        assert str(caught.value) == ("quiet.example:80 is not a viamillipede receiver: "
                                     "no answer to HELLO in 10 s")
        return trio.current_time()

    with notes("viamillipede.tx") as seen:
        ended = run_mock(main)
    assert ended == pytest.approx(10.0, abs=0.1)
    assert seen.at() == [2, 4, 8]
    assert "quiet.example:80 (connected; no answer to HELLO yet)" in seen.lines[0][1]


async def _answer_http(stream: anyio.abc.ByteStream) -> None:
    """Answer whatever comes first with an HTTP error.  A connection may also be closed before
    it says anything: it was waiting for its turn at the session's one key exchange (the
    others then join) when the session ended."""
    try:
        await stream.receive()
    except anyio.EndOfStream:
        return
    await stream.send(b"HTTP/1.0 400 Bad Request\r\nServer: test\r\n\r\n")


def test_exit_8_only_once_every_target_failed_the_handshake_and_it_names_each() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            kept: list[anyio.abc.ByteStream] = []

            async def connect(index: int) -> anyio.abc.ByteStream:
                client, server = memory_stream_pair(buffer=1000)
                kept.append(server)
                if index % 2:
                    nursery.start_soon(_answer_http, server)
                await trio.lowlevel.checkpoint()
                return client

            tx = Transmitter(BytesSource(b"x"), connect, **two_targets())
            with pytest.raises(ProtocolViolation) as caught:
                await tx.run()
            # The session went on until the silent one's deadline, as it might have been a
            # receiver still starting up (the HTTP server, asked once the silent one's key
            # exchange gave up, answered at once).
            assert trio.current_time() == pytest.approx(10.0, abs=0.1)
            assert str(caught.value) == (
                "no target is a viamillipede receiver: "
                "a.example:1 (no answer to HELLO in 10 s); "
                "b.example:2 (answered with HTTP ('HTTP/1.0 400 Bad Request'))")
            nursery.cancel_scope.cancel()

    run_mock(main)


def test_a_target_that_is_not_a_receiver_does_not_end_a_session_another_target_serves() -> None:
    data = os.urandom(20 * CHUNK + 5)

    async def main() -> None:
        net = MemoryNetwork()
        sink = WatchedSink()
        kept: list[anyio.abc.ByteStream] = []

        async def connect(index: int) -> anyio.abc.ByteStream:
            if index % 2 == 0:  # the preferred target only ever accepts
                client, server = memory_stream_pair(buffer=1000)
                kept.append(server)
                await trio.lowlevel.checkpoint()
                return client
            return await net.connect(index)

        rx = Receiver(sink)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rx.serve, net)
            stats = await Transmitter(BytesSource(data), connect, **two_targets()).run()
        assert stats.nbytes == len(data)
        assert bytes(sink.data) == data

    run_mock(main)


# -- the receiver ------------------------------------------------------------------------------


class NobodyComes:
    async def accept(self) -> anyio.abc.ByteStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def test_a_receiver_says_it_is_still_waiting_for_a_transmitter() -> None:
    async def main() -> None:
        with trio.move_on_after(20):
            await Receiver(WatchedSink()).serve(NobodyComes())

    with notes("viamillipede.rx") as seen:
        run_mock(main)
    assert seen.at() == [2, 4, 8, 16]
    assert seen.lines[-1][1] == "no transmitter has connected yet (16 s)"


def test_a_receiver_whose_transmitter_vanished_says_what_it_has_written() -> None:
    killed: list[float] = []

    def kill(ends: Ends) -> None:
        killed.append(trio.current_time())
        ends.kill("tx")

    with notes("viamillipede.rx") as seen:
        ended = mid_transfer(kill, rx_timeout=20.0, chunk=CHUNK)
    error, took = ended["rx"]
    assert isinstance(error, PeerTimeout)
    assert took == pytest.approx(20.0, abs=0.5)
    # What it says while it waits (the connections breaking as the transmitter died may be
    # noticed as such, or as a silence: either is fine to say, and said at most once each).
    waiting = [(t, line) for t, line in seen.lines if line.startswith("nothing from")]
    broke = [line for _, line in seen.lines if " broke: " in line]
    assert len(waiting) + len(broke) == len(seen.lines), seen.lines
    assert len(broke) <= 2 and all(not line.endswith("broke: ") for line in broke), broke
    after = [round(t - killed[0]) for t, _ in waiting]
    assert after == [2, 4, 8, 16]
    assert waiting[0][1] == (
        f"nothing from the transmitter for 2 s (0 connections open, {10 * CHUNK / 1e6:.1f} MB "
        "written); giving up after 20 s of silence")


# -- the command line --------------------------------------------------------------------------


def test_tx_to_a_closed_port_says_so_without_being_asked(procs: Procs) -> None:
    port = free_port()
    tx = procs.tx(port, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: "connection refused" in tx.stderr, "the waiting line")
        line = tx.stderr_lines()[0]
        assert line == (f"viamillipede tx: no receiver has answered for 2 s; "
                        f"trying 127.0.0.1:{port} (connection refused)")
    finally:
        tx.popen.kill()
        tx.popen.wait()


def test_tx_to_an_http_server_exits_8_naming_it(procs: Procs) -> None:
    """A real HTTP server: it answers our HELLO with a 400 error page if the HELLO happens to
    hold a line end (a bare page, HTTP/0.9 style: the line names no HTTP version), and
    otherwise waits for the rest of a request; either way it is not a receiver."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=procs.dir)
    try:
        wait_until(lambda: _listening(port), "the HTTP server")
        tx = procs.tx(port, stdin=subprocess.DEVNULL)
        err = tx.finish(8, timeout=30)
        error = [line for line in err.splitlines() if "error:" in line]
        assert len(error) == 1, err
        assert error[0].startswith(f"viamillipede tx: error: 127.0.0.1:{port} is not a "
                                   "viamillipede receiver: "), err
        assert ("no answer to HELLO in 10 s" in error[0]
                or "answered with HTTP ('<!DOCTYPE HTML" in error[0]), err
    finally:
        server.kill()
        server.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
