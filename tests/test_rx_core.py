"""The receiver's session logic (rxcore), without I/O.

First each rule on its own: who is admitted and what a refusal gives away, which DATA header
earns a buffer, when a chunk may go straight to the sink, when a BYE is believed, how refused
authentications are paced.  Then a state machine that drives a ReceiverCore the way the async
driver does, with a legitimate transmitter (chunks of a random byte string, in any order,
duplicated, re-sent, cut short, some spliced straight to the sink) and a hostile peer that may
send any decodable HELLO, DATA header or BYE at any moment.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from viamillipede.errors import ProtocolViolation, TruncatedStream
from viamillipede.rxcore import (
    EXTRA_BUFFERS,
    MAX_CONNECTIONS,
    MAX_WINDOW,
    Admission,
    AuthThrottle,
    Claim,
    ReceiverCore,
    RxState,
)
from viamillipede.wire import (
    PROTOCOL_VERSION,
    WELCOME_MEANING,
    AuthKind,
    Bye,
    ByeOk,
    Feature,
    Hello,
    Mode,
    RemoteProtocolError,
    Welcome,
    WelcomeStatus,
)
from viamillipede.wire.secure import SessionKeys

SID = bytes(range(1, 17))
OTHER_SID = b"\xee" * 16
NO_SESSION = bytes(16)
CHUNK = 8
WINDOW = 4
MAX_CHUNK = 64
MAX_BUFFER = 64 * 64  # chunk 64 with window 64 fits exactly; one more chunk of window does not
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1


def hello(**fields: Any) -> Hello:
    base: dict[str, Any] = {
        "mode": int(Mode.PLAINTEXT), "session_id": SID, "conn_index": 0, "chunk_size": CHUNK,
        "window": WINDOW, "features": 0,
    }
    base.update(fields)
    return Hello(**base)


#: What a proven handshake hands the core; the keys themselves are the keying tests' business.
KEYS = SessionKeys.derive(bytes(32), SID, bytes(32), bytes(32))


def admit_with(core: ReceiverCore[Any], h: Hello) -> Admission:
    """A connection's whole admission, as the driver runs it when the handshake proves
    itself: the core judges the HELLO (and the kind of handshake: a key exchange until the
    session has keys, then a join); if it may authenticate, the WELCOME it then gets."""
    kind = AuthKind.JOIN if core.keys is not None else AuthKind.PAKE
    refusal = core.admit(h, kind)
    if refusal is not None:
        return refusal
    welcome = core.authenticated(h, core.keys or KEYS)
    reason = "" if welcome.status == WelcomeStatus.ACCEPTED else \
        WELCOME_MEANING[WelcomeStatus(welcome.status)]
    return Admission(welcome, reason)


def new_core() -> ReceiverCore[str]:
    return ReceiverCore(max_chunk_size=MAX_CHUNK, max_buffer=MAX_BUFFER, plaintext=True)


def bound_core(**fields: Any) -> ReceiverCore[str]:
    core = new_core()
    assert admit_with(core, hello(**fields)).accepted
    return core


def deliver(core: ReceiverCore[str], seq: int, length: int = CHUNK) -> None:
    """One copy of chunk ``seq`` arrives whole and is kept."""
    assert core.data(seq, length) is Claim.RECEIVE
    assert core.received(seq, f"chunk {seq}") is Claim.RECEIVE


def write_ready(core: ReceiverCore[str], length: int = CHUNK) -> int:
    """What the driver's writer does: write every chunk that is ready, in order."""
    n = 0
    while core.reorder.ready() is not None:
        assert core.resume(core.reorder.written, length) == core.partial
        core.written(length, buffered=True)
        n += 1
    return n


def receiving_core() -> ReceiverCore[str]:
    """Bound, two chunks written, a third held."""
    core = bound_core()
    for seq in range(3):
        deliver(core, seq)
    core.written(CHUNK, buffered=True)
    core.written(CHUNK, buffered=True)
    return core


def ending_core() -> ReceiverCore[str]:
    core = receiving_core()
    core.bye(Bye(3, 3 * CHUNK))
    return core


def succeeded_core() -> ReceiverCore[str]:
    core = ending_core()
    write_ready(core)
    assert core.bye_answer() == ByeOk(3, 3 * CHUNK)
    assert core.succeed()
    return core


def failed_core() -> ReceiverCore[str]:
    core = receiving_core()
    core.fail()
    return core


STATES = {
    "listening": new_core,
    "receiving": receiving_core,
    "ending": ending_core,
    "succeeded": succeeded_core,
    "failed": failed_core,
}


# -- admission ------------------------------------------------------------------------------


def test_the_first_acceptable_hello_binds_the_session() -> None:
    core = new_core()
    admission = admit_with(core, hello(conn_index=3, features=int(Feature.CHECKSUM_XXH3)))
    assert admission.accepted and not admission.session_over and admission.reason == ""
    assert admission.welcome == Welcome(int(WelcomeStatus.ACCEPTED), SID, 0)
    assert core.state is RxState.RECEIVING
    assert core.params is not None
    assert (core.params.session_id, core.params.chunk_size, core.params.window) == (
        SID, CHUNK, WINDOW)
    assert core.params.checksum == Feature.CHECKSUM_XXH3
    assert core.reorder.window == WINDOW
    assert core.max_buffers == WINDOW + EXTRA_BUFFERS


