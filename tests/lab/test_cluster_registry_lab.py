"""The cluster registry for real, on two sandboxed lab Pis with their own dockerd and no
`--insecure-registry` anywhere: a Registry document applied with `coordctl apply` makes pi1
serve Debian's docker-registry over TLS with a certificate from the cluster CA and makes
both Pis' dockerd trust that CA (/etc/docker/certs.d). An image pushed over TLS is rolled
out by digest, re-pushed under the same tag with other bytes, rolled again: every replica
runs the new digest.

In the lab no agent runs on the host, so pi1 stands in for the desktop (on a real cluster
the desktop runs an agent and takes the `server` role). No systemd runs in a lab Pi, so the
executor only writes the files; the test starts `docker-registry serve` on pi1 with the
config the action wrote, as docker-registry.service would. The tests of this module share
one lab and run in order.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.agent.actions.container_registry import CERTS_DIR, CONFIG
from picoord.lab.cluster import Lab
from picoord.lab.images import BUSYBOX, MCP_PORT, Image, build_image, stand_ins
from picoord.lab.registry import Registry
from tests.conftest import _module_lab

pytestmark = pytest.mark.lab
PORT = 5000
PUBLISHED = 18090
REGISTRY_SPEC = """
kind: Registry
name: cluster
server: pi1
nodes: [pi1, pi2]
port: %(port)d
storage: %(storage)s
"""
SERVICE_SPEC = """
apiVersion: picoord/v1
kind: Service
name: web
image: %(image)s
replicas: 2
ports: [{target: %(target)d, published: %(published)d}]
placement: {max_per_node: 1}
health: {http: {path: /health, port: %(target)d}, interval: 1s, retries: 2}
update: {monitor: 1s}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(tmp_path_factory, 2, "cluster-registry-lab", sandboxes=True, services=["dockerd"])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-registry")


@pytest.fixture(scope="module")
def address(lab: Lab) -> str:
    return f"{lab.address('pi1')}:{PORT}"


@pytest.fixture(scope="module")
def ca_pem(lab: Lab) -> str:
    return (lab.coordinator_state_dir / "ca.crt").read_text()


def ok(lab: Lab, *args: str, timeout: float = 120) -> str:
    done = lab.coordctl(*args, timeout=timeout)
    assert done.returncode == 0, f"coordctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def in_pi(lab: Lab, node: str, *argv: str) -> str:
    done = lab.sandbox(node).run(list(argv), timeout=120)
    assert done.returncode == 0, f"{node}: {' '.join(argv)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def registry_spec(lab: Lab, work: Path) -> Path:
    path = work / "registry.yaml"
    path.write_text(REGISTRY_SPEC % {"port": PORT, "storage": work / "store"})
    return path


def test_apply_serves_the_registry_and_every_node_trusts_the_cluster_ca(
    lab: Lab, registry_spec: Path, address: str, ca_pem: str
) -> None:
    said = ok(lab, "apply", "-f", str(registry_spec))
    config = in_pi(lab, "pi1", "cat", str(CONFIG))
    assert f"addr: :{PORT}\n" in config and "tls:" in config, said
    for node in lab.nodes:
        assert in_pi(lab, node, "cat", str(CERTS_DIR / address / "ca.crt")) == ca_pem
        assert in_pi(lab, node, "cat", str(CERTS_DIR / f"pi1:{PORT}" / "ca.crt")) == ca_pem
    assert not (CERTS_DIR / address).exists()  # the host's own dockerd config is never touched
    again = ok(lab, "apply", "-f", str(registry_spec))
    assert "nothing to change" in again and " ran: " not in again, again


@pytest.fixture(scope="module")
def registry(lab: Lab, work: Path, address: str, ca_pem: str) -> Iterator[Registry]:
    """docker-registry on pi1 with the config the action wrote, as its unit would start it;
    the client pushes over TLS verified by the cluster CA."""
    log = work / "docker-registry.log"
    process = lab.sandbox("pi1").popen(["docker-registry", "serve", str(CONFIG)], log)
    client = Registry(work / "store", address, log, ca_pem=ca_pem)
    try:
        deadline = time.monotonic() + 20
        while not client.answers():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (
                f"docker-registry on {address} did not answer: {log.read_text()}"
            )
            time.sleep(0.2)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def build(version: int) -> Image:
    """mcp stand-in `version` under the tag `latest`: same tag, other bytes."""
    stand_in = next(s for s in stand_ins() if s.repository == "mcp" and s.tag == str(version))
    image = build_image(stand_in, BUSYBOX.read_bytes(), "amd64")
    return Image("mcp", "latest", image.layers, image.config)


