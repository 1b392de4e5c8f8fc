"""The documented parameters of every control method are those of its model.

docs/control.md documents a method under its own `### \\`name\\`` heading, with a table whose
first column is `Parameter` (required when its description starts with "Required"), or with
"No parameters."; methods documented together (retrieval in control.md, acquisition in
acquisition.md) are rows of a `| method | parameter | required |` table (`-`: no parameters).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ControlSettings
from gateway.control.acquire import register_acquisition_methods
from gateway.control.jobs import register_job_methods
from gateway.control.methods import register_core_methods
from gateway.control.params import NoParams, Params
from gateway.control.retrieve import register_retrieve_methods
from gateway.control.server import ControlServer

DOCS = Path(__file__).resolve().parents[2] / "docs"
# name -> {parameter: required}
Documented = dict[str, dict[str, bool]]


def _server() -> ControlServer:
    """Every method registered (registration touches none of the parts it is given)."""
    server = ControlServer(Path("unused.sock"), ControlSettings())
    part: Any = object()
    register_core_methods(server, part, part, part, part)
    register_job_methods(server, part, part, part)
    register_retrieve_methods(server, part, part, part)
    register_acquisition_methods(server, part, part, part)
    return server


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _tables(text: str) -> list[list[list[str]]]:
    """Each markdown table of *text*: its header row, then its body rows (cells)."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
                rows.append(_cells(line))
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _add(found: Documented, method: str, params: dict[str, bool]) -> None:
    entry = found.setdefault(method, {})
    for name, required in params.items():
        assert name not in entry, f"{method}: parameter {name!r} documented twice"
        entry[name] = required


def documented(doc: str) -> Documented:
    """The parameters each method's documentation in *doc* names."""
    text = (DOCS / doc).read_text()
    found: Documented = {}
    for section in re.split(r"(?m)^(?=#{2,4} )", text):
        heading, _, body = section.partition("\n")
        methods = _names(heading) if heading.startswith("### ") else []
        for table in _tables(body):
            header = [cell.lower() for cell in table[0]]
            if header[:3] == ["method", "parameter", "required"]:
                for row in table[1:]:
                    required = row[2].lower() == "yes"
                    params = {} if row[1] == "-" else dict.fromkeys(_names(row[1]), required)
                    for method in _names(row[0]):
                        _add(found, method, params)
            elif header[0] == "parameter" and len(methods) == 1:
                params = {}
                for row in table[1:]:
                    for name in _names(row[0]):
                        params[name] = row[-1].startswith("Required")
                _add(found, methods[0], params)
        if len(methods) == 1 and "No parameters." in body:
            _add(found, methods[0], {})
    return found


def _of(model: type[Params]) -> dict[str, bool]:
    return {name: field.is_required() for name, field in model.model_fields.items()}


def test_every_method_has_a_model_and_its_parameters_are_documented() -> None:
    server = _server()
    control, acquisition = documented("control.md"), documented("acquisition.md")
    both = set(control) & set(acquisition)
    assert not both, f"documented in both: {sorted(both)}"
    docs = {**control, **acquisition}
    missing = sorted(set(server.methods) - set(docs))
    assert not missing, f"methods without a parameter table: {missing}"
    for name in server.methods:
        assert _of(server.params_model(name)) == docs[name], name


@pytest.mark.parametrize("doc", ["control.md", "acquisition.md"])
def test_the_tables_name_only_registered_methods(doc: str) -> None:
    unknown = sorted(set(documented(doc)) - set(_server().methods))
    assert not unknown, unknown


def test_a_method_without_parameters_takes_no_parameters() -> None:
    server = _server()
    for name in ("status", "rules.reload", "devices.list", "tasks.current"):
        assert server.params_model(name) is NoParams
