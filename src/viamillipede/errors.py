"""The project's exceptions and the exit code each one maps to.

Every failure a user can cause or meet (bad arguments, a wrong peer, a dead link, a full disk)
is one of these, so the command line can print a single line and exit with a code a script can
test, instead of a traceback.
"""

from __future__ import annotations

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
    INTERRUPTED = 130


class ViamillipedeError(Exception):
    """Base of every error that ends a session; ``exit_code`` says how the CLI exits."""

    exit_code: ExitCode = ExitCode.FAILURE


class CannotListen(ViamillipedeError):
    """The receiver could not open its port (in use, not permitted, no such address)."""

    exit_code = ExitCode.FAILURE


class UsageError(ViamillipedeError):
    exit_code = ExitCode.USAGE


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
    """Reading our source or writing our sink failed (EPIPE, ENOSPC, EIO...)."""

    exit_code = ExitCode.LOCAL_IO


class RemoteFailure(ViamillipedeError):
    """The peer aborted the session with an ERROR frame (e.g. its sink failed)."""

    exit_code = ExitCode.REMOTE_FAILED


class ProtocolViolation(ViamillipedeError):
    exit_code = ExitCode.PROTOCOL


class Interrupted(ViamillipedeError):
    """Stopped on request (Ctrl-C, SIGTERM); the peer is told."""

    exit_code = ExitCode.INTERRUPTED


class LinkBroken(Exception):
    """One connection is unusable; its chunks are re-sent elsewhere.  Never fatal by itself."""
