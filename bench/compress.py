#!/usr/bin/env python3
"""Does ``compress`` pay?  Three acceptance targets, each against the same config without it.

The transmitter takes ``compress`` (adaptive zstd), ``compress zstd:LEVEL`` (fixed level) or
nothing (off); the receiver follows by itself.  Three parts, each with interleaved rounds
(round r runs every config of the part once), medians, and nc measured in the same run:

1. **netns**: two links of ``--rate`` (200mbit) each way between two network namespaces (the
   lab of netns_links.py), ``--size-netns`` (256M) of the compressible corpus from a pipe.
   Configs ``nc link1``, ``viamillipede 2 links t8`` (``tx 198.18.1.2 P tx 198.18.2.2 P
   threads 8``) and the same with ``compress``.  Target: compress >= 2.2 x without.
   Needs root, ``ip``, ``tc`` and nc; without root the part is skipped with a note.
2. **random**: ``--size-loopback`` (1G) of random data (``_common.py feed``) from a pipe on
   127.0.0.1: nc, ``viamillipede t8``, ``viamillipede t8 compress``.  Target: compress >=
   0.9 x without (it must notice the data does not compress, and get out of the way).
3. **compressible**: the same on 127.0.0.1 with ``--size-loopback`` of the corpus.  Target:
   compress not slower than without; >= 0.97 x counts as "not slower, within noise".

The compressible corpus: this machine's text files, shared libraries and static libraries,
in a fixed order, one *cycle* of it repeated to size by the feeder.  Every list is sorted by
path, holds regular files only (no symlinks, each inode once) and leaves out empty files:

- text: ``/usr/share/common-licenses/*``, ``/usr/share/doc/**/copyright``,
  ``/usr/include/**/*.h`` and the system python's stdlib, ``/usr/lib/python3*/**/*.py``
  without ``dist-packages``/``site-packages`` (not the running interpreter's, so every
  python gets the same bytes);
- shared libraries: ``/usr/lib/<multiarch>/*.so*``; static libraries: ``/usr/lib/<multiarch>/*.a``.

Each list is read as one concatenation.  A cycle is built in steps of 256 KiB units: 17
units of text in order, then 2 units of shared libraries and 1 of static libraries, until
the text runs out.  The library units are taken at an even stride across their whole
concatenations, so a cycle holds all the text and a spread-out sample of every library
(85% text, 10% .so, 5% .a by bytes), and every stretch of a few MiB has the same mix.  On
the machine it was written on, a cycle is ~146 MiB.  There, zlib level 1 over 2 MiB blocks
gets the text alone to ~0.23 and the libraries to ~0.37, so no mix of the three reaches the
0.2 aimed at; this one gets ~0.25 (zstd level 1 ~0.23, level 3 ~0.18).  The header prints
the zlib-1 ratio measured over 16 blocks of 2 MiB spread over the cycle.  The cycle is cached as
``$TMPDIR/viamillipede-bench-corpus-KEY.bin``; KEY hashes the recipe and the list of
files (path, size, mtime), so a package upgrade gives a new cycle (old ones stay; delete
them by hand).  A feeder process reads the cycle into memory, then writes it to a pipe
again and again up to the size; the clock starts once its first bytes are in the pipe.

The compress configs' rows also show what compression did, parsed from the transmitter's
closing line (``compression auto (zstd:1): N bytes as M (ratio R), P% of C chunks sent
raw``): the median wire/raw ratio, the median share of chunks sent raw, and the setting at
the end of the last good round (for ``auto``: the level it settled on).

Without --viamillipede it runs the viamillipede next to sys.executable, else on PATH, else
the checkout's .venv/bin/viamillipede.

    python3 bench/compress.py                             # all three; netns only as root
    python3 bench/compress.py --only compressible --rounds 3 --size-loopback 512M
    sudo python3 bench/compress.py --only netns --compress "compress zstd:1"
    python3 bench/compress.py --only random --extra-args plaintext
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    RESOURCE_HEAD,
    Config,
    Feed,
    MiB,
    PortPool,
    Rig,
    RunStats,
    add_run_args,
    default_viamillipede,
    human_bytes,
    interleave_and_report,
    median,
    parse_size,
    print_header,
    resolve_viamillipede,
    resource_cells,
    unwind_on_signals,
    wait_listening,
)
from netns_links import PREFIX, Lab, LinkSampler, check_rate_and_rounds, sh, tc_rate_bytes

MB = 1e6
PARTS = ("netns", "random", "compressible")
TARGET_NETNS = 2.2  # compress against without, two shaped links
TARGET_RANDOM = 0.9  # compress against without, random data on loopback
TARGET_COMPRESSIBLE = 1.0  # not slower ...
NOISE = 0.97  # ... within noise

# --------------------------------------------------------------------------- the corpus

CORPUS_VERSION = "1"  # bump when the recipe changes: a new cache key
UNIT = 256 << 10
#: One step of a cycle: units of text, of shared libraries, of static libraries.
STEP = (("text", 17), ("shared", 2), ("static", 1))
SAMPLE_BLOCK = 2 * MiB
SAMPLE_BLOCKS = 16
MIN_TEXT = 8 * MiB


def multiarch_lib() -> str:
    """/usr/lib/x86_64-linux-gnu and the like, else /usr/lib64, else /usr/lib."""
    for d in (f"/usr/lib/{platform.machine()}-linux-gnu", "/usr/lib64", "/usr/lib"):
        if glob.glob(f"{d}/*.so*"):
            return d
    return "/usr/lib"


def corpus_sources() -> dict[str, list[tuple[str, int, int]]]:
    """The sorted (path, size, mtime_ns) of every file in each kind; regular files only, no
    symlinks, each inode once (across all kinds), no empty files."""
    lib = multiarch_lib()
    patterns = {
        "text": ["/usr/share/common-licenses/*", "/usr/share/doc/**/copyright",
                 "/usr/include/**/*.h", "/usr/lib/python3*/**/*.py"],
        "shared": [f"{lib}/*.so*"],
        "static": [f"{lib}/*.a"],
    }
    seen: set[tuple[int, int]] = set()
    out: dict[str, list[tuple[str, int, int]]] = {}
    for kind, pats in patterns.items():
        paths = sorted({p for pat in pats for p in glob.glob(pat, recursive=True)})
        files = []
        for p in paths:
            if "/dist-packages/" in p or "/site-packages/" in p or os.path.islink(p):
                continue
            try:
                st = os.stat(p)
            except OSError:
                continue
            if not os.path.isfile(p) or st.st_size == 0 or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            files.append((p, st.st_size, st.st_mtime_ns))
        out[kind] = files
    return out


class Concat:
    """A list of files read as one byte string."""

    def __init__(self, files: list[tuple[str, int, int]]) -> None:
        self.paths = [p for p, _, _ in files]
        self.starts = [0]
        for _, size, _ in files:
            self.starts.append(self.starts[-1] + size)
        self.size = self.starts[-1]

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray()
        i = bisect_right(self.starts, offset) - 1
        while len(out) < n and 0 <= i < len(self.paths):
            pos = offset + len(out) - self.starts[i]
            want = min(n - len(out), self.starts[i + 1] - self.starts[i] - pos)
            with open(self.paths[i], "rb") as f:
                f.seek(pos)
                got = f.read(want)
            if len(got) != want:
                raise RuntimeError(f"{self.paths[i]} changed while the corpus was built; "
                                   "run again")
            out += got
            i += 1
        return bytes(out)


@dataclass
class Corpus:
    path: Path
    size: int  # bytes in one cycle
    files: dict[str, int]  # kind -> number of files
    share: dict[str, float]  # kind -> share of a cycle's bytes
    zlib1: float = 0.0
    sampled: int = 0  # blocks

    def describe(self) -> str:
        kinds = ", ".join(f"{kind} {100 * self.share[kind]:.0f}% ({self.files[kind]} files)"
                          for kind, _ in STEP)
        return (f"corpus {self.path}: a cycle of {self.size / MiB:.0f} MiB repeated to size; "
                f"{kinds}; zlib-1 ratio {self.zlib1:.3f} over {self.sampled} blocks of 2 MiB")


def corpus_plan(concats: dict[str, Concat]) -> list[tuple[str, int, int]]:
    """The cycle as (kind, offset, length) pieces, in order."""
    text = concats["text"].size
    per_step = dict(STEP)
    steps = -(-text // (per_step["text"] * UNIT))
    picks: dict[str, list[int]] = {}
    for kind, units in STEP[1:]:
        n, size = steps * units, concats[kind].size
        if size == 0:
            picks[kind] = []
        elif size <= UNIT or n == 1:
            picks[kind] = [0] * n
        else:  # n offsets from 0 to size - UNIT at an even stride, page-aligned
            picks[kind] = [(i * (size - UNIT) // (n - 1)) & ~4095 for i in range(n)]
    plan = []
    for s in range(steps):
        off = s * per_step["text"] * UNIT
        plan.append(("text", off, min(per_step["text"] * UNIT, text - off)))
        for kind, units in STEP[1:]:
            for i in range(units):
                if picks[kind]:
                    start = picks[kind][s * units + i]
                    plan.append((kind, start, min(UNIT, concats[kind].size - start)))
    return plan


def zlib1_ratio(path: Path, size: int) -> tuple[float, int]:
    """zlib level 1 over SAMPLE_BLOCKS blocks of 2 MiB spread over the file: (ratio, blocks)."""
    n = max(1, min(SAMPLE_BLOCKS, size // SAMPLE_BLOCK))
    raw = packed = 0
    with open(path, "rb") as f:
        for i in range(n):
            f.seek(i * max(0, size - SAMPLE_BLOCK) // max(1, n - 1) if n > 1 else 0)
            block = f.read(SAMPLE_BLOCK)
            raw += len(block)
            packed += len(zlib.compress(block, 1))
    return packed / raw, n


def build_corpus(directory: Path, quiet: bool) -> Corpus:
    """The cached cycle (built now if missing), with its zlib-1 ratio measured."""
    sources = corpus_sources()
    concats = {kind: Concat(files) for kind, files in sources.items()}
    if concats["text"].size < MIN_TEXT:
        raise RuntimeError(f"only {concats['text'].size} bytes of text files found; the corpus "
                           f"needs at least {human_bytes(MIN_TEXT)}")
    key = hashlib.sha256(repr((CORPUS_VERSION, UNIT, STEP, sources)).encode()).hexdigest()[:12]
    path = directory / f"viamillipede-bench-corpus-{key}.bin"
    plan = corpus_plan(concats)
    size = sum(n for _, _, n in plan)
    by_kind = {kind: sum(n for k, _, n in plan if k == kind) for kind, _ in STEP}
    if not (path.is_file() and path.stat().st_size == size):
        t = time.perf_counter()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                for kind, off, n in plan:
                    out.write(concats[kind].read(off, n))
            tmp.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if not quiet:
            print(f"[corpus] built {path} ({size} bytes) in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
    corpus = Corpus(path, size, {k: len(v) for k, v in sources.items()},
                    {k: v / size for k, v in by_kind.items()})
    corpus.zlib1, corpus.sampled = zlib1_ratio(path, size)
    return corpus


#: The corpus feeder: reads the cycle into memory (before the clock: Feed.start waits for its
#: first bytes), then writes it to stdout again and again up to SIZE bytes.
CORPUS_FEED = r"""
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "rb") as f:
    data = memoryview(f.read())
