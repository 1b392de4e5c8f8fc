#!/usr/bin/env python3
"""Ingest benchmark: how fast the gateway takes C-STOREs, beside the reference peers.

Times DCMTK ``storescu`` (``TCP_NODELAY=1``) sending CT over loopback in three scenarios:
``small x1`` (200 x 64x64 16-bit, ~10 KB, one association), ``small x4`` (four storescu at once,
200 small each, first start to last exit) and ``large x1`` (200 x 512x512, ~513 KB). Receivers,
configured as ``shared/bench/README.md`` says, on free loopback ports with fresh temp directories:
the gateway, Orthanc (SQLite index, fsync on), the minimal pynetdicom SCP (the floor of any
pynetdicom receiver) and DCMTK ``storescp`` (files only, the C++ ceiling).

Every send carries fresh SOP Instance UIDs (re-sends are duplicates): templates encoded once with
pydicom are copied per send with new UIDs and instance numbers patched in, then ``sync``ed so that
write-back of test files does not fall on a receiver's fsyncs. Rounds alternate the receiver order
(A B C D, D C B A, ...); after each send the receiver's instance count is checked and a shortfall
or a failed storescu stops the run. Reported: medians of instances/s and MB/s (10^6 bytes of
files), the gateway's ratios to the minimal SCP and to Orthanc, peak RSS (VmHWM) of each receiver.

Nothing is deleted until the run ends: on ext4 without a journal, creating a file skips every
inode of its group deleted in the last 60-300 s (the kernel's ``recently_deleted`` check), so
files removed between sends made each later receiver's file creation slower (measured up to
~0.8 ms per file, against ~0.02 ms). ``file_create_us``, probed before the first send, says
what creation cost on the run's filesystem; above ~100 us the figures are bounded by it (a run
started minutes after another's cleanup, or after the test suite, meets it).

Run from the repository root (progress on stderr, Markdown on stdout; temp files, ~1.5 GB at three
rounds, go under $TMPDIR and are removed at the end)::

    python3 bench/ingest.py [--rounds 3] [--out results.json]
    python3 bench/ingest.py --receivers orthanc,minimal,storescp --rounds 1

pynetdicom installs Python apps named ``storescu``/``echoscu`` that can shadow DCMTK's on PATH,
hence ``--dcmtk-bin`` (default /usr/bin).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

HOST = "127.0.0.1"
PER_SET = 200
ALL_RECEIVERS = ("gateway", "orthanc", "minimal", "storescp")
SCENARIOS = (("small x1", "small", 1), ("small x4", "small", 4), ("large x1", "large", 1))
REPO = Path(__file__).resolve().parents[1]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NUMBER_PLACEHOLDER = b"-77777"  # InstanceNumber (IS) of the templates, patched per file
Proc = subprocess.Popen[bytes]
Record = dict[str, Any]


class BenchError(Exception):
    """A receiver did not start, a send failed, or instances went missing."""


class UidSource:
    """Fresh UIDs, all of one length, so that they can be patched into template bytes."""

    def __init__(self) -> None:
        self._root = f"1.2.826.0.1.3680043.8.498.{10**10 + time.time_ns() % 10**10}"
        self._next = 10**9
        self.placeholder = f"{self._root}.{'9' * 10}"  # never issued

    def __call__(self) -> bytes:
        self._next += 1
        return f"{self._root}.{self._next}".encode()


@dataclass(frozen=True)
class Template:
    header: bytes  # everything before the Pixel Data value, placeholders included
    pixels: bytes  # the Pixel Data value, which ends the file
    placeholder: bytes


def build_template(size: int, placeholder: str, series_number: int) -> Template:
    """A CT instance of size x size 16-bit pixels with realistic patient/study/series data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID(placeholder)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet, ds.ImageType = "ISO_IR 100", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240314"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = f"ACC{series_number:04d}", "CT", "Bench"
    ds.InstitutionName, ds.ReferringPhysicianName = "Ingest Bench Hospital", "Doe^Jane"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST W/O CONTRAST", f"AXIAL {size}"
    ds.PatientName, ds.PatientID = "Bench^Ingest", f"BENCH{series_number:04d}"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.BodyPartExamined, ds.SliceThickness, ds.KVP, ds.PatientPosition = "CHEST", 1, 120, "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber = "1", series_number, 1
    ds.InstanceNumber = NUMBER_PLACEHOLDER.decode()
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-250, -250, -100], [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [round(500 / size, 4)] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth, ds.RescaleIntercept, ds.RescaleSlope = 40, 400, -1024, 1
    values = ((x * 7 + y * 13) % 4096 for y in range(size) for x in range(size))
    ds.PixelData = b"".join(v.to_bytes(2, "little") for v in values)
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    data = encoded.getvalue()
    header, pixels = data[: -len(ds.PixelData)], data[-len(ds.PixelData) :]
    if header.count(placeholder.encode()) != 2 or header.count(NUMBER_PLACEHOLDER) != 1:
        raise BenchError("template placeholders are not where expected")
    return Template(header, pixels, placeholder.encode())


def write_set(template: Template, uids: UidSource, directory: Path) -> int:
    """Write PER_SET copies of *template* with fresh UIDs into *directory*; return total bytes."""
    directory.mkdir(parents=True)
    for n in range(1, PER_SET + 1):
        header = template.header.replace(template.placeholder, uids())
        with (directory / f"{n:04d}.dcm").open("wb") as f:
            f.write(header.replace(NUMBER_PLACEHOLDER, f"{n:<6}".encode()))
            f.write(template.pixels)
    return (len(template.header) + len(template.pixels)) * PER_SET


@dataclass
class Receiver:
    name: str
    aet: str
    port: int
    argv: list[str]
    env: dict[str, str]
    root: Path
    count: Callable[[], int]  # instances it holds now
    ready_url: str | None = None
    proc: Proc | None = None
    received: int = 0  # instances sent to it so far


def file_create_us(directory: Path, count: int = 200) -> float:
    """Median microseconds to create an empty file in *directory* (left there: see the module
    docstring), the filesystem cost every receiver pays per instance."""
    directory.mkdir(parents=True)
    times = []
    for i in range(count):
        started = time.perf_counter()
        os.close(os.open(directory / f"{i}.probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def free_ports(n: int) -> list[int]:
    """*n* distinct loopback ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_json(url: str) -> Any:
    with NO_PROXY.open(url, timeout=5) as response:
        return json.load(response)


def files_in(directory: Path, pattern: str = "*") -> Callable[[], int]:
    return lambda: sum(1 for p in directory.rglob(pattern) if p.is_file())


def make_receiver(name: str, root: Path, ports: list[int], args: argparse.Namespace) -> Receiver:
    """The command line, environment and instance counter of one receiver (not started)."""
    root.mkdir()
    port, http_port = ports
    nodelay = {"TCP_NODELAY": "1"}
    if name == "gateway":
        config = root / "config.toml"
        config.write_text(
            f'[node]\nae_title = "GATEWAY"\nhost = "{HOST}"\nport = {port}\n'
            f'data_dir = "{root / "data"}"\n[control]\nsocket = "{root / "control.sock"}"\n'
            '[log]\nlevel = "warning"\n'
        )
        exe = shutil.which("gateway")
        argv = [exe] if exe else [sys.executable, "-m", "gateway"]
        argv += ["serve", "--config", str(config)]
        count = files_in(root / "data" / "objects", "*.dcm")
        return Receiver(name, "GATEWAY", port, argv, {"PYTHONPATH": str(REPO)}, root, count)
    if name == "orthanc":
        config = root / "orthanc.json"
        settings: dict[str, object] = {"DicomAet": "ORTHANC", "DicomPort": port}
        settings |= {"HttpPort": http_port, "RemoteAccessAllowed": False}
        settings |= {"StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "db")}
        config.write_text(json.dumps(settings | {"AuthenticationEnabled": False}, indent=2))
        url = f"http://{HOST}:{http_port}"
        count = lambda: int(http_json(f"{url}/statistics")["CountInstances"])  # noqa: E731
        argv = [args.orthanc, str(config)]
        return Receiver(name, "ORTHANC", port, argv, nodelay, root, count, f"{url}/system")
    if name == "minimal":
        files = root / "files"
        argv = [sys.executable, str(args.minimal_scp), str(port), str(files)]
        return Receiver(name, "FLOOR", port, argv, {"AE_TITLE": "FLOOR"}, root, files_in(files))
    if name == "storescp":
        argv = [str(args.dcmtk_bin / "storescp"), "-od", str(root), "-aet", "DCMTK", str(port)]
        return Receiver(name, "DCMTK", port, argv, nodelay, root, files_in(root, "CT.*"))
    raise BenchError(f"unknown receiver {name!r} (known: {', '.join(ALL_RECEIVERS)})")


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Proc:
    """Start *argv* in a session of its own (a Ctrl-C reaches only us), output to *log*."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def health(rx: Receiver) -> str:
    """Whether *rx* is still running, and the end of its output."""
    code = rx.proc.poll() if rx.proc else None
    log = (rx.root / "receiver.log").read_text(errors="replace")[-3000:]
    return f"{rx.name} {'running' if code is None else f'exited with {code}'}; output:\n{log}"


def start(rx: Receiver, echoscu: Path, timeout: float = 60.0) -> None:
    """Start *rx* and wait until it answers a C-ECHO (and Orthanc its REST API)."""
    rx.proc = spawn(rx.argv, rx.env, rx.root / "receiver.log", cwd=rx.root)
    echo = [str(echoscu), "-to", "5", "-aec", rx.aet, HOST, str(rx.port)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rx.proc.poll() is not None:
            raise BenchError(f"did not start: {health(rx)}")
        try:
            ready = rx.ready_url is None or http_json(rx.ready_url)
            if ready and subprocess.run(echo, capture_output=True, check=False).returncode == 0:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise BenchError(f"no C-ECHO answer in {timeout:.0f}s: {health(rx)}")


def peak_rss_kb(proc: Proc) -> int | None:
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return None
    return next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), None)


def cpu_seconds(proc: Proc) -> float | None:
    """User + system CPU time *proc* has used so far (its threads included), in seconds."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: Proc, name: str, grace: float = 20.0) -> None:
    """SIGTERM and wait; SIGKILL if it will not stop."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"warning: {name} ignored SIGTERM for {grace:.0f}s; killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def send(storescu: Path, rx: Receiver, sets: list[Path], running: list[Proc], tmp: Path) -> float:
    """Send each directory of *sets* on its own association, all at once; return the wall time."""
    argv = [str(storescu), "+sd", "-td", "120", "-aec", rx.aet, HOST, str(rx.port)]
    logs = [tmp / f"storescu-{i}.log" for i in range(len(sets))]
    t0 = time.perf_counter()
    for directory, log in zip(sets, logs, strict=True):
        running.append(spawn([*argv, str(directory)], {"TCP_NODELAY": "1"}, log))
    codes = [p.wait(600) for p in running]
    elapsed = time.perf_counter() - t0
    running.clear()
    for code, log in zip(codes, logs, strict=True):
        text = log.read_text(errors="replace")
        if code != 0 or any(line.startswith(("E:", "F:")) for line in text.splitlines()):
            raise BenchError(
                f"storescu to {rx.name} failed (exit {code}):\n{text[-2000:]}\n{health(rx)}"
            )
    return elapsed


def verify(rx: Receiver, timeout: float = 10.0) -> None:
    """Fail unless *rx* holds exactly the instances sent to it so far."""
    deadline = time.monotonic() + timeout
    while (got := rx.count()) < rx.received and time.monotonic() < deadline:
        time.sleep(0.1)
    if got != rx.received:
        raise BenchError(f"{rx.name} holds {got} instances; {rx.received} were sent to it")


def summarise(records: list[Record], names: list[str]) -> dict[str, dict[str, Record]]:
    """Per scenario and receiver: median instances/s and MB/s over the rounds."""
    medians: dict[str, dict[str, Record]] = {}
    for scenario, _, _ in SCENARIOS:
        medians[scenario] = {}
        for name in names:
            mine = [r for r in records if r["scenario"] == scenario and r["receiver"] == name]
            medians[scenario][name] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("instances_per_s", "mb_per_s")
            }
    return medians


def ratios(medians: dict[str, dict[str, Record]]) -> dict[str, dict[str, float | None]]:
    """Gateway throughput over the minimal SCP's and Orthanc's, per scenario."""
    out: dict[str, dict[str, float | None]] = {}
    for scenario, row in medians.items():
        out[scenario] = {}
        for peer in ("minimal", "orthanc"):
            value = None
            if "gateway" in row and peer in row:
                value = row["gateway"]["instances_per_s"] / row[peer]["instances_per_s"]
            out[scenario][f"gateway/{peer}"] = value
    return out


def markdown(medians: dict[str, dict[str, Record]], rss: dict[str, int | None], rounds: int) -> str:
    out = [f"Medians of {rounds} round(s); DCMTK storescu, loopback, {os.cpu_count()} CPUs.", ""]
    out += ["| scenario | receiver | instances/s | MB/s |", "|---|---|---:|---:|"]
    for scenario, row in medians.items():
        for name, m in row.items():
            out.append(
                f"| {scenario} | {name} | {m['instances_per_s']:.0f} | {m['mb_per_s']:.1f} |"
            )
    out += ["", "| scenario | gateway/minimal | gateway/orthanc |", "|---|---:|---:|"]
    for scenario, pair in ratios(medians).items():
        cells = ["n/a" if v is None else f"{v:.2f}" for v in pair.values()]
        out.append(f"| {scenario} | {' | '.join(cells)} |")
    mib = [f"{name} {'n/a' if kb is None else f'{kb / 1024:.0f} MiB'}" for name, kb in rss.items()]
    return "\n".join([*out, "", "Peak RSS (VmHWM): " + ", ".join(mib)])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument("--out", type=Path, help="write per-round figures and medians here as JSON")
    p.add_argument("--receivers", default=",".join(ALL_RECEIVERS), help="default %(default)s")
    minimal = REPO.parent / "shared" / "bench" / "minimal_pynetdicom_scp.py"
    p.add_argument("--minimal-scp", type=Path, default=minimal, help="default %(default)s")
    p.add_argument("--dcmtk-bin", type=Path, default=Path("/usr/bin"), help="default /usr/bin")
    p.add_argument("--orthanc", default=shutil.which("Orthanc") or "/usr/sbin/Orthanc")
    args = p.parse_args()
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if args.rounds < 1 or not args.receivers or len(set(args.receivers)) < len(args.receivers):
        p.error("need at least one round and distinct receivers")
    return args


def run(
    args: argparse.Namespace, tmp: Path, receivers: list[Receiver], running: list[Proc]
) -> tuple[list[Record], dict[str, int | None]]:
    """Start the receivers, send every scenario and round, check counts; return the figures."""
    storescu, echoscu = args.dcmtk_bin / "storescu", args.dcmtk_bin / "echoscu"
    version = subprocess.run([storescu, "--version"], capture_output=True, text=True, check=False)
    if "dcmtk" not in version.stdout.lower():
        raise BenchError(f"{storescu} is not DCMTK's storescu; pass --dcmtk-bin")
    if "minimal" in args.receivers and not args.minimal_scp.is_file():
        raise BenchError(f"no minimal SCP at {args.minimal_scp}; pass --minimal-scp")
    uids = UidSource()
    small, large = (build_template(n, uids.placeholder, i) for i, n in ((1, 64), (2, 512)))
    templates = {"small": small, "large": large}
    ports = free_ports(2 * len(args.receivers))
    for i, name in enumerate(args.receivers):
        receivers.append(make_receiver(name, tmp / name, ports[2 * i : 2 * i + 2], args))
        start(receivers[-1], echoscu)
        print(f"started {name} on {HOST}:{receivers[-1].port}", file=sys.stderr)
    records: list[Record] = []
    for scenario, kind, associations in SCENARIOS:
        for rnd in range(1, args.rounds + 1):
            for rx in receivers if rnd % 2 else receivers[::-1]:
                sends = tmp / "sets" / f"{scenario.replace(' ', '-')}-{rnd}-{rx.name}"
                sets = [sends / str(i) for i in range(associations)]
                nbytes = sum(write_set(templates[kind], uids, d) for d in sets)
                os.sync()
                seconds = send(storescu, rx, sets, running, tmp)
                rx.received += (count := PER_SET * associations)
                verify(rx)
                rec = {"scenario": scenario, "round": rnd, "receiver": rx.name, "instances": count}
                rec |= {"bytes": nbytes, "seconds": seconds, "instances_per_s": count / seconds}
                records.append(rec | {"mb_per_s": nbytes / 1e6 / seconds})
                figures = f"{count / seconds:6.0f} inst/s {nbytes / 1e6 / seconds:6.1f} MB/s"
                print(f"{scenario} round {rnd} {rx.name:8} {figures}", file=sys.stderr)
    for rx in receivers:
        if rx.proc and rx.proc.poll() is not None:
            print(f"warning: stopped before the end: {health(rx)}", file=sys.stderr)
    return records, {rx.name: peak_rss_kb(rx.proc) for rx in receivers if rx.proc}


def _interrupted(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupted)
    receivers: list[Receiver] = []
    running: list[Proc] = []
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        create_us = file_create_us(tmp / "probe")
        print(f"file creation: {create_us:.0f} us (median of 200)", file=sys.stderr)
        records, rss = run(args, tmp, receivers, running)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in running:
            stop(proc, "storescu", grace=5)
        for rx in reversed(receivers):
            if rx.proc:
                stop(rx.proc, rx.name)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = summarise(records, args.receivers)
    print(markdown(medians, rss, args.rounds))
    print(f"\nFile creation on the run's filesystem: {create_us:.0f} us.")
    if args.out:
        report: Record = {"rounds": records, "medians": medians, "ratios": ratios(medians)}
        report |= {"peak_rss_kb": rss, "cpus": os.cpu_count(), "file_create_us": create_us}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
