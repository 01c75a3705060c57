"""Backup and restore end to end: a backup taken while agents stream and an operator writes,
the coordinator's disk lost, its state restored into a fresh state dir for a new coordinator
on the same address. Every agent comes back on its old certificate (no join), services and
secrets are there, and no replica is restarted: the containers on the Pis are the same ones,
started at the same moment, well after the disconnect grace.

One lab (the workloads tests' three Pis with dockerd, running the demo) and one path.
"""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab, executable

# The workloads lab: three Pis with dockerd and the lab registry, the demo's secret stored,
# the demo file applied and postgres rolled out (this module rolls out mcp too).
from tests.lab.test_workloads_lab import containers, docker, ok, services, settle
from tests.lab.test_workloads_lab import lab as demo_lab  # noqa: F401 (its fixture, as demo_lab)

pytestmark = pytest.mark.lab

SERVICES = {"mcp": 3, "postgres": 1}


def coordinator_command(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(executable("picoord-coordinator", lab.bin_dir)), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def replicas_on_pis(lab: Lab) -> dict[str, tuple[str, str, str]]:
    """container id -> (Pi, service, when dockerd started it) for the demo's services."""
    found = {}
    for service in SERVICES:
        for node, items in containers(lab, service).items():
            for item in items:
                started = docker(lab, node, "inspect", "--format", "{{.State.StartedAt}}", item["id"]).strip()
                found[item["id"]] = (node, service, started)
    return found


def declared(lab: Lab) -> dict[str, tuple[int, str, int]]:
    return {name: (view["revision"], view["image"], view["desired"]) for name, view in services(lab).items()}


class Labeler:
    """An operator relabelling pi1 over and over (one store write each) while the backup runs."""

    def __init__(self, lab: Lab) -> None:
        self.lab, self.written = lab, 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            done = self.lab.coordctl("node", "label", "pi1", f"load={self.written + 1}", timeout=30)
            if done.returncode == 0:
                self.written += 1
            else:
                self.failures.append(done.stderr.strip()[:200])

    def __enter__(self) -> Labeler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_backup_under_load_restored_on_a_fresh_state_dir(demo_lab: Lab, tmp_path: Path) -> None:  # noqa: F811
    lab = demo_lab
    ok(lab, "rollout", "mcp")
    for service, count in SERVICES.items():
        settle(lab, f"{service} settled", service, count, timeout=120)
    before_services, before_secrets = declared(lab), lab.coordctl_json("secret", "list")
    before_replicas = replicas_on_pis(lab)
    assert len(before_replicas) == sum(SERVICES.values()), before_replicas
    identities = {node: (lab.agent_state_dir(node) / "node.pem").read_bytes() for node in lab.nodes}
    tokens = lab.coordctl_json("token", "list")
    archive = tmp_path / "picoord.backup"

    with Labeler(lab) as labeler:
        while labeler.written < 2:  # the writes are under way before the backup starts
            time.sleep(0.1)
        written_before = labeler.written
        done = coordinator_command(
            lab,
            "backup",
            str(archive),
            "--config",
            str(lab.coordinator_config_path),
            "--state-dir",
            str(lab.coordinator_state_dir),
        )
        written_after = labeler.written
    assert done.returncode == 0, done.stderr
    assert labeler.failures == []  # the backup never held the writers up
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600

    # The coordinator's host loses its disk: a new state dir, the same address.
    lab.stop_coordinator()
    # The stop logged how long each of its steps took (what a slow restart is read from).
    stopped = [
        json.loads(line)
        for line in lab.log_path("coordinator").read_text().splitlines()
        if '"coordinator stopped"' in line
    ]
    assert len(stopped) == 1, stopped
    assert {"controller", "replica", "admin", "sessions", "store", "seconds"} <= stopped[0].keys()
    assert stopped[0]["seconds"] >= stopped[0]["sessions"] >= 0
    lost = lab.coordinator_state_dir.rename(lab.work_dir / "coordinator.lost")
    restored = coordinator_command(
        lab, "restore", str(archive), "--state-dir", str(lab.coordinator_state_dir)
    )
    assert restored.returncode == 0, restored.stderr
    assert "agents reconnect by themselves" in restored.stdout
    again = coordinator_command(lab, "restore", str(archive), "--state-dir", str(lab.coordinator_state_dir))
    assert again.returncode == 73 and "is not empty" in again.stderr, again
    lab.start_coordinator()
    lab.wait_ready()

    assert {node: (lab.agent_state_dir(node) / "node.pem").read_bytes() for node in lab.nodes} == identities
    assert lab.coordctl_json("token", "list") == tokens  # no token was used: nobody joined again
    assert declared(lab) == before_services
    assert lab.coordctl_json("secret", "list") == before_secrets
    nodes = {node["name"]: node for node in lab.coordctl_json("nodes")}
    load = int(nodes["pi1"]["labels"]["load"])
    # the label as one commit during the backup left it
    assert written_before <= load <= written_after + 1, (written_before, load, written_after)
    time.sleep(8.0)  # past the 5 s disconnect grace: a replica deemed lost would be replaced by now
    for service, count in SERVICES.items():
        settle(lab, f"{service} settled after the restore", service, count, timeout=60)
    assert replicas_on_pis(lab) == before_replicas
    assert (lost / "state.db").exists()  # the old state was moved aside, never read again
