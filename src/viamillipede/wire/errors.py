"""The codec's only exception: anything a peer can send us either decodes or raises this."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame in the current state."""
