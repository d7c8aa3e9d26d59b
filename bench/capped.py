#!/usr/bin/env python3
"""Throughput through a path that caps every TCP connection at R MB/s, against nc.

A small forwarder (in this script: ``capped.py forward``) listens on one port and forwards
each accepted connection to the real receiver, through a token bucket per connection and
direction.  That models a path on which one flow is window- or loss-limited, so that only
parallel connections can fill it: viamillipede with N connections should reach N x R, nc (one
connection) R.  The forwarder moves bytes with splice(2) (no copy through Python) and its CPU
time is reported, so a reader can see whether the forwarder was the bottleneck.

    python3 bench/capped.py                          # R = 20 MB/s, threads 1,2,4,8,16, 3 rounds
    python3 bench/capped.py --rate 10 --threads 1,4 --rounds 1 --size 64M
    python3 bench/capped.py forward --listen 9000 --to 8834 --rate 20   # just the forwarder

Standard library only; Linux.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    RESOURCE_HEAD,
    Config,
    MiB,
    PortPool,
    Rig,
    RunStats,
    add_run_args,
    human_bytes,
    interleave_and_report,
    median,
    parse_int_list,
    parse_size,
    positive_float,
    print_header,
    proc_cpu_seconds,
    require,
    resolve_viamillipede,
    resource_cells,
    unwind_on_signals,
    wait_listening,
)

MB = 1e6
TARGET = 0.9  # acceptance: N connections reach >= 0.9 x N x R

# --------------------------------------------------------------------------- the forwarder


class Bucket:
    """A token bucket: ``pay(n)`` after taking n bytes sleeps until the bucket can afford them.

    Paying after reading (instead of asking before) never waits on a half-empty read; in the
    long run at most ``burst + rate x t`` bytes pass in t seconds."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def pay(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


