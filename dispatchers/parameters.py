"""Checking a command's parameters against the tool's input schema, before the call.

A bad call costs a round trip and, worse, may half-run a tool; rejecting it
here gives a non-retryable failure that names the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

from .errors import InvalidParameters

__all__ = ["check_parameters", "quick_check"]

#: A check that says True only of parameters the schema accepts (False: ask jsonschema).
_Accepts = Callable[[Any], bool]

#: Compiled validators, and the quick check when the schema has one, by the
#: identity of the schema object they were built from (kept alive here, so an
#: id is never reused while cached). A restarted server lists new schema
#: objects; the cache is cleared when it grows large.
_validators: dict[int, tuple[Mapping[str, Any], Validator, _Accepts | None]] = {}
_CACHE_SIZE = 1024


def check_parameters(schema: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    """Raise ``InvalidParameters`` naming the first wrong field, if any.

    Parameters the schema's quick check accepts are valid; jsonschema decides
    the rest (and names what is wrong).
    """
    validator, accepts = _validator(schema)
    if accepts is not None and accepts(parameters):
        return
    if not validator.is_valid(parameters):
        error = best_match(validator.iter_errors(parameters))
        raise InvalidParameters(_describe(error) if error else "parameters do not match the tool's input schema")


def _describe(error: ValidationError) -> str:
    field = ".".join(str(part) for part in error.absolute_path)
    where = f"parameter {field!r}" if field else "parameters"
    return f"{where}: {error.message}"


def _validator(schema: Mapping[str, Any]) -> tuple[Validator, _Accepts | None]:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1], cached[2]
    if len(_validators) >= _CACHE_SIZE:
        _validators.clear()
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator: Validator = cls(schema)
    accepts = quick_check(schema)
    _validators[id(schema)] = (schema, validator, accepts)
    return validator, accepts


# -- the quick check: plain Python for the schemas tools commonly list ------------------------------

#: The types a quick check knows, each by a test that accepts only values
#: jsonschema's (Draft 2020-12) type of that name accepts; values it does not
#: accept (a float 1.0 for "integer", a Decimal) go to jsonschema.
_TYPES: dict[str, _Accepts] = {
    "object": lambda value: type(value) is dict,
    "array": lambda value: type(value) is list,
    "string": lambda value: type(value) is str,
    "integer": lambda value: type(value) is int,
    "number": lambda value: type(value) is int or type(value) is float,
    "boolean": lambda value: type(value) is bool,
    "null": lambda value: value is None,
}
#: Keywords that never affect validity.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly"})
#: Schemas nested deeper than this get no quick check (a device's schema is hostile input).
_MAX_DEPTH = 16


def quick_check(schema: Any, depth: int = 0) -> _Accepts | None:
    """A plain-Python check for ``schema``, or None when it uses anything but the common keywords.

    Known: ``type`` (one or a list), ``properties``, ``required``,
    ``additionalProperties`` (a bool or a schema), ``items`` (a schema),
    ``anyOf``, boolean schemas and annotations. Anything else (``$ref``,
    ``$schema``, ``enum``, bounds, formats, ...) makes the whole schema
    jsonschema's alone. The check may be stricter than jsonschema, never
    laxer: a False is only "ask jsonschema".
    """
    if schema is True:
        return _always
    if schema is False or type(schema) is not dict or depth > _MAX_DEPTH:
        return None
    checks: list[_Accepts] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        check = _keyword_check(keyword, value, schema, depth)
        if check is None:
            return None
        checks.append(check)
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)


def _always(value: Any) -> bool:
    return True


def _keyword_check(keyword: str, value: Any, schema: dict[str, Any], depth: int) -> _Accepts | None:
    if keyword == "type":
        names = [value] if type(value) is str else value
        if type(names) is not list or not names or not all(type(n) is str and n in _TYPES for n in names):
            return None
        tests = [_TYPES[name] for name in names]
        return tests[0] if len(tests) == 1 else lambda instance: any(test(instance) for test in tests)
    if keyword == "required":
        if type(value) is not list or not all(type(name) is str for name in value):
            return None
        names = tuple(value)
        return lambda instance: type(instance) is not dict or all(name in instance for name in names)
    if keyword == "properties":
        if type(value) is not dict:
            return None
        subchecks: dict[str, _Accepts] = {}
        for name, subschema in value.items():
            subcheck = quick_check(subschema, depth + 1)
            if subcheck is None:
                return None
            subchecks[name] = subcheck
        return lambda instance: (
            type(instance) is not dict
            or all(subcheck(instance[name]) for name, subcheck in subchecks.items() if name in instance)
        )
    if keyword == "additionalProperties":
        properties = schema.get("properties", {})
        if "patternProperties" in schema or type(properties) is not dict:
            return None
        extra = quick_check(value, depth + 1) if value is not False else None
        if value is False:
            return lambda instance: type(instance) is not dict or all(name in properties for name in instance)
        if extra is None:
            return None
        if extra is _always:
            return _always
        return lambda instance: (
            type(instance) is not dict or all(extra(item) for name, item in instance.items() if name not in properties)
        )
    if keyword == "items":
        item_check = quick_check(value, depth + 1)
        if item_check is None:
            return None
        if item_check is _always:
            return _always
        return lambda instance: type(instance) is not list or all(item_check(item) for item in instance)
    if keyword == "anyOf":
        if type(value) is not list or not value:
            return None
        alternatives = [quick_check(subschema, depth + 1) for subschema in value]
        if any(alternative is None for alternative in alternatives):
            return None
        known = [alternative for alternative in alternatives if alternative is not None]
        return lambda instance: any(alternative(instance) for alternative in known)
    return None
