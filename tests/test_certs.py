"""flask gen-certs: a complete demo PKI whose pieces fit together."""
import re
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.support import run_cli

pytestmark = pytest.mark.engine_independent


def test_gen_certs_writes_a_pki_that_verifies(tmp_path):
    result = run_cli(["gen-certs", "--out", str(tmp_path), "--sae", "1@1", "--sae", "3@2", "--password", "pw"], None)
    assert result.returncode == 0, result.stderr
    serials = dict(re.findall(r"(\S+): \"https_client_certificate_serial\": (\[[\d, ]+\])", result.stdout))
    assert set(serials) == {"sae1", "sae3", "kme1-to-kme2", "kme2-to-kme1"}

    sae1 = x509.load_pem_x509_certificate((tmp_path / "kme1" / "sae1.crt").read_bytes())
    assert list(sae1.serial_number.to_bytes(8, "big")) == eval(serials["sae1"])
    sae1.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "kme1" / "ca_saes.crt").read_bytes()))

    server = x509.load_pem_x509_certificate((tmp_path / "kme2" / "kme_server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    server.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "ca_servers.crt").read_bytes()))

    _, client, _ = pkcs12.load_key_and_certificates((tmp_path / "kme1" / "kme1-to-kme2.pfx").read_bytes(), b"pw")
    client.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "kme2" / "ca_kmes.crt").read_bytes()))
    assert (tmp_path / "kme1" / "sae1.key").stat().st_mode & 0o077 == 0

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "kme1" / "ca_saes.crt"))
    context.load_cert_chain(str(tmp_path / "kme1" / "kme_server.crt"), str(tmp_path / "kme1" / "kme_server.key"))


@pytest.mark.parametrize("sae", ["one", "a/b@1", "alice@kme1", "@1"])
def test_gen_certs_rejects_a_malformed_sae(tmp_path, sae):
    result = run_cli(["gen-certs", "--out", str(tmp_path), "--sae", sae], None)
    assert result.returncode != 0 and "SAE_ID@KME_NUMBER" in result.stderr


def test_gen_certs_names_the_files_of_an_sae_with_a_string_id_by_its_id(tmp_path):
    result = run_cli(["gen-certs", "--out", str(tmp_path), "--sae", "alice-app@1", "--sae", "2@1"], None)
    assert result.returncode == 0, result.stderr
    serials = dict(re.findall(r"(\S+): \"https_client_certificate_serial\": (\[[\d, ]+\])", result.stdout))
    assert set(serials) == {"alice-app", "sae2"}
    alice = x509.load_pem_x509_certificate((tmp_path / "kme1" / "alice-app.crt").read_bytes())
    assert list(alice.serial_number.to_bytes(8, "big")) == eval(serials["alice-app"])
    alice.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "kme1" / "ca_saes.crt").read_bytes()))


def test_gen_certs_for_a_network_of_four_kmes(tmp_path):
    result = run_cli(["gen-certs", "--out", str(tmp_path), "--sae", "1@1", "--sae", "5@3", "--kme", "2", "--kme",
                      "4"], None)
    assert result.returncode == 0, result.stderr
    serials = dict(re.findall(r"(\S+): \"https_client_certificate_serial\": (\[[\d, ]+\])", result.stdout))
    pairs = {f"kme{a}-to-kme{b}" for a in (1, 2, 3, 4) for b in (1, 2, 3, 4) if a != b}
    assert set(serials) == {"sae1", "sae5"} | pairs
    for pair in pairs:
        caller, callee = re.match(r"kme(\d)-to-kme(\d)", pair).groups()
        _, client, _ = pkcs12.load_key_and_certificates((tmp_path / f"kme{caller}" / f"{pair}.pfx").read_bytes(),
                                                        b"password")
        client.verify_directly_issued_by(
            x509.load_pem_x509_certificate((tmp_path / f"kme{callee}" / "ca_kmes.crt").read_bytes()))
    assert (tmp_path / "kme4" / "kme_server.crt").exists()
