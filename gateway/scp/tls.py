"""DICOM TLS (PS3.15 B.1, the BCP 195 profiles DCMTK uses by default): the node's contexts.

TLS 1.2 or newer with Python's default cipher list (forward-secret AEAD suites first, no
export, RC4, 3DES or anonymous ones), as the BCP 195 profile asks. The node's certificate
serves its TLS listener and is its client certificate towards `tls = true` peers; `tls_ca`
holds what is trusted, both for client certificates and for peers. A certificate's subject is
not bound to an AE title.
"""

from __future__ import annotations

import ssl

import structlog

from gateway.audit import AuditLog
from gateway.config import NodeSettings, PeerSettings
from gateway.metrics import Metrics

__all__ = ["client_context", "handshake_failed", "server_context"]

log = structlog.get_logger(__name__)


def handshake_failed(
    address: str, reason: str, metrics: Metrics | None, audit: AuditLog | None
) -> None:
    """A TLS client that did not complete the handshake (no or an untrusted certificate,
    plain DICOM on the TLS port, silence past the ACSE timeout): logged, counted as a
    rejected association, audited."""
    log.warning("tls_handshake_failed", peer=address, reason=reason[:200])
    if metrics is not None:
        metrics.associations_rejected.labels(reason="tls_handshake_failed").inc()
    if audit is not None:
        audit.record("Security Alert", outcome="refused", what="TLS handshake failed",
                     address=address, reason=reason[:200])  # fmt: skip


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(node: NodeSettings) -> ssl.SSLContext:
    """The TLS listener's context: the node's certificate; client certificates verified against
    `tls_ca` and required when `requires_client_cert` (a client without one, or with one that
    does not verify, fails the handshake)."""
    assert node.tls_cert is not None and node.tls_key is not None
    context = _base(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(node.tls_cert, node.tls_key)
    if node.tls_ca is not None:
        context.load_verify_locations(cafile=node.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED if node.requires_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(node: NodeSettings, peer: PeerSettings) -> ssl.SSLContext:
    """The context to reach *peer* with: its certificate verified against `tls_ca` (its host
    name only with `tls_check_hostname`), the node's certificate offered as the client's."""
    assert node.tls_ca is not None
    context = _base(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = peer.tls_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=node.tls_ca)
    if node.tls_cert is not None and node.tls_key is not None:
        context.load_cert_chain(node.tls_cert, node.tls_key)
    return context
