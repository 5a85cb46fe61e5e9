"""The MQTT bus client shared by agents and the controller.

One :class:`Bus` is one logical connection that survives broker restarts: it reconnects with
jittered exponential backoff, re-subscribes, and flushes QoS 1 messages that were published while
it was away. Sessions are persistent (clean session off on MQTT 3.1.1, clean start off plus a
session expiry on MQTT 5), so the broker keeps QoS 1 commands and events for a client that is
briefly gone.

The protocol is negotiated, not assumed: with ``protocol="auto"`` the bus offers MQTT 5 and falls
back to 3.1.1 when the broker answers "unsupported protocol version" (the embedded amqtt broker
does). Nothing in the application protocol depends on MQTT 5; its features (message expiry) are
used only when the connection speaks it.

Handlers are plain functions called on the bus task for every message. They must be quick and must
not block: real work goes to a queue or a task of the owner. An exception in a handler is logged
and counted, never fatal to the connection. Before any handler, an admission (:meth:`Bus.admit_with`,
:mod:`protocols.inbound`) sees each message with its retain flag as it leaves the socket, drops it
or names its lane, and the bus dispatches round-robin across lanes, so one flooding sender cannot
queue the others out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols import paho_tuning
from protocols.inbound import Admission, InboundCounters, LaneQueue, admit_all

log = logging.getLogger(__name__)
#: aiomqtt's own logger. It warns about every burst of concurrent QoS 1 publishes, which is normal
#: here (the offline buffer flushes that way), so it speaks only of errors unless lowered.
_client_log = logging.getLogger(f"{__name__}.client")
_client_log.setLevel(logging.ERROR)

Handler = Callable[[str, bytes], None]
ConnectCallback = Callable[[bool], Awaitable[None]]

_UNSUPPORTED_PROTOCOL_CODES: Final = {1, 132}  # 3.1.1 CONNACK 0x01, MQTT 5 reason 0x84
#: CONNACK codes of refused credentials: 3.1.1 bad user name or password, not authorised; MQTT 5
#: bad user name or password (0x86), not authorised (0x87).
_AUTH_CODES: Final = {4, 5, 134, 135}


def _code(exc: MqttConnectError) -> int:
    """The CONNACK's return code (MQTT 3.1.1) or reason code (MQTT 5)."""
    rc = exc.rc
    return -1 if rc is None else rc if isinstance(rc, int) else int(rc.value)


