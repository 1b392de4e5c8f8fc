"""The shipped deployment files: the image's config and compose's configs load as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import load_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["gateway.toml", "compose-gateway.toml"])
def test_deploy_configs_load(name: str) -> None:
    settings = load_settings(REPO / "deploy" / name)
    assert settings.node.data_dir == Path("/data")  # the image's volume
    assert settings.node.host == "0.0.0.0"
    assert settings.log.format == "json"


def test_compose_peers_are_its_orthancs() -> None:
    """The compose gateway's peers are the Orthancs compose.yaml defines, by AE title, and
    each Orthanc knows the gateway as a modality (the C-MOVE destination of a retrieval)."""
    settings = load_settings(REPO / "deploy" / "compose-gateway.toml")
    compose = (REPO / "compose.yaml").read_text()
    for peer in settings.peers:
        assert f"\n  {peer.host}:\n" in compose  # a service of that name
        orthanc = json.loads((REPO / "deploy" / f"orthanc-{peer.name}.json").read_text())
        assert orthanc["DicomAet"] == peer.ae_title
        assert orthanc["DicomPort"] == peer.port
        assert orthanc["DicomModalities"]["gateway"] == [
            settings.node.ae_title,
            "gateway",
            settings.node.port,
        ]
    assert settings.retrieve.primary == "pacs"
    assert settings.retrieve.anonymiser == "anonymiser"
