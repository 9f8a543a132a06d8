"""authorization backends: who may get keys.

* `dev`: allows everything, and says so loudly at start and on every grant;
* `webhook`: upstream's auth API (`POST {url}/bootAuth/app|kms` with the BootInfo, reply
  `{isAllowed, gatewayAppId, reason}`; `GET {url}` for chain info);
* `simple`: a JSON allowlist (upstream auth-simple's format), re-read when the file changes.

Every denial carries a reason the caller sees; an error inside a backend is a denial whose reason
names no backend detail (hosts, ports, exception text: those go to the log). Every backend denies
a BootInfo whose hashes do not have their exact length (`BootInfo.length_error`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from pydstack.errors import ConfigError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped_stream

from .bootinfo import BootInfo

log = logging.getLogger(__name__)
MAX_ALLOWLIST = 4 * 1024 * 1024


@dataclass(frozen=True)
class AuthDecision:
    is_allowed: bool
    gateway_app_id: str = ""
    reason: str = ""


class AuthBackend(Protocol):
    name: str
    is_dev: bool

    async def is_app_allowed(self, boot: BootInfo) -> AuthDecision: ...

    async def is_kms_allowed(self, boot: BootInfo) -> AuthDecision: ...

    async def info(self) -> dict[str, Any]: ...

    async def close(self) -> None:
        """release connections (at shutdown)."""
        ...


class DevAuth:
    name = "dev"
    is_dev = True

    def __init__(self, gateway_app_id: str = "any") -> None:
        self.gateway_app_id = gateway_app_id
        log.warning(
            "kms auth is DEV: every attested app and kms gets keys; never use in production"
        )

    async def is_app_allowed(self, boot: BootInfo) -> AuthDecision:
        if error := boot.length_error():
            return AuthDecision(False, "", error)
        log.warning("dev auth: granting keys to app %s without any policy", boot.app_id.hex())
        return AuthDecision(True, self.gateway_app_id, "")

    async def is_kms_allowed(self, boot: BootInfo) -> AuthDecision:
        if error := boot.length_error():
            return AuthDecision(False, "", error)
        log.warning("dev auth: allowing kms %s without any policy", boot.mr_aggregated.hex())
        return AuthDecision(True, self.gateway_app_id, "")

    async def close(self) -> None:
        pass

    async def info(self) -> dict[str, Any]:
        return {"gatewayAppId": self.gateway_app_id}


def is_protected_url(url: str) -> bool:
    """True for https, and for http to a loopback host (127.0.0.0/8, ::1, localhost): the only
    webhook transports an on-path attacker cannot answer for."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redacted_url(url: str) -> str:
    """`url` without credentials or query, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookAuth:
    name = "webhook"
    is_dev = False

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        if not is_protected_url(url):
            log.warning(
                "auth webhook %s is neither https nor loopback: anyone on the network path "
                "can forge its decisions and release keys; use https or a loopback address",
                redacted_url(url),
            )

    def _log_failure(self, what: str, e: BaseException) -> None:
        detail = str(e)
        password = urllib.parse.urlsplit(self.url).password
        if password:
            detail = detail.replace(password, "***")
        log.warning(
            "auth api %s at %s failed: %s: %s",
            what,
            redacted_url(self.url),
            type(e).__name__,
            detail,
        )

    async def _post(self, path: str, boot: BootInfo) -> AuthDecision:
        if error := boot.length_error():
            return AuthDecision(False, "", error)
        url = self.url.rstrip("/") + "/" + path
        try:
            async with (
                aiohttp.ClientSession(timeout=self.timeout) as s,
                s.post(url, json=boot.to_json_obj(), headers={"User-Agent": "pydstack-kms"}) as r,
            ):
                if r.status // 100 != 2:
                    return AuthDecision(False, "", f"auth api answered http {r.status}")
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self._log_failure(path, e)
            return AuthDecision(False, "", "auth api unavailable")
        if not isinstance(body, dict) or not isinstance(body.get("isAllowed"), bool):
            return AuthDecision(False, "", "auth api returned an invalid response")
        return AuthDecision(
            body["isAllowed"], str(body.get("gatewayAppId", "")), str(body.get("reason", ""))
        )

    async def is_app_allowed(self, boot: BootInfo) -> AuthDecision:
        return await self._post("bootAuth/app", boot)

    async def is_kms_allowed(self, boot: BootInfo) -> AuthDecision:
        return await self._post("bootAuth/kms", boot)

    async def close(self) -> None:
        pass

    async def info(self) -> dict[str, Any]:
        """the auth api's `GET {url}` document; raises RuntimeError("auth api unavailable" or
        the http status) with the detail logged, never in the message."""
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as s, s.get(self.url) as r:
                if r.status // 100 != 2:
                    raise RuntimeError(f"auth api info answered http {r.status}")
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self._log_failure("info", e)
            raise RuntimeError("auth api unavailable") from e
        return body if isinstance(body, dict) else {}


def _hex_set(values: Any) -> set[str]:
    if not isinstance(values, list):
        return set()
    return {"0x" + str(v).lower().removeprefix("0x") for v in values}


def _h(b: bytes) -> str:
    return "0x" + b.hex()


@dataclass
class SimpleAuth:
    """upstream auth-simple's allowlist, read from a JSON file whenever it changes."""

    path: Path
    name: str = "simple"
    is_dev: bool = False
    _mtime: float = -1.0
    _config: dict[str, Any] = field(default_factory=dict)

    def _load(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
            if st.st_mtime != self._mtime:
                if st.st_size > MAX_ALLOWLIST:
                    raise ValueError("allowlist too large")
                doc = json.loads(self.path.read_text())
                self._config = doc if isinstance(doc, dict) else {}
                self._mtime = st.st_mtime
                log.info("loaded auth allowlist %s", self.path)
        except (OSError, ValueError) as e:
            log.error("auth allowlist %s unusable, denying everything: %s", self.path, e)
            self._config, self._mtime = {}, -1.0
        return self._config

    def _common(self, c: dict[str, Any], boot: BootInfo) -> str:
        statuses = c.get("allowedTcbStatuses", ["UpToDate"])
        if boot.tcb_status not in statuses:
            return "TCB status is not allowed"
        allowed_adv = set(c.get("allowedAdvisoryIds", []))
        if any(a not in allowed_adv for a in boot.advisory_ids):
            return "advisory ID is not allowed"
        if _h(boot.os_image_hash) not in _hex_set(c.get("osImages")):
            return "OS image is not allowed"
        return ""

    @staticmethod
    def _device_ok(rule: dict[str, Any], boot: BootInfo) -> bool:
        if rule.get("allowAnyDevice"):
            return True
        devices = _hex_set(rule.get("devices"))
        return not devices or _h(boot.device_id) in devices

    async def is_app_allowed(self, boot: BootInfo) -> AuthDecision:
        c = self._load()
        gw = str(c.get("gatewayAppId", ""))
        reason = boot.length_error() or self._common(c, boot)
        if not reason:
            apps = {k.lower().removeprefix("0x"): v for k, v in (c.get("apps") or {}).items()}
            app = apps.get(boot.app_id.hex())
            if not isinstance(app, dict):
                reason = "app not registered"
            elif _h(boot.compose_hash) not in _hex_set(app.get("composeHashes")):
                reason = "compose hash not allowed"
            elif not self._device_ok(app, boot):
                reason = "app is not allowed to boot on this device"
        return AuthDecision(not reason, gw, reason)

    async def is_kms_allowed(self, boot: BootInfo) -> AuthDecision:
        c = self._load()
        gw = str(c.get("gatewayAppId", ""))
        reason = boot.length_error() or self._common(c, boot)
        kms = c.get("kms") or {}
        if not reason:
            if _h(boot.mr_aggregated) not in _hex_set(kms.get("mrAggregated")):
                reason = "aggregated MR not allowed"
            elif not self._device_ok(kms, boot):
                reason = "KMS is not allowed to boot on this device"
        return AuthDecision(not reason, gw, reason)

    async def close(self) -> None:
        pass

    async def info(self) -> dict[str, Any]:
        c = self._load()
        return {
            "status": "ok",
            "kmsContractAddr": c.get("kmsContractAddr", ""),
            "gatewayAppId": c.get("gatewayAppId", ""),
            "chainId": c.get("chainId", 0),
            "appImplementation": c.get("appImplementation", ""),
        }


#: the most bytes of a JSON-RPC answer read (two eth_call results are a few hundred bytes)
MAX_RPC_ANSWER = 1 << 20


class EthCallBatcher:
    """eth_calls to one contract sent as one JSON-RPC batch over a kept-alive connection.

    :meth:`calls` takes (calldata, ABI output types) pairs and returns the decoded outputs in
    order; any error answer, revert, short or oversized reply raises (the caller turns it into
    a denial). The answer is read at most `MAX_RPC_ANSWER` bytes."""

    def __init__(self, rpc_url: str, to: str, timeout: float = 10.0) -> None:
        self.rpc_url = rpc_url
        self.to = to
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def calls(self, calls: list[tuple[bytes, list[str]]]) -> list[tuple[Any, ...]]:
        from eth_abi.abi import decode

        body = [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "eth_call",
                "params": [{"to": self.to, "data": "0x" + data.hex()}, "latest"],
            }
            for i, (data, _) in enumerate(calls)
        ]
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        async with self._session.post(self.rpc_url, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"node answered http {r.status}")
            raw = await read_capped_stream(r.content, MAX_RPC_ANSWER)
        if len(raw) > MAX_RPC_ANSWER:
            raise RuntimeError("node's answer too large")
        answers = jsonlimits.loads(raw)
        if not isinstance(answers, list) or len(answers) != len(calls):
            raise RuntimeError("node did not answer the batch")
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        out: list[tuple[Any, ...]] = []
        for i, (_, types) in enumerate(calls):
            a = by_id.get(i)
            if a is None or "error" in a or not isinstance(a.get("result"), str):
                err = a.get("error") if a else None
                raise RuntimeError(f"eth_call failed: {err!r:.200}")
            out.append(tuple(decode(types, bytes.fromhex(a["result"].removeprefix("0x")))))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class EthAuth:
    """the DstackKms contract on an Ethereum node (chain id pinned at start).

    The constructor checks, before the KMS serves anything, that the node answers on the
    configured chain and that `kms_contract` is a DstackKms there (code, ERC-165); it raises
    ConfigError (a malformed or wrong contract address) or ChainError (node unreachable, another
    chain), each one line naming the `core.auth_api.eth` key to check."""

    name = "eth"
    is_dev = False

    def __init__(self, rpc_url: str, kms_contract: str, chain_id: int) -> None:
        from .chain import Chain, ChainError, KmsContract
        from .chain_abi import ChainInputError, parse_address

        self.rpc_url = rpc_url
        self.chain_id = chain_id
        try:
            address = parse_address(kms_contract, "kms_contract")
            self.kms = KmsContract.at(Chain.connect(rpc_url, chain_id), address)
        except ChainInputError as e:
            raise ConfigError(f"core.auth_api.eth: {e}") from None
        except ChainError as e:
            raise ChainError(f"core.auth_api.eth: {e}") from None
        self._rpc = EthCallBatcher(rpc_url, self.kms.address)
        self._abi: dict[str, tuple[bytes, list[str]]] = {}

    async def _ask(self, method: str, boot: BootInfo) -> AuthDecision:
        """one JSON-RPC batch, one round trip: the decision and the gateway app id, both read
        at the node's latest block (upstream's `isAppAllowed`/`isKmsAllowed` then
        `gatewayAppId`, which were two sequential calls through web3)."""
        from .chain import BootInfoError, boot_tuple

        try:
            args = boot_tuple(boot)  # exact sizes, or a denial saying which field is wrong
        except BootInfoError as e:
            return AuthDecision(False, "", str(e))
        fn = "isAppAllowed" if method == "is_app_allowed" else "isKmsAllowed"
        try:
            decision, gateway = await self._rpc.calls(
                [
                    (self._encode(fn, [args]), ["bool", "string"]),
                    (self._encode("gatewayAppId", []), ["string"]),
                ]
            )
        except Exception as e:
            log.error("on-chain authorization failed: %s", e)
            return AuthDecision(False, "", "authorization backend unavailable")
        return AuthDecision(bool(decision[0]), str(gateway[0]), str(decision[1]))

    def _encode(self, fn: str, args: list[Any]) -> bytes:
        """calldata of `fn(args)`; the selector and input types are taken from the ABI once
        (web3's per-call encoding rebuilt the contract object: 20 ms a call)."""
        from eth_abi.abi import encode

        if fn not in self._abi:
            from eth_utils.abi import (
                filter_abi_by_name,
                function_abi_to_4byte_selector,
                get_abi_input_types,
            )

            (f,) = filter_abi_by_name(fn, self.kms.c.abi)
            self._abi[fn] = (function_abi_to_4byte_selector(f), get_abi_input_types(f))
        selector, types = self._abi[fn]
        return selector + encode(types, args)

    async def close(self) -> None:
        await self._rpc.close()

    async def is_app_allowed(self, boot: BootInfo) -> AuthDecision:
        return await self._ask("is_app_allowed", boot)

    async def is_kms_allowed(self, boot: BootInfo) -> AuthDecision:
        return await self._ask("is_kms_allowed", boot)

    async def info(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "kmsContractAddr": self.kms.address,
            "gatewayAppId": await asyncio.to_thread(self.kms.gateway_app_id),
            "chainId": self.chain_id,
            "appImplementation": await asyncio.to_thread(self.kms.app_implementation),
        }
