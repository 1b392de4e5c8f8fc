"""The one reader of a series' facts (`gateway.rules.facts`), shared by the completion engine,
the `rules.test` method and `gateway rules test`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.rules.engine import RuleSet
from gateway.rules.expr import facts_from_dataset
from gateway.rules.facts import (
    ORDER_KEYWORDS,
    connection_facts,
    first_instance_key,
    read_facts,
    read_header,
    series_number_key,
)
from gateway.rules.model import RuleSettings
from tests.conftest import TEST_FILES, write_variant

CT = TEST_FILES / "CT_small.dcm"


def ruleset(*matches: str) -> RuleSet:
    return RuleSet(
        RuleSettings(name=f"r{i}", match=m, targets=["pacs"]) for i, m in enumerate(matches)
    )


def test_read_facts_is_the_header_of_the_keywords_and_the_connection() -> None:
    rules = ruleset('PatientName == "CompressedSamples^CT1" and CallingAE == "CT1"')
    connection = connection_facts("CT1", "GATEWAY", None)
    assert connection == {"CallingAE": "CT1", "CalledAE": "GATEWAY"}
    facts = read_facts(CT, rules.keywords, connection)
    # The same facts as from the whole dataset: only the pixels and unread elements differ.
    assert facts == facts_from_dataset(dcmread(CT), rules.keywords, connection)
    assert facts["Modality"] == "CT"
    assert "PeerAddress" not in facts
    assert rules.evaluate(facts).names == ("r0",)
    header = read_header(CT, rules.keywords)
    assert "PixelData" not in header and "InstanceNumber" not in header
    assert "SpecificCharacterSet" in header


def test_read_facts_raises_for_what_is_not_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM\n")
    with pytest.raises(InvalidDicomError):
        read_facts(text, ruleset('Modality == "CT"').keywords, {})
    with pytest.raises(FileNotFoundError):
        read_facts(tmp_path / "missing.dcm", frozenset({"Modality"}), {})


def test_first_instance_and_series_order(tmp_path: Path) -> None:
    numbered = write_variant(CT, tmp_path / "b.dcm", InstanceNumber=2, SeriesNumber=7)
    unnumbered = write_variant(CT, tmp_path / "a.dcm", InstanceNumber=None, SeriesNumber=None)
    first = read_header(numbered, ORDER_KEYWORDS)
    last = read_header(unnumbered, ORDER_KEYWORDS)
    assert first_instance_key(first, numbered) == (0, 2, str(numbered))
    assert first_instance_key(last, unnumbered) == (1, 0, str(unnumbered))
    assert first_instance_key(first, numbered) < first_instance_key(last, unnumbered)
    assert series_number_key(first) == 7.0
    assert series_number_key(last) == float("inf")
