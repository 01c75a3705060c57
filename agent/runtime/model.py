"""What the agent runs for a replica, as plain data, and the pure translation of it into the
Docker Engine API's create request.

Every container the agent starts carries labels naming its service, revision and replica:
they are how the agent finds its replicas again after a restart (and reports them on
reconnect, so the coordinator adopts them instead of starting duplicates), and how it
tells them from containers someone else runs on the same Pi.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LABEL_MANAGED = "org.picoord.managed"
LABEL_SERVICE = "org.picoord.service"
LABEL_REVISION = "org.picoord.revision"
LABEL_REPLICA = "org.picoord.replica"
NANO_CPUS_PER_MILLI = 1_000_000
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")


@dataclass(frozen=True)
class Port:
    target: int
    published: int = 0  # 0: not published on the node
    protocol: str = "tcp"
    endpoint: int = 0  # set: bound at this port on `bind_address` only (every node answers `published`)
    bind_address: str = ""

    @property
    def binding(self) -> int | tuple[str, int] | None:
        """Where Docker binds it on the node (docker-py's port_bindings value), or None."""
        if self.endpoint:
            return (self.bind_address, self.endpoint)
        return self.published or None


@dataclass(frozen=True)
class VolumeMount:
    source: str  # a named volume, or an absolute host path (a bind); empty for a tmpfs
    target: str
    read_only: bool = False
    tmpfs: bool = False

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")


@dataclass(frozen=True)
class NetworkJoin:
    """A Swarm overlay network the container joins, and the names it answers to on it."""

    name: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthCheck:
    """One probe, and how often and how patiently to run it (Docker's HEALTHCHECK terms)."""

    kind: str  # "http", "tcp", "exec" or "none"
    port: int = 0
    path: str = "/"
    argv: tuple[str, ...] = ()
    interval: float = 5.0
    timeout: float = 2.0
    retries: int = 3
    start_period: float = 0.0


@dataclass(frozen=True)
class ContainerSpec:
    """One replica: what the coordinator asks a node to run."""

    service: str
    revision: int
    replica: str  # stable id of this replica slot, e.g. "mcp.2"
    image: str
    command: tuple[str, ...] = ()  # entrypoint override; empty keeps the image's
    args: tuple[str, ...] = ()  # cmd override; empty keeps the image's
    env: Mapping[str, str] = field(default_factory=dict)  # secrets resolved: never log it
    ports: tuple[Port, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    memory_limit: int = 0  # bytes; 0: none
    memory_reservation: int = 0
    cpu_limit_millis: int = 0
    gpus: int = 0
    restart: str = "on-failure"
    restart_max_attempts: int = 0
    hosts: Mapping[str, str] = field(default_factory=dict)  # name -> address, for discovery
    health: HealthCheck = field(default_factory=lambda: HealthCheck("none"))
    stop_grace: float = 10.0
    networks: tuple[NetworkJoin, ...] = ()  # the first at create, the others connected before start

    @property
    def container_name(self) -> str:
        return f"picoord-{self.replica}-r{self.revision}"

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_SERVICE: self.service,
            LABEL_REVISION: str(self.revision),
            LABEL_REPLICA: self.replica,
        }


def host_config(spec: ContainerSpec) -> dict[str, Any]:
    """The HostConfig part of the create request (keyword arguments of docker-py's
    APIClient.create_host_config, which Debian 12's python3-docker 5.0.3 has too)."""
    restart: dict[str, Any] = {"Name": spec.restart}
    if spec.restart == "on-failure" and spec.restart_max_attempts:
        restart["MaximumRetryCount"] = spec.restart_max_attempts
    config: dict[str, Any] = {
        "port_bindings": {
            f"{port.target}/{port.protocol}": port.binding for port in spec.ports if port.binding is not None
        },
        "binds": {
            volume.source: {"bind": volume.target, "mode": "ro" if volume.read_only else "rw"}
            for volume in spec.volumes
            if not volume.tmpfs
        },
        "restart_policy": restart,
        "extra_hosts": dict(spec.hosts),
    }
    if spec.networks:
        config["network_mode"] = spec.networks[0].name
    tmpfs = {volume.target: "ro" if volume.read_only else "" for volume in spec.volumes if volume.tmpfs}
    if tmpfs:
        config["tmpfs"] = tmpfs
    if spec.memory_limit:
        config["mem_limit"] = spec.memory_limit
    if spec.memory_reservation:
        config["mem_reservation"] = spec.memory_reservation
    if spec.cpu_limit_millis:
        config["nano_cpus"] = spec.cpu_limit_millis * NANO_CPUS_PER_MILLI
    if spec.gpus:
        config["device_requests"] = [{"Driver": "", "Count": spec.gpus, "Capabilities": [["gpu"]]}]
    return config


def create_arguments(spec: ContainerSpec) -> dict[str, Any]:
    """Keyword arguments of APIClient.create_container, less host_config."""
    arguments: dict[str, Any] = {
        "image": spec.image,
        "name": spec.container_name,
        "labels": spec.labels,
        "environment": dict(spec.env),
        "ports": [(port.target, port.protocol) for port in spec.ports],
        "detach": True,
        # Kept by Docker with the container: the grace it gets when it is stopped, which is
        # usually after it has left the assignment that named its spec.
        "stop_timeout": int(max(0.0, spec.stop_grace)),
    }
    if spec.networks:
        first = spec.networks[0]
        arguments["networking_config"] = {"EndpointsConfig": {first.name: {"Aliases": list(first.aliases)}}}
    if spec.command:
        arguments["entrypoint"] = list(spec.command)
    if spec.args:
        arguments["command"] = list(spec.args)
    return arguments


@dataclass(frozen=True)
class ReplicaState:
    """What the agent reports about one of its containers."""

    service: str
    revision: int
    replica: str
    container_id: str
    state: str  # Docker's: created, running, restarting, exited, dead, paused
    exit_code: int
    restarts: int
    started_at: str
    image: str
    stop_grace: float | None = None  # Docker's StopTimeout, set from the spec at create


def replica_state(container: Mapping[str, Any]) -> ReplicaState | None:
    """From a container's inspect data; None when it is not one of picoord's."""
    config = container.get("Config") or {}
    labels = config.get("Labels") or {}
    if labels.get(LABEL_MANAGED) != "true":
        return None
    state = container.get("State") or {}
    try:
        revision = int(labels.get(LABEL_REVISION, ""))
    except ValueError:
        return None
    return ReplicaState(
        service=str(labels.get(LABEL_SERVICE, "")),
        revision=revision,
        replica=str(labels.get(LABEL_REPLICA, "")),
        container_id=str(container.get("Id", "")),
        state=str(state.get("Status", "")),
        exit_code=int(state.get("ExitCode") or 0),
        restarts=int(container.get("RestartCount") or 0),
        started_at=str(state.get("StartedAt", "")),
        image=str(config.get("Image", "")),
        stop_grace=float(config["StopTimeout"]) if isinstance(config.get("StopTimeout"), int) else None,
    )
