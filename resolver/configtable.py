"""One way to read a TOML table: every error names the file, the table, the key and why.

Every section of the configuration ([server], [limits], [policy], [provision], [identity],
[control], ...) is read through `Table`, so a user sees errors of one shape:
`FILE: [TABLE] key 'KEY': PROBLEM`, and an unknown key is refused with the known ones listed.

A parser reads its table key by key (`get`, `need`, `each`) and then calls `done`. The table
remembers each key it was asked for with its default (`defaults`), which is what makes the
unknown-key message exact and lets `--help` print every key with its real default
(resolver/confighelp.py) instead of a hand copy that could drift.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Self, TypeVar

from resolver.errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")
U = TypeVar("U")

Check = Callable[[T], str | None]

# Stands in `Table.defaults` for a key that has no default.
REQUIRED: Final = object()

_KIND_NAMES: Final[dict[type, str]] = {bool: "true or false", int: "an integer",
                                       float: "a number", str: "a string"}


class Table:
    """Reads one TOML table key by key, so every error can name file, table and key."""

    def __init__(self, where: str, name: str, raw: object) -> None:
        self.where = where
        self.name = name
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, not {type_name(raw)}")
        self.raw: dict[str, Any] = raw
        # Every key asked for, in the order asked, with its default (REQUIRED if none).
        self.defaults: dict[str, object] = {}

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: [{self.name}] key '{key}': {problem}")

    def get(self, key: str, kind: type[T], default: D, check: Check[T] | None = None
            ) -> T | D:
        """The value of `key` if present (of type `kind`, passing `check`), else `default`."""
        self.defaults[key] = default
        if key not in self.raw:
            return default
        return self._checked(key, kind, self.raw[key], check)

    def need(self, key: str, kind: type[T], check: Check[T] | None = None) -> T:
        """The value of a key that has no default."""
        self.defaults[key] = REQUIRED
        if key not in self.raw:
            raise self.fail(key, f"required ({_KIND_NAMES[kind]})")
        return self._checked(key, kind, self.raw[key], check)

    def each(self, key: str, parse: Callable[[str], U], default: tuple[U, ...]
             ) -> tuple[U, ...]:
        """A list of strings, each turned into a value by `parse` (ValueError: its message)."""
        self.defaults[key] = default
        if key not in self.raw:
            return default
        value = self.raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a list of strings, got {type_name(value)}")
        out = []
        for item in value:
            try:
                out.append(parse(item))
            except ValueError as e:
                raise self.fail(key, str(e)) from None
        return tuple(out)

    def done(self) -> None:
        """Refuse any key no parser asked for, listing the known ones."""
        unknown = sorted(set(self.raw) - set(self.defaults))
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known keys: {', '.join(self.defaults)})")

    def _checked(self, key: str, kind: type[T], value: Any, check: Check[T] | None) -> T:
        # bool is a subclass of int in Python; TOML keeps them apart and so do we.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(key, f"expected {_KIND_NAMES[kind]}, got {type_name(value)}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return value  # type: ignore[no-any-return]


class Section:
    """Base of a table's dataclass: `from_table` parses a Table, `from_section` raw values.

    The tables other modules own ([policy], [provision], [identity], [control]) arrive raw in
    Config.sections; `from_section` wraps them in a Table named TABLE, so every owner's errors
    come out in the one shape.
    """

    __slots__ = ()
    TABLE: ClassVar[str]

    @classmethod
    def from_table(cls, t: Table) -> Self:
        raise NotImplementedError

    @classmethod
    def from_section(cls, section: Mapping[str, Any], source: str = "config") -> Self:
        """Parse Config.sections[TABLE].

        Raises:
            ConfigError: "SOURCE: [TABLE] key 'K': problem" for the first bad key.
        """
        return cls.from_table(Table(source, cls.TABLE, section))


def toml_value(value: object) -> str:
    """TOML text for a value (HostPort, Path and enums as their strings): --help, the lab."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, enum.Enum):
        value = value.value
    return json.dumps(str(value))  # a TOML basic string is JSON's


def type_name(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


# --- checks: None when the value is fine, else the problem in a few words ---------------


def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def at_least(n: int) -> Check[int]:
    return lambda v: None if v >= n else f"must be at least {n}"


def between(lo: float, hi: float, unit: str = "") -> Check[float]:
    what = f"a number of {unit} " if unit else ""
    return lambda v: None if lo <= v <= hi else f"must be {what}between {lo:g} and {hi:g}"


def one_of(*choices: str) -> Check[str]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def non_empty(v: str) -> str | None:
    return None if v else "must not be empty"
