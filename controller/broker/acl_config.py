"""Per-host MQTT credentials, client ids and ACLs, written as a Mosquitto 2 configuration.

The broker is the bus's only gatekeeper, so it must stop one host from speaking for another:
- every host gets its own user, named after its host id, with a random password;
- each user is bound to the one client id its daemon asks for (:func:`daemon_client_id`: an agent's
  ``fv-agent-<host>``, the controller's ``fv-controller`` and ``fv-controller-telemetry``): the
  dynamic security plugin refuses a CONNECT with the user's password and any other id ("not
  authorised") before any session takeover, so a stolen password cannot knock another host or the
  controller off, and a mistyped --host-id is refused rather than renamed;
- a host may publish only under its own subtree (``fv/v1/host/<id>/...``), and may subscribe to and
  receive only its own command topic;
- only the controller's user may publish commands (``fv/v1/host/+/cmd``).

Users and ACLs live in the database of Mosquitto's dynamic security plugin (shipped with Mosquitto
2.0), which denies every publish, subscription and delivery its roles do not allow. Hosts
log in with their password over TLS (``mqtts://``, port 8883, a broker certificate signed by the CA
of ``fleetvisor ca``); the plain listener serves this machine only (127.0.0.1).

``fleetvisor broker-config --hosts h1,h2 --out DIR`` writes ``DIR/mosquitto.conf`` (which names the
other files by absolute path), ``DIR/dynamic-security.json``, ``DIR/ca.crt``, ``DIR/broker.crt``,
``DIR/broker.key`` and ``DIR/credentials/<user>.secret`` (one password per file, for the controller
and agents). Run as root, the broker's files belong to root and the ``mosquitto`` group (0640, the
directory 0750), which lets Mosquitto read them after it drops to its own user, and ``DIR/persist``
belongs to that user; the credentials stay root's alone. Running it again keeps existing passwords,
so adding a host never rotates the others (the CLI issues the broker's certificate once, into the
CA's directory, and reuses it).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import pathlib
import pwd
import secrets
import stat
from dataclasses import dataclass
from typing import Any

from protocols import topics
from protocols.vmspec import HOST_ID_RE

CONTROLLER_USER = "fv-controller"
#: The controller's telemetry connection: a user of its own (with the controller's password), so
#: each of the controller's two connections has its own client id.
CONTROLLER_TELEMETRY_USER = f"{CONTROLLER_USER}-telemetry"
#: The user Mosquitto drops to when started as root.
BROKER_USER = "mosquitto"
PBKDF2_ITERATIONS = 101_000
TLS_PORT = 8883
PLAIN_PORT = 1883
_HOST_PUBLISHES: tuple[topics.Family, ...] = ("state", "inventory", "telemetry", "events", "reply")
_PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib", "/usr/lib64", "/usr/local/lib")


class BrokerConfigError(ValueError):
    pass


def daemon_client_id(user: str) -> str:
    """The client id the daemon logging in as ``user`` asks for, the only one the broker lets it use.

    The controller's users are their own client ids; a host's user is its host id, and its agent's
    client id is ``fv-agent-<host id>`` (agent/daemon.py).
    """
    return user if user in (CONTROLLER_USER, CONTROLLER_TELEMETRY_USER) else f"fv-agent-{user}"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The broker's certificate and key, and the CA that signed them (see `fleetvisor ca`)."""

    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    conf: pathlib.Path
    security: pathlib.Path
    credentials: dict[str, pathlib.Path]
    #: ``DIR/ca.crt``, the certificate agents verify the broker with (None without TLS).
    ca: pathlib.Path | None


def find_plugin() -> pathlib.Path | None:
    """Path of Mosquitto's dynamic security plugin, or None when it is not installed."""
    for directory in _PLUGIN_DIRS:
        for found in sorted(glob.glob(os.path.join(directory, _PLUGIN_NAME))):
            return pathlib.Path(found)
    return None


