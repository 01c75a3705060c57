"""Stacks on Swarm attachable overlay networks, for real: three lab Pis with their own
dockerd, put in one Swarm by the ClusterMembership document that `coordctl stack deploy`
itself printed when it refused a stack whose nodes were not in a Swarm.

Then, through coordctl only: a stack's mcp-server replicas reach `postgres:5432` by name
(Docker's embedded DNS on the stack's overlay network, through the stand-in's /cgi-bin/db),
postgres's port is closed on every node's address, postgres moved to another Pi is reached
again by name while mcp-server's containers stay the same, a second stack can reach none
of the first's internal services (by name or by overlay address), and an encrypted network
is created encrypted. The tests run in file order and share one lab.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab
from tests.conftest import _module_lab
from tests.lab.test_workloads_lab import ctl, ok, services, settle, spec_file, wait_until, words

pytestmark = pytest.mark.lab

NODES = ["pi1", "pi2", "pi3"]
ROLLOUT_TIMEOUT = 240.0
DATABASE_URL = "postgresql://mcp:lab@postgres:5432/mcp_db"

SHOP = """
services:
  mcp-server:
    image: mcp:1
    environment:
      DATABASE_URL: {url}
    deploy:
      replicas: 2
      placement:
        constraints: [node.hostname != pi3]
        max_replicas_per_node: 1
    healthcheck:
      test: [CMD, wget, -qO-, http://127.0.0.1:8080/health]
      interval: 2s
      timeout: 2s
    networks: [mcp-network]
  postgres:
    image: postgres:15-alpine
    deploy:
      placement:
        constraints: [node.hostname == {postgres_on}]
    networks: [mcp-network]
networks:
  mcp-network:
    driver: overlay
"""

# A picoord Service (no networks of its own: the stack's `other_default`), with an HTTP health
# check: the agent probes it through docker_gwbridge, its overlay address being out of reach.
OTHER = """
apiVersion: picoord/v1
kind: Service
name: intruder
image: mcp:1
ports:
  - {{target: 8080}}
env:
  DATABASE_URL: {url}
placement:
  constraints: ["node.hostname == pi1"]
health:
  http: {{port: 8080, path: /health}}
  interval: 2s
  timeout: 2s
"""

VAULT = """
services:
  keeper:
    image: mcp:1
    networks: [secure]
networks:
  secure:
    driver: overlay
    driver_opts:
      encrypted: ""
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(
        tmp_path_factory, len(NODES), "overlay", sandboxes=True, services=["dockerd"], registry=True
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")


def docker(lab: Lab, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    sandbox = lab.sandbox(node)
    done = sandbox.run(["docker", "-H", f"unix://{sandbox.docker_socket}", *args], timeout=60)
    assert not check or done.returncode == 0, f"docker {' '.join(args)} on {node}: {done.stderr}"
    return done


def container_of(lab: Lab, replica: dict[str, object]) -> str:
    """The container id of one replica as `coordctl ps -o json` lists it, on its node."""
    node, name = str(replica["node"]), str(replica["replica"])
    listed = docker(lab, node, "ps", "-q", "--no-trunc", "--filter", f"label=org.picoord.replica={name}")
    [container] = listed.stdout.split()
    return container


def db_check(lab: Lab, replica: dict[str, object]) -> str:
    """What the replica's own /cgi-bin/db says (HTTP inside its container)."""
    done = docker(
        lab,
        str(replica["node"]),
        "exec",
        container_of(lab, replica),
        "wget",
        "-qO-",
        "http://127.0.0.1:8080/cgi-bin/db",
        check=False,
    )
    return done.stdout.strip()


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


def running(lab: Lab, service: str) -> list[dict[str, object]]:
    return [r for r in lab.coordctl_json("ps", service) if r["desired"] == "running"]


# --------------------------------------------------------------------------- the refusal, and its fix


def test_nodes_not_in_a_swarm_are_refused_with_the_document_that_fixes_it(lab: Lab, files: Path) -> None:
    shop = spec_file(files, "shop", SHOP.format(url=DATABASE_URL, postgres_on="pi3"))
    done = ctl(lab, "stack", "deploy", "-c", str(shop), "shop", timeout=60)
    said = words(done)
    assert done.returncode != 0, said
    assert "stack 'shop' uses Swarm overlay networks" in said, said
    assert "pi1 (for mcp-server)" in said and "pi3 (for postgres)" in said, said
    assert "x-picoord: {network_mode: published-ports}" in said, said
    assert services(lab) == {}  # nothing recorded
    document = said[said.index("kind: ClusterMembership") :].split("\n\n")[0]
    assert "manager: pi1" in document and "workers: [pi2, pi3]" in document, document
    membership = spec_file(files, "membership", document + "\n")
    ok(lab, "apply", "-f", str(membership), timeout=600)
    listed = docker(lab, "pi1", "node", "ls", "--format", "{{.Status}}").stdout.split()
    assert listed == ["Ready"] * 3, listed


# --------------------------------------------------------------------------- by name, over the overlay


def test_mcp_server_reaches_postgres_by_name_and_5432_is_closed_on_every_node(lab: Lab, files: Path) -> None:
    shop = spec_file(files, "shop", SHOP.format(url=DATABASE_URL, postgres_on="pi3"))
    said = ok(lab, "stack", "deploy", "-c", str(shop), "shop")
    assert "stack/shop service/postgres recorded" in said, said
    wait_until(
        "the manager created shop_mcp-network",
        lambda: "shop_mcp-network" in docker(lab, "pi1", "network", "ls", "--format", "{{.Name}}").stdout,
    )
    inspect = docker(
        lab,
        "pi1",
        "network",
        "inspect",
        "shop_mcp-network",
        "--format",
        '{{.Driver}} {{.Attachable}} {{.Scope}} {{index .Labels "org.picoord.managed"}}',
    )
    assert inspect.stdout.split() == ["overlay", "true", "swarm", "true"], inspect.stdout
    ok(lab, "rollout", "shop", timeout=ROLLOUT_TIMEOUT)
    [postgres] = settle(lab, "postgres settled", "postgres", 1)
    assert postgres["node"] == "pi3"
    servers = settle(lab, "mcp-server settled", "mcp-server", 2)
    assert sorted(r["node"] for r in servers) == ["pi1", "pi2"]
    for replica in servers:
        assert db_check(lab, replica).startswith("db: reached postgres:5432 from "), replica
    assert lab.network is not None
    for pi in lab.network.pis:
        assert not port_open(pi.address, 5432), f"5432 answers on {pi.node}'s address {pi.address}"


def test_a_moved_postgres_is_reached_by_name_without_restarting_mcp_server(lab: Lab, files: Path) -> None:
    before = {r["replica"]: container_of(lab, r) for r in running(lab, "mcp-server")}
    moved = spec_file(files, "shop", SHOP.format(url=DATABASE_URL, postgres_on="pi2"))
    said = ok(lab, "stack", "deploy", "-c", str(moved), "shop")
    assert "stack/shop service/mcp-server unchanged" in said, said
    ok(lab, "rollout", "postgres", timeout=ROLLOUT_TIMEOUT)
    [postgres] = settle(lab, "postgres moved", "postgres", 1, revision=2)
    assert postgres["node"] == "pi2"
    servers = running(lab, "mcp-server")
    assert {r["replica"]: container_of(lab, r) for r in servers} == before  # not restarted
    for replica in servers:
        wait_until(
            f"{replica['replica']} reaches the moved postgres",
            lambda replica=replica: db_check(lab, replica).startswith("db: reached postgres:5432"),
            timeout=30,
        )


# --------------------------------------------------------------------------- isolation


def test_another_stack_cannot_reach_the_first_stacks_internal_services(lab: Lab, files: Path) -> None:
    other = spec_file(files, "other", OTHER.format(url=DATABASE_URL))
    ok(lab, "stack", "deploy", "-c", str(other), "other")
    ok(lab, "rollout", "other", timeout=ROLLOUT_TIMEOUT)
    [intruder] = settle(lab, "intruder settled", "intruder", 1)
    assert intruder["health"] == "healthy", intruder  # probed through docker_gwbridge
    said = db_check(lab, intruder)
    assert said.startswith("db: cannot reach postgres:5432"), said  # the name is not theirs
    # not by address either: postgres's overlay address, from the other stack's network
    [postgres] = running(lab, "postgres")
    address = docker(
        lab,
        str(postgres["node"]),
        "inspect",
        container_of(lab, postgres),
        "--format",
        '{{(index .NetworkSettings.Networks "shop_mcp-network").IPAddress}}',
    ).stdout.strip()
    assert address, "postgres has no address on shop_mcp-network"
    reached = docker(
        lab,
        "pi1",
        "exec",
        container_of(lab, intruder),
        "nc",
        "-w",
        "3",
        address,
        "5432",
        "-e",
        "/bin/true",
        check=False,
    )
    assert reached.returncode != 0, f"the other stack reached postgres at {address}"
    networks = docker(
        lab,
        "pi1",
        "inspect",
        container_of(lab, intruder),
        "--format",
        "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
    ).stdout.split()
    assert networks == ["other_default"], networks


# --------------------------------------------------------------------------- encrypted


def test_an_encrypted_network_is_created_encrypted(lab: Lab, files: Path) -> None:
    vault = spec_file(files, "vault", VAULT)
    ok(lab, "stack", "deploy", "-c", str(vault), "vault")
    wait_until(
        "the manager created vault_secure",
        lambda: "vault_secure" in docker(lab, "pi1", "network", "ls", "--format", "{{.Name}}").stdout,
    )
    options = docker(lab, "pi1", "network", "inspect", "vault_secure", "--format", "{{json .Options}}")
    assert '"encrypted":""' in options.stdout, options.stdout
    plain = docker(lab, "pi1", "network", "inspect", "shop_mcp-network", "--format", "{{json .Options}}")
    assert "encrypted" not in plain.stdout


def test_removing_a_stack_removes_its_network_once_unused(lab: Lab) -> None:
    ok(lab, "rm", "stack", "vault")
    wait_until(
        "vault_secure removed",
        lambda: "vault_secure" not in docker(lab, "pi1", "network", "ls", "--format", "{{.Name}}").stdout,
    )
    assert "shop_mcp-network" in docker(lab, "pi1", "network", "ls", "--format", "{{.Name}}").stdout
