"""A Mosquitto started exactly as `fleetvisor broker-config` prints it, clients that log in to it, and
a whole fleet of ``fleetvisor`` processes over ``mqtts://``.

The broker's files live in a fresh directory under the system's temp dir, not in the test's
``tmp_path``: started as root, Mosquitto drops to its own user, which cannot enter pytest's private
``/tmp/pytest-of-root``. `broker-config` gives the files to that user's group, so no ``user root``.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from controller.broker import acl_config
from controller.security import pki
from protocols.bus import Bus, BusSettings, LastWill, read_secret
from tests.support import free_port
from tests.support.brokers import BrokerError, find_mosquitto, wait_listening
from tests.support.fleet import FAST_BUS
from tests.support.processes import Proc, wait_for


class SecureBroker:
    """``broker-config`` for ``hosts`` (TLS on unless ``tls=False``) and a Mosquitto running it."""

    def __init__(self, hosts: list[str], *, tls: bool = True, persistence: bool = False) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed; apt-get install -y mosquitto")
        self.root = Path(tempfile.mkdtemp(prefix="fv-secure-broker-"))
        self.root.chmod(0o711)  # enterable by the broker's user, not listable
        self.plain_port, self.tls_port = free_port(), free_port()
        names = None
        if tls:
            ca = pki.init_ca(self.root / "pki")
            cert, key = pki.issue(self.root / "pki", "broker", ips=["127.0.0.1"], dns=["localhost"])
            names = acl_config.TlsFiles(ca=ca, cert=cert, key=key)
        self.config = acl_config.generate(
            hosts,
            self.root / "broker",
            tls=names,
            port=self.tls_port,
            plain_port=self.plain_port,
            persistence=persistence,
            iterations=1000,
        )
        self.log_path = self.root / "mosquitto.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config.conf)], stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            for port in (self.plain_port, *([self.tls_port] if tls else [])):
                wait_listening("127.0.0.1", port, 10, alive=lambda: self.process.poll() is None)
        except BrokerError as exc:
            self.close()
            raise BrokerError(f"{exc}\n--- log ---\n{self.log()}") from None

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://localhost:{self.tls_port}"

    def password(self, user: str) -> str:
        if user == acl_config.CONTROLLER_TELEMETRY_USER:
            user = acl_config.CONTROLLER_USER
        return read_secret(str(self.config.credentials[user]))

    def tls_context(self) -> ssl.SSLContext:
        assert self.config.ca is not None
        return ssl.create_default_context(cafile=str(self.config.ca))

    def bus(
        self,
        user: str,
        client_id: str | None = None,
        *,
        tls: bool = False,
        will: LastWill | None = None,
        **overrides: object,
    ) -> Bus:
        """A bus logged in as ``user`` with its own client id unless ``client_id`` says otherwise."""
        settings = BusSettings(
            url=self.tls_url if tls else self.plain_url,
            client_id=client_id or acl_config.daemon_client_id(user),
            username=user,
            password=self.password(user),
            tls_context=self.tls_context() if tls else None,
            **{**FAST_BUS, **overrides},  # type: ignore[arg-type]
        )
        return Bus(settings, will=will)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        """Stop the broker by its PID and remove its files."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class SecureFleet:
    """A controller and sim agents, each a ``fleetvisor`` process, over ``mqtts://`` with their own
    credentials, and the API on HTTPS (a certificate from the broker's CA).
    """

    def __init__(
        self, broker: SecureBroker, procs: Callable[..., Proc], root: Path, agents: list[str]
    ) -> None:
        assert broker.config.ca is not None
        self.broker = broker
        self.ca = broker.config.ca
        cert, key = pki.issue(broker.root / "pki", "controller", ips=["127.0.0.1"])
        self.url = f"https://127.0.0.1:{free_port()}"
        self.controller = procs(
            "controller", "controller", *self._bus_args(acl_config.CONTROLLER_USER),
            "--db", str(root / "c.sqlite"), "--port", self.url.rsplit(":", 1)[1],
            "--tls-cert", str(cert), "--tls-key", str(key), "--enrolment", "open",
        )  # fmt: skip
        self.agents = {
            host: procs(
                host,
                "agent",
                "--host-id",
                host,
                *self._bus_args(host),
                "--state-dir",
                str(root / host),
                "--memory-mib",
                "8192",
            )
            for host in agents
        }
        self.http = httpx.Client(
            base_url=f"{self.url}/api/v1", verify=ssl.create_default_context(cafile=str(self.ca))
        )
        wait_for(lambda: set(agents) <= self.online(), 30, "every host online over mqtts", self.all)

    def _bus_args(self, user: str) -> list[str]:
        secret = str(self.broker.config.credentials[user])
        return [
            "--broker",
            self.broker.tls_url,
            "--ca-file",
            str(self.ca),
            "--username",
            user,
            "--password-file",
            secret,
        ]

    @property
    def all(self) -> list[Proc]:
        return [self.controller, *self.agents.values()]

    def online(self) -> set[str]:
        return {h["host_id"] for h in self.http.get("/hosts", timeout=3).json() if h["online"]}

    def close(self) -> None:
        self.http.close()