n, done, out = len(data), 0, sys.stdout.fileno()
try:
    while done < size:
        off = done % n
        done += os.write(out, data[off:off + min(1 << 20, n - off, size - done)])
except BrokenPipeError:
    print(f"corpus feed: reader went away after {done} bytes", file=sys.stderr)
    sys.exit(1)
"""


class CorpusFeed(Feed):
    """A Feed that writes the corpus (repeated to ``size``) instead of random bytes."""

    def __init__(self, size: int, rate: float | None = None, stderr: Any = None, *,
                 path: Path) -> None:
        super().__init__(size, rate, stderr)
        self.path = path

    def argv(self) -> list[str]:
        return [sys.executable, "-c", CORPUS_FEED, str(self.path), str(self.size)]


# --------------------------------------------------------------------------- configs, runs

#: The transmitter's closing line about compression (the setting may hold ': ').
COMPRESSION_LINE = re.compile(
    r"compression (?P<setting>.+): (?P<raw>\d+) bytes as (?P<wire>\d+) \(ratio [\d.]+\), "
    r"(?P<rawpct>\d+)% of (?P<chunks>\d+) chunks sent raw")


@dataclass
class PartConfig(Config):
    links: int = 0  # netns: links the transmitter uses
    compress: bool = False


@dataclass
class Run(RunStats):
    wire: float | None = None  # wire bytes / raw bytes, from the tx log
    sent_raw: float | None = None  # % of chunks sent as they are
    setting: str = ""
    link_use: float = 0.0  # netns: bytes on the links used / (seconds x their capacity)


@dataclass
class Part:
    key: str
    title: str
    size: int
    corpus: bool
    netns: bool
    timeout: float
    configs: list[PartConfig] = field(default_factory=list)
    skipped: str = ""
    interrupted: bool = False


def compression_of(log: Path) -> tuple[float, float, str] | None:
    """(wire/raw, % of chunks sent raw, setting) from the last compression line of a tx log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = list(COMPRESSION_LINE.finditer(text))
    if not found:
        return None
    m = found[-1]
    raw, wire = int(m.group("raw")), int(m.group("wire"))
    return (wire / raw if raw else 1.0), float(m.group("rawpct")), m.group("setting")


