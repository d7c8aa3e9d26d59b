"""Real ``viamillipede`` processes for end-to-end tests, and the small helpers around them.

Every process writes stdout and stderr to files (no pipe can fill up and stall it), every wait
is bounded, and any process still running when a test ends is killed.  Where a test must
observe a process's progress it polls with a deadline (``wait_until``).

tests/conftest.py registers :func:`procs_fixture` as the ``procs`` fixture for every test module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
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
WAIT = 60.0  # the most any process may take; a hang fails the test instead of the suite
MiB = 1024 * 1024


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


def random_file(path: Path, size: int, seed: int | None = None) -> Payload:
    """Fill ``path`` with ``size`` random bytes: from ``os.urandom``, or if a ``seed`` is given
    pseudo-random ones, the same for the same seed."""
    randbytes = os.urandom if seed is None else random.Random(seed).randbytes
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = randbytes(min(left, 8 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
    return Payload(path, size, h.hexdigest())


def bytes_file(path: Path, data: bytes) -> Payload:
    path.write_bytes(data)
    return Payload(path, len(data), hashlib.sha256(data).hexdigest())


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = 20.0, poll: float = 0.01
) -> float:
    """Poll ``condition`` until it holds and return the seconds it took; fail after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


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
        self.peak_rss_kib = 0
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        """Keep the kernel's high-water mark of the process's own memory (VmHWM) while it
        runs.  ``ru_maxrss`` would be wrong: it carries over the peak of the forked pytest
        image from before the exec."""
        pid = self.popen.pid
        while self.popen.poll() is None:
            self.peak_rss_kib = max(self.peak_rss_kib, _vm_hwm_kib(pid))
            time.sleep(0.01)  # a sampling period, not synchronisation

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
        """Wait for the process; return (exit code, peak RSS in KiB)."""
        code = self.wait(timeout)
        return code, self.peak_rss_kib


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # exiting: its memory is gone already


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


@pytest.fixture(name="procs")
def procs_fixture(tmp_path: Path) -> Iterator[Procs]:
    """The ``procs`` fixture (registered by tests/conftest.py)."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


_WORDS = (b"the millipede walks on many legs over the network in order and keeps going when "
          b"a link dies zfs send receive pool snapshot dataset stream chunk window").split()


def compressible_text(n: int, seed: int = 1) -> bytes:
    """``n`` bytes of word salad: compressible (zstd -1 takes it to about a third), and no two
    runs of it alike, so it is not a trivial case either."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(_WORDS, k=512)) + b"\n"
    return bytes(out[:n])


class Feeder:
    """Writes deterministic pseudo-random bytes into a pipe at a fixed rate, from a thread.

    ``rate`` bytes per second for ``total`` bytes, then closes the pipe (end of stream).  The
    pacing sleeps are the feeder's clock, not synchronisation.  If the reader goes away the
    feeder stops and records the error; ``sha256`` is the digest of what was written.
    """

    BLOCK = 64 * 1024

    def __init__(self, pipe: IO[bytes], rate: float, total: int, seed: int = 1,
                 compressible: bool = False) -> None:
        self.pipe = pipe
        self.compressible = compressible
        self.rate = rate
        self.total = total
        self.seed = seed
        self.written = 0
        self.error: BaseException | None = None
        self._hash = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        text = compressible_text(2 * self.BLOCK, self.seed) if self.compressible else b""
        start = time.monotonic()
        try:
            while self.written < self.total:
                n = min(self.BLOCK, self.total - self.written)
                if text:  # word salad, zstd takes it to about a third
                    at = rng.randrange(self.BLOCK)
                    block = text[at : at + n]
                else:
                    block = rng.randbytes(n)
                self.pipe.write(block)
                self._hash.update(block)
                self.written += len(block)
                ahead = start + self.written / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except (BrokenPipeError, ValueError, OSError) as exc:  # the transmitter went away
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self.pipe.close()


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
