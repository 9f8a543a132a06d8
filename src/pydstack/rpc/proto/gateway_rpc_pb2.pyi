from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterCvmRequest(_message.Message):
    __slots__ = ("client_public_key", "port_policy")
    CLIENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PORT_POLICY_FIELD_NUMBER: _ClassVar[int]
    client_public_key: str
    port_policy: PortPolicy
    def __init__(self, client_public_key: _Optional[str] = ..., port_policy: _Optional[_Union[PortPolicy, _Mapping]] = ...) -> None: ...

class PortPolicy(_message.Message):
    __slots__ = ("ports", "restrict_mode")
    PORTS_FIELD_NUMBER: _ClassVar[int]
    RESTRICT_MODE_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedCompositeFieldContainer[PortAttrs]
    restrict_mode: bool
    def __init__(self, ports: _Optional[_Iterable[_Union[PortAttrs, _Mapping]]] = ..., restrict_mode: _Optional[bool] = ...) -> None: ...

class PortAttrs(_message.Message):
    __slots__ = ("port", "pp")
    PORT_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    port: int
    pp: bool
    def __init__(self, port: _Optional[int] = ..., pp: _Optional[bool] = ...) -> None: ...

class DebugRegisterCvmRequest(_message.Message):
    __slots__ = ("client_public_key", "app_id", "instance_id")
    CLIENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    client_public_key: str
    app_id: str
    instance_id: str
    def __init__(self, client_public_key: _Optional[str] = ..., app_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class RegisterCvmResponse(_message.Message):
    __slots__ = ("wg", "agent", "gateways")
    WG_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    wg: WireGuardConfig
    agent: GuestAgentConfig
    gateways: _containers.RepeatedCompositeFieldContainer[GatewayNodeInfo]
    def __init__(self, wg: _Optional[_Union[WireGuardConfig, _Mapping]] = ..., agent: _Optional[_Union[GuestAgentConfig, _Mapping]] = ..., gateways: _Optional[_Iterable[_Union[GatewayNodeInfo, _Mapping]]] = ...) -> None: ...

class WireGuardPeer(_message.Message):
    __slots__ = ("pk", "ip", "endpoint")
    PK_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    pk: str
    ip: str
    endpoint: str
    def __init__(self, pk: _Optional[str] = ..., ip: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class WireGuardConfig(_message.Message):
    __slots__ = ("client_ip", "servers")
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    client_ip: str
    servers: _containers.RepeatedCompositeFieldContainer[WireGuardPeer]
    def __init__(self, client_ip: _Optional[str] = ..., servers: _Optional[_Iterable[_Union[WireGuardPeer, _Mapping]]] = ...) -> None: ...

class GuestAgentConfig(_message.Message):
    __slots__ = ("external_port", "internal_port", "domain", "app_address_ns_prefix")
    EXTERNAL_PORT_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_PORT_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    APP_ADDRESS_NS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    external_port: int
    internal_port: int
    domain: str
    app_address_ns_prefix: str
    def __init__(self, external_port: _Optional[int] = ..., internal_port: _Optional[int] = ..., domain: _Optional[str] = ..., app_address_ns_prefix: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("id", "url", "bootnode_url", "num_connections", "hosts", "nodes", "uuid", "accel")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    BOOTNODE_URL_FIELD_NUMBER: _ClassVar[int]
    NUM_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    ACCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    url: str
    bootnode_url: str
    num_connections: int
    hosts: _containers.RepeatedCompositeFieldContainer[HostInfo]
    nodes: _containers.RepeatedCompositeFieldContainer[GatewayNodeInfo]
    uuid: bytes
    accel: ProxyAccelStatus
    def __init__(self, id: _Optional[int] = ..., url: _Optional[str] = ..., bootnode_url: _Optional[str] = ..., num_connections: _Optional[int] = ..., hosts: _Optional[_Iterable[_Union[HostInfo, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[GatewayNodeInfo, _Mapping]]] = ..., uuid: _Optional[bytes] = ..., accel: _Optional[_Union[ProxyAccelStatus, _Mapping]] = ...) -> None: ...

class ProxyAccelStatus(_message.Message):
    __slots__ = ("ktls_mode", "splice_mode", "ktls_offloaded", "ktls_offload_failed", "splice_engaged")
    KTLS_MODE_FIELD_NUMBER: _ClassVar[int]
    SPLICE_MODE_FIELD_NUMBER: _ClassVar[int]
    KTLS_OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    KTLS_OFFLOAD_FAILED_FIELD_NUMBER: _ClassVar[int]
    SPLICE_ENGAGED_FIELD_NUMBER: _ClassVar[int]
    ktls_mode: str
    splice_mode: str
    ktls_offloaded: int
    ktls_offload_failed: int
    splice_engaged: int
    def __init__(self, ktls_mode: _Optional[str] = ..., splice_mode: _Optional[str] = ..., ktls_offloaded: _Optional[int] = ..., ktls_offload_failed: _Optional[int] = ..., splice_engaged: _Optional[int] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("instance_id", "ip", "app_id", "base_domain", "latest_handshake", "num_connections")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LATEST_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    NUM_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    ip: str
    app_id: str
    base_domain: str
    latest_handshake: int
    num_connections: int
    def __init__(self, instance_id: _Optional[str] = ..., ip: _Optional[str] = ..., app_id: _Optional[str] = ..., base_domain: _Optional[str] = ..., latest_handshake: _Optional[int] = ..., num_connections: _Optional[int] = ...) -> None: ...

class QuotedPublicKey(_message.Message):
    __slots__ = ("public_key", "quote", "attestation")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    quote: str
    attestation: str
    def __init__(self, public_key: _Optional[bytes] = ..., quote: _Optional[str] = ..., attestation: _Optional[str] = ...) -> None: ...

class AcmeInfoResponse(_message.Message):
    __slots__ = ("account_uri", "quoted_hist_keys", "account_quote", "account_attestation")
    ACCOUNT_URI_FIELD_NUMBER: _ClassVar[int]
    QUOTED_HIST_KEYS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_QUOTE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    account_uri: str
    quoted_hist_keys: _containers.RepeatedCompositeFieldContainer[QuotedPublicKey]
    account_quote: str
    account_attestation: str
    def __init__(self, account_uri: _Optional[str] = ..., quoted_hist_keys: _Optional[_Iterable[_Union[QuotedPublicKey, _Mapping]]] = ..., account_quote: _Optional[str] = ..., account_attestation: _Optional[str] = ...) -> None: ...

class RotateAcmeCredentialsResponse(_message.Message):
    __slots__ = ("account_uri", "domains_updated", "domains_failed")
    class DomainsFailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCOUNT_URI_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FAILED_FIELD_NUMBER: _ClassVar[int]
    account_uri: str
    domains_updated: int
    domains_failed: _containers.ScalarMap[str, str]
    def __init__(self, account_uri: _Optional[str] = ..., domains_updated: _Optional[int] = ..., domains_failed: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("found", "info")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    found: bool
    info: HostInfo
    def __init__(self, found: _Optional[bool] = ..., info: _Optional[_Union[HostInfo, _Mapping]] = ...) -> None: ...

class GetMetaResponse(_message.Message):
    __slots__ = ("registered", "online")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    registered: int
    online: int
    def __init__(self, registered: _Optional[int] = ..., online: _Optional[int] = ...) -> None: ...

class GatewayNodeInfo(_message.Message):
    __slots__ = ("id", "uuid", "url", "last_seen", "wg_public_key", "wg_ip", "wg_endpoint")
    ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    WG_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    WG_IP_FIELD_NUMBER: _ClassVar[int]
    WG_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    id: int
    uuid: bytes
    url: str
    last_seen: int
    wg_public_key: str
    wg_ip: str
    wg_endpoint: str
    def __init__(self, id: _Optional[int] = ..., uuid: _Optional[bytes] = ..., url: _Optional[str] = ..., last_seen: _Optional[int] = ..., wg_public_key: _Optional[str] = ..., wg_ip: _Optional[str] = ..., wg_endpoint: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("base_domain", "external_port", "app_address_ns_prefix", "version")
    BASE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_PORT_FIELD_NUMBER: _ClassVar[int]
    APP_ADDRESS_NS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    base_domain: str
    external_port: int
    app_address_ns_prefix: str
    version: str
    def __init__(self, base_domain: _Optional[str] = ..., external_port: _Optional[int] = ..., app_address_ns_prefix: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("id", "url")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: int
    url: str
    def __init__(self, id: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class GetPeersResponse(_message.Message):
    __slots__ = ("my_id", "my_url", "peers")
    MY_ID_FIELD_NUMBER: _ClassVar[int]
    MY_URL_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    my_id: int
    my_url: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    def __init__(self, my_id: _Optional[int] = ..., my_url: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ...) -> None: ...

class PeerAddrEntry(_message.Message):
    __slots__ = ("node_id", "url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    url: str
    def __init__(self, node_id: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class NodeInfoEntry(_message.Message):
    __slots__ = ("node_id", "url", "wg_public_key", "wg_endpoint", "wg_ip")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    WG_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    WG_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WG_IP_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    url: str
    wg_public_key: str
    wg_endpoint: str
    wg_ip: str
    def __init__(self, node_id: _Optional[int] = ..., url: _Optional[str] = ..., wg_public_key: _Optional[str] = ..., wg_endpoint: _Optional[str] = ..., wg_ip: _Optional[str] = ...) -> None: ...

class InstanceEntry(_message.Message):
    __slots__ = ("instance_id", "app_id", "ip", "public_key")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    app_id: str
    ip: str
    public_key: str
    def __init__(self, instance_id: _Optional[str] = ..., app_id: _Optional[str] = ..., ip: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...

class DebugSyncDataResponse(_message.Message):
    __slots__ = ("my_node_id", "peer_addrs", "nodes", "instances", "persistent_keys", "ephemeral_keys")
    MY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_KEYS_FIELD_NUMBER: _ClassVar[int]
    my_node_id: int
    peer_addrs: _containers.RepeatedCompositeFieldContainer[PeerAddrEntry]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfoEntry]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceEntry]
    persistent_keys: int
    ephemeral_keys: int
    def __init__(self, my_node_id: _Optional[int] = ..., peer_addrs: _Optional[_Iterable[_Union[PeerAddrEntry, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfoEntry, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[InstanceEntry, _Mapping]]] = ..., persistent_keys: _Optional[int] = ..., ephemeral_keys: _Optional[int] = ...) -> None: ...

class ProxyStateInstance(_message.Message):
    __slots__ = ("instance_id", "app_id", "ip", "public_key", "reg_time")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    REG_TIME_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    app_id: str
    ip: str
    public_key: str
    reg_time: int
    def __init__(self, instance_id: _Optional[str] = ..., app_id: _Optional[str] = ..., ip: _Optional[str] = ..., public_key: _Optional[str] = ..., reg_time: _Optional[int] = ...) -> None: ...

class DebugProxyStateResponse(_message.Message):
    __slots__ = ("instances", "allocated_addresses")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[ProxyStateInstance]
    allocated_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instances: _Optional[_Iterable[_Union[ProxyStateInstance, _Mapping]]] = ..., allocated_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class RenewCertResponse(_message.Message):
    __slots__ = ("renewed",)
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    renewed: bool
    def __init__(self, renewed: _Optional[bool] = ...) -> None: ...

class SetNodeUrlRequest(_message.Message):
    __slots__ = ("id", "url")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: int
    url: str
    def __init__(self, id: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class SetNodeStatusRequest(_message.Message):
    __slots__ = ("id", "status")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: int
    status: str
    def __init__(self, id: _Optional[int] = ..., status: _Optional[str] = ...) -> None: ...

class PeerSyncStatus(_message.Message):
    __slots__ = ("id", "local_ack", "peer_ack", "buffered_logs", "last_seen")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ACK_FIELD_NUMBER: _ClassVar[int]
    PEER_ACK_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_LOGS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    local_ack: int
    peer_ack: int
    buffered_logs: int
    last_seen: _containers.RepeatedCompositeFieldContainer[LastSeenEntry]
    def __init__(self, id: _Optional[int] = ..., local_ack: _Optional[int] = ..., peer_ack: _Optional[int] = ..., buffered_logs: _Optional[int] = ..., last_seen: _Optional[_Iterable[_Union[LastSeenEntry, _Mapping]]] = ...) -> None: ...

class LastSeenEntry(_message.Message):
    __slots__ = ("node_id", "timestamp")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    timestamp: int
    def __init__(self, node_id: _Optional[int] = ..., timestamp: _Optional[int] = ...) -> None: ...

class StoreSyncStatus(_message.Message):
    __slots__ = ("name", "node_id", "n_keys", "next_seq", "dirty", "wal_enabled", "peers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    N_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    WAL_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    node_id: int
    n_keys: int
    next_seq: int
    dirty: bool
    wal_enabled: bool
    peers: _containers.RepeatedCompositeFieldContainer[PeerSyncStatus]
    def __init__(self, name: _Optional[str] = ..., node_id: _Optional[int] = ..., n_keys: _Optional[int] = ..., next_seq: _Optional[int] = ..., dirty: _Optional[bool] = ..., wal_enabled: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[PeerSyncStatus, _Mapping]]] = ...) -> None: ...

class WaveKvStatusResponse(_message.Message):
    __slots__ = ("enabled", "persistent", "ephemeral")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    persistent: StoreSyncStatus
    ephemeral: StoreSyncStatus
    def __init__(self, enabled: _Optional[bool] = ..., persistent: _Optional[_Union[StoreSyncStatus, _Mapping]] = ..., ephemeral: _Optional[_Union[StoreSyncStatus, _Mapping]] = ...) -> None: ...

class HandshakeEntry(_message.Message):
    __slots__ = ("observer_node_id", "timestamp")
    OBSERVER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    observer_node_id: int
    timestamp: int
    def __init__(self, observer_node_id: _Optional[int] = ..., timestamp: _Optional[int] = ...) -> None: ...

class GetInstanceHandshakesRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class GetInstanceHandshakesResponse(_message.Message):
    __slots__ = ("handshakes",)
    HANDSHAKES_FIELD_NUMBER: _ClassVar[int]
    handshakes: _containers.RepeatedCompositeFieldContainer[HandshakeEntry]
    def __init__(self, handshakes: _Optional[_Iterable[_Union[HandshakeEntry, _Mapping]]] = ...) -> None: ...

class GlobalConnectionsStats(_message.Message):
    __slots__ = ("total_connections", "node_connections")
    class NodeConnectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    total_connections: int
    node_connections: _containers.ScalarMap[int, int]
    def __init__(self, total_connections: _Optional[int] = ..., node_connections: _Optional[_Mapping[int, int]] = ...) -> None: ...

class NodeStatusEntry(_message.Message):
    __slots__ = ("node_id", "status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    status: str
    def __init__(self, node_id: _Optional[int] = ..., status: _Optional[str] = ...) -> None: ...

class GetNodeStatusesResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[NodeStatusEntry]
    def __init__(self, statuses: _Optional[_Iterable[_Union[NodeStatusEntry, _Mapping]]] = ...) -> None: ...

class ExitRequest(_message.Message):
    __slots__ = ("force",)
    FORCE_FIELD_NUMBER: _ClassVar[int]
    force: bool
    def __init__(self, force: _Optional[bool] = ...) -> None: ...

class DnsCredentialInfo(_message.Message):
    __slots__ = ("id", "name", "provider_type", "cf_api_token", "cf_api_url", "dns_txt_ttl", "max_dns_wait", "created_at", "updated_at", "rfc2136_server", "rfc2136_tsig_key_name", "rfc2136_tsig_secret", "rfc2136_tsig_algorithm", "rfc2136_zone")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TYPE_FIELD_NUMBER: _ClassVar[int]
    CF_API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CF_API_URL_FIELD_NUMBER: _ClassVar[int]
    DNS_TXT_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_DNS_WAIT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RFC2136_SERVER_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_SECRET_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RFC2136_ZONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    provider_type: str
    cf_api_token: str
    cf_api_url: str
    dns_txt_ttl: int
    max_dns_wait: int
    created_at: int
    updated_at: int
    rfc2136_server: str
    rfc2136_tsig_key_name: str
    rfc2136_tsig_secret: str
    rfc2136_tsig_algorithm: str
    rfc2136_zone: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., provider_type: _Optional[str] = ..., cf_api_token: _Optional[str] = ..., cf_api_url: _Optional[str] = ..., dns_txt_ttl: _Optional[int] = ..., max_dns_wait: _Optional[int] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., rfc2136_server: _Optional[str] = ..., rfc2136_tsig_key_name: _Optional[str] = ..., rfc2136_tsig_secret: _Optional[str] = ..., rfc2136_tsig_algorithm: _Optional[str] = ..., rfc2136_zone: _Optional[str] = ...) -> None: ...

class ListDnsCredentialsResponse(_message.Message):
    __slots__ = ("credentials", "default_id")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ID_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[DnsCredentialInfo]
    default_id: str
    def __init__(self, credentials: _Optional[_Iterable[_Union[DnsCredentialInfo, _Mapping]]] = ..., default_id: _Optional[str] = ...) -> None: ...

class GetDnsCredentialRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CreateDnsCredentialRequest(_message.Message):
    __slots__ = ("name", "provider_type", "cf_api_token", "cf_zone_id", "set_as_default", "cf_api_url", "dns_txt_ttl", "max_dns_wait", "rfc2136_server", "rfc2136_tsig_key_name", "rfc2136_tsig_secret", "rfc2136_tsig_algorithm", "rfc2136_zone")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TYPE_FIELD_NUMBER: _ClassVar[int]
    CF_API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CF_ZONE_ID_FIELD_NUMBER: _ClassVar[int]
    SET_AS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CF_API_URL_FIELD_NUMBER: _ClassVar[int]
    DNS_TXT_TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_DNS_WAIT_FIELD_NUMBER: _ClassVar[int]
    RFC2136_SERVER_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_SECRET_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RFC2136_ZONE_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider_type: str
    cf_api_token: str
    cf_zone_id: str
    set_as_default: bool
    cf_api_url: str
    dns_txt_ttl: int
    max_dns_wait: int
    rfc2136_server: str
    rfc2136_tsig_key_name: str
    rfc2136_tsig_secret: str
    rfc2136_tsig_algorithm: str
    rfc2136_zone: str
    def __init__(self, name: _Optional[str] = ..., provider_type: _Optional[str] = ..., cf_api_token: _Optional[str] = ..., cf_zone_id: _Optional[str] = ..., set_as_default: _Optional[bool] = ..., cf_api_url: _Optional[str] = ..., dns_txt_ttl: _Optional[int] = ..., max_dns_wait: _Optional[int] = ..., rfc2136_server: _Optional[str] = ..., rfc2136_tsig_key_name: _Optional[str] = ..., rfc2136_tsig_secret: _Optional[str] = ..., rfc2136_tsig_algorithm: _Optional[str] = ..., rfc2136_zone: _Optional[str] = ...) -> None: ...

class UpdateDnsCredentialRequest(_message.Message):
    __slots__ = ("id", "name", "cf_api_token", "cf_zone_id", "cf_api_url", "rfc2136_server", "rfc2136_tsig_key_name", "rfc2136_tsig_secret", "rfc2136_tsig_algorithm", "rfc2136_zone")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CF_API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CF_ZONE_ID_FIELD_NUMBER: _ClassVar[int]
    CF_API_URL_FIELD_NUMBER: _ClassVar[int]
    RFC2136_SERVER_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_SECRET_FIELD_NUMBER: _ClassVar[int]
    RFC2136_TSIG_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RFC2136_ZONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    cf_api_token: str
    cf_zone_id: str
    cf_api_url: str
    rfc2136_server: str
    rfc2136_tsig_key_name: str
    rfc2136_tsig_secret: str
    rfc2136_tsig_algorithm: str
    rfc2136_zone: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., cf_api_token: _Optional[str] = ..., cf_zone_id: _Optional[str] = ..., cf_api_url: _Optional[str] = ..., rfc2136_server: _Optional[str] = ..., rfc2136_tsig_key_name: _Optional[str] = ..., rfc2136_tsig_secret: _Optional[str] = ..., rfc2136_tsig_algorithm: _Optional[str] = ..., rfc2136_zone: _Optional[str] = ...) -> None: ...

class DeleteDnsCredentialRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetDefaultDnsCredentialResponse(_message.Message):
    __slots__ = ("default_id", "credential")
    DEFAULT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    default_id: str
    credential: DnsCredentialInfo
    def __init__(self, default_id: _Optional[str] = ..., credential: _Optional[_Union[DnsCredentialInfo, _Mapping]] = ...) -> None: ...

class SetDefaultDnsCredentialRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ZtDomainConfig(_message.Message):
    __slots__ = ("domain", "dns_cred_id", "port", "node", "priority")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DNS_CRED_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    domain: str
    dns_cred_id: str
    port: int
    node: int
    priority: int
    def __init__(self, domain: _Optional[str] = ..., dns_cred_id: _Optional[str] = ..., port: _Optional[int] = ..., node: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class ZtDomainInfo(_message.Message):
    __slots__ = ("config", "cert_status")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CERT_STATUS_FIELD_NUMBER: _ClassVar[int]
    config: ZtDomainConfig
    cert_status: ZtDomainCertStatus
    def __init__(self, config: _Optional[_Union[ZtDomainConfig, _Mapping]] = ..., cert_status: _Optional[_Union[ZtDomainCertStatus, _Mapping]] = ...) -> None: ...

class ZtDomainCertStatus(_message.Message):
    __slots__ = ("has_cert", "not_after", "issued_by", "issued_at", "loaded_in_memory")
    HAS_CERT_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BY_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    LOADED_IN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    has_cert: bool
    not_after: int
    issued_by: int
    issued_at: int
    loaded_in_memory: bool
    def __init__(self, has_cert: _Optional[bool] = ..., not_after: _Optional[int] = ..., issued_by: _Optional[int] = ..., issued_at: _Optional[int] = ..., loaded_in_memory: _Optional[bool] = ...) -> None: ...

class ListZtDomainsResponse(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[ZtDomainInfo]
    def __init__(self, domains: _Optional[_Iterable[_Union[ZtDomainInfo, _Mapping]]] = ...) -> None: ...

class GetZtDomainRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class DeleteZtDomainRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class RenewZtDomainCertRequest(_message.Message):
    __slots__ = ("domain", "force")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    domain: str
    force: bool
    def __init__(self, domain: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RenewZtDomainCertResponse(_message.Message):
    __slots__ = ("renewed", "not_after")
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    renewed: bool
    not_after: int
    def __init__(self, renewed: _Optional[bool] = ..., not_after: _Optional[int] = ...) -> None: ...

class ForceReleaseCertLockRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class CertAttestationInfo(_message.Message):
    __slots__ = ("public_key", "quote", "generated_by", "generated_at")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_BY_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    quote: str
    generated_by: int
    generated_at: int
    def __init__(self, public_key: _Optional[bytes] = ..., quote: _Optional[str] = ..., generated_by: _Optional[int] = ..., generated_at: _Optional[int] = ...) -> None: ...

class ListCertAttestationsRequest(_message.Message):
    __slots__ = ("domain", "limit")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListCertAttestationsResponse(_message.Message):
    __slots__ = ("latest", "history")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    latest: CertAttestationInfo
    history: _containers.RepeatedCompositeFieldContainer[CertAttestationInfo]
    def __init__(self, latest: _Optional[_Union[CertAttestationInfo, _Mapping]] = ..., history: _Optional[_Iterable[_Union[CertAttestationInfo, _Mapping]]] = ...) -> None: ...

class CertbotConfigResponse(_message.Message):
    __slots__ = ("renew_interval_secs", "renew_before_expiration_secs", "renew_timeout_secs", "acme_url", "caa_issuer")
    RENEW_INTERVAL_SECS_FIELD_NUMBER: _ClassVar[int]
    RENEW_BEFORE_EXPIRATION_SECS_FIELD_NUMBER: _ClassVar[int]
    RENEW_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    ACME_URL_FIELD_NUMBER: _ClassVar[int]
    CAA_ISSUER_FIELD_NUMBER: _ClassVar[int]
    renew_interval_secs: int
    renew_before_expiration_secs: int
    renew_timeout_secs: int
    acme_url: str
    caa_issuer: str
    def __init__(self, renew_interval_secs: _Optional[int] = ..., renew_before_expiration_secs: _Optional[int] = ..., renew_timeout_secs: _Optional[int] = ..., acme_url: _Optional[str] = ..., caa_issuer: _Optional[str] = ...) -> None: ...

class SetCertbotConfigRequest(_message.Message):
    __slots__ = ("renew_interval_secs", "renew_before_expiration_secs", "renew_timeout_secs", "acme_url", "caa_issuer")
    RENEW_INTERVAL_SECS_FIELD_NUMBER: _ClassVar[int]
    RENEW_BEFORE_EXPIRATION_SECS_FIELD_NUMBER: _ClassVar[int]
    RENEW_TIMEOUT_SECS_FIELD_NUMBER: _ClassVar[int]
    ACME_URL_FIELD_NUMBER: _ClassVar[int]
    CAA_ISSUER_FIELD_NUMBER: _ClassVar[int]
    renew_interval_secs: int
    renew_before_expiration_secs: int
    renew_timeout_secs: int
    acme_url: str
    caa_issuer: str
    def __init__(self, renew_interval_secs: _Optional[int] = ..., renew_before_expiration_secs: _Optional[int] = ..., renew_timeout_secs: _Optional[int] = ..., acme_url: _Optional[str] = ..., caa_issuer: _Optional[str] = ...) -> None: ...

class SetInstancePortPolicyRequest(_message.Message):
    __slots__ = ("instance_id", "policy")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    policy: PortPolicy
    def __init__(self, instance_id: _Optional[str] = ..., policy: _Optional[_Union[PortPolicy, _Mapping]] = ...) -> None: ...

class ClearInstancePortPolicyRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class GetInstancePortPolicyRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class GetInstancePortPolicyResponse(_message.Message):
    __slots__ = ("effective", "source", "instance_reported", "admin_override")
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    ADMIN_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    effective: PortPolicy
    source: str
    instance_reported: PortPolicy
    admin_override: PortPolicy
    def __init__(self, effective: _Optional[_Union[PortPolicy, _Mapping]] = ..., source: _Optional[str] = ..., instance_reported: _Optional[_Union[PortPolicy, _Mapping]] = ..., admin_override: _Optional[_Union[PortPolicy, _Mapping]] = ...) -> None: ...
