"""Table tests of the workload message checks: every refusal names its field."""

from __future__ import annotations

import pytest

from picoord.common.checks.workloads import (
    NodeMounts,
    check_assignment,
    check_replica_spec,
    check_reports,
    read_older_agents_states,
)
from picoord.common.validation import FieldError, image_reference
from picoord.common.vocabulary import ReplicaState
from picoord.v1 import workloads_pb2


def good() -> workloads_pb2.ReplicaSpec:
    return workloads_pb2.ReplicaSpec(
        service="mcp",
        revision=1,
        replica="mcp.1",
        image="10.213.0.1:5000/mcp:1",
        env={"DATABASE_URL": "postgresql://x"},
        ports=[workloads_pb2.PortBinding(target=8080, published=8080, protocol="tcp")],
        volumes=[workloads_pb2.VolumeBinding(source="/mnt/gv0", target="/data")],
        restart="on-failure",
        hosts={"postgres": "10.213.0.12"},
        health=workloads_pb2.HealthProbe(kind="http", port=8080, path="/health"),
    )


@pytest.mark.parametrize(
    "value",
    ["mcp", "mcp:1", "postgres:15-alpine", "registry.lab:5000/mcp:2", "10.0.0.1:5000/a/b_c.d-e:v1.2",
     "mcp@sha256:" + "a" * 64, "localhost/mcp-modules-rust:latest"],
)  # fmt: skip
def test_image_references_accepted(value: str) -> None:
    # Without a tag or digest a reference means :latest, as Docker reads it.
    tagged = ":" in value.rsplit("/", 1)[-1] or "@" in value
    assert image_reference("image", value) == (value if tagged else value + ":latest")


@pytest.mark.parametrize(
    "value",
    ["", "mcp 1", "MCP:1", "mcp:", "-mcp", "mcp;rm", "mcp:1 --privileged", "a//b", "mcp:" + "x" * 200],
)
def test_image_references_refused(value: str) -> None:
    with pytest.raises(FieldError, match="image"):
        image_reference("image", value)


def test_a_pinned_digest_is_accepted() -> None:
    spec = good()
    spec.image_digest = "sha256:" + "0f" * 32
    check_replica_spec(spec)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: setattr(s, "image", "mcp 1"), "replica.image"),
        (lambda s: setattr(s, "image_digest", "sha256:" + "a" * 63), "replica.image_digest"),
        (lambda s: setattr(s, "image_digest", "latest"), "replica.image_digest"),
        (lambda s: setattr(s, "service", "mcp;x"), "replica.service"),
        (lambda s: setattr(s, "revision", 0), "replica.revision"),
        (lambda s: s.env.update({"1BAD": "x"}), "replica.env"),
        (lambda s: s.env.update({"A": "x\x00y"}), "replica.env.A"),
        (lambda s: setattr(s.ports[0], "target", 70000), "replica.ports[0].target"),
        (lambda s: setattr(s.ports[0], "protocol", "sctp"), "replica.ports[0].protocol"),
        (lambda s: setattr(s.volumes[0], "source", "/etc"), "replica.volumes[0].source"),
        (lambda s: setattr(s.volumes[0], "source", "/proc/1"), "replica.volumes[0].source"),
        (lambda s: setattr(s.volumes[0], "source", "bad name"), "replica.volumes[0].source"),
        (lambda s: setattr(s.volumes[0], "target", "data"), "replica.volumes[0].target"),
        (lambda s: setattr(s, "restart", "sometimes"), "replica.restart"),
        (lambda s: s.hosts.update({"db": "not-an-ip"}), "replica.hosts.db"),
        (lambda s: setattr(s.health, "kind", "grpc"), "replica.health.kind"),
        (lambda s: setattr(s.health, "path", "health"), "replica.health.path"),
        (lambda s: setattr(s.health, "port", 0), "replica.health.port"),
        (lambda s: setattr(s, "stop_grace_seconds", -1), "replica.stop_grace_seconds"),
    ],
)
def test_replica_spec_refusals_name_the_field(mutate, field: str) -> None:
    spec = good()
    check_replica_spec(spec)  # the control: the unmutated spec passes
    mutate(spec)
    with pytest.raises(FieldError) as refused:
        check_replica_spec(spec)
    assert refused.value.field == field


def test_assignment_refuses_a_replica_twice() -> None:
    assignment = workloads_pb2.NodeAssignment(generation=1, replicas=[good(), good()])
    with pytest.raises(FieldError, match="appears twice"):
        check_assignment(assignment)


def test_reports_are_bounded() -> None:
    reports = workloads_pb2.ReplicaReports(
        replicas=[workloads_pb2.ReplicaReport(service="mcp", replica="mcp.1")]
    )
    check_reports(reports)
    reports.replicas[0].message = "x" * 5000
    with pytest.raises(FieldError, match="message"):
        check_reports(reports)


@pytest.mark.parametrize(
    ("source", "mounts", "refused"),
    [
        ("/srv/data", NodeMounts(), False),
        ("/mnt/mcp-storage", NodeMounts(), False),  # the gluster mount of the seed
        ("/etc", NodeMounts(), True),
        ("/etc/ssl", NodeMounts(), True),  # a system tree, on the node
        ("/var/lib/picoord/agent", NodeMounts(), True),
        ("/var/lib/docker/volumes", NodeMounts(), True),
        ("/srv/agent-state", NodeMounts(extra_trees=("/srv/agent-state",)), True),  # the agent's own
        ("/etc/ssl/certs", NodeMounts(allowed=("/etc/ssl/certs",)), False),  # agent.toml allows it
    ],
)
def test_bind_sources_on_the_node(source: str, mounts: NodeMounts, refused: bool) -> None:
    spec = good()
    spec.volumes[0].source = source
    assignment = workloads_pb2.NodeAssignment(generation=1, replicas=[spec])
    if refused:
        with pytest.raises(FieldError) as error:
            check_assignment(assignment, mounts)
        assert error.value.field == "assignment.replicas[0].volumes[0].source"
    else:
        check_assignment(assignment, mounts)


@pytest.mark.parametrize(
    ("number", "word", "read"),
    [
        (workloads_pb2.REPLICA_STATE_UNSPECIFIED, "running", "running"),  # an agent before the enum
        (workloads_pb2.REPLICA_STATE_UNSPECIFIED, "exited", "exited"),
        (workloads_pb2.REPLICA_STATE_UNSPECIFIED, "sleeping", "unknown"),  # a word nobody defined
        (workloads_pb2.REPLICA_STATE_UNSPECIFIED, "", "unknown"),
        (workloads_pb2.REPLICA_STATE_EXITED, "running", "exited"),  # the number wins when sent
    ],
)
def test_an_older_agents_state_word_is_read_as_its_state(number: int, word: str, read: str) -> None:
    reports = workloads_pb2.ReplicaReports()
    reports.replicas.add(service="mcp", replica="mcp.1", revision=1, state=number, state_word=word)
    check_reports(reports)
    read_older_agents_states(reports)
    assert ReplicaState.from_wire(reports.replicas[0].state) == read