@pytest.mark.parametrize("fields", [
    {"conn_index": MAX_CONNECTIONS - 1},
    {"chunk_size": 1, "window": 1},
    {"chunk_size": MAX_CHUNK, "window": MAX_BUFFER // MAX_CHUNK},  # exactly max_buffer
    {"chunk_size": 1, "window": MAX_WINDOW},
    {"features": int(Feature.CHECKSUM_CRC32)},
    {"features": int(Feature.CHECKSUM_XXH3)},
    {"features": int(Feature.COMPRESSION_ZSTD)},
    {"features": int(Feature.COMPRESSION_ZSTD | Feature.CHECKSUM_XXH3)},
])
def test_parameters_at_the_bounds_are_accepted(fields: dict[str, int]) -> None:
    assert admit_with(new_core(), hello(**fields)).accepted


@pytest.mark.parametrize(("fields", "status"), [
    ({"version": PROTOCOL_VERSION + 1}, WelcomeStatus.BAD_VERSION),
    ({"version": 0}, WelcomeStatus.BAD_VERSION),
    ({"mode": 0}, WelcomeStatus.BAD_MODE),
    ({"mode": int(Mode.PLAINTEXT) | 2}, WelcomeStatus.BAD_PARAMETERS),  # a mode bit not known
    ({"mode": 0x8000_0000}, WelcomeStatus.BAD_PARAMETERS),
    ({"conn_index": MAX_CONNECTIONS}, WelcomeStatus.BAD_PARAMETERS),
    ({"conn_index": U16}, WelcomeStatus.BAD_PARAMETERS),
    ({"conn_index": -1}, WelcomeStatus.BAD_PARAMETERS),
    ({"chunk_size": 0}, WelcomeStatus.BAD_PARAMETERS),
    ({"chunk_size": MAX_CHUNK + 1, "window": 1}, WelcomeStatus.BAD_PARAMETERS),
    ({"window": 0}, WelcomeStatus.BAD_PARAMETERS),
    ({"chunk_size": 1, "window": MAX_WINDOW + 1}, WelcomeStatus.BAD_PARAMETERS),
    ({"chunk_size": MAX_CHUNK, "window": MAX_BUFFER // MAX_CHUNK + 1},
     WelcomeStatus.BAD_PARAMETERS),  # chunk_size * window > max_buffer
    ({"chunk_size": U32, "window": U32}, WelcomeStatus.BAD_PARAMETERS),
    ({"features": 3}, WelcomeStatus.BAD_PARAMETERS),  # no such checksum
    ({"features": 0xF}, WelcomeStatus.BAD_PARAMETERS),
    ({"features": 0x20}, WelcomeStatus.BAD_PARAMETERS),  # no such compression
    ({"features": 0xF0}, WelcomeStatus.BAD_PARAMETERS),
    ({"features": 0x100 | int(Feature.CHECKSUM_CRC32)}, WelcomeStatus.BAD_PARAMETERS),
    ({"features": 0x8000_0000}, WelcomeStatus.BAD_PARAMETERS),
])
def test_a_refused_first_hello_binds_nothing(fields: dict[str, Any], status: WelcomeStatus,
                                             ) -> None:
    core = new_core()
    admission = admit_with(core, hello(**fields))
    assert admission.welcome == Welcome(int(status), NO_SESSION, 0)
    assert not admission.accepted and not admission.session_over
    assert admission.reason == WELCOME_MEANING[status]
    assert core.state is RxState.LISTENING and core.params is None
    assert admit_with(core, hello()).accepted  # the session is still free for its transmitter


def test_the_version_is_judged_before_the_mode() -> None:
    """A stranger with an old client learns only that."""
    status = admit_with(new_core(), hello(version=9, mode=0)).welcome.status
    assert status == WelcomeStatus.BAD_VERSION


@pytest.mark.parametrize(("fields", "status"), [
    ({"version": 1}, WelcomeStatus.BAD_VERSION),  # a version-1 transmitter: it sends no AUTH
    ({"mode": 0}, WelcomeStatus.BAD_MODE),
    ({"mode": 3}, WelcomeStatus.BAD_PARAMETERS),
    ({}, None),
    ({"session_id": OTHER_SID, "chunk_size": 0}, None),  # for admit(), with its AUTH
])
def test_the_hello_alone_settles_version_and_mode(fields: dict[str, Any],
                                                  status: WelcomeStatus | None) -> None:
    core = receiving_core()
    refusal = core.screen(hello(**fields))
    assert (refusal and refusal.welcome) == (status and Welcome(int(status), NO_SESSION, 0))


def test_later_hellos_must_announce_the_same_session() -> None:
    core = receiving_core()
    assert admit_with(core, hello(conn_index=MAX_CONNECTIONS - 1)).welcome == Welcome(
        int(WelcomeStatus.ACCEPTED), SID, 2)  # tells a reconnecting transmitter what is written
    for fields, status in [
        ({"session_id": OTHER_SID}, WelcomeStatus.WRONG_SESSION),
        ({"session_id": OTHER_SID, "chunk_size": 0}, WelcomeStatus.WRONG_SESSION),
        ({"conn_index": MAX_CONNECTIONS}, WelcomeStatus.BAD_PARAMETERS),
        ({"chunk_size": CHUNK * 2}, WelcomeStatus.BAD_PARAMETERS),  # acceptable alone
        ({"window": WINDOW - 1}, WelcomeStatus.BAD_PARAMETERS),
        ({"features": int(Feature.CHECKSUM_CRC32)}, WelcomeStatus.BAD_PARAMETERS),
    ]:
        assert admit_with(core, hello(**fields)).welcome == Welcome(int(status), NO_SESSION, 0)
    assert core.params is not None and core.params.chunk_size == CHUNK
    assert core.params.window == WINDOW and core.params.features == 0
    assert core.state is RxState.RECEIVING


def refusals() -> list[Any]:
    """Every refusal, in every state that can give it."""
    cases = []
    for state in STATES:
        table: list[tuple[dict[str, Any], WelcomeStatus]] = [
            ({"version": PROTOCOL_VERSION + 1}, WelcomeStatus.BAD_VERSION),
            ({"mode": 0}, WelcomeStatus.BAD_MODE),
            ({"mode": 0, "session_id": OTHER_SID}, WelcomeStatus.BAD_MODE),
        ]
        if state != "listening":
            table.append(({"session_id": OTHER_SID}, WelcomeStatus.WRONG_SESSION))
        if state in ("listening", "receiving", "ending"):
            table.append(({"conn_index": MAX_CONNECTIONS}, WelcomeStatus.BAD_PARAMETERS))
        if state == "failed":
            table.append(({}, WelcomeStatus.SESSION_FAILED))
            table.append(({"conn_index": MAX_CONNECTIONS}, WelcomeStatus.SESSION_FAILED))
        cases += [pytest.param(state, fields, status, id=f"{state}-{status.name}-{i}")
                  for i, (fields, status) in enumerate(table)]
    return cases


@pytest.mark.parametrize(("state", "fields", "status"), refusals())
def test_a_refusal_tells_nothing(state: str, fields: dict[str, Any], status: WelcomeStatus,
                                 ) -> None:
    core = STATES[state]()
    before = (core.state, core.params, core.reorder.written, core.buffers, core.nbytes)
    admission = admit_with(core, hello(**fields))
    assert admission.welcome == Welcome(int(status), NO_SESSION, 0)
    assert not admission.accepted and not admission.session_over
    assert admission.reason == WELCOME_MEANING[status]
    assert (core.state, core.params, core.reorder.written, core.buffers, core.nbytes) == before


def test_session_over_only_to_the_sessions_own_transmitter() -> None:
    core = succeeded_core()
    # Its transmitter lost BYE_OK and comes back: told that all 3 chunks are written, even
    # with parameters no longer checked (the session is over).
    for fields in ({}, {"conn_index": 5}, {"conn_index": MAX_CONNECTIONS}):
        admission = admit_with(core, hello(**fields))
        assert admission.session_over and not admission.accepted
        assert admission.welcome == Welcome(int(WelcomeStatus.SESSION_OVER), SID, 3)
    assert admit_with(core, hello(session_id=OTHER_SID)).welcome == Welcome(
        int(WelcomeStatus.WRONG_SESSION), NO_SESSION, 0)
    assert core.state is RxState.SUCCEEDED


# -- DATA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq", "length"), [
    (0, 0),
    (0, CHUNK + 1),
    (0, U32),
    (WINDOW, CHUNK),  # written (0) + window
    (U64, 1),
])
def test_data_no_transmitter_sends_is_a_protocol_error(seq: int, length: int) -> None:
    core = bound_core()
    with pytest.raises(RemoteProtocolError):
        core.data(seq, length)
    assert core.buffers == 0 and len(core.reorder) == 0


