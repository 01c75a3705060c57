"""`coordctl stack deploy --address` / `apply --stack --address`: the address is written into
the Compose file's text as x-picoord.address before it is sent, so the coordinator checks it
as one written in the file; without a stack, or against the file's own, it is refused before
anything is sent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from picoord.coordinator.apply.cluster_spec import SpecError
from picoord.coordinator.ctl.cli import build_parser, cmd_apply
from picoord.v1 import admin_pb2

STACK = "services:\n  web:\n    image: mcp:1\n    ports: ['8080:8080']\n"


class _Stub:
    def __init__(self) -> None:
        self.sent: list[admin_pb2.ApplyRequest] = []

    def Apply(self, request: admin_pb2.ApplyRequest, timeout: float):
        self.sent.append(request)
        return iter([admin_pb2.ApplyEvent(summary=admin_pb2.ApplySummary(converged=True))])


def _run(tmp_path: Path, *argv: str, text: str = STACK) -> _Stub:
    path = tmp_path / "stack.yml"
    path.write_text(text)
    args = build_parser().parse_args([arg.replace("FILE", str(path)) for arg in argv])
    stub = _Stub()
    assert cmd_apply(stub, args) == 0  # type: ignore[arg-type]
    return stub


@pytest.mark.parametrize(
    "argv",
    [
        ("stack", "deploy", "-c", "FILE", "--address", "10.0.0.200", "web"),
        ("apply", "-f", "FILE", "--stack", "web", "--address", "10.0.0.200"),
    ],
)
def test_the_address_travels_in_the_file(tmp_path: Path, argv: tuple[str, ...]) -> None:
    [request] = _run(tmp_path, *argv).sent
    assert yaml.safe_load(request.documents)["x-picoord"] == {"address": "10.0.0.200"}
    assert request.stack == "web"


def test_without_address_the_file_is_sent_as_written(tmp_path: Path) -> None:
    [request] = _run(tmp_path, "stack", "deploy", "-c", "FILE", "web").sent
    assert request.documents == STACK


def test_an_address_without_a_stack_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="give --stack NAME too"):
        _run(tmp_path, "apply", "-f", "FILE", "--address", "10.0.0.200")


def test_an_address_the_file_contradicts_is_refused(tmp_path: Path) -> None:
    text = STACK + "x-picoord: {address: 10.0.0.9}\n"
    with pytest.raises(SpecError, match=re.escape("the file says 10.0.0.9, --address says 10.0.0.200")):
        _run(tmp_path, "stack", "deploy", "-c", "FILE", "--address", "10.0.0.200", "web", text=text)
