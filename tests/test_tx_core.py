"""The sending end's core (txcore.Dispatcher) on its own, and the driver's timing under a mock
clock.

Unit tests pin down dispatch (fill first, then spill by rank; re-sends before fresh chunks), the
BYE handshake, and every frame a receiver can get wrong.  A state machine then plays a hostile
receiver that may send any decodable value at any moment.  Last, whole transmitters run under
Trio's mock clock against scripted receivers: the stall timeout, the reconnect backoff, and a
BYE_OK lost with its connection.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from harness import run_mock
from hostile import Peer, accept_handshake
from viamillipede import BufferSink, BytesSource, Receiver, Transmitter
from viamillipede.errors import PeerTimeout, TruncatedStream
from viamillipede.streams import ConnectFailed
from viamillipede.testing import MemoryNetwork, PassThrough
from viamillipede.txcore import (
    BACKOFF_CAP,
    USELESS_ACK_SLACK,
    Backoff,
    ByeState,
    Dispatcher,
    Step,
    Wakes,
)
from viamillipede.window import MAX_STALL, MIN_STALL
from viamillipede.wire import (
    NEED_DATA,
    Ack,
    Auth,
    ByeOk,
    ConnectionClosed,
    Data,
    Decoder,
    Event,
    Hello,
    RemoteProtocolError,
    Welcome,
    WelcomeStatus,
)
from viamillipede.wire.secure import SessionKeys, TagChecker

MAX_SEQ = 2**64 - 1


def make(window: int = 8, ranks: tuple[int, ...] = (0, 0, 0, 0)) -> Dispatcher[str]:
    return Dispatcher(window, ranks)


def all_idle(core: Dispatcher[str], now: float = 0.0) -> None:
    for conn in range(core.connections):
        step, taken, _ = core.step(conn, now)
        assert (step, taken) == (Step.IDLE, None)


def take(core: Dispatcher[str], conn: int, now: float = 0.0) -> int:
    step, taken, _ = core.step(conn, now)
    assert step is Step.SEND_CHUNK and taken is not None, step
    return taken[0]


def feed(core: Dispatcher[str], n: int, now: float = 0.0) -> list[list[int]]:
    """Add ``n`` chunks of 100 bytes; the connections each one woke."""
    wakes = []
    for _ in range(n):
        seq = core.window.next_seq
        wakes.append(list(core.add(f"chunk{seq}", 100, now)))
    return wakes


# -- dispatch ------------------------------------------------------------------------------------


def test_idle_connections_are_woken_best_rank_first() -> None:
    core = make(ranks=(1, 0, 1, 0))
    all_idle(core)
    assert feed(core, 4) == [[1], [3], [0], [2]]
    assert core.idle() == set()


def test_a_slow_path_wakes_a_connection_per_chunk_and_keeps_each_to_its_share() -> None:
    core = make(window=8)  # four connections: a share is 2 chunks
    all_idle(core)
    assert feed(core, 6) == [[0], [1], [2], [3], [], []]
    assert [take(core, 0), take(core, 0)] == [0, 1]
    step, _, wakes = core.step(0, 0.0)
    assert (step, list(wakes)) == (Step.BUSY, [])  # at its share, and nobody idle to wake
    assert [take(core, 1), take(core, 1)] == [2, 3]


def test_a_fast_path_lets_one_connection_take_the_whole_window() -> None:
    core = make(window=8)
    all_idle(core)
    assert feed(core, 1) == [[0]]
    assert take(core, 0) == 0
    core.on_ack(0, 0, 1, 0.001)  # acknowledged within 1 ms: a fast path
    assert core.filling()
    assert core.step(0, 0.001)[0] is Step.IDLE
    # The first chunk wakes the best connection; it counts as running from then on, so the
    # next ones wait for it instead of waking the others.
    assert feed(core, 6, 0.001) == [[0], [], [], [], [], []]
    assert [take(core, 0) for _ in range(6)] == [1, 2, 3, 4, 5, 6]


def test_a_better_ranked_idle_connection_is_woken_even_on_a_fast_path() -> None:
    core = make(window=8, ranks=(1, 0))
    core.step(0, 0.0)  # conn 0 (the worse target) is up first, idle
    assert feed(core, 1) == [[0]]
    assert take(core, 0) == 0
    core.on_ack(0, 0, 1, 0.001)
    assert core.filling()
    core.step(1, 0.001)  # conn 1 (the better target) comes up: nothing for it yet
    assert feed(core, 1, 0.001) == [[1]]  # conn 0 runs, but conn 1 is preferred


def test_a_connection_at_its_share_hands_the_rest_to_an_idle_one() -> None:
    core = make(window=8, ranks=(0, 0))  # a share is 4 chunks on a slow path
    core.step(1, 0.0)
    core.step(0, 0.0)
    assert feed(core, 1) == [[0]]
    assert take(core, 0) == 0
    core.on_ack(0, 0, 1, 0.001)  # fast: conn 0 may fill the window
    assert feed(core, 6, 0.001) == [[]] * 6
    assert [take(core, 0, 1.0) for _ in range(5)] == [1, 2, 3, 4, 5]
    core.on_ack(0, 1, 2, 2.0)  # a slow round trip: the path is no longer fast
    assert not core.filling()
    step, _, wakes = core.step(0, 2.0)
    assert (step, list(wakes)) == (Step.BUSY, [1])
    assert take(core, 1, 2.0) == 6


def test_re_sends_go_before_fresh_chunks() -> None:
    core = make(window=8, ranks=(0, 0))
    feed(core, 3)
    assert [take(core, 0), take(core, 0), take(core, 1)] == [0, 1, 2]
    feed(core, 1)
    assert list(core.connection_lost(0)) == []  # nobody idle to wake
    assert [take(core, 1), take(core, 1), take(core, 1)] == [0, 1, 3]
    assert core.window.retransmits == 2


def test_a_woken_connection_that_leaves_passes_its_turn_on() -> None:
    core = make(window=8, ranks=(0, 1))
    all_idle(core)
    assert feed(core, 1) == [[0]]
    assert list(core.connection_lost(0)) == [1]  # conn 0 broke before it took the chunk
    assert take(core, 1) == 0


def test_a_send_that_does_not_finish_is_a_stall_even_once_its_chunk_is_acknowledged() -> None:
    """Chunk 0 arrives by conn 0, which breaks before its ACK comes back; the re-send on
    conn 1 hangs, and the receiver reports chunk 0 written when conn 0 is back.  Conn 1 then
    holds nothing in flight, but it is stuck all the same."""
    core = make(window=8, ranks=(0, 0))
    feed(core, 1)
    assert take(core, 0, 0.0) == 0
    core.connection_lost(0)
    assert take(core, 1, 1.0) == 0
    core.on_welcome(0, 1, 2.0)
    assert core.window.inflight(1) == 0
    assert core.stall(1, 11.0)[0] == 10.0
    assert core.step(1, 11.0)[0] is Step.IDLE  # once the send is over, nothing is held
    assert core.stall(1, 50.0)[0] == 0.0


def test_a_running_connection_that_is_lost_hands_the_queue_to_an_idle_one() -> None:
    """On a fast path queued chunks wait for the running connection; if it goes, an idle
    one must be woken even though it had nothing in flight."""
    core = make(window=8, ranks=(0, 0))
    core.step(1, 0.0)
    assert feed(core, 1) == [[1]]
    assert take(core, 1) == 0
    core.on_ack(1, 0, 1, 0.001)
    core.step(0, 0.001)  # idle
    assert feed(core, 1, 0.001) == [[]]  # conn 1 still runs: the chunk waits for it
    assert take(core, 1, 0.001) == 1
    core.on_ack(1, 1, 2, 0.002)
    assert feed(core, 1, 0.002) == [[]]
    assert list(core.connection_lost(1)) == [0]
    assert take(core, 0, 0.002) == 2


# -- the BYE handshake --------------------------------------------------------------------------


def finished(core: Dispatcher[str], now: float = 0.0) -> None:
    """One chunk sent on conn 0 and acknowledged, the stream ended."""
    feed(core, 1, now)
    take(core, 0, now)
    core.on_ack(0, 0, 1, now)
    core.end_of_stream(now)


def test_bye_goes_out_once_the_stream_ended_and_everything_is_acknowledged() -> None:
    core = make(ranks=(0, 0))
    feed(core, 1)
    take(core, 0)
    core.step(1, 0.0)  # nothing for conn 1: idle
    assert list(core.end_of_stream(0.0)) == []
    assert core.bye is ByeState.NONE  # chunk 0 is unacknowledged
    released = core.on_ack(0, 0, 1, 0.0)
    assert released is not None
    assert released[0] == ["chunk0"]
    assert list(released[1]) == [1]  # the idle conn is woken to send BYE
    assert core.bye is ByeState.PENDING
    assert core.step(1, 0.0)[0] is Step.SEND_BYE
    assert core.bye is ByeState.SENT
    core.on_bye_ok(0, 1, 100)  # the answer may come on any connection
    assert core.bye is ByeState.CONFIRMED
    assert core.step(0, 0.0)[0] is Step.DONE


def test_a_confirmed_end_counts_every_chunk_written_though_the_last_acks_were_lost() -> None:
    """Chunks are acknowledged as received; the receiver's ``written`` count in the ACKs
    that follow may be lost with their connection.  BYE_OK says every chunk is written: the
    window the reports show is then empty."""
    core = make(ranks=(0,))
    feed(core, 2)
    take(core, 0)
    take(core, 0)
    core.on_ack(0, 0, 0, 0.0)  # received, none written yet
    core.on_ack(0, 1, 1, 0.0)  # the ACK saying both are written never comes
    core.end_of_stream(0.0)
    assert core.step(0, 0.0)[0] is Step.SEND_BYE
    assert core.window.next_seq - core.window.written == 1
    core.on_bye_ok(0, 2, 200)
    assert core.window.written == core.window.next_seq == 2


def test_an_empty_stream_sends_bye_at_once() -> None:
    core = make(ranks=(0,))
    core.step(0, 0.0)
    assert list(core.end_of_stream(0.0)) == [0]
    assert core.step(0, 0.0)[0] is Step.SEND_BYE
    core.on_bye_ok(0, 0, 0)
    assert core.bye is ByeState.CONFIRMED


def test_a_bye_lost_with_its_connection_goes_out_on_another_and_counts_as_a_stall() -> None:
    core = make(ranks=(0, 0))
    finished(core)
    assert core.step(0, 1.0)[0] is Step.SEND_BYE
    assert core.stall(0, 4.0)[0] == 3.0  # the BYE has waited 3 s for its answer
    core.step(1, 1.0)  # idle
    assert list(core.connection_lost(0)) == [1]
    assert core.bye is ByeState.PENDING
    assert core.step(1, 5.0)[0] is Step.SEND_BYE
    assert core.stall(1, 6.0)[0] == 1.0
    core.on_bye_ok(1, 1, 100)
    assert core.bye is ByeState.CONFIRMED


# -- what a receiver can get wrong --------------------------------------------------------------


@pytest.mark.parametrize(("seq", "written"), [(3, 0), (MAX_SEQ, 0), (0, 4), (0, MAX_SEQ),
                                              (MAX_SEQ, MAX_SEQ)])
def test_an_ack_of_what_was_never_sent_is_a_violation(seq: int, written: int) -> None:
    core = make(ranks=(0,))
    feed(core, 5)
    for _ in range(3):
        take(core, 0)  # chunks 0-2 sent; 3 and 4 are not
    before = (core.window.sizes(), core.window.written)
    with pytest.raises(RemoteProtocolError, match=r"never sent|only 3 were sent"):
        core.on_ack(0, seq, written, 0.0)
    assert (core.window.sizes(), core.window.written) == before


def test_useless_acks_are_tolerated_up_to_a_bound_and_reset_by_a_useful_one() -> None:
    window = 4
    core = make(window=window, ranks=(0,))
    feed(core, 2)
    take(core, 0)
    take(core, 0)
    assert core.on_ack(0, 0, 0, 0.0) is not None
    bound = 4 * window + USELESS_ACK_SLACK
    sizes = core.window.sizes()
    for _ in range(bound):
        assert core.on_ack(0, 0, 0, 1.0) is None
        assert core.window.sizes() == sizes  # nothing grows
    assert core.stall(0, 1.0)[0] == 1.0  # and none of them reset the stall clock
    assert core.on_ack(0, 1, 0, 1.0) is not None  # a useful one resets the count
    for _ in range(bound):
        core.on_ack(0, 1, 0, 1.0)
    with pytest.raises(RemoteProtocolError, match="ACKs in a row"):
        core.on_ack(0, 1, 0, 1.0)


def test_a_bye_ok_nobody_asked_for_is_a_violation_whatever_its_totals() -> None:
    core = make(ranks=(0,))
    feed(core, 1)
    take(core, 0)
    core.end_of_stream(0.0)
    for totals in ((1, 100), (2, 101)):
        with pytest.raises(RemoteProtocolError, match="before any BYE"):
            core.on_bye_ok(0, *totals)
    core.on_ack(0, 0, 1, 0.0)
    with pytest.raises(RemoteProtocolError, match="before any BYE"):  # due, not yet sent
        core.on_bye_ok(0, 1, 100)
    assert core.bye is ByeState.PENDING


def test_a_bye_ok_with_other_totals_than_the_bye_fails_the_session() -> None:
    core = make(ranks=(0,))
    finished(core)
    core.step(0, 0.0)
    with pytest.raises(TruncatedStream, match="confirmed 99 bytes"):
        core.on_bye_ok(0, 1, 99)
    assert core.bye is ByeState.SENT


def test_a_welcome_reporting_more_written_than_sent_is_a_violation() -> None:
    core = make(ranks=(0,))
    feed(core, 3)
    take(core, 0)
    with pytest.raises(RemoteProtocolError, match="WELCOME says 2 chunks are written; only 1"):
        core.on_welcome(0, 2, 0.0)
    released, _ = core.on_welcome(0, 1, 0.0)
    assert released == ["chunk0"]


@pytest.mark.parametrize("what", ["not ended", "unacknowledged", "no bye", "fewer", "more"])
def test_session_over_is_success_only_when_it_can_be_true(what: str) -> None:
    core = make(ranks=(0,))
    feed(core, 2)
    take(core, 0)
    take(core, 0)
    written = 2
    if what != "unacknowledged":
        core.on_ack(0, 1, 2, 0.0)
    if what != "not ended":
        core.end_of_stream(0.0)
    if what not in ("no bye", "not ended", "unacknowledged"):
        assert core.step(0, 0.0)[0] is Step.SEND_BYE
    written = {"fewer": 1, "more": 3}.get(what, written)
    assert not core.session_over_ok(written)
    with pytest.raises(TruncatedStream, match=f"after {written} chunks of 2"):
        core.on_session_over(written)
    assert core.bye is not ByeState.CONFIRMED


def test_session_over_after_the_bye_is_success() -> None:
    core = make(ranks=(0,))
    finished(core)
    core.step(0, 0.0)
    core.connection_lost(0)  # BYE_OK lost with the connection
    core.on_session_over(1)
    assert core.bye is ByeState.CONFIRMED


# -- the progress clock -------------------------------------------------------------------------


def test_progress_is_the_receiver_writing_or_nothing_being_owed() -> None:
    core = make(ranks=(0, 0))
    assert core.idle_for(50.0) == 0.0  # nothing outstanding: waiting on the source
    feed(core, 3, now=10.0)
    assert core.idle_for(15.0) == 5.0
    take(core, 0, 10.0)
    take(core, 0, 10.0)
    core.on_ack(0, 1, 0, 12.0)  # chunk 1 arrived, nothing written yet: no progress
    assert core.idle_for(15.0) == 5.0
    core.on_ack(0, 1, 0, 13.0)  # useless
    core.connection_lost(0)
    core.on_welcome(0, 0, 14.0)  # a handshake is no progress either
    assert core.idle_for(15.0) == 5.0
    core.on_ack(1, 0, 2, 16.0)  # two chunks written
    assert core.idle_for(17.0) == 1.0
    take(core, 1, 17.0)
    core.on_ack(1, 2, 3, 18.0)
    assert core.idle_for(30.0) == 0.0  # everything acknowledged, the source is slow
    core.end_of_stream(40.0)  # now BYE_OK is owed
    assert core.idle_for(41.0) == 1.0


def test_chunks_acknowledged_but_never_written_are_no_progress() -> None:
    """A receiver that acknowledges every chunk on arrival but never writes one holds the
    window full: that is not a slow source, the receiver owes us its ``written``."""
    core = make(window=2, ranks=(0,))
    feed(core, 2, now=1.0)
    for seq in (take(core, 0, 1.0), take(core, 0, 1.0)):
        assert core.on_ack(0, seq, 0, 2.0) is not None
    assert core.window.all_acked() and not core.can_add()
    assert core.idle_for(31.0) == 30.0
    core.on_ack(0, 1, 2, 32.0)
    assert core.idle_for(40.0) == 0.0


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.next() for _ in range(10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10])
    backoff.reset()
    assert backoff.next() == 0.1


# -- a hostile receiver ---------------------------------------------------------------------------

CONNS = 3
TOTAL = 8
WINDOW = 4
conns = st.integers(min_value=0, max_value=CONNS - 1)


def size_of(seq: int) -> int:
    return 100 + seq


class HostileReceiver(RuleBasedStateMachine):
    """Drives a Dispatcher as the async driver does, while the receiver sends anything the
    codec can carry, whenever it likes.  Whatever it sends, the core raises nothing but
    RemoteProtocolError (the driver drops that connection) or TruncatedStream (the session
    fails), never loses track of a chunk, and never reports success it has not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.core: Dispatcher[int] = Dispatcher(WINDOW, [0, 1, 0])
        self.now = 0.0
        self.waiting: set[int] = set()  # connections told IDLE and not yet woken
        self.down: set[int] = set()  # dropped, not yet reconnected
        self.failed = False
        self.confirmed_by: tuple[int, int] | None = None

    # -- the driver ------------------------------------------------------------------------

    def wake(self, wakes: Wakes) -> None:
        for conn in wakes:
            assert conn in self.waiting, f"woke conn {conn}, which was not waiting"
            self.waiting.discard(conn)

    def drop(self, conn: int) -> None:
        if conn in self.down:
            return  # the driver drops a connection once
        self.waiting.discard(conn)
        self.down.add(conn)
        self.wake(self.core.connection_lost(conn))

    def hear(self, conn: int, call: Callable[[], None]) -> None:
        """What the driver does with a frame: a violation drops the connection, a truncated
        stream fails the session."""
        try:
            call()
        except RemoteProtocolError:
            self.drop(conn)
        except TruncatedStream:
            self.failed = True

    def live(self) -> bool:
        return not self.failed and self.core.bye is not ByeState.CONFIRMED

    @precondition(lambda self: self.live() and self.core.window.next_seq < TOTAL)
    @rule()
    def read_chunk(self) -> None:
        core = self.core
        if core.can_add():
            seq = core.window.next_seq
            self.wake(core.add(seq, size_of(seq), self.now))

    @precondition(lambda self: self.live() and self.core.window.next_seq == TOTAL
                  and not self.core.eof)
    @rule()
    def end_of_stream(self) -> None:
        self.wake(self.core.end_of_stream(self.now))

    @precondition(lambda self: self.live())
    @rule(conn=conns)
    def step(self, conn: int) -> None:
        if conn in self.waiting or conn in self.down:
            return  # it waits for a turn, or for its reconnect
        step, _taken, wakes = self.core.step(conn, self.now)
        self.wake(wakes)
        if step is Step.IDLE:
            self.waiting.add(conn)

    @precondition(lambda self: self.live())
    @rule(conn=conns)
    def connection_breaks(self, conn: int) -> None:
        self.drop(conn)

    @rule(dt=st.sampled_from([0.0005, 0.01, 0.5, 3.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    # -- the receiver --------------------------------------------------------------------

    def number(self, data: st.DataObject, label: str) -> int:
        sw = self.core.window
        near = sorted({0, sw.written, max(sw.sent - 1, 0), sw.sent, sw.sent + 1, sw.next_seq,
                       MAX_SEQ})
        return data.draw(st.sampled_from(near) | st.integers(0, MAX_SEQ), label=label)

    @precondition(lambda self: self.live())
    @rule(conn=conns, data=st.data())
    def ack(self, conn: int, data: st.DataObject) -> None:
        if conn in self.down:
            return
        seq, written = self.number(data, "seq"), self.number(data, "written")
        self.send_ack(conn, seq, written)

    def snapshot(self, conn: int) -> tuple[object, ...]:
        core = self.core
        return (core.window.sizes(), core.window.written, core.window.srtt, core.idle(),
                core.running(), core.bye, core.progress_at, core.stall(conn, self.now))

    def send_ack(self, conn: int, seq: int, written: int) -> None:
        before = self.snapshot(conn)
        try:
            result = self.core.on_ack(conn, seq, written, self.now)
        except RemoteProtocolError:
            assert self.snapshot(conn) == before, "a rejected ACK changed something"
            self.drop(conn)
            return
        if result is None:  # useless: O(1), nothing grew, nothing moved
            assert self.snapshot(conn) == before, "a useless ACK changed something"
        else:
            self.wake(result[1])

    @precondition(lambda self: self.live() and self.core.window.sent > 0)
    @rule(conn=conns, data=st.data(), repeats=st.integers(1, 120))
    def duplicate_acks(self, conn: int, data: st.DataObject, repeats: int) -> None:
        seq = data.draw(st.integers(0, self.core.window.sent - 1), label="dup seq")
        for _ in range(repeats):
            if conn in self.down:
                return
            self.send_ack(conn, seq, self.core.window.written)

    @precondition(lambda self: self.live())
    @rule(conn=conns, right=st.booleans(), data=st.data())
    def bye_ok(self, conn: int, right: bool, data: st.DataObject) -> None:
        core = self.core
        if conn in self.down:
            return
        totals = core.totals() if right else (self.number(data, "chunks"), 7)
        self.hear(conn, lambda: core.on_bye_ok(conn, *totals))
        if core.bye is ByeState.CONFIRMED:
            self.confirmed_by = totals

    @precondition(lambda self: self.live())
    @rule(conn=conns, data=st.data())
    def reconnect(self, conn: int, data: st.DataObject) -> None:
        """The connection is (re)opened; the WELCOME reports any ``written``."""
        self.drop(conn)
        self.down.discard(conn)
        written = self.number(data, "welcome written")
        try:
            _released, wakes = self.core.on_welcome(conn, written, self.now)
        except RemoteProtocolError:
            self.drop(conn)
            return
        self.wake(wakes)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def session_over(self, data: st.DataObject) -> None:
        written = self.number(data, "session over written")
        self.hear(0, lambda: self.core.on_session_over(written))
        if self.core.bye is ByeState.CONFIRMED:
            self.confirmed_by = self.core.totals()

    # -- what must always hold -----------------------------------------------------------

    @invariant()
    def every_unacked_chunk_is_in_exactly_one_place(self) -> None:
        sw = self.core.window
        assert sorted(sw.accounted()) == sorted(sw.unacked)

    @invariant()
    def written_never_exceeds_what_was_sent(self) -> None:
        sw = self.core.window
        assert sw.written <= sw.sent <= sw.next_seq

    @invariant()
    def success_only_when_everything_is_acknowledged_and_confirmed(self) -> None:
        core = self.core
        if core.bye is ByeState.CONFIRMED:
            assert core.eof and core.window.all_acked() and core.bye_sent
            assert core.window.sent == TOTAL
            assert self.confirmed_by == core.totals() == (TOTAL, sum(map(size_of, range(TOTAL))))

    @invariant()
    def the_idle_list_is_the_drivers(self) -> None:
        assert self.core.idle() == self.waiting
        assert not self.core.idle() & self.core.running()

    @invariant()
    def work_never_waits_while_connections_sleep(self) -> None:
        """Queued work and an idle connection: some connection that is up will ask for it."""
        core = self.core
        if self.live() and self.waiting and (core.window.has_work()
                                             or core.bye is ByeState.PENDING):
            active = set(range(CONNS)) - self.waiting - self.down
            assert active, "a wake-up was lost"

    def teardown(self) -> None:
        """Unless the session failed, an honest receiver can still finish it: from any state,
        once it reports what it has and acknowledges what it is sent, the session succeeds."""
        core = self.core
        if self.failed:
            return
        for conn in range(CONNS):  # it reports having written everything sent
            self.drop(conn)
            self.down.discard(conn)
            self.wake(core.on_welcome(conn, core.window.sent, self.now)[1])
        for _ in range(20 * TOTAL):
            if core.bye is ByeState.CONFIRMED:
                break
            if core.window.next_seq < TOTAL:
                self.read_chunk()
            elif not core.eof:
                self.end_of_stream()
            for conn in range(CONNS):
                if conn in self.waiting:
                    continue
                step, taken, wakes = core.step(conn, self.now)
                self.wake(wakes)
                if step is Step.IDLE:
                    self.waiting.add(conn)
                elif step is Step.SEND_CHUNK:
                    assert taken is not None
                    result = core.on_ack(conn, taken[0], core.window.sent, self.now)
                    if result is not None:
                        self.wake(result[1])
                elif step is Step.SEND_BYE:
                    core.on_bye_ok(conn, *core.totals())
                    self.confirmed_by = core.totals()
        assert core.bye is ByeState.CONFIRMED
        self.success_only_when_everything_is_acknowledged_and_confirmed()


TestHostileReceiver = HostileReceiver.TestCase
TestHostileReceiver.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# -- the driver under a mock clock ----------------------------------------------------------------


class FakePeer(Peer):
    """A scripted receiver's end of one connection: the handshake is a real receiver's
    (:func:`hostile.accept_handshake`), what follows is the script's."""

    def __init__(self, stream: anyio.abc.ByteStream, keys: dict[bytes, SessionKeys]) -> None:
        super().__init__(stream, Decoder.for_receiver())
        self._keys = keys

    async def next(self) -> Event:
        return await self.next_event()

    async def welcome(self) -> Hello:
        hello = await accept_handshake(self, self._keys)
        assert hello is not None
        return hello

    async def until_closed(self) -> None:
        while not isinstance(await self.next(), ConnectionClosed):
            pass


Script = Callable[[FakePeer, int], Awaitable[None]]


async def serve_fake(net: MemoryNetwork, script: Script) -> None:
    """Answer every connection on ``net`` with ``script(peer, accept number)``."""
    keys: dict[bytes, SessionKeys] = {}  # the session's, once the first handshake made them
    async with anyio.create_task_group() as tg:
        for accepted in range(10**6):
            stream = await net.accept()
            tg.start_soon(script, FakePeer(stream, keys), accepted)


@pytest.mark.parametrize(("rtt", "limit"), [(0.01, MIN_STALL), (0.5, 4.0), (5.0, MAX_STALL)])
def test_a_connection_holding_chunks_without_acks_is_dropped_after_the_stall_limit(
    rtt: float, limit: float
) -> None:
    """Window 1: each chunk is acknowledged ``rtt`` after it was sent, so the smoothed round
    trip is exactly ``rtt``; after three chunks the receiver goes silent, still reading."""
    last_ack = [0.0]
    dropped = [0.0]
    gone = trio.Event()

    async def script(peer: FakePeer, accepted: int) -> None:
        await peer.welcome()
        if accepted > 0:
            gone.set()  # the transmitter reconnected after dropping the silent one
            return
        for _ in range(3):
            data = await peer.next()
            assert isinstance(data, Data)
            await trio.sleep(rtt)  # the path's round trip, in mock time
            await peer.send(Ack(data.seq, data.seq + 1))
            last_ack[0] = trio.current_time()
        await peer.until_closed()
        dropped[0] = trio.current_time()

    async def main() -> None:
        net = MemoryNetwork()
        tx = Transmitter(BytesSource(os.urandom(10 * 1024)), net.connect, threads=1,
                         chunk_size=1024, window=1, idle_timeout=1000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_fake, net, script)
            nursery.start_soon(tx.run)
            await gone.wait()
            nursery.cancel_scope.cancel()

    run_mock(main, limit=1000)
    # The watcher wakes at least every 10 ms near the deadline.
    assert dropped[0] - last_ack[0] == pytest.approx(limit, abs=0.011)


def test_reconnects_back_off_doubling_to_the_cap_and_retry_quickly_after_progress() -> None:
    """Attempts 0, 1, 3 and 5 on are refused.  2 and 4 are accepted and then broken by a frame
    no receiver sends (a second WELCOME: the connection is dropped, not the session); 2 before
    any ACK (no progress: the backoff goes on doubling), 4 after acknowledging a chunk
    (progress: the next attempt comes after the shortest pause again)."""
    attempts: list[float] = []
    ended: dict[int, float] = {}  # when each attempt ended: refused, or broken
    enough = trio.Event()
    last = 15
    net = MemoryNetwork()

    async def connect(index: int) -> anyio.abc.ByteStream:
        now = trio.current_time()
        attempts.append(now)
        number = len(attempts) - 1
        if number == last:
            enough.set()
        if number not in (2, 4):
            ended[number] = now
            raise ConnectFailed("refused (test)")
        return await net.connect(index)

    async def script(peer: FakePeer, accepted: int) -> None:
        number = (2, 4)[accepted]
        hello = await peer.welcome()
        if number == 4:
            data = await peer.next()
            assert isinstance(data, Data)
            await peer.send(Ack(data.seq, data.seq + 1))
        await peer.send(Welcome(int(WelcomeStatus.ACCEPTED), hello.session_id, 0))
        ended[number] = trio.current_time()
        await peer.until_closed()

    async def main() -> None:
        tx = Transmitter(BytesSource(os.urandom(50 * 1024)), connect, threads=1,
                         chunk_size=1024, idle_timeout=1000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_fake, net, script)
            nursery.start_soon(tx.run)
            await enough.wait()
            nursery.cancel_scope.cancel()

    run_mock(main, limit=1000)
    pauses = [attempts[i + 1] - ended[i] for i in range(last)]
    expected = [0.1, 0.2, 0.4, 0.8,  # attempt 2 made no progress: no reset
                0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP,
                BACKOFF_CAP]
    assert pauses == pytest.approx(expected, abs=1e-9)


class AnyTag(TagChecker):
    """Takes every tag: the mirror below only needs to know where each frame ends."""

    def __init__(self) -> None:
        super().__init__(b"")

    def check(self, frame: bytes, tag: bytes) -> None:
        pass


class LosesByeOk(PassThrough):
    """A transmitter's end of a connection that breaks as the receiver's BYE_OK arrives."""

    def __init__(self, inner: anyio.abc.ByteStream, seen: list[float]) -> None:
        super().__init__(inner)
        self.mirror = Decoder.for_transmitter()
        self.seen = seen

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.mirror.receive_data(data)
        while (event := self.mirror.next_event()) is not NEED_DATA:
            if isinstance(event, Auth):
                self.mirror.checker = AnyTag()  # the control frames after it are tagged
            if isinstance(event, ByeOk):
                self.seen.append(trio.current_time())
                await self.inner.aclose()
                raise anyio.BrokenResourceError("BYE_OK lost (test)")
        return data


def test_a_lost_bye_ok_is_learnt_from_the_welcome_of_a_reconnect() -> None:
    """The only connection breaks as BYE_OK arrives: the receiver has succeeded.  The
    transmitter reconnects, hears SESSION_OVER with every chunk written, says FIN (so the
    receiver stops at once instead of lingering) and succeeds."""
    data = os.urandom(20 * 1024 + 5)
    seen: list[float] = []
    wrapped: set[int] = set()

    def wrap(index: int, stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
        if index in wrapped:
            return stream
        wrapped.add(index)
        return LosesByeOk(stream, seen)

    async def main() -> tuple[float, float]:
        net = MemoryNetwork()
        net.wrap = wrap
        sink = BufferSink()
        rx = Receiver(sink)
        tx = Transmitter(BytesSource(data), net.connect, threads=1, chunk_size=1024)
        ends: dict[str, float] = {}

        async def serve() -> None:
            await rx.serve(net)
            ends["rx"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            stats = await tx.run()
            ends["tx"] = trio.current_time()
        assert bytes(sink.data) == data
        assert stats.nbytes == len(data)
        assert stats.reconnects == 1
        return ends["tx"], ends["rx"]

    tx_end, rx_end = run_mock(main, limit=100)
    assert len(seen) == 1
    assert tx_end - seen[0] < 1.0  # a quick reconnect after a connection that made progress
    assert rx_end - seen[0] < 1.0  # the FIN reached it: it did not wait out its linger time


def test_a_fake_receiver_that_only_accepts_times_out() -> None:
    """Every connection is welcomed and then held without a word: the handshakes are no
    progress, so the idle timeout ends the session."""

    async def script(peer: FakePeer, accepted: int) -> None:
        await peer.welcome()
        with trio.move_on_after(1.5):
            await peer.until_closed()
        await peer.stream.aclose()

    async def main() -> float:
        net = MemoryNetwork()
        tx = Transmitter(BytesSource(os.urandom(4096)), net.connect, threads=2,
                         chunk_size=1024, idle_timeout=5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_fake, net, script)
            start = trio.current_time()
            with pytest.raises(PeerTimeout, match="no progress"):
                await tx.run()
            nursery.cancel_scope.cancel()
        return trio.current_time() - start

    took = run_mock(main, limit=100)
    assert took == pytest.approx(5.0, abs=1e-6)