def test_the_window_moves_with_what_is_written() -> None:
    core = bound_core()
    assert core.data(WINDOW - 1, 1) is Claim.RECEIVE  # the last of the window, any length
    deliver(core, 0)
    write_ready(core)
    assert core.data(WINDOW, CHUNK) is Claim.RECEIVE
    with pytest.raises(RemoteProtocolError):
        core.data(WINDOW + 1, CHUNK)


def test_data_past_an_announced_end_is_a_protocol_error() -> None:
    core = bound_core()
    deliver(core, 0)
    deliver(core, 1)
    core.bye(Bye(2, 2 * CHUNK))
    with pytest.raises(RemoteProtocolError, match="past the end"):
        core.data(2, CHUNK)  # inside the window, but past the end
    assert core.data(1, CHUNK) is Claim.DISCARD_ACK


def test_chunks_written_or_held_are_acknowledged_again() -> None:
    core = bound_core()
    deliver(core, 0)
    deliver(core, 2)
    write_ready(core)
    for seq in (0, 2):  # written, held
        assert core.data(seq, CHUNK) is Claim.DISCARD_ACK
    assert core.buffers == 1 == len(core.reorder)


def test_second_copies_take_the_reserve_and_no_more() -> None:
    """Copies of chunks whose first copy is still on its way get buffers from the reserve, at
    most EXTRA_BUFFERS at once: the first copies of the chunks that follow still fit."""
    core = bound_core()
    assert core.data(0, CHUNK) is Claim.RECEIVE
    for _ in range(EXTRA_BUFFERS):  # re-sends of chunk 0: the reserve
        assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.data(0, CHUNK) is Claim.DISCARD  # no more than the reserve
    for seq in range(1, WINDOW):  # but every first copy of the window still fits
        assert core.data(seq, CHUNK) is Claim.RECEIVE
    assert core.buffers == WINDOW + EXTRA_BUFFERS == core.max_buffers
    core.abandoned(0)
    assert core.data(0, CHUNK) is Claim.RECEIVE  # room again
    assert core.data(0, CHUNK) is Claim.DISCARD


def test_the_resend_of_the_awaited_chunk_gets_through_a_full_window() -> None:
    """The window is full: chunk 0's first copy is stuck on a link that died without a reset,
    every other chunk is stored.  Its re-send on a live link must get a buffer, or the session
    waits until the dead socket times out (half a minute)."""
    core = bound_core()
    assert core.data(0, CHUNK) is Claim.RECEIVE  # stuck
    for seq in range(1, WINDOW):
        deliver(core, seq)
    assert core.buffers == WINDOW
    assert core.data(0, CHUNK) is Claim.RECEIVE  # the re-send
    assert core.received(0, "chunk 0") is Claim.RECEIVE
    assert write_ready(core) == WINDOW
    core.abandoned(0)  # the stuck copy's socket times out at last
    assert core.buffers == 0


def test_the_hard_bound_holds_even_for_first_copies() -> None:
    """Copies of chunks written meanwhile still hold their buffers until they land; beyond
    window + EXTRA_BUFFERS even a first copy is dropped (unacknowledged: it comes again).

    Such stale copies come from second copies, which get a buffer only below ``window``, so
    the bound is reachable only with a window above EXTRA_BUFFERS."""
    window = 2 * EXTRA_BUFFERS
    core = bound_core(window=window)
    bound = window + EXTRA_BUFFERS
    stale = EXTRA_BUFFERS + 1
    for seq in range(stale):  # each chunk twice; one copy wins and is written
        assert core.data(seq, CHUNK) is Claim.RECEIVE
        deliver(core, seq)
        write_ready(core)
    assert core.buffers == stale and len(core.reorder) == 0
    for seq in range(stale, bound):  # first copies, all inside the window
        assert core.data(seq, CHUNK) is Claim.RECEIVE
    assert core.buffers == core.peak_buffers == core.max_buffers == bound
    assert core.data(bound, CHUNK) is Claim.DISCARD  # a first copy, inside the window
    assert bound < stale + window
    for seq in range(stale):  # the stale copies land: duplicates, their buffers given back
        assert core.received(seq, "late") is Claim.DISCARD_ACK
    assert core.buffers == bound - stale
    assert core.peak_buffers == bound  # the peak stays
    assert core.data(bound, CHUNK) is Claim.RECEIVE


def test_a_claim_gives_its_buffer_back_however_it_ends() -> None:
    core = bound_core()
    for _ in range(3):
        assert core.data(1, CHUNK) is Claim.RECEIVE
    assert core.buffers == core.peak_buffers == 3
    core.abandoned(1)  # its connection broke
    assert core.received(1, "a") is Claim.RECEIVE  # kept: holds a buffer until written
    assert core.received(1, "b") is Claim.DISCARD_ACK  # another copy won
    assert core.buffers == 1 == len(core.reorder)
    assert core.data(1, CHUNK) is Claim.DISCARD_ACK


# -- straight to the sink -------------------------------------------------------------------


def test_only_the_next_chunk_with_nothing_ready_goes_direct() -> None:
    core = bound_core()
    assert core.data(1, CHUNK) is Claim.RECEIVE
    assert not core.take_turn(1)  # not its turn
    assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.received(0, "first copy") is Claim.RECEIVE
    assert not core.take_turn(0)  # its turn, but a copy is ready in a buffer
    assert core.buffers == 3
    assert core.received(0, "second copy") is Claim.DISCARD_ACK
    write_ready(core)
    assert core.take_turn(1)  # next, nothing ready: its buffer is given back
    assert core.buffers == 0
    core.written(CHUNK, buffered=False)
    core.turn_over()
    assert core.reorder.written == 2 and core.nbytes == 2 * CHUNK


def test_copies_during_a_direct_write_are_dropped_unacknowledged() -> None:
    """While chunk 0 goes from its socket to the sink, other copies of it are read and
    dropped without an ACK (DISCARD, never DISCARD_ACK): if the direct write breaks off, the
    transmitter must still hold chunk 0 to send it again.  An ACK would let it forget the
    chunk, which then would never be written."""
    core = bound_core()
    assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.take_turn(0)
    for _ in range(WINDOW + EXTRA_BUFFERS + 1):
        assert core.data(0, CHUNK) is Claim.DISCARD
    assert core.buffers == 0
    core.partial = 3  # three bytes made it to the sink before the connection broke
    core.turn_over()
    assert core.data(0, CHUNK) is Claim.RECEIVE  # the re-send is taken again
    assert core.take_turn(0)
    assert core.resume(0, CHUNK) == 3
    core.written(CHUNK, buffered=False)
    core.turn_over()
    assert core.partial == 0
    assert core.data(0, CHUNK) is Claim.DISCARD_ACK  # now it is written: acknowledged


