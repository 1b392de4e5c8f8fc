"""Patterns that come from users, matched in time linear in the text: RE2.

A rule's `matches` / `imatches` regular expression comes from `config.toml`, and a C-FIND,
worklist or `studies list` wildcard value (``*``, ``?``, PS3.4 C.2.2.2.4) from whoever reaches
the port. Python's `re` backtracks: ``.*a.*a.*a.*ab`` against a 64-character name takes minutes
of CPU under the GIL. RE2 (google-re2) runs in time linear in the text whatever the pattern, and
refuses the constructs that would need backtracking (backreferences, lookaround), so a pattern
it takes cannot stall the node. Both kinds of pattern are compiled here and nowhere else.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import re2

__all__ = ["Pattern", "PatternError", "compile_regex", "compile_wildcard"]

Pattern = Any  # re2's compiled pattern: .search(text), .fullmatch(text)


class PatternError(ValueError):
    """RE2 cannot take the pattern; the message is RE2's reason (``missing ): T1(``)."""


def _options(*, ignore_case: bool) -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason goes into PatternError, not to stderr
    options.case_sensitive = not ignore_case
    options.dot_nl = True
    return options


def compile_regex(pattern: str, *, ignore_case: bool = False) -> Pattern:
    """A regular expression in RE2 syntax (https://github.com/google/re2/wiki/Syntax), `.`
    matching newlines too; *ignore_case* folds case (Unicode simple folding).

    Raises
    ------
    PatternError
        A syntax RE2 does not accept: backreferences (``\\1``), lookahead or lookbehind
        (``(?=``, ``(?<=``), possessive quantifiers, or a malformed expression.
    """
    try:
        return re2.compile(pattern, _options(ignore_case=ignore_case))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(str(reason)) from None


@lru_cache(maxsize=256)
def compile_wildcard(value: str) -> Pattern:
    """A DICOM wildcard value as a pattern for `fullmatch`: ``*`` any run of characters (none
    included), ``?`` exactly one, everything else literal (PS3.4 C.2.2.2.4)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re2.escape(c) for c in value)
    return compile_regex(regex)
