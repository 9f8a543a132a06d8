"""an asyncio client for etcd's v3 API through its JSON gateway (HTTP(S) on the client port:
``/v3/kv/range``, ``/v3/kv/put``, ``/v3/kv/deleterange``, ``/v3/kv/txn``, ``/v3/lease/*``,
``/v3/watch``), with aiohttp.

Why the JSON gateway and not gRPC (``aetcd``): etcd 3.4 serves it on every client URL with no
extra process, it needs no grpcio (a large native dependency the rest of pydstack does not use),
and aiohttp is already what every pydstack service speaks; a watch is one streamed response of
newline-separated JSON messages. Keys and values are bytes (base64 on the wire).

:class:`EtcdClient` tries its endpoints in turn, starting with the last one that answered; a
member that refuses the connection, times out (``timeout`` per request) or answers "unavailable"
sends the request to the next one. When none answers the request raises
:class:`EtcdUnavailable` naming the endpoints (never their credentials: an endpoint with a
user or password in it is refused by :func:`check_endpoint`). Any other refusal by etcd is an
:class:`EtcdError` with etcd's message (cut to 200 characters).

Bounds: a value written is at most :data:`MAX_VALUE_BYTES` (etcd's own request limit is
1.5 MiB), a range returns at most :data:`MAX_KEYS` keys (more is an :class:`EtcdError`, never a
silent truncation), a response body at most :data:`MAX_RESPONSE_BYTES`, a watch message at most
:data:`MAX_WATCH_MESSAGE` bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pydstack.errors import ConfigError, DstackError, UnavailableError
from pydstack.types import jsonlimits

log = logging.getLogger(__name__)

#: the largest value put (etcd refuses requests over 1.5 MiB by default)
MAX_VALUE_BYTES = 1 << 20
#: the most keys one range returns
MAX_KEYS = 100_000
#: the most bytes of one response body read
MAX_RESPONSE_BYTES = 256 << 20
#: the most bytes of one watch message
MAX_WATCH_MESSAGE = 16 << 20
#: etcd's default ``--max-txn-ops``: the most operations in one transaction
MAX_TXN_OPS = 128
#: gRPC status codes that mean "try another member"
_RETRY_CODES = frozenset({4, 14})  # DEADLINE_EXCEEDED, UNAVAILABLE


class EtcdError(DstackError):
    """etcd refused a request, or answered something that is not etcd's."""


class EtcdUnavailable(EtcdError, UnavailableError):
    """no etcd endpoint answered."""


def check_endpoint(url: str, key: str = "core.sync.etcd_endpoints") -> str:
    """`url` as ``http(s)://host:port``; ConfigError naming `key` for anything else (a path,
    a query, a user or a password: credentials never go into an endpoint)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: an endpoint is not a url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(f"{key}: an endpoint must be http(s)://host:port")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}: an endpoint must not carry a user or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: an endpoint must be http(s)://host:port with no path")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class EtcdTls:
    """client TLS for https endpoints: a CA to verify the members, a client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """ConfigError naming the file that cannot be loaded."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"core.sync.etcd_ca_cert: cannot load {self.ca_file}: {e}") from None
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"core.sync.etcd_cert/etcd_key: cannot load {self.cert_file}: "
                    f"{getattr(e, 'strerror', None) or 'not a certificate and key'}"
                ) from None
        return ctx


@dataclass(frozen=True)
class Kv:
    """one key as etcd holds it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