def test_a_copy_landing_during_a_direct_write_is_dropped_unacknowledged() -> None:
    """Two copies of chunk 0 (a re-send): one is read into a buffer, the other, next and
    with nothing ready, is spliced straight to the sink.  The buffered one lands first: it
    is neither filed (the chunk would be written twice) nor acknowledged (if the splice
    breaks off, the transmitter must still hold the chunk)."""
    core = bound_core()
    assert core.data(0, CHUNK) is Claim.RECEIVE  # copy A: read into a buffer
    assert core.data(0, CHUNK) is Claim.RECEIVE  # copy B: payload still in its socket
    assert core.take_turn(0)  # B goes direct
    # A lands meanwhile: dropped unacknowledged, for if B fails the chunk must come again
    assert core.received(0, "copy A") is Claim.DISCARD
    core.written(CHUNK, buffered=False)  # B is out
    core.turn_over()
    assert core.reorder.written == 1
    assert core.buffers == len(core.reorder) == 0


def test_resume_after_a_partial_direct_write() -> None:
    core = bound_core()
    assert core.resume(0, CHUNK) == 0  # nothing cut short
    assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.take_turn(0)
    core.partial = 5
    core.turn_over()
    assert core.resume(1, 1) == 0  # not the chunk cut short
    assert core.resume(0, CHUNK) == 5
    assert core.resume(0, 5) == 5  # all of it out already
    with pytest.raises(ProtocolViolation):
        core.resume(0, 4)  # shorter than what is written of it: cannot be the same chunk
    # The re-sent copy goes through a buffer: only its tail is written.
    deliver(core, 0)
    assert core.resume(core.reorder.written, CHUNK) == 5
    core.written(CHUNK, buffered=True)
    assert core.partial == 0 and core.nbytes == CHUNK and core.buffers == 0


# -- the end --------------------------------------------------------------------------------


@pytest.mark.parametrize(("bye", "why"), [
    (Bye(1, CHUNK), "written already"),  # 2 are written
    (Bye(2 + WINDOW + 1, 99), "beyond the window"),
    (Bye(U64, U64), "beyond the window"),
    (Bye(4, 4 * CHUNK), "never arrived"),  # chunk 3 missing
])
def test_an_unbelievable_bye_truncates(bye: Bye, why: str) -> None:
    core = receiving_core()  # 0 and 1 written, 2 held
    with pytest.raises(TruncatedStream, match=why):
        core.bye(bye)
    assert core.state is RxState.RECEIVING


def test_a_chunk_still_being_received_is_missing() -> None:
    core = receiving_core()
    assert core.data(3, CHUNK) is Claim.RECEIVE
    with pytest.raises(TruncatedStream):
        core.bye(Bye(4, 4 * CHUNK))


def test_a_second_bye_must_repeat_the_first() -> None:
    core = receiving_core()
    core.bye(Bye(3, 3 * CHUNK))
    core.bye(Bye(3, 3 * CHUNK))  # sent again after its connection broke
    for other in (Bye(3, 3 * CHUNK + 1), Bye(2, 2 * CHUNK), Bye(U64, 0)):
        with pytest.raises(RemoteProtocolError):
            core.bye(other)
    assert core.state is RxState.ENDING


def test_bye_is_answered_once_all_is_written_and_the_bytes_match() -> None:
    core = receiving_core()
    core.bye(Bye(3, 3 * CHUNK))
    assert core.state is RxState.ENDING
    assert core.bye_answer() is None  # chunk 2 is held, not written
    write_ready(core)
    assert core.bye_answer() == ByeOk(3, 3 * CHUNK)
    assert core.state is RxState.ENDING  # until the driver has flushed
    assert core.succeed()
    assert core.state is RxState.SUCCEEDED
    assert not core.succeed()  # exactly once
    # A BYE sent again (whatever it says) is answered as the first was.
    for again in (Bye(3, 3 * CHUNK), Bye(0, 0)):
        core.bye(again)
        assert core.bye_answer() == ByeOk(3, 3 * CHUNK)
        assert not core.succeed()
    assert core.state is RxState.SUCCEEDED


def test_a_byte_total_that_disagrees_truncates() -> None:
    core = receiving_core()
    core.bye(Bye(3, 3 * CHUNK - 1))  # the count is believable; the bytes are checked at the end
    assert core.bye_answer() is None
    write_ready(core)
    with pytest.raises(TruncatedStream, match="bytes"):
        core.bye_answer()
    core.fail()
    assert core.state is RxState.FAILED and not core.succeed()


def test_an_empty_stream_ends_at_once() -> None:
    core = bound_core()
    core.bye(Bye(0, 0))
    assert core.bye_answer() == ByeOk(0, 0)
    assert core.succeed()


def test_fail_does_not_undo_success() -> None:
    core = succeeded_core()
    core.fail()
    assert core.state is RxState.SUCCEEDED


def test_a_bye_below_a_chunk_already_here_truncates() -> None:
    """No transmitter ends its stream below a chunk it sent: believing it would write that
    chunk after BYE_OK."""
    core = bound_core()
    deliver(core, 0)
    deliver(core, 1)
    with pytest.raises(TruncatedStream, match="beyond"):
        core.bye(Bye(1, CHUNK))
    assert core.state is RxState.RECEIVING and core.reorder.ready() is not None


def test_a_copy_past_a_believed_end_is_dropped() -> None:
    """A copy already on its way when the BYE came lands unfiled and unacknowledged, and
    may not go straight to the sink either."""
    core = bound_core()
    deliver(core, 0)
    assert core.data(1, CHUNK) is Claim.RECEIVE
    assert core.data(1, CHUNK) is Claim.RECEIVE
    core.bye(Bye(1, CHUNK))
    write_ready(core)
    assert not core.take_turn(1)
    assert core.received(1, "past the end") is Claim.DISCARD
    assert core.buffers == 1
    core.abandoned(1)
    assert core.buffers == len(core.reorder) == 0
    assert core.bye_answer() == ByeOk(1, CHUNK)
    assert core.succeed()
    assert core.reorder.ready() is None


def test_a_failed_session_stays_failed() -> None:
    core = receiving_core()
    write_ready(core)
    core.fail()  # e.g. the sink failed, or the user interrupted
    with pytest.raises(RemoteProtocolError):
        core.bye(Bye(3, 3 * CHUNK))  # every chunk is written: a BYE that would succeed
    assert core.bye_answer() is None
    assert not core.succeed()
    assert core.state is RxState.FAILED


@pytest.mark.parametrize("moved", [None, 3], ids=["on-its-way", "cut-short"])
def test_a_bye_below_a_chunk_going_direct_truncates(moved: int | None) -> None:
    """Chunk 0 is being spliced to the sink (or was, and 3 of its bytes are out) when a BYE
    says the stream has no chunks: believed, the session would succeed with bytes of chunk 0
    in the sink, or about to be, past the end."""
    core = bound_core()
    assert core.data(0, CHUNK) is Claim.RECEIVE
    assert core.take_turn(0)
    if moved is not None:
        core.partial = moved
        core.turn_over()
    with pytest.raises(TruncatedStream, match="beyond"):
        core.bye(Bye(0, 0))
    assert core.state is RxState.RECEIVING


