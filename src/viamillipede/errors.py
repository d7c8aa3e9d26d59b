"""The project's exceptions and the exit code each one maps to.

Every failure a user can cause or meet (bad arguments, a wrong peer, a dead link, a full disk)
is one of these, so the command line can print a single line and exit with a code a script can
test, instead of a traceback.
"""

from __future__ import annotations

import socket
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the ``viamillipede`` command; documented in the README."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    PEER_REJECTED = 3
    TIMEOUT = 4
    TRUNCATED = 5
    LOCAL_IO = 6
    REMOTE_FAILED = 7
    PROTOCOL = 8
    SSH = 9
    INTERRUPTED = 130


class ViamillipedeError(Exception):
    """Base of every error that ends a session; ``exit_code`` says how the CLI exits."""

    exit_code: ExitCode = ExitCode.FAILURE


class CannotListen(ViamillipedeError):
    """The receiver could not open its port (in use, not permitted, no such address)."""

    exit_code = ExitCode.FAILURE


class UsageError(ViamillipedeError):
    """Bad arguments: a bad command line, or a library call the session cannot start with."""

    exit_code = ExitCode.USAGE


class CannotResolve(UsageError):
    """A host name that does not resolve (a target, or the address to listen on).

    Checked before a session starts, so a typo fails at once instead of after the timeout; the
    command line's ``retry-resolve`` (the library's ``retry_resolve=True``) keeps trying
    instead, for a name that is expected to appear.
    """


class PeerRejected(ViamillipedeError):
    """The receiver refused us (checkphrase, session, version), or we refused it."""

    exit_code = ExitCode.PEER_REJECTED


class PeerTimeout(ViamillipedeError):
    """No progress with the peer for longer than the session timeout."""

    exit_code = ExitCode.TIMEOUT


class TruncatedStream(ViamillipedeError):
    """The stream ended without the BYE exchange, or the totals disagree."""

    exit_code = ExitCode.TRUNCATED


class LocalIOError(ViamillipedeError):
    """Reading our source or writing our sink failed (EPIPE, ENOSPC, EIO...).

    Whatever a library caller's source or sink raised is its ``__cause__``.
    """

    exit_code = ExitCode.LOCAL_IO


class RemoteFailure(ViamillipedeError):
    """The peer aborted the session with an ERROR frame (e.g. its sink failed)."""

    exit_code = ExitCode.REMOTE_FAILED


class ProtocolViolation(ViamillipedeError):
    """The peer broke the protocol, or is not a viamillipede peer at all."""

    exit_code = ExitCode.PROTOCOL


class SshFailed(ViamillipedeError):
    """``tx --ssh``: ssh could not start the remote end (refused, unknown host, no or an old
    viamillipede there), or the ssh channel was lost."""

    exit_code = ExitCode.SSH


class RemoteCommandFailed(ViamillipedeError):
    """``tx --ssh``: the stream arrived, but the remote command it went to failed."""

    exit_code = ExitCode.REMOTE_FAILED


class Interrupted(ViamillipedeError):
    """Stopped on request (Ctrl-C, SIGTERM); the peer is told."""

    exit_code = ExitCode.INTERRUPTED


def cannot_resolve(host: str, exc: OSError, what: str = "") -> CannotResolve:
    """The error for a name that did not resolve: ``cannot resolve [WHAT ]HOST: REASON``."""
    reason = exc.strerror or str(exc)
    if exc.errno == socket.EAI_AGAIN:
        reason += " (a temporary failure: retry-resolve keeps trying)"
    return CannotResolve(f"cannot resolve {what + ' ' if what else ''}{host}: {reason}")


class LinkBroken(Exception):
    """One connection is unusable; its chunks are re-sent elsewhere.  Never fatal by itself."""
