"""End to end through real ``viamillipede`` processes on 127.0.0.1.

The receiver is started first; the transmitter retries its connections until the receiver
listens, so ordering needs no sleeps.  Every process writes stdout and stderr to files (no pipe
can fill up and stall it), every wait is bounded, and any process still running when a test
ends is killed.  Where a test must observe a process's progress it polls with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

VM = [sys.executable, "-m", "viamillipede"]
HOST = "127.0.0.1"
CHUNK = 64 * 1024
SMALL_CHUNK = ["--chunk-size", "64K"]
WAIT = 60.0  # the most any process may take; a hang fails the test instead of the suite
MiB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Payload:
    path: Path
    size: int
    digest: str


def random_file(path: Path, size: int) -> Payload:
    """Fill ``path`` with ``size`` random bytes."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
    return Payload(path, size, h.hexdigest())


def bytes_file(path: Path, data: bytes) -> Payload:
    path.write_bytes(data)
    return Payload(path, len(data), hashlib.sha256(data).hexdigest())


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def connect_when_listening(port: int, timeout: float = 20.0) -> socket.socket:
    """A raw connection to the receiver, retried until it listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on port {port} after {timeout:g} s")
            time.sleep(0.01)


class Proc:
    """One viamillipede process whose stdout and stderr go to files."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, out: Path, err: Path) -> None:
        self.popen = popen
        self.name = name
        self.out = out
        self.err = err

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def out_size(self) -> int:
        return self.out.stat().st_size if self.out.exists() else 0

    def running(self) -> bool:
        return self.popen.poll() is None

    def _timed_out(self, what: str) -> None:
        self.popen.kill()
        self.popen.wait()
        pytest.fail(f"{self.name} {what}; killed it; stderr:\n{self.stderr}")

    def feed(self, data: bytes, timeout: float = WAIT) -> None:
        """Write ``data`` to the stdin pipe and leave it open; fail if the process stops reading."""
        stdin = self.popen.stdin
        assert stdin is not None
        failed: list[BaseException] = []

        def write() -> None:
            try:
                stdin.write(data)
                stdin.flush()
            except BaseException as exc:
                failed.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(timeout)
        if writer.is_alive():
            self._timed_out(f"read nothing from stdin for {timeout:g} s")  # frees the writer
        if failed:
            raise failed[0]

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._timed_out(f"still running after {timeout:g} s")
            raise  # unreachable: pytest.fail raises

    def finish(self, code: int, timeout: float = WAIT) -> str:
        """Wait for exit, check the status and that nothing crashed; return stderr."""
        got = self.wait(timeout)
        err = self.stderr
        assert "Traceback" not in err, f"{self.name} crashed:\n{err}"
        assert got == code, f"{self.name} exited {got}, expected {code}; stderr:\n{err}"
        return err

    def wait4(self, timeout: float = WAIT) -> tuple[int, int]:
        """Reap the process ourselves with os.wait4; return (exit code, peak RSS in KiB)."""
        pid = self.popen.pid
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not ready:
            self._timed_out(f"still running after {timeout:g} s")
        _, status, usage = os.wait4(pid, 0)
        self.popen.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap again
        return self.popen.returncode, usage.ru_maxrss


class Procs:
    """Starts viamillipede processes in a test's directory and cleans up after them."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.procs: list[Proc] = []
        self.inputs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], stdin: Any = subprocess.DEVNULL, stdout: Any = None
    ) -> Proc:
        out = self.dir / f"{name}.out"
        err = self.dir / f"{name}.err"
        opened: list[IO[bytes]] = []
        if isinstance(stdin, Path):
            stdin = stdin.open("rb")
            opened.append(stdin)
        if stdout is None:
            stdout = out.open("wb")
            opened.append(stdout)
        errf = err.open("wb")
        try:
            popen = subprocess.Popen([*VM, *args], stdin=stdin, stdout=stdout, stderr=errf)
        finally:
            for f in (*opened, errf):
                f.close()
        proc = Proc(popen, name, out, err)
        self.procs.append(proc)
        return proc

    def rx(self, port: int, *args: str, name: str = "rx", stdout: Any = None) -> Proc:
        return self.start(name, ["rx", str(port), *args], stdout=stdout)

    def tx(self, port: int, *args: str, stdin: Any, name: str = "tx") -> Proc:
        return self.start(name, ["tx", HOST, str(port), *args], stdin=stdin)

    def cat(self, path: Path) -> subprocess.Popen[bytes]:
        """``cat path |``: returns the process; pass its stdout as a transmitter's stdin."""
        popen = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
        self.inputs.append(popen)
        return popen

    def cleanup(self) -> None:
        for popen in [p.popen for p in self.procs] + self.inputs:
            if popen.returncode is None and popen.poll() is None:
                popen.kill()
                popen.wait()
            for stream in (popen.stdin, popen.stdout):
                if stream is not None:
                    stream.close()
        # Big payloads are not worth keeping among pytest's retained temporary directories.
        for path in self.dir.iterdir():
            if path.is_file() and path.stat().st_size > 4 * MiB:
                path.unlink()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


