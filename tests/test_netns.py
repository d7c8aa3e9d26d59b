"""Resilience of the real CLI across two shaped links between two network namespaces.

Host A runs ``viamillipede tx 198.18.1.2 PORT tx 198.18.2.2 PORT threads 4`` and host B runs
``viamillipede rx PORT timeout 30``; link 1 is the preferred target, link 2 the spare (see
tests/netns_lab.py).  Faults are injected mid-transfer by polling, with a deadline, until the
receiver's output or an interface counter has passed a mark; nothing waits on a fixed sleep.

The lab tests need root and iproute2 (``ip``, ``tc``): they skip without them, and fail
instead under VIAMILLIPEDE_REQUIRE_LAB=1 (as in CI).  They check outcomes (every byte
delivered, which link carried the rest, exit codes), with deadlines only against hangs.
Claims about time and link shares (how soon a dead link is routed around, that a slow source
stays on the first link) depend on the machine's load over real links, so they are checked on
the same two-link topology in memory, under a mock clock (the first section).

Knobs for hand-run acceptance:

- ``VMP_NETNS_REPEAT=10`` runs the link-down, black-hole and dead-first-target scenarios ten
  times each (default 1);
- ``VMP_NETNS_RATE=100mbit`` shapes every link direction to another rate (default 200mbit).

Timings (fault to completion, rejoin delay, link shares) are printed (visible with ``-s``) and
recorded as test properties (``--junitxml``).  bench/netns_links.py measures throughput and
the split over the links.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import anyio
import anyio.abc
import pytest

from harness import PacedSource, WatchedSink, run_mock, run_session
from netns_lab import Lab, MiB, lab_or_skip, pattern_file, signal_name, tail, wait_until
from viamillipede import receiver, txsource
from viamillipede.testing import MemoryNetwork, PassThrough

T = TypeVar("T")

REPEAT = int(os.environ.get("VMP_NETNS_REPEAT", "1"))
RATE = os.environ.get("VMP_NETNS_RATE", "200mbit")
repeat = pytest.mark.parametrize("attempt", range(REPEAT), ids=[f"run{i}" for i in range(REPEAT)])

SIZE = 48 * MiB  # a1..b2 at 200 mbit: about 2 s over one link
CHUNK = 2 * MiB  # the CLI's default chunk size
WINDOW = 8 * CHUNK  # default window for 4 threads: chunks B may hold unwritten
LIMIT = 60.0  # longest a lab transfer may run: a guard against hangs, not a measurement
RATE_BYTES = 25e6  # 200mbit, in bytes per second: the links of the in-memory twin
STALL_CAP = 30.0  # a silent connection is abandoned after 8 x smoothed RTT, at most 30 s
#: Seconds a cut link may add to a transfer: the stall detector's 2 s, the re-sends, slack.
RECOVERY = 10.0
CONNECT_TIMEOUT = 10.0  # a connect into a black hole gives up (as the API's TCP connector)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_or_skip(RATE) as fresh:
        yield fresh


Record = Callable[[str, object], None]


def note(record: Record, key: str, value: float | str) -> None:
    """Put a measurement in the test report and on stdout (seen with -s)."""
    shown = f"{value:.2f}" if isinstance(value, float) else value
    record(key, shown)
    print(f"{key} = {shown}")


# -- the same two links in memory, under a mock clock ------------------------------------------


@pytest.fixture
def seal_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seal and open every chunk on the event loop, as chunks below INLINE_SEAL_BYTES are.

    The mock clock jumps ahead whenever every task waits; a task waiting for a worker thread to
    seal a 2 MiB chunk is waiting too, so each seal or open would let the clock skip to the
    next deadline (a stall, a link's next byte, a reminder) while no time passed for the
    session: dozens of jumps per transfer, and timings and link shares that mean nothing.  On
    the loop, sealing takes no mock time, as the twin means it to; the bytes on the wire, the
    handshakes and the re-sends of sealed chunks are the CLI's."""
    for module in (txsource, receiver):
        monkeypatch.setattr(module, "INLINE_SEAL_BYTES", 1 << 62)


