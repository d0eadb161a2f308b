"""Trust anchors: where every chain of trust starts, and negative trust anchors where none does.

Theory of operation
-------------------
A ``TrustAnchors`` value maps zone names to anchor records, DS or DNSKEY, and holds a set of
negative trust anchors (RFC 7646): names at or below them are treated as INSECURE without any
validation. It is immutable; ``with_negative`` and ``merged`` return new values.

Sources:

* ``builtin()``: the IANA root zone KSK-2017 (key tag 20326) and KSK-2024 (key tag 38696) as
  SHA-256 DS records, from https://data.iana.org/root-anchors/root-anchors.xml. The digests were
  checked by recomputing them from the published root DNSKEYs (tests/test_anchors.py does it).
* ``from_file(path)``: BIND syntax (``trust-anchors { NAME initial-ds|static-ds|initial-key|
  static-key ...; };`` and the older ``managed-keys``/``trusted-keys`` blocks, read with the
  named.conf tokenizer of resolver/namedconf.py), or zone-file lines of DS/DNSKEY records as
  Unbound's ``trust-anchor-file`` (and ``unbound-anchor``) write them, with ``;`` comments and
  ``( )`` continuation. Every error names ``file:line``.

RFC 5011 automatic rollover is not implemented: a new root KSK means a new release or an anchor
file (design note; Unbound's auto-trust-anchor-file is the model if it is ever needed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS

from resolver.errors import ConfigError
from resolver.namedconf import Token, Tokens

ROOT_DS_TEXT = (
    # KSK-2017, in service since 2018-10-11.
    ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
    # KSK-2024, published 2025, signing from late 2026.
    ". IN DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16",
)


@dataclass(frozen=True, slots=True)
class Anchor:
    """The anchor records of one zone."""

    name: dns.name.Name
    ds: tuple[DS, ...] = ()
    dnskey: tuple[DNSKEY, ...] = ()


@dataclass(frozen=True)
class TrustAnchors:
    """Positive anchors by zone name, plus negative trust anchors."""

    anchors: Mapping[dns.name.Name, Anchor] = field(default_factory=dict)
    negative: frozenset[dns.name.Name] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchors", MappingProxyType(dict(self.anchors)))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> TrustAnchors:
        """The IANA root anchors (KSK-2017 and KSK-2024 DS)."""
        return cls.from_text("\n".join(ROOT_DS_TEXT), "<builtin>")

    @classmethod
    def from_records(cls, records: Iterable[tuple[dns.name.Name, DS | DNSKEY]]) -> TrustAnchors:
        """Build from (owner, DS or DNSKEY rdata) pairs."""
        ds: dict[dns.name.Name, list[DS]] = {}
        keys: dict[dns.name.Name, list[DNSKEY]] = {}
        for name, rd in records:
            if isinstance(rd, DS):
                ds.setdefault(name, []).append(rd)
            else:
                keys.setdefault(name, []).append(rd)
        names = set(ds) | set(keys)
        return cls({n: Anchor(n, tuple(ds.get(n, ())), tuple(keys.get(n, ()))) for n in names})

    @classmethod
    def from_file(cls, path: str | Path) -> TrustAnchors:
        """Load a BIND ``trust-anchors`` file or a zone-file list of DS/DNSKEY records.

        Raises:
            ConfigError: unreadable file or bad line, naming ``file:line``.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read trust anchors: {e}") from e
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> TrustAnchors:
        """Parse anchor text in either format (see ``from_file``)."""
        if _BIND_BLOCK.search(text):
            records = _parse_bind(text, source)
        else:
            records = _parse_zone_lines(text, source)
        if not records:
            raise ConfigError(f"{source}: no DS or DNSKEY trust anchor found")
        return cls.from_records(records)

    def with_negative(self, names: Iterable[dns.name.Name | str]) -> TrustAnchors:
        """A copy with these names added as negative trust anchors."""
        extra = {n if isinstance(n, dns.name.Name) else dns.name.from_text(n) for n in names}
        return TrustAnchors(self.anchors, self.negative | extra)

    def merged(self, other: TrustAnchors) -> TrustAnchors:
        """Union of two anchor sets (records of the same zone are combined)."""
        records: list[tuple[dns.name.Name, DS | DNSKEY]] = []
        for anchors in (self, other):
            for a in anchors.anchors.values():
                records += [(a.name, d) for d in a.ds] + [(a.name, k) for k in a.dnskey]
        out = TrustAnchors.from_records(records)
        return TrustAnchors(out.anchors, self.negative | other.negative)

    # -- queries ---------------------------------------------------------------------------

    def closest(self, name: dns.name.Name) -> Anchor | None:
        """The deepest positive anchor at or above ``name``."""
        candidate = name
        while True:
            anchor = self.anchors.get(candidate)
            if anchor is not None:
                return anchor
            if candidate == dns.name.root or len(candidate) == 0:
                return None
            candidate = candidate.parent()

    def negative_for(self, name: dns.name.Name) -> dns.name.Name | None:
        """The negative trust anchor covering ``name``, if any."""
        for nta in self.negative:
            if name.is_subdomain(nta):
                return nta
        return None


