"""The controller's pattern with a real store: select, claim and persist together; release on undo."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from controller.scheduler import FleetState, PlacementRequest, Scheduler, SchedulingHints
from controller.state.store import Store, VmRecord
from protocols.vmspec import VmSpec
from tests.controller.scheduler.support import caps


class FlakyStore(Store):
    """A real store whose disk fails when a VM named ``boom`` is written."""

    def insert_vm(self, spec: VmSpec, *args: Any, **kwargs: Any) -> VmRecord:
        if spec.name == "boom":
            raise sqlite3.OperationalError("disk I/O error")
        return super().insert_vm(spec, *args, **kwargs)


def _create(
    store: Store, scheduler: Scheduler, spec: VmSpec, hints: SchedulingHints | None = None
) -> str | None:
    """What VmService.create does with the scheduler: no await from select to commit."""
    request = PlacementRequest.from_spec(spec, hints)
    decision = scheduler.select_and_claim(request)
    if decision.refusal is not None:
        return None
    try:
        with store.transaction():
            op = store.insert_operation(
                kind="create", vm=spec.name, host_id=decision.host_id, params={"start": True}, deadline=1e12
            )
            store.insert_vm(spec, decision.host_id, "creating", op.op_id)
    except BaseException:
        assert isinstance(scheduler.state, FleetState)
        scheduler.state.release(spec.name, decision.host_id)
        raise
    return decision.host_id


def test_state_follows_the_store_through_creates_failures_and_deletes(tmp_path):
    """After creates, deletes and a failed write, the state's usage equals the store's (no drift)."""
    store = FlakyStore(tmp_path / "c.sqlite")
    for i in range(3):
        store.upsert_host(
            host_id=f"h{i}",
            online=True,
            boot_id="b",
            address="a",
            agent_version="1",
            capabilities=caps(memory_mib=4096 + 512),
            reason="hello",
        )
    state = FleetState.from_records(store.hosts(), store.usage(), vms=store.vms())
    scheduler = Scheduler(state)
    placed = [_create(store, scheduler, VmSpec(name=f"vm-{i}", memory_mib=1024)) for i in range(12)]
    assert all(placed) and _create(store, scheduler, VmSpec(name="one-too-many", memory_mib=1024)) is None
    for i in range(0, 12, 2):
        store.delete_vm(f"vm-{i}")
        state.release(f"vm-{i}")
    assert state.resync(store.usage()) == []
    with pytest.raises(sqlite3.OperationalError):
        _create(store, scheduler, VmSpec(name="boom", memory_mib=512))
    assert not state.claims("boom") and store.vm("boom") is None
    assert state.resync(store.usage()) == []
    spread = [
        _create(store, scheduler, VmSpec(name=f"web-{i}", memory_mib=512), SchedulingHints(group="web"))
        for i in range(3)
    ]
    assert len(set(spread)) == 3 and state.resync(store.usage()) == []
    store.close()
