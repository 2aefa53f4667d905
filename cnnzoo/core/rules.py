"""Rules for config values: a type check, a range check and the words that say what is allowed.

The application's validation (``cnnzoo.app.validate``) applies them to every key before anything
heavy loads; backends declare their own ``backend.*`` options with the same rules
(``cnnzoo.core.backend.BackendInfo.options``), so a plugin's options are checked, and listed in
docs/validation.md, exactly like the core's."""
from __future__ import annotations

from numbers import Real
from typing import Any, Callable, NamedTuple


class Rule(NamedTuple):
    type_ok: Callable[[Any], bool]
    range_ok: Callable[[Any], bool]
    allowed: str  # completes "expected ...", e.g. "a positive integer"

    def accepts(self, value) -> bool:
        return self.type_ok(value) and self.range_ok(value)


def problems(rules: dict[str, Rule], value_of: Callable[[str], Any]) -> list[str]:
    """One line for each key whose value (``value_of(key)``) its rule refuses."""
    return [f"{key}={value!r} is invalid: expected {rule.allowed}"
            for key, rule in rules.items() if not rule.accepts(value := value_of(key))]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


BOOLEAN = Rule(lambda v: isinstance(v, bool), lambda v: True, "true or false")
TEXT = Rule(lambda v: isinstance(v, str), lambda v: v.strip() != "", "a non-empty string")
PATH = TEXT._replace(allowed="a path")
POSITIVE_INT = Rule(is_int, lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = Rule(is_int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_NUMBER = Rule(is_num, lambda v: v > 0, "a positive number")
NON_NEGATIVE_NUMBER = Rule(is_num, lambda v: v >= 0, "a number >= 0")
PROBABILITY = Rule(is_num, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def one_of(*choices) -> Rule:
    """One of ``choices`` (strings, booleans or numbers), compared by value and type."""
    def same(v) -> bool:
        return any(v == c and type(v) is type(c) for c in choices)
    words = ", ".join("true" if c is True else "false" if c is False else str(c) for c in choices)
    return Rule(lambda v: v is None or isinstance(v, (str, bool, int, float)), same,
                "one of " + words)


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    return Rule(lambda v: v is None or rule.type_ok(v), lambda v: v is None or rule.range_ok(v),
                rule.allowed + " or null")


def or_auto(rule: Rule) -> Rule:
    """``rule``, or the word auto (the backend picks the value when it starts)."""
    return Rule(lambda v: v == "auto" or rule.type_ok(v), lambda v: v == "auto" or rule.range_ok(v),
                "auto or " + rule.allowed)
