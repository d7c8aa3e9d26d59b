"""The command line: both grammars into one Config, usage errors, help, and main's exit codes.

Everything here runs in-process (``cli.parse`` / ``cli.main(argv, run=fake)``), except a few
checks that a real ``python -m viamillipede`` with bad arguments (or a name that does not
resolve) exits 2 without a traceback.  Names that must not resolve end in ``.invalid``, which
RFC 6761 reserves for exactly that: no test needs a network beyond loopback.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

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
from viamillipede.stats import LimitStats, Report, TargetStats, TransferStats

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


def resolve_anything(host: str, port: int, passive: bool) -> object:
    """A resolver for which every name exists (``HOST``, ``h``...): parsing tests need none."""
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def run_main(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    exc: BaseException | None = None,
    resolve: cli.Resolver = resolve_anything,
) -> tuple[int, str, str, FakeRun]:
    fake = FakeRun(exc)
    code = cli.main(argv, run=fake, resolve=resolve)
    out, err = capsys.readouterr()
    return code, out, err, fake


# -- the seed grammar ------------------------------------------------------------------------


def test_rx_port() -> None:
    assert parse("rx 8834") == Config(mode="rx", port=8834)


def test_rx_defaults() -> None:
    cfg = parse("rx 8834")
    assert cfg.threads == DEFAULT_THREADS
    assert cfg.chunk_size == DEFAULT_CHUNK_SIZE
    assert cfg.checkphrase == DEFAULT_CHECKPHRASE.encode()
    assert cfg.plaintext is False and cfg.key is None
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
        checkphrase=b"wat!",
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
        ("tx h 1 --chunk-size 512K", "chunk_size", 512_000),
        ("tx h 1 --chunk-size 512k", "chunk_size", 512_000),
        ("tx h 1 --chunk-size=2M", "chunk_size", 2_000_000),
        ("tx h 1 --chunk-size 2MB", "chunk_size", 2_000_000),
        ("tx h 1 --chunk-size 64KiB", "chunk_size", 64 * 1024),
        ("tx h 1 --chunk-size 64Ki", "chunk_size", 64 * 1024),
        ("tx h 1 --chunk-size=2MiB", "chunk_size", 2 * 1024 * 1024),
        ("tx h 1 --chunk-size 524288", "chunk_size", 524288),
        ("tx h 1 --size 300M", "size", 300_000_000),
        ("tx h 1 --size 300MiB", "size", 300 * 1024 * 1024),
        ("tx h 1 --size 1.5G", "size", 1_500_000_000),
        ("tx h 1 --size 0", "size", 0),
        ("tx h 1 limit 50M", "limit", 50e6),
        ("tx h 1 --limit 50M", "limit", 50e6),
        ("tx h 1 --limit=50M", "limit", 50e6),
        ("rx 1 limit 10MiB", "limit", 10 * 1024 * 1024),
        ("rx 1 limit 2.5k", "limit", 2500),
        ("rx 1 limit 1G/s", "limit", 1e9),
        ("rx 1 limit 125000", "limit", 125_000),
        ("tx h 1 retry-resolve", "retry_resolve", True),
        ("tx h 1 --retry-resolve", "retry_resolve", True),
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
        ("rx 1 -vv", "verbose", 3),
        ("rx 1 -vvv", "verbose", 4),
        ("rx 1 -v 0", "verbose", 0),
        ("rx 1 -v 2", "verbose", 2),
        ("-v 3 rx 1", "verbose", 3),
        ("rx 1 -v2", "verbose", 2),
        ("rx 1 -v checksum", "verbose", 2),
        ("rx 1 --verbose 3", "verbose", 3),
        ("rx 1 --verbose=0", "verbose", 0),
        ("tx h 1 --checkphrase wat!", "checkphrase", b"wat!"),
        ("tx h 1 --checkphrase=wat!", "checkphrase", b"wat!"),
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
        ("tx h 9 limit 50M retry-resolve", "--tx h 9 --limit=50M --retry-resolve"),
        ("rx 8834 verbose 2", "rx 8834 -v 2"),
        ("rx 8834 verbose 3", "rx 8834 -vv"),
    ],
)
def test_both_spellings_give_equal_config(seed: str, gnu: str) -> None:
    assert parse(seed) == parse(gnu)


def test_spellings_mix() -> None:
    assert parse("tx h 1 --threads 8 checksum --chunk-size 512KiB") == Config(
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
    "checkphrase 257 bytes": "rx 1 checkphrase " + "x" * 257,
    "checkphrase file missing": "rx 1 --checkphrase-file /nonexistent/phrase",
    "key file missing": "tx h 1 key /nonexistent/key",
    "key file not a key": "tx h 1 --key-file /etc/hostname",
    "keygen without file": "keygen",
    "plaintext=yes": "rx 1 --plaintext=yes",
    "corrupt in clear unchecked": "tx h 1 plaintext chaos 1 --chaos-faults corrupt",
    "rx and tx": "rx 8834 tx h 1",
    "tx and rx": "tx h 1 rx 8834",
    "rx twice": "rx 1 rx 2",
    "no mode at all": "",
    "options but no mode": "threads 4 checksum",
    "--listen with tx": "tx h 1 --listen 127.0.0.1",
    "--checksum=off": "tx h 1 --checksum=off",
    "--quiet=no": "rx 1 --quiet=no",
    "--retry-resolve=yes": "tx h 1 --retry-resolve=yes",
    "retry-resolve with rx": "rx 1 retry-resolve",
    "limit without value": "tx h 1 limit",
    "limit not a rate": "tx h 1 limit fast",
    "limit zero": "rx 1 limit 0",
    "limit below 1k": "rx 1 limit 999",
    "limit unknown suffix": "rx 1 limit 5X",
    "-v level too high": "rx 1 -v 10",
    "-vx": "rx 1 -vx",
    "size not a size": "tx h 1 --size lots",
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
        ("rx 1 checkphrase abc", ["checkphrase", "4 to 256 bytes"]),
        ("rx 8834 tx h 1", ["rx", "tx"]),
        ("tx h 1 --listen 127.0.0.1", ["--listen"]),
        ("tx HOST", ["PORT"]),
        ("rx 1 limit fast", ["limit", "fast", "50M"]),
        ("rx 1 limit 999", ["limit", "1000"]),
        ("rx 1 retry-resolve", ["retry-resolve", "tx"]),
        ("rx 1 checkphrase", ["checkphrase", "4 to 256 bytes"]),
        ("tx h 1 key /etc/hostname", ["/etc/hostname", "not a key", "keygen"]),
        ("rx 1 --checkphrase-file /nonexistent/p", ["--checkphrase-file", "/nonexistent/p"]),
        ("tx h 1 --chunk-size 12Q", ["--chunk-size", "12Q", "2MiB"]),
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


# -- credentials: phrase, phrase file, environment, key file, keygen, plaintext -------------------


@pytest.mark.parametrize(
    ("phrase", "encoded"),
    [("wat!", b"wat!"), ("abc\u00e9", "abc\u00e9".encode()), ("p" * 256, b"p" * 256)],
    ids=["4 bytes", "4 characters 5 bytes", "256 bytes"],
)
def test_a_checkphrase_is_4_to_256_bytes_of_utf8(phrase: str, encoded: bytes) -> None:
    assert parse(["rx", "1", "checkphrase", phrase]).checkphrase == encoded


def test_the_checkphrase_file_gives_its_first_line(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"a secret phrase\r\nsecond line\n")
    assert parse(f"rx 1 --checkphrase-file {tmp_path / 'p'}").checkphrase == b"a secret phrase"


def test_a_checkphrase_file_with_a_short_phrase_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p").write_bytes(b"abc\n")
    code, _, err, fake = run_main(["rx", "1", "--checkphrase-file", str(tmp_path / "p")], capsys)
    assert code == ExitCode.USAGE and fake.configs == []
    assert "--checkphrase-file" in err and "4 to 256 bytes" in err


def test_the_environment_gives_the_phrase_unless_one_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cli.CHECKPHRASE_ENV, "from the environment")
    assert parse("rx 1").checkphrase == b"from the environment"
    assert parse("rx 1 checkphrase wat!").checkphrase == b"wat!"
    monkeypatch.setenv(cli.CHECKPHRASE_ENV, "abc")
    with pytest.raises(cli.UsageError, match=cli.CHECKPHRASE_ENV):
        parse("rx 1")


def test_keygen_writes_a_private_key_the_key_word_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k"
    assert cli.main(["keygen", str(path)]) == 0
    assert capsys.readouterr().out == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = parse(["tx", "h", "1", "key", str(path)]).key
    assert key is not None and len(key) == 32 and path.read_text() == key.hex() + "\n"
    assert parse(["rx", "1", "--key-file", str(path)]).key == key
    # another keygen gives another key, and never overwrites one
    assert cli.main(["keygen", str(tmp_path / "k2")]) == 0
    assert (tmp_path / "k2").read_text() != path.read_text()
    assert cli.main(["keygen", str(path)]) == ExitCode.LOCAL_IO
    assert str(path) in capsys.readouterr().err
    assert parse(["rx", "1", "key", str(path)]).key == key


def test_a_key_file_and_a_checkphrase_are_one_too_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "k").write_bytes(bytes(32))
    code, _, err, fake = run_main(["rx", "1", "checkphrase", "abcd", "key", str(tmp_path / "k")],
                                  capsys)
    assert code == ExitCode.USAGE and fake.configs == []
    assert err == "viamillipede: give a key file or a checkphrase, not both\n"


def test_a_key_file_of_32_raw_bytes_is_a_key(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(bytes(range(32)))
    assert parse(["rx", "1", "key", str(tmp_path / "k")]).key == bytes(range(32))


@pytest.mark.parametrize("argv", ["rx 1 plaintext", "rx 1 --plaintext", "tx h 1 plaintext"])
def test_plaintext_is_a_word_and_a_flag(argv: str) -> None:
    assert parse(argv).plaintext is True


def test_chaos_corrupts_sealed_sessions_by_default_but_not_unchecked_plaintext() -> None:
    log = logging.getLogger("test")
    sealed = cli._chaos(parse("tx h 1 chaos 3"), log)
    clear = cli._chaos(parse("tx h 1 plaintext chaos 3"), log)
    checked = cli._chaos(parse("tx h 1 plaintext checksum chaos 3"), log)
    assert sealed is not None and clear is not None and checked is not None
    assert "corrupt" in sealed.kinds and "corrupt" in checked.kinds
    assert "corrupt" not in clear.kinds


# -- tx --ssh ----------------------------------------------------------------------------------


def test_tx_ssh_takes_the_remote_command_after_the_double_dash() -> None:
    cfg = parse(["tx", "--ssh", "root@backup1", "--via", "10.9.0.2", "--via", "[fd00::2]",
                 "threads", "8", "--ssh-command", "ssh -p 2222 -i k", "--port", "9000",
                 "--remote-viamillipede", "/opt/vm/bin/viamillipede",
                 "--", "zfs", "recv", "-F", "tank/fs", "--", "threads", "2"])
    assert (cfg.mode, cfg.ssh, cfg.via, cfg.threads) == (
        "tx", "root@backup1", ["10.9.0.2", "fd00::2"], 8)
    assert (cfg.ssh_command, cfg.port, cfg.remote_viamillipede) == (
        "ssh -p 2222 -i k", 9000, "/opt/vm/bin/viamillipede")
    # everything after the first -- is the remote command's, words that look like ours too
    assert cfg.remote_command == ["zfs", "recv", "-F", "tank/fs", "--", "threads", "2"]
    assert cfg.targets == [] and cfg.key is None
    assert parse("--ssh h -- cat").mode == "tx"


def test_the_remote_command_line_is_quoted_for_the_remote_shell() -> None:
    from viamillipede.sshmode import remote_command, target_host

    cfg = parse(["tx", "--ssh", "h", "-v", "--", "cat > '/backup/my fs.zsend'"])
    line = remote_command(cfg)
    words = shlex.split(line)  # what the remote shell makes of it
    assert words[:2] == ["viamillipede", "ssh-rx"]
    assert words[words.index("--sink") + 1] == "cat > '/backup/my fs.zsend'"
    assert words[words.index("verbose") + 1] == "1"  # one level quieter than the transmitter
    assert [target_host(d) for d in ("h", "u@h", "u@[fd00::1]", "[::1]")] == [
        "h", "h", "fd00::1", "::1"]


@pytest.mark.parametrize(("argv", "words"), [
    ("tx --ssh h", ["remote command", "--"]),
    ("tx --ssh h --", ["remote command"]),
    ("tx --ssh h tx h2 1 -- cat", ["not both"]),
    ("tx --ssh h checkphrase abcd -- cat", ["fresh key"]),
    ("tx --ssh h plaintext -- cat", ["fresh key"]),
    ("tx h 1 --via 10.0.0.1", ["--via", "tx --ssh"]),
    ("tx h 1 -- cat", ["a command after --", "tx --ssh"]),
    ("tx h 1 --ssh-command x", ["--ssh-command"]),
    ("tx h 1 --port 9", ["--port"]),
    ("tx --ssh h --ssh-command '' -- cat", ["--ssh-command"]),
    ("rx 1 --sink cat", ["--sink", "ssh-rx"]),
    ("ssh-rx", ["tx --ssh"]),
    ("rx 1 --ssh h -- cat", ["rx", "tx"]),
])
def test_tx_ssh_usage_errors(argv: str, words: list[str],
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err, fake = run_main(shlex.split(argv), capsys)
    assert code == ExitCode.USAGE and out == "" and fake.configs == []
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize(("argv", "said"), [
    ("tx --ssh nosuch.invalid -- cat", "cannot resolve the ssh host nosuch.invalid: "),
    ("tx --ssh localhost --via nosuch.invalid -- cat",
     "cannot resolve the --via address nosuch.invalid: "),
])
def test_tx_ssh_checks_that_the_data_addresses_resolve_before_ssh_starts(
    argv: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err, fake = run_main(argv.split(), capsys, resolve=cli._resolve)
    assert code == ExitCode.USAGE and fake.configs == []
    assert err.startswith(f"viamillipede: {said}"), err


def test_ssh_rx_reads_a_key_of_64_hex_digits_from_stdin() -> None:
    import io

    from viamillipede.sshmode import read_key

    assert read_key(io.BytesIO(b"ab" * 32 + b"\n")) == bytes([0xAB]) * 32
    for bad in (b"", b"\n", b"ab" * 31 + b"\n", b"zz" * 32 + b"\n"):
        with pytest.raises(cli.UsageError, match="started by tx --ssh"):
            read_key(io.BytesIO(bad))


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


# -- names are resolved before anything starts -----------------------------------------------

BAD_NAME = "no-such-host.invalid"  # RFC 6761: never resolves, and fails without a network


def test_a_target_that_does_not_resolve_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err, fake = run_main(["tx", BAD_NAME, "39305"], capsys,
                                    resolve=cli._resolve)
    assert code == ExitCode.USAGE
    assert out == ""
    assert fake.configs == [], "the session started though a target does not resolve"
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"viamillipede: cannot resolve {BAD_NAME}: ")


def test_every_target_is_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    """A good first target does not excuse a bad second one; each name is asked once."""
    asked: list[tuple[str, int, bool]] = []

    def resolve(host: str, port: int, passive: bool) -> object:
        asked.append((host, port, passive))
        return cli._resolve(host, port, passive)

    argv = ["tx", "127.0.0.1", "1", "tx", "127.0.0.1", "1", "tx", BAD_NAME, "2"]
    code, _, err, fake = run_main(argv, capsys, resolve=resolve)
    assert code == ExitCode.USAGE
    assert BAD_NAME in err and fake.configs == []
    assert asked == [("127.0.0.1", 1, False), (BAD_NAME, 2, False)]


def test_targets_that_resolve_start_the_session(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tx", "127.0.0.1", "1", "tx", "localhost", "2", "tx", "::1", "3"]
    code, _, err, fake = run_main(argv, capsys, resolve=cli._resolve)
    assert (code, err) == (0, "")
    assert len(fake.configs) == 1


def test_retry_resolve_starts_the_session_anyway(capsys: pytest.CaptureFixture[str]) -> None:
    """With retry-resolve the session starts and keeps trying the name (until its timeout)."""

    def refuse(host: str, port: int, passive: bool) -> object:
        raise AssertionError(f"resolved {host} although retry-resolve was given")

    code, _, err, fake = run_main(["tx", BAD_NAME, "1", "retry-resolve"], capsys, resolve=refuse)
    assert (code, err) == (0, "")
    assert fake.configs[0].retry_resolve is True


def test_a_listen_address_that_does_not_resolve_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err, fake = run_main(["rx", "8834", "--listen", "nosuch.invalid"], capsys,
                                  resolve=cli._resolve)
    assert code == ExitCode.USAGE
    assert fake.configs == []
    assert len(err.splitlines()) == 1, err
    assert "--listen address nosuch.invalid" in err
    assert err.startswith("viamillipede: cannot resolve ")


def test_a_listen_address_that_resolves_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _, fake = run_main(["rx", "8834", "--listen", "127.0.0.1"], capsys,
                                resolve=cli._resolve)
    assert code == 0 and len(fake.configs) == 1


def test_a_temporary_resolver_failure_suggests_retry_resolve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def down(host: str, port: int, passive: bool) -> object:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    code, _, err, _ = run_main(["tx", "backup1", "8834"], capsys, resolve=down)
    assert code == ExitCode.USAGE
    assert "cannot resolve backup1: Temporary failure" in err
    assert "retry-resolve" in err


def test_a_name_that_does_not_resolve_in_a_real_process() -> None:
    """What a user sees: at once, one line naming the host, exit 2 (not 60 s, then exit 4)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "viamillipede", "tx", BAD_NAME, "39305"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"viamillipede: cannot resolve {BAD_NAME}: ")
    assert took < 20, f"took {took:.1f} s"


