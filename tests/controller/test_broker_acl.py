"""Generated credentials, client ids and ACLs, enforced by a real Mosquitto started as `broker-config` prints it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pwd
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.broker import acl_config as broker_config
from protocols import codec, topics
from protocols.bus import Bus, BusError, BusSettings
from protocols.messages import HostState
from tests.support.brokers import find_mosquitto
from tests.support.fleet import FAST_BUS, eventually
from tests.support.needs import need
from tests.support.secure_fleet import SecureBroker

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def out_dir() -> Iterator[Path]:
    """A directory the broker's user can reach (pytest's tmp_path is closed to it when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="fv-broker-config-"))
    path.chmod(0o711)  # enterable, not listable
    yield path / "broker"
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def secured() -> Iterator[SecureBroker]:
    need(find_mosquitto(), "mosquitto is not installed (apt-get install -y mosquitto)")
    broker = SecureBroker(["h1", "h2"], tls=False)
    try:
        yield broker
    finally:
        broker.close()


def _state(host: str, boot: str = "b") -> bytes:
    return codec.encode(HostState(host_id=host, online=True, boot_id=boot, ts=1.0))


def test_generated_database_gives_each_user_one_role_over_its_own_subtree(out_dir):
    """Each user is bound to its daemon's client id; a host's role writes only its subtree, reads only its cmd."""
    config = broker_config.generate(["h1", "h2"], out_dir, tls=None, iterations=1000)
    assert "use_username_as_clientid" not in config.conf.read_text()
    database = json.loads(config.security.read_text())
    assert {c["username"]: c["clientid"] for c in database["clients"]} == {
        "fv-controller": "fv-controller", "fv-controller-telemetry": "fv-controller-telemetry",
        "h1": "fv-agent-h1", "h2": "fv-agent-h2",
    }  # fmt: skip
    roles = {c["username"]: [r["rolename"] for r in c["roles"]] for c in database["clients"]}
    assert roles == {u: [u] for u in ("fv-controller", "fv-controller-telemetry", "h1", "h2")}
    assert database["defaultACLAccess"] == {
        "publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True,
    }  # fmt: skip
    acls = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]} for r in database["roles"]}
    assert acls["h1"] == {
        ("publishClientSend", f"fv/v1/host/h1/{f}") for f in broker_config._HOST_PUBLISHES
    } | {
        ("subscribePattern", "fv/v1/host/h1/cmd"),
        ("publishClientReceive", "fv/v1/host/h1/cmd"),
    }
    assert ("publishClientSend", "fv/v1/host/+/cmd") in acls["fv-controller"]
    assert not any(kind == "publishClientSend" for kind, _ in acls["fv-controller-telemetry"])


def test_generated_files_are_readable_by_the_broker_and_private_from_others(out_dir):
    """As root: broker files root:mosquitto 0640 (dir 0750), persistence the broker's, secrets root's 0600."""
    config = broker_config.generate(["h1"], out_dir, tls=None, iterations=1000)
    for path in config.credentials.values():
        assert (path.stat().st_mode & 0o777, path.stat().st_uid) == (0o600, os.geteuid()), path
    group_mode = 0o640 if AS_ROOT else 0o600
    for path in (config.conf, config.security):
        assert path.stat().st_mode & 0o777 == group_mode, path
    if AS_ROOT:
        broker = pwd.getpwnam(broker_config.BROKER_USER)
        assert {(p.stat().st_uid, p.stat().st_gid) for p in (out_dir, config.conf, config.security)} == {
            (0, broker.pw_gid)
        }
        assert out_dir.stat().st_mode & 0o777 == 0o750
        assert (out_dir / "persist").stat().st_uid == broker.pw_uid
        assert (out_dir / "credentials").stat().st_mode & 0o777 == 0o700


def test_a_directory_the_broker_cannot_enter_is_refused_with_the_fix(tmp_path):
    """As root, an --out below a 0700 directory would give `Unable to open` at start: refused up front."""
    need(AS_ROOT, "only root's broker drops to the mosquitto user (run the suite as root)")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(broker_config.BrokerConfigError, match=r"cannot enter .*closed.*chmod o\+x"):
        broker_config.generate(["h1"], closed / "broker", tls=None, iterations=1000)


