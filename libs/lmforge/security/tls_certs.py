"""A private CA and a server certificate, generated once per lmforge home.

`lmforge up` (and `lmforge secrets` for docker-compose) call `ensure_server_tls`:
files already there — generated earlier or supplied by the operator — are used
as they are; only missing ones are made. Keys are ECDSA P-256 (fast handshakes,
small certificates) and written mode 0600; the CA signs the server certificate
for the names clients dial (127.0.0.1, localhost, and e.g. `nats` in compose).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmforge.security.secret_files import write_secret

VALID_DAYS = 825
"""Server certificates longer-lived than this are refused by some TLS clients."""


@dataclass(frozen=True)
class ServerTls:
    """PEM files: the CA clients verify against, the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lmforge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue_ca(common_name: str = "lmforge local CA"
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               hosts: Sequence[str], *, client: bool = False
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for `hosts` (or, with `client`, a client certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if not client:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def ensure_server_tls(directory: Path, hosts: Sequence[str], *, stem: str = "server"
                      ) -> ServerTls:
    """`directory`/{ca.pem, ca-key.pem, <stem>.pem, <stem>-key.pem}: made if missing.

    A server certificate is (re)issued only when it is missing; an operator's
    own files are never overwritten. Another `stem` (the gateway's) is another
    server signed by the same CA, so one ca.pem verifies both.
    """
    tls = ServerTls(ca=directory / "ca.pem", cert=directory / f"{stem}.pem",
                    key=directory / f"{stem}-key.pem")
    ca_key_path = directory / "ca-key.pem"
    if not tls.ca.exists():
        ca_cert, ca_key = issue_ca()
        write_secret(ca_key_path, _key_pem(ca_key))
        write_secret(tls.ca, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    if not (tls.cert.exists() and tls.key.exists()):
        ca_cert = x509.load_pem_x509_certificate(tls.ca.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path} is not an EC key; supply server.pem and "
                             f"server-key.pem yourself")
        cert, key = issue_leaf(ca_cert, loaded, hosts)
        write_secret(tls.key, _key_pem(key))
        write_secret(tls.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return tls
