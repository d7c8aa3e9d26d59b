"""Resilience of the real CLI across two shaped links between two network namespaces.

Host A runs ``viamillipede tx 198.18.1.2 PORT tx 198.18.2.2 PORT threads 4`` and host B runs
``viamillipede rx PORT timeout 30``; link 1 is the preferred target, link 2 the spare (see
tests/netns_lab.py).  Faults are injected mid-transfer by polling, with a deadline, until the
receiver's output or an interface counter has passed a mark; nothing waits on a fixed sleep.

Needs root and iproute2 (``ip``, ``tc``); skipped otherwise.  Knobs for hand-run acceptance:

- ``VMP_NETNS_REPEAT=10`` runs the link-down, black-hole and dead-first-target scenarios ten
  times each (default 1);
- ``VMP_NETNS_RATE=100mbit`` shapes every link direction to another rate (default 200mbit).

Timings (fault to completion, rejoin delay, link shares) are printed (visible with ``-s``) and
recorded as test properties (``--junitxml``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netns_lab import Lab, MiB, lab_or_skip, pattern_file, signal_name, tail, wait_until

pytestmark = pytest.mark.slow

REPEAT = int(os.environ.get("VMP_NETNS_REPEAT", "1"))
RATE = os.environ.get("VMP_NETNS_RATE", "200mbit")
repeat = pytest.mark.parametrize("attempt", range(REPEAT), ids=[f"run{i}" for i in range(REPEAT)])

SIZE = 48 * MiB  # a1..b2 at 200 mbit: about 2 s over one link
CHUNK = 2 * MiB  # the CLI's default chunk size
WINDOW = 8 * CHUNK  # default window for 4 threads: chunks B may hold unwritten
LIMIT = 60.0  # a fault must be routed around well within a minute


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
    assert t.elapsed() < LIMIT
    a1_after, a2_after = lab.tx_bytes_a()
    note(record, f"{name}_link1_after_fault_MiB", (a1_after - a1_before) / MiB)
    note(record, f"{name}_link2_after_fault_MiB", (a2_after - a2_before) / MiB)
    assert a1_before > CHUNK, f"link 1 carried only {a1_before} bytes before the fault"
    # Whatever B had not received by the fault can only have come over link 2.
    assert a2_after - a2_before >= SIZE - at_fault - WINDOW, (
        f"link 2 carried only {a2_after - a2_before} bytes after the fault\n{t.logs()}")


# -- (a) link down ------------------------------------------------------------------------------


@repeat
def test_link_down_mid_transfer_completes_over_link_2(
        lab: Lab, tmp_path: Path, attempt: int, record_property: Record) -> None:
    mid_transfer_fault(lab, tmp_path, attempt, record_property,
                       lambda: lab.link_down(1), "link_down")


# -- (b) silent black hole ----------------------------------------------------------------------


@repeat
def test_blackhole_mid_transfer_reroutes_within_a_minute(
        lab: Lab, tmp_path: Path, attempt: int, record_property: Record) -> None:
    mid_transfer_fault(lab, tmp_path, attempt, record_property,
                       lambda: lab.blackhole(1), "blackhole")


# -- (c) dead first target at start-up, then it comes back ------------------------------------


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


# -- (d) a source slower than one link stays on the first link ---------------------------------


def test_slow_source_stays_on_first_link(lab: Lab, tmp_path: Path,
                                         record_property: Record) -> None:
    rate, seconds = 3_000_000, 8  # 24 Mbit/s against 200 mbit links
    a1_start, a2_start = lab.tx_bytes_a()
    t = lab.start_transfer(tmp_path, source=(rate, rate * seconds), seed=7)
    t.wait(deadline=t.started + seconds + LIMIT)
    t.assert_complete()
    a1_end, a2_end = lab.tx_bytes_a()
    a1, a2 = a1_end - a1_start, a2_end - a2_start
    share = a2 / max(1, a1 + a2)
    note(record_property, "slow_total_s", t.elapsed())
    note(record_property, "link1_MiB", a1 / MiB)
    note(record_property, "link2_MiB", a2 / MiB)
    note(record_property, "link2_share", share)
    assert share < 0.10, f"link 2 carried {share:.0%} ({a2} of {a1 + a2} bytes)\n{t.logs()}"


# -- (e) the receiver dies: the transmitter says so once and exits 4 ---------------------------


def test_receiver_killed_transmitter_exits_4(lab: Lab, tmp_path: Path,
                                             record_property: Record) -> None:
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
    assert took < timeout + 2.0, f"exited {took:.1f} s after the receiver died"
    assert "Traceback" not in err, err
    errors = [line for line in lines if re.match(r"viamillipede tx: error\b", line)]
    assert len(errors) == 1, f"want one error line, got:\n{err}"
    assert lines[-1] == errors[0], f"the error is not the last word:\n{err}"
    assert re.search(r"progress|receiver|time", errors[0], re.I), errors[0]
