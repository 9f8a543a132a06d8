"""plain HTTP routes of the agent's external port: the dashboard, `/metrics`, `/logs/<name>`.

`/metrics` answers only when app-compose sets `public_sysinfo`, `/logs/<container>` only when it
sets `public_logs`; both are 403 otherwise. A container name is 1-128 characters, the first
alphanumeric, the rest alphanumeric or `_.-` (400 otherwise); it reaches `podman logs` after
`--`, so it can never be read as an option.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import re
import shutil
import time

from aiohttp import web

from pydstack.types.netaddr import ascii_decimal

from .core import GuestCore

MAX_LOG_LINES = 10000
CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_START = time.time()


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def add_routes(app: web.Application, core: GuestCore) -> None:
    async def dashboard(_: web.Request) -> web.Response:
        info = await asyncio.to_thread(core.info, external=True)
        rows = [
            ("app name", info.app_name),
            ("app id", info.app_id.hex()),
            ("instance id", info.instance_id.hex()),
            ("compose hash", info.compose_hash.hex()),
            ("mr aggregated", info.mr_aggregated.hex()),
            ("os image hash", info.os_image_hash.hex()),
            ("key provider", info.key_provider_info),
        ]
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
            for k, v in rows
        )
        tcb = html.escape(info.tcb_info) if info.tcb_info else "(hidden: public_tcbinfo is false)"
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>dstack app</title>"
            "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
            "pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>"
            f"<h1>{html.escape(info.app_name or 'dstack app')}</h1><table>{body}</table>"
            f"<h2>TCB info</h2><pre>{tcb}</pre></body></html>"
        )
        return web.Response(text=page, content_type="text/html")

    async def metrics(_: web.Request) -> web.Response:
        if not core.compose_flag("public_sysinfo", False):
            return web.Response(status=403, text="sysinfo is not public for this app\n")
        mem = _meminfo()
        load1, load5, load15 = os.getloadavg()
        disk = shutil.disk_usage("/")
        lines = [
            "# TYPE dstack_uptime_seconds gauge",
            f"dstack_uptime_seconds {time.time() - _START:.0f}",
            "# TYPE dstack_load_average gauge",
            f'dstack_load_average{{period="1m"}} {load1}',
            f'dstack_load_average{{period="5m"}} {load5}',
            f'dstack_load_average{{period="15m"}} {load15}',
            "# TYPE dstack_memory_bytes gauge",
            f'dstack_memory_bytes{{kind="total"}} {mem.get("MemTotal", 0)}',
            f'dstack_memory_bytes{{kind="available"}} {mem.get("MemAvailable", 0)}',
            "# TYPE dstack_disk_bytes gauge",
            f'dstack_disk_bytes{{kind="total"}} {disk.total}',
            f'dstack_disk_bytes{{kind="free"}} {disk.free}',
            f"dstack_cpus {os.cpu_count() or 0}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def logs(request: web.Request) -> web.StreamResponse:
        if not core.compose_flag("public_logs", False):
            return web.Response(status=403, text="logs are not public for this app\n")
        name = request.match_info["container"]
        if not CONTAINER_NAME.fullmatch(name):
            return web.Response(
                status=400,
                text="invalid container name: 1-128 of A-Z a-z 0-9 _ . -, starting alphanumeric\n",
            )
        engine = shutil.which("podman") or shutil.which("docker")
        if engine is None:
            return web.Response(status=503, text="no container engine in this cvm\n")
        q = request.query
        cmd = [engine, "logs"]
        # ASCII digits only: a negative tail is "all lines" to podman, past the cap
        numbers = {
            opt: ascii_decimal(q[opt], 19) for opt in ("tail", "since", "until") if q.get(opt)
        }
        if None in numbers.values():
            return web.Response(
                status=400, text="tail, since and until must be non-negative integers\n"
            )
        if "tail" in numbers:
            cmd += ["--tail", str(min(numbers["tail"] or 0, MAX_LOG_LINES))]
        for opt in ("since", "until"):
            if opt in numbers:
                cmd += [f"--{opt}", str(numbers[opt])]
        if q.get("timestamps") in ("true", "1"):
            cmd.append("--timestamps")
        if q.get("follow") in ("true", "1"):
            cmd.append("--follow")
        cmd += ["--", name]
        text_mode = q.get("text") in ("true", "1")
        bare = q.get("bare") in ("true", "1")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)

        async def pump(stream: asyncio.StreamReader, channel: str) -> None:
            while line := await stream.readline():
                if bare:
                    await resp.write(line)
                    continue
                message = (
                    line.decode("utf-8", "replace")
                    if text_mode
                    else base64.b64encode(line).decode()
                )
                await resp.write(
                    (json.dumps({"channel": channel, "message": message}) + "\n").encode()
                )

        assert proc.stdout is not None and proc.stderr is not None
        try:
            await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await resp.write_eof()
        return resp

    app.router.add_get("/", dashboard)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/logs/{container}", logs)
