"""Checks a host's messages must pass before the controller believes them.

A host's credentials confine it to its own topics, and the decoder refuses a message that names
another host; but within its own subtree a broken or hostile agent can still say anything. These
guards refuse what the host has no standing to say, each counted by reason and host in
:class:`GuardCounters` and logged at most once per host and reason per interval:

- ``seq``: an inventory whose sequence number jumps beyond what its agent run can have sent since
  the last one (``max_seq_step`` plus ``max_seq_rate`` per second), or one that starts a new run
  (a new boot id) with a clock far ahead of the controller's. Either would make the controller
  ignore the host's genuine inventories as older. A refused inventory changes nothing, so it cannot
  poison later ones;
- ``event``: a VM event from a host that is neither the VM's recorded host nor a side of its
  migration; migration progress from a host that is not a side of that migration;
- ``retained``: a retained message on a host's events, reply or telemetry topic. Those carry news,
  and a retained copy would be replayed at every controller (re)connect: a dead host's telemetry
  would count as a heartbeat, an old reply or event would be applied again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from controller.state.store import Store
from protocols.messages import HostInventory, MigrationProgress, VmEvent

log = logging.getLogger(__name__)

#: Topic families whose retained copies the controller ignores.
NO_RETAINED = frozenset({"events", "reply", "telemetry"})


@dataclass(frozen=True, slots=True)
class GuardSettings:
    #: An inventory may be this many sequence numbers ahead of the last one accepted from its run...
    max_seq_step: int = 1000
    #: ...plus this many per second since then.
    max_seq_rate: float = 100.0
    #: A new agent run's inventory may carry a clock this far ahead of the controller's.
    max_clock_ahead_s: float = 120.0
    log_every_s: float = 5.0


class GuardCounters:
    """Refused messages by reason and host, with rate-limited logging."""

    def __init__(self, log_every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_host: Counter[str] = Counter()
        self._log_every_s = log_every_s
        self._clock = clock
        self._logged: dict[tuple[str, str], float] = {}

    def refuse(self, reason: str, host_id: str, why: str) -> None:
        """Count one refused message and log ``why`` (at most once per host and reason per interval)."""
        self.by_reason[reason] += 1
        self.by_host[host_id] += 1
        now = self._clock()
        if now - self._logged.get((reason, host_id), -math.inf) >= self._log_every_s:
            self._logged[(reason, host_id)] = now
            log.warning("host %s: %s (%d refused from it so far)", host_id, why, self.by_host[host_id])


class SequenceGuard:
    """Whether an inventory's sequence number and clock are plausible for its agent run."""

    def __init__(self, settings: GuardSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        #: The last accepted inventory's (boot id, seq, when accepted) per host.
        self._runs: dict[str, tuple[str, int, float]] = {}

    def problem(self, message: HostInventory) -> str | None:
        """Why ``message`` is implausible, or None."""
        s = self.settings
        last = self._runs.get(message.host_id)
        if last is not None and last[0] == message.boot_id:
            bound = last[1] + s.max_seq_step + int(s.max_seq_rate * (self._clock() - last[2]))
            if message.seq > bound:
                return (
                    f"ignoring inventory #{message.seq}: the last one of this agent run was #{last[1]}, "
                    f"and a run cannot have sent more than #{bound} since (a forged or corrupt sequence "
                    "number would hide the host's real inventories)"
                )
            return None
        ahead = message.ts - time.time()
        if ahead > s.max_clock_ahead_s:
            return (
                f"ignoring inventory #{message.seq} of a new agent run: its clock is {ahead:.0f}s ahead of "
                f"the controller's (limit {s.max_clock_ahead_s:g}s); fix the host's clock (NTP)"
            )
        return None

    def accepted(self, message: HostInventory) -> None:
        """Note that ``message`` was taken as its host's newest inventory."""
        self._runs[message.host_id] = (message.boot_id, message.seq, self._clock())


def event_problem(store: Store, message: VmEvent | MigrationProgress) -> str | None:
    """Why the host that sent ``message`` has no standing to speak of its VM or migration, or None."""
    host_id = message.host_id
    if isinstance(message, MigrationProgress):
        op = store.operation(message.op_id.split(":", 1)[0])
        if op is None or op.kind != "migrate" or op.vm != message.vm:
            return f"ignoring progress of migration {message.op_id} (vm {message.vm}): no such migration"
        if host_id not in (op.params.get("from_host"), op.params.get("to_host")):
            return f"ignoring progress of migration {message.op_id} (vm {message.vm}): not one of its hosts"
        return None
    record = store.vm(message.vm)
    if record is not None:
        if host_id in (record.host_id, record.migrating_to):
            return None
        if record.op_id is not None and _migration_side(store, record.op_id, host_id):
            return None
        return f"ignoring event {message.event} of vm {message.vm}: it is recorded on {record.host_id}"
    last = store.last_operation(message.vm)
    if last is not None and last.host_id == host_id:
        return None  # the VM's record is gone (deleted), its host reports the last of it
    return f"ignoring event {message.event} of vm {message.vm}: no such vm on this host"


def _migration_side(store: Store, op_id: str, host_id: str) -> bool:
    op = store.operation(op_id)
    return (
        op is not None
        and op.kind == "migrate"
        and host_id
        in (
            op.params.get("from_host"),
            op.params.get("to_host"),
        )
    )
