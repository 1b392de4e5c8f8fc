"""The rule expression language: parsing, errors with columns, evaluation, explanations, facts."""

from __future__ import annotations

import dataclasses
import pickle
import random
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
import re2
from pydicom.multival import MultiValue
from pydicom.valuerep import IS, DSfloat, PersonName

from gateway.errors import ConfigError
from gateway.rules.expr import (
    And,
    Compare,
    Explanation,
    Expression,
    In,
    Not,
    Or,
    RuleSyntaxError,
    facts_from_dataset,
    parse,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
SPEC = 'Modality == "CT" and StudyDescription contains "BRAIN" and CallingAE in ["CT1", "CT2"]'
BRAIN_CT = {"Modality": "CT", "StudyDescription": "HEAD^BRAIN W/O", "CallingAE": "CT2"}


def holds(text: str, **facts: object) -> bool:
    return parse(text).evaluate(facts)


def syntax_error(text: str, rule: str = "r") -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as caught:
        parse(text, rule)
    return caught.value


# --- the spec's example ------------------------------------------------------------------------


def test_spec_example_matches_a_brain_ct_from_ct2() -> None:
    expression = parse(SPEC, "brain-ct")
    assert expression.evaluate(BRAIN_CT) is True
    assert expression.text == SPEC
    assert expression.rule == "brain-ct"
    assert expression.keywords == frozenset({"Modality", "StudyDescription"})


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"Modality": "MR"}, 'Modality == "CT"'),
        ({"Modality": "ct"}, 'Modality == "CT"'),
        ({"StudyDescription": "CHEST"}, 'StudyDescription contains "BRAIN"'),
        ({"StudyDescription": "head^brain"}, 'StudyDescription contains "BRAIN"'),
        ({"CallingAE": "CT3"}, 'CallingAE in ["CT1", "CT2"]'),
        ({"CallingAE": None}, 'CallingAE in ["CT1", "CT2"]'),
    ],
)
def test_spec_example_refuses_and_names_what_failed(change: dict[str, object], failed: str) -> None:
    expression = parse(SPEC, "brain-ct")
    facts = {**BRAIN_CT, **change}
    assert expression.evaluate(facts) is False
    assert expression.explain(facts) == Explanation(matched=False, failed=failed)


def test_spec_example_tree() -> None:
    root = parse(SPEC).root
    assert isinstance(root, And)
    first, second, third = root.operands
    assert isinstance(first, Compare) and (first.attribute.keyword, first.op) == ("Modality", "==")
    assert first.value.text == "CT" and first.value.number is None and not first.negated
    assert isinstance(second, Compare) and second.op == "contains"
    assert isinstance(third, In) and [v.text for v in third.values] == ["CT1", "CT2"]
    assert third.attribute.vr == ""  # a connection fact


# --- operators ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        ('Modality == "CT"', "CT", True),
        ('Modality == "CT"', "MR", False),
        ('Modality != "CT"', "MR", True),
        ('Modality != "CT"', "CT", False),
        ('Modality < "MR"', "CT", True),
        ('Modality < "CT"', "CT", False),
        ('Modality <= "CT"', "CT", True),
        ('Modality > "CT"', "MR", True),
        ('Modality > "MR"', "CT", False),
        ('Modality >= "MR"', "MR", True),
        ('Modality >= "MR"', "CT", False),
        ('Modality contains "T"', "CT", True),
        ('Modality contains "X"', "CT", False),
        ('Modality startswith "C"', "CT", True),
        ('Modality startswith "T"', "CT", False),
        ('Modality matches "^[CM][TR]$"', "MR", True),
        ('Modality matches "^[CM][TR]$"', "PT", False),
        ('Modality in ["CT", "MR"]', "MR", True),
        ('Modality in ["CT", "MR"]', "PT", False),
        ('Modality not in ["CT", "MR"]', "PT", True),
        ('Modality not in ["CT", "MR"]', "CT", False),
        ('Modality not contains "T"', "PT", False),
        ('Modality not contains "T"', "MR", True),
        ('Modality not startswith "M"', "CT", True),
        ('Modality not matches "^M"', "MR", False),
        ('Modality iequals "ct"', "CT", True),
        ('Modality iequals "ct"', "MR", False),
        ('Modality not iequals "ct"', "Ct", False),
    ],
)
def test_each_operator(text: str, value: str, expected: bool) -> None:
    assert holds(text, Modality=value) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('StudyDescription contains "brain"', False),
        ('StudyDescription icontains "brain"', True),
        ('StudyDescription icontains "lung"', False),
        ('StudyDescription startswith "head"', False),
        ('StudyDescription istartswith "head"', True),
        ('StudyDescription istartswith "brain"', False),
        ('StudyDescription matches "brain"', False),
        ('StudyDescription imatches "b.a.n"', True),
        ('StudyDescription imatches "^brain"', False),
        ('StudyDescription iequals "head^brain w/o"', True),
        ('StudyDescription == "head^brain w/o"', False),
        ('StudyDescription not icontains "BRAIN"', False),
    ],
)
def test_case_insensitive_forms(text: str, expected: bool) -> None:
    assert holds(text, StudyDescription="Head^Brain W/O") is expected


