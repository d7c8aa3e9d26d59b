"""The command line: the original keyword grammar plus ordinary ``--flags``, over the library.

Parsing is hand-written rather than argparse because the seed grammar is positional keywords in
any order (``tx HOST PORT`` repeated, ``checksum`` as a bare word) which argparse cannot express,
and because both spellings must land in one config with one set of error messages.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__
from .errors import ExitCode, UsageError, ViamillipedeError

if TYPE_CHECKING:
    from .chaos import ChaosScheduler
    from .receiver import Receiver
    from .stats import Report
    from .transmitter import Transmitter
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    MAX_CHUNK_SIZE,
    MAX_THREADS,
    MIN_CHUNK_SIZE,
    PREALLOCATE_AHEAD,
)

PROG = "viamillipede"

HELP = f"""\
usage: {PROG} rx PORT [options]
       {PROG} tx HOST PORT [tx HOST PORT ...] [options]

Carry a Unix pipe across the network over many parallel TCP connections.  The
receiver writes the stream to stdout complete and in order; chunks are re-sent
over other connections when one breaks, and nothing but the stream is ever
written to stdout.

Examples:
  # on the receiving host (start it first, or within the timeout):
  {PROG} rx 8834 | zfs recv tank/fs
  # on the sending host, over two links in preference order, 8 connections:
  zfs send pool/fs@snap | {PROG} tx backup1 8834 tx backup1-10g 8834 threads 8
  # verify every chunk with a checksum and use a private checkphrase:
  tar cf - dir | {PROG} tx host 8834 checksum checkphrase wat!
  {PROG} rx 8834 checksum checkphrase wat! > dir.tar
  # a loopback smoke test:
  {PROG} rx 8834 > /tmp/copy & {PROG} tx localhost 8834 < /etc/services

Words (the original grammar, any order) and their --flag spellings:
  rx PORT             --rx PORT          receive: listen on PORT (IPv6 and IPv4)
  tx HOST PORT        --tx HOST PORT     transmit to HOST:PORT; repeat for more
                                         links, preferred first; a target named
                                         twice gets twice the connections
  threads N           --threads N        parallel connections, 1-{MAX_THREADS}
                                         (default {DEFAULT_THREADS})
  checksum            --checksum         XXH3 on every chunk, checked before it is
                                         written (the receiver follows the sender)
  checkphrase XXXX    --checkphrase XXXX 4 characters both ends must agree on
                                         (default "{DEFAULT_CHECKPHRASE}")
  timeout SECONDS     --timeout SECONDS  give up after this long without progress
                                         (default {DEFAULT_TIMEOUT:g})
  verbose N           --verbose N, -v    0 errors only, 1 warnings and a summary
                                         (default), 2 connection events, 3 debug
  chaos SEED          --chaos SEED       inject seeded faults (resets, stalls, delays,
                                         fragmentation; corruption with checksum):
                                         the same seed breaks the same operations
                      --chaos-rate P     chance of a fault per operation (0.02)
                      --chaos-faults L   e.g. reset,delay (of reset stall delay
                                         short corrupt)
                      --chunk-size BYTES chunk size, e.g. 512K, 2M (default 2M)
                      --listen ADDR      rx only: listen on ADDR instead of all
                      --progress         a pv-like progress line on stderr
                      --size BYTES       expected size, for progress percentage and
                                         ETA (a regular file on stdin is measured)
                      --stats-json FILE  write the final statistics (and the chaos
                                         fault log) as JSON; see docs/stats.md
                      --quiet, -q        same as verbose 0
                      --help, -h         this text
                      --version          print the version

Signals:
  SIGUSR1 (SIGINFO on BSD)  print a report to stderr: bytes, rates, window,
                            each connection and link; the transfer goes on
  SIGUSR2                   next verbosity level (0, 1, 2, 3, then 0 again)
  SIGINT, SIGTERM           stop cleanly, tell the peer, exit 130

Exit status:
  0 success: every byte written and confirmed     5 stream ended early / totals differ
  2 bad command line                              6 local input or output failed
  3 peer rejected (checkphrase, session, version) 7 the peer aborted (e.g. its output failed)
  4 no progress within the timeout                8 protocol violation
  1 cannot listen (port in use), or other       130 interrupted (Ctrl-C, SIGTERM)