def hashed_password(
    password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None
) -> dict[str, Any]:
    """The dynamic security plugin's password fields: PBKDF2-HMAC-SHA512 over a 12-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def _reads(topic: str) -> list[dict[str, Any]]:
    """Subscribing to ``topic`` and receiving what is published there."""
    return [_acl("subscribePattern", topic), _acl("publishClientReceive", topic)]


def security_database(passwords: dict[str, str], hosts: list[str], iterations: int) -> dict[str, Any]:
    """The dynamic security plugin's database: one client and one role per user, nothing by default."""
    roles = [
        {
            "rolename": CONTROLLER_USER,
            "acls": [
                *_reads(f"{topics.PREFIX}/host/+/#"),
                _acl("publishClientSend", topics.all_hosts("cmd")),
            ],
        },
        {"rolename": CONTROLLER_TELEMETRY_USER, "acls": _reads(topics.all_hosts("telemetry"))},
    ]
    for host in hosts:
        acls = [_acl("publishClientSend", topics.host_topic(host, family)) for family in _HOST_PUBLISHES]
        roles.append({"rolename": host, "acls": [*acls, *_reads(topics.host_topic(host, "cmd"))]})
    clients = [
        {
            "username": user,
            "clientid": daemon_client_id(user),
            **hashed_password(password, iterations=iterations),
            "roles": [{"rolename": user}],
        }
        for user, password in passwords.items()
    ]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


@dataclass(frozen=True, slots=True)
class _Owner:
    """Who owns what the broker reads: as root, root and the broker's group; otherwise the caller."""

    broker_uid: int | None = None
    broker_gid: int | None = None

    @classmethod
    def for_this_process(cls) -> _Owner:
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam(BROKER_USER)
        except KeyError:
            raise BrokerConfigError(
                f"there is no {BROKER_USER!r} user, which Mosquitto drops to when started as root; "
                "install Mosquitto (apt-get install mosquitto) before writing its configuration"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid)

    @property
    def file_mode(self) -> int:
        return 0o640 if self.broker_gid is not None else 0o600

    def share(self, path: pathlib.Path, mode: int) -> None:
        """Readable by the broker's group (as root), by nobody else."""
        if self.broker_gid is not None:
            os.chown(path, 0, self.broker_gid)
        os.chmod(path, mode)

    def give(self, path: pathlib.Path) -> None:
        """The broker's own (its persistence directory)."""
        if self.broker_uid is not None and self.broker_gid is not None:
            os.chown(path, self.broker_uid, self.broker_gid)
        os.chmod(path, 0o700)

    def closed_ancestor(self, path: pathlib.Path) -> pathlib.Path | None:
        """The first directory above ``path`` the broker's user cannot enter, if any."""
        if self.broker_uid is None or self.broker_gid is None:
            return None
        groups = set(os.getgrouplist(BROKER_USER, self.broker_gid))
        for directory in reversed(path.parents):
            st = directory.stat()
            bit = (
                stat.S_IXUSR
                if st.st_uid == self.broker_uid
                else stat.S_IXGRP
                if st.st_gid in groups
                else stat.S_IXOTH
            )
            if not st.st_mode & bit:
                return directory
        return None


