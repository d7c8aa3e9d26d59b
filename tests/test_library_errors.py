"""What a library caller gets when something fails: one ``ViamillipedeError`` subclass, never an
exception group, and the peer told at once.

Over loopback TCP through :func:`viamillipede.send` and :func:`viamillipede.receive`, on Trio
and asyncio.  Each end's idle timeout is 30 s and each session is bounded well below it
(``fail_after``), so an end that learns of its peer's failure only by timing out fails the test.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import viamillipede
from harness import WatchedSink
from viamillipede import BufferSink, BytesSource, errors, receive, send
from viamillipede.api import guarded_sink, guarded_source, single_error
from viamillipede.errors import (
    CannotListen,
    CannotResolve,
    ExitCode,
    LocalIOError,
    PeerTimeout,
    RemoteFailure,
    UsageError,
    ViamillipedeError,
)

pytestmark = pytest.mark.anyio

HOST = "127.0.0.1"
CHUNK = 16 * 1024
IDLE = 30.0
PROMPT = 10.0  # well below IDLE: hearing of the peer's failure, not timing out
README = Path(__file__).resolve().parent.parent / "README.md"


async def outcome(fn: Callable[[], Awaitable[object]]) -> BaseException | None:
    try:
        await fn()
    except Exception as exc:  # an ExceptionGroup too: the tests check it is not one
        return exc
    return None


async def session(source: Any, sink: Any) -> dict[str, BaseException | None]:
    """A transmitter and a receiver on loopback; what each raised (None: it succeeded)."""
    ended: dict[str, BaseException | None] = {}

    async def rx(task_status: anyio.abc.TaskStatus[int]) -> None:
        ended["rx"] = await outcome(lambda: receive(sink, 0, host=HOST, idle_timeout=IDLE,
                                                    task_status=task_status))

    with anyio.fail_after(PROMPT):
        async with anyio.create_task_group() as tg:
            port = await tg.start(rx)
            ended["tx"] = await outcome(lambda: send(
                source, [(HOST, port)], threads=3, chunk_size=CHUNK, idle_timeout=IDLE))
    return ended


# -- a sink that fails ----------------------------------------------------------------------------


class FailingSink(BufferSink):
    """Takes ``good`` bytes, then its ``write`` (or, with ``on_flush``, its ``flush``) raises."""

    def __init__(self, error: BaseException, good: int = 0, *, on_flush: bool = False) -> None:
        super().__init__()
        self.error = error
        self.good = good
        self.on_flush = on_flush

    async def write(self, data: memoryview) -> None:
        if not self.on_flush and len(self.data) + len(data) > self.good:
            raise self.error
        await super().write(data)

    async def flush(self) -> None:
        if self.on_flush:
            raise self.error
        await super().flush()


async def test_a_sink_whose_write_fails_ends_both_ends_at_once() -> None:
    """Disk full on the receiver: ``receive`` raises LocalIOError caused by the OSError, and
    the transmitter is told (RemoteFailure), long before its timeout."""
    full = OSError(errno.ENOSPC, "No space left on device")
    ended = await session(BytesSource(b"x" * 20 * CHUNK), FailingSink(full, good=3 * CHUNK))
    rx, tx = ended["rx"], ended["tx"]
    assert type(rx) is LocalIOError, repr(rx)
    assert rx.__cause__ is full
    assert str(rx).startswith("the sink failed: ") and "No space left" in str(rx)
    assert rx.exit_code == ExitCode.LOCAL_IO == 6
    assert type(tx) is RemoteFailure, repr(tx)
    assert "the sink failed" in str(tx) and "No space left" in str(tx)


async def test_a_sink_whose_flush_fails_ends_both_ends_at_once() -> None:
    broken = BrokenPipeError(errno.EPIPE, "Broken pipe")
    ended = await session(BytesSource(b"y" * 5 * CHUNK), FailingSink(broken, on_flush=True))
    assert type(ended["rx"]) is LocalIOError, repr(ended["rx"])
    assert ended["rx"].__cause__ is broken
    assert type(ended["tx"]) is RemoteFailure, repr(ended["tx"])


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        RuntimeError("boom"),
        anyio.BrokenResourceError("the consumer went away"),
        ExceptionGroup("the sink's own tasks", [OSError(errno.EIO, "I/O error")]),
    ],
    ids=["ValueError", "RuntimeError", "BrokenResourceError", "ExceptionGroup"],
)
async def test_any_exception_of_a_sink_is_a_local_io_error(error: Exception) -> None:
    ended = await session(BytesSource(b"z" * 4 * CHUNK), FailingSink(error, good=CHUNK))
    assert type(ended["rx"]) is LocalIOError, repr(ended["rx"])
    assert ended["rx"].__cause__ is error
    assert type(ended["tx"]) is RemoteFailure, repr(ended["tx"])


async def test_a_sink_raising_a_project_error_keeps_it() -> None:
    mine = LocalIOError("writing the archive failed")
    ended = await session(BytesSource(b"w" * 4 * CHUNK), FailingSink(mine, good=CHUNK))
    assert ended["rx"] is mine
    assert type(ended["tx"]) is RemoteFailure and "writing the archive failed" in str(ended["tx"])


# -- a source that fails ------------------------------------------------------------------------


class FailingSource:
    """Yields ``data``; then, once the receiver has written all of it (so the session is
    surely under way), its next ``readinto`` raises ``error``."""

    def __init__(self, data: bytes, sink: WatchedSink, error: BaseException) -> None:
        self.data = data
        self.pos = 0
        self.sink = sink
        self.error = error

    async def readinto(self, view: memoryview) -> int:
        await anyio.lowlevel.checkpoint()
        if self.pos < len(self.data):
            n = min(len(view), len(self.data) - self.pos)
            view[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n
        await self.sink.wait_for(len(self.data))
        raise self.error


@pytest.mark.parametrize(
    "error", [OSError(errno.EIO, "Input/output error"), KeyError("row")], ids=["EIO", "KeyError"]
)
async def test_a_source_whose_read_fails_ends_both_ends_at_once(error: Exception) -> None:
    sink = WatchedSink()
    data = b"s" * 4 * CHUNK  # whole chunks: nothing waits in a partly filled one
    ended = await session(FailingSource(data, sink, error), sink)
    tx, rx = ended["tx"], ended["rx"]
    assert type(tx) is LocalIOError, repr(tx)
    assert tx.__cause__ is error
    assert str(tx).startswith("the source failed: ")
    assert type(rx) is RemoteFailure, repr(rx)
    assert "the source failed" in str(rx)
    assert bytes(sink.data) == data


async def test_a_source_that_fails_at_once_fails_the_transmitter_at_once() -> None:
    """Before any connection is up: the transmitter still raises the one error, not a group."""

    class Broken:
        async def readinto(self, view: memoryview) -> int:
            raise PermissionError(errno.EACCES, "Permission denied")

    with anyio.fail_after(PROMPT):
        error = await outcome(lambda: send(Broken(), [(HOST, 9)], idle_timeout=IDLE))
    assert type(error) is LocalIOError, repr(error)
    assert isinstance(error.__cause__, PermissionError)


def test_guards_let_the_packages_own_descriptor_ends_through() -> None:
    """Those report their failures as LocalIOError already, and a file must stay a file the
    kernel can send from (or splice into)."""
    import os

    from viamillipede.transport import FdSink, FdSource

    r, w = os.pipe()
    try:
        source, sink = FdSource(r), FdSink(w)
        assert guarded_source(source) is source
        assert guarded_sink(sink) is sink
        wrapped = guarded_source(BytesSource(b""))
        assert wrapped is not source and guarded_source(wrapped) is wrapped
        assert getattr(wrapped, "cancel_safe", None) is True  # as BytesSource says
    finally:
        os.close(r)
        os.close(w)


# -- never an exception group ---------------------------------------------------------------


def test_a_group_holding_one_project_error_becomes_that_error() -> None:
    cause = OSError(errno.ENOSPC, "No space left on device")
    inner = LocalIOError("the sink failed")
    inner.__cause__ = cause
    group = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [inner])])
    with pytest.raises(LocalIOError) as caught, single_error():
        raise group
    assert caught.value is inner
    assert caught.value.__cause__ is cause


def test_a_project_error_wins_over_other_errors_in_a_group() -> None:
    timeout = PeerTimeout("no progress")
    group = ExceptionGroup("g", [ValueError("noise"), ExceptionGroup("h", [timeout])])
    with pytest.raises(PeerTimeout), single_error():
        raise group


def test_a_group_without_project_errors_becomes_its_first_error() -> None:
    with pytest.raises(ValueError, match="first"), single_error():
        raise ExceptionGroup("g", [ValueError("first"), KeyError("second")])


# -- names and addresses ------------------------------------------------------------------------


async def test_send_to_a_name_that_does_not_resolve_fails_at_once() -> None:
    with anyio.fail_after(PROMPT):
        error = await outcome(lambda: send(BytesSource(b"x"), [(HOST, 9),
                                                               ("no-such-host.invalid", 9)]))
    assert type(error) is CannotResolve, repr(error)
    assert isinstance(error, UsageError) and error.exit_code == ExitCode.USAGE
    assert str(error).startswith("cannot resolve no-such-host.invalid: ")


async def test_send_with_retry_resolve_keeps_trying_until_its_timeout() -> None:
    with anyio.fail_after(PROMPT):
        error = await outcome(lambda: send(BytesSource(b"x"), [("no-such-host.invalid", 9)],
                                           idle_timeout=0.5, retry_resolve=True))
    assert type(error) is PeerTimeout, repr(error)
    assert "cannot resolve no-such-host.invalid" in str(error)


@pytest.mark.parametrize(
    ("address", "reason"),
    [("nosuch.invalid", "cannot resolve nosuch.invalid"),
     ("192.0.2.1", "")],  # TEST-NET-1: never an address of this machine
)
async def test_a_listen_address_that_fails_is_named(address: str, reason: str) -> None:
    with anyio.fail_after(PROMPT):
        error = await outcome(lambda: receive(BufferSink(), 0, host=address))
    assert type(error) is CannotListen, repr(error)
    assert re.match(rf"cannot listen on {re.escape(address)} port 0: ", str(error)), str(error)
    assert reason in str(error)


# -- the exported hierarchy ------------------------------------------------------------------

EXPORTED = {
    "ViamillipedeError": ExitCode.FAILURE,
    "CannotListen": ExitCode.FAILURE,
    "UsageError": ExitCode.USAGE,
    "CannotResolve": ExitCode.USAGE,
    "PeerRejected": ExitCode.PEER_REJECTED,
    "PeerTimeout": ExitCode.TIMEOUT,
    "TruncatedStream": ExitCode.TRUNCATED,
    "LocalIOError": ExitCode.LOCAL_IO,
    "RemoteFailure": ExitCode.REMOTE_FAILED,
    "ProtocolViolation": ExitCode.PROTOCOL,
    "Interrupted": ExitCode.INTERRUPTED,
    "RemoteCommandFailed": ExitCode.REMOTE_FAILED,
    "SshFailed": ExitCode.SSH,
}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_every_error_is_exported_with_its_exit_code(name: str) -> None:
    cls = getattr(viamillipede, name)
    assert cls is getattr(errors, name)
    assert name in viamillipede.__all__
    assert issubclass(cls, ViamillipedeError)
    assert cls.exit_code == EXPORTED[name]
    assert cls.__doc__


def test_exit_code_is_exported() -> None:
    assert viamillipede.ExitCode is ExitCode
    assert "ExitCode" in viamillipede.__all__


def test_every_error_class_of_the_package_is_exported() -> None:
    mine = {name for name, obj in vars(errors).items()
            if isinstance(obj, type) and issubclass(obj, ViamillipedeError)}
    assert mine == set(EXPORTED)


def test_the_readme_documents_every_error_with_its_exit_status() -> None:
    library = README.read_text().split("## Library", 1)[1].split("\n## ", 1)[0]
    for name, code in EXPORTED.items():
        row = next((line for line in library.splitlines() if line.startswith(f"| `{name}` |")),
                   None)
        assert row is not None, f"{name} is not in the README's Library section"
        assert f"| {int(code)} |" in row, row
