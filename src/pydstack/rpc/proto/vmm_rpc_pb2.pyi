from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmInfo(_message.Message):
    __slots__ = ("id", "name", "status", "uptime", "app_url", "app_id", "instance_id", "configuration", "exited_at", "boot_progress", "boot_error", "shutdown_progress", "image_version", "events", "interfaces")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    APP_URL_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    BOOT_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ERROR_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    status: str
    uptime: str
    app_url: str
    app_id: str
    instance_id: str
    configuration: VmConfiguration
    exited_at: str
    boot_progress: str
    boot_error: str
    shutdown_progress: str
    image_version: str
    events: _containers.RepeatedCompositeFieldContainer[GuestEvent]
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkInterfaceStatus]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., uptime: _Optional[str] = ..., app_url: _Optional[str] = ..., app_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., configuration: _Optional[_Union[VmConfiguration, _Mapping]] = ..., exited_at: _Optional[str] = ..., boot_progress: _Optional[str] = ..., boot_error: _Optional[str] = ..., shutdown_progress: _Optional[str] = ..., image_version: _Optional[str] = ..., events: _Optional[_Iterable[_Union[GuestEvent, _Mapping]]] = ..., interfaces: _Optional[_Iterable[_Union[NetworkInterfaceStatus, _Mapping]]] = ...) -> None: ...

class NetworkInterfaceStatus(_message.Message):
    __slots__ = ("mode", "backend", "mac", "bridge_name", "netdev_id")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_NAME_FIELD_NUMBER: _ClassVar[int]
    NETDEV_ID_FIELD_NUMBER: _ClassVar[int]
    mode: str
    backend: str
    mac: str
    bridge_name: str
    netdev_id: str
    def __init__(self, mode: _Optional[str] = ..., backend: _Optional[str] = ..., mac: _Optional[str] = ..., bridge_name: _Optional[str] = ..., netdev_id: _Optional[str] = ...) -> None: ...

class GuestEvent(_message.Message):
    __slots__ = ("event", "body", "timestamp")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    event: str
    body: str
    timestamp: int
    def __init__(self, event: _Optional[str] = ..., body: _Optional[str] = ..., timestamp: _Optional[int] = ...) -> None: ...

class Id(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ComposeHash(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: str
    def __init__(self, hash: _Optional[str] = ...) -> None: ...

class VmConfiguration(_message.Message):
    __slots__ = ("name", "image", "compose_file", "vcpu", "memory", "disk_size", "ports", "encrypted_env", "app_id", "user_config", "hugepages", "pin_numa", "gpus", "kms_urls", "gateway_urls", "stopped", "no_tee", "networking", "networks", "simulated_tee")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_FILE_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_ENV_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    USER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    HUGEPAGES_FIELD_NUMBER: _ClassVar[int]
    PIN_NUMA_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    KMS_URLS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_URLS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    NO_TEE_FIELD_NUMBER: _ClassVar[int]
    NETWORKING_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_TEE_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: str
    compose_file: str
    vcpu: int
    memory: int
    disk_size: int
    ports: _containers.RepeatedCompositeFieldContainer[PortMapping]
    encrypted_env: bytes
    app_id: str
    user_config: str
    hugepages: bool
    pin_numa: bool
    gpus: GpuConfig
    kms_urls: _containers.RepeatedScalarFieldContainer[str]
    gateway_urls: _containers.RepeatedScalarFieldContainer[str]
    stopped: bool
    no_tee: bool
    networking: NetworkingConfig
    networks: _containers.RepeatedCompositeFieldContainer[NetworkingConfig]
    simulated_tee: str
    def __init__(self, name: _Optional[str] = ..., image: _Optional[str] = ..., compose_file: _Optional[str] = ..., vcpu: _Optional[int] = ..., memory: _Optional[int] = ..., disk_size: _Optional[int] = ..., ports: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ..., encrypted_env: _Optional[bytes] = ..., app_id: _Optional[str] = ..., user_config: _Optional[str] = ..., hugepages: _Optional[bool] = ..., pin_numa: _Optional[bool] = ..., gpus: _Optional[_Union[GpuConfig, _Mapping]] = ..., kms_urls: _Optional[_Iterable[str]] = ..., gateway_urls: _Optional[_Iterable[str]] = ..., stopped: _Optional[bool] = ..., no_tee: _Optional[bool] = ..., networking: _Optional[_Union[NetworkingConfig, _Mapping]] = ..., networks: _Optional[_Iterable[_Union[NetworkingConfig, _Mapping]]] = ..., simulated_tee: _Optional[str] = ...) -> None: ...

class NetworkingConfig(_message.Message):
    __slots__ = ("mode", "bridge_name")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_NAME_FIELD_NUMBER: _ClassVar[int]
    mode: str
    bridge_name: str
    def __init__(self, mode: _Optional[str] = ..., bridge_name: _Optional[str] = ...) -> None: ...

class GpuConfig(_message.Message):
    __slots__ = ("gpus", "attach_mode")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ATTACH_MODE_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuSpec]
    attach_mode: str
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuSpec, _Mapping]]] = ..., attach_mode: _Optional[str] = ...) -> None: ...

