"""SeaweedFS's own security for a local stack: only its S3 gateway may read or write objects.

`weed server` runs a master, a volume server, a filer and the S3 gateway, each on an HTTP and a
gRPC port of 127.0.0.1. Without security every local user could read and write objects through
the first three (a GET on the filer serves any file; the master hands out file ids that the
volume server takes). With the `security.toml` written here:

- the volume server's HTTP reads and writes need a JWT signed with a key only the stack's
  processes hold (`jwt.signing`, `jwt.signing.read`), as the filer's do (`jwt.filer_signing`);
- every gRPC server (master, volume, filer, S3) takes only mutual-TLS connections, from clients
  with a certificate of this stack's own CA, whose private key is thrown away once it signed
  that one certificate, so no other can be made.

The master's and filer's HTTP APIs are turned off on the command line (`-disableHttp`): the
master would give a signed file id to whoever asks at /dir/assign.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

SECURITY_TOML = "security.toml"
CA, CERT, KEY = "ca.pem", "cert.pem", "key.pem"
GRPC_ROLES = ("master", "volume", "filer", "s3", "client")  # client: every outgoing dial
JWT_KEYS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def _write_private(path: Path, data: bytes) -> None:
    """`data` in `path`, readable by this user only (0600) from its creation, replaced whole."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)


def _certificates() -> tuple[bytes, bytes, bytes]:
    """A new CA's certificate, and one certificate and key it signed (for 127.0.0.1 and
    localhost, both server and client use), all PEM. The CA's key is not kept."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=3650)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("neoray stack CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        certificate("neoray stack CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    hosts = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        certificate("neoray seaweedfs", key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def _security_toml(folder: Path) -> str:
    """The configuration: a random key for each JWT, mTLS for every gRPC server and client,
    no volume UI, no directory listings from the filer."""
    lines = []
    for section in JWT_KEYS:
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"']
    lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false"]
    ca, cert, key = (json.dumps(str(folder / name)) for name in (CA, CERT, KEY))  # TOML strings
    lines += ["[grpc]", f"ca = {ca}"]
    for role in GRPC_ROLES:
        lines += [f"[grpc.{role}]", f"cert = {cert}", f"key = {key}"]
    return "\n".join(lines) + "\n"


def security_dir(folder: Path) -> Path:
    """`folder` (0700) holding the stack's security.toml and certificates, made on first use and
    kept: a restart on the same data keeps its keys. security.toml is written last, so a
    folder without it is incomplete and made again. Returns `folder`, for `weed -config_dir`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    if not (folder / SECURITY_TOML).exists():
        for file, data in zip((CA, CERT, KEY), _certificates(), strict=True):
            _write_private(folder / file, data)
        _write_private(folder / SECURITY_TOML, _security_toml(folder).encode())
    return folder
