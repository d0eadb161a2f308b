"""resolver.namedconf: named.conf text -> tokens with lines, and malformed text -> FILE:LINE."""

from __future__ import annotations

import pytest

from resolver.errors import ConfigError
from resolver.namedconf import Token, Tokens, tokenize

W, Q = False, True  # word (or punctuation), quoted string

CASES: list[tuple[str, list[tuple[str, int, bool]]]] = [
    ("", []),
    ("key k { };", [("key", 1, W), ("k", 1, W), ("{", 1, W), ("}", 1, W), (";", 1, W)]),
    ("a;b{c}d", [("a", 1, W), (";", 1, W), ("b", 1, W), ("{", 1, W), ("c", 1, W),
                 ("}", 1, W), ("d", 1, W)]),
    ('"ddns-key" "x y"', [("ddns-key", 1, Q), ("x y", 1, Q)]),
    ('""', [("", 1, Q)]),
    ('"{;}"', [("{;}", 1, Q)]),  # punctuation inside a string is text
    ('"a\\"b" "c\\\\d"', [('a"b', 1, Q), ("c\\d", 1, Q)]),  # backslash escapes
    ('word"str"', [("word", 1, W), ("str", 1, Q)]),
    ("# shell\n// c++\nx /* c */ y", [("x", 3, W), ("y", 3, W)]),
    ("a # rest ; {\nb", [("a", 1, W), ("b", 2, W)]),
    ("a#b", [("a", 1, W)]),  # '#' ends a word and starts a comment
    ("a//b c", [("a//b", 1, W), ("c", 1, W)]),  # base64 has slashes: '//' inside a word
    ('"# not // a /* comment"', [("# not // a /* comment", 1, Q)]),
    ("/* one\ntwo\nthree */ x\ny", [("x", 3, W), ("y", 4, W)]),
    ('"AwEA\n  BQ==" z', [("AwEA\n  BQ==", 1, Q), ("z", 2, W)]),  # a string over lines
    ("\n\n\t a \r\n b", [("a", 3, W), ("b", 4, W)]),
]


@pytest.mark.parametrize(("text", "tokens"), CASES)
def test_tokens_and_their_lines(text: str, tokens: list[tuple[str, int, bool]]) -> None:
    assert tokenize(text, "f") == [Token(t, line, quoted) for t, line, quoted in tokens]


MALFORMED: list[tuple[str, bool, int, str]] = [
    # (text, multiline_strings, line of the error, fragment of the message)
    ('a\n"open', True, 2, "string is not closed (missing '\"')"),
    ('a\n"open\nb\nc', True, 2, "string is not closed"),
    ('a\n"open\nb";', False, 2, "string is not closed on this line"),
    ("a\n/* open\n\n", True, 2, "comment '/*' is never closed"),
    ("x /* a */ y\n/* b", True, 2, "comment '/*' is never closed"),
]


@pytest.mark.parametrize(("text", "multiline", "line", "fragment"), MALFORMED)
def test_malformed_text_names_file_and_line(text: str, multiline: bool, line: int,
                                            fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        tokenize(text, "/etc/x.conf", multiline_strings=multiline)
    assert str(info.value).startswith(f"/etc/x.conf:{line}: ")
    assert fragment in str(info.value)


def test_a_string_over_lines_can_be_refused() -> None:
    assert tokenize('"a"\n"b"', "f", multiline_strings=False) == [Token("a", 1, True),
                                                                   Token("b", 2, True)]


def test_cursor() -> None:
    toks = Tokens('key "k" {\n};\n\n', "k.conf")
    assert toks.expect("key") == Token("key", 1)
    # A quoted "{" is a string, not the brace expect() asks for.
    with pytest.raises(ConfigError, match=r"^k.conf:1: expected '\{', found \"k\"$"):
        toks.expect("{")
    assert toks.next("a brace") == Token("{", 1)
    assert toks.peek() == Token("}", 2) and toks.peek(1) == Token(";", 2)
    assert toks.take() == Token("}", 2) and toks.take() == Token(";", 2)
    assert toks.take() is None and toks.peek() is None
    # At the end, errors point at the last token's line, not at trailing blank lines.
    with pytest.raises(ConfigError, match=r"^k.conf:2: unexpected end of file, expected 'key'"):
        toks.next("'key'")
    assert str(toks.error("why", Token("x", 7))) == "k.conf:7: why"
