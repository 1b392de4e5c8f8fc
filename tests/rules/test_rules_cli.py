"""Rule dry runs: `gateway rules test PATH` on files, `rules.test` and `rules test-study` on a
stored study of a running gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.control.client import ControlClient
from gateway.errors import ControlError
from tests.conftest import HOST, TEST_FILES, dcmtk_env, require, write_config, write_variant

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"
PLAN = TEST_FILES / "rtplan.dcm"
CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
MR_SERIES = "1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457"
PLAN_STUDY = "1.22.333.4.555555.6.7777777777777777777777777777"
PLAN_SERIES = "1.2.333.444.55.6.7777.8888"

PEERS = [{"name": "pacs", "ae_title": "PACS", "host": HOST, "port": 104}]
FOLDERS = [{"name": "archive", "path": "archive"}]
RULES = [
    {"name": "drop-plans", "match": 'Modality == "RTPLAN"', "action": "discard"},
    {"name": "ct", "match": 'Modality == "CT"', "targets": ["pacs"]},
    {"name": "mr", "match": 'Modality == "MR"', "targets": ["archive"]},
    {"name": "ct1", "match": 'CallingAE == "CT1"', "targets": ["pacs"]},
    {"name": "old", "match": 'Modality == "CT"', "targets": ["pacs"], "enabled": False},
    {"name": "rest", "match": 'Modality != ""', "targets": ["archive"], "fallback": True},
]


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "config.toml", {"peers": PEERS, "folders": FOLDERS, "rules": RULES}
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """CT_small (and a second instance of its series), MR_small, rtplan and a text file."""
    root = tmp_path / "incoming"
    (root / "mr" / "deeper").mkdir(parents=True)
    shutil.copy(CT, root / "z_ct.dcm")
    # Same series, a higher InstanceNumber and a path sorted first: CT_small stays the first.
    write_variant(
        CT,
        root / "a_ct_second.dcm",
        SOPInstanceUID="1.2.826.0.1.3680043.2.1143.4242.2",
        InstanceNumber=2,
        SeriesDescription="SECOND",
    )
    shutil.copy(MR, root / "mr" / "deeper" / "MR_small.dcm")
    shutil.copy(PLAN, root / "plan")
    (root / "notes.txt").write_text("not DICOM\n")
    return root


def blocks(stdout: str) -> list[str]:
    return stdout.rstrip("\n").split("\n\n")


def test_rules_test_folder(config: Path, folder: Path) -> None:
    result = gateway_cli("rules", "test", str(folder), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    plan, ct, mr, summary = blocks(result.stdout)
    assert plan == (
        f"series {PLAN_SERIES}\n"
        f"  study        {PLAN_STUDY}\n"
        "  description  (none)\n"
        "  modality     RTPLAN\n"
        "  instances    1\n"
        f"  first file   {folder / 'plan'}\n"
        "  rules\n"
        "    drop-plans  FIRES (discard)\n"
        "    ct          skipped (a discard rule fired before it)\n"
        "    mr          skipped (a discard rule fired before it)\n"
        "    ct1         skipped (a discard rule fired before it)\n"
        "    old         disabled\n"
        "    rest        skipped (a discard rule fired before it)"
    )
    assert ct == (
        f"series {CT_SERIES}\n"
        f"  study        {CT_STUDY}\n"
        "  description  (none)\n"
        "  modality     CT\n"
        "  instances    2\n"
        f"  first file   {folder / 'z_ct.dcm'}\n"
        "  rules\n"
        '    drop-plans  no (failed: Modality == "RTPLAN")\n'
        "    ct          FIRES (route to pacs)\n"
        '    mr          no (failed: Modality == "MR")\n'
        '    ct1         no (failed: CallingAE == "CT1")\n'
        "    old         disabled\n"
        "    rest        fallback not needed"
    )
    assert mr.startswith(f"series {MR_SERIES}\n  study        {MR_STUDY}\n")
    assert "    mr          FIRES (route to archive)\n" in mr
    assert summary == (
        "5 files: 4 DICOM instances in 3 series, 1 skipped"
        " (not DICOM, or without a SeriesInstanceUID)"
    )


def test_rules_test_json_and_connection_facts(config: Path, folder: Path) -> None:
    result = gateway_cli(
        "rules",
        "test",
        str(folder),
        "--config",
        str(config),
        "--json",
        "--calling-ae",
        "CT1",
        "--called-ae",
        "GATEWAY",
        "--peer-address",
        "10.0.0.21",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["path"], report["files"], report["skipped"]) == (str(folder), 5, 1)
    assert [s["series_uid"] for s in report["series"]] == [PLAN_SERIES, CT_SERIES, MR_SERIES]
    plan, ct, mr = report["series"]
    assert {k: v for k, v in ct.items() if k != "rules"} == {
        "study_uid": CT_STUDY,
        "series_uid": CT_SERIES,
        "series_description": None,
        "modality": "CT",
        "instances": 2,
        "file": str(folder / "z_ct.dcm"),
    }
    assert [(r["name"], r["outcome"], r["failed"]) for r in ct["rules"]] == [
        ("drop-plans", "not_fired", 'Modality == "RTPLAN"'),
        ("ct", "fired", None),
        ("mr", "not_fired", 'Modality == "MR"'),
        ("ct1", "fired", None),  # --calling-ae CT1
        ("old", "disabled", None),
        ("rest", "fallback_not_needed", None),
    ]
    assert ct["rules"][1] == {
        "name": "ct",
        "outcome": "fired",
        "failed": None,
        "action": "route",
        "targets": ["pacs"],
        "required_series": None,
    }
    assert [r["outcome"] for r in plan["rules"]] == [
        "fired",
        "skipped",
        "skipped",
        "skipped",
        "disabled",
        "skipped",
    ]
    assert [r["name"] for r in mr["rules"] if r["outcome"] == "fired"] == ["mr", "ct1"]


def test_rules_test_one_file_and_study_rules(tmp_path: Path) -> None:
    rules = [
        {
            "name": "mr",
            "match": 'Modality == "MR"',
            "level": "study",
            "targets": ["pacs"],
            "required_series": '"T1" or "FLAIR"',
            "force_seconds": 600,
        },
        {
            "name": "any",
            "match": 'Modality == "MR"',
            "level": "study",
            "targets": ["pacs"],
            "required_series": 'not "SCOUT"',
        },
        {"name": "from", "match": 'PeerAddress startswith "10."', "targets": ["pacs"]},
    ]
    config = write_config(tmp_path / "config.toml", {"peers": PEERS, "rules": rules})
    result = gateway_cli("rules", "test", str(MR), "--config", str(config))
    assert result.returncode == 0, result.stderr
    block, summary = blocks(result.stdout)
    assert block.endswith(
        "  rules\n"
        '    mr    FIRES (route to pacs; required_series not met: "T1" or "FLAIR")\n'
        "    any   FIRES (route to pacs; required_series met)\n"
        '    from  no (failed: PeerAddress startswith "10.")'
    )
    assert summary.startswith("1 file: 1 DICOM instance in 1 series, 0 skipped")
    fired = gateway_cli(
        "rules", "test", str(MR), "--config", str(config), "--peer-address", "10.1.2.3", "--json"
    )
    report = json.loads(fired.stdout)
    assert [r["outcome"] for r in report["series"][0]["rules"]] == ["fired", "fired", "fired"]
    assert report["series"][0]["rules"][0]["required_series"] == {
        "met": False,
        "failed": '"T1" or "FLAIR"',
    }


def test_rules_test_without_rules_and_without_dicom(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"node": {"ae_title": "X"}})
    result = gateway_cli("rules", "test", str(CT), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "  rules\n    (no rules configured)\n" in result.stdout
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    result = gateway_cli("rules", "test", str(text), "--config", str(config))
    assert (result.returncode, result.stdout) == (
        0,
        "1 file: 0 DICOM instances in 0 series, 1 skipped"
        " (not DICOM, or without a SeriesInstanceUID)\n",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    result = gateway_cli("rules", "test", str(empty), "--config", str(config), "--json")
    assert json.loads(result.stdout) == {"path": str(empty), "files": 0, "skipped": 0, "series": []}


def test_rules_test_failures(tmp_path: Path, config: Path) -> None:
    missing = gateway_cli("rules", "test", str(tmp_path / "nowhere"), "--config", str(config))
    assert missing.returncode == 1
    assert missing.stderr == (
        f"gateway: cannot read {tmp_path / 'nowhere'}: No such file or directory\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "ct"\nmatch = \'Modality == "CT" or\'\naction = "discard"\n')
    refused = gateway_cli("rules", "test", str(CT), "--config", str(bad))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr == (
        f"gateway: {bad}: rules.0.match: rule 'ct': column 20: expected a condition after 'or'\n"
    )
    usage = gateway_cli("rules", "test", "--config", str(config))
    assert usage.returncode == 2


# -- on a stored study -------------------------------------------------------------------------

STUDY_RULES = [
    {"name": "from-ct1", "match": 'CallingAE == "CT1"', "targets": ["pacs"]},
    {
        "name": "ct-elsewhere",
        "match": 'Modality == "CT" and CallingAE != "CT1"',
        "targets": ["pacs"],
    },
    {
        "name": "to-gateway",
        "match": 'CalledAE == "GATEWAY" and PeerAddress == "127.0.0.1"',
        "targets": ["archive"],
    },
    {
        "name": "ct-study",
        "match": 'Modality == "CT"',
        "level": "study",
        "targets": ["pacs"],
        "required_series": '"AXIAL"',
    },
    {"name": "off", "match": 'Modality == "CT"', "targets": ["pacs"], "enabled": False},
    {"name": "rest", "match": 'Modality != ""', "targets": ["archive"], "fallback": True},
]


def storescu(port: int, calling_ae: str, *files: Path) -> None:
    result = subprocess.run(
        [
            require("storescu"),
            "-aet",
            calling_ae,
            "-aec",
            "GATEWAY",
            HOST,
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
    )
    assert result.returncode == 0 and "Failed" not in result.stderr, result.stderr


def test_rules_test_method_and_test_study(gateway_factory: Any, tmp_path: Path) -> None:
    gw = gateway_factory(
        node={"shutdown_grace": 1},
        peers=PEERS,
        folders=[{"name": "archive", "path": str(tmp_path / "archive")}],
        rules=STUDY_RULES,
    )
    assert require("storescu") == "/usr/bin/storescu"
    storescu(gw.port, "CT1", CT)
    storescu(gw.port, "MR1", MR)
    result = gw.call("rules.test", {"study_uid": CT_STUDY})
    assert result["study_uid"] == CT_STUDY
    [series] = result["series"]
    assert {k: v for k, v in series.items() if k != "rules"} == {
        "series_uid": CT_SERIES,
        "series_description": None,
        "modality": "CT",
        "instances": 1,
    }
    outcomes = [(r["name"], r["outcome"], r["failed"]) for r in series["rules"]]
    assert outcomes == [
        ("from-ct1", "fired", None),  # CallingAE from the stored provenance
        ("ct-elsewhere", "not_fired", 'CallingAE != "CT1"'),
        ("to-gateway", "fired", None),
        ("ct-study", "fired", None),
        ("off", "disabled", None),
        ("rest", "fallback_not_needed", None),
    ]
    # CT_small's series has no SeriesDescription: the study's required series is not there.
    assert series["rules"][3]["required_series"] == {"met": False, "failed": '"AXIAL"'}
    mr = gw.call("rules.test", {"study_uid": MR_STUDY})["series"][0]
    assert [(r["name"], r["outcome"]) for r in mr["rules"]] == [
        ("from-ct1", "not_fired"),
        ("ct-elsewhere", "not_fired"),
        ("to-gateway", "fired"),
        ("ct-study", "not_fired"),
        ("off", "disabled"),
        ("rest", "fallback_not_needed"),
    ]
    assert mr["rules"][0]["failed"] == 'CallingAE == "CT1"'

    with ControlClient(gw.socket) as client:
        for params, code, message in [
            ({"study_uid": "1.2.3.4"}, -32004, "no study 1.2.3.4"),
            ({}, -32602, "parameter 'study_uid' is required"),
            ({"study_uid": "x/../y"}, -32602, "parameter 'study_uid' is not a valid UID"),
            ({"study_uid": CT_STUDY, "extra": 1}, -32602, "unknown parameter 'extra'"),
        ]:
            with pytest.raises(ControlError) as caught:
                client.call("rules.test", params)
            assert (caught.value.code, caught.value.message) == (code, message)

    table = gw.cli("rules", "test-study", CT_STUDY)
    assert table.stdout == (
        f"series {CT_SERIES}\n"
        f"  study        {CT_STUDY}\n"
        "  description  (none)\n"
        "  modality     CT\n"
        "  instances    1\n"
        "  rules\n"
        "    from-ct1      FIRES (route to pacs)\n"
        '    ct-elsewhere  no (failed: CallingAE != "CT1")\n'
        "    to-gateway    FIRES (route to archive)\n"
        '    ct-study      FIRES (route to pacs; required_series not met: "AXIAL")\n'
        "    off           disabled\n"
        "    rest          fallback not needed\n"
    )
    as_json = gw.cli("rules", "test-study", CT_STUDY, "--json")
    assert json.loads(as_json.stdout) == result
    unknown = gw.cli("rules", "test-study", "1.2.3.4", check=False)
    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == "gateway: no study 1.2.3.4 (error -32004)\n"
