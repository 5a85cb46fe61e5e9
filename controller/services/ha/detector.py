"""Host failure detection in layers: heartbeat gaps (phi accrual) and the MQTT Last Will.

A host moves ``up -> suspect -> failed``, and each move carries its reason:
- The Last Will ("connection lost") makes a host suspect at once. It fails when it stays gone for
  ``will_confirm_s``, which absorbs a broker hiccup that the agent survives by reconnecting.
- A heartbeat gap (telemetry stops while the TCP session looks alive) is scored with phi accrual
  (Hayashibara et al., as in Akka and Cassandra). The host is suspect at ``suspect_phi`` and failed at
  ``fail_phi``. A jittery link raises the mean and spread of the intervals, so phi adapts, where a
  fixed timeout would not.
- An agent that stops cleanly ("agent stopped") is offline, not failed. Its VMs outlive it, so there
  is nothing to fence or restart.
- **Storm guard**: when more than ``storm_fraction`` of the hosts go bad within one window, the cause
  is the broker or the network, not the hosts. Nobody is declared failed; the detector holds and
  reports until the storm clears, then restarts every heartbeat clock (:meth:`FailureDetector.rearm`)
  so that hosts still reconnecting are not failed for silence nobody could hear. The controller
  does the same when its own connection to the broker comes back.
- **Contested session**: a host whose connection flaps (``contest_flaps`` offline/online changes
  within ``contest_window_s``: a second agent with its host id, or someone knocking its session off
  the broker) is held as suspect, never failed on a gap or a Last Will alone, until it has been
  quiet for the window. Fencing a host because its session is being fought over would let an
  attacker kill it and have its VMs started elsewhere.
- **Reconnect grace**: after a rearm, hosts get ``reconnect_grace_s`` (the agents' longest reconnect
  backoff plus a margin) to come back before silence can fail them; they may be suspect meanwhile.

The detector is pure: time is passed in, so tests run it on a fake clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

HostHealth = Literal["up", "suspect", "failed", "offline"]


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    suspect_phi: float = 5.0
    fail_phi: float = 10.0
    #: After a Last Will, how long the host must stay gone before it is failed.
    will_confirm_s: float = 1.0
    min_std_s: float = 0.1
    #: Slack added to the mean interval: a GC pause or a slow sample is not a failure.
    acceptable_pause_s: float = 0.5
    window: int = 100
    #: More than this share of the hosts going bad at once is a storm, not host failures.
    storm_fraction: float = 0.5
    #: Storm guard needs at least this many hosts to judge a share.
    storm_min_hosts: int = 3
    #: After a rearm, no host is failed for silence before this many seconds: agents reconnect with a
    #: jittered backoff of up to 5 s (``BusSettings.backoff_max_s``), and a host still waiting out its
    #: backoff is not dead.
    reconnect_grace_s: float = 6.0
    #: This many connection changes (online or lost) within ``contest_window_s`` make a host's
    #: session contested: it is not failed on silence or a Last Will until they stop.
    contest_flaps: int = 3
    contest_window_s: float = 30.0


class PhiAccrual:
    """Phi accrual failure detector over one host's heartbeat intervals.

    The mean and spread come from running sums, so a heartbeat and a look cost O(1) whatever the
    window: the HA loop looks at every host ten times a second. The sums are recomputed from the
    window once per ``window`` heartbeats, so float error cannot build up.
    """

    __slots__ = ("_since_exact", "_squares", "_sum", "intervals", "last", "settings")

    def __init__(self, settings: DetectorSettings, first_interval_s: float = 1.0) -> None:
        self.settings = settings
        self.intervals: deque[float] = deque(maxlen=settings.window)
        self.last: float | None = None
        self._sum = self._squares = 0.0
        self._since_exact = 0
        for _ in range(2):
            self._add(first_interval_s)

    def _add(self, interval: float) -> None:
        intervals = self.intervals
        if len(intervals) == intervals.maxlen:
            oldest = intervals[0]
            self._sum -= oldest
            self._squares -= oldest * oldest
        intervals.append(interval)
        self._sum += interval
        self._squares += interval * interval
        self._since_exact += 1
        if self._since_exact >= len(intervals):
            self._sum = math.fsum(intervals)
            self._squares = math.fsum(x * x for x in intervals)
            self._since_exact = 0

    def heartbeat(self, now: float) -> None:
        if self.last is not None:
            self._add(max(0.0, now - self.last))
        self.last = now

    def mean(self) -> float:
        return self._sum / len(self.intervals)

    def phi(self, now: float) -> float:
        """Suspicion that the host is gone: -log10 P(a heartbeat arrives later than now)."""
        if self.last is None:
            return 0.0
        n = len(self.intervals)
        mean = self._sum / n
        variance = max(0.0, self._squares / n - mean * mean)
        std = max(math.sqrt(variance), self.settings.min_std_s)
        y = (now - self.last - mean - self.settings.acceptable_pause_s) / std
        # Logistic approximation of the normal CDF (as Akka does): stable far into the tail.
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        p_later = e / (1.0 + e) if y > 0 else 1.0 - 1.0 / (1.0 + e)
        return -math.log10(max(p_later, 1e-300))

    def on_time(self, now: float) -> bool:
        """Whether the next heartbeat is not yet due (past the mean and the pause allowance): then
        phi is below 0.3, far under any threshold, and need not be computed.
        """
        return (
            self.last is None
            or now - self.last <= self._sum / len(self.intervals) + self.settings.acceptable_pause_s
        )


@dataclass(slots=True)
class _Host:
    detector: PhiAccrual
    state: HostHealth = "up"
    since: float = 0.0
    reason: str = ""
    gone_at: float | None = None
    gone_reason: str = ""
    #: When its connection changed lately (online or lost), to tell a contested session.
    flaps: deque[float] = field(default_factory=lambda: deque(maxlen=64))


@dataclass(frozen=True, slots=True)
class Transition:
    host_id: str
    old: HostHealth
    new: HostHealth
    reason: str


@dataclass(slots=True)
class FailureDetector:
    settings: DetectorSettings = field(default_factory=DetectorSettings)
    hosts: dict[str, _Host] = field(default_factory=dict)
    storm: bool = False
    #: Until this time (after a rearm) silence alone fails no host.
    grace_until: float = 0.0

    def _host(self, host_id: str) -> _Host:
        host = self.hosts.get(host_id)
        if host is None:
            host = self.hosts[host_id] = _Host(PhiAccrual(self.settings))
        return host

    def heartbeat(self, host_id: str, now: float) -> None:
        host = self._host(host_id)
        host.detector.heartbeat(now)
        host.gone_at = None

    def connection_lost(self, host_id: str, now: float, reason: str) -> None:
        """The Last Will arrived."""
        host = self._host(host_id)
        host.flaps.append(now)
        if host.gone_at is None:
            host.gone_at, host.gone_reason = now, reason

    def connected(self, host_id: str, now: float) -> None:
        """The host's agent (re)connected: one more connection change, counted for contest."""
        self._host(host_id).flaps.append(now)

    def contested(self, host_id: str, now: float) -> int:
        """How many connection changes ``host_id`` had within the window, when that makes its
        session contested; 0 otherwise.
        """
        host = self.hosts.get(host_id)
        if host is None:
            return 0
        recent = sum(1 for t in host.flaps if now - t <= self.settings.contest_window_s)
        return recent if recent >= self.settings.contest_flaps else 0

    def stopped_cleanly(self, host_id: str, now: float) -> None:
        host = self._host(host_id)
        host.state, host.since, host.reason = "offline", now, "agent stopped cleanly; its VMs keep running"
        host.gone_at = None

    def rearm(self, now: float) -> None:
        """Restart every heartbeat clock at ``now``.

        Used when the observer itself was cut off (the controller lost the broker) or a storm ends:
        silence we could not have heard is no evidence against a host. Last Wills seen so far are
        dropped too: a broker that shuts down publishes the will of every client it drops. A host
        that is really gone says so again through its retained offline state, or by staying silent.
        """
        for host in self.hosts.values():
            if host.detector.last is not None:
                host.detector.last = now
            host.gone_at = None
        self.grace_until = now + self.settings.reconnect_grace_s

    def forget(self, host_id: str) -> None:
        self.hosts.pop(host_id, None)

    def state(self, host_id: str) -> HostHealth:
        host = self.hosts.get(host_id)
        return host.state if host else "up"

    def tick(self, now: float) -> list[Transition]:
        """Re-evaluate every host; return the state changes, in host order."""
        wanted: list[tuple[str, _Host, HostHealth, str]] = []
        bad = counted = 0
        for host_id, host in self.hosts.items():
            if host.state == "up" and host.gone_at is None and host.detector.on_time(now):
                counted += 1  # the common case, kept cheap: the loop sees every host 10 times a second
                continue
            state, reason = self._evaluate(host, now)
            counted += host.state != "offline"
            bad += state in ("suspect", "failed")
            if state != host.state:
                wanted.append((host_id, host, state, reason))
        self.storm = counted >= self.settings.storm_min_hosts and bad > self.settings.storm_fraction * counted
        changes = []
        for host_id, host, state, reason in sorted(wanted, key=lambda w: w[0]):
            contested = False
            if state == "failed" and host.state != "failed":
                hold, contested = self._hold(host_id, now, bad, counted)
                if hold:
                    state, reason = "suspect", f"{reason}; {hold}"
            if state != host.state or (contested and "contested" not in host.reason):
                changes.append(Transition(host_id, host.state, state, reason))
                host.state, host.since, host.reason = state, now, reason
        return changes

    def _hold(self, host_id: str, now: float, bad: int, counted: int) -> tuple[str, bool]:
        """Why a host that looks failed is held as suspect (and whether for a contested session), or
        ("", False) to fail it.
        """
        flaps = self.contested(host_id, now)
        if flaps:
            return (
                f"held: its session is contested ({flaps} connection changes within "
                f"{self.settings.contest_window_s:g}s: another agent with its host id, or its session "
                "knocked off the broker), so silence alone does not fail it",
                True,
            )
        if self.storm:
            return f"held by the storm guard ({bad} of {counted} hosts)", False
        if now < self.grace_until:
            return f"held {self.grace_until - now:.1f}s more while hosts reconnect to the broker", False
        return "", False

    def _evaluate(self, host: _Host, now: float) -> tuple[HostHealth, str]:
        s = self.settings
        if host.state in ("offline", "failed"):
            return host.state, host.reason  # only revive() (the host speaking again) brings it back
        if host.gone_at is not None:
            gone_for = now - host.gone_at
            if gone_for >= s.will_confirm_s:
                return "failed", f"{host.gone_reason} for {gone_for:.1f}s (Last Will)"
            return "suspect", f"{host.gone_reason} (Last Will)"
        phi = host.detector.phi(now)
        if phi >= s.fail_phi:
            return "failed", f"no heartbeat for {now - (host.detector.last or now):.1f}s (phi {phi:.1f})"
        if phi >= s.suspect_phi:
            return "suspect", f"heartbeat late by {now - (host.detector.last or now):.1f}s (phi {phi:.1f})"
        return "up", "heartbeats arriving"

    def declare_failed(self, host_id: str, now: float, reason: str) -> Transition | None:
        """An outside authority (the host's BMC reads power off) settles it: the host is failed."""
        host = self._host(host_id)
        if host.state == "failed":
            return None
        old = host.state
        host.state, host.since, host.reason = "failed", now, reason
        return Transition(host_id, old, "failed", reason)

    def revive(self, host_id: str, now: float) -> Transition | None:
        """A failed or offline host speaks again (fresh heartbeat or online state)."""
        host = self._host(host_id)
        host.gone_at = None
        if host.state in ("failed", "offline", "suspect"):
            old = host.state
            host.state, host.since, host.reason = "up", now, "heartbeats arriving again"
            return Transition(host_id, old, "up", host.reason)
        return None
