"""The service spec: what one picoord service runs, as frozen plain data.

Every input format (picoord's `kind: Service`, a Compose/stack file, a Kubernetes
Deployment+Service) is read into this one shape, so the scheduler, the rollout planner, the
agent's runtime and the CLI know one definition. Sizes are ints (bytes, millicores),
durations floats (seconds). Command and args follow Kubernetes: `command` replaces the
image's ENTRYPOINT, `args` its CMD; None keeps the image's own.

`origin` and the `field` of nested parts say where a value came from in the user's file, so
checks made later (a missing secret) can name the document and field the user wrote; they
take no part in equality or in the revision key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from picoord.common.limits import ENDPOINT_PORT_FIRST, ENDPOINT_PORT_LAST
from picoord.common.names import normalise_arch
from picoord.common.validation import FieldError, absolute_path, outside_system_directories
from picoord.coordinator.placement.constraints import ARCH, Constraint, Spread
from picoord.coordinator.placement.scheduler import Request
from picoord.coordinator.rollout.policy import UpdatePolicy

REPLICATED = "replicated"
GLOBAL = "global"
MODES = (REPLICATED, GLOBAL)

RESTART_NONE = "none"
RESTART_ON_FAILURE = "on-failure"
RESTART_ALWAYS = "always"
RESTART_CONDITIONS = (RESTART_NONE, RESTART_ON_FAILURE, RESTART_ALWAYS)

HTTP = "http"
TCP = "tcp"
EXEC = "exec"
HEALTH_KINDS = (HTTP, TCP, EXEC)

VOLUME = "volume"
BIND = "bind"
TMPFS = "tmpfs"
VOLUME_TYPES = (VOLUME, BIND, TMPFS)

PROTOCOLS = ("tcp", "udp")
MAX_REPLICAS = 1000

# Service names become DNS names other replicas reach them by (service discovery).
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class PortMapping:
    """A container port; `published` > 0 also binds it on the node that runs the replica."""

    target: int
    published: int = 0
    protocol: str = "tcp"


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    field: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable filled from the secret store's NAME/KEY on the node, at start:
    the value never appears in the spec, a log or a command line."""

    env: str
    secret: str
    key: str
    field: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class VolumeMount:
    """A named volume (`source` is its name), a host path (`source` absolute) or a tmpfs."""

    type: str
    target: str
    source: str = ""
    read_only: bool = False


@dataclass(frozen=True)
class NetworkAttachment:
    """A network the service joins, as its file names it (`mcp-network`) until the stack is
    known, then as Swarm names it (`mcp_mcp-network`, networks.stack_networks). `encrypted`
    is the network's own option (the same on every service of the file); `aliases` are the
    extra names the service answers to on it (Compose's per-network aliases)."""

    network: str
    encrypted: bool = False
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceRequest:
    """GPUs and the like, as Docker's device requests: count -1 means all of them."""

    driver: str = "nvidia"
    count: int = 1
    device_ids: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ("gpu",)


@dataclass(frozen=True)
class Resources:
    memory_request: int = 0  # bytes the scheduler reserves on the node
    memory_limit: int = 0  # bytes the container may use; 0: no limit
    cpu_request: int = 0  # millicores
    cpu_limit: int = 0
    devices: tuple[DeviceRequest, ...] = ()

    @property
    def gpu_count(self) -> int:
        """GPUs requested; -1 (the scheduler's ALL_GPUS) when a request takes every GPU."""
        gpus = [device for device in self.devices if "gpu" in device.capabilities]
        if any(device.count == -1 for device in gpus):
            return -1
        return sum(device.count for device in gpus)


@dataclass(frozen=True)
class RestartPolicy:
    """Swarm's restart policy (its defaults): restart always, after 5 s, without limit."""

    condition: str = RESTART_ALWAYS
    max_attempts: int = 0  # 0: no limit
    delay: float = 5.0
    window: float = 0.0  # seconds a restart must run to count as a success; 0: at once


@dataclass(frozen=True)
class Placement:
    constraints: tuple[Constraint, ...] = ()
    spread: Spread = field(default_factory=Spread)


