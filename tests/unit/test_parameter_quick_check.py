"""The quick parameter check never accepts what jsonschema refuses, and its cache stays bounded."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import jsonschema
import pytest

from dispatchers import parameters
from dispatchers.errors import InvalidParameters
from dispatchers.parameters import check_parameters, quick_check

ANY_VALUE = {
    "anyOf": [
        {"type": "integer"},
        {"type": "number"},
        {"type": "string"},
        {"type": "boolean"},
        {"items": {}, "type": "array"},
        {"additionalProperties": True, "type": "object"},
        {"type": "null"},
    ],
    "title": "Value",
}
SCHEMAS: list[Any] = [
    {"type": "object", "properties": {"value": ANY_VALUE}, "required": ["value"], "title": "echoArguments"},
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": ["number", "null"], "default": None},
            "tags": {"type": "array", "items": {"type": "string"}},
            "point": {"type": "object", "properties": {"x": {"type": "number"}}, "additionalProperties": False},
            "extra": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"n": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}},
    {  # anyOf of more than plain types, and a type narrowed by an anyOf
        "properties": {
            "a": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"x": {"type": "number"}}}]},
            "b": {"type": ["number", "string"], "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "tags": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        },
        "required": ["a"],
    },
    {"type": "object", "anyOf": [{"type": "integer"}, True]},
    {},
    True,
]
VALUES: list[Any] = [
    0, 1, -5, 2**70, 1.0, 1.5, float("nan"), True, False, None, "", "x", [], [1], ["a", "b"], [1, "a"],
    {}, {"x": 1}, {"x": "left"}, {"x": 1, "y": 2}, {"k": True}, {"k": 1}, Decimal("1"),
]  # fmt: skip
KEYS = ["value", "a", "b", "tags", "point", "extra", "n", "other"]


def instances() -> list[Any]:
    found: list[Any] = [{}, [], "x", None, 1]
    for key, value in itertools.product(KEYS, VALUES):
        found.append({key: value})
    for (k1, v1), (k2, v2) in itertools.combinations(itertools.product(KEYS[:6], VALUES[::3]), 2):
        if k1 != k2:
            found.append({k1: v1, k2: v2})
    return found


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_quick_check_accepts_only_what_jsonschema_accepts(schema: Any) -> None:
    check = quick_check(schema)
    assert check is not None
    validator = jsonschema.Draft202012Validator(schema)
    accepted = 0
    for instance in instances():
        if check(instance):
            accepted += 1
            assert validator.is_valid(instance), instance
    assert accepted  # the quick path does get taken


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/x", "$defs": {"x": {"type": "integer"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}},
        {"type": "object", "properties": {"a": {"enum": [1, 2]}}},
        {"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False},
        {"type": "imaginary"},
        False,
    ],
)
def test_other_keywords_are_left_to_jsonschema(schema: Any) -> None:
    assert quick_check(schema) is None


def test_deep_schemas_get_no_quick_check() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    assert quick_check(schema) is None
    check_parameters(schema, {"a": {}})  # jsonschema still decides


def test_refusals_still_name_the_field() -> None:
    schema = SCHEMAS[1]
    with pytest.raises(InvalidParameters, match="'a'"):
        check_parameters(schema, {"a": "one"})
    with pytest.raises(InvalidParameters):
        check_parameters(schema, {"a": 1, "unexpected": 1})
    check_parameters(schema, {"a": 1.0})  # a whole float: jsonschema's integer, past the quick check


def test_the_validator_cache_is_bounded() -> None:
    parameters._validators.clear()
    schemas = [{"type": "object", "properties": {f"p{i}": {"type": "integer"}}} for i in range(3000)]
    for i, schema in enumerate(schemas):
        check_parameters(schema, {f"p{i}": i})
        assert len(parameters._validators) <= parameters._CACHE_SIZE
    parameters._validators.clear()
