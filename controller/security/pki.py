"""A small certificate authority for the bus and the API: ``fleetvisor ca init`` and ``ca issue``.

``init`` writes ``DIR/ca.key`` (mode 0600) and ``DIR/ca.crt``: an ECDSA P-256 CA valid for 10 years.
``issue NAME`` writes ``DIR/NAME.key`` and ``DIR/NAME.crt``: a certificate signed by that CA, valid
for 1 year, usable by servers and clients alike, with the subject alternative names given (IP
addresses and DNS names). Mosquitto uses them for an ``mqtts://`` listener, the controller for HTTPS,
and agents and the CLI verify against ``ca.crt``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class PkiError(Exception):
    pass


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: pathlib.Path, name: str = "Fleetvisor CA") -> pathlib.Path:
    """Create the CA in ``directory``; returns the certificate path.

    Raises:
        PkiError: a CA already exists there (it is never overwritten).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() or cert_path.exists():
        raise PkiError(f"a CA already exists in {directory}; use it, or choose another --dir")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(
    directory: pathlib.Path, name: str, *, ips: list[str] | None = None, dns: list[str] | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Issue a certificate for ``name`` signed by the CA in ``directory``; returns (cert, key) paths.

    Raises:
        PkiError: no CA there, a bad IP address, or a bad name.
    """
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"certificate name {name!r} is invalid; use a plain name such as 'broker' or 'h1'")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"no CA in {directory}; create one with `fleetvisor ca init --dir {directory}`"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not an EC key made by `fleetvisor ca init`")
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in (dns or [])]
    for ip in ips or []:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"--ip {ip!r} is not an IP address") from None
    if not names:
        names = [x509.DNSName(name)]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
