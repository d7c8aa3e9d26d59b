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
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, TamperedFrame
from .events import (
    Ack,
    Auth,
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
    AuthKind,
    ErrorCode,
    Feature,
    Mode,
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
    "Auth",
    "AuthKind",
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
    "Mode",
    "ProtocolError",
    "RemoteProtocolError",
    "TamperedFrame",
    "Welcome",
    "WelcomeStatus",
    "encode",
    "encode_ack",
    "pack_data_header",
]
