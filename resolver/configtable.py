"""One way to read a TOML table: every error names the file, the table, the key and why.

Every section of the configuration ([server], [policy], [provision], [control], ...) is read
through `Table`, so a user sees errors of one shape: `FILE: [TABLE] key 'KEY': PROBLEM`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from resolver.errors import ConfigError

T = TypeVar("T")


class Table:
    """Reads one TOML table key by key, so every error can name file, table and key."""

    def __init__(self, where: str, name: str, raw: object) -> None:
        self.where = where
        self.name = name
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, not {type_name(raw)}")
        self.raw: dict[str, Any] = raw
        self.seen: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: [{self.name}] key '{key}': {problem}")

    def get(self, key: str, kind: type[T], default: T, check: Callable[[T], str | None]
            | None = None) -> T:
        self.seen.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        # bool is a subclass of int in Python; TOML keeps them apart and so do we.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(key, f"expected {kind.__name__}, got {type_name(value)}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return value  # type: ignore[no-any-return]

    def strings(self, key: str) -> tuple[str, ...] | None:
        self.seen.add(key)
        if key not in self.raw:
            return None
        value = self.raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a list of strings, got {type_name(value)}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key" + known_keys(self.seen))


def known_keys(keys: set[str]) -> str:
    return f" (known keys: {', '.join(sorted(keys))})" if keys else ""


def type_name(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def at_least(n: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}"


def between(lo: int, hi: int) -> Callable[[int], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"
