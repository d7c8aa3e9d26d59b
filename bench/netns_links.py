#!/usr/bin/env python3
"""Two shaped links between two network namespaces: viamillipede over both against nc over one.

Host A (the transmitter) and host B (the receiver) are network namespaces joined by two veth
pairs, each direction of each shaped by an htb qdisc to ``--rate`` (default 200mbit)::

    link 1:  a1 198.18.1.1/24 (in A)  <->  b1 198.18.1.2/24 (in B)
    link 2:  a2 198.18.2.1/24 (in A)  <->  b2 198.18.2.2/24 (in B)

198.18.0.0/15 is the benchmarking range (RFC 2544); nothing leaves the two namespaces and no
address outside them is touched.  Configurations (interleaved rounds, medians):

- ``nc link1``: ``nc -N 198.18.1.2 P`` in A, ``nc -l 198.18.1.2 P`` in B;
- ``viamillipede 2 links t8``: ``tx 198.18.1.2 P tx 198.18.2.2 P threads 8``;
- ``viamillipede link1 t8`` (unless --no-single): ``tx 198.18.1.2 P threads 8``.

Target: two links carry >= 1.9 x what nc carries over one.  Needs root, ``ip`` and ``tc``
(iproute2) and nc; the namespaces are deleted at the end whatever happens.

    sudo python3 bench/netns_links.py                     # 200mbit, 256M, 3 rounds
    sudo python3 bench/netns_links.py --rate 100mbit --size 64M --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    RESOURCE_HEAD,
    Config,
    MiB,
    Rig,
    RunStats,
    add_run_args,
    human_bytes,
    interleave_and_report,
    median,
    parse_size,
    print_header,
    require,
    resolve_viamillipede,
    resource_cells,
    unwind_on_signals,
    wait_listening,
)

MB = 1e6
TARGET = 1.9  # two links against nc over one
PREFIX = "vmpbench"
CMD_TIMEOUT = 15.0


def sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                       stdin=subprocess.DEVNULL, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def tc_rate_bytes(rate: str) -> float:
    """tc's rate syntax (200mbit, 1gbit, 500kbit, 10mbps = 10 MB/s) -> bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a tc rate: {rate!r} (try 200mbit, 1gbit)")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return n / 8 if m.group(3) == "bit" else n


class Lab:
    """Namespaces A and B joined by links 1 and 2 (see the module docstring)."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        self.a = f"{PREFIX}-a-{os.getpid()}"
        self.b = f"{PREFIX}-b-{os.getpid()}"
        self.made: list[str] = []

    @staticmethod
    def addr_b(link: int) -> str:
        return f"198.18.{link}.2"

    def create(self) -> Lab:
        try:
            for ns in (self.a, self.b):
                sh(["ip", "netns", "add", ns])
                self.made.append(ns)
                sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            for link in (1, 2):
                a, b = f"a{link}", f"b{link}"
                sh(["ip", "link", "add", a, "netns", self.a, "type", "veth",
                    "peer", "name", b, "netns", self.b])
                sh(["ip", "-n", self.a, "addr", "add", f"198.18.{link}.1/24", "dev", a])
                sh(["ip", "-n", self.b, "addr", "add", f"198.18.{link}.2/24", "dev", b])
                for ns, dev in ((self.a, a), (self.b, b)):
                    tc = ["ip", "netns", "exec", ns, "tc"]
                    sh([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                        "default", "10"])
                    # quantum: one full-size frame, so htb doesn't warn about the r2q default
                    sh([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
                        "htb", "rate", self.rate, "quantum", "1514"])
                    sh(["ip", "-n", ns, "link", "set", dev, "up"])
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        while self.made:
            ns = self.made.pop()
            with contextlib.suppress(Exception):
                sh(["ip", "netns", "del", ns], check=False)

    def exec_in(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]  # execs the command: the pid is the command's


def received_b(pid: int) -> tuple[int, int]:
    """Bytes b1 and b2 have received so far (what A sent over link 1 and 2, headers included),
    read from /proc/PID/net/dev of a process in namespace B."""
    by = {}
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest:
                by[name.strip()] = int(rest.split()[0])
    return by.get("b1", 0), by.get("b2", 0)


class LinkSampler:
    """Samples (time, bytes received over link 1, over link 2) every 0.1 s on a thread.

    The steady-state rate is the payload that passed between 10% and 90% of the run's link
    bytes over the time that took, so start-up and the close are left out."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.points: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LinkSampler:
        self.sample()
        self.thread.start()
        return self

    def sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.points.append((time.perf_counter(), *received_b(self.pid)))

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.sample()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()

    def per_link(self) -> tuple[int, int]:
        """Bytes over link 1 and link 2 while sampling."""
        (_, a1, a2), (_, b1, b2) = self.points[0], self.points[-1]
        return b1 - a1, b2 - a2

    def steady_mbps(self, payload: int) -> float:
        pts = [(t, x + y) for t, x, y in self.points]
        (_, start), (_, end) = pts[0], pts[-1]
        total = end - start
        if total <= 0:
            return 0.0

        def when(frac: float) -> float:  # interpolated time at which frac of the bytes passed
            want = start + frac * total
            for (ta, ba), (tb, bb) in itertools.pairwise(pts):
                if bb >= want:
                    return ta + (tb - ta) * ((want - ba) / (bb - ba) if bb > ba else 0.0)
            return pts[-1][0]

        span = when(0.9) - when(0.1)
        return 0.8 * payload / span / MB if span > 0 else 0.0


