"""named.conf syntax as tokens: the one reader of BIND-style files (trust anchors, TSIG keys).

Theory of operation: `tokenize(text, where)` turns the text into `Token`s (words, quoted
strings, and the punctuation `{`, `}`, `;`), each with the line it starts on, and drops
comments in the three styles named.conf allows: `#` and `//` to the end of the line, and
`/* ... */`. `Tokens` is a cursor over them for the small hand-written parsers of
resolver/validator/anchors.py (trust-anchors, managed-keys, trusted-keys) and autosp/tsig.py
(key statements): `peek`, `take`, `next`, `expect`, and `error`, which makes the ConfigError
"FILE:LINE: message", so both report positions the same way.

Quoted strings may span lines (BIND's own bind.keys splits key material so), unless the caller
says its statements never do (`multiline_strings=False`, TSIG keys): then a forgotten closing
quote is reported on its own line rather than wherever the quotes pair up again. Inside a
string a backslash takes the next character as it is. A comment starts only where a token
could start: `a//b` is one word, since base64 has slashes. A string or a `/*` comment still
open at the end of the file is an error at the line where it opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from resolver.errors import ConfigError

PUNCTUATION: Final = "{};"
_WORD_ENDS: Final = PUNCTUATION + '"#'


@dataclass(frozen=True, slots=True)
class Token:
    """A word, a quoted string (without its quotes) or one punctuation character."""

    text: str
    line: int
    quoted: bool = False

    def is_(self, word: str) -> bool:
        """True for this unquoted word or punctuation (a quoted "{" is a string, not a brace)."""
        return not self.quoted and self.text == word

    def __str__(self) -> str:
        """As error messages show it: quoted strings in double quotes, the rest in single."""
        return f'"{self.text}"' if self.quoted else f"'{self.text}'"


def tokenize(text: str, where: str, *, multiline_strings: bool = True) -> list[Token]:
    """The tokens of `text`, comments dropped.

    Raises:
        ConfigError: "WHERE:LINE: ..." for a string or `/*` comment that is never closed.
    """
    tokens: list[Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#" or text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ConfigError(f"{where}:{line}: comment '/*' is never closed")
            line += text.count("\n", i, end)
            i = end + 2
        elif c in PUNCTUATION:
            tokens.append(Token(c, line))
            i += 1
        elif c == '"':
            start, chars, i = line, [], i + 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                if text[i] == "\n":
                    if not multiline_strings:
                        raise ConfigError(f"{where}:{start}: string is not closed on this line "
                                          "(missing '\"')")
                    line += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                raise ConfigError(f"{where}:{start}: string is not closed (missing '\"')")
            tokens.append(Token("".join(chars), start, quoted=True))
            i += 1
        else:
            start_i = i
            while i < n and not text[i].isspace() and text[i] not in _WORD_ENDS:
                i += 1
            tokens.append(Token(text[start_i:i], line))
    return tokens


class Tokens:
    """A cursor over the tokens of one file, for recursive-descent parsing."""

    def __init__(self, text: str, where: str, *, multiline_strings: bool = True) -> None:
        self.where = where
        self.items = tokenize(text, where, multiline_strings=multiline_strings)
        self.pos = 0
        # End-of-file errors point at the last token, not at a trailing blank line.
        self.last_line = self.items[-1].line if self.items else 1

    def error(self, message: str, at: Token | None = None) -> ConfigError:
        """ "WHERE:LINE: message", LINE being that of `at`, else of the next token."""
        if at is None:
            at = self.peek()
        return ConfigError(f"{self.where}:{at.line if at else self.last_line}: {message}")

    def peek(self, ahead: int = 0) -> Token | None:
        """The next token (or one further on) without taking it; None at the end."""
        i = self.pos + ahead
        return self.items[i] if i < len(self.items) else None

    def take(self) -> Token | None:
        """Take the next token; None at the end."""
        tok = self.peek()
        if tok is not None:
            self.pos += 1
        return tok

    def next(self, what: str) -> Token:
        """Take the next token; at the end, an error saying `what` was expected."""
        tok = self.take()
        if tok is None:
            raise self.error(f"unexpected end of file, expected {what}")
        return tok

    def expect(self, word: str) -> Token:
        """Take the next token, which must be this unquoted word or punctuation."""
        tok = self.next(f"'{word}'")
        if not tok.is_(word):
            raise self.error(f"expected '{word}', found {tok}", tok)
        return tok