class GpuSpec(_message.Message):
    __slots__ = ("slot",)
    SLOT_FIELD_NUMBER: _ClassVar[int]
    slot: str
    def __init__(self, slot: _Optional[str] = ...) -> None: ...

class PortMapping(_message.Message):
    __slots__ = ("protocol", "host_port", "vm_port", "host_address")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    VM_PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    host_port: int
    vm_port: int
    host_address: str
    def __init__(self, protocol: _Optional[str] = ..., host_port: _Optional[int] = ..., vm_port: _Optional[int] = ..., host_address: _Optional[str] = ...) -> None: ...

class UpdateVmRequest(_message.Message):
    __slots__ = ("id", "compose_file", "encrypted_env", "user_config", "update_ports", "ports", "update_kms_urls", "kms_urls", "update_gateway_urls", "gateway_urls", "gpus", "vcpu", "memory", "disk_size", "image", "no_tee", "update_networking", "networks")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_FILE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_ENV_FIELD_NUMBER: _ClassVar[int]
    USER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    UPDATE_PORTS_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_KMS_URLS_FIELD_NUMBER: _ClassVar[int]
    KMS_URLS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_GATEWAY_URLS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_URLS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NO_TEE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NETWORKING_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    id: str
    compose_file: str
    encrypted_env: bytes
    user_config: str
    update_ports: bool
    ports: _containers.RepeatedCompositeFieldContainer[PortMapping]
    update_kms_urls: bool
    kms_urls: _containers.RepeatedScalarFieldContainer[str]
    update_gateway_urls: bool
    gateway_urls: _containers.RepeatedScalarFieldContainer[str]
    gpus: GpuConfig
    vcpu: int
    memory: int
    disk_size: int
    image: str
    no_tee: bool
    update_networking: bool
    networks: _containers.RepeatedCompositeFieldContainer[NetworkingConfig]
    def __init__(self, id: _Optional[str] = ..., compose_file: _Optional[str] = ..., encrypted_env: _Optional[bytes] = ..., user_config: _Optional[str] = ..., update_ports: _Optional[bool] = ..., ports: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ..., update_kms_urls: _Optional[bool] = ..., kms_urls: _Optional[_Iterable[str]] = ..., update_gateway_urls: _Optional[bool] = ..., gateway_urls: _Optional[_Iterable[str]] = ..., gpus: _Optional[_Union[GpuConfig, _Mapping]] = ..., vcpu: _Optional[int] = ..., memory: _Optional[int] = ..., disk_size: _Optional[int] = ..., image: _Optional[str] = ..., no_tee: _Optional[bool] = ..., update_networking: _Optional[bool] = ..., networks: _Optional[_Iterable[_Union[NetworkingConfig, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("ids", "brief", "keyword", "page", "page_size")
    IDS_FIELD_NUMBER: _ClassVar[int]
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    brief: bool
    keyword: str
    page: int
    page_size: int
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., brief: _Optional[bool] = ..., keyword: _Optional[str] = ..., page: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("vms", "port_mapping_enabled", "total")
    VMS_FIELD_NUMBER: _ClassVar[int]
    PORT_MAPPING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    port_mapping_enabled: bool
    total: int
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ..., port_mapping_enabled: _Optional[bool] = ..., total: _Optional[int] = ...) -> None: ...

class ImageListResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("name", "description", "version", "is_dev")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEV_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    version: str
    is_dev: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., version: _Optional[str] = ..., is_dev: _Optional[bool] = ...) -> None: ...

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

class GetInfoResponse(_message.Message):
    __slots__ = ("found", "info")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    found: bool
    info: VmInfo
    def __init__(self, found: _Optional[bool] = ..., info: _Optional[_Union[VmInfo, _Mapping]] = ...) -> None: ...

class ResizeVmRequest(_message.Message):
    __slots__ = ("id", "vcpu", "memory", "disk_size", "image")
    ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    vcpu: int
    memory: int
    disk_size: int
    image: str
    def __init__(self, id: _Optional[str] = ..., vcpu: _Optional[int] = ..., memory: _Optional[int] = ..., disk_size: _Optional[int] = ..., image: _Optional[str] = ...) -> None: ...

class KmsSettings(_message.Message):
    __slots__ = ("url", "urls")
    URL_FIELD_NUMBER: _ClassVar[int]
    URLS_FIELD_NUMBER: _ClassVar[int]
    url: str
    urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, url: _Optional[str] = ..., urls: _Optional[_Iterable[str]] = ...) -> None: ...

class GatewaySettings(_message.Message):
    __slots__ = ("url", "base_domain", "port", "agent_port", "urls")
    URL_FIELD_NUMBER: _ClassVar[int]
    BASE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    URLS_FIELD_NUMBER: _ClassVar[int]
    url: str
    base_domain: str
    port: int
    agent_port: int
    urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, url: _Optional[str] = ..., base_domain: _Optional[str] = ..., port: _Optional[int] = ..., agent_port: _Optional[int] = ..., urls: _Optional[_Iterable[str]] = ...) -> None: ...

