#!/usr/bin/env python3
"""Does ``limit RATE`` hold the stream at RATE, evenly?  Against unlimited nc on loopback.

One limited run: start ``viamillipede rx P threads N`` with its stdout into a pipe that this
script reads, counting bytes (a reader thread) and sampling the count against
``time.monotonic()`` every 50 ms (a sampler thread); then start ``viamillipede tx 127.0.0.1 P
threads N --limit RATE`` fed random data from a pipe (``_common.py feed``, enough for
``1 + SECONDS + 2`` s at the rate).  From the samples, counting from the first byte out of
the receiver:

- **mean**: the rate over SECONDS (default 10) starting 1 s after the first byte;
- **max 1 s**: the highest rate over any 1 s window of the whole stream, start included;
- **min 1 s**: the lowest rate over any 1 s window inside the span of the mean.

Windows begin and end at samples.  A run passes when its mean is within ``--tolerance``
(5%) of RATE and no 1 s window is above ``--max-window`` (1.25) x RATE: 25 MB/s at the
default 20M.  The same rounds run ``nc -l`` / ``nc -N`` with no limit, from the same feeder,
so the limited rate can be read as a fraction of what the path carries unlimited.

    .venv/bin/python bench/limit.py                        # 20M, threads 4, 5 rounds (~75 s)
    python3 bench/limit.py --limit 5M --threads 1,16 --seconds 20
    python3 bench/limit.py -v                              # every round, and tx's summary line

Standard library only; Linux.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    Config,
    MiB,
    PortPool,
    Rig,
    RunStats,
    add_run_args,
    interleave_and_report,
    median,
    parse_int_list,
    parse_size,
    positive_float,
    print_header,
    require,
    resolve_viamillipede,
    unwind_on_signals,
    wait_listening,
)

MB = 1e6
SKIP_S = 1.0  # the mean starts this long after the first byte
WINDOW_S = 1.0
TAIL_S = 2.0  # input beyond the end of the span, so the stream is still at the limit there
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> float:
    """``20M`` -> 20e6, ``512k`` -> 512e3, ``2MiB`` -> 2097152: the tool's own convention
    (decimal, binary only with an i), bytes a second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m or (m.group(3) and not m.group(2)):
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 20M, 500k, 2MiB)")
    unit = m.group(2).lower()
    rate = float(m.group(1)) * (_BINARY[unit] if m.group(3) else _DECIMAL[unit])
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"the rate must be positive: {text!r}")
    return rate


class Counter:
    """Reads a pipe to EOF, counting bytes; a second thread samples ``(monotonic, count)``
    every ``interval`` seconds on a fixed grid (a late tick does not shift the later ones)."""

    def __init__(self, fd: int, interval: float) -> None:
        self.fd, self.interval = fd, interval
        self.total = 0
        self.first: float | None = None  # monotonic time of the first and the last read
        self.last: float | None = None
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> Counter:
        self.samples.append((time.monotonic(), 0))
        self._reader.start()
        self._sampler.start()
        return self

    def _read(self) -> None:
        buf = bytearray(MiB)
        try:
            while n := os.readv(self.fd, [buf]):
                now = time.monotonic()
                if self.first is None:
                    self.first = now
                self.total += n  # only this thread writes it; the sampler reads one int
                self.last = now
        except OSError:
            pass
        finally:
            self._done.set()

    def _sample(self) -> None:
        t0 = self.samples[0][0]
        k = 1
        while not self._done.wait(max(0.0, t0 + k * self.interval - time.monotonic())):
            self.samples.append((time.monotonic(), self.total))
            k = int((time.monotonic() - t0) / self.interval) + 1
        self.samples.append((time.monotonic(), self.total))

    def join(self, timeout: float) -> bool:
        self._reader.join(timeout)
        self._sampler.join(1)
        return not self._reader.is_alive()


def count_at(samples: list[tuple[float, int]], t: float) -> float:
    """The byte count at time ``t``, linear between the two samples around it."""
    times = [s[0] for s in samples]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return float(samples[0][1])
    if i == len(samples):
        return float(samples[-1][1])
    (ta, ca), (tb, cb) = samples[i - 1], samples[i]
    return ca + (cb - ca) * (t - ta) / (tb - ta)


def windows(samples: list[tuple[float, int]], lo: float, hi: float) -> list[float]:
    """Bytes/s over every window of WINDOW_S (to the next sample at or after) that starts at a
    sample at or after ``lo`` and ends at a sample at or before ``hi``."""
    times = [s[0] for s in samples]
    out = []
    for i, (ti, ci) in enumerate(samples):
        if ti < lo:
            continue
        j = bisect.bisect_left(times, ti + WINDOW_S, i + 1)
        if j == len(samples) or times[j] > hi:
            break
        out.append((samples[j][1] - ci) / (times[j] - ti))
    return out


@dataclass
class LimitConfig(Config):
    limited: bool = False


