"""The rule expression language: tokenizer, parser, evaluator and dry-run explanations.

A rule's `match` is text such as ``Modality == "CT" and StudyDescription contains "BRAIN"``.
`parse` turns it into an `Expression`, a tree of frozen nodes, or raises `RuleSyntaxError` naming
the rule and the 1-based column of the problem. `Expression.evaluate` walks the tree over a
mapping of facts (DICOM keywords and connection facts to their values); `Expression.explain`
also says which sub-expression made it false. The text is never handed to Python: the tokenizer
and the recursive-descent parser below are the whole language. docs/rules.md is its reference.

`parse_required_series` reads a study-level rule's `required_series`, a smaller language over the
same tokens: quoted series descriptions combined with ``and``, ``or``, ``not`` and parentheses.
"""

from __future__ import annotations

import difflib
import functools
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.errors import ConfigError
from gateway.patterns import Pattern, PatternError, compile_regex

__all__ = [
    "CONNECTION_FACTS",
    "And",
    "Attribute",
    "Compare",
    "Explanation",
    "Expression",
    "Facts",
    "In",
    "Node",
    "Not",
    "Or",
    "RuleSyntaxError",
    "Value",
    "facts_from_dataset",
    "parse",
    "parse_required_series",
]

Facts: TypeAlias = Mapping[str, object]
"""Keyword to value: str, int, float, None, or a list or tuple of those (multi-valued)."""

CONNECTION_FACTS: Final = frozenset({"CallingAE", "CalledAE", "PeerAddress"})

_COMPARISONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">="})
_ORDERINGS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_TEXT_OPERATORS: Final = frozenset(
    {"contains", "startswith", "matches", "iequals", "icontains", "istartswith", "imatches"}
)
_RESERVED: Final = frozenset({"and", "or", "not", "in"}) | _TEXT_OPERATORS
_TEMPORAL_VRS: Final = frozenset({"DA", "DT", "TM"})
_UNSPLIT_VRS: Final = frozenset({"LT", "ST", "UT", "UR"})  # may hold a backslash as text
_UNCOMPARABLE_VRS: Final = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "NONE"})
_MAX_DEPTH: Final = 8  # nested lists in a fact deeper than this are ignored
_MAX_NESTING: Final = 64  # parentheses and `not` in an expression
_SUGGEST_CUTOFF: Final = 0.8  # how close an unknown name must be to a keyword to suggest it

_WORD_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RUN_RE: Final = re.compile(r"-?[0-9][0-9A-Za-z_.:+\-]*")
_NUMBER_RE: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_ISO_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_RE: Final = re.compile(r"[0-9]{8}")
_TIME_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_VALUE_NUMBER_RE: Final = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_INTEGER_RE: Final = re.compile(r"\s*[+-]?[0-9]+\s*")
_ESCAPED: Final = frozenset({"'", '"', "\\"})
_CHAR_HINTS: Final = {
    "=": "compare with '=='",
    "!": "negate with 'not', or compare with '!='",
    "&": "combine conditions with 'and'",
    "|": "combine conditions with 'or'",
}


class RuleSyntaxError(ConfigError):
    """A rule's expression cannot be parsed; names the rule and the 1-based column."""

    def __init__(self, rule: str, column: int, message: str) -> None:
        super().__init__(rule, column, message)
        self.rule = rule
        self.column = column
        self.message = message

    def __str__(self) -> str:
        return f"rule {self.rule!r}: column {self.column}: {self.message}"


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attribute:
    """An operand read from the facts: a DICOM keyword or a connection fact (`vr` empty)."""

    keyword: str
    vr: str

    @property
    def temporal(self) -> bool:
        """DA, DT or TM: a number literal compares as its digits, as text."""
        return self.vr in _TEMPORAL_VRS

    def values(self, facts: Facts) -> tuple[str, ...]:
        """The attribute's values as text; a missing or empty attribute is one empty string."""
        texts: list[str] = []
        split = bool(self.vr) and self.vr not in _UNSPLIT_VRS
        _flatten(facts.get(self.keyword), split, texts, 0)
        return tuple(texts) or ("",)


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: the string's content, or a number as written with its numeric value."""

    text: str
    number: int | float | None = None


