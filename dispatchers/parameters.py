"""Checking a command's parameters against the tool's input schema, before the call.

A bad call costs a round trip and, worse, may half-run a tool; rejecting it
here gives a non-retryable failure that names the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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

#: The Python types of the values that jsonschema's (Draft 2020-12) type of
#: each name accepts, matched exactly (``type(value) in ...``: a bool is no
#: integer); values of other types (a Decimal) go to jsonschema, and so does
#: a whole float for "integer".
_TYPES: dict[str, frozenset[type]] = {
    "object": frozenset({dict}),
    "array": frozenset({list}),
    "string": frozenset({str}),
    "integer": frozenset({int}),
    "number": frozenset({int, float}),
    "boolean": frozenset({bool}),
    "null": frozenset({type(None)}),
}
#: Keywords that never affect validity.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly"})
#: The keywords about an object's members, checked together in one pass over it.
_MEMBERS = frozenset({"properties", "required", "additionalProperties"})
#: Schemas nested deeper than this get no quick check (a device's schema is hostile input).
_MAX_DEPTH = 16


class _Compiled(NamedTuple):
    """A schema as a quick check: the exact types it allows (None: any), and the tests a value must also pass.

    Keeping the types apart lets an ``anyOf`` of plain types (what a tool's
    ``Any``-typed parameter lists) become one set lookup.
    """

    types: frozenset[type] | None
    tests: tuple[_Accepts, ...]


_ANYTHING = _Compiled(None, ())


def quick_check(schema: Any) -> _Accepts | None:
    """A plain-Python check for ``schema``, or None when it uses anything but the common keywords.

    Known: ``type`` (one or a list), ``properties``, ``required``,
    ``additionalProperties`` (a bool or a schema), ``items`` (a schema),
    ``anyOf``, boolean schemas and annotations. Anything else (``$ref``,
    ``$schema``, ``enum``, bounds, formats, ...) makes the whole schema
    jsonschema's alone. The check may be stricter than jsonschema, never
    laxer: a False is only "ask jsonschema".
    """
    compiled = _compile(schema, 0)
    return None if compiled is None else _function(compiled)


def _compile(schema: Any, depth: int) -> _Compiled | None:
    if schema is True:
        return _ANYTHING
    if schema is False or type(schema) is not dict or depth > _MAX_DEPTH:
        return None
    types: frozenset[type] | None = None
    tests: list[_Accepts] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS or keyword in _MEMBERS:
            continue
        if keyword == "type":
            allowed = _type_names(value)
            if allowed is None:
                return None
            types = allowed if types is None else types & allowed
        elif keyword == "anyOf":
            alternatives = _alternatives(value, depth)
            if alternatives is None:
                return None
            if isinstance(alternatives, frozenset):
                types = alternatives if types is None else types & alternatives
            elif alternatives is not _always:
                tests.append(alternatives)
        elif keyword == "items":
            items = _compile(value, depth + 1)
            if items is None:
                return None
            if items != _ANYTHING:
                tests.append(_items_test(_function(items)))
        else:
            return None
    if not _MEMBERS.isdisjoint(schema):
        members = _members_test(schema, depth)
        if members is None:
            return None
        if members is not _always:
            tests.append(members)
    return _Compiled(types, tuple(tests))


def _function(compiled: _Compiled) -> _Accepts:
    types, tests = compiled
    if not tests:
        if types is None:
            return _always
        return lambda value: type(value) in types
    if types is None and len(tests) == 1:
        return tests[0]

    def accepts(value: Any) -> bool:
        if types is not None and type(value) not in types:
            return False
        for test in tests:  # noqa: SIM110 - a loop, not all() over a generator: this runs for every call
            if not test(value):
                return False
        return True

    return accepts


def _always(value: Any) -> bool:
    return True


def _type_names(value: Any) -> frozenset[type] | None:
    names = [value] if type(value) is str else value
    if type(names) is not list or not names or not all(type(name) is str and name in _TYPES for name in names):
        return None
    return frozenset().union(*(_TYPES[name] for name in names))


def _alternatives(value: Any, depth: int) -> frozenset[type] | _Accepts | None:
    """``anyOf``: the union of its types when each alternative is a plain type, else a test (``_always``: any value)."""
    if type(value) is not list or not value:
        return None
    alternatives = [_compile(subschema, depth + 1) for subschema in value]
    known = [alternative for alternative in alternatives if alternative is not None]
    if len(known) < len(alternatives):
        return None
    if _ANYTHING in known:
        return _always
    if not any(alternative.tests for alternative in known):
        return frozenset().union(*(alternative.types or () for alternative in known))
    functions = tuple(_function(alternative) for alternative in known)

    def any_of(instance: Any) -> bool:
        for function in functions:  # noqa: SIM110 - a loop, not any() over a generator: this runs for every call
            if function(instance):
                return True
        return False

    return any_of


def _items_test(item_check: _Accepts) -> _Accepts:
    def items(instance: Any) -> bool:
        if type(instance) is list:
            for item in instance:
                if not item_check(item):
                    return False
        return True

    return items


def _members_test(schema: dict[str, Any], depth: int) -> _Accepts | None:
    """``properties``, ``required`` and ``additionalProperties`` as one test of an object's members."""
    properties = schema.get("properties", {})
    names = schema.get("required", [])
    additional = schema.get("additionalProperties", True)
    if type(properties) is not dict or type(names) is not list or not all(type(name) is str for name in names):
        return None
    checks: list[tuple[str, _Accepts]] = []
    for name, subschema in properties.items():
        compiled = _compile(subschema, depth + 1)
        if compiled is None:
            return None
        if compiled != _ANYTHING:
            checks.append((name, _function(compiled)))
    others: _Accepts | None = None  # None: any other member is fine
    if additional is False:
        others = _never
    else:
        compiled = _compile(additional, depth + 1)
        if compiled is None:
            return None
        if compiled != _ANYTHING:
            others = _function(compiled)
    required, known = tuple(names), frozenset(properties)
    if not required and not checks and others is None:
        return _always

    def members(instance: Any) -> bool:
        if type(instance) is not dict:
            return True
        for name in required:
            if name not in instance:
                return False
        for name, check in checks:
            if name in instance and not check(instance[name]):
                return False
        if others is not None:
            for name, item in instance.items():
                if name not in known and not others(item):
                    return False
        return True

    return members


def _never(value: Any) -> bool:
    return False
