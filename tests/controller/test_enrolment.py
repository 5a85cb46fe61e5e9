"""Enrolment on a real controller with sim agents over a real Mosquitto: a new host id is pending
(nothing of it is used) until an operator accepts it or it presents a one-time join token; an inventory
claiming a much larger machine puts the host back to pending; the CLI lists, accepts and forgets.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import httpx

import fleetvisor
from controller.security import auth
from controller.state.schema import SCHEMA_VERSION
from controller.state.store import Store
from protocols.vmspec import VmSpec
from tests.support.fleet import Fleet, eventually


async def _create(client: httpx.AsyncClient, name: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/api/v1/vms", json={"name": name, "memory_mib": 256, **extra}, params={"wait": 10}
    )


def _events(fleet: Fleet, type_: str) -> list[str]:
    return [e.message for e in fleet.ctl.store.events_since(0) if e.type == type_]


def test_join_tokens_and_accept_need_the_admin_role() -> None:
    """Making or accepting a host trusts a machine with VMs: that is for admins."""
    assert auth.required_role("POST", "/api/v1/tokens/join") == "admin"


async def test_an_unknown_agent_is_pending_and_holds_nothing_until_accepted(mosquitto, tmp_path):
    """The attack: any agent joined. Now a new host id is recorded as pending, its VMs are not adopted,
    the scheduler gets no capacity from it, and an event names the fix; `host accept` lets it in.
    """
    async with Fleet(mosquitto.url, tmp_path, enrolment="operator") as fleet:
        await fleet.add_agent("rogue", wait=False)
        await fleet.drivers["rogue"].define(_spec("squatter"))
        await eventually(lambda: fleet.ctl.hosts.enrolment.is_pending("rogue"), 10, "rogue pending")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            pending = (await client.get("/api/v1/hosts/pending")).json()
            assert [p["host_id"] for p in pending] == ["rogue"] and "no join token" in pending[0]["reason"]
            assert (await client.get("/api/v1/hosts")).json() == []
            await asyncio.sleep(0.5)  # inventories keep coming; none of them is reconciled
            assert fleet.ctl.store.host("rogue") is None and fleet.ctl.store.vm("squatter") is None
            assert "rogue" not in fleet.ctl.fleet_state.index
            r = await _create(client, "placed")
            assert r.status_code != 200, r.text  # no capacity anywhere: the pending host gives none
            message = _events(fleet, "host.pending")[0]
            assert "fleetvisor host accept rogue" in message
            assert len(_events(fleet, "host.pending")) == 1  # said once per agent run, not per inventory

            r = await client.post("/api/v1/hosts/nobody/accept")
            assert r.status_code == 404 and "pending hosts: rogue" in r.json()["error"]["message"], r.text
            r = await client.post("/api/v1/hosts/rogue/accept")
            assert r.status_code == 200, r.text
            await eventually(lambda: (h := fleet.ctl.store.host("rogue")) is not None and h.online, 10, "in")
            assert fleet.ctl.store.vm("squatter") is not None
            assert (await _create(client, "placed")).status_code == 200
            r = await client.post("/api/v1/hosts/rogue/accept")
            assert r.status_code == 404 and "already accepted" in r.json()["error"]["message"]


async def test_a_join_token_enrols_once_and_only_its_host(mosquitto, tmp_path):
    """A token is shown once, stored hashed, bound to its host id, and spent by the first inventory."""
    async with Fleet(mosquitto.url, tmp_path, enrolment="operator") as fleet:
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            r = await client.post("/api/v1/tokens/join", json={"host_id": "h1", "ttl_s": 60})
            assert r.status_code == 200, r.text
            token = r.json()["token"]
        rows = fleet.ctl.store.connection.execute("SELECT token_hash FROM join_tokens").fetchall()
        assert rows and token not in str(rows)
        await fleet.add_agent("h2", wait=False, join_token=token)  # the wrong host id
        await eventually(lambda: fleet.ctl.hosts.enrolment.is_pending("h2"), 10, "h2 pending")
        assert "for host 'h1'" in fleet.ctl.hosts.enrolment.table.get("h2").reason  # type: ignore[union-attr]
        await fleet.add_agent("h1", join_token=token)  # waits until h1 is online
        assert any("h1 enrolled with a join token" in m for m in _events(fleet, "host.enrolled"))
        await fleet.stop_agent("h2")
        await fleet.add_agent("h2b", wait=False, join_token=token)  # spent: no second use
        await eventually(lambda: fleet.ctl.hosts.enrolment.is_pending("h2b"), 10, "h2b pending")
        assert "unknown or was used" in fleet.ctl.hosts.enrolment.table.get("h2b").reason  # type: ignore[union-attr]


async def test_a_host_claiming_a_much_larger_machine_is_pending_again(mosquitto, tmp_path):
    """The attack: an inventory claiming a huge capacity was believed. Beyond the factor it is pending,
    with an event naming the old and new numbers, and the scheduler places nothing there.
    """
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1", cores=16, memory_mib=65536)
        await fleet.stop_agent("h1")
        await fleet.add_agent("h1", wait=False, cores=4096, memory_mib=65536)
        await eventually(lambda: fleet.ctl.hosts.enrolment.is_pending("h1"), 10, "h1 pending")
        message = _events(fleet, "host.pending")[-1]
        assert "16 cores" in message and "4096 cores" in message and "host accept h1" in message
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            assert (await _create(client, "big", vcpus=64)).status_code != 200
            await asyncio.sleep(0.3)
            host = fleet.ctl.store.host("h1")
            assert host is not None and not host.online and host.capabilities.cores == 16
            assert (await client.post("/api/v1/hosts/h1/accept")).status_code == 200
            await eventually(lambda: fleet.ctl.store.host("h1").capabilities.cores == 4096, 10, "new size")  # type: ignore[union-attr]
            assert (await _create(client, "big", vcpus=64)).status_code == 200


async def test_the_cli_lists_accepts_and_forgets_pending_hosts(mosquitto, tmp_path, capsys):
    async with Fleet(mosquitto.url, tmp_path, enrolment="operator") as fleet:
        await fleet.add_agent("p1", wait=False)
        await fleet.add_agent("p2", wait=False)
        await eventually(lambda: len(fleet.ctl.hosts.enrolment.pending()) == 2, 10, "two pending")
        url = ["--url", fleet.api_url]

        def cli(*argv: str) -> tuple[int, str]:
            code = fleetvisor.main([*argv, *url])
            out = capsys.readouterr()
            return code, out.out + out.err

        code, out = await asyncio.to_thread(cli, "host", "list", "--pending")
        assert code == 0 and "p1" in out and "p2" in out and "host accept HOST" in out
        code, out = await asyncio.to_thread(cli, "host", "accept", "p9")
        assert code != 0 and "pending hosts: p1, p2" in out
        code, out = await asyncio.to_thread(cli, "host", "accept", "p1")
        assert code == 0 and "p1 accepted" in out
        await eventually(lambda: fleet.ctl.store.host("p1") is not None, 10, "p1 in")
        await fleet.stop_agent("p2")
        code, out = await asyncio.to_thread(cli, "host", "forget", "p2")
        assert code == 0 and "p2 forgotten" in out
        assert fleet.ctl.hosts.enrolment.pending() == []
        code, out = await asyncio.to_thread(cli, "host", "join-token", "--host", "p3", "--ttl", "30")
        assert code == 0 and out.startswith("fvj-") and "shown only now" in out


def test_a_store_of_version_6_migrates_to_the_enrolment_tables(tmp_path):
    """A file from before enrolment gains its tables (its hosts count as accepted: no row)."""
    db = tmp_path / "old.sqlite"
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE enrolment")
        conn.execute("DROP TABLE join_tokens")
        conn.execute("DROP INDEX ops_parent")
        conn.execute("ALTER TABLE operations DROP COLUMN parent")
        conn.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    store = Store(db)
    try:
        version = store.connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert int(version[0]) == SCHEMA_VERSION
        assert store.connection.execute("SELECT COUNT(*) FROM enrolment").fetchone() == (0,)
    finally:
        store.close()


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, vcpus=1, memory_mib=256)
