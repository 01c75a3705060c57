"""The agent's executable quiets gRPC's C-core logging unless the operator asked for it."""

from __future__ import annotations

import os
import sys

import pytest
import rich

import picoord.agent.cli
from picoord.agent import entry


@pytest.mark.parametrize(("given", "expected"), [(None, "NONE"), ("DEBUG", "DEBUG")])
def test_grpc_core_logging_is_off_unless_asked_for(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    seen: list[str | None] = []
    if given is None:
        monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    else:
        monkeypatch.setenv("GRPC_VERBOSITY", given)
    monkeypatch.setitem(sys.modules, "rich", rich)  # entry.main would hide rich from later tests
    monkeypatch.setattr(picoord.agent.cli, "main", lambda: seen.append(os.environ.get("GRPC_VERBOSITY")))
    entry.main()
    assert seen == [expected]