# -- parsing -------------------------------------------------------------------------------

_BIND_BLOCKS = ("trust-anchors", "managed-keys", "trusted-keys")
# named.conf syntax (resolver/namedconf.py) if a block opens anywhere, else zone-file lines.
_BIND_BLOCK = re.compile(r"\b(trust-anchors|managed-keys|trusted-keys)\s*\{")
_BIND_KINDS = {"initial-ds": "DS", "static-ds": "DS", "initial-key": "DNSKEY",
               "static-key": "DNSKEY"}


def _parse_bind(text: str, source: str) -> list[tuple[dns.name.Name, DS | DNSKEY]]:
    """The entries of every anchor block; other statements (options { ... }; ...) are skipped."""
    toks = Tokens(text, source)
    records: list[tuple[dns.name.Name, DS | DNSKEY]] = []
    while (tok := toks.take()) is not None:
        brace = toks.peek()
        if not tok.quoted and tok.text in _BIND_BLOCKS and brace is not None and brace.is_("{"):
            toks.take()
            records += _bind_block(toks, tok)
    return records


def _bind_block(toks: Tokens, opener: Token) -> list[tuple[dns.name.Name, DS | DNSKEY]]:
    """The entries of one block, up to its closing brace; `opener` names the block."""
    records: list[tuple[dns.name.Name, DS | DNSKEY]] = []
    entry: list[Token] = []
    while (tok := toks.take()) is not None:
        if not (tok.is_(";") or tok.is_("}")):
            entry.append(tok)
            continue
        if entry:
            records.append(_bind_entry(entry, opener.text == "trusted-keys", toks.where))
        entry = []
        if tok.is_("}"):
            return records
    raise toks.error(f"'{opener.text}' block is not closed", opener)


def _bind_entry(entry: list[Token], old_style: bool, source: str
                ) -> tuple[dns.name.Name, DS | DNSKEY]:
    line = entry[0].line
    words = [t.text for t in entry]
    if old_style:  # trusted-keys { NAME flags proto alg "key"; }
        words = [words[0], "static-key", *words[1:]]
    if len(words) < 3 or words[1] not in _BIND_KINDS:
        raise ConfigError(
            f"{source}:{line}: expected 'NAME initial-ds|static-ds|initial-key|static-key ...'"
        )
    rdtype = _BIND_KINDS[words[1]]
    # Key material and digests may be split into several strings, and a string over several
    # lines (bind.keys does that): the rdata parser takes space-separated pieces, but a line
    # break would end its input, so every run of white space becomes one space.
    return _make(words[0], rdtype, " ".join(" ".join(words[2:]).split()), source, line)


def _make(owner: str, rdtype: str, rdata: str, source: str, line: int
          ) -> tuple[dns.name.Name, DS | DNSKEY]:
    try:
        name = dns.name.from_text(owner)
        rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata)
    except (dns.exception.DNSException, ValueError) as e:
        raise ConfigError(f"{source}:{line}: bad {rdtype} trust anchor: {e}") from e
    assert isinstance(rd, (DS, DNSKEY))
    return name, rd


def _parse_zone_lines(text: str, source: str) -> list[tuple[dns.name.Name, DS | DNSKEY]]:
    records: list[tuple[dns.name.Name, DS | DNSKEY]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(";", 1)[0]
        if not pending:
            start = number
            if not line.strip() or line.lstrip().startswith("$"):
                continue  # blank, comment, or $TTL/$ORIGIN-style directive
        pending.append(line)
        joined = " ".join(pending)
        if joined.count("(") > joined.count(")"):
            continue
        pending = []
        records.append(_zone_record(joined.replace("(", " ").replace(")", " "), source, start))
    if pending:
        raise ConfigError(f"{source}:{start}: unbalanced parenthesis")
    return records


def _zone_record(text: str, source: str, line: int) -> tuple[dns.name.Name, DS | DNSKEY]:
    words = text.split()
    if len(words) < 3:
        raise ConfigError(f"{source}:{line}: expected 'NAME [TTL] [IN] DS|DNSKEY RDATA'")
    owner, rest = words[0], words[1:]
    while rest and (rest[0].isdigit() or rest[0].upper() == "IN"):
        rest = rest[1:]
    if not rest or rest[0].upper() not in ("DS", "DNSKEY"):
        got = rest[0] if rest else "nothing"
        raise ConfigError(f"{source}:{line}: trust anchor must be DS or DNSKEY, got {got}")
    return _make(owner, rest[0].upper(), " ".join(rest[1:]), source, line)
