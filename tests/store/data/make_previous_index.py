"""Make the data_dirs written by the gateways of earlier releases that test_upgrade.py upgrades.

Each schema version's migration is tested from a database made by the release before it:

- `--release 0`: commit 42e6ab0b2ecb1aa67836c9789603c1affae96471 (`de3d6ad^`, the parent of the
  commit that introduced `PRAGMA user_version` 1 and gave each study its own patient identity)
  makes `previous-index.tar.gz`: a schema version 0 index, which kept one `patients` row per
  (PatientID, issuer) and merged the studies of two patients sharing a PatientID into it (the
  test of migration 1);
- `--release 1`: commit d3163ed52886ffb3c7b2c8d82bdadeaa37efa219 (the last before migration 2:
  "README: say what the ingest re-run shows...") makes `index-v1.tar.gz`: a schema version 1
  index, with one patients row per identity, and dispatch jobs without a lease (no
  `lease_owner`, `lease_until` columns; the test of migration 2);
- `--release 2`: commit 6af9dc921a7a6b390367c86ceadb02afa31ee1b7 (the last before migration 3:
  "README: ingest re-measured at the end of the session...") makes `index-v2.tar.gz`: a
  schema version 2 index, whose jobs have a lease and whose retrieval requests have none (the
  test of migration 3).

tests/store/test_upgrade.py opens each tarball with today's gateway.

Run it from the repository root (DCMTK's storescu in /usr/bin; nothing is sent off 127.0.0.1):

    git worktree add /tmp/prev0 42e6ab0
    python3 tests/store/data/make_previous_index.py --release 0 /tmp/prev0
    git worktree remove --force /tmp/prev0

    git worktree add /tmp/prev1 d3163ed
    python3 tests/store/data/make_previous_index.py --release 1 /tmp/prev1
    git worktree remove --force /tmp/prev1

    git worktree add /tmp/prev2 6af9dc9
    python3 tests/store/data/make_previous_index.py --release 2 /tmp/prev2
    git worktree remove --force /tmp/prev2

The script refuses a worktree at another commit than the release's. It runs that worktree's
gateway as a real process (`python3 -m gateway serve` from the worktree, which imports the old
package: the script checks `gateway.__file__`), and with real peers, the same for both
releases:

- DCMTK storescu sends 6 instances (3 studies, 4 series) made from pydicom's CT_small.dcm and
  MR_small.dcm with other patient and study attributes (`STUDIES`) and UIDs under `ROOT`
  (1.2.826.0.1.3680043.8.498.7070), calling AE MODALITY:
  - study `ROOT.1`, PatientID UPG-0, PatientName Doe^Jane, CT: series `ROOT.1.1`, instances
    `ROOT.1.1.1` and `ROOT.1.1.2` (InstanceNumber 1, 2);
  - study `ROOT.2`, PatientID UPG-0, PatientName Roe^Richard, MR: series `ROOT.2.1`, instances
    `ROOT.2.1.1` and `ROOT.2.1.2`: release 0 files it under the patients row study `ROOT.1`
    made (one row for PatientID UPG-0 and two studies, its attributes now Roe^Richard's);
    release 1 gives it a patients row of its own (two rows with PatientID UPG-0);
  - study `ROOT.3`, PatientID UPG-3, PatientName Poe^Edgar, MR: series `ROOT.3.1` and
    `ROOT.3.2`, one instance each (`ROOT.3.1.1`, `ROOT.3.2.1`).
- Rule `ct-to-archive` (`Modality == "CT"`, study level, quiet 1 s) routes study `ROOT.1` to
  peer `archive` (AE ARCHIVE), where nothing listens: its job (job 1 in the tarballs) stays
  `queued` with `attempts` >= 2 (2 in the tarballs), a `last_error`, nothing delivered.
- Rule `poe-to-export` (`PatientID == "UPG-3"`, study level, quiet 1 s) copies study `ROOT.3`
  to folder `export`: a `done` job (job 2) with `delivered` 2 and its 2 rows in the delivery
  ledger (`deliveries`).
- `[retrieve] primary = "vna"` (a peer where nothing listens), project `cohort`: one retrieval
  request for study `ROOT.9`, attempts >= 1 (`Processing` at step `query`, attempts 1 in the
  tarballs), its next attempt up to an hour after the first.
- A device `MR scanner 1` (modality MR, station AE MR1), a sequence `T1 MPRAGE`, and a task
  (`NEW`) of patient UPG-7 Moe^Mary on them.

No job is left `running`: a clean stop leaves none.

The gateway is then stopped with SIGTERM (exit 0, a clean stop: no `running_since` in `meta`, no
WAL left) and `data/index.sqlite` and `data/objects/` (the 6 instance files as stored) are
packed, nothing else (about 65 KB each). The script checks what the test relies on: `PRAGMA
user_version` (0, 1 or 2); for release 0 the patients table with its UNIQUE (patient_id,
issuer_of_patient_id) and 2 rows, UPG-0's holding both its studies (with the attributes of the
last one received, Roe^Richard's); for releases 1 and 2 3 patients rows, one per study; the
tables without `lease_owner` and `lease_until` (jobs and retrievals before 2, retrievals in
2); for all the jobs, ledger and retrieval above.

As these releases left it, the rules' arrivals checkpoint (`meta` `completion_checkpoint`) lies
5 s before the last arrivals, so at the next start (the release's as much as today's) the rules
see those arrivals again and may open new waits; the delivery ledger keeps them from sending
twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pydicom

# Schema version: (commit, its short name, the tarball it makes).
RELEASES: dict[int, tuple[str, str, str]] = {
    0: ("42e6ab0b2ecb1aa67836c9789603c1affae96471", "42e6ab0 (de3d6ad^)", "previous-index.tar.gz"),
    1: ("d3163ed52886ffb3c7b2c8d82bdadeaa37efa219", "d3163ed", "index-v1.tar.gz"),
    2: ("6af9dc921a7a6b390367c86ceadb02afa31ee1b7", "6af9dc9", "index-v2.tar.gz"),
}
# Schema version: the tables of its index without the lease columns a later migration adds.
UNLEASED: dict[int, tuple[str, ...]] = {0: ("jobs", "retrievals"), 1: ("jobs", "retrievals"),
                                        2: ("retrievals",)}  # fmt: skip
ROOT = "1.2.826.0.1.3680043.8.498.7070"  # pydicom's UID root, a suffix of this test's own
HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# (study number, source file, patient and study attributes, {series number: instances}).
STUDIES: list[tuple[int, str, dict[str, str], dict[int, int]]] = [
    (1, "CT_small.dcm",
     {"PatientID": "UPG-0", "PatientName": "Doe^Jane", "PatientBirthDate": "19700101",
      "PatientSex": "F", "StudyDate": "20240105", "AccessionNumber": "ACC-1",
      "StudyDescription": "CT head"},
     {1: 2}),
    (2, "MR_small.dcm",
     {"PatientID": "UPG-0", "PatientName": "Roe^Richard", "PatientBirthDate": "19650505",
      "PatientSex": "M", "StudyDate": "20240206", "AccessionNumber": "ACC-2",
      "StudyDescription": "MR knee"},
     {1: 2}),
    (3, "MR_small.dcm",
     {"PatientID": "UPG-3", "PatientName": "Poe^Edgar", "PatientBirthDate": "19800808",
      "PatientSex": "M", "StudyDate": "20240307", "AccessionNumber": "ACC-3",
      "StudyDescription": "MR brain"},
     {1: 1, 2: 1}),
]  # fmt: skip
RETRIEVED_STUDY = f"{ROOT}.9"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_instances(directory: Path) -> list[Path]:
    """The files storescu sends, in study order."""
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for study, source, attributes, series in STUDIES:
            for series_number, count in series.items():
                for number in range(1, count + 1):
                    ds = pydicom.dcmread(TEST_FILES / source)
                    for keyword, value in attributes.items():
                        setattr(ds, keyword, value)
                    ds.StudyInstanceUID = f"{ROOT}.{study}"
                    ds.SeriesInstanceUID = f"{ROOT}.{study}.{series_number}"
                    ds.SOPInstanceUID = f"{ROOT}.{study}.{series_number}.{number}"
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.StudyID = str(study)
                    ds.SeriesNumber = series_number
                    ds.InstanceNumber = number
                    ds.SeriesDescription = f"series {series_number}"
                    path = directory / f"{ds.SOPInstanceUID}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    paths.append(path)
    return paths


def config_text(work: Path, port: int) -> str:
    down = free_port()  # archive and vna: nothing listens there
    return f"""
