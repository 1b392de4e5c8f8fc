#!/usr/bin/env python3
"""Scale benchmark: how the gateway holds up as its store fills.

One gateway (the *full* one) is filled through DICOM up to ``--instances`` small instances by
``--senders`` DCMTK ``storescu`` processes at once (``TCP_NODELAY=1``), each sending batches of a
few hundred files from a directory of its own. The files are made from two templates encoded once
with pydicom (pydicom's ``CT_small.dcm`` cut to 64x64 and ``MR_small.dcm``, ~10 KB each), whose
UIDs, patient, study and series values are patched into the encoded bytes per file. The data has
the shape of a real store: 4-18 instances per series, 1-4 series per study (~22 instances per
study, ~14k studies at 300k instances), a new patient for one study in three (a few thousand
patients, names ``FAMILY^GIVEN``), unique AccessionNumbers, StudyDates over 2014-2025, CT and MR.

At each checkpoint (default 1k, 10k, 100k, then every doubling up to N, and N), with the senders
stopped, it measures:

- **ingest**: instances/s of a probe batch (``--probe``, 2,000) sent over one association, to the
  full gateway and to a second gateway started with an empty store, alternately (``--rounds``
  rounds, order swapped each round); medians and the ratio full/empty. Probe instances stay in
  the full store (its count is read from ``status``);
- **C-FIND** (pynetdicom SCU, TCP_NODELAY, one association, each request timed from sending to
  its final response, median of ``--repeat``): STUDY level by PatientID, by PatientName prefix
  (``FAMILY^GIV*``), by StudyDate (one month), by AccessionNumber; SERIES level in a study;
  IMAGE level in a series; with the number of answers, so count-bound queries show;
- **status**: latency of ``status`` on the control socket (median of ``--repeat``);
- the index size (``index.sqlite`` with ``-wal`` and ``-shm``), the store's size on disk (``du``),
  the full gateway's RSS (its anonymous part: the file-backed rest is shared libraries) and peak
  RSS, and the machine's load average (other work skews all).

The fill rate between checkpoints (``--senders`` associations) is reported too. Before filling,
the senders are timed into DCMTK ``storescp --fork --ignore`` to show what they can send: the
gateway is the bottleneck when its fill rate is well below that. At the end (and at every
checkpoint with ``--restart-at-checkpoints``): the time to stop on SIGTERM, start-up time after
that clean stop (three times, alternated with a gateway on an empty store: a start is mostly
Python's imports, so the full/empty ratio is the figure), and start-up time after ``kill -9``
while the senders run (until the DICOM port answers a C-ECHO and ``status`` answers).

Printed: one table, a column per checkpoint, each figure with its ratio to the first checkpoint
(progress on stderr, the final table on stdout; ``--json PATH`` writes every figure). Everything
runs on 127.0.0.1; every process started is stopped on exit, Ctrl-C included.

Run from the repository root::

    python3 bench/scale.py --instances 20000 --checkpoints 1000,5000,20000
    python3 bench/scale.py --instances 1000000 --json scale.json --workdir /var/tmp/scale --keep

pynetdicom installs Python apps named ``storescu``/``echoscu`` that can shadow DCMTK's on PATH,
hence ``--dcmtk-bin`` (default /usr/bin).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, NoReturn

import pydicom
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.control.client import ControlClient  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402

HOST = "127.0.0.1"
AET = "SCALE"
Proc = subprocess.Popen[bytes]
Record = dict[str, Any]

_FAMILIES_TEXT = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ "
    "GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE "
    "HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES "
    "NGUYEN HILL FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS "
    "MULLER SCHMIDT SCHNEIDER FISCHER WEBER MEYER WAGNER BECKER SCHULZ HOFFMANN DUBOIS DURAND "
    "LEROY MOREAU ROSSI "
)
FAMILIES = tuple(_FAMILIES_TEXT.split())
_GIVENS_TEXT = (
    "JAMES MARY ROBERT PATRICIA JOHN JENNIFER MICHAEL LINDA DAVID ELIZABETH WILLIAM BARBARA "
    "RICHARD SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN CHRISTOPHER LISA DANIEL NANCY "
    "MATTHEW BETTY ANTHONY MARGARET MARK SANDRA DONALD ASHLEY STEVEN KIMBERLY PAUL EMILY "
    "ANDREW DONNA JOSHUA MICHELLE KENNETH CAROL KEVIN AMANDA BRIAN DOROTHY GEORGE MELISSA "
    "TIMOTHY DEBORAH HANS ANNA PIERRE MARIE GIULIA MARCO SOFIA LUCAS EMMA NOAH "
)
GIVENS = tuple(_GIVENS_TEXT.split())
STUDY_DESCRIPTIONS = {
    "CT": ("CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS W CONTRAST", "CT HEAD W/O CONTRAST"),
    "MR": ("MR BRAIN W/WO CONTRAST", "MR KNEE LEFT", "MR LUMBAR SPINE"),
}
SERIES_DESCRIPTIONS = {
    "CT": ("AXIAL 5MM", "AXIAL 1MM", "CORONAL MPR", "SAGITTAL MPR", "SCOUT"),
    "MR": ("T1 SAG", "T2 AX", "FLAIR AX", "DWI", "T1 POST GAD"),
}
FIRST_DAY, DAYS = date(2014, 1, 1), (date(2025, 12, 31) - date(2014, 1, 1)).days

# Every patched field: its placeholder in the template (same length as every value put there).
UID_ROOT = "1.2.826.0.1.3680043.8.498."
RUN = str(10**9 + time.time_ns() % 10**9)
UID_KINDS = {"sop": 1, "series": 2, "study": 3, "frame": 4}
MARKERS = {
    **{name: f"{UID_ROOT}{RUN}.{kind}.{'9' * 13}" for name, kind in UID_KINDS.items()},
    "pid": "QPATIDQQ",
    "pname": "QPATIENTNAME" + "Q" * 20,
    "birth": "19000101",
    "sex": "QX",
    "date": "19010101",
    "time": "QTIMEQ",
    "accession": "QACCESSIO",
    "study_desc": "QSTUDYDESC" + "Q" * 22,
    "series_desc": "QSERIESDESC" + "Q" * 21,
    "series_no": "9871",
    "instance_no": "987654",
}
FIELD_RE = re.compile("|".join(re.escape(m) for m in MARKERS.values()).encode())
FIELD_OF = {marker.encode(): name for name, marker in MARKERS.items()}


class BenchError(Exception):
    """A process did not start, a send failed, or instances went missing."""


# -- templates and data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """An encoded file cut at its patched fields: parts[0] field parts[1] field ... parts[-1]."""

    parts: tuple[bytes, ...]
    fields: tuple[str, ...]

    def render(self, values: dict[str, bytes]) -> bytes:
        out = [self.parts[0]]
        for name, part in zip(self.fields, self.parts[1:], strict=True):
            out += (values[name], part)
        return b"".join(out)


def _marked_dataset(name: str) -> Dataset:
    """pydicom's test file *name* without private tags, its patched fields set to markers."""
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise BenchError(f"pydicom's test file {name} is missing")
    ds = pydicom.dcmread(path)
    ds.remove_private_tags()
    for keyword in ("DataSetTrailingPadding", "OtherPatientIDsSequence", "InstanceCreatorUID"):
        if keyword in ds:
            delattr(ds, keyword)
    if ds.Rows == 128:  # CT_small: keep every other pixel (64x64, 8 KB)
        ds.PixelData = ds.pixel_array[::2, ::2].tobytes()
        ds.Rows = ds.Columns = 64
        ds.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID(MARKERS["sop"])
    ds.SeriesInstanceUID, ds.StudyInstanceUID = MARKERS["series"], MARKERS["study"]
    ds.FrameOfReferenceUID = MARKERS["frame"]
    ds.PatientID, ds.PatientName = MARKERS["pid"], MARKERS["pname"]
    ds.PatientBirthDate, ds.PatientSex = MARKERS["birth"], MARKERS["sex"]
    for prefix in ("Study", "Series", "Acquisition", "Content", "InstanceCreation"):
        if f"{prefix}Date" in ds:
            setattr(ds, f"{prefix}Date", MARKERS["date"])
            setattr(ds, f"{prefix}Time", MARKERS["time"])
    ds.AccessionNumber, ds.StudyDescription = MARKERS["accession"], MARKERS["study_desc"]
    ds.SeriesDescription = MARKERS["series_desc"]
    ds.SeriesNumber, ds.InstanceNumber = MARKERS["series_no"], MARKERS["instance_no"]
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def build_template(name: str) -> Template:
    """Encode pydicom's *name* once with markers in place; cut it at every marker."""
    settings = pydicom_config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds = _marked_dataset(name)
        path = Path(tempfile.mkstemp(suffix=".dcm")[1])
        try:
            ds.save_as(path, enforce_file_format=True)
            data = path.read_bytes()
        finally:
            path.unlink()
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    header = data[: -len(ds.PixelData)]
    if not data.endswith(ds.PixelData):
        raise BenchError(f"{name}: Pixel Data does not end the template")
    parts, fields, start = [], [], 0
    for match in FIELD_RE.finditer(header):
        parts.append(header[start : match.start()])
        fields.append(FIELD_OF[match.group()])
        start = match.end()
    parts.append(data[start:])
    if set(fields) != set(MARKERS) or fields.count("sop") != 2:
        raise BenchError(f"{name}: template fields not where expected: {sorted(fields)}")
    return Template(tuple(parts), tuple(fields))


