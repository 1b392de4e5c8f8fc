"""Person-name normalisation: the one definition PN matching and the index's name keys share.

C-FIND matches PatientName case-insensitively against the whole stored name or any one of its
``=``-separated component groups (`gateway.store.query`). The index keeps, per patient, the
candidates such a match can hit, normalised exactly as the matcher normalises them (the table
`patient_name_keys`, filled by triggers through the SQL function `gateway_pn_keys`), so an exact
or prefix query reads an index range instead of calling the matcher on every patient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["KeyRange", "key_range", "pn_groups", "pn_keys", "pn_keys_json"]

_WILDCARDS = ("*", "?")
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def pn_groups(name: str) -> list[str]:
    """Lower-cased component groups without trailing empty components or groups.

    ``"Doe^John^^=ド^ジョン"`` -> ``["doe^john", "ド^ジョン"]``; trailing ``^`` and blanks of each
    group are dropped, and so are trailing empty groups.
    """
    groups = [group.strip().rstrip("^").rstrip() for group in name.lower().split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return groups


def pn_keys(name: str | None) -> list[str]:
    """The distinct non-empty match candidates of a stored name: the whole normalised name (its
    groups joined by ``=``) and each group. An absent name has none."""
    if not name:
        return []
    groups = pn_groups(name)
    return [key for key in dict.fromkeys(["=".join(groups), *groups]) if key]


def pn_keys_json(name: object) -> str:
    """`pn_keys` as a JSON array: the SQL function `gateway_pn_keys` the index triggers call."""
    return json.dumps(pn_keys(name) if isinstance(name, str) else [], ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The name keys a PN query value can only match among: *low* exactly when *exact*, else
    ``low <= key < high`` (no upper bound when *high* is None)."""

    low: str
    high: str | None = None
    exact: bool = False


def key_range(query: str) -> KeyRange | None:
    """The range of name keys a PN query value can only match inside, or None (no bound).

    ``DOE^JOHN`` fixes one key exactly; ``doe*`` a prefix (``"doe" <= key < "dof"``); ``*JOHN``
    nothing, so the caller scans. Every query group that a matching name must match fully is
    matched by one of that name's keys (its whole name or one of its groups), so any group with a
    literal start bounds the match; the matcher itself stays the final check.
    """
    for group in pn_groups(query):
        if not group.strip("*"):
            continue  # an empty or all-`*` group matches anything
        cut = min((group.index(w) for w in _WILDCARDS if w in group), default=len(group))
        if cut == len(group):
            return KeyRange(group, exact=True)
        if cut:
            return KeyRange(group[:cut], _successor(group[:cut]))
    return None


def _successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with *prefix* (code point order,
    which is SQLite's BINARY order of UTF-8 text), or None when there is none."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code in _SURROGATES:
            code = _SURROGATES.stop  # not encodable: the next scalar value
        if code <= _MAX_CODE_POINT:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None