def assert_tx_ok(tx: Proc) -> None:
    tx.finish(0)
    assert tx.out_size() == 0, "the transmitter wrote to stdout"


def assert_delivered(rx: Proc, payload: Payload) -> None:
    rx.finish(0)
    assert rx.out_size() == payload.size
    assert sha256_file(rx.out) == payload.digest


def transfer(procs: Procs, port: int, rx: Proc, payload: Payload, *tx_args: str) -> None:
    """Send ``payload`` from a file to the running ``rx``; both must succeed, byte for byte."""
    tx = procs.tx(port, *tx_args, stdin=payload.path, name=f"tx-{payload.path.name}")
    assert_tx_ok(tx)
    assert_delivered(rx, payload)


def one_error_line(err: str, *needles: str) -> str:
    """The stderr has exactly one line, and it mentions every needle (case-insensitively)."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


# -- plain transfers ---------------------------------------------------------------------------

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 1000003]


@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("size", SIZES)
def test_transfer_from_file(procs: Procs, size: int, threads: int) -> None:
    payload = random_file(procs.dir / "data", size)
    port = free_port()
    rx = procs.rx(port)
    transfer(procs, port, rx, payload, "threads", str(threads), *SMALL_CHUNK)


@pytest.mark.parametrize(
    ("size", "threads", "via"),
    [
        (0, 1, "pipe"),
        (1, 3, "pipe"),
        (1000003, 3, "pipe"),
        (3 * CHUNK + 17, 16, "pipe"),
        (0, 3, "cat"),
        (CHUNK, 1, "cat"),
        (1000003, 16, "cat"),
    ],
)
def test_transfer_from_pipe(procs: Procs, size: int, threads: int, via: str) -> None:
    payload = bytes_file(procs.dir / "data", os.urandom(size))
    port = free_port()
    rx = procs.rx(port)
    args = ["threads", str(threads), *SMALL_CHUNK]
    if via == "pipe":
        tx = procs.tx(port, *args, stdin=subprocess.PIPE)
        tx.popen.communicate(payload.path.read_bytes(), timeout=WAIT)
    else:
        cat = procs.cat(payload.path)
        tx = procs.tx(port, *args, stdin=cat.stdout)
        assert cat.wait(timeout=WAIT) == 0
    assert_tx_ok(tx)
    assert_delivered(rx, payload)


def test_64_mib_with_checksums(procs: Procs) -> None:
    payload = random_file(procs.dir / "data", 64 * MiB)
    port = free_port()
    rx = procs.rx(port)
    transfer(procs, port, rx, payload, "threads", "4", "checksum")


# -- peers that must be turned away -----------------------------------------------------------


def test_wrong_checkphrase_then_right_one(procs: Procs) -> None:
    payload = random_file(procs.dir / "data", 3 * CHUNK + 5)
    port = free_port()
    rx = procs.rx(port, "checkphrase", "abcd")

    wrong = procs.tx(port, *SMALL_CHUNK, stdin=payload.path, name="tx-wrong")
    one_error_line(wrong.finish(3), "checkphrase")
    assert wrong.out_size() == 0
    assert rx.running(), f"the receiver gave up after a wrong checkphrase:\n{rx.stderr}"
    assert rx.out_size() == 0

    transfer(procs, port, rx, payload, "checkphrase", "abcd", *SMALL_CHUNK)


def test_garbage_connections_then_real_transfer(procs: Procs) -> None:
    payload = random_file(procs.dir / "data", 5 * CHUNK + 3)
    port = free_port()
    rx = procs.rx(port)

    garbage = [os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""]
    for junk in garbage:
        with connect_when_listening(port) as sock:
            if junk:
                sock.sendall(junk)
                # The receiver drops a connection that does not speak the protocol, promptly.
                sock.settimeout(8)
                try:
                    while sock.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
    assert rx.running(), f"garbage ended the receiver:\n{rx.stderr}"
    assert rx.out_size() == 0

    transfer(procs, port, rx, payload, *SMALL_CHUNK)


def test_second_transmitter_is_rejected(procs: Procs) -> None:
    first = bytes_file(procs.dir / "first", os.urandom(24 * CHUNK + 99))
    data = first.path.read_bytes()
    half = len(data) // 2
    port = free_port()
    rx = procs.rx(port)
    tx1 = procs.tx(port, "threads", "3", *SMALL_CHUNK, stdin=subprocess.PIPE, name="tx1")
    tx1.feed(data[:half])
    wait_until(
        lambda: rx.out_size() > 0 or not rx.running() or not tx1.running(),
        "the receiver to write the first transmitter's data",
    )
    assert rx.running() and tx1.running(), f"rx:\n{rx.stderr}\ntx1:\n{tx1.stderr}"

    other = random_file(procs.dir / "other", 4 * CHUNK)
    tx2 = procs.tx(port, *SMALL_CHUNK, stdin=other.path, name="tx2")
    err = tx2.finish(3)
    assert "session" in err or "busy" in err, err
    assert tx2.out_size() == 0
    assert rx.running(), f"the second transmitter ended the receiver:\n{rx.stderr}"

    tx1.popen.communicate(data[half:], timeout=WAIT)
    assert_tx_ok(tx1)
    assert_delivered(rx, first)


# -- failures that must not pass for success --------------------------------------------------


def test_transmitter_killed_mid_transfer(procs: Procs) -> None:
    port = free_port()
    rx = procs.rx(port, "timeout", "2")
    tx = procs.tx(port, *SMALL_CHUNK, stdin=subprocess.PIPE)
    tx.feed(os.urandom(10 * CHUNK + 7))
    wait_until(
        lambda: rx.out_size() >= 10 * CHUNK or not rx.running() or not tx.running(),
        "the receiver to write the full chunks sent so far",
    )
    assert rx.running() and tx.running(), f"rx:\n{rx.stderr}\ntx:\n{tx.stderr}"

    tx.popen.send_signal(signal.SIGKILL)
    tx.wait()
    killed = time.monotonic()
    err = rx.finish(4, timeout=15)
    assert time.monotonic() - killed < 10, "the receiver took too long to give up"
    match = re.search(r"(\d+) bytes were delivered", err)
    assert match, f"the receiver did not say how much it delivered:\n{err}"
    assert int(match.group(1)) == rx.out_size() == 10 * CHUNK


@pytest.mark.parametrize(("threads", "rounds"), [(4, 1), (64, 5)])
def test_sink_closed_early(procs: Procs, threads: int, rounds: int) -> None:
    """``viamillipede rx PORT | head -c 1000``: both ends fail with one line each.

    What else the ends print is decided by a race (connections reset while the session is being
    torn down), so the 64-connection variant runs five times to give the race its chances.
    """
    payload = random_file(procs.dir / "data", 16 * MiB)
    for i in range(rounds):
        port = free_port()
        rx = procs.rx(port, stdout=subprocess.PIPE, name=f"rx{i}")
        assert rx.popen.stdout is not None
        head = subprocess.Popen(
            ["head", "-c", "1000"], stdin=rx.popen.stdout, stdout=subprocess.DEVNULL
        )
        procs.inputs.append(head)
        rx.popen.stdout.close()  # only head reads the receiver's output now
        tx = procs.tx(
            port, "threads", str(threads), *SMALL_CHUNK, stdin=payload.path, name=f"tx{i}"
        )

        assert head.wait(timeout=WAIT) == 0
        rx_err = rx.finish(6)
        tx_err = tx.finish(7)
        assert tx.out_size() == 0
        one_error_line(rx_err, "broken pipe")
        one_error_line(tx_err, "receiver's output failed")


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_peak_rss_bounded(procs: Procs) -> None:
    threads, chunk = 4, 2 * MiB
    payload = random_file(procs.dir / "data", 256 * MiB)
    port = free_port()
    rx = procs.rx(port)
    tx = procs.tx(port, "threads", str(threads), stdin=payload.path)
    tx_code, tx_rss = tx.wait4()
    rx_code, rx_rss = rx.wait4()
    assert (tx_code, rx_code) == (0, 0), f"tx:\n{tx.stderr}\nrx:\n{rx.stderr}"
    assert "Traceback" not in tx.stderr + rx.stderr
    assert rx.out_size() == payload.size
    assert sha256_file(rx.out) == payload.digest
    limit_kib = (64 * MiB + threads * chunk * 3) // 1024
    assert tx_rss < limit_kib, f"transmitter peak RSS {tx_rss} KiB"
    assert rx_rss < limit_kib, f"receiver peak RSS {rx_rss} KiB"
