"""Operating a transfer: signals, --stats-json, the exit status table, --progress.

Real ``viamillipede`` processes on 127.0.0.1 through tests/procs.py (output to files, every wait
bounded, leftovers killed).  To act in the middle of a transfer, a test feeds the
transmitter's stdin through a pipe in pieces and polls the receiver's output size; nothing
waits on a fixed sleep.  Every exit status of the table in ``--help`` and docs/stats.md is
provoked here by the situation it names.  What depends on time is tested in-process under
Trio's mock clock instead, where a loaded machine cannot make it late: how soon an end gives up
(its timeout) or stops (Ctrl-C), and the progress line, whose period is 10 s when stderr is
not a terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import jsonschema
import pytest
import trio
import trio.testing

from harness import Ends, mid_transfer
from hostile import NoWelcome, Peer, hello
from procs import (
    HOST,
    WAIT,
    MiB,
    Proc,
    Procs,
    bytes_file,
    connect_when_listening,
    free_port,
    random_file,
    sha256_file,
    wait_until,
)
from viamillipede import monitor
from viamillipede.cli import HELP
from viamillipede.errors import ExitCode, Interrupted, PeerTimeout, RemoteFailure
from viamillipede.stats import LimitStats, LinkStats, Report, TargetStats, TransferStats
from viamillipede.wire import (
    Ack,
    Bye,
    ConnectionClosed,
    Data,
    Decoder,
    Error,
    ErrorCode,
    Feature,
    Welcome,
    WelcomeStatus,
)
from viamillipede.wire.codec import NEED_DATA

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "stats.schema.json").read_text())
CHUNK = 64 * 1024
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux
SMALL_CHUNK = ["--chunk-size", "64KiB"]


# -- helpers -----------------------------------------------------------------------------------


def validate(doc: Any) -> None:
    """Fail with every schema violation listed, not only the first."""
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def load_stats(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    validate(doc)
    return doc


def one_error(proc: Proc, code: int, *needles: str, timeout: float = WAIT) -> str:
    """The process exits ``code``, with exactly one ``error:`` line on stderr that mentions every
    needle, no traceback, and nothing on stdout unless it is a receiver.  Returns that line."""
    err = proc.finish(code, timeout)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"{proc.name}: expected one error line, got:\n{err}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    if not proc.name.startswith("rx"):
        assert proc.out_size() == 0, f"{proc.name} wrote to stdout"
    return lines[0]


def no_errors(err: str) -> None:
    assert "Traceback" not in err
    assert "error:" not in err, err


def start_mid_transfer(
    procs: Procs, *rx_args: str, tx_args: tuple[str, ...] = (), chunks: int = 10
) -> tuple[Proc, Proc, bytes, int]:
    """A receiver and a transmitter fed ``chunks`` whole chunks through a pipe that stays open,
    once the receiver has written them all: the transfer is under way and waits for more."""
    port = free_port()
    rx = procs.rx(port, *rx_args)
    tx = procs.tx(port, *SMALL_CHUNK, *tx_args, stdin=subprocess.PIPE)
    first = os.urandom(chunks * CHUNK)
    tx.feed(first)
    wait_until(
        lambda: rx.out_size() >= len(first) or not rx.running() or not tx.running(),
        "the receiver to write the chunks fed so far",
    )
    assert rx.running() and tx.running(), f"rx:\n{rx.stderr}\ntx:\n{tx.stderr}"
    return rx, tx, first, port


def finish_feeding(tx: Proc, data: bytes) -> None:
    assert tx.popen.stdin is not None
    tx.feed(data)
    tx.popen.stdin.close()


# -- signals ------------------------------------------------------------------------------------


def test_sigusr1_reports_and_sigusr2_steps_verbosity(procs: Procs) -> None:
    rx, tx, first, _ = start_mid_transfer(procs, tx_args=("threads", "3"))

    for proc in (tx, rx):
        proc.popen.send_signal(signal.SIGUSR1)
    wait_until(lambda: len(re.findall(r"^  conn ", tx.stderr, re.MULTILINE)) >= 3,
               "the transmitter's report")
    wait_until(lambda: "  conn " in rx.stderr, "the receiver's report")
    for proc in (tx, rx):
        proc.popen.send_signal(signal.SIGUSR2)
    for proc in (tx, rx):
        wait_until(lambda p=proc: "verbosity now 2" in p.stderr, f"{proc.name}: SIGUSR2")

    rest = os.urandom(7 * CHUNK + 123)
    finish_feeding(tx, rest)
    tx_err = tx.finish(0)
    rx_err = rx.finish(0)
    no_errors(tx_err)
    no_errors(rx_err)

    assert re.search(r"^tx: \d+ bytes in \d+ chunks, .* average .* MB/s", tx_err, re.MULTILINE)
    assert re.search(r"^  window \d+/\d+ chunks; retransmits", tx_err, re.MULTILINE)
    assert re.search(r"^  target 127\.0\.0\.1:\d+: up \(\d connections\), \d+ bytes, "
                     r"share \d+% of all sent$", tx_err, re.MULTILINE), tx_err
    # Three connections in the SIGUSR1 report, three more in the final report that the
    # verbosity raised to 2 by SIGUSR2 asks for; each says its state (one may be between two
    # attempts: the transmitter may start before the receiver listens).
    conns = re.findall(r"^  conn +\d+ 127\.0\.0\.1:\d+: (up|down|connecting|backoff)\b",
                       tx_err, re.MULTILINE)
    assert len(conns) == 6 and conns.count("up") >= 4, tx_err
    assert re.search(r"^rx: \d+ bytes in \d+ chunks", rx_err, re.MULTILINE)
    assert re.search(r"^  window \d+/\d+ chunks, reorder buffer \d+", rx_err, re.MULTILINE)
    assert re.search(r"^  conn +\d+ \S+: up", rx_err, re.MULTILINE)
    assert "viamillipede: verbosity now 2" in tx_err

    # The payload, and only the payload, on the receiver's stdout; nothing on the transmitter's.
    assert rx.out.read_bytes() == first + rest
    assert tx.out_size() == 0


def test_sigusr2_wraps_around(procs: Procs) -> None:
    rx, tx, first, _ = start_mid_transfer(procs, chunks=2)
    for n in (2, 3, 0, 1):
        tx.popen.send_signal(signal.SIGUSR2)
        wait_until(lambda n=n: f"verbosity now {n}" in tx.stderr, f"verbosity {n}")
    finish_feeding(tx, b"tail")
    no_errors(tx.finish(0))
    no_errors(rx.finish(0))
    assert rx.out.read_bytes() == first + b"tail"


@pytest.mark.parametrize(("start", "presses", "report"), [(2, 2, False), (1, 1, True)],
                         ids=["2-to-0", "1-to-2"])
def test_final_report_follows_the_current_verbosity(
    procs: Procs, start: int, presses: int, report: bool
) -> None:
    rx, tx, _, _ = start_mid_transfer(procs, tx_args=("verbose", str(start)), chunks=1)
    level = start
    for _ in range(presses):
        level = (level + 1) % 4
        tx.popen.send_signal(signal.SIGUSR2)
        wait_until(lambda n=level: f"verbosity now {n}" in tx.stderr, f"verbosity {level}")
    finish_feeding(tx, b"end")
    err = tx.finish(0)
    rx.finish(0)
    after = err.split(f"verbosity now {level}", 1)[1]
    assert ("  window " in after) == report, err


# -- --stats-json ----------------------------------------------------------------------------


@pytest.mark.parametrize("chaos", [False, True], ids=["plain", "chaos"])
def test_stats_json_both_ends(procs: Procs, chaos: bool) -> None:
    payload = random_file(procs.dir / "data", 3 * MiB + 17)
    port = free_port()
    chaos_args = ["chaos", "3", "--chaos-rate", "0.05"]
    # The receiver's chaos leaves out resets and stalls: one could take the transmitter's FIN
    # with it and keep the receiver lingering for 10 s, which this test does not need.
    rx_chaos = [*chaos_args, "--chaos-faults", "delay,short"] if chaos else []
    rx = procs.rx(port, "--stats-json", str(procs.dir / "rx.json"), *rx_chaos)
    tx = procs.tx(port, *SMALL_CHUNK, "--stats-json", str(procs.dir / "tx.json"),
                  *(chaos_args if chaos else []), stdin=payload.path)
    tx_err = tx.finish(0)
    rx_err = rx.finish(0)
    no_errors(tx_err)
    no_errors(rx_err)
    assert sha256_file(rx.out) == payload.digest

    for role, err in (("tx", tx_err), ("rx", rx_err)):
        doc = load_stats(procs.dir / f"{role}.json")
        assert (doc["schema"], doc["exit_code"], doc["error"]) == (1, 0, None)
        report = doc["report"]
        assert report["totals"]["role"] == role
        assert report["totals"]["nbytes"] == payload.size
        assert report["totals"]["chunks"] == -(-payload.size // CHUNK)
        assert report["window_used"] == 0
        if role == "tx":
            assert [t["target"] for t in report["targets"]] == [f"{HOST}:{port}"]
            assert len(report["connections"]) == 4
        else:
            assert report["targets"] == []
        if chaos:
            block = doc["chaos"]
            assert block["seed"] == 3 and block["rate"] == 0.05
            # The log in the file is the log on stderr, line for line.
            logged = re.findall(rf"^viamillipede {role}: (chaos {role} conn .*)$", err,
                                re.MULTILINE)
            assert block["faults"] == logged
        else:
            assert doc["chaos"] is None
    if chaos:
        tx_chaos = load_stats(procs.dir / "tx.json")["chaos"]
        # A sealed session (the default) catches corrupted chunks: chaos corrupts them too.
        assert tx_chaos["kinds"] == ["corrupt", "delay", "reset", "short", "stall"]
        assert tx_chaos["faults"], "seed 3 at rate 0.05 injected nothing in 49 chunks"
        assert load_stats(procs.dir / "rx.json")["chaos"]["kinds"] == ["delay", "short"]
    assert not list(procs.dir.glob("*.tmp")), "a temporary stats file was left behind"


def test_limit_on_both_ends(procs: Procs) -> None:
    """``limit RATE`` is accepted at each end; the stream arrives intact, no sooner than the
    rate allows, and both reports (the final one at verbose 2, and --stats-json) show it."""
    payload = random_file(procs.dir / "data", 1_000_000)
    port = free_port()
    rx = procs.rx(port, "limit", "4M", "verbose", "2", "--stats-json", str(procs.dir / "rx.json"))
    tx = procs.tx(port, *SMALL_CHUNK, "--limit=3M", "--stats-json", str(procs.dir / "tx.json"),
                  stdin=payload.path)
    no_errors(tx.finish(0))
    rx_err = rx.finish(0)
    no_errors(rx_err)
    assert sha256_file(rx.out) == payload.digest
    assert re.search(r"^  limit 4 MB/s, held back \d+\.\d s$", rx_err, re.MULTILINE), rx_err
    for role, rate in (("tx", 3e6), ("rx", 4e6)):
        doc = load_stats(procs.dir / f"{role}.json")
        assert doc["report"]["limit"]["rate"] == rate
        assert doc["report"]["totals"]["nbytes"] == payload.size
    tx_doc = load_stats(procs.dir / "tx.json")
    # At most one chunk (64 KiB) ahead of 3 MB/s: the rest took its time, and waited for it.
    least = (payload.size - 64 * 1024) / 3e6
    assert tx_doc["report"]["totals"]["elapsed"] >= least * 0.95
    assert tx_doc["report"]["limit"]["waited"] > 0


def test_a_receiver_limited_below_the_default_chunk_says_what_chunk_size_to_use(
    procs: Procs,
) -> None:
    """At 100 kB/s a 2 MiB chunk takes 21 s to write: the receiver cannot choose the
    transmitter's chunks, so it says at start which size passes in 1/8 of its timeout."""
    rx = procs.rx(free_port(), "limit", "100k")
    wait_until(lambda: "--chunk-size" in rx.stderr or not rx.running(), "the warning")
    assert "limit 100000: give the transmitter --chunk-size 749568 or less" in rx.stderr
    assert rx.running()


