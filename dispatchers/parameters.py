"""Checking a command's parameters against the tool's input schema, before the call.

A bad call costs a round trip and, worse, may half-run a tool; rejecting it
here gives a non-retryable failure that names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

from .errors import InvalidParameters

__all__ = ["check_parameters"]

#: Compiled validators by the identity of the schema object they were built
#: from (kept alive here, so an id is never reused while cached). A restarted
#: server lists new schema objects; the cache is cleared when it grows large.
_validators: dict[int, tuple[Mapping[str, Any], Validator]] = {}
_CACHE_SIZE = 1024


def check_parameters(schema: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    """Raise ``InvalidParameters`` naming the first wrong field, if any."""
    validator = _validator(schema)
    if not validator.is_valid(parameters):
        error = best_match(validator.iter_errors(parameters))
        raise InvalidParameters(_describe(error) if error else "parameters do not match the tool's input schema")


def _describe(error: ValidationError) -> str:
    field = ".".join(str(part) for part in error.absolute_path)
    where = f"parameter {field!r}" if field else "parameters"
    return f"{where}: {error.message}"


def _validator(schema: Mapping[str, Any]) -> Validator:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    if len(_validators) >= _CACHE_SIZE:
        _validators.clear()
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator: Validator = cls(schema)
    _validators[id(schema)] = (schema, validator)
    return validator
