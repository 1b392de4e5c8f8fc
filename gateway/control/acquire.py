"""Control methods for acquisition: devices.*, sequences.*, tasks.*, uploads.*.

Operators: devices.register / list / get / update / rotate_token / revoke; sequences.create /
list / file; tasks.create / list / get / start / cancel / results. Devices: tasks.report,
tasks.current, tasks.results, devices.report_state, devices.heartbeat, sequences.file,
uploads.begin / chunk / finish. The gateway notifies a device with `task.start`, `task.cancel`
and `session.closed`. docs/acquisition.md documents each with examples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.acquire.registry import ACTIVE_STATUSES, AcquisitionError
from gateway.acquire.results import task_results
from gateway.control.methods import NOT_FOUND, _no_unknown
from gateway.control.server import (
    FORBIDDEN,
    INVALID_PARAMS,
    ControlServer,
    current_session,
)
from gateway.errors import ControlError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["CONFLICT", "TASK_NOT_ACTIVE", "register_acquisition_methods"]

CONFLICT = -32013
# A report or upload for a task that is not STARTED or INPROGRESS (NEW, FINISHED, ERROR).
TASK_NOT_ACTIVE = -32014
_CODES = {
    "invalid": INVALID_PARAMS,
    "not_found": NOT_FOUND,
    "conflict": CONFLICT,
    "forbidden": FORBIDDEN,
    "inactive": TASK_NOT_ACTIVE,
}
_DEVICE_FIELDS = {"name", "modality", "manufacturer", "serial_number", "site", "station_ae"}
_UPLOAD_PARAMS = {
    "begin": {"task_id", "name", "size", "sha256"},
    "chunk": {"upload_id", "offset", "data"},
    "finish": {"upload_id"},
}

Method = Callable[[dict[str, Any]], Awaitable[Any]]


def _wrapped(method: Method) -> Method:
    async def call(params: dict[str, Any]) -> Any:
        try:
            return await method(params)
        except AcquisitionError as exc:
            raise ControlError(_CODES[exc.kind], str(exc), exc.data) from None

    return call


def _id(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(INVALID_PARAMS, f"parameter {key!r} is required")
    return value


def register_acquisition_methods(server: ControlServer, gateway: Gateway) -> None:
    registry = gateway.registry

    async def register(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, _DEVICE_FIELDS)
        return await registry.register_device(params)

    async def list_devices(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        devices = await registry.devices()
        return {"devices": devices, "count": len(devices)}

    async def get_device(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        return await registry.device(_id(params, "device_id"))

    async def update(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id", *_DEVICE_FIELDS})
        fields = {k: v for k, v in params.items() if k != "device_id"}
        return await registry.update_device(_id(params, "device_id"), fields)

    async def rotate(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        device_id = _id(params, "device_id")
        token = await registry.rotate_token(device_id)
        await asyncio.gather(*server.close_sessions({device_id}, "device token rotated",
                                                    code="token_rotated"))  # fmt: skip
        return {"id": device_id, "token": token}

    async def revoke(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id"})
        device_id = _id(params, "device_id")
        await registry.revoke_token(device_id)
        await asyncio.gather(*server.close_sessions({device_id}, "device token revoked",
                                                    code="token_revoked"))  # fmt: skip
        return {"id": device_id, "revoked": True}

    async def create_sequence(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"name", "description", "parameters", "file"})
        return await registry.create_sequence(params)

    async def sequence_file(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"sequence_id"})
        return await registry.sequence_file(_id(params, "sequence_id"))

    async def list_sequences(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        sequences = await registry.sequences()
        return {"sequences": sequences, "count": len(sequences)}

    async def create_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(
            params,
            {"device_id", "sequence_id", "parameters", "patient", "scheduled_at", "description"},
        )
        return await registry.create_task(params)

    async def list_tasks(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"device_id", "status"})
        tasks = await registry.tasks(device_id=params.get("device_id"), status=params.get("status"))
        return {"tasks": tasks, "count": len(tasks)}

    async def get_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"task_id"})
        return await registry.task(_id(params, "task_id"))

    async def cancel_task(params: dict[str, Any]) -> dict[str, Any]:
        """End a task that has not ended (ERROR, with the reason). A running one (STARTED,
        INPROGRESS) frees its device (BUSY -> ONLINE), which is told: `task.cancel`."""
        _no_unknown(params, {"task_id", "reason"})
        reason = str(params.get("reason") or "cancelled by an operator")[:256]
        before = await registry.task(_id(params, "task_id"))
        cancelled = await registry.set_task_status(
            before["id"], "ERROR", reason=reason, allowed_from=("NEW", *ACTIVE_STATUSES)
        )
        if before["status"] in ACTIVE_STATUSES:
            gateway.uploads.drop_task(before["id"])
            session = server.device_session(before["device_id"])
            if session is not None:  # else it learns at its next login: no task.start
                await session.notify(
                    "task.cancel",
                    {"task_id": cancelled["id"], "reason": reason, "task": cancelled},
                )
        return cancelled

    async def heartbeat(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, set())
        session = current_session()
        assert session is not None and session.device_id is not None
        state = await registry.seen(session.device_id)
        return {"device_id": session.device_id, "state": state}

    async def start_task(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"task_id"})
        task = await registry.task(_id(params, "task_id"))
        if task["status"] != "NEW":
            raise ControlError(CONFLICT, f"task {task['id']} is {task['status']}, not NEW")
        device = await registry.device(task["device_id"])
        offline = ControlError(CONFLICT, f"device {device['name']!r} is offline",
                               {"device_id": device["id"], "state": "OFFLINE"})  # fmt: skip
        session = server.device_session(device["id"])
        if session is None:
            raise offline
        started = await registry.start_task(task["id"])  # refused if it has an active task
        delivered = await session.notify("task.start", await registry.task_assignment(started))
        if not delivered:  # the connection went away between the check and the send
            await registry.set_task_status(task["id"], "NEW", allowed_from=("STARTED",))
            await server.end_session(session, "the connection was lost", code="disconnected")
            raise offline
        return started

    async def current_task(params: dict[str, Any]) -> dict[str, Any] | None:
        """The calling device's active task as `task.start` gave it, or None."""
        _no_unknown(params, set())
        session = current_session()
        assert session is not None and session.device_id is not None
        task = await registry.active_task(session.device_id)
        return None if task is None else await registry.task_assignment(task)

    async def report(params: dict[str, Any]) -> dict[str, Any]:
        """A device reports progress or the end of one of its own tasks."""
        _no_unknown(params, {"task_id", "progress", "status", "reason"})
        session = current_session()
        assert session is not None and session.device_id is not None
        task = await registry.device_task(_id(params, "task_id"), session.device_id)
        progress = params.get("progress")
        if progress is not None and (
            isinstance(progress, bool) or not isinstance(progress, int) or not 0 <= progress <= 100
        ):
            raise ControlError(INVALID_PARAMS, "parameter 'progress' must be an integer 0..100")
        status = params.get("status", "INPROGRESS")
        if status not in ("INPROGRESS", "FINISHED", "ERROR"):
            raise ControlError(
                INVALID_PARAMS, "parameter 'status' must be INPROGRESS, FINISHED or ERROR"
            )
        reason = params.get("reason")
        if status == "ERROR" and not reason:
            reason = "reported by the device"
        updated = await registry.set_task_status(
            task["id"],
            status,
            progress=progress,
            reason=None if reason is None else str(reason)[:256],
            allowed_from=ACTIVE_STATUSES,
            refused="inactive",
        )  # FINISHED or ERROR frees the device: BUSY -> ONLINE
        return updated

    async def device_state(params: dict[str, Any]) -> dict[str, Any]:
        """A device reports its own state: ERROR (with a reason) or ONLINE again."""
        _no_unknown(params, {"state", "reason"})
        session = current_session()
        assert session is not None and session.device_id is not None
        state = params.get("state")
        if state not in ("ONLINE", "ERROR"):
            raise ControlError(INVALID_PARAMS, "parameter 'state' must be ONLINE or ERROR")
        await registry.set_device_state(session.device_id, state)
        return await registry.device(session.device_id)

    async def results(params: dict[str, Any]) -> dict[str, Any]:
        _no_unknown(params, {"task_id"})
        task = await registry.task(_id(params, "task_id"))
        session = current_session()
        if (
            session is not None
            and session.role == "device"
            and task["device_id"] != session.device_id
        ):
            raise ControlError(FORBIDDEN, f"task {task['id']} belongs to another device")
        return await task_results(gateway.store, task)

    def device_call(name: str) -> Method:
        async def call(params: dict[str, Any]) -> dict[str, Any]:
            _no_unknown(params, _UPLOAD_PARAMS[name])
            session = current_session()
            assert session is not None and session.device_id is not None
            method = getattr(gateway.uploads, name)
            result: dict[str, Any] = await method(session.device_id, params)
            return result

        return call

    server.register("tasks.results", _wrapped(results), access="any")
    server.register("sequences.file", _wrapped(sequence_file), access="any")
    server.register("uploads.begin", _wrapped(device_call("begin")), access="device")
    server.register("uploads.chunk", _wrapped(device_call("chunk")), access="device")
    server.register("uploads.finish", _wrapped(device_call("finish")), access="device")
    server.register("devices.heartbeat", _wrapped(heartbeat), access="device")
    server.register("tasks.current", _wrapped(current_task), access="device")
    server.register("tasks.report", _wrapped(report), access="device")
    server.register("devices.report_state", _wrapped(device_state), access="device")
    server.register("tasks.start", _wrapped(start_task))
    for name, method in (
        ("devices.register", register),
        ("devices.list", list_devices),
        ("devices.get", get_device),
        ("devices.update", update),
        ("devices.rotate_token", rotate),
        ("devices.revoke", revoke),
        ("sequences.create", create_sequence),
        ("sequences.list", list_sequences),
        ("tasks.create", create_task),
        ("tasks.list", list_tasks),
        ("tasks.get", get_task),
        ("tasks.cancel", cancel_task),
    ):
        server.register(name, _wrapped(method))
