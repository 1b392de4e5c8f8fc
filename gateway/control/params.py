"""Control methods' parameters: one pydantic model a method, validated by the server.

Every method is registered with a `Params` model (`ControlServer.register`); the server
validates the request's params object into it before calling the method, so a method receives
a typed, frozen object and never a raw dict. A model forbids unknown keys and is strict: JSON
types are not coerced (`"5"` is not an integer, `true` is not a number).

A validation failure becomes one `-32602` message naming the parameter (`explain`):
`unknown parameter 'x'` (the first in sorted order, checked before anything else),
`parameter 'x' is required`, or `parameter 'x' <what is wrong>`. What is wrong comes from, in
order: a `ValueError` raised by the field's own validator (its text; a text that starts with
"parameter " is the whole message, e.g. from a model validator), the field's `Explain`
metadata, or the kind of error ("must be a string", "must be an integer", ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from gateway.store.instance import is_valid_uid

__all__ = ["Explain", "Limit", "NoParams", "Params", "StudyUid", "explain"]


@dataclass(frozen=True, slots=True)
class Explain:
    """Field metadata: what a bad value of this parameter is told (after "parameter 'x' ").

    *text* is used for any error of the field but a missing one, which is told *missing*
    ("is required" by default)."""

    text: str
    missing: str = "is required"


class Params(BaseModel):
    """The base of every method's parameters: unknown keys refused, no coercion, frozen."""

    model_config: ClassVar[ConfigDict] = ConfigDict(extra="forbid", frozen=True, strict=True)

    def given(self) -> dict[str, Any]:
        """The parameters the caller sent (not the defaults), as plain JSON values."""
        return self.model_dump(exclude_unset=True)


class NoParams(Params):
    """A method that takes no parameters (params omitted, null or `{}`)."""


def _uid(value: str) -> str:
    if not is_valid_uid(value):
        raise ValueError("is not a valid UID")
    return value


# A Study Instance UID naming one stored study: a valid UID (not a search pattern).
StudyUid = Annotated[str, AfterValidator(_uid)]

# At most this many answers: an integer 1..10000, 100 by default.
Limit = Annotated[int, Field(ge=1, le=10000), Explain("must be an integer 1..10000")]

_KINDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    "too_long": "must have at most {max_length} items",
    "too_short": "must have at least {min_length} items",
}


def explain(model: type[Params], exc: ValidationError) -> str:
    """The one message a failed validation of *model* answers (see the module docstring)."""
    errors = exc.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown parameter {unknown[0]!r}"
    return _message(model, errors[0])


def _message(model: type[Params], error: ErrorDetails) -> str:
    loc = error["loc"]
    if not loc:  # a model validator: its text is the whole message
        return _raised(error) or error["msg"]
    name = str(loc[0])
    if error["type"] == "value_error":
        raised = _raised(error)
        if raised.startswith("parameter "):
            return raised
        if raised:
            return f"parameter {name!r} {raised}"
    field = model.model_fields.get(name)
    hint = next((m for m in field.metadata if isinstance(m, Explain)), None) if field else None
    if error["type"] == "missing":
        return f"parameter {name!r} {hint.missing if hint else 'is required'}"
    if hint is not None:
        return f"parameter {name!r} {hint.text}"
    kind = _KINDS.get(error["type"])
    if kind is None:
        text = error["msg"]
        kind = text[:1].lower() + text[1:]
    else:
        kind = kind.format(**error.get("ctx", {}))
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    return f"parameter {name + where!r} {kind}"


def _raised(error: ErrorDetails) -> str:
    cause = error.get("ctx", {}).get("error")
    return str(cause) if isinstance(cause, ValueError) else ""
