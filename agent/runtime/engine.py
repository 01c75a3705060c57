"""The agent's container runtime: a thin shell over the Docker Engine API.

Decisions (what to create, what a container's labels mean, whether it is healthy) live in
model.py and health.py; this module turns them into Engine API calls, made by the
agent's one client (picoord.agent.docker_api, which replaced docker-py: with the SDK,
bench/agent_footprint.py measured the agent supervising two replicas at 61.6 MiB on Debian
12's packages; without it, 41.4 MiB, target 50). The pure parts (the create request,
registry credentials) are functions with table tests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from picoord.agent.docker_api import (
    CALL_ERRORS,
    CALL_TIMEOUT,
    NOT_FOUND,
    PULL_TIMEOUT,
    DockerAPI,
    DockerAPIError,
    explain,
)
from picoord.agent.runtime.health import probe_http, probe_tcp
from picoord.agent.runtime.model import (
    LABEL_MANAGED,
    ContainerSpec,
    create_arguments,
    host_config,
    replica_state,
)
from picoord.agent.runtime.model import ReplicaState as ReplicaState  # re-exported for callers
from picoord.common.images import registry_of

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


class RuntimeFailure(Exception):
    """dockerd refused or failed; the message says what and why, for the operator."""


# --- pure: the create request ------------------------------------------------------------------


def _port_bindings(bindings: Mapping[str, int | tuple[str, int]]) -> dict[str, list[dict[str, str]]]:
    """A port number binds on every address; (address, port) on that address only."""
    found = {}
    for port, binding in bindings.items():
        address, number = binding if isinstance(binding, tuple) else ("", binding)
        found[port] = [{"HostIp": address, "HostPort": str(number)}]
    return found


def _binds(binds: Mapping[str, Mapping[str, str]]) -> list[str]:
    return [f"{source}:{bind['bind']}:{bind['mode']}" for source, bind in binds.items()]


def _hosts(hosts: Mapping[str, str]) -> list[str]:
    return [f"{name}:{address}" for name, address in sorted(hosts.items())]


def _device_requests(requests: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    defaults = {"Driver": "", "Count": 0, "DeviceIDs": [], "Capabilities": [], "Options": {}}
    return [{**defaults, **request} for request in requests]


# model.host_config's keys (docker-py's create_host_config arguments) -> HostConfig field, value
HOST_CONFIG_FIELDS: dict[str, tuple[str, Any]] = {
    "port_bindings": ("PortBindings", _port_bindings),
    "binds": ("Binds", _binds),
    "restart_policy": ("RestartPolicy", dict),
    "extra_hosts": ("ExtraHosts", _hosts),
    "tmpfs": ("Tmpfs", dict),
    "mem_limit": ("Memory", int),
    "mem_reservation": ("MemoryReservation", int),
    "nano_cpus": ("NanoCpus", int),
    "device_requests": ("DeviceRequests", _device_requests),
    "network_mode": ("NetworkMode", str),
}


def wire_host_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """HostConfig as the API takes it, from model.host_config's docker-py-style keys. A key
    this module cannot spell is an error, never dropped: model.py says what a container gets."""
    host: dict[str, Any] = {"NetworkMode": "default"}
    for key, value in config.items():
        if key not in HOST_CONFIG_FIELDS:
            raise RuntimeFailure(f"host_config key {key!r} has no HostConfig field in engine.py")
        field, convert = HOST_CONFIG_FIELDS[key]
        host[field] = convert(value)
    return host


def create_request(spec: ContainerSpec) -> tuple[str, dict[str, Any]]:
    """The container's name and the body of POST /containers/create, as docker-py built them
    from model.create_arguments and model.host_config."""
    arguments = create_arguments(spec)
    body: dict[str, Any] = {
        "Image": arguments["image"],
        "Labels": dict(arguments["labels"]),
        "Env": [f"{name}={value}" for name, value in arguments["environment"].items()],
        "ExposedPorts": {f"{port}/{protocol}": {} for port, protocol in arguments["ports"]},
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": not arguments["detach"],
        "AttachStderr": not arguments["detach"],
        "NetworkDisabled": False,
        "HostConfig": wire_host_config(host_config(spec)),
    }
    if "entrypoint" in arguments:
        body["Entrypoint"] = list(arguments["entrypoint"])
    if "command" in arguments:
        body["Cmd"] = list(arguments["command"])
    if "stop_timeout" in arguments:
        body["StopTimeout"] = int(arguments["stop_timeout"])
    if "networking_config" in arguments:
        body["NetworkingConfig"] = arguments["networking_config"]
    return str(arguments["name"]), body


GATEWAY_BRIDGE = "docker_gwbridge"  # what a container on overlay networks only is reached by


def overlay_network_request(name: str, encrypted: bool) -> dict[str, Any]:
    """The body of POST /networks/create for a stack's network: a Swarm-wide overlay that
    standalone containers may join (attachable), labelled as picoord's; `encrypted` asks
    Docker for IPsec between nodes."""
    return {
        "Name": name,
        "CheckDuplicate": True,
        "Driver": "overlay",
        "Attachable": True,
        "Labels": {LABEL_MANAGED: "true"},
        "Options": {"encrypted": ""} if encrypted else {},
    }


# --- pure: registry credentials ----------------------------------------------------------------


image_registry = registry_of  # one definition: common/images.py


def pull_arguments(image: str) -> tuple[str, str]:
    """(fromImage, tag) of POST /images/create: a digest goes in `tag` (the Engine API takes
    "tag or digest"), a reference without either means :latest."""
    name, at, digest = image.partition("@")
    if at:
        return name, digest
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return repository, tag or "latest"


def _registry_host(key: str) -> str:
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def registry_auth(config: Mapping[str, Any], registry: str) -> dict[str, str] | None:
    """X-Registry-Auth's content for `registry` from a docker config.json's `auths` (what
    `docker login` writes without a credential helper), or None. Credential helpers are not
    run: such a registry is pulled without credentials and dockerd says it was refused."""
    auths = config.get("auths")
    if not isinstance(auths, Mapping):
        return None
    for key, entry in auths.items():
        if _registry_host(str(key)) != registry or not isinstance(entry, Mapping):
            continue
        if entry.get("identitytoken"):
            return {"identitytoken": str(entry["identitytoken"]), "serveraddress": str(key)}
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                username, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
        if username:
            return {"username": str(username), "password": str(password or ""), "serveraddress": str(key)}
    return None


def docker_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """root's docker client config ($DOCKER_CONFIG/config.json or ~/.docker/config.json),
    read at each pull as docker-py read it at start; {} when absent or unreadable."""
    directory = Path(environ["DOCKER_CONFIG"]) if environ.get("DOCKER_CONFIG") else Path.home() / ".docker"
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def pull_auth(image: str) -> str | None:
    """X-Registry-Auth's value for pulling `image` (root's docker config, read at each pull),
    or None when that config has no credentials for its registry."""
    auth = registry_auth(docker_config(), image_registry(image))
    if auth is None:
        return None
    return base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()


class Engine:
    """One dockerd, reached on its unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        try:
            self.client = DockerAPI(socket_path, timeout=CALL_TIMEOUT)
        except CALL_ERRORS as error:
            raise RuntimeFailure(
                f"cannot reach the Docker Engine at {socket_path}: {explain(error)}"
            ) from None

    def close(self) -> None:
        self.client.close()

    def pull(self, image: str, timeout: float = PULL_TIMEOUT) -> None:
        """Pull `image` unless it is present; a missing image or a registry that is down is a
        clear error naming both."""
        try:
            self.client.inspect_image(image)
            return
        except DockerAPIError as error:
            if error.status != NOT_FOUND:
                raise RuntimeFailure(f"cannot inspect {image}: {explain(error)}") from None
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot inspect {image}: {explain(error)}") from None
        repository, tag = pull_arguments(image)
        deadline = time.monotonic() + timeout
        try:
            for event in self.client.pull(repository, tag, timeout=timeout, auth=pull_auth(image)):
                if "error" in event:
                    raise RuntimeFailure(f"cannot pull {image}: {event['error']}")
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"cannot pull {image}: it took longer than {timeout:g} s")
        except RuntimeFailure:
            raise
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot pull {image}: {explain(error)}") from None

    def run(self, spec: ContainerSpec) -> str:
        """Create and start the replica's container; return its id. An existing container of
        the same replica and revision is reused (started if stopped), never duplicated."""
        for existing in self.replicas(all_states=True):
            if existing.replica == spec.replica and existing.revision == spec.revision:
                if existing.state != "running":
                    self._start(existing.container_id, spec)
                return existing.container_id
        name, body = create_request(spec)
        try:
            created = self.client.create_container(name, body)
        except CALL_ERRORS as error:
            # never echo the request: its environment holds secrets
            raise RuntimeFailure(
                f"cannot create {spec.container_name} from {spec.image}: {explain(error)}"
            ) from None
        for network in spec.networks[1:]:  # the Engine API of Docker 20.10 joins one at create
            try:
                self.client.connect_network(network.name, created["Id"], list(network.aliases))
            except CALL_ERRORS as error:
                self._discard(created["Id"])
                raise RuntimeFailure(
                    f"cannot attach {spec.container_name} to network {network.name}: {explain(error)}"
                ) from None
        self._start(created["Id"], spec)
        return str(created["Id"])

    def _discard(self, container_id: str) -> None:
        """Remove a container that could not be set up (so the next try creates it whole)."""
        with contextlib.suppress(CALL_ERRORS):
            self.client.remove_container(container_id, force=True)

    def _start(self, container_id: str, spec: ContainerSpec) -> None:
        try:
            self.client.start(container_id)
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot start {spec.container_name}: {explain(error)}") from None

    def stop(self, container_id: str, grace: float = 10.0, remove: bool = True) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Docker's stop), then remove."""
        try:
            self.client.stop(container_id, timeout=int(max(0, grace)))
            if remove:
                self.client.remove_container(container_id, force=True)
        except CALL_ERRORS as error:
            if "No such container" not in explain(error):
                raise RuntimeFailure(f"cannot stop {container_id[:12]}: {explain(error)}") from None

    def last_exit_code(self, container_id: str, window: float = 3600.0) -> int:
        """The exit code of the container's latest run that ended, from dockerd's events; 0
        when none is known. Once its restart policy has started it again, inspect shows the
        new run (exit code 0), but the "die" event of the run before still holds the code."""
        now = time.time()
        code = 0
        try:
            events = self.client.events(
                since=f"{now - window:.6f}",
                until=f"{now:.6f}",  # past events only: the call returns at once
                filters={"container": container_id, "event": "die"},
            )
            for event in events:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                if str(attributes.get("exitCode", "")).lstrip("-").isdigit():
                    code = int(attributes["exitCode"])
        except Exception:  # only a detail for the operator: never a reason to fail a tick
            return code
        return code

    def replicas(self, all_states: bool = True) -> list[ReplicaState]:
        """Every container of picoord's on this node, as it is now."""
        found = []
        mine = {"label": f"{LABEL_MANAGED}=true"}
        for summary in self.client.containers(all_states=all_states, filters=mine):
            try:
                inspect = self.client.inspect_container(summary["Id"])
            except DockerAPIError as error:
                if error.status == NOT_FOUND:  # removed between the list and now
                    continue
                raise
            state = replica_state(inspect)
            if state is not None:
                found.append(state)
        return sorted(found, key=lambda state: (state.service, state.replica, state.revision))

    def volumes(self) -> tuple[set[str], set[str]]:
        """The node's volume names: all of them, and those no container uses (dangling)."""
        try:
            every = {str(v.get("Name", "")) for v in self.client.volumes()}
            unused = {str(v.get("Name", "")) for v in self.client.volumes(filters={"dangling": ["true"]})}
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot list volumes: {explain(error)}") from None
        return every, unused

    def remove_volume(self, name: str) -> None:
        """Remove a named volume no container uses (dockerd refuses one in use: never forced)."""
        try:
            self.client.remove_volume(name)
        except CALL_ERRORS as error:
            if "no such volume" not in explain(error).lower():
                raise RuntimeFailure(f"cannot remove volume {name}: {explain(error)}") from None

    def address(self, container_id: str, overlay: bool = False) -> str:
        """The container's address on its bridge network (what the node's probes dial). A
        container on overlay networks (`overlay`) is reached from the node through
        docker_gwbridge, where Docker gives it an address too: its overlay address lives in
        the overlay's own namespace, out of the node's reach."""
        inspect = self.client.inspect_container(container_id)
        if overlay:
            try:
                bridge = self.client.inspect_network(GATEWAY_BRIDGE)
            except CALL_ERRORS:
                return ""
            endpoint = (bridge.get("Containers") or {}).get(str(inspect.get("Id", container_id))) or {}
            return str(endpoint.get("IPv4Address", "")).partition("/")[0]
        networks = inspect["NetworkSettings"]["Networks"] or {}
        for network in networks.values():
            if network.get("IPAddress"):
                return str(network["IPAddress"])
        return ""

    # --- a Swarm manager's overlay networks ------------------------------------------------------

    def overlay_networks(self) -> dict[str, bool]:
        """picoord's overlay networks on this node: name -> encrypted."""
        try:
            listed = self.client.networks(filters={"label": [f"{LABEL_MANAGED}=true"], "driver": ["overlay"]})
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot list networks: {explain(error)}") from None
        return {
            str(item.get("Name", "")): "encrypted" in (item.get("Options") or {})
            for item in listed
            if item.get("Name")
        }

    def create_network(self, name: str, encrypted: bool) -> None:
        try:
            self.client.create_network(overlay_network_request(name, encrypted))
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"cannot create network {name}: {explain(error)}") from None

    def remove_network(self, name: str) -> None:
        """Remove one of picoord's networks; dockerd refuses while anything uses it."""
        try:
            self.client.remove_network(name)
        except CALL_ERRORS as error:
            raise RuntimeFailure(f"network {name} not removed: {explain(error)}") from None

    def probe(self, container_id: str, spec: ContainerSpec) -> tuple[bool, str]:
        """Run the spec's health probe once against the running container."""
        check = spec.health
        if check.kind == "exec":
            return self._probe_exec(container_id, check.argv, check.timeout)
        address = self.address(container_id, overlay=bool(spec.networks))
        if not address:
            return False, "the container has no address (not running?)"
        if check.kind == "http":
            return probe_http(address, check.port, check.path, check.timeout)
        if check.kind == "tcp":
            return probe_tcp(address, check.port, check.timeout)
        return True, "no health check"

    def _probe_exec(self, container_id: str, argv: tuple[str, ...], timeout: float) -> tuple[bool, str]:
        started = time.monotonic()
        try:
            execution = self.client.exec_create(container_id, list(argv))
            output = self.client.exec_start(execution["Id"], timeout=timeout + 1)
            code = self.client.exec_inspect(execution["Id"]).get("ExitCode")
        except CALL_ERRORS as error:
            return False, f"exec {argv[0] if argv else ''}: {explain(error)}"
        if time.monotonic() - started > timeout:
            return False, f"exec took longer than {timeout:g} s"
        text = output.decode(errors="replace")[-256:]
        return code == 0, f"exit {code}: {text.strip()}"
