"""The container image, built and run on a real Docker daemon (scripts/test-container).

Collected only when GATEWAY_TEST_IMAGE names the image to test (tests/conftest.py); the
script builds it, starts a daemon when the machine has none, and sets DOCKER_HOST. Containers
run with `--network host` on free loopback ports, the data in a named volume; every container
and volume a test makes is removed by it. DCMTK tools and pynetdicom talk to the container
from the host, as a modality would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.conftest import (
    HOST,
    TEST_FILES,
    StoreSCP,
    dcmtk_env,
    free_port,
    require,
    write_config,
    write_variant,
)

IMAGE = os.environ.get("GATEWAY_TEST_IMAGE", "dicom-gateway:latest")
REPO = Path(__file__).resolve().parents[2]
UID = 10001
GRACE = 15  # [node] shutdown_grace of the test config; `docker stop -t` is longer


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


class Container:
    """One `docker run -d` of the image: config mounted read-only, data in *volume*."""

    def __init__(self, root: Path, volume: str, archive_port: int) -> None:
        self.name = f"gateway-test-{uuid.uuid4().hex[:10]}"
        self.volume = volume
        self.port = free_port()
        self.metrics_port = free_port()
        self.archive_port = archive_port
        self.config = write_config(
            root / f"{self.name}.toml",
            {
                "node": {
                    "ae_title": "GATEWAY",
                    "host": HOST,
                    "port": self.port,
                    "data_dir": "/data",
                    "shutdown_grace": GRACE,
                },
                "security": {"default_services": ["echo", "store", "find"]},
                "peers": [
                    {"name": "archive", "ae_title": "ARCHIVE", "host": HOST, "port": archive_port},
                ],
                "rules": [
                    {
                        "name": "to-archive",
                        "match": 'SOPClassUID != ""',
                        "level": "study",
                        "action": "route",
                        "targets": ["archive"],
                        "quiet_seconds": 1,
                    },
                ],
                "dispatch": {
                    "retry_base_seconds": 0.5,
                    "retry_max_seconds": 1,
                    "max_attempts": 1000,
                },
                "metrics": {"host": HOST, "port": self.metrics_port},
                "log": {"level": "info", "format": "json"},
            },
        )
        self.config.chmod(0o644)  # read by the container's user

    def run(self) -> Container:
        docker(
            "run", "-d", "--name", self.name, "--network", "host",
            "-v", f"{self.volume}:/data",
            "-v", f"{self.config}:/etc/gateway/config.toml:ro",
            IMAGE,
        )  # fmt: skip
        self.wait_until_serving()
        return self

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *args, check=check)

    def gateway(self, *args: str) -> Any:
        """`gateway ARGS --json` inside the container, its output parsed."""
        return json.loads(self.exec("gateway", *args, "--json").stdout)

    def wait_until_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.inspect()["State"]
            if not state["Running"]:
                raise RuntimeError(f"the container exited:\n{self.logs()}")
            if self.exec("gateway", "status", "--json", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"the gateway did not start:\n{self.logs()}")

    def inspect(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(docker("inspect", self.name).stdout)[0]
        return result

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stdout_lines(self) -> list[str]:
        return docker("logs", self.name, check=False).stdout.splitlines()

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"gateway-test-{uuid.uuid4().hex[:10]}"
    docker("volume", "create", name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for container in made:
        container.remove()


def make_study(directory: Path, count: int) -> tuple[str, list[Path]]:
    """*count* CT instances of one new study (pydicom's CT_small.dcm with new UIDs)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = [
        write_variant(
            TEST_FILES / "CT_small.dcm",
            directory / f"{index}.dcm",
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            SOPInstanceUID=generate_uid(),
            InstanceNumber=index + 1,
        )
        for index in range(count)
    ]
    return study, files


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        [require("storescu"), "-aec", "GATEWAY", HOST, str(port), *map(str, files)],
        check=True, capture_output=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(what)


def test_image_metadata() -> None:
    """Non-root uid, /data volume, config path, SIGTERM, a health check every 10 s or less."""
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"].split(":")[0] == str(UID)
    assert "/data" in config["Volumes"]
    assert "GATEWAY_CONFIG=/etc/gateway/config.toml" in config["Env"]
    assert config["StopSignal"] == "SIGTERM"
    assert "11112/tcp" in config["ExposedPorts"]
    health = config["Healthcheck"]
    assert health["Test"][0] == "CMD"
    assert health["Interval"] <= 10 * 10**9  # nanoseconds
    assert config["Entrypoint"] == ["gateway"]
    assert config["Cmd"] == ["serve"]


def test_default_command_serves_the_shipped_config(
    tmp_path: Path, volume: str, containers: list[Container]
) -> None:
    """The image as built, with no config mounted: /etc/gateway/config.toml, data in /data."""
    port = free_port()
    name = f"gateway-test-{uuid.uuid4().hex[:10]}"
    container = Container.__new__(Container)
    container.name = name
    containers.append(container)
    docker(
        "run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:/data",
        "-e", f"GATEWAY_NODE__PORT={port}", "-e", f"GATEWAY_NODE__HOST={HOST}", IMAGE,
    )  # fmt: skip
    container.wait_until_serving()
    status = container.gateway("status")
    assert status["port"] == port
    subprocess.run(
        [require("echoscu"), "-aec", "GATEWAY", HOST, str(port)],
        check=True, capture_output=True, env=dcmtk_env(), timeout=30,
    )  # fmt: skip
    check = container.exec("gateway", "config", "check").stdout
    assert "data in /data" in check


