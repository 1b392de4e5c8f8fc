"""Each method's parameter model answers one -32602 message naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.control.acquire import (
    CreateSequenceParams,
    DeviceStateParams,
    RegisterDeviceParams,
    ReportParams,
    TaskIdParams,
    UpdateDeviceParams,
)
from gateway.control.jobs import CancelJobsParams, ListJobsParams, RetryJobsParams
from gateway.control.methods import SearchParams, StudyParams
from gateway.control.params import NoParams, Params, explain
from gateway.control.retrieve import LimitsParams, ProjectParams, SubmitParams


@pytest.mark.parametrize(
    ("model", "params", "message"),
    [
        (NoParams, {"zeta": 1, "alpha": 2}, "unknown parameter 'alpha'"),
        (SearchParams, {"limit": "x", "extra": 1}, "unknown parameter 'extra'"),
        (SearchParams, {"limit": 1.5}, "parameter 'limit' must be an integer 1..10000"),
        (SearchParams, {"limit": None}, "parameter 'limit' must be an integer 1..10000"),
        (StudyParams, {"study_uid": None}, "parameter 'study_uid' must be a string"),
        (ListJobsParams, {"state": "lost"}, "parameter 'state' must be one of ('queued',"),
        (CancelJobsParams, {}, "parameter 'ids' is required"),
        (CancelJobsParams, {"ids": []}, "parameter 'ids' is required"),
        (CancelJobsParams, {"ids": [1, True]}, "parameter 'ids' must be a list of job ids"),
        (RetryJobsParams, {"ids": "1"}, "parameter 'ids' must be a list of job ids"),
        (ProjectParams, {}, "parameter 'project' is required (a project name)"),
        (ProjectParams, {"project": " "}, "parameter 'project' is required (a project name)"),
        (ProjectParams, {"project": 3}, "parameter 'project' is required (a project name)"),
        (SubmitParams, {"requests": {}}, "parameter 'requests' must be a list of objects"),
        (LimitsParams, {"moves_per_minute": 1}, "parameter 'peer' is required to change limits"),
        (LimitsParams, {"peer": "v", "moves_per_minute": -1},
         "parameter 'moves_per_minute' must be a number >= 0"),
        (LimitsParams, {"peer": "v", "queries_per_minute": True},
         "parameter 'queries_per_minute' must be a number >= 0"),
        (LimitsParams, {"peer": "v", "max_concurrent_moves": 0},
         "parameter 'max_concurrent_moves' must be an integer 1..64"),
        (RegisterDeviceParams, {"name": "X"}, "parameter 'modality' is required"),
        (UpdateDeviceParams, {"device_id": "d", "site": 1}, "parameter 'site' must be a string"),
        (CreateSequenceParams, {"name": "T1", "parameters": []},
         "parameter 'parameters' must be an object"),
        (TaskIdParams, {"task_id": ""}, "parameter 'task_id' is required"),
        (ReportParams, {"task_id": "t", "progress": 101},
         "parameter 'progress' must be an integer 0..100"),
        (ReportParams, {"task_id": "t", "status": None},
         "parameter 'status' must be INPROGRESS, FINISHED or ERROR"),
        (DeviceStateParams, {}, "parameter 'state' must be ONLINE or ERROR"),
    ],
)  # fmt: skip
def test_a_bad_parameter_is_named(
    model: type[Params], params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(params)
    assert explain(model, caught.value).startswith(message)


def test_models_keep_what_was_sent_and_their_defaults() -> None:
    search = SearchParams.model_validate({"patient_id": "P*"})
    assert (search.patient_id, search.limit) == ("P*", 100)
    assert ProjectParams.model_validate({"project": " P1 "}).project == "P1"
    sent = {"device_id": "d", "site": None}
    assert UpdateDeviceParams.model_validate(sent).given() == sent  # null is passed on
    limits = LimitsParams.model_validate({"peer": "vna", "moves_per_minute": 30})
    assert limits.changes() == {"moves_per_minute": 30.0}
    submit = SubmitParams.model_validate(
        {"project": "P", "requests": [{"mrn": "M"}, {"project": "Q"}]}
    )
    assert submit.items() == [{"mrn": "M", "project": "P"}, {"project": "Q"}]
    single = SubmitParams.model_validate({"project": "P", "study_uid": "1.2", "priority": "3"})
    assert single.items() == [{"project": "P", "study_uid": "1.2", "priority": "3"}]
    with pytest.raises(ValidationError):
        search.limit = 5  # type: ignore[misc]  # frozen
