"""The command line: the original keyword grammar plus ordinary ``--flags``, over the library.

Parsing is hand-written rather than argparse because the seed grammar is positional keywords in
any order (``tx HOST PORT`` repeated, ``checksum`` as a bare word) which argparse cannot express,
and because both spellings must land in one config with one set of error messages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import ExitCode, LocalIOError, UsageError, ViamillipedeError, cannot_resolve

if TYPE_CHECKING:
    from .api import ServerWrapper
    from .chaos import ChaosScheduler
    from .monitor import Reporting
    from .ratelimit import RateLimitedSink, RateLimitedSource, TokenBucket
    from .receiver import Receiver
    from .stats import Report, TransferStats
    from .transmitter import Transmitter
from .options import (
    DEFAULT_CHECKPHRASE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    KEY_SIZE,
    MAX_CHECKPHRASE,
    MAX_CHUNK_SIZE,
    MAX_THREADS,
    MIN_CHUNK_SIZE,
    PREALLOCATE_AHEAD,
    encode_checkphrase,
)

PROG = "viamillipede"

#: Where a checkphrase may come from without showing in ``ps``.
CHECKPHRASE_ENV = "VIAMILLIPEDE_CHECKPHRASE"

HELP = f"""\
usage: {PROG} rx PORT [options]
       {PROG} tx HOST PORT [tx HOST PORT ...] [options]
       {PROG} tx --ssh [USER@]HOST [--via ADDR ...] [options] -- COMMAND

Carry a Unix pipe across the network over many parallel TCP connections.  The
receiver writes the stream to stdout complete and in order; chunks are re-sent
over other connections when one breaks, and nothing but the stream is ever
written to stdout.

Examples:
  # one command: ssh starts the receiver on backup1 with a fresh key, the
  # stream goes over parallel encrypted TCP connections into zfs recv there:
  zfs send pool/fs@snap | {PROG} tx --ssh backup1 -- zfs recv -F tank/fs
  #   the same to a file, through a second address of backup1, ssh on port 2222:
  zfs send pool/fs@snap | {PROG} tx --ssh root@backup1 --via 10.9.0.2 \\
      --ssh-command 'ssh -p 2222' -- 'cat > /backup/fs.zsend'
  # or start each end yourself; on the receiving host (first, or within the
  # timeout):
  {PROG} rx 8834 | zfs recv tank/fs
  # on the sending host, over two links in preference order, 8 connections:
  zfs send pool/fs@snap | {PROG} tx backup1 8834 tx backup1-10g 8834 threads 8
  # a secret phrase (from a file, not the command line) also keeps out a man
  # in the middle; sessions are always encrypted unless both ends say plaintext:
  tar cf - dir | {PROG} tx host 8834 --checkphrase-file ~/.vmp-phrase
  {PROG} rx 8834 --checkphrase-file ~/.vmp-phrase > dir.tar
  # a network you trust: zero-copy in clear, every chunk still checked (XXH3):
  {PROG} rx 8834 plaintext checksum > dir.tar
  # a slow link and data that compresses (a raw zfs send, logs): zstd chunks,
  # only while the link and not the CPU is what holds the stream back:
  zfs send pool/fs@snap | {PROG} tx backup1 8834 compress
  # at most 50 MB/s (50,000,000 bytes a second), evenly, without bursts:
  zfs send pool/fs@snap | {PROG} tx backup1 8834 limit 50M
  # a loopback smoke test:
  {PROG} rx 8834 > /tmp/copy & {PROG} tx localhost 8834 < /etc/services