def fixed(value: str, width: int) -> bytes:
    """*value* padded with spaces to *width* bytes (every patched field keeps its length)."""
    data = value.encode()
    if len(data) > width:
        raise BenchError(f"{value!r} is longer than its field ({width})")
    return data.ljust(width)


@dataclass
class Known:
    """Values of the first study, queried at every checkpoint."""

    patient_id: str = ""
    family: str = ""
    given: str = ""
    accession: str = ""
    month: str = ""  # YYYYMM
    study_uid: str = ""
    series_uid: str = ""


class Shape:
    """An endless stream of instances shaped like a real store: (template, field values)."""

    def __init__(self, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self._templates = {
            "CT": build_template("CT_small.dcm"),
            "MR": build_template("MR_small.dcm"),
        }
        self._counters = dict.fromkeys(UID_KINDS, 10**12)
        self._patients: list[dict[str, bytes]] = []
        self._studies = 0
        self.known = Known()
        self._stream = self._instances()
        self._lock = threading.Lock()

    def uid(self, kind: str) -> bytes:
        self._counters[kind] += 1
        return f"{UID_ROOT}{RUN}.{UID_KINDS[kind]}.{self._counters[kind]}".encode()

    def take(self, n: int) -> list[tuple[Template, dict[str, bytes]]]:
        """The next *n* instances (thread-safe)."""
        with self._lock:
            return [next(self._stream) for _ in range(n)]

    def _patient(self) -> dict[str, bytes]:
        rng = self._rng
        if self._patients and rng.random() >= 1 / 3:
            return rng.choice(self._patients)
        name = f"{rng.choice(FAMILIES)}^{rng.choice(GIVENS)}"
        birth = FIRST_DAY - timedelta(days=rng.randrange(90 * 365))
        patient = {
            "pid": f"P{1_000_000 + len(self._patients)}".encode(),
            "pname": fixed(name, len(MARKERS["pname"])),
            "birth": birth.strftime("%Y%m%d").encode(),
            "sex": fixed(rng.choice("MF"), 2),
        }
        self._patients.append(patient)
        return patient

    def _study(self) -> tuple[str, dict[str, bytes]]:
        rng = self._rng
        self._studies += 1
        modality = rng.choice(("CT", "CT", "CT", "MR", "MR"))
        day = FIRST_DAY + timedelta(days=rng.randrange(DAYS))
        study = {
            **self._patient(),
            "study": self.uid("study"),
            "date": day.strftime("%Y%m%d").encode(),
            "time": f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}00".encode(),
            "accession": f"A{10**7 + self._studies}".encode(),
            "study_desc": fixed(rng.choice(STUDY_DESCRIPTIONS[modality]), 32),
        }
        return modality, study

    def _instances(self) -> Iterator[tuple[Template, dict[str, bytes]]]:
        rng = self._rng
        while True:
            modality, study = self._study()
            template = self._templates[modality]
            for series_no in range(1, rng.choice((1, 1, 1, 2, 2, 3, 4)) + 1):
                values = {**study, "series": self.uid("series"), "frame": self.uid("frame")}
                values["series_no"] = fixed(str(series_no), 4)
                values["series_desc"] = fixed(rng.choice(SERIES_DESCRIPTIONS[modality]), 32)
                self._remember(values)
                for number in range(1, rng.randrange(4, 19) + 1):
                    yield (
                        template,
                        {**values, "sop": self.uid("sop"), "instance_no": fixed(str(number), 6)},
                    )

    def _remember(self, values: dict[str, bytes]) -> None:
        if self.known.study_uid:
            return
        family, given = values["pname"].decode().strip().split("^")
        self.known = Known(
            values["pid"].decode(),
            family,
            given,
            values["accession"].decode(),
            values["date"].decode()[:6],
            values["study"].decode(),
            values["series"].decode(),
        )


