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
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator

from gateway.acquire.registry import ACTIVE_STATUSES, AcquisitionError, Registry
from gateway.acquire.results import Uploads, task_results
from gateway.control.methods import NOT_FOUND
from gateway.control.params import Explain, NoParams, Params
from gateway.control.server import (
    FORBIDDEN,
    INVALID_PARAMS,
    ControlServer,
    current_session,
)
from gateway.errors import ControlError
from gateway.store.store import Store

__all__ = [
    "CONFLICT",
    "TASK_NOT_ACTIVE",
    "CreateSequenceParams",
    "CreateTaskParams",
    "DeviceIdParams",
    "DeviceStateParams",
    "ListTasksParams",
    "RegisterDeviceParams",
    "ReportParams",
    "SequenceIdParams",
    "TaskCancelParams",
    "TaskIdParams",
    "UpdateDeviceParams",
    "UploadBeginParams",
    "UploadChunkParams",
    "UploadFinishParams",
    "register_acquisition_methods",
]

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

P = TypeVar("P", bound=Params)


def _wrapped(method: Callable[[P], Awaitable[Any]]) -> Callable[[P], Awaitable[Any]]:
    async def call(params: P) -> Any:
        try:
            return await method(params)
        except AcquisitionError as exc:
            raise ControlError(_CODES[exc.kind], str(exc), exc.data) from None

    return call


def _not_empty(value: str) -> str:
    if not value:
        raise ValueError("is required")
    return value


# The id of a device, sequence, task or upload: a non-empty string (else "is required").
Id = Annotated[str, AfterValidator(_not_empty), Explain("is required")]

# The values are checked by the registry (lengths, control characters, dates: -32602 with its
# message); the models check the keys and the JSON types.


class _DeviceFields(Params):
    manufacturer: str | None = None
    serial_number: str | None = None
    site: str | None = None
    station_ae: str | None = None


class RegisterDeviceParams(_DeviceFields):
    """`devices.register`: `name`, `modality` (required), `manufacturer`, `serial_number`,
    `site`, `station_ae` (strings)."""

    name: str
    modality: str


class UpdateDeviceParams(_DeviceFields):
    """`devices.update`: `device_id`, and any device field to change."""

    device_id: Id
    name: str | None = None
    modality: str | None = None


class DeviceIdParams(Params):
    """`devices.get`, `devices.rotate_token`, `devices.revoke`: `device_id`, required."""

    device_id: Id


