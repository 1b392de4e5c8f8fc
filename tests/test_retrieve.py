"""Retrieval end to end: three Orthancs as VNA, PACS and anonymiser, the gateway in between."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from gateway.errors import ControlError
from gateway.retrieve.requests import NOT_RETRIED
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    OrthancProcess,
    StoreSCP,
    free_port,
    stop_orthancs,
    write_variant,
)
from tests.scu.test_sender import Recorder
from tests.test_routing import storescu, wait_until

CT = TEST_FILES / "CT_small.dcm"
FAST_RETRY = {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0, "max_attempts": 200}


@dataclass
class Study:
    uid: str
    mrn: str
    accession: str
    files: list[Path]  # per series, in order
    series: list[str]

    @property
    def sops(self) -> set[str]:
        return {p.stem for p in self.files}


def make_study(directory: Path, mrn: str, accession: str, series_sizes: tuple[int, ...]) -> Study:
    directory.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    files: list[Path] = []
    series_uids: list[str] = []
    for number, size in enumerate(series_sizes, start=1):
        series = generate_uid()
        series_uids.append(series)
        for n in range(1, size + 1):
            sop = generate_uid()
            files.append(
                write_variant(CT, directory / f"{sop}.dcm", StudyInstanceUID=study,
                              SeriesInstanceUID=series, SOPInstanceUID=sop, InstanceNumber=n,
                              SeriesNumber=number, PatientID=mrn, AccessionNumber=accession)
            )  # fmt: skip
    return Study(study, mrn, accession, files, series_uids)


@dataclass
class Archives:
    """A VNA, a PACS (verbose: their logs show each C-MOVE) and an anonymiser: Orthancs that
    the tests of a module share, each test's `Site` emptying them and pointing them at its
    own gateway."""

    vna: OrthancProcess
    pacs: OrthancProcess
    anon: OrthancProcess


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archives]:
    root = tmp_path_factory.mktemp("archives")
    servers: list[OrthancProcess] = []
    try:
        # The gateway's port is each test's own: `Site` sets it.
        for name, ae_title, verbose in (("vna", "VNA", True), ("pacs", "PACS", True),
                                        ("anon", "ANON", False)):  # fmt: skip
            servers.append(OrthancProcess(root / name, ae_title, verbose=verbose))
        yield Archives(*servers)
    finally:
        stop_orthancs(*servers)


class Site:
    """The gateway, a VNA and a PACS (Orthancs knowing the gateway) and an anonymiser.

    With *archives* (a module's shared Orthancs) it uses those, emptied, except a VNA of its
    own when it checks the called AE title or *own_vna* (a test that stops and starts it);
    without, it starts its own. `stop()` stops the Orthancs it started.
    """

    def __init__(
        self, gateway_factory: Any, tmp_path: Path, *,
        anonymiser: Recorder | StoreSCP | None = None,
        retrieve: dict[str, Any] | None = None, peers: dict[str, dict[str, Any]] | None = None,
        check_called_aet: bool = False, archives: Archives | None = None, own_vna: bool = False,
    ) -> None:  # fmt: skip
        self.gw: GatewayProcess = gateway_factory(start=False)
        me = {"gateway": ("GATEWAY", HOST, self.gw.port)}
        self._started: list[OrthancProcess] = []
        try:
            if archives is None or own_vna or check_called_aet:
                self.vna = self._start(tmp_path / "vna", "VNA", me, verbose=True,
                                       check_called_aet=check_called_aet)  # fmt: skip
            else:
                self.vna = archives.vna.reset(me)
            if archives is None:
                self.pacs = self._start(tmp_path / "pacs", "PACS", me, verbose=True)
            else:
                self.pacs = archives.pacs.reset(me)
            self.anon_orthanc: OrthancProcess | None = None
            if anonymiser is None:
                self.anon_orthanc = (
                    self._start(tmp_path / "anon", "ANON") if archives is None
                    else archives.anon.reset()
                )  # fmt: skip
            anon_port = anonymiser.port if anonymiser else self.anon_orthanc.port  # type: ignore[union-attr]
            anon_ae = getattr(anonymiser, "ae_title", "RECORDER") if anonymiser else "ANON"
            extra = peers or {}
            self.sections = {
                "peers": [
                    {"name": "vna", "ae_title": "VNA", "host": HOST, "port": self.vna.port,
                     **extra.get("vna", {})},
                    {"name": "pacs", "ae_title": "PACS", "host": HOST, "port": self.pacs.port,
                     **extra.get("pacs", {})},
                    {"name": "anon", "ae_title": anon_ae, "host": HOST, "port": anon_port},
                ],
                "retrieve": {"primary": "vna", "secondary": "pacs", "anonymiser": "anon",
                             "stall_seconds": 5, **FAST_RETRY, **(retrieve or {})},
                "projects": [{"name": "P1"}, {"name": "P2"}],
                # Forward jobs retry for as long as a test keeps the anonymiser down, however
                # slow the machine (10 attempts at these delays can pass in ~5 s).
                "dispatch": {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0,
                             "max_attempts": 200},
            }  # fmt: skip
            self.gw.write_config(**self.sections)
            self.gw.start()
        except BaseException:
            self.stop()  # the gateway is gateway_factory's to stop
            raise

    def _start(self, root: Path, *args: Any, **kwargs: Any) -> OrthancProcess:
        server = OrthancProcess(root, *args, **kwargs)
        self._started.append(server)
        return server

    def stop(self) -> None:
        """Stop the Orthancs this site started (a module's shared ones stay up)."""
        stop_orthancs(*self._started)

    def status(self, project: str = "P1") -> dict[str, Any]:
        result: dict[str, Any] = self.gw.call("retrieve.status", {"project": project})
        return result

    def wait_settled(self, project: str = "P1", timeout: float = 60.0) -> dict[str, Any]:
        def settled() -> bool:
            counts = self.status(project)["counts"]
            return counts["Queued"] + counts["Processing"] == 0

        try:
            wait_until(settled, timeout=timeout)
        except AssertionError:
            log = self.gw.log_text()[-6000:]
            raise AssertionError(f"not settled: {self.status(project)}\n{log}") from None
        return self.status(project)


@pytest.fixture
def site(gateway_factory: Any, tmp_path: Path, archives: Archives) -> Iterator[Site]:
    s = Site(gateway_factory, tmp_path, archives=archives)
    yield s
    s.stop()


def moves_at(orthanc: OrthancProcess) -> list[float]:
    """When *orthanc* received each C-MOVE request since its last reset (its own log's clock,
    seconds of the day)."""
    times = []
    for line in orthanc.log_text().splitlines():
        if "Incoming Move request" in line:
            match = re.search(r" (\d\d):(\d\d):(\d\d\.\d+) ", line)
            assert match, line
            h, m, s = match.groups()
            times.append(int(h) * 3600 + int(m) * 60 + float(s))
    return times


def test_vna_then_pacs_by_uid_and_by_mrn_and_accession(site: Site, tmp_path: Path) -> None:
    only_vna = make_study(tmp_path / "a", "MRN1", "ACC1", (2,))
    only_pacs = make_study(tmp_path / "b", "MRN2", "ACC2", (1, 2))
    by_ids = make_study(tmp_path / "c", "MRN3", "ACC3", (2,))
    twins = [make_study(tmp_path / f"d{n}", "MRN4", "ACC4", (1,)) for n in (1, 2)]
    site.vna.upload(*only_vna.files, *by_ids.files, *twins[0].files, *twins[1].files)
    site.pacs.upload(*only_pacs.files)
    result = site.gw.call("retrieve.submit", {"project": "P1", "requests": [
        {"study_uid": only_vna.uid, "priority": 3},
        {"study_uid": only_pacs.uid},
        {"mrn": "MRN3", "accession": "ACC3"},
        {"mrn": "MRN4", "accession": "ACC4", "priority": 5},
        {"study_uid": generate_uid()},
    ]})  # fmt: skip
    assert result["counts"] == {"Queued": 5, "QueueFailed": 0, "Processing": 0}
    status = site.wait_settled()
    assert status["counts"] == {"Successful": 4, "Processing": 0, "Failed": 1, "Queued": 0,
                                "QueueFailed": 0}  # fmt: skip
    a, b, c, d, missing = status["requests"]
    assert (missing["status"], missing["reason"]) == ("Failed", "not found in vna or pacs")
    assert (a["archive"], b["archive"], c["archive"], d["archive"]) == ("vna", "pacs", "vna", "vna")
    assert a["studies"] == [only_vna.uid] and c["studies"] == [by_ids.uid]
    assert sorted(d["studies"]) == sorted(t.uid for t in twins)  # both matches are retrieved
    assert all(r["step"] == "done" and r["reason"] is None for r in (a, b, c, d))
    assert d["instances"] == {"expected": 2, "stored": 2, "forwarded": 2}
    assert set(a["timings"]) >= {"query", "compare", "move", "verify", "forward"}
    assert "query_secondary" in b["timings"]
    expected = set().union(*(s.sops for s in (only_vna, only_pacs, by_ids, *twins)))
    assert site.anon_orthanc is not None and site.anon_orthanc.sop_uids() == expected
    # Human form, from the CLI.
    text = site.gw.cli("retrieve", "status", "--project", "P1").stdout
    assert "Successful 4" in text and "Failed 1" in text and "MRN4 / ACC4" in text
    assert "not found in vna or pacs" in text
    # --watch returns once nothing is open; --json is the method's result.
    watched = site.gw.cli("retrieve", "status", "--project", "P1", "--watch", "0.2").stdout
    assert watched.startswith("project P1: Successful 4")
    as_json = json.loads(site.gw.cli("retrieve", "status", "--project", "P1", "--json").stdout)
    assert as_json["counts"] == status["counts"] and len(as_json["requests"]) == 5


def test_only_the_missing_half_is_moved(site: Site, tmp_path: Path) -> None:
    study = make_study(tmp_path / "s", "MRN1", "ACC1", (3, 3))
    site.vna.upload(*study.files)
    # The store holds all of series 1 and one instance of series 2.
    storescu(site.gw, study.files[:4])
    site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})
    (request,) = site.wait_settled()["requests"]
    assert request["status"] == "Successful", request
    assert request["moved"] == 2  # C-MOVE sub-operations completed: only what was missing
    assert len(moves_at(site.vna)) == 1  # one IMAGE-level move with the two missing UIDs
    assert request["instances"] == {"expected": 6, "stored": 6, "forwarded": 6}
    assert site.anon_orthanc is not None and site.anon_orthanc.sop_uids() == study.sops


