from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppId(_message.Message):
    __slots__ = ("app_id",)
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    app_id: bytes
    def __init__(self, app_id: _Optional[bytes] = ...) -> None: ...

class PublicKeyResponse(_message.Message):
    __slots__ = ("public_key", "signature", "timestamp", "signature_v1")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_V1_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    timestamp: int
    signature_v1: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., signature_v1: _Optional[bytes] = ...) -> None: ...

class GetAppKeyRequest(_message.Message):
    __slots__ = ("api_version", "vm_config")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    vm_config: str
    def __init__(self, api_version: _Optional[int] = ..., vm_config: _Optional[str] = ...) -> None: ...

class AppKeyResponse(_message.Message):
    __slots__ = ("ca_cert", "disk_crypt_key", "env_crypt_key", "k256_key", "k256_signature", "tproxy_app_id", "gateway_app_id", "os_image_hash")
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    DISK_CRYPT_KEY_FIELD_NUMBER: _ClassVar[int]
    ENV_CRYPT_KEY_FIELD_NUMBER: _ClassVar[int]
    K256_KEY_FIELD_NUMBER: _ClassVar[int]
    K256_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TPROXY_APP_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_APP_ID_FIELD_NUMBER: _ClassVar[int]
    OS_IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    ca_cert: str
    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes
    tproxy_app_id: str
    gateway_app_id: str
    os_image_hash: bytes
    def __init__(self, ca_cert: _Optional[str] = ..., disk_crypt_key: _Optional[bytes] = ..., env_crypt_key: _Optional[bytes] = ..., k256_key: _Optional[bytes] = ..., k256_signature: _Optional[bytes] = ..., tproxy_app_id: _Optional[str] = ..., gateway_app_id: _Optional[str] = ..., os_image_hash: _Optional[bytes] = ...) -> None: ...

class GetMetaResponse(_message.Message):
    __slots__ = ("ca_cert", "allow_any_upgrade", "k256_pubkey", "bootstrap_info", "is_dev", "gateway_app_id", "kms_contract_address", "chain_id", "app_auth_implementation")
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ANY_UPGRADE_FIELD_NUMBER: _ClassVar[int]
    K256_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_INFO_FIELD_NUMBER: _ClassVar[int]
    IS_DEV_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_APP_ID_FIELD_NUMBER: _ClassVar[int]
    KMS_CONTRACT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    APP_AUTH_IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    ca_cert: str
    allow_any_upgrade: bool
    k256_pubkey: bytes
    bootstrap_info: BootstrapResponse
    is_dev: bool
    gateway_app_id: str
    kms_contract_address: str
    chain_id: int
    app_auth_implementation: str
    def __init__(self, ca_cert: _Optional[str] = ..., allow_any_upgrade: _Optional[bool] = ..., k256_pubkey: _Optional[bytes] = ..., bootstrap_info: _Optional[_Union[BootstrapResponse, _Mapping]] = ..., is_dev: _Optional[bool] = ..., gateway_app_id: _Optional[str] = ..., kms_contract_address: _Optional[str] = ..., chain_id: _Optional[int] = ..., app_auth_implementation: _Optional[str] = ...) -> None: ...

class GetKmsKeyRequest(_message.Message):
    __slots__ = ("vm_config",)
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    vm_config: str
    def __init__(self, vm_config: _Optional[str] = ...) -> None: ...

class KmsKeys(_message.Message):
    __slots__ = ("ca_key", "k256_key")
    CA_KEY_FIELD_NUMBER: _ClassVar[int]
    K256_KEY_FIELD_NUMBER: _ClassVar[int]
    ca_key: str
    k256_key: bytes
    def __init__(self, ca_key: _Optional[str] = ..., k256_key: _Optional[bytes] = ...) -> None: ...

class KmsKeyResponse(_message.Message):
    __slots__ = ("temp_ca_key", "keys")
    TEMP_CA_KEY_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    temp_ca_key: str
    keys: _containers.RepeatedCompositeFieldContainer[KmsKeys]
    def __init__(self, temp_ca_key: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[KmsKeys, _Mapping]]] = ...) -> None: ...

class GetTempCaCertResponse(_message.Message):
    __slots__ = ("temp_ca_cert", "temp_ca_key", "ca_cert")
    TEMP_CA_CERT_FIELD_NUMBER: _ClassVar[int]
    TEMP_CA_KEY_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    temp_ca_cert: str
    temp_ca_key: str
    ca_cert: str
    def __init__(self, temp_ca_cert: _Optional[str] = ..., temp_ca_key: _Optional[str] = ..., ca_cert: _Optional[str] = ...) -> None: ...

class SignCertRequest(_message.Message):
    __slots__ = ("api_version", "csr", "signature", "vm_config")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    csr: bytes
    signature: bytes
    vm_config: str
    def __init__(self, api_version: _Optional[int] = ..., csr: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., vm_config: _Optional[str] = ...) -> None: ...

class SignCertResponse(_message.Message):
    __slots__ = ("certificate_chain",)
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    certificate_chain: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, certificate_chain: _Optional[_Iterable[str]] = ...) -> None: ...

class BootstrapRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class BootstrapResponse(_message.Message):
    __slots__ = ("ca_pubkey", "k256_pubkey", "attestation")
    CA_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    K256_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    ca_pubkey: bytes
    k256_pubkey: bytes
    attestation: bytes
    def __init__(self, ca_pubkey: _Optional[bytes] = ..., k256_pubkey: _Optional[bytes] = ..., attestation: _Optional[bytes] = ...) -> None: ...

class OnboardRequest(_message.Message):
    __slots__ = ("source_url", "domain")
    SOURCE_URL_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    source_url: str
    domain: str
    def __init__(self, source_url: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class OnboardResponse(_message.Message):
    __slots__ = ("k256_pubkey",)
    K256_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    k256_pubkey: bytes
    def __init__(self, k256_pubkey: _Optional[bytes] = ...) -> None: ...

class AttestationInfoResponse(_message.Message):
    __slots__ = ("device_id", "mr_aggregated", "os_image_hash", "tee_variant", "site_name", "eth_rpc_url", "kms_contract_address", "ppid")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MR_AGGREGATED_FIELD_NUMBER: _ClassVar[int]
    OS_IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    TEE_VARIANT_FIELD_NUMBER: _ClassVar[int]
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    ETH_RPC_URL_FIELD_NUMBER: _ClassVar[int]
    KMS_CONTRACT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    device_id: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    tee_variant: str
    site_name: str
    eth_rpc_url: str
    kms_contract_address: str
    ppid: bytes
    def __init__(self, device_id: _Optional[bytes] = ..., mr_aggregated: _Optional[bytes] = ..., os_image_hash: _Optional[bytes] = ..., tee_variant: _Optional[str] = ..., site_name: _Optional[str] = ..., eth_rpc_url: _Optional[str] = ..., kms_contract_address: _Optional[str] = ..., ppid: _Optional[bytes] = ...) -> None: ...

class ClearImageCacheRequest(_message.Message):
    __slots__ = ("image_hash", "config_hash")
    IMAGE_HASH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    image_hash: str
    config_hash: str
    def __init__(self, image_hash: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...
