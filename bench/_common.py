#!/usr/bin/env python3
"""Helpers shared by the benchmarks in bench/ (standard library only, Linux, Python 3.11+).

The scripts import it as ``_common`` (``python3 bench/x.py`` puts bench/ on sys.path).  Run as a
script it is also the benches' data generator and throttled consumer:

    python3 bench/_common.py feed SIZE [--rate BYTES_PER_S]   # SIZE bytes to stdout
    python3 bench/_common.py drain [--rate BYTES_PER_S]       # read stdin to EOF, report count

Peak RSS of a child is its own ``VmHWM`` polled from /proc/PID/status while it runs, never
``ru_maxrss``: Linux folds the parent's peak into a child's ru_maxrss across fork/exec.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- parsing


def parse_size(text: str) -> int:
    """``1073741824``, ``256M``, ``1G``, ``1GiB``, ``512k``, ``1.5G`` -> bytes (binary suffixes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M, 1G, 1048576)")
    n = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def parse_int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return out


def parse_size_list(text: str) -> list[int]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return x


def human_bytes(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- ports


def tcp_sockets(pid: int | None = None) -> list[tuple[int, str]]:
    """(local port, state hex) of every TCP socket, v4 and v6, in this network namespace, or in
    the namespace of process ``pid`` (/proc/PID/net shows the namespace of that process)."""
    base = "/proc/net" if pid is None else f"/proc/{pid}/net"
    out = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{base}/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3:
                        out.append((int(parts[1].rsplit(":", 1)[1], 16), parts[3]))
        except OSError:
            continue
    return out


def is_listening(port: int, pid: int | None = None) -> bool:
    # Read the kernel's socket table instead of connecting: a probe connection would be a
    # stray client that the receiver has to reject (or, for nc, would eat the one accept).
    return any(p == port and st == LISTEN_STATE for p, st in tcp_sockets(pid))


class PortPool:
    """Hands out base, base+1, ... skipping any port that has a socket in any state (a
    listener, an ephemeral client port, TIME_WAIT leftovers)."""

    def __init__(self, base: int) -> None:
        self.next = base

    def take(self) -> int:
        used = {p for p, _ in tcp_sockets()}
        while self.next in used:
            self.next += 1
        if self.next > 65535:
            raise RuntimeError("ran out of ports; choose a lower --port")
        port, self.next = self.next, self.next + 1
        return port


# --------------------------------------------------------------------------- processes


def status_kib(status: bytes, field: str) -> int:
    """A ``Vm*`` field (VmHWM, VmRSS, ...) out of a /proc/PID/status text, KiB (0 if absent)."""
    m = re.search(rb"^" + field.encode() + rb":\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else 0


def vm_hwm_kib(status: bytes) -> int:
    """VmHWM: the peak RSS of the current address space (its own, not inherited), KiB."""
    return status_kib(status, "VmHWM")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a running process (all its threads) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


class Child:
    """A started process reaped with os.wait4 (never Popen.wait) on its own thread, so that the
    exit time is exact and its CPU time is at hand.

    Peak RSS: the child's own VmHWM, polled from /proc/PID/status while it runs (every 1 ms at
    first, then doubling up to ``SAMPLE_S``): exact but for growth in its last moments.  With
    ``series_s`` it also records ``(time.perf_counter(), VmRSS KiB)`` about every ``series_s``.
    The status file is opened once, right after the exec, and stays bound to this process."""

    SAMPLE_S = 0.02

    def __init__(
        self,
        argv: list[str],
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.DEVNULL,
        series_s: float | None = None,
    ) -> None:
        self.argv = argv
        self.series_s = series_s
        self.series: list[tuple[float, int]] = []
        # Own session/process group: a timeout or Ctrl-C kills whatever the command started.
        self.proc = subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True
        )
        self.pid = self.proc.pid
        self.started_at = time.perf_counter()
        self.exited_at: float | None = None
        self.code: int | None = None
        self.cpu_s = 0.0  # user + system seconds, from wait4, once it has exited
        self.sampled_hwm_kib = 0
        try:
            self._status_fd: int | None = os.open(f"/proc/{self.pid}/status", os.O_RDONLY)
        except OSError:
            self._status_fd = None
        self._thread = threading.Thread(target=self._reap, daemon=True)
        self._thread.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _reap(self) -> None:
        try:
            _, status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:  # somebody else reaped it; should not happen
            self.exited_at = time.perf_counter()
            self.code = -1
            return
        self.exited_at = time.perf_counter()
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.code = os.waitstatus_to_exitcode(status)
        # Tell Popen, so that neither poll() nor its __del__ bookkeeping waits on a reaped pid.
        self.proc.returncode = self.code

    def _sample(self) -> None:
        fd = self._status_fd
        if fd is None:
            return
        delay = 0.001
        next_point = 0.0
        try:
            while self._thread.is_alive():
                try:
                    status = os.pread(fd, 8192, 0)
                except OSError:  # gone
                    break
                self.sampled_hwm_kib = max(self.sampled_hwm_kib, vm_hwm_kib(status))
                if self.series_s is not None:
                    t = time.perf_counter()
                    rss = status_kib(status, "VmRSS")
                    if t >= next_point and rss:
                        self.series.append((t, rss))
                        next_point = t + self.series_s
                self._thread.join(delay)
                delay = min(delay * 2, self.SAMPLE_S)
        finally:
            os.close(fd)

    @property
    def peak_rss_kib(self) -> int:
        self._sampler.join(1)
        return self.sampled_hwm_kib

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cpu_now(self) -> float | None:
        """CPU seconds so far (None once it has been reaped: then use ``cpu_s``)."""
        return proc_cpu_seconds(self.pid) if self.running() else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal its process group (leftovers too, if the command itself has exited)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        if sig == signal.SIGKILL:
            self._thread.join(10)
            self._sampler.join(1)


def wait_listening(port: int, rx: Child, timeout: float, in_its_netns: bool = False) -> str:
    """'' once a LISTEN socket is on ``port`` (in this network namespace, or in ``rx``'s with
    ``in_its_netns``), else why not."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while time.monotonic() < deadline:
        if is_listening(port, rx.pid if in_its_netns else None):
            return ""
        if not rx.running():
            return f"{rx.argv[0]} exited with {rx.code} before listening"
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return f"nothing listening on port {port} after {timeout:.0f}s"


def wait_all(children: list[Child], timeout: float) -> bool:
    """Wait for every child until ``timeout`` seconds from now; True if all have exited."""
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    return not any(c.running() for c in children)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def stderr_tails(paths: dict[str, Path]) -> str:
    """The indented tails of several logs, for a failure message."""
    out = ""
    for label, path in paths.items():
        text = tail(path)
        if text:
            out += f"\n  --- {label} stderr (tail) ---\n" + "\n".join(
                "  " + ln for ln in text.splitlines()
            )
    return out


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder)


# --------------------------------------------------------------------------- feed and drain


def feeder_argv(size: int, rate: float | None = None) -> list[str]:
    """A process writing ``size`` random-ish bytes to its stdout (optionally paced at ``rate``
    bytes/s): slices of a 64 MiB os.urandom buffer at varying offsets, so it costs little CPU."""
    argv = [sys.executable, str(_HERE / "_common.py"), "feed", str(size)]
    return [*argv, "--rate", str(rate)] if rate else argv


def drain_argv(rate: float | None = None) -> list[str]:
    """A process reading its stdin to EOF (paced at ``rate`` bytes/s if given), then printing
    ``{"bytes": N, "seconds": S}`` on its stdout."""
    argv = [sys.executable, str(_HERE / "_common.py"), "drain"]
    return [*argv, "--rate", str(rate)] if rate else argv


class Feed:
    """A feeder process writing into a pipe whose read end becomes a transmitter's stdin.

    ``start()`` returns once the feeder has its buffer ready and bytes are in the pipe, so that
    generating the buffer is not on anybody's clock."""

    def __init__(self, size: int, rate: float | None = None, stderr: Any = None) -> None:
        self.size, self.rate, self.stderr = size, rate, stderr
        self.read_fd = -1
        self.child: Child | None = None

    def argv(self) -> list[str]:
        """The feeder's command line (a subclass may feed something else)."""
        return feeder_argv(self.size, self.rate)

    def start(self, timeout: float = 30.0) -> Feed:
        r, w = os.pipe()
        try:
            self.child = Child(self.argv(), stdout=w, stderr=self.stderr)
        finally:
            os.close(w)
        self.read_fd = r
        deadline = time.monotonic() + timeout
        while pipe_bytes(r) == 0:
            if not self.child.running() or time.monotonic() > deadline:
                raise RuntimeError(f"feeder wrote nothing (exit {self.child.code})")
            time.sleep(0.002)
        return self

    def close_read_end(self) -> None:
        """Call once the transmitter has it (the feeder then sees EPIPE if it dies)."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def kill(self) -> None:
        self.close_read_end()
        if self.child is not None:
            self.child.kill()


def _pace(start: float, done: int, rate: float | None) -> None:
    if rate:
        ahead = start + done / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _feed_main(size: int, rate: float | None) -> int:
    block = MiB
    buf = memoryview(os.urandom(64 * MiB))
    pages = (len(buf) - block) // 4096
    out = sys.stdout.fileno()
    done, k = 0, 0
    start = time.monotonic()
    try:
        while done < size:
            off = (k * 7919 % pages) * 4096  # a prime stride: the stream doesn't repeat at 64M
            k += 1
            view = buf[off : off + min(block, size - done)]
            while view:
                n = os.write(out, view)
                view = view[n:]
                done += n
            _pace(start, done, rate)
    except BrokenPipeError:
        print(f"feed: reader went away after {done} bytes", file=sys.stderr)
        return 1
    return 0


def _drain_main(rate: float | None) -> int:
    buf = bytearray(MiB if not rate else min(MiB, max(4096, int(rate / 100))))
    fd = sys.stdin.fileno()
    done = 0
    start = 0.0
    while n := os.readv(fd, [buf]):
        if not done:
            start = time.monotonic()  # the pace counts from the first byte, not from launch
        done += n
        _pace(start, done, rate)
    seconds = time.monotonic() - start if done else 0.0
    print(json.dumps({"bytes": done, "seconds": seconds}), flush=True)
    return 0


class Rig:
    """The processes of one run, as a context manager.

    ``start`` runs a command with its stderr in a log file of its own; ``start_feed`` a Feed.
    On exit every process group is killed, the logs' tails are appended to ``error`` unless
    the run was marked ``ok``, and the logs are removed.  Use: ``with Rig(dir, tag) as rig:``
    ... ``rig.ok = True``; then read ``rig.error``."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.workdir, self.tag = workdir, tag
        self.children: dict[str, Child] = {}
        self.logs: dict[str, Path] = {}
        self.feed: Feed | None = None
        self.ok = False
        self.error = ""

    def _log(self, name: str) -> Path:
        self.logs[name] = self.workdir / f"{self.tag}-{name}.err"
        return self.logs[name]

    def start(self, name: str, argv: list[str], **kw: Any) -> Child:
        with open(self._log(name), "wb") as err:
            child = Child(argv, stderr=err, **kw)
        self.children[name] = child
        return child

    def start_feed(self, size: int, rate: float | None = None,
                   kind: type[Feed] | None = None, **options: Any) -> Feed:
        """Start the feeder (``kind``, a Feed by default, with ``options``)."""
        with open(self._log("feed"), "wb") as err:
            self.feed = (kind or Feed)(size, rate, stderr=err, **options)
            try:
                self.feed.start()
            finally:
                if self.feed.child is not None:
                    self.children["feed"] = self.feed.child
        return self.feed

    def wait(self, timeout: float, *names: str) -> bool:
        """Wait for the named processes; False (with ``error`` set) on a timeout."""
        if wait_all([self.children[n] for n in names], timeout):
            return True
        self.error = f"timeout after {timeout:.0f}s"
        return False

    def exit_error(self) -> str:
        """'' when every process exited 0 (those still running get 5 s), else which did not."""
        bad = [f"{name}={c.code if c.join(5) else 'running'}"
               for name, c in self.children.items() if not c.join(5) or c.code != 0]
        return "exit codes " + " ".join(bad) if bad else ""

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.feed is not None:
            self.feed.close_read_end()
        for child in self.children.values():
            child.kill()
        if not self.ok:
            self.error += stderr_tails(self.logs)
        for path in self.logs.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass
class Config:
    """One configuration of a bench: a receiver and a transmitter command line, with
    ``{port}`` placeholders, and its runs."""

    name: str
    rx: list[str]
    tx: list[str]
    runs: list[Any] = field(default_factory=list)
    #: A third process for the run, if any (loopback.py --floor).
    companion: list[str] | None = None

    def argv(self, which: str, port: int) -> list[str]:
        return [a.format(port=port) for a in (self.rx if which == "rx" else self.tx)]


@dataclass
class RunStats:
    """One run of a Config: whether it worked, and what it measured."""

    round: int
    ok: bool = False
    seconds: float = 0.0
    mbps: float = 0.0  # MB = 10^6 bytes
    cpu_tx: float = 0.0  # % of one CPU over the run
    cpu_rx: float = 0.0
    rss_tx_mib: float = 0.0  # peak (VmHWM)
    rss_rx_mib: float = 0.0
    error: str = ""

    def measure(self, tx: Child, rx: Child, t0: float, size: int) -> None:
        """From ``t0`` until both have exited: seconds, MB/s, CPU and peak RSS of both."""
        assert tx.exited_at is not None and rx.exited_at is not None
        self.seconds = max(tx.exited_at, rx.exited_at) - t0
        self.mbps = size / self.seconds / 1e6
        self.cpu_tx = 100 * tx.cpu_s / self.seconds
        self.cpu_rx = 100 * rx.cpu_s / self.seconds
        self.rss_tx_mib, self.rss_rx_mib = tx.peak_rss_mib, rx.peak_rss_mib


RESOURCE_HEAD = f" {'tx CPU':>6} {'rx CPU':>6} {'RSS tx':>7} {'RSS rx':>7}"


def resource_cells(runs: list[RunStats]) -> str:
    """The medians under RESOURCE_HEAD: CPU % of each end, peak RSS MiB of each end."""
    return (f" {median([r.cpu_tx for r in runs]):>5.0f}% {median([r.cpu_rx for r in runs]):>5.0f}%"
            f" {median([r.rss_tx_mib for r in runs]):>7.1f}"
            f" {median([r.rss_rx_mib for r in runs]):>7.1f}")


def interleave(configs: list[Any], rounds: int, run_one: Callable[[Any, int], Any],
               progress: Callable[[Any], str], quiet: bool = False) -> bool:
    """Round r runs every config once (``run_one(cfg, r)``, appended to ``cfg.runs``), then
    round r+1 starts, so slow drift of the machine hits every config alike.  Prints a line per
    run on stderr (``progress(run)`` for a good one); returns True if any run failed."""
    w = max(len(c.name) for c in configs)
    failed = False
    for rnd in range(1, rounds + 1):
        for cfg in configs:
            run = run_one(cfg, rnd)
            cfg.runs.append(run)
            if not run.ok:
                failed = True
                print(f"[round {rnd}] {cfg.name} FAILED: {run.error}", file=sys.stderr)
            elif not quiet:
                print(f"[round {rnd}] {cfg.name:<{w}} {progress(run)}", file=sys.stderr)
    return failed


def interleave_and_report(configs: list[Any], rounds: int, run_one: Callable[[Any, int], Any],
                          progress: Callable[[Any], str], report: Callable[[], None],
                          quiet: bool = False) -> int:
    """:func:`interleave`, then ``report()``; the exit status (1 if a run failed).  Ctrl-C
    still reports what has run so far, and gives 130."""
    try:
        failed = interleave(configs, rounds, run_one, progress, quiet)
        print()
        report()
    except KeyboardInterrupt:
        print("\ninterrupted; partial results:", file=sys.stderr)
        if configs:
            report()
        return 130
    return 1 if failed else 0


def keep_input(input_path: Path, directory: Path, size: int) -> None:
    """``--keep``: move a generated input where the next run (same size) finds it again."""
    if input_path.exists():
        kept = directory / f"viamillipede-bench-input-{size}.bin"
        input_path.replace(kept)
        print(f"# input kept at {kept}", file=sys.stderr)


# --------------------------------------------------------------------------- tools, header


def add_run_args(ap: argparse.ArgumentParser, *, timeout_default: str,
                 verbose_help: str = "per-round numbers") -> None:
    """The options every bench that starts viamillipede processes shares."""
    ap.add_argument("--viamillipede", default=None,
                    help="viamillipede command (shell-split; default: next to sys.executable, "
                    "else on PATH)")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"seconds before a run is killed and marked failed ({timeout_default})")
    ap.add_argument("--listen-timeout", type=float, default=20.0,
                    help="seconds to wait for a receiver's LISTEN socket; default 20")
    ap.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def default_viamillipede() -> str | None:
    beside = Path(sys.executable).parent / "viamillipede"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("viamillipede")


