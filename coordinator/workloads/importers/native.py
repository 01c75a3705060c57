"""picoord's own `kind: Service` document, flat like the other cluster.yaml kinds:

    apiVersion: picoord/v1      # optional
    kind: Service
    name: mcp
    image: registry.lab:5000/mcp:1
    replicas: 3                 # or mode: global
    ports: [{target: 8080, published: 8080}]
    env: {MCP_HTTP_HOST: 0.0.0.0}
    secrets: [{env: DATABASE_URL, secret: mcp-secrets, key: database-url}]
    resources: {requests: {memory: 256Mi, cpu: 250m}, limits: {memory: 512Mi}}
    placement: {constraints: ["node.arch == arm64"], max_per_node: 1}
    health: {tcp: {port: 8080}, interval: 10s}

Strict: an unknown key is an error. Sizes use Kubernetes' meaning (quantities.py).
"""

from __future__ import annotations

from typing import Any

from picoord.common.validation import FieldError, absolute_path, env_name, image_reference, port, volume_name
from picoord.coordinator.placement.constraints import Spread, parse_constraint, parse_spread
from picoord.coordinator.rollout.policy import UpdatePolicy, validate_update_policy
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.fields import Fields, SpecWarning, argv, mapping, scalar_text
from picoord.coordinator.workloads.quantities import (
    KUBERNETES,
    cpu_millicores,
    duration_seconds,
    memory_bytes,
)

API_VERSION = "picoord/v1"


def read_service(raw: dict[str, Any], warnings: list[SpecWarning]) -> s.ServiceSpec:
    """One picoord Service document; FieldError naming `Service/NAME.field` on bad input."""
    doc = mapping("Service", raw, warnings)
    doc.get("kind")
    version = doc.text("apiVersion", API_VERSION)
    name = s.service_name("Service.name", doc.get("name", required=True))
    doc.path = f"Service/{name}"
    if version != API_VERSION:
        raise FieldError(doc.at("apiVersion"), f"{version!r} is not {API_VERSION}")
    mode = doc.text("mode", s.REPLICATED, choices=s.MODES)
    if mode == s.GLOBAL and doc.has("replicas"):
        raise FieldError(
            doc.at("replicas"), "a global service runs one replica per matching node; drop replicas"
        )
    replicas = doc.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= s.MAX_REPLICAS:
        raise FieldError(doc.at("replicas"), f"{replicas!r} is not a replica count (0-{s.MAX_REPLICAS})")
    spec = s.ServiceSpec(
        name=name,
        image=image_reference(doc.at("image"), doc.get("image", required=True)),
        mode=mode,
        replicas=replicas if mode == s.REPLICATED else 0,
        command=argv(doc.at("command"), doc.get("command")) if doc.has("command") else None,
        args=argv(doc.at("args"), doc.get("args")) if doc.has("args") else None,
        ports=doc.each("ports", lambda path, item: _port(path, item, warnings)),
        env=_env(doc),
        secrets=doc.each("secrets", lambda path, item: _secret(path, item, warnings)),
        volumes=doc.each("volumes", lambda path, item: _volume(path, item, warnings)),
        resources=_resources(doc.mapping("resources")),
        restart=_restart(doc.mapping("restart")),
        placement=_placement(doc.mapping("placement")),
        health=_health(doc.mapping("health")),
        update=_update(doc, "update") or UpdatePolicy(),
        rollback=_update(doc, "rollback"),
        depends_on=doc.each("depends_on", s.service_name),
        aliases=doc.each("aliases", s.service_name),
        labels=_labels(doc),
        user=s.user_spec(doc.at("user"), doc.text("user", "")),
        working_dir=s.working_dir(doc.at("working_dir"), doc.text("working_dir", "")),
        stop_grace_period=duration_seconds(doc.at("stop_grace_period"), doc.get("stop_grace_period", 10.0)),
        origin=doc.path,
    )
    doc.finish()
    return s.check_service(spec, {})


def _port(path: str, raw: Any, warnings: list[SpecWarning]) -> s.PortMapping:
    item = mapping(path, raw, warnings)
    mapped = s.PortMapping(
        target=port(item.at("target"), item.get("target", required=True)),
        published=port(item.at("published"), item.get("published")) if item.has("published") else 0,
        protocol=item.text("protocol", "tcp", choices=s.PROTOCOLS),
    )
    item.finish()
    return mapped


def _env(doc: Fields) -> tuple[s.EnvVar, ...]:
    table = doc.mapping("env")
    if table is None:
        return ()
    result = []
    for key in table.data:
        env_name(table.at(key), key)
        result.append(
            s.EnvVar(key, scalar_text(table.at(key), table.get(key, required=True)), field=table.at(key))
        )
    return tuple(result)


def _secret(path: str, raw: Any, warnings: list[SpecWarning]) -> s.SecretEnv:
    item = mapping(path, raw, warnings)
    ref = s.SecretEnv(
        env=env_name(item.at("env"), item.get("env", required=True)),
        secret=volume_name(item.at("secret"), item.text("secret")),
        key=volume_name(item.at("key"), item.text("key")),
        field=path,
    )
    item.finish()
    return ref