def write_batch(directory: Path, items: list[tuple[Template, dict[str, bytes]]]) -> int:
    """Write *items* as 000000.dcm... in *directory*, removing files left from a longer batch."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, (template, values) in enumerate(items):
        (directory / f"{n:06d}.dcm").write_bytes(template.render(values))
    n = len(items)
    while (stale := directory / f"{n:06d}.dcm").exists():
        stale.unlink()
        n += 1
    return len(items)


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start *argv* in a session of its own (a Ctrl-C reaches only us), output appended to *log*."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            env={**os.environ, "TCP_NODELAY": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def terminate(proc: Proc | None, grace: float = 30.0) -> None:
    """SIGTERM *proc*'s process group and wait; SIGKILL it if it will not stop."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(port: int, aet: str, timeout: float = 120.0) -> Association:
    """A pynetdicom association (TCP_NODELAY) offering Verification and Study Root C-FIND."""
    ae = AE(ae_title="SCALEQ")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(HOST, port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise BenchError(f"no association with {aet} on port {port}")
    return assoc


@dataclass
class Node:
    """One gateway process with a config and a store of its own."""

    name: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    started_at: float = 0.0

    @property
    def socket_path(self) -> Path:
        return self.root / "control.sock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(
            f'[node]\nae_title = "{AET}"\nhost = "{HOST}"\nport = {self.port}\n'
            f'data_dir = "{self.data}"\nmax_associations = 64\n'
            f'[control]\nsocket = "{self.socket_path}"\n[log]\nlevel = "warning"\nformat = "json"\n'
            # the probe's C-FIND association is an unknown caller: let it query
            '[security]\ndefault_services = ["echo", "store", "find"]\n'
        )
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        self.started_at = time.perf_counter()
        self.proc = spawn(argv, self.root / "gateway.log", {"PYTHONPATH": str(REPO)})

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Seconds from start until a C-ECHO and `status` are answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited: {self.log_tail()}")
            if self._answers():
                return time.perf_counter() - self.started_at
            time.sleep(0.02)
        raise BenchError(f"{self.name} not ready in {timeout:.0f}s: {self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1):
                pass
            assoc = associate(self.port, AET, timeout=10)
            try:
                echoed = assoc.send_c_echo()
            finally:
                assoc.release()
            if not echoed or echoed.Status != 0:
                return False
            self.status()
            return True
        except (OSError, BenchError, GatewayError):
            return False

    def status(self) -> Record:
        with ControlClient(self.socket_path, timeout=600) as control:
            return dict(control.call("status"))

    def stop(self) -> float:
        """SIGTERM; the seconds until the process exited."""
        t0 = time.perf_counter()
        terminate(self.proc, grace=120)
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self) -> str:
        path = self.root / "gateway.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def memory_kb(self) -> dict[str, int]:
        """VmRSS, VmHWM, RssAnon and RssFile of the process, in KiB."""
        try:
            text = Path(f"/proc/{self.proc.pid if self.proc else 0}/status").read_text()
        except OSError:
            return {}
        return {
            ln.split(":")[0]: int(ln.split()[1])
            for ln in text.splitlines()
            if ln.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:"))
        }