def test_case_insensitive_forms_fold_unicode() -> None:
    assert holds('PatientName iequals "STRASSE^ÄNEAS"', PatientName="Straße^Äneas")
    assert holds('PatientName icontains "äneas"', PatientName="Straße^ÄNEAS")


def test_comparisons_are_case_sensitive_by_default() -> None:
    assert not holds('Modality == "ct"', Modality="CT")
    assert not holds('Modality in ["ct"]', Modality="CT")
    assert not holds('Modality startswith "c"', Modality="CT")


def test_matches_is_a_search_compiled_once_at_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    expression = parse('SeriesDescription matches "T[12]\\b"')
    root = expression.root
    assert isinstance(root, Compare) and root.pattern is not None
    assert root.pattern.pattern == "T[12]\\b"

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compiled during evaluation")

    monkeypatch.setattr(re2, "compile", no_compiling)
    monkeypatch.setattr(re, "compile", no_compiling)
    assert expression.evaluate({"SeriesDescription": "AX T2 FLAIR"})  # search, not match
    assert not expression.evaluate({"SeriesDescription": "AX T22"})
    assert not expression.evaluate({"SeriesDescription": "ax t1"})


def test_imatches_ignores_case() -> None:
    root = parse('SeriesDescription imatches "^ax"').root
    assert isinstance(root, Compare) and root.pattern is not None
    assert not root.pattern.options.case_sensitive
    assert holds('SeriesDescription imatches "^ax"', SeriesDescription="AX T1")


def test_regex_backslashes_need_no_doubling() -> None:
    assert holds(r'AccessionNumber matches "^\d{6}$"', AccessionNumber="123456")
    assert holds(r'AccessionNumber matches "^\\d{6}$"', AccessionNumber="123456")
    assert not holds(r'AccessionNumber matches "^\d{6}$"', AccessionNumber="12345X")


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (r'"it\'s"', "it's"),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'say \"hi\"'", 'say "hi"'),
        (r'"a\\b"', "a\\b"),
        (r'"a\d"', "a\\d"),
        ("'double \" inside single'", 'double " inside single'),
        ('"single \' inside double"', "single ' inside double"),
        ('""', ""),
    ],
)
def test_string_literals_and_escapes(text: str, content: str) -> None:
    root = parse(f"ImageComments == {text}").root
    assert isinstance(root, Compare)
    assert root.value.text == content
    assert holds(f"ImageComments == {text}", ImageComments=content)  # LT: not split


def test_in_lists() -> None:
    assert holds('BodyPartExamined in ["HEAD", "BRAIN"]', BodyPartExamined="BRAIN")
    assert holds("SeriesNumber in [1, 2, 3]", SeriesNumber="2")
    assert holds("SeriesNumber in [1, 2, 3]", SeriesNumber="002")
    assert not holds("SeriesNumber in [1, 2, 3]", SeriesNumber="4")
    assert holds('SeriesNumber in ["x", 7]', SeriesNumber="7")
    assert holds('SeriesNumber in ["x", 7]', SeriesNumber="x")
    assert not holds("Modality in []", Modality="CT")
    assert holds("Modality not in []", Modality="CT")
    assert holds('BodyPartExamined in ["", "HEAD"]')  # missing is ""
    assert holds('Modality not in [\n  "SR",\n  "PR"\n]', Modality="CT")


# --- precedence and parentheses ----------------------------------------------------------------


def test_and_binds_tighter_than_or() -> None:
    text = 'Modality == "CT" or Modality == "MR" and BodyPartExamined == "HEAD"'
    root = parse(text).root
    assert isinstance(root, Or)
    assert isinstance(root.operands[1], And)
    assert holds(text, Modality="CT", BodyPartExamined="CHEST")
    assert not holds(text, Modality="MR", BodyPartExamined="CHEST")
    assert holds(text, Modality="MR", BodyPartExamined="HEAD")


def test_parentheses_override_precedence() -> None:
    text = '(Modality == "CT" or Modality == "MR") and BodyPartExamined == "HEAD"'
    root = parse(text).root
    assert isinstance(root, And) and isinstance(root.operands[0], Or)
    assert not holds(text, Modality="CT", BodyPartExamined="CHEST")
    assert holds(text, Modality="CT", BodyPartExamined="HEAD")


def test_not_binds_tighter_than_and() -> None:
    text = 'not Modality == "CT" and BodyPartExamined == "HEAD"'
    root = parse(text).root
    assert isinstance(root, And) and isinstance(root.operands[0], Not)
    assert holds(text, Modality="MR", BodyPartExamined="HEAD")
    assert not holds(text, Modality="CT", BodyPartExamined="HEAD")
    assert not holds(text, Modality="MR", BodyPartExamined="CHEST")
    grouped = 'not (Modality == "CT" and BodyPartExamined == "HEAD")'
    assert holds(grouped, Modality="CT", BodyPartExamined="CHEST")
    assert not holds(grouped, Modality="CT", BodyPartExamined="HEAD")


