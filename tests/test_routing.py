"""Rules end to end: DCMTK sends to the gateway, complete series and studies reach their targets."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    OrthancProcess,
    dataset_bytes,
    dcmtk_env,
    require,
    write_variant,
)
from tests.scp.test_query_retrieve import stored_dataset
from tests.scu.test_sender import Recorder

CT = TEST_FILES / "CT_small.dcm"


def storescu(gw: GatewayProcess, files: list[Path], calling: str = "CT1") -> None:
    result = subprocess.run(
        [require("storescu"), "-aet", calling, "-aec", gw.ae_title, HOST, str(gw.port),
         *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def make_series(directory: Path, count: int, study: str, description: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    return [
        write_variant(CT, directory / f"{series}-{n}.dcm", StudyInstanceUID=study,
                      SeriesInstanceUID=series, SOPInstanceUID=generate_uid(), InstanceNumber=n,
                      SeriesDescription=description)
        for n in range(1, count + 1)
    ]  # fmt: skip


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


def test_series_route_delivers_each_instance_once_after_completion(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        folders=[{"name": "export", "path": str(folder)}],
        rules=[
            {"name": "ct", "match": 'Modality == "CT" and CallingAE == "CT1"',
             "targets": ["rec", "export"], "quiet_seconds": 1.0},
            {"name": "also-ct", "match": 'Modality == "CT"', "targets": ["rec"],
             "quiet_seconds": 1.0},
        ],
    )  # fmt: skip
    study = generate_uid()
    files = make_series(tmp_path / "in", 5, study, "AX")
    storescu(gw, files)
    assert recorder.received == []  # not before the series is complete
    wait_until(lambda: len(recorder.received) >= 5)
    wait_until(lambda: all(j["state"] == "done" for j in gw.call("jobs.list")["jobs"]))
    time.sleep(0.5)
    uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    # Two rules route the same series to `rec`: it is sent once, as the gateway stored it.
    assert sorted(uid for uid, _, _ in recorder.received) == sorted(uids)
    for uid, _, data in recorder.received:
        assert data == stored_dataset(gw, uid)
    written = sorted(folder.rglob("*.dcm"))
    assert len(written) == 5
    assert {p.stem for p in written} == uids
    for path in written:  # the folder holds the stored file itself
        assert dataset_bytes(path) == stored_dataset(gw, path.stem)
    jobs = gw.call("jobs.list")["jobs"]
    assert sorted(j["target"] for j in jobs) == ["export", "rec"]
    assert all(j["delivered"] == 5 for j in jobs)


def test_study_reaches_orthanc_complete_and_not_before(
    gateway_factory: Any, orthanc: OrthancProcess, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": HOST,
                "port": orthanc.port}],
        rules=[{"name": "study", "match": 'Modality == "CT"', "level": "study",
                "targets": ["orthanc"], "quiet_seconds": 1.5}],
    )  # fmt: skip
    study = generate_uid()
    first = make_series(tmp_path / "a", 3, study, "T1")
    second = make_series(tmp_path / "b", 4, study, "T2")
    storescu(gw, first)
    time.sleep(0.8)
    storescu(gw, second)  # resets the study's wait
    time.sleep(0.9)
    assert orthanc.instance_count() == 0  # the study is not complete yet
    wait_until(lambda: orthanc.instance_count() == 7)
    (found,) = orthanc.rest("/studies")
    assert orthanc.rest(f"/studies/{found}")["MainDicomTags"]["StudyInstanceUID"] == study
    assert len(orthanc.rest(f"/studies/{found}/series")) == 2


def test_target_down_retries_then_delivers_once(gateway_factory: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": port}],
        rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                "quiet_seconds": 0.5}],
    )  # fmt: skip
    files = make_series(tmp_path / "in", 3, generate_uid(), "AX")
    storescu(gw, files)
    wait_until(lambda: any(j["attempts"] >= 1 for j in gw.call("jobs.list")["jobs"]))
    (job,) = gw.call("jobs.list")["jobs"]
    assert job["state"] == "queued" and "could not be reached" in job["last_error"]
    recorder = Recorder(port=port)  # the target comes up
    try:
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] == "done", timeout=60)
        assert sorted(u for u, _, _ in recorder.received) == sorted(
            str(pydicom.dcmread(f).SOPInstanceUID) for f in files
        )
    finally:
        recorder.stop()


def test_operator_force_completes_a_study_from_the_cli(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        rules=[{"name": "study", "match": 'Modality == "CT"', "level": "study",
                "targets": ["rec"], "quiet_seconds": 600, "priority": "urgent"}],
    )  # fmt: skip
    study = generate_uid()
    storescu(gw, make_series(tmp_path / "in", 2, study, "AX"))
    time.sleep(0.5)
    assert recorder.received == []
    forced = gw.cli("studies", "force-complete", study)
    assert "1 pending rule wait(s) completed" in forced.stdout
    wait_until(lambda: len(recorder.received) == 2)
    wait_until(lambda: "done" in gw.cli("jobs", "list").stdout)
    listing = gw.cli("jobs", "list", "--json")
    import json

    (job,) = json.loads(listing.stdout)["jobs"]
    assert (job["scope"], job["uid"], job["priority"], job["delivered"]) == (
        "study",
        study,
        "urgent",
        2,
    )
    assert "0 job(s) requeued" in gw.cli("jobs", "retry").stdout


def test_kill_9_mid_dispatch_resumes_and_resends_at_most_in_flight(
    gateway_factory: Any, tmp_path: Path
) -> None:
    from collections import Counter

    slow = Recorder(delay=0.03)  # each C-STORE takes the target 30 ms
    try:
        gw = gateway_factory(
            peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": slow.port}],
            rules=[{"name": "ct", "match": 'Modality == "CT"', "targets": ["rec"],
                    "quiet_seconds": 0.3}],
        )  # fmt: skip
        files = make_series(tmp_path / "in", 120, generate_uid(), "AX")
        storescu(gw, files)
        wait_until(lambda: len(slow.received) >= 30)
        gw.kill()  # SIGKILL mid-dispatch
        before = len(slow.received)
        assert before < 120, "the dispatch finished before the kill"
        gw.start()
        wait_until(lambda: gw.call("jobs.list")["jobs"][0]["state"] == "done", timeout=60)
        counts = Counter(uid for uid, _, _ in slow.received)
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(counts) == expected  # nothing lost
        duplicates = sum(n - 1 for n in counts.values())
        assert duplicates <= 2, counts.most_common(3)  # at most what was in flight at the kill
        (job,) = gw.call("jobs.list")["jobs"]
        assert job["delivered"] == 120
    finally:
        slow.stop()


def test_notify_and_discard_rules_send_nothing(
    gateway_factory: Any, recorder: Recorder, tmp_path: Path
) -> None:
    gw = gateway_factory(
        peers=[{"name": "rec", "ae_title": "RECORDER", "host": HOST, "port": recorder.port}],
        rules=[
            {"name": "tell", "match": 'Modality == "CT"', "action": "notify", "targets": ["rec"],
             "notify_url": "http://127.0.0.1:9/hook", "quiet_seconds": 0.3},
            {"name": "drop", "match": 'CallingAE == "MR1"', "action": "discard"},
            {"name": "ct", "match": 'CallingAE == "MR1"', "targets": ["rec"], "quiet_seconds": 0.3},
        ],
    )  # fmt: skip
    storescu(gw, make_series(tmp_path / "a", 2, generate_uid(), "AX"))
    storescu(gw, make_series(tmp_path / "b", 2, generate_uid(), "AX"), calling="MR1")
    time.sleep(1.5)
    assert recorder.received == []
    assert gw.call("jobs.list")["jobs"] == []
    assert '"completion_reached"' in gw.log_text()  # the notify rule's wait did complete