def test_refusals_and_the_secondary_window(
    gateway_factory: Any, tmp_path: Path, archives: Archives
) -> None:
    tomorrow = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now().weekday() + 2) % 7]
    site = Site(gateway_factory, tmp_path, archives=archives, retrieve={
        "secondary_windows": [{"days": [tomorrow], "start": "01:00", "end": "02:00"}],
    })  # fmt: skip
    try:
        only_pacs = make_study(tmp_path / "b", "MRN2", "ACC2", (1,))
        site.pacs.upload(*only_pacs.files)
        result = site.gw.call("retrieve.submit", {"project": "P1", "requests": [
            {"study_uid": generate_uid()},
            {"study_uid": only_pacs.uid},
            {"mrn": "MRN9"},
            {"study_uid": "1.2.x"},
            {"study_uid": generate_uid(), "project": "nope"},
            {"study_uid": generate_uid(), "priority": 9},
        ]})  # fmt: skip
        reasons = [r["reason"] for r in result["submitted"]]
        assert reasons[2:] == [
            "needs a study_uid, or both mrn and accession (missing: accession)",
            "study_uid '1.2.x' is not a valid UID",
            "unknown project 'nope'",
            "priority must be an integer from 1 to 5 (got '9')",
        ]
        # Not in the VNA: both wait for the PACS's window, Queued, with the reason.
        wait_until(lambda: all(r["reason"] for r in site.status()["requests"]))
        for waiting in site.status()["requests"][:2]:
            assert waiting["status"] == "Queued" and waiting["step"] == "query_secondary"
            assert waiting["reason"].startswith("waiting for the window of pacs (opens ")
            assert waiting["reason"].endswith("T01:00+00:00)")
        assert site.status("nope")["counts"]["QueueFailed"] == 1  # recorded under its project
        assert site.status()["counts"]["QueueFailed"] == 3
        # Operators: cancel what has not finished, retry it, change an archive's limits.
        assert (
            "2 request(s) cancelled" in site.gw.cli("retrieve", "cancel", "--project", "P1").stdout
        )
        cancelled = site.status()["requests"][:2]
        assert all(r["status"] == "Failed" for r in cancelled)
        assert all(r["reason"] == "cancelled by an operator" for r in cancelled)
        assert "2 request(s) requeued" in site.gw.cli("retrieve", "retry", "--project", "P1").stdout
        wait_until(lambda: all(r["status"] == "Queued" and r["reason"]
                               for r in site.status()["requests"][:2]))  # fmt: skip
        limits = site.gw.call("retrieve.limits", {"peer": "vna", "moves_per_minute": 30,
                                                  "max_concurrent_moves": 1})  # fmt: skip
        assert limits["archives"]["vna"]["moves_per_minute"] == 30
        assert limits["archives"]["vna"]["max_concurrent_moves"] == 1
        assert limits["archives"]["pacs"]["moves_per_minute"] == 0  # unlimited
        text = site.gw.cli("retrieve", "limits").stdout
        assert "vna: queries/min unlimited, moves/min 30.0, concurrent moves 1" in text
        with pytest.raises(ControlError, match="peer 'anon' is not a retrieval archive"):
            site.gw.call("retrieve.limits", {"peer": "anon", "moves_per_minute": 1})
    finally:
        site.stop()


