#!/usr/bin/env python3
"""Time to move one byte end to end, viamillipede against nc.

One run: start the receiver and wait (untimed) until it listens; then start the clock, start
the transmitter with one byte on its stdin (a pipe holding ``x``, as in ``printf x | ...``)
and stop the clock when both processes have exited.  The output must be exactly ``x``.  This
is what a tiny transfer costs: process start-up and imports of the sender, connecting, the
handshake, and the orderly close on both ends.

    nc:           nc -l 127.0.0.1 P > out     then   printf x | nc -N 127.0.0.1 P
    viamillipede: viamillipede rx P > out     then   printf x | viamillipede tx 127.0.0.1 P

The ``--version`` row is a reference, not a transfer: how long ``viamillipede --version``
takes from start to exit (interpreter start-up and imports).

    python3 bench/latency.py                   # 20 runs each, threads 1 and 4
    python3 bench/latency.py --runs 50 --threads 1,8

Standard library only; Linux.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    PortPool,
    Rig,
    median,
    parse_int_list,
    print_header,
    require,
    resolve_viamillipede,
    unwind_on_signals,
    wait_listening,
)


@dataclass
class Config:
    name: str
    rx: list[str] | None  # None: a reference command, no receiver
    tx: list[str]
    ms: list[float] = field(default_factory=list)
    failures: int = 0


def one_byte_stdin() -> int:
    r, w = os.pipe()
    os.write(w, b"x")
    os.close(w)
    return r


def run_once(cfg: Config, port: int, workdir: Path, timeout: float) -> tuple[float, str]:
    """(milliseconds, '') or (0, why it failed)."""
    out = workdir / f"out-{port}"
    ms = 0.0
    stdin = one_byte_stdin()
    with Rig(workdir, str(port)) as rig, open(out, "wb") as sink:
        names = ["tx"]
        if cfg.rx is not None:
            names.append("rx")
            rx = rig.start("rx", [a.format(port=port) for a in cfg.rx], stdout=sink)
            if why := wait_listening(port, rx, 20):
                rx.join(1)
                rig.error = why
        if not rig.error:
            t0 = time.perf_counter()
            rig.start("tx", [a.format(port=port) for a in cfg.tx], stdin=stdin,
                      stdout=sink if cfg.rx is None else subprocess.DEVNULL)
            if rig.wait(timeout, *names):
                ms = (max(rig.children[n].exited_at or 0.0 for n in names) - t0) * 1000
                rig.error = rig.exit_error()
                if not rig.error and cfg.rx is not None and (got := out.read_bytes()) != b"x":
                    rig.error = f"output {got[:20]!r}, expected b'x'"
                rig.ok = not rig.error
    os.close(stdin)
    out.unlink()
    return (ms, "") if rig.ok else (0.0, rig.error)


def report(configs: list[Config]) -> None:
    w = max(len(c.name) for c in configs)
    nc = median(configs[0].ms) if configs[0].ms else None
    head = f"{'config':<{w}} {'median ms':>9} {'min':>7} {'max':>7} {'vs nc':>7} {'ok':>7}"
    print(head)
    print("-" * len(head))
    for cfg in configs:
        n = f"{len(cfg.ms)}/{len(cfg.ms) + cfg.failures}"
        if not cfg.ms:
            print(f"{cfg.name:<{w}} {'failed':>9}{'':>24} {n:>7}")
            continue
        med = median(cfg.ms)
        ratio = f"{med / nc:.1f}x" if nc else "-"
        print(f"{cfg.name:<{w}} {med:>9.1f} {min(cfg.ms):>7.1f} {max(cfg.ms):>7.1f} {ratio:>7}"
              f" {n:>7}")
    print("\nms: from starting the transmitter (receiver already listening) until both have "
          "exited; 'vs nc': times nc's median (higher is slower).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time to move 1 byte end to end (receiver already listening -> "
        "transmitter start -> both exited), viamillipede against nc, interleaved runs, "
        "medians. See bench/README.md.",
    )
    ap.add_argument("--runs", type=int, default=20, help="runs per config; default 20")
    ap.add_argument("--threads", type=parse_int_list, default=[1, 4],
                    help="viamillipede thread counts; default 1,4")
    ap.add_argument("--port", type=int, default=27400, help="base port; default 27400")
    ap.add_argument("--viamillipede", default=None,
                    help="viamillipede command (shell-split; default: next to sys.executable, "
                    "else on PATH)")
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds before a run is killed; default 30")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run's time")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    require(args.nc, "latency")
    vm = resolve_viamillipede(args.viamillipede, "latency")
    print_header(f"latency bench: 1 byte over loopback, {args.runs} interleaved runs per config",
                 vm, args.nc)
    configs = [Config("nc", [args.nc, "-l", "127.0.0.1", "{port}"],
                      [args.nc, "-N", "127.0.0.1", "{port}"])]
    for t in args.threads:
        configs.append(Config(f"viamillipede t{t}", [*vm, "rx", "{port}", "threads", str(t)],
                              [*vm, "tx", "127.0.0.1", "{port}", "threads", str(t)]))
    configs.append(Config("viamillipede --version", None, [*vm, "--version"]))
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-latency-"))
    ports = PortPool(args.port)
    try:
        for i in range(args.runs):
            for cfg in configs:
                ms, why = run_once(cfg, ports.take(), workdir, args.timeout)
                if why:
                    cfg.failures += 1
                    print(f"[run {i + 1}] {cfg.name} FAILED: {why}", file=sys.stderr)
                else:
                    cfg.ms.append(ms)
                    if args.verbose:
                        print(f"[run {i + 1}] {cfg.name}: {ms:.1f} ms", file=sys.stderr)
        print()
        report(configs)
    except KeyboardInterrupt:
        print("\ninterrupted; partial results:", file=sys.stderr)
        report(configs)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(c.failures for c in configs) else 0


if __name__ == "__main__":
    sys.exit(main())
