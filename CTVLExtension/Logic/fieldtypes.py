"""Check a config value against its dataclass field's annotation, so a wrong type is a one-line error up front.

YAML 1.1 (PyYAML) reads ``3e-4`` -- an exponent without a dot -- as the string ``"3e-4"``; a float field takes
such a string as the number it spells. Everything else must already have the annotated type: ``true`` is not an
int, ``"two"`` is not a count. Annotations are the strings ``from __future__ import annotations`` leaves.
"""

from __future__ import annotations

from typing import Any


class FieldTypeError(ValueError):
    """A value that does not fit its field's annotation; the message names what was expected."""


def _split_args(inner: str) -> list[str]:
    """Top-level comma-separated parts of ``inner`` (``"int, tuple[int, int]"`` -> two parts)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return [p for p in parts if p]


def _generic(annotation: str) -> tuple[str, list[str]]:
    """``"tuple[int, ...]"`` -> ``("tuple", ["int", "..."])``; a plain name has no arguments."""
    if "[" not in annotation or not annotation.endswith("]"):
        return annotation.strip(), []
    head, inner = annotation.split("[", 1)
    return head.strip(), _split_args(inner[:-1])


def _number(value: Any) -> float | int:
    if isinstance(value, bool):
        raise FieldTypeError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise FieldTypeError(f"expected a number, got {value!r}")


def check_value(annotation: str, value: Any) -> Any:
    """``value`` if it fits ``annotation`` (a float spelled as a string becomes the float); else FieldTypeError.

    Unknown annotations (``Any``, class names) pass the value through unchecked."""
    head, args = _generic(annotation)
    if head == "Optional":
        return None if value is None else check_value(args[0], value)
    if head == "Union":
        errors = []
        for option in args:
            try:
                return check_value(option, value)
            except FieldTypeError as exc:
                errors.append(str(exc).replace("expected ", "", 1).split(", got")[0])
        raise FieldTypeError(f"expected {' or '.join(errors)}, got {value!r}")
    if head == "float":
        return _number(value)
    if head == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FieldTypeError(f"expected a whole number, got {value!r}")
    if head == "bool":
        if isinstance(value, bool):
            return value
        raise FieldTypeError(f"expected true or false, got {value!r}")
    if head == "str":
        if isinstance(value, str):
            return value
        raise FieldTypeError(f"expected text, got {value!r}")
    if head in ("list", "tuple"):
        if not isinstance(value, (list, tuple)):
            raise FieldTypeError(f"expected a list, got {value!r}")
        if not args:
            return value
        homogeneous = head == "list" or (len(args) == 2 and args[1] == "...")  # list[X], tuple[X, ...]
        items = args[:1] * len(value) if homogeneous else args
        if len(items) != len(value):  # a wrong count is the owner's to word (e.g. "spacing needs 3 values")
            return value
        return type(value)(check_value(a, v) for a, v in zip(items, value))
    if head == "dict":
        if not isinstance(value, dict):
            raise FieldTypeError(f"expected a mapping, got {value!r}")
        return value
    return value
