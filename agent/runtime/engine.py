"""The agent's container runtime: a thin shell over the Docker Engine API.

Decisions (what to create, what a container's labels mean, whether it is healthy) live in
model.py and health.py; this module only talks to dockerd. It uses docker-py's low-level
APIClient, with calls Debian 12's python3-docker 5.0.3 already has, imported on first use
(the SDK costs about 15 MiB, and a node without workloads must stay light).
"""

from __future__ import annotations

import time
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

PULL_TIMEOUT = 300.0
CALL_TIMEOUT = 30.0


class RuntimeFailure(Exception):
    """dockerd refused or failed; the message says what and why, for the operator."""


def _explain(error: BaseException) -> str:
    explanation = getattr(error, "explanation", None)
    return str(explanation or error) or type(error).__name__


class Engine:
    """One dockerd, reached on its unix socket."""

    def __init__(self, socket_path: str) -> None:
        try:
            import docker
        except ImportError as error:
            raise RuntimeFailure(
                f"the docker Python package (python3-docker) is not installed: {error}"
            ) from None
        self.socket_path = socket_path
        try:
            self.client: Any = docker.APIClient(
                base_url="unix://" + socket_path, version="auto", timeout=CALL_TIMEOUT
            )
        except docker.errors.DockerException as error:
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
        except Exception:  # docker.errors.ImageNotFound: pull it
            pass
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        self.client.timeout = timeout
        try:
            for event in self.client.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if "error" in event:
                    raise RuntimeFailure(f"cannot pull {image}: {event['error']}")
        except RuntimeFailure:
            raise
        except Exception as error:
            raise RuntimeFailure(f"cannot pull {image}: {_explain(error)}") from None
        finally:
            self.client.timeout = CALL_TIMEOUT

    def run(self, spec: ContainerSpec) -> str:
        """Create and start the replica's container; return its id. An existing container of
        the same replica and revision is reused (started if stopped), never duplicated."""
        for existing in self.replicas(all_states=True):
            if existing.replica == spec.replica and existing.revision == spec.revision:
                if existing.state != "running":
                    self._start(existing.container_id, spec)
                return existing.container_id
        try:
            created = self.client.create_container(
                host_config=self.client.create_host_config(**host_config(spec)), **create_arguments(spec)
            )
        except Exception as error:  # never echo the environment: it holds secrets
            raise RuntimeFailure(
                f"cannot create {spec.container_name} from {spec.image}: {_explain(error)}"
            ) from None
        self._start(created["Id"], spec)
        return str(created["Id"])

    def _start(self, container_id: str, spec: ContainerSpec) -> None:
        try:
            self.client.start(container_id)
        except Exception as error:
            raise RuntimeFailure(f"cannot start {spec.container_name}: {_explain(error)}") from None

    def stop(self, container_id: str, grace: float = 10.0, remove: bool = True) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Docker's stop), then remove."""
        self.client.timeout = grace + CALL_TIMEOUT
        try:
            self.client.stop(container_id, timeout=int(max(0, grace)))
            if remove:
                self.client.remove_container(container_id, force=True)
        except Exception as error:
            if "No such container" not in _explain(error):
                raise RuntimeFailure(f"cannot stop {container_id[:12]}: {_explain(error)}") from None
        finally:
            self.client.timeout = CALL_TIMEOUT

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
                decode=True,
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
        for summary in self.client.containers(all=all_states, filters={"label": f"{LABEL_MANAGED}=true"}):
            state = replica_state(self.client.inspect_container(summary["Id"]))
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
            output = self.client.exec_start(execution["Id"])
            code = self.client.exec_inspect(execution["Id"]).get("ExitCode")
        except Exception as error:
            return False, f"exec {argv[0] if argv else ''}: {_explain(error)}"
        if time.monotonic() - started > timeout:
            return False, f"exec took longer than {timeout:g} s"
        text = output.decode(errors="replace")[-256:] if isinstance(output, bytes) else str(output)[-256:]
        return code == 0, f"exit {code}: {text.strip()}"