@dataclass
class Run(RunStats):
    mean: float = 0.0  # MB/s over the span
    win_max: float = 0.0  # MB/s, any 1 s window of the stream
    win_min: float = 0.0  # MB/s, 1 s windows inside the span
    summary: str = ""  # the transmitter's last stderr line


def build_configs(args: argparse.Namespace, vm: list[str]) -> list[LimitConfig]:
    configs = [LimitConfig("nc (no limit)", [args.nc, "-l", "127.0.0.1", "{port}"],
                           [args.nc, "-N", "127.0.0.1", "{port}"])]
    for t in args.threads:
        threads = ["threads", str(t)]
        configs.append(LimitConfig(
            f"viamillipede t{t} limit {args.limit_text}", [*vm, "rx", "{port}", *threads],
            [*vm, "tx", "127.0.0.1", "{port}", *threads, "--limit", args.limit_text],
            limited=True))
    return configs


def judge(run: Run, counter: Counter, args: argparse.Namespace) -> str:
    """Fill in the rates of a limited run from its samples; '' or why it can't be judged."""
    assert counter.first is not None and counter.last is not None
    a = counter.first + SKIP_S
    b = a + args.seconds
    if counter.last < b:
        return (f"the stream ended {counter.last - counter.first:.1f}s after its first byte, "
                f"before the end of the span ({SKIP_S + args.seconds:.0f}s): raise --size")
    s = counter.samples
    run.mean = (count_at(s, b) - count_at(s, a)) / args.seconds / MB
    everywhere = windows(s, s[0][0], counter.last + args.interval)
    inside = windows(s, a, b)
    if not everywhere or not inside:
        return "too few samples for a 1 s window"
    run.win_max, run.win_min = max(everywhere) / MB, min(inside) / MB
    return ""


def run_once(cfg: LimitConfig, rnd: int, ports: PortPool, args: argparse.Namespace,
             workdir: Path) -> Run:
    run = Run(rnd)
    size = args.size if cfg.limited else args.nc_size
    port = ports.take()
    r, w = os.pipe()
    counter = Counter(r, args.interval)
    with Rig(workdir, str(port)) as rig:
        try:
            rx = rig.start("rx", cfg.argv("rx", port), stdout=w)
        finally:
            os.close(w)
        counter.start()
        if why := wait_listening(port, rx, args.listen_timeout):
            rig.error = why
        else:
            feed = rig.start_feed(size)
            t0 = time.perf_counter()
            tx = rig.start("tx", cfg.argv("tx", port), stdin=feed.read_fd)
            feed.close_read_end()
            if rig.wait(args.timeout, "tx", "rx") and counter.join(5):
                run.measure(tx, rx, t0, size)
                rig.error = rig.exit_error()
                if not rig.error and counter.total != size:
                    rig.error = f"read {counter.total} bytes out of rx, expected {size}"
                if not rig.error and cfg.limited:
                    rig.error = judge(run, counter, args)
                lines = rig.logs["tx"].read_text(errors="replace").strip().splitlines()
                run.summary = lines[-1] if lines else ""
                rig.ok = not rig.error
    counter.join(5)
    os.close(r)
    run.ok, run.error = rig.ok, rig.error
    return run


def passes(run: Run, args: argparse.Namespace) -> bool:
    limit = args.limit / MB
    return (abs(run.mean - limit) <= args.tolerance * limit
            and run.win_max <= args.max_window * limit)


