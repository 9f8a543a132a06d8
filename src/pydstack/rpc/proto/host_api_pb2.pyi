from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HostInfo(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Notification(_message.Message):
    __slots__ = ("event", "payload")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    event: str
    payload: str
    def __init__(self, event: _Optional[str] = ..., payload: _Optional[str] = ...) -> None: ...

class GetSealingKeyRequest(_message.Message):
    __slots__ = ("quote",)
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    quote: bytes
    def __init__(self, quote: _Optional[bytes] = ...) -> None: ...

class GetSealingKeyResponse(_message.Message):
    __slots__ = ("encrypted_key", "provider_quote")
    ENCRYPTED_KEY_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_QUOTE_FIELD_NUMBER: _ClassVar[int]
    encrypted_key: bytes
    provider_quote: bytes
    def __init__(self, encrypted_key: _Optional[bytes] = ..., provider_quote: _Optional[bytes] = ...) -> None: ...

class TdExtendRequest(_message.Message):
    __slots__ = ("rtmr", "event", "payload", "version")
    RTMR_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    rtmr: int
    event: str
    payload: bytes
    version: int
    def __init__(self, rtmr: _Optional[int] = ..., event: _Optional[str] = ..., payload: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class TdQuoteRequest(_message.Message):
    __slots__ = ("report_data",)
    REPORT_DATA_FIELD_NUMBER: _ClassVar[int]
    report_data: bytes
    def __init__(self, report_data: _Optional[bytes] = ...) -> None: ...

class TdQuoteResponse(_message.Message):
    __slots__ = ("quote", "event_log")
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    quote: bytes
    event_log: str
    def __init__(self, quote: _Optional[bytes] = ..., event_log: _Optional[str] = ...) -> None: ...

class TdEventLog(_message.Message):
    __slots__ = ("event_log",)
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    event_log: str
    def __init__(self, event_log: _Optional[str] = ...) -> None: ...