def test_stores_serves_and_reports_healthy(
    tmp_path: Path, volume: str, containers: list[Container]
) -> None:
    container = Container(tmp_path, volume, free_port())
    containers.append(container)
    container.run()
    subprocess.run(
        [require("echoscu"), "-aec", "GATEWAY", HOST, str(container.port)],
        check=True, capture_output=True, env=dcmtk_env(), timeout=30,
    )  # fmt: skip
    study, files = make_study(tmp_path / "study", 3)
    storescu(container.port, files)
    listed = container.gateway("studies", "list")
    assert [s["study_uid"] for s in listed["studies"]] == [study]
    assert listed["studies"][0]["instances"] == 3

    # The gateway is PID 1 and runs as the image's user.
    status_lines = container.exec("cat", "/proc/1/status").stdout.splitlines()
    uids = next(line for line in status_lines if line.startswith("Uid:")).split()[1:]
    assert uids == [str(UID)] * 4
    cmdline = container.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline
    assert container.exec("stat", "-c", "%u", "/data/index.sqlite").stdout.strip() == str(UID)

    # Logs: one JSON object per line on stdout.
    lines = container.stdout_lines()
    events = [json.loads(line)["event"] for line in lines if line.strip()]
    assert "gateway_started" in events

    # The health check (every 10 s) turns healthy.
    wait_for(
        lambda: container.inspect()["State"]["Health"]["Status"] == "healthy",
        60, f"never healthy:\n{container.logs()}",
    )  # fmt: skip

    # The metrics endpoint answers inside the container, and counted the three instances.
    url = f"http://{HOST}:{container.metrics_port}"
    script = (
        "import sys, urllib.request;"
        f"sys.stdout.write(urllib.request.urlopen('{url}/metrics', timeout=10).read().decode())"
    )
    text = container.exec("python3", "-c", script).stdout
    received = [
        line for line in text.splitlines() if line.startswith("gateway_instances_received_total")
    ]
    assert received and float(received[0].split()[-1]) == 3.0
    health = container.exec(
        "python3", "-c", f"import urllib.request; urllib.request.urlopen('{url}/healthz')",
        check=False,
    )  # fmt: skip
    assert health.returncode == 0, health.stderr


def test_docker_stop_drains_and_a_restart_resumes(
    tmp_path: Path, volume: str, containers: list[Container]
) -> None:
    """`docker stop` lets an open association finish within shutdown_grace; the next
    container on the same volume holds the study and sends the job that was waiting."""
    archive_port = free_port()
    first = Container(tmp_path, volume, archive_port)
    containers.append(first)
    first.run()
    study, files = make_study(tmp_path / "study", 3)
    storescu(first.port, files)
    # The archive is down: the study's job waits, retried.
    queued = wait_for(
        lambda: [
            job
            for job in first.gateway("jobs", "list")["jobs"]
            if job["attempts"] >= 1 and job["state"] == "queued"
        ],
        30, "no job attempted",
    )  # fmt: skip
    assert [job["uid"] for job in queued] == [study]

    # An association open when `docker stop` arrives completes.
    late_study, late_files = make_study(tmp_path / "late", 2)
    ae = AE(ae_title="LATE")
    ae.add_requested_context(pydicom.dcmread(late_files[0]).SOPClassUID)
    assoc = ae.associate(HOST, first.port, ae_title="GATEWAY")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(late_files[0])).Status]
    stopped: dict[str, float] = {}

    def stop() -> None:
        started = time.monotonic()
        docker("stop", "-t", str(GRACE + 15), first.name, timeout=GRACE + 60)
        stopped["seconds"] = time.monotonic() - started

    stopper = threading.Thread(target=stop)
    stopper.start()
    time.sleep(2)  # SIGTERM delivered; the listener is closed, this association stays
    statuses.append(assoc.send_c_store(pydicom.dcmread(late_files[1])).Status)
    assoc.release()
    stopper.join()
    assert statuses == [0, 0]
    assert stopped["seconds"] < GRACE, stopped
    state = first.inspect()["State"]
    assert state["ExitCode"] == 0, first.logs()
    events = [json.loads(line)["event"] for line in first.stdout_lines() if line.strip()]
    assert events[-1] == "gateway_stopped"

    archive = StoreSCP(tmp_path / "archive", ae_title="ARCHIVE", port=archive_port)
    try:
        second = Container(tmp_path, volume, archive_port)
        containers.append(second)
        second.run()
        held = {
            s["study_uid"]: s["instances"] for s in second.gateway("studies", "list")["studies"]
        }
        assert held == {study: 3, late_study: 2}
        # Every job is done: the one queued before the stop delivered its study; the late
        # study's wait, open at the stop, completed after the restart. (A restart within
        # seconds of arrivals replays them to the completion engine: the same studies complete
        # again and get jobs with nothing left to send, the ledger holding it all.)
        wait_for(
            lambda: all(job["state"] == "done" for job in second.gateway("jobs", "list")["jobs"])
            and sum(job["delivered"] for job in second.gateway("jobs", "list")["jobs"]) == 5,
            60, f"jobs not done: {second.gateway('jobs', 'list')}",
        )  # fmt: skip
        jobs = {job["id"]: job for job in second.gateway("jobs", "list")["jobs"]}
        assert jobs[queued[0]["id"]]["delivered"] == 3
        received = {pydicom.dcmread(p).SOPInstanceUID for p in archive.files()}
        sent = {pydicom.dcmread(p).SOPInstanceUID for p in [*files, *late_files]}
        assert received == sent
    finally:
        archive.stop()


def test_compose_file_is_valid() -> None:
    """Debian's docker-compose accepts compose.yaml; its configs are valid gateway configs."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is not installed: run scripts/test-container")
    result = subprocess.run(
        [compose, "-f", str(REPO / "compose.yaml"), "config"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "gateway" in result.stdout and "pacs" in result.stdout