Words (the original grammar, any order) and their --flag spellings:
  rx PORT             --rx PORT          receive: listen on PORT (IPv6 and IPv4)
  tx HOST PORT        --tx HOST PORT     transmit to HOST:PORT; repeat for more
                                         links, preferred first; a target named
                                         twice gets twice the connections; every
                                         HOST must resolve at start (else exit 2)
  tx --ssh [USER@]HOST ... -- COMMAND    start the receiver on HOST through ssh with
                                         COMMAND (run by the remote shell, as ssh
                                         runs it) as its output; its output, messages
                                         and failure come back here; a fresh random
                                         key per session, handed over on ssh's stdin
                      --via ADDR         another address of HOST, in preference order
                                         after HOST's own (like repeated tx targets)
                      --ssh-command CMD  how to run ssh (default ssh), split like a
                                         shell would: --ssh-command 'ssh -p 2222 -i k'
  --remote-viamillipede PATH             viamillipede on HOST (default: the one
                                         on its PATH)
                      --port P           the port the remote end listens on
                                         (default: any free one)
  threads N           --threads N        parallel connections, 1-{MAX_THREADS}
                                         (default {DEFAULT_THREADS})
  checksum            --checksum         XXH3 on every chunk, checked before it is
                                         written (plaintext only: sealed chunks
                                         carry a stronger tag already)
  checkphrase PHRASE  --checkphrase P    4-256 bytes both ends share; the keys that
                                         encrypt and authenticate the session are
                                         agreed from it (SPAKE2: never sent, no
                                         offline guessing). The default "{DEFAULT_CHECKPHRASE}"
                                         is public: it keeps out eavesdroppers, not
                                         a man in the middle; a secret phrase or a
                                         key file keeps out both
                      --checkphrase-file FILE  the phrase is FILE's first line;
                                         or set ${CHECKPHRASE_ENV} (not in ps)
  key FILE            --key-file FILE    use a key made by keygen instead of a phrase
  keygen FILE                            write a new random key to FILE (mode 600)
  plaintext           --plaintext        send the data in clear (zero-copy; for a
                                         network you trust); both ends must say it,
                                         the handshake stays authenticated
  compress [HOW]      --compress HOW     tx: zstd per chunk, in parallel worker
                                         threads; the receiver follows. HOW: auto
                                         (the word alone): compress while the
                                         network holds the stream back, not the
                                         CPU, at the level that goes fastest;
                                         zstd[:LEVEL] always (-7..-1 fast, 1..19,
                                         zstd alone is 3); off (default). Chunks
                                         that do not shrink go as they are
  timeout SECONDS     --timeout SECONDS  give up after this long without progress
                                         (default {DEFAULT_TIMEOUT:g})
  limit RATE          --limit RATE       at most RATE bytes a second for the whole
                                         session, e.g. 50M; on either end; smooth:
                                         never more than one chunk ahead of the rate;
                                         tx chunks shrink to pass in 1/8 of timeout
  retry-resolve       --retry-resolve    tx: keep trying a HOST that does not
                                         resolve (yet), until the timeout
  verbose N           --verbose N, -v N  0 errors only, 1 warnings and a summary
                                         (default), 2 connection events, 3 debug;
                                         -v alone adds one level, -vv two
  chaos SEED          --chaos SEED       inject seeded faults (resets, stalls, delays,
                                         fragmentation; corruption unless plaintext
                                         without checksum):
                                         the same seed breaks the same operations
                      --chaos-rate P     chance of a fault per operation (0.02)
                      --chaos-faults L   e.g. reset,delay (of reset stall delay
                                         short corrupt)
                      --chunk-size BYTES chunk size, e.g. 512KiB, 1M (default 2MiB)
                      --listen ADDR      rx only: listen on ADDR instead of all
                      --progress         a pv-like progress line on stderr
                      --size BYTES       expected size, for progress percentage and
                                         ETA (a regular file on stdin is measured)
                      --stats-json FILE  write the final statistics (and the chaos
                                         fault log) as JSON; see docs/stats.md
                      --quiet, -q        same as verbose 0
                      --help, -h         this text
                      --version          print the version

Units:
  BYTES, RATE         decimal: 2k = 2000, 2M = 2000000, 2G = 2000000000 bytes
                      (a second, for a RATE); binary with an i: 2KiB = 2048,
                      2MiB = 2097152, 2GiB; a plain number is bytes
  shown               in decimal units: MB = 1000000 bytes, MB/s

Signals:
  SIGUSR1 (SIGINFO on BSD)  print a report to stderr: bytes, rates, window, the
                            limit, each connection and link; the transfer goes on
  SIGUSR2                   next verbosity level (0, 1, 2, 3, then 0 again)
  SIGINT, SIGTERM           stop cleanly, tell the peer, exit 130

Exit status:
  0 success: every byte written and confirmed     5 stream ended early / totals differ
  2 bad command line, or an unknown host name     6 local input or output failed
  3 peer rejected (phrase/key, plaintext, session) 7 the peer aborted, or --ssh COMMAND failed
  4 no progress within the timeout                8 protocol violation
  1 cannot listen (port in use), or other         9 ssh failed (tx --ssh), or its channel was lost