def test_generated_broker_config_turns_nagle_off_and_serves_plain_mqtt_on_loopback_only(out_dir):
    """TCP_NODELAY is on; without TLS the only listener is 127.0.0.1."""
    config = broker_config.generate(["h1"], out_dir, tls=None, iterations=1000)
    lines = config.conf.read_text().splitlines()
    assert "set_tcp_nodelay true" in lines
    assert [line for line in lines if line.startswith("listener")] == ["listener 1883 127.0.0.1"]
    assert not any(line.startswith("user ") for line in lines)


def test_tls_listener_with_the_broker_certificate_readable_by_the_broker_only(out_dir, tmp_path):
    """A missing certificate names `fleetvisor ca issue`; the copied key is 0640 root:mosquitto (0600 as a user)."""
    from controller.security import pki

    ca = pki.init_ca(tmp_path / "pki")
    tls = broker_config.TlsFiles(
        ca=ca, cert=tmp_path / "pki" / "broker.crt", key=tmp_path / "pki" / "broker.key"
    )
    with pytest.raises(broker_config.BrokerConfigError, match="fleetvisor ca issue broker"):
        broker_config.generate(["h1"], out_dir, tls=tls, iterations=1000)
    pki.issue(tmp_path / "pki", "broker", ips=["127.0.0.1"])
    config = broker_config.generate(["h1"], out_dir, tls=tls, port=18883, iterations=1000)
    lines = config.conf.read_text().splitlines()
    assert [line for line in lines if line.startswith("listener")] == [
        "listener 1883 127.0.0.1",
        "listener 18883 0.0.0.0",
    ]
    assert lines[lines.index("listener 18883 0.0.0.0") + 1].startswith("cafile ")
    assert (out_dir / "broker.key").read_bytes() == tls.key.read_bytes()
    assert (out_dir / "broker.key").stat().st_mode & 0o777 == (0o640 if AS_ROOT else 0o600)
    assert config.ca == out_dir / "ca.crt"


def test_regenerating_keeps_existing_passwords_and_adds_new_hosts(out_dir):
    """Adding a host later does not rotate the passwords the other hosts already use."""
    first = broker_config.generate(["h1"], out_dir, tls=None, iterations=1000)
    h1_password = first.credentials["h1"].read_text()
    second = broker_config.generate(["h1", "h2"], out_dir, tls=None, iterations=1000)
    assert second.credentials["h1"].read_text() == h1_password
    assert "h2" in {c["username"] for c in json.loads(second.security.read_text())["clients"]}


def test_bad_host_lists_are_refused_with_every_problem_named(tmp_path):
    """Invalid, reserved and repeated host ids are all reported at once, and nothing is written."""
    with pytest.raises(broker_config.BrokerConfigError) as err:
        broker_config.generate(["ok", "bad id", "fv-controller", "ok"], tmp_path / "out", tls=None)
    message = str(err.value)
    assert "'bad id' is invalid" in message and "reserved" in message and "repeated: ok" in message
    assert not (tmp_path / "out").exists()


def test_password_hash_is_the_dynamic_security_plugins_pbkdf2():
    """PBKDF2-SHA512 over a 12-byte salt, both base64 (Mosquitto accepting it is proven by every login below)."""
    hashed = broker_config.hashed_password("secret", iterations=101, salt=bytes(range(12)))
    assert hashed["salt"] == "AAECAwQFBgcICQoL" and hashed["iterations"] == 101
    assert len(hashed["password"]) == 88  # 64 bytes of digest in base64