@dataclass(frozen=True)
class HealthCheck:
    """One check per replica that gates rollouts and replaces an unhealthy replica.

    Defaults are Docker's HEALTHCHECK ones (30 s, 30 s, 3 retries, no start period)."""

    kind: str
    port: int = 0  # http, tcp
    path: str = "/"  # http
    command: tuple[str, ...] = ()  # exec: argv, run without a shell
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0
    field: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    image: str
    mode: str = REPLICATED
    replicas: int = 1  # replicated mode; global runs one replica on every matching node
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    ports: tuple[PortMapping, ...] = ()
    env: tuple[EnvVar, ...] = ()
    secrets: tuple[SecretEnv, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    resources: Resources = Resources()
    restart: RestartPolicy = RestartPolicy()
    placement: Placement = Placement()
    health: HealthCheck | None = None
    update: UpdatePolicy = field(default_factory=UpdatePolicy)
    rollback: UpdatePolicy | None = None  # how an undo proceeds; None: like `update`
    depends_on: tuple[str, ...] = ()  # placed first on a first deployment
    references: tuple[str, ...] = ()  # services of the same file it names (depends_on too)
    aliases: tuple[str, ...] = ()  # more names it is reachable by (a Kubernetes Service's)
    # Swarm overlay networks it joins; none: published-ports mode (docs/networking.md)
    networks: tuple[NetworkAttachment, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    user: str = ""
    working_dir: str = ""
    stop_grace_period: float = 10.0
    # sha256:... that `image`'s tag named when the rollout began (common/images.py); set by
    # the coordinator, never read from a file: a re-pushed tag is a new digest, a new revision
    image_digest: str = ""
    # A LoadBalancer virtual address (VIP) that leads to its published ports, announced by a
    # node with a healthy replica (coordinator/networking/virtual_ips.py); '' for none.
    address: str = ""
    origin: str = field(default="", compare=False)  # e.g. "Service/mcp", "services.postgres"
    address_field: str = field(default="", compare=False)  # where the file gave the address

    @property
    def named_volumes(self) -> frozenset[str]:
        """The named volumes it mounts (not host paths, not tmpfs): what `rm --volumes` takes."""
        return frozenset(volume.source for volume in self.volumes if volume.type == VOLUME and volume.source)


# What a replica runs: a change here is a new revision, rolled out replica by replica.
# The rest changes how many run and how updates go, not what each runs (as Kubernetes'
# pod-template-hash leaves out replicas and strategy).
NOT_IN_REVISION = (
    "mode",
    "replicas",
    "update",
    "rollback",
    "depends_on",
    "references",
    "aliases",
    "origin",
    "address",  # the VIP moves between nodes; what each replica runs stays
)


def _canonical(value: object) -> object:
    if isinstance(value, Constraint) and value.key == ARCH:
        value = dataclasses.replace(value, value=normalise_arch(value.value))  # aarch64 is arm64
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _canonical(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.compare  # origin / field: where it was written, not what runs
        }
    if isinstance(value, tuple | list):
        return [_canonical(item) for item in value]
    return value


def revision_key(spec: ServiceSpec) -> str:
    """A stable hash of what each replica runs (sha256 of the normalised fields, 16 hex)."""
    data = _canonical(spec)
    assert isinstance(data, dict)
    for name in NOT_IN_REVISION:
        data.pop(name, None)
    if not data.get("image_digest"):  # unpinned: the same key as before pinning existed
        data.pop("image_digest", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_digest(spec: ServiceSpec) -> str:
    """A stable hash of the whole spec: tells an unchanged `apply` from a changed one."""
    data = _canonical(spec)
    assert isinstance(data, dict)
    if not data.get("address"):
        data.pop("address", None)  # as before VIPs existed: a stored spec's digest stays
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def service_name(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not _SERVICE_NAME.fullmatch(value):
        raise FieldError(
            field_name,
            f"{value!r} is not a service name: other services reach it by this name, so use a DNS "
            "label (lowercase letters, digits and '-', 1-63 characters)",
        )
    return value


def check_service(spec: ServiceSpec, paths: Mapping[str, str]) -> ServiceSpec:
    """Checks across fields, once a spec is built. `paths` names fields as the user wrote
    them (keys: replicas, resources.memory, resources.cpu, env, ports; a health
    check names its own field)."""

    def at(key: str) -> str:
        return paths.get(key, f"{spec.origin}.{key}")

    if spec.mode not in MODES:
        raise FieldError(at("mode"), f"{spec.mode!r} is not one of {', '.join(MODES)}")
    if not 0 <= spec.replicas <= MAX_REPLICAS:
        raise FieldError(at("replicas"), f"{spec.replicas} is not a replica count (0-{MAX_REPLICAS})")
    resources = spec.resources
    if resources.memory_limit and resources.memory_request > resources.memory_limit:
        raise FieldError(at("resources.memory"), "the memory request is larger than the limit")
    if resources.cpu_limit and resources.cpu_request > resources.cpu_limit:
        raise FieldError(at("resources.cpu"), "the CPU request is larger than the limit")
    names = [item.name for item in spec.env] + [item.env for item in spec.secrets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FieldError(at("env"), f"{duplicates[0]} is set twice")
    published = [(p.published, p.protocol) for p in spec.ports if p.published]
    if len(published) != len(set(published)):
        raise FieldError(at("ports"), "a port is published twice")
    reserved = [number for number, _ in published if ENDPOINT_PORT_FIRST <= number <= ENDPOINT_PORT_LAST]
    if reserved:
        raise FieldError(
            at("ports"),
            f"port {reserved[0]} is one of the endpoint ports {ENDPOINT_PORT_FIRST}-{ENDPOINT_PORT_LAST} "
            "(where each node binds its replicas for the published ports): publish another",
        )
    targets = [(p.target, p.protocol) for p in spec.ports]
    if len(targets) != len(set(targets)):
        raise FieldError(at("ports"), "a container port is listed twice")
    health = spec.health
    if health is not None and health.kind in (HTTP, TCP):
        exposed = {p.target for p in spec.ports if p.protocol == "tcp"}
        if health.port not in exposed:
            listed = ", ".join(str(port) for port in sorted(exposed)) or "none"
            raise FieldError(
                f"{health.field}.port" if health.field else at("health.port"),
                f"the health check probes port {health.port}, which the service does not expose "
                f"(its ports: {listed})",
            )
    return spec


def check_secrets(spec: ServiceSpec, known: Iterable[tuple[str, str]]) -> None:
    """Every secret the spec reads exists in the store (given as (name, key) pairs), or a
    FieldError naming the first missing one, where the user wrote it."""
    present = set(known)
    for index, ref in enumerate(spec.secrets):
        if (ref.secret, ref.key) not in present:
            raise FieldError(
                ref.field or f"{spec.origin}.secrets[{index}]",
                f"secret {ref.secret}/{ref.key} (for {ref.env}) does not exist; create it with "
                f"`coordctl secret create {ref.secret} {ref.key} --from-literal ...`",
            )


def secret_users(specs: Iterable[ServiceSpec]) -> dict[str, list[str]]:
    """Secret name -> the services whose specs read a key of it (each once, sorted): what
    `secret list` shows and what `secret rm` refuses to break."""
    users: dict[str, set[str]] = {}
    for spec in specs:
        for ref in spec.secrets:
            users.setdefault(ref.secret, set()).add(spec.name)
    return {name: sorted(services) for name, services in sorted(users.items())}


def secret_stamp(spec: ServiceSpec, updated: Mapping[tuple[str, str], float]) -> str:
    """A short hash of when each secret key the spec reads was last set ("" without secrets):
    part of a revision's key, so a replaced value makes the next rollout a new revision."""
    if not spec.secrets:
        return ""
    stamps = sorted((ref.secret, ref.key, updated.get((ref.secret, ref.key), 0.0)) for ref in spec.secrets)
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:8]


def secrets_set_since(spec: ServiceSpec, updated: Mapping[tuple[str, str], float], since: float) -> list[str]:
    """The spec's secret keys ("name/key") whose value was set after `since` (a revision's
    creation): the running replicas still have the old value, a rollout gives the new."""
    return sorted(
        {f"{ref.secret}/{ref.key}" for ref in spec.secrets if updated.get((ref.secret, ref.key), 0.0) > since}
    )


def check_references(specs: Iterable[ServiceSpec], depends_paths: Mapping[str, str]) -> None:
    """depends_on names services of the same file, without a cycle."""
    by_name = {spec.name: spec for spec in specs}
    for spec in by_name.values():
        for name in spec.depends_on:
            if name not in by_name:
                raise FieldError(
                    depends_paths.get(spec.name, f"{spec.origin}.depends_on"),
                    f"{name!r} is not a service of this file",
                )
    try:
        dependency_order({name: spec.depends_on for name, spec in by_name.items()})
    except DependencyCycle as error:
        name = error.cycle[0]
        raise FieldError(
            depends_paths.get(name, f"{by_name[name].origin}.depends_on"), f"cycle {' -> '.join(error.cycle)}"
        ) from None


class DependencyCycle(ValueError):
    """Services that depend on each other in a circle; the message names the circle."""

    def __init__(self, cycle: tuple[str, ...]) -> None:
        super().__init__(f"dependency cycle: {' -> '.join(cycle)}")
        self.cycle = cycle


def dependency_order(depends: Mapping[str, Sequence[str]]) -> list[str]:
    """The names of `depends` (name -> what it depends on) with those each depends on first,
    in the given order otherwise; DependencyCycle naming the cycle when they depend on each
    other. Dependencies outside `depends` are not ordered (they are not of the group)."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise DependencyCycle((*visiting[visiting.index(name) :], name))
        visiting.append(name)
        for dependency in depends[name]:
            if dependency in depends:
                visit(dependency)
        visiting.pop()
        order.append(name)

    for name in depends:
        visit(name)
    return order


def placement_order(specs: Iterable[ServiceSpec]) -> list[str]:
    """Service names with each one's depends_on before it (file order otherwise)."""
    return dependency_order({spec.name: spec.depends_on for spec in specs})


def host_path(field_name: str, value: str) -> str:
    """A host directory bind-mounted into a container: absolute, and not a system directory."""
    return outside_system_directories(
        field_name, value, "bind-mount {path} into a container", "bind-mount from under {tree}"
    )


_HTTP_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,1023}$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")


def http_path(field_name: str, value: str) -> str:
    """The path (and query) an http health check requests: absolute, no spaces or controls."""
    if not _HTTP_PATH.fullmatch(value):
        raise FieldError(
            field_name, f"{value!r} is not an HTTP path (it must start with / and hold no spaces)"
        )
    return value


def user_spec(field_name: str, value: str) -> str:
    """`user`, `uid`, `user:group` or `uid:gid`, as Docker takes it ("" keeps the image's)."""
    if value and not _USER.fullmatch(value):
        raise FieldError(field_name, f"{value!r} is not USER[:GROUP] (names or numeric ids)")
    return value


def working_dir(field_name: str, value: str) -> str:
    """The container's working directory: absolute ("" keeps the image's)."""
    return absolute_path(field_name, value) if value else ""


_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIALS?)", re.IGNORECASE)


def plaintext_secrets(spec: ServiceSpec) -> list[tuple[str, str]]:
    """(field, why) for env values that look like secrets written in the file: a variable
    named like one, or a URL with a password. They would sit in the store and in `docker
    inspect`; the secret store keeps them out of both."""
    found = []
    for item in spec.env:
        where = item.field or f"{spec.origin}.env.{item.name}"
        try:
            password = urlsplit(item.value).password if "://" in item.value else None
        except ValueError:
            password = None
        if item.value and (_SECRET_NAME.search(item.name) or password):
            found.append(
                (
                    where,
                    f"{item.name} looks like a secret written in plain text; keep it in the secret "
                    "store (`coordctl secret create`) and refer to it (picoord secrets, or secretKeyRef)",
                )
            )
    return found


_HOST_VARIABLE = re.compile(r"(HOST|HOSTNAME|SERVER|ADDR|ADDRESS|ENDPOINT)$", re.IGNORECASE)


def referenced_services(spec: ServiceSpec, names: Iterable[str]) -> tuple[str, ...]:
    """The other services of the file that `spec` names as a host: in depends_on, as the host
    of a URL or of HOST:PORT in its env, command and args (the seed's `...@postgres:5432/...`),
    or as the whole value of a variable named like a host (`DB_HOST=postgres`).

    Only hosts count, so a user or database name that equals a service name
    (`POSTGRES_USER=mcp`, `postgresql://mcp:...`) is not a reference."""
    wanted = set(names) - {spec.name}
    found = set(spec.depends_on)
    words = [(item.name, item.value) for item in spec.env]
    words += [("", word) for word in (*(spec.command or ()), *(spec.args or ()))]
    for variable, word in words:
        for token in re.split(r"[\s,;]+", word):
            if "://" in token:
                try:
                    host = urlsplit(token).hostname or ""
                except ValueError:
                    continue
            elif ":" in token:
                host, _, port_text = token.partition(":")
                host = host if port_text[:5].isdigit() else ""
            else:
                host = token if variable and _HOST_VARIABLE.search(variable) else ""
            if host in wanted:
                found.add(host)
    return tuple(sorted(found))


def publishes(spec: ServiceSpec) -> bool:
    """Whether any port is published: what a virtual address can lead to."""
    return any(port.published for port in spec.ports)


def placement_request(spec: ServiceSpec, replicas: int | None = None) -> Request:
    """What the scheduler needs to place `replicas` new replicas of the spec (default: all)."""
    return Request(
        service=spec.name,
        replicas=spec.replicas if replicas is None else replicas,
        global_mode=spec.mode == GLOBAL,
        memory_bytes=spec.resources.memory_request,
        cpu_millis=spec.resources.cpu_request,
        gpus=spec.resources.gpu_count,
        constraints=spec.placement.constraints,
        spread=spec.placement.spread,
        swarm_only=bool(spec.networks),
    )