def replica_images(lab: Lab) -> dict[str, list[str]]:
    """node -> the reference each running `web` container was created from (Config.Image),
    as its dockerd says."""
    found = {}
    for node in lab.nodes:
        ids = in_pi(lab, node, "docker", "ps", "-q", "--filter", "label=org.picoord.service=web").split()
        images = in_pi(lab, node, "docker", "inspect", "--format", "{{.Config.Image}}", *ids) if ids else ""
        found[node] = sorted(images.split())
    return found


def version(lab: Lab, node: str) -> str:
    url = f"http://{lab.address(node)}:{PUBLISHED}/version"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode().strip()


def wait_for(what: str, check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, AssertionError):
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_repushed_tag_is_rolled_out_by_its_new_digest_on_every_replica(
    lab: Lab, registry: Registry, work: Path, address: str
) -> None:
    first = registry.push(build(1))
    spec = work / "web.yaml"
    spec.write_text(
        SERVICE_SPEC % {"image": f"{address}/mcp:latest", "target": MCP_PORT, "published": PUBLISHED}
    )
    ok(lab, "apply", "-f", str(spec))
    said = ok(lab, "rollout", "web", timeout=180)
    assert first in said, said  # the digest the tag named, resolved once by the coordinator
    assert replica_images(lab) == {node: [f"{address}/mcp@{first}"] for node in lab.nodes}
    assert {node: version(lab, node) for node in lab.nodes} == dict.fromkeys(lab.nodes, "mcp 1")

    second = registry.push(build(2))  # the same tag, other bytes
    assert second != first
    said = ok(lab, "rollout", "web", timeout=180)
    assert second in said and "revision 2" in said, said
    wanted = {node: [f"{address}/mcp@{second}"] for node in lab.nodes}
    wait_for(f"every replica on {second}", lambda: replica_images(lab) == wanted)
    assert {node: version(lab, node) for node in lab.nodes} == dict.fromkeys(lab.nodes, "mcp 2")
    shown = {row["name"]: row for row in lab.coordctl_json("services")}["web"]
    assert shown["image"] == f"{address}/mcp:latest"  # the tag is what the operator sees


def test_a_pi_pulled_over_tls_with_no_insecure_registry(lab: Lab, registry: Registry, address: str) -> None:
    host = address.rsplit(":", 1)[0]
    assert not host.startswith("127.") and host != lab.address("pi2")  # a LAN address for pi2
    info = json.loads(in_pi(lab, "pi2", "docker", "info", "--format", "{{json .RegistryConfig}}"))
    assert info["InsecureRegistryCIDRs"] in ([], ["127.0.0.0/8"], ["::1/128", "127.0.0.0/8"]), info
    assert all(entry.get("Secure", True) for entry in (info.get("IndexConfigs") or {}).values()), info
    daemon_json = lab.sandbox("pi2").run(["cat", "/etc/docker/daemon.json"], timeout=10)
    assert "insecure" not in daemon_json.stdout
    pid = in_pi(lab, "pi2", "cat", "/run/docker/docker.pid").strip()  # pi2's own dockerd
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0].endswith(b"dockerd") and not any(b"insecure" in word for word in argv), argv
    # the replica it runs came from pi1's registry by digest, over verified TLS
    (pinned,) = replica_images(lab)["pi2"]
    assert pinned.startswith(f"{address}/mcp@sha256:")
    pulled = in_pi(lab, "pi2", "docker", "image", "inspect", "--format", "{{json .RepoDigests}}", pinned)
    assert pinned in json.loads(pulled)


def test_a_registry_it_does_not_trust_is_refused(
    lab: Lab, registry: Registry, registry_spec: Path, address: str
) -> None:
    """Without the CA (removed from pi2's certs.d) the same pull fails on the certificate:
    the trust step, not an insecure flag, is why pulls work; a second apply puts it back."""
    trust = CERTS_DIR / address / "ca.crt"
    saved = in_pi(lab, "pi2", "cat", str(trust))
    in_pi(lab, "pi2", "rm", str(trust))
    try:
        done = lab.sandbox("pi2").run(["docker", "pull", f"{address}/mcp:latest"], timeout=60)
        assert done.returncode != 0
        assert "certificate" in done.stdout + done.stderr, done.stdout + done.stderr
    finally:
        said = ok(lab, "apply", "-f", str(registry_spec))
    assert in_pi(lab, "pi2", "cat", str(trust)) == saved, said
