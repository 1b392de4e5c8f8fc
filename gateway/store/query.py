"""Query/Retrieve over the index: C-FIND matching and the instance selection of C-MOVE / C-GET.

This module owns the translation of a Query/Retrieve identifier into SQL over the index tables
(aliases ``p`` patients, ``st`` studies, ``s`` series, ``i`` instances) and the building of C-FIND
response identifiers from the rows. It implements the matching of PS3.4 C.2.2.2 for the keys the
index holds:

- universal matching (an empty value, or a value of only ``*``);
- single value matching, case-sensitive except for PN, which is case-insensitive (as Orthanc's
  default) and matches the whole stored name or any of its ``=``-separated component groups;
- wildcard matching with ``*`` and ``?`` (SQLite GLOB; PN through a Python function);
- range matching for DA and TM (``A-B``, ``A-``, ``-B``; times compare on the leading digits);
- list matching: a multi-valued key (UID lists, ``CT\\MR``) matches any of its values.

Keys of levels below the QueryRetrieveLevel, and keys the index does not hold, are not matched and
are returned empty. Hierarchy checks are lenient (a Study Root SERIES query without a
StudyInstanceUID is answered, as Orthanc does): only identifiers that cannot be answered are
refused with `QueryError`. Every value reaches SQLite as a bound parameter.

A response carries every key of the request, the QueryRetrieveLevel, the unique keys of its level
and of the levels above, and SpecificCharacterSet ``ISO_IR 192``: values come from the index as
decoded text. PN matching uses an SQL function, `gateway_pn_match`, that `find` registers on the
store's read connection; for PatientName a value with a literal start (``DOE^JOHN``, ``doe*``)
first selects its candidates through the index of name keys (`gateway.store.names`), so the
function runs on those only. ModalitiesInStudy and the NumberOf*Related* keys are computed in SQL.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.errors import GatewayError
from gateway.patterns import Pattern, compile_wildcard
from gateway.store.names import key_range, pn_groups
from gateway.store.store import Store

__all__ = [
    "FindStream",
    "QueryError",
    "QueryModel",
    "find",
    "match_term",
    "prepare_connection",
    "retrieve_filter",
    "stream_capped",
]

QueryModel = Literal["patient", "study"]
_Kind = Literal["text", "pn", "uid", "date", "time", "int", "count", "modalities"]

_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_PATIENT, _STUDY, _SERIES, _IMAGE = range(4)
_RESPONSE_CHARSET = "ISO_IR 192"
_PN_FUNCTION = "gateway_pn_match"


class QueryError(GatewayError):
    """A Query/Retrieve identifier that cannot be answered; the message says why. *status* is
    the DIMSE status it is refused with: 0xC000 (Unable to process, PS3.4 C.4.1.1.4)."""

    status = 0xC000


@dataclass(frozen=True, slots=True)
class _Key:
    """One key the index can match and return."""

    keyword: str
    tag: int
    vr: str
    level: int
    kind: _Kind
    column: str  # the SQL expression of its value, over p, st, s, i


def _keys(level: int, *specs: tuple[str, _Kind, str]) -> list[_Key]:
    keys = []
    for keyword, kind, column in specs:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        keys.append(_Key(keyword, tag, dictionary_VR(tag), level, kind, column))
    return keys


_KEY_LIST = [
    *_keys(
        _PATIENT,
        ("PatientID", "text", "p.patient_id"),
        ("IssuerOfPatientID", "text", "p.issuer_of_patient_id"),
        ("PatientName", "pn", "p.patient_name"),
        ("PatientBirthDate", "date", "p.patient_birth_date"),
        ("PatientSex", "text", "p.patient_sex"),
        ("NumberOfPatientRelatedStudies", "count",
         "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk)"),
        ("NumberOfPatientRelatedSeries", "count",
         "(SELECT count(*) FROM series x JOIN studies y ON x.study_pk = y.pk"
         " WHERE y.patient_pk = p.pk)"),
        ("NumberOfPatientRelatedInstances", "count",
         "(SELECT count(*) FROM instances x JOIN series y ON x.series_pk = y.pk"
         " JOIN studies z ON y.study_pk = z.pk WHERE z.patient_pk = p.pk)"),
    ),
    *_keys(
        _STUDY,
        ("StudyInstanceUID", "uid", "st.study_uid"),
        ("StudyDate", "date", "st.study_date"),
        ("StudyTime", "time", "st.study_time"),
        ("AccessionNumber", "text", "st.accession_number"),
        ("StudyID", "text", "st.study_id"),
        ("StudyDescription", "text", "st.study_description"),
        ("ReferringPhysicianName", "pn", "st.referring_physician_name"),
        ("ModalitiesInStudy", "modalities",
         "(SELECT group_concat(DISTINCT x.modality) FROM series x WHERE x.study_pk = st.pk)"),
        ("NumberOfStudyRelatedSeries", "count",
         "(SELECT count(*) FROM series x WHERE x.study_pk = st.pk)"),
        ("NumberOfStudyRelatedInstances", "count",
         "(SELECT count(*) FROM instances x JOIN series y ON x.series_pk = y.pk"
         " WHERE y.study_pk = st.pk)"),
    ),
    *_keys(
        _SERIES,
        ("SeriesInstanceUID", "uid", "s.series_uid"),
        ("Modality", "text", "s.modality"),
        ("SeriesNumber", "int", "s.series_number"),
        ("SeriesDescription", "text", "s.series_description"),
        ("BodyPartExamined", "text", "s.body_part_examined"),
        ("SeriesDate", "date", "s.series_date"),
        ("SeriesTime", "time", "s.series_time"),
        ("NumberOfSeriesRelatedInstances", "count",
         "(SELECT count(*) FROM instances x WHERE x.series_pk = s.pk)"),
    ),
    *_keys(
        _IMAGE,
        ("SOPInstanceUID", "uid", "i.sop_uid"),
        ("SOPClassUID", "uid", "i.sop_class_uid"),
        ("InstanceNumber", "int", "i.instance_number"),
    ),
]  # fmt: skip
_KEYS = {key.tag: key for key in _KEY_LIST}
_BY_KEYWORD = {key.keyword: key for key in _KEY_LIST}

_FROM = (
    "patients p",
    "studies st JOIN patients p ON st.patient_pk = p.pk",
    "series s JOIN studies st ON s.study_pk = st.pk JOIN patients p ON st.patient_pk = p.pk",
    "instances i JOIN series s ON i.series_pk = s.pk JOIN studies st ON s.study_pk = st.pk"
    " JOIN patients p ON st.patient_pk = p.pk",
)
_PK = ("p.pk", "st.pk", "s.pk", "i.pk")
_UNIQUE = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_LEVEL_TAG = 0x00080052
_CHARSET_TAG = 0x00080005


@dataclass(frozen=True, slots=True)
class _Query:
    """A C-FIND identifier compiled to SQL, with what each response carries."""

    level: str
    sql: str
    params: tuple[object, ...]
    returned: tuple[_Key, ...]  # the selected columns, in order
    empty: tuple[DataElement, ...]  # requested keys the index does not answer at this level


# -- public API ---------------------------------------------------------------------------------


async def find(
    store: Store, model: QueryModel, identifier: Dataset, *, limit: int | None = None
) -> list[Dataset]:
    """C-FIND: one response identifier per match.

    Raises
    ------
    QueryError
        The identifier cannot be answered (no or unknown QueryRetrieveLevel, a PATIENT level
        query in the Study Root model, a malformed range or number).
    StoreError
        The index could not be read.
    """
    query = _compile(model, identifier, limit)
    return await store.read(lambda conn: _run(conn, query))


class FindStream:
    """A C-FIND's answers read from the index as they are sent (`stream_capped`): iterate it in
    the answering thread; `truncated` is set once the iteration found more than the cap."""

    def __init__(
        self, store: Store, query: _Query, cap: int | None, cancelled: Callable[[], bool]
    ) -> None:
        self._store, self._query, self._cap, self._cancelled = store, query, cap, cancelled
        self.truncated = False

    def __iter__(self) -> Iterator[Dataset]:
        rows = self._store.stream(lambda conn: _rows(conn, self._query), cancelled=self._cancelled)
        with contextlib.closing(rows):
            for count, match in enumerate(rows, start=1):
                if self._cap is not None and count > self._cap:
                    self.truncated = True
                    return
                yield match


def stream_capped(
    store: Store,
    model: QueryModel,
    identifier: Dataset,
    cap: int,
    *,
    cancelled: Callable[[], bool] = lambda: False,
) -> FindStream:
    """`find_capped` for an association's thread: the identifier is compiled now (raising
    `QueryError` as `find` does), and the answers are read from a query connection of the
    store (`Store.stream`) as the caller iterates, so a long answer is never held whole and a
    C-CANCEL (*cancelled*) stops the statement. The iteration raises `StoreError`."""
    capped = cap > 0 and not _names_a_unique_key(model, identifier)
    query = _compile(model, identifier, cap + 1 if capped else None)
    return FindStream(store, query, cap if capped else None, cancelled)


def retrieve_filter(model: QueryModel, identifier: Dataset) -> tuple[str, list[object]]:
    """C-MOVE / C-GET: a WHERE clause over p, st, s, i selecting the instances the identifier names
    (unique keys at and above the QueryRetrieveLevel, UID lists allowed), for Store.instance_files.

    The unique key of the QueryRetrieveLevel itself is required; those of the levels above narrow
    the selection when present. In the Study Root model a PatientID is not a unique key and is
    ignored.
    """
    rank = _level(model, identifier)
    clauses: list[str] = []
    params: list[object] = []
    for level in range(_PATIENT if model == "patient" else _STUDY, rank + 1):
        key = _BY_KEYWORD[_UNIQUE[level]]
        elem = identifier.get(key.tag)
        values = [] if elem is None else _values(elem)
        if not values:
            if level == rank:
                raise QueryError(
                    f"{key.keyword} is missing: a {_LEVELS[rank]} level retrieve needs it"
                )
            continue
        clauses.append(f"{key.column} IN ({', '.join('?' * len(values))})")
        params.extend(values)
    return " AND ".join(clauses), params


# -- identifier checks ---------------------------------------------------------------------------


def _level(model: QueryModel, identifier: Dataset) -> int:
    """The rank of the identifier's QueryRetrieveLevel, checked against *model*."""
    if model not in ("patient", "study"):
        raise ValueError(f"unknown query model {model!r}")
    elem = identifier.get(_LEVEL_TAG)
    value = "" if elem is None or elem.value is None else str(elem.value).strip().upper()
    if not value:
        raise QueryError("QueryRetrieveLevel is missing")
    if value not in _LEVELS:
        raise QueryError(f"QueryRetrieveLevel {value[:64]!r} is not one of {', '.join(_LEVELS)}")
    if value == "PATIENT" and model == "study":
        raise QueryError("PATIENT level is not in the Study Root model")
    return _LEVELS.index(value)


