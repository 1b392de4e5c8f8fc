"""Months of uptime: nothing is left behind by an association or a connection, however it ends.

One gateway process serves a mixed load of thousands of associations and hundreds of control
connections: a full round, then a half one (~2,300 associations and connections in all).
Inbound: C-ECHO (pynetdicom and DCMTK), C-STORE, C-FIND, C-MOVE (with its sub-association to a
peer), C-GET, rejected associations, a dataset aborted half-way, peers that vanish
mid-association or mid-request, associations and bare connections left idle until the node's
timeouts end them. Outbound: C-ECHO of a peer, dispatch jobs, webhooks, retrieval from an
Orthanc archive by C-FIND then C-MOVE, and by C-GET. Control: Unix socket requests, TCP
requests refused before login, operator and device logins, TLS, device sessions with an
upload. Metrics: scrapes of /metrics and /healthz.

The gateway's open descriptors, threads and RSS are read from /proc: after a warm-up round (which
loads every code path once), a first round and a second (half as long, C-GET instead of C-MOVE
for the retrieval) must leave descriptors and threads where they started and RSS within a
small margin. Then it still answers, and SIGTERM
with an association open stops it within its grace period.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    CTImageStorage,
    Verification,
)

from gateway.control.auth import new_operator_token
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    OrthancProcess,
    dcmtk_env,
    free_port,
    require,
    self_signed_certificate,
    write_variant,
)
from tests.control.test_tcp import Line
from tests.scu.test_sender import Recorder
from tests.test_retrieve import make_study
from tests.test_routing import wait_until

pytestmark = pytest.mark.slow

CT = TEST_FILES / "CT_small.dcm"
CALLING = "LEAKSCU"
RSS_MARGIN = 12 * 2**20  # bytes a whole round may add (allocator arenas, caches filling)


# -- what the gateway holds, from /proc ---------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    rss: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.rss / 2**20:.1f} MiB"


def usage(pid: int) -> Usage:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Usage(fds, int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024)


def settled_usage(pid: int, target: Usage | None, timeout: float = 30.0) -> Usage:
    """Usage once descriptors and threads stop moving (idle worker threads exit, timeouts fire):
    at *target*'s counts, or steady for two seconds."""
    deadline = time.monotonic() + timeout
    last, steady_since = usage(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = usage(pid)
        if target is not None and (now.fds, now.threads) <= (target.fds, target.threads):
            return now
        if (now.fds, now.threads) != (last.fds, last.threads):
            last, steady_since = now, time.monotonic()
        elif target is None and time.monotonic() - steady_since > 2.0:
            return now
    return usage(pid)


# -- peers ----------------------------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server counting the POSTs it receives."""

    def __init__(self) -> None:
        self.posts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Site:
    gw: GatewayProcess
    recorder: Recorder
    webhook: WebhookReceiver
    vna: OrthancProcess
    tmp: Path
    operator_token: str
    control_port: int
    tls_port: int
    metrics_port: int
    cafile: Path
    device: dict[str, Any]
    task: dict[str, Any]
    sent_sops: list[tuple[str, str, str]]  # (study, series, sop) stored through C-STORE


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    recorder = Recorder()
    webhook = WebhookReceiver()
    token, hashed = new_operator_token()
    cert, key = self_signed_certificate(tmp_path)
    control_port, tls_port, metrics_port = free_port(), free_port(), free_port()
    gw = GatewayProcess(
        tmp_path / "gw",
        node={"acse_timeout": 5, "network_timeout": 5, "check_called_ae": True,
              "max_associations": 64},
        control={"tcp_port": control_port, "operator_token_hashes": [hashed]},
    )  # fmt: skip
    # The TLS control listener is a second gateway's (one gateway has one TCP listener).
    tls = GatewayProcess(
        tmp_path / "tls",
        control={"tcp_port": tls_port, "operator_token_hashes": [hashed],
                 "tls_cert": str(cert), "tls_key": str(key)},
    )  # fmt: skip
    vna = OrthancProcess(tmp_path / "vna", "VNA", {"gateway": ("GATEWAY", HOST, gw.port)})
    try:
        gw.write_config(**_sections(recorder, webhook, vna, retrieve="move",
                                    metrics_port=metrics_port))  # fmt: skip
        gw.start()
        tls.start()
        device = gw.call("devices.register", {"name": "MR 1", "modality": "MR"})
        sequence = gw.call("sequences.create", {"name": "T1"})
        task = gw.call("tasks.create", {"device_id": device["id"], "sequence_id": sequence["id"],
                                        "patient": {"id": "LEAK"}})  # fmt: skip
        # Uploads are taken only for a running task: start it (the device then disconnects;
        # the task stays STARTED, and each later login of the device is told it again).
        scanner = Line(control_port)
        assert scanner.call("auth.login", {"device_id": device["id"], "token": device["token"]})
        task = gw.call("tasks.start", {"task_id": task["id"]})
        scanner.close()
        yield Site(gw, recorder, webhook, vna, tmp_path, token, control_port, tls_port,
                   metrics_port, cert, device, task, [])  # fmt: skip
    finally:
        for process in (gw, tls):
            process.stop()
        vna.stop()
        recorder.stop()
        webhook.stop()


def _sections(
    recorder: Recorder,
    webhook: WebhookReceiver,
    vna: OrthancProcess,
    *,
    retrieve: str,
    metrics_port: int,
) -> dict[str, Any]:
    return {
        "metrics": {"host": HOST, "port": metrics_port},
        "peers": [
            {"name": "recorder", "ae_title": "RECORDER", "host": HOST, "port": recorder.port},
            {"name": "vna", "ae_title": "VNA", "host": HOST, "port": vna.port,
             "retrieve": retrieve},
        ],
        "webhooks": [{"name": "hook", "url": f"http://{HOST}:{webhook.port}/"}],
        "rules": [
            {"name": "route", "match": f'CallingAE == "{CALLING}"', "level": "series",
             "action": "route", "targets": ["recorder"], "quiet_seconds": 0.3},
            {"name": "notify", "match": f'CallingAE == "{CALLING}"', "level": "series",
             "action": "notify", "targets": ["hook"], "quiet_seconds": 0.3},
        ],
        "retrieve": {"primary": "vna", "anonymiser": "recorder", "stall_seconds": 10,
                     "retry_base_seconds": 0.2, "retry_max_seconds": 1.0},
        "projects": [{"name": "P1"}],
        "dispatch": {"retry_base_seconds": 0.2, "retry_max_seconds": 1.0},
    }  # fmt: skip


# -- the kinds of association ---------------------------------------------------------------------


def _ae() -> AE:
    ae = AE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _nodelay(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(site: Site, contexts: list[Any], **kwargs: Any) -> Any:
    ae = _ae()
    for context in contexts:
        ae.add_requested_context(context)
    handlers = [(evt.EVT_CONN_OPEN, _nodelay), *kwargs.pop("evt_handlers", [])]
    called = kwargs.pop("called", "GATEWAY")
    return ae.associate(HOST, site.gw.port, ae_title=called, evt_handlers=handlers, **kwargs)


def dcmtk(tool: str, site: Site, *args: str, files: tuple[str, ...] = ()) -> str:
    """Run a DCMTK tool against the gateway as LEAKSCU; fail on a non-zero exit."""
    result = subprocess.run(
        [require(tool), "-aet", CALLING, "-aec", "GATEWAY", *args, HOST, str(site.gw.port),
         *files],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{tool}: {result.stderr[-2000:]}"
    return result.stderr + result.stdout


def echo(site: Site, n: int) -> None:
    dcmtk("echoscu", site)


def store(site: Site, n: int) -> None:
    """One association storing two instances of a new series."""
    directory = site.tmp / "sent" / str(n)
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files, sops = [], []
    for k in range(2):
        sop = generate_uid()
        files.append(write_variant(CT, directory / f"{k}.dcm", StudyInstanceUID=study,
                                   SeriesInstanceUID=series, SOPInstanceUID=sop,
                                   PatientID="LEAK"))  # fmt: skip
        sops.append((study, series, sop))
    dcmtk("storescu", site, files=tuple(map(str, files)))
    site.sent_sops.extend(sops)


def _keys(site: Site, n: int, level: str) -> list[str]:
    study, series, sop = site.sent_sops[n % len(site.sent_sops)]
    keys = [f"QueryRetrieveLevel={level}", f"StudyInstanceUID={study}"]
    if level == "IMAGE":
        keys += [f"SeriesInstanceUID={series}", f"SOPInstanceUID={sop}"]
    return [arg for key in keys for arg in ("-k", key)]


def find(site: Site, n: int) -> None:
    dcmtk("findscu", site, "-S", *_keys(site, n, "STUDY"), "-k", "PatientName",
          "-k", "NumberOfStudyRelatedInstances")  # fmt: skip


def move(site: Site, n: int) -> None:
    dcmtk("movescu", site, "-S", "-aem", "RECORDER", *_keys(site, n, "IMAGE"))


def get(site: Site, n: int) -> None:
    directory = site.tmp / "got"
    directory.mkdir(parents=True, exist_ok=True)
    dcmtk("getscu", site, "-S", "-od", str(directory), *_keys(site, n, "IMAGE"))


def rejected(site: Site, n: int) -> None:
    """An association for another called AE title (the node checks it): A-ASSOCIATE-RJ."""
    result = subprocess.run(
        [require("echoscu"), "-aet", CALLING, "-aec", "NOT_GATEWAY", HOST, str(site.gw.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Association Rejected" in result.stderr, result.stderr


def aborted_mid_dataset(site: Site, n: int) -> None:
    """A C-STORE whose command and first dataset fragments arrive, then an A-ABORT."""
    assoc = _associate(site, [CTImageStorage], max_pdu=16384)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()
    request.Priority = 2
    request.DataSet = BytesIO(b"\x08\x00\x16\x00" + b"\x00" * 200_000)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = message.encode_msg(assoc.accepted_contexts[0].context_id, 16384)
    for _ in range(3):  # the command, then two pieces of the dataset
        assoc.dul.send_pdu(next(fragments))
    time.sleep(0.005)
    assoc.abort()


def vanished_mid_request(site: Site, n: int) -> None:
    """A peer whose connection drops (no A-RELEASE, no A-ABORT) after a C-STORE command."""
    assoc = _associate(site, [CTImageStorage])
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.shutdown(socket.SHUT_RDWR)
    assoc.abort()


def half_request(site: Site, n: int) -> None:
    """A connection that sends part of an A-ASSOCIATE-RQ and disappears."""
    with socket.create_connection((HOST, site.gw.port), timeout=5) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x01")


def idle_association(site: Site, n: int) -> Any:
    """An association that sends nothing more: the node's network timeout ends it."""
    assoc = _associate(site, [Verification])
    assert assoc.is_established
    return assoc


def idle_connection(site: Site, n: int) -> socket.socket:
    """A TCP connection that never sends an A-ASSOCIATE-RQ: the ARTIM timer ends it."""
    return socket.create_connection((HOST, site.gw.port), timeout=5)


# -- control connections and outbound work ------------------------------------------------------


def unix_control(site: Site, n: int) -> None:
    assert site.gw.call("status")["version"]


def tcp_refused(site: Site, n: int) -> None:
    line = Line(site.control_port)
    assert line.call("status")["error"]["code"] == -32001
    line.close()


def tcp_operator(site: Site, n: int) -> None:
    line = Line(site.control_port)
    assert line.call("auth.login", {"operator_token": site.operator_token})["result"]
    assert line.call("status")["result"]["version"]
    line.close()


def tls_operator(site: Site, n: int) -> None:
    context = ssl.create_default_context(cafile=str(site.cafile))
    line = Line(site.tls_port, context)
    assert line.call("auth.login", {"operator_token": site.operator_token})["result"]
    line.close()


def device_session(site: Site, n: int) -> None:
    line = Line(site.control_port)
    login = {"device_id": site.device["id"], "token": site.device["token"]}
    assert line.call("auth.login", login)["result"]
    assert "result" in line.call("devices.heartbeat")
    line.close()


def scrape(site: Site, n: int) -> None:
    """A Prometheus scrape (which reads the index on the gateway's loop), or a health check."""
    path = "/healthz" if n % 2 else "/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{HOST}:{site.metrics_port}{path}", timeout=30) as response:
        assert response.status == 200 and response.read()


def outbound_echo(site: Site, n: int) -> None:
    assert site.gw.call("echo", {"peer": "vna"})["status"] == 0


def upload(site: Site, n: int) -> None:
    line = Line(site.control_port)
    assert line.call("auth.login", {"device_id": site.device["id"], "token": site.device["token"]})
    data = os.urandom(3000)
    begin = line.call("uploads.begin", {"task_id": site.task["id"], "name": f"raw{n}.bin",
                                        "size": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    upload_id = begin["result"]["upload_id"]
    line.call("uploads.chunk", {"upload_id": upload_id, "offset": 0,
                                "data": base64.b64encode(data[:1000]).decode()})  # fmt: skip
    if n % 2:  # half finish, half disconnect mid-upload
        line.call("uploads.chunk", {"upload_id": upload_id, "offset": 1000,
                                    "data": base64.b64encode(data[1000:]).decode()})  # fmt: skip
        finished = line.call("uploads.finish", {"upload_id": upload_id})
        assert "result" in finished, finished
    line.close()


# -- the load -----------------------------------------------------------------------------------

Kind = Callable[[Site, int], Any]
ROUND: list[tuple[Kind, int]] = [
    (echo, 300), (store, 150), (find, 150), (move, 40), (get, 60), (rejected, 150),
    (aborted_mid_dataset, 100), (vanished_mid_request, 100), (half_request, 50),
    (unix_control, 200), (tcp_refused, 60), (tcp_operator, 60), (tls_operator, 40),
    (device_session, 40), (outbound_echo, 60), (upload, 10), (scrape, 100),
]  # fmt: skip


def run_round(site: Site, scale: float, studies: list[Any]) -> int:
    """One round of every kind (*scale* times the counts), eight at a time; return how many
    associations and connections it made."""
    made = 0
    for kind, count in ROUND:
        runs = max(1, int(count * scale))
        began = time.monotonic()
        # One device has one session at a time (a login ends its previous one), and its
        # uploads belong to it: its sessions go one at a time.
        with ThreadPoolExecutor(1 if kind in (upload, device_session) else 8) as pool:
            list(pool.map(lambda n, k=kind: k(site, n), range(runs)))  # type: ignore[misc]
        print(f"{kind.__name__} x{runs}: {time.monotonic() - began:.1f} s; {usage(site.gw.pid)}")
        made += runs
    # Kept idle until the node's timeouts (5 s) close them.
    idle = [idle_association(site, n) for n in range(max(1, int(20 * scale)))]
    bare = [idle_connection(site, n) for n in range(max(1, int(20 * scale)))]
    made += len(idle) + len(bare)
    made += retrieve(site, studies)
    wait_until(lambda: all(not a.is_established for a in idle), timeout=20)
    for sock in bare:
        sock.settimeout(10)
        assert sock.recv(1024) == b"" or True  # the node closes it (ARTIM expiry)
        sock.close()
    wait_until(lambda: _dispatch_idle(site), timeout=60)
    return made


def retrieve(site: Site, studies: list[Any]) -> int:
    """Retrieval of *studies* from the VNA: C-FIND, compare, C-MOVE (or C-GET), forward."""
    for study in studies:
        site.gw.call("retrieve.submit", {"project": "P1", "study_uid": study.uid})

    def settled() -> bool:
        counts = site.gw.call("retrieve.status", {"project": "P1"})["counts"]
        return bool(counts["Queued"] + counts["Processing"] == 0)

    wait_until(settled, timeout=120)
    counts = site.gw.call("retrieve.status", {"project": "P1"})["counts"]
    assert counts["Failed"] + counts["QueueFailed"] == 0, counts
    return 4 * len(studies)


def _dispatch_idle(site: Site) -> bool:
    jobs = site.gw.call("jobs.list", {"limit": 1000})["jobs"]
    return all(job["state"] in ("done", "failed", "cancelled") for job in jobs)


def make_studies(site: Site, name: str, count: int) -> list[Any]:
    studies = [
        make_study(site.tmp / name / str(n), f"MRN{name}{n}", f"ACC{name}{n}", (2,))
        for n in range(count)
    ]
    site.vna.upload(*(path for study in studies for path in study.files))
    return studies


@pytest.mark.timeout(480)
def test_thousands_of_associations_leave_nothing_behind(site: Site) -> None:
    pid = site.gw.pid
    start = settled_usage(pid, None)
    made = run_round(site, 0.05, make_studies(site, "warm", 2))
    warm = settled_usage(pid, start)
    first_made = run_round(site, 1.0, make_studies(site, "one", 8))
    first = settled_usage(pid, start)
    # The second round retrieves by C-GET, from the same archive.
    site.gw.write_config(**_sections(site.recorder, site.webhook, site.vna, retrieve="get",
                                     metrics_port=site.metrics_port))  # fmt: skip
    site.gw.call("rules.reload")
    second_made = run_round(site, 0.5, make_studies(site, "two", 4))
    second = settled_usage(pid, start)
    report = (
        f"start {start}; after warm-up ({made}) {warm}; after round 1 ({first_made}) {first};"
        f" after round 2 ({second_made}) {second}"
    )
    print(report)
    assert first_made + second_made > 2000
    # Descriptors and threads back where they were before any association; RSS steady.
    for after in (first, second):
        assert after.fds <= start.fds and after.threads <= start.threads, report
    assert second.rss - first.rss < RSS_MARGIN, report
    assert list((site.gw.data_dir / "tmp").iterdir()) == [], "temp files left behind"
    # Still answering, and stopped within its grace period with an association open.
    echo(site, 0)
    held = idle_association(site, 0)
    began = time.monotonic()
    assert site.gw.stop() == 0
    stopped_in = time.monotonic() - began
    grace = 5.0  # GatewayProcess's shutdown_grace
    assert stopped_in < grace + 3, f"stopped in {stopped_in:.1f} s, grace {grace} s"
    with contextlib.suppress(Exception):
        held.abort()