@dataclass
class LinkConfig(Config):
    links: tuple[int, ...] = (1,)  # which links the transmitter uses


@dataclass
class Run(RunStats):
    steady_mbps: float = 0.0
    link_share: tuple[float, float] = (0.0, 0.0)  # fraction of bytes sent over a1, a2


def build_configs(args: argparse.Namespace, lab: Lab, vm: list[str]) -> list[LinkConfig]:
    ea, eb = lab.exec_in(lab.a), lab.exec_in(lab.b)
    b1 = lab.addr_b(1)
    extra = ["threads", str(args.threads), *(["checksum"] if args.checksum else [])]
    configs = [LinkConfig("nc link1", [*eb, args.nc, "-l", b1, "{port}"],
                          [*ea, args.nc, "-N", b1, "{port}"], links=(1,))]
    links = [(1, 2)] + ([] if args.no_single else [(1,)])
    for ls in links:
        targets: list[str] = []
        for link in ls:
            targets += ["tx", lab.addr_b(link), "{port}"]
        name = f"viamillipede {'2 links' if len(ls) == 2 else 'link1'} t{args.threads}"
        configs.append(LinkConfig(name, [*eb, *vm, "rx", "{port}", *extra],
                                  [*ea, *vm, *targets, *extra], links=ls))
    return configs


def run_once(cfg: LinkConfig, rnd: int, port: int, args: argparse.Namespace,
             workdir: Path) -> Run:
    run = Run(rnd)
    with Rig(workdir, str(port)) as rig:
        rx = rig.start("rx", cfg.argv("rx", port))
        if why := wait_listening(port, rx, args.listen_timeout, in_its_netns=True):
            rig.error = why
        else:
            feed = rig.start_feed(args.size)
            sampler = LinkSampler(rx.pid).start()
            t0 = time.perf_counter()
            tx = rig.start("tx", cfg.argv("tx", port), stdin=feed.read_fd)
            feed.close_read_end()
            done = rig.wait(args.timeout, "tx", "rx")
            sampler.finish()
            if done:
                rig.error = rig.exit_error()
                rig.ok = not rig.error
    run.ok, run.error = rig.ok, rig.error
    if run.ok:
        run.measure(tx, rx, t0, args.size)
        run.steady_mbps = sampler.steady_mbps(args.size)
        d1, d2 = sampler.per_link()
        run.link_share = (d1 / (d1 + d2), d2 / (d1 + d2)) if d1 + d2 else (0.0, 0.0)
    return run


