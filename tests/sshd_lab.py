#!/usr/bin/env python3
"""A throwaway OpenSSH server on 127.0.0.1, for benches and tests (standard library only, Linux).

    from sshd_lab import sshd_lab

    with sshd_lab() as sshd:
        subprocess.run(sshd.command("cat > /dev/null"), stdin=..., check=True)

``sshd_lab()`` makes a temporary directory holding a fresh ed25519 host key, a fresh user key
(no passphrase), an ``authorized_keys`` with that user key and a minimal ``sshd_config``;
starts ``sshd -D -e -f CONFIG`` listening on 127.0.0.1 only (or ``host``), on a port the
kernel picked as free; waits until it greets (and, by default, until one ``ssh ... true`` has
logged in); and yields an :class:`Sshd`.  On exit it kills that sshd and every session it
started, and removes the directory.  Nothing on the machine is touched but ``/run/sshd``
(sshd's privilege separation directory, created if missing when running as root).

Logging in needs sshd to run as the user it logs in (the current user by default): as root,
it logs in root (``PermitRootLogin prohibit-password``); as anyone else, only that user.

``prefix`` runs sshd under a command, e.g. ``["ip", "netns", "exec", NS]`` with ``host`` an
address in namespace NS: sshd then listens inside NS, and the greeting and the login that check
it are made from inside NS too (a client elsewhere must be able to reach ``host`` itself).

Importing this module has no side effects.  Run as a script it starts a lab and prints the ssh
command line, until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sshd", "SshdLabError", "find_sshd", "sshd_lab"]

HOST = "127.0.0.1"
PRIVSEP_DIR = Path("/run/sshd")  # Debian's and most distributions' compiled-in path
#: Client options: this lab's key only, no user or system ssh_config, no host key prompts or
#: records (the host key is new every time), no password prompts, errors only.
CLIENT_OPTIONS = (
    "-F", "/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
)  # fmt: skip


class SshdLabError(RuntimeError):
    """sshd could not be set up or started; the message ends with the tail of its log."""


@dataclass
class Sshd:
    """A running throwaway sshd."""

    host: str
    port: int
    user: str
    dir: Path
    #: The user's private key (``identity + ".pub"`` is the public one).
    identity: Path
    pid: int
    #: ``ssh -p PORT -i KEY -F /dev/null -o ...``: everything but the destination and command.
    ssh_command: list[str]

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def log(self) -> Path:
        """sshd's own log (``-e``: what it would send to syslog)."""
        return self.dir / "sshd.log"

    def command(self, remote: str | None = None, options: Sequence[str] = ()) -> list[str]:
        """A complete ssh command line: ``ssh_command``, extra ``options`` (e.g.
        ``["-c", "aes128-gcm@openssh.com"]``), the destination, and ``remote`` if given (one
        string, run by the user's shell on the server)."""
        argv = [*self.ssh_command, *options, self.destination]
        return argv if remote is None else [*argv, remote]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def find_sshd() -> str | None:
    """sshd's absolute path (sshd re-executes itself, so it refuses a relative one), or None."""
    path = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    return os.path.abspath(path) if path else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    p = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SshdLabError(f"ssh-keygen for {path.name} failed: {p.stderr.strip()}")


def _config(
    d: Path, port: int, user: str, extra: Sequence[str], penalties: bool, host: str = HOST
) -> str:
    lines = [
        f"ListenAddress {host}",
        f"Port {port}",
        f"HostKey {d / 'host_ed25519'}",
        f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"AllowUsers {user}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # the keys live in a temporary directory, not in ~/.ssh
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        # Many short connections from one address are what a test does, not an attack.
        "MaxStartups 100",
        "LogLevel INFO",
    ]
    if penalties:  # OpenSSH 9.8 and later would otherwise slow down a busy test run
        lines.append("PerSourcePenalties no")
    return "\n".join([*lines, *extra, ""])


