"""Which rules fire for a series: the rule set's decision, and the dry run's explanation.

Pure: no I/O and no DICOM networking. Callers extract the facts (`RuleSet.keywords` says which
DICOM keywords to read; `gateway.rules.facts` reads them from a series' first instance) and act
on the decision.

The order of evaluation, for one set of facts:

1. The rules that are not `fallback` rules, in config order. A disabled rule never fires. When a
   rule with action `discard` fires, evaluation stops: every rule after it in the config is
   skipped, fallback rules included.
2. Only when none of them fired: the `fallback` rules, in config order, with the same stop
   after a `discard`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from gateway.rules.expr import Explanation, Facts
from gateway.rules.model import RuleSettings

__all__ = [
    "BASE_KEYWORDS",
    "Decision",
    "Outcome",
    "RuleOutcome",
    "RuleSet",
    "explain_required_series",
    "fact_text",
    "outcome_report",
    "required_series_satisfied",
]

BASE_KEYWORDS: Final = frozenset(
    {"SeriesDescription", "Modality", "SeriesInstanceUID", "StudyInstanceUID"}
)
"""Read for every series whatever the rules say: reports and study completion need them."""

Outcome: TypeAlias = Literal["fired", "not_fired", "disabled", "skipped", "fallback_not_needed"]
"""What happened to one rule: `skipped` follows a discard; `fallback_not_needed` is a fallback
rule left out because another rule fired."""


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """One rule's fate for one set of facts; `failed` quotes what made `match` false."""

    rule: RuleSettings
    outcome: Outcome
    failed: str | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def fired(self) -> bool:
        return self.outcome == "fired"


@dataclass(frozen=True, slots=True)
class Decision:
    """The rules that fired, in config order."""

    fired: tuple[RuleSettings, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.fired)

    @property
    def discarded(self) -> bool:
        """A `discard` rule fired (it is the last of `fired`)."""
        return bool(self.fired) and self.fired[-1].action == "discard"

    def __bool__(self) -> bool:
        return bool(self.fired)


class RuleSet:
    """The configured rules, evaluated together in config order."""

    def __init__(self, rules: Iterable[RuleSettings]) -> None:
        self.rules: tuple[RuleSettings, ...] = tuple(rules)
        keywords = set(BASE_KEYWORDS)
        for rule in self.rules:
            keywords |= rule.expression.keywords
        self.keywords: frozenset[str] = frozenset(keywords)
        """Every DICOM keyword a rule reads, plus `BASE_KEYWORDS` (no connection facts)."""

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, facts: Facts) -> Decision:
        """The rules that fire for *facts*; never raises on odd fact values."""
        return Decision(tuple(o.rule for o in self._run(facts, explain=False) if o.fired))

    def explain(self, facts: Facts) -> list[RuleOutcome]:
        """Every rule's outcome for *facts*, in config order, with what failed where it did."""
        return self._run(facts, explain=True)

    def _run(self, facts: Facts, *, explain: bool) -> list[RuleOutcome]:
        outcomes: list[RuleOutcome | None] = [None] * len(self.rules)
        main = [i for i, rule in enumerate(self.rules) if not rule.fallback]
        fallbacks = [i for i, rule in enumerate(self.rules) if rule.fallback]
        stop = self._pass(main, facts, outcomes, explain)
        if any(o is not None and o.fired for o in outcomes):
            for i in fallbacks:
                rule = self.rules[i]
                if not rule.enabled:
                    outcomes[i] = RuleOutcome(rule, "disabled")
                elif stop is not None and i > stop:
                    outcomes[i] = RuleOutcome(rule, "skipped")
                else:
                    outcomes[i] = RuleOutcome(rule, "fallback_not_needed")
        else:
            self._pass(fallbacks, facts, outcomes, explain)
        return [o for o in outcomes if o is not None]

    def _pass(
        self,
        indexes: Sequence[int],
        facts: Facts,
        outcomes: list[RuleOutcome | None],
        explain: bool,
    ) -> int | None:
        """Evaluate the rules at *indexes*; return the index of a discard that fired, if any."""
        stop: int | None = None
        for i in indexes:
            rule = self.rules[i]
            if not rule.enabled:
                result = RuleOutcome(rule, "disabled")
            elif stop is not None:
                result = RuleOutcome(rule, "skipped")
            elif explain:
                verdict = rule.expression.explain(facts)
                outcome: Outcome = "fired" if verdict.matched else "not_fired"
                result = RuleOutcome(rule, outcome, verdict.failed)
            else:
                fired = rule.expression.evaluate(facts)
                result = RuleOutcome(rule, "fired" if fired else "not_fired")
            outcomes[i] = result
            if result.fired and rule.action == "discard":
                stop = i
        return stop


def required_series_satisfied(rule: RuleSettings, descriptions: Iterable[str]) -> bool:
    """Whether a study whose series have *descriptions* holds the series *rule* requires.

    A literal of `required_series` holds when some description contains it (case-sensitive);
    a rule without `required_series` is always satisfied.
    """
    expression = rule.required_series_expression
    if expression is None:
        return True
    return expression.evaluate({"SeriesDescription": list(descriptions)})


def explain_required_series(rule: RuleSettings, descriptions: Iterable[str]) -> Explanation | None:
    """As `required_series_satisfied`, quoting the part not satisfied; None without one."""
    expression = rule.required_series_expression
    if expression is None:
        return None
    return expression.explain({"SeriesDescription": list(descriptions)})


def outcome_report(outcome: RuleOutcome, descriptions: Sequence[str]) -> dict[str, Any]:
    """One rule's outcome as the dry runs report it (JSON-ready).

    *descriptions* are the SeriesDescription of each series of the study, for
    `required_series`: ``{"met": bool, "failed": text or None}``, or None when the rule has none.
    """
    rule = outcome.rule
    required = explain_required_series(rule, descriptions)
    return {
        "name": rule.name,
        "outcome": outcome.outcome,
        "failed": outcome.failed,
        "action": rule.action,
        "targets": list(rule.targets),
        "required_series": (
            None if required is None else {"met": required.matched, "failed": required.failed}
        ),
    }


def fact_text(value: object) -> str | None:
    """A fact as one line of text for a report (values of a list joined with a backslash, as
    DICOM writes them); None when empty."""
    if isinstance(value, list | tuple):
        value = "\\".join(str(item) for item in value)
    text = "" if value is None else str(value)
    return text or None