130 interrupted (Ctrl-C, SIGTERM)
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
    checkphrase: bytes = DEFAULT_CHECKPHRASE.encode()
    key: bytes | None = None
    plaintext: bool = False
    #: tx: "auto", a zstd level, or None (off)
    compress: int | str | None = None
    keygen: str | None = None
    chaos: int | None = None
    chaos_rate: float | None = None
    chaos_faults: tuple[str, ...] | None = None
    progress: bool = False
    stats_json: str | None = None
    size: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    timeout: float = DEFAULT_TIMEOUT
    limit: float | None = None
    retry_resolve: bool = False
    #: tx --ssh: where to start the receiver, and how
    ssh: str | None = None
    via: list[str] = field(default_factory=list)
    ssh_command: str = "ssh"
    remote_viamillipede: str = "viamillipede"
    remote_command: list[str] = field(default_factory=list)
    #: ssh-rx (started by tx --ssh): the remote shell command the stream goes to
    sink: str | None = None


def _int(word: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"{word} needs a whole number, got {value!r}") from None
    if not low <= n <= high:
        raise UsageError(f"{word} must be between {low} and {high}, got {n}")
    return n


def _checkphrase(phrase: bytes, where: str) -> bytes:
    try:
        return encode_checkphrase(phrase)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _checkphrase_file(path: str) -> bytes:
    """The phrase is the file's first line (its line end is not part of it)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(MAX_CHECKPHRASE + 3)
    except OSError as exc:
        raise UsageError(f"--checkphrase-file {path}: {exc.strerror or exc}") from None
    return _checkphrase(first.rstrip(b"\r\n"), f"--checkphrase-file {path}")


def read_key(path: str) -> bytes:
    """A key file: 64 hex digits (as keygen writes it) or 32 raw bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(1024)
    except OSError as exc:
        raise UsageError(f"key {path}: {exc.strerror or exc}") from None
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == KEY_SIZE:
        return data
    raise UsageError(f"key {path}: not a key (64 hex digits, as keygen writes, or "
                     f"{KEY_SIZE} raw bytes)")


