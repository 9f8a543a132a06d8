from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetTlsKeyArgs(_message.Message):
    __slots__ = ("subject", "alt_names", "usage_ra_tls", "usage_server_auth", "usage_client_auth", "not_before", "not_after", "with_app_info")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ALT_NAMES_FIELD_NUMBER: _ClassVar[int]
    USAGE_RA_TLS_FIELD_NUMBER: _ClassVar[int]
    USAGE_SERVER_AUTH_FIELD_NUMBER: _ClassVar[int]
    USAGE_CLIENT_AUTH_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    WITH_APP_INFO_FIELD_NUMBER: _ClassVar[int]
    subject: str
    alt_names: _containers.RepeatedScalarFieldContainer[str]
    usage_ra_tls: bool
    usage_server_auth: bool
    usage_client_auth: bool
    not_before: int
    not_after: int
    with_app_info: bool
    def __init__(self, subject: _Optional[str] = ..., alt_names: _Optional[_Iterable[str]] = ..., usage_ra_tls: _Optional[bool] = ..., usage_server_auth: _Optional[bool] = ..., usage_client_auth: _Optional[bool] = ..., not_before: _Optional[int] = ..., not_after: _Optional[int] = ..., with_app_info: _Optional[bool] = ...) -> None: ...

class DeriveKeyArgs(_message.Message):
    __slots__ = ("path", "subject", "alt_names", "usage_ra_tls", "usage_server_auth", "usage_client_auth", "random_seed")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ALT_NAMES_FIELD_NUMBER: _ClassVar[int]
    USAGE_RA_TLS_FIELD_NUMBER: _ClassVar[int]
    USAGE_SERVER_AUTH_FIELD_NUMBER: _ClassVar[int]
    USAGE_CLIENT_AUTH_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    path: str
    subject: str
    alt_names: _containers.RepeatedScalarFieldContainer[str]
    usage_ra_tls: bool
    usage_server_auth: bool
    usage_client_auth: bool
    random_seed: bool
    def __init__(self, path: _Optional[str] = ..., subject: _Optional[str] = ..., alt_names: _Optional[_Iterable[str]] = ..., usage_ra_tls: _Optional[bool] = ..., usage_server_auth: _Optional[bool] = ..., usage_client_auth: _Optional[bool] = ..., random_seed: _Optional[bool] = ...) -> None: ...

class GetTlsKeyResponse(_message.Message):
    __slots__ = ("key", "certificate_chain")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    key: str
    certificate_chain: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., certificate_chain: _Optional[_Iterable[str]] = ...) -> None: ...

