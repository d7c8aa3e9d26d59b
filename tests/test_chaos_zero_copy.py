"""Chaos over the paths production uses: real loopback sockets, the input sent from a file by
sendfile, the output spliced into a file, checksums off, so nothing but the session's ordering,
acknowledgements and re-sends keeps the output right.  Hypothesis picks the seeds, and with
them where the resets cut a frame and where short operations split one.

Stalls are left out: on the real clock each costs a stall timeout (2 s at least), which the
mock-clock chaos tests cover; corruption is left out because without checksums nothing could
notice it, by design.
"""

from __future__ import annotations

import os
import random
import tempfile

import anyio
import trio
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from viamillipede.api import receive, tcp_transmitter
from viamillipede.chaos import ChaosScheduler, FaultKind
from viamillipede.streams import SendFile, SpliceTo
from viamillipede.transport import FdSink, FdSource

SIZE = 3 * 1024 * 1024 + 12345
CHUNK = 128 * 1024


async def _session(seed: int, threads: int, src: str, dst: str) -> dict[FaultKind, int]:
    sched = ChaosScheduler(seed, rate=0.08,
                           kinds={FaultKind.RESET, FaultKind.SHORT, FaultKind.DELAY})
    seen: dict[str, bool] = {"send_file": False, "splice_to": False}
    tx_wrap = sched.transmitter_wrapper()
    rx_wrap = sched.receiver_wrapper()

    def client(index: int, generation: int, stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
        wrapped = tx_wrap(index, generation, stream)
        seen["send_file"] |= isinstance(wrapped, SendFile)
        return wrapped

    def server(accepted: int, stream: anyio.abc.ByteStream) -> anyio.abc.ByteStream:
        wrapped = rx_wrap(accepted, stream)
        seen["splice_to"] |= isinstance(wrapped, SpliceTo)
        return wrapped

    in_fd = os.open(src, os.O_RDONLY)
    out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        sink = FdSink(out_fd)
        assert sink.can_splice
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                port = await tg.start(lambda task_status: receive(
                    sink, 0, host="127.0.0.1", wrap=server, idle_timeout=30,
                    task_status=task_status))
                tx = tcp_transmitter(FdSource(in_fd), [("127.0.0.1", port)], threads=threads,
                                     chunk_size=CHUNK, wrap=client, idle_timeout=30)
                await tx.run()
        await sink.aclose()
    finally:
        os.close(in_fd)
        os.close(out_fd)
    assert seen == {"send_file": True, "splice_to": True}, "chaos hid the zero-copy paths"
    return sched.log.summary()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), threads=st.sampled_from([1, 3]))
def test_zero_copy_sessions_under_chaos_deliver_identical_bytes(seed: int, threads: int) -> None:
    data = random.Random(seed).randbytes(SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        with open(src, "wb") as f:
            f.write(data)
        faults = trio.run(_session, seed, threads, src, dst)
        note(f"faults: {faults}")
        with open(dst, "rb") as f:
            assert f.read() == data


def test_zero_copy_chaos_does_cut_frames() -> None:
    """The seeds above are not all quiet: over a handful of them, resets and short operations
    land on the zero-copy sends and splices."""
    total: dict[FaultKind, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        data = random.Random(7).randbytes(SIZE)
        with open(src, "wb") as f:
            f.write(data)
        for seed in range(3):
            for kind, n in trio.run(_session, seed, 3, src, dst).items():
                total[kind] = total.get(kind, 0) + n
            with open(dst, "rb") as f:
                assert f.read() == data
    assert total.get(FaultKind.RESET, 0) > 0 and total.get(FaultKind.SHORT, 0) > 0, total
