"""Stacks, pure: what re-applying a stack adds, changes and drops; who owns a name; the order
a stack rolls in, and its cycles; the seed's stack file; a Kubernetes namespace as the stack."""

from pathlib import Path

import pytest

from picoord.coordinator.workloads import stacks
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from picoord.coordinator.workloads.spec import ServiceSpec
from picoord.coordinator.workloads.stacks import ADDED, CHANGED, DROPPED, PRUNED, UNCHANGED, Applied

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

DB = ServiceSpec(name="postgres", image="postgres:15-alpine")
APP = ServiceSpec(name="mcp-server", image="mcp:1", depends_on=("postgres",))
APP2 = ServiceSpec(name="mcp-server", image="mcp:2", depends_on=("postgres",))
CACHE = ServiceSpec(name="cache", image="redis:7")


def _changes(existing, specs, stack="mcp", prune=False) -> list[tuple[str, str]]:
    return [(c.name, c.change) for c in stacks.plan_stack(existing, specs, stack, prune)]


@pytest.mark.parametrize(
    ("existing", "specs", "prune", "expected"),
    [
        ({}, [DB, APP], False, [("postgres", ADDED), ("mcp-server", ADDED)]),
        (
            {"postgres": Applied("mcp", DB), "mcp-server": Applied("mcp", APP)},
            [DB, APP2],
            False,
            [("postgres", UNCHANGED), ("mcp-server", CHANGED)],
        ),
        (
            {"postgres": Applied("mcp", DB), "cache": Applied("mcp", CACHE)},
            [DB],
            False,
            [("postgres", UNCHANGED), ("cache", DROPPED)],
        ),
        (
            {"postgres": Applied("mcp", DB), "cache": Applied("mcp", CACHE)},
            [DB],
            True,
            [("postgres", UNCHANGED), ("cache", PRUNED)],
        ),
        # another stack's services are neither dropped nor pruned
        ({"cache": Applied("other", CACHE)}, [DB], True, [("postgres", ADDED)]),
    ],
)
def test_reapplying_a_stack_says_what_it_adds_changes_and_drops(existing, specs, prune, expected) -> None:
    assert _changes(existing, specs, prune=prune) == expected


def test_without_a_stack_nothing_is_dropped() -> None:
    existing = {"cache": Applied("", CACHE)}
    assert _changes(existing, [DB], stack="", prune=False) == [("postgres", ADDED)]


@pytest.mark.parametrize(
    ("owner", "stack", "says"),
    [
        ("other", "mcp", "stack 'other'"),
        ("", "mcp", "a file applied without --stack"),
        ("mcp", "", "stack 'mcp'"),
    ],
)
def test_a_name_of_another_stack_is_refused(owner: str, stack: str, says: str) -> None:
    with pytest.raises(stacks.StackError, match=f"'postgres' already belongs to {says}"):
        stacks.plan_stack({"postgres": Applied(owner, DB)}, [DB], stack, prune=False)


@pytest.mark.parametrize(
    ("depends", "order"),
    [
        ({}, []),
        ({"mcp-server": ["postgres"], "postgres": []}, ["postgres", "mcp-server"]),
        ({"a": [], "b": []}, ["a", "b"]),
        ({"web": ["api", "cache"], "api": ["db"], "db": [], "cache": []}, ["db", "api", "cache", "web"]),
        # a dependency outside the stack is not waited for
        ({"app": ["elsewhere"]}, ["app"]),
    ],
)
def test_rollout_order_puts_dependencies_first(depends, order) -> None:
    assert stacks.rollout_order(depends) == order


@pytest.mark.parametrize(
    ("depends", "cycle"),
    [
        ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
        ({"x": [], "a": ["b"], "b": ["c"], "c": ["b"]}, "b -> c -> b"),
        ({"a": ["a"]}, "a -> a"),
    ],
)
def test_a_cycle_is_named(depends, cycle) -> None:
    with pytest.raises(stacks.StackError, match=f"dependency cycle: {cycle}$"):
        stacks.rollout_order(depends)


def test_a_cycle_through_references_is_refused_at_apply() -> None:
    a = ServiceSpec(name="a", image="a:1", references=("b",))
    b = ServiceSpec(name="b", image="b:1", references=("a",))
    with pytest.raises(stacks.StackError, match="dependency cycle: a -> b -> a"):
        stacks.plan_stack({}, [a, b], "app", prune=False)


def test_the_seed_stack_file_rolls_postgres_first() -> None:
    """DATABASE_URL names postgres: mcp-server waits for it, though the file has no depends_on."""
    workloads = read_workloads((EXAMPLES / "seed-docker-stack.yml").read_text(), "docker-stack.yml")
    depends = {spec.name: list(stacks.dependencies(spec)) for spec in workloads.services}
    assert depends["mcp-server"] == ["postgres"]
    assert stacks.rollout_order(depends) == ["postgres", "mcp-server"]


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}{namespace}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers: [{{name: {name}, image: "nginx:1"}}]
"""


def _deployment(name: str, namespace: str = "") -> str:
    return DEPLOYMENT.format(name=name, namespace=f", namespace: {namespace}" if namespace else "")


@pytest.mark.parametrize(
    ("documents", "namespace"),
    [
        ([_deployment("web")], ""),
        ([_deployment("web", "shop")], "shop"),
        ([_deployment("web", "shop"), _deployment("api")], "shop"),
        ([_deployment("web", "shop"), _deployment("api", "shop")], "shop"),
    ],
)
def test_a_kubernetes_namespace_is_the_stack(documents, namespace) -> None:
    workloads = read_workloads("---".join(documents), "k.yaml")
    assert workloads.namespace == namespace
    assert not [w for w in workloads.warnings if "namespace" in str(w)]


@pytest.mark.parametrize(
    ("documents", "says"),
    [
        (
            [_deployment("web", "shop"), _deployment("api", "admin")],
            "one file is one stack; it names admin, shop",
        ),
        ([_deployment("web", "Shop_1")], "metadata.namespace"),
    ],
)
def test_a_bad_namespace_is_refused(documents, says) -> None:
    with pytest.raises(WorkloadError, match=says):
        read_workloads("---".join(documents), "k.yaml")


@pytest.mark.parametrize("name", ["mcp", "my-app"])
def test_a_stack_is_named_like_a_service(name: str) -> None:
    assert stacks.stack_name(name) == name


@pytest.mark.parametrize("name", ["", "MCP", "a_b", "x" * 64])
def test_a_bad_stack_name_is_refused(name: str) -> None:
    with pytest.raises(stacks.StackError, match="stack"):
        stacks.stack_name(name)
