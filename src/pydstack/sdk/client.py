"""clients of the guest agent: DstackClient (dstack.sock) and the legacy TappdClient.

Endpoint resolution: the explicit argument, else `DSTACK_SIMULATOR_ENDPOINT` (or
`TAPPD_SIMULATOR_ENDPOINT`), else the first existing default socket. A path must exist
("Unix socket file <path> does not exist"); `http(s)://` URLs are used as they are. Requests are
JSON POSTs to `/<Method>` (`/prpc/Tappd.<Method>` for tappd); an error answer raises
`httpx.HTTPStatusError` whose message carries the agent's own error text.

The sync clients drive the very same coroutines over a blocking transport, so they also work
inside a running event loop.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import httpx

from .. import __version__
from .models import (
    AttestResponse,
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

DSTACK_SOCKETS = (
    "/var/run/dstack.sock",
    "/run/dstack.sock",
    "/var/run/dstack/dstack.sock",
    "/run/dstack/dstack.sock",
)
TAPPD_SOCKETS = (
    "/var/run/tappd.sock",
    "/run/tappd.sock",
    "/var/run/dstack/tappd.sock",
    "/run/dstack/tappd.sock",
)
DEFAULT_TIMEOUT = 3.0
TLS_KEY_OPTIONS = ("not_before", "not_after", "with_app_info")
MAX_ERROR_TEXT = 1000

P = ParamSpec("P")
R = TypeVar("R")


def _resolve(endpoint: str | None, env: str, sockets: tuple[str, ...]) -> str:
    if endpoint:
        return endpoint
    if os.environ.get(env):
        return os.environ[env]
    return next((s for s in sockets if os.path.exists(s)), sockets[0])


def get_endpoint(endpoint: str | None = None) -> str:
    return _resolve(endpoint, "DSTACK_SIMULATOR_ENDPOINT", DSTACK_SOCKETS)


def get_tappd_endpoint(endpoint: str | None = None) -> str:
    return _resolve(endpoint, "TAPPD_SIMULATOR_ENDPOINT", TAPPD_SOCKETS)


def _hex(data: str | bytes) -> str:
    return (data.encode() if isinstance(data, str) else bytes(data)).hex()


def _check_report_data(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if not raw:
        raise ValueError("report_data cannot be empty")
    if len(raw) > 64:
        raise ValueError("report_data must be at most 64 bytes")
    return raw.hex()


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    detail = resp.text[:MAX_ERROR_TEXT]
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            detail = body["error"][:MAX_ERROR_TEXT]
    except ValueError:
        pass
    raise httpx.HTTPStatusError(
        f"{resp.status_code} from {resp.request.url.path}: {detail}",
        request=resp.request,
        response=resp,
    )


class AsyncDstackClient:
    """async client of dstack.sock (or an HTTP endpoint)."""

    PATH_PREFIX = "/"
    _tcb_info_type: type[TcbInfo] = TcbInfoV05x

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        use_sync_http: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        endpoint = self._resolve(endpoint)
        self.use_sync_http = use_sync_http
        self.timeout = timeout
        if endpoint.startswith(("http://", "https://")):
            self.base_url = endpoint.rstrip("/")
            self.async_transport = httpx.AsyncHTTPTransport()
            self.sync_transport = httpx.HTTPTransport()
        else:
            if not os.path.exists(endpoint):
                raise FileNotFoundError(f"Unix socket file {endpoint} does not exist")
            self.base_url = "http://localhost"
            self.async_transport = httpx.AsyncHTTPTransport(uds=endpoint)
            self.sync_transport = httpx.HTTPTransport(uds=endpoint)
        self.endpoint = endpoint
        self._client: httpx.AsyncClient | None = None
        self._sync_client: httpx.Client | None = None
        self._client_ref_count = 0

    def _resolve(self, endpoint: str | None) -> str:
        return get_endpoint(endpoint)

    # ---------------------------------------------------------------- transport
    def _headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "User-Agent": f"pydstack-sdk/{__version__}"}

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self.async_transport, base_url=self.base_url, timeout=self.timeout
            )
        return self._client

    def _get_sync_client(self) -> httpx.Client:
        if self._sync_client is None:
            self._sync_client = httpx.Client(
                transport=self.sync_transport, base_url=self.base_url, timeout=self.timeout
            )
        return self._sync_client

    async def _send_rpc_request(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        path = self.PATH_PREFIX + method
        if self.use_sync_http:
            if self._client_ref_count:
                resp = self._get_sync_client().post(path, json=payload, headers=self._headers())
            else:
                with httpx.Client(
                    transport=self.sync_transport, base_url=self.base_url, timeout=self.timeout
                ) as c:
                    resp = c.post(path, json=payload, headers=self._headers())
        elif self._client_ref_count:
            resp = await self._get_client().post(path, json=payload, headers=self._headers())
        else:
            async with httpx.AsyncClient(
                transport=self.async_transport, base_url=self.base_url, timeout=self.timeout
            ) as c:
                resp = await c.post(path, json=payload, headers=self._headers())
        _raise_for_status(resp)
        out = resp.json()
        return out if isinstance(out, dict) else {}

    async def __aenter__(self) -> AsyncDstackClient:
        self._client_ref_count += 1
        return self

    async def __aexit__(self, *_: object) -> None:
        self._client_ref_count = max(0, self._client_ref_count - 1)
        if self._client_ref_count == 0:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            if self._sync_client is not None:
                self._sync_client.close()
                self._sync_client = None

    # ---------------------------------------------------------------- api
    async def get_key(
        self, path: str | None = None, purpose: str | None = None, algorithm: str = "secp256k1"
    ) -> GetKeyResponse:
        if algorithm not in ("secp256k1", "k256", ""):
            await self._require_version(f"algorithm {algorithm!r}")
        data = {"path": path or "", "purpose": purpose or "", "algorithm": algorithm}
        return GetKeyResponse(**await self._send_rpc_request("GetKey", data))

    async def get_quote(self, report_data: str | bytes) -> GetQuoteResponse:
        data = {"report_data": _check_report_data(report_data)}
        return GetQuoteResponse(**await self._send_rpc_request("GetQuote", data))

    async def attest(self, report_data: str | bytes) -> AttestResponse:
        data = {"report_data": _check_report_data(report_data)}
        return AttestResponse(**await self._send_rpc_request("Attest", data))

    async def info(self) -> InfoResponse[TcbInfo]:
        obj = await self._send_rpc_request("Info", {})
        return InfoResponse[TcbInfo].parse_response(obj, self._tcb_info_type)

    async def gpu_info(self) -> GpuInfoResponse:
        return GpuInfoResponse(**await self._send_rpc_request("GpuInfo", {}))

    async def get_tls_key(
        self,
        subject: str | None = None,
        alt_names: list[str] | None = None,
        usage_ra_tls: bool = False,
        usage_server_auth: bool = True,
        usage_client_auth: bool = False,
        *,
        not_before: int | None = None,
        not_after: int | None = None,
        with_app_info: bool | None = None,
    ) -> GetTlsKeyResponse:
        data: dict[str, Any] = {
            "subject": subject or "",
            "usage_ra_tls": usage_ra_tls,
            "usage_server_auth": usage_server_auth,
            "usage_client_auth": usage_client_auth,
        }
        if alt_names:
            data["alt_names"] = list(alt_names)
        options = {"not_before": not_before, "not_after": not_after, "with_app_info": with_app_info}
        used = [k for k, v in options.items() if v is not None]
        if used:
            try:
                await self.version()
            except Exception as e:
                raise RuntimeError(
                    f"TLS key options {used} need a guest agent with the Version api (dstack "
                    f"os 0.5.7 or later): {e}"
                ) from e
            data.update({k: options[k] for k in used})
        return GetTlsKeyResponse(**await self._send_rpc_request("GetTlsKey", data))

    async def sign(self, algorithm: str, data: str | bytes) -> SignResponse:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if algorithm == "secp256k1_prehashed" and len(raw) != 32:
            raise ValueError(f"secp256k1_prehashed needs a 32-byte digest, got {len(raw)} bytes")
        body = {"algorithm": algorithm, "data": raw.hex()}
        return SignResponse(**await self._send_rpc_request("Sign", body))

    async def verify(
        self,
        algorithm: str,
        data: str | bytes,
        signature: str | bytes,
        public_key: str | bytes,
    ) -> VerifyResponse:
        body = {
            "algorithm": algorithm,
            "data": _hex(data),
            "signature": _hex(signature),
            "public_key": _hex(public_key),
        }
        return VerifyResponse(**await self._send_rpc_request("Verify", body))

    async def version(self) -> VersionResponse:
        return VersionResponse(**await self._send_rpc_request("Version", {}))

    async def is_reachable(self) -> bool:
        try:
            await self._send_rpc_request("Info", {})
        except Exception:
            return False
        return True

    async def _require_version(self, feature: str) -> None:
        try:
            await self.version()
        except Exception as e:
            raise RuntimeError(f"{feature} needs dstack os 0.5.7 or later: {e}") from e


def _drive(coro: Coroutine[Any, Any, R]) -> R:
    """run a coroutine whose awaits never suspend (the blocking transport)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("sync client coroutine suspended; this is a bug")