def test_archive_down_stays_processing_and_completes_when_it_returns(
    gateway_factory: Any, tmp_path: Path, archives: Archives
) -> None:
    site = Site(gateway_factory, tmp_path, archives=archives, own_vna=True)  # stopped, started
    try:
        study = make_study(tmp_path / "a", "MRN1", "ACC1", (2,))
        site.vna.upload(*study.files)
        site.vna.stop()
        site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})
        wait_until(lambda: site.status()["requests"][0]["attempts"] >= 2)
        (request,) = site.status()["requests"]
        assert request["status"] == "Processing" and request["step"] == "query"
        assert "peer vna" in request["reason"] and "unreachable: " in request["reason"]
        site.vna.start()
        (request,) = site.wait_settled()["requests"]
        assert request["status"] == "Successful" and request["archive"] == "vna"
    finally:
        site.stop()


def test_anonymiser_down_retries_only_the_forward_step(
    gateway_factory: Any, tmp_path: Path, archives: Archives
) -> None:
    port = free_port()
    anonymiser = Recorder(port=port)
    anonymiser.stop()  # down from the start; comes up later on the same port
    site = Site(gateway_factory, tmp_path, anonymiser=anonymiser, archives=archives)
    late: Recorder | None = None
    try:
        study = make_study(tmp_path / "a", "MRN1", "ACC1", (3,))
        site.vna.upload(*study.files)
        site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})

        def forwarding_fails() -> bool:
            request = site.status()["requests"][0]
            return request["step"] == "forward" and "unreachable: " in (request["reason"] or "")

        wait_until(forwarding_fails)
        assert site.status()["requests"][0]["status"] == "Processing"
        time.sleep(1.5)  # jobs retry meanwhile; the archive is not asked again
        late = Recorder(port=port)
        (request,) = site.wait_settled()["requests"]
        assert request["status"] == "Successful"
        assert len(moves_at(site.vna)) == 1
        assert sorted(u for u, _, _ in late.received) == sorted(study.sops)
    finally:
        if late is not None:
            late.stop()
        site.stop()


