"""The one module that touches sockets and file descriptors.

Why not anyio's own socket streams: every call through them costs a checkpoint and a wrapper
layer, which measured about 10% of loopback throughput.  Here plain non-blocking stdlib
sockets are driven directly (``send``/``recv_into`` on memoryviews), and we only await
``wait_writable``/``wait_readable`` when the kernel says EAGAIN.  The classes still implement
anyio's ``ByteStream`` contract, so sessions, the chaos wrapper and tests treat them exactly
like in-memory streams.  What they can do beyond that (receive into a buffer, send from a file
or by reference, splice into the output) is declared in :mod:`viamillipede.streams`; sessions
use each capability only where a stream has it.

OS errors are translated here: a broken connection becomes ``anyio.BrokenResourceError`` (the
stream contract), a failed connect becomes :class:`ConnectFailed`, and stdin/stdout failures
become :class:`~viamillipede.errors.LocalIOError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.lowlevel import checkpoint

from .errors import CannotListen, LocalIOError
from .streams import (
    ConnectFailed,
    ReceiveExactlyInto,
    ReceiveInto,
    SendFile,
    SendPages,
    SpliceSink,
    SpliceSource,
    SpliceTo,
)

__all__ = [
    # declared in .streams, importable from here as well
    "ConnectFailed",
    "ReceiveExactlyInto",
    "ReceiveInto",
    "SendFile",
    "SendPages",
    "SpliceSink",
    "SpliceSource",
    "SpliceTo",
    # sockets
    "RECEIVE_LOWAT",
    "SocketStream",
    "TcpListener",
    "connect",
    "listen",
    # files and pipes
    "FdSink",
    "FdSource",
    "read_at",
]

log = logging.getLogger("viamillipede.transport")


class SocketStream(anyio.abc.ByteStream):
    """An anyio byte stream over a non-blocking stdlib TCP socket.

    Besides the stream contract it has every capability of :mod:`viamillipede.streams`:
    :class:`ReceiveInto`, :class:`ReceiveExactlyInto`, :class:`SendFile`, :class:`SendPages`,
    :class:`SpliceTo`, and it is the :class:`SpliceSource` an :class:`FdSink` splices from.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._eof_sent = False
        self._pages: _PagePipe | None = None
        try:
            self.peer = _format_addr(sock.getpeername())
        except OSError:
            self.peer = "?"

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        from anyio.abc import SocketAttribute

        return {
            SocketAttribute.raw_socket: lambda: self._sock,
            SocketAttribute.remote_address: lambda: self._sock.getpeername(),
            SocketAttribute.local_address: lambda: self._sock.getsockname(),
        }

    def fileno(self) -> int:
        return self._sock.fileno()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    def _check_sendable(self) -> None:
        # After send_eof the kernel would answer EPIPE, which would read as a broken
        # connection; sending after our own send_eof is a use of a closed stream instead.
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        self._check_sendable()
        # One checkpoint per call even when the kernel takes everything at once, so a fast
        # sender can never starve the other tasks.
        await checkpoint()
        await self._send_all(memoryview(item).cast("B"), 0)

    async def _send_all(self, view: memoryview, flags: int) -> None:
        sock = self._sock
        while view:
            try:
                n = sock.send(view, flags)
            except BlockingIOError:
                await self._wait(anyio.wait_writable)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(f"send to {self.peer}: {exc.strerror}") from exc
            view = view[n:]

    async def send_file(self, header: memoryview, fd: int, offset: int, count: int) -> None:
        """Send ``header``, then ``count`` bytes of file ``fd`` from ``offset``.

        The file's pages go to the socket by reference (sendfile): no copy into user space and
        none back out, the two copies that dominate a plain read+send.  ``fd``'s own position is
        not moved, so several connections can send from one file at once.
        """
        self._check_sendable()
        await checkpoint()
        await self._send_all(header, socket.MSG_MORE)  # one segment with the payload's start
        out = self._sock.fileno()
        while count:
            try:
                n = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                await self._wait(anyio.wait_writable)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise LocalIOError(f"reading input failed: {exc.strerror}") from exc
                raise anyio.BrokenResourceError(f"send to {self.peer}: {exc.strerror}") from exc
            if n == 0:
                raise LocalIOError("the input file shrank while it was being sent")
            offset += n
            count -= n

    async def send_pages(self, header: memoryview, payload: memoryview) -> None:
        """Send ``header``, then ``payload`` by reference: its pages go into the socket
        (vmsplice into a pipe, splice on to the socket) instead of being copied.

        The caller must not change ``payload`` until the receiver has acknowledged it: until
        then the kernel may still read it.  Measured (1 GiB from a file in /dev/shm, checksum,
        t4, 15 interleaved rounds): 0.467 s like this, 0.562 s copying the same buffers with
        send; the receiver then also copies from pages still in the cache.  Where vmsplice is
        missing or forbidden (another OS, a seccomp filter), the payload is copied after all.
        """
        self._check_sendable()
        await checkpoint()
        await self._send_all(header, socket.MSG_MORE)
        pages = self._open_pages()
        out = self._sock.fileno()
        try:
            while pages is not None and (payload or pages.held):
                if not pages.held:
                    try:
                        payload = payload[pages.fill(payload) :]
                    except OSError as exc:
                        if exc.errno not in _NO_VMSPLICE:
                            raise
                        _PagePipe.unavailable = True
                        break  # the pipe is empty: the rest goes by copy, below
                try:
                    pages.drain_into(out)
                except BlockingIOError:
                    await self._wait(anyio.wait_writable)
        except OSError as exc:
            raise anyio.BrokenResourceError(f"send to {self.peer}: {exc.strerror}") from exc
        if payload:
            await self._send_all(payload, 0)

    def _open_pages(self) -> _PagePipe | None:
        """This stream's pipe for send_pages (made on first use), or None: copy instead."""
        if _PagePipe.unavailable or not hasattr(os, "splice"):
            return None
        if self._pages is None:
            try:
                self._pages = _PagePipe()
            except (OSError, AttributeError):  # no pipe to spare, or a libc without vmsplice
                _PagePipe.unavailable = True
        return self._pages

    async def receive_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes straight into ``view``; 0 means end of stream."""
        self._check_open()
        while (n := self._recv_nowait(view)) is None:
            await self._wait(anyio.wait_readable)
        await checkpoint()
        return n

    def _recv_nowait(self, view: memoryview) -> int | None:
        """What one recv gives (0 at end of stream), or None if nothing has arrived yet."""
        try:
            return self._sock.recv_into(view)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise anyio.BrokenResourceError(f"receive from {self.peer}: {exc.strerror}") from exc

    async def receive_exactly_into(self, view: memoryview) -> int:
        """Fill ``view``; fewer bytes only if the stream ends first.

        While waiting, SO_RCVLOWAT tells the kernel not to wake us before a good part of what is
        missing has arrived: a 2 MiB payload then takes a few large reads instead of a dozen
        small ones, each costing a trip through the event loop.
        """
        self._check_open()
        size = len(view)
        got = 0
        lowat = 1
        try:
            while got < size:
                n = self._recv_nowait(view[got:])
                if n is None:
                    lowat = await self.wait_for_data(size - got, lowat)
                    continue
                if n == 0:
                    break
                got += n
        finally:
            self.reset_lowat(lowat)
        await checkpoint()
        return got

    async def wait_for_data(self, missing: int, lowat: int) -> int:
        """Wait until a good part of ``missing`` bytes can be read; returns the low-water mark
        now set (undo with :meth:`reset_lowat` before waiting for anything smaller)."""
        want = min(missing, RECEIVE_LOWAT)
        if want != lowat:
            with contextlib.suppress(OSError):  # then we are just woken more often
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        await self._wait(anyio.wait_readable)
        return want

    def reset_lowat(self, lowat: int) -> None:
        if lowat != 1 and not self._closed:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def splice_to(
        self, sink: SpliceSink, count: int, moved: Callable[[int], None]
    ) -> None:
        """Move the next ``count`` bytes into ``sink`` by splice; see :class:`SpliceTo`."""
        self._check_open()
        await sink.splice_from(self, count, moved)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        # Only frame headers and ACKs come this way (payloads use receive_into): one small
        # copy is cheaper than a second receive loop.
        buf = bytearray(max_bytes)
        n = await self.receive_into(memoryview(buf))
        if n == 0:
            raise anyio.EndOfStream
        return bytes(buf[:n])

    async def _wait(self, waiter: Callable[[socket.socket], Any]) -> None:
        try:
            await waiter(self._sock)
        except anyio.ClosedResourceError:
            raise
        except OSError as exc:  # pragma: no cover - the selector itself failed
            raise anyio.BrokenResourceError(str(exc)) from exc
        if self._closed:
            raise anyio.ClosedResourceError

    async def send_eof(self) -> None:
        self._check_open()
        self._eof_sent = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        await checkpoint()  # like every other operation: a caller looping on it cannot starve

    def abort(self) -> None:
        """Close at once (RST if data is unsent); used for stale or misbehaving connections."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        anyio.notify_closing(self._sock)
        self._sock.close()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
            if self._pages is not None:
                self._pages.close()
        await checkpoint()