def vm_pair(name: str, rx: list[str], tx: list[str], args: argparse.Namespace,
            links: int = 0) -> list[PartConfig]:
    """A viamillipede config without and with ``--compress`` (tx only: rx follows)."""
    extra = ["threads", str(args.threads), *args.extra]
    return [PartConfig(name, [*rx, *extra], [*tx, *extra], links=links),
            PartConfig(f"{name} {' '.join(args.compress_words)}", [*rx, *extra],
                       [*tx, *extra, *args.compress_words], links=links, compress=True)]


def loopback_configs(args: argparse.Namespace, vm: list[str]) -> list[PartConfig]:
    nc = args.nc
    return [PartConfig("nc", [nc, "-l", "127.0.0.1", "{port}"], [nc, "-N", "127.0.0.1", "{port}"]),
            *vm_pair(f"viamillipede t{args.threads}", [*vm, "rx", "{port}"],
                     [*vm, "tx", "127.0.0.1", "{port}"], args)]


def netns_configs(args: argparse.Namespace, lab: Lab, vm: list[str]) -> list[PartConfig]:
    ea, eb = lab.exec_in(lab.a), lab.exec_in(lab.b)
    b1, b2 = lab.addr_b(1), lab.addr_b(2)
    return [PartConfig("nc link1", [*eb, args.nc, "-l", b1, "{port}"],
                       [*ea, args.nc, "-N", b1, "{port}"], links=1),
            *vm_pair(f"viamillipede 2 links t{args.threads}", [*eb, *vm, "rx", "{port}"],
                     [*ea, *vm, "tx", b1, "{port}", "tx", b2, "{port}"], args, links=2)]


