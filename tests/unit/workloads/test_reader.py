"""Reading whole files: the seed's two files and picoord's own mean the same; mixed files;
all-or-nothing; and no key of any input is ever dropped in silence."""

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from picoord.common.names import normalise_arch
from picoord.coordinator.apply.cluster_spec import ClusterMembership, Mount, parse_spec
from picoord.coordinator.placement.constraints import ARCH, HOSTNAME
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from tests.examples import cluster_example
from tests.unit.workloads.documents import EXAMPLES, RICH_COMPOSE, RICH_KUBERNETES

SEED = Path("/work/shared/seed/000_bfb93579e45f142f.txt")
MI = 1024**2


def _read(name: str):
    return read_workloads((EXAMPLES / name).read_text(), name)


def _by_name(workloads) -> dict[str, s.ServiceSpec]:
    return {spec.name: spec for spec in workloads.services}


@pytest.mark.parametrize(
    ("name", "service"),
    [
        ("mcp.yaml", "mcp"),
        ("seed-docker-stack.yml", "mcp-server"),
        ("seed-mcp-deployment.yaml", "mcp-server"),
    ],
)
def test_the_three_files_mean_the_same_mcp(name: str, service: str) -> None:
    mcp = _by_name(_read(name))[service]
    assert mcp.image == "mcp-modules-rust:latest"
    assert mcp.mode == s.REPLICATED and mcp.replicas == 3
    assert s.PortMapping(target=8080, published=8080, protocol="tcp") in mcp.ports
    (arch,) = [c for c in mcp.placement.constraints if c.key == ARCH]
    assert (arch.operator, normalise_arch(arch.value)) == ("==", "arm64")
    assert mcp.resources.memory_request == 256 * MI
    assert mcp.resources.memory_limit == 512 * MI
    assert s.EnvVar("MCP_HTTP_HOST", "0.0.0.0") in mcp.env


def test_the_database_url_is_a_secret_where_the_file_says_so() -> None:
    k8s = _by_name(_read("seed-mcp-deployment.yaml"))["mcp-server"]
    assert k8s.secrets == (s.SecretEnv("DATABASE_URL", "mcp-secrets", "database-url"),)
    assert k8s.secrets[0].field == (
        "Deployment/mcp-server.spec.template.spec.containers[0].env[1].valueFrom.secretKeyRef"
    )
    assert k8s.resources.cpu_request == 250 and k8s.resources.cpu_limit == 500
    assert k8s.aliases == ("mcp-service",)
    picoord = _by_name(_read("mcp.yaml"))["mcp"]
    assert picoord.secrets == k8s.secrets
    stack = _by_name(_read("seed-docker-stack.yml"))["mcp-server"]
    assert s.EnvVar("DATABASE_URL", "postgresql://mcp:password@postgres:5432/mcp_db") in stack.env


@pytest.mark.parametrize("name", ["mcp.yaml", "seed-docker-stack.yml"])
def test_postgres_stays_on_the_desktop_and_mcp_references_it(name: str) -> None:
    services = _by_name(_read(name))
    postgres = services["postgres"]
    assert postgres.image == "postgres:15-alpine"
    assert [(c.key, c.operator, c.value) for c in postgres.placement.constraints] == [
        (HOSTNAME, "==", "ubuntu-desktop")
    ]
    assert s.VolumeMount(s.VOLUME, "/var/lib/postgresql/data", "postgres_data") in postgres.volumes
    mcp = next(spec for spec in services.values() if spec.name != "postgres")
    assert mcp.references == ("postgres",)
    assert postgres.references == ()  # POSTGRES_USER=mcp is a user name, not a host
    assert s.placement_order(services.values())[0] == "postgres" or not mcp.depends_on


def test_the_examples_are_the_seed_verbatim() -> None:
    if not SEED.exists():
        pytest.fail(f"the seed document {SEED} is missing")
    seed = SEED.read_text()
    for name in ("seed-docker-stack.yml", "seed-mcp-deployment.yaml"):
        text = (EXAMPLES / name).read_text()
        assert "```yaml\n" + text + "```" in seed, name


def test_the_seed_files_warn_about_what_picoord_does_differently() -> None:
    stack = _read("seed-docker-stack.yml").warning_lines()
    assert not any("networks" in line for line in stack)  # overlay networks are what picoord makes
    assert not any("services.mcp-server.ports" in line for line in stack)  # answered on every node, as Swarm
    assert any(
        line.startswith(
            "seed-docker-stack.yml: services.mcp-server.environment[1]: DATABASE_URL looks like a secret"
        )
        for line in stack
    )
    assert any(
        "services.postgres.environment.POSTGRES_PASSWORD: POSTGRES_PASSWORD looks like a secret" in line
        for line in stack
    )
    assert not any("password@" in line or ": password" in line for line in stack)
    k8s = _read("seed-mcp-deployment.yaml").warning_lines()
    assert k8s == [
        "seed-mcp-deployment.yaml: Service/mcp-service.spec.type: no spec.loadBalancerIP: picoord has no "
        "address pool, so the port is answered on every node's own address; give an unused address "
        "of the nodes' subnet for a virtual IP that follows healthy replicas"
    ]
    assert _read("mcp.yaml").warnings == ()


def test_stack_update_policy_is_swarms_with_rollback() -> None:
    mcp = _by_name(_read("seed-docker-stack.yml"))["mcp-server"]
    assert (mcp.update.parallelism, mcp.update.monitor, mcp.update.order, mcp.update.failure_action) == (
        1,
        5.0,
        "stop-first",
        "rollback",
    )
    assert mcp.update.max_failure_ratio == 0.0