# -- units: one convention ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("512", 512), ("1k", 1000), ("1K", 1000), ("1KB", 1000), ("1kb", 1000),
        ("1KiB", 1024), ("1Ki", 1024), ("1M", 10**6), ("1MiB", 2**20), ("1G", 10**9),
        ("1GiB", 2**30), ("1T", 10**12), ("1TiB", 2**40), ("1.5M", 1_500_000), (".5k", 500),
        ("300M", 300_000_000), (" 2M ", 2_000_000), ("9223372036854775807", 2**63 - 1),
    ],
)
def test_quantities_are_decimal_and_binary_with_an_i(text: str, value: int) -> None:
    assert cli.quantity(text) == value


@pytest.mark.parametrize("text", ["", "M", "1X", "1MM", "-1M", "1e6", "1 M B s", "1iB", "k1"])
def test_not_quantities(text: str) -> None:
    assert cli.quantity(text) is None


def test_help_states_the_unit_convention() -> None:
    units = cli.HELP.split("Units:\n", 1)[1].split("\n\n", 1)[0]
    assert "decimal" in units and "2M = 2000000" in units
    assert "2KiB = 2048" in units and "MB = 1000000 bytes" in units


def test_help_teaches_the_new_words() -> None:
    for text in ("limit RATE", "--limit RATE", "retry-resolve", "--retry-resolve",
                 "-v N", "-vv", "4-256 bytes both ends",
                 "--checkphrase-file", "key FILE", "keygen FILE", "plaintext", "is public"):
        assert text in cli.HELP, text
    assert "4 characters both ends" not in cli.HELP


