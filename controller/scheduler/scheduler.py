"""The scheduler: filters remove hosts, weighers rank the rest, and the decision says why.

:meth:`Scheduler.select` is a pure function of the request and the fleet state: it runs the filters
(static ones through a per-signature cache), normalises each weigher's raw numbers over the hosts left
and adds them up with the policy's multipliers, and returns a :class:`Decision` with its
explanation. Nothing changes until the caller claims (:meth:`Scheduler.claim`, or
``FleetState.claim``); the controller selects, claims and persists without an await in between, so
no other request can slip in.

:meth:`Scheduler.select_batch` plans several requests as a whole (see :mod:`.batch`). The scheduler
imports the batch planner and :mod:`.evaluation`, the filters, the weighers, the fleet state and the
request; none of them imports it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from controller.scheduler import batch as batch_planner
from controller.scheduler.evaluation import Evaluation, Rejection, sum_reasons
from controller.scheduler.explanation import BatchDecision, Decision, NoValidHost
from controller.scheduler.filters import HostFilter, default_filters
from controller.scheduler.fleet_state import (
    BoolArray,
    Claim,
    FleetState,
    FleetStateError,
    FloatArray,
    HostArrays,
    IntArray,
)
from controller.scheduler.request import PlacementRequest, format_mib
from controller.scheduler.settings import SchedulerSettings
from controller.scheduler.weighers import HostWeigher, default_weighers, normalise
from protocols.rest import Explanation, ScoredHost

#: Cache-key entry of a static filter the request does not use.
_OFF = "-"
_EMPTY_SLOTS: IntArray = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES: FloatArray = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class _StaticResult:
    hosts: int
    mask: BoolArray
    eligible: int
    filtered: tuple[tuple[str, int], ...]
    rejected: tuple[Rejection, ...]


class Scheduler:
    """Filters and weighers over one :class:`~controller.scheduler.fleet_state.HostArrays`.

    ``filters`` and ``weighers`` default to every one of them, configured from ``settings``; static
    filters always run before the others.

    Raises:
        ValueError: ``state`` was built with other capacity settings than ``settings.capacity``.
    """

    def __init__(
        self,
        state: HostArrays,
        settings: SchedulerSettings | None = None,
        *,
        filters: Iterable[HostFilter] | None = None,
        weighers: Iterable[HostWeigher] | None = None,
        cache_size: int = 1024,
    ) -> None:
        self.state = state
        self.settings = settings or SchedulerSettings()
        if state.capacity != self.settings.capacity:
            raise ValueError(
                "the fleet state and the scheduler disagree on capacity settings; build the state with "
                "FleetState.from_records(..., capacity=settings.capacity)"
            )
        chain = list(filters) if filters is not None else default_filters(self.settings)
        self.filters = [f for f in chain if f.static] + [f for f in chain if not f.static]
        self.weighers = list(weighers) if weighers is not None else default_weighers(self.settings)
        self._static_filters = [f for f in self.filters if f.static]
        self._dynamic_filters = [f for f in self.filters if not f.static]
        self._cache: dict[Hashable, _StaticResult] = {}
        self._cache_version = -1
        self._cache_size = cache_size

    # -- one request -----------------------------------------------------------------------------

    def select(self, request: PlacementRequest) -> Decision:
        """Choose a host for ``request``, or explain why none can take it. Changes nothing.

        Raises:
            UnknownPolicyError: the request names a policy the settings do not define.
        """
        return self.decide(self.evaluate(request))

    def select_and_claim(self, request: PlacementRequest) -> Decision:
        """:meth:`select`, then :meth:`claim` the host when there is one (the controller's usual call).

        Raises:
            UnknownPolicyError: the request names a policy the settings do not define.
            FleetStateError: the scheduler's state is not a FleetState.
        """
        decision = self.select(request)
        if decision.ok:
            self.claim(decision, request)
        return decision

    def claim(self, decision: Decision, request: PlacementRequest) -> Claim:
        """Claim the chosen host for ``request`` in the fleet state (O(1)).

        Raises:
            FleetStateError: the decision has no host, or the state is not a FleetState.
            OverbookError: the state changed since the decision and the host no longer fits.
        """
        state = self._fleet_state()
        if decision.host_index < 0:
            raise FleetStateError(f"vm {decision.vm!r} has no host to claim: {decision.refusal}")
        return state.claim(decision.host_index, request)

    def evaluate(self, request: PlacementRequest) -> Evaluation:
        """Run the filters and weighers for ``request`` and keep every intermediate result."""
        state = self.state
        policy = request.policy or self.settings.default_policy
        multipliers = self.settings.multipliers(policy)
        if request.source_host is not None and request.source_rack is None:
            request = self._with_source_rack(request)
        static = self._static(request)
        alive, count = static.mask, static.eligible
        filtered = dict(static.filtered)
        rejected = list(static.rejected)
        before_capacity: BoolArray | None = None
        for f in self._dynamic_filters:
            if count == 0:
                break
            if not f.applies(request):
                continue
            if f.name == "capacity":
                before_capacity = alive
            passed = alive & f.mask(state, request)
            n = int(np.count_nonzero(passed))
            filtered[f.name] = count - n
            if n != count:
                removed = alive & ~passed
                rejected.extend(
                    Rejection(r, c, f) for r, c in f.reason_counts(state, request, removed).items()
                )
            alive, count = passed, n
        parts: list[tuple[str, float, FloatArray]] = []
        slots, score = _EMPTY_SLOTS, _EMPTY_SCORES
        if count:
            slots = alive.nonzero()[0]
            score = np.zeros(count, dtype=np.float64)
            for w in self.weighers:
                multiplier = multipliers.get(w.name, 0.0)
                if multiplier == 0.0 or not w.applies(request):
                    continue
                weighted = normalise(w.weigh(state, request).take(slots), multiplier)
                if weighted is None:
                    continue
                score += weighted
                parts.append((w.name, multiplier, weighted))
        return Evaluation(
            request=request,
            policy=policy,
            hosts=static.hosts,
            filtered=filtered,
            rejected=rejected,
            alive=alive,
            count=count,
            slots=slots,
            score=score,
            parts=parts,
            before_capacity=before_capacity,
        )

    def decide(self, evaluation: Evaluation, host_index: int | None = None) -> Decision:
        """The decision for an evaluation: its best host, or ``host_index`` when the caller chose."""
        ev = evaluation
        top = ev.ranked_positions(self.settings.top_candidates)
        chosen = int(ev.slots[top[0]]) if host_index is None and top else host_index
        explanation = Explanation(
            policy=ev.policy,
            hosts=ev.hosts,
            filtered=ev.filtered,
            rejected=sum_reasons(ev.rejected),
            candidates=ev.count,
            top=[self._scored(ev, p) for p in top],
        )
        if chosen is None:
            return Decision(
                vm=ev.request.vm,
                host_id=None,
                host_index=-1,
                explanation=explanation,
                refusal=self.refusal(ev),
            )
        return Decision(
            vm=ev.request.vm,
            host_id=self.state.host_ids[chosen],
            host_index=chosen,
            explanation=explanation,
        )

    def refusal(
        self, evaluation: Evaluation, subject: str | None = None, extra: Sequence[str] = ()
    ) -> NoValidHost:
        """Why no host can take the evaluated request, as counts and as a sentence.

        ``subject`` replaces ``vm 'name'`` in the sentence (a batch names a group); ``extra`` adds
        clauses before the counts.
        """
        ev = evaluation
        request = ev.request
        what = subject or f"vm {request.vm!r}"
        head = f"no host can take {what} ({request.describe()})"
        rejected = sum_reasons(ev.rejected)
        if ev.hosts == 0:
            return NoValidHost(
                vm=request.vm,
                message=f"{head}: no hosts have joined; start an agent with `fleetvisor agent`",
                rejected=rejected,
            )
        unknown = [h for h in request.hosts if h not in self.state.index]
        if unknown and len(unknown) == len(request.hosts):
            known = ", ".join(sorted(self.state.index)[:10])
            return NoValidHost(
                vm=request.vm,
                message=f"{head}: host{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"{'are' if len(unknown) > 1 else 'is'} not known; the fleet's hosts are {known}"
                f"{', ...' if len(self.state.index) > 10 else ''}: check --host",
                rejected=rejected,
            )
        owners = {r.reason: r.owner for r in ev.rejected}
        ordered = sorted(rejected.items(), key=lambda item: -item[1])
        parts = [*extra, *(owners[reason].phrase(reason, n, request) for reason, n in ordered)]
        if unknown:
            parts.insert(
                0,
                f"{', '.join(map(repr, unknown))} in its host list {'are' if len(unknown) > 1 else 'is'} not known",
            )
        # The filter that removed the last candidates decides the numbers shown and the fix offered.
        # The VM's own host lists count last: with --host h3, why h3 refused is what to fix.
        deciding = [r for r in ev.rejected if r.owner.name != "host_affinity"] or ev.rejected
        last = deciding[-1] if deciding else None
        hint = self._numbers(ev, last.owner.name if last else "", rejected)
        fix = last.owner.fix(last.reason, request) if last else ""
        message = f"{head}: {'; '.join(parts)}{hint}" + (f". To fix: {fix}" if fix else "")
        return NoValidHost(vm=request.vm, message=message, rejected=rejected)

    def _numbers(self, ev: Evaluation, last: str, rejected: dict[str, int]) -> str:
        """The capacity figures behind a refusal the capacity filter ended: the most free of what lacked."""
        if last != "capacity" or ev.before_capacity is None:
            return ""
        vcpus, memory, disk = self.state.free(self.settings.capacity)
        shown = []
        for reason, free, unit in (
            ("memory", memory, "memory"),
            ("vcpus", vcpus, "vCPUs"),
            ("disk", disk, "disk"),
        ):
            if rejected.get(reason):
                best = max(int(free.max(where=ev.before_capacity, initial=0)), 0)
                text = (
                    format_mib(best)
                    if reason == "memory"
                    else f"{best} GiB"
                    if reason == "disk"
                    else str(best)
                )
                shown.append(f"the most free {unit} on any host is {text}")
        return "; " + "; ".join(shown) if shown else ""

    # -- batches ---------------------------------------------------------------------------------

    def select_batch(self, requests: Sequence[PlacementRequest]) -> BatchDecision:
        """Plan ``requests`` as a whole; the fleet state is the same afterwards.

        Hard affinity groups go first (one host for the whole group), then anti-affinity groups (one
        distinct host per member, matched so every member fits when any assignment does), then the
        rest, largest first. The batch is ``ok`` when every request that is not best-effort got a host.

        Raises:
            FleetStateError: the scheduler's state is not a FleetState (planning needs claims).
            UnknownPolicyError: a request names a policy the settings do not define.
        """
        return batch_planner.plan(self, self._fleet_state(), requests)

    def commit_batch(self, requests: Sequence[PlacementRequest], batch: BatchDecision) -> list[Claim | None]:
        """Claim a planned batch (the ``requests`` given to ``select_batch``, same order).

        Raises:
            FleetStateError: the batch is not ok, or the requests do not match it.
            OverbookError: the state changed since the plan; nothing is claimed then.
        """
        state = self._fleet_state()
        if not batch.ok:
            raise FleetStateError(f"cannot claim a batch that failed: {batch.message}")
        if [r.vm for r in requests] != [d.vm for d in batch.decisions]:
            raise FleetStateError("the requests are not the ones this batch was planned for")
        claims: list[Claim | None] = []
        try:
            for request, decision in zip(requests, batch.decisions, strict=True):
                claims.append(state.claim(decision.host_index, request) if decision.ok else None)
        except FleetStateError:
            for claim in claims:
                if claim is not None:
                    state.release(claim.vm, claim.host_id)
            raise
        return claims

    # -- internals -------------------------------------------------------------------------------

    def _fleet_state(self) -> FleetState:
        if not isinstance(self.state, FleetState):
            raise FleetStateError("claims need a FleetState, not bare HostArrays")
        return self.state

    def _with_source_rack(self, request: PlacementRequest) -> PlacementRequest:
        i = self.state.index.get(request.source_host or "")
        if i is None:
            return request
        rack = self.state.labels_of(i).get(self.settings.migration.rack_label)
        return request if rack is None else msgspec.structs.replace(request, source_rack=rack)

    def _static(self, request: PlacementRequest) -> _StaticResult:
        state = self.state
        if state.static_version != self._cache_version:
            self._cache.clear()
            self._cache_version = state.static_version
        key = tuple(f.key(request) if f.applies(request) else _OFF for f in self._static_filters)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        alive = state.present.copy()
        hosts = count = int(np.count_nonzero(alive))
        filtered: list[tuple[str, int]] = []
        rejected: list[Rejection] = []
        for f in self._static_filters:
            if not f.applies(request):
                continue
            passed = alive & f.mask(state, request)
            n = int(np.count_nonzero(passed))
            filtered.append((f.name, count - n))
            if n != count:
                removed = alive & ~passed
                rejected.extend(
                    Rejection(r, c, f) for r, c in f.reason_counts(state, request, removed).items()
                )
            alive, count = passed, n
        result = _StaticResult(hosts, alive, count, tuple(filtered), tuple(rejected))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = result
        return result

    def _scored(self, ev: Evaluation, p: int) -> ScoredHost:
        free_vcpus, free_memory, _ = self.state.free(self.settings.capacity)
        i = int(ev.slots[p])
        return ScoredHost(
            host_id=self.state.host_ids[i],
            score=round(float(ev.score[p]), 6),
            weights={name: round(float(weighted[p]), 6) for name, _, weighted in ev.parts},
            free_vcpus=int(free_vcpus[i]),
            free_memory_mib=int(free_memory[i]),
        )