def report(configs: list[LimitConfig], args: argparse.Namespace) -> None:
    limit = args.limit / MB
    nc_ok = [r.mbps for r in configs[0].runs if r.ok]
    nc_med = median(nc_ok) if nc_ok else None
    w = max(len(c.name) for c in configs)
    if nc_med is not None:
        print(f"nc, no limit ({len(nc_ok)}/{len(configs[0].runs)} ok): median {nc_med:.1f} MB/s "
              f"(min {min(nc_ok):.1f}, max {max(nc_ok):.1f}), "
              f"{args.nc_size / MB:.0f} MB from tx start to both exited\n")
    else:
        print("nc, no limit: every run failed\n")
    head = (f"{'config':<{w}} {'':>6} {'mean':>7} {'of lim':>7} {'max 1s':>7} {'min 1s':>7}"
            f" {'e2e':>7} {'vs nc':>7} {'ok':>5}  verdict")
    print(head)
    print("-" * len(head))
    for cfg in configs[1:]:
        ok = [r for r in cfg.runs if r.ok]
        n = f"{len(ok)}/{len(cfg.runs)}"
        if not ok:
            print(f"{cfg.name:<{w}} {'failed':>6}{'':>53} {n:>5}")
            continue
        good = sum(passes(r, args) for r in ok)
        verdict = f"{'PASS' if good == len(cfg.runs) else 'FAIL'} ({good}/{len(cfg.runs)} rounds)"
        for label, pick in (("median", median), ("min", min), ("max", max)):
            means = pick([r.mean for r in ok])
            ratio = f"{means / nc_med:.3f}x" if nc_med else "-"
            line = (f"{cfg.name if label == 'median' else '':<{w}} {label:>6} {means:>7.2f}"
                    f" {means / limit:>7.3f} {pick([r.win_max for r in ok]):>7.2f}"
                    f" {pick([r.win_min for r in ok]):>7.2f} {pick([r.mbps for r in ok]):>7.2f}"
                    f" {ratio:>7} {n if label == 'median' else '':>5}"
                    f"  {verdict if label == 'median' else ''}")
            print(line.rstrip())
    print("\n" + textwrap.fill(
        f"MB/s, MB = 10^6 bytes; the limit is {limit:g} MB/s.  mean: over {args.seconds:g} s "
        f"from {SKIP_S:g} s after the first byte; of lim: mean / limit.  max 1s: highest 1 s "
        f"window of the whole stream; min 1s: lowest inside the span of the mean (windows run "
        f"between samples {args.interval * 1000:.0f} ms apart).  e2e: input bytes / seconds "
        f"from tx start to both exited.  vs nc: mean / nc's median from the same run.  Each of "
        f"median, min, max is taken per column over the good rounds.  A round passes when its "
        f"mean is within {args.tolerance:.0%} of the limit and no 1 s window is above "
        f"{args.max_window * limit:g} MB/s ({args.max_window:g} x the limit).", 100))
    if args.verbose:
        print("\nper round:")
        for cfg in configs:
            for r in cfg.runs:
                if not r.ok:
                    print(f"  {cfg.name:<{w}} r{r.round}: FAILED")
                elif not cfg.limited:
                    print(f"  {cfg.name:<{w}} r{r.round}: {r.mbps:.1f} MB/s {r.seconds:.2f}s")
                else:
                    print(f"  {cfg.name:<{w}} r{r.round}: mean {r.mean:.3f} max {r.win_max:.2f}"
                          f" min {r.win_min:.2f} e2e {r.mbps:.2f} MB/s"
                          f" {'pass' if passes(r, args) else 'FAIL'}  tx: {r.summary}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="viamillipede with --limit over loopback: the mean rate over SECONDS, and "
        "the highest and lowest rate over any 1 s window, sampled out of the receiver's "
        "stdout every 50 ms; nc with no limit in the same run for scale.  Interleaved rounds, "
        "MB = 10^6 bytes.  See bench/README.md.",
    )
    ap.add_argument("--limit", dest="limit_text", default="20M",
                    help="the rate, in the tool's units (decimal: 20M = 20,000,000 bytes/s); "
                    "default 20M")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (interleaved); default 5")
    ap.add_argument("--seconds", type=positive_float, default=10.0,
                    help="span of the mean, from 1 s after the first byte; default 10")
    ap.add_argument("--threads", type=parse_int_list, default=[4],
                    help="viamillipede connection counts; default 4")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="bytes per limited run (binary units, as every bench's --size); default "
                    f"what the limit carries in 1 + SECONDS + {TAIL_S:g} s")
    ap.add_argument("--nc-size", type=parse_size, default=1 << 30,
                    help="bytes per nc run; default 1G")
    ap.add_argument("--tolerance", type=positive_float, default=0.05,
                    help="the mean may differ from the limit by this fraction; default 0.05")
    ap.add_argument("--max-window", type=positive_float, default=1.25,
                    help="no 1 s window above this x the limit; default 1.25")
    ap.add_argument("--interval", type=positive_float, default=0.05,
                    help="seconds between samples; default 0.05")
    ap.add_argument("--port", type=int, default=28400, help="base port; default 28400")
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    add_run_args(ap, timeout_default="default 60 + 3 x its nominal length",
                 verbose_help="every round's numbers and the transmitter's summary line")
    args = ap.parse_args(argv)
    try:
        args.limit = parse_rate(args.limit_text)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.interval * 4 > WINDOW_S:
        ap.error(f"--interval must be at most {WINDOW_S / 4:g} s")
    if args.size is None:
        args.size = int(args.limit * (SKIP_S + args.seconds + TAIL_S))
    if args.timeout is None:
        args.timeout = 60 + 3 * args.size / args.limit
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    require(args.nc, "limit")
    vm = resolve_viamillipede(args.viamillipede, "limit")
    configs = build_configs(args, vm)
    print_header(
        f"rate-limit bench: --limit {args.limit_text} ({args.limit / MB:g} MB/s), "
        f"{args.size / MB:.0f} MB per limited run, {args.rounds} round(s) interleaved, "
        f"output read by the bench", vm, args.nc)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-limit-"))
    ports = PortPool(args.port)

    def progress(run: Run) -> str:
        if run.mean:
            return (f"mean {run.mean:.3f} MB/s, 1 s windows {run.win_min:.2f}-{run.win_max:.2f}, "
                    f"e2e {run.mbps:.2f} MB/s ({run.seconds:.1f}s)")
        return f"{run.mbps:8.1f} MB/s ({run.seconds:.2f}s)"

    try:
        return interleave_and_report(
            configs, args.rounds, lambda cfg, rnd: run_once(cfg, rnd, ports, args, workdir),
            progress, lambda: report(configs, args), args.quiet)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
