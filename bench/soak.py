#!/usr/bin/env python3
"""Memory over a long stream, and under a slow consumer: does RSS stay flat?

(a) A 10 GiB stream on loopback, generated on the fly by a feeder process (slices of a 64 MiB
    random buffer) into ``viamillipede tx``; the receiver writes to /dev/null.
(b) About 1 GiB to a consumer throttled to 40 MB/s (``rx`` stdout piped into a reader that
    paces itself), so back-pressure, not the network, sets the pace.  Peak RSS must stay below
    ``64 MiB + threads x chunk size x 3`` (88 MiB at the defaults: 4 threads, 2 MiB chunks).

The RSS (VmRSS) of both ends is sampled every second; the report gives min / median / max
over time, the peak (VmHWM), and the median of the first window against the last (a minute
each, or a third of the run when it is shorter than three minutes).

    python3 bench/soak.py                       # both parts: 10 GiB, then 1 GiB at 40 MB/s
    python3 bench/soak.py --part a --size-a 2G
    python3 bench/soak.py --part a --rate-a 50  # a paced feeder: a longer soak (MB/s)
    python3 bench/soak.py --part b --size-b 256M --threads 8

Standard library only; Linux.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    Child,
    MiB,
    PortPool,
    Rig,
    drain_argv,
    human_bytes,
    median,
    parse_size,
    positive_float,
    print_header,
    resolve_viamillipede,
    unwind_on_signals,
    wait_listening,
)

MB = 1e6
CHUNK = 2 * MiB  # the tool's default chunk size
ALLOWANCE = 64 * MiB  # interpreter, libraries, buffers other than chunks


@dataclass
class Result:
    part: str
    size: int
    ok: bool = False
    seconds: float = 0.0
    t0: float = 0.0  # perf_counter when the transmitter started
    mbps: float = 0.0
    tx: Child | None = None
    rx: Child | None = None
    notes: list[str] = field(default_factory=list)
    error: str = ""


def soak(part: str, size: int, args: argparse.Namespace, vm: list[str], port: int,
         workdir: Path, feed_rate: float | None, drain_rate: float | None) -> Result:
    res = Result(part, size)
    with Rig(workdir, part) as rig:
        _soak(rig, res, args, vm, port, feed_rate, drain_rate)
    res.ok, res.error = rig.ok, rig.error
    return res


def _soak(rig: Rig, res: Result, args: argparse.Namespace, vm: list[str], port: int,
          feed_rate: float | None, drain_rate: float | None) -> None:
    extra = ["threads", str(args.threads)] + (["checksum"] if args.checksum else [])
    rx_argv = [*vm, "rx", str(port), *extra]
    drain: Child | None = None
    if drain_rate:  # rx | drain
        r, w = os.pipe()
        try:
            drain = rig.start("consumer", drain_argv(drain_rate), stdin=r, stdout=subprocess.PIPE)
            rx = rig.start("rx", rx_argv, stdout=w, series_s=args.interval)
        finally:
            os.close(r)
            os.close(w)
    else:
        rx = rig.start("rx", rx_argv, series_s=args.interval)
    res.rx = rx
    if why := wait_listening(port, rx, 20):
        rig.error = why
        return
    feed = rig.start_feed(res.size, feed_rate)
    res.t0 = time.perf_counter()
    res.tx = tx = rig.start("tx", [*vm, "tx", "127.0.0.1", str(port), *extra],
                            stdin=feed.read_fd, series_s=args.interval)
    feed.close_read_end()
    expect = res.size / min(x for x in (feed_rate, drain_rate, 100 * MB) if x)
    if not rig.wait(args.timeout or 120 + 3 * expect, "tx", "rx"):
        return
    assert tx.exited_at is not None and rx.exited_at is not None
    res.seconds = max(tx.exited_at, rx.exited_at) - res.t0
    res.mbps = res.size / res.seconds / MB
    rig.error = rig.exit_error()
    if drain is not None and not rig.error:
        assert drain.proc.stdout is not None
        got = json.loads(drain.proc.stdout.read())["bytes"]
        if got != res.size:
            rig.error = f"consumer read {got} bytes, sent {res.size}"
            return
        res.notes.append(f"consumer read all {got} bytes")
    rig.ok = not rig.error


def rss_table(res: Result, args: argparse.Namespace, bound_mib: float | None) -> bool:
    """Print the RSS-over-time table of both ends; True when both are flat (and in bound).

    Time counts from the transmitter's start.  The first and last ``edge`` seconds (start-up,
    and the close when the buffers drain) are left out of min/median/max and of the windows;
    the peak (VmHWM) covers everything."""
    good = True
    edge = min(5.0, 0.1 * res.seconds)
    lo, hi = edge, res.seconds - edge
    window = 60.0 if hi - lo >= 180 else (hi - lo) / 3
    print(f"RSS in MiB, sampled every {args.interval:g}s from {lo:.1f}s to {hi:.1f}s of the run;"
          f" first/last: median of the first/last {window:.1f}s of that; peak: VmHWM")
    head = (f"{'':<7} {'samples':>7} {'min':>7} {'median':>7} {'max':>7} {'peak':>7}"
            f" {'first':>7} {'last':>7} {'delta':>7}  verdict")
    print(head)
    for label, child in (("tx", res.tx), ("rx", res.rx)):
        if child is None:
            continue
        pts = [(t - res.t0, k / 1024) for t, k in child.series if lo <= t - res.t0 <= hi]
        if not pts:
            print(f"{label:<7} no samples in the steady part (run longer)")
            good = False
            continue
        mib = [m for _, m in pts]
        first = [m for t, m in pts if t <= lo + window] or mib[:1]
        last = [m for t, m in pts if t >= hi - window] or mib[-1:]
        delta = median(last) - median(first)
        flat = abs(delta) <= args.flat_tolerance / MiB
        peak = child.peak_rss_mib
        verdict = "flat" if flat else "GROWING" if delta > 0 else "shrinking"
        if bound_mib is not None:
            inside = peak <= bound_mib
            verdict += f", peak {'<=' if inside else '>'} bound {bound_mib:.0f}"
            good &= inside
        good &= flat
        print(f"{label:<7} {len(pts):>7} {min(mib):>7.1f} {median(mib):>7.1f} {max(mib):>7.1f}"
              f" {peak:>7.1f} {median(first):>7.1f} {median(last):>7.1f} {delta:>+7.1f}  {verdict}")
    if args.verbose:
        print("  t(s)   tx RSS   rx RSS  (every sample, start-up and close included)")
        rx = {round(t - res.t0): k for t, k in res.rx.series} if res.rx else {}
        for t, k in res.tx.series if res.tx else []:
            other = rx.get(round(t - res.t0))
            print(f"  {t - res.t0:5.1f} {k / 1024:8.1f} "
                  f"{other / 1024 if other else float('nan'):8.1f}")
    return good


def report(res: Result, args: argparse.Namespace, bound_mib: float | None) -> bool:
    if not res.ok:
        print(f"FAILED: {res.error}")
        return False
    print(f"{res.size / MB:.0f} MB in {res.seconds:.1f}s = {res.mbps:.1f} MB/s, both exited 0"
          + "".join(f"; {n}" for n in res.notes))
    good = rss_table(res, args, bound_mib)
    sys.stdout.flush()
    return good


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Soak: RSS of both ends over (a) a long loopback stream and (b) a stream "
        "to a consumer throttled to 40 MB/s, sampled every second; flat or not, and peak "
        "against the memory bound. MB = 10^6 bytes. See bench/README.md.",
    )
    ap.add_argument("--part", choices=["a", "b", "both"], default="both",
                    help="a: long stream; b: slow consumer; default both")
    ap.add_argument("--size-a", type=parse_size, default=10 << 30,
                    help="bytes for part a; default 10G")
    ap.add_argument("--rate-a", type=positive_float, default=None,
                    help="pace part a's feeder at this many MB/s (a longer soak); default: "
                    "as fast as it goes")
    ap.add_argument("--size-b", type=parse_size, default=1 << 30,
                    help="bytes for part b; default 1G")
    ap.add_argument("--rate-b", type=positive_float, default=40.0,
                    help="part b's consumer rate, MB/s; default 40")
    ap.add_argument("--threads", type=int, default=4, help="viamillipede threads; default 4")
    ap.add_argument("--checksum", action="store_true", help="run viamillipede with checksum")
    ap.add_argument("--interval", type=positive_float, default=1.0,
                    help="RSS sampling interval, seconds; default 1")
    ap.add_argument("--flat-tolerance", type=parse_size, default=4 * MiB,
                    help="largest last-minus-first median change still called flat; default 4M")
    ap.add_argument("--port", type=int, default=26400, help="base port; default 26400")
    ap.add_argument("--viamillipede", default=None,
                    help="viamillipede command (shell-split; default: next to sys.executable, "
                    "else on PATH)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds before a part is killed (default 120 + 3 x its expected "
                    "time at 100 MB/s or its pace)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every RSS sample")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    vm = resolve_viamillipede(args.viamillipede, "soak")
    print_header(f"soak bench: threads {args.threads}, chunk {human_bytes(CHUNK)} (default)", vm,
                 nc=None)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-soak-"))
    ports = PortPool(args.port)
    all_good = True
    try:
        if args.part in ("a", "both"):
            pace = f" fed at {args.rate_a:g} MB/s" if args.rate_a else ""
            print(f"\n(a) {human_bytes(args.size_a)} over loopback{pace}, rx > /dev/null")
            sys.stdout.flush()
            res = soak("a", args.size_a, args, vm, ports.take(), workdir,
                       args.rate_a * MB if args.rate_a else None, None)
            all_good &= report(res, args, None)
        if args.part in ("b", "both"):
            bound = ALLOWANCE + args.threads * CHUNK * 3
            print(f"\n(b) {human_bytes(args.size_b)} to a consumer reading {args.rate_b:g} MB/s;"
                  f" bound 64 MiB + {args.threads} threads x 2 MiB x 3 = {bound / MiB:.0f} MiB")
            sys.stdout.flush()
            res = soak("b", args.size_b, args, vm, ports.take(), workdir, None,
                       args.rate_b * MB)
            all_good &= report(res, args, bound / MiB)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