# -- sending ---------------------------------------------------------------------------------


def storescu(dcmtk: Path, directory: Path, port: int, aet: str, calling: str) -> list[str]:
    """The argv of one DCMTK storescu association sending every file of *directory*."""
    return [
        str(dcmtk / "storescu"),
        "+sd",
        "-td",
        "300",
        "-aet",
        calling,
        "-aec",
        aet,
        HOST,
        str(port),
        str(directory),
    ]


class Senders:
    """``count`` parallel storescu senders, each sending batches from a directory of its own."""

    def __init__(self, shape: Shape, dcmtk: Path, workdir: Path, count: int, batch: int) -> None:
        self.shape, self.dcmtk, self.batch = shape, dcmtk, batch
        self.dirs = [workdir / "batches" / str(i) for i in range(count)]
        self.procs: set[Proc] = set()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._left = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.sent = 0
        self.generate_seconds = 0.0

    def start(self, instances: int, port: int, aet: str = AET) -> None:
        """Begin sending *instances* to *port*; `join` waits for the end."""
        self._left, self.sent, self.errors = instances, 0, []
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._run, args=(i, port, aet), daemon=True)
            for i in range(len(self.dirs))
        ]
        for thread in self._threads:
            thread.start()

    def _next(self) -> int:
        with self._lock:
            n = 0 if self._stopping.is_set() else min(self.batch, self._left)
            self._left -= n
            return n

    def _run(self, i: int, port: int, aet: str) -> None:
        while (n := self._next()) > 0:
            t0 = time.perf_counter()
            write_batch(self.dirs[i], self.shape.take(n))
            with self._lock:
                self.generate_seconds += time.perf_counter() - t0
            argv = storescu(self.dcmtk, self.dirs[i], port, aet, f"FILL{i}")
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True,
            )
            with self._lock:
                self.procs.add(proc)
            output = proc.communicate()[0].decode(errors="replace")
            with self._lock:
                self.procs.discard(proc)
                if proc.returncode != 0 or re.search(r"^[EF]: ", output, re.M):
                    self.errors.append(f"storescu exit {proc.returncode}: {output[-1500:]}")
                    self._stopping.set()
                else:
                    self.sent += n

    def join(self) -> None:
        """Wait for every sender; raise if one failed."""
        for thread in self._threads:
            while thread.is_alive():
                thread.join(0.5)
        if self.errors:
            raise BenchError(self.errors[0])

    def abort(self) -> None:
        """Stop now: no new batch, running storescu killed."""
        self._stopping.set()
        with self._lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # ended and reaped meanwhile
                    os.killpg(proc.pid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(30)

    def send(self, instances: int, port: int, aet: str = AET) -> float:
        """Send *instances* and wait; return the seconds."""
        t0 = time.perf_counter()
        self.start(instances, port, aet)
        self.join()
        return time.perf_counter() - t0


def wait_for_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port}")


