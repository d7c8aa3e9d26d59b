"""The viamillipede wire protocol: construct declarations, typed events and a sans-IO codec.

Nothing in this package does I/O or imports an async library; see ``docs/protocol.md``.
"""

from .codec import (
    ABSOLUTE_MAX_PAYLOAD,
    NEED_DATA,
    Decoder,
    encode,
    encode_ack,
    pack_data_header,
)
from .errors import ProtocolError
from .events import (
    Ack,
    Bye,
    ByeOk,
    ConnectionClosed,
    Data,
    DataHeader,
    Error,
    Event,
    Fin,
    Hello,
    Welcome,
)
from .frames import (
    DATA_HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorCode,
    Feature,
    WelcomeStatus,
)

__all__ = [
    "ABSOLUTE_MAX_PAYLOAD",
    "DATA_HEADER_SIZE",
    "MAGIC",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Ack",
    "Bye",
    "ByeOk",
    "ConnectionClosed",
    "Data",
    "DataHeader",
    "Decoder",
    "Error",
    "ErrorCode",
    "Event",
    "Feature",
    "Fin",
    "Hello",
    "ProtocolError",
    "Welcome",
    "WelcomeStatus",
    "encode",
    "encode_ack",
    "pack_data_header",
]
