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
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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
    ERROR_MEANING,
    MAGIC,
    PROTOCOL_VERSION,
    WELCOME_MEANING,
    ErrorCode,
    Feature,
    WelcomeStatus,
)

__all__ = [
    "ABSOLUTE_MAX_PAYLOAD",
    "DATA_HEADER_SIZE",
    "ERROR_MEANING",
    "MAGIC",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "WELCOME_MEANING",
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
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Welcome",
    "WelcomeStatus",
    "encode",
    "encode_ack",
    "pack_data_header",
]