_SETUP_JITTER = 0.2  # s: the most a loaded machine delays one association's arrival


def test_cohort_of_50_rate_limited_survives_kill_9(
    gateway_factory: Any, tmp_path: Path, archives: Archives
) -> None:
    anonymiser = Recorder()
    rate = 240.0  # moves a minute: one every 0.25 s
    site = Site(gateway_factory, tmp_path, anonymiser=anonymiser, archives=archives,
                peers={"vna": {"moves_per_minute": rate}})  # fmt: skip
    try:
        cohort = [make_study(tmp_path / f"s{n}", f"MRN{n}", f"ACC{n}", (2,)) for n in range(50)]
        site.vna.upload(*(f for s in cohort for f in s.files))
        csv_file = tmp_path / "cohort.csv"
        rows = ["project,mrn,accession,study_uid,series_uid,priority"]
        rows += [f",{s.mrn},{s.accession},,," for s in cohort[:25]]
        rows += [f"P1,,,{s.uid},,2" for s in cohort[25:]]
        csv_file.write_text("\n".join(rows) + "\n")
        out = site.gw.cli("retrieve", "submit", "--project", "P1", str(csv_file)).stdout
        assert "50 request(s): 50 queued, 0 refused" in out
        seen_successful = 0
        while site.status()["counts"]["Successful"] < 15:  # status stays right while it runs
            status = site.status()
            assert sum(status["counts"].values()) == 50
            assert status["counts"]["Successful"] >= seen_successful
            seen_successful = status["counts"]["Successful"]
            for request in status["requests"]:
                if request["status"] == "Successful":
                    assert request["instances"]["forwarded"] == 2
            time.sleep(0.1)
        site.gw.kill()  # mid-cohort
        before = len(anonymiser.received)
        assert before < 100, "the cohort finished before the kill"
        site.gw.start()
        status = site.wait_settled(timeout=120)
        assert status["counts"]["Successful"] == 50, status["counts"]
        counts = Counter(uid for uid, _, _ in anonymiser.received)
        assert set(counts) == set().union(*(s.sops for s in cohort))  # nothing lost
        assert sum(n - 1 for n in counts.values()) <= 4, counts.most_common(3)  # in flight only
        gaps = [b - a for a, b in zip(moves_at(site.vna), moves_at(site.vna)[1:], strict=False)]
        # The rate held, at the archive: one move every 0.25 s, never a burst. Each arrival
        # follows a new association, whose setup the machine's load delays by up to ~0.15 s
        # (measured with a four-sender benchmark or the suite running beside it), so one gap
        # may shrink by that much; over twenty moves that delay is a few per cent, so the span
        # of twenty (what an archive's per-minute limit sees) holds the rate on a busy machine.
        starts = moves_at(site.vna)
        assert len(starts) >= 50
        assert min(gaps) >= 60 / rate * 0.4, sorted(gaps)[:3]
        spans = [b - a for a, b in zip(starts, starts[19:], strict=False)]
        assert min(spans) >= 19 * 60 / rate - _SETUP_JITTER, sorted(spans)[:3]
    finally:
        anonymiser.stop()
        site.stop()


