#!/usr/bin/env python3
"""Retrieval benchmark: a cohort from a VNA through the gateway to an anonymiser.

Three Orthancs (configured as ``shared/bench/README.md`` says, each with the others it must
reach in ``DicomModalities``): the VNA, the anonymiser the gateway forwards to, and a second
anonymiser for the reference. A cohort of studies (default 50 x 20 CT instances of ~10 KB, fresh
UIDs) is C-STOREd into the VNA first (untimed). Then:

- **gateway**: one retrieval request per study (by StudyInstanceUID), submitted at once; timed
  from the submission to the last request's Successful (every instance acknowledged by the
  anonymiser). The per-step split is each request's own timings (``retrieve status --json``),
  summed over the cohort.
- **direct** (the reference): the VNA C-MOVEs the same studies straight to the second
  anonymiser, four study-level moves at a time (the gateway's default concurrency): what the
  archive and the anonymiser can do with nothing in between.

Run from the repository root::

    python3 bench/retrieve.py [--studies 50] [--instances 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import (  # the ingest benchmark's helpers, beside this file
    HOST,
    NUMBER_PLACEHOLDER,
    REPO,
    BenchError,
    Receiver,
    UidSource,
    _interrupted,
    build_template,
    cpu_seconds,
    free_ports,
    health,
    http_json,
    peak_rss_kb,
    send,
    start,
    stop,
)

sys.path.insert(0, str(REPO))
from gateway.config import NodeSettings, PeerSettings
from gateway.control.client import ControlClient
from gateway.scu.query import c_move, identifier

Record = dict[str, Any]


def orthanc(
    name: str, root: Path, ports: list[int], binary: str, modalities: dict[str, Any]
) -> Receiver:
    root.mkdir()
    port, http_port = ports
    config = {
        "DicomAet": name, "DicomPort": port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "db"),
        "DicomModalities": modalities,
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    url = f"http://{HOST}:{http_port}"
    count = lambda: int(http_json(f"{url}/statistics")["CountInstances"])  # noqa: E731
    argv = [binary, str(root / "orthanc.json")]
    return Receiver(
        name.lower(), name, port, argv, {"TCP_NODELAY": "1"}, root, count, f"{url}/system"
    )


def gateway(root: Path, port: int, vna: Receiver, anon: Receiver) -> Receiver:
    root.mkdir()
    (root / "config.toml").write_text(
        f'[node]\nae_title = "GATEWAY"\nhost = "{HOST}"\nport = {port}\n'
        f'data_dir = "{root / "data"}"\n[control]\nsocket = "{root / "control.sock"}"\n'
        '[log]\nlevel = "warning"\n'
        f'[[peers]]\nname = "vna"\nae_title = "{vna.aet}"\nhost = "{HOST}"\nport = {vna.port}\n'
        "max_concurrent_moves = 4\n"
        f'[[peers]]\nname = "anon"\nae_title = "{anon.aet}"\nhost = "{HOST}"\nport = {anon.port}\n'
        '[retrieve]\nprimary = "vna"\nanonymiser = "anon"\n'
        '[[projects]]\nname = "bench"\n'
    )
    exe = shutil.which("gateway")
    argv = [exe] if exe else [sys.executable, "-m", "gateway"]
    argv += ["serve", "--config", str(root / "config.toml")]
    return Receiver("gateway", "GATEWAY", port, argv, {"PYTHONPATH": str(REPO)}, root, lambda: 0)


def write_cohort(directory: Path, studies: int, instances: int, uids: UidSource) -> list[str]:
    """*studies* of *instances* small CTs each, in one folder; return the Study Instance UIDs."""
    from pydicom import dcmread

    directory.mkdir(parents=True)
    study_uids = []
    for n in range(studies):
        template = build_template(64, uids.placeholder, n + 1)  # new study and series UIDs
        for i in range(1, instances + 1):
            header = template.header.replace(template.placeholder, uids())
            with (directory / f"{n:03d}-{i:04d}.dcm").open("wb") as f:
                f.write(header.replace(NUMBER_PLACEHOLDER, f"{i:<6}".encode()))
                f.write(template.pixels)
        first = dcmread(directory / f"{n:03d}-0001.dcm", stop_before_pixels=True)
        study_uids.append(str(first.StudyInstanceUID))
    return study_uids


def run_gateway(gw: Receiver, study_uids: list[str], timeout: float = 1800) -> tuple[float, Record]:
    with ControlClient(gw.root / "control.sock") as control:
        started = time.time()
        control.call(
            "retrieve.submit",
            {"project": "bench", "requests": [{"study_uid": u} for u in study_uids]},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = control.call("retrieve.status", {"project": "bench"})
            counts = status["counts"]
            if counts["Queued"] + counts["Processing"] == 0:
                break
            time.sleep(0.2)
        else:
            raise BenchError(f"the cohort did not finish: {counts}\n{health(gw)}")
    if counts["Successful"] != len(study_uids):
        bad = [r for r in status["requests"] if r["status"] != "Successful"][:3]
        raise BenchError(f"not every request succeeded: {counts}: {bad}")
    wall = max(r["finished_at"] for r in status["requests"]) - started
    return wall, status


def run_direct(vna: Receiver, anon2: Receiver, study_uids: list[str]) -> float:
    node = NodeSettings(ae_title="BENCHSCU")
    peer = PeerSettings(name="vna", ae_title=vna.aet, host=HOST, port=vna.port)

    mover = node.model_copy(update={"ae_title": anon2.aet})

    async def moves() -> None:
        slots = asyncio.Semaphore(4)  # four C-MOVEs at once, as the gateway's retriever

        async def move(uid: str) -> None:
            query = identifier("STUDY", StudyInstanceUID=uid)
            # The destination is the second anonymiser: ask the VNA as that AE would. A
            # failure status raises PeerError.
            async with slots:
                await c_move(mover, peer, query)

        await asyncio.gather(*(move(uid) for uid in study_uids))

    started = time.perf_counter()
    asyncio.run(moves())
    return time.perf_counter() - started


def _row(path: str, seconds: float, studies: int, instances: int) -> str:
    rate = f"{studies / seconds * 60:.0f} | {instances / seconds:.0f}"
    return f"| {path} | {seconds:.1f} s | {rate} |"


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--studies", type=int, default=50)
    p.add_argument("--instances", type=int, default=20, help="per study (one series)")
    p.add_argument("--out", type=Path)
    p.add_argument("--dcmtk-bin", type=Path, default=Path("/usr/bin"))
    p.add_argument("--orthanc", default=shutil.which("Orthanc") or "/usr/sbin/Orthanc")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-retrieve-"))
    procs: list[Receiver] = []
    try:
        ports = free_ports(7)
        gw_port = ports[6]
        anon = orthanc("ANON", tmp / "anon", ports[0:2], args.orthanc, {})
        anon2 = orthanc("ANON2", tmp / "anon2", ports[2:4], args.orthanc, {})
        modalities = {"gateway": ["GATEWAY", HOST, gw_port], "anon2": ["ANON2", HOST, anon2.port]}
        vna = orthanc("VNA", tmp / "vna", ports[4:6], args.orthanc, modalities)
        gw = gateway(tmp / "gateway", gw_port, vna, anon)
        echoscu = args.dcmtk_bin / "echoscu"
        for rx in (anon, anon2, vna, gw):
            start(rx, echoscu)
            procs.append(rx)
        uids = UidSource()
        study_uids = write_cohort(tmp / "cohort", args.studies, args.instances, uids)
        os.sync()
        send(args.dcmtk_bin / "storescu", vna, [tmp / "cohort"], [], tmp)
        total = args.studies * args.instances
        if vna.count() != total:
            raise BenchError(f"the VNA holds {vna.count()} of {total} instances")
        print(f"VNA holds {args.studies} studies, {total} instances", file=sys.stderr)
        cpu: dict[str, dict[str, float | None]] = {}

        def used(before: dict[str, float | None]) -> dict[str, float | None]:
            """CPU seconds each process used since *before*."""
            spent: dict[str, float | None] = {}
            for rx in procs:
                now = cpu_seconds(rx.proc) if rx.proc else None
                then = before.get(rx.name)
                spent[rx.name] = None if now is None or then is None else round(now - then, 2)
            return spent

        before = {rx.name: cpu_seconds(rx.proc) for rx in procs if rx.proc}
        wall, status = run_gateway(gw, study_uids)
        cpu["gateway"] = used(before)
        if anon.count() != total:
            raise BenchError(f"the anonymiser holds {anon.count()} of {total}")
        print(f"gateway: {wall:.1f} s", file=sys.stderr)
        before = {rx.name: cpu_seconds(rx.proc) for rx in procs if rx.proc}
        direct = run_direct(vna, anon2, study_uids)
        cpu["direct"] = used(before)
        print(f"direct: {direct:.1f} s", file=sys.stderr)
        steps: dict[str, float] = {}
        for request in status["requests"]:
            for step, seconds in request["timings"].items():
                steps[step] = steps.get(step, 0.0) + seconds
        rss = {rx.name: peak_rss_kb(rx.proc) for rx in procs if rx.proc}
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for rx in reversed(procs):
            if rx.proc:
                stop(rx.proc, rx.name)
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.studies
    busy = sum(steps.values())
    lines = [
        f"{n} studies x {args.instances} instances (~10 KB), {os.cpu_count()} CPUs, loopback.",
        "",
        "| path | wall | studies/min | instances/s |",
        "|---|---:|---:|---:|",
        _row("VNA -> gateway -> anonymiser", wall, n, total),
        _row("VNA -> anonymiser (direct C-MOVE)", direct, n, total),
        "",
        f"gateway / direct: {direct / wall:.2f}",
        "",
        "| step | seconds per study (mean) | share of request time |",
        "|---|---:|---:|",
    ]
    for step in ("query", "compare", "move", "verify", "forward"):
        seconds = steps.get(step, 0.0)
        lines.append(f"| {step} | {seconds / n:.3f} | {seconds / busy:.0%} |")
    mib = [f"{k} {'n/a' if v is None else f'{v / 1024:.0f} MiB'}" for k, v in rss.items()]
    lines += ["", "Peak RSS (VmHWM): " + ", ".join(mib)]
    for path, seconds in cpu.items():
        spent = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items() if v)
        lines.append(f"CPU seconds during the {path} run: {spent}")
    print("\n".join(lines))
    if args.out:
        report = {"wall": wall, "direct": direct, "steps": steps, "studies": n, "rss_kb": rss,
                  "cpu_seconds": cpu}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
