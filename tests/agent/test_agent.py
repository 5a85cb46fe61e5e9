"""The agent against a real Mosquitto, driven by a bare bus client standing in for the controller."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

import msgspec
import pytest

from agent.daemon import Agent, AgentSettings
from hv.sim.driver import SimDriver
from protocols import codec, topics
from protocols.bus import Bus, BusSettings
from protocols.messages import (
    DefineVm,
    HostInventory,
    HostState,
    PauseVm,
    Reply,
    StartVm,
    UndefineVm,
    VmEvent,
)
from protocols.vmspec import VmSpec
from tests.support.fleet import FAST_BUS, eventually


class Probe:
    """Plays the controller: sends commands, collects everything the agent says."""

    def __init__(self, url: str, host_id: str) -> None:
        self.host_id = host_id
        self.decoder = codec.InboundDecoder()
        self.replies: dict[str, list[Reply]] = collections.defaultdict(list)
        self.states: list[HostState] = []
        self.inventories: list[HostInventory] = []
        self.events: list[VmEvent] = []
        self.bus = Bus(BusSettings(url=url, client_id=f"probe-{uuid.uuid4().hex[:8]}", **FAST_BUS))
        self.bus.subscribe(topics.host_subtree(host_id), self._on, qos=1)

    def _on(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/cmd") or topic.endswith("/telemetry"):
            return
        message = self.decoder.decode(topic, payload)
        if isinstance(message, Reply):
            self.replies[message.op_id].append(message)
        elif isinstance(message, HostState):
            self.states.append(message)
        elif isinstance(message, HostInventory):
            self.inventories.append(message)
        elif isinstance(message, VmEvent):
            self.events.append(message)

    async def send(self, command: Any) -> None:
        # The agent subscribes to its commands before it announces itself online; wait for that,
        # as the controller does, or a command could reach the broker before anyone listens.
        await eventually(lambda: any(s.online for s in self.states), 5, "the agent online")
        await self.bus.publish(topics.host_topic(self.host_id, "cmd"), codec.encode(command), qos=1)

    async def reply(self, op_id: str, count: int = 1, timeout: float = 5.0) -> list[Reply]:
        await eventually(lambda: len(self.replies[op_id]) >= count, timeout, f"{count} replies to {op_id}")
        return self.replies[op_id]


def _cmd(cls: type[Any], **fields: Any) -> Any:
    return cls(op_id=uuid.uuid4().hex, deadline=time.time() + 30, **fields)


def _agent(url: str, host_id: str, state_dir: Any, **sim: Any) -> Agent:
    return Agent(
        AgentSettings(
            host_id=host_id,
            broker_url=url,
            state_dir=state_dir,
            telemetry_interval_s=0.2,
            bus_overrides=FAST_BUS,
        ),
        SimDriver(host_id=host_id, state_dir=state_dir, **sim),
    )


async def test_agent_announces_online_state_and_inventory_on_connect(mosquitto, tmp_path):
    """On connect the agent publishes a retained online state and its inventory with capabilities."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1", cores=8, memory_mib=8192) as agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await eventually(lambda: probe.states and probe.inventories, 5, "state and inventory")
            assert probe.states[-1].online and probe.states[-1].boot_id == agent.boot_id
            inventory = probe.inventories[-1]
            assert inventory.capabilities.engine == "sim"
            assert inventory.capabilities.cores == 8 and inventory.capabilities.memory_mib == 8192
            assert inventory.vms == []


async def test_same_operation_id_twice_is_applied_once_and_both_replies_agree(mosquitto, tmp_path):
    """A duplicated command (same op id) defines the VM once and yields two identical replies."""
    probe = Probe(mosquitto.url, "h1")
    async with _agent(mosquitto.url, "h1", tmp_path / "h1") as agent, probe.bus:
        await probe.bus.wait_connected(5)
        define = _cmd(DefineVm, spec=VmSpec(name="web-1", memory_mib=256))
        await probe.send(define)
        first = (await probe.reply(define.op_id))[0]
        await probe.send(define)
        replies = await probe.reply(define.op_id, count=2)
        assert first.ok and first.vm is not None and first.vm.state == "running"
        assert replies[0] == replies[1]
        vms = await agent.driver.list()
        assert [vm.name for vm in vms] == ["web-1"]
        started = [e for e in probe.events if e.vm == "web-1" and e.event == "started"]
        assert len(started) == 1, "the duplicate must not start the VM again"


async def test_applied_operations_survive_an_agent_restart(mosquitto, tmp_path):
    """The op ledger is on disk: after an agent restart a replayed op id returns the original reply."""
    state = tmp_path / "h1"
    define = _cmd(DefineVm, spec=VmSpec(name="db-1", memory_mib=256))
    probe = Probe(mosquitto.url, "h1")
    async with probe.bus:
        async with _agent(mosquitto.url, "h1", state):
            await probe.bus.wait_connected(5)
            await probe.send(define)
            original = (await probe.reply(define.op_id))[0]
        async with _agent(mosquitto.url, "h1", state) as agent:
            await eventually(lambda: agent.bus.connected.is_set(), 5, "agent reconnected")
            await probe.send(define)
            replies = await probe.reply(define.op_id, count=2)
            assert replies[1] == original
            assert [vm.name for vm in await agent.driver.list()] == ["db-1"]
            assert (await agent.driver.list())[0].state == "running", "the VM outlived the agent"


