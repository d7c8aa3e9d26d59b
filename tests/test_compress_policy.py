"""The adaptive compression policy, alone, under a simulated clock.

The policy is pure: it is told what the reader waited for, what each chunk became and how many
cores were idle, and says the level of the next chunk.  Here a small model of a stream plays
the rest of the transmitter: each chunk takes the time of its slowest stage (compression on
the workers, or the path: link, or receiver), and the reader's wait is the difference, charged
to the window (the path is slower) or to the workers (the CPU is).  Time is the model's own
clock; nothing sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from viamillipede.squeeze import (
    BAR_FIRST,
    LADDER,
    MISSES,
    PROBE_FIRST,
    PROBE_MAX,
    START_LEVEL,
    AdaptivePolicy,
    CpuMeter,
    FixedPolicy,
)

CHUNK = 2 << 20
WINDOW = 16
MB = 1e6

#: Compression speed of one worker (raw bytes/s) and ratio, by level: roughly this machine.
SPEED = {-5: 650 * MB, -1: 490 * MB, 1: 420 * MB, 3: 235 * MB, 6: 90 * MB}
RATIO = {-5: 0.40, -1: 0.33, 1: 0.28, 3: 0.25, 6: 0.23}


@dataclass
class Model:
    """A stream of chunks through ``workers`` compressors and a path.

    ``path(now, level)`` is the path's rate in wire bytes/s at time ``now`` for chunks made at
    ``level``; ``source`` how fast the input comes; ``others`` the cores the rest of the host
    keeps busy; ``ratio(now, level)`` what a chunk shrinks to.
    """

    path: Callable[[float, int | None], float]
    source: float = 1500 * MB
    others: float = 0.3
    cores: int = 2
    workers: int = 2
    ratio: Callable[[float, int | None], float] = lambda now, level: RATIO[level] if level else 1
    now: float = 0.0
    levels: list[tuple[float, int | None]] = field(default_factory=list)
    raw_at: list[tuple[float, int]] = field(default_factory=list)

    def run(self, policy: AdaptivePolicy, seconds: float) -> None:
        level = policy.level(self.now)
        while self.now < seconds:
            r = self.ratio(self.now, level) if level is not None else 1.0
            wire = CHUNK if r >= 0.97 else int(CHUNK * r)
            cpu = CHUNK / SPEED[level] / self.workers if level is not None else 0.0
            net = wire / self.path(self.now, level)
            src = CHUNK / self.source
            self.now += max(src, cpu, net)
            policy.waited(self.now, window=max(net - max(cpu, src), 0.0),
                          worker=max(cpu - max(net, src), 0.0))
            policy.done(level, CHUNK, wire, self.now)
            policy.acked(CHUNK, self.now)
            self.levels.append((self.now, level))
            self.raw_at.append((self.now, CHUNK))
            level = policy.level(self.now)

    def idle(self) -> float:
        """Idle cores over the last chunk: what the rest of the host leaves, less the
        compressors' share of the time."""
        if not self.levels:
            return self.cores - self.others
        _, level = self.levels[-1]
        busy = 0.0
        if level is not None:
            r = self.ratio(self.now, level)
            cpu = CHUNK / SPEED[level]  # one worker's seconds
            net = CHUNK * r / self.path(self.now, level)
            busy = min(cpu / max(cpu / self.workers, net), self.workers)
        return max(self.cores - self.others - busy, 0.0)

    def rate(self, start: float, end: float) -> float:
        """Raw bytes a second that passed between ``start`` and ``end``."""
        got = sum(n for t, n in self.raw_at if start < t <= end)
        return got / (end - start)

    def level_at(self, t: float) -> int | None:
        last: int | None = None
        for when, level in self.levels:
            if when > t:
                break
            last = level
        return last


def policy_for(model: Model) -> AdaptivePolicy:
    return AdaptivePolicy(WINDOW, idle=model.idle)


def two_links(now: float, level: int | None) -> float:
    return 50 * MB  # two 200 Mbit links


def test_a_slow_link_turns_compression_on_and_up_and_multiplies_the_stream() -> None:
    model = Model(two_links)
    policy = policy_for(model)
    model.run(policy, 6.0)
    assert model.level_at(0.1) is None, "auto starts off"
    first_on = next(t for t, level in model.levels if level is not None)
    assert first_on < 0.5, f"compression came on only at {first_on:.2f} s"
    assert model.level_at(first_on) == START_LEVEL
    # It climbed past the start while the link was the limit and the CPU had room ...
    assert max(level for _, level in model.levels if level is not None) > START_LEVEL
    # ... and the stream ends up well over twice what the link carries raw.
    assert model.rate(3.0, 6.0) > 2.5 * 50 * MB
    assert "zstd" in policy.describe()


def test_a_fast_path_with_busy_cpus_never_compresses() -> None:
    """Loopback: the path is fast and the host's cores are all busy (the receiver runs
    there): compression would only take CPU from it."""
    model = Model(lambda now, level: 900 * MB, source=3000 * MB, others=1.95)
    policy = policy_for(model)
    model.run(policy, 5.0)
    assert policy._wait_window > 0.5 * (model.now - policy._start), "the window is waited for"
    assert {level for _, level in model.levels} == {None}
    assert policy.steps == 0


def test_a_fast_link_with_idle_cpus_but_no_waiting_does_not_compress() -> None:
    """The source (or the transmitter's own loop) is what holds the stream back, not the
    window: compressing buys nothing."""
    model = Model(lambda now, level: 5000 * MB, others=0.2)
    policy = policy_for(model)
    model.run(policy, 3.0)
    assert {level for _, level in model.levels} == {None}


