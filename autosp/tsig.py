"""TSIG key files in the format BIND's `tsig-keygen` writes, turned into `dns.tsig.Key`.

Theory of operation: the file is tokenised (quoted strings, words, `{`, `}`, `;`; comments in the
three styles named.conf allows: `#`, `//` and `/* */`) with the line of every token kept, then one
statement is parsed:

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


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    line: int
    quoted: bool


class _Parser:
    def __init__(self, where: str, tokens: list[_Token], last_line: int) -> None:
        self.where = where
        self.tokens = tokens
        self.pos = 0
        self.last_line = last_line

    def error(self, message: str, line: int | None = None) -> ConfigError:
        if line is None:
            tok = self.peek()
            line = tok.line if tok is not None else self.last_line
        return ConfigError(f"{self.where}:{line}: {message}")

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self, what: str) -> _Token:
        tok = self.peek()
        if tok is None:
            raise self.error(f"unexpected end of file, expected {what}")
        self.pos += 1
        return tok

    def expect(self, text: str) -> _Token:
        tok = self.next(f"'{text}'")
        if tok.quoted or tok.text != text:
            raise self.error(f"expected '{text}', found {_show(tok)}", tok.line)
        return tok

    def key_statement(self) -> TsigKey:
        kw = self.next("'key'")
        if kw.quoted or kw.text != "key":
            raise self.error(f"expected 'key', found {_show(kw)}", kw.line)
        name_tok = self.next("a key name")
        if not name_tok.quoted and name_tok.text in "{};":
            raise self.error(f"expected a key name, found {_show(name_tok)}", name_tok.line)
        try:
            name = dns.name.from_text(name_tok.text)
        except dns.exception.DNSException as exc:
            raise self.error(f"bad key name {name_tok.text!r}: {exc}", name_tok.line) from None
        self.expect("{")
        fields: dict[str, _Token] = {}
        while True:
            tok = self.next("'algorithm', 'secret' or '}'")
            if not tok.quoted and tok.text == "}":
                break
            if tok.quoted or tok.text not in ("algorithm", "secret"):
                raise self.error(f"unknown clause {_show(tok)} in key {name_tok.text!r} "
                                 "(expected 'algorithm' or 'secret')", tok.line)
            if tok.text in fields:
                raise self.error(f"'{tok.text}' given twice in key {name_tok.text!r}", tok.line)
            fields[tok.text] = self.next(f"a value for '{tok.text}'")
            self.expect(";")
        self.expect(";")
        return self.finish(name, name_tok, fields)

    def finish(self, name: dns.name.Name, name_tok: _Token, fields: dict[str, _Token]) -> TsigKey:
        for need in ("algorithm", "secret"):
            if need not in fields:
                raise self.error(f"key {name_tok.text!r} has no '{need}'", name_tok.line)
        alg = fields["algorithm"]
        if alg.text.lower() not in ALGORITHMS:
            raise self.error(f"unsupported TSIG algorithm {alg.text!r} "
                             f"(one of {', '.join(ALGORITHMS)})", alg.line)
        sec = fields["secret"]
        if not sec.quoted:
            raise self.error("the secret must be a quoted base64 string", sec.line)
        try:
            secret = base64.b64decode(sec.text, validate=True)
        except (binascii.Error, ValueError):
            raise self.error("the secret is not valid base64", sec.line) from None
        if not secret:
            raise self.error("the secret is empty", sec.line)
        return TsigKey(name, alg.text.lower(), secret)


def _show(tok: _Token) -> str:
    return f'"{tok.text}"' if tok.quoted else f"'{tok.text}'"


def _tokenize(where: str, text: str) -> tuple[list[_Token], int]:
    tokens: list[_Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#" or text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ConfigError(f"{where}:{line}: comment '/*' is never closed")
            line += text.count("\n", i, end)
            i = end + 2
        elif c in "{};":
            tokens.append(_Token(c, line, False))
            i += 1
        elif c == '"':
            end = text.find('"', i + 1)
            eol = text.find("\n", i + 1)
            if end < 0 or (0 <= eol < end):
                raise ConfigError(f"{where}:{line}: string is not closed on this line "
                                  "(missing '\"')")
            tokens.append(_Token(text[i + 1:end], line, True))
            i = end + 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in '{};"#':
                i += 1
            tokens.append(_Token(text[start:i], line, False))
    # End-of-file errors point at the last token, not at a trailing blank line.
    return tokens, tokens[-1].line if tokens else 1


def parse_tsig_keys(text: str, where: str = "<tsig key>") -> list[TsigKey]:
    """All key statements of a tsig-keygen style file.

    Args:
        text: the file's contents.
        where: the file name used in error messages.

    Raises:
        ConfigError: the text is not a sequence of well-formed key statements; the message
            names where:LINE.
    """
    tokens, last = _tokenize(where, text)
    parser = _Parser(where, tokens, last)
    keys: list[TsigKey] = []
    while parser.peek() is not None:
        keys.append(parser.key_statement())
    if not keys:
        raise ConfigError(f"{where}:{last}: no 'key' statement found")
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
