"""The flags of ``fleetvisor agent`` and the agent they make: its settings and its engine's driver.

Like :func:`controller.daemon.add_arguments`, the agent knows its own flags; the ``fleetvisor``
command adds the broker credentials and runs it.
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import re
from collections.abc import Callable
from typing import Any

from agent.settings import AgentSettings
from hv.driver import Driver
from hv.engines import ENGINES, create_driver
from hv.sim.driver import SimDriver
from protocols.messages import MAX_LABELS
from protocols.vmspec import HOST_ID_RE, LABEL_PATTERN

#: The longest label value an inventory may carry (protocols.messages).
MAX_LABEL_VALUE = 256


def add_arguments(
    p: argparse.ArgumentParser, *, broker_url: Callable[[str], str], default_broker: str
) -> None:
    """The agent's flags; the defaults are the agent's and the sim engine's own."""
    agent = AgentSettings(host_id="-", broker_url="")
    sim = {name: param.default for name, param in inspect.signature(SimDriver).parameters.items()}
    p.add_argument("--host-id", required=True, help="this host's id (unique in the fleet)")
    p.add_argument(
        "--broker", type=broker_url, default=default_broker, help="MQTT broker URL (default %(default)s)"
    )
    p.add_argument("--hv", choices=ENGINES, default="sim", help="hypervisor engine (default sim)")
    p.add_argument(
        "--state-dir", help="where the agent keeps its state (default ~/.local/state/fleetvisor/agent/ID)"
    )
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=agent.telemetry_interval_s,
        metavar="S",
        help="seconds between samples",
    )
    p.add_argument("--address", default=agent.address, help="address other hosts reach this one on")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label this host reports"
    )
    p.add_argument(
        "--join-token",
        default="",
        help="a one-time token from `fleetvisor host join-token` that enrols this host id",
    )
    p.add_argument(
        "--image-dir",
        action="append",
        metavar="DIR",
        help="qemu engine: a directory VMs may take kernels and disk images from (repeatable; default STATE/images)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="auto",
        help="qemu engine: KVM when a probe shows it really runs guests (auto), or force one",
    )
    p.add_argument("--power-idle-w", type=float, help="the host's power model: watts at idle")
    p.add_argument("--power-max-w", type=float, help="the host's power model: watts at full load")
    p.add_argument("--cores", type=int, default=sim["cores"], help="sim engine: cores of the simulated host")
    p.add_argument(
        "--memory-mib", type=int, default=sim["memory_mib"], help="sim engine: memory of the simulated host"
    )
    p.add_argument(
        "--ha-lease",
        type=float,
        default=0.0,
        metavar="S",
        help="opt-in self-fencing: destroy HA VMs after this long without the bus; 0 disables (the default)",
    )


def labels_from(items: list[str]) -> dict[str, str]:
    """``--label KEY=VALUE`` flags as a dict.

    Raises:
        ValueError: a label is malformed, too long, or there are too many (inventories would be refused).
    """
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {item!r}: write it as KEY=VALUE, e.g. --label zone=a")
        if not re.match(LABEL_PATTERN, key):
            raise ValueError(
                f"--label {item!r}: the key may hold only letters, digits, '.', '_', '/' and '-' (63 at most)"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(
                f"--label {key}=...: the value has {len(value)} characters; {MAX_LABEL_VALUE} at most"
            )
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels given; a host reports {MAX_LABELS} at most")
    return labels


def build(
    args: argparse.Namespace, *, password: str | None, bus_overrides: dict[str, Any], state_dir: pathlib.Path
) -> tuple[AgentSettings, Driver]:
    """The agent's settings and driver from the flags of :func:`add_arguments`.

    Raises:
        ValueError: the host id, a label, the engine or an engine option is wrong (the message says how).
    """
    if not HOST_ID_RE.fullmatch(args.host_id):
        raise ValueError(f"host id {args.host_id!r} is invalid; use letters, digits, '.', '_' and '-'")
    labels = labels_from(args.label)
    options: dict[str, object] = {}
    if args.hv == "sim":
        options = {"cores": args.cores, "memory_mib": args.memory_mib}
    elif args.hv == "qemu":
        options = {"accel": args.accel}
        if args.image_dir:
            options["image_dirs"] = [pathlib.Path(d) for d in args.image_dir]
    if args.power_idle_w is not None:
        options["power_idle_w"] = args.power_idle_w
    if args.power_max_w is not None:
        options["power_max_w"] = args.power_max_w
    driver = create_driver(args.hv, host_id=args.host_id, state_dir=state_dir, **options)
    settings = AgentSettings(
        host_id=args.host_id,
        broker_url=args.broker,
        username=args.username,
        password=password,
        state_dir=state_dir,
        telemetry_interval_s=args.telemetry_interval,
        address=args.address,
        ha_lease_s=args.ha_lease if args.ha_lease > 0 else None,
        labels=labels,
        bus_overrides=bus_overrides,
        join_token=args.join_token,
    )
    return settings, driver