def _flatten(raw: object, split: bool, out: list[str], depth: int) -> None:
    if raw is None:
        text = ""
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, bytes | bytearray):
        text = bytes(raw).decode("latin-1")
    elif isinstance(raw, Sequence):
        if depth < _MAX_DEPTH:
            for item in raw:
                _flatten(item, split, out, depth + 1)
        return
    else:
        text = str(raw)
    parts = text.split("\\") if split else [text]
    out.extend(part.rstrip(" \x00") for part in parts)


def _to_number(text: str) -> int | float:
    try:
        return int(text) if _INTEGER_RE.fullmatch(text) else float(text)
    except ValueError:  # an integer of more digits than int() converts
        return float(text)


def _as_number(text: str) -> int | float | None:
    """The number a value spells (IS, DS, plain digits), or None when it spells none."""
    return _to_number(text) if _VALUE_NUMBER_RE.fullmatch(text) else None


def _equals(attribute: Attribute, value: Value, text: str) -> bool:
    if value.number is None or attribute.temporal:
        return text == value.text
    number = _as_number(text)
    return number is not None and number == value.number


def _ordered(op: str, attribute: Attribute, value: Value, text: str) -> bool:
    compare = _ORDERINGS[op]
    if value.number is None:
        return compare(text, value.text)
    if attribute.temporal:
        return bool(text) and compare(text, value.text)
    number = _as_number(text)
    return number is not None and compare(number, value.number)


# --- nodes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare:
    """``attribute OP value``: true when any of the attribute's values satisfies OP.

    `op` is positive (``==``, ``<``, ``contains``, ``imatches``...); ``!=`` and ``not OP`` are
    stored as `negated`, so ``A != x`` is exactly ``not (A == x)``.
    """

    source: str
    attribute: Attribute
    op: str
    value: Value
    negated: bool = False
    pattern: Pattern | None = None

    def holds(self, facts: Facts) -> bool:
        return any(self._test(text) for text in self.attribute.values(facts)) != self.negated

    def failure(self, facts: Facts) -> str | None:
        return None if self.holds(facts) else self.source

    def _test(self, text: str) -> bool:
        op, literal = self.op, self.value.text
        if op == "==":
            return _equals(self.attribute, self.value, text)
        if op in _ORDERINGS:
            return _ordered(op, self.attribute, self.value, text)
        if op == "contains":
            return literal in text
        if op == "startswith":
            return text.startswith(literal)
        if op == "iequals":
            return text.casefold() == literal.casefold()
        if op == "icontains":
            return literal.casefold() in text.casefold()
        if op == "istartswith":
            return text.casefold().startswith(literal.casefold())
        assert self.pattern is not None  # matches, imatches
        return self.pattern.search(text) is not None


@dataclass(frozen=True, slots=True)
class In:
    """``attribute in [v, ...]``: true when any value equals (``==``) any listed literal."""

    source: str
    attribute: Attribute
    values: tuple[Value, ...]
    negated: bool = False

    def holds(self, facts: Facts) -> bool:
        found = any(
            _equals(self.attribute, value, text)
            for text in self.attribute.values(facts)
            for value in self.values
        )
        return found != self.negated

    def failure(self, facts: Facts) -> str | None:
        return None if self.holds(facts) else self.source


@dataclass(frozen=True, slots=True)
class Not:
    """``not operand``."""

    source: str
    operand: Node

    def holds(self, facts: Facts) -> bool:
        return not self.operand.holds(facts)

    def failure(self, facts: Facts) -> str | None:
        return None if self.holds(facts) else self.source


