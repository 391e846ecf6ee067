"""ctvl.fieldtypes: config values checked against their dataclass annotations (strings, as __future__ leaves them)."""

from __future__ import annotations

import pytest
from ctvl.fieldtypes import FieldTypeError, check_value


def test_values_that_fit_pass_and_yaml_exponents_become_floats():
    assert check_value("float", 2) == 2 and check_value("float", "3e-4") == pytest.approx(3e-4)
    assert check_value("Optional[int]", None) is None and check_value("Optional[int]", 4) == 4
    assert check_value("Union[bool, str]", "auto") == "auto" and check_value("Union[bool, str]", False) is False
    assert check_value("tuple[float, float]", ("1e-1", 2)) == (pytest.approx(0.1), 2)
    assert check_value("tuple[tuple[int, int, int], ...]", [[1, 2, 2], [2, 2, 2]]) == [[1, 2, 2], [2, 2, 2]]
    assert check_value("list[float]", ["1e0"]) == [1.0]
    assert check_value("dict[str, Any]", {"a": 1}) == {"a": 1} and check_value("SomeClass", object) is object
    assert check_value("tuple[int, int, int]", [1, 2]) == [1, 2]  # a wrong count is left to the owner's message


@pytest.mark.parametrize("annotation,value,expected", [
    ("int", True, "a whole number"), ("int", 2.0, "a whole number"), ("float", False, "a number"),
    ("float", "fast", "a number"), ("bool", 1, "true or false"), ("str", 3, "text"), ("list", "a", "a list"),
    ("dict", [], "a mapping"), ("Optional[float]", "x", "a number"), ("Union[bool, str]", 3, "true or false or text"),
    ("tuple[tuple[int, int, int], ...]", [[1, 2, "two"]], "a whole number"),
])
def test_values_that_do_not_fit_name_what_was_expected(annotation, value, expected):
    with pytest.raises(FieldTypeError, match=f"expected {expected}, got"):
        check_value(annotation, value)
