"""Topic names, MQTT filter matching and broker URLs: the addressing half of the wire contract."""

from __future__ import annotations

import pytest

from protocols import topics
from protocols.bus import BrokerAddress, BusError, topic_matches


def test_host_topic_layout() -> None:
    """Pins the exact topic strings under fv/v1, which brokers' ACLs and other peers rely on."""
    assert topics.PREFIX == "fv/v1"
    assert topics.host_topic("node-1", "state") == "fv/v1/host/node-1/state"
    assert topics.host_topic("node-1", "cmd") == "fv/v1/host/node-1/cmd"
    assert topics.all_hosts("telemetry") == "fv/v1/host/+/telemetry"
    assert topics.host_subtree("node-1") == "fv/v1/host/node-1/#"


@pytest.mark.parametrize("family", topics.FAMILIES)
@pytest.mark.parametrize("host_id", ["node-1", "n.example.org", "A_9"])
def test_parse_round_trips_every_family(host_id: str, family: topics.Family) -> None:
    """Pins parse(host_topic(h, f)) == (h, f), and that the builders' topics match their filters."""
    topic = topics.host_topic(host_id, family)
    assert topics.parse(topic) == (host_id, family)
    assert topic_matches(topics.all_hosts(family), topic)
    assert topic_matches(topics.host_subtree(host_id), topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fv/v2/host/node-1/state",
        "fv/v1/host/node-1/state/extra",
        "fv/v1/host/node-1",
        "fv/v1/hosts/node-1/state",
        "fv/v1/host/node-1/passwords",
        "xx/v1/host/node-1/state",
        "$SYS/broker/uptime",
        "",
        "/fv/v1/host/node-1/state",
        "fv/v1/host//state",  # an empty host id
        "fv/v1/host/node 1/state",  # not a host id: a space
        "fv/v1/host/-rf/state",  # not a host id: must start with a letter or digit
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    """Pins that anything outside fv/v1/host/<id>/<known family> parses to None."""
    assert topics.parse(topic) is None


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b/d", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/#", "a/b/c/d", True),
        ("a/#", "a", True),
        ("#", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("fv/v1/host/+/state", "fv/v1/host/n1/state", True),
        ("fv/v1/host/+/state", "fv/v1/host/n1/telemetry", False),
        ("fv/v1/host/n1/#", "fv/v1/host/n2/state", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    """Pins MQTT filter semantics for + (one level) and # (this level and all below)."""
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter", ["#", "+/broker/uptime"])
def test_wildcards_do_not_match_dollar_topics(topic_filter: str) -> None:
    """Pins that '#' and '+' at the first level do not route $SYS topics to a handler."""
    assert topic_matches(topic_filter, "$SYS/broker/uptime") is False


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, False),
        ("mqtt://broker.example", "broker.example", 1883, False),
        ("mqtts://broker.example", "broker.example", 8883, True),
        ("mqtts://broker.example:9000", "broker.example", 9000, True),
        ("tcp://10.0.0.1:1884", "10.0.0.1", 1884, False),
        ("localhost:2883", "localhost", 2883, False),
        ("mqtt://[::1]:1883", "::1", 1883, False),
    ],
)
def test_broker_address_parses_good_urls(url: str, host: str, port: int, tls: bool) -> None:
    """Pins the accepted URL forms and their default ports (1883 plain, 8883 TLS)."""
    address = BrokerAddress.parse(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)


def test_broker_address_str_is_a_url() -> None:
    """Pins str(BrokerAddress) as a URL that parses back to the same address (used in log lines)."""
    address = BrokerAddress.parse("mqtts://broker.example")
    assert str(address) == "mqtts://broker.example:8883"
    assert BrokerAddress.parse(str(address)) == address


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://broker:1883", "broker url 'http://broker:1883': scheme must be mqtt:// or mqtts://"),
        ("ws://broker", "scheme must be mqtt:// or mqtts://, e.g. mqtt://127.0.0.1:1883"),
        ("mqtt://", "broker url 'mqtt://' has no host; use e.g. mqtt://127.0.0.1:1883"),
        ("mqtt://:1883", "has no host"),
        ("mqtt://broker:99999", "broker url 'mqtt://broker:99999': Port out of range"),
        ("mqtt://broker:abc", "broker url 'mqtt://broker:abc': "),
    ],
)
def test_broker_address_rejects_bad_urls(url: str, expected: str) -> None:
    """Pins that a bad broker URL raises BusError naming the URL, the reason and an example of a good one."""
    with pytest.raises(BusError) as info:
        BrokerAddress.parse(url)
    assert expected in str(info.value)
    assert "mqtt://127.0.0.1:1883" in str(info.value)
