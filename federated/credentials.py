"""TLS certificates and SuperNode keys for a deployment that is not open to anyone (Flower 1.42).

`make_credentials(folder, node_names)` writes, with the `cryptography` package (a Flower dependency):
  ca.crt / ca.key              a self-signed certificate authority (what SuperNodes and `flwr` trust)
  server.crt / server.key      the SuperLink's certificate, signed by the CA, valid for 127.0.0.1,
                               localhost and any extra host names given
  <node>.key / <node>.pub      one NIST P-384 key pair per SuperNode, OpenSSH format: the private key
                               for `flower-supernode --auth-supernode-private-key`, the public key for
                               `flwr supernode register` (SuperNode authentication)
Private keys are written with mode 0600. For a real deployment use your organisation's CA; these are
for tests and for trying the secured path on one machine.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def make_credentials(folder: str | Path, node_names: list[str], hosts: list[str] = (), days: int = 2) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool, sans=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def key_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "routerlab federation CA")])
    ca_cert = cert("routerlab federation CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_cert = cert("superlink", server_key, ca_name, ca_key, ca=False, sans=sans)
    out = {"ca": folder / "ca.crt", "server_cert": folder / "server.crt", "server_key": folder / "server.key"}
    _write(out["ca"], ca_cert.public_bytes(pem))
    _write(folder / "ca.key", key_pem(ca_key), private=True)
    _write(out["server_cert"], server_cert.public_bytes(pem))
    _write(out["server_key"], key_pem(server_key), private=True)
    for name in node_names:
        key = ec.generate_private_key(ec.SECP384R1())
        out[f"{name}.key"], out[f"{name}.pub"] = folder / f"{name}.key", folder / f"{name}.pub"
        _write(out[f"{name}.key"], key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
        _write(out[f"{name}.pub"], key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return out
