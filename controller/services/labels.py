"""An operator's labels on VMs: set and removed at any time, kept in the VM's spec in the store.

Labels are what selectors match (``vm stop -l tier=web``) and carry no meaning to the agent, so
changing one touches only the store: it is allowed in any state, during an operation too (nothing
else rewrites a VM's spec). Keys under ``fleetvisor.io/`` are the controller's own (the placement
group is one, and it stays for the VM's life) and cannot be set or removed this way.
"""

from __future__ import annotations

import msgspec

from controller.common.errors import Invalid, NotFound
from controller.state.events import EventHub
from controller.state.store import Store, VmRecord
from protocols.messages import MAX_LABELS

RESERVED_PREFIX = "fleetvisor.io/"


class VmLabels:
    """Changes the labels of VMs."""

    def __init__(self, store: Store, events: EventHub) -> None:
        self.store = store
        self.events = events

    def update(self, name: str, changes: dict[str, str | None]) -> VmRecord:
        """Set each label to its value; a None value removes it. Returns the updated record.

        Raises:
            NotFound: no such VM.
            Invalid: a reserved key, or more than ``MAX_LABELS`` labels in all; nothing is changed.
        """
        vm = self.store.vm(name)
        if vm is None:
            raise NotFound("vm_not_found", f"vm {name!r} not found; list VMs with `fleetvisor vm list`")
        reserved = sorted(k for k in changes if k.startswith(RESERVED_PREFIX))
        if reserved:
            raise Invalid(
                "reserved_label",
                f"label {reserved[0]!r} is the controller's own (keys under {RESERVED_PREFIX} are kept for "
                "the VM's life: its placement group is one); choose a key without that prefix",
                {"label": reserved[0]},
            )
        labels = {k: v for k, v in {**vm.spec.labels, **changes}.items() if v is not None}
        if len(labels) > MAX_LABELS:
            raise Invalid(
                "too_many_labels",
                f"vm {name!r} would have {len(labels)} labels, over the limit of {MAX_LABELS}; remove some "
                "with KEY- first",
            )
        if labels == vm.spec.labels:
            return vm
        spec = msgspec.structs.replace(vm.spec, labels=labels)
        self.store.set_vm_spec(name, spec)
        shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
        self.events.emit("vm.labels", f"vm {name} labels: {shown}", vm=name, host_id=vm.host_id or "")
        return msgspec.structs.replace(vm, spec=spec)
