"""The test harness itself: the lab switch, and the sources and sinks the other tests lean on."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest

from harness import (
    REQUIRE_LAB,
    OpenPipeSource,
    PacedSource,
    WatchedSink,
    run_mock,
)

HERE = Path(__file__).resolve().parent

SAMPLE = '''
from harness import require_or_skip


def test_needs_a_frobnicator():
    require_or_skip("the frobnicator is missing: apt-get install frob")


def test_needs_nothing():
    require_or_skip(None)
'''


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """``{test name: (outcome, message)}`` from a junit XML report."""
    got: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag, element.get("message", "")
        got[case.get("name", "?")] = (outcome, message)
    return got


# -- the lab switch ------------------------------------------------------------------------------


@pytest.mark.parametrize("required", [False, True], ids=["default", "required"])
def test_a_missing_requirement_skips_unless_the_lab_is_required(
    tmp_path: Path, required: bool
) -> None:
    """A pytest run of a two-test file: with ``VIAMILLIPEDE_REQUIRE_LAB=1`` the test whose
    requirement is missing fails, with the same reason, instead of skipping."""
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_LAB}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    if required:
        env[REQUIRE_LAB] = "1"
    junit = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
         "test_sample.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    got = outcomes(junit)
    assert got["test_needs_nothing"] == ("passed", ""), proc.stdout
    outcome, message = got["test_needs_a_frobnicator"]
    assert "the frobnicator is missing: apt-get install frob" in message, proc.stdout
    if required:
        assert outcome == "failure", proc.stdout
        assert REQUIRE_LAB in message
        assert proc.returncode == 1, proc.stdout
    else:
        assert outcome == "skipped", proc.stdout
        assert proc.returncode == 0, proc.stdout


# -- sources and sinks ---------------------------------------------------------------------------


def test_a_paced_source_yields_its_bytes_at_its_rate() -> None:
    async def main() -> tuple[bytes, list[tuple[float, int]]]:
        source = PacedSource(1000.0, 2500, block=500)
        got, reads = bytearray(), []
        buf = bytearray(4000)
        while n := await source.readinto(memoryview(buf)):
            reads.append((anyio.current_time(), n))
            got += buf[:n]
        assert bytes(got) == source.data
        return bytes(got), reads

    got, reads = run_mock(main)
    assert len(got) == 2500
    # A block of 500 bytes each half second of mock time, the first at once.
    assert [n for _, n in reads] == [500] * 5
    assert [t - reads[0][0] for t, _ in reads] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_an_open_pipe_waits_for_more_until_closed_and_a_watched_sink_wakes_its_waiter() -> None:
    async def main() -> None:
        source = OpenPipeSource(b"abc")
        sink = WatchedSink()
        buf = bytearray(10)
        assert await source.readinto(memoryview(buf)) == 3
        with anyio.move_on_after(60) as scope:
            await source.readinto(memoryview(buf))
        assert scope.cancelled_caught, "an open pipe with nothing fed must wait"
        source.feed(b"de")
        assert await source.readinto(memoryview(buf)) == 2 and buf[:2] == b"de"
        source.close()
        assert await source.readinto(memoryview(buf)) == 0
        assert source.fed == b"abcde"

        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.wait_for, 4)
            await sink.write(memoryview(b"ab"))
            await sink.write(memoryview(b"cd"))
        assert sink.data == b"abcd"

    run_mock(main)
