"""viamillipede: carry a Unix pipe across the network over many parallel TCP connections.

The stream arrives complete and in order, and survives connections and links that break: every
chunk stays with the transmitter until the receiver acknowledges it.  See README.md.
"""

from .api import BufferSink, BytesSource, StreamSink, StreamSource, receive, send
from .errors import ExitCode, ViamillipedeError
from .receiver import Receiver
from .stats import TransferStats
from .transmitter import Transmitter

__version__ = "0.1.0"

__all__ = [
    "BufferSink",
    "BytesSource",
    "ExitCode",
    "Receiver",
    "StreamSink",
    "StreamSource",
    "TransferStats",
    "Transmitter",
    "ViamillipedeError",
    "__version__",
    "receive",
    "send",
]
