"""The `gateway` command against a running gateway process, and without one."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from tests.conftest import (
    HOST,
    TEST_FILES,
    GatewayProcess,
    StoreSCP,
    dcmtk_env,
    free_port,
    require,
    running_gateway,
    write_config,
)

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"
CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without GATEWAY_* overrides, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, **extra}


def gateway_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=cwd,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Assert exit *code* with one line on stderr holding every word, nothing on stdout."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def storescu(gw: GatewayProcess, *files: Path) -> None:
    result = subprocess.run(
        [require("storescu"), "-R", "-aec", gw.ae_title, HOST, str(gw.port), *map(str, files)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
    )
    assert result.returncode == 0 and "Failed" not in result.stderr, result.stderr


def table(stdout: str) -> list[dict[str, str]]:
    """Rows of a CLI table as dicts keyed by its header (columns are 2+ spaces apart)."""
    header, *lines = stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]
    titles = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {t: line[a:b].strip() for t, (a, b) in zip(titles, bounds, strict=True)} for line in lines
    ]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway holding CT_small and MR_small, with an `archive` peer (up) and `offline`."""
    scp = StoreSCP(tmp_path_factory.mktemp("storescp"))
    try:
        peers = [
            {"name": "archive", "ae_title": scp.ae_title, "host": HOST, "port": scp.port},
            {"name": "offline", "ae_title": "NOBODY", "host": HOST, "port": free_port()},
        ]
        with running_gateway(tmp_path_factory.mktemp("cli"), peers=peers) as gateway:
            storescu(gateway, CT, MR)
            yield gateway
    finally:
        scp.stop()


def run(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return gateway_cli(*args, "--config", str(gw.config))


# -- status ---------------------------------------------------------------------------------------


def test_status_table(gw: GatewayProcess) -> None:
    lines = ok(run(gw, "status")).splitlines()
    assert lines[0] == f"gateway {__version__}  GATEWAY port {gw.port}"
    assert re.fullmatch(r"  uptime +\d+ s", lines[1]), lines[1]
    assert re.fullmatch(r"  associations +\d+ open", lines[2]), lines[2]
    assert re.fullmatch(r"  held +2 studies, 2 series, 2 instances, \d+\.\d KB", lines[3]), lines[3]
    assert re.fullmatch(r"  disk free +\d+\.\d [KMGT]B", lines[4]), lines[4]
    assert re.fullmatch(
        r"  since start +\d+ associations accepted, 0 rejected; 2 instances received"
        r" \(\d+\.\d KB\), 0 refused",
        lines[5],
    ), lines[5]
    assert lines[6] == "  jobs          0 queued, 0 running, 0 done, 0 failed, 0 cancelled"
    assert lines[7] == (
        "  retrievals    0 Queued, 0 Processing, 0 Successful, 0 Failed, 0 QueueFailed"
    )
    assert lines[8] == "  metrics       off"
    assert len(lines) == 9


def test_status_json(gw: GatewayProcess) -> None:
    status = json.loads(ok(run(gw, "status", "--json")))
    assert status["version"] == __version__
    assert status["port"] == gw.port
    assert (status["patients"], status["studies"], status["series"], status["instances"]) == (
        2,
        2,
        2,
        2,
    )
    assert status["bytes"] > 40_000
    assert status["disk_free_bytes"] > 0
    assert status["uptime_seconds"] > 0


def test_options_before_the_command(gw: GatewayProcess) -> None:
    status = json.loads(ok(gateway_cli("--config", str(gw.config), "--json", "status")))
    assert status["instances"] == 2


# -- studies ---------------------------------------------------------------------------------------


def test_studies_list_table(gw: GatewayProcess) -> None:
    rows = table(ok(run(gw, "studies", "list")))
    by_uid = {row["STUDY UID"]: row for row in rows}
    assert set(by_uid) == {CT_STUDY, MR_STUDY}
    assert by_uid[CT_STUDY] == {
        "STUDY UID": CT_STUDY,
        "PATIENT ID": "1CT1",
        "NAME": "CompressedSamples^CT1",
        "DATE": "20040119",
        "ACCESSION": "",
        "MOD": "CT",
        "SERIES": "1",
        "INSTANCES": "1",
    }
    assert by_uid[MR_STUDY]["MOD"] == "MR"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--patient-id", "4MR1"], [MR_STUDY]),
        (["--patient-name", "*^CT1"], [CT_STUDY]),
        (["--date", "20040101-20040331"], [CT_STUDY]),
        (["--modality", "MR"], [MR_STUDY]),
        (["--limit", "1"], None),
    ],
)
def test_studies_list_filters(gw: GatewayProcess, args: list[str], expected: Any) -> None:
    result = json.loads(ok(run(gw, "studies", "list", "--json", *args)))
    uids = [study["study_uid"] for study in result["studies"]]
    assert result["count"] == len(uids)
    if expected is None:
        assert len(uids) == 1
    else:
        assert uids == expected


def test_studies_list_nothing(gw: GatewayProcess) -> None:
    assert ok(run(gw, "studies", "list", "--modality", "US")) == "(none)\n"


def test_studies_list_bad_filter(gw: GatewayProcess) -> None:
    failed(run(gw, "studies", "list", "--date", "2004-01-2005"), 1, "'study_date'", "-32602")
    failed(run(gw, "studies", "list", "--limit", "0"), 1, "'limit'", "-32602")


