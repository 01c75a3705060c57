"""The agent's container runtime: a thin shell over the Docker Engine API.

Decisions (what to create, what a container's labels mean, whether it is healthy) live in
model.py and health.py; this module only talks to dockerd, with the standard library's
http.client over dockerd's unix socket. The docker SDK (python3-docker) costs Debian's
python about 19 MiB of RSS (requests, urllib3 and, through docker.credentials, setuptools'
pkg_resources): with it, bench/agent_footprint.py measured the agent supervising two
replicas at 61.6 MiB on Debian 12's packages; without it, 41.4 MiB (target 50). The
handful of calls below are the ones docker-py's APIClient made, with the same request
bodies; the pure parts (the create request, the exec stream, registry credentials) are
functions with table tests.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import socket
import struct
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from picoord.agent.runtime.health import probe_http, probe_tcp
from picoord.agent.runtime.model import (
    LABEL_MANAGED,
    ContainerSpec,
    create_arguments,
    host_config,
    replica_state,
)
from picoord.agent.runtime.model import ReplicaState as ReplicaState  # re-exported for callers


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over dockerd's unix socket: keep-alive and streamed answers (pulls, logs),
    which the bare GET of picoord.agent.hardware does not need."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


PULL_TIMEOUT = 300.0
CALL_TIMEOUT = 30.0
RESPONSE_LIMIT = 16 * 2**20  # bytes read from one reply (a container list, an inspect)
EXEC_OUTPUT_LIMIT = 2**20  # bytes of a health command's output kept (only its tail is reported)
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
STREAM_HEADER = struct.Struct(">BxxxL")  # stream type, 3 padding bytes, payload length


class RuntimeFailure(Exception):
    """dockerd refused or failed; the message says what and why, for the operator."""


class DockerAPIError(Exception):
    """dockerd answered with an error status; `explanation` is its message."""

    def __init__(self, status: int, explanation: str) -> None:
        super().__init__(f"{status}: {explanation}")
        self.status = status
        self.explanation = explanation


def _explain(error: BaseException) -> str:
    explanation = getattr(error, "explanation", None)
    return str(explanation or error) or type(error).__name__


# --- pure: the create request ------------------------------------------------------------------


def _port_bindings(bindings: Mapping[str, int]) -> dict[str, list[dict[str, str]]]:
    return {port: [{"HostIp": "", "HostPort": str(published)}] for port, published in bindings.items()}


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
    return str(arguments["name"]), body


# --- pure: the exec output stream ---------------------------------------------------------------


def demultiplex(stream: bytes) -> bytes:
    """The payloads of Docker's multiplexed stdout/stderr stream (8-byte frame headers), in
    order, as docker-py's exec_start gave them; a truncated last frame keeps what arrived."""
    output, offset = bytearray(), 0
    while offset + STREAM_HEADER.size <= len(stream):
        _, length = STREAM_HEADER.unpack_from(stream, offset)
        offset += STREAM_HEADER.size
        output += stream[offset : offset + length]
        offset += length
    return bytes(output)


# --- pure: registry credentials ----------------------------------------------------------------