# -- refused authentications ----------------------------------------------------------------


def test_auth_throttle_answers_a_burst_then_paces() -> None:
    throttle = AuthThrottle()  # 2 per second, burst of 3
    assert [throttle.failure(100.0) for _ in range(3)] == [100.0] * 3
    assert [throttle.failure(100.0) for _ in range(3)] == [100.5, 101.0, 101.5]
    assert throttle.failures == 6


def test_auth_throttle_refills_over_time() -> None:
    throttle = AuthThrottle(rate=2.0, burst=3.0)
    for _ in range(4):
        throttle.failure(10.0)  # 4th: owes half a token
    assert throttle.failure(10.5) == 11.0  # half a second earned one back, spent at once
    assert throttle.failure(100.0) == 100.0  # long quiet: a full burst again, never more
    assert throttle.failure(100.0) == 100.0
    assert throttle.failure(100.0) == 100.0
    assert throttle.failure(100.0) == 100.5


def test_auth_throttle_rate_sets_the_spacing() -> None:
    throttle = AuthThrottle(rate=10.0, burst=1.0)
    assert throttle.failure(0.0) == 0.0
    assert throttle.failure(0.0) == pytest.approx(0.1)
    assert throttle.failure(0.0) == pytest.approx(0.2)


# -- the state machine ----------------------------------------------------------------------

#: The machine's window: above EXTRA_BUFFERS, so that copies of chunks written meanwhile can
#: push the buffers in use up to the hard bound (see test_the_hard_bound_holds_...).
RX_WINDOW = EXTRA_BUFFERS + 2

#: A stranger's DATA header: its seq (0, the next, the last of the window, just beyond it,
#: the true end, the largest, near the next, or anything) and its length.
SEQ_KINDS = st.one_of(
    st.sampled_from(["zero", "next", "last", "beyond", "end", "max"]),
    st.tuples(st.just("rel"), st.integers(-3, RX_WINDOW + 1)),
    st.tuples(st.just("abs"), st.integers(0, U64)),
)
LENGTHS = st.one_of(st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1]), st.integers(0, U32))
#: A stream of 0 to 2 * RX_WINDOW + 1 chunks, the last one perhaps short.
INPUTS = st.integers(0, 2 * RX_WINDOW + 1).flatmap(
    lambda n: st.binary(min_size=max(0, (n - 1) * CHUNK + 1), max_size=n * CHUNK))

#: What becomes of the copies a transmitter sends that get a buffer: they land at once
#: (mostly: the driver reads a payload as soon as its header is judged), try the direct path
#: first (as the driver does when the sink can take a splice), or stay on their way for
#: later steps to decide.
FATES = st.sampled_from(["lands", "lands", "tries direct", "stays"])

#: A BYE's chunk count: the true end, near what is written, or anything at all; its byte
#: count: what that many chunks of the input hold (perhaps one off), or anything at all.
BYE_CHUNKS = st.one_of(
    st.just("end"),
    st.tuples(st.just("rel"), st.integers(-2, RX_WINDOW + 1)),
    st.tuples(st.just("abs"), st.integers(0, U64)),
)
BYE_BYTES = st.one_of(
    st.tuples(st.just("true"), st.sampled_from([0, 0, -1, 1])),
    st.tuples(st.just("abs"), st.integers(0, U64)),
)


@dataclass
class Copy:
    """A DATA payload the core gave a buffer for, still on its way."""

    seq: int
    length: int
    legit: bool


