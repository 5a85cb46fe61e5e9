"""Several power methods for one host, tried in order: the fallback rule of power management.

"A failed power-on falls back to another method, or alerts." :class:`FallbackPower` is itself a
:class:`~controller.hardware.driver.PowerDriver`, so callers never know whether a host has one method or
three:
- ``power_on`` tries every wake-capable method in order until one succeeds, logging each failure. When
  all fail it raises :class:`FallbackExhausted`, a :class:`PowerError` naming every method and why it
  failed: that error is the alert.
- ``power_off`` does the same with the methods that can power off (Wake-on-LAN cannot).
- ``status`` comes from the first method that knows (a failing one counts as not knowing).
- ``verify_wake_path`` is ok when any wake-capable method verifies; its detail lists them all.
- ``power_reading_w`` comes from the first method that measures.

A typical chain is ``FallbackPower([IpmiDriver(bmc), WakeOnLanDriver(host, wol)])``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from controller.hardware.driver import PowerDriver, PowerError, PowerState, WakeCheck

__all__ = ["FallbackExhausted", "FallbackPower"]

log = logging.getLogger(__name__)


class FallbackExhausted(PowerError):
    """Every method of a :class:`FallbackPower` failed; ``failures`` holds each method's error."""

    def __init__(self, host_id: str, method: str, action: str, failures: list[PowerError]) -> None:
        self.failures = failures
        super().__init__(
            host_id,
            method,
            "every method",
            action,
            "; ".join(f"[{f.method}: {f.target}] {f.reason}" for f in failures),
            "fix any one of them: " + "; ".join(f"[{f.method}] {f.fix}" for f in failures),
        )


class FallbackPower(PowerDriver):
    """One host's power methods, in order of preference. See the module docstring."""

    def __init__(self, drivers: Sequence[PowerDriver]) -> None:
        """Take one host's methods, in order of preference.

        Raises:
            ValueError: no drivers, or drivers for different hosts.
        """
        if not drivers:
            raise ValueError("FallbackPower needs at least one power driver")
        hosts = sorted({driver.host_id for driver in drivers})
        if len(hosts) != 1:
            raise ValueError(f"FallbackPower's drivers must all switch one host, got {', '.join(hosts)}")
        self.drivers = list(drivers)
        self.host_id = hosts[0]
        self.method = "+".join(driver.method for driver in self.drivers)
        self.can_power_off = any(driver.can_power_off for driver in self.drivers)
        self.can_wake = any(driver.can_wake for driver in self.drivers)
        #: The method that carried out the last successful power_on / power_off.
        self.last_used: str | None = None
        #: The methods that failed before ``last_used`` succeeded, with their errors (for reports).
        self.last_failures: list[PowerError] = []

    def __repr__(self) -> str:
        return f"FallbackPower({self.drivers!r})"

    async def status(self) -> PowerState:
        for driver in self.drivers:
            try:
                state = await driver.status()
            except PowerError as exc:
                log.warning("host %s: power status via %s failed: %s", self.host_id, driver.method, exc)
                continue
            if state != "unknown":
                return state
        return "unknown"

    async def power_on(self) -> None:
        await self._first_success(
            "power on", [d for d in self.drivers if d.can_wake], lambda driver: driver.power_on()
        )

    async def power_off(self, soft: bool = False) -> None:
        await self._first_success(
            "soft power off" if soft else "power off",
            [d for d in self.drivers if d.can_power_off],
            lambda driver: driver.power_off(soft=soft),
        )

    async def verify_wake_path(self) -> WakeCheck:
        checks: list[WakeCheck] = []
        for driver in self.drivers:
            if not driver.can_wake:
                continue
            try:
                checks.append(await driver.verify_wake_path())
            except Exception as exc:  # the contract says it never raises; a bug must not hide the rest
                log.exception("host %s: wake-path check via %s raised", self.host_id, driver.method)
                checks.append(WakeCheck(ok=False, method=driver.method, detail=f"the check raised {exc!r}"))
        if not checks:
            return WakeCheck(ok=False, method=self.method, detail="no method here can wake the host")
        working = [check.method for check in checks if check.ok]
        detail = "; ".join(f"[{c.method}: {'ok' if c.ok else 'FAILED'}] {c.detail}" for c in checks)
        return WakeCheck(ok=bool(working), method="+".join(working) or self.method, detail=detail)

    async def power_reading_w(self) -> float | None:
        for driver in self.drivers:
            try:
                watts = await driver.power_reading_w()
            except PowerError as exc:
                log.warning("host %s: power reading via %s failed: %s", self.host_id, driver.method, exc)
                continue
            if watts is not None:
                return watts
        return None

    async def _first_success(
        self, action: str, candidates: list[PowerDriver], attempt: Callable[[PowerDriver], Awaitable[None]]
    ) -> None:
        """Run ``attempt`` on each candidate until one succeeds.

        Raises:
            FallbackExhausted: every candidate failed.
            PowerError: there were no candidates (no method can do ``action``).
        """
        failures: list[PowerError] = []
        for driver in candidates:
            try:
                await attempt(driver)
            except PowerError as exc:
                failures.append(exc)
            except Exception as exc:  # a driver bug must not stop the next method from trying
                log.exception("host %s: %s via %s raised", self.host_id, action, driver.method)
                failures.append(
                    driver.fail(driver.method, action, f"the driver raised {exc!r}", "report this driver bug")
                )
            else:
                if failures:
                    log.warning(
                        "host %s: %s succeeded via %s after %d failed method(s)",
                        self.host_id,
                        action,
                        driver.method,
                        len(failures),
                    )
                self.last_used = driver.method
                self.last_failures = failures
                return
            log.warning("host %s: %s via %s failed: %s", self.host_id, action, driver.method, failures[-1])
        if not candidates:
            raise self.fail(
                "no method",
                action,
                f"none of this host's methods ({self.method}) can {action.removeprefix('soft ')}",
                "add one that can, e.g. IPMI",
            )
        raise FallbackExhausted(self.host_id, self.method, action, failures)