def run_once(part: Part, cfg: PartConfig, rnd: int, port: int, args: argparse.Namespace,
             corpus: Corpus | None, workdir: Path) -> Run:
    run = Run(rnd)
    sampler: LinkSampler | None = None
    compression = None
    with Rig(workdir, f"{part.key}-{port}") as rig:
        rx = rig.start("rx", cfg.argv("rx", port))
        why = wait_listening(port, rx, args.listen_timeout, in_its_netns=part.netns)
        feed = None
        if not why:
            try:
                if part.corpus:
                    assert corpus is not None
                    feed = rig.start_feed(part.size, kind=CorpusFeed, path=corpus.path)
                else:
                    feed = rig.start_feed(part.size)
            except RuntimeError as e:
                why = str(e)
        if feed is None:
            rig.error = why
        else:
            if part.netns:
                sampler = LinkSampler(rx.pid).start()
            t0 = time.perf_counter()
            tx = rig.start("tx", cfg.argv("tx", port), stdin=feed.read_fd)
            feed.close_read_end()
            done = rig.wait(part.timeout, "tx", "rx")
            if sampler is not None:
                sampler.finish()
            if done:
                rig.error = rig.exit_error()
                rig.ok = not rig.error
                compression = compression_of(rig.logs["tx"])
                if rig.ok and cfg.compress and compression is None:
                    print(f"[round {rnd}] {cfg.name}: no compression line in the tx log "
                          "(verbosity turned down?)", file=sys.stderr)
    run.ok, run.error = rig.ok, rig.error
    if run.ok:
        run.measure(tx, rx, t0, part.size)
        if compression is not None:
            run.wire, run.sent_raw, run.setting = compression
        if sampler is not None and cfg.links:
            d1, d2 = sampler.per_link()
            run.link_use = (d1 + d2) / run.seconds / (cfg.links * tc_rate_bytes(args.rate))
    return run


