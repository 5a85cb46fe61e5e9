"""Generated per-host credentials and ACLs, enforced by a real Mosquitto started from the generated config."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.broker import acl_config as broker_config
from protocols import codec, topics
from protocols.bus import Bus, BusSettings, read_secret
from protocols.messages import HostState
from tests.support import free_port
from tests.support.brokers import find_mosquitto, wait_listening
from tests.support.fleet import FAST_BUS, eventually
from tests.support.needs import need


class Secured:
    def __init__(self, config: broker_config.BrokerConfig, port: int) -> None:
        self.config = config
        self.url = f"mqtt://127.0.0.1:{port}"

    def bus(self, user: str, client_id: str, **overrides: object) -> Bus:
        password = (
            read_secret(str(self.config.credentials[user])) if user in self.config.credentials else "wrong"
        )
        return Bus(
            BusSettings(
                url=self.url,
                client_id=client_id,
                username=user,
                password=password,
                **{**FAST_BUS, **overrides},  # type: ignore[arg-type]
            )
        )


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    binary = find_mosquitto()
    need(binary, "mosquitto is not installed (apt-get install -y mosquitto)")
    assert binary is not None
    port = free_port()
    config = broker_config.generate(
        ["h1", "h2"], tmp_path / "broker", listen="127.0.0.1", port=port, iterations=1000
    )
    if os.geteuid() == 0:  # mosquitto would drop to its own user and lose access to the 0600 files
        with config.conf.open("a") as f:
            f.write("user root\n")
    log = (tmp_path / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(config.conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening("127.0.0.1", port, 10, alive=lambda: proc.poll() is None)
        yield Secured(config, port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _state(host: str, boot: str = "b") -> bytes:
    return codec.encode(HostState(host_id=host, online=True, boot_id=boot, ts=1.0))


def test_generated_files_are_private_and_list_every_host(tmp_path):
    """passwd, acl and secrets are mode 0600; each host gets write rules for its own subtree only."""
    config = broker_config.generate(["h1", "h2"], tmp_path, iterations=1000)
    for path in (config.passwd, config.acl, *config.credentials.values()):
        assert path.stat().st_mode & 0o777 == 0o600, path
    acl = config.acl.read_text()
    assert "user h1\ntopic write fv/v1/host/h1/state" in acl
    assert "topic read fv/v1/host/h1/cmd" in acl
    assert "topic write fv/v1/host/h2" not in acl.split("user h2")[0].split("user h1")[1]
    assert (
        f"user {broker_config.CONTROLLER_USER}\ntopic read fv/v1/host/+/#\ntopic write fv/v1/host/+/cmd"
        in acl
    )


def test_generated_broker_config_turns_nagle_off(tmp_path):
    """The generated mosquitto.conf sets TCP_NODELAY: a command or reply must not wait for a delayed ACK."""
    config = broker_config.generate(["h1"], tmp_path, iterations=1000)
    assert "set_tcp_nodelay true" in config.conf.read_text().splitlines()


def test_regenerating_keeps_existing_passwords_and_adds_new_hosts(tmp_path):
    """Adding a host later does not rotate the passwords the other hosts already use."""
    first = broker_config.generate(["h1"], tmp_path, iterations=1000)
    h1_password = first.credentials["h1"].read_text()
    second = broker_config.generate(["h1", "h2"], tmp_path, iterations=1000)
    assert second.credentials["h1"].read_text() == h1_password
    assert "h2" in second.credentials and "user h2" in second.acl.read_text()


def test_bad_host_lists_are_refused_with_every_problem_named(tmp_path):
    """Invalid, reserved and repeated host ids are all reported at once, and nothing is written."""
    with pytest.raises(broker_config.BrokerConfigError) as err:
        broker_config.generate(["ok", "bad id", "fv-controller", "ok"], tmp_path / "out")
    message = str(err.value)
    assert "'bad id' is invalid" in message and "reserved" in message and "repeated: ok" in message
    assert not (tmp_path / "out").exists()


def test_password_hash_matches_mosquittos_pbkdf2_format():
    """The $7$ hash is PBKDF2-SHA512 over a 12-byte salt, base64 encoded, as mosquitto_passwd writes it."""
    hashed = broker_config.hash_password("secret", iterations=101, salt=bytes(range(12)))
    assert hashed.startswith("$7$101$AAECAwQFBgcICQoL$")
    assert len(hashed.split("$")[4]) == 88  # 64 bytes of digest in base64


async def test_host_a_cannot_publish_as_host_b_or_send_commands(secured):
    """With the generated ACL, h1's messages on h2's topics and on any command topic never arrive."""
    seen: list[tuple[str, bytes]] = []
    controller = secured.bus(broker_config.CONTROLLER_USER, "acl-controller")
    controller.subscribe("fv/v1/host/#", lambda t, p: seen.append((t, p)), qos=1)
    h2_commands: list[bytes] = []
    h2 = secured.bus("h2", "acl-h2")
    h2.subscribe(topics.host_topic("h2", "cmd"), lambda t, p: h2_commands.append(p), qos=1)
    h1 = secured.bus("h1", "acl-h1", protocol="3.1.1")
    async with controller, h2, h1:
        for bus in (controller, h2, h1):
            await bus.wait_connected(10)
        await h1.publish(topics.host_topic("h2", "state"), _state("h2", "forged"), qos=1)
        await h1.publish(topics.host_topic("h2", "cmd"), b"forged command", qos=1)
        await h1.publish(
            topics.host_topic("h1", "state"), _state("h1"), qos=1
        )  # a marker after the forgeries
        await eventually(
            lambda: any(t == topics.host_topic("h1", "state") for t, _ in seen), 5, "h1's own state"
        )
        await asyncio.sleep(0.3)
        assert [t for t, _ in seen if "/h2/" in t] == []
        assert h2_commands == []

        await controller.publish(topics.host_topic("h2", "cmd"), b"real command", qos=1)
        await eventually(lambda: h2_commands == [b"real command"], 5, "the controller's command")


async def test_host_cannot_read_another_hosts_commands(secured):
    """h1 may subscribe to h2's command topic, but the broker delivers it nothing."""
    stolen: list[bytes] = []
    own: list[bytes] = []
    h1 = secured.bus("h1", "acl-h1-reader")
    h1.subscribe(topics.host_topic("h2", "cmd"), lambda t, p: stolen.append(p), qos=1)
    h1.subscribe(topics.host_topic("h1", "cmd"), lambda t, p: own.append(p), qos=1)
    controller = secured.bus(broker_config.CONTROLLER_USER, "acl-controller-2")
    async with h1, controller:
        await h1.wait_connected(10)
        await controller.wait_connected(10)
        await controller.publish(topics.host_topic("h2", "cmd"), b"for h2 only", qos=1)
        await controller.publish(topics.host_topic("h1", "cmd"), b"for h1", qos=1)
        await eventually(lambda: own == [b"for h1"], 5, "h1's own command")
        await asyncio.sleep(0.2)
        assert stolen == []


