"""Secrets: which services use them (pure), and through the controller: `secret rm` refused
while used, a replaced value shows as a staged change that a rollout applies."""

from __future__ import annotations

import pytest

from picoord.coordinator.controller.controller import WorkloadRefused
from picoord.coordinator.workloads.reader import read_workloads
from picoord.coordinator.workloads.spec import secret_stamp, secret_users, secrets_set_since
from tests.unit.controller.test_controller import SPECS, Rig, rig  # noqa: F401 (the fixture)

SERVICES = {spec.name: spec for spec in read_workloads(SPECS + """
---
apiVersion: picoord/v1
kind: Service
name: worker
image: worker:1
secrets:
  - {env: DATABASE_URL, secret: mcp-secrets, key: database-url}
  - {env: TOKEN, secret: api, key: token}
  - {env: OTHER, secret: api, key: other}
""").services}  # fmt: skip


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["mcp", "postgres", "worker"], {"api": ["worker"], "mcp-secrets": ["mcp", "worker"]}),
        (["postgres"], {}),
        (["worker", "worker"], {"api": ["worker"], "mcp-secrets": ["worker"]}),
    ],
)
def test_secret_users(names: list[str], expected: dict[str, list[str]]) -> None:
    assert secret_users(SERVICES[name] for name in names) == expected


def test_secret_stamp_changes_with_a_value_it_reads_only() -> None:
    worker, postgres = SERVICES["worker"], SERVICES["postgres"]
    updated = {("mcp-secrets", "database-url"): 1.0, ("api", "token"): 2.0, ("api", "other"): 3.0}
    assert secret_stamp(postgres, updated) == ""
    first = secret_stamp(worker, updated)
    assert first == secret_stamp(worker, {**updated, ("unrelated", "k"): 9.0})
    assert first != secret_stamp(worker, {**updated, ("api", "token"): 5.0})


@pytest.mark.parametrize(
    ("since", "expected"),
    [(0.5, ["api/other", "api/token", "mcp-secrets/database-url"]), (2.0, ["api/other"]), (3.0, [])],
)
def test_secrets_set_since(since: float, expected: list[str]) -> None:
    updated = {("mcp-secrets", "database-url"): 1.0, ("api", "token"): 2.0, ("api", "other"): 3.0}
    assert secrets_set_since(SERVICES["worker"], updated, since) == expected


async def test_rm_of_a_used_secret_is_refused_and_changes_nothing(rig: Rig) -> None:  # noqa: F811
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    rig.records.put_secret("spare", "k", b"y", rig.clock.now)
    assert (await rig.controller.secret_users()) == {"mcp-secrets": ["mcp"]}
    with pytest.raises(WorkloadRefused, match="used by mcp") as refused:
        await rig.controller.remove_secret("mcp-secrets", force=False)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert [row[0] for row in rig.records.secret_names()] == ["mcp-secrets", "spare"]
    with pytest.raises(WorkloadRefused) as missing:
        await rig.controller.remove_secret("nothing", force=False)
    assert missing.value.code == "NOT_FOUND"
    assert await rig.controller.remove_secret("spare", force=False) == (1, [])
    assert await rig.controller.remove_secret("mcp-secrets", force=True) == (1, ["mcp"])
    assert rig.records.secret_names() == []


async def test_a_replaced_value_is_staged_and_a_rollout_applies_it(rig: Rig) -> None:  # noqa: F811
    rig.records.put_secret("mcp-secrets", "database-url", b"old", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    await rig.settle(8)

    def staged(views: list) -> dict[str, bool]:
        return {view.name: view.staged for view in views}

    assert staged(await rig.controller.services_view()) == {"mcp": False, "postgres": False}
    rig.clock.now += 5
    rig.records.put_secret("mcp-secrets", "database-url", b"new", rig.clock.now)
    views = await rig.controller.services_view()
    assert staged(views) == {"mcp": True, "postgres": False}
    revision = {view.name: view.revision for view in views}["mcp"]
    await rig.controller.start_rollout("mcp")
    await rig.settle(12)
    views = await rig.controller.services_view()
    assert staged(views) == {"mcp": False, "postgres": False}
    assert {view.name: view.revision for view in views}["mcp"] == revision + 1
    values = {
        spec.env["DATABASE_URL"] for r in rig.running.values() for spec in r.values() if spec.service == "mcp"
    }
    assert values == {"new"}