def progress(run: Run) -> str:
    out = f"{run.mbps:8.1f} MB/s ({run.seconds:.1f}s)"
    if run.link_use:
        out += f" links {run.link_use:.2f}"
    if run.wire is not None:
        out += f" wire {run.wire:.3f}, {run.sent_raw:.0f}% raw, {run.setting}"
    return out


# --------------------------------------------------------------------------- report


def ok_mbps(cfg: PartConfig) -> list[float]:
    return [r.mbps for r in cfg.runs if r.ok]


def target_line(part: Part) -> str:
    """The verdict on a part's target: compress against the same config without."""
    plain = next((c for c in part.configs if c.name.startswith("viamillipede")
                  and not c.compress), None)
    comp = next((c for c in part.configs if c.compress), None)
    if part.skipped:
        return f"{part.key}: skipped: {part.skipped}"
    if plain is None or comp is None or not ok_mbps(plain) or not ok_mbps(comp):
        return f"{part.key}: no good runs to compare  FAIL"
    ratio = median(ok_mbps(comp)) / median(ok_mbps(plain))
    if part.key == "netns":
        verdict = "PASS" if ratio >= TARGET_NETNS else "FAIL"
        what = f"compress >= {TARGET_NETNS}x without over 2 links"
        note = ""
    elif part.key == "random":
        verdict = "PASS" if ratio >= TARGET_RANDOM else "FAIL"
        what = f"compress >= {TARGET_RANDOM}x without, random data"
        note = ""
    else:
        verdict = "PASS" if ratio >= NOISE else "FAIL"
        what = f"compress not slower than without (>= {NOISE}x is within noise), corpus"
        note = (" (faster)" if ratio > 1 / NOISE else " (not slower)" if ratio >= 1.0
                else " (not slower, within noise)" if ratio >= NOISE else " (slower)")
    return f"{part.key}: {what}: {ratio:.2f}x  {verdict}{note}"


def report(part: Part, args: argparse.Namespace) -> None:
    configs = part.configs
    w = max(len(c.name) for c in configs)
    nc = ok_mbps(configs[0])
    nc_med = median(nc) if nc else None
    links = f" {'links':>5}" if part.netns else ""
    head = (f"{'config':<{w}} {'MB/s':>7} {'min':>7} {'max':>7} {'vs nc':>6}{links}"
            f" {'wire':>5} {'raw':>4}{RESOURCE_HEAD} {'ok':>4}  setting (last)")
    ok_end = len(head) - len("  setting (last)")
    print(head)
    print("-" * len(head))
    for cfg in configs:
        ok = [r for r in cfg.runs if r.ok]
        n = f"{len(ok)}/{len(cfg.runs)}"
        if not ok:
            what = f"{cfg.name:<{w}} {'failed' if cfg.runs else 'not run':>7}"
            print(f"{what:<{ok_end - 5}} {n:>4}")
            continue
        speeds = [r.mbps for r in ok]
        med = median(speeds)
        ratio = f"{med / nc_med:.2f}x" if nc_med else "-"
        link_cell = f" {median([r.link_use for r in ok]):>5.2f}" if part.netns else ""
        wires = [r.wire for r in ok if r.wire is not None]
        raws = [r.sent_raw for r in ok if r.sent_raw is not None]
        wire = f"{median(wires):.3f}" if wires else "-"
        raw = f"{median(raws):.0f}%" if raws else "-"
        setting = next((r.setting for r in reversed(ok) if r.setting), "")
        print(f"{cfg.name:<{w}} {med:>7.1f} {min(speeds):>7.1f} {max(speeds):>7.1f}"
              f" {ratio:>6}{link_cell} {wire:>5} {raw:>4}{resource_cells(ok)} {n:>4}"
              f"  {setting}".rstrip())
    print(f"\ntarget {target_line(part)}")
    if args.verbose:
        print("\nper round:")
        for cfg in configs:
            for r in cfg.runs:
                print(f"  {cfg.name:<{w}} r{r.round}: " + (progress(r) if r.ok else "FAILED"))