def test_not_nests_and_chains_flatten() -> None:
    assert holds('not not Modality == "CT"', Modality="CT")
    assert not holds('not not not Modality == "CT"', Modality="CT")
    root = parse('Modality == "A" or Modality == "B" or Modality == "C" or Modality == "D"').root
    assert isinstance(root, Or) and len(root.operands) == 4
    assert holds('((((Modality == "CT"))))', Modality="CT")


def test_whitespace_and_newlines_are_free() -> None:
    text = '\n  Modality=="CT"\n  and\tSeriesNumber>=2\n'
    assert holds(text, Modality="CT", SeriesNumber="2")
    assert parse(text).text == text


# --- multi-valued attributes -------------------------------------------------------------------

IMAGE_TYPES: list[object] = [
    ["ORIGINAL", "PRIMARY", "AXIAL"],
    ("ORIGINAL", "PRIMARY", "AXIAL"),
    "ORIGINAL\\PRIMARY\\AXIAL",
    MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]),
]


@pytest.mark.parametrize("image_type", IMAGE_TYPES, ids=["list", "tuple", "backslash", "multi"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('ImageType == "AXIAL"', True),
        ('ImageType == "PRIMARY"', True),
        ('ImageType == "LOCALIZER"', False),
        ('ImageType == "ORIGINAL\\\\PRIMARY\\\\AXIAL"', False),  # values are compared one by one
        ('ImageType != "AXIAL"', False),  # not (any value == "AXIAL")
        ('ImageType != "LOCALIZER"', True),
        ('ImageType in ["LOCALIZER", "AXIAL"]', True),
        ('ImageType not in ["LOCALIZER", "AXIAL"]', False),
        ('ImageType contains "PRIM"', True),
        ('ImageType startswith "AX"', True),
        ('ImageType matches "^ORIGINAL$"', True),
        ('ImageType matches "ORIGINAL.PRIMARY"', False),
        ('ImageType icontains "axi"', True),
        ('ImageType == ""', False),
    ],
)
def test_multi_valued_attributes_match_when_any_value_does(
    image_type: object, text: str, expected: bool
) -> None:
    assert holds(text, ImageType=image_type) is expected


def test_multi_valued_numbers_and_orderings() -> None:
    assert holds("PixelSpacing < 0.5", PixelSpacing=["0.7", "0.4"])
    assert not holds("PixelSpacing < 0.3", PixelSpacing=["0.7", "0.4"])
    assert holds("PixelSpacing == 0.7", PixelSpacing="0.700000\\0.4")


def test_text_attributes_keep_backslashes() -> None:
    # LT, ST, UT may hold a backslash as text: not split into values.
    assert holds('ImageComments == "a\\\\b"', ImageComments="a\\b")
    assert not holds('ImageComments == "a"', ImageComments="a\\b")
    # Connection facts are never split either.
    assert holds('CallingAE == "A\\\\B"', CallingAE="A\\B")
    # A DICOM string attribute is split.
    assert holds('Modality == "b"', Modality="a\\b")


# --- missing attributes ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [{}, {"BodyPartExamined": None}, {"BodyPartExamined": ""}])
def test_a_missing_attribute_is_the_empty_string(missing: dict[str, object]) -> None:
    facts: dict[str, object] = {"Modality": "CT", **missing}
    assert parse('BodyPartExamined == ""').evaluate(facts)
    assert not parse('BodyPartExamined == "HEAD"').evaluate(facts)
    assert parse('BodyPartExamined != "HEAD"').evaluate(facts)
    assert parse('BodyPartExamined contains ""').evaluate(facts)
    assert not parse('BodyPartExamined contains "H"').evaluate(facts)
    assert parse('BodyPartExamined not in ["HEAD"]').evaluate(facts)


@pytest.mark.parametrize("missing", [{}, {"SeriesNumber": None}, {"SeriesNumber": []}])
def test_a_missing_number_satisfies_no_numeric_comparison(missing: dict[str, object]) -> None:
    for text in ("SeriesNumber > 3", "SeriesNumber < 3", "SeriesNumber == 0", "SeriesNumber >= 0"):
        assert not parse(text).evaluate(missing), text
    assert parse("SeriesNumber != 3").evaluate(missing)


def test_an_empty_multi_value_is_missing() -> None:
    assert holds('ImageType == ""', ImageType=[])
    assert holds('ImageType == ""', ImageType=())