def test_a_mixed_file_hands_cluster_documents_to_the_apply_parser() -> None:
    cluster_text = cluster_example()
    text = cluster_text + "\n---\n" + (EXAMPLES / "mcp.yaml").read_text()
    workloads = read_workloads(text, "all.yaml")
    assert [spec.name for spec in workloads.services] == ["mcp", "postgres"]
    assert list(workloads.cluster) == parse_spec(cluster_text)
    assert any(isinstance(doc, ClusterMembership) for doc in workloads.cluster)
    assert any(isinstance(doc, Mount) for doc in workloads.cluster)


def test_a_bad_cluster_document_in_a_mixed_file_is_named_as_apply_names_it() -> None:
    text = (EXAMPLES / "mcp.yaml").read_text() + "\n---\nkind: Mount\nname: m\ntype: floppy\n"
    with pytest.raises(WorkloadError, match=r"^f.yaml: Mount/m.type: 'floppy' is not one of"):
        read_workloads(text, "f.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file holds no document"),
        ("a: [", "not valid YAML"),
        (
            "kind: Ingress\napiVersion: networking.k8s.io/v1\n",
            "documents[0].kind: 'Ingress' is not something picoord reads",
        ),
        ("- 1\n- 2\n", "documents[0]: must be a mapping (kind: ..., or services: ...), not list"),
        ("kind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}\n", "Deployment/x.spec: is required"),
        (
            "kind: Service\nname: a\nimage: a:1\n---\nkind: Service\nname: a\nimage: b:1\n",
            "Service/a: the name 'a' is already taken by Service/a",
        ),
        (
            "kind: Service\nname: a\nimage: a:1\ndepends_on: [b]\n",
            "Service/a.depends_on: 'b' is not a service of this file",
        ),
        (
            "services:\n  a: {image: 'a:1'}\n---\nkind: Service\nname: a\nimage: a:1\n",
            "the name 'a' is already taken by services.a",
        ),
    ],
)
def test_file_level_errors(text: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=re.escape(message)):
        read_workloads(text, "f.yaml")


def test_size_is_bounded() -> None:
    with pytest.raises(WorkloadError, match="larger than"):
        read_workloads("# " + "x" * (1024 * 1024) + "\nkind: Service\n")


def test_all_or_nothing_one_bad_document_rejects_the_file() -> None:
    text = (EXAMPLES / "mcp.yaml").read_text().replace("replicas: 3", "replicas: -1")
    with pytest.raises(WorkloadError, match=r"^mcp.yaml: Service/mcp.replicas: -1 is not a replica count"):
        read_workloads(text, "mcp.yaml")


def test_a_kubernetes_service_before_its_deployment() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES / "seed-mcp-deployment.yaml").read_text()))
    text = yaml.safe_dump_all(list(reversed(documents)))
    (mcp,) = read_workloads(text).services
    assert mcp.aliases == ("mcp-service",) and mcp.ports == (s.PortMapping(8080, 8080),)


# ---- never a silent drop -------------------------------------------------------------

UNKNOWN = "zz-unknown-key"

PICOORD = (EXAMPLES / "mcp.yaml").read_text()


def _mappings(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every mapping in the document, by its path of keys and list indices."""
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _mappings(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _mappings(value, (*path, index))


def _cases() -> Iterator[Any]:
    for label, text in (
        ("stack", (EXAMPLES / "seed-docker-stack.yml").read_text()),
        ("k8s", (EXAMPLES / "seed-mcp-deployment.yaml").read_text()),
        ("picoord", PICOORD),
        ("rich-compose", RICH_COMPOSE),
        ("rich-k8s", RICH_KUBERNETES),
    ):
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        for number, document in enumerate(documents):
            for path in _mappings(document):
                yield pytest.param(
                    documents, number, path, id=f"{label}:{number}:{'.'.join(map(str, path)) or '(top)'}"
                )


@pytest.mark.parametrize(("documents", "number", "path"), list(_cases()))
def test_an_unknown_key_anywhere_is_warned_or_refused(documents: list, number: int, path: tuple) -> None:
    """A key inserted at any level of any input either stops the read with an error naming
    it, or comes back as a warning naming it: never silently ignored."""
    changed = copy.deepcopy(documents)
    target = changed[number]
    for step in path:
        target = target[step]
    target[UNKNOWN] = {"zz-inner": 1}
    text = yaml.safe_dump_all(changed, sort_keys=False)
    try:
        workloads = read_workloads(text, "f.yaml")
    except WorkloadError as error:
        assert UNKNOWN in str(error)
        return
    assert any(UNKNOWN in line for line in workloads.warning_lines()), "the key vanished without a word"


def test_the_rich_documents_read_cleanly() -> None:
    """The walk above is only meaningful if the documents are valid to start with."""
    compose = _by_name(read_workloads(RICH_COMPOSE))
    assert compose["web"].references == ("db",)
    assert compose["web"].update.order == "start-first" and compose["web"].rollback is not None
    k8s = _by_name(read_workloads(RICH_KUBERNETES))
    assert k8s["web"].health == s.HealthCheck(s.HTTP, port=8080, path="/health", interval=5.0, timeout=1.0)
    assert k8s["web"].ports == (s.PortMapping(8080, 30080),)