#: vmsplice failing with these means it cannot work here at all.
_NO_VMSPLICE = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP})


class _PagePipe:
    """A pipe through which :meth:`SocketStream.send_pages` hands buffer pages to a socket."""

    #: Set once vmsplice proved missing or forbidden: every later send_pages copies.
    unavailable = False

    def __init__(self) -> None:
        import ctypes  # only here: importing it costs start-up time every run would pay

        libc = ctypes.CDLL(None, use_errno=True)
        self._ctypes = ctypes
        self._vmsplice = libc.vmsplice
        self._vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._vmsplice.restype = ctypes.c_ssize_t
        self._iov = (ctypes.c_size_t * 2)()  # struct iovec: base, length
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        _grow_pipe(self._w)
        self._capacity = fcntl.fcntl(self._w, fcntl.F_GETPIPE_SZ)
        self.held = 0  # bytes in the pipe, not yet in the socket

    def fill(self, view: memoryview) -> int:
        """Put the start of ``view`` into the (empty) pipe; returns how much went in."""
        ctypes = self._ctypes
        anchor = ctypes.c_char.from_buffer(view)  # a writable buffer: ours, so its address
        self._iov[0] = ctypes.addressof(anchor)
        del anchor
        self._iov[1] = min(len(view), self._capacity)
        n = self._vmsplice(self._w, ctypes.addressof(self._iov), 1, 0)
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.held = n
        return int(n)

    def drain_into(self, out: int) -> None:
        while self.held:
            self.held -= os.splice(self._r, out, self.held, flags=os.SPLICE_F_NONBLOCK)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


