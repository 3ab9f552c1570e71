"""Checking a command's parameters against the tool's input schema, before the call.

A bad call costs a round trip and, worse, may half-run a tool; rejecting it
here gives a non-retryable failure that names the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

from .errors import InvalidParameters


def check_parameters(schema: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
    """Raise ``InvalidParameters`` naming the first wrong field, if any."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(dict(parameters)))
    if error is not None:
        raise InvalidParameters(_describe(error))


def _describe(error: ValidationError) -> str:
    field = ".".join(str(part) for part in error.absolute_path)
    where = f"parameter {field!r}" if field else "parameters"
    return f"{where}: {error.message}"


@lru_cache(maxsize=512)
def _validator(schema_json: str) -> Validator:
    """One compiled validator per distinct schema (keyed by its canonical JSON)."""
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator: Validator = cls(schema)
    return validator