def write_key(path: str) -> None:
    """``keygen FILE``: a fresh random key, readable by its owner only; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise LocalIOError(f"keygen {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(KEY_SIZE).hex() + "\n")


def _port(word: str, value: str) -> int:
    return _int(f"{word} port", value, 1, 65535)


#: A size or rate: a number, then k/M/G/T (decimal) or Ki/Mi/Gi/Ti (binary), then an optional B.
_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?b?", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def quantity(text: str) -> int | None:
    """``2M`` -> 2000000, ``2MiB`` -> 2097152, ``512`` -> 512: the one convention for every size
    and rate on the command line (decimal prefixes, binary ones with an i).  None if ``text``
    is not a quantity."""
    m = _QUANTITY.fullmatch(text.strip())
    if m is None:
        return None
    number, prefix, binary = m.groups()
    scale = (1024 if binary else 1000) ** _POWERS[prefix.lower()] if prefix else 1
    if "." in number:
        return round(float(number) * scale)
    return int(number) * scale  # exact, however large


def _size(word: str, value: str, low: int = MIN_CHUNK_SIZE, high: int = MAX_CHUNK_SIZE) -> int:
    n = quantity(value)
    if n is None:
        raise UsageError(
            f"{word} needs a size like 2M (2000000 bytes), 2MiB or 524288, got {value!r}"
        )
    if not low <= n <= high:
        raise UsageError(f"{word} must be between {low} and {high} bytes, got {n}")
    return n


MIN_LIMIT = 1000


def _limit(word: str, value: str) -> float:
    n = quantity(value.removesuffix("/s"))
    if n is None:
        raise UsageError(
            f"{word} needs bytes a second like 50M (50000000) or 10MiB, got {value!r}"
        )
    if n < MIN_LIMIT:
        raise UsageError(f"{word} must be at least {MIN_LIMIT} bytes a second (1k), got {n}")
    return float(n)


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

    def rest(self) -> list[str]:
        rest, self._i = self._argv[self._i :], len(self._argv)
        return rest

    def peek(self) -> str | None:
        return self._argv[self._i] if self else None

    def value(self, word: str, what: str) -> str:
        if not self:
            raise UsageError(f"{word} needs {what}")
        return self.next()


#: Words that take no value, so ``--checksum=off`` is an error rather than a silent "on".
_SWITCHES = frozenset(
    {"help", "version", "quiet", "checksum", "checksums", "progress", "retry-resolve",
     "plaintext"}
)


#: The words of the original grammar: never taken as the value of an optional one.
_GRAMMAR_WORDS = frozenset(
    {"rx", "tx", "threads", "verbose", "checksum", "checksums", "checkphrase", "key",
     "key-file", "plaintext", "keygen", "chaos", "timeout", "limit", "retry-resolve",
     "compress", "help"}
)


def parse(argv: Sequence[str]) -> Config | str:
    """Parse arguments into a Config, or return text to print (``--help``, ``--version``)."""
    cfg = Config()
    words = _Words(argv)
    rx_seen = False
    chunk_given = False
    phrase_given = False

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
        elif raw == "-v" and (level := words.peek()) is not None and level.isdigit():
            cfg.verbose = _int("-v", words.next(), 0, 9)
        elif re.fullmatch(r"-v+", raw):
            cfg.verbose += len(raw) - 1
        elif re.fullmatch(r"-v\d+", raw):
            cfg.verbose = _int("-v", raw[2:], 0, 9)
        elif word == "rx":
            set_mode("rx")
            if rx_seen:
                raise UsageError("rx can be given only once")
            rx_seen = True
            cfg.port = _port("rx", arg("a PORT"))
        elif word == "tx" and (words.peek() == "--ssh" or (inline is None and str(
                words.peek()).startswith("--ssh="))):
            set_mode("tx")  # tx --ssh HOST: the target is the receiver ssh starts
        elif raw == "--ssh":
            set_mode("tx")
            cfg.ssh = arg("[USER@]HOST")
        elif raw == "--via":
            cfg.via.append(arg("an address of the ssh host").strip("[]"))
        elif raw == "--ssh-command":
            cfg.ssh_command = arg("a command, like 'ssh -p 2222'")
            if not shlex.split(cfg.ssh_command):
                raise UsageError("--ssh-command needs a command, like 'ssh -p 2222'")
        elif raw == "--remote-viamillipede":
            cfg.remote_viamillipede = arg("a path")
        elif raw == "--port":
            cfg.port = _port("--port", arg("a PORT"))
        elif raw == "--" and inline is None:
            cfg.remote_command = words.rest()
        elif word == "ssh-rx":
            set_mode("ssh-rx")
        elif raw == "--sink":
            cfg.sink = arg("a command")
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
            cfg.checkphrase = _checkphrase(arg("a phrase of 4 to 256 bytes").encode("utf-8"),
                                           "checkphrase")
            phrase_given = True
        elif raw == "--checkphrase-file":
            cfg.checkphrase = _checkphrase_file(arg("a file name"))
            phrase_given = True
        elif word in ("key", "key-file"):
            cfg.key = read_key(arg("a key file (made by keygen)"))
        elif word == "plaintext":
            cfg.plaintext = True
        elif word == "compress":
            cfg.compress = _compress(raw, inline, words)
        elif word == "keygen":
            set_mode("keygen")
            cfg.keygen = arg("a file to write the key to")
        elif word == "chaos":
            cfg.chaos = _int("chaos", arg("a seed"), 0, 2**63 - 1)
        elif raw == "--chaos-rate":
            cfg.chaos_rate = _rate(arg("a probability"))
        elif raw == "--chaos-faults":
            cfg.chaos_faults = _faults(arg("a list of faults"))
        elif word == "timeout":
            cfg.timeout = _seconds("timeout", arg("seconds"))
        elif word == "limit":
            cfg.limit = _limit(word, arg("a rate in bytes a second, like 50M"))
        elif word == "retry-resolve":
            cfg.retry_resolve = True
        elif raw == "--chunk-size":
            cfg.chunk_size = _size("--chunk-size", arg("a size"))
            chunk_given = True
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
    if not phrase_given and (env := os.environ.get(CHECKPHRASE_ENV)) is not None:
        cfg.checkphrase = _checkphrase(env.encode("utf-8"), CHECKPHRASE_ENV)
    if cfg.key is not None and phrase_given:
        raise UsageError("give a key file or a checkphrase, not both")
    if cfg.listen is not None and cfg.mode != "rx":
        raise UsageError("--listen goes with rx")
    if cfg.compress is not None and cfg.mode != "tx":
        raise UsageError("compress goes with tx: the receiver follows what the transmitter "
                         "announces")
    if cfg.retry_resolve and cfg.mode != "tx":
        raise UsageError("retry-resolve goes with tx")
    if cfg.limit is not None:
        _fit_chunks_to_limit(cfg, chunk_given)
    _check_ssh(cfg, phrase_given)
    if cfg.chaos is None and (cfg.chaos_rate is not None or cfg.chaos_faults is not None):
        raise UsageError("--chaos-rate and --chaos-faults need chaos SEED")
    if cfg.chaos_faults and "corrupt" in cfg.chaos_faults and cfg.plaintext and not cfg.checksum:
        raise UsageError("chaos fault 'corrupt' in plaintext needs checksum, or the output will "
                         "be damaged")
    return cfg


def _compress(raw: str, inline: str | None, words: _Words) -> int | str | None:
    """``compress`` alone means auto; a value after it is taken only if it is one
    (``compress tx HOST PORT`` must leave ``tx`` alone)."""
    from .squeeze import parse_compress

    if inline is not None:
        text = inline
    else:
        following = words.peek()
        if following is None:
            return "auto"
        try:
            parse_compress(following)
        except ValueError:
            # Clearly meant as the value (say what is wrong with it): a zstd anything, or,
            # after --compress, any word that is not one of the grammar's or a flag.
            meant = following.lower().startswith("zstd") or (
                raw.startswith("--") and not following.startswith("-")
                and following not in _GRAMMAR_WORDS)
            if not meant:
                return "auto"
        text = words.next()
    try:
        return parse_compress(text)
    except ValueError as exc:
        raise UsageError(f"{raw}: {exc}") from None


def _check_ssh(cfg: Config, phrase_given: bool) -> None:
    if cfg.ssh is None:
        for given, what in ((cfg.via, "--via"), (cfg.remote_command, "a command after --"),
                            (cfg.ssh_command != "ssh", "--ssh-command"),
                            (cfg.remote_viamillipede != "viamillipede", "--remote-viamillipede"),
                            (cfg.port and cfg.mode == "tx", "--port")):
            if given:
                raise UsageError(f"{what} goes with tx --ssh HOST")
        if cfg.mode == "ssh-rx" and cfg.sink is None:
            raise UsageError("ssh-rx is started by tx --ssh (it needs --sink)")
        if cfg.sink is not None and cfg.mode != "ssh-rx":
            raise UsageError("--sink goes with ssh-rx")
        return
    if cfg.targets:
        raise UsageError("give tx --ssh HOST or tx HOST PORT, not both")
    if not cfg.remote_command:
        raise UsageError("tx --ssh HOST needs the remote command after --, like "
                         "-- zfs recv tank/fs, or -- 'cat > /backup/fs.zsend'")
    if cfg.key is not None or phrase_given or cfg.plaintext:
        raise UsageError("tx --ssh makes a fresh key for every session: no checkphrase, key "
                         "or plaintext")


#: At a limited rate a chunk should take at most this share of the timeout: each end counts a
#: chunk written (tx) or received (rx) as progress, so one must come well within the timeout.
CHUNK_SHARE_OF_TIMEOUT = 1 / 8


def largest_chunk(limit: float, timeout: float) -> int:
    """The largest chunk that ``limit`` bytes a second carry in 1/8 of ``timeout`` seconds, in
    whole 4 KiB pages."""
    return int(limit * timeout * CHUNK_SHARE_OF_TIMEOUT) // 4096 * 4096


def _fit_chunks_to_limit(cfg: Config, chunk_given: bool) -> None:
    """A limited transmitter's chunks must come well within the timeout: the default chunk
    size shrinks to fit; a chunk size given that does not fit is a usage error.  A limit at
    which not even the smallest chunk fits is one on either end."""
    assert cfg.limit is not None
    fits = largest_chunk(cfg.limit, cfg.timeout)
    if fits < MIN_CHUNK_SIZE:
        raise UsageError(
            f"limit {cfg.limit:.0f} is too low for timeout {cfg.timeout:g}: even a chunk of "
            f"{MIN_CHUNK_SIZE} bytes would take {MIN_CHUNK_SIZE / cfg.limit:.1f} s; "
            "raise the limit or the timeout"
        )
    if cfg.mode != "tx" or cfg.chunk_size <= fits:
        return
    if chunk_given:
        raise UsageError(
            f"--chunk-size {cfg.chunk_size} takes {cfg.chunk_size / cfg.limit:.1f} s at limit "
            f"{cfg.limit:.0f}; with timeout {cfg.timeout:g} use at most {fits} bytes"
        )
    cfg.chunk_size = fits


def _setup_logging(cfg: Config) -> logging.Logger:
    from .monitor import verbosity_level

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG} {cfg.mode}: %(message)s"))
    root = logging.getLogger("viamillipede")
    root.handlers[:] = [handler]
    root.setLevel(verbosity_level(cfg.verbose))
    root.propagate = False
    return root


def _run(cfg: Config, log: logging.Logger, *, output_fd: int | None = None,
         listening: Callable[[int], None] | None = None,
         until: Callable[[Reporting], Coroutine[Any, Any, None]] | None = None) -> None:
    """The session the command line asks for.  ``tx --ssh``'s remote end (sshmode) gives the
    receiver another output, is told its port once it listens, and has ``until`` watch the
    session (which it aborts when its ssh channel closes)."""
    # Imported here: the import of trio/anyio costs ~0.1 s that --help should not pay.  The
    # garbage collector would walk the growing heap of fresh modules several times over
    # (~10 ms); afterwards, frozen, it never looks at those long-lived objects again.
    import gc

    gc.disable()
    import anyio
    import trio  # noqa: F401  # the backend anyio.run is given below: imported in this window

    from .api import tcp_transmitter
    from .framing import first_error
    from .monitor import NOTE, RateMeter, known_size, show_progress, watch_signals
    from .ratelimit import limit_sink, limit_source
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
        bucket: TokenBucket | None = None
        if cfg.mode == "rx":
            sink = FdSink(sys.stdout.fileno() if output_fd is None else output_fd,
                          preallocate=PREALLOCATE_AHEAD)
            out: FdSink | RateLimitedSink = sink
            if cfg.limit is not None:
                out = limit_sink(sink, cfg.limit)
                bucket = out.bucket
                fits = largest_chunk(cfg.limit, cfg.timeout)
                if fits < DEFAULT_CHUNK_SIZE:
                    log.warning("limit %.0f: give the transmitter --chunk-size %d or less, or "
                                "a chunk may take longer than the timeout to write",
                                cfg.limit, fits)
            session = Receiver(out, checkphrase=cfg.checkphrase, key=cfg.key,
                               plaintext=cfg.plaintext, idle_timeout=cfg.timeout)
            size = cfg.size
            run = _serve(session, cfg.port, cfg.listen,
                         chaos.receiver_wrapper() if chaos else None, listening)
            close = sink.aclose
        else:
            source = FdSource(sys.stdin.fileno())
            into: FdSource | RateLimitedSource = source
            if cfg.limit is not None:
                into = limit_source(source, cfg.limit, cfg.chunk_size)
                bucket = into.bucket
            session = tcp_transmitter(
                into, cfg.targets, threads=cfg.threads, chunk_size=cfg.chunk_size,
                checksum=cfg.checksum, checkphrase=cfg.checkphrase, key=cfg.key,
                plaintext=cfg.plaintext, idle_timeout=cfg.timeout,
                wrap=chaos.transmitter_wrapper() if chaos else None, compress=cfg.compress,
            )
            size = cfg.size if cfg.size is not None else known_size(sys.stdin.fileno())
            run = session.run()
            close = source.aclose
        watched = _WithLimit(session, bucket)
        try:
            with first_error():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch_signals, watched, cfg.verbose, meter)
                    if cfg.progress:
                        tg.start_soon(show_progress, watched.report, size, meter)
                    if until is not None:
                        tg.start_soon(until, session)
                    stats = await run
                    tg.cancel_scope.cancel()
        finally:
            reports.append(watched.report())  # for --stats-json, taken while the clock runs
            await close()
        log.log(NOTE, "%s", stats.summary())
        if (compression := watched.report().compression) is not None:
            log.log(NOTE, "%s", compression.summary())
        if log.isEnabledFor(logging.INFO):  # verbose >= 2, as SIGUSR2 may have changed it
            sys.stderr.write(watched.report().render() + "\n")

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


async def _serve(session: Receiver, port: int, host: str | None, wrap: ServerWrapper | None,
                 listening: Callable[[int], None] | None) -> TransferStats:
    """serve_tcp, telling ``listening`` the port once it listens."""
    import anyio

    from .api import serve_tcp

    if listening is None:
        return await serve_tcp(session, port, host=host, wrap=wrap)
    result: list[TransferStats] = []

    async def serve(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        result.append(await serve_tcp(session, port, host=host, wrap=wrap,
                                      task_status=task_status))

    async with anyio.create_task_group() as tg:
        listening(await tg.start(serve))
    return result[0]


class _WithLimit:
    """A session whose reports also show the rate limit (``limit RATE``), if there is one."""

    def __init__(self, session: Reporting, bucket: TokenBucket | None) -> None:
        self._session = session
        self._bucket = bucket

    def report(self) -> Report:
        report = self._session.report()
        if self._bucket is None:
            return report
        return dataclasses.replace(report, limit=self._bucket.stats())

    def abort(self, reason: str = "interrupted") -> None:
        self._session.abort(reason)


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
    bytes when something catches them: the AEAD tag of a sealed session, or plaintext checksums.
    """
    if cfg.chaos is None:
        return None
    from .chaos import DEFAULT_RATE, ChaosScheduler

    faults = cfg.chaos_faults or ("reset", "stall", "delay", "short") + (
        ("corrupt",) if cfg.checksum or not cfg.plaintext else ()
    )
    rate = DEFAULT_RATE if cfg.chaos_rate is None else cfg.chaos_rate
    log.warning("chaos: seed %d, rate %g, faults %s", cfg.chaos, rate, ",".join(faults))
    return ChaosScheduler(cfg.chaos, rate=rate, kinds=faults)


