"""The gateway's one exception tree; each boundary translates into and out of it.

GatewayError
├── ConfigError            a bad config.toml or environment override (exit status 2)
├── StoreError             the file store or its index failed, or the disk is below its
│                          floor (DIMSE 0xA700)
├── RejectedInstance       an instance refused for what it is; carries its DIMSE status
│   ├── InvalidInstance    undecodable, truncated, missing or malformed UIDs (0xC000 class)
│   ├── InstanceMismatch   dataset UIDs differ from the C-STORE request (0xA900)
│   └── DuplicateInstance  duplicate SOP Instance UID under the `reject` policy (0xC111)
│       └── SopInstanceConflict  the UID held in another series or study, other content (0xC112)
├── PeerError              a remote node did not answer or refused
└── ControlError           a control-socket request failed; carries a JSON-RPC code
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ConfigError",
    "ControlError",
    "DuplicateInstance",
    "GatewayError",
    "InstanceMismatch",
    "InvalidInstance",
    "PeerError",
    "PeerErrorKind",
    "RejectedInstance",
    "SopInstanceConflict",
    "StoreError",
]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the key and the problem."""


class StoreError(GatewayError):
    """The file store or the index could not do its work."""

    status = 0xA700


class RejectedInstance(GatewayError):
    """An instance refused for what it is, not for the gateway's state."""

    status = 0xC000


class InvalidInstance(RejectedInstance):
    """Undecodable or truncated dataset, or a missing or malformed UID."""

    status = 0xC000


class InstanceMismatch(RejectedInstance):
    """The dataset's SOP Class or Instance UID differs from the C-STORE request."""

    status = 0xA900


class DuplicateInstance(RejectedInstance):
    """A different instance with a SOP Instance UID already held, under the `reject` policy.

    C-STORE has no "duplicate" status (PS3.4 B.2.3; 0x0111 is N-CREATE's, PS3.7 C.4.1): it is
    answered in the failure class Cannot Understand (0xCxxx), whose low bits are the
    implementation's, so the sender does not retry it.
    """

    status = 0xC111


class SopInstanceConflict(DuplicateInstance):
    """A SOP Instance UID held in another series or study, with other content: two objects
    under one UID, refused whatever the duplicate policy (a re-send stays in its series)."""

    status = 0xC112


PeerErrorKind = Literal[
    "unreachable", "rejected", "aborted", "no_context", "transcode", "status", "stopped"
]


class PeerError(GatewayError):
    """A remote DICOM node could not be reached or refused the request.

    `kind` says which, and the message starts with it (job errors, retrieval reasons, `gateway
    echo` and logs show the message): ``unreachable`` (connection refused, or no answer within
    the connection timeout), ``rejected`` (A-ASSOCIATE-RJ, with its result, source and reason),
    ``aborted`` (A-ABORT, or no answer within the DIMSE timeout), ``no_context`` (no acceptable
    presentation context for a SOP class), ``transcode`` (the instance could not be re-encoded
    in a syntax the peer accepted: a pixel codec missing or corrupt data; permanent), ``status``
    (a DIMSE failure status, with its code), ``stopped`` (the gateway stopped the request).
    `permanent` errors are not retried: they last until the configuration or the data changes
    (a peer that does not know the gateway's AE title).
    """

    def __init__(self, kind: PeerErrorKind, detail: str, *, permanent: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: PeerErrorKind = kind
        self.permanent = permanent


class ControlError(GatewayError):
    """A control-socket request failed; `code` is its JSON-RPC error code."""

    def __init__(self, code: int, message: str, data: object | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
