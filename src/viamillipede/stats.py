"""Counters a session keeps, and the frozen snapshot it hands out."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .squeeze import CompressionStats


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What a finished (or running) session did.  Frozen: a snapshot, safe to keep."""

    role: str
    nbytes: int
    chunks: int
    elapsed: float
    connections: int
    reconnects: int
    retransmits: int
    duplicates: int
    rejected: int

    @property
    def rate(self) -> float:
        """Bytes per second over the whole session."""
        return self.nbytes / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        mb = self.nbytes / 1e6
        return (
            f"{self.nbytes} bytes ({mb:.1f} MB) in {self.chunks} chunks, "
            f"{self.elapsed:.2f} s, {self.rate / 1e6:.1f} MB/s; connections {self.connections}, "
            f"reconnects {self.reconnects}, retransmits {self.retransmits}, "
            f"duplicates {self.duplicates}, rejected {self.rejected}"
        )


@dataclass(slots=True)
class Counters:
    """The live, mutable side; sessions update it, :meth:`snapshot` freezes it."""

    role: str
    nbytes: int = 0
    chunks: int = 0
    connections: int = 0
    reconnects: int = 0
    retransmits: int = 0
    duplicates: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> TransferStats:
        return TransferStats(
            role=self.role,
            nbytes=self.nbytes,
            chunks=self.chunks,
            elapsed=time.monotonic() - self.started,
            connections=self.connections,
            reconnects=self.reconnects,
            retransmits=self.retransmits,
            duplicates=self.duplicates,
            rejected=self.rejected,
        )


@dataclass(slots=True)
class LinkCounters:
    """Live per-connection counters, kept by the sessions."""

    index: int
    peer: str
    state: str = "connecting"
    chunks: int = 0
    nbytes: int = 0
    retransmits: int = 0
    reconnects: int = 0
    next_try: float | None = None  # session clock time of the next connection attempt


@dataclass(frozen=True, slots=True)
class LinkStats:
    """One connection: where it goes, what it is doing, what it carried."""

    index: int
    peer: str
    state: str
    inflight: int
    chunks: int
    nbytes: int
    retransmits: int
    reconnects: int
    next_try_in: float | None


@dataclass(frozen=True, slots=True)
class TargetStats:
    """One target (link) of a transmitter, in preference order."""

    target: str
    nbytes: int
    share: float
    up: bool
    connections_up: int
    next_probe_in: float | None


@dataclass(frozen=True, slots=True)
class LimitStats:
    """The session's rate limit (``limit RATE``): the rate, and how long it held the stream
    back in all."""

    rate: float
    """Bytes per second."""
    waited: float
    """Seconds the stream waited for the limit, summed over every read or write it delayed."""


@dataclass(frozen=True, slots=True)
class Report:
    """A full snapshot: what SIGUSR1 prints and ``--stats-json`` writes."""

    totals: TransferStats
    window: int
    window_used: int
    reorder_depth: int
    connections: tuple[LinkStats, ...]
    targets: tuple[TargetStats, ...]
    limit: LimitStats | None = None
    compression: CompressionStats | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def render(self, rate_now: float | None = None) -> str:
        t = self.totals
        now = f", now {rate_now / 1e6:.1f} MB/s" if rate_now is not None else ""
        lines = [
            f"{t.role}: {t.nbytes} bytes in {t.chunks} chunks, {t.elapsed:.1f} s, "
            f"average {t.rate / 1e6:.1f} MB/s{now}",
            f"  window {self.window_used}/{self.window} chunks"
            + (f", reorder buffer {self.reorder_depth}" if t.role == "rx" else "")
            + f"; retransmits {t.retransmits}, reconnects {t.reconnects}, "
            f"duplicates {t.duplicates}, rejected {t.rejected}",
        ]
        if self.limit is not None:
            lines.append(f"  limit {self.limit.rate / 1e6:.3g} MB/s, held back "
                         f"{self.limit.waited:.1f} s")
        if self.compression is not None:
            lines.append("  " + self.compression.summary())
        for g in self.targets:
            probe = f", next probe in {g.next_probe_in:.1f} s" if g.next_probe_in else ""
            lines.append(
                f"  target {g.target}: {'up' if g.up else 'DOWN'} "
                f"({g.connections_up} connections), {g.nbytes} bytes, "
                f"share {100 * g.share:.0f}% of all sent{probe}"
            )
        for c in self.connections:
            retry = f", retry in {c.next_try_in:.1f} s" if c.next_try_in else ""
            lines.append(
                f"  conn {c.index:2d} {c.peer}: {c.state}{retry}, in flight {c.inflight}, "
                f"{c.chunks} chunks / {c.nbytes} bytes, retransmits {c.retransmits}, "
                f"reconnects {c.reconnects}"
            )
        return "\n".join(lines)


def link_stats(link: LinkCounters, inflight: int, now: float) -> LinkStats:
    return LinkStats(
        index=link.index,
        peer=link.peer,
        state=link.state,
        inflight=inflight,
        chunks=link.chunks,
        nbytes=link.nbytes,
        retransmits=link.retransmits,
        reconnects=link.reconnects,
        next_try_in=max(link.next_try - now, 0.0) if link.next_try is not None else None,
    )


def target_stats(links: list[LinkStats]) -> tuple[TargetStats, ...]:
    """Group connections by target, keeping the order in which targets first appear."""
    order: dict[str, list[LinkStats]] = {}
    for link in links:
        order.setdefault(link.peer, []).append(link)
    total = sum(link.nbytes for link in links) or 1
    result = []
    for target, group in order.items():
        up = sum(1 for link in group if link.state == "up")
        waits = [link.next_try_in for link in group if link.next_try_in is not None]
        result.append(
            TargetStats(
                target=target,
                nbytes=sum(link.nbytes for link in group),
                share=sum(link.nbytes for link in group) / total,
                up=up > 0,
                connections_up=up,
                next_probe_in=min(waits) if waits and not up else None,
            )
        )
    return tuple(result)
