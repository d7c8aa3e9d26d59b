"""``tx --ssh HOST -- COMMAND`` against a real sshd on 127.0.0.1 (tests/sshd_lab.py): a fresh
host key and user key, root logging in as root.  No mocks: the transmitter runs ssh, ssh runs
``viamillipede ssh-rx`` through sshd, the stream goes over parallel TCP connections.

What is checked: round trips (empty, one byte, 200 MB) through a remote command, its output
and messages coming back, its failures (at once, half-way) named with a non-zero exit, ssh
refusing or the remote binary missing as one line and exit 9, and that Ctrl-C or a lost ssh
channel leaves no process and no listening port behind (checked, not assumed).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import require_or_skip
from procs import free_port, random_file, sha256_file, wait_until
from sshd_lab import Sshd, SshdLabError, sshd_lab
from viamillipede.errors import ExitCode

VM = str(Path(sys.executable).parent / "viamillipede")
WAIT = 60.0


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    if os.geteuid() != 0:
        require_or_skip("the throwaway sshd logs in root, so these tests need root")
    try:
        with sshd_lab() as lab:
            yield lab
    except SshdLabError as exc:
        require_or_skip(f"no throwaway sshd: {exc}")


def tx_ssh(sshd: Sshd, remote: list[str], *options: str, ssh_command: str | None = None,
           remote_vm: str = VM) -> list[str]:
    return [VM, "tx", "--ssh", sshd.destination,
            "--ssh-command", ssh_command or shlex.join(sshd.ssh_command),
            "--remote-viamillipede", remote_vm, *options, "--", *remote]


def run(argv: list[str], stdin: bytes | Path = b"") -> subprocess.CompletedProcess[bytes]:
    if isinstance(stdin, Path):
        with stdin.open("rb") as f:
            return subprocess.run(argv, stdin=f, capture_output=True, timeout=WAIT)
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=WAIT)


def ssh_rx_processes() -> list[str]:
    """Every remote end still running on this machine (the "remote" host is this one)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ssh-rx" in cmdline:
            found.append(f"{pid}: {b' '.join(cmdline).decode(errors='replace')}")
    return found


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def one_line(err: bytes) -> str:
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(autouse=True)
def no_remote_ends_left() -> Iterator[None]:
    """After every test: nothing of it still runs, checked."""
    yield
    wait_until(lambda: not ssh_rx_processes(), "every remote end to end", 10)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1], ids=["empty", "one byte"])
def test_small_streams_arrive_through_the_remote_command(sshd: Sshd, tmp_path: Path,
                                                         size: int) -> None:
    data = os.urandom(size)
    out = tmp_path / "out"
    # The words after -- are one remote shell command, as ssh runs them: the redirection
    # happens on the remote end.
    proc = run(tx_ssh(sshd, [f"cat > {shlex.quote(str(out))}"]), data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert out.read_bytes() == data


@pytest.mark.slow
def test_200_mb_arrive_identical(sshd: Sshd, tmp_path: Path) -> None:
    payload = random_file(tmp_path / "in", 200 * 1000 * 1000, seed=13)
    out = tmp_path / "out"
    proc = run(tx_ssh(sshd, ["cat", ">", str(out)], "threads", "4"), payload.path)
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(out) == payload.digest
    summary = proc.stderr.decode().splitlines()
    assert len(summary) == 1 and "200000000 bytes" in summary[0], summary


def test_compression_goes_with_the_ssh_form(sshd: Sshd, tmp_path: Path) -> None:
    """The remote receiver follows what the HELLO announces: nothing to pass through ssh."""
    from procs import compressible_text

    data = compressible_text(9 * 1000 * 1000, seed=5)
    out = tmp_path / "out"
    proc = run(tx_ssh(sshd, ["cat", ">", str(out)], "compress", "zstd:1", "--chunk-size",
                      "1M"), data)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == data
    line = proc.stderr.decode().splitlines()[-1]
    assert line.startswith("viamillipede tx: compression zstd:1: 9000000 bytes as "), line


def test_the_remote_commands_output_and_messages_come_back(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["tr a-z A-Z; echo said-on-stderr >&2"], "-q"), b"hello\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"HELLO\n"
    assert proc.stderr == b"said-on-stderr\n"


# -- the remote command fails ---------------------------------------------------------------------


def test_a_remote_command_that_fails_at_once_fails_the_transfer(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["false"]), os.urandom(5_000_000))
    assert proc.returncode == ExitCode.REMOTE_FAILED, proc.stderr
    last = proc.stderr.decode().splitlines()[-1]
    assert last.startswith("viamillipede tx: error: ") and "`false`" in last, last
    assert "status 1" in last, last