def _write(path: pathlib.Path, data: bytes, owner: _Owner, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    owner.share(tmp, mode)
    os.replace(tmp, path)


def _secret(directory: pathlib.Path, user: str) -> tuple[pathlib.Path, str]:
    path = directory / f"{user}.secret"
    if path.exists():
        return path, path.read_text().strip()
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return path, password


def _check_hosts(hosts: list[str]) -> None:
    problems = []
    for host in hosts:
        if not HOST_ID_RE.fullmatch(host):
            problems.append(f"host id {host!r} is invalid (letters, digits, '.', '_' and '-')")
        elif host in (CONTROLLER_USER, CONTROLLER_TELEMETRY_USER):
            problems.append(f"host id {host!r} is reserved for the controller's user; rename the host")
    duplicates = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicates:
        problems.append(f"host ids repeated: {', '.join(duplicates)}")
    if not hosts:
        problems.append("no hosts given; pass --hosts h1,h2,...")
    if problems:
        raise BrokerConfigError("cannot write the broker configuration: " + "; ".join(problems))


def _tls_files(out_dir: pathlib.Path, tls: TlsFiles, owner: _Owner) -> tuple[pathlib.Path, list[str]]:
    """Copy the CA, the broker's certificate and its key next to the config, readable by the broker."""
    copies = []
    for source, name, mode in (
        (tls.ca, "ca.crt", 0o644),
        (tls.cert, "broker.crt", 0o644),
        (tls.key, "broker.key", owner.file_mode),
    ):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise BrokerConfigError(
                f"cannot read {source} for the broker's TLS listener: {exc.strerror}; issue the broker's "
                "certificate with `fleetvisor ca issue broker`, or pass --no-tls for a broker on 127.0.0.1 only"
            ) from None
        copies.append(out_dir / name)
        _write(copies[-1], data, owner, mode)
    ca, cert, key = copies
    return ca, [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]


def _prepare(plugin: pathlib.Path | None, out_dir: pathlib.Path) -> tuple[pathlib.Path, _Owner, pathlib.Path]:
    """The plugin's path, who will own the files, and ``out_dir`` resolved, once all can work."""
    plugin = plugin or find_plugin()
    if plugin is None or not plugin.is_file():
        raise BrokerConfigError(
            f"Mosquitto's dynamic security plugin ({plugin or _PLUGIN_NAME}) was not found; it holds "
            "the users and ACLs and ships with Mosquitto 2.0: install Mosquitto 2.0 or later, "
            "or pass --dynsec-plugin PATH"
        )
    owner = _Owner.for_this_process()
    out_dir = out_dir.resolve()
    closed = owner.closed_ancestor(out_dir)
    if closed is not None:
        raise BrokerConfigError(
            f"the {BROKER_USER!r} user, which Mosquitto drops to, cannot enter {closed} "
            f"(mode {stat.S_IMODE(closed.stat().st_mode):04o}), so it could not read {out_dir}; "
            f"choose an --out it can reach, such as /etc/mosquitto/fleetvisor, or `chmod o+x {closed}`"
        )
    return plugin, owner, out_dir


def generate(
    hosts: list[str],
    out_dir: pathlib.Path,
    *,
    tls: TlsFiles | None,
    listen: str = "0.0.0.0",
    port: int = TLS_PORT,
    plain_port: int = PLAIN_PORT,
    persistence: bool = True,
    plugin: pathlib.Path | None = None,
    iterations: int = PBKDF2_ITERATIONS,
) -> BrokerConfig:
    """Write the broker configuration for ``hosts`` into ``out_dir``.

    ``tls`` adds the ``mqtts://`` listener on ``listen:port``; the plain listener is on
    ``127.0.0.1:plain_port`` either way.

    Raises:
        BrokerConfigError: a host id is invalid, repeated or reserved; the plugin or the CA is
            missing; or the broker's user could not reach ``out_dir``.
    """
    _check_hosts(hosts)
    plugin, owner, out_dir = _prepare(plugin, out_dir)
    creds_dir = out_dir / "credentials"
    creds_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner.share(out_dir, 0o750 if owner.broker_gid is not None else 0o700)
    credentials: dict[str, pathlib.Path] = {}
    passwords: dict[str, str] = {}
    for user in [CONTROLLER_USER, *hosts]:
        credentials[user], passwords[user] = _secret(creds_dir, user)
    passwords[CONTROLLER_TELEMETRY_USER] = passwords[CONTROLLER_USER]
    security = out_dir / "dynamic-security.json"
    database = security_database(passwords, hosts, iterations)
    _write(security, json.dumps(database, indent=2).encode() + b"\n", owner, owner.file_mode)
    conf = out_dir / "mosquitto.conf"
    conf_lines = [
        f"# Generated by `fleetvisor broker-config`; re-run it to add hosts. Start with: mosquitto -c {conf}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {plugin}",
        f"plugin_opt_config_file {security}",
        "max_queued_messages 10000",
        "max_packet_size 1048576",
        # Commands and replies are small and waited for: send them at once, not after a delayed ACK.
        "set_tcp_nodelay true",
    ]
    if persistence:
        persist = out_dir / "persist"
        persist.mkdir(exist_ok=True)
        owner.give(persist)
        conf_lines += ["persistence true", f"persistence_location {persist}/"]
    else:
        conf_lines.append("persistence false")
    # No `use_username_as_clientid`: the client ids are bound in the security database instead. That
    # option renames a client to its user before the plugin checks the id, so every agent
    # (`fv-agent-<host>` for user `<host>`) would be refused, and a probe connection would be renamed
    # onto its user's persistent session and wipe it. Listener options (such as that one, were it
    # ever needed) go below their `listener` line: above the first one, they would open a default
    # listener on 0.0.0.0:1883.
    conf_lines += [
        "# Plain MQTT, for clients on this machine only.",
        f"listener {plain_port} 127.0.0.1",
    ]
    ca = None
    if tls is not None:
        ca, tls_lines = _tls_files(out_dir, tls, owner)
        conf_lines += [
            "# MQTT over TLS (mqtts://), for the hosts.",
            f"listener {port} {listen}",
            *tls_lines,
        ]
    _write(conf, ("\n".join(conf_lines) + "\n").encode(), owner, owner.file_mode)
    return BrokerConfig(conf=conf, security=security, credentials=credentials, ca=ca)
