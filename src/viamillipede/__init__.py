"""viamillipede: carry a Unix pipe across the network over many parallel TCP connections.

The stream arrives complete and in order, and survives connections and links that break: every
chunk stays with the transmitter until the receiver acknowledges it.  See README.md.

Every failure is raised as one :class:`ViamillipedeError` subclass, whose ``exit_code`` is the
command line's exit status for it: :class:`LocalIOError` (the source or sink failed; what it
raised is the ``__cause__``), :class:`PeerRejected`, :class:`PeerTimeout`,
:class:`TruncatedStream`, :class:`RemoteFailure`, :class:`ProtocolViolation`,
:class:`Interrupted`, :class:`CannotListen`, :class:`UsageError` (and :class:`CannotResolve`).

The names below are imported on first use: the command line starts by importing this package,
and each process should pay only for the half (transmitter or receiver) it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import BufferSink, BytesSource, StreamSink, StreamSource, receive, send
    from .errors import (
        CannotListen,
        CannotResolve,
        ExitCode,
        Interrupted,
        LocalIOError,
        PeerRejected,
        PeerTimeout,
        ProtocolViolation,
        RemoteCommandFailed,
        RemoteFailure,
        SshFailed,
        TruncatedStream,
        UsageError,
        ViamillipedeError,
    )
    from .receiver import Receiver
    from .stats import TransferStats
    from .transmitter import Transmitter

__version__ = "0.1.0"

_WHERE = {
    "BufferSink": "api",
    "BytesSource": "api",
    "StreamSink": "api",
    "StreamSource": "api",
    "receive": "api",
    "send": "api",
    "CannotListen": "errors",
    "CannotResolve": "errors",
    "ExitCode": "errors",
    "Interrupted": "errors",
    "LocalIOError": "errors",
    "PeerRejected": "errors",
    "PeerTimeout": "errors",
    "ProtocolViolation": "errors",
    "RemoteCommandFailed": "errors",
    "RemoteFailure": "errors",
    "SshFailed": "errors",
    "TruncatedStream": "errors",
    "UsageError": "errors",
    "ViamillipedeError": "errors",
    "Receiver": "receiver",
    "TransferStats": "stats",
    "Transmitter": "transmitter",
}

__all__ = [
    "BufferSink",
    "BytesSource",
    "CannotListen",
    "CannotResolve",
    "ExitCode",
    "Interrupted",
    "LocalIOError",
    "PeerRejected",
    "PeerTimeout",
    "ProtocolViolation",
    "Receiver",
    "RemoteCommandFailed",
    "RemoteFailure",
    "SshFailed",
    "StreamSink",
    "StreamSource",
    "TransferStats",
    "Transmitter",
    "TruncatedStream",
    "UsageError",
    "ViamillipedeError",
    "__version__",
    "receive",
    "send",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'viamillipede' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