[node]
ae_title = "GATEWAY"
host = "{HOST}"
port = {port}
data_dir = "{work / "data"}"
min_free_mb = 0
shutdown_grace = 5

[control]
socket = "{work / "control.sock"}"

[log]
level = "info"
format = "json"

[[peers]]
name = "archive"
ae_title = "ARCHIVE"
host = "{HOST}"
port = {down}

[[peers]]
name = "vna"
ae_title = "VNA"
host = "{HOST}"
port = {down}

[[folders]]
name = "export"
path = "{work / "export"}"

[[rules]]
name = "ct-to-archive"
match = 'Modality == "CT"'
level = "study"
targets = ["archive"]
quiet_seconds = 1

[[rules]]
name = "poe-to-export"
match = 'PatientID == "UPG-3"'
level = "study"
targets = ["export"]
quiet_seconds = 1

[dispatch]
retry_base_seconds = 1
retry_max_seconds = 1
max_attempts = 10

[retrieve]
primary = "vna"
anonymiser = "archive"
max_attempts = 10
retry_base_seconds = 3600
retry_max_seconds = 3600

[[projects]]
name = "cohort"
"""


def rpc(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """One JSON-RPC call on the control socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError(what)


def check_previous(previous: Path, release: int) -> None:
    commit, name, _ = RELEASES[release]
    head = subprocess.run(
        ["git", "-C", str(previous), "rev-parse", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if head != commit:
        sys.exit(f"{previous} is at {head}, not {commit} ({name}, release {release})")
    imported = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=previous, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    print(f"gateway.__file__ = {imported}")
    if not Path(imported).resolve().is_relative_to(previous.resolve()):
        sys.exit(f"python3 -m gateway in {previous} imports {imported}, not the old code")


def drive(previous: Path, work: Path) -> None:
    """Run the old gateway, give it its work, stop it cleanly."""
    sources = work / "sources"
    sources.mkdir()
    files = make_instances(sources)
    port = free_port()
    config = work / "config.toml"
    config.write_text(config_text(work, port))
    sock = work / "control.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with (work / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=previous, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for("the control socket", lambda: sock.exists() and rpc(sock, "status"), 30)
        subprocess.run(
            ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "GATEWAY", HOST, str(port),
             *map(str, files)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        device = rpc(sock, "devices.register",
                     {"name": "MR scanner 1", "modality": "MR", "station_ae": "MR1"})  # fmt: skip
        sequence = rpc(sock, "sequences.create",
                       {"name": "T1 MPRAGE", "description": "T1 weighted",
                        "parameters": {"TR": 2300}})  # fmt: skip
        rpc(sock, "tasks.create", {
            "device_id": device["id"], "sequence_id": sequence["id"],
            "patient": {"id": "UPG-7", "name": "Moe^Mary", "birth_date": "19900909", "sex": "F"},
            "scheduled_at": "2026-12-01T09:00:00", "description": "knee protocol",
        })  # fmt: skip
        rpc(sock, "retrieve.submit", {"project": "cohort", "study_uid": RETRIEVED_STUDY})

        def jobs_settled() -> bool:
            jobs = {j["rule"]: j for j in rpc(sock, "jobs.list")["jobs"]}
            ct, mr = jobs.get("ct-to-archive"), jobs.get("poe-to-export")
            return bool(
                ct and ct["state"] == "queued" and ct["attempts"] >= 2
                and mr and mr["state"] == "done"
            )  # fmt: skip

        wait_for("the CT job's second attempt and the export", jobs_settled)

        def retrieval_tried() -> bool:
            status = rpc(sock, "retrieve.status", {"project": "cohort"})
            return any(r["attempts"] >= 1 for r in status["requests"])

        wait_for("the retrieval's first attempt", retrieval_tried)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    if code != 0:
        sys.exit(f"the old gateway exited with {code}:\n{(work / 'gateway.log').read_text()}")


def check_index(data: Path, release: int) -> None:
    """What the test relies on, read from the index as the old gateway left it."""
    assert not (data / "index.sqlite-wal").exists(), "WAL left: not a clean stop"
    assert not any((data / "tmp").iterdir()), "temp files left"
    conn = sqlite3.connect(f"file:{data / 'index.sqlite'}?immutable=1", uri=True)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        assert version == release, version
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'patients'").fetchone()
        assert ("UNIQUE (patient_id, issuer_of_patient_id)" in sql) == (release == 0), sql
        assert conn.execute("SELECT value FROM meta WHERE key = 'running_since'").fetchone() is None
        by_patient = conn.execute(
            "SELECT p.patient_id, count(*) FROM studies s JOIN patients p ON s.patient_pk = p.pk"
            " GROUP BY p.pk ORDER BY p.patient_id"
        ).fetchall()
        if release == 0:  # merged: one row for both UPG-0 studies
            assert by_patient == [("UPG-0", 2), ("UPG-3", 1)], by_patient
        else:  # one row per identity
            assert by_patient == [("UPG-0", 1), ("UPG-0", 1), ("UPG-3", 1)], by_patient
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        print("jobs columns:", sorted(columns))
        assert {"study_uid", "delivered"} <= columns, columns
        for table in ("jobs", "retrievals"):  # migrations 2 and 3 add their leases
            leased = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            lease = {"lease_owner", "lease_until"}
            assert (not leased & lease) == (table in UNLEASED[release]), (table, leased)
        jobs = conn.execute(
            "SELECT id, rule, state, attempts, delivered FROM jobs ORDER BY id"
        ).fetchall()
        print("jobs:", jobs)
        by_rule = {
            rule: (state, attempts, delivered) for _, rule, state, attempts, delivered in jobs
        }
        assert len(jobs) == 2, jobs
        assert by_rule["ct-to-archive"][0] == "queued" and by_rule["ct-to-archive"][1] >= 2
        assert by_rule["poe-to-export"] == ("done", 0, 2), jobs
        (ledger,) = conn.execute("SELECT count(*) FROM deliveries").fetchone()
        assert ledger == 2, ledger
        retrievals = conn.execute("SELECT study_uid, status, attempts FROM retrievals").fetchall()
        print("retrievals:", retrievals)
        assert len(retrievals) == 1 and retrievals[0][0] == RETRIEVED_STUDY
        assert retrievals[0][2] >= 1, retrievals
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("patients", "studies", "series", "instances", "devices", "tasks")
        }
        print("rows:", counts)
    finally:
        conn.close()


def pack(data: Path, tarball: Path) -> None:
    members = [data / "index.sqlite"]
    members += sorted(p for p in (data / "objects").rglob("*"))

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(tarball, "w:gz", compresslevel=9) as tar:
        tar.add(data / "objects", "data/objects", recursive=False, filter=clean)
        for path in members:
            tar.add(path, f"data/{path.relative_to(data)}", recursive=False, filter=clean)
    print(f"{tarball}: {tarball.stat().st_size} bytes, {len(members)} members under data/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--release", type=int, choices=sorted(RELEASES), required=True,
        help="schema version of the index to make: "
        + "; ".join(f"{v}: {name} makes {tar}" for v, (_, name, tar) in RELEASES.items()),
    )  # fmt: skip
    parser.add_argument("worktree", type=Path, help="a git worktree at the release's commit")
    args = parser.parse_args()
    check_previous(args.worktree, args.release)
    with tempfile.TemporaryDirectory(prefix=f"index-v{args.release}-") as tmp:
        work = Path(tmp)
        drive(args.worktree, work)
        check_index(work / "data", args.release)
        pack(work / "data", HERE / RELEASES[args.release][2])


if __name__ == "__main__":
    main()