def calibrate(args: argparse.Namespace, workdir: Path) -> Record:
    """What the senders reach into DCMTK ``storescp --fork --ignore`` (receives, stores nothing)."""
    senders = Senders(
        Shape(seed=2), args.dcmtk_bin, workdir / "calibrate", args.senders, args.batch
    )
    port = free_port()
    argv = [str(args.dcmtk_bin / "storescp"), "--fork", "--ignore", "-aet", AET, str(port)]
    proc = spawn(argv, workdir / "storescp.log")
    try:
        wait_for_port(port, proc)
        count = args.senders * args.batch * 3
        seconds = senders.send(count, port)
    finally:
        senders.abort()
        terminate(proc)
        shutil.rmtree(workdir / "calibrate", ignore_errors=True)
    return {
        "instances": count,
        "send_rate": count / seconds,
        "generate_rate": count / senders.generate_seconds,
    }


# -- measurements ----------------------------------------------------------------------------


def probe_once(args: argparse.Namespace, shape: Shape, node: Node, directory: Path) -> float:
    """Send a fresh probe batch to *node* on one association; return instances/s."""
    write_batch(directory, shape.take(args.probe))
    os.sync()  # write-back of the probe files must not fall on the receiver's fsyncs
    before = node.status()["instances"]
    argv = storescu(args.dcmtk_bin, directory, node.port, AET, "PROBE")
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=3600, check=False
    )
    seconds = time.perf_counter() - t0
    output = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0 or re.search(r"^[EF]: ", output, re.M):
        raise BenchError(f"probe to {node.name} failed: {output[-1500:]}")
    if (got := node.status()["instances"] - before) != args.probe:
        raise BenchError(f"{node.name} took {got} of {args.probe} probe instances")
    return float(args.probe / seconds)


def ingest_probe(args: argparse.Namespace, shape: Shape, full: Node, workdir: Path) -> Record:
    """Probe rates of *full* and of a fresh gateway with an empty store, in alternating order."""
    empty = Node("empty", workdir / "empty")
    rates: dict[str, list[float]] = {"full": [], "empty": []}
    try:
        empty.start()
        empty.wait_ready(120)
        for rnd in range(args.rounds):
            for node in (full, empty) if rnd % 2 == 0 else (empty, full):
                rates[node.name].append(probe_once(args, shape, node, workdir / "probe"))
                print(f"  probe {node.name}: {rates[node.name][-1]:.0f} inst/s", file=sys.stderr)
    finally:
        empty.stop()
        shutil.rmtree(empty.root, ignore_errors=True)
    full_rate, empty_rate = (statistics.median(rates[k]) for k in ("full", "empty"))
    return {
        "full": full_rate,
        "empty": empty_rate,
        "ratio": full_rate / empty_rate,
        "rounds": rates,
    }


RETURN_KEYS = {
    "STUDY": (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
    ),
}