# --- numbers, strings and dates ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        ("SeriesNumber > 3", "12", True),  # numerically; as strings "12" < "3"
        ("SeriesNumber > 3", "2", False),
        ("SeriesNumber > 3", 12, True),
        ("SeriesNumber > 3", IS("12"), True),
        ("SeriesNumber > 3", " 12 ", True),
        ("SeriesNumber > 3", "abc", False),  # not a number: no ordering against a number
        ("SeriesNumber < 3", "abc", False),
        ("SeriesNumber == 3", "abc", False),
        ("SeriesNumber != 3", "abc", True),
        ("SeriesNumber == 3", "003", True),
        ("SeriesNumber == 3", "3.0", True),
        ("SeriesNumber == 3", 3.0, True),
        ("SeriesNumber == 3", "+3", True),
        ("SeriesNumber >= -1", "-1", True),
        ("SeriesNumber > -1", "-1", False),
        ("SeriesNumber < -1.5", "-2", True),
        ("SliceThickness == 5", DSfloat("5.000000"), True),
        ("SliceThickness <= 2.5", "2.5", True),
        ("SliceThickness < 2.5", "2.50", False),
        ("SliceThickness > 1000", "1e4", True),
        ("SliceThickness > 1000", "nan", False),
        ("SliceThickness > 1000", "inf", False),
        ('SeriesNumber > "3"', "12", False),  # a quoted literal compares as text
        ('SeriesNumber == "3"', "003", False),
        ('SeriesNumber == "003"', "003", True),
    ],
)
def test_numbers_compare_numerically_when_both_sides_are_numbers(
    text: str, value: object, expected: bool
) -> None:
    assert holds(text, SeriesNumber=value, SliceThickness=value) is expected


def test_number_literals_are_kept_as_written_and_valued() -> None:
    root = parse("SliceThickness >= -2.50").root
    assert isinstance(root, Compare)
    assert root.value.text == "-2.50" and root.value.number == -2.5
    root = parse("SeriesNumber == 7").root
    assert isinstance(root, Compare)
    assert root.value.number == 7 and isinstance(root.value.number, int)


def test_a_very_long_number_does_not_raise() -> None:
    digits = "9" * 5000
    assert holds(f"SeriesNumber > {digits[:20]}", SeriesNumber=digits)
    assert holds("SeriesNumber > 1", SeriesNumber=digits)
    assert not holds(f"SeriesNumber < {digits}", SeriesNumber="inf")


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        ("StudyDate >= 20260101", "20260315", True),
        ("StudyDate >= 20260101", "20260101", True),
        ("StudyDate >= 20260101", "20251231", False),
        ("StudyDate < 20260101", "20251231", True),
        ("StudyDate < 20260101", "", False),  # a missing date is not before anything
        ("StudyDate > 20260101", "", False),
        ("StudyDate == 20260101", "20260101", True),
        ("StudyDate != 20260101", "20260102", True),
        ("StudyDate in [20260101, 20260102]", "20260102", True),
        ('StudyDate >= "20260101"', "20260315", True),
        ("StudyTime >= 070000", "072730", True),  # TM: digits as text, leading zero kept
        ("StudyTime >= 070000", "065959.999", False),
        ("StudyTime < 1200", "113000", True),
        ("AcquisitionDateTime >= 20260101", "20260101083000.5+0100", True),
    ],
)
def test_dates_and_times_compare_as_digit_strings(text: str, value: str, expected: bool) -> None:
    assert holds(text, StudyDate=value, StudyTime=value, AcquisitionDateTime=value) is expected


def test_date_literals_keep_their_digits() -> None:
    root = parse("StudyDate == 20260101").root
    assert isinstance(root, Compare) and root.value.text == "20260101"
    root = parse("StudyTime == 000001").root
    assert isinstance(root, Compare) and root.value.text == "000001"
    assert holds("StudyTime == 000001", StudyTime="000001")
    assert not holds("StudyTime == 000001", StudyTime="1")


# --- connection facts --------------------------------------------------------------------------


def test_connection_facts() -> None:
    text = 'CallingAE startswith "CT" and CalledAE == "GATEWAY" and PeerAddress startswith "10."'
    expression = parse(text)
    assert expression.keywords == frozenset()
    facts = {"CallingAE": "CT1", "CalledAE": "GATEWAY", "PeerAddress": "10.0.0.21"}
    assert expression.evaluate(facts)
    assert not expression.evaluate({**facts, "PeerAddress": "192.168.1.2"})
    assert not expression.evaluate({})


# --- explain -----------------------------------------------------------------------------------


def test_explain_names_the_failed_operand_of_and() -> None:
    expression = parse('Modality == "CT" and (SeriesNumber > 3 or BodyPartExamined == "HEAD")')
    assert expression.explain({"Modality": "MR"}) == Explanation(False, 'Modality == "CT"')
    assert expression.explain({"Modality": "CT", "SeriesNumber": "1"}) == Explanation(
        False, 'SeriesNumber > 3 or BodyPartExamined == "HEAD"'
    )
    assert expression.explain({"Modality": "CT", "SeriesNumber": "5"}) == Explanation(True, None)


def test_explain_quotes_source_text_as_written() -> None:
    text = "Modality=='CT'   and  not   (StudyDescription   icontains 'x')"
    expression = parse(text)
    assert expression.explain({"Modality": "MR"}).failed == "Modality=='CT'"
    assert expression.explain({"Modality": "CT", "StudyDescription": "X"}).failed == (
        "not   (StudyDescription   icontains 'x')"
    )


def test_explain_of_or_not_and_single_conditions() -> None:
    assert parse('Modality == "CT" or Modality == "MR"').explain({"Modality": "PT"}) == (
        Explanation(False, 'Modality == "CT" or Modality == "MR"')
    )
    assert parse('not Modality == "CT"').explain({"Modality": "CT"}).failed == (
        'not Modality == "CT"'
    )
    assert parse('Modality != "CT"').explain({"Modality": "CT"}).failed == 'Modality != "CT"'
    assert parse('Modality in ["MR"]').explain({}).failed == 'Modality in ["MR"]'


