"""``tx --ssh HOST --via ADDR`` over two shaped links, with a real sshd inside the receiver's
network namespace: both links carry data, one is cut mid-stream, the stream completes.

The two-host lab of tests/netns_lab.py (host A transmits, host B receives; link 1 is
198.18.1.0/24, link 2 is 198.18.2.0/24) with the throwaway sshd of tests/sshd_lab.py started
inside B, listening on B's link-1 address only.  Host A runs, with no mocks::

    viamillipede tx --ssh root@198.18.1.2 --via 198.18.2.2 --ssh-command 'ssh -p P -i K ...' \\
        --remote-viamillipede VENV/bin/viamillipede --port 8834 threads 4 -- 'cat > OUT'

so ssh logs in over link 1, starts ``viamillipede ssh-rx`` in B, and the data goes over parallel
TCP connections to 198.18.1.2 first and 198.18.2.2 second, as ``tx 198.18.1.2 8834 tx
198.18.2.2 8834`` would.  Once both links have carried data, one is cut:

- ``link2-down``: the --via link goes down (``ip link set a2 down``), as a lost carrier does;
  the ssh channel, on link 1, is untouched.
- ``link1-data-blackhole``: link 1 stays up for ssh, but every packet A sends to the data port
  over it is dropped by a tc filter (a black hole, no reset and no ICMP, that only the stall
  detector can notice).  This is the harder case: the preferred target, the ssh host's own
  address, dies mid-stream while the control channel on the same link must stay alive, and
  the rest has to come over the --via link.  Cutting all of link 1 would not test that: the
  ssh channel is the session's control (the remote command's exit status comes back on it,
  and the transmitter's final ``done`` goes out on it), so a dead ssh link ends ``tx --ssh``
  by design, whatever the data links do.

Checked: the output is the input byte for byte (sha256), the transmitter exits 0, both links
carried data before the cut (interface counters in A), the surviving link carried what had not
arrived by then and the cut one next to nothing after it, and afterwards no ``ssh-rx``
process remains and nothing but sshd listens in B.  Nothing waits on a fixed sleep: faults are
injected by polling the counters with a deadline.

Each case is bounded by LIMIT (60 s from its start), and the rest of the stream must arrive
within what the surviving link needs plus RECOVERY: the re-sent copies of the chunks stuck on
the cut link take the receiver's reserve at once instead of waiting for the cut link's sockets
to time out (TCP_USER_TIMEOUT, 30 s).  ``cut_to_completion_s`` (shown with -s) tells.

Needs root, iproute2 and openssh (client and server); skips without them, and fails instead
under VIAMILLIPEDE_REQUIRE_LAB=1 (as in CI).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import require_or_skip
from netns_lab import PORT, VM, Lab, MiB, file_size, lab_or_skip, pattern_file, tail
from procs import sha256_file, wait_until
from sshd_lab import Sshd, SshdLabError, sshd_lab
from test_netns import CHUNK, LIMIT, RATE_BYTES, RECOVERY, WINDOW, Record, note
from test_ssh import ssh_rx_processes

RATE = "200mbit"  # each link, each way: 25 MB/s
SIZE = 48 * MiB  # about 1 s over both links, 2 s over one
BOTH_LINKS_MARK = 2 * CHUNK  # what each link carries before the cut: the spill-over happened
CUT_LINK_SLACK = CHUNK  # the most the cut link may still send after the cut (ssh, stray ACKs)


@dataclass(frozen=True)
class Fault:
    """How one link is cut: ``cut`` is the link that dies, the other one must carry the rest."""

    name: str
    cut: int
    inject: Callable[[Lab], None]

    @property
    def survivor(self) -> int:
        return 3 - self.cut


def blackhole_data_port(lab: Lab, link: int, port: int = PORT) -> None:
    """Drop every TCP packet host A sends to ``port`` over ``link``, and nothing else (ssh on
    the same link keeps working).  Done with what the lab already uses: a second htb class
    whose leaf queue holds nothing (``pfifo limit 0`` drops every packet it is given) and a
    u32 filter steering the data port's packets into it (the ``drop`` action would need the
    act_gact module, which a container's kernel may lack)."""
    dev = f"a{link}"
    lab.run_in(lab.a, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:20",
               "htb", "rate", lab.rate, "quantum", "1514")
    lab.run_in(lab.a, "tc", "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:",
               "pfifo", "limit", "0")
    lab.run_in(lab.a, "tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
               "prio", "1", "u32", "match", "ip", "protocol", "6", "0xff",
               "match", "ip", "dport", str(port), "0xffff", "flowid", "1:20")


FAULTS = [
    Fault("link2-down", 2, lambda lab: lab.link_down(2)),
    Fault("link1-data-blackhole", 1, lambda lab: blackhole_data_port(lab, 1)),
]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with lab_or_skip(RATE) as fresh:
        yield fresh


@pytest.fixture
def sshd(lab: Lab) -> Iterator[Sshd]:
    """sshd inside B, on B's link-1 address only: ssh from A can only go over link 1.  (The
    lab has already required root, which the throwaway sshd needs to log in root.)"""
    try:
        with sshd_lab(host=lab.addr_b(1), prefix=["ip", "netns", "exec", lab.b]) as server:
            yield server
    except SshdLabError as exc:
        require_or_skip(f"no throwaway sshd in a network namespace: {exc}")


