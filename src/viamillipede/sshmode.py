"""``tx --ssh HOST -- COMMAND``: ssh for control, parallel encrypted TCP for the data.

The transmitter starts ``viamillipede ssh-rx`` on HOST through ssh and hands it a fresh random
key on the ssh channel's stdin (never on a command line, never in a file).  The remote end
listens on a free port (or ``--port``), says which on its stdout, runs COMMAND through the
remote shell with the stream on its stdin, and serves one session with that key.  So every
such session is authenticated and encrypted with no phrase and no key file, and the data does
not go through ssh.

The ssh channel stays open for the whole session: its stdout carries the port line, then
COMMAND's stdout; its stderr carries COMMAND's and the remote viamillipede's messages; its
exit status is COMMAND's.  Closing it (the transmitter is done, was interrupted, or died) is
how the remote end learns the session is over: a remote end never outlives its channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    ExitCode,
    Interrupted,
    LocalIOError,
    RemoteCommandFailed,
    SshFailed,
    UsageError,
    ViamillipedeError,
)
from .wire.secure import KEY_SIZE

if TYPE_CHECKING:
    from .cli import Config
    from .monitor import Reporting

#: The remote end's first line on its stdout: the port its session listens on.
READY = re.compile(rb"^viamillipede-ssh-rx listening (\d{1,5}) (\S+)\n$")
#: The transmitter's last line on the channel's stdin: its session ended well.
DONE = b"done\n"
#: What the remote end says when its command failed (and then it exits with its status).
COMMAND_FAILED = re.compile(rb"ssh-rx: error: the remote command exited with status \d+")
#: How long ssh may take to log in and start the remote end.
START_TIMEOUT = 60.0
#: How long the remote end may take to end by itself once the session has failed.
REMOTE_GRACE = 5.0
#: How long a dead ssh is given before it counts as lost: long enough for a signal delivered
#: to this process at the same time (a Ctrl-C reaches the whole job) to be handled first.
SIGNAL_GRACE = 0.1
#: How long a command whose input broke may take to exit with its own status.
SINK_GRACE = 2.0
#: What a remote shell exits with when the command is not found.
NOT_FOUND = 127

#: Runs the ordinary session for the command line (cli._run); given a Config and a logger.
RunSession = Callable[..., None]


# -- the transmitter's side ----------------------------------------------------------------------


def remote_command(cfg: Config) -> str:
    """The command line ssh runs on HOST.  ssh joins the words after ``--`` with spaces and the
    remote shell reads them, so they are passed the same way: joined, as one quoted argument
    that ssh-rx gives to ``sh -c``.  ``-- 'cat > /backup/fs'`` writes to the remote file."""
    # One level quieter: the transmitter's summary is the one the user reads.
    words = [cfg.remote_viamillipede, "ssh-rx", "verbose", str(max(cfg.verbose - 1, 0)),
             "timeout", f"{cfg.timeout:g}"]
    if cfg.port:
        words += ["--port", str(cfg.port)]
    quoted = " ".join(shlex.quote(w) for w in words)
    return f"{quoted} --sink {shlex.quote(' '.join(cfg.remote_command))}"


def target_host(destination: str) -> str:
    """``[USER@]HOST`` (or ``[USER@][ADDR]``) as the address the data connections go to."""
    host = destination.rsplit("@", 1)[-1]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


class _Lines:
    """A pipe read line by line in a thread, so waiting for a line can time out."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.lines: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in iter(self.pipe.readline, b""):
                self.lines.put(line)
        finally:
            self.lines.put(b"")

    def next(self, timeout: float) -> bytes | None:
        """The next line; ``b""`` at the end; None if none came in time."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None


def _relay(source: _Lines, fd: int, seen: list[bytes] | None = None) -> threading.Thread:
    """Copy what is left of ``source`` to ``fd`` until its end, in a thread.  With ``seen``,
    the remote end's word that its command failed is kept there instead: the transmitter's
    own last line says it, with the command."""

    def run() -> None:
        while line := source.lines.get():
            if seen is not None and COMMAND_FAILED.search(line):
                seen.append(line)
                continue
            with contextlib.suppress(OSError):
                os.write(fd, line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _last_line(lines: list[bytes]) -> str:
    text = [ln.decode(errors="replace").strip() for ln in lines]
    text = [t for t in text if t]
    return text[-1] if text else "no message"


def _start_failure(destination: str, cfg: Config, code: int | None, err: list[bytes]) -> SshFailed:
    said = _last_line(err)
    if code == NOT_FOUND:
        return SshFailed(f"{cfg.remote_viamillipede} not found on {destination} (give "
                         f"--remote-viamillipede PATH): {said}")
    if code == ExitCode.USAGE:
        return SshFailed(f"the viamillipede on {destination} does not know ssh mode (too old?): "
                         f"{said}")
    if code is None:
        return SshFailed(f"ssh {destination}: the remote end did not start in "
                         f"{START_TIMEOUT:g} s")
    if code == 255:
        return SshFailed(f"ssh {destination} failed: {said}")
    return SshFailed(f"the remote end on {destination} did not start (exit {code}): {said}")


def run_local(cfg: Config, log: logging.Logger, run_session: RunSession) -> None:
    """Run ``tx --ssh``: start the remote end, send the stream to it, wait for its command."""
    assert cfg.ssh is not None
    destination = cfg.ssh
    argv = [*shlex.split(cfg.ssh_command), destination, remote_command(cfg)]
    key = os.urandom(KEY_SIZE)
    log.info("starting the remote end: %s", shlex.join(argv))
    # The session's modules load while ssh logs in (a fifth of a second, off the path).
    preload = threading.Thread(target=_preload, daemon=True)
    preload.start()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise SshFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    relays: list[threading.Thread] = []
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(key.hex().encode() + b"\n")
            proc.stdin.flush()
        port = _await_port(proc, out, err, destination, cfg)
        preload.join()
        # From now on the remote command's output and messages are the user's.
        said: list[bytes] = []  # the remote end's word that its command failed
        relays = [_relay(out, sys.stdout.fileno()), _relay(err, sys.stderr.fileno(), said)]
        host = target_host(destination)
        targets = [(host, port)] + [(via, port) for via in cfg.via]
        log.info("the remote end listens on port %d; sending to %s", port,
                 ", ".join(f"{h}:{p}" for h, p in targets))
        session = dataclasses.replace(cfg, targets=targets, key=key, ssh=None)
        failure: ViamillipedeError | None = None
        lost: list[str] = []
        try:
            run_session(session, log, until=_ssh_lost(proc, destination, lost))
        except ViamillipedeError as exc:
            failure = SshFailed(lost[0]) if lost and isinstance(exc, Interrupted) else exc
        else:
            # The remote end may not have seen the last FIN yet: a channel that closes now
            # must not read as "the transmitter is gone".
            with contextlib.suppress(OSError):
                proc.stdin.write(DONE)
                proc.stdin.flush()
        if failure is not None:
            # The receiver has been told (ERROR) and ends by itself, with its own reason and
            # its command's status; closing the channel at once would end it as "transmitter
            # gone" instead.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(REMOTE_GRACE)
        with contextlib.suppress(OSError):
            proc.stdin.close()  # after a failure: give up, if it has not
        code = proc.wait()
        for relay in relays:
            relay.join()
    except BaseException:
        _stop(proc)
        raise
    command = " ".join(cfg.remote_command)
    if failure is not None:
        if said:
            raise type(failure)(f"{failure}; the remote command `{command}` exited with "
                                f"status {code}") from failure
        raise failure
    if code == 255:
        raise SshFailed(f"ssh {destination}: the connection was lost after the stream arrived "
                        "(exit 255)")
    if code != 0:
        raise RemoteCommandFailed(f"the remote command `{command}` on {destination} exited "
                                  f"with status {code}")


def _ssh_lost(proc: subprocess.Popen[bytes], destination: str, lost: list[str],
              ) -> Callable[[Reporting], Coroutine[Any, Any, None]]:
    """Watch ssh during the session: if it dies (255 is ssh's own failure, or a signal), the
    remote end is gone with its channel, perhaps before any connection could hear it say so:
    abort at once rather than retry a receiver that is no more."""

    async def watch(session: Reporting) -> None:
        import anyio

        from . import monitor

        code = await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        # A Ctrl-C at the terminal reaches ssh too (it exits 255), and it was delivered here
        # first: let our own handler see it, so that it reads as an interruption.
        await anyio.sleep(SIGNAL_GRACE)
        if monitor.interrupted_by is not None:
            return
        if code == 255 or code < 0:
            lost.append(f"the ssh connection to {destination} was lost (ssh exit {code})")
            session.abort(lost[0])

    return watch


def _preload() -> None:
    import anyio  # noqa: F401
    import trio  # noqa: F401

    from . import api, monitor, ratelimit, transmitter, transport  # noqa: F401


def _await_port(proc: subprocess.Popen[bytes], out: _Lines, err: _Lines, destination: str,
                cfg: Config) -> int:
    """The port the remote end announces; what ssh said, as one line, if it never does."""
    import time

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        line = out.next(max(deadline - time.monotonic(), 0.0))
        if line is None:
            _stop(proc)
            raise _start_failure(destination, cfg, None, _drain(err))
        if not line:
            code = proc.wait()
            raise _start_failure(destination, cfg, code, _drain(err))
        if match := READY.match(line):
            return int(match.group(1))
        os.write(sys.stdout.fileno(), line)  # the remote shell's own output (a login banner)


def _drain(lines: _Lines) -> list[bytes]:
    got = []
    while (line := lines.next(1.0)) is not None and line:
        got.append(line)
    return got


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End ssh (and with its channel, the remote end)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the remote end -------------------------------------------------------------------------------


def read_key(stream: IO[bytes]) -> bytes:
    """The session key, the first line on stdin: 64 hex digits."""
    line = stream.readline(4 * KEY_SIZE)
    try:
        key = bytes.fromhex(line.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise UsageError("ssh-rx reads its key from stdin (it is started by tx --ssh)")
    return key


def run_remote(cfg: Config, log: logging.Logger, run_session: RunSession) -> int:
    """``ssh-rx``: serve one session into ``sh -c SINK``; the exit status is the sink's."""
    assert cfg.sink is not None
    # Unbuffered, one byte at a time: what follows the key on the channel (``done``) is read
    # from the descriptor by _channel_closed, and must not sit in a buffer here.
    with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as raw:
        key = read_key(raw)
    try:
        sink = subprocess.Popen(["/bin/sh", "-c", cfg.sink], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise LocalIOError(f"cannot start /bin/sh: {exc.strerror or exc}") from None
    assert sink.stdin is not None and sink.stdout is not None
    relayed: list[threading.Thread] = []

    def listening(port: int) -> None:
        from . import __version__

        os.write(sys.stdout.fileno(), f"viamillipede-ssh-rx listening {port} {__version__}\n"
                 .encode())
        assert sink.stdout is not None
        relayed.append(_relay(_Lines(sink.stdout), sys.stdout.fileno()))

    session = dataclasses.replace(cfg, mode="rx", key=key, sink=None)
    try:
        run_session(session, log, output_fd=sink.stdin.fileno(), listening=listening,
                    until=_channel_closed)
    except LocalIOError:
        # Writing to the command failed: it has most likely ended, and how is the news.
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = sink.wait(SINK_GRACE)
            if code:
                log.error("error: the remote command exited with status %d before the stream "
                          "ended", code)
                return code
        _kill(sink)
        raise
    except BaseException:
        _kill(sink)
        raise
    finally:
        with contextlib.suppress(OSError):
            sink.stdin.close()
    code = sink.wait()
    for thread in relayed:
        thread.join()
    if code:
        log.error("error: the remote command exited with status %d", code)
    return code


def _kill(sink: subprocess.Popen[bytes]) -> None:
    """A stream that did not arrive whole must not look whole to the command: it is stopped
    (its whole process group), not given an end of file."""
    with contextlib.suppress(OSError):
        os.killpg(sink.pid, signal.SIGTERM)
    sink.wait()


async def _channel_closed(session: Reporting) -> None:
    """Abort ``session`` once the ssh channel closes before the transmitter said its session
    ended well (it gave up, was interrupted, or its ssh died): the transmitter is told, as
    on Ctrl-C, rather than left to retry a receiver that is gone."""
    from .transport import FdSource

    source = FdSource(sys.stdin.fileno())
    said = bytearray()
    scratch = memoryview(bytearray(64))
    while n := await source.readinto(scratch):
        said += scratch[:n]
        if said.endswith(DONE):
            return
    session.abort("the ssh channel closed before the session ended")

