"""DNS over TLS to a forwarder: a real TLS DNS server on loopback with a CA made here.

The certificate name after `#` must match the server's certificate; a wrong name, a CA we do
not trust, or a server that speaks no TLS fail the exchange (UpstreamError), never fall back
to plain DNS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from resolver.config import HostPort, UpstreamConfig
from resolver.errors import ConfigError, UpstreamError
from resolver.upstream.forward import Forwarder
from resolver.upstream.select import tls_context
from resolver.upstream.tls import client_context
from tests.helpers import run

NAME = "dot.example.test"
WWW = dns.name.from_text("www.example.test.")


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
          issuer: str, *, ca: bool, san: list[x509.GeneralName] | None = None
          ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(san or []), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for NAME (and 127.0.0.1) signed by it, another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test CA", ca_key, ca_key, "test CA", ca=True)
    other = _cert("other CA", other_key, other_key, "other CA", ca=True)
    srv = _cert(NAME, ca_key, srv_key, "test CA", ca=False,
                san=[x509.DNSName(NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    files = {"ca": d / "ca.pem", "other": d / "other.pem", "cert": d / "srv.pem",
             "key": d / "srv.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["other"].write_bytes(other.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(_pem(srv_key))
    return files


@asynccontextmanager
async def dot_server(pki: dict[str, Path], *, tls: bool = True
                     ) -> AsyncIterator[tuple[int, list[str]]]:
    """A DNS-over-TLS server on 127.0.0.1 answering every A question with 192.0.2.80."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    seen: list[str] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            n = int.from_bytes(await reader.readexactly(2), "big")
            query = dns.message.from_wire(await reader.readexactly(n))
            seen.append(query.question[0].name.to_text())
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                    "192.0.2.80"))
            wire = reply.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0, ssl=ctx if tls else None)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, seen
    finally:
        server.close()


def ask(server: HostPort, ca: Path | None, pki: dict[str, Path], *, tls: bool = True,
        recheck: bool = False) -> tuple[dns.message.Message | UpstreamError, list[str]]:
    async def main() -> tuple[dns.message.Message | UpstreamError, list[str]]:
        async with dot_server(pki, tls=tls) as (port, seen):
            target = HostPort(server.host, port, server.tls_name)
            fwd = Forwarder([target], timeout=1, attempts=1, tcp_timeout=2,
                            tls=client_context(ca))
            try:
                return await fwd.query(WWW, dns.rdatatype.A, recheck=recheck), seen
            except UpstreamError as e:
                return e, seen

    return run(main(), 20)


@pytest.mark.parametrize("recheck", [False, True])  # a bogus re-check stays on TLS too
def test_the_right_name_and_ca_get_an_answer(pki: dict[str, Path], recheck: bool) -> None:
    reply, seen = ask(HostPort("127.0.0.1", 0, NAME), pki["ca"], pki, recheck=recheck)
    assert isinstance(reply, dns.message.Message), reply
    assert [r.to_text() for r in reply.answer] == ["www.example.test. 60 IN A 192.0.2.80"]
    assert seen == ["www.example.test."]


@pytest.mark.parametrize(("name", "ca", "words"), [
    ("dns.quad9.net", "ca", "certificate not accepted"),  # a valid certificate, another name
    (NAME, "other", "certificate not accepted"),  # the right name, a CA we do not trust
    (NAME, None, "certificate not accepted"),  # the system's CAs know no test CA
])
def test_a_wrong_name_or_ca_fails(pki: dict[str, Path], name: str, ca: str | None,
                                  words: str) -> None:
    reply, seen = ask(HostPort("127.0.0.1", 0, name), pki[ca] if ca else None, pki)
    assert isinstance(reply, UpstreamError) and words in str(reply), reply
    assert seen == []  # the question never left the handshake


def test_a_server_without_tls_fails_and_nothing_is_sent_in_clear(pki: dict[str, Path]) -> None:
    reply, seen = ask(HostPort("127.0.0.1", 0, NAME), pki["ca"], pki, tls=False)
    assert isinstance(reply, UpstreamError) and "TLS" in str(reply), reply
    assert seen == []


def test_a_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    cfg = UpstreamConfig(servers=(HostPort("127.0.0.1", 853, NAME),), tls_ca_file=bad)
    with pytest.raises(ConfigError, match=r"\[upstream\] key 'tls_ca_file'"):
        tls_context(cfg)
    assert tls_context(UpstreamConfig(servers=(HostPort("192.0.2.1"),))) is None