def _names_a_unique_key(model: QueryModel, identifier: Dataset) -> bool:
    """True if a unique key of the query's level or above has values without wildcards."""
    rank = _level(model, identifier)
    for keyword in _UNIQUE[_PATIENT if model == "patient" else _STUDY : rank + 1]:
        elem = identifier.get(_BY_KEYWORD[keyword].tag)
        values = None if elem is None else _match_values(elem)
        if values and not any(_has_wildcard(value) for value in values):
            return True
    return False


def _values(elem: DataElement) -> list[str]:
    """The non-empty values of a key, stripped; several for a multi-valued key."""
    value = elem.value
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [
        (item.decode("latin-1") if isinstance(item, bytes) else str(item)).strip()
        for item in items
        if item is not None
    ]
    return list(dict.fromkeys(text for text in texts if text))


def _match_values(elem: DataElement) -> list[str] | None:
    """The values to match, or None for universal matching."""
    values = _values(elem)
    if not values or any(not value.strip("*") for value in values):
        return None
    return values


# -- SQL ---------------------------------------------------------------------------------------


def _compile(model: QueryModel, identifier: Dataset, limit: int | None) -> _Query:
    rank = _level(model, identifier)
    first = _PATIENT if model == "patient" else _STUDY
    returned = {tag: _KEYS[tag] for tag in (_BY_KEYWORD[k].tag for k in _UNIQUE[first : rank + 1])}
    empty: list[DataElement] = []
    where: list[str] = []
    params: list[object] = []
    for elem in identifier:
        tag = int(elem.tag)
        if tag in (_LEVEL_TAG, _CHARSET_TAG) or elem.tag.element == 0 or elem.tag.group <= 2:
            continue
        key = _KEYS.get(tag)
        if key is None or key.level > rank:
            empty.append(elem)
            continue
        returned.setdefault(tag, key)
        values = _match_values(elem)
        condition = None if values is None else _condition(key, values)
        if condition is not None:
            where.append(condition[0])
            params.extend(condition[1])
    keys = tuple(returned.values())
    sql = (
        f"SELECT {', '.join(key.column for key in keys)} FROM {_FROM[rank]}"
        f" WHERE {' AND '.join(where) or '1'} ORDER BY {_PK[rank]}"
    )
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return _Query(_LEVELS[rank], sql, tuple(params), keys, tuple(empty))


