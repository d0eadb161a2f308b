"""TSIG key files in the format BIND's `tsig-keygen` writes, turned into `dns.tsig.Key`.

Theory of operation: the file is tokenised by resolver/namedconf.py (quoted strings, words, `{`,
`}`, `;`; comments in the three styles named.conf allows: `#`, `//` and `/* */`) with the line of
every token kept, then key statements are parsed:

    key "ddns-key" {
            algorithm hmac-sha256;
            secret "base64...";
    };

Every error names FILE:LINE and what was expected, because this file is usually edited or copied
by hand and a wrong quote is the common mistake. A file with several `key` statements is accepted
when the caller names the key to use.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.tsig

from resolver.errors import ConfigError
from resolver.namedconf import PUNCTUATION, Token, Tokens

# named.conf algorithm names -> dnspython's algorithm names. HMAC-MD5 is kept for old servers.
ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-md5": dns.tsig.HMAC_MD5,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}


@dataclass(frozen=True, slots=True)
class TsigKey:
    """One TSIG key: its name, algorithm name as written in the file, and secret."""

    name: dns.name.Name
    algorithm: str
    secret: bytes

    def to_dnspython(self) -> dns.tsig.Key:
        """The key as dnspython signs with it."""
        return dns.tsig.Key(self.name, self.secret, ALGORITHMS[self.algorithm])


def _key_statement(toks: Tokens) -> TsigKey:
    toks.expect("key")
    name_tok = toks.next("a key name")
    if not name_tok.quoted and name_tok.text in PUNCTUATION:
        raise toks.error(f"expected a key name, found {name_tok}", name_tok)
    try:
        name = dns.name.from_text(name_tok.text)
    except dns.exception.DNSException as exc:
        raise toks.error(f"bad key name {name_tok.text!r}: {exc}", name_tok) from None
    toks.expect("{")
    fields: dict[str, Token] = {}
    while True:
        tok = toks.next("'algorithm', 'secret' or '}'")
        if tok.is_("}"):
            break
        if tok.quoted or tok.text not in ("algorithm", "secret"):
            raise toks.error(f"unknown clause {tok} in key {name_tok.text!r} "
                             "(expected 'algorithm' or 'secret')", tok)
        if tok.text in fields:
            raise toks.error(f"'{tok.text}' given twice in key {name_tok.text!r}", tok)
        fields[tok.text] = toks.next(f"a value for '{tok.text}'")
        toks.expect(";")
    toks.expect(";")
    return _finish(toks, name, name_tok, fields)


def _finish(toks: Tokens, name: dns.name.Name, name_tok: Token, fields: dict[str, Token]
            ) -> TsigKey:
    for need in ("algorithm", "secret"):
        if need not in fields:
            raise toks.error(f"key {name_tok.text!r} has no '{need}'", name_tok)
    alg = fields["algorithm"]
    if alg.text.lower() not in ALGORITHMS:
        raise toks.error(f"unsupported TSIG algorithm {alg.text!r} "
                         f"(one of {', '.join(ALGORITHMS)})", alg)
    sec = fields["secret"]
    if not sec.quoted:
        raise toks.error("the secret must be a quoted base64 string", sec)
    try:
        secret = base64.b64decode(sec.text, validate=True)
    except (binascii.Error, ValueError):
        raise toks.error("the secret is not valid base64", sec) from None
    if not secret:
        raise toks.error("the secret is empty", sec)
    return TsigKey(name, alg.text.lower(), secret)


def parse_tsig_keys(text: str, where: str = "<tsig key>") -> list[TsigKey]:
    """All key statements of a tsig-keygen style file.

    Args:
        text: the file's contents.
        where: the file name used in error messages.

    Raises:
        ConfigError: the text is not a sequence of well-formed key statements; the message
            names where:LINE.
    """
    # No value of a key statement spans lines: a string that does is a missing closing quote,
    # and saying so on its line beats "expected ';'" wherever the quotes pair up again.
    toks = Tokens(text, where, multiline_strings=False)
    keys: list[TsigKey] = []
    while toks.peek() is not None:
        keys.append(_key_statement(toks))
    if not keys:
        raise toks.error("no 'key' statement found")
    return keys


def load_tsig_key(path: Path | str, name: str | None = None) -> TsigKey:
    """The TSIG key in a tsig-keygen file (the one called `name` if it holds several).

    Raises:
        ConfigError: unreadable or malformed file, or no (single) matching key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read TSIG key file: {reason}") from None
    keys = parse_tsig_keys(text, str(path))
    if name is not None:
        wanted = dns.name.from_text(name)
        keys = [k for k in keys if k.name == wanted]
        if not keys:
            raise ConfigError(f"{path}: no key named {name!r}")
    if len(keys) > 1:
        names = ", ".join(k.name.to_text(omit_final_dot=True) for k in keys)
        raise ConfigError(f"{path}: holds several keys ({names}); choose one with --tsig-name")
    return keys[0]