def test_explain_agrees_with_evaluate() -> None:
    expression = parse(
        '(Modality == "CT" or not BodyPartExamined in ["HEAD"]) and SeriesNumber > 2 '
        'and not (StudyDescription contains "X" or Modality == "SR")'
    )
    for modality in ("CT", "MR", "SR", ""):
        for body in ("HEAD", "", "CHEST"):
            for number in ("1", "3", "x"):
                for description in ("X", "Y"):
                    facts = {
                        "Modality": modality,
                        "BodyPartExamined": body,
                        "SeriesNumber": number,
                        "StudyDescription": description,
                    }
                    explanation = expression.explain(facts)
                    assert explanation.matched is expression.evaluate(facts)
                    assert (explanation.failed is None) is explanation.matched
                    if explanation.failed is not None:
                        assert explanation.failed in expression.text


# --- syntax errors -----------------------------------------------------------------------------


def test_syntax_error_names_rule_and_column() -> None:
    error = syntax_error('Modality == "CT" and  SeriesNumber ==', "brain-ct")
    assert str(error) == "rule 'brain-ct': column 38: expected a value after '=='"
    assert (error.rule, error.column, error.message) == (
        "brain-ct",
        38,
        "expected a value after '=='",
    )
    assert isinstance(error, ConfigError)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert str(syntax_error("StudyDate >=", "brain-ct")).startswith("rule 'brain-ct': column 13:")


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("", 1, "the expression is empty"),
        ("   \n ", 1, "the expression is empty"),
        ("Modality ==", 12, "expected a value after '=='"),
        ("Modality == and SeriesNumber > 1", 13, "expected a value after '==', found 'and'"),
        ('Modality == "CT" and', 21, "expected a condition after 'and'"),
        ('Modality == "CT" or or', 21, "expected a condition after 'or', found 'or'"),
        ("not", 4, "expected a condition after 'not'"),
        ("()", 2, "expected a condition after '(', found ')'"),
        ("Modality", 9, "expected an operator after 'Modality'"),
        ("Modality 'CT'", 10, "expected an operator after 'Modality', found \"'CT'\""),
        # unbalanced parentheses
        ('(Modality == "CT"', 18, "expected ')' to close the '(' at column 1"),
        ('((Modality == "CT") or X1', 24, "unknown attribute 'X1'"),
        ('((Modality == "CT") or Rows > 1', 32, "expected ')' to close the '(' at column 1"),
        ('Modality == "CT")', 17, "unbalanced ')': no '(' to close"),
        ('(Modality == "CT"))', 19, "unbalanced ')': no '(' to close"),
        # trailing tokens
        (
            'Modality == "CT" foo',
            18,
            "expected 'and', 'or' or the end of the expression, found 'foo'",
        ),
        ('Modality == "CT" "MR"', 18, "found '\"MR\"'"),
        ('Modality == "CT" Rows == 1', 18, "found 'Rows'"),
        ('Modality == "CT" AND Rows == 1', 18, "words are lowercase ('and')"),
        # strings
        ('Modality == "CT', 13, 'unterminated string: the " here is never closed'),
        ("Modality == 'CT\\'", 13, "unterminated string: the ' here is never closed"),
        ('Modality == "CT\\', 13, "unterminated string"),
        ('Modality == "CT" and SeriesDescription == \'T1', 43, "unterminated string"),
        # identifiers
        ('Modalty == "CT"', 1, "unknown attribute 'Modalty': did you mean 'Modality'?"),
        (
            'modality == "CT"',
            1,
            "unknown attribute 'modality': keywords are case-sensitive, did you mean 'Modality'?",
        ),
        ('Modality == "CT" and Bogus == 1', 22, "unknown attribute 'Bogus'"),
        ("callingae == 'X'", 1, "did you mean 'CallingAE'?"),
        ('NOT Modality == "CT"', 1, "'NOT' is not an operator"),
        ('Modality CONTAINS "CT"', 10, "found 'CONTAINS': the language's words are lowercase"),
        ("PixelData == 1", 1, "PixelData holds binary data (OB or OW)"),
        ('OtherPatientIDsSequence == ""', 1, "holds a sequence (SQ)"),
        # regular expressions
        ('SeriesDescription matches "T1("', 27, 'invalid regular expression "T1(": missing )'),
        ('Modality == "CT" and X1 imatches "["', 22, "unknown attribute 'X1'"),
        ('Modality imatches "[a-"', 19, "invalid regular expression"),
        # what RE2 refuses because it would need backtracking: named in the error
        ('SeriesDescription matches "(a)\\1"', 27, "invalid escape sequence: \\1"),
        ('SeriesDescription matches "T1(?=AX)"', 27, "invalid perl operator: (?="),
        ('SeriesDescription imatches "(?<!X)T1"', 28, "invalid perl operator: (?<"),
        ("Modality matches 3", 18, "expected a quoted string after 'matches', found '3'"),
        # operands and operators
        ('"CT" == Modality', 1, "the left side of a comparison must be an attribute"),
        ("3 < SeriesNumber", 1, "the left side of a comparison must be an attribute"),
        ("Modality == SeriesDescription", 13, "must be a string or a number, not an attribute"),
        ('Modality = "CT"', 10, "unexpected character '=': compare with '=='"),
        ('Modality == "CT" && Rows == 1', 18, "unexpected character '&': combine"),
        ('!(Modality == "CT")', 1, "unexpected character '!'"),
        ("Modality == ~", 13, "unexpected character '~'"),
        ('Modality == ["CT"]', 13, "a list can only follow 'in'"),
        ('Modality not == "CT"', 14, "write 'not equal' as '!='"),
        ('Modality not "CT"', 14, "expected 'in' or a text operator such as 'contains'"),
        ("Modality contains 3", 19, "expected a quoted string after 'contains', found '3'"),
        ("Modality startswith Rows", 21, "expected a quoted string"),
        # lists
        ('Modality in "CT"', 13, "expected a list '[...]' after 'in', found '\"CT\"'"),
        ('Modality in ["CT" "MR"]', 19, "expected ',' or ']' after '\"CT\"', found '\"MR\"'"),
        ('Modality in ["CT",]', 19, "expected a string or a number after ','"),
        ('Modality in ["CT"', 18, "expected ',' or ']' after '\"CT\"'"),
        ("Modality in [Rows]", 14, "expected a string or a number after '[', found 'Rows'"),
        # numbers and dates
        ("SeriesNumber > 3x", 16, "malformed number '3x'"),
        ("SeriesNumber > 1.", 16, "malformed number '1.'"),
        ("SeriesNumber > 1e3", 16, "malformed number '1e3'"),
        ("SeriesNumber > - 1", 16, "unexpected character '-'"),
        ("StudyDate >= 2026-01-01", 14, "write dates as 8 digits, e.g. 20260101"),
        ("StudyDate >= 2026", 14, "StudyDate is a date: write it as 8 digits YYYYMMDD"),
        ("StudyDate >= 202601011", 14, "StudyDate is a date"),
        ("StudyDate in [20260101, 260101]", 25, "StudyDate is a date"),
        ("StudyTime >= -1", 14, "StudyTime is a TM value: write it as digits"),
    ],
)
def test_syntax_errors_name_the_column(text: str, column: int, message: str) -> None:
    error = syntax_error(text)
    assert error.column == column, str(error)
    assert message in error.message, str(error)