def _condition(key: _Key, values: Sequence[str]) -> tuple[str, list[object]] | None:
    """The WHERE term matching *key* against any of *values*, or None if it is not matched."""
    if key.kind == "count":
        return None  # return keys only (PS3.4 C.6.1.1.5 and C.6.2.1.2)
    if key.kind == "modalities":
        inner, params = _any_of("text", "x.modality", values, key.keyword)
        return f"EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND {inner})", params
    if key.keyword == "PatientName":
        return _patient_name(values)
    return _any_of(key.kind, key.column, values, key.keyword)


def _patient_name(values: Sequence[str]) -> tuple[str, list[object]]:
    """PatientName against any of *values*: `gateway_pn_match` decides, and a value that fixes a
    key or a key prefix (`names.key_range`) first narrows the patients through the index of
    `patient_name_keys`, so the function runs on the candidates only. A value with no literal
    prefix (``*JOHN``) calls it on every patient."""
    terms: list[str] = []
    params: list[object] = []
    for value in values:
        match = f"{_PN_FUNCTION}(p.patient_name, ?)"
        bounds = key_range(value)
        if bounds is None:
            terms.append(match)
            params.append(value)
            continue
        if bounds.exact:
            keys, key_params = "key = ?", [bounds.low]
        elif bounds.high is None:
            keys, key_params = "key >= ?", [bounds.low]
        else:
            keys, key_params = "key >= ? AND key < ?", [bounds.low, bounds.high]
        terms.append(
            f"(p.pk IN (SELECT patient_pk FROM patient_name_keys WHERE {keys}) AND {match})"
        )
        params.extend(key_params)
        params.append(value)
    return f"({' OR '.join(terms)})", params