@dataclass(frozen=True, slots=True)
class And:
    """``a and b and ...``: false at the first false operand, which is what `explain` quotes."""

    source: str
    operands: tuple[Node, ...]

    def holds(self, facts: Facts) -> bool:
        return all(operand.holds(facts) for operand in self.operands)

    def failure(self, facts: Facts) -> str | None:
        for operand in self.operands:
            failed = operand.failure(facts)
            if failed is not None:
                return failed
        return None


@dataclass(frozen=True, slots=True)
class Or:
    """``a or b or ...``: when every operand is false, the whole disjunction is the failure."""

    source: str
    operands: tuple[Node, ...]

    def holds(self, facts: Facts) -> bool:
        return any(operand.holds(facts) for operand in self.operands)

    def failure(self, facts: Facts) -> str | None:
        return None if self.holds(facts) else self.source


Node: TypeAlias = Or | And | Not | Compare | In


@dataclass(frozen=True, slots=True)
class Explanation:
    """A dry run's verdict: `failed` quotes the smallest sub-expression that made it false."""

    matched: bool
    failed: str | None


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed rule expression: its text, its tree and the DICOM keywords it reads."""

    text: str
    root: Node
    keywords: frozenset[str]
    rule: str = "<expression>"

    def evaluate(self, facts: Facts) -> bool:
        """True when the facts satisfy the expression; never raises on odd fact values."""
        return self.root.holds(facts)

    def explain(self, facts: Facts) -> Explanation:
        """Evaluate, and quote the sub-expression that made the result false.

        For ``a and b`` with b false that is b's text; for ``a or b`` with both false it is
        the whole ``a or b``; for ``not a`` with a true it is ``not a``.
        """
        failed = self.root.failure(facts)
        return Explanation(matched=failed is None, failed=failed)


# --- tokenizer ---------------------------------------------------------------------------------

_Kind = Literal["word", "string", "number", "op", "punct", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # as written (a string with its quotes)
    value: str  # a string's content after escapes; otherwise the text
    start: int  # 0-based offsets into the expression
    end: int

    @property
    def column(self) -> int:
        return self.start + 1

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the expression"
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f'"{text}"' if "'" in text else f"'{text}'"


def _tokenize(text: str, rule: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        if char in "'\"":
            token = _string(text, pos, rule)
        elif number := _NUMBER_RUN_RE.match(text, pos):
            token = _number(number.group(), pos, rule)
        elif word := _WORD_RE.match(text, pos):
            token = _Token("word", word.group(), word.group(), pos, word.end())
        elif text[pos : pos + 2] in _COMPARISONS:
            token = _Token("op", text[pos : pos + 2], text[pos : pos + 2], pos, pos + 2)
        elif char in _COMPARISONS:
            token = _Token("op", char, char, pos, pos + 1)
        elif char in "()[],":
            token = _Token("punct", char, char, pos, pos + 1)
        else:
            hint = _CHAR_HINTS.get(char)
            message = f"unexpected character {char!r}" + (f": {hint}" if hint else "")
            raise RuleSyntaxError(rule, pos + 1, message)
        tokens.append(token)
        pos = token.end
    tokens.append(_Token("end", "", "", len(text), len(text)))
    return tokens


def _string(text: str, start: int, rule: str) -> _Token:
    """A quoted string; ``\\'``, ``\\"`` and ``\\\\`` are escapes, other backslashes stay."""
    quote, pos, out = text[start], start + 1, []
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            follower = text[pos + 1]
            out.append(follower if follower in _ESCAPED else char + follower)
            pos += 2
        elif char == quote:
            return _Token("string", text[start : pos + 1], "".join(out), start, pos + 1)
        else:
            out.append(char)
            pos += 1
    raise RuleSyntaxError(rule, start + 1, f"unterminated string: the {quote} here is never closed")


