"""The codec's exceptions, named as h11 names them.

A *remote* protocol error is the peer's fault (garbage, a frame that is wrong for the moment): the
answer is to drop that connection, or fail the session where it must.  A *local* one is ours: we
were asked to send something the protocol does not allow, which is a bug, never the peer's doing.
Anything a peer can send either decodes or raises :class:`RemoteProtocolError`.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of both; catch this where the difference does not matter."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame in the current state."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids in the current state."""


class TamperedFrame(RemoteProtocolError):
    """A control frame's tag did not verify: it was changed, forged, replayed or reordered
    on its way (or the peer is broken)."""
