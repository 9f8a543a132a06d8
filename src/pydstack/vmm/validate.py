"""checks on what clients hand the VMM (app-compose files) and small formatting helpers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydstack.types.app_compose import AppCompose, AppComposeError
from pydstack.types.docker_compose import STRICT, ComposeError, ComposeProject

from .errors import Refused

MAX_COMPOSE = 50 * 1024 * 1024


class InvalidCompose(Refused):
    """an app-compose the CVM could not run."""


class _AnyEnv(Mapping[str, str]):
    """every variable set, so a compose file can be checked before its env is known."""

    def __getitem__(self, key: str) -> str:
        return "0"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def humantime(seconds: float) -> str:
    s = int(max(0, seconds))
    parts = []
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            parts.append(f"{s // n}{unit}")
            s %= n
    if s or not parts:
        parts.append(f"{s}s")
    return " ".join(parts)


def validate_app_compose(text: str) -> dict[str, Any]:
    """the app-compose must be a json object whose docker-compose file can be run.

    The docker-compose file gets the guest's checks under the strict policy, so a
    compose the CVM would refuse is refused here first; the guest still enforces them at boot.
    InvalidCompose for anything wrong; bounded like `ComposeProject.parse` and `jsonlimits.loads`.
    """
    try:
        app = AppCompose.parse(text, max_bytes=MAX_COMPOSE)
        app.key_provider_id  # noqa: B018 - a pin must be hex, as upstream parses it
        dc = app.docker_compose_file
    except AppComposeError as e:
        raise InvalidCompose(f"invalid app compose: {e}") from None
    doc = app.doc
    if not isinstance(doc.get("name", ""), str):
        raise InvalidCompose("invalid app compose: name must be a string")
    runner = doc.get("runner", "docker-compose")
    if runner != "docker-compose":
        raise InvalidCompose(
            f"invalid app compose: runner {runner!r} is not supported (docker-compose)"
        )
    try:
        ComposeProject.parse(dc, "check", _AnyEnv(), policy=STRICT)
    except ComposeError as e:
        raise InvalidCompose(f"invalid docker compose: {e}") from None
    return doc