def test_c_get_archive(gateway_factory: Any, tmp_path: Path, archives: Archives) -> None:
    site = Site(gateway_factory, tmp_path, archives=archives, peers={"vna": {"retrieve": "get"}})
    try:
        study = make_study(tmp_path / "a", "MRN1", "ACC1", (2, 1))
        site.vna.upload(*study.files)
        storescu(site.gw, study.files[:1])  # one instance held: C-GET the other two
        site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})
        (request,) = site.wait_settled()["requests"]
        assert request["status"] == "Successful", request
        assert request["moved"] == 2
        assert moves_at(site.vna) == []  # no C-MOVE: the instances came on the C-GET association
        assert site.anon_orthanc is not None and site.anon_orthanc.sop_uids() == study.sops
    finally:
        site.stop()


def matching(query: Any, headers: list[Any]) -> Iterator[Any]:
    """The *headers* a Study Root C-FIND *query* matches (by its Study and Series Instance
    UIDs, empty matching all), one per entity of the query's level."""
    level = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}
    seen = set()
    for ds in headers:
        if query.StudyInstanceUID not in ("", ds.StudyInstanceUID):
            continue
        if query.get("SeriesInstanceUID", "") not in ("", ds.SeriesInstanceUID):
            continue
        key = ds.get(level.get(query.QueryRetrieveLevel, "SOPInstanceUID"))
        if key not in seen:
            seen.add(key)
            yield ds


