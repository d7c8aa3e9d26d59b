#!/usr/bin/env python3
"""Loopback throughput from a pipe: viamillipede against ssh and nc, measured in the same run.

Every run carries the same random file through ``cat FILE |`` (so every tool reads every byte
from a pipe, as from ``zfs send |``) over 127.0.0.1 and throws it away on the other side:

    ssh:          cat FILE | ssh -c CIPHER root@127.0.0.1 'cat > /dev/null'   (a throwaway sshd)
    nc:           nc -l 127.0.0.1 P > /dev/null     then   cat FILE | nc -N 127.0.0.1 P
    viamillipede: viamillipede rx P --listen 127.0.0.1 [ARGS] > /dev/null
                  then   cat FILE | viamillipede tx 127.0.0.1 P [ARGS]

Rounds are interleaved (round r runs every variant once); the table gives medians and each
viamillipede variant's ratio to ssh and to nc from the same run.

    python3 bench/ssh.py                                   # 1 GiB, 7 rounds
    python3 bench/ssh.py --rounds 5 --vm-args '' --vm-args 'threads 1' --vm-args 'threads 8'

Needs root (sshd logs in the user it runs as; see sshd_lab.py), sshd and ssh (openssh-server,
openssh-client), nc (netcat-openbsd), Linux.  Standard library only.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from _common import (
    PortPool,
    Rig,
    RunStats,
    add_run_args,
    human_bytes,
    interleave_and_report,
    keep_input,
    median,
    parse_size,
    print_header,
    require,
    resolve_viamillipede,
    unwind_on_signals,
    wait_listening,
)
from loopback import make_input

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd_lab import SshdLabError, sshd_lab

DEFAULT_CIPHER = "aes128-gcm@openssh.com"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Variant:
    """One way of carrying the stream: a receiver started first (None for ssh, whose receiving
    end is the sshd's session) and a transmitter fed by ``cat FILE |``; ``{port}`` is filled
    in per run."""

    name: str
    kind: str  # "ssh", "nc" or "viamillipede"
    rx: list[str] | None
    tx: list[str]
    runs: list[Run] = field(default_factory=list)


@dataclass
class Run(RunStats):
    #: CPU time of the whole machine (every process and the kernel) over the run, in % of one
    #: CPU: the ssh session's processes are not our children, so this is what covers them.
    cpu_all: float = 0.0


def busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine so far (the ``cpu`` line of /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # guest time is already in user/nice


def split_vm_args(text: str) -> tuple[list[str], list[str]]:
    """``--vm-args`` words: to both ends, except those after ``tx:`` (tx only) or ``rx:`` (rx
    only), until the next ``tx:``, ``rx:`` or ``both:``."""
    rx: list[str] = []
    tx: list[str] = []
    to: tuple[list[str], ...] = (rx, tx)
    for word in shlex.split(text):
        if word in ("tx:", "rx:", "both:"):
            to = {"tx:": (tx,), "rx:": (rx,), "both:": (rx, tx)}[word]
            continue
        for side in to:
            side.append(word)
    return rx, tx


def build_variants(args: argparse.Namespace, ssh_command: list[str], destination: str,
                   vm: list[str], key_file: Path) -> list[Variant]:
    variants = [
        Variant(
            "ssh" if len(args.cipher) == 1 else f"ssh {cipher}",
            "ssh",
            None,
            [*ssh_command, "-c", cipher, "-o", "Compression=no", destination, "cat > /dev/null"],
        )
        for cipher in args.cipher
    ]
    variants.append(Variant("nc", "nc", [args.nc, "-l", "127.0.0.1", "{port}"],
                            [args.nc, "-N", "127.0.0.1", "{port}"]))
    for text in args.vm_args or [""]:
        rx_extra, tx_extra = split_vm_args(text)
        variants.append(
            Variant(
                f"viamillipede {text}".strip(),
                "viamillipede",
                [*vm, "rx", "{port}", "--listen", "127.0.0.1", *rx_extra],
                [*vm, "tx", "127.0.0.1", "{port}", *tx_extra],
            )
        )
    # tx --ssh: the receiver is started through the sshd, with a fresh key per session; and
    # what it is measured against: the same session with a key file, both ends started by hand.
    remote_vm = vm[-1] if len(vm) == 1 else shlex.join(vm)
    variants.append(Variant(
        "viamillipede --ssh", "viamillipede", None,
        [*vm, "tx", "--ssh", destination, "--ssh-command", shlex.join(ssh_command),
         "--remote-viamillipede", remote_vm, "--", "cat > /dev/null"]))
    variants.append(Variant(
        "viamillipede key file", "viamillipede",
        [*vm, "rx", "{port}", "--listen", "127.0.0.1", "key", str(key_file)],
        [*vm, "tx", "127.0.0.1", "{port}", "key", str(key_file)]))
    return variants


def run_once(v: Variant, rnd: int, port: int, input_path: Path, workdir: Path,
             args: argparse.Namespace) -> Run:
    """Start the receiver (untimed) and wait until it listens; then start the clock, ``cat``
    and the transmitter; stop it when all have exited (every one with 0)."""
    run = Run(rnd)
    with Rig(workdir, f"{port}") as rig, open(os.devnull, "wb") as null:
        measure(v, run, rig, port, null, input_path, args)
        rig.ok = run.ok
    run.error = rig.error  # with the tails of the logs, once the rig is closed
    return run


def measure(v: Variant, run: Run, rig: Rig, port: int, null: BinaryIO, input_path: Path,
            args: argparse.Namespace) -> None:
    names = ["cat", "tx"]
    if v.rx is not None:
        rx = rig.start("rx", [a.format(port=port) for a in v.rx], stdout=null)
        names.append("rx")
        if why := wait_listening(port, rx, args.listen_timeout):
            rig.error = why
            return
    busy0 = busy_jiffies()
    t0 = time.perf_counter()
    cat = rig.start("cat", ["cat", str(input_path)], stdout=subprocess.PIPE)
    assert cat.proc.stdout is not None
    try:
        tx = rig.start("tx", [a.format(port=port) for a in v.tx], stdin=cat.proc.stdout,
                       stdout=subprocess.DEVNULL)
    finally:
        cat.proc.stdout.close()  # the transmitter holds the read end now
    if not rig.wait(args.timeout, *names):
        return
    end = max(rig.children[n].exited_at or 0.0 for n in names)
    busy = busy_jiffies() - busy0
    rig.error = rig.exit_error()
    if rig.error:
        return
    run.seconds = end - t0
    run.mbps = args.size / run.seconds / 1e6
    run.cpu_tx = 100 * tx.cpu_s / run.seconds
    run.rss_tx_mib = tx.peak_rss_mib
    if v.rx is not None:
        run.cpu_rx = 100 * rig.children["rx"].cpu_s / run.seconds
        run.rss_rx_mib = rig.children["rx"].peak_rss_mib
    run.cpu_all = 100 * busy / _CLK_TCK / run.seconds
    run.ok = True


def report(variants: list[Variant], verbose: bool) -> None:
    w = max(len(v.name) for v in variants)
    ref: dict[str, float | None] = {}
    for kind in ("ssh", "nc"):
        first = next(v for v in variants if v.kind == kind)
        speeds = [r.mbps for r in first.runs if r.ok]
        ref[kind] = median(speeds) if speeds else None
    head = (f"{'variant':<{w}} {'median MB/s':>11} {'min':>8} {'max':>8} {'vs ssh':>7}"
            f" {'vs nc':>7} {'tx CPU':>6} {'rx CPU':>6} {'all CPU':>7} {'ok':>5}")
    print(head)
    print("-" * len(head))
    for v in variants:
        ok = [r for r in v.runs if r.ok]
        n = f"{len(ok)}/{len(v.runs)}"
        if not ok:
            print(f"{v.name:<{w}} {'failed' if v.runs else 'not run':>11}{'':>59} {n:>5}")
            continue
        speeds = [r.mbps for r in ok]
        med = median(speeds)
        ratios = [f"{med / r:.2f}x" if r else "-" for r in (ref["ssh"], ref["nc"])]
        rx_cpu = f"{median([r.cpu_rx for r in ok]):>5.0f}%" if v.rx is not None else "     -"
        print(f"{v.name:<{w}} {med:>11.1f} {min(speeds):>8.1f} {max(speeds):>8.1f}"
              f" {ratios[0]:>7} {ratios[1]:>7} {median([r.cpu_tx for r in ok]):>5.0f}%"
              f" {rx_cpu} {median([r.cpu_all for r in ok]):>6.0f}% {n:>5}")
    print(f"\nMB/s: input bytes / seconds from starting `cat |` and the transmitter (receiver "
          f"already listening; ssh's connection set-up is inside) until all have exited.  "
          f"vs ssh / vs nc: median over {variants[0].name}'s / nc's median, same run.  "
          f"CPU: % of one CPU over the run; tx/rx the two ends' own processes (ssh's receiving "
          f"end is sshd's session, not ours: see 'all'), all: the whole machine "
          f"({os.cpu_count()} CPUs = {100 * (os.cpu_count() or 1)}%), cat included.")
    if verbose:
        print("\nper round (MB/s):")
        for v in variants:
            cells = [f"r{r.round}: {r.mbps:.1f}" if r.ok else f"r{r.round}: FAILED"
                     for r in v.runs]
            print(f"  {v.name:<{w}} " + "  ".join(cells))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Loopback throughput from a pipe (`cat FILE |`): viamillipede against "
        "ssh (a throwaway sshd on 127.0.0.1) and nc, interleaved rounds, medians. "
        "MB = 10^6 bytes. See bench/README.md.",
    )
    ap.add_argument("--size", type=parse_size, default=1 << 30,
                    help="bytes per run; suffixes K/M/G are binary (256M, 1G); default 1G")
    ap.add_argument("--rounds", type=int, default=7,
                    help="rounds, each runs every variant once; default 7")
    ap.add_argument("--vm-args", action="append", default=None, metavar="ARGS",
                    help="a viamillipede variant to measure: words added to both ends "
                    "(e.g. 'threads 8'); after 'tx:' or 'rx:' to that end only "
                    "(e.g. 'threads 4 tx: --chunk-size 1MiB'); repeat for more variants; "
                    "'' is the defaults. Default: one variant, the defaults")
    ap.add_argument("--cipher", action="append", default=None,
                    help=f"ssh cipher (-c); repeat for more ssh variants, the first is what "
                    f"'vs ssh' divides by; default {DEFAULT_CIPHER}")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"),
                    help="where the input file lives; default /dev/shm")
    ap.add_argument("--keep", action="store_true", help="keep the input file at the end")
    ap.add_argument("--port", type=int, default=29400, help="base port; default 29400")
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    add_run_args(ap, timeout_default="default: 60 + size at 5 MB/s",
                 verbose_help="also print per-round numbers")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.cipher = args.cipher or [DEFAULT_CIPHER]
    if args.timeout is None:
        args.timeout = 60 + args.size / 5e6
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    require(args.nc, "ssh")
    require("ssh", "ssh")
    vm = resolve_viamillipede(args.viamillipede, "ssh")
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    print_header(f"ssh bench: {human_bytes(args.size)} ({args.size} bytes) per run from "
                 f"`cat FILE |`, {args.rounds} round(s) interleaved, input in {args.dir}",
                 vm, args.nc)
    print(f"# ssh: {version}, cipher {', '.join(args.cipher)}")
    sys.stdout.flush()
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-ssh-", dir=args.dir))
    input_path = workdir / "input.bin"
    variants: list[Variant] = []
    try:
        with sshd_lab(parent_dir=workdir) as sshd:
            key_file = workdir / "bench.key"
            subprocess.run([*vm, "keygen", str(key_file)], check=True)
            variants = build_variants(args, sshd.ssh_command, sshd.destination, vm, key_file)
            t = time.perf_counter()
            sha = make_input(input_path, args.size)
            if not args.quiet:
                print(f"[input] {input_path}: {args.size} random bytes in "
                      f"{time.perf_counter() - t:.1f}s, sha256 {sha[:16]}…; sshd on "
                      f"127.0.0.1:{sshd.port}", file=sys.stderr)
            ports = PortPool(args.port)

            def one(v: Variant, rnd: int) -> Run:
                port = ports.take() if v.kind != "ssh" else sshd.port
                return run_once(v, rnd, port, input_path, workdir, args)

            return interleave_and_report(
                variants, args.rounds, one, lambda r: f"{r.mbps:9.1f} MB/s {r.seconds:7.3f}s",
                lambda: report(variants, args.verbose), quiet=args.quiet)
    except SshdLabError as e:
        print(f"ssh: cannot start the throwaway sshd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the sshd or the input was being made
        return 130
    finally:
        if args.keep:
            keep_input(input_path, args.dir, args.size)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
