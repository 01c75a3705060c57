"""Checks of the cluster-membership actions (Swarm, kubeadm, k3s), one per message.

Each `check_<kind>(request)` validates the whole message and raises FieldError naming the
first wrong field; it returns nothing. The coordinator runs them when it reads a
`ClusterMembership` document and the agent runs them again before its executor does
anything, so a value that could act as shell syntax or as an option never reaches argv.
The `*_address` helpers return normalised values for the executors, which build argv
from those and not from the raw request.
"""

from __future__ import annotations

import ipaddress

from picoord.common.validation import (
    FieldError,
    cidr,
    host_port,
    https_url,
    ip_address,
    k3s_token,
    kubeadm_token,
    safe_word,
    sha256_pin,
    swarm_token,
)
from picoord.v1 import actions_pb2

SWARM_PORT = 2377
KUBE_API_PORT = 6443


def _expect(request: object, message_type: type) -> None:
    if not isinstance(request, message_type):
        raise FieldError("action", f"expected {message_type.__name__}, got {type(request).__name__}")


def ip_or_ip_port(field: str, value: str, default_port: int | None = None) -> str:
    """`IP` or `IP:PORT` (IPv6 as `[addr]:port`). With `default_port`, always `IP:PORT`.

    Swarm's advertise and listen addresses take this form; a host name is not accepted
    there because dockerd would read it as a network interface name.
    """
    safe_word(field, value, 64)
    try:
        address = str(ipaddress.ip_address(value))
    except ValueError:
        address = ""
    if address:
        if default_port is None:
            return address
        return f"[{address}]:{default_port}" if ":" in address else f"{address}:{default_port}"
    if ":" in value:
        text = host_port(field, value)  # names a bad port precisely
        try:
            ipaddress.ip_address(text.rpartition(":")[0].strip("[]"))
            return text
        except ValueError:
            pass
    raise FieldError(field, f"{value!r} is not an IP address or IP:PORT")


def swarm_manager_address(request: actions_pb2.SwarmJoin) -> str:
    return host_port("manager_address", request.manager_address, SWARM_PORT)


def kubeadm_api_server(request: actions_pb2.KubeadmJoin) -> str:
    return host_port("api_server", request.api_server, KUBE_API_PORT)


# --- Docker Swarm --------------------------------------------------------------------


def check_swarm_init(request: actions_pb2.SwarmInit) -> None:
    _expect(request, actions_pb2.SwarmInit)
    ip_or_ip_port("advertise_address", request.advertise_address)
    if request.listen_address:
        ip_or_ip_port("listen_address", request.listen_address, SWARM_PORT)


def check_swarm_join(request: actions_pb2.SwarmJoin) -> None:
    _expect(request, actions_pb2.SwarmJoin)
    swarm_manager_address(request)
    swarm_token("join_token", request.join_token)
    if request.advertise_address:
        ip_or_ip_port("advertise_address", request.advertise_address)


def check_swarm_leave(request: actions_pb2.SwarmLeave) -> None:
    _expect(request, actions_pb2.SwarmLeave)


# --- kubeadm -------------------------------------------------------------------------


def check_kubeadm_init(request: actions_pb2.KubeadmInit) -> None:
    _expect(request, actions_pb2.KubeadmInit)
    ip_address("advertise_address", request.advertise_address)
    if request.pod_network_cidr:
        cidr("pod_network_cidr", request.pod_network_cidr)


def check_kubeadm_join(request: actions_pb2.KubeadmJoin) -> None:
    _expect(request, actions_pb2.KubeadmJoin)
    kubeadm_api_server(request)
    kubeadm_token("token", request.token)
    sha256_pin("ca_cert_hash", request.ca_cert_hash)


def check_kubeadm_reset(request: actions_pb2.KubeadmReset) -> None:
    _expect(request, actions_pb2.KubeadmReset)


# --- k3s -----------------------------------------------------------------------------


def check_k3s_server(request: actions_pb2.K3sServer) -> None:
    _expect(request, actions_pb2.K3sServer)
    ip_address("advertise_address", request.advertise_address)


def check_k3s_agent(request: actions_pb2.K3sAgent) -> None:
    _expect(request, actions_pb2.K3sAgent)
    https_url("server_url", request.server_url)
    k3s_token("token", request.token)


def check_k3s_uninstall(request: actions_pb2.K3sUninstall) -> None:
    _expect(request, actions_pb2.K3sUninstall)