def resolve_viamillipede(spec: str | None, prog: str) -> list[str]:
    """The viamillipede command line (``--viamillipede`` or the default); exits 2 if none."""
    spec = spec or default_viamillipede()
    if spec is None:
        sys.exit(f"{prog}: no viamillipede found (give --viamillipede CMD)")
    return shlex.split(spec)


def require(tool: str, prog: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"{prog}: {tool!r} not found")


def tool_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(
            [*argv, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0] if p.returncode == 0 and text else f"? (--version exited {p.returncode})"


def print_header(title: str, vm: list[str] | None, nc: str | None = "nc") -> None:
    print(f"# {title}")
    print(
        f"# {platform.node()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    if vm is not None:
        print(f"# viamillipede: {shlex.join(vm)} ({tool_version(vm)})")
    if nc is not None:
        print(f"# nc: {shutil.which(nc)}")
    sys.stdout.flush()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def unwind_on_signals() -> None:
    """Children run in their own sessions (so that a run can be killed as a group); make
    SIGTERM, SIGHUP and an inherited-ignored SIGINT all unwind through the cleanup code."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The benches' data generator and consumer.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("feed", help="write SIZE random-ish bytes to stdout")
    f.add_argument("size", type=parse_size)
    f.add_argument("--rate", type=positive_float, default=None, help="bytes per second")
    d = sub.add_parser("drain", help="read stdin to EOF; print the count as JSON")
    d.add_argument("--rate", type=positive_float, default=None, help="bytes per second")
    args = ap.parse_args(argv)
    if args.cmd == "feed":
        return _feed_main(args.size, args.rate)
    return _drain_main(args.rate)


if __name__ == "__main__":
    sys.exit(main())