def identifier(level: str, **match: str) -> Dataset:
    """A Study Root C-FIND identifier: the usual return keys of *level*, *match* set."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        value = match.get(keyword, "")
        ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE))
    return ds


def queries(known: Known) -> dict[str, Dataset]:
    month = known.month
    return {
        "study by PatientID": identifier("STUDY", PatientID=known.patient_id),
        "study by PatientName prefix": identifier(
            "STUDY", PatientName=f"{known.family}^{known.given[:3]}*"
        ),
        "study by StudyDate month": identifier("STUDY", StudyDate=f"{month}01-{month}31"),
        "study by AccessionNumber": identifier("STUDY", AccessionNumber=known.accession),
        "series in study": identifier("SERIES", StudyInstanceUID=known.study_uid),
        "image in series": identifier(
            "IMAGE", StudyInstanceUID=known.study_uid, SeriesInstanceUID=known.series_uid
        ),
    }


def time_find(assoc: Association, query: Dataset) -> tuple[float, int]:
    """Seconds from sending *query* to its final response, and the number of matches."""
    t0 = time.perf_counter()
    answers = 0
    for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise BenchError("C-FIND: no response (timeout or abort)")
        if status.Status in (0xFF00, 0xFF01):
            answers += 1
        elif status.Status != 0:
            raise BenchError(f"C-FIND failed with status 0x{status.Status:04X}")
    return time.perf_counter() - t0, answers


def find_latencies(node: Node, known: Known, repeat: int) -> Record:
    """Median C-FIND latency (ms) and answer count of every query, on one association."""
    assoc = associate(node.port, AET)
    out: Record = {}
    try:
        for name, query in queries(known).items():
            runs = [time_find(assoc, query) for _ in range(repeat)]
            ms = statistics.median(seconds for seconds, _ in runs) * 1000
            out[name] = {"ms": ms, "answers": runs[-1][1]}
    finally:
        assoc.release()
    return out


def status_latency(node: Node, repeat: int) -> tuple[float, Record]:
    """Median milliseconds of `status` on one control connection, and the last answer."""
    times, answer = [], {}
    with ControlClient(node.socket_path, timeout=600) as control:
        for _ in range(repeat):
            t0 = time.perf_counter()
            answer = control.call("status")
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, answer


def disk_usage(node: Node) -> Record:
    """The index's size (with -wal and -shm) and the store's size on disk, in bytes."""
    index = sum(p.stat().st_size for p in node.data.glob("index.sqlite*"))
    du = subprocess.run(
        ["du", "-s", "-B1", str(node.data)], capture_output=True, text=True, check=True
    )
    wal = node.data / "index.sqlite-wal"
    return {
        "index_bytes": index,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "store_bytes": int(du.stdout.split()[0]),
    }


def restarts(args: argparse.Namespace, full: Node, senders: Senders, workdir: Path) -> Record:
    """Stop on SIGTERM and start again, alternated with a gateway on an empty store (medians of
    three each: a start is mostly Python's imports, which the machine's load moves, so only the
    ratio of the two says what the store's size costs); then kill -9 the full one while the
    senders run and start it again."""
    empty = Node("empty", workdir / "empty-start")
    stops: dict[str, list[float]] = {"full": [], "empty": []}
    starts: dict[str, list[float]] = {"full": [], "empty": []}
    try:
        empty.start()
        empty.wait_ready(120)
        for rnd in range(3):
            for node in (full, empty) if rnd % 2 == 0 else (empty, full):
                stops[node.name].append(node.stop())
                node.start()
                starts[node.name].append(node.wait_ready())
    finally:
        empty.stop()
        shutil.rmtree(empty.root, ignore_errors=True)
    stop_seconds, clean, clean_empty = (
        statistics.median(values) for values in (stops["full"], starts["full"], starts["empty"])
    )
    held = full.status()["instances"]
    senders.start(10**12, full.port)
    deadline = time.monotonic() + 120
    while full.status()["instances"] < held + args.batch and time.monotonic() < deadline:
        time.sleep(0.2)
    before_kill = full.status()["instances"]
    full.kill()
    senders.abort()
    full.start()
    unclean = full.wait_ready()
    after = full.status()["instances"]
    print(
        f"  restart: stop {stop_seconds:.2f}s, clean start {clean:.2f}s (empty store"
        f" {clean_empty:.2f}s), start after kill -9 {unclean:.2f}s ({before_kill} held before"
        f" the kill, {after} after)",
        file=sys.stderr,
    )
    return {
        "stop_s": stop_seconds,
        "clean_start_s": clean,
        "empty_clean_start_s": clean_empty,
        "clean_start_ratio": clean / clean_empty,
        "starts": starts,
        "unclean_start_s": unclean,
        "held_before_kill": before_kill,
        "held_after_restart": after,
    }


def measure(args: argparse.Namespace, shape: Shape, full: Node, workdir: Path) -> Record:
    """Every figure of one checkpoint, the senders stopped."""
    status_ms, status = status_latency(full, args.repeat)
    record: Record = {key: status[key] for key in ("patients", "studies", "series", "instances")}
    record["status_ms"] = status_ms
    record["find"] = find_latencies(full, shape.known, args.repeat)
    record |= disk_usage(full)
    memory = full.memory_kb()
    record |= {"rss_kb": memory.get("VmRSS"), "peak_rss_kb": memory.get("VmHWM")}
    record |= {"rss_anon_kb": memory.get("RssAnon"), "rss_file_kb": memory.get("RssFile")}
    record["ingest"] = ingest_probe(args, shape, full, workdir)
    record["load_1min"] = os.getloadavg()[0]  # other work on the machine skews every figure
    return record


def fill(senders: Senders, full: Node, target: int) -> Record:
    """Send until *full* holds *target* instances; the count and rate of this fill."""
    held = full.status()["instances"]
    count = max(0, target - held)
    if not count:
        return {"fill_instances": 0, "fill_rate": None}
    senders.generate_seconds = 0.0
    seconds = senders.send(count, full.port)
    if (now := full.status()["instances"]) != held + count:
        raise BenchError(f"the gateway holds {now} instances; {held} + {count} were sent")
    rate = count / seconds
    print(f"filled {count} in {seconds:.1f}s: {rate:.0f} inst/s", file=sys.stderr)
    return {
        "fill_instances": count,
        "fill_seconds": seconds,
        "fill_rate": rate,
        "fill_generate_seconds": senders.generate_seconds,
    }


@dataclass
class Running:
    """What `main` stops on the way out."""

    nodes: list[Node] = field(default_factory=list)
    senders: list[Senders] = field(default_factory=list)


def run(args: argparse.Namespace, workdir: Path, running: Running) -> Record:
    """Calibrate the senders, fill and measure at every checkpoint, then time the restarts."""
    capacity = calibrate(args, workdir)
    print(
        f"senders into storescp --ignore: {capacity['send_rate']:.0f} inst/s"
        f" (generation {capacity['generate_rate']:.0f} files/s)",
        file=sys.stderr,
    )
    shape = Shape()
    senders = Senders(shape, args.dcmtk_bin, workdir, args.senders, args.batch)
    running.senders.append(senders)
    full = Node("full", workdir / "full")
    running.nodes.append(full)
    full.start()
    full.wait_ready(120)
    report: Record = {"capacity": capacity, "checkpoints": [], "cpus": os.cpu_count()}
    for checkpoint in args.checkpoints:
        record = {"checkpoint": checkpoint, **fill(senders, full, checkpoint)}
        record |= measure(args, shape, full, workdir)
        if args.restart_at_checkpoints:
            record["restart"] = restarts(args, full, senders, workdir)
        report["checkpoints"].append(record)
        print(table(report), file=sys.stderr)
    if not args.restart_at_checkpoints:
        report["restart"] = restarts(args, full, senders, workdir)
    report["known"] = vars(shape.known)
    return report


# -- report ----------------------------------------------------------------------------------

Getter = Callable[[Record], Any]


def find_figure(name: str, key: str) -> Getter:
    return lambda record: record["find"][name][key]


def rows() -> list[tuple[str, Getter, str]]:
    """The table's rows: label, the figure in a checkpoint record, its format."""
    out: list[tuple[str, Getter, str]] = [
        ("instances held", lambda r: r["instances"], "{:.0f}"),
        ("studies", lambda r: r["studies"], "{:.0f}"),
        ("patients", lambda r: r["patients"], "{:.0f}"),
        ("fill rate, all senders (inst/s)", lambda r: r["fill_rate"], "{:.0f}"),
        ("ingest probe full (inst/s)", lambda r: r["ingest"]["full"], "{:.0f}"),
        ("ingest probe empty (inst/s)", lambda r: r["ingest"]["empty"], "{:.0f}"),
        ("ingest full/empty", lambda r: r["ingest"]["ratio"], "{:.2f}"),
    ]
    for name in queries(Known()):
        out.append((f"C-FIND {name} (ms)", find_figure(name, "ms"), "{:.1f}"))
        out.append(("  answers", find_figure(name, "answers"), "{:.0f}"))
    out += [
        ("status (ms)", lambda r: r["status_ms"], "{:.1f}"),
        ("index + wal (MB)", lambda r: r["index_bytes"] / 1e6, "{:.1f}"),
        ("  of which wal (MB)", lambda r: r["wal_bytes"] / 1e6, "{:.1f}"),
        ("store on disk (MB)", lambda r: r["store_bytes"] / 1e6, "{:.0f}"),
        ("RSS (MB)", lambda r: r["rss_kb"] / 1024, "{:.0f}"),
        ("  of which anonymous (MB)", lambda r: r["rss_anon_kb"] / 1024, "{:.0f}"),
        ("peak RSS (MB)", lambda r: r["peak_rss_kb"] / 1024, "{:.0f}"),
        ("load average, 1 min", lambda r: r["load_1min"], "{:.1f}"),
        ("stop on SIGTERM (s)", lambda r: r["restart"]["stop_s"], "{:.2f}"),
        ("start after clean stop (s)", lambda r: r["restart"]["clean_start_s"], "{:.2f}"),
        ("  empty store, same time (s)", lambda r: r["restart"]["empty_clean_start_s"], "{:.2f}"),
        ("  full/empty", lambda r: r["restart"]["clean_start_ratio"], "{:.2f}"),
        ("start after kill -9 (s)", lambda r: r["restart"]["unclean_start_s"], "{:.2f}"),
    ]
    return out


def cell(record: Record, first: Record, getter: Getter, fmt: str) -> str:
    """One figure and its ratio to the first checkpoint's, or '-' if not measured."""
    try:
        value = getter(record)
    except (KeyError, TypeError):
        return "-"
    try:
        base = getter(first)
    except (KeyError, TypeError):
        base = None
    if value is None:
        return "-"
    ratio = f" ({value / base:.2f}x)" if base else ""
    return fmt.format(value) + ratio


def table(report: Record) -> str:
    """Markdown: a column per checkpoint, each figure with its ratio to the first checkpoint."""
    records = report["checkpoints"]
    if "restart" in report and records:
        records = [*records[:-1], {**records[-1], "restart": report["restart"]}]
    first = records[0]
    head = ["| figure |", *(f" {r['checkpoint']:,} |" for r in records)]
    out = ["".join(head), "|---|" + "---:|" * len(records)]
    for label, getter, fmt in rows():
        cells = [cell(r, first, getter, fmt) for r in records]
        if any(c != "-" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- command line ----------------------------------------------------------------------------


def count(text: str) -> int:
    """An instance count: 20000, 20k or 1M."""
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def default_checkpoints(total: int) -> list[int]:
    points = [c for c in (1000, 10_000, 100_000) if c < total]
    doubling = 200_000
    while doubling < total:
        points.append(doubling)
        doubling *= 2
    return [*points, total]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--instances", type=count, required=True, help="fill the store up to N")
    p.add_argument("--checkpoints", help="e.g. 1k,10k,100k (default: those, doublings, N)")
    p.add_argument("--senders", type=int, default=4, help="parallel storescu (default 4)")
    p.add_argument("--batch", type=int, default=300, help="files per sender batch (default 300)")
    p.add_argument("--probe", type=count, default=2000, help="probe batch (default 2000)")
    p.add_argument("--rounds", type=int, default=2, help="probe alternations (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="runs per latency median (default 5)")
    p.add_argument("--restart-at-checkpoints", action="store_true")
    p.add_argument("--workdir", type=Path, help="default: a temp dir")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--dcmtk-bin", type=Path, default=Path("/usr/bin"), help="default /usr/bin")
    args = p.parse_args()
    points = [count(c) for c in args.checkpoints.split(",")] if args.checkpoints else None
    args.checkpoints = sorted({*(points or default_checkpoints(args.instances)), args.instances})
    if args.checkpoints[-1] > args.instances or min(args.senders, args.batch, args.probe) < 1:
        p.error("checkpoints must not exceed --instances; senders, batch, probe at least 1")
    if args.rounds < 2 or args.repeat < 1:
        p.error("need at least 2 probe rounds and 1 repeat")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"{args.workdir} is not empty")
    return args


def _interrupted(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gateway-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    running = Running()
    try:
        report = run(args, workdir, running)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for senders in running.senders:
            senders.abort()
        for node in running.nodes:
            node.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    capacity = report["capacity"]
    print(
        f"Senders: {args.senders} x storescu, batches of {args.batch}; into storescp --ignore"
        f" {capacity['send_rate']:.0f} inst/s; {os.cpu_count()} CPUs.\n"
    )
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), **report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
