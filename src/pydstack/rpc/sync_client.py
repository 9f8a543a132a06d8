"""a blocking prpc client (JSON mode) for command lines and scripts: typed messages in and out.

Requests are protobuf messages encoded by :mod:`pydstack.rpc.json_codec` and responses decode
into the method's response type, so a field the proto does not have cannot be sent by mistake
and one the server sends is never silently dropped by a hand-written dict.

`url` is `http://host:port`, `https://host:port` (the certificate is not verified, as
upstream's vmm-cli does: a VMM's certificate is usually self-made) or `unix:/path.sock`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from pydstack.errors import DstackError, UnavailableError

from .json_codec import CodecError, json_to_message, message_to_json, message_to_obj, obj_to_message

M = TypeVar("M", bound=Message)
#: the most of an error body quoted back to the caller
MAX_ERROR_TEXT = 500


class PrpcCallError(DstackError):
    """the server refused the call; `message` is what it said (its `error`), `status` the
    HTTP status."""

    def __init__(self, method: str, status: int, message: str) -> None:
        super().__init__(f"{method} failed: {message}")
        self.method = method
        self.status = status
        self.message = message


class PrpcUnreachable(UnavailableError):
    """the server could not be reached (connection refused, timeout, ...)."""


class SyncPrpcClient:
    """calls `<url><prefix>/<Method>?json`; `token` is sent as `Authorization: Bearer`, else
    `user`/`password` as Basic auth (both or neither)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "/prpc",
        token: str = "",
        user: str = "",
        password: str = "",
        timeout: float = 60.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = httpx.BasicAuth(user, password) if (user or password) and not token else None
        if url.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=url[5:])
            self.base = "http://localhost"
            self.http = httpx.Client(
                transport=transport, headers=headers, auth=auth, timeout=timeout
            )
        else:
            self.base = url.rstrip("/")
            self.http = httpx.Client(headers=headers, auth=auth, timeout=timeout, verify=False)
        self.url = url
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SyncPrpcClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: str, request: Message, response_type: type[M]) -> M:
        """send `request`, decode the answer into `response_type`.

        Raises PrpcUnreachable when the server cannot be reached, PrpcCallError when it
        answers with an error (401 included) or with a body that does not fit the type."""
        try:
            r = self.http.post(
                f"{self.base}{self.prefix}/{method}?json",
                content=message_to_json(request),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as e:
            raise PrpcUnreachable(f"cannot reach {self.url}: {e}") from e
        if r.status_code != 200:
            raise PrpcCallError(method, r.status_code, _error_text(r))
        out = response_type()
        try:
            json_to_message(r.content, out)
        except CodecError as e:
            raise PrpcCallError(method, r.status_code, f"unexpected response: {e}") from e
        return out

    def call_obj(self, service: ServiceDescriptor, method: str, body: Any = None) -> Any:
        """`call` for a JSON-shaped value: `body` is read into the method's request type (as the
        server would read it) and the answer comes back as the codec's JSON value."""
        m = service.methods_by_name.get(method)
        if m is None:
            raise PrpcCallError(method, 0, f"no method {method} in {service.full_name}")
        req = message_factory.GetMessageClass(m.input_type)()
        try:
            obj_to_message(body, req)
        except CodecError as e:
            raise PrpcCallError(method, 0, f"bad request: {e}") from e
        resp = self.call(method, req, message_factory.GetMessageClass(m.output_type))
        return message_to_obj(resp)

    def stream(self, path: str, params: dict[str, str]) -> Iterator[bytes]:
        """GET `path` (outside the prefix, e.g. `/logs`) and yield its body as it arrives."""
        try:
            with self.http.stream("GET", f"{self.base}{path}", params=params, timeout=None) as r:
                if r.status_code != 200:
                    r.read()
                    raise PrpcCallError(path, r.status_code, _error_text(r))
                yield from r.iter_bytes()
        except httpx.HTTPError as e:
            raise PrpcUnreachable(f"cannot reach {self.url}: {e}") from e


def _error_text(r: httpx.Response) -> str:
    if r.status_code == 401:
        return "unauthorized"
    try:
        body = json.loads(r.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:MAX_ERROR_TEXT]
    return r.text.strip()[:MAX_ERROR_TEXT] or f"http {r.status_code}"