# -- the reports: a target's share, the limit ------------------------------------------------


def _report(limit: LimitStats | None = None) -> Report:
    totals = TransferStats("tx", 10, 1, 0.5, 1, 0, 0, 0, 0)
    target = TargetStats("h:1", 10, 1.0, True, 1, None)
    return Report(totals, 4, 0, 0, (), (target,), limit)


def test_a_targets_percentage_reads_as_its_share() -> None:
    line = next(li for li in _report().render().splitlines() if li.startswith("  target"))
    assert line == "  target h:1: up (1 connections), 10 bytes, share 100% of all sent"


def test_the_report_shows_the_limit_only_when_there_is_one() -> None:
    assert "limit" not in _report().render()
    text = _report(LimitStats(rate=50e6, waited=12.34)).render()
    assert "  limit 50 MB/s, held back 12.3 s" in text.splitlines()


def test_reports_of_a_limited_session_carry_the_limit() -> None:
    """What the CLI hands to SIGUSR1, --progress and --stats-json: the session's own report
    plus the bucket's numbers."""
    from viamillipede.ratelimit import TokenBucket

    class Session:
        def __init__(self) -> None:
            self.aborted: list[str] = []

        def report(self) -> Report:
            return _report()

        def abort(self, reason: str = "interrupted") -> None:
            self.aborted.append(reason)

    bucket = TokenBucket(2e6, 1000)
    bucket.reserve(3000, 0.0)
    session = Session()
    watched = cli._WithLimit(session, bucket)
    assert watched.report().limit == LimitStats(rate=2e6, waited=0.001)
    assert cli._WithLimit(Session(), None).report().limit is None
    watched.abort("interrupted by SIGINT")
    assert session.aborted == ["interrupted by SIGINT"]


