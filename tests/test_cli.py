"""The command line: both grammars into one Config, usage errors, help, and main's exit codes.

Everything here runs in-process (``cli.parse`` / ``cli.main(argv, run=fake)``), except one
check that a real ``python -m viamillipede`` with bad arguments exits 2 without a traceback.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import pytest

from viamillipede import __version__, cli
from viamillipede.cli import Config
from viamillipede.errors import (
    ExitCode,
    LocalIOError,
    PeerRejected,
    PeerTimeout,
    RemoteFailure,
    TruncatedStream,
)
from viamillipede.options import DEFAULT_CHECKPHRASE, DEFAULT_CHUNK_SIZE, DEFAULT_THREADS

SEED_TX = "tx HOST 8834 tx HOST2 8834 threads 8 checksum chaos 1731 checkphrase wat! verbose 3"


def parse(argv: str | list[str]) -> Config:
    result = cli.parse(argv.split() if isinstance(argv, str) else argv)
    assert isinstance(result, Config), result
    return result


class FakeRun:
    """Stands in for the real session: records the config, optionally raises."""

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc
        self.configs: list[Config] = []

    def __call__(self, cfg: Config, log: logging.Logger) -> None:
        self.configs.append(cfg)
        if self.exc is not None:
            raise self.exc


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str], exc: BaseException | None = None
) -> tuple[int, str, str, FakeRun]:
    fake = FakeRun(exc)
    code = cli.main(argv, run=fake)
    out, err = capsys.readouterr()
    return code, out, err, fake


# -- the seed grammar ------------------------------------------------------------------------


def test_rx_port() -> None:
    assert parse("rx 8834") == Config(mode="rx", port=8834)


def test_rx_defaults() -> None:
    cfg = parse("rx 8834")
    assert cfg.threads == DEFAULT_THREADS
    assert cfg.chunk_size == DEFAULT_CHUNK_SIZE
    assert cfg.checkphrase == DEFAULT_CHECKPHRASE
    assert cfg.checksum is False
    assert cfg.chaos is None
    assert cfg.listen is None
    assert cfg.verbose == 1


def test_seed_tx_all_words() -> None:
    cfg = parse(SEED_TX)
    assert cfg == Config(
        mode="tx",
        targets=[("HOST", 8834), ("HOST2", 8834)],
        threads=8,
        checksum=True,
        chaos=1731,
        checkphrase="wat!",
        verbose=3,
    )


def test_seed_words_in_any_order() -> None:
    groups = [
        ["tx", "HOST", "8834"],
        ["tx", "HOST2", "8834"],
        ["threads", "8"],
        ["checksum"],
        ["chaos", "1731"],
        ["checkphrase", "wat!"],
        ["verbose", "3"],
    ]
    expected = parse(SEED_TX)
    tried = 0
    for order in itertools.permutations(groups):
        # Targets keep their order (it is the preference order); everything else is free.
        if order.index(groups[0]) > order.index(groups[1]):
            continue
        argv = [word for group in order for word in group]
        assert parse(argv) == expected, argv
        tried += 1
    assert tried == 2520


def test_rx_words_in_any_order() -> None:
    expected = parse("rx 8834 checkphrase wat! verbose 2 timeout 5")
    assert parse("verbose 2 timeout 5 checkphrase wat! rx 8834") == expected
    assert parse("checkphrase wat! rx 8834 timeout 5 verbose 2") == expected


def test_checksums_alias() -> None:
    assert parse("tx h 1 checksums") == parse("tx h 1 checksum")
    assert parse("tx h 1 checksums").checksum is True


def test_target_named_twice_is_kept_twice() -> None:
    assert parse("tx a 1 tx a 1 tx b 2").targets == [("a", 1), ("a", 1), ("b", 2)]


def test_help_word() -> None:
    assert cli.parse(["help"]) == cli.HELP


# -- GNU flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        ("tx h 1 --threads 8", "threads", 8),
        ("tx h 1 --threads=8", "threads", 8),
        ("tx h 1 --checksum", "checksum", True),
        ("tx h 1 --checksums", "checksum", True),
        ("--tx HOST 8834", "targets", [("HOST", 8834)]),
        ("--tx=HOST:8834", "targets", [("HOST", 8834)]),
        ("--tx=[::1]:8834", "targets", [("::1", 8834)]),
        ("--tx HOST 1 --tx=HOST2:2", "targets", [("HOST", 1), ("HOST2", 2)]),
        ("tx h 1 --chunk-size 512K", "chunk_size", 512 * 1024),
        ("tx h 1 --chunk-size=2M", "chunk_size", 2 * 1024 * 1024),
        ("tx h 1 --chunk-size 64KiB", "chunk_size", 64 * 1024),
        ("tx h 1 --chunk-size 524288", "chunk_size", 524288),
        ("tx h 1 --timeout 5", "timeout", 5.0),
        ("tx h 1 --timeout=0.5", "timeout", 0.5),
        ("rx 1 --listen 127.0.0.1", "listen", "127.0.0.1"),
        ("rx 1 --listen=::1", "listen", "::1"),
        ("--rx 8834", "port", 8834),
        ("--rx=8834", "port", 8834),
        ("rx 1 -q", "verbose", 0),
        ("rx 1 --quiet", "verbose", 0),
        ("rx 1 -v", "verbose", 2),
        ("rx 1 -v -v", "verbose", 3),
        ("rx 1 --verbose 3", "verbose", 3),
        ("rx 1 --verbose=0", "verbose", 0),
        ("tx h 1 --checkphrase wat!", "checkphrase", "wat!"),
        ("tx h 1 --checkphrase=wat!", "checkphrase", "wat!"),
        ("tx h 1 --chaos 1731", "chaos", 1731),
    ],
)
def test_gnu_flag(argv: str, field: str, value: object) -> None:
    assert getattr(parse(argv), field) == value


@pytest.mark.parametrize(
    ("seed", "gnu"),
    [
        (
            SEED_TX,
            "--tx HOST 8834 --tx=HOST2:8834 --threads=8 --checksum --chaos 1731 "
            "--checkphrase=wat! --verbose 3",
        ),
        ("rx 8834", "--rx 8834"),
        ("rx 8834 timeout 5 verbose 0", "--rx=8834 --timeout=5 -q"),
        ("rx 8834 verbose 2 checkphrase abcd", "-v --checkphrase abcd --rx=8834"),
        ("tx h 9 threads 1 timeout 2.5", "--threads 1 --tx=h:9 --timeout 2.5"),
        ("tx h 9 checksums threads 64", "--tx h 9 --checksum --threads=64"),
    ],
)
def test_both_spellings_give_equal_config(seed: str, gnu: str) -> None:
    assert parse(seed) == parse(gnu)


def test_spellings_mix() -> None:
    assert parse("tx h 1 --threads 8 checksum --chunk-size 512K") == Config(
        mode="tx", targets=[("h", 1)], threads=8, checksum=True, chunk_size=512 * 1024
    )


def test_later_word_wins() -> None:
    assert parse("tx h 1 threads 2 --threads 3").threads == 3
    assert parse("rx 1 -v verbose 0").verbose == 0


# -- usage errors: exit 2, one line on stderr, nothing on stdout, the run never starts -------

USAGE_ERRORS = {
    "unknown word": "rx 8834 frobnicate",
    "unknown flag": "rx 8834 --frobnicate",
    "unknown short flag": "rx 8834 -x",
    "rx without port": "rx",
    "tx without host": "tx",
    "tx without port": "tx HOST",
    "--tx without port": "--tx HOST",
    "--tx= without port": "--tx=HOST",
    "threads without value": "tx h 1 threads",
    "--threads without value": "tx h 1 --threads",
    "checkphrase without value": "rx 1 checkphrase",
    "chaos without value": "rx 1 chaos",
    "timeout without value": "rx 1 timeout",
    "verbose without value": "rx 1 verbose",
    "--chunk-size without value": "tx h 1 --chunk-size",
    "--listen without value": "rx 1 --listen",
    "threads not a number": "tx h 1 threads eight",
    "threads empty": "tx h 1 --threads=",
    "threads fraction": "tx h 1 threads 2.5",
    "chaos not a number": "tx h 1 chaos x",
    "verbose not a number": "rx 1 verbose loud",
    "timeout not a number": "rx 1 timeout soon",
    "timeout zero": "rx 1 timeout 0",
    "timeout nan": "rx 1 timeout nan",
    "chunk size not a size": "tx h 1 --chunk-size 12Q",
    "chunk size too small": "tx h 1 --chunk-size 100",
    "chunk size too big": "tx h 1 --chunk-size 1G",
    "threads 0": "tx h 1 threads 0",
    "threads 65": "tx h 1 threads 65",
    "--threads=65": "tx h 1 --threads=65",
    "rx port 0": "rx 0",
    "rx port 65536": "rx 65536",
    "rx port abc": "rx abc",
    "tx port 0": "tx h 0",
    "tx port 65536": "tx h 65536",
    "tx port abc": "tx h abc",
    "--tx= port abc": "--tx=h:abc",
    "--tx= no host": "--tx=:8834",
    "checkphrase 3 chars": "rx 1 checkphrase abc",
    "checkphrase 5 chars": "rx 1 checkphrase abcde",
    "checkphrase 4 chars 5 bytes": "rx 1 checkphrase abc\u00e9",
    "rx and tx": "rx 8834 tx h 1",
    "tx and rx": "tx h 1 rx 8834",
    "rx twice": "rx 1 rx 2",
    "no mode at all": "",
    "options but no mode": "threads 4 checksum",
    "--listen with tx": "tx h 1 --listen 127.0.0.1",
    "--checksum=off": "tx h 1 --checksum=off",
    "--quiet=no": "rx 1 --quiet=no",
}


@pytest.mark.parametrize("argv", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error(argv: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = run_main(argv.split(), capsys)
    assert code == ExitCode.USAGE
    assert code == 2
    assert out == ""
    assert err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("viamillipede: ")
    assert "Traceback" not in err
    assert fake.configs == []


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ("rx 8834 frobnicate", ["frobnicate"]),
        ("tx h 1 threads 65", ["threads", "65"]),
        ("rx 65536", ["65536"]),
        ("tx h abc", ["abc"]),
        ("rx 1 checkphrase abcde", ["checkphrase"]),
        ("rx 8834 tx h 1", ["rx", "tx"]),
        ("tx h 1 --listen 127.0.0.1", ["--listen"]),
        ("tx HOST", ["PORT"]),
    ],
)
def test_usage_error_names_the_problem(
    argv: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, err, _ = run_main(argv.split(), capsys)
    for word in words:
        assert word in err


def test_usage_error_in_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "viamillipede", "tx", "h", "1", "threads", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


# -- help and version ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = run_main(["rx", "8834", flag], capsys)
    assert code == 0
    assert err == ""
    assert fake.configs == []
    assert out.startswith("usage: viamillipede rx PORT")
    assert "Examples:" in out
    assert "viamillipede rx 8834" in out
    assert "viamillipede tx " in out
    for word in ("threads", "checksum", "checkphrase", "--chunk-size", "--listen", "Exit status"):
        assert word in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_help_wins_over_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _, _ = run_main(["--help", "threads", "0"], capsys)
    assert code == 0
    assert out.startswith("usage:")


def test_help_in_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "viamillipede", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage:")
    assert proc.stderr == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = run_main(["--version"], capsys)
    assert code == 0
    assert out == f"viamillipede {__version__}\n"
    assert err == ""
    assert fake.configs == []


# -- main: the run it starts, and how failures map to exit codes -----------------------------


def test_main_hands_the_config_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = run_main(SEED_TX.split(), capsys)
    assert code == 0
    assert (out, err) == ("", "")
    assert fake.configs == [parse(SEED_TX)]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (PeerRejected("the receiver rejected checkphrase 'yoes'"), 3),
        (PeerTimeout("no progress"), 4),
        (TruncatedStream("stream ended early"), 5),
        (LocalIOError("writing output failed: broken pipe"), 6),
        (RemoteFailure("the receiver's output failed"), 7),
        (OSError(98, "Address already in use"), 6),
        (KeyboardInterrupt(), 130),
    ],
)
def test_main_maps_failures_to_exit_codes(
    exc: BaseException, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, err, _ = run_main(["rx", "8834"], capsys, exc)
    assert got == code
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("viamillipede rx: ")
    assert "Traceback" not in err
    if isinstance(exc, OSError):
        assert str(exc.strerror) in err
    elif not isinstance(exc, KeyboardInterrupt):
        assert str(exc) in err


def test_main_quiet_still_prints_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err, _ = run_main(["rx", "8834", "-q"], capsys, PeerTimeout("silent"))
    assert code == 4
    assert "silent" in err
