"""The chaos scheduler: which operation of which stream gets which fault, from the seed alone.

A decision is a pure function of (seed, side, connection, generation, direction, operation
number): the same in every run, every process and every release.  A single task driving
wrapped streams therefore replays a seed's fault log exactly (the last section); how whole
sessions replay is in test_chaos_sessions.py.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import anyio
import pytest

from harness import ALL_KINDS, always, receive_exactly, run_mock
from viamillipede.chaos import (
    DEFAULT_KINDS,
    ChaosScheduler,
    ChaosStream,
    Direction,
    Fault,
    FaultKind,
    FaultLog,
    Side,
)
from viamillipede.testing import memory_stream_pair

GRID: list[tuple[Side, int, int, Direction, int]] = [
    (side, conn, gen, direction, op)
    for side in ("tx", "rx")
    for conn in range(4)
    for gen in range(3)
    for direction in ("send", "recv")
    for op in range(40)
]


def must(fault: Fault | None) -> Fault:
    assert fault is not None
    return fault


def decisions(seed: int, rate: float = 0.3) -> list[Fault | None]:
    sched = ChaosScheduler(seed, rate=rate, kinds=ALL_KINDS)
    return [sched.decide(*key) for key in GRID]


# -- a seed means the same faults everywhere, every time ---------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 1731, 2**63 - 1, -5, 2**80])
def test_same_seed_same_decisions(seed: int) -> None:
    assert decisions(seed) == decisions(seed)


def test_decisions_do_not_depend_on_call_order() -> None:
    sched = ChaosScheduler(42, rate=0.3, kinds=ALL_KINDS)
    forward = [sched.decide(*key) for key in GRID]
    backward = [sched.decide(*key) for key in reversed(GRID)][::-1]
    assert forward == backward


def test_different_seeds_differ() -> None:
    runs = [decisions(seed) for seed in range(5)]
    for a, b in itertools.combinations(runs, 2):
        assert a != b


def test_decisions_are_the_same_in_another_process() -> None:
    """Python's hash() is salted per process; the decisions must not be."""
    code = (
        "from viamillipede.chaos import ChaosScheduler, FaultKind\n"
        "s = ChaosScheduler(1731, rate=0.3, kinds=FaultKind)\n"
        "for side in ('tx', 'rx'):\n"
        "    for op in range(200):\n"
        "        f = s.decide(side, 2, 1, 'send', op)\n"
        "        print(op, None if f is None else (f.kind.value, f.delay_ms, f.u))\n"
    )
    here = ChaosScheduler(1731, rate=0.3, kinds=FaultKind)
    expected = []
    for side in ("tx", "rx"):
        for op in range(200):
            f = here.decide(side, 2, 1, "send", op)
            expected.append(f"{op} {None if f is None else (f.kind.value, f.delay_ms, f.u)}")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout
    assert out.splitlines() == expected


def test_golden_decisions() -> None:
    """Pins the derivation: ``chaos SEED`` must mean the same faults in every release."""
    sched = ChaosScheduler(1731, rate=0.25, kinds=ALL_KINDS)
    got = [
        (op, f.kind.value, f.delay_ms)
        for op in range(60)
        if (f := sched.decide("tx", 0, 0, "send", op)) is not None
    ]
    assert got == GOLDEN_DECISIONS


GOLDEN_DECISIONS: list[tuple[int, str, int]] = [
    (13, "short", 0), (14, "short", 0), (15, "delay", 47), (17, "delay", 180),
    (18, "short", 0), (22, "delay", 169), (30, "delay", 60), (31, "short", 0),
    (32, "delay", 48), (33, "delay", 72), (35, "short", 0), (40, "delay", 150),
    (42, "stall", 0), (53, "short", 0),
]


# -- how many faults, and of which kinds -------------------------------------------------------