def report(configs: list[LinkConfig], args: argparse.Namespace) -> None:
    link_mbps = tc_rate_bytes(args.rate) / MB
    w = max(len(c.name) for c in configs)
    nc_ok = [r.mbps for r in configs[0].runs if r.ok]
    nc_med = median(nc_ok) if nc_ok else None
    nc_steady = median([r.steady_mbps for r in configs[0].runs if r.ok]) if nc_ok else None
    head = (
        f"{'config':<{w}} {'MB/s':>7} {'min':>7} {'max':>7} {'of links':>8} {'vs nc':>6}"
        f" {'steady':>7} {'vs nc':>6}"
        f" {'a1/a2 bytes':>11}{RESOURCE_HEAD} {'ok':>4}"
    )
    print(head)
    print("-" * len(head))
    for cfg in configs:
        ok = [r for r in cfg.runs if r.ok]
        n = f"{len(ok)}/{len(cfg.runs)}"
        if not ok:
            print(f"{cfg.name:<{w}} {'failed':>7}{'':>98} {n:>4}")
            continue
        speeds = [r.mbps for r in ok]
        med = median(speeds)
        ratio = f"{med / nc_med:.2f}x" if nc_med else "-"
        steady = median([r.steady_mbps for r in ok])
        steady_ratio = f"{steady / nc_steady:.2f}x" if nc_steady else "-"
        share = median([r.link_share[0] for r in ok])
        split = f"{100 * share:.0f}/{100 * (1 - share):.0f}%"
        print(
            f"{cfg.name:<{w}} {med:>7.1f} {min(speeds):>7.1f} {max(speeds):>7.1f}"
            f" {med / (link_mbps * len(cfg.links)):>8.2f} {ratio:>6} {steady:>7.1f}"
            f" {steady_ratio:>6} {split:>11}"
            f"{resource_cells(ok)} {n:>4}"
        )
    two = next((c for c in configs if len(c.links) == 2), None)
    two_ok = [r.mbps for r in two.runs if r.ok] if two else []
    if nc_med and nc_steady and two and two_ok:
        ratio = median(two_ok) / nc_med
        steady = median([r.steady_mbps for r in two.runs if r.ok]) / nc_steady
        verdict = "PASS" if ratio >= TARGET else "FAIL"
        print(f"\ntarget: 2 links >= {TARGET}x nc over one link: {ratio:.2f}x  {verdict} "
              f"(steady state {steady:.2f}x)")
    print(
        f"'of links': MB/s over the configured capacity of the links used ({args.rate} = "
        f"{link_mbps:.1f} MB/s each, counting Ethernet/IP/TCP headers, so ~0.95 is full).  "
        "steady: payload MB/s between 10% and 90% of the bytes on the links, without "
        "start-up and close.  a1/a2: how the bytes A sent split over the links (headers "
        "and ACKs included).  "
        "CPU: % of one CPU over the run.  RSS: peak MiB."
    )
    if args.verbose:
        print("\nper round: MB/s, seconds, steady MB/s, a1/a2 split")
        for cfg in configs:
            for r in cfg.runs:
                res = (f"{r.mbps:.1f} MB/s {r.seconds:.2f}s steady {r.steady_mbps:.1f} "
                       f"{100 * r.link_share[0]:.0f}/"
                       f"{100 * r.link_share[1]:.0f}%") if r.ok else "FAILED"
                print(f"  {cfg.name:<{w}} r{r.round}: {res}")


def check_rate_and_rounds(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks every bench with ``--rate`` (tc syntax) and ``--rounds`` makes."""
    try:
        tc_rate_bytes(args.rate)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="viamillipede over two htb-shaped veth links between two network "
        "namespaces (198.18.1.0/24, 198.18.2.0/24) against nc over one, in the same run. "
        "Needs root. Interleaved rounds, medians, MB = 10^6 bytes. See bench/README.md.",
    )
    ap.add_argument("--rate", default="200mbit", help="htb rate of each link direction "
                    "(tc syntax); default 200mbit")
    ap.add_argument("--size", type=parse_size, default=256 * MiB,
                    help="bytes per run; default 256M (~11 s for nc at 200mbit)")
    ap.add_argument("--threads", type=int, default=8, help="viamillipede threads; default 8")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (interleaved); default 3")
    ap.add_argument("--no-single", action="store_true",
                    help="skip 'viamillipede link1' (one link, for the per-link efficiency)")
    ap.add_argument("--checksum", action="store_true", help="run viamillipede with checksum")
    ap.add_argument("--port", type=int, default=25400,
                    help="base port (each run takes the next); default 25400")
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    add_run_args(ap, timeout_default="default 60 + 3 x nc's expected time")
    args = ap.parse_args(argv)
    check_rate_and_rounds(ap, args)
    if args.timeout is None:
        args.timeout = 60 + 3 * args.size / tc_rate_bytes(args.rate)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    if os.geteuid() != 0:
        sys.exit("netns_links: network namespaces need root")
    for tool in ("ip", "tc", args.nc):
        require(tool, "netns_links")
    vm = resolve_viamillipede(args.viamillipede, "netns_links")
    vm[0] = shutil.which(vm[0]) or vm[0]  # ip netns exec keeps PATH, but be explicit
    stale = [ln.split()[0] for ln in sh(["ip", "netns", "list"]).stdout.splitlines()
             if ln.startswith(f"{PREFIX}-")]
    if stale:
        print(f"# note: namespaces left by another run: {' '.join(stale)} (not touched)",
              file=sys.stderr)
    print_header(
        f"netns links bench: 2 veth links at {args.rate} each way, {human_bytes(args.size)} "
        f"per run, {args.rounds} round(s) interleaved, sink /dev/null", vm, args.nc)
    lab = Lab(args.rate)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-netns-"))
    configs: list[LinkConfig] = []
    try:
        lab.create()
        configs = build_configs(args, lab, vm)
        ports = iter(range(args.port, 65536))  # fresh namespaces: every port is free
        return interleave_and_report(
            configs, args.rounds, lambda cfg, rnd: run_once(cfg, rnd, next(ports), args, workdir),
            lambda run: f"{run.mbps:7.1f} MB/s ({run.seconds:.1f}s, steady "
            f"{run.steady_mbps:.1f}) a1/a2 {100 * run.link_share[0]:.0f}/"
            f"{100 * run.link_share[1]:.0f}%", lambda: report(configs, args), args.quiet)
    except KeyboardInterrupt:  # while the lab was being built
        return 130
    finally:
        lab.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
