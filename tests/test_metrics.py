"""The `[metrics]` endpoint against real peers: Prometheus counters and gauges equal to what was
sent (DCMTK storescu, echoscu, findscu), refusals and rejections under their status and reason,
dispatch jobs and deliveries after routing rules ran, /healthz 200 and 503 (low disk, shutting
down), nothing listening by default, the endpoint's thread and socket gone after `run`, and the
example Grafana dashboard built only from metric names a scrape serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from gateway.app import run
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from tests.conftest import (
    HOST,
    REPO,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk_env,
    free_port,
    require,
    write_config,
    write_variant,
)
from tests.test_routing import wait_until

CT = TEST_FILES / "CT_small.dcm"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"


# -- HTTP and the text format ---------------------------------------------------------------------


def http(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of a request to the endpoint; errors are answers too."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client's own parser."""

    def __init__(self, port: int) -> None:
        status, self.text, headers = http(port, "/metrics")
        assert status == 200, self.text
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.names: set[str] = set()  # every series name a query can use
        for family in text_string_to_metric_families(self.text):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            self.names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            for sample in family.samples:
                self.names.add(sample.name)
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; a labelled series not served yet (no event so far) is 0."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """The sum of the samples of *name* whose labels include *labels*."""
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )


def metrics_gateway(root: Path, **sections: Any) -> GatewayProcess:
    """A gateway process with the endpoint on a free loopback port (`gw.metrics_port`)."""
    port = free_port()
    gw = GatewayProcess(root, metrics={"host": HOST, "port": port}, **sections)
    gw.metrics_port = port  # type: ignore[attr-defined]
    return gw


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Gateways a test starts, stopped at its end."""
    gateways: list[GatewayProcess] = []
    yield gateways
    for gw in gateways:
        gw.stop()


def start(started: list[GatewayProcess], gw: GatewayProcess) -> tuple[GatewayProcess, int]:
    started.append(gw)
    gw.start()
    return gw, int(gw.metrics_port)  # type: ignore[attr-defined]


# -- DCMTK ----------------------------------------------------------------------------------------