def test_rate_is_the_fraction_of_faulted_operations() -> None:
    sched = ChaosScheduler(7, rate=0.1, kinds=ALL_KINDS)
    faults = [sched.decide("tx", 0, 0, "send", op) for op in range(20_000)]
    share = sum(f is not None for f in faults) / len(faults)
    assert 0.09 < share < 0.11
    kinds = {f.kind for f in faults if f is not None}
    assert kinds == ALL_KINDS


def test_weights_make_resets_and_stalls_rarer() -> None:
    sched = ChaosScheduler(7, rate=1.0, kinds=ALL_KINDS)
    counts = dict.fromkeys(FaultKind, 0)
    for op in range(20_000):
        f = sched.decide("tx", 0, 0, "send", op)
        assert f is not None
        counts[f.kind] += 1
    assert counts[FaultKind.RESET] < counts[FaultKind.CORRUPT] < counts[FaultKind.DELAY]
    assert counts[FaultKind.STALL] < counts[FaultKind.SHORT]


def test_default_kinds_leave_out_stall_and_corrupt() -> None:
    assert {FaultKind.RESET, FaultKind.DELAY, FaultKind.SHORT} == DEFAULT_KINDS
    sched = ChaosScheduler(3, rate=1.0)
    seen = {must(sched.decide("tx", 0, 0, "send", op)).kind for op in range(500)}
    assert seen == DEFAULT_KINDS


def test_corrupt_only_hits_sends_of_the_chosen_sides() -> None:
    sched = ChaosScheduler(3, rate=1.0, kinds=ALL_KINDS)
    others: list[tuple[Side, Direction]] = [("rx", "send"), ("tx", "recv"), ("rx", "recv")]
    for side, direction in others:
        for op in range(300):
            f = sched.decide(side, 0, 0, direction, op)
            assert f is not None and f.kind is not FaultKind.CORRUPT
    assert always(FaultKind.CORRUPT).decide("tx", 0, 0, "recv", 0) is None
    both = always(FaultKind.CORRUPT, corrupt_sides=("tx", "rx"))
    assert must(both.decide("rx", 0, 0, "send", 0)).kind is FaultKind.CORRUPT


@pytest.mark.parametrize("rate, kinds", [(0.0, ALL_KINDS), (1.0, ())])
def test_nothing_to_inject_means_inactive(rate: float, kinds: Iterable[FaultKind]) -> None:
    sched = ChaosScheduler(9, rate=rate, kinds=kinds)
    assert not sched.active
    assert all(sched.decide(*key) is None for key in GRID)


def test_delays_stay_in_range() -> None:
    sched = always(FaultKind.DELAY)
    delays = [must(sched.decide("rx", 1, 0, "recv", op)).delay_ms for op in range(2000)]
    assert min(delays) == 1 and max(delays) == 200
    fixed = always(FaultKind.DELAY, delay_ms=(50, 50))
    assert must(fixed.decide("tx", 0, 0, "send", 0)).delay_ms == 50


@pytest.mark.parametrize(
    "options",
    [{"rate": -0.1}, {"rate": 1.5}, {"rate": float("nan")}, {"kinds": ["explode"]},
     {"delay_ms": (5, 1)}, {"corrupt_skip": -1}, {"weights": {FaultKind.RESET: -1.0}}],
)
def test_bad_parameters_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChaosScheduler(1, **options)


# -- numbering the streams of a session --------------------------------------------------------


def test_wrap_counts_generations_per_connection() -> None:
    sched = ChaosScheduler(1)
    order: list[tuple[Side, int]] = [("tx", 0), ("tx", 0), ("tx", 1), ("rx", 0), ("tx", 0)]
    gens = [
        sched.wrap(memory_stream_pair()[0], side=side, conn=conn).generation
        for side, conn in order
    ]
    assert gens == [0, 1, 0, 0, 2]
    explicit = sched.wrap(memory_stream_pair()[0], side="tx", conn=0, generation=9)
    assert explicit.generation == 9 and explicit.log is sched.log
    with pytest.raises(ValueError):
        ChaosStream(memory_stream_pair()[0], sched, "up", 0, 0)  # type: ignore[arg-type]


