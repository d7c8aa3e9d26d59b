"""State-machine test of the session bookkeeping: any interleaving of reads, sends, arrivals,
duplicates, ACKs, lost connections and reconnects never loses, duplicates or reorders a chunk,
and the stream can always be finished afterwards."""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from viamillipede.window import Offer, ReorderBuffer, SendWindow

CONNS = 3
TOTAL = 12
WINDOW = 4
conns = st.integers(min_value=0, max_value=CONNS - 1)


class Session(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sw: SendWindow[int] = SendWindow(WINDOW)
        self.rb: ReorderBuffer[int] = ReorderBuffer(WINDOW)
        self.added = 0
        self.now = 0.0
        self.wire: dict[int, deque[tuple[int, int]]] = {c: deque() for c in range(CONNS)}
        self.acks: dict[int, deque[tuple[int, int]]] = {c: deque() for c in range(CONNS)}
        self.arrived: list[tuple[int, int]] = []
        self.output: list[int] = []

    # -- the transmitter ---------------------------------------------------------------

    @precondition(lambda self: self.added < TOTAL)
    @rule()
    def read_chunk(self) -> None:
        if self.sw.can_add():
            seq = self.sw.add(1000 + self.added)
            assert seq == self.added
            self.added += 1

    @rule(conn=conns)
    def send(self, conn: int) -> None:
        taken = self.sw.take(conn, self.now)
        if taken is not None:
            self.wire[conn].append(taken)

    @rule(conn=conns)
    def receive_ack(self, conn: int) -> None:
        if self.acks[conn]:
            seq, written = self.acks[conn].popleft()
            before = (self.sw.sizes(), self.sw.written, self.sw.srtt)
            released = self.sw.on_ack(conn, seq, written, self.now)
            if released is None:  # it told nothing new: nothing may have changed
                assert (self.sw.sizes(), self.sw.written, self.sw.srtt) == before

    @rule(conn=conns)
    def lose_connection(self, conn: int) -> None:
        """The connection dies with whatever is on it; it reconnects (same index) at once."""
        self.wire[conn].clear()
        self.acks[conn].clear()
        self.sw.connection_lost(conn)

    @rule(dt=st.floats(min_value=0, max_value=5))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    # -- the receiver ------------------------------------------------------------------

    def _offer(self, conn: int, seq: int, item: int) -> None:
        verdict = self.rb.offer(seq, item)
        assert verdict is not Offer.BEYOND_WINDOW, "the transmitter overran the window"
        self.acks[conn].append((seq, self.rb.written))

    @rule(conn=conns)
    def arrive(self, conn: int) -> None:
        if self.wire[conn]:
            seq, item = self.wire[conn].popleft()
            self.arrived.append((seq, item))
            self._offer(conn, seq, item)

    @precondition(lambda self: self.arrived)
    @rule(conn=conns, data=st.data())
    def duplicate_arrives(self, conn: int, data: st.DataObject) -> None:
        seq, item = data.draw(st.sampled_from(self.arrived))
        self._offer(conn, seq, item)

    @rule(conn=conns)
    def write(self, conn: int) -> None:
        while self.rb.ready() is not None:
            seq = self.rb.written
            self.output.append(self.rb.advance())
            self.acks[conn].append((seq, self.rb.written))

    # -- what must always hold ---------------------------------------------------------

    @invariant()
    def output_is_an_exact_prefix(self) -> None:
        assert self.output == [1000 + i for i in range(len(self.output))]

    @invariant()
    def memory_is_bounded(self) -> None:
        assert len(self.sw.unacked) <= WINDOW
        assert len(self.rb) <= WINDOW
        assert self.sw.next_seq - self.sw.written <= WINDOW

    @invariant()
    def nothing_unacked_is_forgotten(self) -> None:
        """Every unacknowledged chunk is queued for sending or in flight on a connection:
        exactly one of them."""
        assert sorted(self.sw.accounted()) == sorted(self.sw.unacked)

    @invariant()
    def only_sent_chunks_are_written(self) -> None:
        assert self.sw.written <= self.sw.sent <= self.sw.next_seq

    def teardown(self) -> None:
        """Whatever happened, a calm network finishes the stream, exactly."""
        for _ in range(10 * TOTAL + 10):
            if len(self.output) == TOTAL:
                break
            self.read_chunk()
            for c in range(CONNS):
                self.send(c)
                while self.wire[c]:
                    self.arrive(c)
                self.write(c)
                while self.acks[c]:
                    self.receive_ack(c)
        assert self.output == [1000 + i for i in range(TOTAL)]
        assert self.sw.all_acked()


TestSession = Session.TestCase
TestSession.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
