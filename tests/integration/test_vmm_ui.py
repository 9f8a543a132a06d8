"""the VMM's web UI, driven in headless Chromium over the DevTools protocol against a local stack.

No browser-automation dependency: Chromium is started with `--remote-debugging-port=0` and spoken
to over its DevTools websocket with aiohttp. Every page interaction is JavaScript evaluated in the
page (set a field and fire its input events, click a button, read the DOM).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pydstack.apps.image import hello_image
from pydstack.devstack import DevStack, free_port

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("PYDSTACK_CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 900


# ---------------------------------------------------------------------- chromium + cdp
class Chromium:
    """a headless Chromium process with its DevTools endpoint."""

    def __init__(self, workdir: Path) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        self.log = workdir / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url = ""

    def start(self) -> Chromium:
        if not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"chromium not found at {CHROMIUM} (set PYDSTACK_CHROMIUM)")
        args = [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            f"--window-size={WIDTH},{HEIGHT}",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        # a file, not a pipe: chromium logs freely and would block on a full pipe
        with open(self.log, "wb") as out:
            # its own process group, so stop() also takes the renderer and helper processes
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"DevTools listening on (ws://\S+)", self.log.read_text(errors="replace"))
            if m:
                self.ws_url = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        pytest.fail(f"chromium did not open its devtools endpoint: {log}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)


class CdpError(RuntimeError):
    pass


class Page:
    """one tab, attached over a flattened DevTools session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.session = ""
        self.dialogs: list[str] = []
        #: answers for prompt() dialogs, in order (None dismisses); confirm() is accepted
        self.prompt_answers: list[str | None] = []
        self.console: list[str] = []
        self.reader = asyncio.create_task(self._read())
        self.tasks: set[asyncio.Task[Any]] = set()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CdpError(str(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                self._event(data.get("method", ""), data.get("params", {}))
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(CdpError("the devtools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            answer: str | None = ""
            if params.get("type") == "prompt":
                answer = self.prompt_answers.pop(0) if self.prompt_answers else None
            reply = {"accept": answer is not None, "promptText": answer or ""}
            # answered from a task: the reader must stay free to receive the reply
            task = asyncio.create_task(self.send("Page.handleJavaScriptDialog", reply))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif method == "Runtime.consoleAPICalled":
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description', d)}")

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False
    ) -> dict[str, Any]:
        msg_id = next(self.ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        await self.ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, 60)

    async def open(self) -> None:
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self.session = attached["sessionId"]
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        for t in list(self.tasks):
            t.cancel()

    async def eval(self, expression: str) -> Any:
        res = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CdpError(f"{d.get('exception', {}).get('description', d)}\nin: {expression}")
        return res.get("result", {}).get("value")

    async def call(self, fn: str, *args: Any) -> Any:
        """evaluate the JavaScript function `fn` applied to JSON-encoded `args`."""
        return await self.eval(f"({fn})(...{json.dumps(list(args))})")

    async def wait(self, expression: str, what: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"timed out waiting for {what} (last value {value!r}); "
            f"error banner: {await self.error_text()!r}; console: {self.console[-10:]}"
        )

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait("document.body && document.body.dataset.ready === 'true'", "the ui")

    async def error_text(self) -> str | None:
        return await self.eval(  # type: ignore[no-any-return]
            "(() => { const e = document.getElementById('error');"
            " return e && !e.hidden ? e.textContent.trim() : null })()"
        )

    # ------------------------------------------------------------------ form helpers
    async def set(self, selector: str, value: str | bool) -> None:
        await self.call(
            """(sel, value) => {
                const el = document.querySelector(sel);
                if (!el) throw new Error(`no element ${sel}`);
                if (el.type === "checkbox") el.checked = value; else el.value = value;
                el.dispatchEvent(new Event("input", {bubbles: true}));
                el.dispatchEvent(new Event("change", {bubbles: true}));
            }""",
            selector,
            value,
        )

    async def click(self, selector: str) -> None:
        await self.call(
            """(sel) => {
                const el = document.querySelector(sel);
                if (!el) throw new Error(`no element ${sel}`);
                if (el.disabled) throw new Error(`${sel} is disabled`);
                el.click();
            }""",
            selector,
        )

    async def text(self, selector: str) -> str | None:
        return await self.call(  # type: ignore[no-any-return]
            "(sel) => { const el = document.querySelector(sel); return el && el.textContent }",
            selector,
        )


@contextlib.asynccontextmanager
async def open_page(chromium: Chromium) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(chromium.ws_url, max_msg_size=0) as ws,
    ):
        page = Page(ws)
        try:
            await page.open()
            yield page
        finally:
            await page.close()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def app_image(stack: DevStack) -> str:
    return stack.push_image(hello_image())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = DevStack(
        tmp_path_factory.mktemp("ui") / "stack", bridge="dstacktest3", subnet="10.215.0.0/16"
    )
    try:
        s.start()
        yield s
    finally:
        s.stop(remove_bridge=True)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    c = Chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield c.start()
    finally:
        c.stop()


def compose_yaml(image: str, extra_env: dict[str, str] | None = None) -> str:
    env = {"PORT": '"8080"', **(extra_env or {})}
    lines = "".join(f"      {k}: {v}\n" for k, v in env.items())
    return f"services:\n  web:\n    image: {image}\n    environment:\n{lines}"


def expected_app_compose(name: str, docker_compose: str, *, kms: bool, envs: list[str]) -> str:
    """the compact app-compose JSON the UI must build (JSON.stringify's separators)."""
    doc = {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": docker_compose,
        "kms_enabled": kms,
        "gateway_enabled": False,
        "local_key_provider_enabled": False,
        "key_provider_id": "",
        "public_logs": True,
        "public_sysinfo": True,
        "allowed_envs": envs,
        "no_instance_id": False,
        "secure_time": False,
        "key_provider": "kms" if kms else "none",
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


async def fill_deploy(
    page: Page,
    *,
    name: str,
    compose: str,
    key_provider: str = "none",
    ports: list[tuple[int, int]] | None = None,
    envs: dict[str, str] | None = None,
) -> None:
    await page.click("#open-deploy")
    await page.wait("!document.getElementById('deploy-panel').hidden", "the deploy form")
    await page.wait("document.querySelectorAll('#f-image option[value]').length > 0", "images")
    await page.set("#f-name", name)
    await page.set("#f-compose", compose)
    await page.set("#f-key-provider", key_provider)
    await page.set("#f-vcpu", "1")
    await page.set("#f-memory", "512")
    await page.set("#f-disk", "1")
    await page.set("#f-public-logs", True)
    await page.set("#f-public-sysinfo", True)
    await page.set("#f-stopped", False)
    await page.eval("document.getElementById('ports').replaceChildren()")
    for i, (host_port, vm_port) in enumerate(ports or [], 1):
        await page.click("#add-port")
        row = f"#ports .port-row:nth-child({i})"
        assert (
            await page.eval(f"document.querySelector('{row} [name=host_address]').value")
            == "127.0.0.1"
        )
        await page.set(f"{row} [name=host_port]", str(host_port))
        await page.set(f"{row} [name=vm_port]", str(vm_port))
    await page.eval("document.getElementById('envs').replaceChildren()")
    for i, (key, value) in enumerate((envs or {}).items(), 1):
        await page.click("#add-env")
        await page.set(f"#envs .env-row:nth-child({i}) [name=env_key]", key)
        await page.set(f"#envs .env-row:nth-child({i}) [name=env_value]", value)


def row(name: str) -> str:
    return f'#vm-rows tr.vm[data-vm-name="{name}"]'


async def wait_booted(page: Page, name: str, timeout: float = 120) -> str:
    """wait for the row to show the VM running with its boot done; returns the VM id."""
    sel = json.dumps(row(name))
    await page.wait(
        f"""(() => {{
            const tr = document.querySelector({sel});
            if (!tr) return false;
            const err = tr.querySelector('[data-field=boot-error]');
            if (err && !err.hidden) throw new Error('boot error shown: ' + err.textContent);
            return tr.dataset.status === 'running' && tr.dataset.bootProgress === 'done'
                && tr.querySelector('[data-field=status]').textContent === 'running'
                && tr.querySelector('[data-field=progress]').textContent === 'done';
        }})()""",
        f"{name} to be running with boot progress done",
        timeout,
    )
    vm_id = await page.eval(f"document.querySelector({sel}).dataset.vmId")
    assert isinstance(vm_id, str) and vm_id
    return vm_id


async def get_json(url: str, timeout: float = 30) -> Any:
    """GET a JSON document, retrying while the app inside the fresh CVM comes up."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return await r.json()
                    last = f"http {r.status}: {await r.text()}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = e
            await asyncio.sleep(0.3)
    raise AssertionError(f"{url} did not answer: {last}")


async def remove_via_ui(page: Page, stack: DevStack, name: str, vm_id: str) -> None:
    before = len(page.dialogs)
    await page.click(f'{row(name)} button[data-action="remove"]')
    assert len(page.dialogs) == before + 1 and name in page.dialogs[-1]
    await page.wait(f"!document.querySelector({json.dumps(row(name))})", f"{name}'s row to go")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(stack.rpc, "Status", {})
        if all(vm["id"] != vm_id for vm in status["vms"]):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"vm {vm_id} is still listed after removal")


# ---------------------------------------------------------------------- tests
async def test_ui_deploy_inspect_remove(stack: DevStack, chromium: Chromium, app_image: str):
    version = (await asyncio.to_thread(stack.rpc, "Version", {}))["version"]
    host_port = free_port()
    compose = compose_yaml(app_image)
    async with open_page(chromium) as page:
        await page.goto(stack.vmm_url + "/")
        assert await page.text("#version") == f"v{version}"
        assert re.fullmatch(r"\d+ VMs?", (await page.text("#vm-count")) or "")
        assert await page.eval("document.title") == "dstack-vmm"

        # the pure-JS fallback hash (used without crypto.subtle) agrees with hashlib
        for sample in ["", "abc", "x" * 55, "y" * 56, "z" * 64, "hé ✓ 𝄞\n" * 40]:
            js = await page.call("(s) => vmmUi.sha256js(new TextEncoder().encode(s))", sample)
            assert js == hashlib.sha256(sample.encode()).hexdigest(), sample

        await fill_deploy(page, name="ui-app", compose=compose, ports=[(host_port, 8080)])
        expected = expected_app_compose("ui-app", compose, kms=False, envs=[])
        digest = hashlib.sha256(expected.encode()).hexdigest()
        await page.wait(
            f"document.getElementById('compose-hash').textContent === '{digest}'",
            "the compose hash preview",
        )
        assert await page.text("#app-id") == digest[:40]
        # nothing scrolls sideways at 1280 px, with the form open
        assert await page.eval("document.documentElement.scrollWidth <= window.innerWidth")

        await page.click("#deploy-submit")
        vm_id = await wait_booted(page, "ui-app")
        assert vm_id in ((await page.text("#notice-text")) or "")
        assert await page.eval("document.getElementById('deploy-panel').hidden")
        assert await page.error_text() is None
        assert await page.eval("document.documentElement.scrollWidth <= window.innerWidth")

        status = await asyncio.to_thread(stack.rpc, "Status", {})
        (vm,) = [v for v in status["vms"] if v["id"] == vm_id]
        assert vm["name"] == "ui-app" and vm["app_id"] == digest[:40]
        cfg = vm["configuration"]
        assert [
            (p["protocol"], p["host_address"], p["host_port"], p["vm_port"]) for p in cfg["ports"]
        ] == [("tcp", "127.0.0.1", host_port, 8080)]
        assert cfg["compose_file"] == expected
        assert (cfg["vcpu"], cfg["memory"], cfg["disk_size"]) == (1, 512, 1)

        assert await get_json(f"http://127.0.0.1:{host_port}/health") == {"ok": True}

        # the short ids and the logs link
        r = row("ui-app")
        assert await page.text(f"{r} [data-field=app-id]") == digest[:8] + "…"
        href = await page.eval(f"document.querySelector('{r} a[data-action=logs]').href")
        assert href == f"{stack.vmm_url}/logs?id={vm_id}&follow=true&ansi=false&lines=200"
        assert (
            await page.eval(f"document.querySelector('{r} a[data-action=logs]').target") == "_blank"
        )

        # details: ids, resources, ports, events and the compose
        await page.click(f"{r} button[data-action=details]")
        details = f'#vm-rows tr[data-details-for="{vm_id}"]'
        text = await page.wait(
            f"(() => {{ const d = document.querySelector('{details}');"
            " return d && !d.hidden && d.querySelector('.kv') ? d.innerText : '' })()",
            "the details panel",
        )
        assert vm_id in text and digest[:40] in text and digest in text
        assert f"tcp 127.0.0.1:{host_port} → 8080" in text
        assert "1 vCPU · 512 MB memory · 1 GB disk" in text
        assert "boot.progress" in text and "instance.info" in text
        assert f"image: {app_image}" in text

        # the search box filters through Status's keyword
        await page.set("#search", "no-such-vm-anywhere")
        await page.wait(f"!document.querySelector('{r}')", "the filter to hide ui-app")
        await page.set("#search", "ui-")
        await page.wait(f"!!document.querySelector('{r}')", "the filter to show ui-app")
        await page.set("#search", "")

        await remove_via_ui(page, stack, "ui-app", vm_id)
        assert await page.error_text() is None, page.console


async def test_ui_shows_errors(stack: DevStack, chromium: Chromium, app_image: str):
    async with open_page(chromium) as page:
        await page.goto(stack.vmm_url + "/v1")
        await fill_deploy(page, name="ui-bad", compose="services: [")
        await page.click("#deploy-submit")
        message = await page.wait(
            "(() => { const e = document.getElementById('error');"
            " return e && !e.hidden ? e.textContent : '' })()",
            "the error banner",
        )
        assert "compose" in message.lower(), message
        # the form stays open with the input intact, so the user can fix it
        assert not await page.eval("document.getElementById('deploy-panel').hidden")
        assert await page.eval("document.getElementById('f-compose').value") == "services: ["
        await page.click("#error-close")
        assert await page.error_text() is None

        # a bad port is caught in the browser, before any request
        await page.set("#f-compose", compose_yaml(app_image))
        await page.click("#add-port")
        await page.set("#ports .port-row:last-child [name=host_port]", "70000")
        await page.set("#ports .port-row:last-child [name=vm_port]", "8080")
        await page.click("#deploy-submit")
        message = await page.wait(
            "(() => { const e = document.getElementById('error');"
            " return e && !e.hidden ? e.textContent : '' })()",
            "the port error",
        )
        assert "host port" in message, message
        status = await asyncio.to_thread(stack.rpc, "Status", {})
        assert all(v["name"] != "ui-bad" for v in status["vms"])


async def test_ui_encrypted_env(stack: DevStack, chromium: Chromium, app_image: str):
    """env vars are sealed in the browser (X25519 + AES-GCM) and decrypted inside the CVM."""
    host_port = free_port()
    secret = "s3cr3t value ✓"
    compose = compose_yaml(app_image, {"APP_SECRET": "${APP_SECRET}"})
    async with open_page(chromium) as page:
        await page.goto(stack.vmm_url + "/beta")
        await fill_deploy(
            page,
            name="ui-env",
            compose=compose,
            key_provider="kms",
            ports=[(host_port, 8080)],
            envs={"APP_SECRET": secret},
        )
        expected = expected_app_compose("ui-env", compose, kms=True, envs=["APP_SECRET"])
        digest = hashlib.sha256(expected.encode()).hexdigest()
        await page.wait(
            f"document.getElementById('compose-hash').textContent === '{digest}'",
            "the compose hash preview",
        )
        # the KMS only releases the app's keys to an allowlisted compose hash
        await asyncio.to_thread(stack.allow, {digest[:40]: [digest]})
        await page.click("#deploy-submit")
        vm_id = await wait_booted(page, "ui-env")

        info = await asyncio.to_thread(stack.info, vm_id)
        cfg = info["configuration"]
        assert cfg["compose_file"] == expected
        blob = bytes.fromhex(cfg["encrypted_env"])
        plain = json.dumps(
            {"env": [{"key": "APP_SECRET", "value": secret}]},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert len(blob) == 32 + 12 + len(plain.encode()) + 16
        assert secret.encode() not in blob

        got = await get_json(f"http://127.0.0.1:{host_port}/env?name=APP_SECRET")
        assert got == {"name": "APP_SECRET", "value": secret}
        await remove_via_ui(page, stack, "ui-env", vm_id)


async def test_ui_token_auth(tmp_path, chromium: Chromium):
    """with `[auth]` on, the UI sends its token as a bearer and asks for one on a 401."""
    token = "ui-test-token"
    s = DevStack(tmp_path / "stack", auth_token=token, bridge="dstacktest4", subnet="10.214.0.0/16")
    try:
        await asyncio.to_thread(s.start)
        version = (await asyncio.to_thread(s.rpc, "Version", {}))["version"]
        async with open_page(chromium) as page:
            # the page itself is behind the auth too: `?token=` is how a browser gets in
            await page.goto(f"{s.vmm_url}/?token={token}")
            assert await page.text("#version") == f"v{version}"
            assert await page.error_text() is None
            assert await page.eval("localStorage.getItem('dstack-vmm-token')") == token

            # a wrong token is rejected; the 401 prompts, and the right one recovers
            page.prompt_answers = ["wrong-token", token]
            await page.click("#token-btn")
            await page.wait(f"localStorage.getItem('dstack-vmm-token') === '{token}'", "token")
            await page.wait("document.getElementById('vm-count').textContent === '0 VMs'", "list")
            assert len(page.dialogs) == 2 and "401" in page.dialogs[1], page.dialogs
            assert await page.error_text() is None

            # declining the prompt leaves a visible error instead of prompting on every poll
            page.prompt_answers = ["wrong-token", None]
            await page.click("#token-btn")
            message = await page.wait(
                "(() => { const e = document.getElementById('error');"
                " return e && !e.hidden ? e.textContent : '' })()",
                "the unauthorized error",
            )
            assert "unauthorized" in message and "token" in message, message
            asked = len(page.dialogs)
            await page.eval("vmmUi.refresh()")
            assert len(page.dialogs) == asked
    finally:
        await asyncio.to_thread(s.stop, True, True)