def test_hooks_for_the_api_name_streams_by_index_and_generation() -> None:
    sched = ChaosScheduler(1)
    tx = sched.transmitter_wrapper()(2, 5, memory_stream_pair()[0])
    rx = sched.receiver_wrapper()(3, memory_stream_pair()[1])
    assert isinstance(tx, ChaosStream) and isinstance(rx, ChaosStream)
    assert (tx.side, tx.conn, tx.generation) == ("tx", 2, 5)
    assert (rx.side, rx.conn, rx.generation) == ("rx", 3, 0)
    assert tx.log is rx.log is sched.log


# -- one task replays a seed's fault log exactly -----------------------------------------------


async def scripted_exchange(seed: int) -> FaultLog:
    """Request/response over a connection that is re-opened whenever chaos breaks it.

    One task does everything, in a fixed order, so which operations happen depends on the seed
    alone (and on mock time, which is the same in every run).
    """
    sched = ChaosScheduler(seed, rate=0.15, kinds=ALL_KINDS, corrupt_sides=("tx", "rx"))
    # Each message starts like a DATA frame ("D"), the only sends ``corrupt`` damages.
    messages = [b"D" + bytes((7 * i + j) % 251 for j in range(40 + 53 * i)) for i in range(40)]
    i = 0
    while i < len(messages):
        a, b = memory_stream_pair(buffer=64)
        tx = sched.wrap(a, side="tx", conn=0)
        rx = sched.wrap(b, side="rx", conn=0)
        try:
            while i < len(messages):
                with anyio.fail_after(10):  # gets a stalled connection going again
                    await tx.send(messages[i])
                    await receive_exactly(rx, len(messages[i]))
                    await rx.send(b"Dack %d" % i * 20)
                    await receive_exactly(tx, len(b"Dack %d" % i * 20))
                i += 1
        except (anyio.BrokenResourceError, anyio.EndOfStream, TimeoutError):
            pass
        finally:
            await tx.aclose()
            await rx.aclose()
    return sched.log


def test_a_scripted_exchange_gives_the_same_fault_log_every_run() -> None:
    first = run_mock(lambda: scripted_exchange(2024))
    assert all(first.summary()[kind] > 0 for kind in FaultKind)
    for _ in range(2):
        again = run_mock(lambda: scripted_exchange(2024))
        assert again.records == first.records
        assert again.lines() == first.lines()
    assert first.lines()[: len(GOLDEN_LOG)] == GOLDEN_LOG
    other = run_mock(lambda: scripted_exchange(2025))
    assert other.lines() != first.lines()


GOLDEN_LOG = [
    "chaos tx conn 0 gen 0 recv 0: reset",
    "chaos rx conn 0 gen 1 recv 0: delay 87 ms",
    "chaos rx conn 0 gen 1 send 0: short 27+73+20",
    "chaos tx conn 0 gen 1 send 2: corrupt byte 106 of 147 bit 3",
    "chaos rx conn 0 gen 1 send 3: short 84+5+31",
    "chaos rx conn 0 gen 1 send 6: corrupt byte 118 of 120 bit 0",
    "chaos tx conn 0 gen 1 send 7: delay 178 ms",
    "chaos tx conn 0 gen 1 recv 15: delay 117 ms",
    "chaos rx conn 0 gen 1 recv 12: delay 164 ms",
    "chaos rx conn 0 gen 1 send 15: corrupt byte 138 of 140 bit 3",
    "chaos tx conn 0 gen 1 recv 19: short 130/140",
    "chaos tx conn 0 gen 1 recv 20: short 5/10",
    "chaos tx conn 0 gen 1 recv 22: short 123/140",
    "chaos rx conn 0 gen 1 recv 18: stall",
    "chaos tx conn 0 gen 2 send 2: corrupt byte 860 of 1101 bit 6",
    "chaos rx conn 0 gen 2 send 2: stall",
]
