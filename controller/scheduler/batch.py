"""Planning a batch as a whole: groups first, the most constrained first, all or nothing.

``--count 50 --group web`` is one batch. Placed greedily one VM at a time, an anti-affinity group can
end up in a corner: early members take hosts that later members were the only ones to fit. So the
planner works in units:

1. Hard **affinity** groups: the whole group is one combined request (summed resources, every
   member's constraints), and all members go to the one host it gets.
2. Hard **anti-affinity** groups: every member is evaluated on its own, then members are matched to
   distinct hosts (augmenting paths, each member trying its best-scored hosts first, the member with
   the fewest candidates first). Keeping each member's ``k`` best candidates (``k`` = members in the
   batch) loses no solution: a member with ``k`` candidates always finds one its ``k - 1`` siblings
   left free, and members with fewer keep all of theirs. So the group fits whenever any assignment
   does.
3. Everything else, largest first, one at a time, so soft groups and packing see the members placed
   before them. "Largest" is tried in up to three orders (dominant share of an average host, then
   memory, then vCPUs): the first plan that places everything wins, except under a consolidating
   policy (``pack``, ``power-saving``), where the plan that opens the fewest empty hosts does. Batches
   over ``MAX_REORDERED`` requests try the other orders only when the first one fails.

Claims are made on the live state as the plan goes and released at the end, so planning leaves the
state exactly as it found it; the caller claims the plan with ``Scheduler.commit_batch``. A request
that is not ``best_effort`` and gets no host makes the whole batch fail.

The planner asks a :class:`RequestScheduler` (in practice ``controller.scheduler.scheduler.Scheduler``,
which calls :func:`plan`) about one request at a time. It imports :mod:`.evaluation`, the explanation,
fleet state, request and settings modules, never the scheduler itself.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Protocol

import msgspec

from controller.scheduler.evaluation import Evaluation
from controller.scheduler.explanation import BatchDecision, Decision, NoValidHost
from controller.scheduler.fleet_state import Claim, FleetState
from controller.scheduler.request import PlacementRequest
from controller.scheduler.settings import SchedulerSettings
from protocols.rest import Explanation

__all__ = ["MAX_REORDERED", "ORDERS", "RequestScheduler", "match", "plan"]

#: How many refusals a failed batch's message quotes.
_QUOTED = 3
#: Orders tried for the requests outside hard groups (see the module doc).
ORDERS: tuple[str, ...] = ("share", "memory", "vcpus")
MAX_REORDERED = 256
_HARD = ("affinity", "anti-affinity")


class RequestScheduler(Protocol):
    """What the batch planner needs from a scheduler: its settings and its one-request steps."""

    @property
    def settings(self) -> SchedulerSettings:
        """The scheduler's settings (the planner reads the policies' multipliers)."""
        ...

    def select(self, request: PlacementRequest) -> Decision:
        """Choose a host for ``request`` without claiming it."""
        ...

    def evaluate(self, request: PlacementRequest) -> Evaluation:
        """Run the filters and weighers for ``request``."""
        ...

    def decide(self, evaluation: Evaluation, host_index: int | None = None) -> Decision:
        """The decision for an evaluation: its best host, or ``host_index``."""
        ...

    def refusal(
        self, evaluation: Evaluation, subject: str | None = None, extra: Sequence[str] = ()
    ) -> NoValidHost:
        """Why no host can take the evaluated request."""
        ...


def plan(
    scheduler: RequestScheduler, state: FleetState, requests: Sequence[PlacementRequest]
) -> BatchDecision:
    """Plan ``requests`` together (see the module doc); ``state`` is unchanged afterwards."""
    best: tuple[tuple[int, int], list[Decision]] | None = None
    consolidate = any(
        scheduler.settings.multipliers(r.policy).get("consolidation", 0.0) > 0 for r in requests
    )
    singles = sum(1 for r in requests if not _in_hard_group(r))
    for attempt, order in enumerate(ORDERS):
        if attempt and singles < 2:
            break  # only the order of requests outside hard groups varies between attempts
        if attempt and len(requests) > MAX_REORDERED and best is not None and best[0][0] == 0:
            break
        decisions, opened = _plan_once(scheduler, state, requests, order)
        blocking = sum(1 for r, d in zip(requests, decisions, strict=True) if not d.ok and not r.best_effort)
        unplaced = sum(1 for d in decisions if not d.ok)
        rank = (blocking, unplaced * 1_000_000 + (opened if consolidate else 0))
        if best is None or rank < best[0]:
            best = (rank, decisions)
        if not consolidate and rank[1] == 0:
            break
    assert best is not None
    return _summary(requests, best[1])


def _plan_once(
    scheduler: RequestScheduler, state: FleetState, requests: Sequence[PlacementRequest], order: str
) -> tuple[list[Decision], int]:
    """One plan in ``order``; returns the decisions and how many empty hosts it opened."""
    decisions: list[Decision | None] = [None] * len(requests)
    held: list[Claim] = []
    try:
        for kind, members in _units(state, requests, order):
            if kind == "affinity":
                _place_affinity(scheduler, state, requests, members, decisions, held)
            elif kind == "anti-affinity":
                _place_anti_affinity(scheduler, state, requests, members, decisions, held)
            else:
                request = requests[members[0]]
                decision = scheduler.select(request)
                if decision.ok:
                    held.append(state.claim(decision.host_index, request))
                decisions[members[0]] = decision
    finally:
        for claim in reversed(held):
            state.release(claim.vm, claim.host_id)
    # The state is as before the plan again: hosts without VMs now are the ones the plan opened.
    opened = sum(1 for i in {c.host_index for c in held} if state.vms[i] == 0)
    done = [d for d in decisions if d is not None]
    assert len(done) == len(requests)
    return done, opened


def _in_hard_group(request: PlacementRequest) -> bool:
    return request.group is not None and request.group_policy in _HARD


def _units(
    state: FleetState, requests: Sequence[PlacementRequest], order: str = "share"
) -> list[tuple[str, list[int]]]:
    """Hard groups (largest demand first), then single requests (largest first by ``order``)."""
    present = state.present
    mean_vcpus = float(state.cap_vcpus.mean(where=present)) if state.host_count else 1.0
    mean_memory = float(state.cap_memory_mib.mean(where=present)) if state.host_count else 1.0

    def share(r: PlacementRequest) -> float:
        return max(r.vcpus / max(mean_vcpus, 1.0), r.memory_mib / max(mean_memory, 1.0))

    def size(r: PlacementRequest) -> tuple[float, ...]:
        if order == "memory":
            return (r.memory_mib, r.vcpus)
        if order == "vcpus":
            return (r.vcpus, r.memory_mib)
        return (share(r),)

    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[int] = []
    for i, r in enumerate(requests):
        if _in_hard_group(r):
            assert r.group is not None and r.group_policy is not None
            groups.setdefault((r.group_policy, r.group), []).append(i)
        else:
            singles.append(i)
    affinity = [m for (policy, _), m in groups.items() if policy == "affinity"]
    anti = [m for (policy, _), m in groups.items() if policy == "anti-affinity"]
    affinity.sort(key=lambda m: -sum(share(requests[i]) for i in m))
    anti.sort(key=lambda m: (-len(m), -sum(share(requests[i]) for i in m)))
    singles.sort(key=lambda i: tuple(-x for x in size(requests[i])))
    return (
        [("affinity", m) for m in affinity]
        + [("anti-affinity", m) for m in anti]
        + [("single", [i]) for i in singles]
    )


def _combine(members: Sequence[PlacementRequest]) -> tuple[PlacementRequest, str]:
    """One request standing for a whole affinity group, and a conflict that makes it impossible."""
    first = members[0]
    labels: dict[str, str] = {}
    allowed: set[str] | None = None
    conflict = ""
    for r in members:
        if r.arch != first.arch:
            conflict = f"its members ask for different architectures ({first.arch}, {r.arch})"
        for attr in ("accel", "engine"):
            mine, theirs = getattr(first, attr), getattr(r, attr)
            if mine is not None and theirs is not None and mine != theirs:
                conflict = f"its members ask for different {attr} ({mine}, {theirs})"
        for key, value in r.require_labels.items():
            if labels.setdefault(key, value) != value:
                conflict = f"its members require different values of label {key} ({labels[key]}, {value})"
        if r.hosts:
            allowed = set(r.hosts) if allowed is None else allowed & set(r.hosts)
    if allowed is not None and not allowed:
        conflict = "its members' host lists have no host in common"
    combined = msgspec.structs.replace(
        first,
        vcpus=sum(r.vcpus for r in members),
        memory_mib=sum(r.memory_mib for r in members),
        disk_gib=sum(r.disk_gib for r in members),
        required_features=tuple(sorted({f for r in members for f in r.required_features})),
        require_labels=labels,
        accel=next((r.accel for r in members if r.accel is not None), None),
        engine=next((r.engine for r in members if r.engine is not None), None),
        hosts=tuple(sorted(allowed)) if allowed is not None else (),
        avoid_hosts=tuple(sorted({h for r in members for h in r.avoid_hosts})),
    )
    return combined, conflict


def _place_affinity(
    scheduler: RequestScheduler,
    state: FleetState,
    requests: Sequence[PlacementRequest],
    members: list[int],
    decisions: list[Decision | None],
    held: list[Claim],
) -> None:
    group_requests = [requests[i] for i in members]
    combined, conflict = _combine(group_requests)
    ev = scheduler.evaluate(combined)
    decision = scheduler.decide(ev)
    subject = f"affinity group {combined.group!r} ({len(members)} vms together)"
    if decision.ok and not conflict:
        for i in members:
            held.append(state.claim(decision.host_index, requests[i]))
            decisions[i] = msgspec.structs.replace(decision, vm=requests[i].vm)
        return
    if conflict:
        refusal = NoValidHost(vm=combined.vm, message=f"no host can take {subject}: {conflict}", rejected={})
    else:
        refusal = scheduler.refusal(ev, subject=subject)
    for i in members:
        decisions[i] = Decision(
            vm=requests[i].vm,
            host_id=None,
            host_index=-1,
            explanation=decision.explanation,
            refusal=msgspec.structs.replace(refusal, vm=requests[i].vm),
        )


def _place_anti_affinity(
    scheduler: RequestScheduler,
    state: FleetState,
    requests: Sequence[PlacementRequest],
    members: list[int],
    decisions: list[Decision | None],
    held: list[Claim],
) -> None:
    k = len(members)
    evaluations = [scheduler.evaluate(requests[i]) for i in members]
    candidates = [ev.ranked(k) for ev in evaluations]
    order = sorted(range(k), key=lambda j: (evaluations[j].count, j))
    assignment = match(order, candidates)
    for j, i in enumerate(members):
        ev = evaluations[j]
        host = assignment.get(j)
        if host is not None:
            held.append(state.claim(host, requests[i]))
            decisions[i] = scheduler.decide(ev, host)
        elif ev.count == 0:
            decisions[i] = scheduler.decide(ev)
        else:
            decisions[i] = _taken_by_siblings(scheduler, ev, k)


def _taken_by_siblings(scheduler: RequestScheduler, ev: Evaluation, members: int) -> Decision:
    """A member whose every candidate host went to another member of its anti-affinity group."""
    request = ev.request
    taken = ev.count
    rejected = {**ev.rejected_counts(), "group_batch": taken}
    filtered = {**ev.filtered, "group_batch": taken}
    group = f"anti-affinity group {request.group!r}"
    message = (
        f"no host can take vm {request.vm!r} ({request.describe()}): {group} needs {members} distinct "
        f"hosts in this batch and the {taken} that can take this member went to other members; "
        "add hosts, relax the group to soft-anti-affinity, or use best effort"
    )
    return Decision(
        vm=request.vm,
        host_id=None,
        host_index=-1,
        explanation=Explanation(
            policy=ev.policy, hosts=ev.hosts, filtered=filtered, rejected=rejected, candidates=0, top=[]
        ),
        refusal=NoValidHost(vm=request.vm, message=message, rejected=rejected),
    )


def match(order: Sequence[int], candidates: Sequence[Sequence[int]]) -> dict[int, int]:
    """A maximum matching of members to distinct hosts (member -> host).

    Members are taken in ``order``; each tries its ``candidates`` in the order given (best first), and
    a member whose hosts are all taken displaces others along a shortest augmenting path (BFS, so no
    recursion limit), which moves as few members as possible away from their first choice.
    """
    owner: dict[int, int] = {}
    held: dict[int, int] = {}
    for root in order:
        came_from: dict[int, int] = {}
        queue = collections.deque([root])
        found: int | None = None
        while queue and found is None:
            member = queue.popleft()
            for host in candidates[member]:
                if host in came_from:
                    continue
                came_from[host] = member
                if host not in owner:
                    found = host
                    break
                queue.append(owner[host])
        while found is not None:
            member = came_from[found]
            previous = held.get(member)
            owner[found] = member
            held[member] = found
            found = None if member == root else previous
    return held


def _summary(requests: Sequence[PlacementRequest], decisions: list[Decision]) -> BatchDecision:
    failed = [(r, d) for r, d in zip(requests, decisions, strict=True) if not d.ok]
    blocking = [(r, d) for r, d in failed if not r.best_effort]
    quoted = [d.refusal.message for _, d in (blocking or failed)[:_QUOTED] if d.refusal is not None]
    more = len(blocking or failed) - len(quoted)
    detail = "; ".join(quoted) + (f"; and {more} more" if more > 0 else "")
    if blocking:
        return BatchDecision(
            ok=False,
            decisions=decisions,
            message=(
                f"cannot place all {len(requests)} vms of the batch ({len(failed)} without a host), "
                f"so none is placed: {detail}"
            ),
            unplaced=[r.vm for r in requests],
        )
    if failed:
        return BatchDecision(
            ok=True,
            decisions=decisions,
            message=f"placed {len(requests) - len(failed)} of {len(requests)} vms (best effort): {detail}",
            unplaced=[r.vm for r, _ in failed],
        )
    return BatchDecision(ok=True, decisions=decisions)
