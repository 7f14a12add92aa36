"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1, a client
certificate signed by the CA, and one signed by a stranger's CA."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def make_pki(root: Path) -> dict[str, tuple[str, str]]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's:
    name -> (certificate path, key path)."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("rnnserve test CA", ca_key, ca=True)
    issuer = (ca.subject, ca_key)
    server_key, client_key, other_key = _key(), _key(), _key()
    other_ca_key = _key()
    other_ca = _cert("someone else", other_ca_key, ca=True)
    return {
        "ca": _write(root / "ca", ca, ca_key),
        "server": _write(
            root / "server", _cert("127.0.0.1", server_key, issuer, server=True), server_key
        ),
        "client": _write(root / "client", _cert("client", client_key, issuer), client_key),
        "stranger": _write(
            root / "stranger",
            _cert("stranger", other_key, (other_ca.subject, other_ca_key)),
            other_key,
        ),
    }
