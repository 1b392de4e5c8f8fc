#!/usr/bin/env python3
"""Forward benchmark: how fast the gateway sends stored instances on to Orthanc.

Two senders deliver the same kind of files to one Orthanc (configured as
``shared/bench/README.md`` says), in alternating order per round:

- **gateway**: a series is C-STOREd to the gateway (untimed) and a series-level rule routes it
  to Orthanc. Timed: the dispatch job, from its creation at completion to ``done`` (the job's
  ``created_at`` and ``updated_at``), i.e. selecting the instances, the association, every
  C-STORE and its durable acknowledgement.
- **pynetdicom**: a plain pynetdicom 3 SCU with TCP_NODELAY on its socket, one association, each
  file sent from its path (``send_c_store(path)``, bytes unchanged, as the gateway sends).
  Timed: association request to release.

Scenarios: ``small`` (200 x ~10 KB CT) and ``large`` (200 x ~513 KB CT), fresh UIDs per send.
After every send Orthanc's instance count is checked. Reported: medians of instances/s and the
gateway's ratio to the plain SCU (target: at least 0.9).

Run from the repository root::

    python3 bench/forward.py [--rounds 5] [--out results.json]
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # the ingest benchmark's helpers, beside this file
    HOST,
    PER_SET,
    REPO,
    BenchError,
    Receiver,
    UidSource,
    _interrupted,
    build_template,
    free_ports,
    health,
    make_receiver,
    peak_rss_kb,
    send,
    start,
    stop,
    verify,
    write_set,
)

sys.path.insert(0, str(REPO))
from gateway.control.client import ControlClient

SENDERS = ("gateway", "pynetdicom")
SCENARIOS = (("small", 64), ("large", 512))
Record = dict[str, Any]


def gateway_receiver(root: Path, port: int, orthanc: Receiver) -> Receiver:
    """The gateway, routing every CT series to Orthanc 0.3 s after its last instance."""
    root.mkdir()
    config = root / "config.toml"
    config.write_text(
        f'[node]\nae_title = "GATEWAY"\nhost = "{HOST}"\nport = {port}\n'
        f'data_dir = "{root / "data"}"\n[control]\nsocket = "{root / "control.sock"}"\n'
        '[log]\nlevel = "warning"\n'
        f'[[peers]]\nname = "orthanc"\nae_title = "{orthanc.aet}"\nhost = "{HOST}"\n'
        f"port = {orthanc.port}\n"
        '[[rules]]\nname = "forward"\nmatch = \'Modality == "CT"\'\ntargets = ["orthanc"]\n'
        "quiet_seconds = 0.3\n"
    )
    exe = shutil.which("gateway")
    argv = [exe] if exe else [sys.executable, "-m", "gateway"]
    argv += ["serve", "--config", str(config)]
    return Receiver("gateway", "GATEWAY", port, argv, {"PYTHONPATH": str(REPO)}, root, lambda: 0)


def forward_through_gateway(gateway: Receiver, directory: Path, storescu: Path, tmp: Path) -> float:
    """Store *directory* in the gateway; return the seconds its dispatch job took."""
    send(storescu, gateway, [directory], [], tmp)
    with ControlClient(gateway.root / "control.sock") as control:
        known = {job["id"] for job in control.call("jobs.list", {"limit": 1000})["jobs"]}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            jobs = control.call("jobs.list", {"limit": 1000})["jobs"]
            fresh = [job for job in jobs if job["id"] not in known]
            if len(fresh) > 1 or any(job["state"] == "failed" for job in fresh):
                raise BenchError(f"expected one forward job: {fresh}")
            if fresh and fresh[0]["state"] == "done":
                job = fresh[0]
                if job["delivered"] != PER_SET:
                    raise BenchError(f"the job delivered {job['delivered']} of {PER_SET}")
                return float(job["updated_at"] - job["created_at"])
            time.sleep(0.05)
    raise BenchError(f"the forward job did not finish: {health(gateway)}")


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_with_pynetdicom(orthanc: Receiver, directory: Path) -> float:
    """C-STORE every file of *directory* to Orthanc on one association; return the seconds."""
    ae = AE(ae_title="PLAINSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    files = sorted(directory.iterdir())
    t0 = time.perf_counter()
    assoc = ae.associate(
        HOST, orthanc.port, ae_title=orthanc.aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise BenchError("Orthanc refused the plain SCU's association")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                raise BenchError(f"Orthanc answered {status} to {path.name}")
    finally:
        assoc.release()
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    p.add_argument("--out", type=Path, help="write per-round figures and medians here as JSON")
    p.add_argument("--dcmtk-bin", type=Path, default=Path("/usr/bin"), help="default /usr/bin")
    p.add_argument("--orthanc", default=shutil.which("Orthanc") or "/usr/sbin/Orthanc")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("need at least one round")
    return args


def run(args: argparse.Namespace, tmp: Path, procs: list[Receiver]) -> tuple[list[Record], Record]:
    storescu, echoscu = args.dcmtk_bin / "storescu", args.dcmtk_bin / "echoscu"
    version = subprocess.run([storescu, "--version"], capture_output=True, text=True, check=False)
    if "dcmtk" not in version.stdout.lower():
        raise BenchError(f"{storescu} is not DCMTK's storescu; pass --dcmtk-bin")
    ports = free_ports(3)
    orthanc = make_receiver("orthanc", tmp / "orthanc", ports[:2], args)
    start(orthanc, echoscu)
    procs.append(orthanc)
    gateway = gateway_receiver(tmp / "gateway", ports[2], orthanc)
    start(gateway, echoscu)
    procs.append(gateway)
    print(f"orthanc on {orthanc.port}, gateway on {gateway.port}", file=sys.stderr)
    uids = UidSource()
    records: list[Record] = []
    for number, (scenario, size) in enumerate(SCENARIOS, start=1):
        template = build_template(size, uids.placeholder, number)
        for rnd in range(1, args.rounds + 1):
            for sender in SENDERS if rnd % 2 else SENDERS[::-1]:
                directory = tmp / "sets" / f"{number}-{rnd}-{sender}"  # kept: see ingest.py
                nbytes = write_set(template, uids, directory)
                os.sync()
                if sender == "gateway":
                    seconds = forward_through_gateway(gateway, directory, storescu, tmp)
                else:
                    seconds = send_with_pynetdicom(orthanc, directory)
                orthanc.received += PER_SET
                verify(orthanc, timeout=30)
                rec = {"scenario": scenario, "round": rnd, "sender": sender, "seconds": seconds}
                rec |= {"instances_per_s": PER_SET / seconds, "mb_per_s": nbytes / 1e6 / seconds}
                records.append(rec)
                print(
                    f"{scenario} round {rnd} {sender:10} {PER_SET / seconds:6.0f} inst/s"
                    f" {nbytes / 1e6 / seconds:6.1f} MB/s",
                    file=sys.stderr,
                )
    rss = {rx.name: peak_rss_kb(rx.proc) for rx in procs if rx.proc}
    return records, rss


def summarise(records: list[Record]) -> dict[str, dict[str, Record]]:
    medians: dict[str, dict[str, Record]] = {}
    for scenario, _ in SCENARIOS:
        medians[scenario] = {}
        for sender in SENDERS:
            mine = [r for r in records if r["scenario"] == scenario and r["sender"] == sender]
            medians[scenario][sender] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("instances_per_s", "mb_per_s")
            }
    return medians


def markdown(medians: dict[str, dict[str, Record]], rss: Record, rounds: int) -> str:
    out = [f"Medians of {rounds} round(s); to Orthanc over loopback, {os.cpu_count()} CPUs.", ""]
    out += ["| scenario | sender | instances/s | MB/s |", "|---|---|---:|---:|"]
    for scenario, row in medians.items():
        for sender, m in row.items():
            out.append(
                f"| {scenario} | {sender} | {m['instances_per_s']:.0f} | {m['mb_per_s']:.1f} |"
            )
    out += ["", "| scenario | gateway/pynetdicom |", "|---|---:|"]
    for scenario, row in medians.items():
        ratio = row["gateway"]["instances_per_s"] / row["pynetdicom"]["instances_per_s"]
        out.append(f"| {scenario} | {ratio:.2f} |")
    mib = [f"{name} {'n/a' if kb is None else f'{kb / 1024:.0f} MiB'}" for name, kb in rss.items()]
    return "\n".join([*out, "", "Peak RSS (VmHWM): " + ", ".join(mib)])


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupted)
    procs: list[Receiver] = []
    tmp = Path(tempfile.mkdtemp(prefix="gateway-forward-"))
    try:
        records, rss = run(args, tmp, procs)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for rx in reversed(procs):
            if rx.proc:
                stop(rx.proc, rx.name)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = summarise(records)
    print(markdown(medians, rss, args.rounds))
    if args.out:
        report: Record = {"rounds": records, "medians": medians, "peak_rss_kb": rss}
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
