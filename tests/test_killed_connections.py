"""Loopback TCP connections destroyed from outside the processes, mid-transfer, with ``ss -K``.

``ss -K`` asks the kernel (SOCK_DESTROY, needs CONFIG_INET_DIAG_DESTROY) to abort the sockets
its filter selects, as an operator or a conntrack flush would: the owner's next call fails with
ECONNABORTED and the peer gets a reset.  On 127.0.0.1 both ends are in one listing, and with
``state established`` (which leaves out the listener) the filter picks a side:

- ``dport = :PORT``: the transmitter's sockets (their peer is the receiver's port);
- ``sport = :PORT``: the receiver's accepted sockets (their own port is PORT);
- both at once.

On loopback a socket is destroyed at one end only: the reset it sends closes the other end
before ss gets to it, so "both" destroys each connection at whichever end ss lists first.

A paced source keeps the transmitter's stdin open, so every kill lands in the middle of the
stream; each of three checkpoints on the receiver's output is awaited by polling with a
deadline.  Left alone, the links idle most of the time (the source is far slower than
loopback), so for each kill the receiver is frozen (SIGSTOP) until the kernel holds data the
receiver has not read, and thawed right after: every kill destroys a connection with bytes in
flight that no one has acknowledged.  The output must still be the input, byte for byte, and
both ends must exit 0.  Skipped only where a probe shows ``ss -K`` cannot destroy even a socket
pair of the test's own; under VIAMILLIPEDE_REQUIRE_LAB=1 (CI) that fails the test instead.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from harness import require_or_skip
from procs import (
    HOST,
    Feeder,
    MiB,
    Proc,
    Procs,
    free_port,
    sha256_file,
    wait_until,
)

TOTAL = 48 * MiB
RATE = 16 * MiB  # bytes per second: three seconds of transfer
CHECKPOINTS = [TOTAL // 4, TOTAL // 2, 3 * TOTAL // 4]
CHUNK = ["--chunk-size", "256KiB"]

FILTERS = {
    "tx": "( dport = :{port} )",
    "rx": "( sport = :{port} )",
    "both": "( dport = :{port} or sport = :{port} )",
}


def run_ss(port: int, side: str, *, kill: bool) -> subprocess.CompletedProcess[str]:
    argv = ["ss", *(["-K"] if kill else []), "-tnH", "state", "established"]
    argv.append(FILTERS[side].format(port=port))
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=15, check=False, stdin=subprocess.DEVNULL
    )


def ss(port: int, side: str, *, kill: bool = False) -> list[str]:
    """The established TCP sockets of ``side`` (see FILTERS) on ``port``, one line each.

    With ``kill`` they are destroyed, and the lines are those of the sockets ss destroyed (it
    leaves out any the kernel refused to destroy).
    """
    done = run_ss(port, side, kill=kill)
    assert done.returncode == 0, f"{done.args} exited {done.returncode}: {done.stderr}"
    return [line for line in done.stdout.splitlines() if line.strip()]


def unread(port: int) -> int:
    """Bytes the receiver's kernel holds on its connections that the receiver has not read."""
    return sum(int(line.split()[0]) for line in ss(port, "rx"))


@contextlib.contextmanager
def frozen(proc: Proc) -> Iterator[None]:
    """``proc`` stopped (SIGSTOP) for the duration, then continued."""
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGCONT)


@functools.cache
def ss_kill_unavailable() -> str | None:
    """Why ``ss -K`` cannot destroy sockets here, or None if it can (tried on a pair of our own)."""
    if shutil.which("ss") is None:
        return "the `ss` command is missing: apt-get install -y iproute2"
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((HOST, port), timeout=5) as client:
            server, _ = listener.accept()
            with server:
                done = run_ss(port, "tx", kill=True)
                if done.returncode != 0:
                    return f"`ss -K` exited {done.returncode}: {done.stderr.strip()}"
                try:
                    server.sendall(b"x")
                    alive = client.recv(1) == b"x"
                except TimeoutError:
                    raise
                except OSError:  # ECONNABORTED on the destroyed end, or the peer's reset
                    alive = False
    if not alive:
        return None
    return (
        "`ss -K` did not destroy a loopback socket of the test's own (a kernel without "
        f"CONFIG_INET_DIAG_DESTROY?); ss printed {done.stdout!r}"
    )


@pytest.mark.parametrize(
    ("side", "checksum", "compress"),
    [("tx", False, False), ("rx", False, False), ("both", False, False),
     ("both", True, False), ("both", False, True)],
    ids=["tx", "rx", "both", "both-checksum", "both-compressed"],
)
def test_connections_killed_three_times(procs: Procs, side: str, checksum: bool,
                                        compress: bool) -> None:
    require_or_skip(ss_kill_unavailable())
    port = free_port()
    rx = procs.rx(port)
    tx_args = ["threads", "4", *CHUNK, "verbose", "1", *(["checksum"] if checksum else []),
               *(["compress", "zstd:1"] if compress else [])]
    tx = procs.tx(port, *tx_args, stdin=subprocess.PIPE)
    assert tx.popen.stdin is not None
    feeder = Feeder(tx.popen.stdin, RATE, TOTAL, compressible=compress).start()

    def both_running() -> str | None:
        if rx.running() and tx.running():
            return None
        return f"an end exited early\ntx:\n{tx.stderr}\nrx:\n{rx.stderr}"

    for mark in CHECKPOINTS:
        wait_until(
            lambda mark=mark: rx.out_size() >= mark or both_running() is not None,
            f"the receiver's output to reach {mark // MiB} MiB",
        )
        assert both_running() is None, both_running()
        assert feeder.written < TOTAL, "the source ended before the kill: raise TOTAL or RATE"
        with frozen(rx):
            # Also waits out the transmitter's reconnections after the previous kill.
            wait_until(lambda: unread(port) > 0, "data the frozen receiver has not read")
            killed = ss(port, side, kill=True)
        assert killed, f"ss -K destroyed none of the {side} sockets on port {port}"

    feeder.join(timeout=TOTAL / RATE + 30)
    assert feeder.error is None, f"feeder: {feeder.error!r}\ntx:\n{tx.stderr}"
    assert feeder.written == TOTAL
    tx_err = tx.finish(0)
    rx.finish(0)
    assert tx.out_size() == 0, "the transmitter wrote to stdout"
    assert rx.out_size() == TOTAL
    assert sha256_file(rx.out) == feeder.sha256
    assert "broke" in tx_err, f"the transmitter did not report a broken connection:\n{tx_err}"
    if compress:
        ratio = re.search(r"compression zstd:1: \d+ bytes as \d+ \(ratio ([0-9.]+)\)", tx_err)
        assert ratio and float(ratio[1]) < 0.5, tx_err