def image_registry(image: str) -> str:
    """The registry an image reference pulls from (Docker's rule: a first component with a
    dot or a port, or `localhost`, names a registry; anything else is Docker Hub)."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


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


# --- the shell: dockerd's HTTP API --------------------------------------------------------------


class DockerAPI:
    """The few Docker Engine API calls the runtime makes, named as docker-py's APIClient named
    them. One connection per call: a few calls a second on a unix socket, no shared state."""

    def __init__(self, socket_path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.prefix = ""
        version = self._json("GET", "/version")
        api_version = str(version.get("ApiVersion", "")) if isinstance(version, dict) else ""
        if not api_version:
            raise DockerAPIError(0, f"GET /version gave no ApiVersion: {str(version)[:200]}")
        self.prefix = "/v" + api_version

    # plumbing
    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request; return the connection (the caller closes it) and a 2xx reply."""
        url = self.prefix + urllib.parse.quote(path, safe="/:")
        if query:
            url += "?" + urllib.parse.urlencode(query)
        connection = _UnixHTTPConnection(self.socket_path, self.timeout if timeout is None else timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, url, body=payload, headers={**sent, **(headers or {})})
            response = connection.getresponse()
            if response.status >= 400:
                raise DockerAPIError(response.status, _error_message(response.read(RESPONSE_LIMIT)))
        except BaseException:
            connection.close()
            raise
        return connection, response

    def _json(self, method: str, path: str, query: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        connection, response = self._open(method, path, query, body)
        try:
            data = response.read(RESPONSE_LIMIT)
        finally:
            connection.close()
        return json.loads(data) if data.strip() else None

    # images
    def inspect_image(self, image: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/images/{image}/json"))

    def pull(self, repository: str, tag: str, timeout: float = PULL_TIMEOUT) -> Iterator[dict[str, Any]]:
        """POST /images/create, yielding dockerd's progress messages as they come."""
        auth = registry_auth(docker_config(), image_registry(repository))
        headers = {}
        if auth is not None:  # never logged: it holds the registry password
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
        connection, response = self._open(
            "POST", "/images/create", {"fromImage": repository, "tag": tag}, timeout=timeout, headers=headers
        )
        yield from _json_lines(connection, response)

    # events
    def events(
        self, since: str, until: str, filters: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """GET /events for a past window (until given: dockerd answers and closes), one JSON
        object per line, as docker-py's events(decode=True) gave them."""
        query: dict[str, Any] = {"since": since, "until": until}
        if filters:
            query["filters"] = _wire_filters(filters)
        connection, response = self._open("GET", "/events", query)
        yield from _json_lines(connection, response)

    # containers
    def containers(
        self, all_states: bool = False, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"all": "1" if all_states else "0"}
        if filters:
            query["filters"] = _wire_filters(filters)
        return list(self._json("GET", "/containers/json", query) or [])

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/containers/{container_id}/json"))

    def create_container(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/containers/create", {"name": name}, body))

    def start(self, container_id: str) -> None:
        self._json("POST", f"/containers/{container_id}/start")

    def stop(self, container_id: str, timeout: int = 10) -> None:
        """SIGTERM, SIGKILL after `timeout` s; the HTTP call waits that long and a bit more."""
        connection, response = self._open(
            "POST", f"/containers/{container_id}/stop", {"t": str(timeout)}, timeout=timeout + self.timeout
        )
        try:
            response.read(RESPONSE_LIMIT)
        finally:
            connection.close()

    def remove_container(self, container_id: str, force: bool = False) -> None:
        self._json("DELETE", f"/containers/{container_id}", {"force": "1" if force else "0"})

    # exec
    def exec_create(self, container_id: str, cmd: list[str]) -> dict[str, Any]:
        body = {
            "User": "",
            "Privileged": False,
            "Tty": False,
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "Cmd": cmd,
        }
        return dict(self._json("POST", f"/containers/{container_id}/exec", body=body))

    def exec_start(self, exec_id: str, timeout: float | None = None) -> bytes:
        """Run it and return its stdout and stderr; dockerd streams them until the command ends."""
        connection, response = self._open(
            "POST", f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False}, timeout=timeout
        )
        try:
            return demultiplex(response.read(EXEC_OUTPUT_LIMIT))
        finally:
            connection.close()

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/exec/{exec_id}/json"))

    def close(self) -> None:
        """Nothing is held between calls; kept for the Engine's interface."""


def _wire_filters(filters: Mapping[str, Any]) -> str:
    """The Engine API's `filters` query value: every filter a list of values."""
    return json.dumps({key: value if isinstance(value, list) else [value] for key, value in filters.items()})


def _json_lines(
    connection: http.client.HTTPConnection, response: http.client.HTTPResponse
) -> Iterator[dict[str, Any]]:
    """dockerd's streamed answer (pull progress, events), one JSON object a line, each line
    bounded; the connection is closed when the stream ends or the reader stops early."""
    try:
        while line := response.readline(RESPONSE_LIMIT):
            if line.strip():
                event = json.loads(line)
                yield event if isinstance(event, dict) else {}
    finally:
        connection.close()


def _error_message(body: bytes) -> str:
    """dockerd's {"message": ...}, or the body's start when it is not JSON."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or body[:500].decode(errors="replace").strip() or "no message")


class Engine:
    """One dockerd, reached on its unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        try:
            self.client = DockerAPI(socket_path, timeout=CALL_TIMEOUT)
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            raise RuntimeFailure(
                f"cannot reach the Docker Engine at {socket_path}: {_explain(error)}"
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
            if error.status != http.client.NOT_FOUND:
                raise RuntimeFailure(f"cannot inspect {image}: {_explain(error)}") from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise RuntimeFailure(f"cannot inspect {image}: {_explain(error)}") from None
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        deadline = time.monotonic() + timeout
        try:
            for event in self.client.pull(repository, tag or "latest", timeout=timeout):
                if "error" in event:
                    raise RuntimeFailure(f"cannot pull {image}: {event['error']}")
                if time.monotonic() > deadline:
                    raise RuntimeFailure(f"cannot pull {image}: it took longer than {timeout:g} s")
        except RuntimeFailure:
            raise
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            raise RuntimeFailure(f"cannot pull {image}: {_explain(error)}") from None

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
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            # never echo the request: its environment holds secrets
            raise RuntimeFailure(
                f"cannot create {spec.container_name} from {spec.image}: {_explain(error)}"
            ) from None
        self._start(created["Id"], spec)
        return str(created["Id"])

    def _start(self, container_id: str, spec: ContainerSpec) -> None:
        try:
            self.client.start(container_id)
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            raise RuntimeFailure(f"cannot start {spec.container_name}: {_explain(error)}") from None

    def stop(self, container_id: str, grace: float = 10.0, remove: bool = True) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Docker's stop), then remove."""
        try:
            self.client.stop(container_id, timeout=int(max(0, grace)))
            if remove:
                self.client.remove_container(container_id, force=True)
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            if "No such container" not in _explain(error):
                raise RuntimeFailure(f"cannot stop {container_id[:12]}: {_explain(error)}") from None

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
                if error.status == http.client.NOT_FOUND:  # removed between the list and now
                    continue
                raise
            state = replica_state(inspect)
            if state is not None:
                found.append(state)
        return sorted(found, key=lambda state: (state.service, state.replica, state.revision))

    def address(self, container_id: str) -> str:
        """The container's address on its bridge network (what the node's probes dial)."""
        networks = self.client.inspect_container(container_id)["NetworkSettings"]["Networks"] or {}
        for network in networks.values():
            if network.get("IPAddress"):
                return str(network["IPAddress"])
        return ""

    def probe(self, container_id: str, spec: ContainerSpec) -> tuple[bool, str]:
        """Run the spec's health probe once against the running container."""
        check = spec.health
        if check.kind == "exec":
            return self._probe_exec(container_id, check.argv, check.timeout)
        address = self.address(container_id)
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
        except (OSError, http.client.HTTPException, ValueError, DockerAPIError) as error:
            return False, f"exec {argv[0] if argv else ''}: {_explain(error)}"
        if time.monotonic() - started > timeout:
            return False, f"exec took longer than {timeout:g} s"
        text = output.decode(errors="replace")[-256:]
        return code == 0, f"exit {code}: {text.strip()}"