def dcmtk(
    tool: str, gw: GatewayProcess, *args: str, called: str = "GATEWAY"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require(tool), "-aec", called, *args, HOST, str(gw.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip


def storescu(gw: GatewayProcess, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("storescu"), "-aec", "GATEWAY", HOST, str(gw.port), *map(str, files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip


def series_files(directory: Path, count: int, **attributes: Any) -> list[Path]:
    """*count* CT instances of one new series (new SOP Instance UIDs)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, **attributes}
    return [
        write_variant(CT, directory / f"{n}.dcm", SOPInstanceUID=generate_uid(), **uids)
        for n in range(count)
    ]


# -- counters equal to what was sent -----------------------------------------------------------


def test_instances_associations_and_requests_counted(
    tmp_path: Path, started: list[GatewayProcess]
) -> None:
    gw, port = start(started, metrics_gateway(tmp_path / "gw", node={"duplicate_policy": "reject"}))
    files = series_files(tmp_path / "sent", 3)
    result = storescu(gw, *files)
    assert result.returncode == 0, result.stderr
    # The same SOP Instance UID with other content, under duplicate_policy = "reject": 0xC111.
    clash = write_variant(files[0], tmp_path / "clash.dcm", PatientName="Other^Patient")
    storescu(gw, clash)
    assert dcmtk("echoscu", gw).returncode == 0
    rejected = dcmtk("echoscu", gw, called="SOMEONE_ELSE")
    assert rejected.returncode != 0 and "Association Rejected" in rejected.stderr
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    found = dcmtk("findscu", gw, "-S", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}")  # fmt: skip
    assert found.returncode == 0, found.stderr
    with gw.control() as client, pytest.raises(Exception, match="unknown method"):
        client.call("no.such.method")

    wait_until(lambda: Scrape(port).value("gateway_associations_open") == 0)
    scrape = Scrape(port)
    status = gw.call("status")
    # storescu sends the datasets re-encoded by DCMTK: what counts is what arrived and is stored.
    stored = [path for path in (gw.data_dir / "objects").rglob("*") if path.is_file()]
    assert len(stored) == 3
    assert status["instances"] == 3
    assert status["bytes"] == sum(len(dataset_bytes(path)) for path in stored)
    assert scrape.value("gateway_instances_received_total") == 3
    assert scrape.value("gateway_received_bytes_total") == status["bytes"]
    assert scrape.value("gateway_instances_refused_total", status="0xC111") == 1
    assert scrape.sum("gateway_instances_refused_total") == 1
    assert scrape.value("gateway_cstore_duration_seconds_count") == 4
    assert scrape.value("gateway_cstore_duration_seconds_bucket", le="+Inf") == 4
    assert 0 < scrape.value("gateway_cstore_duration_seconds_sum") < 60
    # storescu twice, echoscu, findscu; the rejected one under its reason.
    assert scrape.value("gateway_associations_accepted_total") == 4
    reason = "called_ae_title_not_recognised"
    assert scrape.value("gateway_associations_rejected_total", reason=reason) == 1
    assert scrape.sum("gateway_associations_rejected_total") == 1
    assert scrape.value("gateway_dimse_requests_total", service="echo", level="") == 1
    assert scrape.value("gateway_dimse_requests_total", service="find", level="study") == 1
    assert scrape.sum("gateway_dimse_requests_total") == 2
    # The store's running totals and the disk.
    assert scrape.value("gateway_store_objects", level="instance") == 3
    assert scrape.value("gateway_store_objects", level="study") == 1
    assert scrape.value("gateway_store_bytes") == status["bytes"]
    assert scrape.value("gateway_disk_free_bytes") > 0
    assert scrape.value("gateway_dicom_listener_up") == 1
    # Control requests by method; an unknown method does not become a label of its own.
    assert scrape.value("gateway_control_requests_total", method="unknown") == 1
    assert scrape.value("gateway_control_errors_total", method="unknown") == 1
    assert scrape.value("gateway_control_requests_total", method="status") >= 1
    assert scrape.value("gateway_control_errors_total", method="status") == 0
    assert "no.such.method" not in scrape.text
    # The same figures through `status`.
    figures = status["metrics"]
    assert figures["endpoint"] == f"http://{HOST}:{port}/metrics"
    assert figures["instances"]["received"] == 3
    assert figures["instances"]["received_bytes"] == status["bytes"]
    assert figures["instances"]["refused"] == {"0xC111": 1}
    assert figures["instances"]["cstore_seconds"]["count"] == 4
    assert figures["associations"]["accepted"] == 4
    assert figures["associations"]["rejected"][reason] == 1
    assert figures["associations"]["open"] == 0
    assert figures["dimse_requests"]["find"] == 1 and figures["dimse_requests"]["echo"] == 1
    assert figures["control"]["requests"]["unknown"] == 1


def test_jobs_deliveries_and_retrievals(
    tmp_path: Path, started: list[GatewayProcess], storescp: StoreSCP
) -> None:
    offline_port = free_port()  # nothing listens: every attempt fails at once
    peers = [
        {"name": "archive", "ae_title": storescp.ae_title, "host": HOST, "port": storescp.port},
        {"name": "offline", "ae_title": "OFFLINE", "host": HOST, "port": offline_port},
    ]
    rules = [
        {"name": "to-archive", "match": 'Modality == "CT"', "targets": ["archive"],
         "quiet_seconds": 0.3},
        {"name": "to-offline", "match": 'Modality == "CT"', "targets": ["offline"],
         "quiet_seconds": 0.3},
        # Still waiting when the test ends: a completion wait, no job.
        {"name": "later", "match": 'Modality == "CT"', "targets": ["archive"],
         "quiet_seconds": 3600},
    ]  # fmt: skip
    gw, port = start(started, metrics_gateway(
        tmp_path / "gw", peers=peers, rules=rules, projects=[{"name": "P1"}],
        retrieve={"primary": "offline", "retry_base_seconds": 60},
        dispatch={"max_attempts": 1},  # the offline job fails for good at its first attempt
    ))  # fmt: skip
    files = series_files(tmp_path / "sent", 2)
    assert storescu(gw, *files).returncode == 0

    def settled() -> bool:
        scrape = Scrape(port)
        return (
            scrape.value("gateway_dispatch_jobs", state="done", target="archive") == 1
            and scrape.value("gateway_dispatch_jobs", state="failed", target="offline") == 1
        )

    wait_until(settled, timeout=30)
    scrape = Scrape(port)
    assert scrape.sum("gateway_dispatch_jobs", target="offline") == 1
    assert scrape.value("gateway_dispatch_failures_total", target="offline") == 1
    assert scrape.sum("gateway_dispatch_jobs") == 2
    assert scrape.value("gateway_dispatch_instances_delivered_total", target="archive") == 2
    assert scrape.value("gateway_dispatch_jobs_completed_total", target="archive") == 1
    assert scrape.value("gateway_dispatch_failures_total", target="archive") == 0
    assert scrape.value("gateway_dispatch_instances_delivered_total", target="offline") == 0
    assert scrape.value("gateway_dispatch_jobs_completed_total", target="offline") == 0
    wait_until(lambda: len(storescp.files()) == 2)
    assert scrape.value("gateway_completion_waits", scope="series") == 1
    assert scrape.value("gateway_completion_waits", scope="study") == 0

    # Retrieval requests: one of the configured project (its archive is down: it stays
    # Queued or Processing), one naming a project that does not exist: "other", QueueFailed.
    gw.call("retrieve.submit", {"project": "P1", "study_uid": generate_uid()})
    gw.call("retrieve.submit", {"project": "NO-SUCH-PROJECT", "study_uid": generate_uid()})
    scrape = Scrape(port)
    assert scrape.sum("gateway_retrieval_requests", project="P1") == 1
    assert scrape.value("gateway_retrieval_requests", project="P1", status="Successful") == 0
    assert scrape.value("gateway_retrieval_requests", project="other", status="QueueFailed") == 1
    assert "NO-SUCH-PROJECT" not in scrape.text

    status = gw.call("status")["metrics"]
    assert status["jobs"] == {"queued": 0, "running": 0, "done": 1, "failed": 1, "cancelled": 0}
    assert status["jobs_by_target"]["archive"]["done"] == 1
    assert status["dispatch"]["delivered"]["archive"] == 2
    assert status["dispatch"]["failures"]["offline"] == 1
    assert status["retrievals"]["QueueFailed"] == 1
    assert status["completion_waits"] == {"series": 1, "study": 0}
    assert sum(status["retrievals_by_project"]["P1"].values()) == 1
    lines = gw.cli("status").stdout.splitlines()
    assert "  jobs          0 queued, 0 running, 1 done, 1 failed, 0 cancelled" in lines
    assert any(re.fullmatch(r"  retrievals +.*1 QueueFailed", line) for line in lines), lines
    assert f"  metrics       http://{HOST}:{port}/metrics" in lines
    assert any(line.startswith("  since start   1 associations accepted, 0 rejected; 2 instances")
               for line in lines), lines  # fmt: skip


def test_requests_refused_before_a_handler(tmp_path: Path, started: list[GatewayProcess]) -> None:
    """A caller that may only echo: its C-STORE and C-FIND are answered 0x0124 by the transport."""
    gw, port = start(started, metrics_gateway(tmp_path / "gw",
                                              security={"default_services": ["echo"]}))  # fmt: skip
    storescu(gw, *series_files(tmp_path / "sent", 1))
    dcmtk("findscu", gw, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    scrape = Scrape(port)
    assert scrape.value("gateway_instances_refused_total", status="0x0124") == 1
    refused = scrape.value("gateway_dimse_requests_refused_total", service="find", status="0x0124")
    assert refused == 1
    assert scrape.value("gateway_instances_received_total") == 0
    assert scrape.sum("gateway_dimse_requests_total") == 0  # no handler saw them
    assert scrape.value("gateway_cstore_duration_seconds_count") == 0
    assert gw.call("status")["metrics"]["dimse_requests_refused"] == {"find": {"0x0124": 1}}


# -- /healthz -------------------------------------------------------------------------------------


def test_healthz_low_disk_and_refusal(tmp_path: Path, started: list[GatewayProcess]) -> None:
    _, port = start(started, metrics_gateway(tmp_path / "ok"))
    status, body, headers = http(port, "/healthz")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok" and health["disk_free_bytes"] > 0

    # More free disk asked than there is (1 EiB): not accepting, and every instance refused.
    low, low_port = start(started, metrics_gateway(tmp_path / "low", node={"min_free_mb": 2**40}))
    status, body, _ = http(low_port, "/healthz")
    assert status == 503, body
    health = json.loads(body)
    assert health["status"] == "unavailable" and health["reason"].startswith("low disk: ")
    assert "node.min_free_mb" in health["reason"]
    storescu(low, *series_files(tmp_path / "sent", 1))
    scrape = Scrape(low_port)
    assert scrape.value("gateway_instances_refused_total", status="0xA700") == 1
    assert scrape.value("gateway_instances_received_total") == 0
    assert scrape.value("gateway_received_bytes_total") == 0
    assert scrape.value("gateway_disk_min_free_bytes") == 2**60
    assert low.call("status")["instances"] == 0


def test_healthz_503_while_shutting_down(tmp_path: Path, started: list[GatewayProcess]) -> None:
    gw, port = start(started, metrics_gateway(tmp_path / "gw"))
    assert http(port, "/healthz")[0] == 200
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, gw.port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        wait_until(lambda: Scrape(port).value("gateway_associations_open") == 1)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        # The listener is closed; the open association has shutdown_grace (5 s) to finish.
        wait_until(lambda: http(port, "/healthz")[0] == 503, timeout=4)
        body = http(port, "/healthz")[1]
        assert json.loads(body)["reason"] == "shutting down", body
        scrape = Scrape(port)
        assert scrape.value("gateway_dicom_listener_up") == 0
        assert scrape.value("gateway_associations_open") == 1
    finally:
        assoc.release()
    assert gw.proc.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection((HOST, port), timeout=2).close()


def test_endpoint_paths(tmp_path: Path, started: list[GatewayProcess]) -> None:
    gw, port = start(started, metrics_gateway(tmp_path / "gw"))
    assert http(port, "/")[0] == 404
    assert http(port, "/metrics/x")[0] == 404
    assert http(port, "/healthz", method="POST")[0] == 405
    assert http(port, "/healthz", method="HEAD")[0] == 200
    scrape = Scrape(port)
    assert scrape.value("gateway_build_info", version=gw.call("status")["version"]) == 1
    assert scrape.value("process_open_fds") > 0
    assert not any(name.endswith("_created") for name in scrape.names)
    # Prometheus's name[] selection, which goes by the names the collectors describe.
    status, text, _ = http(port, "/metrics?name[]=gateway_devices&name[]=gateway_store_bytes")
    assert status == 200
    served = {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] != "#"}
    assert served == {"gateway_devices", "gateway_store_bytes"}, text


# -- off by default; stopped with the gateway ---------------------------------------------------


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_off_by_default(tmp_path: Path, started: list[GatewayProcess]) -> None:
    gw = GatewayProcess(tmp_path / "gw")
    started.append(gw)
    gw.start()
    assert _listening_ports(gw.pid) == {gw.port}
    assert gw.call("status")["metrics"]["endpoint"] is None
    assert "metrics_listening" not in gw.log_text()
    assert Settings().metrics.port is None


@pytest.mark.asyncio
async def test_run_stops_the_endpoint(tmp_path: Path) -> None:
    """`run` starts the endpoint and its shutdown leaves neither its thread nor its socket."""
    port = free_port()
    settings = Settings(
        node={"host": HOST, "port": 0, "data_dir": tmp_path / "data", "shutdown_grace": 1},
        control={"socket": tmp_path / "control.sock"},
        metrics={"host": HOST, "port": port},
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        assert [t for t in threading.enumerate() if t.name == "metrics-http"]
        status, body, _ = await asyncio.to_thread(http, port, "/healthz")
        assert status == 200, body
        scrape = await asyncio.to_thread(Scrape, port)
        assert scrape.value("gateway_store_objects", level="instance") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not [t for t in threading.enumerate() if t.name == "metrics-http"]
    with pytest.raises(OSError):
        socket.create_connection((HOST, port), timeout=2).close()


# -- configuration --------------------------------------------------------------------------------


def test_config(tmp_path: Path) -> None:
    def load(**metrics: Any) -> Settings:
        return load_settings(write_config(tmp_path / "config.toml", {"metrics": metrics}))

    assert load().metrics.port is None and load().metrics.host == "127.0.0.1"
    # Prometheus scrapes over the network: any host may be bound (the endpoint holds no PHI).
    assert load(host="0.0.0.0", port=9464).metrics.port == 9464
    assert load(port=0).metrics.port == 0
    with pytest.raises(ConfigError, match=r"metrics\.port: Input should be less than or equal"):
        load(port=70000)
    with pytest.raises(ConfigError, match=r"metrics\.prot: unknown key"):
        load(prot=9464)


def test_shipped_config_lists_the_section() -> None:
    text = (REPO / "config.toml").read_text()
    assert re.search(r"^# \[metrics\]$", text, re.M), "config.toml lists [metrics], commented out"
    assert load_settings(REPO / "config.toml").metrics.port is None


# -- the example dashboard -------------------------------------------------------------------


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield from (_expressions(value) if isinstance(value, dict) else [value])
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_grafana_dashboard_uses_served_metrics(
    tmp_path: Path, started: list[GatewayProcess]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    expressions = list(_expressions(dashboard))
    assert len(expressions) > 20
    used = {name for expr in expressions for name in re.findall(r"\bgateway_[a-z_]+", expr)}
    _, port = start(started, metrics_gateway(tmp_path / "gw"))
    served = Scrape(port).names
    assert used - served == set(), f"the dashboard uses metrics no scrape serves: {used - served}"
    # Every panel's data source is the input.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("received", "latency", "open associations", "rejected", "jobs by state",
                    "deliveries", "retrieval", "store size", "disk free"):  # fmt: skip
        assert subject in titles, subject
