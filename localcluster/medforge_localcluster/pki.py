"""Certificates, keys and tokens for the local control plane.

One CA signs the API server's serving certificate, the process kubelet's serving certificate and
the API server's client certificate towards the kubelet (used for `kubectl logs`). Service-account
tokens are signed with a separate RSA key. People and components authenticate with static bearer
tokens (``--token-auth-file``), generated once per state directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class Identity:
    """A static-token identity: who a component is to the API server."""

    key: str
    user: str
    groups: tuple[str, ...]


# The process kubelet gets its own least-privilege ClusterRole (manifests/process-kubelet.yaml);
# the controller manager uses the bootstrap role that Kubernetes ships for it and per-controller
# service accounts, as kubeadm sets it up.
IDENTITIES = (
    Identity("admin", "medforge-admin", ("system:masters",)),
    Identity("controller-manager", "system:kube-controller-manager", ()),
    Identity("kubelet", "system:medforge:process-kubelet", ("system:authenticated",)),
)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    usage: ExtendedKeyUsageOID | None,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)  # type: ignore[list-item]
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Name, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("medforge-localcluster-ca")
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_name, ca_cert


def _tokens(pki: Path) -> None:
    lines = []
    for ident in IDENTITIES:
        token = secrets.token_hex(24)
        _write(pki / f"{ident.key}.token", token.encode(), private=True)
        groups = ",".join(ident.groups)
        lines.append(f'{token},{ident.user},{ident.user},"{groups}"')
    _write(pki / "tokens.csv", ("\n".join(lines) + "\n").encode(), private=True)


def ensure_pki(pki: Path) -> None:
    """Create every certificate and key once; later calls keep them (and the tokens) stable."""
    if (pki / "done").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    ca_key, ca_name, ca_cert = _ca()
    _write(pki / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(pki / "ca.key", _key_pem(ca_key), private=True)

    loopback: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    serving_sans = [
        *loopback,
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    for name, subject, usage, sans in (
        ("apiserver", "kube-apiserver", ExtendedKeyUsageOID.SERVER_AUTH, serving_sans),
        ("kubelet", "system:node:medforge-local", ExtendedKeyUsageOID.SERVER_AUTH, loopback),
        (
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            None,
        ),
    ):
        cert, key = _issue(subject, ca_key, ca_name, usage, sans)  # type: ignore[arg-type]
        _write(pki / f"{name}.crt", cert)
        _write(pki / f"{name}.key", key, private=True)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write(pki / "sa.key", _key_pem(sa_key), private=True)
    _write(
        pki / "sa.pub",
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    _tokens(pki)
    (pki / "done").touch()


def token(pki: Path, identity: str) -> str:
    return (pki / f"{identity}.token").read_text().strip()
