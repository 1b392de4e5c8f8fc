"""DICOM TLS with DCMTK: the node's TLS listener, and peers reached over TLS.

A test CA signs the gateway's, a client's and a destination's certificates (`make_pki`). DCMTK
`echoscu`, `storescu` and `findscu` with `+tls` reach the TLS port with the client's certificate;
a client without a certificate, with one the CA did not sign, or speaking plain DICOM is refused
during the handshake, and the plain port goes on serving. DCMTK `storescp +tls` is a `tls = true`
peer, and so is Orthanc with its DICOM TLS on: `gateway echo`, a rule's dispatch and C-MOVEs
reach them, verified against the CA, with the gateway's certificate as the client's.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    Pki,
    dcmtk_env,
    free_port,
    make_pki,
    require,
    self_signed_certificate,
    wait_for_port,
)

CT = TEST_FILES / "CT_small.dcm"
STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", ("gateway", "client", "dest"))


def client_tls(pki: Pki, name: str = "client") -> tuple[str, ...]:
    cert, key = pki.pair(name)
    return ("+tls", str(key), str(cert), "+cf", str(pki.ca))


def echo(port: int, tls: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("echoscu"), "-v", *tls, "-aec", "GATEWAY", HOST, str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip


def tls_gateway(gateway_factory: Any, pki: Pki, **sections: Any) -> tuple[GatewayProcess, int]:
    cert, key = pki.pair("gateway")
    tls_port = free_port()
    node = {"tls_port": tls_port, "tls_cert": str(cert), "tls_key": str(key),
            "tls_ca": str(pki.ca), **sections.pop("node", {})}  # fmt: skip
    gw = gateway_factory(node=node, **sections)
    wait_for_port(tls_port, 10)
    return gw, tls_port


def test_tls_listener_with_client_certificates(
    gateway_factory: Any, pki: Pki, tmp_path: Path
) -> None:
    gw, tls_port = tls_gateway(gateway_factory, pki)
    assert echo(tls_port, client_tls(pki)).returncode == 0
    stored = subprocess.run(
        [require("storescu"), "-v", *client_tls(pki), "-aec", "GATEWAY", HOST, str(tls_port),
         str(CT)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert "Received Store Response (Success)" in stored.stdout + stored.stderr
    found = subprocess.run(
        [require("findscu"), "-v", *client_tls(pki), "-S", "-aec", "GATEWAY",
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", HOST, str(tls_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60,
    )  # fmt: skip
    assert STUDY in found.stdout + found.stderr
    # No client certificate, one the CA did not sign, plain DICOM: refused in the handshake.
    anonymous = echo(tls_port, ("+tla", "+cf", str(pki.ca)))
    assert anonymous.returncode != 0
    rogue_cert, rogue_key = self_signed_certificate(tmp_path)
    rogue = echo(tls_port, ("+tls", str(rogue_key), str(rogue_cert), "+cf", str(pki.ca)))
    assert rogue.returncode != 0
    assert echo(tls_port).returncode != 0
    failures = [
        json.loads(line) for line in gw.log_text().splitlines()
        if line.startswith("{") and '"tls_handshake_failed"' in line
    ]  # fmt: skip
    assert len(failures) >= 3
    # The plain port goes on, and the TLS one still serves.
    assert echo(gw.port).returncode == 0
    assert echo(tls_port, client_tls(pki)).returncode == 0
    assert gw.call("status")["instances"] == 1


class TlsStoreSCP:
    """DCMTK `storescp +tls` with the destination's certificate, requiring a client one."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        cert, key = pki.pair("dest")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.proc = subprocess.Popen(
            [require("storescp"), "+tls", str(key), str(cert), "+cf", str(pki.ca), "-aet",
             "TLSDEST", "-od", str(directory), str(self.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_a_tls_peer_is_reached_over_tls(gateway_factory: Any, pki: Pki, tmp_path: Path) -> None:
    """`gateway echo`, a routing rule's dispatch, and a C-MOVE that DCMTK movescu asks for over
    the TLS port, each reach DCMTK `storescp +tls`."""
    dest = TlsStoreSCP(tmp_path / "dest", pki)
    try:
        peer = {"name": "dest", "ae_title": "TLSDEST", "host": HOST, "port": dest.port,
                "tls": True}  # fmt: skip
        rules = [{"name": "ct", "match": 'Modality == "CT"', "targets": ["dest"],
                  "quiet_seconds": 0.3}]  # fmt: skip
        gw, tls_port = tls_gateway(gateway_factory, pki, peers=[peer], rules=rules)
        echoed = gw.cli("echo", "dest")
        assert "dest" in echoed.stdout and echoed.returncode == 0, echoed.stdout
        sent = subprocess.run(
            [require("storescu"), "-aec", "GATEWAY", HOST, str(gw.port), str(CT)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0
        deadline = time.monotonic() + 30
        while [j["state"] for j in gw.call("jobs.list")["jobs"]] != ["done"]:
            assert time.monotonic() < deadline, gw.call("jobs.list")
            time.sleep(0.1)
        assert len(list((tmp_path / "dest").iterdir())) == 1  # dispatched by the rule
        for path in (tmp_path / "dest").iterdir():
            path.unlink()
        # DCMTK's movescu has no TLS options: a pynetdicom requestor with the client's
        # certificate asks for the C-MOVE on the TLS port.
        import ssl

        from pydicom.dataset import Dataset
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        context.check_hostname = False
        cert, key = pki.pair("client")
        context.load_cert_chain(cert, key)
        ae = AE(ae_title="WS1")
        ae.add_requested_context(MOVE)
        assoc = ae.associate(HOST, tls_port, ae_title="GATEWAY", tls_args=(context, None))
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = STUDY
        try:
            statuses = [int(s.Status) for s, _ in assoc.send_c_move(query, "TLSDEST", MOVE)]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000, statuses
        assert len(list((tmp_path / "dest").iterdir())) == 1
    finally:
        dest.stop()


def test_orthanc_over_dicom_tls(gateway_factory: Any, pki: Pki, tmp_path: Path) -> None:
    """Orthanc with DICOM TLS on (its certificate from the test CA, client certificates
    required) as a `tls = true` peer: `gateway echo` and a C-MOVE to it go over TLS."""
    from tests.conftest import OrthancProcess
    from tests.scp.test_query_retrieve import movescu

    make_pki(pki.directory, ("orthanc",))
    cert, key = pki.pair("orthanc")
    orthanc = OrthancProcess(tmp_path / "orthanc", "ORTHANC", extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True, "DicomAlwaysAllowStore": True,
    })  # fmt: skip
    try:
        peer = {"name": "orthanc", "ae_title": "ORTHANC", "host": HOST, "port": orthanc.port,
                "tls": True}  # fmt: skip
        gw, _ = tls_gateway(gateway_factory, pki, peers=[peer])
        echoed = gw.cli("echo", "orthanc", check=False)
        assert echoed.returncode == 0, echoed.stdout + echoed.stderr
        sent = subprocess.run(
            [require("storescu"), "-aec", "GATEWAY", HOST, str(gw.port), str(CT)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0
        keys = ("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY}")
        moved = movescu(gw, "ORTHANC", "S", *keys)
        output = moved.stdout + moved.stderr
        assert "0x0000: Success" in output, output
        assert orthanc.instance_count() == 1
    finally:
        orthanc.stop()