class SilentArchive:
    """A pynetdicom Q/R SCP that answers C-FIND from a list and never finishes a C-MOVE."""

    def __init__(self, study: Study) -> None:
        import threading

        from pydicom import dcmread
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
        )

        self.datasets = [dcmread(f, stop_before_pixels=True) for f in study.files]
        self.release = threading.Event()
        self.ae = AE(ae_title="SILENT")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.port = free_port()
        self.server = self.ae.start_server(
            (HOST, self.port), block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)],
        )  # fmt: skip

    def _find(self, event: Any) -> Any:
        from pydicom.dataset import Dataset

        query = event.identifier
        for ds in matching(query, self.datasets):
            answer = Dataset()
            for keyword in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID",
                            "SOPInstanceUID", "SOPClassUID"):  # fmt: skip
                if keyword in query:
                    setattr(answer, keyword, getattr(ds, keyword, query.QueryRetrieveLevel))
            yield 0xFF00, answer

    def _move(self, event: Any) -> Any:
        self.release.wait(30)  # silence: no sub-operation, no response
        yield None, None  # then: unknown destination

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_a_move_without_progress_times_out_and_is_retried(
    gateway_factory: Any, tmp_path: Path
) -> None:
    study = make_study(tmp_path / "a", "MRN1", "ACC1", (2,))
    archive = SilentArchive(study)
    anonymiser = Recorder()
    gw = gateway_factory(
        peers=[
            {"name": "silent", "ae_title": "SILENT", "host": HOST, "port": archive.port},
            {"name": "anon", "ae_title": "RECORDER", "host": HOST, "port": anonymiser.port},
        ],
        retrieve={"primary": "silent", "anonymiser": "anon", "stall_seconds": 1,
                  "retry_base_seconds": 0.1, "retry_max_seconds": 0.2, "max_attempts": 2},
        projects=[{"name": "P1"}],
    )  # fmt: skip
    try:
        gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})
        wait_until(lambda: gw.call("retrieve.status", {"project": "P1"})["counts"]["Failed"] == 1)
        (request,) = gw.call("retrieve.status", {"project": "P1"})["requests"]
        assert request["step"] == "move" and request["attempts"] == 2, request["reason"]
        assert request["reason"] == (
            "timeout: no progress for 1 s during the C-MOVE (after 2 attempts)"
        )
        assert anonymiser.received == []
        # Retry requeues it at its step.
        assert gw.call("retrieve.retry", {"project": "P1"}) == {"requeued": 1}
        wait_until(
            lambda: gw.call("retrieve.status", {"project": "P1"})["requests"][0]["attempts"] == 0
        )
    finally:
        archive.stop()
        anonymiser.stop()


class FindAndGetArchive:
    """A pynetdicom Q/R SCP: C-FIND answers with the keys asked for (each query kept), C-MOVE
    refused (Move Destination unknown), C-GET sends the instances on its association."""

    def __init__(self, study: Study) -> None:
        from pydicom import dcmread
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )

        self.files = study.files
        self.headers = [dcmread(f, stop_before_pixels=True) for f in study.files]
        self.queries: list[tuple[str, set[str]]] = []  # (level, keywords asked)
        self.ae = AE(ae_title="ARCHIVE")
        for model in (StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelMove,
                      StudyRootQueryRetrieveInformationModelGet):  # fmt: skip
            self.ae.add_supported_context(model)
        self.ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        self.port = free_port()
        self.server = self.ae.start_server(
            (HOST, self.port), block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move),
                          (evt.EVT_C_GET, self._get)],
        )  # fmt: skip

    def _find(self, event: Any) -> Any:
        from pydicom.dataset import Dataset

        query = event.identifier
        self.queries.append((str(query.QueryRetrieveLevel), {e.keyword for e in query}))
        for ds in matching(query, self.headers):
            answer = Dataset()
            answer.QueryRetrieveLevel = query.QueryRetrieveLevel
            for element in query:
                if element.keyword != "QueryRetrieveLevel":
                    setattr(answer, element.keyword, ds.get(element.keyword, ""))
            yield 0xFF00, answer

    def _move(self, event: Any) -> Any:
        yield None, None  # unknown Move Destination: 0xA801

    def _get(self, event: Any) -> Any:
        from pydicom import dcmread

        yield len(self.files)
        for path in self.files:
            yield 0xFF00, dcmread(path)

    def image_queries(self) -> list[set[str]]:
        return [keys for level, keys in self.queries if level == "IMAGE"]

    def stop(self) -> None:
        self.server.shutdown()


