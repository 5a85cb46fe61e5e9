"""The Driver's ``migrate_*`` calls on a sim host: incoming copies here, outgoing runs from here.

A destination holds an ``incoming`` copy of the VM in its :class:`hv.sim.vm_table.VmTable` until
``finish``; a source keeps a :class:`hv.sim.migration.MigrationRun` on the VM, replayed against the
clock whenever the table syncs it. Sim drivers exchange no data: the URI ``sim://HOST/NAME`` only names
where the guest goes. :class:`hv.sim.driver.SimDriver` documents each call and what it raises.

Imports :mod:`hv.driver`, :mod:`hv.sim` parts other than the driver, and :mod:`protocols`.
"""

from __future__ import annotations

from hv.driver import InvalidRequest, InvalidState, VmExists
from hv.sim.host_model import HostModel
from hv.sim.migration import MigrationEvent, MigrationRun, SavedMigration
from hv.sim.vm import Vm
from hv.sim.vm_table import VmTable
from protocols.messages import VmStatus
from protocols.migration import MigrationPolicy, MigrationSample, check_policy, policy_problems
from protocols.vmspec import VmSpec

__all__ = ["MigrationCalls"]

#: The scheme of sim migration URIs, ``sim://HOST/NAME``.
_URI_SCHEME = "sim://"


