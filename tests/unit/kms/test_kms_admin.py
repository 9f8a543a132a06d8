"""the kms admin listener: token auth (fail closed) and cache clearing."""

from __future__ import annotations

import httpx
import pytest

from pydstack.kms.admin import admin_server


async def test_admin_requires_a_token_and_clears_cache(tmp_path):
    with pytest.raises(ValueError, match=r"needs core\.admin\.auth_token"):
        admin_server("", tmp_path)
    (tmp_path / "images/abcd").mkdir(parents=True)
    (tmp_path / "images/beef").mkdir(parents=True)
    (tmp_path / "measurements").mkdir()
    (tmp_path / "measurements/aa.json").write_text("{}")
    server = admin_server("s3cret", tmp_path)
    port = await server.listen_tcp("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/prpc/Admin.ClearImageCache?json"
    try:
        async with httpx.AsyncClient() as c:
            r = await c.post(url, json={"image_hash": "abcd"})
            assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
            r = await c.post(url, json={"image_hash": "abcd"}, headers={"X-Admin-Token": "wrong"})
            assert r.status_code == 401
            assert (tmp_path / "images/abcd").exists()
            auth = {"Authorization": "Bearer s3cret"}
            r = await c.post(url, json={"image_hash": "abcd", "config_hash": "aa"}, headers=auth)
            assert r.status_code == 200
            assert not (tmp_path / "images/abcd").exists() and (tmp_path / "images/beef").exists()
            assert not (tmp_path / "measurements/aa.json").exists()
            r = await c.post(url, json={"image_hash": "../etc"}, headers=auth)
            assert r.status_code == 400 and "must be hex" in r.json()["error"]
            r = await c.post(url, json={"image_hash": "all"}, headers={"X-Admin-Token": "s3cret"})
            assert r.status_code == 200 and not (tmp_path / "images").exists()
    finally:
        await server.close()
