"""pydstack.sdk: the Python client for apps in a dstack CVM (surface of upstream dstack_sdk).

from pydstack.sdk import DstackClient
client = DstackClient()            # /var/run/dstack.sock, or DSTACK_SIMULATOR_ENDPOINT
key = client.get_key("wallet/eth", "signing").decode_key()
quote = client.get_quote(b"my report data").decode_quote()
"""

from .client import (
    AsyncDstackClient,
    AsyncTappdClient,
    DstackClient,
    TappdClient,
    get_endpoint,
    get_tappd_endpoint,
)
from .compose import get_compose_hash, sort_object, to_deterministic_json
from .env import (
    EnvVar,
    encrypt_env_vars,
    encrypt_env_vars_sync,
    verify_env_encrypt_public_key,
    verify_env_encrypt_public_key_legacy,
)
from .models import (
    AttestResponse,
    EventLog,
    GetKeyResponse,
    GetQuoteResponse,
    GetTlsKeyResponse,
    GpuInfoResponse,
    InfoResponse,
    SignResponse,
    TcbInfo,
    TcbInfoV03x,
    TcbInfoV05x,
    VerifyResponse,
    VersionResponse,
)

__all__ = [
    "AsyncDstackClient",
    "AsyncTappdClient",
    "AttestResponse",
    "DstackClient",
    "EnvVar",
    "EventLog",
    "GetKeyResponse",
    "GetQuoteResponse",
    "GetTlsKeyResponse",
    "GpuInfoResponse",
    "InfoResponse",
    "SignResponse",
    "TappdClient",
    "TcbInfo",
    "TcbInfoV03x",
    "TcbInfoV05x",
    "VerifyResponse",
    "VersionResponse",
    "encrypt_env_vars",
    "encrypt_env_vars_sync",
    "get_compose_hash",
    "get_endpoint",
    "get_tappd_endpoint",
    "sort_object",
    "to_deterministic_json",
    "verify_env_encrypt_public_key",
    "verify_env_encrypt_public_key_legacy",
]