def match_term(
    kind: Literal["text", "pn", "uid", "date", "time"],
    column: str,
    values: Sequence[str],
    keyword: str,
) -> tuple[str, list[object]]:
    """The WHERE term matching *column* against any of *values* with this module's rules
    (single value, wildcard, range, list; PN case-insensitive), for other tables (the worklist).
    Run it on a connection given to `prepare_connection`."""
    return _any_of(kind, column, values, keyword)


def prepare_connection(conn: sqlite3.Connection) -> None:
    """Register the SQL function PN matching uses (idempotent)."""
    conn.create_function(_PN_FUNCTION, 2, _pn_match, deterministic=True)


def _any_of(
    kind: _Kind, column: str, values: Sequence[str], keyword: str
) -> tuple[str, list[object]]:
    exact = kind == "uid" or (kind == "text" and not any(_has_wildcard(value) for value in values))
    if exact:
        if len(values) == 1:
            return f"{column} = ?", [values[0]]
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)
    terms: list[str] = []
    params: list[object] = []
    for value in values:
        term, term_params = _one(kind, column, value, keyword)
        terms.append(term)
        params.extend(term_params)
    return f"({' OR '.join(terms)})", params


def _one(kind: _Kind, column: str, value: str, keyword: str) -> tuple[str, list[object]]:
    """The WHERE term matching one value (single value, wildcard or range matching)."""
    if kind == "pn":
        return f"{_PN_FUNCTION}({column}, ?)", [value]
    if kind in ("date", "time") and "-" in value:
        return _range(kind, column, value, keyword)
    if _has_wildcard(value):
        target = f"CAST({column} AS TEXT)" if kind == "int" else column
        return f"{target} GLOB ?", [_glob(value)]
    if kind == "int":
        try:
            return f"{column} = ?", [int(value)]
        except ValueError:
            raise QueryError(f"{keyword} {value[:64]!r} is not an integer") from None
    if kind == "time":
        return _range(kind, column, f"{value}-{value}", keyword)  # the period it denotes
    return f"{column} = ?", [value]


