"""Compose / stack (v3) files, read as `docker stack deploy` reads them, into ServiceSpecs.

Keys picoord maps are read into the spec; every other key Compose defines is declared below
as a warning (ignoring it does not change what the container runs, or Swarm ignores it
too) or an error (ignoring it would change what runs: privileges, devices, namespaces,
extra files). A key Compose does not define is an error, except `x-` extensions. The
mapping is tabled in docs/workloads.md.

Docker's meanings apply: `512M` is 512 MiB; `entrypoint` replaces the image's
ENTRYPOINT (picoord's `command`) and `command` its CMD (picoord's `args`); a string
command is split into words like a shell would, without running one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from typing import Any

from picoord.common.names import normalise_arch
from picoord.common.validation import (
    FieldError,
    absolute_path,
    env_name,
    image_reference,
    ip_address,
    port,
    volume_name,
)
from picoord.coordinator.placement.constraints import (
    ARCH,
    EQUAL,
    Spread,
    make_constraint,
    parse_constraint,
    parse_spread,
)
from picoord.coordinator.rollout.policy import UpdatePolicy, validate_update_policy
from picoord.coordinator.workloads import networks
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.fields import Fields, SpecWarning, argv, as_list, mapping, scalar_text
from picoord.coordinator.workloads.importers.native import device_request
from picoord.coordinator.workloads.quantities import DOCKER, cpu_millicores, duration_seconds, memory_bytes

EXTENSION = "x-picoord"  # picoord's own top-level settings of a file (StackSettings)
NO_ADDRESS = "none"  # `--address none`: the stack gives its virtual address up
WARN = "warn"
ERROR = "error"
MAX_PORT_RANGE = 100

_LIMITS = "sets a container limit picoord does not apply; use deploy.resources"
_PRIVILEGE = "changes the container's privileges or isolation, which picoord does not do"

# Every other service key Compose defines, and what picoord does with it.
SERVICE_KEYS: dict[str, tuple[str, str]] = {
    "annotations": (WARN, "container annotations are not set"),
    "attach": (WARN, "picoord does not attach to container output"),
    "build": (
        WARN,
        "picoord does not build images; the image is pulled from its registry (as docker stack deploy does)",
    ),
    "container_name": (WARN, "picoord names containers itself (service.replica), as Swarm does"),
    "credential_spec": (WARN, "a Windows-only setting"),
    "develop": (WARN, "a docker compose watch setting"),
    "dns": (WARN, "containers use the node's resolver configuration"),
    "dns_opt": (WARN, "containers use the node's resolver configuration"),
    "dns_search": (WARN, "containers use the node's resolver configuration"),
    "domainname": (WARN, "the container's domain name is not set"),
    "external_links": (WARN, "services reach each other by name; links are not needed"),
    "hostname": (WARN, "the container's host name is its container id, as in Swarm"),
    "isolation": (WARN, "a Windows-only setting"),
    "links": (WARN, "services reach each other by name; links are not needed"),
    "logging": (WARN, "containers log through dockerd's default log driver"),
    "mac_address": (WARN, "the container's MAC address is not set"),
    "profiles": (WARN, "every service of the file is deployed, as docker stack deploy does"),
    "pull_policy": (WARN, "picoord pulls an image when the node lacks it"),
    "stdin_open": (WARN, "containers run without stdin"),
    "stop_signal": (WARN, "picoord stops containers with SIGTERM, then SIGKILL after stop_grace_period"),
    "tty": (WARN, "containers run without a terminal"),
    "blkio_config": (ERROR, _LIMITS),
    "cgroup": (ERROR, _PRIVILEGE),
    "cgroup_parent": (ERROR, _PRIVILEGE),
    "configs": (ERROR, "configs (files placed in the container) are not supported yet"),
    "cap_add": (ERROR, _PRIVILEGE),
    "cap_drop": (ERROR, _PRIVILEGE),
    "cpu_count": (ERROR, _LIMITS),
    "cpu_percent": (ERROR, _LIMITS),
    "cpu_period": (ERROR, _LIMITS),
    "cpu_quota": (ERROR, _LIMITS),
    "cpu_rt_period": (ERROR, _LIMITS),
    "cpu_rt_runtime": (ERROR, _LIMITS),
    "cpu_shares": (ERROR, _LIMITS),
    "cpus": (ERROR, "use deploy.resources.limits.cpus"),
    "cpuset": (ERROR, _LIMITS),
    "device_cgroup_rules": (ERROR, _PRIVILEGE),
    "devices": (
        ERROR,
        "host devices in containers are not supported (GPUs: deploy.resources.reservations.devices)",
    ),
    "driver_opts": (ERROR, "network driver options are not supported"),
    "env_file": (ERROR, "picoord does not read files from the deploying machine; put values in environment"),
    "extends": (ERROR, "extends reads other files; give the service in full"),
    "extra_hosts": (ERROR, "extra /etc/hosts entries are not supported; services reach each other by name"),
    "gpus": (ERROR, "use deploy.resources.reservations.devices"),
    "group_add": (ERROR, _PRIVILEGE),
    "init": (ERROR, "an init process in the container is not supported"),
    "ipc": (ERROR, _PRIVILEGE),
    "label_file": (ERROR, "picoord does not read files from the deploying machine; put labels in labels"),
    "mem_limit": (ERROR, "use deploy.resources.limits.memory"),
    "mem_reservation": (ERROR, "use deploy.resources.reservations.memory"),
    "mem_swappiness": (ERROR, _LIMITS),
    "memswap_limit": (ERROR, _LIMITS),
    "network_mode": (ERROR, _PRIVILEGE),
    "oom_kill_disable": (ERROR, _LIMITS),
    "oom_score_adj": (ERROR, _LIMITS),
    "pid": (ERROR, _PRIVILEGE),
    "pids_limit": (ERROR, _LIMITS),
    "post_start": (ERROR, "lifecycle hooks are not supported"),
    "pre_stop": (ERROR, "lifecycle hooks are not supported"),
    "privileged": (ERROR, _PRIVILEGE),
    "read_only": (ERROR, "a read-only root file system is not supported yet"),
    "runtime": (ERROR, "containers run with dockerd's default runtime"),
    "secrets": (
        ERROR,
        "compose secrets (files under /run/secrets) are not supported; use a picoord Service's secrets",
    ),
    "security_opt": (ERROR, _PRIVILEGE),
    "shm_size": (ERROR, _LIMITS),
    "storage_opt": (ERROR, _LIMITS),
    "sysctls": (ERROR, _PRIVILEGE),
    "ulimits": (ERROR, _LIMITS),
    "use_api_socket": (ERROR, _PRIVILEGE),
    "userns_mode": (ERROR, _PRIVILEGE),
    "uts": (ERROR, _PRIVILEGE),
    "volumes_from": (ERROR, "sharing another container's volumes is not supported"),
}
DEPLOY_KEYS: dict[str, tuple[str, str]] = {
    "endpoint_mode": (WARN, "no virtual IP: a service name resolves to the address of each replica (dnsrr)"),
}
TOP_LEVEL_KEYS: dict[str, tuple[str, str]] = {
    "name": (WARN, "picoord names services by their keys under services:"),
    "secrets": (
        ERROR,
        "compose secrets are not supported; use `coordctl secret create` and a picoord Service",
    ),
    "configs": (ERROR, "configs are not supported yet"),
}
_RESTART_CONDITIONS = {"none": s.RESTART_NONE, "on-failure": s.RESTART_ON_FAILURE, "any": s.RESTART_ALWAYS}
_COMPOSE_RESTART = {
    "no": s.RESTART_NONE,
    "always": s.RESTART_ALWAYS,
    "on-failure": s.RESTART_ON_FAILURE,
    "unless-stopped": s.RESTART_ALWAYS,
}
HEALTHCHECK_KEYS = ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable")
_VARIABLE = re.compile(r"\$(?!\$)")
_SHORT_PORT = re.compile(
    r"^(?:(?P<published>\d+(?:-\d+)?):)?(?P<target>\d+(?:-\d+)?)(?:/(?P<protocol>\w+))?$"
)


def is_compose(document: Any) -> bool:
    return isinstance(document, dict) and "services" in document and "kind" not in document


def read_compose(raw: dict[str, Any], warnings: list[SpecWarning]) -> list[s.ServiceSpec]:
    """Every service of one Compose/stack document; FieldError naming `services.NAME.field`."""
    raw = _unescaped("", raw)
    top = mapping("", raw, warnings)
    version = top.get("version")
    if version is not None and not str(version).startswith("3"):
        warnings.append(SpecWarning("version", f"{version!r}: read as a version 3 (stack) file"))
    top.apply_table(TOP_LEVEL_KEYS)
    volumes = _declared_volumes(top.mapping("volumes"))
    declared = _networks(top.mapping("networks"))
    top.used.add(EXTENSION)
    settings = stack_settings(raw)
    services = top.mapping("services")
    if services is None or not services.data:
        raise FieldError("services", "names no service")
    specs = [_service(services, name, volumes, declared) for name in services.data]
    names = [spec.name for spec in specs]
    specs = [_with_references(spec, names) for spec in specs]
    s.check_references(specs, {spec.name: f"services.{spec.name}.depends_on" for spec in specs})
    address = settings.address
    if address:
        if not any(s.publishes(spec) for spec in specs):
            raise FieldError(
                f"{EXTENSION}.address",
                "no service of the file publishes a port, so a virtual address would lead nowhere",
            )
        specs = [
            replace(spec, address=address, address_field=f"{EXTENSION}.address")
            if s.publishes(spec)
            else spec
            for spec in specs
        ]
    top.finish(extensions_warn=True)
    return specs


def with_stack_address(text: str, address: str) -> str:
    """A Compose file's text with `x-picoord.address` set (`stack deploy --address`): the
    same checks then apply as to an address written in the file. A file that already names
    another address is refused."""
    import yaml

    document = yaml.safe_load(text)
    if not is_compose(document):
        raise FieldError(
            "--address", "is for Compose/stack files; a Kubernetes Service sets spec.loadBalancerIP"
        )
    extension = document.setdefault(EXTENSION, {})
    if not isinstance(extension, dict):
        raise FieldError(EXTENSION, "must be a mapping")
    written = extension.get("address")
    if written is not None and str(written) != address:
        raise FieldError(f"{EXTENSION}.address", f"the file says {written}, --address says {address}")
    extension["address"] = address
    return yaml.safe_dump(document, sort_keys=False)


def _with_references(spec: s.ServiceSpec, names: list[str]) -> s.ServiceSpec:
    return replace(spec, references=s.referenced_services(spec, names))


def _unescaped(path: str, value: Any) -> Any:
    """Compose substitutes ${VAR} from the deployer's shell, which picoord does not read:
    a variable is an error, and `$$` (Compose's escape) is a literal `$`."""
    if isinstance(value, str):
        if _VARIABLE.search(value.replace("$$", "")):
            raise FieldError(
                path or "(top)",
                f"{value!r} uses variable substitution, which needs the deployer's environment; "
                "write the value (or `$$` for a literal $)",
            )
        return value.replace("$$", "$")
    if isinstance(value, dict):
        return {key: _unescaped(f"{path}.{key}" if path else str(key), item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unescaped(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return value


def _declared_volumes(table: Fields | None) -> set[str]:
    if table is None:
        return set()
    for name in table.data:
        volume_name(table.at(name), name)
        item = table.mapping(name)
        if item is None:
            continue
        driver = item.text("driver", "local")
        if driver != "local":
            raise FieldError(
                item.at("driver"), f"volume driver {driver!r}: picoord creates local volumes only"
            )
        item.refuse(
            "driver_opts", "volume driver options (e.g. an NFS mount) are not supported; mount it on the node"
        )
        item.refuse("name", "a volume name other than its key is not supported")
        item.warn("external", "picoord creates the volume on the node if it is missing")
        item.warn("labels", "volume labels are not set")
        item.finish(extensions_warn=True)
    return set(table.data)


@dataclass(frozen=True)
class StackSettings:
    """A file's `x-picoord` settings (docs/networking.md, docs/virtual-addresses.md)."""

    network_mode: str = networks.OVERLAY  # or today's published-ports mode
    # the stack's LoadBalancer virtual address, on every service that publishes a port; None
    # when the file says nothing (a re-deploy keeps the stack's address), '' for `none`
    address: str | None = None


def stack_settings(raw: dict[str, Any]) -> StackSettings:
    """The file's `x-picoord: {network_mode: ..., address: ...}`, each checked."""
    extension = raw.get(EXTENSION)
    if extension is None:
        return StackSettings()
    table = mapping(EXTENSION, extension, [])
    mode = table.text("network_mode", networks.OVERLAY, choices=networks.NETWORK_MODES)
    address = None
    value = table.get("address")
    if value is not None:
        text = scalar_text(table.at("address"), value).strip()
        address = "" if text == NO_ADDRESS else ip_address(table.at("address"), text)
    table.finish()
    return StackSettings(mode, address)


def _networks(table: Fields | None) -> dict[str, bool]:
    """The file's networks: name -> encrypted. Each becomes a Swarm attachable overlay
    network `<stack>_<name>` (the `default` one too, when a service names none)."""
    declared: dict[str, bool] = {networks.DEFAULT_NETWORK: False}
    if table is None:
        return declared
    for name in table.data:
        s.service_name(table.at(name), name)
        item = table.mapping(name)
        if item is None:
            declared[name] = False
            continue
        driver = item.text("driver", "overlay")
        if driver != "overlay":
            raise FieldError(
                item.at("driver"),
                f"driver {driver!r}: a stack's networks are Swarm overlay networks (driver: overlay)",
            )
        item.refuse(
            "internal", "an internal network (no way out) is not supported; removing it would open one", False
        )
        item.refuse(
            "external", "picoord creates the networks of its stacks; an external one is not supported", False
        )
        item.refuse("name", "a network is named <stack>_<key>, as docker stack deploy names it")
        encrypted = item.boolean("encrypted", False)  # picoord's spelling of the option
        options = item.mapping("driver_opts")
        if options is not None:
            for key, value in options.data.items():
                if key != "encrypted":
                    raise FieldError(options.at(key), "the only network driver option supported is encrypted")
                if value not in ("", True, "true", None):
                    raise FieldError(options.at(key), f'{value!r}: give encrypted: "" (Docker\'s spelling)')
                options.used.add(key)
                encrypted = True
        item.warn("attachable", "picoord's networks are always attachable (agents attach their containers)")
        item.warn("ipam", "Swarm chooses the network's subnet")
        item.warn("labels", "picoord labels the network as its own")
        item.warn("enable_ipv6", "IPv6 on overlay networks is not set")
        item.finish(extensions_warn=True)
        declared[name] = encrypted
    return declared


def _service_networks(doc: Fields, declared: dict[str, bool]) -> tuple[s.NetworkAttachment, ...]:
    """The networks a service joins (the file's `default` one when it names none), each with
    the aliases it gives there."""
    raw = doc.get("networks")
    path = doc.at("networks")
    if raw is None:
        return (s.NetworkAttachment(networks.DEFAULT_NETWORK, declared[networks.DEFAULT_NETWORK]),)
    if isinstance(raw, list):
        entries: dict[str, Any] = {}
        for index, name in enumerate(as_list(path, raw)):
            if not isinstance(name, str):
                raise FieldError(f"{path}[{index}]", "must be a network name")
            entries[name] = None
    else:
        entries = mapping(path, raw, doc.warnings).data
    attached = []
    for name, value in entries.items():
        where = f"{path}.{name}"
        if name not in declared:
            raise FieldError(where, f"network {name!r} is not declared under the top-level networks:")
        aliases: tuple[str, ...] = ()
        if value is not None:
            item = mapping(where, value, doc.warnings)
            aliases = tuple(
                s.service_name(f"{item.at('aliases')}[{i}]", a) for i, a in enumerate(item.items("aliases"))
            )
            for key in (
                "ipv4_address",
                "ipv6_address",
                "link_local_ips",
                "mac_address",
                "priority",
                "driver_opts",
            ):
                item.warn(key, "Swarm chooses the replica's address on the network")
            item.finish(extensions_warn=True)
        attached.append(s.NetworkAttachment(name, declared[name], aliases))
    if not attached:
        raise FieldError(path, "names no network")
    return tuple(attached)


def _words(path: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as error:
            raise FieldError(path, f"cannot split into words: {error}") from None
    return argv(path, value)


def _service(services: Fields, name: str, volumes: set[str], declared: dict[str, bool]) -> s.ServiceSpec:
    s.service_name(services.at(name), name)
    doc = services.mapping(name)
    if doc is None:
        raise FieldError(services.at(name), "must be a mapping")
    doc.apply_table(SERVICE_KEYS)
    deploy = doc.mapping("deploy") or Fields(doc.at("deploy"), {}, doc.warnings)
    deploy.apply_table(DEPLOY_KEYS)
    mode = deploy.text("mode", s.REPLICATED)
    if mode not in s.MODES:
        raise FieldError(
            deploy.at("mode"),
            f"{mode!r} is not supported; picoord runs replicated and global services (not jobs)",
        )
    replicas = _replicas(doc, deploy, mode)
    # A published port is answered on every node, as Swarm's routing mesh (docs/service-ports.md).
    ports = tuple(_ports(doc))
    health = _healthcheck(doc.mapping("healthcheck"))
    placement_fields = deploy.mapping("placement")
    constraints, spread = _placement(placement_fields)
    platform = doc.get("platform")
    if platform is not None:
        constraints = (*constraints, _platform(doc.at("platform"), platform))
    spec = s.ServiceSpec(
        name=name,
        image=image_reference(doc.at("image"), doc.get("image", required=True)),
        mode=mode,
        replicas=replicas,
        command=_words(doc.at("entrypoint"), doc.get("entrypoint")) if doc.has("entrypoint") else None,
        args=_words(doc.at("command"), doc.get("command")) if doc.has("command") else None,
        ports=ports,
        env=_environment(doc),
        volumes=tuple(_volumes(doc, volumes, mode, replicas)),
        resources=_resources(deploy.mapping("resources"), doc),
        restart=_restart(deploy.mapping("restart_policy"), doc),
        placement=s.Placement(constraints=constraints, spread=spread),
        health=health,
        update=_update(deploy, "update_config") or UpdatePolicy(),
        rollback=_update(deploy, "rollback_config"),
        depends_on=_depends_on(doc),
        networks=_service_networks(doc, declared),
        labels=_labels(doc, deploy),
        user=s.user_spec(doc.at("user"), doc.text("user", "")),
        working_dir=s.working_dir(doc.at("working_dir"), doc.text("working_dir", "")),
        stop_grace_period=duration_seconds(doc.at("stop_grace_period"), doc.get("stop_grace_period", 10.0)),
        origin=doc.path,
    )
    deploy.finish()
    doc.finish(extensions_warn=True)
    paths = {
        "replicas": deploy.at("replicas"),
        "resources.memory": f"{deploy.at('resources')}.reservations.memory",
        "resources.cpu": f"{deploy.at('resources')}.reservations.cpus",
        "env": doc.at("environment"),
        "ports": doc.at("ports"),
    }
    return s.check_service(spec, paths)


def _replicas(doc: Fields, deploy: Fields, mode: str) -> int:
    if mode == s.GLOBAL:
        deploy.refuse("replicas", "a global service runs one replica per matching node; drop replicas")
        doc.refuse("scale", "a global service runs one replica per matching node; drop scale")
        return 0
    if deploy.has("replicas"):
        doc.warn("scale", "deploy.replicas is used")
        key, where = "replicas", deploy
    else:
        key, where = "scale", doc
    value = where.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= s.MAX_REPLICAS:
        raise FieldError(where.at(key), f"{value!r} is not a replica count (0-{s.MAX_REPLICAS})")
    return value


def _environment(doc: Fields) -> tuple[s.EnvVar, ...]:
    raw = doc.get("environment")
    if raw is None:
        return ()
    path = doc.at("environment")
    pairs: list[tuple[str, str, Any]] = []
    if isinstance(raw, dict):
        pairs = [(f"{path}.{key}", str(key), value) for key, value in raw.items()]
    else:
        for index, item in enumerate(as_list(path, raw)):
            if not isinstance(item, str):
                raise FieldError(f"{path}[{index}]", f"{item!r} is not NAME=VALUE")
            key, sep, value = item.partition("=")
            pairs.append((f"{path}[{index}]", key, value if sep else None))
    env = []
    for where, key, value in pairs:
        env_name(where, key)
        if value is None:
            raise FieldError(
                where,
                f"{key} has no value: Compose takes it from the deployer's shell; picoord does not",
            )
        env.append(s.EnvVar(key, scalar_text(where, value), field=where))
    return tuple(env)


def _port_numbers(path: str, text: str) -> list[int]:
    low, _, high = text.partition("-")
    first = port(path, int(low))
    last = port(path, int(high)) if high else first
    if last < first or last - first >= MAX_PORT_RANGE:
        raise FieldError(path, f"{text!r} is not a port range of at most {MAX_PORT_RANGE} ports")
    return list(range(first, last + 1))


def _ports(doc: Fields) -> list[s.PortMapping]:
    result: list[s.PortMapping] = []
    for index, item in enumerate(doc.items("ports")):
        path = f"{doc.at('ports')}[{index}]"
        if isinstance(item, int) and not isinstance(item, bool):
            result.append(s.PortMapping(target=port(path, item)))
        elif isinstance(item, str):
            match = _SHORT_PORT.match(item.strip())
            if not match:
                raise FieldError(
                    path,
                    f"{item!r} is not [PUBLISHED:]TARGET[/PROTOCOL] (binding a host address: unsupported)",
                )
            protocol = match.group("protocol") or "tcp"
            if protocol not in s.PROTOCOLS:
                raise FieldError(path, f"protocol {protocol!r} is not one of tcp, udp")
            targets = _port_numbers(path, match.group("target"))
            published = _port_numbers(path, match.group("published")) if match.group("published") else []
            if published and len(published) != len(targets):
                raise FieldError(path, f"{item!r} maps ranges of different lengths")
            for offset, target in enumerate(targets):
                result.append(s.PortMapping(target, published[offset] if published else 0, protocol))
        else:
            long = mapping(path, item, doc.warnings)
            published_raw = long.get("published")
            published = 0
            if published_raw is not None:
                text = str(published_raw)
                if not text.isdigit():
                    raise FieldError(
                        long.at("published"), f"{published_raw!r} is not a port (ranges: short syntax)"
                    )
                published = port(long.at("published"), int(text))
            long.text("mode", "ingress", choices=("ingress", "host"))
            long.refuse("host_ip", "binding one host address is not supported")
            long.warn("name", "port names are not used")
            long.warn("app_protocol", "port application protocols are not used")
            result.append(
                s.PortMapping(
                    target=port(long.at("target"), long.get("target", required=True)),
                    published=published,
                    protocol=long.text("protocol", "tcp", choices=s.PROTOCOLS),
                )
            )
            long.finish(extensions_warn=True)
    for index, item in enumerate(doc.items("expose")):
        path = f"{doc.at('expose')}[{index}]"
        number, _, protocol = str(item).partition("/")
        if not number.isdigit():
            raise FieldError(path, f"{item!r} is not a port")
        entry = s.PortMapping(port(path, int(number)), 0, protocol or "tcp")
        if not any(p.target == entry.target and p.protocol == entry.protocol for p in result):
            result.append(entry)
    return result


def _volumes(doc: Fields, declared: set[str], mode: str, replicas: int) -> list[s.VolumeMount]:
    result = []
    for index, item in enumerate(doc.items("volumes")):
        path = f"{doc.at('volumes')}[{index}]"
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                raise FieldError(path, f"{item!r} is an anonymous volume; give it a name (NAME:{item})")
            if len(parts) > 3:
                raise FieldError(path, f"{item!r} is not SOURCE:TARGET[:MODE]")
            source, target = parts[0], parts[1]
            options = parts[2].split(",") if len(parts) == 3 else []
            unknown = [option for option in options if option not in ("ro", "rw", "z", "Z", "nocopy")]
            if unknown:
                raise FieldError(path, f"volume option {unknown[0]!r} is not supported")
            if {"z", "Z", "nocopy"} & set(options):
                doc.warnings.append(SpecWarning(path, "SELinux relabelling and nocopy are not applied"))
            kind = s.BIND if source.startswith(("/", ".", "~")) else s.VOLUME
            mount = _mount(path, kind, source, target, "ro" in options, declared)
        else:
            long = mapping(path, item, doc.warnings)
            kind = long.text("type", choices=s.VOLUME_TYPES)
            mount = _mount(
                path,
                kind,
                long.text("source", ""),
                long.text("target"),
                long.boolean("read_only", False),
                declared,
            )
            long.warn("consistency", "a Docker Desktop setting")
            for key in ("bind", "volume", "tmpfs"):
                sub = long.mapping(key)
                if sub is None:
                    continue
                sub.warn("propagation", "mount propagation is not set")
                sub.warn("create_host_path", "picoord does not create host paths")
                sub.warn("nocopy", "the volume is filled from the image as Docker does by default")
                sub.warn("selinux", "SELinux relabelling is not applied")
                sub.refuse("subpath", "volume subpaths are not supported")
                sub.refuse("size", "tmpfs sizes are not supported")
                sub.refuse("mode", "tmpfs modes are not supported")
                sub.finish(extensions_warn=True)
            long.finish(extensions_warn=True)
        if mount.type == s.VOLUME and (mode == s.GLOBAL or replicas > 1):
            doc.warnings.append(
                SpecWarning(
                    path, f"named volume {mount.source!r} is local to each node: replicas do not share it"
                )
            )
        result.append(mount)
    tmpfs = doc.get("tmpfs")
    tmpfs_paths = [tmpfs] if isinstance(tmpfs, str) else as_list(doc.at("tmpfs"), tmpfs) if tmpfs else []
    for index, item in enumerate(tmpfs_paths):
        path = doc.at("tmpfs") if isinstance(tmpfs, str) else f"{doc.at('tmpfs')}[{index}]"
        result.append(s.VolumeMount(s.TMPFS, absolute_path(path, str(item))))
    return result


def _mount(
    path: str, kind: str, source: str, target: str, read_only: bool, declared: set[str]
) -> s.VolumeMount:
    target = absolute_path(f"{path}.target", target)
    if kind == s.BIND:
        if not source.startswith("/"):
            raise FieldError(
                path,
                f"{source!r} is relative to the deploying machine; bind mounts need an absolute host path",
            )
        source = s.host_path(f"{path}.source", source)
    elif kind == s.VOLUME:
        volume_name(f"{path}.source", source)
        if source not in declared:
            raise FieldError(path, f"volume {source!r} is not declared under the top-level volumes:")
    elif source:
        raise FieldError(f"{path}.source", "a tmpfs has no source")
    return s.VolumeMount(kind, target, source, read_only)


def _resources(table: Fields | None, doc: Fields) -> s.Resources:
    if table is None:
        return s.Resources()
    values: dict[str, int] = {}
    devices: list[s.DeviceRequest] = []
    for part, suffix in (("limits", "limit"), ("reservations", "request")):
        section = table.mapping(part)
        if section is None:
            continue
        if section.has("memory"):
            values[f"memory_{suffix}"] = memory_bytes(section.at("memory"), section.get("memory"), DOCKER)
        if section.has("cpus"):
            values[f"cpu_{suffix}"] = cpu_millicores(section.at("cpus"), section.get("cpus"))
        section.used.update({"memory", "cpus"})
        if part == "limits":
            section.refuse("pids", _LIMITS)
        else:
            section.refuse("generic_resources", "generic resources are not supported; GPUs: devices")
            for index, raw in enumerate(section.items("devices")):
                item = mapping(f"{section.at('devices')}[{index}]", raw, doc.warnings)
                item.warn("options", "driver options are not passed")
                devices.append(device_request(item))
                item.finish(extensions_warn=True)
        section.finish(extensions_warn=True)
    table.finish(extensions_warn=True)
    return s.Resources(devices=tuple(devices), **values)


def _restart(table: Fields | None, doc: Fields) -> s.RestartPolicy:
    if table is None:
        restart = doc.get("restart")
        if restart is None:
            return s.RestartPolicy()
        if restart not in _COMPOSE_RESTART and not str(restart).startswith("on-failure:"):
            raise FieldError(
                doc.at("restart"), f"{restart!r} is not no, always, on-failure[:N] or unless-stopped"
            )
        if restart in _COMPOSE_RESTART:
            return s.RestartPolicy(condition=_COMPOSE_RESTART[restart])
        attempts = str(restart).partition(":")[2]
        if not attempts.isdigit():
            raise FieldError(
                doc.at("restart"), f"{restart!r}: the attempts after on-failure: must be a number"
            )
        return s.RestartPolicy(condition=s.RESTART_ON_FAILURE, max_attempts=int(attempts))
    doc.warn("restart", "deploy.restart_policy is used (as Swarm does)")
    condition = table.text("condition", "any", choices=tuple(_RESTART_CONDITIONS))
    policy = s.RestartPolicy(
        condition=_RESTART_CONDITIONS[condition],
        max_attempts=table.integer("max_attempts", 0),
        delay=duration_seconds(table.at("delay"), table.get("delay", 5.0)),
        window=duration_seconds(table.at("window"), table.get("window", 0.0)),
    )
    table.finish(extensions_warn=True)
    return policy


def _placement(table: Fields | None) -> tuple[tuple[Any, ...], Spread]:
    if table is None:
        return (), Spread()
    constraints = table.each("constraints", parse_constraint)
    over_label = ""
    for index, raw in enumerate(table.items("preferences")):
        item = mapping(f"{table.at('preferences')}[{index}]", raw, table.warnings)
        label = parse_spread(item.at("spread"), item.get("spread", required=True))
        if over_label:
            table.warnings.append(
                SpecWarning(item.at("spread"), f"only the first spread ({over_label}) is used")
            )
        else:
            over_label = label
        item.finish(extensions_warn=True)
    spread = Spread(max_per_node=table.integer("max_replicas_per_node", 0), over_label=over_label)
    table.finish(extensions_warn=True)
    return constraints, spread


def _platform(path: str, value: Any) -> Any:
    """`linux/arm64` -> node.arch == arm64 (the node must run that architecture)."""
    if not isinstance(value, str) or value.count("/") not in (1, 2) or not value.startswith("linux/"):
        raise FieldError(path, f"{value!r} is not linux/ARCH[/VARIANT]")
    return make_constraint(path, ARCH, EQUAL, normalise_arch(value.split("/")[1]))


def _healthcheck(table: Fields | None) -> s.HealthCheck | None:
    if table is None:
        return None
    if table.boolean("disable", False):
        table.used.update(HEALTHCHECK_KEYS)
        table.finish(extensions_warn=True)
        return None
    test = table.get("test", required=True)
    path = table.at("test")
    if isinstance(test, str):
        command: tuple[str, ...] = ("/bin/sh", "-c", test)
    else:
        words = argv(path, test)
        if not words or words[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise FieldError(path, "must start with CMD, CMD-SHELL or NONE")
        if words[0] == "NONE":
            table.used.update(HEALTHCHECK_KEYS)
            table.finish(extensions_warn=True)
            return None
        if words[0] == "CMD-SHELL":
            if len(words) != 2:
                raise FieldError(path, "CMD-SHELL takes one command string")
            command = ("/bin/sh", "-c", words[1])  # needs a shell in the image, as in Docker
        else:
            command = words[1:]
        if not command:
            raise FieldError(path, "names no command")
    table.warn("start_interval", "probes during the start period use interval")
    check = s.HealthCheck(
        kind=s.EXEC,
        command=command,
        interval=duration_seconds(table.at("interval"), table.get("interval", 30.0)),
        timeout=duration_seconds(table.at("timeout"), table.get("timeout", 30.0)),
        retries=table.integer("retries", 3, minimum=1, maximum=100),
        start_period=duration_seconds(table.at("start_period"), table.get("start_period", 0.0)),
        field=table.path,
    )
    table.finish(extensions_warn=True)
    return check


def _update(deploy: Fields, key: str) -> UpdatePolicy | None:
    table = deploy.mapping(key)
    if table is None:
        return None
    default = UpdatePolicy()
    policy = UpdatePolicy(
        parallelism=table.get("parallelism", default.parallelism),
        delay=duration_seconds(table.at("delay"), table.get("delay", default.delay)),
        order=table.get("order", default.order),
        monitor=duration_seconds(table.at("monitor"), table.get("monitor", default.monitor)),
        failure_action=table.get("failure_action", default.failure_action),
        max_failure_ratio=table.get("max_failure_ratio", default.max_failure_ratio),
    )
    table.finish(extensions_warn=True)
    return validate_update_policy(policy, table.path)


def _depends_on(doc: Fields) -> tuple[str, ...]:
    raw = doc.get("depends_on")
    if raw is None:
        return ()
    path = doc.at("depends_on")
    if isinstance(raw, list):
        names = [s.service_name(f"{path}[{i}]", item) for i, item in enumerate(as_list(path, raw))]
    else:
        table = mapping(path, raw, doc.warnings)
        names = []
        for name in table.data:
            names.append(s.service_name(table.at(name), name))
            item = table.mapping(name)
            if item is None:
                continue
            condition = item.text(
                "condition",
                "service_started",
                choices=("service_started", "service_healthy", "service_completed_successfully"),
            )
            if condition == "service_completed_successfully":
                raise FieldError(item.at("condition"), "picoord runs services, not one-off jobs")
            if condition == "service_healthy":
                item.warnings.append(
                    SpecWarning(
                        item.at("condition"), "first placement waits for it to start; health is not awaited"
                    )
                )
            item.warn("restart", "dependants are not restarted with it")
            item.warn("required", "every dependency must be in the file")
            item.finish(extensions_warn=True)
    return tuple(names)


def _labels(doc: Fields, deploy: Fields) -> tuple[tuple[str, str], ...]:
    labels: dict[str, str] = {}
    for owner in (doc, deploy):
        raw = owner.get("labels")
        if raw is None:
            continue
        path = owner.at("labels")
        if isinstance(raw, list):
            for item in as_list(path, raw):
                key, _, value = str(item).partition("=")
                labels[key] = value
        else:
            for key, value in mapping(path, raw, doc.warnings).data.items():
                labels[key] = scalar_text(f"{path}.{key}", value)
    return tuple(sorted(labels.items()))
