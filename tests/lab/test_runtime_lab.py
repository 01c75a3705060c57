"""The agent's container runtime against a lab Pi's own dockerd, pulling the lab registry's
stand-in images: create with limits and labels, adopt instead of duplicating, probe
health from inside the Pi, stop with a grace period, and clear errors for a missing image
or a registry that is down."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from picoord.agent.runtime.engine import Engine, RuntimeFailure
from picoord.agent.runtime.model import ContainerSpec, HealthCheck, Port
from picoord.lab.images import MCP_PORT
from picoord.lab.registry import Registry
from picoord.lab.sandbox import DOCKER_SOCKET, PiRack

pytestmark = pytest.mark.lab
RegistryRack = tuple[PiRack, Registry]


@pytest.fixture
def engine(registry_rack: RegistryRack) -> Iterator[Engine]:
    rack, _ = registry_rack
    engine = Engine(str(rack.sandbox("pi1").host_path(DOCKER_SOCKET)))
    try:
        yield engine
    finally:
        for replica in engine.replicas():
            engine.stop(replica.container_id, grace=0)
        engine.close()


def _spec(registry: Registry, tag: str = "1", **changes: object) -> ContainerSpec:
    fields: dict[str, object] = {
        "service": "mcp",
        "revision": int(tag),
        "replica": "mcp.1",
        "image": f"{registry.address}/mcp:{tag}",
        "env": {"DATABASE_URL": "postgresql://mcp:s3cret@postgres:5432/mcp_db"},
        "ports": (Port(MCP_PORT, 18090),),
        "memory_limit": 64 * 1024 * 1024,
        "memory_reservation": 32 * 1024 * 1024,
        "cpu_limit_millis": 500,
        "hosts": {"postgres": "10.99.0.7"},
        "health": HealthCheck("http", port=MCP_PORT, path="/health"),
        "stop_grace": 2.0,
    }
    fields.update(changes)
    return ContainerSpec(**fields)  # type: ignore[arg-type]


def _probe_inside(rack: PiRack, container_id: str, spec: ContainerSpec) -> tuple[bool, str]:
    """Engine.probe run inside the Pi's namespaces, where the container's address is."""
    script = (
        "import json, sys\n"
        "from picoord.agent.runtime.engine import Engine\n"
        "from picoord.agent.runtime.model import HealthCheck, ContainerSpec\n"
        "check = HealthCheck(**json.loads(sys.argv[3]))\n"
        "spec = ContainerSpec('mcp', 1, 'mcp.1', 'x', health=check)\n"
        "print(json.dumps(Engine(sys.argv[1]).probe(sys.argv[2], spec)))\n"
    )
    check = {**spec.health.__dict__, "argv": list(spec.health.argv)}
    done = rack.sandbox("pi1").run(
        [sys.executable, "-c", script, DOCKER_SOCKET, container_id, json.dumps(check)], timeout=30
    )
    assert done.returncode == 0, done.stderr
    ok, text = json.loads(done.stdout)
    return ok, text


def test_run_applies_limits_labels_and_discovery(engine: Engine, registry_rack: RegistryRack) -> None:
    _, registry = registry_rack
    spec = _spec(registry)
    engine.pull(spec.image)
    container_id = engine.run(spec)
    inspect = engine.client.inspect_container(container_id)
    host = inspect["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["MemoryReservation"] == 32 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["ExtraHosts"] == ["postgres:10.99.0.7"]
    assert host["PortBindings"] == {f"{MCP_PORT}/tcp": [{"HostIp": "", "HostPort": "18090"}]}
    assert inspect["Config"]["Labels"]["org.picoord.replica"] == "mcp.1"
    [replica] = engine.replicas()
    assert (replica.service, replica.revision, replica.replica, replica.state) == (
        "mcp",
        1,
        "mcp.1",
        "running",
    )


def test_run_twice_adopts_instead_of_duplicating(engine: Engine, registry_rack: RegistryRack) -> None:
    _, registry = registry_rack
    spec = _spec(registry)
    engine.pull(spec.image)
    first = engine.run(spec)
    engine.client.stop(first, timeout=0)  # crashed or stopped while the agent was away
    assert engine.run(spec) == first
    assert [replica.state for replica in engine.replicas()] == ["running"]


@pytest.mark.parametrize(
    ("tag", "check", "healthy"),
    [
        ("1", HealthCheck("http", port=MCP_PORT, path="/health"), True),
        ("3", HealthCheck("http", port=MCP_PORT, path="/health"), False),
        ("1", HealthCheck("tcp", port=MCP_PORT), True),
        ("1", HealthCheck("tcp", port=MCP_PORT + 1, timeout=1.0), False),
        ("1", HealthCheck("exec", argv=("/bin/cat", "/www/health")), True),
        ("3", HealthCheck("exec", argv=("/bin/cat", "/www/health")), False),
    ],
)
def test_health_probes(
    engine: Engine, registry_rack: RegistryRack, tag: str, check: HealthCheck, healthy: bool
) -> None:
    rack, registry = registry_rack
    spec = _spec(registry, tag, health=check, ports=())
    engine.pull(spec.image)
    container_id = engine.run(spec)
    results = [_probe_inside(rack, container_id, spec) for _ in range(3)]
    # A probe may race the server's start: healthy means some attempt passed; unhealthy, none.
    assert any(ok for ok, _ in results) is healthy, results


def test_missing_image_and_registry_down_are_clear(engine: Engine, registry_rack: RegistryRack) -> None:
    _, registry = registry_rack
    with pytest.raises(RuntimeFailure, match=r"cannot pull .*/mcp:404"):
        engine.pull(f"{registry.address}/mcp:404")
    with pytest.raises(RuntimeFailure, match=r"cannot pull 10\.\d+\.\d+\.\d+:1/mcp:1") as refused:
        engine.pull(f"{registry.address.rsplit(':', 1)[0]}:1/mcp:1")
    assert "s3cret" not in str(refused.value)


def test_stop_honours_the_grace_period_and_removes(engine: Engine, registry_rack: RegistryRack) -> None:
    _, registry = registry_rack
    spec = _spec(registry)
    engine.pull(spec.image)
    container_id = engine.run(spec)
    engine.stop(container_id, grace=1)
    assert engine.replicas() == []
