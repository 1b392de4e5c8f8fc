"""The rule engine, pure: which rules fire, what the dry run says of each, required series."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.rules.engine import (
    BASE_KEYWORDS,
    Decision,
    RuleSet,
    explain_required_series,
    fact_text,
    outcome_report,
    required_series_satisfied,
)
from gateway.rules.model import RuleSettings

CT = {"Modality": "CT", "StudyDescription": "HEAD^BRAIN", "CallingAE": "CT1"}
MR = {"Modality": "MR", "StudyDescription": "KNEE", "CallingAE": "MR1"}
SR = {"Modality": "SR", "StudyDescription": "REPORT", "CallingAE": "CT1"}


def rule(name: str, match: str, **keys: Any) -> RuleSettings:
    if keys.get("action", "route") == "route":
        keys.setdefault("targets", ["pacs"])
    return RuleSettings(name=name, match=match, **keys)


def outcomes(ruleset: RuleSet, facts: dict[str, object]) -> list[tuple[str, str, str | None]]:
    return [(o.name, o.outcome, o.failed) for o in ruleset.explain(facts)]


def test_rules_fire_in_config_order() -> None:
    rules = RuleSet(
        [
            rule("brain", 'Modality == "CT" and StudyDescription contains "BRAIN"'),
            rule("mr", 'Modality == "MR"'),
            rule("from-ct1", 'CallingAE == "CT1"', targets=["archive"]),
        ]
    )
    decision = rules.evaluate(CT)
    assert decision.names == ("brain", "from-ct1")
    assert [r.targets for r in decision.fired] == [["pacs"], ["archive"]]
    assert decision and not decision.discarded
    assert rules.evaluate(MR).names == ("mr",)
    assert rules.evaluate({}).names == ()
    assert not rules.evaluate({})


def test_nothing_fires_without_rules() -> None:
    rules = RuleSet([])
    assert rules.evaluate(CT) == Decision(())
    assert rules.explain(CT) == []
    assert len(rules) == 0


def test_disabled_rules_never_fire() -> None:
    rules = RuleSet(
        [rule("off", 'Modality == "CT"', enabled=False), rule("on", 'Modality == "CT"')]
    )
    assert rules.evaluate(CT).names == ("on",)
    assert outcomes(rules, CT) == [("off", "disabled", None), ("on", "fired", None)]


def test_discard_stops_later_rules() -> None:
    rules = RuleSet(
        [
            rule("before", 'CallingAE == "CT1"'),
            rule("drop-sr", 'Modality in ["SR", "PR"]', action="discard"),
            rule("after", 'CallingAE == "CT1"'),
            rule("after-off", 'CallingAE == "CT1"', enabled=False),
        ]
    )
    decision = rules.evaluate(SR)
    assert decision.names == ("before", "drop-sr")
    assert decision.discarded
    assert outcomes(rules, SR) == [
        ("before", "fired", None),
        ("drop-sr", "fired", None),
        ("after", "skipped", None),
        ("after-off", "disabled", None),
    ]
    # When the discard does not fire, the rules after it are evaluated as usual.
    assert rules.evaluate(CT).names == ("before", "after")
    assert outcomes(rules, CT)[1] == ("drop-sr", "not_fired", 'Modality in ["SR", "PR"]')


def test_a_disabled_discard_stops_nothing() -> None:
    rules = RuleSet([rule("drop", 'Modality == "SR"', action="discard", enabled=False)])
    rules = RuleSet([*rules.rules, rule("all", 'Modality != ""')])
    assert rules.evaluate(SR).names == ("all",)


def test_fallback_fires_only_when_nothing_else_did() -> None:
    rules = RuleSet(
        [
            rule("catch-all", 'Modality != ""', fallback=True, targets=["archive"]),
            rule("ct", 'Modality == "CT"'),
            rule("mr", 'Modality == "MR"'),
        ]
    )
    assert rules.evaluate(CT).names == ("ct",)
    assert outcomes(rules, CT) == [
        ("catch-all", "fallback_not_needed", None),
        ("ct", "fired", None),
        ("mr", "not_fired", 'Modality == "MR"'),
    ]
    assert rules.evaluate(SR).names == ("catch-all",)
    assert outcomes(rules, SR)[0] == ("catch-all", "fired", None)
    # A fallback that does not match either: not fired, with its failed part.
    assert outcomes(rules, {})[0] == ("catch-all", "not_fired", 'Modality != ""')


def test_fallback_after_a_discard_is_skipped() -> None:
    rules = RuleSet(
        [
            rule("early-fallback", 'Modality != ""', fallback=True),
            rule("drop-sr", 'Modality == "SR"', action="discard"),
            rule("late-fallback", 'Modality != ""', fallback=True),
        ]
    )
    assert rules.evaluate(SR).names == ("drop-sr",)
    assert outcomes(rules, SR) == [
        ("early-fallback", "fallback_not_needed", None),
        ("drop-sr", "fired", None),
        ("late-fallback", "skipped", None),
    ]
    # Nothing else fired: both fallbacks do.
    assert rules.evaluate(CT).names == ("early-fallback", "late-fallback")


def test_a_discard_fallback_stops_the_later_fallbacks() -> None:
    rules = RuleSet(
        [
            rule("ct", 'Modality == "CT"'),
            rule("drop-rest", 'Modality != "CT"', action="discard", fallback=True),
            rule("archive-rest", 'Modality != ""', fallback=True),
            rule("off-fallback", 'Modality != ""', fallback=True, enabled=False),
        ]
    )
    assert rules.evaluate(MR).names == ("drop-rest",)
    assert rules.evaluate(MR).discarded
    assert [o.outcome for o in rules.explain(MR)] == ["not_fired", "fired", "skipped", "disabled"]
    assert [o.outcome for o in rules.explain(CT)] == [
        "fired",
        "fallback_not_needed",
        "fallback_not_needed",
        "disabled",
    ]


def test_explain_quotes_the_failed_sub_expression() -> None:
    rules = RuleSet(
        [
            rule("brain-ct", 'Modality == "CT" and StudyDescription contains "BRAIN"'),
            rule("either", 'Modality == "MR" or Modality == "PT"'),
            rule("not-ct1", 'not CallingAE == "CT1"'),
            rule("grouped", 'Modality == "CT" and (CallingAE == "X" or CallingAE == "Y")'),
        ]
    )
    assert outcomes(rules, {**CT, "StudyDescription": "CHEST"}) == [
        ("brain-ct", "not_fired", 'StudyDescription contains "BRAIN"'),
        ("either", "not_fired", 'Modality == "MR" or Modality == "PT"'),
        ("not-ct1", "not_fired", 'not CallingAE == "CT1"'),
        ("grouped", "not_fired", 'CallingAE == "X" or CallingAE == "Y"'),
    ]
    fired = rules.explain(CT)[0]
    assert fired.fired and fired.failed is None and fired.rule.name == "brain-ct"


def test_evaluate_agrees_with_explain() -> None:
    rules = RuleSet(
        [
            rule("a", 'Modality == "CT"', fallback=True),
            rule("b", 'CallingAE startswith "MR"'),
            rule("c", 'Modality in ["SR"]', action="discard"),
            rule("d", 'StudyDescription icontains "brain"', enabled=False),
            rule("e", 'StudyDescription != ""', action="notify", targets=["hook"]),
        ]
    )
    for facts in (CT, MR, SR, {}, {"Modality": ["CT", "SR"]}):
        fired = tuple(o.name for o in rules.explain(facts) if o.fired)
        assert rules.evaluate(facts).names == fired


def test_keywords_are_what_the_rules_read_plus_the_base() -> None:
    rules = RuleSet(
        [
            rule("a", 'Modality == "CT" and StudyDescription contains "BRAIN"'),
            rule("b", 'BodyPartExamined == "HEAD" and CallingAE == "X"', enabled=False),
            rule("c", "SeriesNumber > 3", fallback=True),
        ]
    )
    assert rules.keywords == BASE_KEYWORDS | {
        "StudyDescription",
        "BodyPartExamined",
        "SeriesNumber",
    }
    base = {"SeriesDescription", "Modality", "SeriesInstanceUID", "StudyInstanceUID"}
    assert base == BASE_KEYWORDS
    assert "CallingAE" not in rules.keywords
    assert RuleSet([]).keywords == BASE_KEYWORDS


def test_the_expressions_are_parsed_once_at_validation() -> None:
    first = rule("a", 'Modality == "CT"')
    assert first.expression.text == 'Modality == "CT"'
    assert first.expression.rule == "a"
    assert first.required_series_expression is None
    ruleset = RuleSet([first])
    assert ruleset.rules[0].expression is first.expression


STUDY_RULE = {"level": "study", "required_series": '"T1" and ("T2" or "FLAIR")'}


@pytest.mark.parametrize(
    ("descriptions", "satisfied", "failed"),
    [
        (["T1 AX", "T2 SAG"], True, None),
        (["AX T1 POST", "COR FLAIR"], True, None),
        (["T1_MPRAGE", "T2*", "LOCALIZER"], True, None),
        (["T1"], False, '"T2" or "FLAIR"'),
        (["T2", "FLAIR"], False, '"T1"'),
        (["t1 ax", "t2 ax"], False, '"T1"'),  # case-sensitive
        ([], False, '"T1"'),
        (["", "T1T2"], True, None),  # one description may hold both
    ],
)
def test_required_series(descriptions: list[str], satisfied: bool, failed: str | None) -> None:
    study = rule("mr-brain", 'Modality == "MR"', **STUDY_RULE)
    assert study.required_series_expression is not None
    assert required_series_satisfied(study, descriptions) is satisfied
    assert required_series_satisfied(study, iter(descriptions)) is satisfied
    explanation = explain_required_series(study, descriptions)
    assert explanation is not None
    assert (explanation.matched, explanation.failed) == (satisfied, failed)


def test_required_series_with_not() -> None:
    study = rule("no-scout", 'Modality == "MR"', level="study", required_series='not "SCOUT"')
    assert required_series_satisfied(study, ["T1", "T2"])
    assert not required_series_satisfied(study, ["T1", "SCOUT 3PL"])
    assert required_series_satisfied(study, [])


def test_no_required_series_is_always_satisfied() -> None:
    plain = rule("a", 'Modality == "MR"', level="study")
    assert required_series_satisfied(plain, [])
    assert explain_required_series(plain, ["x"]) is None


def test_outcome_report() -> None:
    study = rule("mr-brain", 'Modality == "MR"', targets=["pacs", "out"], **STUDY_RULE)
    plain = rule("ct", 'Modality == "CT"')
    rules = RuleSet([plain, study])
    ct, mr = rules.explain(MR)
    assert outcome_report(ct, ["T1"]) == {
        "name": "ct",
        "outcome": "not_fired",
        "failed": 'Modality == "CT"',
        "action": "route",
        "targets": ["pacs"],
        "required_series": None,
    }
    assert outcome_report(mr, ["T1"]) == {
        "name": "mr-brain",
        "outcome": "fired",
        "failed": None,
        "action": "route",
        "targets": ["pacs", "out"],
        "required_series": {"met": False, "failed": '"T2" or "FLAIR"'},
    }
    assert outcome_report(mr, ["T1", "FLAIR"])["required_series"] == {"met": True, "failed": None}


@pytest.mark.parametrize(
    ("value", "text"),
    [("CT", "CT"), ("", None), (None, None), (["A", "B"], "A\\B"), ([], None), (3, "3")],
)
def test_fact_text(value: object, text: str | None) -> None:
    assert fact_text(value) == text
