"""A two-host network lab in Linux network namespaces, for end-to-end tests of the real CLI.

Host A (the transmitter) and host B (the receiver) are joined by two veth links::

    link 1:  a1 198.18.1.1/24  (in A)  <->  b1 198.18.1.2/24  (in B)
    link 2:  a2 198.18.2.1/24  (in A)  <->  b2 198.18.2.2/24  (in B)

Every interface is shaped by an htb qdisc in its transmit direction, so each link carries at
most ``rate`` each way.  198.18.0.0/15 is the benchmarking range (RFC 2544); no traffic leaves
the two namespaces.  Faults are what an operator or a broken network does to a real host:

- ``link_down(1)``: ``ip link set a1 down`` in A; the peer loses carrier, A loses the route;
- ``blackhole(1)``: ``ip addr del 198.18.1.2/24 dev b1`` in B; packets to it vanish without
  an ICMP error or a reset (B does not forward), which only a stall detector can notice.

Every command runs with a timeout; processes started through the lab are killed when it is
torn down, and the namespaces are deleted even when a test fails.  Where namespaces cannot be
made (not root, no iproute2), a test using the lab skips, or fails under
VIAMILLIPEDE_REQUIRE_LAB=1, as in CI.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import require_or_skip
from procs import Feeder, random_file, sha256_file, wait_until
from procs import MiB as MiB  # re-exported: test_netns imports it (and wait_until) from here

PORT = 8834
CMD_TIMEOUT = 15.0  # any one `ip` / `tc` command
VM = str(Path(sys.executable).with_name("viamillipede"))
"""The console script of the interpreter running the tests (the venv under test)."""

_serial = itertools.count()


# -- small helpers ------------------------------------------------------------------------------


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
       ) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output; raise with its stderr if it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log file, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no file)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def pattern_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` deterministic pseudo-random bytes to ``path``; return their sha256."""
    return random_file(path, size, seed).digest


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the lab, or None if it can (checked once, by trying)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root, e.g. in CI)"
    if shutil.which("ip") is None:
        return "the `ip` command is missing: apt-get install -y iproute2"
    probe = f"vmp-probe-{os.getpid()}-{next(_serial)}"
    try:
        made = sh(["ip", "netns", "add", probe], check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` could not run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    sh(["ip", "netns", "del", probe], check=False)
    return None


# -- one transfer -------------------------------------------------------------------------------


@dataclass
class Transfer:
    """A receiver in B and a transmitter in A, with their output and logs in ``workdir``."""

    rx: subprocess.Popen[bytes]
    tx: subprocess.Popen[bytes]
    out: Path
    rx_err: Path
    tx_err: Path
    started: float
    feeder: Feeder | None = None
    expected_sha: str | None = None
    ended: float | None = None
    tx_code: int | None = None
    rx_code: int | None = None

    def received(self) -> int:
        """Bytes the receiver has written to its output so far."""
        return file_size(self.out)

    def logs(self) -> str:
        return (f"--- tx stderr (exit {self.tx.poll()}) ---\n{tail(self.tx_err)}\n"
                f"--- rx stderr (exit {self.rx.poll()}) ---\n{tail(self.rx_err)}")

    def wait(self, deadline: float, what: str = "the transfer") -> tuple[int, int]:
        """Wait for the transmitter, then the receiver, until ``deadline`` (monotonic).

        A process still running at the deadline is killed and the test fails with both logs.
        """
        try:
            self.tx_code = self.tx.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.ended = time.monotonic()
            self.rx_code = self.rx.wait(timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - self.started
            for p in (self.tx, self.rx):
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
            pytest.fail(f"{what} still running after {elapsed:.1f} s; killed\n{self.logs()}")
        if self.feeder is not None:
            self.feeder.join(timeout=10)
        return self.tx_code, self.rx_code

    def elapsed(self) -> float:
        end = self.ended if self.ended is not None else time.monotonic()
        return end - self.started

    def assert_complete(self) -> None:
        """Both ends exited 0 and the output is the input, byte for byte."""
        assert (self.tx_code, self.rx_code) == (0, 0), f"exit codes (tx, rx)\n{self.logs()}"
        expected = self.expected_sha
        if self.feeder is not None:
            assert self.feeder.error is None, f"feeder: {self.feeder.error!r}\n{self.logs()}"
            expected = self.feeder.sha256
        assert expected is not None
        got = sha256_file(self.out)
        assert got == expected, (f"output differs: {self.received()} bytes, sha256 {got}\n"
                                 f"{self.logs()}")


# -- the lab ------------------------------------------------------------------------------------


@dataclass
class Lab:
    """Two namespaces joined by two shaped veth links; see the module docstring."""

    rate: str = "200mbit"
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{next(_serial)}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.a = f"vmp-a-{self.tag}"
        self.b = f"vmp-b-{self.tag}"
        self._made: list[str] = []

    # addresses
    @staticmethod
    def addr_a(link: int) -> str:
        return f"198.18.{link}.1"

    @staticmethod
    def addr_b(link: int) -> str:
        return f"198.18.{link}.2"

    def ns_of(self, dev: str) -> str:
        """a1, a2 live in A; b1, b2 in B."""
        return self.a if dev.startswith("a") else self.b

    # running things
    def run_in(self, ns: str, *argv: str, check: bool = True,
               timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a command inside namespace ``ns`` (``ip netns exec NS ...``)."""
        return sh(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)

    def spawn(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``ns``; it is killed at teardown if still running.

        ``ip netns exec`` execs the command, so the Popen's pid is the command's own.
        """
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.procs.append(proc)
        return proc

    # life cycle
    def create(self) -> Lab:
        try:
            for ns in (self.a, self.b):
                sh(["ip", "netns", "add", ns])
                self._made.append(ns)
                sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            for link in (1, 2):
                a, b = f"a{link}", f"b{link}"
                sh(["ip", "link", "add", a, "netns", self.a, "type", "veth",
                    "peer", "name", b, "netns", self.b])
                sh(["ip", "-n", self.a, "addr", "add", f"{self.addr_a(link)}/24", "dev", a])
                sh(["ip", "-n", self.b, "addr", "add", f"{self.addr_b(link)}/24", "dev", b])
                for dev in (a, b):
                    ns = self.ns_of(dev)
                    self.run_in(ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                                "htb", "default", "10")
                    # quantum: one full-size frame, so htb does not warn about the r2q default
                    self.run_in(ns, "tc", "class", "add", "dev", dev, "parent", "1:",
                                "classid", "1:10", "htb", "rate", self.rate, "quantum", "1514")
                    sh(["ip", "-n", ns, "link", "set", dev, "up"])
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill what the lab started, then delete both namespaces (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        while self._made:
            ns = self._made.pop()
            with contextlib.suppress(Exception):
                sh(["ip", "netns", "del", ns], check=False)

    # faults
    def link_down(self, link: int) -> None:
        sh(["ip", "-n", self.a, "link", "set", f"a{link}", "down"])

    def link_up(self, link: int) -> None:
        sh(["ip", "-n", self.a, "link", "set", f"a{link}", "up"])

    def blackhole(self, link: int) -> None:
        """Remove B's address on ``link``: A's packets to it are dropped without a word."""
        sh(["ip", "-n", self.b, "addr", "del", f"{self.addr_b(link)}/24", "dev", f"b{link}"])

    def restore(self, link: int) -> None:
        sh(["ip", "-n", self.b, "addr", "add", f"{self.addr_b(link)}/24", "dev", f"b{link}"])

    # counters
    def counters(self, ns: str) -> dict[str, tuple[int, int]]:
        """``{device: (rx_bytes, tx_bytes)}`` for every interface in ``ns``."""
        links = json.loads(sh(["ip", "-n", ns, "-s", "-j", "link", "show"]).stdout)
        return {
            link["ifname"]: (link["stats64"]["rx"]["bytes"], link["stats64"]["tx"]["bytes"])
            for link in links
        }

    def tx_bytes(self, dev: str) -> int:
        """Bytes ``dev`` has sent so far (a1 / a2: the transmitter's direction)."""
        return self.counters(self.ns_of(dev))[dev][1]

    def tx_bytes_a(self) -> tuple[int, int]:
        """(a1, a2) bytes sent by host A, read in one go."""
        c = self.counters(self.a)
        return c["a1"][1], c["a2"][1]

    def listening(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """Whether ``proc``'s namespace has a TCP socket listening on ``port``.

        Read from /proc/PID/net/tcp{,6}, which show the namespace of that process.
        """
        want = f":{port:04X} "
        for name in ("tcp", "tcp6"):
            try:
                text = Path(f"/proc/{proc.pid}/net/{name}").read_text()
            except OSError:
                continue
            for line in text.splitlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and want in f"{cols[1]} " and cols[3] == "0A":
                    return True
        return False

    # the two ends
    def start_transfer(
        self,
        workdir: Path,
        *,
        source: Path | tuple[float, int],
        expected_sha: str | None = None,
        port: int = PORT,
        rx_args: Sequence[str] = ("timeout", "30", "verbose", "2"),
        tx_args: Sequence[str] = ("threads", "4", "verbose", "2"),
        links: Sequence[int] = (1, 2),
        seed: int = 1,
    ) -> Transfer:
        """Start ``viamillipede rx`` in B, wait until it listens, then ``viamillipede tx`` in A.

        ``source`` is a file for the transmitter's stdin, or ``(rate, total)`` for a Feeder.
        """
        out, rx_err, tx_err = workdir / "out", workdir / "rx.err", workdir / "tx.err"
        with out.open("wb") as o, rx_err.open("wb") as e:
            rx = self.spawn(self.b, [VM, "rx", str(port), *rx_args], stdin=subprocess.DEVNULL,
                            stdout=o, stderr=e)
        wait_until(lambda: self.listening(rx, port) or rx.poll() is not None,
                   "the receiver to listen", timeout=20)
        assert rx.poll() is None, f"the receiver exited {rx.returncode}\n{tail(rx_err)}"
        targets: list[str] = []
        for link in links:
            targets += ["tx", self.addr_b(link), str(port)]
        argv = [VM, *targets, *tx_args]
        feeder: Feeder | None = None
        with tx_err.open("wb") as e, (workdir / "tx.out").open("wb") as o:
            if isinstance(source, Path):
                with source.open("rb") as i:
                    tx = self.spawn(self.a, argv, stdin=i, stdout=o, stderr=e)
            else:
                tx = self.spawn(self.a, argv, stdin=subprocess.PIPE, stdout=o, stderr=e)
                assert tx.stdin is not None
                rate, total = source
                feeder = Feeder(tx.stdin, rate, total, seed=seed).start()
        return Transfer(rx=rx, tx=tx, out=out, rx_err=rx_err, tx_err=tx_err,
                        started=time.monotonic(), feeder=feeder, expected_sha=expected_sha)


def signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return str(code)


@contextlib.contextmanager
def lab_or_skip(rate: str = "200mbit") -> Iterator[Lab]:
    """A fresh lab for one test, torn down whatever happens.  Skips only if namespaces are
    impossible here (not root, no `ip`, `ip netns add` refused), and fails for that reason
    instead under VIAMILLIPEDE_REQUIRE_LAB=1 (see ``harness.require_or_skip``)."""
    require_or_skip(namespaces_unavailable())
    lab = Lab(rate=rate)
    try:
        yield lab.create()
    finally:
        lab.destroy()
