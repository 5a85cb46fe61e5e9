"""API bearer tokens, roles, the audit log, and keeping secrets out of logs."""

from __future__ import annotations

import logging
import stat
import time
import types

import httpx

from controller.daemon import Controller, ControllerSettings
from controller.security import auth
from tests.support.fleet import FAST_BUS


def _settings(tmp_path, broker_url: str, auth: bool = True) -> ControllerSettings:
    return ControllerSettings(
        broker_url=broker_url, db_path=tmp_path / "c.sqlite", api_port=0, auth=auth, bus_overrides=FAST_BUS
    )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_roles_gate_reads_changes_and_token_management(mosquitto, tmp_path):
    """Viewer reads, operator changes VMs, admin manages tokens; each refusal names the role it needs."""
    async with Controller(_settings(tmp_path, mosquitto.url)) as controller:
        admin_file = tmp_path / "admin.token"
        assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
        admin = admin_file.read_text().strip()
        async with httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api:
            r = await api.get("/vms")
            assert r.status_code == 401 and "FLEETVISOR_TOKEN" in r.json()["error"]["message"]
            r = await api.get("/vms", headers=_bearer("fvt_not-a-real-token"))
            assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]["message"]
            assert (await api.get("/health")).status_code == 200
            assert (await api.get("/openapi.json")).status_code == 200

            tokens = {}
            for name, role in (("ann", "viewer"), ("bob", "operator")):
                r = await api.post("/tokens", json={"name": name, "role": role}, headers=_bearer(admin))
                assert r.status_code == 201, r.text
                tokens[name] = r.json()["token"]
            assert (await api.get("/vms", headers=_bearer(tokens["ann"]))).status_code == 200
            r = await api.post("/vms", json={"name": "web-1"}, headers=_bearer(tokens["ann"]))
            assert r.status_code == 403
            assert (
                r.json()["error"]["message"]
                == "POST /api/v1/vms needs the operator role; token 'ann' has viewer"
            )
            r = await api.post("/vms", json={"name": "web-1"}, headers=_bearer(tokens["bob"]))
            assert (
                r.status_code == 409 and r.json()["error"]["code"] == "no_valid_host"
            )  # allowed, but no hosts
            r = await api.post(
                "/tokens", json={"name": "eve", "role": "admin"}, headers=_bearer(tokens["bob"])
            )
            assert r.status_code == 403
            r = await api.get("/tokens", headers=_bearer(admin))
            assert sorted(t["name"] for t in r.json()) == ["admin", "ann", "bob"]
            assert all("token" not in t for t in r.json())

            assert (await api.delete("/tokens/ann", headers=_bearer(admin))).status_code == 204
            assert (await api.get("/vms", headers=_bearer(tokens["ann"]))).status_code == 401
            r = await api.delete("/tokens/ann", headers=_bearer(admin))
            assert r.status_code == 404 and "fleetvisor token list" in r.json()["error"]["message"]


async def test_every_mutating_request_is_audited_with_its_actor_and_outcome(mosquitto, tmp_path):
    """Allowed and refused changes alike land in the audit log; reads do not."""
    async with Controller(_settings(tmp_path, mosquitto.url)) as controller:
        admin = (tmp_path / "admin.token").read_text().strip()
        async with httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api:
            await api.get("/vms", headers=_bearer(admin))
            await api.post("/vms", json={"name": "x"})  # no token
            await api.post("/tokens", json={"name": "ops", "role": "operator"}, headers=_bearer(admin))
            await api.delete("/vms/nope", headers=_bearer(admin))
            audit = (await api.get("/audit", headers=_bearer(admin))).json()
    rows = [(a["actor"], a["method"], a["path"], a["status"]) for a in audit]
    assert rows == [
        ("unauthenticated", "POST", "/api/v1/vms", 401),
        ("admin", "POST", "/api/v1/tokens", 201),
        ("admin", "DELETE", "/api/v1/vms/nope", 404),
    ]


async def test_tokens_never_reach_the_logs_or_the_store_in_clear(mosquitto, tmp_path, caplog):
    """A token used and created through the API appears in no log record and not in the SQLite file."""
    caplog.set_level(logging.DEBUG)
    async with Controller(_settings(tmp_path, mosquitto.url)) as controller:
        admin = (tmp_path / "admin.token").read_text().strip()
        async with httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api:
            created = await api.post(
                "/tokens", json={"name": "ops", "role": "operator"}, headers=_bearer(admin)
            )
            ops = created.json()["token"]
            await api.get("/hosts", headers=_bearer(ops))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert admin not in text and ops not in text
    assert "admin.token" in text  # the path is logged, the secret is not
    raw = (tmp_path / "c.sqlite").read_bytes() + (
        (tmp_path / "c.sqlite-wal").read_bytes() if (tmp_path / "c.sqlite-wal").exists() else b""
    )
    assert admin.encode() not in raw and ops.encode() not in raw


async def test_without_auth_everything_is_allowed_but_changes_are_still_audited(mosquitto, tmp_path):
    """Auth off (loopback default): no token needed, no admin token written, mutations audited as anonymous."""
    async with Controller(_settings(tmp_path, mosquitto.url, auth=False)) as controller:
        assert not (tmp_path / "admin.token").exists()
        async with httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api:
            assert (await api.get("/vms")).status_code == 200
            await api.post("/vms", json={"name": "nohost"})
            audit = (await api.get("/audit")).json()
    assert [(a["actor"], a["path"], a["status"]) for a in audit] == [("anonymous", "/api/v1/vms", 409)]


async def test_unauthenticated_floods_with_long_paths_leave_a_bounded_audit_log(
    mosquitto, tmp_path, monkeypatch
):
    """300 tokenless POSTs with 4 KB paths: at most 60 rows a minute, each path cut to 256
    characters, then one summary row for the rest; the audit log grows by kilobytes, not megabytes.
    """
    clock = [1_000_000.0]
    fake = types.SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr(auth, "time", fake)
    async with (
        Controller(_settings(tmp_path, mosquitto.url)) as controller,
        httpx.AsyncClient(base_url=f"{controller.api_url}/api/v1") as api,
    ):
        for i in range(300):
            r = await api.post(f"/vms/{'p' * 4000}{i}/start")
            assert r.status_code == 401
        clock[0] += 61
        await api.post("/vms/last/start")
        assert controller.authority is not None
        rows = controller.authority.audit_since(0, 1000)
    assert len(rows) == auth.UNAUTHENTICATED_PER_MINUTE + 2
    assert all(len(row.path) <= auth.AUDIT_FIELD_MAX for row in rows)
    assert rows[0].path.endswith("(4019 characters)")
    summary = rows[-2]
    assert summary.actor == "unauthenticated" and summary.status == 401
    assert summary.detail.startswith(f"{300 - auth.UNAUTHENTICATED_PER_MINUTE} more unauthenticated requests")
    assert rows[-1].path == "/api/v1/vms/last/start"
    assert sum(len(r.path) + len(r.detail) for r in rows) < 32_000
