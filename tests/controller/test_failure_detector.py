"""The failure detector on a fake clock: phi accrual, Last Will confirmation, clean stops, storm guard."""

from __future__ import annotations

import math
import random

from controller.services.ha.detector import DetectorSettings, FailureDetector, PhiAccrual, Transition


def _beat(detector: FailureDetector, host: str, start: float, count: int, every: float = 1.0) -> float:
    t = start
    for _ in range(count):
        detector.heartbeat(host, t)
        t += every
    return t - every


def test_phi_stays_low_on_schedule_and_grows_with_silence():
    """Regular heartbeats keep phi near zero; silence makes it climb steadily."""
    phi = PhiAccrual(DetectorSettings())
    for i in range(20):
        phi.heartbeat(float(i))
    assert phi.phi(19.9) < 1.0
    values = [phi.phi(19.0 + gap) for gap in (1.0, 2.0, 3.0, 4.0)]
    assert values == sorted(values) and values[-1] > 10


def test_jittery_heartbeats_make_the_detector_more_patient():
    """After a jittery history the same silence scores a lower phi than after a steady one."""
    rng = random.Random(7)
    steady, jittery = PhiAccrual(DetectorSettings()), PhiAccrual(DetectorSettings())
    t_steady = t_jitter = 0.0
    for _ in range(50):
        t_steady += 1.0
        t_jitter += rng.uniform(0.3, 1.7)
        steady.heartbeat(t_steady)
        jittery.heartbeat(t_jitter)
    assert jittery.phi(t_jitter + 2.5) < steady.phi(t_steady + 2.5)


def test_last_will_makes_a_host_suspect_then_failed_after_the_confirmation_delay():
    """A Last Will is suspicion at once and failure once the host stays gone for will_confirm_s."""
    detector = FailureDetector(DetectorSettings(will_confirm_s=1.0))
    last = _beat(detector, "h1", 0.0, 5)
    _beat(detector, "h2", 0.0, 5)
    _beat(detector, "h3", 0.0, 5)
    detector.connection_lost("h1", last + 0.1, "connection lost")
    changes = detector.tick(last + 0.2)
    assert [(c.host_id, c.new) for c in changes] == [("h1", "suspect")]
    assert "Last Will" in changes[0].reason
    for h in ("h2", "h3"):
        detector.heartbeat(h, last + 1.0)
    changes = detector.tick(last + 1.2)
    assert [(c.host_id, c.old, c.new) for c in changes] == [("h1", "suspect", "failed")]
    assert detector.state("h1") == "failed"


def test_a_host_that_reconnects_in_time_is_never_failed():
    """Back within will_confirm_s (a broker hiccup): suspect, then up again, never failed."""
    detector = FailureDetector(DetectorSettings(will_confirm_s=1.0))
    last = _beat(detector, "h1", 0.0, 5)
    detector.connection_lost("h1", last + 0.1, "connection lost")
    detector.tick(last + 0.2)
    states = []
    for i in range(1, 7):  # heartbeats resume at last+0.5 and keep coming every 0.5 s
        detector.heartbeat("h1", last + 0.5 * i)
        states += [c.new for c in detector.tick(last + 0.5 * i + 0.1)]
    assert "failed" not in states and detector.state("h1") == "up"


def test_heartbeat_gap_alone_fails_a_host_and_says_how_late_it_is():
    """Without a Last Will, silence is enough: suspect, then failed, with phi in the reason."""
    detector = FailureDetector(DetectorSettings())
    for host in ("h1", "h2", "h3"):
        _beat(detector, host, 0.0, 10)
    seen = {}
    for step in range(1, 60):
        now = 9.0 + step * 0.1
        for host in ("h2", "h3"):
            if step % 10 == 0:
                detector.heartbeat(host, now)
        for change in detector.tick(now):
            seen.setdefault(change.new, (now, change.reason))
    assert "suspect" in seen and "failed" in seen
    assert seen["suspect"][0] < seen["failed"][0] <= 9.0 + 5.0
    assert "phi" in seen["failed"][1]


def test_clean_agent_stop_is_offline_not_failed():
    """An agent that says goodbye is offline; its VMs outlive it, so it is never declared failed."""
    detector = FailureDetector(DetectorSettings())
    last = _beat(detector, "h1", 0.0, 5)
    detector.stopped_cleanly("h1", last + 0.1)
    for t in (last + 1, last + 10, last + 100):
        assert all(c.new != "failed" for c in detector.tick(t))
    assert detector.state("h1") == "offline"