def _range(kind: _Kind, column: str, value: str, keyword: str) -> tuple[str, list[object]]:
    """Range matching: ``A-B``, ``A-`` or ``-B``.

    Dates compare as strings. Times compare on their leading digits, so a value matches when the
    period it denotes overlaps the range: ``1200`` (12:00 to 12:00:59) matches ``120030-`` and
    ``-115959.5`` does not match ``120000``.
    """
    if value.count("-") != 1:
        raise QueryError(f"{keyword} {value[:64]!r} is not a valid range")
    low, high = (part.strip() for part in value.split("-"))
    if kind == "time":
        column = f"replace({column}, ':', '')"
        low, high = low.replace(":", ""), high.replace(":", "")
    terms: list[str] = []
    params: list[object] = []
    if low and kind == "time":
        terms.append(f"({column} >= ? OR substr(?, 1, length({column})) = {column})")
        params.extend((low, low))
    elif low:
        terms.append(f"{column} >= ?")
        params.append(low)
    if high and kind == "date" and len(high) >= 8:
        terms.append(f"{column} <= ?")  # a plain comparison keeps the date index usable
        params.append(high)
    elif high:
        terms.append(f"substr({column}, 1, ?) <= ?")
        params.extend((len(high), high))
    if not terms:
        return "1", []  # "-": every value
    return f"({' AND '.join(terms)})", params


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _glob(value: str) -> str:
    """A DICOM wildcard value as a GLOB pattern: `*` and `?` stay, `[` and `]` are literal."""
    return "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in value)


# -- person names --------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _pn_query(query: str) -> tuple[Pattern | None, ...]:
    """One pattern per query component group (RE2: linear in the name whatever the wildcards);
    None where the group is empty (any value)."""
    return tuple(
        compile_wildcard(group) if group.strip("*") else None for group in pn_groups(query)
    )


def _pn_match(stored: object, query: object) -> int:
    """SQL function: 1 if the stored name matches the query value, case-insensitively.

    A query of one component group matches the whole name or any one of its groups (so
    ``Yamada^Tarou`` and ``山田^太郎`` both match ``Yamada^Tarou=山田^太郎=やまだ^たろう``); a query
    with several groups matches group by group, an empty query group matching anything.
    """
    if not isinstance(stored, str) or not isinstance(query, str):
        return 0
    patterns = _pn_query(query)
    groups = pn_groups(stored)
    if len(patterns) == 1 and patterns[0] is not None:
        pattern = patterns[0]
        candidates = ["=".join(groups), *groups]
        return int(any(pattern.fullmatch(candidate) for candidate in candidates))
    for index, group_pattern in enumerate(patterns):
        group = groups[index] if index < len(groups) else ""
        if group_pattern is not None and not group_pattern.fullmatch(group):
            return 0
    return 1


# -- responses -----------------------------------------------------------------------------------


def _run(conn: sqlite3.Connection, query: _Query) -> list[Dataset]:
    """Execute *query* on a read connection; one response identifier per row."""
    return list(_rows(conn, query))


def _rows(conn: sqlite3.Connection, query: _Query) -> Iterator[Dataset]:
    """Execute *query*; build each response identifier as its row is read, 64 rows at a time."""
    prepare_connection(conn)
    cursor = conn.execute(query.sql, query.params)
    try:
        while batch := cursor.fetchmany(64):
            for row in batch:
                yield _response(query, row)
    finally:
        cursor.close()


def _response(query: _Query, row: Sequence[object]) -> Dataset:
    ds = Dataset()
    ds.add(DataElement(_CHARSET_TAG, "CS", _RESPONSE_CHARSET))
    ds.add(DataElement(_LEVEL_TAG, "CS", query.level))
    for key, value in zip(query.returned, row, strict=True):
        ds.add(DataElement(key.tag, key.vr, _value(key, value), validation_mode=config.IGNORE))
    for elem in query.empty:
        empty: object = [] if elem.VR == "SQ" else None
        ds.add(DataElement(elem.tag, elem.VR, empty, validation_mode=config.IGNORE))
    return ds


def _value(key: _Key, value: object) -> object:
    """An index value as the element value of *key*."""
    if value is None or value == "":
        return None
    if key.kind in ("int", "count"):
        return int(str(value))
    if key.kind == "modalities":
        modalities = sorted(set(str(value).split(",")))
        return modalities[0] if len(modalities) == 1 else modalities
    return str(value)