def test_a_link_that_slows_mid_stream_starts_compression() -> None:
    model = Model(lambda now, level: 5000 * MB if now < 2.0 else 25 * MB)
    policy = policy_for(model)
    model.run(policy, 5.0)
    assert model.level_at(1.9) is None
    on = next(t for t, level in model.levels if level is not None)
    assert 2.0 < on < 2.6, f"compression came on at {on:.2f} s; the link slowed at 2.0 s"
    assert model.rate(3.5, 5.0) > 2 * 25 * MB


def test_compression_that_makes_the_stream_slower_is_undone_and_retried_ever_later() -> None:
    """The window waits and the host has idle cores, yet the stream is slower compressed:
    the receiver (another host) is what holds it back, and decompressing costs it more.
    The policy turns compression off after one judgement, and tries again after 2, 4, 8 s."""

    def receiver_bound(now: float, level: int | None) -> float:
        # wire bytes/s such that raw throughput is 300 MB/s without, 200 MB/s with
        return 300 * MB if level is None else 200 * MB * RATIO[level]

    model = Model(receiver_bound)
    policy = policy_for(model)
    model.run(policy, 20.0)
    ons = [t for (t, level), (_, before) in zip(model.levels[1:], model.levels, strict=False)
           if level is not None and before is None]
    assert len(ons) >= 3, f"tried {len(ons)} times"
    gaps = [b - a for a, b in itertools.pairwise(ons)]
    assert gaps[0] >= BAR_FIRST and gaps[1] >= 2 * BAR_FIRST and gaps[1] > gaps[0]
    # Most of the time, it is off.
    on_share = sum(1 for _, level in model.levels if level is not None) / len(model.levels)
    assert on_share < 0.25, f"compressed {100 * on_share:.0f}% of the chunks"
    assert model.rate(10.0, 20.0) > 0.9 * 300 * MB


def test_cpu_bound_compression_steps_down() -> None:
    """One worker, slow level: the reader waits for the compressor, so the level comes down
    (and stays where the link is the limit again)."""
    model = Model(two_links, workers=1)
    policy = AdaptivePolicy(WINDOW, idle=model.idle, start=6)
    model.run(policy, 6.0)
    on = [level for _, level in model.levels if level is not None]
    assert on[0] == 6
    assert model.level_at(6.0) is not None and model.level_at(6.0) < 6  # type: ignore[operator]


def test_incompressible_data_stops_compression_and_is_probed_ever_less_often() -> None:
    model = Model(two_links, ratio=lambda now, level: 1.0)
    policy = policy_for(model)
    model.run(policy, 12.0)
    tried = [i for i, (_, level) in enumerate(model.levels) if level is not None]
    assert tried, "it never tried: the link was the limit"
    first = tried[0]
    # MISSES chunks in a row at the start level, then probes: one chunk each, the gaps
    # doubling from PROBE_FIRST to PROBE_MAX.
    assert tried[:MISSES] == list(range(first, first + MISSES))
    probes = tried[MISSES:]
    gaps = [b - a - 1 for a, b in zip([tried[MISSES - 1], *probes], probes, strict=False)]
    expected = [min(PROBE_FIRST << i, PROBE_MAX) for i in range(len(gaps))]
    assert gaps == expected
    assert len(tried) / len(model.levels) < 0.1
    assert policy.incompressible and "does not compress" in policy.describe()


def test_data_that_compresses_again_brings_compression_back() -> None:
    model = Model(two_links,
                  ratio=lambda now, level: 1.0 if now < 3.0 else RATIO[level or 1])
    policy = policy_for(model)
    model.run(policy, 8.0)
    assert policy.incompressible is False
    assert model.level_at(8.0) is not None
    back = next(t for t, level in model.levels if t > 3.0 and level is not None
                and model.ratio(t, level) < 1)
    # the next probe finds it: at most PROBE_MAX chunks of the raw link rate later
    assert back - 3.0 < PROBE_MAX * CHUNK / (50 * MB) + 0.1


def test_a_fixed_level_is_kept_whatever_happens() -> None:
    fixed = FixedPolicy(-3)
    fixed.waited(1.0, window=1.0)
    fixed.done(-3, CHUNK, CHUNK, 1.0)
    assert [fixed.level(t) for t in (0.0, 5.0, 100.0)] == [-3, -3, -3]
    assert fixed.describe() == "zstd:-3"


def test_the_policy_explains_its_decisions() -> None:
    model = Model(two_links)
    policy = policy_for(model)
    model.run(policy, 2.0)
    assert policy.decided == len(policy.decisions) >= 1
    assert "network-bound" in policy.decisions[0] and "idle cores" in policy.decisions[0]


@pytest.mark.parametrize("start", LADDER)
def test_every_start_level_is_on_the_ladder(start: int) -> None:
    policy = AdaptivePolicy(WINDOW, start=start)
    assert policy.level(0.0) is None  # off until the stream says otherwise


def test_cpu_meter_reads_this_host_and_none_without_proc(tmp_path: object) -> None:
    meter = CpuMeter()
    sum(range(200_000))  # let a few ticks pass; the reading may still be None if none did
    idle = meter.idle()
    assert idle is None or 0.0 <= idle <= 1024
    assert CpuMeter("/nonexistent/stat").idle() is None
