"""Validation of settings dataclasses: every field against its rule, all failures in one error."""
from __future__ import annotations

from typing import Any, Callable, Iterable

Rule = tuple[Callable[[Any], bool], Iterable[str]]  # (accepts a value, the fields it rules)


def check_fields(config, expected: str, *rules: Rule) -> None:
    """Refuse ``config`` if a rule rejects one of its fields:
    ``ValueError("<Class> | name=value, .... Expected: <expected>")`` naming every such field,
    in the rules' order."""
    bad = [f"{name}={getattr(config, name)}" for accepts, names in rules for name in names
           if not accepts(getattr(config, name))]
    if bad:
        raise ValueError(f"{type(config).__name__} | {', '.join(bad)}. Expected: {expected}")