def prefix_end(prefix: bytes) -> bytes:
    """the range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if text is None or text == "":
        return b""
    if not isinstance(text, str):
        raise EtcdError("etcd answered a key or value that is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise EtcdError("etcd answered a key or value that is not base64") from None


def _int(value: Any) -> int:
    """int64 fields come as strings (absent when zero)."""
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EtcdError("etcd answered a number that is not one") from None


def _kv(obj: Any) -> Kv:
    if not isinstance(obj, dict):
        raise EtcdError("etcd answered a key that is not an object")
    return Kv(
        key=_unb64(obj.get("key")),
        value=_unb64(obj.get("value")),
        create_revision=_int(obj.get("create_revision")),
        mod_revision=_int(obj.get("mod_revision")),
        lease=_int(obj.get("lease")),
    )


# ---------------------------------------------------------------------- transaction parts
def cmp_mod_revision(key: bytes, revision: int) -> dict[str, Any]:
    """compare: `key` was last changed at `revision` (0: the key does not exist)."""
    return {"target": "MOD", "key": _b64(key), "result": "EQUAL", "mod_revision": str(revision)}


def cmp_value(key: bytes, value: bytes) -> dict[str, Any]:
    """compare: `key` holds `value`."""
    return {"target": "VALUE", "key": _b64(key), "result": "EQUAL", "value": _b64(value)}


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """EtcdError for a value over MAX_VALUE_BYTES."""
    if len(value) > MAX_VALUE_BYTES:
        raise EtcdError(f"a value of {len(value)} bytes is over the {MAX_VALUE_BYTES} byte limit")
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_delete(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return {"request_delete_range": body}


def op_range(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return {"request_range": body}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: the keys of each request_range among the operations that ran, in order
    ranges: tuple[tuple[Kv, ...], ...] = ()


class EtcdClient:
    """etcd's v3 API over HTTP(S); see the module doc for failover, errors and bounds."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, tls: EtcdTls | None = None
    ) -> None:
        if not endpoints:
            raise ConfigError("core.sync.etcd_endpoints must name at least one endpoint")
        self.endpoints = [check_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._ssl = tls.context() if tls is not None else None
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else True, limit=64),
                headers={"content-type": "application/json"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` on the first member that answers; its JSON answer."""
        data = json.dumps(body).encode()
        why: list[str] = []
        for i in self._order():
            url = self.endpoints[i] + path
            try:
                async with self._http().post(
                    url, data=data, timeout=aiohttp.ClientTimeout(total=self.timeout)
                ) as resp:
                    raw = await _read_capped(resp, MAX_RESPONSE_BYTES)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                why.append(f"{self.endpoints[i]}: {_reason(e)}")
                continue
            obj = _json(raw)
            code = obj.get("code")
            if isinstance(code, int) and code != 0:
                message = str(obj.get("message") or obj.get("error") or "")[:200]
                if code in _RETRY_CODES or (status >= 500 and "unavailable" in message.lower()):
                    why.append(f"{self.endpoints[i]}: {message or 'unavailable'}")
                    continue
                raise EtcdError(f"etcd refused {path}: {message or f'code {code}'}")
            if status != 200:
                why.append(f"{self.endpoints[i]}: http status {status}")
                continue
            self._current = i
            return obj
        raise EtcdUnavailable(f"etcd is unavailable ({'; '.join(why)})")

    # ------------------------------------------------------------------ kv
    async def range(
        self, key: bytes, range_end: bytes | None = None, *, limit: int = MAX_KEYS
    ) -> tuple[list[Kv], int]:
        """the keys in [key, range_end) (just `key` without an end) and the store's revision.
        EtcdError when more than `limit` keys match."""
        body: dict[str, Any] = {"key": _b64(key), "limit": str(limit + 1)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        obj = await self.call("/v3/kv/range", body)
        kvs = obj.get("kvs") or []
        if not isinstance(kvs, list):
            raise EtcdError("etcd answered a range that is not a list")
        if len(kvs) > limit or obj.get("more"):
            raise EtcdError(f"more than {limit} keys under {key[:80]!r}")
        return [_kv(k) for k in kvs], _revision(obj)

    async def get(self, key: bytes) -> Kv | None:
        kvs, _ = await self.range(key, limit=1)
        return kvs[0] if kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """the revision of the write."""
        obj = await self.call("/v3/kv/put", op_put(key, value, lease)["request_put"])
        return _revision(obj)

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        """how many keys were deleted."""
        obj = await self.call(
            "/v3/kv/deleterange", op_delete(key, range_end)["request_delete_range"]
        )
        return _int(obj.get("deleted"))

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        """if every `compare` holds run `success`, else `failure`, atomically. EtcdError for more
        than MAX_TXN_OPS operations on a side."""
        failure = failure or []
        if max(len(success), len(failure)) > MAX_TXN_OPS:
            raise EtcdError(f"a transaction of more than {MAX_TXN_OPS} operations")
        obj = await self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure}
        )
        ranges: list[tuple[Kv, ...]] = []
        for r in obj.get("responses") or []:
            if isinstance(r, dict) and isinstance(r.get("response_range"), dict):
                ranges.append(tuple(_kv(k) for k in r["response_range"].get("kvs") or []))
        return TxnResult(bool(obj.get("succeeded")), _revision(obj), tuple(ranges))

    # ------------------------------------------------------------------ leases
    async def grant(self, ttl: int) -> int:
        """a new lease of `ttl` seconds (>= 1); its id."""
        obj = await self.call("/v3/lease/grant", {"TTL": str(max(1, int(ttl)))})
        lease = _int(obj.get("ID"))
        if not lease:
            raise EtcdError(f"etcd granted no lease: {str(obj.get('error', ''))[:200]}")
        return lease

    async def keepalive(self, lease: int) -> int:
        """renew `lease` once; its new ttl, 0 when it has expired."""
        obj = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = obj.get("result", obj)
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    async def revoke(self, lease: int) -> None:
        """drop `lease` and its keys (a lease already gone is not an error)."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    async def status(self) -> str:
        """the version of the member that answered (a reachability check)."""
        obj = await self.call("/v3/maintenance/status", {})
        return str(obj.get("version", ""))

    # ------------------------------------------------------------------ watch
    async def watch(
        self, key: bytes, range_end: bytes | None = None, *, start_revision: int = 0
    ) -> AsyncGenerator[int, None]:
        """the revision of each batch of changes to [key, range_end) from `start_revision`.
        Ends when the member closes the stream or the watch is cancelled or compacted (the
        caller re-reads and watches again); EtcdUnavailable when no member takes it."""
        create: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            create["range_end"] = _b64(range_end)
        if start_revision:
            create["start_revision"] = str(start_revision)
        data = json.dumps({"create_request": create}).encode()
        why: list[str] = []
        for i in self._order():
            url = self.endpoints[i] + "/v3/watch"
            try:
                resp = await self._http().post(
                    url,
                    data=data,
                    timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout),
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                why.append(f"{self.endpoints[i]}: {_reason(e)}")
                continue
            try:
                if resp.status != 200:
                    why.append(f"{self.endpoints[i]}: http status {resp.status}")
                    continue
                self._current = i
                async for message in _lines(resp):
                    result = message.get("result")
                    if not isinstance(result, dict):
                        if message.get("error"):
                            return
                        continue
                    if result.get("canceled") or result.get("compact_revision"):
                        return
                    if result.get("events"):
                        yield _revision(result)
                return
            except (aiohttp.ClientError, OSError):
                return
            finally:
                resp.close()
        raise EtcdUnavailable(f"etcd is unavailable for a watch ({'; '.join(why)})")


def _revision(obj: dict[str, Any]) -> int:
    header = obj.get("header")
    return _int(header.get("revision")) if isinstance(header, dict) else 0


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        errno = e.os_error.errno
        return os.strerror(errno) if errno else "cannot connect"
    return type(e).__name__


def _json(raw: bytes) -> dict[str, Any]:
    try:
        obj = jsonlimits.loads(raw)
    except ValueError:
        raise EtcdError("etcd answered something that is not json") from None
    if not isinstance(obj, dict):
        raise EtcdError("etcd answered json that is not an object")
    return obj


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    if resp.content_length is not None and resp.content_length > cap:
        raise EtcdError(f"etcd answered more than {cap} bytes")
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise EtcdError(f"etcd answered more than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """the JSON messages of a streamed response, one a line, each under MAX_WATCH_MESSAGE."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield _json(line)
        if len(buf) > MAX_WATCH_MESSAGE:
            raise EtcdError(f"a watch message over {MAX_WATCH_MESSAGE} bytes")
    if buf.strip():
        yield _json(buf)


async def wait_reachable(client: EtcdClient, patience: float) -> str:
    """the version of a member, retrying for `patience` seconds; EtcdUnavailable after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await client.status()
        except EtcdUnavailable:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.5)
