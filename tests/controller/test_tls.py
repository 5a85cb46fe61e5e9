"""The small CA, TLS on the bus (mqtts:// against a real Mosquitto) and HTTPS on the API."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import httpx
import pytest
from cryptography import x509

from controller.broker import acl_config
from controller.daemon import Controller, ControllerSettings
from controller.security import pki
from protocols import topics
from protocols.bus import Bus
from tests.support.fleet import FAST_BUS, eventually
from tests.support.secure_fleet import SecureBroker


def test_issued_certificates_chain_to_the_ca_and_carry_their_names(tmp_path):
    """`ca issue` signs with the CA, with the requested IP and DNS names; a second `ca init` is refused."""
    ca_cert = pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue(tmp_path, "broker", ips=["127.0.0.1"], dns=["broker.local"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["broker.local"]
    assert key_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="not an IP address"):
        pki.issue(tmp_path, "x", ips=["not-an-ip"])
    with pytest.raises(pki.PkiError, match="fleetvisor ca init"):
        pki.issue(tmp_path / "nowhere", "x")


# paho leaks the socket of a failed TLS handshake (third-party; the refused client below triggers it).
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_generated_broker_serves_mqtts_verified_against_our_ca(mosquitto_binary):
    """broker-config's TLS listener: a host's bus trusting our CA logs in; one trusting only the system CAs cannot."""
    broker = SecureBroker(["h1"])
    try:
        got: list[bytes] = []
        controller = broker.bus(acl_config.CONTROLLER_USER)
        controller.subscribe(topics.all_hosts("events"), lambda t, p: got.append(p))
        trusted = broker.bus("h1", tls=True)
        stranger = Bus(dataclasses.replace(trusted.settings, client_id="tls-no", tls_context=None))
        async with controller, trusted, stranger:
            await controller.wait_connected(10)
            await trusted.wait_connected(10)
            assert trusted.address.tls
            await trusted.publish(topics.host_topic("h1", "events"), b"over tls", qos=1)
            await eventually(lambda: got == [b"over tls"], 5, "the message over TLS")
            await asyncio.sleep(1.0)
            assert not stranger.connected.is_set()
    finally:
        broker.close()


async def test_api_over_https_with_our_ca(mosquitto, tmp_path):
    """The controller serves HTTPS with an issued certificate; clients verify it with the CA."""
    ca = pki.init_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "controller", ips=["127.0.0.1"])
    settings = ControllerSettings(
        broker_url=mosquitto.url,
        db_path=tmp_path / "c.sqlite",
        api_port=0,
        tls_cert=cert,
        tls_key=key,
        bus_overrides=FAST_BUS,
    )
    async with Controller(settings) as controller:
        assert controller.api_url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
            assert (await client.get(f"{controller.api_url}/api/v1/health")).status_code == 200
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{controller.api_url}/api/v1/health")
