"""what every `dstack` command shares: its error, its config directory, file reading and the
typed connection to a dstack-vmm."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from pydstack.errors import DstackError
from pydstack.rpc.sync_client import PrpcCallError, PrpcUnreachable, SyncPrpcClient

DEFAULT_URL = "http://localhost:8080"
M = TypeVar("M", bound=Message)


class CliError(DstackError):
    """a command failed; the message is printed as `error: ...`."""


def config_dir() -> Path:
    return Path(os.path.expanduser("~/.dstack-vmm"))


def load_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """a JSON object from `path`, `default` when the file is missing or not an object;
    CliError when it cannot be read or parsed."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}") from e
    return value if isinstance(value, dict) else default


def read_text(path: str) -> str:
    """a file the user named; CliError (naming it) when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from e


class VmmClient:
    """the VMM's `Vmm` service, typed: requests and responses are `vmm_rpc_pb2` messages."""

    def __init__(self, url: str, token: str = "", user: str = "", password: str = "") -> None:
        self.url = url
        self.rpc = SyncPrpcClient(url, token=token, user=user, password=password)

    def call(self, method: str, request: Message, response_type: type[M]) -> M:
        """CliError for an unreachable VMM, a refusal (its message) or a 401."""
        try:
            return self.rpc.call(method, request, response_type)
        except PrpcUnreachable as e:
            raise CliError(f"cannot reach the vmm at {self.url}: {e.__cause__}") from e
        except PrpcCallError as e:
            if e.status == 401:
                raise CliError(
                    f"{method} failed: unauthorized (set --token or DSTACK_VMM_TOKEN)"
                ) from e
            raise CliError(str(e)) from e

    def logs(self, vm_id: str, lines: int, follow: bool) -> None:
        """copy the VM's serial log to stdout (following it until interrupted)."""
        params = {"id": vm_id, "follow": str(follow).lower(), "ansi": "false", "lines": str(lines)}
        try:
            for chunk in self.rpc.stream("/logs", params):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except PrpcUnreachable as e:
            raise CliError(f"cannot reach the vmm at {self.url}: {e.__cause__}") from e
        except PrpcCallError as e:
            raise CliError(f"logs failed: {e.message}") from e
