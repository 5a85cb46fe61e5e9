"""Placement rules a VM keeps for its whole life: its group (with the group's one policy), required
labels and CPU features, host pins and avoids, and its scheduling policy.

They are given once, at create (``SchedulingHints``), stored with the VM, and every later move reads
them back from here: live migration (an explicit target included, unless forced with a stated
reason), evacuation and maintenance, the power service's plans and HA restarts. A group is created
with its first member and keeps that policy; a later member that asks for another is refused.

It may import ``controller.scheduler``, ``controller.state`` and ``controller.common``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from controller.common.errors import Conflict
from controller.scheduler import GROUP_LABEL, PlacementRequest, SchedulingHints
from controller.state.store import Store, VmRecord

#: The policy of a group named without one (the usual reason to name a group is to keep replicas apart).
DEFAULT_GROUP_POLICY = "anti-affinity"


def resolve_group(store: Store, hints: SchedulingHints | None) -> tuple[SchedulingHints | None, bool]:
    """``hints`` with the group's policy filled in, and whether the group is new (to be recorded).

    Raises:
        Conflict: the group exists with another policy than the one asked for.
    """
    if hints is None or hints.group is None:
        return hints, False
    fixed = store.group_policy(hints.group)
    if fixed is None:
        policy = hints.group_policy or DEFAULT_GROUP_POLICY
        return msgspec.structs.replace(hints, group_policy=policy), True
    if hints.group_policy is not None and hints.group_policy != fixed:
        raise Conflict(
            "group_policy_fixed",
            f"group {hints.group!r} is {fixed} (fixed when its first member was created); a member "
            f"cannot ask for {hints.group_policy}: drop the group policy to join it as {fixed}, or name "
            "another group",
        )
    return msgspec.structs.replace(hints, group_policy=fixed), False


def stored(hints: SchedulingHints | None) -> dict[str, Any]:
    """What is kept with the VM: the rules that apply to every later move (not ``best_effort``)."""
    if hints is None:
        return {}
    kept = msgspec.to_builtins(msgspec.structs.replace(hints, best_effort=False, start_on=None))
    return {k: v for k, v in kept.items() if v not in (None, [], {}, False)}


def rules_of(store: Store, record: VmRecord) -> SchedulingHints:
    """The placement rules ``record`` keeps (for a VM recorded before rules were kept: its group label)."""
    hints = msgspec.convert(record.hints, SchedulingHints) if record.hints else SchedulingHints()
    label = record.spec.labels.get(GROUP_LABEL)
    if hints.group is None and label is not None:
        policy = store.group_policy(label) or DEFAULT_GROUP_POLICY
        hints = msgspec.structs.replace(hints, group=label, group_policy=policy)
    return hints


def move_request(
    store: Store,
    record: VmRecord,
    *,
    to: str | None = None,
    avoid: tuple[str, ...] = (),
    dirty_mib_s: float | None = None,
    force: bool = False,
) -> PlacementRequest:
    """The scheduler's request for moving ``record`` off its host (to ``to``), under its rules.

    ``force`` keeps only the resources and the policy: the operator overrides the rules, with a reason
    the caller records.

    Raises:
        Conflict: ``to`` is not among the VM's pinned hosts, or is one it avoids.
    """
    assert record.host_id is not None
    rules = rules_of(store, record)
    if force:
        rules = SchedulingHints(policy=rules.policy)
    if to is not None and rules.hosts and to not in rules.hosts:
        raise Conflict(
            "placement_rule",
            f"vm {record.name!r} is pinned to {', '.join(rules.hosts)} (--host at create); {to!r} is not one "
            "of them: choose one of those hosts, or override with --force --reason TEXT",
        )
    if to is not None and to in rules.avoid_hosts:
        raise Conflict(
            "placement_rule",
            f"vm {record.name!r} avoids {to!r} (--avoid-host at create): choose another host, or override "
            "with --force --reason TEXT",
        )
    request = PlacementRequest.for_migration(record.spec, record.host_id, rules, dirty_mib_s)
    return msgspec.structs.replace(
        request,
        hosts=(to,) if to else request.hosts,
        avoid_hosts=tuple(dict.fromkeys((record.host_id, *request.avoid_hosts, *avoid))),
    )


def restart_request(store: Store, record: VmRecord, avoid: list[str]) -> PlacementRequest:
    """The scheduler's request for restarting ``record`` elsewhere (HA), under its rules."""
    request = PlacementRequest.from_spec(record.spec, rules_of(store, record))
    # A pinned host that failed stays in the allow list and joins the deny list: both filters apply.
    return msgspec.structs.replace(request, avoid_hosts=tuple(sorted({*request.avoid_hosts, *avoid})))
