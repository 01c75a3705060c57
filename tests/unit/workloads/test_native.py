"""picoord's own `kind: Service`: strict, every field read, errors naming Service/NAME.field."""

import re

import pytest
import yaml

from picoord.coordinator.placement.constraints import ARCH, Constraint, Spread
from picoord.coordinator.rollout.policy import UpdatePolicy
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from tests.unit.workloads.documents import EXAMPLES

MI = 1024**2


def test_the_example_reads_to_this_spec() -> None:
    mcp, postgres = read_workloads((EXAMPLES / "mcp.yaml").read_text()).services
    assert mcp == s.ServiceSpec(
        name="mcp",
        image="mcp-modules-rust:latest",
        replicas=3,
        ports=(s.PortMapping(8080, 8080),),
        env=(s.EnvVar("MCP_HTTP_HOST", "0.0.0.0"),),
        secrets=(s.SecretEnv("DATABASE_URL", "mcp-secrets", "database-url"),),
        resources=s.Resources(memory_request=256 * MI, memory_limit=512 * MI, cpu_request=250, cpu_limit=500),
        placement=s.Placement(constraints=(Constraint(ARCH, "==", "arm64"),), spread=Spread(max_per_node=1)),
        health=s.HealthCheck(s.TCP, port=8080, interval=5.0, timeout=2.0, retries=3, start_period=5.0),
        update=UpdatePolicy(parallelism=1, monitor=5.0, order="stop-first", failure_action="rollback"),
        depends_on=("postgres",),
        references=("postgres",),
    )
    assert mcp.origin == "Service/mcp"
    assert postgres.secrets == (s.SecretEnv("POSTGRES_PASSWORD", "mcp-secrets", "postgres-password"),)


def _doc(**fields: object) -> str:
    return yaml.safe_dump(
        {"apiVersion": "picoord/v1", "kind": "Service", "name": "web", "image": "web:1", **fields}
    )


def _one(**fields: object) -> s.ServiceSpec:
    (spec,) = read_workloads(_doc(**fields)).services
    return spec


def _error(**fields: object) -> str:
    with pytest.raises(WorkloadError) as error:
        read_workloads(_doc(**fields), "web.yaml")
    return str(error.value)


def test_defaults() -> None:
    spec = _one()
    assert (spec.mode, spec.replicas, spec.command, spec.args, spec.health) == (
        s.REPLICATED,
        1,
        None,
        None,
        None,
    )
    assert spec.update == UpdatePolicy() and spec.restart == s.RestartPolicy()