"""


@dataclass
class Config:
    """Everything the command line can say, in one place."""

    mode: str = ""
    port: int = 0
    listen: str | None = None
    targets: list[tuple[str, int]] = field(default_factory=list)
    threads: int = DEFAULT_THREADS
    verbose: int = 1
    checksum: bool = False
    checkphrase: str = DEFAULT_CHECKPHRASE
    chaos: int | None = None
    chaos_rate: float | None = None
    chaos_faults: tuple[str, ...] | None = None
    progress: bool = False
    stats_json: str | None = None
    size: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    timeout: float = DEFAULT_TIMEOUT


def _int(word: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"{word} needs a whole number, got {value!r}") from None
    if not low <= n <= high:
        raise UsageError(f"{word} must be between {low} and {high}, got {n}")
    return n


def _port(word: str, value: str) -> int:
    return _int(f"{word} port", value, 1, 65535)


def _size(word: str, value: str, low: int = MIN_CHUNK_SIZE, high: int = MAX_CHUNK_SIZE) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if text and text[-1] in units:
        mult = units[text[-1]]
        text = text[:-1]
    try:
        n = int(text, 10) * mult
    except ValueError:
        raise UsageError(f"{word} needs a size like 2M or 524288, got {value!r}") from None
    if not low <= n <= high:
        raise UsageError(f"{word} must be between {low} and {high} bytes")
    return n


_FAULTS = ("reset", "stall", "delay", "short", "corrupt")


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise UsageError(f"--chaos-rate needs a probability like 0.02, got {value!r}") from None
    if not 0.0 <= rate <= 1.0:
        raise UsageError("--chaos-rate must be between 0 and 1")
    return rate


def _faults(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if n not in _FAULTS]
    if bad or not names:
        raise UsageError(f"--chaos-faults takes a list of {', '.join(_FAULTS)}; got {value!r}")
    return names


def _seconds(word: str, value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise UsageError(f"{word} needs a number of seconds, got {value!r}") from None
    if not 0.1 <= s <= 86400 * 7:
        raise UsageError(f"{word} must be between 0.1 and 604800 seconds")
    return s


class _Words:
    def __init__(self, argv: Sequence[str]) -> None:
        self._argv = list(argv)
        self._i = 0

    def __bool__(self) -> bool:
        return self._i < len(self._argv)

    def next(self) -> str:
        word = self._argv[self._i]
        self._i += 1
        return word

    def value(self, word: str, what: str) -> str:
        if not self:
            raise UsageError(f"{word} needs {what}")
        return self.next()


#: Words that take no value, so ``--checksum=off`` is an error rather than a silent "on".
_SWITCHES = frozenset({"help", "version", "quiet", "checksum", "checksums", "progress"})


def parse(argv: Sequence[str]) -> Config | str:
    """Parse arguments into a Config, or return text to print (``--help``, ``--version``)."""
    cfg = Config()
    words = _Words(argv)
    rx_seen = False

    def set_mode(mode: str) -> None:
        if cfg.mode and cfg.mode != mode:
            raise UsageError("use either rx or tx, not both")
        cfg.mode = mode

    while words:
        raw = words.next()
        inline: str | None = None
        if raw.startswith("--") and "=" in raw:
            raw, inline = raw.split("=", 1)
        word = raw[2:] if raw.startswith("--") else raw

        def arg(what: str, *, _w: str = raw, _inline: str | None = inline) -> str:
            return _inline if _inline is not None else words.value(_w, what)

        if inline is not None and word in _SWITCHES:
            raise UsageError(f"{raw} takes no value")
        if raw in ("-h", "--help", "help"):
            return HELP
        if raw == "--version":
            return f"{PROG} {__version__}"
        if raw in ("-q", "--quiet"):
            cfg.verbose = 0
        elif raw == "-v":
            cfg.verbose += 1
        elif word == "rx":
            set_mode("rx")
            if rx_seen:
                raise UsageError("rx can be given only once")
            rx_seen = True
            cfg.port = _port("rx", arg("a PORT"))
        elif word == "tx":
            set_mode("tx")
            if inline is not None and ":" in inline:
                host, _, port = inline.rpartition(":")
            else:
                host = arg("HOST and PORT")
                port = words.value(raw, "a PORT after the host")
            if not host:
                raise UsageError("tx needs a HOST")
            cfg.targets.append((host.strip("[]"), _port("tx", port)))
        elif word == "threads":
            cfg.threads = _int("threads", arg("a number"), 1, MAX_THREADS)
        elif word == "verbose":
            cfg.verbose = _int("verbose", arg("a level"), 0, 9)
        elif word in ("checksum", "checksums"):
            cfg.checksum = True
        elif word == "checkphrase":
            phrase = arg("4 characters")
            if len(phrase.encode("utf-8")) != 4:
                raise UsageError(f"checkphrase must be exactly 4 bytes, got {phrase!r}")
            cfg.checkphrase = phrase
        elif word == "chaos":
            cfg.chaos = _int("chaos", arg("a seed"), 0, 2**63 - 1)
        elif raw == "--chaos-rate":
            cfg.chaos_rate = _rate(arg("a probability"))
        elif raw == "--chaos-faults":
            cfg.chaos_faults = _faults(arg("a list of faults"))
        elif word == "timeout":
            cfg.timeout = _seconds("timeout", arg("seconds"))
        elif raw == "--chunk-size":
            cfg.chunk_size = _size("--chunk-size", arg("a size"))
        elif raw == "--listen":
            cfg.listen = arg("an address")
        elif raw == "--progress":
            cfg.progress = True
        elif raw == "--stats-json":
            cfg.stats_json = arg("a file name")
        elif raw == "--size":
            cfg.size = _size("--size", arg("a size"), low=0, high=2**63 - 1)
        else:
            hint = "" if raw.startswith("-") else " (words: rx, tx, threads, checksum, ...)"
            raise UsageError(f"unknown argument {raw!r}{hint}; see --help")
    if not cfg.mode:
        raise UsageError("say what to do: rx PORT or tx HOST PORT; see --help")
    if cfg.listen is not None and cfg.mode != "rx":
        raise UsageError("--listen goes with rx")
    if cfg.chaos is None and (cfg.chaos_rate is not None or cfg.chaos_faults is not None):
        raise UsageError("--chaos-rate and --chaos-faults need chaos SEED")
    if cfg.chaos_faults and "corrupt" in cfg.chaos_faults and not cfg.checksum:
        raise UsageError("chaos fault 'corrupt' needs checksum, or the output will be damaged")
    return cfg


def _setup_logging(cfg: Config) -> logging.Logger:
    from .monitor import verbosity_level

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG} {cfg.mode}: %(message)s"))
    root = logging.getLogger("viamillipede")
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(cfg.verbose))
    root.propagate = False
    return root


def _run(cfg: Config, log: logging.Logger) -> None:
    # Imported here: the import of trio/anyio costs ~0.1 s that --help should not pay.  The
    # garbage collector would walk the growing heap of fresh modules several times over
    # (~10 ms); afterwards, frozen, it never looks at those long-lived objects again.
    import gc

    gc.disable()
    import anyio
    import trio  # noqa: F401  # the backend anyio.run is given below: imported in this window

    from .api import serve_tcp, tcp_transmitter
    from .framing import first_error
    from .monitor import NOTE, RateMeter, known_size, show_progress, watch_signals
    from .transport import FdSink, FdSource

    if cfg.mode == "rx":
        from .receiver import Receiver

    gc.freeze()
    gc.enable()
    chaos = _chaos(cfg, log)
    reports: list[Report] = []

    async def main() -> None:
        meter = RateMeter()
        session: Receiver | Transmitter
        if cfg.mode == "rx":
            sink = FdSink(sys.stdout.fileno(), preallocate=PREALLOCATE_AHEAD)
            session = Receiver(sink, checkphrase=cfg.checkphrase, idle_timeout=cfg.timeout)
            size = cfg.size
            run = serve_tcp(session, cfg.port, host=cfg.listen,
                            wrap=chaos.receiver_wrapper() if chaos else None)
            close = sink.aclose
        else:
            source = FdSource(sys.stdin.fileno())
            session = tcp_transmitter(
                source, cfg.targets, threads=cfg.threads, chunk_size=cfg.chunk_size,
                checksum=cfg.checksum, checkphrase=cfg.checkphrase, idle_timeout=cfg.timeout,
                wrap=chaos.transmitter_wrapper() if chaos else None,
            )
            size = cfg.size if cfg.size is not None else known_size(sys.stdin.fileno())
            run = session.run()
            close = source.aclose
        try:
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_signals, session, cfg.verbose, meter)
                    if cfg.progress:
                        tg.start_soon(show_progress, session.report, size, meter)
                    stats = await run
                    tg.cancel_scope.cancel()
        finally:
            reports.append(session.report())  # for --stats-json, taken while the clock runs
            await close()
        log.log(NOTE, "%s", stats.summary())
        if log.isEnabledFor(logging.INFO):  # verbose >= 2, as SIGUSR2 may have changed it
            sys.stderr.write(session.report().render() + "\n")

    error: BaseException | None = None
    try:
        anyio.run(main, backend="trio")
    except BaseException as exc:
        error = exc
        raise
    finally:
        if chaos is not None:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(chaos.log.summary().items()) if n)
            log.log(NOTE, "chaos seed %d injected %s", cfg.chaos, counts or "no faults")
        if cfg.stats_json:
            _write_json(cfg, reports, chaos, error)


def _write_json(
    cfg: Config,
    reports: list[Report],
    chaos: ChaosScheduler | None,
    error: BaseException | None,
) -> None:
    from .monitor import write_stats_json

    assert cfg.stats_json is not None
    code, message = _outcome(error) if error is not None else (0, None)
    faults = None
    if chaos is not None:
        faults = {
            "seed": chaos.seed,
            "rate": chaos.rate,
            "kinds": sorted(k.value for k in chaos.kinds),
            "faults": [r.line() for r in chaos.log.records],
        }
    try:
        write_stats_json(cfg.stats_json, reports[0] if reports else None,
                         exit_code=code, error=message, chaos=faults)
    except OSError as exc:
        logging.getLogger("viamillipede").error("cannot write %s: %s", cfg.stats_json,
                                                exc.strerror)


def _outcome(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message for how a run ended."""
    if isinstance(exc, ViamillipedeError):
        return int(exc.exit_code), str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED), "interrupted"
    if isinstance(exc, OSError):  # stdin/stdout unusable
        return int(ExitCode.LOCAL_IO), str(exc.strerror or exc)
    return int(ExitCode.FAILURE), f"internal error: {exc!r}"


