"""Trust anchors: the built-in IANA root DS, BIND and Unbound anchor files, negative anchors."""

from __future__ import annotations

from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdata
import pytest

from resolver.errors import ConfigError
from resolver.validator.anchors import TrustAnchors

# The root KSKs as published in the root zone / root-anchors.xml (public key material).
KSK_2017 = (
    "257 3 8 AwEAAaz/tAm8yTn4Mfeh5eyI96WSVexTBAvkMgJzkKTOiW1vkIbzxeF3+/4RgWOq7HrxRixHlFlExOLAJr5e"
    "mLvN7SWXgnLh4+B5xQlNVz8Og8kvArMtNROxVQuCaSnIDdD5LKyWbRd2n9WGe2R8PzgCmr3EgVLrjyBxWezF0jLHwVN8"
    "efS3rCj/EWgvIWgb9tarpVUDK/b58Da+sqqls3eNbuv7pr+eoZG+SrDK6nWeL3c6H5Apxz7LjVc1uTIdsIXxuOLYA4/i"
    "lBmSVIzuDWfdRUfhHdY6+cn8HFRm+2hM8AnXGXws9555KrUB5qihylGa8subX2Nn6UwNR1AkUTV74bU="
)
KSK_2024 = (
    "257 3 8 AwEAAa96jeuknZlaeSrvyAJj6ZHv28hhOKkx3rLGXVaC6rXTsDc449/cidltpkyGwCJNnOAlFNKF2jBosZBU"
    "5eeHspaQWOmOElZsjICMQMC3aeHbGiShvZsx4wMYSjH8e7Vrhbu6irwCzVBApESjbUdpWWmEnhathWu1jo+siFUiRAAx"
    "m9qyJNg/wOZqqzL/dL/q8PkcRU5oUKEpUge71M3ej2/7CPqpdVwuMoTvoB+ZOT4YeGyxMvHmbrxlFzGOHOijtzN+u1TQ"
    "NatX2XBuzZNQ1K+s2CXkPIZo7s6JgZyvaBevYtxPvYLw4z9mR7K2vaF18UYH9Z9GNUUeayffKC73PYc="
)
ROOT = dns.name.root


def test_builtin_root_ds_match_the_published_root_ksks() -> None:
    anchor = TrustAnchors.builtin().closest(dns.name.from_text("www.example.com."))
    assert anchor is not None and anchor.name == ROOT and not anchor.dnskey
    by_tag = {ds.key_tag: ds for ds in anchor.ds}
    assert set(by_tag) == {20326, 38696}
    for tag, text in ((20326, KSK_2017), (38696, KSK_2024)):
        key = dns.rdata.from_text("IN", "DNSKEY", text)
        assert dns.dnssec.key_id(key) == tag
        assert dns.dnssec.make_ds(ROOT, key, "SHA256") == by_tag[tag]


BIND = """\
// named.conf fragment
trust-anchors {
    /* the root, as an initial DS */
    . initial-ds 20326 8 2 "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D";
    "example." static-key 257 3 15 "l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4="; # ed25519
};
"""

UNBOUND = """\
; autotrust-style file
example.  3600 IN DNSKEY 257 3 15 l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4= ;{id = 3}
.  IN  DS  ( 38696 8 2
    683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16 )
"""


def test_bind_file(tmp_path: Path) -> None:
    path = tmp_path / "anchors.conf"
    path.write_text(BIND)
    anchors = TrustAnchors.from_file(path)
    assert [d.key_tag for d in anchors.anchors[ROOT].ds] == [20326]
    example = anchors.closest(dns.name.from_text("www.example."))
    assert example is not None and example.name == dns.name.from_text("example.")
    assert example.dnskey[0].algorithm == 15


def test_unbound_zone_file(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_text(UNBOUND)
    anchors = TrustAnchors.from_file(path)
    assert [d.key_tag for d in anchors.anchors[ROOT].ds] == [38696]
    assert len(anchors.anchors[dns.name.from_text("example.")].dnskey) == 1


def test_key_split_over_lines_in_one_string() -> None:
    # As BIND's own bind.keys writes the root KSK: one quoted string over several lines.
    flags, base64 = KSK_2017[:8], KSK_2017[8:]
    lines = "\n\t\t".join(base64[i:i + 60] for i in range(0, len(base64), 60))
    text = f'trust-anchors {{\n\t. initial-key {flags}"{lines}";\n}};\n'
    anchor = TrustAnchors.from_text(text, "bind.keys").closest(ROOT)
    assert anchor is not None
    assert [dns.dnssec.key_id(k) for k in anchor.dnskey] == [20326]


def test_managed_and_trusted_keys_blocks() -> None:
    text = ('managed-keys { "example." initial-key 257 3 15 '
            '"l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4="; };\n'
            'trusted-keys { "example.org." 257 3 15 '
            '"l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4="; };\n')
    anchors = TrustAnchors.from_text(text, "keys.conf")
    assert set(anchors.anchors) == {dns.name.from_text("example."),
                                    dns.name.from_text("example.org.")}


DS = "20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"


@pytest.mark.parametrize("text,where,what", [
    (f". IN DS {DS}\nexample. IN A 192.0.2.1\n", ":2:", "DS or DNSKEY"),
    ("\n\n. IN DS 20326 8 2 E06D\n", ":3:", "bad DS"),
    (f"trust-anchors {{\n . initial-ds {DS};\n . bogus-kind 1 2 3;\n}};", ":3:", "expected"),
    (f"trust-anchors {{\n . initial-ds {DS};\n", ":1:", "not closed"),
    ("; nothing\n", "anchors.txt", "no DS or DNSKEY"),
])
def test_errors_name_file_and_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = tmp_path / "anchors.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        TrustAnchors.from_file(path)
    assert f"{path}{where}" in str(err.value) or where == "anchors.txt"
    assert what in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TrustAnchors.from_file(tmp_path / "nope")


def test_negative_anchors_and_merge() -> None:
    anchors = TrustAnchors.builtin().with_negative(["corp.example.", dns.name.from_text("lab.")])
    assert anchors.negative_for(dns.name.from_text("a.corp.example.")) == \
        dns.name.from_text("corp.example.")
    assert anchors.negative_for(dns.name.from_text("example.")) is None
    merged = anchors.merged(TrustAnchors.from_text(UNBOUND))
    assert {d.key_tag for d in merged.anchors[ROOT].ds} == {20326, 38696}
    assert merged.negative == anchors.negative
