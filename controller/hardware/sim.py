"""An in-memory power driver: the fake BMC for tests and the demo.

It keeps the power state in a field, can be told to fail (``fail_power_on=True`` and friends) or to
be slow (``delay_s``, checked against ``timeout_s`` like a real call), and records every call in
``calls``, so fallback and standby logic can be tested without hardware. Like the ``sim``
hypervisor engine, it is a first-class driver, not a mock.
"""

from __future__ import annotations

import asyncio

from controller.hardware.driver import PowerDriver, PowerError, PowerState, WakeCheck

__all__ = ["SimPowerDriver"]


class SimPowerDriver(PowerDriver):
    """A host whose power is a field. Failures are injected by setting the ``fail_*`` attributes."""

    def __init__(
        self,
        host_id: str,
        *,
        state: PowerState = "on",
        method: str = "sim",
        fail_power_on: bool = False,
        fail_power_off: bool = False,
        fail_status: bool = False,
        wake_ok: bool = True,
        watts: float | None = None,
        can_power_off: bool = True,
        can_wake: bool = True,
        delay_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.host_id = host_id
        self.method = method
        self.state: PowerState = state
        self.fail_power_on = fail_power_on
        self.fail_power_off = fail_power_off
        self.fail_status = fail_status
        self.wake_ok = wake_ok
        self.watts = watts
        self.can_power_off = can_power_off
        self.can_wake = can_wake
        self.delay_s = delay_s
        self.timeout_s = timeout_s
        #: Every call, in order: ``"status"``, ``"power_on"``, ``"power_off"``, ``"power_off(soft)"``...
        self.calls: list[str] = []

    def __repr__(self) -> str:
        return f"SimPowerDriver({self.host_id!r}, method={self.method!r}, state={self.state!r})"

    @property
    def target(self) -> str:
        return f"simulated {self.method}"

    async def status(self) -> PowerState:
        await self._act("status")
        if self.fail_status:
            raise self._injected("power status")
        return self.state

    async def power_on(self) -> None:
        await self._act("power_on")
        if self.fail_power_on or not self.can_wake:
            raise self._injected("power on")
        self.state = "on"

    async def power_off(self, soft: bool = False) -> None:
        await self._act("power_off(soft)" if soft else "power_off")
        if self.fail_power_off or not self.can_power_off:
            raise self._injected("soft power off" if soft else "power off")
        self.state = "off"

    async def verify_wake_path(self) -> WakeCheck:
        await self._act("verify_wake_path")
        if self.wake_ok and self.can_wake:
            return WakeCheck(ok=True, method=self.method, detail=f"{self.target}: wake path is set to work")
        return WakeCheck(ok=False, method=self.method, detail=f"{self.target}: wake path is set to fail")

    async def power_reading_w(self) -> float | None:
        await self._act("power_reading_w")
        if self.watts is None:
            return None
        return self.watts if self.state == "on" else 0.0

    def _injected(self, action: str) -> PowerError:
        return self.fail(
            self.target, action, "failure injected by the test", "clear the fail_* flag on the SimPowerDriver"
        )

    async def _act(self, call: str) -> None:
        """Record the call and take ``delay_s``, failing like a real driver after ``timeout_s``."""
        self.calls.append(call)
        if self.delay_s <= 0:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.sleep(self.delay_s)
        except TimeoutError:
            raise self.fail(
                self.target,
                call.replace("_", " "),
                f"no answer within {self.timeout_s:g}s",
                "lower delay_s on the SimPowerDriver",
            ) from None
