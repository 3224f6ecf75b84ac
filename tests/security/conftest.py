"""Security test fixtures: a certificate authority made in the test (the
`cryptography` package), the certificates each service needs, and a second,
unrelated CA whose certificates must be refused. EC P-256 keys: quick to make.
(The process helpers, `stack` and `faults`, are in tests/conftest.py.)
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _name(cn: str) -> "x509.Name":
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


class CA:
    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = str(directory / f"{name}.pem")
        Path(self.path).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = True, client: bool = True, hosts=("localhost", "127.0.0.1")) -> SimpleNamespace:
        """A leaf certificate for `cn`, valid for the given hosts (DNS names and IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        base = self.dir / f"{self.name}-{cn}"
        Path(f"{base}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return SimpleNamespace(cert=f"{base}.crt", key=_write_key(key, Path(f"{base}.key")), ca=self.path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, wrong = CA(d, "glimprouter-test-ca"), CA(d, "someone-elses-ca")
    return SimpleNamespace(
        ca=ca.path,
        wrong_ca=wrong.path,
        worker=ca.issue("worker", client=False),
        router=ca.issue("router", client=False),  # the router's server certificate
        router_client=ca.issue("router-client", server=False),  # what the router presents to workers
        gateway_client=ca.issue("gateway-client", server=False),
        redis=ca.issue("redis", client=False),
        impostor=wrong.issue("router-client", server=False),  # same name, wrong CA
        wrong_worker=wrong.issue("worker", client=False),
    )