async def test_wrong_password_and_anonymous_clients_are_refused(secured):
    """A bad password or no credentials at all never gets a connection."""
    wrong = secured.bus("intruder", "acl-intruder")
    anonymous = Bus(BusSettings(url=secured.url, client_id="acl-anon", **FAST_BUS))  # type: ignore[arg-type]
    async with wrong, anonymous:
        await asyncio.sleep(1.0)
        assert not wrong.connected.is_set()
        assert not anonymous.connected.is_set()


async def test_a_fleet_runs_end_to_end_with_generated_credentials(secured, tmp_path):
    """Controller and agent authenticate with their generated secrets, and a VM gets created."""
    from agent.daemon import Agent, AgentSettings
    from controller.daemon import Controller, ControllerSettings
    from hv.sim.driver import SimDriver
    from protocols.vmspec import VmSpec

    creds = secured.config.credentials
    settings = ControllerSettings(
        broker_url=secured.url,
        db_path=tmp_path / "c.sqlite",
        serve_api=False,
        username=broker_config.CONTROLLER_USER,
        password=read_secret(str(creds[broker_config.CONTROLLER_USER])),
        bus_overrides=FAST_BUS,
    )
    async with Controller(settings) as controller:
        assert controller.vms is not None and controller.bus is not None
        await controller.bus.wait_connected(10)
        agent = Agent(
            AgentSettings(
                host_id="h1",
                broker_url=secured.url,
                state_dir=tmp_path / "h1",
                username="h1",
                password=read_secret(str(creds["h1"])),
                bus_overrides=FAST_BUS,
            ),
            SimDriver(host_id="h1", state_dir=tmp_path / "h1"),
        )
        async with agent:
            ctl = controller
            await eventually(lambda: ctl.hosts.online_count() == 1, 10, "h1 online")
            await eventually(lambda: ctl.live.telemetry_count > 0, 10, "telemetry through the ACL")
            _, op, _ = ctl.vms.create(VmSpec(name="secure-1", memory_mib=256))
            assert (await ctl.operations.wait(op.op_id, 10)).state == "succeeded"