class Forwarder:
    """Accepts connections on ``listen`` and forwards each to ``host:to``, every direction of
    every connection through its own Bucket.  One line of JSON per closed connection goes to
    stdout; SIGTERM prints a summary and exits."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.read_size = max(4096, min(64 * 1024, int(args.burst)))
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.bytes_up = 0

    def log(self, record: dict[str, object]) -> None:
        """One JSON line on stdout, whole: print() from several threads can interleave."""
        with self.out_lock:
            os.write(sys.stdout.fileno(), (json.dumps(record) + "\n").encode())

    def serve(self) -> None:
        a = self.args
        srv = socket.create_server((a.host, a.listen), backlog=128)
        while True:
            conn, _ = srv.accept()
            with self.lock:
                self.accepted += 1
                self.open += 1
                index = self.accepted
            threading.Thread(target=self.handle, args=(conn, index), daemon=True).start()

    def handle(self, client: socket.socket, index: int) -> None:
        a = self.args
        t0 = time.monotonic()
        moved = [0, 0]
        try:
            upstream = socket.create_connection((a.host, a.to), timeout=10)
            upstream.settimeout(None)
        except OSError as exc:
            self.log({"conn": index, "error": f"connect: {exc}"})
            client.close()
            with self.lock:
                self.open -= 1
            return
        for s in (client, upstream):  # a router doesn't hold back small segments either
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        down = threading.Thread(
            target=self.pump, args=(upstream, client, moved, 1), daemon=True
        )
        down.start()
        self.pump(client, upstream, moved, 0)
        down.join()
        client.close()
        upstream.close()
        seconds = time.monotonic() - t0
        with self.lock:
            self.open -= 1
            self.bytes_up += moved[0]
        line = {"conn": index, "up": moved[0], "down": moved[1], "seconds": round(seconds, 4)}
        self.log(line)

    def pump(self, src: socket.socket, dst: socket.socket, moved: list[int], i: int) -> None:
        """src -> dst until EOF (then half-close dst), at most ``rate`` bytes/s."""
        bucket = Bucket(self.args.rate, self.args.burst)
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.read_size)
        try:
            while True:
                n = os.splice(src.fileno(), w, self.read_size)
                if n == 0:
                    break
                bucket.pay(n)
                left = n
                while left:
                    left -= os.splice(r, dst.fileno(), left)
                moved[i] += n
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # a reset on either side: take both down, so both peers notice
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            os.close(r)
            os.close(w)

    def summary(self) -> dict[str, object]:
        # No lock: this runs in a signal handler, maybe while the main thread holds it.
        return {"summary": True, "accepted": self.accepted, "open": self.open,
                "bytes_up": self.bytes_up}


def forward_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="capped.py forward",
        description="Forward every TCP connection accepted on --listen to --to, capping each "
        "direction of each connection at --rate MB/s (token bucket). One JSON line per closed "
        "connection on stdout; SIGTERM prints a summary line and exits.",
    )
    ap.add_argument("--listen", type=int, required=True, help="port to accept on")
    ap.add_argument("--to", type=int, required=True, help="port to forward to")
    ap.add_argument("--host", default="127.0.0.1", help="address of both; default 127.0.0.1")
    ap.add_argument("--rate", type=positive_float, default=20.0, help="MB/s per connection")
    ap.add_argument("--burst", type=parse_size, default=128 * 1024, help="bucket size")
    args = ap.parse_args(argv)
    args.rate *= MB
    fwd = Forwarder(args)

    def stop(signum: int, frame: object) -> None:
        fwd.log(fwd.summary())
        os._exit(0)  # the pump threads are blocked in splice; don't wait for them

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fwd.serve()
    return 0


# --------------------------------------------------------------------------- the bench


@dataclass
class CappedConfig(Config):
    conns: int = 1  # connections the tool opens


@dataclass
class Run(RunStats):
    cpu_fwd: float = 0.0  # % of one CPU over the run
    conn_mbps: list[float] = field(default_factory=list)  # per forwarded connection, upstream


def build_configs(args: argparse.Namespace, vm: list[str]) -> list[CappedConfig]:
    configs = [CappedConfig("nc", ["nc", "-l", "127.0.0.1", "{port}"],
                            ["nc", "-N", "127.0.0.1", "{port}"], conns=1)]
    for t in args.threads:
        extra = ["threads", str(t)]
        if args.checksum:
            extra.append("checksum")
        configs.append(
            CappedConfig(f"viamillipede t{t}", [*vm, "rx", "{port}", *extra],
                         [*vm, "tx", "127.0.0.1", "{port}", *extra], conns=t)
        )
    return configs


def run_once(cfg: CappedConfig, rnd: int, ports: PortPool, args: argparse.Namespace,
             workdir: Path) -> Run:
    run = Run(rnd)
    size = args.size * cfg.conns
    rport, fport = ports.take(), ports.take()
    fwd_out = workdir / f"fwd-{rport}.out"
    with Rig(workdir, str(rport)) as rig, open(fwd_out, "wb") as ofwd:
        rx = rig.start("rx", cfg.argv("rx", rport))
        fwd = rig.start("forwarder", [sys.executable, __file__, "forward", "--listen",
                                      str(fport), "--to", str(rport), "--rate", str(args.rate),
                                      "--burst", str(args.burst)], stdout=ofwd)
        for port, child in ((rport, rx), (fport, fwd)):
            if why := wait_listening(port, child, args.listen_timeout):
                rig.error = why
                break
        else:
            feed = rig.start_feed(size)
            cpu0 = proc_cpu_seconds(fwd.pid) or 0.0
            t0 = time.perf_counter()
            tx = rig.start("tx", cfg.argv("tx", fport), stdin=feed.read_fd)
            feed.close_read_end()
            if rig.wait(args.timeout, "tx", "rx"):
                run.measure(tx, rx, t0, size)
                cpu1 = proc_cpu_seconds(fwd.pid) or cpu0
                time.sleep(0.05)  # the forwarder logs each connection when both ends closed
                fwd.kill(signal.SIGTERM)
                rig.error = rig.exit_error()
                rig.ok = not rig.error
    run.ok, run.error = rig.ok, rig.error
    if run.ok:
        run.cpu_fwd = 100 * (cpu1 - cpu0) / run.seconds
        for line in fwd_out.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # not expected since lines are written whole; don't die of it
                continue
            if rec.get("up") and rec.get("seconds"):
                run.conn_mbps.append(rec["up"] / rec["seconds"] / MB)
    fwd_out.unlink()
    return run


def report(configs: list[CappedConfig], args: argparse.Namespace) -> None:
    rate = args.rate
    w = max(len(c.name) for c in configs)
    nc_ok = [r.mbps for r in configs[0].runs if r.ok]
    nc_med = median(nc_ok) if nc_ok else None
    head = (
        f"{'config':<{w}} {'conns':>5} {'N x R':>7} {'MB/s':>8} {'min':>7} {'max':>7}"
        f" {'of NxR':>7} {'vs nc':>6} {'fwd CPU':>7}{RESOURCE_HEAD} {'ok':>4}  target"
    )
    print(head)
    print("-" * len(head))
    for cfg in configs:
        ok = [r for r in cfg.runs if r.ok]
        n = f"{len(ok)}/{len(cfg.runs)}"
        cap = cfg.conns * rate
        if not ok:
            print(f"{cfg.name:<{w}} {cfg.conns:>5} {cap:>7.0f} {'failed':>8}{'':>73} {n:>4}")
            continue
        speeds = [r.mbps for r in ok]
        med = median(speeds)
        ratio = f"{med / nc_med:.2f}x" if nc_med else "-"
        verdict = "PASS" if med >= TARGET * cap else "FAIL"
        print(
            f"{cfg.name:<{w}} {cfg.conns:>5} {cap:>7.0f} {med:>8.1f} {min(speeds):>7.1f}"
            f" {max(speeds):>7.1f} {med / cap:>7.2f} {ratio:>6}"
            f" {median([r.cpu_fwd for r in ok]):>6.0f}%{resource_cells(ok)} {n:>4}  {verdict}"
        )
    print(
        f"\nN x R: the path's capacity, N connections at R = {rate:g} MB/s each.  Target: MB/s >= "
        f"{TARGET} x N x R.  CPU: % of one CPU over the run ({os.cpu_count()} CPUs here); a "
        "forwarder near 100% (or the machine's CPUs all busy) means the bench, not the tool, "
        "was the limit.  RSS: peak MiB."
    )
    if args.verbose:
        print("\nper round: MB/s, seconds, per-connection MB/s min-max (from the forwarder):")
        for cfg in configs:
            for r in cfg.runs:
                if not r.ok:
                    print(f"  {cfg.name:<{w}} r{r.round}: FAILED")
                    continue
                per = (f"{min(r.conn_mbps):.1f}-{max(r.conn_mbps):.1f} over "
                       f"{len(r.conn_mbps)} conns") if r.conn_mbps else "-"
                print(f"  {cfg.name:<{w}} r{r.round}: {r.mbps:.1f} MB/s {r.seconds:.2f}s  {per}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="viamillipede with 1..N connections and nc through a forwarder that caps "
        "every connection at R MB/s (a path where one flow is window- or loss-limited). "
        "Interleaved rounds, medians, MB = 10^6 bytes. `capped.py forward --help` describes "
        "the forwarder on its own. See bench/README.md.",
    )
    ap.add_argument("--rate", type=positive_float, default=20.0,
                    help="cap per connection and direction, MB/s; default 20")
    ap.add_argument("--burst", type=parse_size, default=128 * 1024,
                    help="token bucket size per connection; default 128K")
    ap.add_argument("--size", type=parse_size, default=256 * MiB,
                    help="bytes per connection: a run with N connections carries N x SIZE, so "
                    "every run lasts about SIZE / R (13.4 s at the defaults); default 256M")
    ap.add_argument("--threads", type=parse_int_list, default=[1, 2, 4, 8, 16],
                    help="viamillipede connection counts; default 1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (interleaved); default 3")
    ap.add_argument("--checksum", action="store_true", help="run viamillipede with checksum")
    ap.add_argument("--port", type=int, default=24400, help="base port; default 24400")
    add_run_args(ap, timeout_default="default 60 + 3 x SIZE / R",
                 verbose_help="per-round numbers and per-connection rates")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.timeout is None:
        args.timeout = 60 + 3 * args.size / (args.rate * MB)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forward"]:
        return forward_main(argv[1:])
    args = parse_args(argv)
    unwind_on_signals()
    require("nc", "capped")
    vm = resolve_viamillipede(args.viamillipede, "capped")
    configs = build_configs(args, vm)
    print_header(
        f"capped-path bench: every connection capped at {args.rate:g} MB/s (burst "
        f"{human_bytes(args.burst)}); {human_bytes(args.size)} per connection per run, "
        f"{args.rounds} round(s) interleaved, sink /dev/null", vm)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-capped-"))
    ports = PortPool(args.port)
    try:
        return interleave_and_report(
            configs, args.rounds, lambda cfg, rnd: run_once(cfg, rnd, ports, args, workdir),
            lambda run: f"{run.mbps:8.1f} MB/s ({run.seconds:.1f}s), forwarder CPU "
            f"{run.cpu_fwd:.0f}%", lambda: report(configs, args), args.quiet)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
