#!/usr/bin/env python3
"""Loopback throughput of viamillipede against nc, measured in the same run.

Every round runs every configuration once (interleaved), so slow drift of the machine hits all
configurations alike; the table reports medians over rounds.  See bench/README.md.

Standard library only (but --floor, which runs a companion that needs xxhash), so it runs with
any python3 >= 3.11, in or out of the project's venv.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from _common import (
    Child,
    Config,
    MiB,
    PortPool,
    RunStats,
    default_viamillipede,
    human_bytes,
    keep_input,
    median,
    parse_int_list,
    parse_size,
    parse_size_list,
    tail,
    tool_version,
    unwind_on_signals,
    wait_listening,
)

BLOCK = 16 * MiB  # input generation block

#: --floor's companion: once the receiver starts working (the transfer has begun), read the
#: input file once and XXH3 every byte, as a checksumming transmitter must at the least; the
#: rest of the transfer stays as it is, so its cost is a floor for what checksums cost from a
#: file.  It says "ready" once imported, learns the receiver's pid on stdin and polls that
#: process's CPU time.
READER = r"""
import os, sys, time, xxhash
print("ready", flush=True)
pid = int(sys.stdin.readline())
def cpu_ns():
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])
start = cpu_ns()
while cpu_ns() - start < 3_000_000:  # the receiver has used 3 ms: data is flowing
    time.sleep(0.0005)
fd = os.open(sys.argv[1], os.O_RDONLY)
view = memoryview(bytearray(2 << 20))
offset = 0
while n := os.preadv(fd, [view], offset):
    xxhash.xxh3_64_intdigest(view[:n])
    offset += n