def test_storm_guard_holds_back_when_most_hosts_vanish_at_once():
    """3 of 4 hosts gone together: suspect, storm flagged, nobody failed; after it clears, failures count."""
    detector = FailureDetector(DetectorSettings(will_confirm_s=0.5, storm_fraction=0.5))
    for host in ("h1", "h2", "h3", "h4"):
        _beat(detector, host, 0.0, 5)
    for host in ("h1", "h2", "h3"):
        detector.connection_lost(host, 4.1, "connection lost")
    detector.heartbeat("h4", 4.5)
    changes = detector.tick(5.0)
    assert detector.storm
    assert all(c.new == "suspect" for c in changes) and len(changes) == 3
    assert "storm guard" in changes[0].reason
    # Two come back; one host missing of four is a host failure, not a storm.
    detector.heartbeat("h1", 5.2)
    detector.heartbeat("h2", 5.2)
    detector.heartbeat("h4", 5.2)
    detector.tick(5.3)
    assert not detector.storm
    assert detector.state("h3") == "failed"


def test_a_failed_host_revives_when_it_speaks_again():
    """revive() brings a failed host back to up and reports the transition."""
    detector = FailureDetector(DetectorSettings(will_confirm_s=0.1))
    last = _beat(detector, "h1", 0.0, 5)
    for host in ("h2", "h3"):
        _beat(detector, host, 0.0, 5)
    detector.connection_lost("h1", last, "connection lost")
    detector.tick(last + 0.2)
    assert detector.state("h1") == "failed"
    change = detector.revive("h1", last + 5)
    assert change is not None and (change.old, change.new) == ("failed", "up")


def test_after_a_rearm_silence_fails_no_host_until_the_reconnect_grace_ends():
    """Controller back at t=10: a host still in its reconnect backoff is suspect, not failed, for the grace."""
    detector = FailureDetector(DetectorSettings(reconnect_grace_s=6.0))
    for host in ("h1", "h2", "h3"):
        _beat(detector, host, 0.0, 5)
    detector.rearm(10.0)
    for t in (11.0, 12.0, 13.0):
        detector.heartbeat("h2", t)
        detector.heartbeat("h3", t)
    detector.tick(13.5)
    assert detector.state("h1") == "suspect"
    assert "while hosts reconnect" in detector.hosts["h1"].reason
    for t in (14.0, 15.0, 16.0, 16.5):
        detector.heartbeat("h2", t)
        detector.heartbeat("h3", t)
    detector.tick(16.5)
    assert detector.state("h1") == "failed"


def test_a_contested_session_is_held_suspect_never_failed_until_it_calms_down() -> None:
    """The attack: a host's session knocked off the broker over and over was failed (and fenced) in
    2.1 s. Reconnects within the window hold it as suspect, with the reason; once the flapping has
    stopped for the window, a host that stays silent fails as before.
    """
    detector = FailureDetector(DetectorSettings(contest_flaps=3, contest_window_s=10.0))
    now = _beat(detector, "h2", 0.0, 20)
    for _ in range(3):  # knocked off, back, knocked off...
        detector.connection_lost("h2", now, "connection lost")
        now += 0.3
        detector.connected("h2", now)
        detector.heartbeat("h2", now)
        now += 0.3
    detector.connection_lost("h2", now, "connection lost")
    changes: list[Transition] = []
    for _ in range(60):  # 6 s of silence after a Last Will: far beyond will_confirm_s
        now += 0.1
        changes += detector.tick(now)
    assert detector.state("h2") == "suspect"
    assert all(c.new != "failed" for c in changes)
    assert any("contested" in c.reason and "another agent" in c.reason for c in changes), changes
    for _ in range(60):  # the window passes with no more flapping: silence now fails it
        now += 0.1
        changes += detector.tick(now)
    assert detector.state("h2") == "failed"


def test_a_single_reconnect_does_not_make_a_session_contested() -> None:
    detector = FailureDetector(DetectorSettings(contest_flaps=3, contest_window_s=10.0))
    now = _beat(detector, "h1", 0.0, 20)
    detector.connection_lost("h1", now, "connection lost")
    for _ in range(20):
        now += 0.1
        detector.tick(now)
    assert detector.state("h1") == "failed"


def test_phi_from_running_sums_matches_the_window_after_it_wraps():
    """The O(1) mean and spread agree with the window's own after many wraps (no drift)."""
    rng = random.Random(3)
    settings = DetectorSettings(window=10)
    phi = PhiAccrual(settings)
    t = 0.0
    for _ in range(10_007):
        t += rng.choice((0.2, 1.0, 3.0)) * rng.uniform(0.9, 1.1)
        phi.heartbeat(t)
    xs = list(phi.intervals)
    mean = sum(xs) / len(xs)
    std = max((sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5, settings.min_std_s)
    y = (2.0 - mean - settings.acceptable_pause_s) / std
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    expected = -math.log10(e / (1.0 + e) if y > 0 else 1.0 - 1.0 / (1.0 + e))
    assert abs(phi.phi(t + 2.0) - expected) < 1e-9
    assert phi.on_time(t + mean) and not phi.on_time(t + mean + settings.acceptable_pause_s + 0.01)