def legend(parts: list[Part], args: argparse.Namespace) -> None:
    text = ("MB/s: payload (the bytes fed in), MB = 10^6 bytes, medians of the good rounds.  "
            "wire: bytes sent / bytes fed, from the transmitter's closing line (median).  "
            "raw: % of chunks sent as they are (median).  setting: the transmitter's "
            "compression setting at the end of the last good round.  ")
    if any(p.netns and p.configs for p in parts):
        text += (f"links: bytes on the links used (headers included) over their capacity "
                 f"({args.rate} = {tc_rate_bytes(args.rate) / MB:.1f} MB/s each), ~0.95 is "
                 "full.  ")
    print(text + "CPU: % of one CPU over the run.  RSS: peak MiB.")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="viamillipede with `compress` against without, and against nc, in the same "
        "run: two shaped links between network namespaces (needs root), and loopback with "
        "random and with compressible data, all from a pipe. Interleaved rounds, medians, "
        "MB = 10^6 bytes. See bench/README.md and this script's docstring (the corpus).")
    ap.add_argument("--only", action="append", choices=PARTS, default=None,
                    help="run only this part (repeatable); default all three")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (interleaved); default 5")
    ap.add_argument("--size-netns", type=parse_size, default=256 * MiB,
                    help="bytes per netns run; default 256M")
    ap.add_argument("--size-loopback", type=parse_size, default=1 << 30,
                    help="bytes per loopback run; default 1G")
    ap.add_argument("--rate", default="200mbit",
                    help="htb rate of each netns link direction (tc syntax); default 200mbit")
    ap.add_argument("--threads", type=int, default=8, help="viamillipede threads; default 8")
    ap.add_argument("--extra-args", default="",
                    help="words appended to both viamillipede ends (shell-split), e.g. plaintext")
    ap.add_argument("--compress", default="compress",
                    help="the transmitter's compress words (shell-split); default 'compress' "
                    "(auto); e.g. 'compress zstd:1'")
    ap.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()),
                    help=f"where the corpus cycle is cached; default {tempfile.gettempdir()}")
    ap.add_argument("--port", type=int, default=26400,
                    help="base port (each run takes the next free one); default 26400")
    ap.add_argument("--nc", default="nc", help="netcat-openbsd binary; default nc")
    add_run_args(ap, timeout_default="default: netns 60 + 3 x nc's expected time; "
                 "loopback 60 + size at 5 MB/s")
    args = ap.parse_args(argv)
    check_rate_and_rounds(ap, args)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    args.parts = [p for p in PARTS if p in (args.only or PARTS)]
    args.extra = shlex.split(args.extra_args)
    words = shlex.split(args.compress)
    if not words:
        ap.error("--compress needs at least the word compress")
    args.compress_words = words if words[0].startswith(("compress", "--compress")) else [
        "compress", *words]
    return args


def repo_venv_tool() -> str | None:
    """The checkout's own .venv/bin/viamillipede, for a plain ``python3 bench/compress.py``."""
    tool = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "viamillipede"
    return str(tool) if os.access(tool, os.X_OK) else None


