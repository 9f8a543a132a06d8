"""which HTTP requests may reach a handler: CSRF and DNS-rebinding protection for every server.

A web page the operator visits must not be able to drive a server on the operator's machine. The
browser can send two kinds of request without asking the server first (a CORS preflight): GET
(links, images) and POST with a "simple" body type (`text/plain`, form encodings) or no type at
all. Browsers mark cross-site requests with `Origin` and `Sec-Fetch-Site`; a DNS-rebinding page
instead looks same-origin but carries its own DNS name in `Host`. So:

* `Host` (plain TCP listeners; Unix sockets are out of a browser's reach): an IP literal, a
  missing header, `localhost`, this machine's hostname or FQDN pass; any other DNS name must be
  listed in the allowed hosts (`name`, `*.suffix`, or `*` for any), else 403.
* `Origin`: when present it must be the request's own origin (scheme, Host and port) or an
  allowed origin, else 403. `Sec-Fetch-Site: cross-site|same-site` is 403 unless the `Origin` is
  an allowed one. Requests without these headers (CLIs, SDKs) pass.
* prpc bodies (:func:`body_mode`): JSON with a JSON content type (`application/json`,
  `application/*+json`, `text/json`), or with `?json` and either no content type or a protobuf
  one; protobuf with `application/octet-stream`, `application/x-protobuf`,
  `application/protobuf` or no content type. The browser's simple body types are 415 whatever
  `?json` says, and so is any other type.
* prpc GET (:func:`get_allowed`): only for the methods a service declares read-only, else 405.

Every refusal is a :class:`Refusal` (status and a lower-case message naming what to change);
nothing is decided from request bodies, so a refused call never reaches its handler.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pydstack.types.netaddr import parse_port


class RequestLike(Protocol):
    """what the checks read of a request: aiohttp's, or :mod:`.http1`'s (header names are looked
    up lower-case; both servers' header views are case-insensitive or lower-cased)."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def scheme(self) -> str: ...
    @property
    def transport(self) -> Any: ...


JSON_TYPES = frozenset({"application/json", "text/json"})
PROTO_TYPES = frozenset(
    {"application/octet-stream", "application/x-protobuf", "application/protobuf"}
)
#: what a browser sends cross-site without a preflight
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_CHARS = re.compile(r"[a-z0-9._-]+")


@dataclass(frozen=True)
class Refusal:
    """a request refused before its handler: the HTTP status and the message for the caller."""

    status: int
    message: str


@functools.cache
def local_names() -> frozenset[str]:
    """`localhost` and this machine's hostname and FQDN, lower-case (looked up once)."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower().rstrip("."))
    return frozenset(names)


def split_host(value: str) -> tuple[str, int | None] | None:
    """a `Host` value -> (lower-case host without brackets, port or None); None if malformed:
    a name not of DNS characters (ASCII letters, digits, `.`, `-`, `_`), brackets around
    anything but an IPv6 address, a port not of 1 to 5 ASCII digits in 1..65535."""
    value = value.strip().lower()
    bracketed = value.startswith("[")
    if bracketed:
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_s = rest[1:] if rest else ""
    else:
        host, sep, port_s = value.partition(":")
        if sep and ":" in port_s:
            return None
        if sep and not port_s:
            return None
    if not host or not (_HOST_CHARS.fullmatch(host) if not bracketed else _is_v6(host)):
        return None
    if not port_s:
        return host, None
    port = parse_port(port_s)
    if port is None:
        return None
    return host, port


def _is_v6(host: str) -> bool:
    """an IPv6 address without a zone (no browser sends one in a Host)."""
    if "%" in host:
        return False
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)  # bounded: a client choosing new hosts only evicts
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` -> `scheme://host:port` with the default port filled in, lower-case;
    None for anything else (`null`, paths, unknown schemes)."""
    scheme, sep, rest = value.strip().lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS or not rest or "/" in rest or "@" in rest:
        return None
    parsed = split_host(rest)
    if parsed is None:
        return None
    host, port = parsed
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def _host_pattern(value: str) -> str:
    pattern = value.strip().lower().rstrip(".")
    bare = pattern[2:] if pattern.startswith("*.") else pattern
    if pattern != "*" and (not bare or not _HOST_CHARS.fullmatch(bare)):
        raise ValueError(f"invalid allowed host {value!r}: expected a DNS name, *.suffix or *")
    return pattern


@dataclass(frozen=True)
class RequestGuard:
    """the browser-facing checks of one server; `hosts_key`/`origins_key` name the config keys
    that extend them, for the error messages. Bad entries raise ValueError at construction."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    hosts_key: str = "allowed_hosts"
    origins_key: str = "allowed_origins"
    _local: frozenset[str] = field(
        default_factory=local_names, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "allowed_hosts", frozenset(_host_pattern(h) for h in self.allowed_hosts)
        )
        origins = set()
        for o in self.allowed_origins:
            norm = normalize_origin(o)
            if norm is None:
                raise ValueError(
                    f"invalid allowed origin {o!r}: expected scheme://host[:port] (http or https)"
                )
            origins.add(norm)
        object.__setattr__(self, "allowed_origins", frozenset(origins))

    @classmethod
    def from_config(
        cls,
        hosts: object,
        origins: object,
        *,
        hosts_key: str = "allowed_hosts",
        origins_key: str = "allowed_origins",
    ) -> RequestGuard:
        """from TOML values (lists of strings, or None for the default); ValueError naming the key
        for anything else."""
        return cls(
            allowed_hosts=frozenset(_str_list(hosts, hosts_key)),
            allowed_origins=frozenset(_str_list(origins, origins_key)),
            hosts_key=hosts_key,
            origins_key=origins_key,
        )

    def with_hosts(self, names: Iterable[str]) -> RequestGuard:
        """this guard with more allowed host names (e.g. a TLS certificate's DNS names)."""
        return replace(self, allowed_hosts=self.allowed_hosts | frozenset(names))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if _is_ip(host) or host in self._local or "*" in self.allowed_hosts:
            return True
        if host in self.allowed_hosts:
            return True
        return any(p.startswith("*.") and host.endswith(p[1:]) for p in self.allowed_hosts)

    def check(self, request: RequestLike) -> Refusal | None:
        """the Host, Origin and Sec-Fetch-Site checks; None when the request may proceed."""
        host_header = request.headers.get("host")
        parsed = split_host(host_header) if host_header is not None else None
        if host_header is not None and parsed is None:
            return Refusal(400, f"malformed host header {host_header[:100]!r}")
        if parsed is not None and not _is_unix(request) and not self.host_allowed(parsed[0]):
            return Refusal(
                403,
                f"host not allowed: {parsed[0][:100]} (add it to {self.hosts_key} in the config to "
                "serve this name)",
            )
        origin = request.headers.get("origin")
        allowed_origin = False
        if origin is not None:
            norm = normalize_origin(origin)
            allowed_origin = norm is not None and norm in self.allowed_origins
            if not allowed_origin and (norm is None or norm != _own_origin(request, parsed)):
                return Refusal(
                    403,
                    f"cross-origin request refused: origin {origin[:200]!r} is not this "
                    f"server's (add it to {self.origins_key} in the config to allow it)",
                )
        fetch_site = request.headers.get("sec-fetch-site", "").strip().lower()
        if fetch_site in ("cross-site", "same-site") and not allowed_origin:
            return Refusal(
                403,
                f"cross-site request refused (sec-fetch-site: {fetch_site}); open the page from "
                f"this server or add the calling origin to {self.origins_key}",
            )
        return None


def _str_list(value: object, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return list(value)


def _is_unix(request: RequestLike) -> bool:
    known = getattr(request, "is_unix", None)  # a server that knows it per connection
    if known is not None:
        return bool(known)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def _own_origin(request: RequestLike, host: tuple[str, int | None] | None) -> str | None:
    if host is None:
        return None
    scheme = request.scheme if request.scheme in _DEFAULT_PORTS else "http"
    name, port = host
    if ":" in name:
        name = f"[{name}]"
    return f"{scheme}://{name}:{port or _DEFAULT_PORTS[scheme]}"


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def body_mode(request: RequestLike) -> Literal["json", "proto"] | Refusal:
    """how to decode a prpc POST body, or the 415 refusal for a content type it must not accept."""
    flag = request.query.get("json", None) in ("", "1", "true")
    raw = request.headers.get("content-type")
    if raw is None:
        return "json" if flag else "proto"
    ctype = _media_type(raw)
    if ctype in JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    if ctype in PROTO_TYPES:
        return "json" if flag else "proto"
    if ctype in SIMPLE_TYPES:
        return Refusal(
            415,
            f"content type {ctype} is refused (browsers send it cross-site without asking): "
            "send application/json, or application/octet-stream for protobuf",
        )
    return Refusal(
        415,
        f"unsupported content type {ctype[:100]!r}: send application/json, or "
        "application/octet-stream for protobuf",
    )


def get_allowed(method: str, get_methods: frozenset[str]) -> Refusal | None:
    """None when `method` may be called with GET; else the 405 refusal."""
    if method in get_methods:
        return None
    return Refusal(405, f"{method} changes state or returns secrets: call it with POST, not GET")