def test_schema_is_strict() -> None:
    """A document with a field the schema does not know, or without one it requires, fails:
    the schema cannot silently fall behind the program."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    totals = TransferStats("tx", 10, 1, 0.5, 1, 0, 0, 0, 0)
    link = LinkStats(0, "h:1", "up", 0, 1, 10, 0, 0, None)
    target = TargetStats("h:1", 10, 1.0, True, 1, None)
    report = Report(totals, 4, 0, 0, (link,), (target,), LimitStats(1e6, 0.5))
    good = {"schema": 1, "exit_code": 0, "error": None,
            "report": json.loads(json.dumps(report.to_dict())), "chaos": None}
    validate(good)
    validator = jsonschema.Draft202012Validator(SCHEMA)

    def broken(change: Callable[[dict[str, Any]], None]) -> bool:
        doc = json.loads(json.dumps(good))
        change(doc)
        return not validator.is_valid(doc)

    assert broken(lambda d: d.update(extra=1))
    assert broken(lambda d: d["report"]["totals"].update(extra=1))
    assert broken(lambda d: d["report"]["connections"][0].pop("state"))
    assert broken(lambda d: d["report"]["targets"][0].update(share=1.5))
    assert broken(lambda d: d["report"].pop("limit"))
    assert broken(lambda d: d["report"]["limit"].update(rate=0))
    assert broken(lambda d: d["report"]["limit"].pop("waited"))
    assert not broken(lambda d: d["report"].update(limit=None))
    assert broken(lambda d: d.update(exit_code=3))  # a failure needs its error message
    assert broken(lambda d: d.update(error="boom"))  # and a success has none
    assert broken(lambda d: d.update(chaos={"seed": 1, "rate": 0.1, "kinds": ["nuke"],
                                            "faults": []}))
    assert not broken(lambda d: d.update(report=None))


def test_every_exit_code_has_a_test() -> None:
    """The table in --help lists exactly the codes in ExitCode, and a ``test_exit_N...`` below
    provokes each of them."""
    table = HELP.split("Exit status:\n", 1)[1]
    listed = {int(n) for n in re.findall(r"(?<!\S)(\d+) (?=[a-z])", table)}
    assert listed == {int(c) for c in ExitCode}
    provoked = set()
    for name in globals():
        if m := re.match(r"test_exit_(\d+)(?:_and_(\d+))?_", name):
            provoked |= {int(n) for n in m.groups() if n is not None}
    assert provoked == listed


# -- each exit status, provoked ------------------------------------------------------------


def test_exit_0_success(procs: Procs) -> None:
    payload = bytes_file(procs.dir / "data", os.urandom(2 * CHUNK + 5))
    port = free_port()
    rx = procs.rx(port)
    tx = procs.tx(port, *SMALL_CHUNK, stdin=payload.path)
    no_errors(tx.finish(0))
    no_errors(rx.finish(0))
    assert rx.out.read_bytes() == payload.path.read_bytes()


def test_exit_1_port_in_use(procs: Procs) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        rx = procs.rx(port, "--stats-json", str(procs.dir / "rx.json"))
        one_error(rx, 1, "cannot listen", str(port), "in use")
    assert rx.out_size() == 0
    doc = load_stats(procs.dir / "rx.json")
    assert doc["exit_code"] == 1
    assert "in use" in doc["error"]


def test_exit_2_usage(procs: Procs) -> None:
    rx = procs.start("usage", ["rx", "8834", "frobnicate"])
    err = rx.finish(2)
    # Usage errors read "viamillipede: ..." (no mode yet, no "error:"), one line.
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("viamillipede: ") and "frobnicate" in lines[0]
    assert rx.out_size() == 0


def test_exit_2_a_target_that_does_not_resolve(procs: Procs) -> None:
    """A typo in a host name fails at once, naming it (RFC 6761: ``.invalid`` never resolves),
    and writes no --stats-json: a bad command line never starts a session."""
    tx = procs.start("tx", ["tx", "127.0.0.1", "9", "tx", "no-such-host.invalid", "39305",
                            "--stats-json", str(procs.dir / "tx.json")])
    err = tx.finish(2, timeout=20)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("viamillipede: cannot resolve no-such-host.invalid: "), err
    assert not (procs.dir / "tx.json").exists()


def test_exit_2_a_listen_address_that_does_not_resolve(procs: Procs) -> None:
    rx = procs.rx(free_port(), "--listen", "nosuch.invalid")
    err = rx.finish(2, timeout=20)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("viamillipede: cannot resolve the --listen address nosuch.invalid: ")
    assert rx.out_size() == 0


def test_exit_3_wrong_checkphrase(procs: Procs) -> None:
    payload = bytes_file(procs.dir / "data", os.urandom(CHUNK))
    port = free_port()
    rx = procs.rx(port, "checkphrase", "abcd")
    tx = procs.tx(port, *SMALL_CHUNK, "--stats-json", str(procs.dir / "tx.json"),
                  stdin=payload.path)
    one_error(tx, 3, "checkphrase")
    assert rx.running(), f"a wrong checkphrase ended the receiver:\n{rx.stderr}"
    assert rx.out_size() == 0
    doc = load_stats(procs.dir / "tx.json")
    assert doc["exit_code"] == 3 and "checkphrase" in doc["error"]


def test_exit_4_timeout_after_transmitter_killed(procs: Procs) -> None:
    """How soon the receiver gives up is checked under a mock clock (below)."""
    rx, tx, first, _ = start_mid_transfer(procs, "timeout", "2")
    tx.popen.send_signal(signal.SIGKILL)
    tx.wait()
    one_error(rx, 4, "silent", f"{len(first)} bytes were delivered", timeout=15)
    assert rx.out.read_bytes() == first


def _recv_event(sock: socket.socket, decoder: Decoder) -> object:
    while True:
        event = decoder.next_event()
        if event is not NEED_DATA:
            return event
        decoder.receive_data(sock.recv(65536))


class _BlockingStream(anyio.abc.ByteStream):
    """A connected blocking socket as the stream a :class:`hostile.Peer` talks through: each
    call is done when it returns (the socket's timeout bounds it), so the peer's coroutines
    run to completion under :func:`anyio.run` in these synchronous tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def send(self, item: bytes) -> None:
        self.sock.sendall(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = self.sock.recv(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        self.sock.close()


def _fake_session(
    port: int, session: bytes, conn_index: int = 0, *, chunk_size: int = CHUNK,
    wait: bool = True, features: int = 0,
) -> tuple[socket.socket, Peer, Welcome]:
    """A transmitter played over a raw socket: it says HELLO for ``session`` (window 8,
    ``features``) and runs the handshake with the default checkphrase, as the crafted peers of
    tests/hostile.py do: the session's first connection exchanges keys, the next ones join.
    Returns the socket, the peer (its ``encode`` tags control frames, its ``decoder`` checks
    the receiver's tags) and the WELCOME; raises NoWelcome if the receiver answers otherwise.
    ``wait``: retry until the receiver listens (else a refused connection raises).

    Like those crafted peers it sends DATA in clear, so the receiver must be started with
    ``plaintext``: what these tests provoke is the session's logic (totals, counts, a failed
    session), which is the same sealed or not; sealing is tested in test_mitm."""
    sock = connect_when_listening(port) if wait else socket.create_connection((HOST, port), 10)
    sock.settimeout(10)
    peer = Peer(_BlockingStream(sock), Decoder.for_transmitter())
    welcome = anyio.run(functools.partial(
        hello, peer, session_id=session, conn_index=conn_index, chunk_size=chunk_size,
        window=8, features=features))
    return sock, peer, welcome


def test_exit_5_truncated_stream(procs: Procs) -> None:
    """A transmitter (played here over a raw socket) claims two chunks in BYE but sent one."""
    port = free_port()
    rx = procs.rx(port, "timeout", "20", "--stats-json", str(procs.dir / "rx.json"),
                  "plaintext")
    session = os.urandom(16)
    sock, peer, welcome = _fake_session(port, session)
    with sock:
        assert welcome.status == WelcomeStatus.ACCEPTED
        assert (welcome.session_id, welcome.written) == (session, 0)
        sock.sendall(peer.encode(Data(seq=0, checksum=0, payload=b"x" * CHUNK)))
        sock.sendall(peer.encode(Bye(chunks=2, nbytes=2 * CHUNK)))
        while not isinstance(event := _recv_event(sock, peer.decoder), Error | ConnectionClosed):
            assert isinstance(event, Ack), event
    one_error(rx, 5, "incomplete", timeout=15)
    doc = load_stats(procs.dir / "rx.json")
    assert doc["exit_code"] == 5
    # Chunk 0 may or may not be written before BYE ends the session; the count of a chunk
    # whose write was cut short is test_delivered_bytes_count_what_reached_stdout's business.
    assert rx.out_size() in (0, CHUNK)
    assert doc["report"]["totals"]["nbytes"] in (0, CHUNK)


def test_exit_6_and_7_output_closed_early(procs: Procs) -> None:
    """``viamillipede rx PORT | head -c 1000``: the receiver's output fails (6) and the
    transmitter hears that its peer aborted (7)."""
    payload = random_file(procs.dir / "data", 8 * MiB)
    port = free_port()
    rx = procs.rx(port, stdout=subprocess.PIPE)
    assert rx.popen.stdout is not None
    head = subprocess.Popen(["head", "-c", "1000"], stdin=rx.popen.stdout,
                            stdout=subprocess.DEVNULL)
    procs.inputs.append(head)
    rx.popen.stdout.close()  # only head reads the receiver's output now
    tx = procs.tx(port, *SMALL_CHUNK, stdin=payload.path)
    assert head.wait(timeout=WAIT) == 0
    one_error(rx, 6, "broken pipe")
    one_error(tx, 7, "receiver's output failed")
    assert tx.out_size() == 0


class _FakeHttpServer:
    """Answers whatever it is sent with an HTTP error, like a web server on the wrong port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(65536):
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            except OSError:
                pass


@pytest.fixture
def http_server() -> Iterator[_FakeHttpServer]:
    server = _FakeHttpServer()
    try:
        yield server
    finally:
        server.sock.close()


def test_exit_8_peer_is_not_viamillipede(procs: Procs, http_server: _FakeHttpServer) -> None:
    payload = bytes_file(procs.dir / "data", os.urandom(3 * CHUNK))
    tx = procs.tx(http_server.port, *SMALL_CHUNK, "--stats-json", str(procs.dir / "tx.json"),
                  stdin=payload.path)
    one_error(tx, 8, "not a viamillipede receiver", timeout=20)
    assert load_stats(procs.dir / "tx.json")["exit_code"] == 8


def test_exit_9_ssh_cannot_start_the_remote_end(procs: Procs) -> None:
    """tx --ssh whose ssh cannot even run (tests/test_ssh.py has the rest, against an sshd)."""
    tx = procs.start("tx", ["tx", "--ssh", "127.0.0.1", "--ssh-command", "/nonexistent/ssh",
                            "--", "cat"], stdin=subprocess.DEVNULL)
    one_error(tx, 9, "cannot run /nonexistent/ssh", timeout=20)


@pytest.mark.parametrize(
    ("side", "signum"),
    [("tx", signal.SIGINT), ("tx", signal.SIGTERM), ("rx", signal.SIGINT)],
    ids=["tx-SIGINT", "tx-SIGTERM", "rx-SIGINT"],
)
def test_exit_130_interrupted_and_peer_exits_7(
    procs: Procs, side: str, signum: signal.Signals
) -> None:
    """Ctrl-C stops one end (130); the other end is told and exits 7, naming the signal:
    told, not timed out (that would be exit 4, after 30 s).  How soon each end stops is
    checked under a mock clock (below)."""
    rx, tx, first, _ = start_mid_transfer(
        procs, "timeout", "30", "--stats-json", str(procs.dir / "rx.json"),
        tx_args=("timeout", "30", "--stats-json", str(procs.dir / "tx.json")),
    )
    stopped, peer = (tx, rx) if side == "tx" else (rx, tx)
    peer_name = "transmitter" if side == "tx" else "receiver"
    stopped.popen.send_signal(signum)
    one_error(stopped, 130, f"interrupted by {signum.name}", timeout=10)
    one_error(peer, 7, f"the {peer_name} aborted", signum.name, timeout=15)
    assert rx.out.read_bytes() == first  # what was written stays, nothing else was added
    assert tx.out_size() == 0

    stopped_doc = load_stats(procs.dir / f"{side}.json")
    assert stopped_doc["exit_code"] == 130
    peer_doc = load_stats(procs.dir / f"{'rx' if side == 'tx' else 'tx'}.json")
    assert peer_doc["exit_code"] == 7
    assert peer_doc["report"]["totals"]["nbytes"] >= len(first)


# -- how soon an end gives up or stops, under a mock clock -------------------------------------




def test_the_receiver_gives_up_when_its_timeout_has_passed_without_the_transmitter() -> None:
    """``timeout 2`` and the transmitter killed mid-transfer: the receiver fails (exit 4),
    saying how much it delivered, once 2 s have passed; not sooner, and not much later."""
    ended = mid_transfer(lambda ends: ends.kill("tx"), rx_timeout=2.0)
    error, took = ended["rx"]
    assert isinstance(error, PeerTimeout), error
    assert f"{10 * CHUNK} bytes were delivered" in str(error)
    # Measured from the last frame, which came at the latest when the transmitter died.
    assert 2.0 - 0.1 <= took < 3.0, f"the receiver gave up {took:.2f} s after the transmitter"


def test_the_transmitter_gives_up_when_its_timeout_has_passed_without_the_receiver() -> None:
    """``timeout 5`` and the receiver killed mid-transfer, with more to send: the transmitter
    keeps trying to reconnect, then fails (exit 4) once 5 s have passed without progress; not
    much later."""

    def kill_and_feed(ends: Ends) -> None:
        ends.kill("rx")
        ends.source.feed(os.urandom(4 * CHUNK))

    ended = mid_transfer(kill_and_feed, tx_timeout=5.0)
    error, took = ended["tx"]
    assert isinstance(error, PeerTimeout), error
    # Measured from the last acknowledgement, which came at the latest when the receiver died.
    assert 5.0 - 0.1 <= took < 5.0 + 2.0, f"the transmitter gave up {took:.2f} s after the receiver"


@pytest.mark.parametrize("side", ["tx", "rx"])
def test_an_interrupted_end_stops_at_once_and_its_peer_hears_why(side: str) -> None:
    """Ctrl-C on one end (``abort``, as the CLI's signal handler does): it stops (exit 130)
    and the other end is told and stops too (exit 7), long before its 30 s timeout."""
    ended = mid_transfer(
        lambda ends: (ends.tx if side == "tx" else ends.rx).abort("interrupted by SIGINT")
    )
    peer = "rx" if side == "tx" else "tx"
    stopped_error, stopped_took = ended[side]
    peer_error, peer_took = ended[peer]
    assert isinstance(stopped_error, Interrupted), stopped_error
    assert stopped_took < 5.0, f"the interrupted end took {stopped_took:.2f} s to stop"
    assert isinstance(peer_error, RemoteFailure), peer_error
    peer_name = "transmitter" if side == "tx" else "receiver"
    assert f"the {peer_name} aborted" in str(peer_error)
    assert "SIGINT" in str(peer_error)
    assert peer_took < 8.0, f"the other end took {peer_took:.2f} s to hear of it"


# -- --progress, under a mock clock -----------------------------------------------------------


def test_progress_line_format() -> None:
    line = monitor.progress_line(50_000_000, 3725.0, 5e6, 100_000_000)
    assert line == "      50.0 MB      5.0 MB/s  1:02:05   50.0%  ETA 0:00:10"
    no_size = monitor.progress_line(1_500_000, 2.0, None, None)
    assert no_size == "       1.5 MB      0.0 MB/s  0:00:02"
    unknown_rate = monitor.progress_line(0, 0.0, None, 10)
    assert unknown_rate.endswith("  0.0%  ETA ?:??:??")
    assert monitor.progress_line(20, 1.0, 1.0, 10).split()[-3] == "100.0%"  # size was low


class _FixedMeter(monitor.RateMeter):
    """A rate meter that always reads 2 MB/s (the real one uses the wall clock)."""

    def update(self, nbytes: int) -> float | None:
        return 2e6


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report_at_mock_time() -> Report:
    """A transfer at 2 MB/s of mock time."""
    now = trio.current_time()
    totals = TransferStats("tx", int(2e6 * now), 0, now, 4, 0, 0, 0, 0)
    return Report(totals, 8, 0, 0, (), ())


def _run_progress(out: io.StringIO, seconds: float, size: int | None) -> None:
    async def main() -> None:
        with trio.move_on_after(seconds):
            await monitor.show_progress(_report_at_mock_time, size, _FixedMeter(), out)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_progress_not_a_terminal_writes_plain_lines_every_10_s() -> None:
    out = io.StringIO()
    _run_progress(out, 35.0, 100_000_000)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3, text
    for i, line in enumerate(lines, start=1):
        seconds = 10 * i
        assert line == monitor.progress_line(int(2e6 * seconds), seconds, 2e6, 100_000_000)
    assert lines[0] == "      20.0 MB      2.0 MB/s  0:00:10   20.0%  ETA 0:00:40"
    assert text.endswith("\n")


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    out = _Terminal()
    _run_progress(out, 2.2, None)
    text = out.getvalue()
    updates = text.split("\r")[1:]
    assert len(updates) == 4  # at 0.5, 1.0, 1.5 and 2.0 s
    assert all(u.endswith("\x1b[K") for u in updates[:-1])
    assert updates[-1].endswith("\x1b[K\n"), "the line is not ended when progress stops"
    assert "0:00:02" in updates[-1] and "%" not in updates[-1]


def test_progress_eta_never_negative() -> None:
    line = monitor.progress_line(3_000_000_000, 1.0, 1e9, 2_000_000_000)
    assert "ETA -" not in line, line


# -- the end of a session: what each end is told, and what it counts -----------------------


def test_truncated_bye_is_answered_with_totals_mismatch(procs: Procs) -> None:
    port = free_port()
    rx = procs.rx(port, "timeout", "20", "plaintext")
    sock, peer, welcome = _fake_session(port, os.urandom(16), 0)
    with sock:
        assert welcome.status == WelcomeStatus.ACCEPTED
        sock.sendall(peer.encode(Data(seq=0, checksum=0, payload=b"x" * CHUNK)))
        sock.sendall(peer.encode(Bye(chunks=2, nbytes=2 * CHUNK)))
        events = []
        while not isinstance(event := _recv_event(sock, peer.decoder), Error | ConnectionClosed):
            events.append(event)
        one_error(rx, 5, "incomplete", timeout=15)
    assert isinstance(event, Error), f"no ERROR frame; got {events} then {event}"
    assert event.code == ErrorCode.TOTALS_MISMATCH


def test_failed_session_does_not_tell_a_reconnect_it_is_over(procs: Procs) -> None:
    """The receiver times out with every chunk written but no BYE yet; while it says so on the
    open connection, the same session reconnects and must not hear "session over"."""
    port = free_port()
    rx = procs.rx(port, "timeout", "1", "plaintext")
    session = os.urandom(16)
    first, peer, welcome = _fake_session(port, session, 0)
    with first:
        assert welcome.status == WelcomeStatus.ACCEPTED
        first.sendall(peer.encode(Data(seq=0, checksum=0, payload=b"x" * CHUNK)))
        while not isinstance(event := _recv_event(first, peer.decoder), Error | ConnectionClosed):
            assert isinstance(event, Ack), event
        assert isinstance(event, Error) and event.code == ErrorCode.TIMEOUT
        # The receiver now waits (up to 1 s) for this connection to close: reconnect meanwhile
        # (a join: the session has keys).
        answer: object
        try:
            second, _, answer = _fake_session(port, session, 1, wait=False)
            second.close()
        except (OSError, NoWelcome) as exc:  # refused, reset or closed: as good as a refusal
            answer = exc
        one_error(rx, 4, "silent", timeout=15)
    assert not (isinstance(answer, Welcome) and answer.status == WelcomeStatus.SESSION_OVER
                and answer.written == 1), f"a failed session told a reconnect: {answer}"


@pytest.mark.parametrize("path", ["buffered", "spliced"])
def test_delivered_bytes_count_what_reached_stdout(procs: Procs, path: str) -> None:
    """A chunk bigger than the stdout pipe nobody reads: the receiver writes part of it and
    waits; then a BYE claiming more ends the session.  Its count must match the pipe.

    With a checksum the chunk is received into a buffer first and then written; without, it
    is spliced from the socket into the pipe (which then takes more than its nominal size, as
    pipe slots hold whole socket fragments: hence the bigger chunk)."""
    big = 4 * MiB if path == "buffered" else 32 * MiB
    features = int(Feature.CHECKSUM_CRC32) if path == "buffered" else 0
    port = free_port()
    rx = procs.rx(port, "timeout", "20", "--stats-json", str(procs.dir / "rx.json"),
                  "plaintext", stdout=subprocess.PIPE)
    assert rx.popen.stdout is not None
    session = os.urandom(16)
    sock, peer, welcome = _fake_session(port, session, chunk_size=big, features=features)
    with sock:
        assert welcome.status == WelcomeStatus.ACCEPTED
        payload = b"y" * big
        crc = zlib.crc32(payload) if features else 0
        if path == "buffered":
            sock.sendall(peer.encode(Data(seq=0, checksum=crc, payload=payload)))
            assert _recv_event(sock, peer.decoder) == Ack(0, 0)  # received; now being written
        else:  # the receiver takes it as the pipe drains: the send cannot complete
            frame = peer.encode(Data(seq=0, checksum=crc, payload=payload))
            sock.settimeout(None)

            def send_all() -> None:
                with contextlib.suppress(OSError):  # the receiver hangs up part-way
                    sock.sendall(frame)

            threading.Thread(target=send_all, daemon=True).start()
        capacity = fcntl.fcntl(rx.popen.stdout.fileno(), F_GETPIPE_SZ)
        assert capacity < big

        def pipe_full() -> bool:
            assert rx.popen.stdout is not None
            pending = bytearray(4)
            fcntl.ioctl(rx.popen.stdout.fileno(), termios.FIONREAD, pending)
            return int.from_bytes(pending, sys.byteorder) >= capacity

        wait_until(pipe_full, "the receiver to fill its stdout pipe")
        # On a second connection: on the first, BYE would wait behind the payload.
        other, other_peer, welcome = _fake_session(port, session, 1, chunk_size=big,
                                                   features=features)
        with other:
            assert welcome.status == WelcomeStatus.ACCEPTED
            other.sendall(other_peer.encode(Bye(chunks=2, nbytes=2 * big)))
            rx.popen.wait(timeout=WAIT)
    delivered = len(rx.popen.stdout.read())
    assert delivered >= capacity
    rx.finish(5)
    doc = load_stats(procs.dir / "rx.json")
    assert doc["report"]["totals"]["nbytes"] == delivered