def netns_unavailable(args: argparse.Namespace) -> str:
    if os.geteuid() != 0:
        return "network namespaces need root (run as root for this part)"
    missing = [t for t in ("ip", "tc", args.nc) if shutil.which(t) is None]
    return f"{', '.join(missing)} not found" if missing else ""


def make_parts(args: argparse.Namespace) -> list[Part]:
    parts = []
    for key in args.parts:
        if key == "netns":
            size = args.size_netns
            timeout = args.timeout or 60 + 3 * size / tc_rate_bytes(args.rate)
            title = (f"netns: 2 links at {args.rate} each way, {human_bytes(size)} of the corpus "
                     "per run from a pipe")
            parts.append(Part(key, title, size, corpus=True, netns=True, timeout=timeout,
                              skipped=netns_unavailable(args)))
        else:
            size = args.size_loopback
            data = "random data" if key == "random" else "the corpus"
            parts.append(Part(key, f"loopback {key}: {human_bytes(size)} of {data} per run from "
                              "a pipe, 127.0.0.1", size, corpus=key == "compressible",
                              netns=False, timeout=args.timeout or 60 + size / 5e6))
    return parts


def run_part(part: Part, args: argparse.Namespace, vm: list[str], corpus: Corpus | None,
             workdir: Path) -> int:
    print(f"\n## {part.title}, {args.rounds} round(s) interleaved, sink /dev/null", flush=True)
    if part.skipped:
        print(f"skipped: {part.skipped}", flush=True)
        print(f"# netns part skipped: {part.skipped}", file=sys.stderr)
        return 0
    lab: Lab | None = None
    try:
        if part.netns:
            stale = [ln.split()[0] for ln in sh(["ip", "netns", "list"]).stdout.splitlines()
                     if ln.startswith(f"{PREFIX}-")]
            if stale:
                print(f"# note: namespaces left by another run: {' '.join(stale)} "
                      "(not touched)", file=sys.stderr)
            lab = Lab(args.rate).create()
            part.configs = netns_configs(args, lab, vm)
            ports = iter(range(args.port, 65536))  # fresh namespaces: every port is free

            def take() -> int:
                return next(ports)
        else:
            part.configs = loopback_configs(args, vm)
            take = PortPool(args.port).take
        code = interleave_and_report(
            part.configs, args.rounds,
            lambda cfg, rnd: run_once(part, cfg, rnd, take(), args, corpus, workdir),
            progress, lambda: report(part, args), args.quiet)
    except KeyboardInterrupt:  # while the lab was being built
        code = 130
    finally:
        if lab is not None:
            lab.destroy()
    part.interrupted = code == 130
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_signals()
    if shutil.which(args.nc) is None:
        sys.exit(f"compress: {args.nc!r} not found")
    vm = resolve_viamillipede(args.viamillipede or default_viamillipede() or repo_venv_tool(),
                              "compress")
    vm[0] = shutil.which(vm[0]) or vm[0]  # ip netns exec keeps PATH, but be explicit
    parts = make_parts(args)
    print_header(f"compress bench: {', '.join(args.parts)}; compress words: "
                 f"{shlex.join(args.compress_words)}"
                 + (f"; extra words: {shlex.join(args.extra)}" if args.extra else ""),
                 vm, args.nc)
    corpus: Corpus | None = None
    try:
        if any(p.corpus and not p.skipped for p in parts):
            args.corpus_dir.mkdir(parents=True, exist_ok=True)
            corpus = build_corpus(args.corpus_dir, args.quiet)
            print(f"# {corpus.describe()}", flush=True)
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError) as e:
        sys.exit(f"compress: cannot build the corpus: {e}")
    workdir = Path(tempfile.mkdtemp(prefix="viamillipede-compress-"))
    status = 0
    try:
        for part in parts:
            code = run_part(part, args, vm, corpus, workdir)
            status = max(status, code)
            if code == 130:
                break
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    legend(parts, args)
    print("\ntargets:")
    for part in parts:
        if part.configs or part.skipped:
            print(f"  {target_line(part)}" + (" (interrupted)" if part.interrupted else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
