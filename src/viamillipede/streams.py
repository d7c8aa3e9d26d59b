"""What a stream or a sink can do beyond anyio's ``ByteStream`` contract, as named types.

A TCP connection can move bytes without copying them through Python: into the caller's
buffer, from a file's page cache, by reference from a buffer's own pages, or from the socket
straight into the output.  In-memory streams and stream wrappers offer some of these or none.
Naming each capability as a protocol lets session code ask ``isinstance(stream, SendFile)``
and have the call that follows type-checked, and lets a wrapper (fault injection) declare the
capabilities it forwards the same way, so that the paths production takes also run under it.

Only declarations live here: the implementations, and the translation of OS errors into
``anyio.BrokenResourceError``, :class:`ConnectFailed` and
:class:`~viamillipede.errors.LocalIOError`, stay in :mod:`viamillipede.transport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = [
    "ConnectFailed",
    "ReceiveExactlyInto",
    "ReceiveInto",
    "SendFile",
    "SendPages",
    "SpliceSink",
    "SpliceSource",
    "SpliceTo",
]


class ConnectFailed(Exception):
    """Could not open a connection to a target (refused, unreachable, timed out).

    Kept apart from a connection that broke after it was open: a transmitter answers this one
    by trying again later (the target may not be listening yet), not by re-sending anything.
    ``reason`` is the cause alone ("connection refused"), for lines that name the target
    themselves.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@runtime_checkable
class ReceiveInto(Protocol):
    """A stream that can receive into a buffer the caller already has.

    A payload then lands where it will be written from, instead of in a new ``bytes`` object
    that has to be copied over and freed again.
    """

    async def receive_into(self, view: memoryview) -> int:
        """At most ``len(view)`` bytes into ``view``; how many, 0 meaning end of stream."""
        ...


@runtime_checkable
class ReceiveExactlyInto(Protocol):
    """A stream that can fill a whole buffer in one call.

    Knowing how much is still missing, the stream can ask the kernel not to wake it before a
    good part has arrived: a large payload takes a few large reads instead of one trip through
    the event loop per TCP segment, which a loop over ``receive_into`` cannot arrange.
    """

    async def receive_exactly_into(self, view: memoryview) -> int:
        """Fill ``view``; fewer bytes (the count returned) only if the stream ends first."""
        ...


@runtime_checkable
class SendFile(Protocol):
    """A stream that can send part of a file without the bytes passing through our memory.

    The kernel moves the file's pages to the connection (sendfile), saving the read into a
    buffer and the copy back out; and since nothing is held in memory, a chunk that must be
    sent again is simply sent from the file again.
    """

    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        """Send ``header``, then ``count`` bytes of file ``fd`` from ``offset``.

        ``fd``'s own position does not move, so several streams may send from one file at once.
        """
        ...


@runtime_checkable
class SendPages(Protocol):
    """A stream that can send a buffer by handing its pages to the kernel instead of copying.

    Worth it for large payloads already in memory (hashed, say): the copy into the socket is
    the biggest cost left on the sending side.  The price is a promise by the caller, below.
    """

    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        """Send ``header``, then ``payload`` by reference.

        The caller must leave ``payload`` unchanged until the peer has acknowledged it: until
        then the kernel may still be reading those pages.
        """
        ...


@runtime_checkable
class SpliceSource(Protocol):
    """The descriptor-level view of a connection that a :class:`SpliceSink` drives.

    A sink that splices moves bytes from the connection's descriptor itself, with no stream
    method in between, so this is all it needs: the descriptor, a way to wait efficiently for
    enough data, and a name for error messages.  A wrapper that must see every operation (fault
    injection) cannot be one of these; it offers :class:`SpliceTo` instead.
    """

    #: Who is at the other end, for error messages.
    peer: str

    def fileno(self) -> int:
        """The connection's descriptor, to splice from."""
        ...

    async def wait_for_data(self, missing: int, lowat: int) -> int:
        """Wait until a good part of ``missing`` bytes can be read.

        ``lowat`` is the low-water mark in force (1 at first); the one now set is returned, and
        must be handed to :meth:`reset_lowat` once the caller stops waiting for this much.
        """
        ...

    def reset_lowat(self, lowat: int) -> None:
        """Undo what :meth:`wait_for_data` set, so later, smaller reads are woken promptly."""
        ...


@runtime_checkable
class SpliceTo(Protocol):
    """A stream whose next bytes can go straight into a sink's descriptor (splice).

    Into a pipe the kernel passes the socket's pages on by reference; into a file one copy
    replaces two.  Either way the bytes never enter our memory.  This is the per-operation entry
    point, so a wrapper can act on each splice as a whole (delay it, break it, split it).
    """

    async def splice_to(
        self, sink: SpliceSink, count: int, moved: Callable[[int], None]
    ) -> None:
        """Move the next ``count`` bytes of this stream into ``sink``.

        ``moved(n)`` reports each step that reached the sink, so a caller whose splice broke
        off knows exactly how much of it is out already.
        """
        ...


@runtime_checkable
class SpliceSink(Protocol):
    """An output that can take bytes from a connection by splice instead of by ``write``.

    Whether it can depends on what the output turns out to be (a pipe or a regular file can,
    a terminal cannot), so :attr:`can_splice` is asked once, before choosing the path.
    """

    @property
    def can_splice(self) -> bool:
        """Whether :meth:`splice_from` works for this output."""
        ...

    async def splice_from(
        self, stream: SpliceSource, count: int, moved: Callable[[int], None]
    ) -> None:
        """Move the next ``count`` bytes of ``stream`` into this output; ``moved(n)`` reports
        every step that reached it."""
        ...
