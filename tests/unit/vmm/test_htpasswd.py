"""`[auth] htpasswd_file`: bcrypt users for the VMM's Basic auth, beside its tokens."""

from __future__ import annotations

import base64
import subprocess
import sys

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pydstack.errors import ConfigError
from pydstack.rpc.auth import Htpasswd
from pydstack.vmm.backends.sandbox.network import teardown_bridge
from pydstack.vmm.service import auth_middleware


def entry(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_users_are_checked_and_a_changed_file_is_read_again(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("# operators\n" + entry("alice", "wonder") + "\n" + entry("bob", "builder"))
    h = Htpasswd.load(path)
    assert h.verify("alice", "wonder") and h.verify("bob", "builder")
    assert not h.verify("alice", "builder")
    assert not h.verify("carol", "wonder")
    assert not h.verify("alice", "")
    path.write_text(entry("alice", "new password"))
    assert not h.verify("alice", "wonder")  # remembered success forgotten with the old file
    assert h.verify("alice", "new password")
    assert not h.verify("bob", "builder")


def test_a_file_made_invalid_while_running_denies_every_login(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", "wonder"))
    h = Htpasswd.load(path)
    assert h.verify("alice", "wonder")
    path.write_text(entry("alice", "wonder") + "bob:{SHA}x\n")
    assert not h.verify("alice", "wonder")
    path.unlink()
    assert not h.verify("alice", "wonder")
    path.write_text(entry("alice", "wonder"))
    assert h.verify("alice", "wonder")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "line 1: the entry of 'alice' is not bcrypt"),
        ("# c\n\nbob:$apr1$abc$def\n", "line 3: the entry of 'bob' is not bcrypt"),
        ("alice:plaintext\n", "line 1: the entry of 'alice' is not bcrypt"),
        ("no colon here\n", "line 1: expected user:hash"),
    ],
)
def test_a_non_bcrypt_or_malformed_entry_is_refused_naming_its_line(tmp_path, text, message):
    path = tmp_path / "htpasswd"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Htpasswd.load(path)


def test_an_unreadable_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the htpasswd file"):
        Htpasswd.load(tmp_path / "missing")


async def test_the_vmm_accepts_htpasswd_users_beside_tokens(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(entry("alice", "wonder"))
    app = web.Application(middlewares=[auth_middleware(("tok",), Htpasswd.load(path))])

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/x", ok)
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/x", headers=basic("alice", "wonder"))).status == 200
        assert (await c.get("/x", headers=basic("anyone", "tok"))).status == 200
        assert (await c.get("/x", headers={"Authorization": "Bearer tok"})).status == 200
        for headers in (basic("alice", "wrong"), basic("mallory", "wonder"), basic("alice", "")):
            r = await c.get("/x", headers=headers)
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Basic realm="dstack-vmm API"'


def test_dstack_vmm_refuses_to_start_with_a_bad_htpasswd_file(tmp_path):
    bad = tmp_path / "htpasswd"
    bad.write_text(entry("alice", "wonder") + "bob:$1$md5$crypt\n")
    cfg = tmp_path / "vmm.toml"
    cfg.write_text(
        f'address = "tcp:127.0.0.1:0"\nrun_path = "{tmp_path / "run"}"\n'
        f'[image]\npath = "{tmp_path / "images"}"\n'
        '[cvm.sandbox]\nbridge = "dshtpw0"\nsubnet = "10.229.0.0/16"\n'
        f'[auth]\nenabled = true\ntokens = []\nhtpasswd_file = "{bad}"\n'
    )
    try:
        # a vmm that wrongly starts would serve forever: the timeout ends it as a failure
        proc = subprocess.run(
            [sys.executable, "-m", "pydstack.vmm.main", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        teardown_bridge("dshtpw0", "10.229.0.0/16")  # had it started, it made these
    assert proc.returncode == 2
    assert f"error: {bad} line 2: the entry of 'bob' is not bcrypt" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was made