def test_syntax_error_columns_count_from_the_start_across_lines() -> None:
    error = syntax_error('Modality == "CT"\nand Bogus == 1')
    assert error.column == 22


def test_nesting_is_bounded() -> None:
    assert holds("(" * 64 + 'Modality == "CT"' + ")" * 64, Modality="CT")
    error = syntax_error("(" * 65 + 'Modality == "CT"' + ")" * 65)
    assert (error.column, error.message) == (65, "nested more than 64 deep")
    error = syntax_error("not " * 100 + 'Modality == "CT"')
    assert error.column == 257 and "nested" in error.message


def doc_table(heading: str) -> list[tuple[str, str]]:
    """The first two cells of each row of the first table after *heading* in docs/rules.md."""
    text = DOCS.read_text(encoding="utf-8").split(heading, 1)[1]
    rows = []
    for line in text.splitlines():
        if line.startswith("| `") or line.startswith("| *(empty)*"):
            first, second = (cell.strip() for cell in line.strip("|").split(" | ")[:2])
            rows.append(("" if first == "*(empty)*" else first[1:-1], second))
        elif rows and not line.startswith("|"):
            break
    return rows


def test_the_documented_errors_are_the_errors_given() -> None:
    rows = doc_table("## Errors")
    assert len(rows) >= 15
    for text, documented in rows:
        assert str(syntax_error(text, "brain-ct")) == f"rule 'brain-ct': {documented[1:-1]}"


def test_the_documented_multi_value_table_holds() -> None:
    rows = doc_table("### Multi-valued attributes")
    assert len(rows) == 7
    for text, documented in rows:
        image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert holds(text, ImageType=image_type) is documented.startswith("true"), text


# --- the expression object ---------------------------------------------------------------------


def test_expression_is_frozen_and_comparable() -> None:
    expression = parse(SPEC, "brain-ct")
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.text = "x"  # type: ignore[misc]
    assert expression == parse(SPEC, "brain-ct")
    assert isinstance(expression, Expression)
    assert hash(expression) == hash(parse(SPEC, "brain-ct"))


def test_keywords_lists_the_dicom_attributes_read() -> None:
    expression = parse(
        'not (ImageType == "LOCALIZER" or SeriesNumber in [99]) and CallingAE == "X" '
        'and StudyDate >= 20260101 and ImageType != "DERIVED"'
    )
    assert expression.keywords == frozenset({"ImageType", "SeriesNumber", "StudyDate"})


# --- facts from a real file --------------------------------------------------------------------


