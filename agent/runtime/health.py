"""Health checks of replicas: the pure state machine, and the three probes.

The agent runs the probes itself rather than relying on Docker's HEALTHCHECK, because an
HTTP or TCP probe needs no tool inside the image (the stand-ins and many minimal images
have no curl), and because the agent must report each transition as it happens.
Semantics follow Docker's: failures during the start period do not count; `retries`
consecutive failures make a replica unhealthy; one success makes it healthy again.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass, replace

from picoord.common.vocabulary import ReplicaHealth

STARTING = ReplicaHealth.STARTING
HEALTHY = ReplicaHealth.HEALTHY
UNHEALTHY = ReplicaHealth.UNHEALTHY


@dataclass(frozen=True)
class Health:
    status: ReplicaHealth = STARTING  # STARTING, HEALTHY or UNHEALTHY
    failures: int = 0  # consecutive, outside the start period
    last_output: str = ""


def observe(
    health: Health, succeeded: bool, output: str, since_start: float, start_period: float, retries: int
) -> Health:
    """The health after one probe result."""
    if succeeded:
        return Health(HEALTHY, 0, output)
    if since_start < start_period and health.status == STARTING:
        return replace(health, last_output=output)
    failures = health.failures + 1
    status = UNHEALTHY if failures >= max(1, retries) else health.status
    return Health(status, failures, output)


def probe_http(address: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """GET http://address:port/path; healthy on 2xx and 3xx, as Kubernetes judges."""
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "picoord-agent health check"})
        reply = connection.getresponse()
        reply.read(1024)
        return 200 <= reply.status < 400, f"HTTP {reply.status}"
    except (OSError, http.client.HTTPException) as error:
        return False, f"GET {path}: {error}"
    finally:
        connection.close()


def probe_tcp(address: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True, f"port {port} open"
    except OSError as error:
        return False, f"port {port}: {error.strerror or error}"