class GetKeyArgs(_message.Message):
    __slots__ = ("path", "purpose", "algorithm")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    path: str
    purpose: str
    algorithm: str
    def __init__(self, path: _Optional[str] = ..., purpose: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class DeriveK256KeyResponse(_message.Message):
    __slots__ = ("k256_key", "k256_signature_chain")
    K256_KEY_FIELD_NUMBER: _ClassVar[int]
    K256_SIGNATURE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    k256_key: bytes
    k256_signature_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, k256_key: _Optional[bytes] = ..., k256_signature_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key", "signature_chain")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    signature_chain: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key: _Optional[bytes] = ..., signature_chain: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TdxQuoteArgs(_message.Message):
    __slots__ = ("report_data", "hash_algorithm", "prefix")
    REPORT_DATA_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    report_data: bytes
    hash_algorithm: str
    prefix: str
    def __init__(self, report_data: _Optional[bytes] = ..., hash_algorithm: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class RawQuoteArgs(_message.Message):
    __slots__ = ("report_data",)
    REPORT_DATA_FIELD_NUMBER: _ClassVar[int]
    report_data: bytes
    def __init__(self, report_data: _Optional[bytes] = ...) -> None: ...

class TdxQuoteResponse(_message.Message):
    __slots__ = ("quote", "event_log", "hash_algorithm", "prefix")
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    HASH_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    quote: bytes
    event_log: str
    hash_algorithm: str
    prefix: str
    def __init__(self, quote: _Optional[bytes] = ..., event_log: _Optional[str] = ..., hash_algorithm: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("attestation",)
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    attestation: bytes
    def __init__(self, attestation: _Optional[bytes] = ...) -> None: ...

class GetQuoteResponse(_message.Message):
    __slots__ = ("quote", "event_log", "report_data", "vm_config", "attestation")
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    EVENT_LOG_FIELD_NUMBER: _ClassVar[int]
    REPORT_DATA_FIELD_NUMBER: _ClassVar[int]
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    quote: bytes
    event_log: str
    report_data: bytes
    vm_config: str
    attestation: bytes
    def __init__(self, quote: _Optional[bytes] = ..., event_log: _Optional[str] = ..., report_data: _Optional[bytes] = ..., vm_config: _Optional[str] = ..., attestation: _Optional[bytes] = ...) -> None: ...

class EmitEventArgs(_message.Message):
    __slots__ = ("event", "payload")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    event: str
    payload: bytes
    def __init__(self, event: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class AppInfo(_message.Message):
    __slots__ = ("app_id", "instance_id", "app_cert", "tcb_info", "app_name", "device_id", "mr_aggregated", "os_image_hash", "key_provider_info", "compose_hash", "vm_config", "cloud_vendor", "cloud_product")
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_CERT_FIELD_NUMBER: _ClassVar[int]
    TCB_INFO_FIELD_NUMBER: _ClassVar[int]
    APP_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MR_AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    OS_IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_PROVIDER_INFO_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_HASH_FIELD_NUMBER: _ClassVar[int]
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CLOUD_VENDOR_FIELD_NUMBER: _ClassVar[int]
    CLOUD_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    app_id: bytes
    instance_id: bytes
    app_cert: str
    tcb_info: str
    app_name: str
    device_id: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: str
    compose_hash: bytes
    vm_config: str
    cloud_vendor: str
    cloud_product: str
    def __init__(self, app_id: _Optional[bytes] = ..., instance_id: _Optional[bytes] = ..., app_cert: _Optional[str] = ..., tcb_info: _Optional[str] = ..., app_name: _Optional[str] = ..., device_id: _Optional[bytes] = ..., mr_aggregated: _Optional[bytes] = ..., os_image_hash: _Optional[bytes] = ..., key_provider_info: _Optional[str] = ..., compose_hash: _Optional[bytes] = ..., vm_config: _Optional[str] = ..., cloud_vendor: _Optional[str] = ..., cloud_product: _Optional[str] = ...) -> None: ...

class GpuInfoResponse(_message.Message):
    __slots__ = ("attestation",)
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    attestation: str
    def __init__(self, attestation: _Optional[str] = ...) -> None: ...

class WorkerVersion(_message.Message):
    __slots__ = ("version", "rev")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REV_FIELD_NUMBER: _ClassVar[int]
    version: str
    rev: str
    def __init__(self, version: _Optional[str] = ..., rev: _Optional[str] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("algorithm", "data")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    data: bytes
    def __init__(self, algorithm: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("signature", "signature_chain", "public_key")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    signature_chain: _containers.RepeatedScalarFieldContainer[bytes]
    public_key: bytes
    def __init__(self, signature: _Optional[bytes] = ..., signature_chain: _Optional[_Iterable[bytes]] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("algorithm", "data", "signature", "public_key")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    data: bytes
    signature: bytes
    public_key: bytes
    def __init__(self, algorithm: _Optional[str] = ..., data: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("valid",)
    VALID_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    def __init__(self, valid: _Optional[bool] = ...) -> None: ...

class GetAttestationForAppKeyRequest(_message.Message):
    __slots__ = ("algorithm",)
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    def __init__(self, algorithm: _Optional[str] = ...) -> None: ...
