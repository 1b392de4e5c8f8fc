"""The `[[rules]]` and `[[folders]]` tables of `config.toml`.

`RuleSettings` validates one rule on its own: its keys, the combinations that make sense, and its
two expressions (`match`, `required_series`), which are parsed once here and kept on the model
(`expression`, `required_series_expression`) so the engine never parses again. What needs the
whole file (unique names, targets naming a `[[peers]]` or `[[folders]]` entry) is checked by
`gateway.config.Settings`. docs/rules.md describes every key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.rules.expr import Expression, RuleSyntaxError, parse, parse_required_series

__all__ = [
    "SETTING_ERROR",
    "Action",
    "FolderSettings",
    "Level",
    "Priority",
    "RuleSettings",
    "WebhookSettings",
    "setting_error",
]

SETTING_ERROR: Final = "gateway_setting"

Level = Literal["series", "study"]
Action = Literal["route", "notify", "discard"]
Priority = Literal["urgent", "normal", "low"]
ForceAction = Literal["proceed", "discard"]

Name = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
Seconds = Annotated[float, Field(gt=0)]

_CONTROL_RE: Final = re.compile(r"[\x00-\x20\x7f]")


def setting_error(message: str, key: str = "") -> PydanticCustomError:
    """A validation error whose message says it all (no "got <input>" is added when printed).

    *key* is appended to the error's location: a model-level check names the key it is about.
    """
    return PydanticCustomError(SETTING_ERROR, "{message}", {"message": message, "key": key})


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FolderSettings(_Table):
    """A directory the rules can write instances to, named like a peer."""

    name: Name
    path: Path

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise setting_error("a folder path cannot be empty")
        return value


class WebhookSettings(_Table):
    """An HTTP endpoint that `notify` rules POST a JSON summary to, named like a peer."""

    name: Name
    url: str
    patient_names: bool = False
    timeout_seconds: Seconds = 10.0
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not _is_http_url(value):
            raise setting_error(f"must be an http:// or https:// URL (got {value!r})")
        return value

    @field_validator("headers")
    @classmethod
    def _header_values(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", key):
                raise setting_error(f"{key!r} is not an HTTP header name")
            if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text):
                raise setting_error(f"the value of header {key!r} holds a control character")
        return value


class RuleSettings(_Table):
    """One `[[rules]]` entry: what it selects, at which level, and what happens to it."""

    name: Name
    match: str
    level: Level = "series"
    action: Action = "route"
    targets: list[str] = Field(default_factory=list)
    quiet_seconds: Seconds = 30.0
    enabled: bool = True
    priority: Priority = "normal"
    fallback: bool = False
    required_series: str | None = None
    force_seconds: Seconds | None = None
    force_action: ForceAction = "proceed"

    _expression: Expression = PrivateAttr()
    _required_series: Expression | None = PrivateAttr(default=None)

    @property
    def expression(self) -> Expression:
        """`match`, parsed when the rule was validated."""
        return self._expression

    @property
    def required_series_expression(self) -> Expression | None:
        """`required_series`, parsed when the rule was validated; None when not set."""
        return self._required_series

    @model_validator(mode="after")
    def _check(self) -> RuleSettings:
        rule = f"rule {self.name!r}"
        try:
            self._expression = parse(self.match, rule=self.name)
        except RuleSyntaxError as exc:
            raise setting_error(str(exc), "match") from None
        if self.required_series is not None:
            if self.level != "study":
                raise setting_error(
                    f'{rule}: required_series needs level = "study"', "required_series"
                )
            try:
                self._required_series = parse_required_series(self.required_series, self.name)
            except RuleSyntaxError as exc:
                raise setting_error(str(exc), "required_series") from None
        if self.force_seconds is not None and self.level != "study":
            raise setting_error(f'{rule}: force_seconds needs level = "study"', "force_seconds")
        if "force_action" in self.model_fields_set and self.force_seconds is None:
            raise setting_error(f"{rule}: force_action needs force_seconds", "force_action")
        self._check_targets(rule)
        return self

    def _check_targets(self, rule: str) -> None:
        if self.action in ("route", "notify") and not self.targets:
            message = f'{rule}: action "{self.action}" needs at least one target'
            raise setting_error(message, "targets")
        if self.action == "discard" and self.targets:
            message = f'{rule}: action "discard" sends nothing: remove its targets'
            raise setting_error(message, "targets")
        seen: set[str] = set()
        for target in self.targets:
            if target in seen:
                raise setting_error(f"{rule}: target {target!r} is listed twice", "targets")
            seen.add(target)


def _is_http_url(text: str) -> bool:
    if _CONTROL_RE.search(text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number 0-65535)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
