#!/usr/bin/env python3
"""Chaos acceptance run: many seeds through real loopback transfers, each checked by sha256,
and a second run of some seeds to compare their fault logs.

    python3 bench/chaos_seeds.py --seeds 50 --size 64M --threads 6

Run by hand (minutes); the test suite covers chaos over in-memory streams instead.  The fault
log is what both ends print for each injected fault (``chaos tx conn 3 gen 0 send 17: reset``).
Which operations a connection performs on loopback depends on how the kernel and scheduler
interleave the connections, so a re-run injects the same fault wherever the same operation
happens again; the report says how many re-runs gave an identical log and, for the others,
how many of their faults were in common.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAULT = re.compile(r"chaos (tx|rx) conn \d+ gen \d+ \w+ \d+: .*")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool() -> list[str]:
    here = Path(sys.executable).with_name("viamillipede")
    return [str(here)] if here.exists() else [shutil.which("viamillipede") or "viamillipede"]


def run_seed(
    seed: int, src: Path, out: Path, args: argparse.Namespace
) -> tuple[bool, float, list[str]]:
    port = free_port()
    extra = ["chaos", str(seed), "--chaos-rate", str(args.rate), "timeout", "60"]
    extra += ["verbose", "1"]
    if args.checksum:
        extra.append("checksum")
    with open(out, "wb") as sink:
        rx = subprocess.Popen([*tool(), "rx", str(port), *extra], stdout=sink,
                              stderr=subprocess.PIPE)
        t0 = time.monotonic()
        with open(src, "rb") as source:
            tx = subprocess.run(
                [*tool(), "tx", "127.0.0.1", str(port), "threads", str(args.threads),
                 "--chunk-size", args.chunk_size, *extra],
                stdin=source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                timeout=300, check=False,
            )
        _, rx_err = rx.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    same = tx.returncode == 0 and rx.returncode == 0 and digest(out) == digest(src)
    if not same:
        print(f"seed {seed}: tx {tx.returncode} rx {rx.returncode}", file=sys.stderr)
        print(tx.stderr.decode()[-2000:], rx_err.decode()[-2000:], file=sys.stderr)
    text = tx.stderr.decode() + rx_err.decode()
    faults = sorted(m.group(0) for m in FAULT.finditer(text))
    return same, elapsed, faults


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--chunk-size", default="256KiB")
    ap.add_argument("--rate", type=float, default=0.02)
    ap.add_argument("--checksum", action="store_true", help="also inject corruption")
    ap.add_argument("--rerun", type=int, default=10, help="seeds to run twice, comparing logs")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="vmp-chaos-"))
    try:
        src = work / "in"
        src.write_bytes(os.urandom(parse_size(args.size)))
        out = work / "out"
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        logs: dict[int, list[str]] = {}
        ok = 0
        times = []
        for seed in seeds:
            same, elapsed, faults = run_seed(seed, src, out, args)
            ok += same
            times.append(elapsed)
            logs[seed] = faults
            print(f"seed {seed:4d}: {'identical' if same else 'FAILED'}  {elapsed:6.2f} s  "
                  f"{len(faults)} faults")
        identical = 0
        reruns = list(seeds)[: args.rerun]
        for seed in reruns:
            same, _, faults = run_seed(seed, src, out, args)
            ok += same
            common = len(set(faults) & set(logs[seed]))
            identical += faults == logs[seed]
            print(f"re-run seed {seed:4d}: {'identical output' if same else 'FAILED'}; "
                  f"fault log {'identical' if faults == logs[seed] else 'differs'} "
                  f"({common} of {len(logs[seed])} faults in common, {len(faults)} now)")
        times.sort()
        total = len(seeds) + len(reruns)
        print(f"\n{ok}/{total} transfers byte-identical; median {times[len(times) // 2]:.2f} s, "
              f"max {times[-1]:.2f} s; {sum(map(len, logs.values()))} faults in the first pass; "
              f"{identical}/{len(reruns)} re-runs reproduced their fault log exactly")
        return 0 if ok == total else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