def _volume(path: str, raw: Any, warnings: list[SpecWarning]) -> s.VolumeMount:
    item = mapping(path, raw, warnings)
    kind = item.text("type", choices=s.VOLUME_TYPES)
    target = absolute_path(item.at("target"), item.text("target"))
    if kind == s.VOLUME:
        source = volume_name(item.at("source"), item.text("source"))
    elif kind == s.BIND:
        source = s.host_path(item.at("source"), item.text("source"))
    else:
        item.refuse("source", "a tmpfs has no source")
        source = ""
    mount = s.VolumeMount(kind, target, source, item.boolean("read_only", False))
    item.finish()
    return mount


def _resources(table: Fields | None) -> s.Resources:
    if table is None:
        return s.Resources()
    values: dict[str, int] = {}
    for part in ("requests", "limits"):
        section = table.mapping(part)
        if section is None:
            continue
        if section.has("memory"):
            values[f"memory_{part[:-1]}"] = memory_bytes(
                section.at("memory"), section.get("memory"), KUBERNETES
            )
        if section.has("cpu"):
            values[f"cpu_{part[:-1]}"] = cpu_millicores(section.at("cpu"), section.get("cpu"))
        section.get("memory")
        section.get("cpu")
        section.finish()
    devices = []
    for index, raw in enumerate(table.items("devices")):
        item = mapping(f"{table.at('devices')}[{index}]", raw, table.warnings)
        devices.append(device_request(item))
        item.finish()
    table.finish()
    return s.Resources(devices=tuple(devices), **values)


def device_request(item: Fields) -> s.DeviceRequest:
    """Compose's and picoord's `{driver, count, device_ids, capabilities}`."""
    count = item.get("count", 1)
    if count == "all":
        count = -1
    if isinstance(count, bool) or not isinstance(count, int) or count < -1:
        raise FieldError(item.at("count"), f"{count!r} is not a device count (a number or 'all')")
    ids = tuple(str(x) for x in item.items("device_ids"))
    capabilities = tuple(str(x) for x in item.items("capabilities")) or ("gpu",)
    if ids and item.has("count"):
        raise FieldError(item.at("count"), "give count or device_ids, not both")
    return s.DeviceRequest(
        driver=item.text("driver", "nvidia"),
        count=len(ids) if ids else count,
        device_ids=ids,
        capabilities=capabilities,
    )


def _restart(table: Fields | None) -> s.RestartPolicy:
    if table is None:
        return s.RestartPolicy()
    policy = s.RestartPolicy(
        condition=table.text("condition", s.RESTART_ALWAYS, choices=s.RESTART_CONDITIONS),
        max_attempts=table.integer("max_attempts", 0),
        delay=duration_seconds(table.at("delay"), table.get("delay", 5.0)),
        window=duration_seconds(table.at("window"), table.get("window", 0.0)),
    )
    table.finish()
    return policy


def _placement(table: Fields | None) -> s.Placement:
    if table is None:
        return s.Placement()
    constraints = table.each("constraints", parse_constraint)
    spread_label = table.get("spread", "")
    placement = s.Placement(
        constraints=constraints,
        spread=Spread(
            max_per_node=table.integer("max_per_node", 0),
            over_label=parse_spread(table.at("spread"), f"node.labels.{spread_label}")
            if spread_label
            else "",
        ),
    )
    table.finish()
    return placement


def _health(table: Fields | None) -> s.HealthCheck | None:
    if table is None:
        return None
    kinds = [kind for kind in s.HEALTH_KINDS if table.has(kind)]
    if len(kinds) != 1:
        raise FieldError(table.path, "give exactly one of http, tcp, exec")
    kind = kinds[0]
    probe_port, path, command = 0, "/", ()
    if kind == s.EXEC:
        command = argv(table.at("exec"), table.get("exec"))
        if not command:
            raise FieldError(table.at("exec"), "is empty")
    else:
        probe = table.mapping(kind)
        assert probe is not None
        probe_port = port(probe.at("port"), probe.get("port", required=True))
        if kind == s.HTTP:
            path = s.http_path(probe.at("path"), probe.text("path", "/"))
        probe.finish()
    check = s.HealthCheck(
        kind=kind,
        port=probe_port,
        path=path,
        command=command,
        interval=duration_seconds(table.at("interval"), table.get("interval", 30.0)),
        timeout=duration_seconds(table.at("timeout"), table.get("timeout", 30.0)),
        retries=table.integer("retries", 3, minimum=1, maximum=100),
        start_period=duration_seconds(table.at("start_period"), table.get("start_period", 0.0)),
        field=f"{table.path}.{kind}",
    )
    table.finish()
    return check


def _update(doc: Fields, key: str) -> UpdatePolicy | None:
    table = doc.mapping(key)
    if table is None:
        return None
    default = UpdatePolicy()
    policy = UpdatePolicy(
        parallelism=table.get("parallelism", default.parallelism),
        delay=duration_seconds(table.at("delay"), table.get("delay", default.delay)),
        max_surge=table.get("max_surge"),
        max_unavailable=table.get("max_unavailable"),
        order=table.get("order", default.order),
        monitor=duration_seconds(table.at("monitor"), table.get("monitor", default.monitor)),
        failure_action=table.get("failure_action", default.failure_action),
        max_failure_ratio=table.get("max_failure_ratio", default.max_failure_ratio),
    )
    table.finish()
    return validate_update_policy(policy, table.path)


def _labels(doc: Fields) -> tuple[tuple[str, str], ...]:
    table = doc.mapping("labels")
    if table is None:
        return ()
    return tuple(sorted((key, scalar_text(table.at(key), value)) for key, value in table.data.items()))