# -- a limited transmitter's chunks pass well within the timeout ------------------------------


def test_a_limited_transmitter_shrinks_its_default_chunk() -> None:
    cfg = parse("tx h 1 limit 100k")
    assert cfg.chunk_size == cli.largest_chunk(100_000, 60.0) == 749568  # 7.5 s at 100 kB/s
    assert parse("tx h 1 limit 100k timeout 120").chunk_size == 1_499_136
    assert parse("tx h 1 limit 50M").chunk_size == DEFAULT_CHUNK_SIZE  # fits: unchanged
    assert parse("tx h 1 limit 100k --chunk-size 64KiB").chunk_size == 64 * 1024


def test_a_limited_receiver_keeps_its_config() -> None:
    assert parse("rx 1 limit 100k").chunk_size == DEFAULT_CHUNK_SIZE


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ("tx h 1 limit 100k --chunk-size 2MiB", ["--chunk-size", "2097152", "749568"]),
        ("rx 1 limit 1k timeout 5", ["too low", "timeout"]),
        ("tx h 1 limit 1k timeout 5", ["too low", "timeout"]),
    ],
)
def test_a_limit_the_chunks_cannot_keep_is_refused(
    argv: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err, fake = run_main(argv.split(), capsys)
    assert code == ExitCode.USAGE and fake.configs == []
    for word in words:
        assert word in err
