"""Two live agents with one host id, on a fake clock: the newer run is refused, a restart or a stale
message is not.
"""

from __future__ import annotations

import asyncio
from typing import Any

from controller.services.duplicates import DuplicateAgents, DuplicateSettings
from controller.state.events import EventHub
from controller.state.store import Store
from protocols import codec
from protocols.messages import AgentRefused

A, B, C, D, E = ("a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32)


class _Bus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, topic: str, payload: bytes, **_: Any) -> bool:
        self.sent.append((topic, codec.InboundDecoder().decode(topic, payload)))
        return True


class _Rpc:
    def __init__(self) -> None:
        self.bus = _Bus()


def _watch(tmp_path: Any, now: list[float]) -> tuple[DuplicateAgents, _Rpc, Store]:
    store = Store(tmp_path / "c.sqlite")
    rpc = _Rpc()
    return DuplicateAgents(rpc, EventHub(store), DuplicateSettings(), clock=lambda: now[0]), rpc, store  # type: ignore[arg-type]


async def test_two_runs_taking_turns_refuse_the_newer_one_and_tell_it(tmp_path) -> None:
    now = [100.0]
    watch, rpc, store = _watch(tmp_path, now)
    verdicts = []
    for boot in (A, B, A, B, A, B):
        now[0] += 0.5
        verdicts.append(watch.online("h2", boot))
    # A, B, A, B believed while it could be a restart; the fourth switch (back to A) decides
    assert verdicts == [True, True, True, True, True, False]
    assert watch.kept("h2") == A
    await asyncio.sleep(0)
    refusals = [m for _, m in rpc.bus.sent]
    assert refusals and all(isinstance(m, AgentRefused) for m in refusals)
    assert {(m.boot_id, m.kept_boot_id) for m in refusals} == {(B, A)}
    assert {t for t, _ in rpc.bus.sent} == {"fv/v1/host/h2/cmd"}
    assert not watch.believes("h2", B) and watch.believes("h2", A)
    events = [e for e in store.events_since(0) if e.type == "host.duplicate_agent"]
    assert len(events) == 1 and A[:8] in events[0].message and B[:8] in events[0].message
    # told again when it speaks again, but not more often than resend_every_s
    sent = len(rpc.bus.sent)
    now[0] += 0.1
    assert not watch.online("h2", B)
    now[0] += 2.5
    assert not watch.online("h2", B)
    await asyncio.sleep(0)
    assert len(rpc.bus.sent) == sent + 1
    await watch.close()
    store.close()


async def test_a_restart_a_crash_loop_and_one_stale_message_are_not_duplicates(tmp_path) -> None:
    now = [100.0]
    watch, rpc, store = _watch(tmp_path, now)
    for boot in (A, B, C, D, E):  # a crash loop: every run is new
        now[0] += 0.5
        assert watch.online("h1", boot)
    for boot in (A, B, A, B):  # a restart, one stale QoS 1 copy of the old run, the new run again
        now[0] += 0.5
        assert watch.online("h3", boot)
    now[0] += 60  # switches further apart than the window
    for boot in (A, B):
        now[0] += 31
        assert watch.online("h3", boot)
    await asyncio.sleep(0)
    assert rpc.bus.sent == [] and not [e for e in store.events_since(0) if e.type == "host.duplicate_agent"]
    await watch.close()
    store.close()
