"""sans-I/O ingress grammar: what an SNI under a gateway base domain asks for.

``<id>[-[<port>][s|g]].<base_domain>`` (upstream's ``parse_dst_info``):

* the SNI splits at its first dot into the subdomain and the base domain;
* the subdomain splits on ``-``: the first part is the id (non-empty), at most one more part;
* in that part a trailing ``g`` is stripped first, then a trailing ``s``; both is an error (so
  ``…sg`` is refused and ``…gs`` fails as a port);
* what is left is the port (decimal, 1..65535), empty for the default: 443 with ``s``, else 80;
* no suffix: TLS terminated at the gateway, plaintext to the backend; ``s``: passthrough;
  ``g``: terminated with ALPN ``h2``, cleartext HTTP/2 to the backend.

Special ids: ``gateway`` and ``health`` answer on the gateway itself and accept only the plain
terminate mode on port 80; ``localhost`` (only with ``core.debug.insecure_localhost_backend``)
routes to 127.0.0.1 without a port policy.

Every refusal is an :class:`IngressError` (an :class:`~pydstack.errors.InputError`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydstack.errors import InputError

GATEWAY_ID = "gateway"
HEALTH_ID = "health"
LOCALHOST_ID = "localhost"

_MAX_PORT_DIGITS = 5


class IngressError(InputError):
    """the SNI does not follow the ingress grammar."""


class Mode(enum.Enum):
    """how the gateway carries a connection to its backend."""

    TERMINATE = "terminate"
    PASSTHROUGH = "passthrough"
    H2 = "h2"


class Kind(enum.Enum):
    """who answers: an app's instances, the gateway itself, or the debug localhost backend."""

    APP = "app"
    GATEWAY = "gateway"
    HEALTH = "health"
    LOCALHOST = "localhost"


@dataclass(frozen=True, slots=True)
class Destination:
    """one parsed subdomain: the app or instance id, the backend port and the mode."""

    id: str
    port: int
    mode: Mode


@dataclass(frozen=True, slots=True)
class IngressTarget:
    """a classified SNI under a gateway base domain."""

    kind: Kind
    dest: Destination
    base_domain: str


def split_sni(sni: str) -> tuple[str, str]:
    """(subdomain, base_domain) at the first dot; IngressError when there is no dot."""
    sub, dot, base = sni.partition(".")
    if not dot or not sub or not base:
        raise IngressError("invalid sni format")
    return sub, base


def parse_destination(subdomain: str) -> Destination:
    """the grammar above applied to one subdomain (the part before the base domain)."""
    parts = subdomain.split("-")
    if len(parts) > 2:
        raise IngressError("invalid sni format")
    app_id = parts[0]
    if not app_id:
        raise IngressError("invalid sni format: empty id")
    if len(parts) == 1:
        return Destination(app_id, 80, Mode.TERMINATE)
    rest = parts[1]
    h2 = rest.endswith("g")
    if h2:
        rest = rest[:-1]
    tls = rest.endswith("s")
    if tls:
        rest = rest[:-1]
    if h2 and tls:
        raise IngressError("invalid sni format: `gs` is not allowed")
    if rest:
        if len(rest) > _MAX_PORT_DIGITS or not rest.isascii() or not rest.isdigit():
            raise IngressError("invalid port")
        port = int(rest)
        if not 1 <= port <= 65535:
            raise IngressError("invalid port")
    else:
        port = 443 if tls else 80
    mode = Mode.H2 if h2 else Mode.PASSTHROUGH if tls else Mode.TERMINATE
    return Destination(app_id, port, mode)


def classify(sni: str, *, localhost_backend: bool = False) -> IngressTarget:
    """the target of an SNI already known to be under a gateway base domain (the caller checked
    that a wildcard certificate for its parent is loaded). IngressError for a bad subdomain, a
    special id with another port or mode, or `localhost` when the debug switch is off (then it
    is an ordinary id and not refused here)."""
    sub, base = split_sni(sni)
    dest = parse_destination(sub)
    if dest.id in (GATEWAY_ID, HEALTH_ID):
        if dest.port != 80 or dest.mode is not Mode.TERMINATE:
            raise IngressError(f"`{dest.id}` accepts only port 80 without a suffix")
        kind = Kind.GATEWAY if dest.id == GATEWAY_ID else Kind.HEALTH
        return IngressTarget(kind, dest, base)
    if dest.id == LOCALHOST_ID and localhost_backend:
        return IngressTarget(Kind.LOCALHOST, dest, base)
    return IngressTarget(Kind.APP, dest, base)