class ResourcesSettings(_message.Message):
    __slots__ = ("max_cvm_number", "max_allocable_vcpu", "max_allocable_memory_in_mb")
    MAX_CVM_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MAX_ALLOCABLE_VCPU_FIELD_NUMBER: _ClassVar[int]
    MAX_ALLOCABLE_MEMORY_IN_MB_FIELD_NUMBER: _ClassVar[int]
    max_cvm_number: int
    max_allocable_vcpu: int
    max_allocable_memory_in_mb: int
    def __init__(self, max_cvm_number: _Optional[int] = ..., max_allocable_vcpu: _Optional[int] = ..., max_allocable_memory_in_mb: _Optional[int] = ...) -> None: ...

class NetworkingCapabilities(_message.Message):
    __slots__ = ("supported_modes", "default_mode", "default_bridge")
    SUPPORTED_MODES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BRIDGE_FIELD_NUMBER: _ClassVar[int]
    supported_modes: _containers.RepeatedScalarFieldContainer[str]
    default_mode: str
    default_bridge: str
    def __init__(self, supported_modes: _Optional[_Iterable[str]] = ..., default_mode: _Optional[str] = ..., default_bridge: _Optional[str] = ...) -> None: ...

class GetMetaResponse(_message.Message):
    __slots__ = ("kms", "gateway", "resources", "networking")
    KMS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NETWORKING_FIELD_NUMBER: _ClassVar[int]
    kms: KmsSettings
    gateway: GatewaySettings
    resources: ResourcesSettings
    networking: NetworkingCapabilities
    def __init__(self, kms: _Optional[_Union[KmsSettings, _Mapping]] = ..., gateway: _Optional[_Union[GatewaySettings, _Mapping]] = ..., resources: _Optional[_Union[ResourcesSettings, _Mapping]] = ..., networking: _Optional[_Union[NetworkingCapabilities, _Mapping]] = ...) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("version", "rev")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REV_FIELD_NUMBER: _ClassVar[int]
    version: str
    rev: str
    def __init__(self, version: _Optional[str] = ..., rev: _Optional[str] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("slot", "product_id", "description", "is_free")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_FREE_FIELD_NUMBER: _ClassVar[int]
    slot: str
    product_id: str
    description: str
    is_free: bool
    def __init__(self, slot: _Optional[str] = ..., product_id: _Optional[str] = ..., description: _Optional[str] = ..., is_free: _Optional[bool] = ...) -> None: ...

class ListGpusResponse(_message.Message):
    __slots__ = ("gpus", "allow_attach_all")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ATTACH_ALL_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    allow_attach_all: bool
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., allow_attach_all: _Optional[bool] = ...) -> None: ...

class ReloadVmsResponse(_message.Message):
    __slots__ = ("loaded", "updated", "removed")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    loaded: int
    updated: int
    removed: int
    def __init__(self, loaded: _Optional[int] = ..., updated: _Optional[int] = ..., removed: _Optional[int] = ...) -> None: ...

class SvProcessInfo(_message.Message):
    __slots__ = ("id", "name", "status", "pid", "command", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    status: str
    pid: int
    command: str
    note: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., pid: _Optional[int] = ..., command: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class SvListResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[SvProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[SvProcessInfo, _Mapping]]] = ...) -> None: ...

class RegistryImageListResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[RegistryImageInfo]
    def __init__(self, images: _Optional[_Iterable[_Union[RegistryImageInfo, _Mapping]]] = ...) -> None: ...

class RegistryImageInfo(_message.Message):
    __slots__ = ("tag", "local", "pulling", "error")
    TAG_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    PULLING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    tag: str
    local: bool
    pulling: bool
    error: str
    def __init__(self, tag: _Optional[str] = ..., local: _Optional[bool] = ..., pulling: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class PullRegistryImageRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...
