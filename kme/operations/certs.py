"""A complete demo PKI for a network of KMEs, written with cryptography.

Layout under the output folder (see docs/certificates.md):
  ca_servers.crt                root that signs every KME server certificate
  kmeN/kme_server.{crt,key}     KME N's server certificate (SAN localhost, 127.0.0.1, ::1)
  kmeN/ca_saes.{crt,key}        the CA of KME N's SAEs (its SAE listener trusts only it)
  kmeN/ca_kmes.{crt,key}        the CA of the KMEs that call KME N
  kmeN/saeM.{crt,key}           SAE M's client certificate, from kmeN/ca_saes (an SAE with a string ID, such as
                                alice-app, has kmeN/alice-app.{crt,key})
  kmeN/kmeN-to-kmeP.pfx         KME N's client certificate towards KME P, from kmeP/ca_kmes

and, with generate_foreign_pki, another vendor's KMS in the trusted node (ETSI GS QKD 020, docs/interop.md):
  foreign/ca.{crt,key}          that vendor's CA
  foreign/kms.{crt,key}         its KMS's certificate, as client and as server (SAN localhost, 127.0.0.1, ::1)
  foreign/kmeN-to-foreign.pfx   KME N's client certificate towards it, from foreign/ca
"""
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _serial() -> int:
    # 63 random bits, top bit set: a positive 8-byte serial, short enough to
    # read in a configuration file.
    return int.from_bytes(os.urandom(8), "big") >> 1 | 1 << 62


def serial_bytes(certificate: x509.Certificate) -> list[int]:
    """The serial number as the configuration writes it: big-endian bytes in decimal."""
    serial = certificate.serial_number
    return list(serial.to_bytes((serial.bit_length() + 7) // 8 or 1, "big"))


def _issue(subject: str, issuer: Issued | None, days: int, *, ca: bool = False, server: bool = False,
           client: bool = False, hosts: tuple[str, ...] = ()) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=True,
                          encipher_only=False, decipher_only=False), critical=True)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(certificate, key)


def _write_pem(issued: Issued, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".crt").write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    key_path = stem.with_suffix(".key")
    key_path.write_bytes(issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)


def sae_stem(sae_id) -> str:
    """The file name, without suffix, of an SAE's certificate and key: saeM for an integer ID, the ID itself for a
    string ID."""
    return f"sae{sae_id}" if isinstance(sae_id, int) else sae_id


def generate_pki(out: Path, saes_by_kme: dict[int, list], password: str, days: int = 825,
                 hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> dict[str, list[int]]:
    """Write the demo PKI for the given KMEs and their SAEs; returns each client certificate's serial bytes.

    Every pair of KMEs gets client certificates both ways.
    """
    out = Path(out)
    root = _issue("KME demo server root CA", None, days, ca=True)
    _write_pem(root, out / "ca_servers")
    sae_cas, kme_cas, serials = {}, {}, {}
    for kme_id in saes_by_kme:
        folder = out / f"kme{kme_id}"
        _write_pem(_issue(f"KME {kme_id} server", root, days, server=True, hosts=hosts), folder / "kme_server")
        sae_cas[kme_id] = _issue(f"KME {kme_id} SAE CA", None, days, ca=True)
        kme_cas[kme_id] = _issue(f"KME {kme_id} KME CA", None, days, ca=True)
        _write_pem(sae_cas[kme_id], folder / "ca_saes")
        _write_pem(kme_cas[kme_id], folder / "ca_kmes")
    for kme_id, sae_ids in saes_by_kme.items():
        folder = out / f"kme{kme_id}"
        for sae_id in sae_ids:
            sae = _issue(f"SAE {sae_id}", sae_cas[kme_id], days, client=True)
            _write_pem(sae, folder / sae_stem(sae_id))
            serials[sae_stem(sae_id)] = serial_bytes(sae.certificate)
        for peer_id in saes_by_kme:
            if peer_id == kme_id:
                continue
            name = f"kme{kme_id}-to-kme{peer_id}"
            client = _write_pfx(_issue(f"KME {kme_id} to KME {peer_id}", kme_cas[peer_id], days, client=True), name,
                                folder / f"{name}.pfx", password)
            serials[name] = serial_bytes(client.certificate)
    return serials


def generate_foreign_pki(out: Path, kme_ids: list[int], password: str, days: int = 825,
                         hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> dict[str, list[int]]:
    """Write the demo PKI of another vendor's KMS into ``out`` (the layout above); returns each client certificate's
    serial bytes ("kms", "kmeN-to-foreign")."""
    out = Path(out)
    ca = _issue("Foreign vendor demo CA", None, days, ca=True)
    _write_pem(ca, out / "ca")
    kms = _issue("Foreign KMS", ca, days, server=True, client=True, hosts=hosts)
    _write_pem(kms, out / "kms")
    serials = {"kms": serial_bytes(kms.certificate)}
    for kme_id in kme_ids:
        name = f"kme{kme_id}-to-foreign"
        serials[name] = serial_bytes(_write_pfx(_issue(f"KME {kme_id} to the foreign KMS", ca, days, client=True),
                                                name, out / f"{name}.pfx", password).certificate)
    return serials


def _write_pfx(issued: Issued, name: str, path: Path, password: str) -> Issued:
    """Write a client certificate and its key as a password-protected PKCS#12 file, readable by its owner only."""
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        name.encode(), issued.key, issued.certificate, None, serialization.BestAvailableEncryption(password.encode())))
    path.chmod(0o600)
    return issued