def _chaos(cfg: Config, log: logging.Logger) -> ChaosScheduler | None:
    """The fault injector the command line asked for, if any.

    By default it injects everything the session can survive on its own: resets, delays,
    fragmentation and silent stalls (the stall detector handles those), plus corrupted payload
    bytes when checksums are on to catch them.
    """
    if cfg.chaos is None:
        return None
    from .chaos import DEFAULT_RATE, ChaosScheduler

    faults = cfg.chaos_faults or ("reset", "stall", "delay", "short") + (
        ("corrupt",) if cfg.checksum else ()
    )
    rate = DEFAULT_RATE if cfg.chaos_rate is None else cfg.chaos_rate
    log.warning("chaos: seed %d, rate %g, faults %s", cfg.chaos, rate, ",".join(faults))
    return ChaosScheduler(cfg.chaos, rate=rate, kinds=faults)


def main(argv: Sequence[str] | None = None, *, run: Callable[[Config, logging.Logger], None]
         = _run) -> int:
    """Entry point of the ``viamillipede`` command; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    if isinstance(parsed, str):
        print(parsed)
        return 0
    log = _setup_logging(parsed)
    try:
        run(parsed, log)
    except (ViamillipedeError, OSError, KeyboardInterrupt) as exc:
        code, message = _outcome(exc)
        log.error("error: %s", message)
        return code
    return 0