class BusError(Exception):
    """A bus operation failed; the message says what, why and what to do."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``.

        Raises:
            BusError: the URL is not an MQTT URL.
        """
        parsed = urllib.parse.urlsplit(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp"):
            raise BusError(
                f"broker url {url!r}: scheme must be mqtt:// or mqtts://, e.g. mqtt://127.0.0.1:1883"
            )
        if not parsed.hostname:
            raise BusError(f"broker url {url!r} has no host; use e.g. mqtt://127.0.0.1:1883")
        try:
            port = parsed.port
        except ValueError as exc:
            raise BusError(f"broker url {url!r}: {exc}; use e.g. mqtt://127.0.0.1:1883") from None
        tls = parsed.scheme == "mqtts"
        return cls(parsed.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class BusSettings:
    """How to reach the broker and how to behave when it goes away."""

    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    protocol: Literal["auto", "3.1.1", "5"] = "auto"
    #: Keep the session (subscriptions, queued QoS 1 messages) across disconnects.
    persistent_session: bool = True
    keepalive_s: int = 5
    #: MQTT 5 only: how long the broker keeps our session (subscriptions, queued QoS 1) while we are away.
    session_expiry_s: int = 3600
    timeout_s: float = 10.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    #: QoS 1 messages kept while disconnected; the oldest are dropped (and counted) past this.
    max_pending: int = 10_000
    #: Bound on messages received but not yet dispatched (the paho-to-asyncio queue), in all lanes.
    max_incoming: int = 100_000
    #: Bound on one lane of that queue (one sender, as the admission names it); its oldest go first.
    max_incoming_per_lane: int = 10_000
    tls_context: ssl.SSLContext | None = None


@dataclass(slots=True)
class BusCounters:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    published: int = 0
    dropped_qos0_offline: int = 0
    dropped_pending_overflow: int = 0
    handler_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: float | None


def read_secret(path: str) -> str:
    """The first line of a secret file (a broker password).

    Raises:
        BusError: the file cannot be read or is empty.
    """
    try:
        with open(path) as f:
            secret = f.readline().strip()
    except OSError as exc:
        raise BusError(f"cannot read the broker password file {path!r}: {exc.strerror}") from None
    if not secret:
        raise BusError(f"broker password file {path!r} is empty; write the password on its first line")
    return secret


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Jittered exponential backoff ("equal jitter"): half fixed, half random, capped."""
    ceiling = min(max_s, initial_s * (2.0 ** min(attempt, 30)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Bus:
    """A reconnecting MQTT connection with topic handlers. Use as ``async with Bus(...) as bus``."""

    def __init__(self, settings: BusSettings, *, will: LastWill | None = None) -> None:
        self.settings = settings
        self.address = BrokerAddress.parse(settings.url)
        self.will = will
        self.counters = BusCounters()
        #: What the admission and the lanes of the incoming queue dropped.
        self.inbound = InboundCounters()
        self._admission: Admission = admit_all
        #: Why the broker refused the last connection attempt (None: it did not refuse).
        self._last_refusal: str | None = None
        self.connected = asyncio.Event()
        self.protocol_in_use: Literal["3.1.1", "5"] | None = None
        self._handlers: list[tuple[str, int, Handler]] = []
        self._route_cache: dict[str, tuple[Handler, ...]] = {}
        self._on_connect: list[ConnectCallback] = []
        self._pending: collections.deque[_Pending] = collections.deque()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._protocol_choice: Literal["3.1.1", "5"] = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self._first_connect = True
        self._probed = settings.protocol != "auto"

    # -- configuration --------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter``.

        Subscriptions are (re)made on every connect, so this may be called before or after start.
        """
        self._handlers.append((topic_filter, qos, handler))
        self._route_cache.clear()
        client = self._client
        if client is not None and self.connected.is_set():
            task = asyncio.get_running_loop().create_task(self._subscribe_one(client, topic_filter, qos))
            task.add_done_callback(_log_task_failure)

    def admit_with(self, admission: Admission) -> None:
        """Run ``admission(topic, payload, retain)`` on every incoming message before it is queued;
        it returns the message's lane (one per sender for fairness) or None to drop it (counted).
        """
        self._admission = admission

    def on_connect(self, callback: ConnectCallback) -> None:
        """Run ``await callback(first)`` after each successful connect (``first`` is True once)."""
        self._on_connect.append(callback)

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"bus:{self.settings.client_id}"
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop reconnecting."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected.

        Raises:
            BusError: not connected within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            if self._last_refusal is not None:
                raise BusError(
                    f"could not connect to the broker at {self.address} within {timeout:g}s: it refused "
                    f"us ({self._last_refusal})"
                ) from None
            raise BusError(
                f"could not connect to the broker at {self.address} within {timeout:g}s; "
                "check that it runs and that the url is right"
            ) from None

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        expiry_s: float | None = None,
    ) -> bool:
        """Publish a message. Returns True when it went to the broker now.

        QoS 0 messages are dropped (and counted) while disconnected. QoS 1 messages are kept in a
        bounded buffer and sent after the next connect; when the buffer is full the oldest go.
        ``expiry_s`` becomes the MQTT 5 message expiry where the connection speaks MQTT 5.
        """
        item = _Pending(topic, payload, qos, retain, expiry_s)
        client = self._client
        if client is None or not self.connected.is_set():
            self._keep(item)
            return False
        try:
            await self._send(client, item)
        except aiomqtt.MqttError as exc:
            log.debug("publish on %s failed (%s); keeping it for the next connection", topic, exc)
            self._keep(item)
            return False
        return True

    def publish_nowait(self, topic: str, payload: bytes) -> bool:
        """Fire a QoS 0 message without awaiting anything (telemetry). Returns False if dropped."""
        client = self._client
        if client is None or not self.connected.is_set():
            self.counters.dropped_qos0_offline += 1
            return False
        info = client._client.publish(topic, payload, 0, False)
        if info.rc != 0:
            self.counters.dropped_qos0_offline += 1
            return False
        self.counters.published += 1
        return True

    def _keep(self, item: _Pending) -> None:
        if item.qos == 0:
            self.counters.dropped_qos0_offline += 1
            return
        if len(self._pending) >= self.settings.max_pending:
            self._pending.popleft()
            self.counters.dropped_pending_overflow += 1
            log.warning(
                "bus %s: offline buffer full, dropped the oldest QoS 1 message", self.settings.client_id
            )
        self._pending.append(item)

    async def _send(self, client: aiomqtt.Client, item: _Pending) -> None:
        properties = None
        if item.expiry_s is not None and self.protocol_in_use == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = max(1, int(item.expiry_s))
        await client.publish(
            item.topic,
            item.payload,
            qos=item.qos,
            retain=item.retain,
            properties=properties,
            timeout=self.settings.timeout_s,
        )
        self.counters.published += 1

    # -- the connection loop --------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        """TLS for mqtts:// URLs: the configured context, else the system's verified default. Never plain text."""
        if not self.address.tls:
            return None
        return self.settings.tls_context or ssl.create_default_context()

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        common = {
            "identifier": s.client_id,
            "logger": _client_log,
            "username": s.username,
            "password": s.password,
            "will": will,
            "keepalive": s.keepalive_s,
            "timeout": s.timeout_s,
            "queue_type": functools.partial(
                LaneQueue,
                admission=lambda: self._admission,
                counters=self.inbound,
                lane_max=s.max_incoming_per_lane,
                total_max=s.max_incoming,
            ),
            "tls_context": self._tls_context(),
        }
        if self._protocol_choice == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s if s.persistent_session else 0
            return aiomqtt.Client(
                self.address.host,
                self.address.port,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=not s.persistent_session,
                properties=props,
                **common,  # type: ignore[arg-type]
            )
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=not s.persistent_session,
            **common,  # type: ignore[arg-type]
        )

    async def _probe_protocol(self) -> None:
        """Learn whether the broker speaks MQTT 5, with a throwaway clean connection.

        The probe carries no CONNECT properties on purpose: amqtt 0.12 answers a bare MQTT 5 CONNECT
        with "unsupported protocol version" but hangs on one that carries properties.
        """
        probe = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=f"{self.settings.client_id}-probe-{random.getrandbits(32):08x}",
            username=self.settings.username,
            password=self.settings.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.settings.timeout_s,
            tls_context=self._tls_context(),
        )
        try:
            async with probe:
                self._protocol_choice = "5"
        except MqttConnectError as exc:
            code = _code(exc)
            if code in _UNSUPPORTED_PROTOCOL_CODES:
                log.info("broker %s does not speak MQTT 5; using MQTT 3.1.1", self.address)
                self._protocol_choice = "3.1.1"
            elif code >= 128:
                # An MQTT 5 reason code: the broker speaks MQTT 5. A broker that binds client ids to
                # users refuses the probe's id, before any session is touched; the real connection
                # reports any real credential error.
                log.info("bus %s: the broker at %s refused the MQTT 5 probe (%s); using MQTT 5",
                         self.settings.client_id, self.address, exc)  # fmt: skip
                self._protocol_choice = "5"
            else:
                raise
        self._probed = True

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        finally:
            self.connected.clear()
            self._client = None

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            client: aiomqtt.Client | None = None
            try:
                if not self._probed:
                    await self._probe_protocol()
                client = self._make_client()
                async with client:
                    attempt = 0
                    await self._serve(client)
            except MqttConnectError as exc:
                self._lost(self._refusal(exc), attempt, refused=True)
            except aiomqtt.MqttError as exc:
                self._lost(str(exc) or type(exc).__name__, attempt)
            await asyncio.sleep(
                backoff_delay(attempt, self.settings.backoff_initial_s, self.settings.backoff_max_s)
            )
            attempt += 1

    def _refusal(self, exc: MqttConnectError) -> str:
        """Why the broker refused the CONNECT, and what to check."""
        if _code(exc) not in _AUTH_CODES:
            return f"the broker refused the connection: {exc}"
        user = repr(self.settings.username) if self.settings.username else "no user (anonymous)"
        return (
            f"the broker refused client id {self.settings.client_id!r} as user {user}: {exc}; the "
            "password is wrong or the client id is not the one bound to that user. Use this daemon's "
            "own credentials, and for an agent a --host-id equal to its broker user (--username)"
        )

    def _lost(self, why: str, attempt: int, *, refused: bool = False) -> None:
        self._last_refusal = why if refused else None
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._client = None
        if was_connected:
            self.counters.disconnects += 1
            log.warning(
                "bus %s: lost the broker at %s (%s); reconnecting", self.settings.client_id, self.address, why
            )
        elif attempt in (0, 5) or attempt % 50 == 0:
            log.warning(
                "bus %s: refused by the broker at %s (%s); retrying with backoff"
                if refused
                else "bus %s: cannot reach the broker at %s (%s); retrying with backoff",
                self.settings.client_id,
                self.address,
                why,
            )

    async def _subscribe_one(self, client: aiomqtt.Client, topic_filter: str, qos: int) -> None:
        await client.subscribe(topic_filter, qos=qos, timeout=self.settings.timeout_s)

    async def _serve(self, client: aiomqtt.Client) -> None:
        paho_tuning.tune(client)
        self.protocol_in_use = self._protocol_choice
        for topic_filter, qos, _ in self._handlers:
            await self._subscribe_one(client, topic_filter, qos)
        self._client = client
        self.connected.set()
        self.counters.connects += 1
        first, self._first_connect = self._first_connect, False
        log.info(
            "bus %s: connected to %s (MQTT %s)", self.settings.client_id, self.address, self.protocol_in_use
        )
        while self._pending:
            item = self._pending[0]
            await self._send(client, item)
            self._pending.popleft()
        for callback in self._on_connect:
            await callback(first)
        queue = client._queue
        disconnected = client._disconnected
        async for message in client.messages:
            self._dispatch(message.topic.value, message.payload)
            # aiomqtt's iterator spends a task and a wait, three event-loop turns, on each message,
            # and each turn the reader takes in up to a read burst: under load, dispatch would get a
            # quarter of the loop and the rest would be read only to be dropped from a full queue.
            # So what is already queued is taken directly, a read burst per turn, and the reader
            # and dispatch share the loop evenly.
            taken = 0
            while not queue.empty():
                message = queue.get_nowait()
                self._dispatch(message.topic.value, message.payload)
                taken += 1
                if taken % paho_tuning.READ_BURST == 0:
                    await asyncio.sleep(0)
                    if disconnected.done():
                        break  # the iterator raises the disconnect; what is queued waits for it

    def _routes(self, topic: str) -> tuple[Handler, ...]:
        routes = self._route_cache.get(topic)
        if routes is None:
            routes = tuple(h for f, _, h in self._handlers if topic_matches(f, topic))
            if len(self._route_cache) > 100_000:
                self._route_cache.clear()
            self._route_cache[topic] = routes
        return routes

    def _dispatch(self, topic: str, payload: object) -> None:
        self.counters.received += 1
        data = payload if isinstance(payload, bytes) else bytes(payload) if payload is not None else b""  # type: ignore[call-overload]
        for handler in self._routes(topic):
            try:
                handler(topic, data)
            except Exception:
                self.counters.handler_errors += 1
                log.exception("bus %s: handler for %s failed", self.settings.client_id, topic)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching with ``+`` and ``#``.

    As the MQTT spec says (4.7.2), a filter that starts with a wildcard does not match ``$`` topics.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("bus background call failed: %s", task.exception())