def _check_config(sshd: str, config: Path) -> str:
    """'' if ``sshd -t`` accepts the configuration, else what it said."""
    p = subprocess.run(
        [sshd, "-t", "-f", str(config)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    return "" if p.returncode == 0 else (p.stderr or p.stdout).strip() or f"exit {p.returncode}"


#: _greets from under a prefix (in another network namespace): exit 0 if sshd greets.
_GREETS = ("import socket, sys\n"
           "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))\n"
           "sys.exit(0 if s.recv(4).startswith(b'SSH-') else 1)\n")


def _greets(port: int, timeout: float, host: str = HOST, prefix: Sequence[str] = ()) -> bool:
    """True once sshd on ``port`` accepts a connection and sends its ``SSH-`` banner; with a
    ``prefix``, asked by a short Python run under it (where sshd's ``host`` is reachable)."""
    if prefix:
        try:
            return subprocess.run(
                [*prefix, sys.executable, "-c", _GREETS, host, str(port), str(timeout)],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 10,
            ).returncode == 0
        except subprocess.TimeoutExpired:
            return False
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(b")") + 2 :].split()[19].decode()  # field 22: starttime


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``root``: sshd's sessions and their commands."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        parent[int(entry)] = int(text[text.rindex(b")") + 2 :].split()[1])
    found: list[tuple[int, str]] = []
    todo = [root]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p:
                todo.append(child)
                if (start := _start_time(child)) is not None:
                    found.append((child, start))
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill sshd and everything it started (sessions are in sessions of their own)."""
    below = _descendants(proc.pid) if proc.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, start in below:
        if _start_time(pid) == start:  # still that process, not a reused pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _launch(
    sshd: str, conf: Path, log: Path, port: int, timeout: float, host: str = HOST,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes] | None, str]:
    """(sshd, '') once it greets on ``port``; else (None, why not), nothing left running."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*prefix, sshd, "-D", "-e", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _greets(port, 1.0, host, prefix):
            return proc, ""
        time.sleep(0.02)
    _stop(proc)
    if time.monotonic() >= deadline:
        return None, f"sshd did not greet on port {port} within {timeout:g}s"
    bind_failed = "Address already in use" in log.read_text(errors="replace")
    return None, f"sshd exited with {proc.returncode} before listening" + (
        " (Address already in use)" if bind_failed else ""
    )


@contextlib.contextmanager
def sshd_lab(
    *,
    user: str | None = None,
    config: Sequence[str] = (),
    sshd: str | None = None,
    parent_dir: str | Path | None = None,
    startup_timeout: float = 10.0,
    verify: bool = True,
    host: str = HOST,
    prefix: Sequence[str] = (),
) -> Iterator[Sshd]:
    """Start a throwaway sshd on 127.0.0.1 or ``host`` (see the module's docstring); yield it.

    ``user`` to log in (default: the current user, which is the only one a non-root sshd can
    log in), ``config`` extra sshd_config lines, ``sshd`` the binary (default: found on PATH or
    in /usr/sbin), ``parent_dir`` where the temporary directory goes.  ``verify`` logs in once
    (``ssh ... true``) before yielding, so that a lab that cannot log in fails here, with
    sshd's log, instead of in the caller.  ``host``: the one address sshd listens on;
    ``prefix``: a command sshd runs under, which must exec it (``ip netns exec NS``: then the
    yielded ``pid`` is sshd's); the greeting and the login that check it run under it too.
    Raises :class:`SshdLabError`."""
    sshd = sshd or find_sshd()
    if sshd is None:
        raise SshdLabError("sshd not found (Debian: apt-get install openssh-server)")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SshdLabError(f"{tool} not found (Debian: apt-get install openssh-client)")
    user = user or getpass.getuser()
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="sshd-lab-", dir=parent_dir))
    proc: subprocess.Popen[bytes] | None = None
    try:
        _keygen(d / "host_ed25519", "sshd-lab host")
        _keygen(d / "id_ed25519", "sshd-lab user")
        shutil.copyfile(d / "id_ed25519.pub", d / "authorized_keys")
        conf = d / "sshd_config"
        log = d / "sshd.log"
        penalties = True
        port, why = 0, ""
        for _attempt in range(5):  # another process may take the free port before sshd does
            port = _free_port()
            conf.write_text(_config(d, port, user, config, penalties, host))
            why = _check_config(sshd, conf)
            if why and penalties and "PerSourcePenalties" in why:
                penalties = False  # older than 9.8: it does not know the option
                conf.write_text(_config(d, port, user, config, penalties, host))
                why = _check_config(sshd, conf)
            if why:
                raise SshdLabError(f"sshd -t rejects {conf}: {why}")
            proc, why = _launch(sshd, conf, log, port, startup_timeout, host, prefix)
            if proc is not None or "Address already in use" not in why:
                break
        key = d / "id_ed25519"
        lab = Sshd(host, port, user, d, key, proc.pid if proc else -1,
                   ["ssh", "-p", str(port), "-i", str(key), *CLIENT_OPTIONS])
        if proc is None:
            raise SshdLabError(f"{why}\n{lab.log_tail()}")
        if verify:
            p = subprocess.run(
                [*prefix, *lab.command("true")],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=startup_timeout,
            )
            if p.returncode != 0:
                raise SshdLabError(
                    f"cannot log in as {user} ({shlex.join(lab.command('true'))}: exit "
                    f"{p.returncode}: {p.stderr.strip()})\n{lab.log_tail()}"
                )
        yield lab
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def _version(text: str) -> str:
    m = re.search(r"OpenSSH_[\w.]+", text)
    return m.group(0) if m else "?"


def main() -> int:
    p = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    with sshd_lab() as lab:
        print(f"# sshd (pid {lab.pid}, {_version(p.stderr)}) on {lab.host}:{lab.port}, "
              f"in {lab.dir}; Ctrl-C stops it")
        print(shlex.join(lab.command()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
