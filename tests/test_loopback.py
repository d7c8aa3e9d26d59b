"""End to end through real ``viamillipede`` processes on 127.0.0.1.

The receiver is started first; the transmitter retries its connections until the receiver
listens, so ordering needs no sleeps.  The processes are run by tests/procs.py: output to files,
every wait bounded, anything still running at the end of a test killed.  Where a test must
observe a process's progress it polls with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from procs import (
    WAIT,
    MiB,
    Procs,
    assert_delivered,
    assert_tx_ok,
    bytes_file,
    connect_when_listening,
    free_port,
    one_error_line,
    random_file,
    sha256_file,
    transfer,
    wait_until,
)

CHUNK = 64 * 1024
SMALL_CHUNK = ["--chunk-size", "64KiB"]


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
    """The receiver gives up (its timeout: 2 s; how soon is checked under a mock clock in
    test_operability.py) and says how much it delivered."""
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
    err = rx.finish(4, timeout=15)
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
    assert 10_000 < tx_rss < limit_kib, f"transmitter peak RSS {tx_rss} KiB"
    assert 10_000 < rx_rss < limit_kib, f"receiver peak RSS {rx_rss} KiB"
