"""Fixtures for the whole suite: real brokers on free loopback ports.

``mosquitto``: a started :class:`~tests.support.brokers.MosquittoBroker` (function scope; skipped
with a reason when the binary is missing, failed under CI: see :mod:`tests.support.needs`, whose
``needs`` marker is registered and checked here). ``mosquitto_factory(persistence=..., port=...,
extra_config=...)`` starts more, or differently configured, brokers. ``embedded_broker``: a
started amqtt broker (MQTT 3.1.1 only) in the test's event loop. Every broker is stopped when the
test ends, by PID; a failing test prints the end of its broker's log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from tests.support import free_port
from tests.support.brokers import (
    EmbeddedBroker,
    MosquittoBroker,
    amqtt_config,
    find_mosquitto,
    quiet_amqtt_loggers,
    restore_levels,
)
from tests.support.needs import MARKER as NEEDS_MARKER
from tests.support.needs import check_marks, need
from tests.support.processes import Proc

#: amqtt 0.12.1 warns about its own documented ``sys_interval`` option; nothing else is ignored.
AMQTT_WARNING_FILTERS = ("ignore:sys_interval is deprecated:DeprecationWarning",)

_MOSQUITTO_FIXTURES = {"mosquitto", "mosquitto_factory", "mosquitto_binary"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{NEEDS_MARKER}(condition, reason): skip unless condition holds; fail instead under CI=true",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    check_marks(item)  # before the fixtures: a test that cannot run starts no broker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _MOSQUITTO_FIXTURES:
            item.add_marker(pytest.mark.mosquitto)
        if "embedded_broker" in names:
            for spec in AMQTT_WARNING_FILTERS:
                item.add_marker(pytest.mark.filterwarnings(spec))


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    """Path of the mosquitto binary; skips the test when it is not installed (fails it under CI)."""
    found = find_mosquitto()
    need(found, "mosquitto is not installed (apt-get install -y mosquitto, or run ./scripts/test as root)")
    assert found is not None
    return found


class MosquittoFactory(Protocol):
    def __call__(
        self,
        *,
        persistence: bool = False,
        port: int | None = None,
        extra_config: str = "",
        start: bool = True,
    ) -> MosquittoBroker: ...


@pytest.fixture
def mosquitto_factory(
    mosquitto_binary: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MosquittoFactory]:
    """Make brokers: ``mosquitto_factory(persistence=True)`` etc.; all are stopped after the test."""
    brokers: list[MosquittoBroker] = []

    def make(
        *, persistence: bool = False, port: int | None = None, extra_config: str = "", start: bool = True
    ) -> MosquittoBroker:
        broker = MosquittoBroker(
            tmp_path / f"mosquitto-{len(brokers)}",
            port if port is not None else free_port(),
            persistence=persistence,
            extra_config=extra_config,
            binary=mosquitto_binary,
        )
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    try:
        yield make
    finally:
        failed = _failed(request)
        for broker in brokers:
            broker.stop()
            if failed:
                print(f"--- {broker!r} log ({broker.log_path}) ---\n{broker.log_tail()}")


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """A started Mosquitto on a free loopback port (anonymous, no persistence), stopped after the test."""
    return mosquitto_factory()


@pytest.fixture
async def embedded_broker() -> AsyncIterator[EmbeddedBroker]:
    """A started amqtt 0.12.1 broker (MQTT 3.1.1 only) on a free loopback port, shut down after the test."""
    from amqtt.broker import Broker  # imported here: it is slow and only these tests need it

    levels = quiet_amqtt_loggers()
    port = free_port()
    broker = Broker(amqtt_config("127.0.0.1", port))
    await broker.start()
    try:
        yield EmbeddedBroker("127.0.0.1", port, broker)
    finally:
        try:
            await broker.shutdown()
        finally:
            restore_levels(levels)


UniqueName = Callable[[str], str]


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> UniqueName:
    """``unique("sub")`` gives a client id / topic segment unique to this test (and to the call)."""
    import hashlib
    import itertools

    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
    counter = itertools.count()
    return lambda prefix: f"{prefix}-{digest}-{next(counter)}"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``fleetvisor`` subcommands; every one is stopped (SIGTERM, then SIGKILL) by PID afterwards."""
    started: list[Proc] = []

    def start(name: str, *args: str, prefix: Sequence[str] = ()) -> Proc:
        proc = Proc(list(args), tmp_path / f"{name}.log", prefix)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