Resolver = Callable[[str, int, bool], object]
"""``resolve(host, port, passive)``: raises OSError if the name does not resolve."""


def _resolve(host: str, port: int, passive: bool) -> object:
    flags = socket.AI_PASSIVE if passive else 0
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)


def check_names(cfg: Config, resolve: Resolver = _resolve) -> None:
    """Resolve every name the command line gives before anything starts: a target (unless
    ``retry-resolve``) or a ``--listen`` address that does not resolve is a bad command line,
    reported at once rather than after the timeout."""
    if cfg.mode == "tx" and not cfg.retry_resolve:
        if cfg.ssh is not None:
            from .sshmode import target_host

            # The data connections go to these addresses, not through ssh.
            for host, what in ((target_host(cfg.ssh), "the ssh host"),
                               *((via, "the --via address") for via in cfg.via)):
                try:
                    resolve(host, 1, False)
                except OSError as exc:
                    raise cannot_resolve(host, exc, what) from exc
        for host, port in dict.fromkeys(cfg.targets):
            try:
                resolve(host, port, False)
            except OSError as exc:
                raise cannot_resolve(host, exc) from exc
    if cfg.listen is not None:
        try:
            resolve(cfg.listen, cfg.port, True)
        except OSError as exc:
            raise cannot_resolve(cfg.listen, exc, "the --listen address") from exc


def main(argv: Sequence[str] | None = None, *, run: Callable[[Config, logging.Logger], None]
         = _run, resolve: Resolver = _resolve) -> int:
    """Entry point of the ``viamillipede`` command; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse(args)
        if isinstance(parsed, Config):
            check_names(parsed, resolve)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:  # a slow name server, given up on
        return int(ExitCode.INTERRUPTED)
    if isinstance(parsed, str):
        print(parsed)
        return 0
    log = _setup_logging(parsed)
    try:
        if parsed.mode == "keygen":
            assert parsed.keygen is not None
            write_key(parsed.keygen)
            return 0
        if parsed.ssh is not None or parsed.mode == "ssh-rx":
            from . import sshmode

            if parsed.mode == "ssh-rx":
                return sshmode.run_remote(parsed, log, run)
            sshmode.run_local(parsed, log, run)
            return 0
        run(parsed, log)
    except (ViamillipedeError, OSError, KeyboardInterrupt) as exc:
        code, message = _outcome(exc)
        log.error("error: %s", message)
        return code
    return 0
