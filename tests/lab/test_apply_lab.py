"""`coordctl apply` end to end: a spec file in, real Docker Swarm, GlusterFS, mounts and a
firewall out, on three lab Pis, each with its own sandbox, dockerd and glusterd.

The tests of this module share one lab and run in order: a dry run first (changes
nothing), then the real apply, then a second apply (changes nothing), then failures.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab
from tests.conftest import _down_all, require_root_or_fail

SPEC = """
kind: ClusterMembership
name: swarm
engine: swarm
manager: pi1
workers: {selector: {arch: %(arch)s}}
---
kind: GlusterVolume
name: gv
replica: 3
bricks: [pi1:/srv/gv, pi2:/srv/gv, pi3:/srv/gv]
---
kind: Mount
name: gv
type: glusterfs
source: pi1:/gv
target: /mnt/gv
nodes: [pi2, pi3]
persist: fstab
---
kind: FirewallPolicy
name: lan
nodes: [pi3]
backend: nftables
default_incoming: deny
rules:
  - {action: allow, from: %(subnet)s}
  - {action: allow, port: 22, protocol: tcp}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_or_fail()
    lab = Lab(tmp_path_factory.mktemp("apply-lab"), sandboxes=True, services=("dockerd", "glusterd"))
    try:
        lab.up(3)
        yield lab
    finally:
        _down_all([lab])


@pytest.fixture(scope="module")
def spec(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import platform

    path = tmp_path_factory.mktemp("spec") / "cluster.yaml"
    path.write_text(SPEC % {"arch": platform.machine(), "subnet": str(lab.network.subnet)})
    return path


def apply(lab: Lab, spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return lab.coordctl("apply", "-f", str(spec), *extra, timeout=600)


def docker(lab: Lab, node: str, *argv: str) -> str:
    sandbox = lab.sandbox(node)
    done = sandbox.run(["docker", "-H", f"unix://{sandbox.docker_socket}", *argv], timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def in_pi(lab: Lab, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return lab.sandbox(node).run(list(argv), timeout=60)


def swarm_state(lab: Lab, node: str) -> str:
    return docker(lab, node, "info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def test_dry_run_prints_the_plan_and_changes_nothing(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "would run: docker-api swarm.init" in out
    assert "would run once ClusterMembership/swarm:init@pi1 has run" in out  # the joins: no token yet
    assert "would run: gluster --mode=script peer probe" in out
    assert "would change" in out.splitlines()[-1]
    assert all(swarm_state(lab, node) == "inactive" for node in lab.nodes)
    assert in_pi(lab, "pi1", "gluster", "--mode=script", "volume", "list").stdout.strip() in (
        "",
        "No volumes present in cluster",
    )
    assert "/mnt/gv" not in in_pi(lab, "pi2", "cat", "/proc/self/mountinfo").stdout


def test_apply_converges_every_node(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec)
    assert done.returncode == 0, done.stdout + done.stderr
    nodes = docker(lab, "pi1", "node", "ls", "--format", "{{.Hostname}} {{.Status}}").split("\n")
    assert sorted(line.split()[1] for line in nodes if line) == ["Ready", "Ready", "Ready"]
    assert swarm_state(lab, "pi2") == swarm_state(lab, "pi3") == "active"
    # the replicated volume: written through pi2's mount, read through pi3's
    assert in_pi(lab, "pi2", "sh", "-c", "echo hello-from-pi2 > /mnt/gv/note").returncode == 0
    assert in_pi(lab, "pi3", "cat", "/mnt/gv/note").stdout.strip() == "hello-from-pi2"
    fstab = in_pi(lab, "pi2", "cat", "/etc/fstab").stdout
    assert sum("/mnt/gv" in line for line in fstab.splitlines()) == 1
    assert "/mnt/gv" not in Path("/etc/fstab").read_text()
    # the firewall is on, and the coordinator still hears from pi3
    ruleset = in_pi(lab, "pi3", "nft", "list", "ruleset").stdout
    assert "picoord" in ruleset
    lab.wait_ready(timeout=30)


def test_a_second_apply_changes_nothing_and_says_so(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to change" in done.stdout
    assert " ran: " not in done.stdout


def test_history_records_who_what_and_outcome(lab: Lab) -> None:
    history = lab.coordctl_json("actions", "pi2")
    kinds = {(a["kind"], a["outcome"], a["dry_run"]) for a in history}
    assert ("swarm_join", "changed", False) in kinds
    assert ("swarm_join", "unchanged", False) in kinds
    assert ("mount", "would change", True) in kinds
    joined = next(a for a in history if a["kind"] == "swarm_join" and a["outcome"] == "changed")
    # Who asked, as the kernel names the caller of the admin socket (not what coordctl claims).
    assert joined["requested_by"].startswith("root (uid 0, pid ") and joined["commands"]
    assert all("SWMTKN" not in json.dumps(a) for a in history)  # join tokens are never kept
    table = lab.coordctl("actions", check=True).stdout
    assert "STARTED" in table.splitlines()[0] and "pi3" in table


def test_partial_failure_keeps_the_other_nodes_results(lab: Lab, tmp_path: Path) -> None:
    spec = tmp_path / "partial.yaml"
    spec.write_text(
        "kind: Mount\nname: broken\ntype: bind\nsource: /srv/does-not-exist\ntarget: /mnt/b\nnodes: [pi1]\n"
        "---\nkind: Mount\nname: scratch\ntype: tmpfs\ntarget: /mnt/scratch\nnodes: [pi2]\n"
    )
    done = apply(lab, spec)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "does-not-exist" in done.stdout  # the failure, with its output
    assert "/mnt/scratch" in in_pi(lab, "pi2", "cat", "/proc/self/mountinfo").stdout
    in_pi(lab, "pi1", "mkdir", "-p", "/srv/does-not-exist")
    done = apply(lab, spec)  # a re-run converges: pi1 mounts now, pi2 is unchanged
    assert done.returncode == 0, done.stdout
    in_pi(lab, "pi1", "umount", "/mnt/b")
    in_pi(lab, "pi2", "umount", "/mnt/scratch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: FirewallPolicy\nname: x\nnodes: [pi1]\nrules: [{action: allow, from: 10.0.0.0/33}]\n",
            "FirewallPolicy/x.rules[0].from",
        ),
        ("kind: Mount\nname: m\ntype: tmpfs\ntarget: /mnt/m\nnodes: [pi9]\n", "unknown node 'pi9'"),
        (
            "kind: Mount\nname: m\ntype: tmpfs\ntarget: /etc/../proc\nnodes: [pi1]\n",
            "refusing to mount over /proc",
        ),
        (
            "kind: Mount\nname: m\ntype: bind\nsource: '/srv; rm -rf /'\ntarget: /mnt/m\nnodes: [pi1]\n",
            "source",
        ),
        ("- not\n- a mapping\n", "must be a mapping"),
    ],
)
def test_a_rejected_document_changes_nothing(lab: Lab, tmp_path: Path, text: str, message: str) -> None:
    before = lab.coordctl_json("actions", "--limit", "1000")
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    done = apply(lab, spec)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert lab.coordctl_json("actions", "--limit", "1000") == before


def test_a_ten_megabyte_file_is_refused(lab: Lab, tmp_path: Path) -> None:
    spec = tmp_path / "huge.yaml"
    spec.write_text("kind: Mount\nname: m\n# " + "x" * (10 * 1024 * 1024) + "\n")
    done = apply(lab, spec)
    assert done.returncode == 2 and "larger than" in done.stderr
