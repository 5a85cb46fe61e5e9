"""Decisions that explain themselves: what each filter removed, how the best hosts scored, and why not.

Every :class:`Decision` carries an :class:`Explanation`: how many hosts each filter removed (in filter
order), the same hosts counted by reason (the reasons sum to the hosts rejected), and the scores of the
top candidates per weigher. A request no host can take gets a :class:`NoValidHost` whose ``message``
a person can act on, e.g. ``no host can take vm 'web-1' (1 vCPU, 8.0 GiB RAM): 2 hosts lack memory;
1 in maintenance; the most free memory on any host is 1.5 GiB``. All of it is msgspec, so the API can
serve it as it is (``--explain``, ``--dry-run``).
"""

from __future__ import annotations

import msgspec

from protocols.rest import Explanation


class NoValidHost(msgspec.Struct, frozen=True, kw_only=True):
    """No host can take the request: the counts per reason and a message that says what to do."""

    vm: str
    message: str
    rejected: dict[str, int]
    code: str = "no_valid_host"

    @property
    def reason(self) -> str:
        """The message, under the name the first placement's ``NoValidHost`` used."""
        return self.message


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The scheduler's answer for one request: a host (or a refusal) and the explanation."""

    vm: str
    host_id: str | None
    #: Slot of the host in the fleet state, for ``FleetState.claim``; -1 when refused.
    host_index: int
    explanation: Explanation
    refusal: NoValidHost | None = None

    @property
    def ok(self) -> bool:
        return self.host_id is not None


class BatchDecision(msgspec.Struct, frozen=True, kw_only=True):
    """A plan for several requests made as a whole, in request order.

    ``ok`` is True when every request that is not best-effort got a host; only then may the plan be
    claimed (:meth:`controller.scheduler.scheduler.Scheduler.commit_batch`). A failed batch keeps the
    per-request decisions for ``--explain`` and says in ``message`` what blocked it.
    """

    ok: bool
    decisions: list[Decision]
    message: str = ""
    #: Requests left without a host (all of them when the batch failed).
    unplaced: list[str] = []
