"""Counters a session keeps, and the frozen snapshot it hands out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
