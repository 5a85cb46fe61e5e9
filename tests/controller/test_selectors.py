"""The selector grammar (controller.common.selectors) and the list routes that take it."""

from __future__ import annotations

import httpx
import pytest

from controller.common.selectors import SelectorError, parse
from tests.support.fleet import Fleet, create_vm

VM = {"name": "web-1", "state": "running", "host": "h1", "group": "web"}
LABELS = {"rack": "3", "tier": "web", "gpu": "", "zone": "a"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("rack=3", True),
        ("rack==3", True),
        ("rack=4", False),
        ("tier!=db", True),
        ("tier!=web", False),
        ("absent!=x", True),  # != holds when the label is absent
        ("gpu", True),
        ("!gpu", False),
        ("!spare", True),
        ("zone in (a,b)", True),
        ("zone in (b, c)", False),
        ("zone notin (b,c)", True),
        ("missing notin (b)", True),
        ("state=running,host=h1", True),
        ("state=running, host in (h2,h3)", False),
        ("group=web,rack=3,tier!=db,gpu,!spare,zone in (a,b)", True),
        ("label:state", False),  # a label named like a field
        ("name=web-1", True),
    ],
)
def test_a_selector_matches_fields_and_labels(text: str, expected: bool) -> None:
    assert parse(text, "vm").matches(VM, LABELS) is expected


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("rack=", 5, "expected a value"),
        ("rack=3,,tier", 7, "expected a label or field name"),
        ("rack=3 tier=db", 7, "expected a ',' before the next requirement"),
        ("zone in a,b", 8, "'(' to open"),
        ("zone in (a b)", 11, "',' or ')'"),
        ("zone in (a,b", 12, "',' or ')'"),
        ("rack>3", 4, "expected =, !=, in, notin"),
        ("ti$er=1", 2, "expected =, !=, in, notin"),
        ("foo:bar=1", 0, "not a name"),
    ],
)
def test_a_bad_selector_points_at_the_offending_character(text: str, position: int, words: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse(text, "vm")
    err = caught.value
    assert err.position == position, err.message
    assert words in err.message and f"at character {position + 1}" in err.message
    shown, caret = err.message.splitlines()[1:3]
    assert caret.index("^") == shown.index(text) + position  # the caret sits under the character


def test_a_field_the_kind_does_not_have_is_refused_with_the_label_spelling() -> None:
    with pytest.raises(SelectorError, match=r"hosts have no field 'group'.*label:group"):
        parse("group=web", "host")
    assert parse("label:group=web", "host").matches({}, {"group": "web"})


async def test_the_list_routes_filter_by_selector_and_refuse_a_bad_one(mosquitto, tmp_path) -> None:
    async with Fleet(mosquitto.url, tmp_path) as fleet:
        await fleet.add_agent("h1")
        await fleet.add_agent("h2")
        async with httpx.AsyncClient(base_url=fleet.api_url, timeout=30) as client:
            r = await client.patch("/api/v1/hosts/h2", json={"labels": {"rack": "3"}, "maintenance": True})
            assert r.status_code == 200, r.text
            await create_vm(client, "web-1", "h1", {"tier": "web"})
            await create_vm(client, "web-2", "h1", {"tier": "web", "gpu": "1"})
            await create_vm(client, "db-1", "h1", {"tier": "db"})
            r = await client.post("/api/v1/vms/db-1/stop", json={"force": True}, params={"wait": 10})
            assert r.status_code == 200, r.text

            async def names(path: str, selector: str) -> list[str]:
                r = await client.get(path, params={"selector": selector})
                assert r.status_code == 200, r.text
                return sorted(x.get("name") or x["host_id"] for x in r.json())

            assert await names("/api/v1/vms", "tier=web") == ["web-1", "web-2"]
            assert await names("/api/v1/vms", "tier=web,!gpu") == ["web-1"]
            assert await names("/api/v1/vms", "state=stopped") == ["db-1"]
            assert await names("/api/v1/vms", "tier in (db,web),state!=stopped,host=h1") == ["web-1", "web-2"]
            assert await names("/api/v1/hosts", "rack=3") == ["h2"]
            assert await names("/api/v1/hosts", "state=maintenance") == ["h2"]
            assert await names("/api/v1/hosts", "state=online") == ["h1"]
            r = await client.get("/api/v1/vms", params={"selector": "tier=web,,x"})
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "invalid_selector", r.text
            assert "at character 10" in error["message"] and error["detail"]["position"] == 9