#: The most SO_RCVLOWAT asks for; the kernel grows the receive buffer to twice this if needed.
RECEIVE_LOWAT = 512 * 1024


def _format_addr(addr: Any) -> str:
    if not isinstance(addr, tuple):  # a Unix socket (a socketpair, say): a path or nothing
        return str(addr) or "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Socket options that make the kernel give up on a dead peer by itself: keepalive probes
#: find an idle connection whose peer vanished (25 s), TCP_USER_TIMEOUT a connection whose sent
#: data stays unacknowledged (30 s).  The sessions' own stall detection usually acts first;
#: these catch what it cannot see, such as a receiver's idle spare connections.
_KEEPALIVE_OPTIONS = [
    (socket.IPPROTO_TCP, "TCP_NODELAY", 1),  # ACK frames are tiny and latency-bound
    (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
    (socket.IPPROTO_TCP, "TCP_KEEPIDLE", 10),
    (socket.IPPROTO_TCP, "TCP_KEEPINTVL", 5),
    (socket.IPPROTO_TCP, "TCP_KEEPCNT", 3),
    (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", 30_000),
]


def _tune(sock: socket.socket) -> None:
    for level, name, value in _KEEPALIVE_OPTIONS:
        option = getattr(socket, name, None)
        if option is not None:  # not every platform has every option
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


async def connect(host: str, port: int) -> SocketStream:
    """Open a TCP connection, trying each resolved address in turn."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectFailed(f"cannot resolve {host}: {exc}", "does not resolve") from exc
    last: Exception | None = None
    for family, socktype, proto, _canon, addr in infos:
        sock = socket.socket(family, socktype, proto)
        sock.setblocking(False)
        try:
            try:
                sock.connect(addr)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err)) from None
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        _tune(sock)
        return SocketStream(sock)
    reason = last.strerror if isinstance(last, OSError) and last.strerror else str(last)
    raise ConnectFailed(f"cannot connect to {host} port {port}: {reason}", reason.lower())


class TcpListener:
    """A listening socket; on a wildcard address it serves IPv4 and IPv6 alike."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._closed = False

    async def accept(self) -> SocketStream:
        while True:
            try:
                conn, _addr = self._sock.accept()
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                # Running out of descriptors or an aborted handshake must not end the server.
                log.warning("accept failed: %s", exc.strerror)
                await anyio.sleep(0.05)
                continue
            _tune(conn)
            return SocketStream(conn)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
        await checkpoint()


def listen(port: int, host: str | None = None) -> TcpListener:
    """Bind and listen.  ``host=None`` means every address, IPv6 and IPv4."""
    candidates: list[tuple[socket.AddressFamily, str]]
    if host is None:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        candidates = [(info[0], str(info[4][0])) for info in infos]
    last: OSError | None = None
    for family, addr in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # e.g. IPv6 disabled in the kernel
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((addr, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno == errno.EADDRINUSE:
                break
            continue
        return TcpListener(sock)
    assert last is not None
    raise CannotListen(f"cannot listen on port {port}: {last.strerror}")


# -- stdin / stdout ------------------------------------------------------------------------


def _grow_pipe(fd: int) -> None:
    """Raise a pipe's capacity to the system maximum: fewer wake-ups per chunk (+24% measured)."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = int(f.read())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError):
        pass


class _Fd:
    """A file descriptor we borrow: made non-blocking if it can be polled, restored on close.

    Regular files and terminals cannot be waited on with epoll.  A terminal may never answer,
    so it is served by a worker thread.  Reading a regular file (when it cannot be sent with
    sendfile) goes through a thread too: it overlaps with the sockets' work on the other core
    (1 GiB from /dev/shm: 1.2-1.8 -> 2.4-2.6 GB/s).  Writing one is done inline: handing each
    chunk to a thread and back cost more than it saved (1 GiB to /dev/shm, medians of 4-5:
    1.61 -> 1.93 GB/s into an existing file, 1.01 -> 1.20 GB/s into a new one), as the receiver's
    event loop has a core of its own once the transmitter sends with sendfile.  Other devices
    (/dev/null, /dev/zero) are served inline: they never make us wait.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flags = self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
        self.pollable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self.tty = os.isatty(fd)
        self.threaded = stat.S_ISREG(mode) or self.tty
        if self.pollable:
            fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
            _grow_pipe(fd)

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags)


def _can_sendfile(fd: int) -> bool:
    """Whether the kernel can splice from ``fd`` (most file systems can; probed, not assumed)."""
    r, w = os.pipe()
    try:
        os.sendfile(w, fd, 0, 1)  # an explicit offset: fd's own position does not move
        return True
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


def _pread_exactly(
    fd: int, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None
) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise LocalIOError("the input file shrank while it was being sent")
        got += n
    return digest(view) if digest is not None else 0


async def read_at(
    fd: int, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
) -> int:
    """Fill ``view`` from ``offset`` of the input file ``fd``, in a worker thread.

    For whoever needs the bytes of a region that :meth:`SocketStream.send_file` would have sent
    without reading them (to hash them, or to send them through a stream that cannot take a
    file).  ``fd``'s own position does not move.  With ``digest``, returns ``digest(view)``,
    computed in the same thread while the bytes are still in the cache; otherwise 0.
    """
    try:
        return await anyio.to_thread.run_sync(_pread_exactly, fd, view, offset, digest)
    except OSError as exc:
        raise LocalIOError(f"reading input failed: {exc.strerror}") from exc


class FdSource:
    """Reads the stream to send from a file descriptor (stdin for the CLI).

    A regular file is also offered as regions (:meth:`claim`): without checksums the
    transmitter then sends its chunks straight from the page cache and re-sends a lost chunk by
    reading it again, so the file's bytes are never copied into our memory at all.  With
    checksums the bytes must be read to be hashed: each region is read once (:meth:`pread`).
    """

    def __init__(self, fd: int) -> None:
        self._fd = _Fd(fd)
        #: A pipe or socket read waits in epoll before it reads, so cancelling it loses
        #: nothing; a read in a worker thread could complete after being given up on.
        self.cancel_safe = self._fd.pollable
        #: Set when the input is a regular file the kernel can send from by itself.
        self.file_fd: int | None = None
        if self._fd.threaded and not self._fd.tty and _can_sendfile(fd):
            self.file_fd = fd
            self._pos = os.lseek(fd, 0, os.SEEK_CUR)

    def claim(self, size: int) -> tuple[int, int]:
        """The next region of at most ``size`` bytes as (offset, length); length 0 at the end.

        The end is wherever the file ends now, as for read(): a file still growing is sent as
        far as it got.  The file position follows, as if the bytes had been read.
        """
        fd = self.file_fd
        assert fd is not None
        try:
            length = max(0, min(size, os.fstat(fd).st_size - self._pos))
            offset = self._pos
            self._pos += length
            os.lseek(fd, self._pos, os.SEEK_SET)
        except OSError as exc:
            raise LocalIOError(f"reading input failed: {exc.strerror}") from exc
        return offset, length

    async def pread(
        self, view: memoryview, offset: int, digest: Callable[[memoryview], int] | None = None
    ) -> int:
        """Fill ``view`` from ``offset`` of the file: a claimed region, to hash it or for a
        stream that is no :class:`~viamillipede.streams.SendFile` (an in-memory one, say).

        With ``digest``, returns ``digest(view)``, computed in the same worker thread as the
        read (XXH3 releases the GIL): the event loop stays free to send, and the bytes are
        hashed while they are still in the cache.
        """
        fd = self.file_fd
        assert fd is not None
        return await read_at(fd, view, offset, digest)

    async def readinto(self, view: memoryview) -> int:
        fd = self._fd
        while True:
            try:
                if fd.threaded:
                    # A terminal may never answer: let Ctrl-C abandon that read (the session
                    # is ending, so the buffer it fills no longer matters).
                    return await anyio.to_thread.run_sync(
                        os.readv, fd.fd, [view], abandon_on_cancel=fd.tty
                    )
                return os.readv(fd.fd, [view])
            except BlockingIOError:
                await anyio.wait_readable(fd.fd)
            except OSError as exc:
                raise LocalIOError(f"reading input failed: {exc.strerror}") from exc

    async def aclose(self) -> None:
        self._fd.restore()


class _Preallocator:
    """Allocates a regular output file's blocks a little ahead of the writer, in a thread.

    Allocating pages or extents is a large part of writing a new file (on tmpfs here, about
    as much as copying the bytes); done ahead on the other core it is off the writer's path, and
    on disk file systems the file also ends up less fragmented.  FALLOC_FL_KEEP_SIZE: the file
    only ever shows the bytes really written, and what was allocated beyond the final end is
    given back on close.  A file system without fallocate just gets no preallocation.
    """

    KEEP_SIZE, PUNCH_HOLE = 0x01, 0x02
    STEP = 4 << 20

    def __init__(self, fd: int, start: int, ahead: int) -> None:
        import ctypes
        import threading

        libc = ctypes.CDLL(None, use_errno=True)
        self._fallocate = libc.fallocate
        self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self._fd = fd
        self._ahead = ahead
        # Allocated up to here: what the file holds already needs nothing.
        self._done = max(start, os.fstat(fd).st_size)
        self._want = start
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="viamillipede-prealloc",
                                        daemon=True)
        self._thread.start()

    def advance(self, position: int) -> None:
        """The writer has reached ``position``."""
        want = position + self._ahead
        if want - self._done < self.STEP:
            return  # far enough ahead still: no wake-up (nor GIL hand-off) for the thread
        with self._cond:
            self._want = want
            self._cond.notify()

    def caught_up(self, timeout: float) -> bool:
        """Wait until everything asked for is allocated (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._want or self._stop, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.notify_all()  # for caught_up()
                while not self._stop and self._done >= self._want:
                    self._cond.wait()
                if self._stop:
                    return
                start, length = self._done, min(self._want - self._done, self.STEP)
            if self._fallocate(self._fd, self.KEEP_SIZE, start, length) != 0:
                with self._cond:  # not supported here, or the disk is full: writes will tell
                    self._stop = True
                    self._cond.notify_all()
                return
            with self._cond:
                self._done = start + length

    def close(self, end: int) -> None:
        """Stop, and give back whatever was allocated beyond ``end``."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        try:
            size = os.fstat(self._fd).st_size
            start = max(end, size)  # never what the file held beyond our end already
            if self._done > start:  # tmpfs and xfs free blocks past the end on a punch...
                self._fallocate(self._fd, self.PUNCH_HOLE | self.KEEP_SIZE, start,
                                self._done - start)
            if size == end:  # ...ext4 only on a truncate
                os.ftruncate(self._fd, end)
        except OSError:
            pass  # only space is at stake, and the data is all written


class FdSink:
    """Writes the received stream to a file descriptor (stdout for the CLI)."""

    def __init__(self, fd: int, preallocate: int = 0) -> None:
        self._fd = _Fd(fd)
        self.nbytes = 0  # what actually went out, even from a write the session cut short
        self._prealloc: _Preallocator | None = None
        self._position = 0
        # Not with O_APPEND: appends go wherever the end is at the time.
        regular = stat.S_ISREG(os.fstat(fd).st_mode) and not self._fd.flags & os.O_APPEND
        if regular:
            self._position = os.lseek(fd, 0, os.SEEK_CUR)
        if preallocate and regular:
            self._prealloc = _Preallocator(fd, self._position, preallocate)
        #: How splice_from moves data: straight into a pipe, or via a pipe of ours into a file.
        self._splice: str | None = None
        self._pipe: tuple[int, ...] = ()
        self._pipe_size = 0
        # Not /dev/null: it costs nothing to write, and reading chunks into buffers as they
        # come (all connections at once) beat taking turns to splice (1 GiB, threads 4:
        # 0.23 s against 0.30 s).
        fifo = stat.S_ISFIFO(os.fstat(fd).st_mode)
        if hasattr(os, "splice") and (fifo or regular):
            self._splice = "pipe" if fifo else "file"
        if self._splice == "file":
            self._pipe = os.pipe2(os.O_CLOEXEC)
            _grow_pipe(self._pipe[1])
            self._pipe_size = fcntl.fcntl(self._pipe[1], fcntl.F_GETPIPE_SZ)

    async def write(self, data: memoryview) -> None:
        fd = self._fd
        view = data
        if self._prealloc is not None:
            self._prealloc.advance(self._position + len(view))
        while view:
            try:
                if fd.tty:
                    n = await anyio.to_thread.run_sync(os.write, fd.fd, view)
                else:
                    n = os.write(fd.fd, view)
            except BlockingIOError:
                await anyio.wait_writable(fd.fd)
                continue
            except OSError as exc:
                raise LocalIOError(_sink_reason(exc)) from exc
            self.nbytes += n
            self._position += n
            view = view[n:]
        await checkpoint()

    @property
    def can_splice(self) -> bool:
        """Whether :meth:`splice_from` works here: a pipe, or a regular file not in append mode."""
        return self._splice is not None

    async def splice_from(
        self, stream: SpliceSource, count: int, moved: Callable[[int], None]
    ) -> None:
        """Move the next ``count`` bytes of ``stream`` to this sink without copying them
        through user space; ``moved(n)`` reports every step that reached the sink.

        Into a pipe, splice passes the socket's pages on by reference; into a file, one copy
        (pipe to page cache) replaces two (recv, then write).
        """
        mode = self._splice
        assert mode is not None
        source = stream.fileno()
        out = self._fd.fd
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        if self._prealloc is not None:
            self._prealloc.advance(self._position + count)
        lowat = 1
        try:
            while count:
                step = count if mode == "pipe" else min(count, self._pipe_size)
                into = out if mode == "pipe" else self._pipe[1]
                try:
                    n = os.splice(source, into, step, flags=flags)
                except BlockingIOError:
                    # The socket has nothing, or (into a pipe sink) the pipe is full.
                    if mode == "pipe" and select.select([source], [], [], 0)[0]:
                        await anyio.wait_writable(out)
                    else:
                        lowat = await stream.wait_for_data(count, lowat)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        raise LocalIOError(_sink_reason(exc)) from exc
                    raise anyio.BrokenResourceError(
                        f"receive from {stream.peer}: {exc.strerror}"
                    ) from exc
                if n == 0:
                    raise anyio.BrokenResourceError(f"{stream.peer} closed the connection")
                if mode == "file":
                    self._drain_pipe(n)
                self.nbytes += n
                self._position += n
                count -= n
                moved(n)
        finally:
            stream.reset_lowat(lowat)
        await checkpoint()

    def _drain_pipe(self, n: int) -> None:
        while n:
            try:
                n -= os.splice(self._pipe[0], self._fd.fd, n, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                raise LocalIOError(_sink_reason(exc)) from exc

    async def flush(self) -> None:
        # os.write is unbuffered: once it returned, the bytes belong to the kernel/consumer.
        await checkpoint()

    async def aclose(self) -> None:
        if self._prealloc is not None:
            self._prealloc.close(self._position)
            self._prealloc = None
        for fd in self._pipe:
            os.close(fd)
        self._pipe = ()
        self._fd.restore()


def _sink_reason(exc: OSError) -> str:
    if exc.errno == errno.EPIPE:
        return "writing output failed: the consumer of stdout has gone away (broken pipe)"
    if exc.errno == errno.ENOSPC:
        return "writing output failed: no space left on device"
    return f"writing output failed: {exc.strerror}"


if TYPE_CHECKING:

    def _capabilities(stream: SocketStream, sink: FdSink) -> tuple[
        ReceiveInto, ReceiveExactlyInto, SendFile, SendPages, SpliceSource, SpliceTo, SpliceSink
    ]:
        """Never runs: mypy proves here that the classes have the capabilities they claim."""
        return stream, stream, stream, stream, stream, stream, sink