def test_studies_show(gw: GatewayProcess) -> None:
    out = ok(run(gw, "studies", "show", CT_STUDY))
    fields, _, series = out.partition("\n\n")
    values = dict(re.split(r"\s+", line, maxsplit=1) for line in fields.splitlines() if " " in line)
    assert values["study_uid"] == CT_STUDY
    assert values["patient_id"] == "1CT1"
    assert values["modalities"] == "CT"
    (row,) = table(series)
    assert row == {
        "SERIES UID": CT_SERIES,
        "MOD": "CT",
        "NUMBER": "1",
        "DESCRIPTION": "",
        "INSTANCES": "1",
    }
    shown = json.loads(ok(run(gw, "studies", "show", CT_STUDY, "--json")))
    assert [s["series_uid"] for s in shown["series_list"]] == [CT_SERIES]


def test_studies_show_unknown(gw: GatewayProcess) -> None:
    failed(run(gw, "studies", "show", "1.2.3.4"), 1, "no study 1.2.3.4", "(error -32004)")
    failed(run(gw, "studies", "show", "not-a-uid"), 1, "'study_uid' is not a valid UID")


def test_studies_delete(tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw") as gateway:
        storescu(gateway, CT, MR)
        assert ok(run(gateway, "studies", "delete", CT_STUDY)) == (
            f"deleted study {CT_STUDY} (1 instances)\n"
        )
        listed = json.loads(ok(run(gateway, "studies", "list", "--json")))
        assert [study["study_uid"] for study in listed["studies"]] == [MR_STUDY]
        failed(run(gateway, "studies", "delete", CT_STUDY), 1, f"no study {CT_STUDY}", "-32004")
        deleted = json.loads(ok(run(gateway, "studies", "delete", MR_STUDY, "--json")))
        assert deleted == {"study_uid": MR_STUDY, "instances_removed": 1}
        assert ok(run(gateway, "studies", "list")) == "(none)\n"


# -- echo ------------------------------------------------------------------------------------------


def test_echo(gw: GatewayProcess) -> None:
    out = ok(run(gw, "echo", "archive"))
    assert re.fullmatch(r"archive: status 0x0000 in \d+\.\d{3} s\n", out), out
    result = json.loads(ok(run(gw, "echo", "archive", "--json")))
    assert result["peer"] == "archive" and result["status"] == 0


def test_echo_failures(gw: GatewayProcess) -> None:
    failed(
        run(gw, "echo", "offline"), 1, "unreachable: peer offline", "connection refused", "-32010"
    )
    failed(run(gw, "echo", "pacs"), 1, "unknown peer 'pacs'", "archive, offline", "-32602")


# -- no gateway, config selection, bad configs ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["studies", "list"],
        ["studies", "show", CT_STUDY],
        ["studies", "delete", CT_STUDY],
        ["echo", "archive"],
    ],
)
def test_gateway_not_running(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "nobody-here.sock"
    config = write_config(
        tmp_path / "config.toml",
        {"node": {"data_dir": str(tmp_path / "data")}, "control": {"socket": str(missing)}},
    )
    line = failed(gateway_cli(*args, "--config", str(config)), 1, "cannot reach", str(missing))
    assert "is `gateway serve` running" in line


def test_stale_socket_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # the file stays; nothing listens on it
    config = write_config(tmp_path / "config.toml", {"control": {"socket": str(stale)}})
    failed(gateway_cli("status", "--config", str(config)), 1, "cannot reach", "refused")


def test_too_many_clients(tmp_path: Path) -> None:
    root = tmp_path / "busy"
    control = {"socket": str(root / "control.sock"), "max_clients": 1}
    with running_gateway(root, control=control) as gateway:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
            hog.connect(str(gateway.socket))
            time.sleep(0.2)
            failed(run(gateway, "status"), 1, "too many control clients")
        deadline = time.monotonic() + 10
        while (result := run(gateway, "status")).returncode != 0:
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.1)


def test_config_from_environment(gw: GatewayProcess, tmp_path: Path) -> None:
    env = clean_env(GATEWAY_CONFIG=str(gw.config))
    status = json.loads(ok(gateway_cli("status", "--json", env=env, cwd=tmp_path)))
    assert status["port"] == gw.port
    # --config wins over the environment.
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    env = clean_env(GATEWAY_CONFIG=str(bad))
    assert ok(gateway_cli("status", "--config", str(gw.config), env=env)).startswith("gateway ")
    failed(gateway_cli("status", env=env, cwd=tmp_path), 2, str(bad), "not valid TOML")


def test_config_from_working_directory(gw: GatewayProcess) -> None:
    # Neither --config nor GATEWAY_CONFIG: ./config.toml.
    status = json.loads(ok(gateway_cli("status", "--json", cwd=gw.config.parent)))
    assert status["port"] == gw.port


def test_no_config_at_all(tmp_path: Path) -> None:
    failed(gateway_cli("status", cwd=tmp_path), 2, "config.toml: no such file")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[node\n", ["not valid TOML"]),
        ('[node]\nport = "x"\n', ["node.port", "valid integer"]),
        ("[node]\ncolour = 1\n", ["node.colour: unknown key"]),
        ("[control]\nmax_line_bytes = 10\n", ["control.max_line_bytes"]),
        (
            '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[peers]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n',
            ["peer name 'a' is used twice"],
        ),
    ],
    ids=["toml", "type", "unknown-key", "range", "duplicate-peer"],
)
def test_bad_config_exits_2(tmp_path: Path, text: str, words: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    for args in (["status"], ["studies", "list"], ["echo", "x"], ["config", "check"]):
        failed(gateway_cli(*args, "--config", str(config)), 2, str(config), *words)


def test_bad_usage_exits_2() -> None:
    for args in (["studies"], ["frobnicate"], ["studies", "show"], ["status", "--bogus"]):
        result = gateway_cli(*args)
        assert result.returncode == 2, args
        assert "usage: gateway" in result.stderr
