"""Reconciling a host's inventory with the store (a real SQLite file): what a VM the host no longer
reports becomes, depending on the operation that last touched it.
"""

from __future__ import annotations

import time

import pytest

from controller.state.events import EventHub
from controller.state.reconcile import reconcile
from controller.state.store import Store
from protocols import messages
from tests.support.samples import BOOT_ID, HOST_ID, TS, capabilities, vm_spec


def _inventory(*names: str) -> messages.HostInventory:
    return messages.HostInventory(
        host_id=HOST_ID,
        boot_id=BOOT_ID,
        seq=1,
        ts=TS,
        agent_version="t",
        address="127.0.0.1",
        capabilities=capabilities(),
        vms=[messages.VmStatus(name=n, state="running", spec=vm_spec(n)) for n in names],
        reason="test",
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.sqlite")
    reconcile(s, EventHub(s), _inventory("web-1"))
    yield s
    s.close()


def _failed_delete(store: Store, error: str, host_id: str = HOST_ID) -> None:
    op = store.insert_operation(kind="delete", vm="web-1", host_id=host_id, params={}, deadline=time.time())
    store.finish_operation(op.op_id, "failed", error)


def test_a_vm_whose_delete_went_unanswered_and_is_gone_is_deleted(store):
    """The delete timed out (its reply was lost); the host's inventory without the VM says it was applied."""
    _failed_delete(store, "timeout: host did not answer delete of vm web-1 within 10s")
    done = reconcile(store, EventHub(store), _inventory())
    assert store.vm("web-1") is None
    assert done.deleted == ["web-1"]
    assert [e.type for e in store.events_since(0, 100)][-1] == "vm.deleted"


@pytest.mark.parametrize(
    "error",
    [
        "expired: DeleteVm arrived 2.0s after its deadline and was not applied",  # the host said no
        "engine_error: RuntimeError: disk busy",
    ],
)
def test_a_vm_whose_delete_was_refused_and_is_gone_is_missing(store, error):
    """A delete the host answered (and refused) did not remove the VM: a host without it has lost it."""
    _failed_delete(store, error)
    done = reconcile(store, EventHub(store), _inventory())
    vm = store.vm("web-1")
    assert vm is not None and vm.state == "missing"
    assert done.deleted == []


def test_an_unanswered_delete_followed_by_another_operation_does_not_delete(store):
    """Only the VM's last operation counts: a start after the timed-out delete proves the VM survived it."""
    _failed_delete(store, "timeout: no answer")
    time.sleep(0.01)
    start = store.insert_operation(kind="start", vm="web-1", host_id=HOST_ID, params={}, deadline=time.time())
    store.finish_operation(start.op_id, "succeeded")
    reconcile(store, EventHub(store), _inventory())
    vm = store.vm("web-1")
    assert vm is not None and vm.state == "missing"