def listeners(lab: Lab, ns: str) -> set[int]:
    """The TCP ports something listens on in namespace ``ns`` (``ss``, run inside it)."""
    out = lab.run_in(ns, "ss", "-Hltn").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_tx_ssh_via_survives_a_link_cut_mid_stream(
        lab: Lab, sshd: Sshd, tmp_path: Path, fault: Fault, record_property: Record) -> None:
    """The issue's acceptance test for --via: the ssh host's address and the --via address are
    used together (both links carry data), and losing either data path mid-stream costs
    neither the stream nor the control channel (exit 0, identical output, nothing left)."""
    src, out = tmp_path / "in", tmp_path / "out"
    tx_out, tx_err = tmp_path / "tx.out", tmp_path / "tx.err"
    sha = pattern_file(src, SIZE, seed=fault.cut)
    argv = [VM, "tx", "--ssh", sshd.destination, "--via", lab.addr_b(2),
            "--ssh-command", shlex.join(sshd.ssh_command), "--remote-viamillipede", VM,
            "--port", str(PORT), "threads", "4", "verbose", "2",
            "--", f"cat > {shlex.quote(str(out))}"]
    assert sshd.host == lab.addr_b(1)

    def logs() -> str:
        return (f"--- tx stderr (exit {tx.poll()}) ---\n{tail(tx_err, 30)}\n"
                f"--- sshd log ---\n{sshd.log_tail()}")

    base = lab.tx_bytes_a()
    started = time.monotonic()
    with src.open("rb") as i, tx_out.open("wb") as o, tx_err.open("wb") as e:
        tx = lab.spawn(lab.a, argv, stdin=i, stdout=o, stderr=e)

    def carried() -> tuple[int, int]:
        a1, a2 = lab.tx_bytes_a()
        return a1 - base[0], a2 - base[1]

    # The cut comes once both links carry data: link 1 filled, link 2 took the spill-over.
    wait_until(lambda: min(carried()) >= BOTH_LINKS_MARK or tx.poll() is not None,
               f"{BOTH_LINKS_MARK // MiB} MiB over each link", timeout=30, poll=0.01)
    before = carried()
    at_fault = file_size(out)
    assert tx.poll() is None, f"finished before the cut could be made\n{logs()}"
    fault.inject(lab)
    fault_at = time.monotonic()
    note(record_property, "cut_after_s", fault_at - started)
    note(record_property, "received_at_cut_MiB", at_fault / MiB)
    note(record_property, "link1_before_cut_MiB", before[0] / MiB)
    note(record_property, "link2_before_cut_MiB", before[1] / MiB)

    try:
        code = tx.wait(timeout=max(0.0, started + LIMIT - time.monotonic()))
    except subprocess.TimeoutExpired:
        tx.kill()
        tx.wait(timeout=10)
        pytest.fail(f"tx --ssh still running {LIMIT:g} s after it started ({fault.name}); "
                    f"killed\n{logs()}")
    ended = time.monotonic()
    note(record_property, "cut_to_completion_s", ended - fault_at)
    note(record_property, "total_s", ended - started)

    assert code == 0, f"tx --ssh exited {code}\n{logs()}"
    bound = (SIZE - at_fault) / RATE_BYTES + RECOVERY
    assert ended - fault_at < bound, (
        f"{ended - fault_at:.1f} s from the cut to the end, more than {bound:.1f} s\n{logs()}")
    err = tx_err.read_text(errors="replace")
    assert "Traceback" not in err, err
    got = sha256_file(out)
    assert got == sha, f"output differs: {file_size(out)} of {SIZE} bytes\n{logs()}"

    assert min(before) >= BOTH_LINKS_MARK, f"before the cut, links carried {before}\n{logs()}"
    after = carried()
    moved = [after[k] - before[k] for k in (0, 1)]
    note(record_property, "link1_after_cut_MiB", moved[0] / MiB)
    note(record_property, "link2_after_cut_MiB", moved[1] / MiB)
    # Whatever B had not received at the cut could only come over the surviving link...
    assert moved[fault.survivor - 1] >= SIZE - at_fault - WINDOW, (
        f"link {fault.survivor} carried only {moved[fault.survivor - 1]} bytes after the cut "
        f"({SIZE - at_fault} were missing)\n{logs()}")
    # ...and the cut was real: the dead link sent next to nothing more.
    assert moved[fault.cut - 1] < CUT_LINK_SLACK, (
        f"link {fault.cut} still sent {moved[fault.cut - 1]} bytes after the cut\n{logs()}")

    # Nothing left behind: no remote end, and in B nothing but sshd listens.
    wait_until(lambda: not ssh_rx_processes(), "every remote end to end", 10)
    wait_until(lambda: listeners(lab, lab.b) == {sshd.port},
               f"nothing but sshd listening in B (listening: {listeners(lab, lab.b)})", 10)
    assert not listeners(lab, lab.a), f"something listens in A: {listeners(lab, lab.a)}"