def test_sop_classes_are_listed_only_for_a_c_get(gateway_factory: Any, tmp_path: Path) -> None:
    """An archive retrieved from by C-MOVE is not asked for SOP Class UIDs (an Orthanc reads
    each instance's file for them); one whose request was listed so and which a reload then
    makes a C-GET archive is listed again, with them, before the C-GET."""
    study = make_study(tmp_path / "a", "MRN1", "ACC1", (2,))
    archive = FindAndGetArchive(study)
    anonymiser = Recorder()
    sections: dict[str, Any] = {
        "peers": [
            {"name": "archive", "ae_title": "ARCHIVE", "host": HOST, "port": archive.port},
            {"name": "anon", "ae_title": "RECORDER", "host": HOST, "port": anonymiser.port},
        ],
        "retrieve": {"primary": "archive", "anonymiser": "anon", **FAST_RETRY},
        "projects": [{"name": "P1"}],
    }
    gw = gateway_factory(**sections)
    try:
        gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})

        def move_failed() -> bool:
            (request,) = gw.call("retrieve.status", {"project": "P1"})["requests"]
            return bool(request["attempts"] >= 1 and request["step"] == "move")

        wait_until(move_failed)
        assert archive.image_queries() == [{"QueryRetrieveLevel", "StudyInstanceUID",
                                            "SeriesInstanceUID", "SOPInstanceUID"}]  # fmt: skip
        sections["peers"][0]["retrieve"] = "get"
        gw.write_config(**sections)
        assert gw.call("rules.reload")["peers_changed"] == ["archive"]
        wait_until(
            lambda: gw.call("retrieve.status", {"project": "P1"})["counts"]["Successful"] == 1,
            timeout=30,
        )
        assert "SOPClassUID" in archive.image_queries()[-1]
        assert sorted(uid for uid, *_ in anonymiser.received) == sorted(study.sops)
    finally:
        archive.stop()
        anonymiser.stop()


def test_permanent_rejection_fails_at_once_and_a_reload_queues_it_again(
    gateway_factory: Any, tmp_path: Path, archives: Archives
) -> None:
    """The VNA (Orthanc checking the called AE title) does not know the AE title the gateway
    is configured to call: A-ASSOCIATE-RJ permanent, so the request fails on its first attempt
    with the reject's reason. Correcting the peer and reloading queues it again; it succeeds."""
    # That VNA is its own; the PACS and the anonymiser are the module's.
    site = Site(gateway_factory, tmp_path, peers={"vna": {"ae_title": "WRONG"}},
                check_called_aet=True, archives=archives)  # fmt: skip
    try:
        study = make_study(tmp_path / "s", "MRN1", "ACC1", (2,))
        site.vna.upload(*study.files)
        site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})
        (request,) = site.wait_settled()["requests"]
        # ended on its first try, no failed attempt counted towards a retry
        assert (request["status"], request["attempts"]) == ("Failed", 0), request
        assert request["reason"].startswith("rejected: peer vna (WRONG at "), request
        assert "Called AE title not recognised" in request["reason"]
        assert request["reason"].endswith(NOT_RETRIED)
        site.sections["peers"][0]["ae_title"] = "VNA"
        site.gw.write_config(**site.sections)
        assert site.gw.call("rules.reload")["peers_changed"] == ["vna"]

        def succeeded() -> bool:
            (current,) = site.status()["requests"]
            return bool(current["status"] == "Successful")

        wait_until(succeeded, timeout=60)
        assert site.anon_orthanc is not None and site.anon_orthanc.sop_uids() == study.sops
    finally:
        site.stop()