def test_the_broker_started_as_root_runs_as_its_own_user(secured):
    """`mosquitto -c` as printed, with no `user root`: it drops to mosquitto and still reads its files."""
    need(AS_ROOT, "only root's broker drops to the mosquitto user (run the suite as root)")
    status = Path(f"/proc/{secured.process.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam(broker_config.BROKER_USER).pw_uid
    assert "user root" not in secured.config.conf.read_text()
    opened = [line.split()[-1] for line in secured.log().splitlines() if "listen socket on port" in line]
    assert opened == [f"{secured.plain_port}."], opened  # loopback only: no default listener on 1883


async def test_host_a_cannot_publish_as_host_b_or_send_commands(secured):
    """With the generated ACL, h1's messages on h2's topics and on any command topic never arrive."""
    seen: list[tuple[str, bytes]] = []
    controller = secured.bus(broker_config.CONTROLLER_USER)
    controller.subscribe("fv/v1/host/+/#", lambda t, p: seen.append((t, p)), qos=1)
    commands: list[tuple[str, bytes]] = []
    h2 = secured.bus("h2")
    h2.subscribe(topics.host_topic("h2", "cmd"), lambda t, p: commands.append((t, p)), qos=1)
    h1 = secured.bus("h1", protocol="3.1.1")
    h1.subscribe(topics.host_topic("h1", "cmd"), lambda t, p: commands.append((t, p)), qos=1)
    async with controller, h2, h1:
        for bus in (controller, h2, h1):
            await bus.wait_connected(10)
        for family in topics.FAMILIES:
            await h1.publish(topics.host_topic("h2", family), _state("h2", "forged"), qos=1)
        await h1.publish(topics.host_topic("h1", "cmd"), b"forged command to itself", qos=1)
        await h1.publish(
            topics.host_topic("h1", "state"), _state("h1"), qos=1
        )  # a marker after the forgeries
        await eventually(lambda: any(t == topics.host_topic("h1", "state") for t, _ in seen), 5, "h1's state")
        await asyncio.sleep(0.3)
        assert [t for t, _ in seen if "/h2/" in t or t.endswith("/cmd")] == []
        assert commands == []

        await controller.publish(topics.host_topic("h2", "cmd"), b"real command", qos=1)
        await eventually(
            lambda: commands == [(topics.host_topic("h2", "cmd"), b"real command")], 5, "the command"
        )


async def test_a_host_reads_only_its_own_commands_of_every_family(secured):
    """h1 subscribed to everything receives none of h2's topics, nor h2's commands, only its own commands."""
    stolen: list[str] = []
    h1 = secured.bus("h1")
    for everything in ("fv/v1/host/#", "fv/v1/host/+/#", "#"):
        h1.subscribe(everything, lambda t, p: stolen.append(t), qos=1)
    for family in topics.FAMILIES:
        h1.subscribe(topics.host_topic("h2", family), lambda t, p: stolen.append(t), qos=1)
    own: list[bytes] = []
    h1.subscribe(topics.host_topic("h1", "cmd"), lambda t, p: own.append(p), qos=1)
    telemetry: list[str] = []
    tele = secured.bus(broker_config.CONTROLLER_TELEMETRY_USER)
    for wanted in ("fv/v1/host/+/#", topics.all_hosts("telemetry")):
        tele.subscribe(wanted, lambda t, p: telemetry.append(t), qos=1)
    h2, controller = secured.bus("h2"), secured.bus(broker_config.CONTROLLER_USER)
    async with h1, h2, controller, tele:
        for bus in (h1, h2, controller, tele):
            await bus.wait_connected(10)
        for family in ("state", "inventory", "telemetry", "events", "reply"):
            await h2.publish(topics.host_topic("h2", family), _state("h2"), qos=1)
        await controller.publish(topics.host_topic("h2", "cmd"), b"for h2 only", qos=1)
        await controller.publish(topics.host_topic("h1", "cmd"), b"for h1", qos=1)
        await eventually(lambda: own == [b"for h1"], 5, "h1's own command")
        await eventually(lambda: telemetry, 5, "h2's telemetry")
        await asyncio.sleep(0.3)
        assert [t for t in stolen if t != topics.host_topic("h1", "cmd")] == []
        assert set(telemetry) == {topics.host_topic("h2", "telemetry")}  # both local filters match it


def test_the_bound_client_ids_are_the_ones_the_daemons_ask_for(tmp_path):
    """The agent's and the controller's buses ask for exactly the ids the broker binds to their users."""
    from agent.daemon import Agent, AgentSettings
    from controller.daemon import ControllerSettings
    from hv.sim.driver import SimDriver

    agent = Agent(
        AgentSettings(host_id="h7", broker_url="mqtt://127.0.0.1:1", state_dir=tmp_path),
        SimDriver(host_id="h7", state_dir=tmp_path),
    )
    assert agent.bus.settings.client_id == broker_config.daemon_client_id("h7")
    assert ControllerSettings().client_id == broker_config.daemon_client_id(broker_config.CONTROLLER_USER)


@pytest.mark.parametrize(
    ("owner", "stolen_id"),
    [
        ("h2", "fv-agent-h2"),
        ("h2", "h2"),
        (broker_config.CONTROLLER_TELEMETRY_USER, "fv-controller-telemetry"),
        (broker_config.CONTROLLER_USER, "fv-controller"),
    ],
)
async def test_a_stolen_password_with_another_users_client_id_is_refused(secured, owner, stolen_id):
    """h1's password asking for the owner's client id is refused; the owner keeps its one connection."""
    victim = secured.bus(owner, keepalive_s=5)
    async with victim:
        await victim.wait_connected(10)
        for protocol in ("3.1.1", "5", "3.1.1", "5", "3.1.1", "5"):
            attacker = secured.bus("h1", stolen_id, protocol=protocol)
            async with attacker:
                await asyncio.sleep(0.7)
                assert not attacker.connected.is_set()
                assert attacker.counters.connects == 0
        assert (victim.counters.connects, victim.counters.disconnects) == (1, 0)
        assert victim.connected.is_set()
    log = secured.log()
    assert log.count(f"as {broker_config.daemon_client_id(owner)} (p") == 1, log  # one session, never taken
    assert "as h1 (" not in log, log


async def test_an_agent_whose_host_id_is_not_its_user_is_refused_with_a_readable_reason(secured, caplog):
    """--host-id h2 with h1's credentials: refused, and the log names the id, the user and the fix."""
    wrong = secured.bus("h1", broker_config.daemon_client_id("h2"))
    with caplog.at_level(logging.WARNING, logger="protocols.bus"):
        async with wrong:
            await asyncio.sleep(1.0)
            assert not wrong.connected.is_set()
            with pytest.raises(BusError, match=r"within 0\.1s: it refused us \(the broker refused client id"):
                await wrong.wait_connected(0.1)
    text = caplog.text
    assert "refused by the broker at" in text and "cannot reach" not in text, text
    assert "refused client id 'fv-agent-h2' as user 'h1'" in text, text
    assert "--host-id equal to its broker user" in text, text


async def test_a_new_bus_with_the_probe_receives_what_was_queued_while_it_was_away(out_dir):
    """A persistent agent session survives a restart: the probe of the new bus never wipes it."""
    need(find_mosquitto(), "mosquitto is not installed (apt-get install -y mosquitto)")
    broker = SecureBroker(["h1"], tls=False, persistence=True)
    try:
        got: list[bytes] = []
        topic = topics.host_topic("h1", "cmd")
        first = broker.bus("h1")
        first.subscribe(topic, lambda t, p: got.append(p), qos=1)
        async with first:
            await first.wait_connected(10)
        assert first.protocol_in_use == "5"
        controller = broker.bus(broker_config.CONTROLLER_USER)
        async with controller:
            await controller.wait_connected(10)
            await controller.publish(topic, b"queued while away", qos=1)
            await asyncio.sleep(0.3)
        again = broker.bus("h1")  # protocol "auto": probes first
        again.subscribe(topic, lambda t, p: got.append(p), qos=1)
        async with again:
            await again.wait_connected(10)
            await eventually(lambda: got == [b"queued while away"], 5, "the queued command")
    finally:
        broker.close()


async def test_wrong_password_and_anonymous_clients_are_refused(secured):
    """A bad password or no credentials at all never gets a connection."""
    wrong = secured.bus("h1")
    wrong.settings = dataclasses.replace(wrong.settings, password="wrong")
    anonymous = Bus(BusSettings(url=secured.plain_url, client_id="acl-anon", **FAST_BUS))  # type: ignore[arg-type]
    async with wrong, anonymous:
        await asyncio.sleep(1.0)
        assert not wrong.connected.is_set()
        assert not anonymous.connected.is_set()


async def test_a_fleet_runs_end_to_end_with_generated_credentials(secured, tmp_path):
    """Controller and agent authenticate with their generated secrets, and a VM gets created."""
    from agent.daemon import Agent, AgentSettings
    from controller.daemon import Controller, ControllerSettings, FleetSettings
    from controller.services.enrolment import HostSettings
    from hv.sim.driver import SimDriver
    from protocols.vmspec import VmSpec

    settings = ControllerSettings(
        broker_url=secured.plain_url,
        db_path=tmp_path / "c.sqlite",
        serve_api=False,
        username=broker_config.CONTROLLER_USER,
        password=secured.password(broker_config.CONTROLLER_USER),
        fleet=FleetSettings(hosts=HostSettings(enrolment="open")),
        bus_overrides=FAST_BUS,
    )
    async with Controller(settings) as controller:
        assert controller.vms is not None and controller.bus is not None
        await controller.bus.wait_connected(10)
        agent = Agent(
            AgentSettings(
                host_id="h1",
                broker_url=secured.plain_url,
                state_dir=tmp_path / "h1",
                username="h1",
                password=secured.password("h1"),
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
