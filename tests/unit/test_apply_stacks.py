"""Applying a file as a stack through the coordinator's apply service and its real store:
the services are recorded with their stack, re-applying says what changed and dropped, and
a refused apply (another stack's name, a cycle) records nothing; --prune removes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.coordinator.apply.service import ApplyService
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.coordinator.workloads.stacks import StackError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SEED = (EXAMPLES / "seed-docker-stack.yml").read_text()
WITH_CACHE = SEED.replace("services:\n", "services:\n  cache:\n    image: redis:7\n", 1)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ApplyService]:
    store = Store(tmp_path / "state.db")
    try:
        yield ApplyService(Cluster(store, StatusTimeouts(), MetricsHistory(4)), WorkloadRecords(store))
    finally:
        store.close()


async def _apply(service: ApplyService, text: str, **options) -> list[tuple[str, str, str]]:
    started = await service.start(text, options.pop("dry_run", False), "test", "docker-stack.yml", **options)
    events = [event async for event in started.stream()]
    return [
        (e.service.stack, e.service.name, e.service.change)
        for e in events
        if e.WhichOneof("event") == "service"
    ]


def _stacks(service: ApplyService) -> dict[str, str]:
    assert service.workloads is not None
    return {record.name: record.stack for record in service.workloads.services()}


async def test_the_seed_file_is_recorded_as_stack_mcp_under_its_short_names(service: ApplyService) -> None:
    assert await _apply(service, SEED, stack="mcp") == [
        ("mcp", "mcp-server", "added"),
        ("mcp", "postgres", "added"),
    ]
    assert _stacks(service) == {"mcp-server": "mcp", "postgres": "mcp"}
    assert await _apply(service, SEED, stack="mcp") == [
        ("mcp", "mcp-server", "unchanged"),
        ("mcp", "postgres", "unchanged"),
    ]


async def test_a_service_dropped_from_the_file_is_kept_and_said_so(service: ApplyService) -> None:
    await _apply(service, WITH_CACHE, stack="mcp")
    assert await _apply(service, SEED, stack="mcp", dry_run=True) == [
        ("mcp", "mcp-server", "unchanged"),
        ("mcp", "postgres", "unchanged"),
        ("mcp", "cache", "dropped"),
    ]
    assert await _apply(service, SEED, stack="mcp") == [
        ("mcp", "mcp-server", "unchanged"),
        ("mcp", "postgres", "unchanged"),
        ("mcp", "cache", "dropped"),
    ]
    assert _stacks(service) == {"cache": "mcp", "mcp-server": "mcp", "postgres": "mcp"}


async def test_a_dry_run_records_nothing(service: ApplyService) -> None:
    assert await _apply(service, SEED, stack="mcp", dry_run=True) == [
        ("mcp", "mcp-server", "added"),
        ("mcp", "postgres", "added"),
    ]
    assert _stacks(service) == {}


@pytest.mark.parametrize(
    ("first", "then", "options", "says"),
    [
        ({"stack": "mcp"}, SEED, {"stack": "other"}, "'mcp-server' already belongs to stack 'mcp'"),
        ({}, SEED, {"stack": "mcp"}, "already belongs to a file applied without --stack"),
    ],
)
async def test_another_stacks_name_is_refused_and_nothing_changes(
    service: ApplyService, first, then, options, says
) -> None:
    await _apply(service, SEED, **first)
    before = _stacks(service)
    with pytest.raises(StackError, match=says):
        await _apply(service, then, **options)
    assert _stacks(service) == before
    assert service.running is None  # a refused apply lets the next one run


CYCLE = """services:
  a:
    image: a:1
    depends_on: [b]
  b:
    image: b:1
    environment:
      PEER: http://a:80
"""


async def test_a_dependency_cycle_is_refused_at_apply_naming_it(service: ApplyService) -> None:
    with pytest.raises(StackError, match="dependency cycle: a -> b -> a"):
        await _apply(service, CYCLE, stack="app")
    assert _stacks(service) == {}


async def test_prune_removes_what_the_file_no_longer_names_and_its_dry_run_says_so(
    service: ApplyService,
) -> None:
    await _apply(service, WITH_CACHE, stack="mcp")
    assert await _apply(service, SEED, stack="mcp", prune=True, dry_run=True) == [
        ("mcp", "mcp-server", "unchanged"),
        ("mcp", "postgres", "unchanged"),
        ("mcp", "cache", "pruned"),
    ]
    assert _stacks(service) == {"cache": "mcp", "mcp-server": "mcp", "postgres": "mcp"}
    assert (await _apply(service, SEED, stack="mcp", prune=True))[-1] == ("mcp", "cache", "pruned")
    assert _stacks(service) == {"mcp-server": "mcp", "postgres": "mcp"}
    with pytest.raises(StackError, match="give --stack"):
        await _apply(service, SEED, prune=True)


@pytest.mark.parametrize("name", ["MCP", "a_b", "-x"])
async def test_a_bad_stack_name_is_refused(service: ApplyService, name: str) -> None:
    with pytest.raises(StackError, match="stack"):
        await _apply(service, SEED, stack=name)
    assert _stacks(service) == {}