class Link:
    """One link of the twin: ``rate`` bytes per second of mock time from the transmitter,
    shared by every connection over it; ``fail`` takes it down or black-holes it."""

    def __init__(self, number: int, rate: float) -> None:
        self.number = number
        self.rate = rate
        self.state: Literal["up", "down", "blackhole"] = "up"
        self.sent = 0  # payload and frames the transmitter put on the wire
        self.wire = anyio.Lock()
        self.streams: set[LinkStream] = set()

    def fail(self, how: Literal["down", "blackhole"]) -> None:
        """``down``: every connection over the link breaks and new ones are refused, as when
        the carrier is lost.  ``blackhole``: everything sent either way vanishes without a
        word, and new connections time out, as when the peer's address is gone."""
        self.state = how
        if how == "down":
            for stream in list(self.streams):
                stream.cut()


class LinkStream(PassThrough):
    """The transmitter's end of one connection over a :class:`Link`."""

    def __init__(self, inner: anyio.abc.ByteStream, link: Link) -> None:
        super().__init__(inner)
        self.link = link
        self._scopes: set[anyio.CancelScope] = set()
        link.streams.add(self)

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def _op(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.link.state == "down":
            raise anyio.BrokenResourceError(f"link {self.link.number} is down")
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                return await fn()
        finally:
            self._scopes.discard(scope)
        raise anyio.BrokenResourceError(f"link {self.link.number} went down")  # cut()

    async def _vanish_if_blackholed(self) -> None:
        if self.link.state == "blackhole":
            await anyio.sleep_forever()

    async def send(self, item: bytes | bytearray | memoryview) -> None:
        async def transmit() -> None:
            await self._vanish_if_blackholed()
            async with self.link.wire:
                await anyio.sleep(len(item) / self.link.rate)
            await self._vanish_if_blackholed()
            self.link.sent += len(item)
            await self.inner.send(item)  # type: ignore[arg-type]

        await self._op(transmit)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        async def arrive() -> bytes:
            data = await self.inner.receive(max_bytes)
            await self._vanish_if_blackholed()
            return data

        return await self._op(arrive)

    async def aclose(self) -> None:
        self.link.streams.discard(self)
        await self.inner.aclose()


class TwoLinks:
    """The lab in memory: ``tx LINK1 PORT tx LINK2 PORT threads 4`` spreads the connections
    over the two targets round-robin (0 and 2 over link 1, the preferred one; 1 and 3 over
    link 2)."""

    def __init__(self, rate: float = RATE_BYTES) -> None:
        self.net = MemoryNetwork()
        self.links = {1: Link(1, rate), 2: Link(2, rate)}
        self._refusing = MemoryNetwork()
        self._refusing.refuse = True

    @staticmethod
    def rank(index: int) -> int:
        return index % 2

    def sent(self) -> tuple[int, int]:
        return self.links[1].sent, self.links[2].sent

    async def connect(self, index: int) -> anyio.abc.ByteStream:
        link = self.links[1 + self.rank(index)]
        if link.state == "blackhole":
            await anyio.sleep(CONNECT_TIMEOUT)
        if link.state != "up":
            return await self._refusing.connect(index)  # raises: refused
        return LinkStream(await self.net.connect(index), link)

    async def transfer(self, source: object, sink: WatchedSink | None = None) -> bytes:
        """Send ``source`` over both links (threads 4, 2 MiB chunks, as the CLI's defaults)."""
        session = await run_session(source, net=self.net, sink=sink, connect=self.connect,
                                    threads=4, chunk_size=CHUNK, rank=self.rank, limit=3600)
        return session.received


@pytest.mark.usefixtures("seal_on_the_loop")
def test_in_memory_a_slow_source_stays_on_the_first_link() -> None:
    """A source slower than one link (3 MB/s for 8 s against 25 MB/s links) leaves the
    second link idle: its chunks never wait for the first link."""
    links = TwoLinks()
    source = PacedSource(3e6, int(3e6 * 8), seed=7)
    assert run_mock(lambda: links.transfer(source)) == source.data
    a1, a2 = links.sent()
    share = a2 / (a1 + a2)
    assert share < 0.10, f"link 2 carried {share:.0%} ({a2} of {a1 + a2} bytes)"


@pytest.mark.usefixtures("seal_on_the_loop")
def test_in_memory_a_fast_source_spills_over_to_the_second_link() -> None:
    """What makes the test above mean something: the second link is used once the first is
    busy."""
    links = TwoLinks()
    data = random.Random(3).randbytes(SIZE)
    assert run_mock(lambda: links.transfer(data)) == data
    a1, a2 = links.sent()
    assert a2 / (a1 + a2) > 0.25, f"link 2 carried only {a2} of {a1 + a2} bytes"


@pytest.mark.usefixtures("seal_on_the_loop")
@pytest.mark.parametrize("how", ["down", "blackhole"])
def test_in_memory_a_dead_link_mid_transfer_is_routed_around_in_time(
        how: Literal["down", "blackhole"]) -> None:
    """(a) and (b) below, timed: once a third has arrived, link 1 dies.  The rest comes over
    link 2, within the stall timeout's cap plus the time link 2 needs to carry it."""
    links = TwoLinks()
    data = random.Random(5).randbytes(SIZE)
    sink = WatchedSink()

    async def main() -> tuple[int, tuple[int, int], float]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(links.transfer, data, sink)
            await sink.wait_for(SIZE // 3)
            at_fault, before = len(sink.data), links.sent()
            links.links[1].fail(how)
            fault_at = anyio.current_time()
        return at_fault, before, anyio.current_time() - fault_at

    at_fault, (a1_before, a2_before), took = run_mock(main)
    assert bytes(sink.data) == data
    assert a1_before > CHUNK, f"link 1 carried only {a1_before} bytes before the fault"
    a2_after = links.sent()[1]
    assert a2_after - a2_before >= SIZE - at_fault - WINDOW, (
        f"link 2 carried only {a2_after - a2_before} bytes after the fault")
    bound = STALL_CAP + (SIZE - at_fault) / RATE_BYTES + 1.0
    assert took < bound, f"{took:.1f} s from the fault to the end, more than {bound:.1f} s"


# -- the real CLI in the lab -------------------------------------------------------------------


def mid_transfer_fault(lab: Lab, tmp_path: Path, attempt: int, record: Record,
                       inject: Callable[[], None], name: str) -> None:
    """(a), (b): send SIZE bytes from a file; once a third has arrived, break link 1."""
    src = tmp_path / "in"
    sha = pattern_file(src, SIZE, seed=attempt)
    t = lab.start_transfer(tmp_path, source=src, expected_sha=sha)
    wait_until(lambda: t.received() >= SIZE // 3 or t.tx.poll() is not None,
               "a third of the stream at the receiver", timeout=30, poll=0.005)
    assert t.tx.poll() is None, f"finished before the fault could be injected\n{t.logs()}"
    a1_before, a2_before = lab.tx_bytes_a()
    at_fault = t.received()
    fault_at = time.monotonic()
    inject()
    note(record, f"{name}_fault_after_s", fault_at - t.started)
    note(record, f"{name}_received_at_fault_MiB", at_fault / MiB)
    t.wait(deadline=t.started + LIMIT, what=f"the transfer after {name} of link 1")
    note(record, f"{name}_fault_to_completion_s", t.ended - fault_at if t.ended else -1.0)
    note(record, f"{name}_total_s", t.elapsed())
    t.assert_complete()
    # The re-sends of the chunks stuck on link 1 get through link 2 at once: the receiver
    # gives them buffers from its reserve instead of waiting for link 1's sockets to time out
    # (TCP_USER_TIMEOUT, 30 s).
    took = t.ended - fault_at if t.ended else LIMIT
    bound = (SIZE - at_fault) / RATE_BYTES + RECOVERY
    assert took < bound, f"{took:.1f} s from the fault to the end, more than {bound:.1f} s"
    a1_after, a2_after = lab.tx_bytes_a()
    note(record, f"{name}_link1_after_fault_MiB", (a1_after - a1_before) / MiB)
    note(record, f"{name}_link2_after_fault_MiB", (a2_after - a2_before) / MiB)
    assert a1_before > CHUNK, f"link 1 carried only {a1_before} bytes before the fault"
    # Whatever B had not received by the fault can only have come over link 2.
    assert a2_after - a2_before >= SIZE - at_fault - WINDOW, (
        f"link 2 carried only {a2_after - a2_before} bytes after the fault\n{t.logs()}")


# -- (a) link down -----------------------------------------------------------------------------


@pytest.mark.slow
@repeat
def test_link_down_mid_transfer_completes_over_link_2(
        lab: Lab, tmp_path: Path, attempt: int, record_property: Record) -> None:
    mid_transfer_fault(lab, tmp_path, attempt, record_property,
                       lambda: lab.link_down(1), "link_down")


# -- (b) silent black hole ---------------------------------------------------------------------


@pytest.mark.slow
@repeat
def test_blackhole_mid_transfer_completes_over_link_2(
        lab: Lab, tmp_path: Path, attempt: int, record_property: Record) -> None:
    mid_transfer_fault(lab, tmp_path, attempt, record_property,
                       lambda: lab.blackhole(1), "blackhole")


# -- (c) dead first target at start-up, then it comes back -------------------------------------


@pytest.mark.slow
@repeat
@pytest.mark.parametrize("fault", ["down", "blackhole"])
def test_dead_first_target_then_it_rejoins(
        lab: Lab, tmp_path: Path, attempt: int, fault: str, record_property: Record) -> None:
    kill, heal = (lab.link_down, lab.link_up) if fault == "down" else (lab.blackhole, lab.restore)
    kill(1)
    rate, seconds = 4 * MiB, 12
    t = lab.start_transfer(tmp_path, source=(rate, rate * seconds), seed=100 + attempt)
    mark = 8 * MiB
    wait_until(lambda: t.received() >= mark or t.tx.poll() is not None,
               f"{mark // MiB} MiB at the receiver with link 1 dead", timeout=30)
    assert t.tx.poll() is None, f"the transmitter exited {t.tx.returncode}\n{t.logs()}"
    a1_dead, a2_dead = lab.tx_bytes_a()
    note(record_property, "dead_phase_s", t.elapsed())
    assert a1_dead < 256 * 1024, f"{a1_dead} bytes went into the dead link 1"
    assert a2_dead >= mark, f"link 2 carried only {a2_dead} bytes"

    heal(1)
    healed_at = time.monotonic()
    feeding_left = seconds - (healed_at - t.started)
    # Rejoin: link 1 carries at least a chunk again while the transfer is still running.
    wait_until(lambda: lab.tx_bytes("a1") - a1_dead >= CHUNK or t.tx.poll() is not None,
               "link 1 to carry data again", timeout=seconds + LIMIT, poll=0.05)
    rejoin = time.monotonic() - healed_at
    t.wait(deadline=t.started + seconds + LIMIT)
    t.assert_complete()
    a1_end, a2_end = lab.tx_bytes_a()
    share = (a1_end - a1_dead) / max(1, (a1_end - a1_dead) + (a2_end - a2_dead))
    note(record_property, "source_left_at_heal_s", feeding_left)
    note(record_property, "rejoin_s", rejoin)
    note(record_property, "link1_share_after_heal", share)
    after = (t.ended or time.monotonic()) - healed_at
    assert a1_end - a1_dead >= CHUNK, (
        f"link 1 carried only {a1_end - a1_dead} bytes in the {after:.1f} s after it came back"
        f"\n{t.logs()}")


# -- (d) the receiver dies: the transmitter says so once and exits 4 ---------------------------


@pytest.mark.slow
def test_receiver_killed_transmitter_exits_4(lab: Lab, tmp_path: Path,
                                             record_property: Record) -> None:
    """How soon it gives up is test_operability.py's mock-clock business; here, that the
    real CLI says so once, in one line, and exits 4."""
    timeout = 5.0
    rate = 4 * MiB
    t = lab.start_transfer(tmp_path, source=(rate, rate * 30), seed=9,
                           tx_args=("threads", "4", "timeout", f"{timeout:g}"))
    wait_until(lambda: t.received() >= 4 * MiB or t.tx.poll() is not None,
               "4 MiB at the receiver", timeout=30)
    assert t.tx.poll() is None, f"the transmitter exited {t.tx.returncode}\n{t.logs()}"
    t.rx.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = t.tx.wait(timeout=timeout + LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the transmitter still runs {timeout + LIMIT:g} s after the receiver "
                    f"died\n{t.logs()}")
    took = time.monotonic() - killed_at
    t.rx.wait(timeout=10)
    note(record_property, "exit_after_kill_s", took)
    err = t.tx_err.read_text(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"tx stderr:\n{err}")
    assert signal_name(t.rx.returncode) == "SIGKILL"
    assert code == 4, f"transmitter exit {code}\n{tail(t.tx_err, 30)}"
    assert "Traceback" not in err, err
    errors = [line for line in lines if re.match(r"viamillipede tx: error\b", line)]
    assert len(errors) == 1, f"want one error line, got:\n{err}"
    assert lines[-1] == errors[0], f"the error is not the last word:\n{err}"
    assert re.search(r"progress|receiver|time", errors[0], re.I), errors[0]
