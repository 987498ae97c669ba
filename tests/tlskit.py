"""Test certificates: a CA and certificates it signs, made with the
`cryptography` package and written as PEM files for the TLS options."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Identity:
    """PEM paths, in the keyword form the API takes."""

    cert: Path
    key: Path
    ca: Path

    def kwargs(self) -> dict[str, str]:
        return {"tls_cert": str(self.cert), "tls_key": str(self.key), "tls_ca": str(self.ca)}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _build(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    names: tuple[str, ...] = (),
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        now -= datetime.timedelta(days=3)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return b.sign(signer, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """A CA that writes its certificate and issues identities under `root`."""

    def __init__(self, root: Path, name: str = "mig-test-ca") -> None:
        self.root = root
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        cert = _build(name, self.key, name, self.key, ca=True)
        self.ca = _write(root / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, subject: str, names: tuple[str, ...] = LOCAL_NAMES, *, expired: bool = False
    ) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _build(subject, key, self.name, self.key, ca=False, names=names, expired=expired)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return Identity(
            _write(self.root / f"{subject}.crt", pem),
            _write(self.root / f"{subject}.key", _key_pem(key)),
            self.ca,
        )


def self_signed(root: Path, subject: str, ca: Path) -> Identity:
    """A certificate signed by its own key, presented against trust in `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build(subject, key, subject, key, ca=False, names=LOCAL_NAMES)
    return Identity(
        _write(root / f"{subject}.crt", cert.public_bytes(serialization.Encoding.PEM)),
        _write(root / f"{subject}.key", _key_pem(key)),
        ca,
    )
