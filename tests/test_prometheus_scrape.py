"""A real Prometheus (Debian's package) scrapes a lab coordinator's /metrics with
honor_labels, and its HTTP API answers for every lab node's series, node_exporter's names
included, and for the service and rollout series of an applied service."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab
from tests.conftest import free_loopback_port

pytestmark = pytest.mark.lab

SPEC = """
apiVersion: picoord/v1
kind: Service
name: hello
image: hello:1
replicas: 2
ports: [{target: 8080}]
"""
NODE_QUERIES = (
    "node_uname_info",
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_Cached_bytes",
    "node_filesystem_readonly",
    "node_disk_io_time_seconds_total",
    "node_time_seconds",
    "picoord_node_up",
)
SERVICE_QUERIES = ("picoord_service_replicas", "picoord_rollout_status", "picoord_rollout_revision")


def query(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.load(reply)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def prometheus(lab3: Lab, tmp_path: Path) -> Iterator[int]:
    """Prometheus on a free loopback port, scraping the lab's coordinator every second."""
    program = shutil.which("prometheus")
    if program is None:
        pytest.fail(
            "Debian's prometheus package is not installed (scripts/system-packages.txt)", pytrace=False
        )
    port = free_loopback_port()
    target = urllib.parse.urlsplit(lab3.metrics_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: picoord\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            program,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def wait_for(port: int, expression: str, want: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        try:
            result = query(port, expression)
        except OSError:
            result = []  # not listening yet
        if len(result) >= want:
            return result
        time.sleep(0.5)
    return result


def test_prometheus_finds_every_lab_nodes_series_and_the_services(
    lab3: Lab, prometheus: int, tmp_path: Path
) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    lab3.coordctl("apply", "-f", str(spec), check=True, timeout=120)
    nodes = set(lab3.nodes)
    assert len(nodes) == 3
    up = wait_for(prometheus, 'up{job="picoord"} == 1', 1)
    assert up, "Prometheus never scraped the coordinator"
    for name in NODE_QUERIES:
        result = wait_for(prometheus, f'count by (instance) ({name}{{job="picoord"}})', len(nodes))
        assert {series["metric"]["instance"] for series in result} == nodes, name
    nodenames = query(prometheus, 'node_uname_info{job="picoord"}')
    assert all(
        series["metric"]["nodename"] and series["metric"]["sysname"] == "Linux" for series in nodenames
    )
    for name in SERVICE_QUERIES:
        result = wait_for(prometheus, f'{name}{{job="picoord",service="hello"}}', 1)
        assert result, name
    replicas = {
        s["metric"]["state"]: float(s["value"][1])
        for s in query(prometheus, 'picoord_service_replicas{service="hello"}')
    }
    assert set(replicas) == {"desired", "running", "healthy"} and replicas["desired"] == 2
    statuses = query(prometheus, 'picoord_rollout_status{service="hello"} == 1')
    assert len(statuses) == 1