class CreateSequenceParams(Params):
    """`sequences.create`: `name` (required), `description`, `parameters` (an object), `file`
    (an object: `name`, `data` base64, `sha256`)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    file: dict[str, Any] | None = None


class SequenceIdParams(Params):
    """`sequences.file`: `sequence_id`, required."""

    sequence_id: Id


class CreateTaskParams(Params):
    """`tasks.create`: `device_id`, `sequence_id`, `patient` (an object: `id` required,
    `name`, `birth_date` YYYYMMDD, `sex` M/F/O) required; `parameters` (an object),
    `scheduled_at` (ISO date-time, default now), `description`."""

    device_id: str
    sequence_id: str
    patient: dict[str, Any]
    parameters: dict[str, Any] | None = None
    scheduled_at: str | None = None
    description: str | None = None


class ListTasksParams(Params):
    """`tasks.list`: `device_id`, `status` (one of the task statuses), both optional."""

    device_id: str | None = None
    status: str | None = None


class TaskIdParams(Params):
    """`tasks.get`, `tasks.start`, `tasks.results`: `task_id`, required."""

    task_id: Id


class TaskCancelParams(Params):
    """`tasks.cancel`: `task_id` (required), `reason` (default "cancelled by an operator"; at
    most 256 characters are kept)."""

    task_id: Id
    reason: Any = None


def _percent(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 100:
        raise ValueError("must be an integer 0..100")
    return value


class ReportParams(Params):
    """`tasks.report`: `task_id` (required), `progress` (an integer 0..100), `status`
    (INPROGRESS by default, FINISHED or ERROR), `reason`."""

    task_id: Id
    progress: Annotated[
        int | None, AfterValidator(_percent), Explain("must be an integer 0..100")
    ] = None
    status: Annotated[
        Literal["INPROGRESS", "FINISHED", "ERROR"],
        Explain("must be INPROGRESS, FINISHED or ERROR"),
    ] = "INPROGRESS"
    reason: Any = None


class DeviceStateParams(Params):
    """`devices.report_state`: `state` (required: ONLINE or ERROR), `reason`."""

    state: Annotated[
        Literal["ONLINE", "ERROR"],
        Explain("must be ONLINE or ERROR", missing="must be ONLINE or ERROR"),
    ]
    reason: Any = None


class UploadBeginParams(Params):
    """`uploads.begin`: `task_id` (one of the device's running tasks), `name` (a file name),
    `size` (bytes), `sha256` (64 lower-case hex digits), all required."""

    task_id: Id
    name: str
    size: int
    sha256: str


class UploadChunkParams(Params):
    """`uploads.chunk`: `upload_id`, `offset` (the bytes received so far), `data` (base64),
    all required."""

    upload_id: Id
    offset: int
    data: str


class UploadFinishParams(Params):
    """`uploads.finish`: `upload_id`, required."""

    upload_id: Id


def register_acquisition_methods(
    server: ControlServer, registry: Registry, uploads: Uploads, store: Store
) -> None:
    """Register the acquisition methods: *registry* holds devices, sequences and tasks,
    *uploads* the devices' result uploads, *store* their DICOM results."""

    async def register(params: RegisterDeviceParams) -> dict[str, Any]:
        return await registry.register_device(params.given())

    async def list_devices(params: NoParams) -> dict[str, Any]:
        devices = await registry.devices()
        return {"devices": devices, "count": len(devices)}

    async def get_device(params: DeviceIdParams) -> dict[str, Any]:
        return await registry.device(params.device_id)

    async def update(params: UpdateDeviceParams) -> dict[str, Any]:
        fields = {k: v for k, v in params.given().items() if k != "device_id"}
        return await registry.update_device(params.device_id, fields)

    async def rotate(params: DeviceIdParams) -> dict[str, Any]:
        device_id = params.device_id
        token = await registry.rotate_token(device_id)
        await asyncio.gather(*server.close_sessions({device_id}, "device token rotated",
                                                    code="token_rotated"))  # fmt: skip
        return {"id": device_id, "token": token}

    async def revoke(params: DeviceIdParams) -> dict[str, Any]:
        device_id = params.device_id
        await registry.revoke_token(device_id)
        await asyncio.gather(*server.close_sessions({device_id}, "device token revoked",
                                                    code="token_revoked"))  # fmt: skip
        return {"id": device_id, "revoked": True}

    async def create_sequence(params: CreateSequenceParams) -> dict[str, Any]:
        return await registry.create_sequence(params.given())

    async def sequence_file(params: SequenceIdParams) -> dict[str, Any]:
        return await registry.sequence_file(params.sequence_id)

    async def list_sequences(params: NoParams) -> dict[str, Any]:
        sequences = await registry.sequences()
        return {"sequences": sequences, "count": len(sequences)}

    async def create_task(params: CreateTaskParams) -> dict[str, Any]:
        return await registry.create_task(params.given())

    async def list_tasks(params: ListTasksParams) -> dict[str, Any]:
        tasks = await registry.tasks(device_id=params.device_id, status=params.status)
        return {"tasks": tasks, "count": len(tasks)}

    async def get_task(params: TaskIdParams) -> dict[str, Any]:
        return await registry.task(params.task_id)

    async def cancel_task(params: TaskCancelParams) -> dict[str, Any]:
        """End a task that has not ended (ERROR, with the reason). A running one (STARTED,
        INPROGRESS) frees its device (BUSY -> ONLINE), which is told: `task.cancel`."""
        reason = str(params.reason or "cancelled by an operator")[:256]
        before = await registry.task(params.task_id)
        cancelled = await registry.set_task_status(
            before["id"], "ERROR", reason=reason, allowed_from=("NEW", *ACTIVE_STATUSES)
        )
        if before["status"] in ACTIVE_STATUSES:
            uploads.drop_task(before["id"])
            session = server.device_session(before["device_id"])
            if session is not None:  # else it learns at its next login: no task.start
                await session.notify(
                    "task.cancel",
                    {"task_id": cancelled["id"], "reason": reason, "task": cancelled},
                )
        return cancelled

    async def heartbeat(params: NoParams) -> dict[str, Any]:
        session = current_session()
        assert session is not None and session.device_id is not None
        state = await registry.seen(session.device_id)
        return {"device_id": session.device_id, "state": state}

    async def start_task(params: TaskIdParams) -> dict[str, Any]:
        task = await registry.task(params.task_id)
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

    async def current_task(params: NoParams) -> dict[str, Any] | None:
        """The calling device's active task as `task.start` gave it, or None."""
        session = current_session()
        assert session is not None and session.device_id is not None
        task = await registry.active_task(session.device_id)
        return None if task is None else await registry.task_assignment(task)

    async def report(params: ReportParams) -> dict[str, Any]:
        """A device reports progress or the end of one of its own tasks."""
        session = current_session()
        assert session is not None and session.device_id is not None
        task = await registry.device_task(params.task_id, session.device_id)
        progress, status, reason = params.progress, params.status, params.reason
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

    async def device_state(params: DeviceStateParams) -> dict[str, Any]:
        """A device reports its own state: ERROR (with a reason) or ONLINE again."""
        session = current_session()
        assert session is not None and session.device_id is not None
        await registry.set_device_state(session.device_id, params.state)
        return await registry.device(session.device_id)

    async def results(params: TaskIdParams) -> dict[str, Any]:
        task = await registry.task(params.task_id)
        session = current_session()
        if (
            session is not None
            and session.role == "device"
            and task["device_id"] != session.device_id
        ):
            raise ControlError(FORBIDDEN, f"task {task['id']} belongs to another device")
        return await task_results(store, task)

    def device_call(
        name: Literal["begin", "chunk", "finish"],
    ) -> Callable[[Params], Awaitable[dict[str, Any]]]:
        async def call(params: Params) -> dict[str, Any]:
            session = current_session()
            assert session is not None and session.device_id is not None
            method = getattr(uploads, name)
            result: dict[str, Any] = await method(session.device_id, params.given())
            return result

        return call

    server.register("tasks.results", TaskIdParams, _wrapped(results), access="any")
    server.register("sequences.file", SequenceIdParams, _wrapped(sequence_file), access="any")
    for name, model, method in (
        ("uploads.begin", UploadBeginParams, device_call("begin")),
        ("uploads.chunk", UploadChunkParams, device_call("chunk")),
        ("uploads.finish", UploadFinishParams, device_call("finish")),
    ):
        server.register(name, model, _wrapped(method), access="device")
    server.register("devices.heartbeat", NoParams, _wrapped(heartbeat), access="device")
    server.register("tasks.current", NoParams, _wrapped(current_task), access="device")
    server.register("tasks.report", ReportParams, _wrapped(report), access="device")
    server.register(
        "devices.report_state", DeviceStateParams, _wrapped(device_state), access="device"
    )
    server.register("tasks.start", TaskIdParams, _wrapped(start_task))
    server.register("devices.register", RegisterDeviceParams, _wrapped(register))
    server.register("devices.list", NoParams, _wrapped(list_devices))
    server.register("devices.get", DeviceIdParams, _wrapped(get_device))
    server.register("devices.update", UpdateDeviceParams, _wrapped(update))
    server.register("devices.rotate_token", DeviceIdParams, _wrapped(rotate))
    server.register("devices.revoke", DeviceIdParams, _wrapped(revoke))
    server.register("sequences.create", CreateSequenceParams, _wrapped(create_sequence))
    server.register("sequences.list", NoParams, _wrapped(list_sequences))
    server.register("tasks.create", CreateTaskParams, _wrapped(create_task))
    server.register("tasks.list", ListTasksParams, _wrapped(list_tasks))
    server.register("tasks.get", TaskIdParams, _wrapped(get_task))
    server.register("tasks.cancel", TaskCancelParams, _wrapped(cancel_task))