def _sync(fn: Callable[P, Awaitable[R]]) -> Callable[..., R]:
    @functools.wraps(fn)
    def wrapper(self: DstackClient, *args: Any, **kwargs: Any) -> R:
        coro: Coroutine[Any, Any, R] = getattr(self.async_client, fn.__name__)(*args, **kwargs)
        return _drive(coro)

    return wrapper


class DstackClient:
    """blocking client with the same methods as :class:`AsyncDstackClient`."""

    _async_cls: type[AsyncDstackClient] = AsyncDstackClient

    def __init__(self, endpoint: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.async_client = self._async_cls(endpoint, use_sync_http=True, timeout=timeout)

    get_key = _sync(AsyncDstackClient.get_key)
    get_quote = _sync(AsyncDstackClient.get_quote)
    attest = _sync(AsyncDstackClient.attest)
    info = _sync(AsyncDstackClient.info)
    gpu_info = _sync(AsyncDstackClient.gpu_info)
    get_tls_key = _sync(AsyncDstackClient.get_tls_key)
    sign = _sync(AsyncDstackClient.sign)
    verify = _sync(AsyncDstackClient.verify)
    version = _sync(AsyncDstackClient.version)
    is_reachable = _sync(AsyncDstackClient.is_reachable)

    def __enter__(self) -> DstackClient:
        self.async_client._client_ref_count += 1
        return self

    def __exit__(self, *_: object) -> None:
        c = self.async_client
        c._client_ref_count = max(0, c._client_ref_count - 1)
        if c._client_ref_count == 0 and c._sync_client is not None:
            c._sync_client.close()
            c._sync_client = None


class AsyncTappdClient(AsyncDstackClient):
    """the legacy tappd.sock API (deprecated upstream; kept for old apps)."""

    PATH_PREFIX = "/prpc/Tappd."
    _tcb_info_type = TcbInfoV03x

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        use_sync_http: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        warnings.warn(
            "TappdClient is deprecated, please use DstackClient instead",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(endpoint, use_sync_http=use_sync_http, timeout=timeout)

    def _resolve(self, endpoint: str | None) -> str:
        return get_tappd_endpoint(endpoint)

    async def derive_key(
        self,
        path: str | None = None,
        subject: str | None = None,
        alt_names: list[str] | None = None,
    ) -> GetTlsKeyResponse:
        data: dict[str, Any] = {"path": path or "", "subject": subject or path or ""}
        if alt_names:
            data["alt_names"] = list(alt_names)
        return GetTlsKeyResponse(**await self._send_rpc_request("DeriveKey", data))

    async def tdx_quote(
        self, report_data: str | bytes, hash_algorithm: str | None = None
    ) -> GetQuoteResponse:
        alg = hash_algorithm or "raw"
        hex_data = _hex(report_data)
        if alg == "raw":
            if len(hex_data) > 128:
                raise ValueError("report_data must be at most 64 bytes for the raw algorithm")
            hex_data = hex_data.zfill(128)
        data = {"report_data": hex_data, "hash_algorithm": alg}
        resp = await self._send_rpc_request("TdxQuote", data)
        return GetQuoteResponse(
            quote=resp.get("quote", ""),
            event_log=resp.get("event_log", ""),
        )


class TappdClient(DstackClient):
    _async_cls = AsyncTappdClient

    def __init__(self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            super().__init__(endpoint, timeout=timeout)
        warnings.warn(
            "TappdClient is deprecated, please use DstackClient instead",
            DeprecationWarning,
            stacklevel=2,
        )

    derive_key = _sync(AsyncTappdClient.derive_key)
    tdx_quote = _sync(AsyncTappdClient.tdx_quote)