class RxSession(RuleBasedStateMachine):
    """A ReceiverCore driven as the driver drives it.

    The legitimate transmitter sends chunks of ``self.input`` within its window, in any order
    and as often as it likes; a copy the core claims then lands, breaks off or goes straight
    to the sink (possibly cut short).  Alongside, a hostile peer with the right checkphrase
    and session sends any decodable HELLO, DATA header or BYE.  Its DATA payloads never land
    (a payload the receiver cannot tell from the real one would be the real one); they break
    off or try the direct path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0
        self._start(b"")

    def _start(self, data: bytes) -> None:
        """A new receiver, bound by the transmitter's HELLO, for ``data``."""
        self.peak = max(getattr(self, "peak", 0), self.core.peak_buffers if self.sessions else 0)
        self.core: ReceiverCore[tuple[int, bytes]] = ReceiverCore(
            max_chunk_size=MAX_CHUNK, max_buffer=MAX_BUFFER, plaintext=True)
        self.input = data
        self.chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
        self.output = bytearray()
        self.copies: dict[int, Copy] = {}
        self.next_id = 0
        self.direct: Copy | None = None
        self.acked: set[int] = set()  # every seq an ACK named, to anyone
        self.tx_freed: set[int] = set()  # chunks the transmitter was told it may forget
        self.tx_written = 0  # the receiver's written count as the transmitter last heard it
        self.believed: Bye | None = None
        self.waiting = 0  # BYE handlers waiting for their answer
        self.successes = 0
        self.failed = False
        admission = admit_with(self.core, hello(window=RX_WINDOW))
        assert admission.welcome == Welcome(int(WelcomeStatus.ACCEPTED), SID, 0)
        assert self.core.state is RxState.RECEIVING

    # -- helpers ------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return not self.failed

    @property
    def total(self) -> Bye:
        return Bye(len(self.chunks), len(self.input))

    def _fail(self) -> None:
        """The driver's answer to TruncatedStream / ProtocolViolation: the session fails."""
        self.failed = True
        self.core.fail()
        assert self.core.state is RxState.FAILED

    def _ack(self, seq: int, *, legit: bool) -> None:
        self.acked.add(seq)
        if legit:
            self.tx_freed.add(seq)
            self.tx_written = max(self.tx_written, self.core.reorder.written)

    def _arrive(self, seq: int, length: int, *, legit: bool) -> None:
        """A DATA header arrives; do what the driver does with the claim."""
        core = self.core
        written, before = core.reorder.written, core.buffers
        held = core.reorder.holds(seq)
        on_way = any(c.seq == seq for c in self.copies.values())
        direct = self.direct is not None and self.direct.seq == seq
        try:
            claim = core.data(seq, length)
        except RemoteProtocolError:  # the connection is dropped; nothing else changes
            assert not legit or (self.believed is not None and seq >= self.believed.chunks), (
                f"the transmitter's chunk {seq} was refused")
            assert core.buffers == before
            return
        assert 1 <= length <= CHUNK and seq < written + RX_WINDOW, (
            f"accepted chunk {seq} of {length} bytes with {written} written")
        assert self.believed is None or seq < self.believed.chunks
        if claim is Claim.RECEIVE:
            assert seq >= written and not held and not direct
            assert core.state is not RxState.SUCCEEDED
            assert core.buffers == before + 1 <= RX_WINDOW + EXTRA_BUFFERS
            assert not on_way or self._second_copies() < EXTRA_BUFFERS, (
                "second copies beyond the reserve")
            self.copies[self.next_id] = Copy(seq, length, legit)
            self.next_id += 1
            return
        assert core.buffers == before
        if claim is Claim.DISCARD_ACK:
            assert seq < written or held
            assert not direct, "a copy of the chunk going direct was acknowledged"
            self._ack(seq, legit=legit)
        else:
            assert direct or before >= RX_WINDOW + EXTRA_BUFFERS or (
                on_way and self._second_copies() >= EXTRA_BUFFERS)

    def _second_copies(self) -> int:
        """Copies on their way beyond the first of each chunk."""
        seqs = [c.seq for c in self.copies.values()]
        return len(seqs) - len(set(seqs))

    def _believable(self, bye: Bye) -> bool:
        """No fewer chunks than written, none beyond the window, none missing below it, and
        none at or past it held, going straight to the sink or partly there already."""
        reorder = self.core.reorder
        written = reorder.written
        return (written <= bye.chunks <= written + RX_WINDOW
                and all(map(reorder.holds, range(written, bye.chunks)))
                and not any(map(reorder.holds, range(bye.chunks, written + RX_WINDOW)))
                and not (self.direct is not None and self.direct.seq >= bye.chunks)
                and not (self.core.partial > 0 and written >= bye.chunks))

    def _bye(self, bye: Bye, *, legit: bool) -> None:
        core = self.core
        state, written = core.state, core.reorder.written
        believable = self._believable(bye)
        try:
            core.bye(bye)
        except RemoteProtocolError:
            assert state is not RxState.SUCCEEDED
            assert self.believed is not None and bye != self.believed
            assert not legit or self.believed != self.total
            return
        except TruncatedStream:
            # The transmitter's own BYE, sent once every chunk was acknowledged, is refused
            # only if a stranger's copy of a chunk past its end is going straight to the sink
            # (the core cannot tell whose it is).
            stranger = self.direct is not None and not self.direct.legit
            assert not legit or (stranger and self.direct.seq >= bye.chunks), (
                "the transmitter's own BYE was refused")
            assert state is not RxState.SUCCEEDED and not believable
            self._fail()
            return
        if state is not RxState.SUCCEEDED:
            assert believable, f"believed {bye} with {written} written"
            assert self.believed in (None, bye)
            assert core.state is RxState.ENDING
            self.believed = bye
        self.waiting += 1
        self._answer_byes()

    def _answer_byes(self) -> None:
        """What each waiting BYE handler in the driver does when chunks are written."""
        core = self.core
        while self.waiting and self.live:
            assert self.believed is not None
            try:
                answer = core.bye_answer()
            except TruncatedStream:
                assert core.reorder.written >= self.believed.chunks, "judged before the end"
                assert core.nbytes != self.believed.nbytes and self.believed != self.total
                self._fail()
                return
            if answer is None:
                assert core.reorder.written < self.believed.chunks
                return
            assert answer == ByeOk(self.believed.chunks, self.believed.nbytes)
            assert core.reorder.written >= self.believed.chunks, "answered before the end"
            first = core.succeed()
            assert first == (self.successes == 0), "succeed() is True exactly once"
            self.successes += first
            self.waiting -= 1

    def _landable(self) -> list[int]:
        return sorted(i for i, c in self.copies.items() if c.legit)

    def _writable(self) -> bool:
        """The writer runs when the sink is free and the next chunk is here."""
        return self.direct is None and self.core.reorder.ready() is not None

    # -- the session starts ---------------------------------------------------------------

    @initialize(data=INPUTS)
    def bind(self, data: bytes) -> None:
        self._start(data)

    @precondition(lambda self: self.core.state in (RxState.SUCCEEDED, RxState.FAILED))
    @rule(data=INPUTS)
    def next_session(self, data: bytes) -> None:
        """That session is over (the steps in between still prod it): a new receiver for a
        new stream, so that the rest of the run has a session to explore."""
        self.sessions += 1
        self._start(data)

    # -- the transmitter ----------------------------------------------------------------

    @precondition(lambda self: self.live and self.chunks)
    @rule(data=st.data(), times=st.sampled_from([1, 1, 2, RX_WINDOW]), then=FATES)
    def transmitter_sends(self, data: st.DataObject, times: int, then: str) -> None:
        """Any chunk it may hold (within its window, or a copy sent earlier arriving late),
        perhaps several times in a row: re-sent after stall upon stall."""
        limit = min(len(self.chunks), self.tx_written + RX_WINDOW)
        seq = data.draw(st.integers(0, limit - 1), label="seq")
        before = set(self.copies)
        for _ in range(times):
            self._arrive(seq, len(self.chunks[seq]), legit=True)
        self._new_copies(before, then)

    @precondition(lambda self: self.live and self.chunks)
    @rule(then=FATES)
    def transmitter_resends_its_window(self, then: str = "stays") -> None:
        """A stall: every chunk it still holds is sent again at once (on fresh connections)."""
        before = set(self.copies)
        for seq in range(self.tx_written, min(len(self.chunks), self.tx_written + RX_WINDOW)):
            if seq not in self.tx_freed:
                self._arrive(seq, len(self.chunks[seq]), legit=True)
        self._new_copies(before, then)

    def _new_copies(self, before: set[int], then: str) -> None:
        """The copies that got a buffer since ``before`` meet their fate."""
        for ident in sorted(set(self.copies) - before):
            if then == "lands":
                self._land(ident)
            elif then == "tries direct" and self.direct is None:
                self._try_direct(ident)

    @precondition(lambda self: self.live and self.chunks)
    @rule(data=st.data())
    def resent_copy_overtakes(self, data: st.DataObject) -> None:
        """A chunk gets stuck on a stalled connection, is sent again elsewhere, and that copy
        lands first: the stuck one keeps its buffer until it lands or breaks off (once its
        chunk is written, it holds a buffer outside the window)."""
        limit = min(len(self.chunks), self.tx_written + RX_WINDOW)
        seq = data.draw(st.integers(0, limit - 1), label="seq")
        self._arrive(seq, len(self.chunks[seq]), legit=True)
        before = set(self.copies)
        self._arrive(seq, len(self.chunks[seq]), legit=True)
        self._new_copies(before, "lands")

    @precondition(lambda self: self.live and self.direct is None
                  and self.core.reorder.written < len(self.chunks))
    @rule(cut=st.one_of(st.none(), st.integers(0, CHUNK)))
    def splice_overtaken(self, cut: int | None) -> None:
        """Two copies of the next chunk (a re-send): one goes straight to the sink, the other
        lands in a buffer meanwhile; then the splice completes, or breaks off after ``cut``
        bytes (and the chunk must come again)."""
        seq = self.core.reorder.written
        before = set(self.copies)
        self._arrive(seq, len(self.chunks[seq]), legit=True)
        self._arrive(seq, len(self.chunks[seq]), legit=True)
        first, *others = sorted(set(self.copies) - before) or [None]
        if first is None:
            return
        self._try_direct(first)
        for ident in others:
            self._land(ident)
        if self.direct is not None:
            self.direct_ends(whole=cut is None, n=cut or 0)

    @precondition(lambda self: self.live and self._landable())
    @rule(data=st.data())
    def copy_lands(self, data: st.DataObject) -> None:
        self._land(data.draw(st.sampled_from(self._landable()), label="copy"))

    def _land(self, ident: int) -> None:
        copy = self.copies.pop(ident)
        core = self.core
        # Another copy is on its way to the sink (if it breaks off, this chunk must come
        # again), or the copy is past a believed end: dropped, unacknowledged.
        dropped = (self.direct is not None and self.direct.seq == copy.seq) or (
            self.believed is not None and copy.seq >= self.believed.chunks)
        fresh = copy.seq >= core.reorder.written and not core.reorder.holds(copy.seq)
        before = core.buffers
        verdict = core.received(copy.seq, (copy.seq, self.chunks[copy.seq]))
        expected = (Claim.DISCARD if dropped
                    else Claim.RECEIVE if fresh else Claim.DISCARD_ACK)
        assert verdict is expected
        assert core.buffers == before - (verdict is not Claim.RECEIVE)
        if verdict is not Claim.DISCARD:
            self._ack(copy.seq, legit=True)  # kept, or another copy is: acknowledged

    @precondition(lambda self: self.live and self.copies)
    @rule(data=st.data())
    def copy_breaks_off(self, data: st.DataObject) -> None:
        """Its connection broke, or its checksum failed."""
        ident = data.draw(st.sampled_from(sorted(self.copies)), label="copy")
        copy = self.copies.pop(ident)
        before = self.core.buffers
        self.core.abandoned(copy.seq)
        assert self.core.buffers == before - 1

    @precondition(lambda self: self.live and self.direct is None and self.copies)
    @rule(data=st.data())
    def copy_tries_direct(self, data: st.DataObject) -> None:
        """The sink is free: may the copy go from its socket straight to the sink?"""
        self._try_direct(data.draw(st.sampled_from(sorted(self.copies)), label="copy"))

    def _try_direct(self, ident: int) -> None:
        copy = self.copies[ident]
        core = self.core
        # Only the next chunk, with no copy of it ready, and not past a believed end.
        may = (copy.seq == core.reorder.written and core.reorder.ready() is None
               and (self.believed is None or copy.seq < self.believed.chunks))
        before = core.buffers
        if not core.take_turn(copy.seq):
            assert not may
            assert core.buffers == before
            return  # it takes the buffered path after all
        assert may
        assert core.buffers == before - 1
        del self.copies[ident]
        self.direct = copy
        partial = core.partial
        try:
            done = core.resume(copy.seq, copy.length)
        except ProtocolViolation:
            assert not copy.legit and copy.length < partial
            self.direct = None
            core.turn_over()
            self._fail()
            return
        assert done == partial
        assert copy.length >= partial, "a copy shorter than what is out of it was let through"

    @precondition(lambda self: self.live and self.direct is not None and self.direct.legit)
    @rule(n=st.integers(1, CHUNK))
    def direct_moves(self, n: int) -> None:
        assert self.direct is not None
        chunk = self.chunks[self.direct.seq]
        done = self.core.partial
        n = min(n, len(chunk) - done)
        self.output += chunk[done:done + n]
        self.core.partial += n

    @precondition(lambda self: self.live and self.direct is not None)
    @rule(whole=st.booleans(), n=st.integers(0, CHUNK))
    def direct_ends(self, whole: bool, n: int = 0) -> None:
        """The direct write completes, or its connection breaks after ``n`` more bytes (a
        hostile one breaks before any of its bytes reach the sink)."""
        assert self.direct is not None
        if not whole and n and self.direct.legit:
            self.direct_moves(n)
        copy, self.direct = self.direct, None
        core = self.core
        if whole and copy.legit:
            chunk = self.chunks[copy.seq]
            self.output += chunk[core.partial:]
            assert core.written(len(chunk), buffered=False) == copy.seq
            core.turn_over()
            self._ack(copy.seq, legit=True)
            self._answer_byes()
        else:
            core.turn_over()

    @precondition(lambda self: self.live and self._writable())
    @rule(n=st.integers(1, RX_WINDOW))
    def writer(self, n: int = 1) -> None:
        """Up to ``n`` chunks that are ready are written, in order."""
        for _ in range(n):
            if self.live and self._writable():
                self._write_next()

    def _write_next(self) -> None:
        core = self.core
        ready = core.reorder.ready()
        assert ready is not None
        seq, chunk = ready
        assert seq == core.reorder.written
        done = core.resume(seq, len(chunk))
        assert done == core.partial
        self.output += chunk[done:]
        before = core.buffers
        assert core.written(len(chunk), buffered=True) == seq
        assert core.buffers == before - 1
        self._ack(seq, legit=True)
        self._answer_byes()

    @precondition(lambda self: self.live and all(
        s in self.tx_freed or s < self.tx_written for s in range(len(self.chunks))))
    @rule()
    def transmitter_ends(self) -> None:
        """Every chunk acknowledged: BYE with the true totals (again, if sent before)."""
        self._bye(self.total, legit=True)

    # -- the hostile peer ---------------------------------------------------------------

    def _seq(self, kind: str | tuple[str, int]) -> int:
        written = self.core.reorder.written
        if isinstance(kind, tuple):
            what, value = kind
            return value if what == "abs" else max(0, written + value)
        return {
            "zero": 0, "next": written, "last": written + RX_WINDOW - 1,
            "beyond": written + RX_WINDOW, "end": len(self.chunks), "max": U64,
        }[kind]

    @precondition(lambda self: self.live)
    @rule(seq=SEQ_KINDS, length=LENGTHS,
          then=st.sampled_from(["breaks off", "breaks off", "stalls", "tries direct"]))
    def stranger_sends_data(self, seq: str | tuple[str, int], length: int, then: str) -> None:
        """Any DATA header.  A payload that got a buffer then breaks off at once, stalls
        (holding its buffer until a later step breaks it off), or tries the direct path."""
        before = set(self.copies)
        self._arrive(self._seq(seq), length, legit=False)
        for ident in set(self.copies) - before:
            if then == "breaks off":
                self.core.abandoned(self.copies.pop(ident).seq)
            elif then == "tries direct" and self.direct is None:
                self._try_direct(ident)

    @precondition(lambda self: self.live and self.core.partial > 1)
    @rule(data=st.data())
    def stranger_sends_a_short_copy(self, data: st.DataObject) -> None:
        """Of the chunk whose head is in the sink already, from a direct write cut short."""
        length = data.draw(st.integers(1, self.core.partial - 1), label="length")
        before = set(self.copies)
        self._arrive(self.core.reorder.written, length, legit=False)
        for ident in set(self.copies) - before:
            if self.direct is None:  # the sink is free: it tries the direct path at once
                self._try_direct(ident)

    @precondition(lambda self: self.live)
    @rule(chunks=BYE_CHUNKS, nbytes=BYE_BYTES, lethal=st.sampled_from([False] * 3 + [True]))
    def stranger_says_bye(self, chunks: str | tuple[str, int], nbytes: tuple[str, int],
                          lethal: bool) -> None:
        """Any totals: the right ones (perhaps early), a prefix's, one off, or nonsense.

        One that would end the story (fail the session, or set an end other than the
        input's) is, unless ``lethal``, judged on a copy of the core only, so that the session
        lives on to meet more."""
        n = self._seq(chunks)
        what, value = nbytes
        total = max(0, len(self.input[:n * CHUNK]) + value) if what == "true" else value
        bye = Bye(n, min(total, U64))
        if not lethal and self.core.state is RxState.RECEIVING and bye != self.total:
            probe = deepcopy(self.core)
            if self._believable(bye):
                probe.bye(bye)
                assert probe.state is RxState.ENDING
            else:
                with pytest.raises(TruncatedStream):
                    probe.bye(bye)
            return
        self._bye(bye, legit=False)

    @rule(
        version=st.one_of(st.just(PROTOCOL_VERSION),
                          st.sampled_from([0, PROTOCOL_VERSION + 1, U16])),
        mode=st.sampled_from([int(Mode.PLAINTEXT), 0, int(Mode.PLAINTEXT) | 1 << 31, 2]),
        sid=st.one_of(st.just(SID), st.sampled_from([OTHER_SID, NO_SESSION])),
        conn=st.one_of(st.sampled_from([0, MAX_CONNECTIONS - 1, MAX_CONNECTIONS, U16]),
                       st.integers(0, U16)),
        chunk_size=st.one_of(st.just(CHUNK), st.sampled_from([0, 1, MAX_CHUNK + 1]),
                             st.integers(0, U32)),
        window=st.one_of(st.just(RX_WINDOW), st.sampled_from([0, 1, MAX_WINDOW + 1]),
                         st.integers(0, U32)),
        features=st.one_of(st.just(0), st.sampled_from([1, 2, 3, 0x10, 0x100, 1 << 31]),
                           st.integers(0, U32)),
    )
    def stranger_says_hello(self, version: int, mode: int, sid: bytes, conn: int,
                            chunk_size: int, window: int, features: int) -> None:
        """Any HELLO, in any state (failed too): it changes nothing, and only the session's
        own transmitter learns the session id and progress."""
        core = self.core
        before = (core.state, core.params, core.reorder.written, core.buffers, core.nbytes)
        admission = admit_with(core, Hello(mode, sid, conn, chunk_size, window, features,
                                           version))
        assert (core.state, core.params, core.reorder.written, core.buffers,
                core.nbytes) == before, "a HELLO changed the session"
        if version != PROTOCOL_VERSION:
            status = WelcomeStatus.BAD_VERSION
        elif mode & ~Mode.PLAINTEXT:  # a mode bit this version does not know
            status = WelcomeStatus.BAD_PARAMETERS
        elif not mode & Mode.PLAINTEXT:  # the core under test was started with plaintext
            status = WelcomeStatus.BAD_MODE
        elif sid != SID:
            status = WelcomeStatus.WRONG_SESSION
        elif core.state is RxState.SUCCEEDED:
            status = WelcomeStatus.SESSION_OVER
        elif core.state is RxState.FAILED:
            status = WelcomeStatus.SESSION_FAILED
        elif conn >= MAX_CONNECTIONS or (chunk_size, window, features) != (CHUNK, RX_WINDOW, 0):
            status = WelcomeStatus.BAD_PARAMETERS
        else:
            status = WelcomeStatus.ACCEPTED
        if status in (WelcomeStatus.ACCEPTED, WelcomeStatus.SESSION_OVER):
            expected = Welcome(int(status), SID, core.reorder.written)
        else:
            expected = Welcome(int(status), NO_SESSION, 0)
        assert admission.welcome == expected

    # -- what must always hold ----------------------------------------------------------

    @invariant()
    def output_is_the_input_so_far(self) -> None:
        """Exactly the chunks written, plus the head of one cut short on its way direct."""
        core = self.core
        whole = len(self.input[:core.reorder.written * CHUNK])
        assert core.nbytes == whole
        assert bytes(self.output) == self.input[:whole + core.partial]

    @invariant()
    def buffers_are_bounded_and_accounted_for(self) -> None:
        core = self.core
        assert 0 <= core.buffers <= core.peak_buffers <= RX_WINDOW + EXTRA_BUFFERS
        assert core.buffers == len(self.copies) + len(core.reorder)

    @invariant()
    def only_the_window_is_held(self) -> None:
        reorder = self.core.reorder
        inside = range(reorder.written, reorder.written + RX_WINDOW)
        assert sum(map(reorder.holds, inside)) == len(reorder)

    @invariant()
    def every_acknowledged_chunk_is_kept(self) -> None:
        """An ACK lets the transmitter forget a chunk: it must be written or held."""
        reorder = self.core.reorder
        forgotten = [s for s in self.acked if s >= reorder.written and not reorder.holds(s)]
        assert not forgotten, f"acknowledged but neither written nor held: {forgotten}"

    @invariant()
    def the_state_follows_the_story(self) -> None:
        state = self.core.state
        if self.failed:
            assert state is RxState.FAILED
        elif self.believed is None:
            assert state is RxState.RECEIVING
        else:
            assert state is (RxState.SUCCEEDED if self.successes else RxState.ENDING)

    @invariant()
    def success_means_everything_announced_is_out(self) -> None:
        """Success: the BYE's totals are exactly what was written.  Short of the whole input
        only when a BYE named exactly a prefix's totals, which no receiver can tell from a real
        end."""
        if self.core.state is not RxState.SUCCEEDED:
            return
        bye = self.believed
        assert bye is not None
        assert self.core.reorder.written == bye.chunks
        assert self.core.nbytes == bye.nbytes == len(self.output)
        if bye == self.total:
            assert bytes(self.output) == self.input
        else:
            assert bye.chunks < len(self.chunks)

    def teardown(self) -> None:
        """Unless the session failed or a stranger's BYE set another end: strangers hang up,
        the network calms down, and the transmitter finishes the stream, exactly."""
        target(max(self.peak, self.core.peak_buffers), label="peak buffers")
        if self.failed or self.believed not in (None, self.total):
            return
        core = self.core
        if self.direct is not None:
            self.direct_ends(whole=True)
        for _ in range(len(self.chunks) + RX_WINDOW + 2):
            for ident in sorted(self.copies):
                if self.copies[ident].legit:
                    self._land(ident)
                else:
                    core.abandoned(self.copies.pop(ident).seq)
            while self.live and self._writable():
                self._write_next()
            self.transmitter_resends_its_window(then="lands")
        self.transmitter_ends()
        assert not self.failed
        assert core.state is RxState.SUCCEEDED
        assert bytes(self.output) == self.input
        assert core.buffers == len(core.reorder) == 0


TestRxSession = RxSession.TestCase
TestRxSession.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