def test_facts_from_dataset_reads_a_real_file() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    keywords = [
        "ImageType",
        "Modality",
        "PatientName",
        "SeriesNumber",
        "StudyDate",
        "StudyTime",
        "BodyPartExamined",
        "SliceThickness",
        "PixelSpacing",
        "Rows",
        "ReferringPhysicianName",
        "OtherPatientIDsSequence",
        "CallingAE",
    ]
    connection = {"CallingAE": "CT1", "CalledAE": "GATEWAY", "PeerAddress": "10.0.0.21"}
    facts = facts_from_dataset(ds, keywords, connection)
    assert facts == {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "Modality": "CT",
        "PatientName": "CompressedSamples^CT1",
        "SeriesNumber": "1",
        "StudyDate": "20040119",
        "StudyTime": "072730",
        "BodyPartExamined": "",
        "SliceThickness": "5.000000",
        "PixelSpacing": ["0.661468", "0.661468"],
        "Rows": "128",
        "ReferringPhysicianName": "",
        "OtherPatientIDsSequence": "",
        "CallingAE": "CT1",
        "CalledAE": "GATEWAY",
        "PeerAddress": "10.0.0.21",
    }
    assert all(type(v) is str for v in facts.values() if not isinstance(v, list))


def test_a_rule_over_a_real_file() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    expression = parse(
        'Modality == "CT" and ImageType == "AXIAL" and not ImageType == "LOCALIZER" '
        "and SeriesNumber >= 1 and StudyDate < 20050101 and StudyTime >= 070000 "
        'and SliceThickness == 5 and Rows == 128 and PatientName icontains "ct1" '
        'and BodyPartExamined == "" and CallingAE in ["CT1", "CT2"]',
        "real",
    )
    facts = facts_from_dataset(ds, expression.keywords, {"CallingAE": "CT1"})
    assert set(facts) == expression.keywords | {"CallingAE"}
    assert expression.evaluate(facts)
    other = facts_from_dataset(ds, expression.keywords, {"CallingAE": "MR1"})
    assert expression.explain(other) == Explanation(False, 'CallingAE in ["CT1", "CT2"]')


def test_pydicom_values_work_without_conversion() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    facts = {keyword: ds.get(keyword) for keyword in ("ImageType", "PatientName", "SeriesNumber")}
    assert isinstance(facts["PatientName"], PersonName)
    assert isinstance(facts["ImageType"], MultiValue)
    assert parse('ImageType == "AXIAL" and PatientName startswith "Compressed"').evaluate(facts)
    assert parse("SeriesNumber == 1 and SeriesNumber < 2").evaluate(facts)
    assert parse('BodyPartExamined == ""').evaluate(
        {"BodyPartExamined": ds.get("BodyPartExamined")}
    )


# --- robustness --------------------------------------------------------------------------------

ODD_VALUES: list[object] = [
    None,
    "",
    " ",
    "CT",
    "ct",
    "12",
    "abc",
    "\\",
    "A\\B\\",
    "\x00",
    "9" * 5000,
    0,
    -3,
    2.5,
    float("nan"),
    float("inf"),
    True,
    b"\xff\x00CT",
    bytearray(b"12"),
    [],
    (),
    [None, "CT", ["x", [1, [2.0, [None, ["deep", [[[[[[[["deeper"]]]]]]]]]]]]]],
    {"a": 1},
    {1, 2},
    object(),
    PersonName("Doe^John"),
    MultiValue(str, ["A", "B"]),
    IS("7"),
    DSfloat("1.50"),
    "20260101",
    "Ünïcödé^名前",
]
ODD_EXPRESSIONS = [
    SPEC,
    'Modality == "CT" or SeriesNumber > 3 or SeriesNumber <= -1.5 or SeriesNumber != 0',
    "StudyDate >= 20260101 and StudyTime < 120000 or StudyDate in [20260101, 20260102]",
    'not ImageType in ["A", 1, -2.5] and ImageType not in []',
    'PatientName icontains "doe" or PatientName istartswith "x" or PatientName iequals "a^b"',
    'PatientName imatches "^(d|x)" or Modality matches "\\d+" or Modality startswith ""',
    'BodyPartExamined contains "" and not (CallingAE == "" or PeerAddress >= "10")',
    'SeriesNumber > "3" or SeriesNumber < 3 or ImageComments == "a\\\\b"',
]
KEYS = [
    "Modality",
    "SeriesNumber",
    "StudyDate",
    "StudyTime",
    "ImageType",
    "PatientName",
    "BodyPartExamined",
    "CallingAE",
    "PeerAddress",
    "StudyDescription",
    "ImageComments",
]


def test_evaluating_never_raises_on_odd_facts() -> None:
    rng = random.Random(20260101)
    expressions = [parse(text) for text in ODD_EXPRESSIONS]
    for value in ODD_VALUES:  # each odd value everywhere
        facts = dict.fromkeys(KEYS, value)
        for expression in expressions:
            result = expression.evaluate(facts)
            assert isinstance(result, bool)
            assert expression.explain(facts).matched is result
    for _ in range(2000):  # random mixtures
        facts = {key: rng.choice(ODD_VALUES) for key in KEYS if rng.random() < 0.8}
        expression = rng.choice(expressions)
        result = expression.evaluate(facts)
        explanation = expression.explain(facts)
        assert isinstance(result, bool)
        assert explanation.matched is result
        assert (explanation.failed is None) is result


