"""a minimal QMP client: one command on a QEMU's monitor socket (`system_powerdown`, `quit`).

QMP is line-delimited JSON: the server greets, the client negotiates capabilities, then each
command gets a `return` or an `error` (asynchronous events in between are skipped).
Errors: :class:`QmpError` (socket unreachable, an error reply, or no reply in time).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pydstack.errors import UnavailableError

MAX_LINE = 1 << 20


class QmpError(UnavailableError):
    """QEMU's monitor could not be asked or refused."""


async def _reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    while True:
        line = await reader.readline()
        if not line:
            raise QmpError("qmp connection closed")
        msg = json.loads(line)
        if isinstance(msg, dict) and ("return" in msg or "error" in msg or "QMP" in msg):
            return msg


async def qmp_command(socket: Path, command: str, timeout: float = 5.0) -> Any:
    """run `command` on the QMP socket; its `return` value."""

    async def run() -> Any:
        reader, writer = await asyncio.open_unix_connection(str(socket), limit=MAX_LINE)
        try:
            await _reply(reader)  # the greeting
            for cmd in ("qmp_capabilities", command):
                writer.write(json.dumps({"execute": cmd}).encode() + b"\n")
                await writer.drain()
                msg = await _reply(reader)
                if "error" in msg:
                    desc = msg["error"].get("desc", "") if isinstance(msg["error"], dict) else ""
                    raise QmpError(f"qmp {cmd} failed: {desc}")
            return msg.get("return")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError as e:
        raise QmpError(f"qmp {command}: no answer in {timeout:.0f} s") from e
    except (OSError, ValueError) as e:
        raise QmpError(f"qmp {command}: {e}") from e