"""


# --------------------------------------------------------------------------- configs


def build_configs(args: argparse.Namespace, vm: list[str] | None) -> list[Config]:
    nc = args.nc
    configs = [
        Config(
            "nc",
            [nc, "-l", "127.0.0.1", "{port}"],
            [nc, "-N", "127.0.0.1", "{port}"],
        )
    ]
    if vm is not None:
        for checksum in [False, True] if args.checksum else [False]:
            for t in args.threads:
                for cs in args.chunk_sizes or [None]:
                    name = f"viamillipede t{t}"
                    extra = ["threads", str(t)]
                    if cs is not None:
                        name += f" c{human_bytes(cs)}"
                    if checksum:
                        name += " checksum"
                        extra.append("checksum")
                    tx_extra = [*extra, "--chunk-size", str(cs)] if cs is not None else extra
                    configs.append(
                        Config(
                            name,
                            [*vm, "rx", "{port}", *extra],
                            [*vm, "tx", "127.0.0.1", "{port}", *tx_extra],
                        )
                    )
                    if args.floor and not checksum:
                        configs.append(
                            Config(
                                name + " + reader",
                                configs[-1].rx,
                                configs[-1].tx,
                                companion=[sys.executable, "-c", READER],
                            )
                        )
    if args.c_original:
        c = args.c_original
        configs.append(
            Config(
                "C original t8",
                [c, "rx", "{port}"],
                [c, "tx", "127.0.0.1", "{port}", "threads", "8"],
            )
        )
    return configs


# --------------------------------------------------------------------------- one run


def run_once(
    cfg: Config,
    rnd: int,
    port: int,
    args: argparse.Namespace,
    input_path: Path,
    input_sha: str | None,
    workdir: Path,
) -> RunStats:
    size = args.size
    err_rx, err_tx = workdir / f"rx-{port}.err", workdir / f"tx-{port}.err"
    if args.sink == "existing":
        # One output file per config, overwritten in place: its pages already exist.
        out_path = workdir / f"out-{cfg.name.replace(' ', '_')}"
        if not out_path.exists():  # written once, before any timing: every page touched
            shutil.copyfile(input_path, out_path)
        sink = open(out_path, "r+b")  # noqa: SIM115
    else:
        out_path = workdir / f"out-{port}"
        sink = open(out_path if args.sink == "file" else os.devnull, "wb")  # noqa: SIM115
    if args.settle:
        time.sleep(args.settle)  # freed pages go back to the host: every run starts alike
    children: list[Child] = []
    feeder: subprocess.Popen[bytes] | None = None
    companion: Child | None = None
    run = RunStats(rnd)
    try:
        with open(err_rx, "wb") as erx, open(err_tx, "wb") as etx, open(input_path, "rb") as src:
            rx = Child(cfg.argv("rx", port), subprocess.DEVNULL, sink, erx)
            children.append(rx)
            why = wait_listening(port, rx, args.listen_timeout)
            if why:
                run.error = why
                return run
            if cfg.companion is not None:  # started (python and all) before the clock
                companion = Child([*cfg.companion, str(input_path)], subprocess.PIPE,
                                  subprocess.PIPE)
                children.append(companion)
                assert companion.proc.stdout is not None
                if companion.proc.stdout.readline() != b"ready\n":
                    run.error = "the reader did not start"
                    return run
            t0 = time.perf_counter()
            if companion is not None:
                stdin_of = companion.proc.stdin
                assert stdin_of is not None
                stdin_of.write(f"{rx.pid}\n".encode())
                stdin_of.close()
            stdin: object = src
            if args.source == "pipe":  # as from `zfs send |`: no sendfile, every byte read
                feeder = subprocess.Popen(["cat", str(input_path)], stdout=subprocess.PIPE)
                stdin = feeder.stdout
            tx = Child(cfg.argv("tx", port), stdin, subprocess.DEVNULL, etx)
            children.append(tx)
            if feeder is not None and feeder.stdout is not None:
                feeder.stdout.close()  # the transmitter holds the read end now
            deadline = time.monotonic() + args.timeout
            for child in children:
                child.join(max(0.0, deadline - time.monotonic()))
            if any(child.running() for child in children):
                run.error = f"timeout after {args.timeout:.0f}s"
                return run
        assert tx.exited_at is not None and rx.exited_at is not None
        run.seconds = max(c.exited_at or 0.0 for c in children) - t0
        if companion is not None and companion.code != 0:
            run.error = f"the reader exited with {companion.code}"
            return run
        run.mbps = size / run.seconds / 1e6
        run.rss_tx_mib = tx.peak_rss_kib / 1024
        run.rss_rx_mib = rx.peak_rss_kib / 1024
        if tx.code != 0 or rx.code != 0:
            run.error = f"exit codes tx={tx.code} rx={rx.code}"
            return run
        if args.sink in ("file", "existing"):
            got = out_path.stat().st_size
            if got != size:
                run.error = f"output has {got} bytes, input {size}"
                return run
            if input_sha is not None and not any(r.ok for r in cfg.runs):  # first good round
                sha = sha256_file(out_path)
                if sha != input_sha:
                    run.error = f"sha256 mismatch: output {sha[:16]}… input {input_sha[:16]}…"
                    return run
        run.ok = True
        return run
    finally:
        for child in children:
            child.kill()
        if feeder is not None:
            feeder.kill()
            feeder.wait()
        sink.close()
        if not run.ok:
            for label, path in (("rx", err_rx), ("tx", err_tx)):
                text = tail(path)
                if text:
                    run.error += f"\n  --- {label} stderr (tail) ---\n" + "\n".join(
                        "  " + ln for ln in text.splitlines()
                    )
        for path in (err_rx, err_tx) if args.sink == "existing" and run.ok else (
            out_path, err_rx, err_tx
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --------------------------------------------------------------------------- input


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def make_input(path: Path, size: int) -> str:
    """Random (incompressible) data, os.urandom in 16 MiB blocks; returns its sha256."""
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left:
            block = os.urandom(min(BLOCK, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- report


def name_width(configs: list[Config]) -> int:
    return max(len(c.name) for c in configs)


def report(configs: list[Config], verbose: bool, out: TextIO = sys.stdout) -> None:
    w = name_width(configs)
    nc_ok = [r.mbps for r in configs[0].runs if r.ok]
    nc_med = median(nc_ok) if nc_ok else None
    head = (
        f"{'config':<{w}} {'median MB/s':>11} {'min':>9} {'max':>9} {'vs nc':>7}"
        f" {'RSS tx MiB':>10} {'RSS rx MiB':>10} {'ok':>5}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for cfg in configs:
        ok = [r for r in cfg.runs if r.ok]
        n = f"{len(ok)}/{len(cfg.runs)}"
        if not ok:
            what = "failed" if cfg.runs else "not run"
            print(f"{cfg.name:<{w}} {what:>11}{'':>50} {n:>5}", file=out)
            continue
        speeds = [r.mbps for r in ok]
        med = median(speeds)
        ratio = f"{med / nc_med:.2f}x" if nc_med else "-"
        print(
            f"{cfg.name:<{w}} {med:>11.1f} {min(speeds):>9.1f} {max(speeds):>9.1f} {ratio:>7}"
            f" {median([r.rss_tx_mib for r in ok]):>10.1f}"
            f" {median([r.rss_rx_mib for r in ok]):>10.1f} {n:>5}",
            file=out,
        )
    costs = []
    by_name = {c.name: c for c in configs}
    for cfg in configs:
        for suffix, what in ((" + reader", "reading + hashing the input once"),
                             (" checksum", "checksum")):
            plain = by_name.get(cfg.name.removesuffix(suffix))
            if not cfg.name.endswith(suffix) or plain is None:
                continue
            ok, ok_plain = [r.mbps for r in cfg.runs if r.ok], [r.mbps for r in plain.runs if r.ok]
            if ok and ok_plain:
                costs.append(f"  {plain.name}: {what} costs "
                             f"{100 * (1 - median(ok) / median(ok_plain)):.0f}% of throughput")
    if costs:
        print("\ncost against the same config without it (medians):", file=out)
        print("\n".join(costs), file=out)
    if verbose:
        print("\nper round (MB/s, RSS tx/rx MiB):", file=out)
        for cfg in configs:
            cells = [
                f"r{r.round}: {r.mbps:.1f} ({r.rss_tx_mib:.1f}/{r.rss_rx_mib:.1f})"
                if r.ok
                else f"r{r.round}: FAILED"
                for r in cfg.runs
            ]
            print(f"  {cfg.name:<{w}} " + "  ".join(cells), file=out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="End-to-end loopback throughput of viamillipede against nc, in the same run: "
        "interleaved rounds (every round runs every config once), medians, peak RSS of each "
        "side. MB = 10^6 bytes. See bench/README.md.",
    )
    ap.add_argument(
        "--size",
        type=parse_size,
        default=1 << 30,
        help="bytes to carry per run; suffixes K/M/G are binary (256M, 1G, 1GiB); default 1G",
    )
    ap.add_argument(
        "--rounds", type=int, default=5, help="rounds, each runs every config once; default 5"
    )
    ap.add_argument(
        "--threads",
        type=parse_int_list,
        default=[1, 4, 8, 16],
        help="viamillipede thread counts, comma-separated (passed as `threads N` "
        "to both rx and tx); default 1,4,8,16",
    )
    ap.add_argument(
        "--chunk-sizes",
        type=parse_size_list,
        default=None,
        help="comma-separated --chunk-size values for tx (e.g. 256K,2M); default: "
        "don't pass the flag (the tool's own default)",
    )
    ap.add_argument(
        "--checksum",
        action="store_true",
        help="also measure every viamillipede config with `checksum`",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run every plain viamillipede config '+ reader': alongside the transfer, a "
        "process reads the input file once and XXH3-hashes it, the least a checksumming "
        "transmitter must add; what that costs is a floor for what checksums can cost from a "
        "file.  Needs xxhash in this python (run with the project's venv)",
    )
    ap.add_argument(
        "--source",
        choices=["file", "pipe"],
        default="file",
        help="transmitter input: the input file itself (default: viamillipede then sends "
        "it with sendfile), or 'pipe': `cat` of it through a pipe, as from `zfs send |` "
        "(every tool then reads every byte; cat's own CPU time is in every config)",
    )
    ap.add_argument(
        "--sink",
        choices=["devnull", "file", "existing"],
        default="devnull",
        help="receiver output: /dev/null (default); 'file': a new file in --dir every run; "
        "'existing': one file per config in --dir, overwritten in place every round, so no "
        "run pays for allocating its pages (steadier: on a VM, how much that costs depends "
        "on what the host did with freed memory).  With a file, the first good round of each "
        "config is verified by sha256 against the input",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds to pause before each run, so memory freed by the previous run has "
        "been handed back (a VM with free page reporting) and every run writes into fresh "
        "pages alike; default 3 with --sink file, else 0",
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/dev/shm"),
        help="where the input (and --sink file output) lives; default /dev/shm",
    )
    ap.add_argument("--keep", action="store_true", help="keep the input file at the end")
    ap.add_argument(
        "--port",
        type=int,
        default=23400,
        help="base port; each run takes the next port with no socket on it; default 23400",
    )
    ap.add_argument(
        "--viamillipede",
        default=None,
        help="viamillipede command (shell-split; default: `viamillipede` next to "
        "sys.executable if there, else on PATH)",
    )
    ap.add_argument(
        "--no-viamillipede",
        action="store_true",
        help="skip viamillipede (bench only nc and --c-original)",
    )
    ap.add_argument(
        "--c-original",
        default=os.environ.get("VIAMILLIPEDE_C") or None,
        help="path of the original C viamillipede; also bench it as 'C original t8' "
        "(env VIAMILLIPEDE_C)",
    )
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before a run is killed and marked failed (default: 60 + size at 5 MB/s)",
    )
    ap.add_argument(
        "--listen-timeout",
        type=float,
        default=20.0,
        help="seconds to wait for the receiver's LISTEN socket; default 20",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="also print per-round numbers")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.timeout is None:
        args.timeout = 60 + args.size / 5e6
    if args.settle is None:
        args.settle = 3.0 if args.sink == "file" else 0.0
    if args.floor:
        if args.source != "file":
            ap.error("--floor measures file input: from a pipe every config reads every byte")
        if subprocess.run([sys.executable, "-c", "import xxhash"],
                          stderr=subprocess.DEVNULL).returncode != 0:
            ap.error(f"--floor needs xxhash in {sys.executable} (use the project's venv)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    if shutil.which(args.nc) is None:
        print(f"loopback: {args.nc!r} not found", file=sys.stderr)
        return 2
    vm: list[str] | None = None
    if not args.no_viamillipede:
        spec = args.viamillipede or default_viamillipede()
        if spec is None:
            print(
                "loopback: no viamillipede found (give --viamillipede CMD or --no-viamillipede)",
                file=sys.stderr,
            )
            return 2
        vm = shlex.split(spec)
    if args.c_original and not os.access(args.c_original, os.X_OK):
        print(f"loopback: --c-original {args.c_original!r} is not executable", file=sys.stderr)
        return 2

    configs = build_configs(args, vm)
    print(
        f"# loopback bench: {human_bytes(args.size)} ({args.size} bytes) per run, "
        f"{args.rounds} round(s) interleaved, source={args.source}, sink={args.sink}, "
        f"input in {args.dir}, settle {args.settle:g}s"
    )
    print(
        f"# {platform.node()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    if vm is not None:
        print(f"# viamillipede: {shlex.join(vm)} ({tool_version(vm)})")
    if args.c_original:
        print(f"# C original: {args.c_original}")
    print(f"# nc: {shutil.which(args.nc)}")
    sys.stdout.flush()

    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-bench-", dir=args.dir))
    input_path = workdir / "input.bin"
    failed_any = False
    try:
        t = time.perf_counter()
        sha = make_input(input_path, args.size)
        if not args.quiet:
            print(
                f"[input] {input_path}: {args.size} random bytes in "
                f"{time.perf_counter() - t:.1f}s, sha256 {sha[:16]}…",
                file=sys.stderr,
            )
        ports = PortPool(args.port)
        w = name_width(configs)
        for rnd in range(1, args.rounds + 1):
            for cfg in configs:
                port = ports.take()
                run = run_once(
                    cfg, rnd, port, args, input_path,
                    sha if args.sink != "devnull" else None, workdir,
                )
                cfg.runs.append(run)
                if not run.ok:
                    failed_any = True
                    print(
                        f"[round {rnd}] {cfg.name} (port {port}) FAILED: {run.error}",
                        file=sys.stderr,
                    )
                elif not args.quiet:
                    print(
                        f"[round {rnd}] {cfg.name:<{w}} {run.mbps:9.1f} MB/s "
                        f"{run.seconds:7.3f}s  RSS tx {run.rss_tx_mib:.1f} MiB "
                        f"rx {run.rss_rx_mib:.1f} MiB",
                        file=sys.stderr,
                    )
        print()
        report(configs, args.verbose)
    except KeyboardInterrupt:
        print("\ninterrupted; partial results:", file=sys.stderr)
        report(configs, args.verbose)
        return 130
    finally:
        if args.keep:
            keep_input(input_path, args.dir, args.size)
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