class MigrationCalls:
    """Live migrations of the VMs in ``table`` on ``host``, either side."""

    def __init__(self, *, table: VmTable, host: HostModel) -> None:
        self._table = table
        self._host = host
        self._host_id = table.host_id
        self._clock = table.clock

    def incoming(
        self, spec: VmSpec, listen_host: str, *, policy: MigrationPolicy | None = None
    ) -> tuple[VmStatus, str]:
        """Destination: hold ``spec`` in state ``incoming`` and return it with ``sim://HOST/NAME``."""
        self._table.require_open()
        uri = self.uri(spec.name)
        existing = self._table.lookup(spec.name)
        if existing is not None:
            if existing.state == "incoming":
                return existing.status(), uri
            raise VmExists(
                f"vm {spec.name!r} already exists on host {self._host_id!r} (it is {existing.state}), so it "
                "cannot be migrated here; pick another destination, or undefine the VM here first"
            )
        if policy is not None:
            _require_valid_policy(spec.name, policy)
        self._host.require_fits(spec, self._table.all())
        vm = Vm(spec, "incoming", self._host.phases(spec.name))
        self._table.add(vm)
        return vm.status(), uri

    def uri(self, name: str) -> str:
        """Where a source sends VM ``name`` to reach this host: ``sim://HOST/NAME``."""
        return f"{_URI_SCHEME}{self._host_id}/{name}"

    def send(self, name: str, uri: str, policy: MigrationPolicy) -> None:
        """Source: start migrating a running VM to ``uri`` under ``policy``."""
        vm = self._table.get(name)
        run = vm.migration
        # A completed migration is attached to by its own URI only; elsewhere, a source that was made
        # to run again (resumed by hand) may migrate anew.
        if run is not None and (run.under_way or (run.phase == "completed" and run.saved.uri == uri)):
            if run.saved.uri != uri:
                raise InvalidState(
                    f"vm {name!r} on host {self._host_id!r} is already migrating to {run.saved.uri} "
                    f"({run.phase}); cancel that migration before sending it to {uri}"
                )
            return
        if not uri.startswith(_URI_SCHEME) or uri.count("/") != 3 or not uri.endswith(f"/{name}"):
            raise InvalidRequest(
                f"vm {name!r}: {uri!r} is not a sim migration URI for it; a sim host sends only to "
                f"another sim host, to the URI its migrate_incoming returned (sim://HOST/{name})"
            )
        if uri == self.uri(name):
            raise InvalidRequest(
                f"vm {name!r}: {uri} is this host ({self._host_id!r}); migrate it to another host"
            )
        _require_valid_policy(name, policy)
        self._table.require_state(vm, "migrate", frozenset({"running"}))
        saved = SavedMigration(
            uri=uri,
            started_at=self._clock.now(),
            policy=policy,
            memory_mib=float(vm.spec.memory_mib),
            dirty_mib_s=vm.spec.workload.dirty_mib_s,
            bandwidth_mib_s=min(policy.bandwidth_mib_s, self._host.migration_bandwidth_mib_s),
        )
        vm.migration = MigrationRun(saved)
        self._table.save()

    def sample(self, name: str) -> MigrationSample:
        """Source: the migration's progress at the clock's current time; status ``none`` if none."""
        vm = self._table.get(name)
        return MigrationSample(status="none") if vm.migration is None else vm.migration.sample()

    def tune(self, name: str, *, downtime_ms: int) -> None:
        """Source: allow ``downtime_ms`` from now on; it counts from the next round's end."""
        vm = self._table.get(name)
        run = _require_precopy(self._host_id, vm, "tune")
        if downtime_ms < 1:
            raise InvalidRequest(f"vm {name!r}: downtime_ms must be at least 1, got {downtime_ms}")
        run.record(MigrationEvent(at=self._clock.now(), kind="tune", value=float(downtime_ms)))
        self._table.save()

    def postcopy(self, name: str) -> None:
        """Source: switch to post-copy; the guest leaves the source at once (``paused``, migrated)."""
        vm = self._table.get(name)
        run = _require_precopy(self._host_id, vm, "switch to post-copy")
        if not run.saved.policy.postcopy:
            raise InvalidState(
                f"vm {name!r} on host {self._host_id!r}: the migration's policy does not allow post-copy; "
                "cancel it and send again with postcopy allowed"
            )
        run.record(MigrationEvent(at=self._clock.now(), kind="postcopy"))
        self._table.sync(vm)
        self._table.save()

    def cancel(self, name: str) -> VmStatus:
        """Source: cancel a pre-copy migration under way, and make sure a paused VM runs again."""
        vm = self._table.get(name)
        run = vm.migration
        if run is not None and run.phase in ("completed", "postcopy"):
            raise InvalidState(
                f"vm {name!r} on host {self._host_id!r}: its migration to {run.saved.uri} is "
                f"{'completed' if run.phase == 'completed' else 'in post-copy'} and cannot be cancelled; "
                "the guest runs on the destination now"
            )
        if run is not None and run.under_way:
            run.record(MigrationEvent(at=self._clock.now(), kind="cancel"))
        if vm.state == "paused":
            vm.state = "running"
            vm.reason = ""
        self._table.save()
        return vm.status()

    def finish(self, name: str) -> VmStatus:
        """Destination: make the incoming copy an ordinary running VM (a running VM is returned as is)."""
        vm = self._table.get(name)
        if vm.state == "running":
            return vm.status()
        if vm.state != "incoming":
            raise InvalidState(
                f"vm {name!r} on host {self._host_id!r} is {vm.state}, not an incoming migration copy; "
                "migrate_finish applies to a VM created by migrate_incoming"
            )
        vm.state = "running"
        vm.started_at = self._clock.now()
        vm.reason = ""
        self._table.save()
        return vm.status()


def _require_valid_policy(name: str, policy: MigrationPolicy) -> None:
    problems = check_policy(policy)
    if problems:
        raise InvalidRequest(policy_problems(f"vm {name!r}", problems))


def _require_precopy(host_id: str, vm: Vm, operation: str) -> MigrationRun:
    run = vm.migration
    if run is None or run.phase not in ("precopy", "stopcopy"):
        now = "no migration" if run is None else f"its migration is {run.sample().status}"
        raise InvalidState(
            f"vm {vm.spec.name!r} on host {host_id!r}: cannot {operation}: {now}; "
            "this needs a pre-copy migration under way (start one with migrate_send)"
        )
    return run