async def test_command_past_its_deadline_is_refused_and_not_applied(mosquitto, tmp_path):
    """A command that arrives after its deadline gets an 'expired' reply and changes nothing."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1") as agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await probe.bus.wait_connected(5)
            late = DefineVm(
                op_id="late-1", deadline=time.time() - 5, spec=VmSpec(name="late", memory_mib=256)
            )
            await probe.send(late)
            reply = (await probe.reply("late-1"))[0]
            assert not reply.ok and reply.code == "expired"
            assert "deadline" in reply.error
            assert await agent.driver.list() == []


async def test_errors_come_back_as_reply_codes_that_name_the_vm(mosquitto, tmp_path):
    """An engine error becomes a failed reply with its code and a message naming the VM."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1"):
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await probe.bus.wait_connected(5)
            start = _cmd(StartVm, vm="ghost")
            await probe.send(start)
            reply = (await probe.reply(start.op_id))[0]
            assert not reply.ok and reply.code == "unknown_vm"
            assert "ghost" in reply.error


async def test_garbage_commands_are_counted_and_do_not_stop_the_agent(mosquitto, tmp_path):
    """Malformed command payloads are dropped and counted; the next good command still works."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1") as agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await probe.bus.wait_connected(5)
            topic = topics.host_topic("h1", "cmd")
            await probe.bus.publish(topic, b"\xc1\xff garbage", qos=1)
            await probe.bus.publish(
                topic, msgspec.msgpack.encode({"kind": "format_disk", "op_id": "x"}), qos=1
            )
            await probe.bus.publish(topic, msgspec.msgpack.encode({"kind": "start_vm", "op_id": 5}), qos=1)
            define = _cmd(DefineVm, spec=VmSpec(name="ok-1", memory_mib=256))
            await probe.send(define)
            assert (await probe.reply(define.op_id))[0].ok
            stats = agent.decoder.stats
            assert stats.by_reason["garbage"] == 1
            assert stats.by_reason["unknown_kind"] == 1
            assert stats.by_reason["wrong_type"] == 1


async def test_commands_for_one_vm_run_in_order(mosquitto, tmp_path):
    """Define, pause and undefine sent back to back for one VM are applied in that order."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1") as agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await probe.bus.wait_connected(5)
            cmds = [
                _cmd(DefineVm, spec=VmSpec(name="seq-1", memory_mib=256)),
                _cmd(PauseVm, vm="seq-1"),
                _cmd(UndefineVm, vm="seq-1"),
            ]
            for cmd in cmds:
                await probe.send(cmd)
            for cmd in cmds:
                assert (await probe.reply(cmd.op_id))[0].ok, cmd
            kinds = [e.event for e in probe.events if e.vm == "seq-1"]
            assert kinds == ["started", "paused", "undefined"]
            assert await agent.driver.list() == []


async def test_agent_keeps_vms_through_a_broker_restart_and_reports_again(mosquitto, tmp_path):
    """When the broker restarts, VMs keep running and the agent republishes its inventory on reconnect."""
    async with _agent(mosquitto.url, "h1", tmp_path / "h1") as agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await probe.bus.wait_connected(5)
            define = _cmd(DefineVm, spec=VmSpec(name="steady", memory_mib=256))
            await probe.send(define)
            await probe.reply(define.op_id)
            mosquitto.restart(down_s=0.5)
            await eventually(
                lambda: any(i.reason == "reconnect" for i in probe.inventories),
                10,
                "inventory after reconnect",
            )
            latest = [i for i in probe.inventories if i.reason == "reconnect"][-1]
            assert [(vm.name, vm.state) for vm in latest.vms] == [("steady", "running")]
            assert agent.bus.counters.connects >= 2


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_agent_works_over_both_mqtt_versions(mosquitto, tmp_path, protocol):
    """The command/reply protocol is the same over MQTT 3.1.1 and MQTT 5."""
    agent = Agent(
        AgentSettings(
            host_id="h1",
            broker_url=mosquitto.url,
            state_dir=tmp_path / "h1",
            bus_overrides={**FAST_BUS, "protocol": protocol},
        ),
        SimDriver(host_id="h1", state_dir=tmp_path / "h1"),
    )
    async with agent:
        probe = Probe(mosquitto.url, "h1")
        async with probe.bus:
            await eventually(lambda: agent.bus.connected.is_set(), 5, "agent connected")
            assert agent.bus.protocol_in_use == protocol
            define = _cmd(DefineVm, spec=VmSpec(name="v", memory_mib=256))
            await probe.send(define)
            assert (await probe.reply(define.op_id))[0].ok


async def test_telemetry_reports_host_and_vm_load(mosquitto, tmp_path):
    """Telemetry carries per-VM CPU and dirty rate, and host CPU and power from the power model."""
    async with _agent(
        mosquitto.url, "h1", tmp_path / "h1", cores=4, power_idle_w=100, power_max_w=200
    ) as agent:
        await eventually(lambda: agent.bus.connected.is_set(), 5, "agent connected")
        await agent.driver.define(VmSpec(name="busy", vcpus=2, memory_mib=256))
        await agent.driver.start("busy")
        agent.driver.set_workload("busy", cpu_util=1.0, dirty_mib_s=40.0)  # type: ignore[attr-defined]
        sample = await agent.telemetry_sample()
        assert [vm.name for vm in sample.vms] == ["busy"]
        assert sample.vms[0].cpu_util == pytest.approx(1.0, abs=0.11)
        assert sample.vms[0].dirty_mib_s == pytest.approx(40.0, rel=0.11)
        assert sample.cpu_util == pytest.approx(0.5, abs=0.06)  # 2 busy vCPUs of 4 cores
        assert sample.power_w == pytest.approx(100 + 100 * sample.cpu_util)
        await asyncio.sleep(0)
