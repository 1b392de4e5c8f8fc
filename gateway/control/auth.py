"""Who a TCP control connection is: operator tokens (from the config) and device tokens.

Operator tokens live in `[control] operator_token_hashes` as `sha256$<salt hex>$<digest hex>`
(make one with `gateway control hash-token`); device tokens in the devices table. Both are only
ever stored as salted SHA-256 digests of 256-bit random tokens and compared with
`hmac.compare_digest`.

A device's state follows its session (`ControlServer.end_session`): it is ONLINE from its login
(BUSY if it has a STARTED or INPROGRESS task, which it is then told again) until the session
ends, whoever ends it (OFFLINE), unless a newer login of the same device ended it.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from gateway.acquire.registry import Registry, hash_token
from gateway.acquire.results import Uploads
from gateway.config import Settings
from gateway.control.server import AUTH_FAILED, Authenticator, ControlServer, Role, Session
from gateway.errors import ControlError

__all__ = [
    "device_arrived",
    "device_gone",
    "make_authenticator",
    "new_operator_token",
    "operator_token_hash",
]


def new_operator_token() -> tuple[str, str]:
    """A new operator token and the line that configures it (its salted hash)."""
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return token, f"sha256${salt.hex()}${hash_token(token, salt).hex()}"


def operator_token_hash(token: str, hashes: Sequence[str]) -> str | None:
    """The configured hash *token* matches, or None (every entry is compared, in constant time
    per entry)."""
    found = None
    for entry in hashes:
        _, salt, digest = entry.split("$")
        if hmac.compare_digest(hash_token(token, bytes.fromhex(salt)), bytes.fromhex(digest)):
            found = entry
    return found


def make_authenticator(settings: Callable[[], Settings], registry: Registry) -> Authenticator:
    """auth.login's check: an operator token against the running settings' hashes (a reload
    replaces them), or a device id and token against *registry*."""

    async def login(params: dict[str, Any]) -> tuple[Role, str | None, str]:
        if isinstance(params.get("operator_token"), str):
            hashes = settings().control.operator_token_hashes
            entry = operator_token_hash(params["operator_token"], hashes)
            if entry is not None:
                return "operator", None, entry
            raise ControlError(AUTH_FAILED, "unknown operator token")
        device_id, token = params.get("device_id"), params.get("token")
        if isinstance(device_id, str) and isinstance(token, str):
            if await registry.check_token(device_id, token):
                return "device", device_id, device_id
            raise ControlError(AUTH_FAILED, "unknown device or token")
        raise ControlError(AUTH_FAILED, "auth.login needs operator_token, or device_id and token")

    return login


async def device_arrived(registry: Registry, session: Session) -> None:
    """A device logged in (`ControlServer.on_session_start`, before its login is answered): it
    is ONLINE, or BUSY with its active task, which is sent again (`task.start`) after the
    answer."""
    if session.device_id is None:
        return
    await registry.set_device_state(session.device_id, "ONLINE")  # BUSY with an active task
    task = await registry.active_task(session.device_id)
    if task is not None:
        session.notify_after_reply("task.start", await registry.task_assignment(task))


async def device_gone(
    control: ControlServer, registry: Registry, uploads: Uploads, session: Session
) -> None:
    """A device's session ended (`ControlServer.on_session_end`): it is OFFLINE and its
    unfinished uploads are dropped, unless a newer session of the device ended it (then it is
    online through that one, which has begun no upload yet)."""
    if session.device_id is None:
        return
    if session.replaced or control.device_session(session.device_id) is None:
        uploads.drop_device(session.device_id)
    if not session.replaced and control.device_session(session.device_id) is None:
        await registry.set_device_state(session.device_id, "OFFLINE")