def test_a_self_containing_list_does_not_recurse_forever() -> None:
    loop: list[object] = ["CT"]
    loop.append(loop)
    assert holds('Modality == "CT"', Modality=loop)
    assert not holds('Modality == "MR"', Modality=loop)


PIECES = [
    "Modality",
    "SeriesNumber",
    "StudyDate",
    "ImageType",
    "CallingAE",
    "Bogus",
    "modality",
    "PixelData",
    "and",
    "or",
    "not",
    "in",
    "contains",
    "startswith",
    "matches",
    "imatches",
    "iequals",
    "AND",
    "(",
    ")",
    "[",
    "]",
    ",",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "=",
    "!",
    '"CT"',
    "'a\\'b'",
    '"("',
    '"',
    "'",
    "\\",
    "12",
    "-3.5",
    "20260101",
    "2026-01-01",
    "-",
    ".",
    "1e3",
    " ",
    "\n",
    "é",
    "\x00",
]


ATTRIBUTES = ["Modality", "SeriesNumber", "StudyDate", "StudyTime", "ImageType", "CallingAE"]
LITERALS = ['"CT"', "'a\\'b'", '"20260101"', "12", "-3.5", "20260101", "070000", '""']
PATTERNS = ['"CT"', '"^[CM]"', "'x'", '""', '"("', '"\\d+"', '"a|"']
JOINERS = [" ", " ", " ", " ", "", "\n"]  # "" glues words into unknown names
TEXT_OPERATORS = ["contains", "startswith", "matches", "iequals", "icontains", "istartswith"]


def random_condition(rng: random.Random) -> list[str]:
    attribute = rng.choice(ATTRIBUTES)
    negation = rng.choice([[], [], ["not"]])
    kind = rng.random()
    if kind < 0.4:
        return [attribute, rng.choice(["==", "!=", "<", "<=", ">", ">="]), rng.choice(LITERALS)]
    if kind < 0.7:
        return [
            attribute,
            *negation,
            rng.choice([*TEXT_OPERATORS, "imatches"]),
            rng.choice(PATTERNS),
        ]
    items = ", ".join(rng.sample(LITERALS, rng.randint(0, 3)))
    return [attribute, *negation, "in", "[", items, "]"]


def random_expression(rng: random.Random, depth: int = 0) -> list[str]:
    choice = rng.random() if depth < 3 else 1.0
    if choice < 0.15:
        return ["(", *random_expression(rng, depth + 1), ")"]
    if choice < 0.25:
        return ["not", *random_expression(rng, depth + 1)]
    if choice < 0.5:
        left, right = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
        return [*left, rng.choice(["and", "or"]), *right]
    return random_condition(rng)


def mutated(rng: random.Random, pieces: list[str]) -> list[str]:
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        at = rng.randrange(len(pieces) + 1)
        action = rng.choice(["insert", "delete", "replace"])
        if action == "insert" or not pieces:
            pieces.insert(at, rng.choice(PIECES))
        elif action == "delete":
            del pieces[min(at, len(pieces) - 1)]
        else:
            pieces[min(at, len(pieces) - 1)] = rng.choice(PIECES)
    return pieces


def check_parse(text: str, rng: random.Random) -> bool:
    """Parse *text*: an expression that evaluates to a bool, or a RuleSyntaxError in range."""
    try:
        expression = parse(text, "fuzz")
    except RuleSyntaxError as error:
        assert 1 <= error.column <= len(text) + 1, (text, str(error))
        assert str(error).startswith(f"rule 'fuzz': column {error.column}: ")
        return False
    facts = {key: rng.choice(ODD_VALUES) for key in KEYS}
    result = expression.evaluate(facts)
    assert isinstance(result, bool)
    assert expression.explain(facts).matched is result
    return True


def test_parsing_near_valid_text_raises_only_rule_syntax_errors() -> None:
    rng = random.Random(7)
    parsed = sum(
        check_parse(rng.choice(JOINERS).join(mutated(rng, random_expression(rng))), rng)
        for _ in range(1500)
    )
    assert 300 < parsed < 1450  # both paths are exercised


def test_parsing_token_soup_raises_only_rule_syntax_errors() -> None:
    rng = random.Random(11)
    for _ in range(1000):
        count = rng.randint(0, 12)
        text = rng.choice([" ", ""]).join(rng.choice(PIECES) for _ in range(count))
        check_parse(text, rng)


def test_a_pathological_regex_runs_in_linear_time() -> None:
    """``(a*)*b``-style patterns backtrack exponentially in Python's `re`; RE2 answers at once.
    A generous bound: Python's engine takes minutes on this input."""
    import time

    expression = parse('SeriesDescription matches "^(a|aa)*(a|aa)*(a|aa)*c$"')
    started = time.perf_counter()
    assert not expression.evaluate({"SeriesDescription": "a" * 64})
    assert time.perf_counter() - started < 0.5
