"""A series' facts for the rules, read from its first instance: the one reader of them.

The rules of a series are evaluated once, on its first instance: the DICOM attributes the rules
read (`RuleSet.keywords`) and the connection facts (CallingAE, CalledAE, PeerAddress) of how it
arrived. Three callers read them here: the completion engine (`gateway.rules.runtime`), the
`rules.test` control method (a stored study, `gateway.control.methods`) and `gateway rules test`
(files on disk, `gateway.cli.rules`). Each decides what a file that cannot be read means to it:
these functions raise what `pydicom.dcmread` raises.

The first instance of a series is the one with the lowest InstanceNumber, an instance without
one coming after those with one; series are listed by SeriesNumber, those without last. The
store orders its rows the same way in SQL (`instance_number IS NULL, instance_number`);
`first_instance_key` and `series_number_key` are that order for datasets read from files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.rules.expr import facts_from_dataset

__all__ = [
    "ORDER_KEYWORDS",
    "connection_facts",
    "first_instance_key",
    "read_facts",
    "read_header",
    "series_number_key",
]

ORDER_KEYWORDS: Final = frozenset({"InstanceNumber", "SeriesNumber"})
"""What `first_instance_key` and `series_number_key` read: add them to `read_header`'s keywords."""


def read_header(path: str | os.PathLike[str], keywords: Iterable[str]) -> Dataset:
    """The header of the DICOM Part 10 file at *path*, without its pixel data, holding only the
    elements of *keywords* (DICOM keywords, no connection facts) and SpecificCharacterSet (to
    decode text). Raises what `pydicom.dcmread` raises for a missing or non-DICOM file."""
    tags = sorted(set(keywords) | {"SpecificCharacterSet"})
    return dcmread(path, stop_before_pixels=True, specific_tags=tags)


def read_facts(
    path: str | os.PathLike[str], keywords: Iterable[str], connection: Mapping[str, str]
) -> dict[str, object]:
    """The facts the rules read from the instance at *path*: the elements of *keywords* (pass
    `RuleSet.keywords`) as `facts_from_dataset` gives them, plus the *connection* facts (see
    `connection_facts`). Raises as `read_header` does."""
    keywords = frozenset(keywords)
    return facts_from_dataset(read_header(path, keywords), keywords, connection)


def connection_facts(
    calling_ae: str | None, called_ae: str | None, peer_address: str | None
) -> dict[str, str]:
    """The connection facts of an instance: CallingAE, CalledAE and PeerAddress, each left out
    when it is None (not known, e.g. an instance imported from a folder)."""
    return {
        fact: value
        for fact, value in (
            ("CallingAE", calling_ae),
            ("CalledAE", called_ae),
            ("PeerAddress", peer_address),
        )
        if value is not None
    }


def first_instance_key(ds: Dataset, path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """Sort key of an instance within its series, the lowest first: (0 with an InstanceNumber
    else 1, the InstanceNumber, the path). *ds* must hold InstanceNumber if the file has it."""
    try:
        return (0, int(ds.get("InstanceNumber")), str(path))
    except (TypeError, ValueError, OverflowError):
        return (1, 0, str(path))


def series_number_key(ds: Dataset) -> float:
    """Sort key of a series by one of its instances: its SeriesNumber, infinity without one."""
    try:
        return float(int(ds.get("SeriesNumber")))
    except (TypeError, ValueError, OverflowError):
        return float("inf")