def test_everything() -> None:
    spec = _one(
        mode="global",
        command=["/bin/web"],
        args=["--port", 8080],
        ports=[{"target": 8080, "published": 80, "protocol": "tcp"}, {"target": 53, "protocol": "udp"}],
        env={"A": "1", "N": 2},
        volumes=[
            {"type": "volume", "source": "data", "target": "/data"},
            {"type": "bind", "source": "/mnt/gluster/web", "target": "/srv", "read_only": True},
            {"type": "tmpfs", "target": "/tmp"},
        ],
        resources={"requests": {"memory": "64Mi"}, "devices": [{"count": 1}]},
        restart={"condition": "on-failure", "max_attempts": 3, "delay": "1s", "window": "10s"},
        placement={"constraints": ["node.labels.gpu == yes"], "spread": "zone"},
        health={"http": {"path": "/health", "port": 8080}, "interval": "10s"},
        update={"parallelism": 2, "max_surge": "50%", "max_unavailable": 0, "order": "start-first"},
        rollback={"parallelism": 0},
        aliases=["www"],
        labels={"team": "a"},
        user="1000",
        working_dir="/srv",
        stop_grace_period="20s",
    )
    assert (spec.mode, spec.replicas) == (s.GLOBAL, 0)
    assert spec.args == ("--port", "8080")
    assert spec.ports == (s.PortMapping(8080, 80), s.PortMapping(53, 0, "udp"))
    assert spec.env == (s.EnvVar("A", "1"), s.EnvVar("N", "2"))
    assert spec.volumes == (
        s.VolumeMount(s.VOLUME, "/data", "data"),
        s.VolumeMount(s.BIND, "/srv", "/mnt/gluster/web", True),
        s.VolumeMount(s.TMPFS, "/tmp"),
    )
    assert spec.resources == s.Resources(memory_request=64 * MI, devices=(s.DeviceRequest(count=1),))
    assert spec.restart == s.RestartPolicy(s.RESTART_ON_FAILURE, 3, 1.0, 10.0)
    assert spec.placement == s.Placement(
        (Constraint("node.labels.gpu", "==", "yes"),), Spread(over_label="zone")
    )
    assert spec.health == s.HealthCheck(s.HTTP, port=8080, path="/health", interval=10.0)
    assert spec.update == UpdatePolicy(parallelism=2, max_surge="50%", max_unavailable=0, order="start-first")
    assert spec.rollback == UpdatePolicy(parallelism=0)
    assert (spec.aliases, spec.labels, spec.user, spec.working_dir, spec.stop_grace_period) == (
        ("www",),
        (("team", "a"),),
        "1000",
        "/srv",
        20.0,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"replicas": -1}, "Service/web.replicas: -1 is not a replica count"),
        ({"replicas": "3"}, "Service/web.replicas: '3' is not a replica count"),
        ({"mode": "global", "replicas": 2}, "Service/web.replicas: a global service"),
        ({"mode": "replicated-job"}, "Service/web.mode: 'replicated-job' is not one of replicated, global"),
        (
            {"resources": {"requests": {"memory": "12XB"}}},
            'Service/web.resources.requests.memory: "12XB" is not a memory size (use e.g. 256Mi or 1G)',
        ),
        ({"resources": {"limits": {"cpu": "fast"}}}, "Service/web.resources.limits.cpu"),
        ({"resources": {"requests": {"gpu": 1}}}, "Service/web.resources.requests.gpu: unknown field"),
        (
            {"placement": {"constraints": ["node.color == red"]}},
            "Service/web.placement.constraints[0]: unknown constraint key 'node.color'",
        ),
        (
            {"ports": [{"target": 8080}], "health": {"tcp": {"port": 9090}}},
            "Service/web.health.tcp.port: the health check probes port 9090, "
            "which the service does not expose (its ports: 8080)",
        ),
        ({"health": {"http": {"port": 80}}}, "which the service does not expose (its ports: none)"),
        (
            {"health": {"tcp": {"port": 80}, "exec": ["x"]}},
            "Service/web.health: give exactly one of http, tcp, exec",
        ),
        ({"health": {"exec": []}}, "Service/web.health.exec: is empty"),
        (
            {"health": {"http": {"port": 80, "path": "health"}}, "ports": [{"target": 80}]},
            "must start with /",
        ),
        (
            {"image": "web server:1"},
            'Service/web.image: "web server:1" is not an image reference (it contains whitespace)',
        ),
        ({"image": None}, "Service/web.image: is required"),
        ({"secrets": [{"env": "A", "secret": "s"}]}, "Service/web.secrets[0].key: is required"),
        ({"secrets": [{"env": "A", "secret": "s;x", "key": "k"}]}, "Service/web.secrets[0].secret"),
        (
            {"volumes": [{"type": "bind", "source": "/etc", "target": "/e"}]},
            "Service/web.volumes[0].source: refusing to bind-mount /etc",
        ),
        (
            {"volumes": [{"type": "volume", "source": "/abs", "target": "/e"}]},
            "Service/web.volumes[0].source",
        ),
        (
            {"volumes": [{"type": "tmpfs", "source": "x", "target": "/e"}]},
            "Service/web.volumes[0].source: a tmpfs has no source",
        ),
        ({"update": {"order": "sideways"}}, "Service/web.update.order"),
        ({"update": {"max_surge": 0, "max_unavailable": 0}}, "Service/web.update.max_unavailable"),
        ({"restart": {"condition": "sometimes"}}, "Service/web.restart.condition"),
        ({"env": {"A": True}}, "Service/web.env.A: True is a boolean"),
        ({"env": {"1A": "x"}}, "Service/web.env.1A"),
        ({"apiVersion": "picoord/v2"}, "Service/web.apiVersion: 'picoord/v2' is not picoord/v1"),
        ({"name": "Web"}, "Service.name: 'Web' is not a service name"),
        ({"replica": 3}, "Service/web.replica: unknown field"),
        (
            {"resources": {"devices": [{"count": 1, "device_ids": ["0"]}]}},
            "give count or device_ids, not both",
        ),
    ],
)
def test_errors(fields: dict, message: str) -> None:
    assert re.search(re.escape(message), _error(**fields)), _error(**fields)


def test_errors_start_with_the_file() -> None:
    assert _error(replicas=-1).startswith("web.yaml: Service/web.replicas: ")