def _number(run: str, start: int, rule: str) -> _Token:
    if not _NUMBER_RE.fullmatch(run):
        message = f"malformed number '{run}'"
        if _ISO_DATE_RE.fullmatch(run):
            message += ": write dates as 8 digits, e.g. " + run.replace("-", "")
        raise RuleSyntaxError(rule, start + 1, message)
    return _Token("number", run, run, start, start + len(run))


# --- parser ------------------------------------------------------------------------------------


@functools.cache
def _keywords_by_lowercase() -> dict[str, str]:
    names = [*keyword_dict, *CONNECTION_FACTS]
    return {name.lower(): name for name in names}


@functools.lru_cache(maxsize=256)
def _unknown_attribute(name: str) -> str:
    if name.lower() in _RESERVED:
        return f"'{name}' is not an operator: the language's words are lowercase ('{name.lower()}')"
    message = f"unknown attribute '{name}'"
    same = _keywords_by_lowercase().get(name.lower())
    if same is not None:
        return f"{message}: keywords are case-sensitive, did you mean '{same}'?"
    # Only names of similar length can reach the cutoff: a ratio is at most 2*shorter/(sum).
    size = len(name)
    candidates = [
        known
        for known in _keywords_by_lowercase().values()
        if 2 * min(size, len(known)) >= _SUGGEST_CUTOFF * (size + len(known))
    ]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=_SUGGEST_CUTOFF)
    if close:
        return f"{message}: did you mean '{close[0]}'?"
    return f"{message}: not a DICOM keyword nor CallingAE, CalledAE or PeerAddress"


