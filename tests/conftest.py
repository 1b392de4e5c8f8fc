"""Shared fixtures: free loopback ports, the gateway as a real process, DCMTK helpers.

Every server a test starts is stopped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.config import SERVICES
from gateway.control.client import ControlClient

REPO = Path(__file__).resolve().parent.parent
PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = PYDICOM_DATA / "test_files"
CHARSET_FILES = PYDICOM_DATA / "charset_files"
HOST = "127.0.0.1"

# The container image's tests need a Docker daemon and the built image: scripts/test-container
# sets GATEWAY_TEST_IMAGE and runs them after the suite.
collect_ignore = [] if os.environ.get("GATEWAY_TEST_IMAGE") else ["container"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s")


def require(tool: str) -> str:
    path = shutil.which(tool, path="/usr/bin")  # DCMTK; pynetdicom ships same-named apps
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/install-test-deps")
    return path


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, body in sections.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in entry.items())
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in body.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Pki:
    """A test CA, and key pairs (PEM) it signed, each valid for localhost and 127.0.0.1."""

    ca: Path
    directory: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of *name*."""
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"


def make_pki(directory: Path, names: tuple[str, ...]) -> Pki:
    """A CA and one certificate per name signed by it: the README's `scripts/make-certs`
    (one day)."""
    subprocess.run(
        [str(REPO / "scripts" / "make-certs"), str(directory), *names],
        check=True, capture_output=True, env={**os.environ, "DAYS": "1"},
    )  # fmt: skip
    return Pki(directory / "ca.pem", directory)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` and its key (PEM files in *directory*), made by openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class GatewayProcess:
    """`gateway serve` in a subprocess with a config of its own under *root*."""

    def __init__(self, root: Path, **sections: Any) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        node = {
            "ae_title": "GATEWAY",
            "host": HOST,
            "port": self.port,
            "data_dir": str(root / "data"),
            "shutdown_grace": 5,
        }
        node.update(sections.pop("node", {}))
        self.ae_title = str(node["ae_title"])
        self.data_dir = Path(str(node["data_dir"]))
        control = {"socket": str(root / "control.sock")}
        control.update(sections.pop("control", {}))
        # DCMTK's and pynetdicom's default AE titles are unknown callers: the suite's gateways
        # let them use every service unless a test says otherwise (tests/scp/test_access.py).
        security = {"default_services": list(SERVICES)}
        security.update(sections.pop("security", {}))
        self._base = {
            "node": node,
            "control": control,
            "security": security,
            "log": {"level": "info", "format": "json"},
        }
        self.config = self.write_config(**sections)
        self.socket = Path(str(control["socket"]))
        self.log_path = root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **sections: Any) -> Path:
        """(Re)write config.toml: the node, control and log sections of this gateway, and these."""
        return write_config(self.root / "config.toml", {**self._base, **sections})

    def start(self, timeout: float = 30.0, pass_fds: tuple[int, ...] = ()) -> GatewayProcess:
        """Start `gateway serve`; *pass_fds* stay open in it (to push its own above them)."""
        self.socket.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
        log.close()
        # Ready when the control socket answers: it is served only once the DICOM listener is
        # up. (A bare TCP probe of the DICOM port would hold a half-open connection.)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            if self.socket.exists():
                try:
                    self.call("status")
                    return self
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not start:\n{self.log_text()}")
            time.sleep(0.02)

    def control(self) -> ControlClient:
        return ControlClient(self.socket)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.control() as client:
            return client.call(method, params)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@contextlib.contextmanager
def running_gateway(root: Path, **sections: Any) -> Iterator[GatewayProcess]:
    """A gateway under *root* (for module-scoped fixtures), stopped on exit."""
    gw = GatewayProcess(root, **sections).start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (and finally stop) gateway processes: `gateway_factory(name, **sections)`."""
    started: list[GatewayProcess] = []

    def make(name: str = "gw", *, start: bool = True, **sections: Any) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / name, **sections)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        with contextlib.suppress(Exception):
            gw.stop()


@pytest.fixture
def gateway(gateway_factory: Any) -> GatewayProcess:
    """A running gateway with default settings."""
    gw: GatewayProcess = gateway_factory()
    return gw


class StoreSCP:
    """DCMTK `storescp` writing into a directory: `+xa` accepts every transfer syntax, `+xi`
    Implicit VR Little Endian only (a legacy or research destination)."""

    def __init__(
        self,
        directory: Path,
        ae_title: str = "STORESCP",
        syntaxes: str = "+xa",
        port: int | None = None,
    ) -> None:
        require("storescp")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [
                "/usr/bin/storescp",
                syntaxes,
                "-aet",
                ae_title,
                "-od",
                str(directory),
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "storescp")
    yield scp
    scp.stop()


def dataset_bytes(path: Path) -> bytes:
    """The dataset bytes of a Part 10 file, after its File Meta."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    meta_len = int.from_bytes(data[140:144], "little")
    return data[144 + meta_len :]


def write_variant(source: Path, target: Path, **attributes: Any) -> Path:
    """Save *source* with some attributes changed (bad values allowed: warnings silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
        for keyword, value in attributes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if "SOPInstanceUID" in attributes and attributes["SOPInstanceUID"] is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = attributes["SOPInstanceUID"]
        ds.save_as(target, enforce_file_format=True)
    return target


class OrthancProcess:
    """An Orthanc of its own: config, storage and index in *root*, loopback ports, no auth.

    *modalities* are its DicomModalities (name -> (AE title, host, port)): the nodes it may
    C-STORE to, as C-MOVE destinations. `stop()` and `start()` again keep its data and ports.
    One that several tests of a module share is emptied for each by `reset()` (it shuts down
    in ~3 s, its HTTP and DICOM servers polling for the stop; it starts in a fraction of that).
    """

    def __init__(
        self,
        root: Path,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        *,
        verbose: bool = False,
        check_called_aet: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        import json

        self.orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(self.orthanc).exists():
            pytest.fail("Orthanc is not installed: run scripts/install-test-deps")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.verbose = verbose
        config = {
            "Name": "test",
            "DicomAet": ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {name: list(m) for name, m in (modalities or {}).items()},
            **(extra or {}),
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log_path = root / "orthanc.log"
        self.log_start = 0  # where `log_text` begins: the last `reset`
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> OrthancProcess:
        argv = [
            self.orthanc,
            *(["--verbose"] if self.verbose else []),
            str(self.root / "orthanc.json"),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"}
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rest("/system")
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.1)

    def rest(self, path: str, data: bytes | None = None, method: str | None = None) -> Any:
        import json
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with opener.open(request, timeout=30) as response:
            body = response.read()
            return json.loads(body) if body else None

    def upload(self, *paths: Path) -> None:
        """Store files through the REST API (the archive's own content, not a C-STORE)."""
        for path in paths:
            self.rest("/instances", data=path.read_bytes(), method="POST")

    def instance_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])

    def sop_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance held."""
        return {
            self.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in self.rest("/instances")
        }

    def set_modalities(self, modalities: dict[str, tuple[str, str, int]]) -> None:
        """Add or change DicomModalities (name -> (AE title, host, port)) through the REST API:
        in memory, until it stops (`start()` again reads its config's)."""
        import json

        for name, (ae_title, host, port) in modalities.items():
            body = json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode()
            self.rest(f"/modalities/{name}", data=body, method="PUT")

    def reset(self, modalities: dict[str, tuple[str, str, int]] | None = None) -> OrthancProcess:
        """Ready a running Orthanc that a module's tests share for the next test: every patient
        deleted (with its studies, series and instances), *modalities* set, and `log_text`
        from here on. (`POST /tools/reset` is no use: it restarts Orthanc, which then ignores
        SIGTERM.)"""
        assert self.proc is not None and self.proc.poll() is None, "a shared Orthanc is down"
        for patient in self.rest("/patients"):
            self.rest(f"/patients/{patient}", method="DELETE")
        assert self.instance_count() == 0
        self.set_modalities(modalities or {})
        self.log_start = self.log_path.stat().st_size
        return self

    def log_text(self) -> str:
        """Its log since the last `reset` (all of it if none)."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) and return at once; `stop()` waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stop_orthancs(*servers: OrthancProcess | None) -> None:
    """Stop Orthancs side by side: each takes ~3 s to shut down, mostly waiting."""
    running = [server for server in servers if server is not None]
    for server in running:
        server.terminate()
    for server in running:
        server.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    server = OrthancProcess(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def wildcard_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """2,000 instances of 2,000 patients named 63 A's and one letter (made once per run, for
    the wildcard tests of every layer)."""
    from pydicom.uid import generate_uid

    directory = tmp_path_factory.mktemp("wildcards")
    return [
        write_variant(
            TEST_FILES / "CT_small.dcm", directory / f"p{n:04}.dcm",
            PatientName="A" * 63 + chr(65 + n % 26), PatientID=f"WILD{n:04}",
            StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
            SOPInstanceUID=generate_uid(),
        )
        for n in range(2000)
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def nothing_left_in_tmp(tmp_path: Path) -> Iterator[None]:
    """No gateway a test starts leaves a received file behind in its tmp/ (refused, duplicate
    or stored: each is removed or moved in), a kill -9 excepted (start-up clears those). The
    store's own tests are not held to it: there the caller owns the file it hands in."""
    yield
    test = os.environ.get("PYTEST_CURRENT_TEST", "")
    if test.startswith("tests/store/") or "kill" in test or "crash" in test:
        return
    left = [p for p in tmp_path.rglob("tmp/*.part") if p.is_file()]
    assert left == [], left


@pytest.fixture
def recorder() -> Iterator[Any]:
    """A pynetdicom storage SCP on a free loopback port recording every C-STORE
    (`tests.scu.test_sender.Recorder`), stopped after the test."""
    from tests.scu.test_sender import Recorder

    r = Recorder()
    yield r
    r.stop()
