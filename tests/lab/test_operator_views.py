"""What the operator sees: coordctl listings in every format, node show, labels, a live
top on a terminal, the Prometheus endpoint, and a root-only admin socket."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from picoord.lab.cluster import Lab, executable

NODE_FIELDS = {
    "name",
    "status",
    "arch",
    "cpu_cores",
    "memory_total_bytes",
    "machine_model",
    "os",
    "agent_version",
    "last_seen",
    "labels",
}


def test_nodes_in_every_format(lab3: Lab) -> None:
    listing = lab3.coordctl_json("nodes")
    assert [node["name"] for node in listing] == ["pi1", "pi2", "pi3"]
    for node in listing:
        assert node.keys() >= NODE_FIELDS
        assert node["status"] == "Ready"
        assert node["arch"] == os.uname().machine
        assert node["cpu_cores"] == os.cpu_count()
        assert node["memory_total_bytes"] > 0 and node["os"] and node["agent_version"] == "0.1.0"
    as_yaml = yaml.safe_load(lab3.coordctl("nodes", "-o", "yaml", check=True).stdout)
    assert [(n["name"], n["arch"], n["labels"]) for n in as_yaml] == [
        (n["name"], n["arch"], n["labels"]) for n in listing
    ]
    table = lab3.coordctl("nodes", check=True).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "STATUS", "ARCH", "CPUS"]
    assert [line.split()[:2] for line in table[1:]] == [["pi1", "Ready"], ["pi2", "Ready"], ["pi3", "Ready"]]


def test_node_show_has_the_hardware_report_and_recent_metrics(lab3: Lab) -> None:
    time.sleep(2.5)  # metrics every second in the lab
    detail = lab3.coordctl_json("node", "show", "pi2", "--samples", "3")
    assert detail["name"] == "pi2" and detail["certificate_serial"]
    hardware = detail["hardware"]
    assert hardware["arch"] == os.uname().machine and hardware["cpu_model"]
    addresses = {a for nic in hardware["interfaces"] for a in nic.get("addresses", [])}
    assert f"{lab3.address('pi2')}/{lab3.network.prefixlen}" in addresses  # the Pi's own namespace
    samples = detail["recent_metrics"]
    assert 2 <= len(samples) <= 3
    assert samples[0]["timestamp"] < samples[-1]["timestamp"]
    text = lab3.coordctl("node", "show", "pi2", check=True).stdout
    for heading in ("Name", "Arch", "CPU", "Memory", "Disks", "Network", "Recent metrics"):
        assert heading in text
    assert (
        yaml.safe_load(lab3.coordctl("node", "show", "pi2", "-o", "yaml", check=True).stdout)["name"] == "pi2"
    )


def test_labels_set_and_remove(lab3: Lab) -> None:
    done = lab3.coordctl("node", "label", "pi3", "role=storage", "zone=rack-a", check=True)
    assert "role=storage" in done.stdout
    lab3.coordctl("node", "label", "pi3", "zone-", check=True)
    assert lab3.coordctl_json("node", "show", "pi3")["labels"] == {"role": "storage"}
    lab3.coordctl("node", "label", "pi3", "role-", check=True)
    bad = lab3.coordctl("node", "label", "pi3", "role=a b")
    assert bad.returncode == 2 and "invalid value" in bad.stderr
    missing = lab3.coordctl("node", "label", "pi9", "role=x")
    assert missing.returncode == 1 and "no node named 'pi9'" in missing.stderr
    assert lab3.coordctl_json("node", "show", "pi3")["labels"] == {}


def test_top_snapshot(lab3: Lab) -> None:
    rows = lab3.coordctl_json("top")
    assert [row["name"] for row in rows] == ["pi1", "pi2", "pi3"]
    for row in rows:
        assert row["status"] == "Ready" and row["sample_time"]
        assert 0 <= row["cpu_percent"] <= 100
        assert 0 < row["memory_available_bytes"] <= row["memory_total_bytes"]
        assert 0 < row["disk_used_bytes"] <= row["disk_size_bytes"]
        assert row["network_receive_bytes_per_second"] >= 0
        assert row["throttled"] is None  # no vcgencmd here: unknown, not "fine"
    header = lab3.coordctl("top", "--once", check=True).stdout.splitlines()[0].split()
    assert header[:3] == ["NODE", "STATUS", "CPU%"] and "TEMP" in header and "THROTTLING" in header


def test_top_refreshes_in_place_on_a_terminal(lab3: Lab) -> None:
    argv = [str(executable("coordctl", lab3.bin_dir)), "--admin-socket", str(lab3.admin_socket)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: coordctl on a real terminal of 100 columns
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        os.execv(argv[0], [*argv, "top", "--interval", "1"])
    output = b""
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    break
    finally:
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert text.count("pi1") >= 3  # redrawn several times
    assert "\x1b[1A" in text or "\x1b[2K" in text  # by moving the cursor up, not by scrolling
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def scrape(lab: Lab) -> str:
    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        return reply.read().decode()


def test_prometheus_exports_every_node_under_node_exporter_names(lab3: Lab) -> None:
    text = scrape(lab3)
    for node in lab3.nodes:
        for series in (
            f'node_load1{{instance="{node}"}}',
            f'node_memory_MemAvailable_bytes{{instance="{node}"}}',
            f'node_memory_MemTotal_bytes{{instance="{node}"}}',
            f'picoord_node_up{{instance="{node}"}} 1.0',
        ):
            assert series in text
        assert f'node_cpu_seconds_total{{cpu="0",instance="{node}",mode="idle"}}' in text
        assert f'node_network_receive_bytes_total{{device="eth0",instance="{node}"}}' in text
    assert "picoord_coordinator_sessions 3.0" in text
    assert "# TYPE picoord_coordinator_messages_per_second gauge" in text
    time.sleep(2)
    rate = next(
        line
        for line in scrape(lab3).splitlines()
        if line.startswith("picoord_coordinator_messages_per_second")
    )
    assert float(rate.split()[1]) > 0


def test_admin_socket_is_root_only(lab3: Lab) -> None:
    assert lab3.admin_socket.stat().st_mode & 0o777 == 0o600
    state = lab3.coordinator_state_dir
    assert (state / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (state / "server.key").stat().st_mode & 0o777 == 0o600
    nobody = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(lab3.admin_socket)!r})",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert nobody.returncode != 0 and "PermissionError" in nobody.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "create", "--ttl", "0s"], "invalid duration"),
        (["token", "create", "--ttl", "soon"], "invalid duration"),
        (["token", "create", "--uses", "-1"], "--uses must be 0"),
        (["node", "show", "Pi_1"], "DNS label"),
        (["node", "remove", "nosuchpi"], "no node named 'nosuchpi'"),
        (["nodes", "-o", "xml"], "invalid choice"),
    ],
)
def test_coordctl_bad_input(lab3: Lab, args: list[str], message: str) -> None:
    before = lab3.coordctl_json("token", "list")
    done = lab3.coordctl(*args)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert lab3.coordctl_json("token", "list") == before
    assert lab3.node_statuses() == {"pi1": "Ready", "pi2": "Ready", "pi3": "Ready"}


def test_coordctl_without_a_coordinator_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(executable("coordctl", None)), "--admin-socket", f"{tmp_path}/none.sock", "nodes"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "is picoord-coordinator running?" in done.stderr


def test_token_create_prints_the_join_command(lab3: Lab) -> None:
    line = lab3.coordctl("token", "create", "--ttl", "10m", "--uses", "2", check=True).stdout.strip()
    words = line.split()
    assert words[:3] == ["picoord-agent", "join", lab3.coordinator_address]
    assert words[3] == "--token" and words[5] == "--ca-cert-hash" and words[6].startswith("sha256:")
    listed = {t["token_id"]: t for t in lab3.coordctl_json("token", "list")}
    info = listed[words[4].split(".")[0]]
    assert info["usage_limit"] == 2 and info["uses"] == 0
    assert words[4].split(".")[1] not in json.dumps(listed)  # the secret is never listed