def test_a_remote_command_that_exits_3_half_way_is_named(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["head -c 1000000 >/dev/null; exit 3"]), os.urandom(50_000_000))
    assert proc.returncode == ExitCode.REMOTE_FAILED, proc.stderr
    last = proc.stderr.decode().splitlines()[-1]
    assert "`head -c 1000000 >/dev/null; exit 3`" in last and "status 3" in last, last


def test_a_remote_command_that_fails_after_the_stream_is_named(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["cat >/dev/null; exit 4"], "-q"), os.urandom(100_000))
    assert proc.returncode == ExitCode.REMOTE_FAILED, proc.stderr
    line = one_line(proc.stderr)
    assert "`cat >/dev/null; exit 4`" in line and "status 4" in line, line


# -- ssh fails ------------------------------------------------------------------------------------


def test_ssh_refused_is_one_line_and_exit_9(sshd: Sshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    options = [*sshd.ssh_command]
    options[options.index("-i") + 1] = str(stranger)
    proc = run(tx_ssh(sshd, ["cat"], ssh_command=shlex.join(options)), b"x")
    assert proc.returncode == ExitCode.SSH == 9
    line = one_line(proc.stderr)
    assert re.search(r"ssh root@127\.0\.0\.1 failed: .*Permission denied", line), line
    assert proc.stdout == b""


def test_an_ssh_that_cannot_run_is_one_line_and_exit_9(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["cat"], ssh_command="/nonexistent/ssh"), b"x")
    assert proc.returncode == ExitCode.SSH
    assert "cannot run /nonexistent/ssh" in one_line(proc.stderr)


def test_a_missing_remote_viamillipede_is_one_line_and_exit_9(sshd: Sshd) -> None:
    proc = run(tx_ssh(sshd, ["cat"], remote_vm="/nonexistent/viamillipede"), b"x")
    assert proc.returncode == ExitCode.SSH
    line = one_line(proc.stderr)
    assert "/nonexistent/viamillipede not found on root@127.0.0.1" in line, line
    assert "--remote-viamillipede" in line


def test_a_remote_viamillipede_without_ssh_mode_is_one_line_and_exit_9(
    sshd: Sshd, tmp_path: Path
) -> None:
    old = tmp_path / "old-viamillipede"
    old.write_text("#!/bin/sh\necho \"viamillipede: unknown argument 'ssh-rx'\" >&2\nexit 2\n")
    old.chmod(0o755)
    proc = run(tx_ssh(sshd, ["cat"], remote_vm=str(old)), b"x")
    assert proc.returncode == ExitCode.SSH
    line = one_line(proc.stderr)
    assert "does not know ssh mode" in line and "unknown argument 'ssh-rx'" in line, line


# -- stopping: nothing left behind ----------------------------------------------------------------


def start_slow(sshd: Sshd, port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A transfer from an endless source at 5 MB/s, its remote end on ``port``; returns once
    the remote end listens there.  A session of its own (like a shell's job), so that a
    Ctrl-C reaches the transmitter and its ssh, as a terminal's would."""
    err = (tmp_path / "tx.err").open("wb")
    proc = subprocess.Popen(
        tx_ssh(sshd, ["cat > /dev/null"], "--port", str(port), "limit", "5M"),
        stdin=subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE).stdout,
        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    wait_until(lambda: listening(port) or proc.poll() is not None,
               "the remote end to listen")
    assert proc.poll() is None, (tmp_path / "tx.err").read_text()
    return proc


def assert_nothing_left(port: int) -> None:
    wait_until(lambda: not ssh_rx_processes() and not listening(port),
               f"no remote end and no listener on port {port} (left behind: "
               f"{ssh_rx_processes()})", 10)


def test_ctrl_c_stops_both_ends_and_leaves_nothing(sshd: Sshd, tmp_path: Path) -> None:
    port = free_port()
    proc = start_slow(sshd, port, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the job
    assert proc.wait(WAIT) == ExitCode.INTERRUPTED, (tmp_path / "tx.err").read_text()
    assert_nothing_left(port)
    err = (tmp_path / "tx.err").read_text()
    assert "Traceback" not in err, err


def test_a_lost_ssh_channel_ends_the_remote_end(sshd: Sshd, tmp_path: Path) -> None:
    port = free_port()
    proc = start_slow(sshd, port, tmp_path)
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "ssh"], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    code = proc.wait(WAIT)
    assert code == ExitCode.SSH, (tmp_path / "tx.err").read_text()
    assert "ssh connection to root@127.0.0.1 was lost" in (tmp_path / "tx.err").read_text()
    assert_nothing_left(port)