class _Parser:
    """Recursive descent over the tokens; one method per grammar rule of docs/rules.md."""

    def __init__(self, text: str, rule: str) -> None:
        self.text = text
        self.rule = rule
        self.tokens = _tokenize(text, rule)
        self.pos = 0
        self.keywords: set[str] = set()
        self.depth = 0

    # helpers

    def nest(self) -> None:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise self.error(self.tokens[self.pos - 1], f"nested more than {_MAX_NESTING} deep")

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def at(self, *words: str) -> bool:
        token = self.peek()
        return token.kind in ("word", "punct") and token.text in words

    def source(self, start: int) -> str:
        return self.text[start : self.tokens[self.pos - 1].end]

    def error(self, token: _Token, message: str) -> RuleSyntaxError:
        return RuleSyntaxError(self.rule, token.column, message)

    def expected(self, what: str, *, after: bool = True) -> RuleSyntaxError:
        found = self.peek()
        message = f"expected {what}"
        if after and self.pos > 0:
            message += f" after '{self.tokens[self.pos - 1].text}'"
        if found.kind != "end":
            message += f", found {found.describe()}"
        return self.error(found, message)

    # grammar

    def expression(self) -> Node:
        if self.peek().kind == "end":
            raise RuleSyntaxError(self.rule, 1, "the expression is empty")
        node = self.or_expr()
        token = self.peek()
        if token.kind != "end":
            message = f"expected 'and', 'or' or the end of the expression, found {token.describe()}"
            if token.kind == "word" and token.text.lower() in _RESERVED:
                message += f": the language's words are lowercase ('{token.text.lower()}')"
            elif token.text == ")":
                message = "unbalanced ')': no '(' to close"
            raise self.error(token, message)
        return node

    def or_expr(self) -> Node:
        start = self.peek().start
        operands = [self.and_expr()]
        while self.at("or"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(self.source(start), tuple(operands))

    def and_expr(self) -> Node:
        start = self.peek().start
        operands = [self.not_expr()]
        while self.at("and"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(self.source(start), tuple(operands))

    def not_expr(self) -> Node:
        if self.at("not"):
            start = self.advance().start
            self.nest()
            operand = self.not_expr()
            self.depth -= 1
            return Not(self.source(start), operand)
        return self.primary()

    def primary(self) -> Node:
        token = self.peek()
        if self.at("("):
            self.advance()
            self.nest()
            node = self.or_expr()
            self.depth -= 1
            if not self.at(")"):
                raise self.expected(f"')' to close the '(' at column {token.column}", after=False)
            self.advance()
            return node
        if token.kind == "word" and token.text not in _RESERVED:
            return self.condition()
        if token.kind in ("string", "number"):
            raise self.error(token, "the left side of a comparison must be an attribute")
        raise self.expected("a condition")

    def condition(self) -> Node:
        start = self.peek().start
        attribute = self.attribute(self.advance())
        negated = self.at("not")
        if negated:
            self.advance()
            if self.peek().text == "==":
                raise self.error(self.peek(), "write 'not equal' as '!='")
            if not self.at("in", *_TEXT_OPERATORS):
                raise self.expected("'in' or a text operator such as 'contains'")
        token = self.peek()
        if token.kind == "op" and not negated:
            self.advance()
            value = self.value(attribute)
            op, negated = ("==", True) if token.text == "!=" else (token.text, False)
            return Compare(self.source(start), attribute, op, value, negated)
        if token.kind == "word" and token.text in _TEXT_OPERATORS:
            self.advance()
            literal = self.peek()
            if literal.kind != "string":
                raise self.expected("a quoted string")
            self.advance()
            value = Value(literal.value)
            pattern = self.pattern(literal, token.text) if "matches" in token.text else None
            return Compare(self.source(start), attribute, token.text, value, negated, pattern)
        if self.at("in"):
            self.advance()
            values = self.list(attribute)
            return In(self.source(start), attribute, values, negated)
        message = f"expected an operator after '{attribute.keyword}'"
        if token.kind != "end":
            message += f", found {token.describe()}"
            if token.kind == "word" and token.text.lower() in _RESERVED:
                message += f": the language's words are lowercase ('{token.text.lower()}')"
        raise self.error(token, message)

    def attribute(self, token: _Token) -> Attribute:
        name = token.text
        if name in CONNECTION_FACTS:
            return Attribute(name, "")
        tag = tag_for_keyword(name)
        if tag is None:
            raise self.error(token, _unknown_attribute(name))
        vr = dictionary_VR(tag)
        if any(part in _UNCOMPARABLE_VRS for part in vr.split(" or ")):
            what = "a sequence" if vr == "SQ" else "binary data"
            message = f"{name} holds {what} ({vr}); rules compare text and number attributes"
            raise self.error(token, message)
        self.keywords.add(name)
        return Attribute(name, vr)

    def value(self, attribute: Attribute) -> Value:
        token = self.peek()
        if token.kind == "string":
            self.advance()
            return Value(token.value)
        if token.kind == "number":
            self.advance()
            return self.number(token, attribute)
        if self.at("["):
            raise self.error(token, "a list can only follow 'in'")
        if token.kind == "word" and token.text not in _RESERVED:
            message = (
                "the right side of a comparison must be a string or a number, not an attribute"
            )
            raise self.error(token, message)
        raise self.expected("a value")

    def number(self, token: _Token, attribute: Attribute) -> Value:
        text = token.text
        if attribute.vr == "DA" and not _DATE_RE.fullmatch(text):
            message = f"{attribute.keyword} is a date: write it as 8 digits YYYYMMDD, e.g. 20260101"
            raise self.error(token, message)
        if attribute.vr in ("DT", "TM") and not _TIME_RE.fullmatch(text):
            message = f"{attribute.keyword} is a {attribute.vr} value: write it as digits"
            raise self.error(token, message)
        return Value(text, _to_number(text))

    def list(self, attribute: Attribute) -> tuple[Value, ...]:
        if not self.at("["):
            raise self.expected("a list '[...]'")
        self.advance()
        values: list[Value] = []
        if self.at("]"):
            self.advance()
            return ()
        while True:
            token = self.peek()
            if token.kind not in ("string", "number"):
                raise self.expected("a string or a number")
            values.append(self.value(attribute))
            if self.at("]"):
                self.advance()
                return tuple(values)
            if not self.at(","):
                raise self.expected("',' or ']'")
            self.advance()

    def pattern(self, token: _Token, op: str) -> Pattern:
        try:
            return compile_regex(token.value, ignore_case=op == "imatches")
        except PatternError as exc:
            raise self.error(token, f"invalid regular expression {token.text}: {exc}") from None


def parse(text: str, rule: str = "<expression>") -> Expression:
    """Parse a rule expression; *rule* names it in errors.

    Raises
    ------
    RuleSyntaxError
        The text is not an expression of the language: the error names the rule and the
        1-based column, e.g. ``rule 'brain-ct': column 23: expected a value after '=='``.
    """
    parser = _Parser(text, rule)
    root = parser.expression()
    return Expression(text=text, root=root, keywords=frozenset(parser.keywords), rule=rule)


# --- required series ---------------------------------------------------------------------------

_SERIES_DESCRIPTIONS: Final = Attribute("SeriesDescription", "")  # never split: whole descriptions


class _RequiredSeriesParser(_Parser):
    """`required_series`: the grammar of `parse` with a quoted description as its only condition.

    A literal becomes ``SeriesDescription contains "literal"`` over the study's descriptions given
    as one multi-valued fact, so it holds when any series' description contains it.
    """

    def primary(self) -> Node:
        token = self.peek()
        if self.at("("):
            return super().primary()  # the parenthesised or_expr comes back here
        if token.kind == "string":
            self.advance()
            if not token.value:
                raise self.error(token, "an empty string is part of every series description")
            return Compare(token.text, _SERIES_DESCRIPTIONS, "contains", Value(token.value))
        if token.kind == "word" and token.text not in _RESERVED:
            following = self.tokens[self.pos + 1]
            if following.kind == "op" or following.text in _RESERVED - {"and", "or"}:
                hint = 'list quoted series descriptions, not conditions, e.g. "T1" and "T2"'
            else:
                hint = f'write it in quotes, e.g. "{token.text}"'
            raise self.error(
                token, f"expected a quoted series description, found {token.describe()}: {hint}"
            )
        raise self.expected("a quoted series description")


def parse_required_series(text: str, rule: str = "<required_series>") -> Expression:
    """Parse a `required_series` expression such as ``"T1" and ("T2" or "FLAIR")``.

    The result is an `Expression` over the one fact ``SeriesDescription``: give it the
    descriptions of a study's series as a list, ``{"SeriesDescription": [...]}``. A literal holds
    when some description contains it (case-sensitive substring).

    Raises
    ------
    RuleSyntaxError
        As `parse` does, naming the rule and the 1-based column.
    """
    parser = _RequiredSeriesParser(text, rule)
    root = parser.expression()
    return Expression(text=text, root=root, keywords=frozenset({"SeriesDescription"}), rule=rule)


# --- facts -------------------------------------------------------------------------------------


def _fact(value: object) -> object:
    """One element's value as a fact: text, or a list of texts when multi-valued."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return [_fact(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1").rstrip(" \x00")
    return str(value)


def facts_from_dataset(
    ds: Dataset, keywords: Iterable[str], connection: Mapping[str, str]
) -> dict[str, object]:
    """The facts an expression reads from *ds*, plus the *connection* facts.

    A missing attribute, or a keyword not in the DICOM dictionary, is ``""``; a multi-valued one
    a list of strings; person names and numbers (IS, DS, US...) their text, which the evaluator
    parses when compared with a number. A sequence is ``""``, binary data its latin-1 text.
    *connection* maps CallingAE, CalledAE and PeerAddress to their values.
    """
    facts: dict[str, object] = {}
    for keyword in keywords:
        if keyword in CONNECTION_FACTS:
            continue
        tag = tag_for_keyword(keyword)
        element = ds[tag] if tag is not None and tag in ds else None
        if element is None or element.VR == "SQ":
            facts[keyword] = ""
        else:
            facts[keyword] = _fact(element.value)
    facts.update(connection)
    return facts
