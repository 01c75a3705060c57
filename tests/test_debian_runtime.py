"""The agent runs on Debian 12's own packages: what a Raspberry Pi on Raspberry Pi OS bookworm has.

scripts/build-debian-tree installs picoord with Debian's python, pip, setuptools and
protoc 3.21 only (offline: in a fresh network namespace when root) into a directory;
Debian's /usr/bin/python3 then imports it against python3-grpcio 1.51 and
python3-protobuf 3.21, and the agent from that tree enrolls with a coordinator running
from the venv (current PyPI grpcio/protobuf) and streams metrics to it.

Missing Debian packages fail these tests (never skip): CI installs them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from picoord.common import VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-debian-tree"
DEBIAN_PYTHON = "/usr/bin/python3"
DEBIAN_SITE = "/usr/lib/python3/dist-packages/"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
VENV_BIN = Path(sys.executable).parent  # the venv the tests (and the coordinator) run from
GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")

# What the agent imports from Debian: module -> (apt package, version prefix it must have).
# python3-protobuf 3.21.12 imports as google.protobuf 4.21.12.
DEBIAN_MODULES = {
    "grpc": ("python3-grpcio", "1.51."),
    "google.protobuf": ("python3-protobuf", "4.21."),
    "psutil": ("python3-psutil", "5.9."),
    "structlog": ("python3-structlog", "22."),
    "tenacity": ("python3-tenacity", "8."),
    "cryptography": ("python3-cryptography", "38."),
    "yaml": ("python3-yaml", "6."),
    "docker": ("python3-docker", "5."),
}
BUILD_PACKAGES = [
    "python3-pip",
    "python3-setuptools",
    "python3-wheel",
    "protobuf-compiler",
    "protobuf-compiler-grpc",
]
AGENT_MODULES = [
    "picoord.v1.node_pb2",
    "picoord.v1.agent_pb2",
    "picoord.v1.agent_pb2_grpc",
    "picoord.v1.admin_pb2",
    "picoord.v1.admin_pb2_grpc",
    "picoord.agent.cli",
    "picoord.agent.enroll",
    "picoord.agent.session",
]
# Run by Debian's python: where each module comes from and which version it is.
PROBE = """
import importlib, importlib.metadata, json, sys
distributions = importlib.metadata.packages_distributions()
report = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception as error:
        report[name] = {"error": f"{type(error).__name__}: {error}"}
        continue
    version = getattr(module, "__version__", "")
    if not version and distributions.get(name.split(".")[0]):
        version = importlib.metadata.version(distributions[name.split(".")[0]][0])
    report[name] = {"file": getattr(module, "__file__", None), "version": str(version),
                    "path": list(getattr(module, "__path__", []))}
json.dump(report, sys.stdout)
"""
JOIN_TIMEOUT = 60.0
READY_TIMEOUT = 30.0


def debian_env(tree: Path | None = None) -> dict[str, str]:
    """Environment for Debian's python: system PATH, no venv, no user site, only `tree` added."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env["PYTHONNOUSERSITE"] = "1"
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def probe(modules: list[str], tree: Path | None, cwd: Path) -> dict[str, dict[str, Any]]:
    """Import `modules` with Debian's python (and `tree` on its path): file, __path__ and version."""
    done = subprocess.run(
        [DEBIAN_PYTHON, "-s", "-c", PROBE, *modules],
        env=debian_env(tree),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{DEBIAN_PYTHON} probe failed:\n{done.stderr}"
    return dict(json.loads(done.stdout))


def source_generated_hashes() -> dict[str, str]:
    """sha256 of the checkout's own generated picoord.v1 modules (the venv's)."""
    package = REPO_ROOT / "proto" / "picoord" / "v1"
    paths = sorted(path for pattern in GENERATED_GLOBS for path in package.glob(pattern))
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def require_debian_runtime(cwd: Path) -> None:
    """Fail (not skip) with the apt command when Debian's python lacks a package the agent needs."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.fail(f"{DEBIAN_PYTHON} is missing: apt-get install python3", pytrace=False)
    report = probe(list(DEBIAN_MODULES), None, cwd)
    problems = []
    for name, (package, prefix) in DEBIAN_MODULES.items():
        seen = report[name]
        if "error" in seen:
            problems.append(f"{name} ({package}): {seen['error']}")
        elif not (seen["file"] or "").startswith(DEBIAN_SITE):
            problems.append(f"{name} ({package}) comes from {seen['file']}, not Debian's {DEBIAN_SITE}")
        elif not seen["version"].startswith(prefix):
            problems.append(f"{name} ({package}) is {seen['version']}, Debian 12 has {prefix}x")
    if problems:
        packages = " ".join(package for package, _ in DEBIAN_MODULES.values())
        pytest.fail(
            f"{DEBIAN_PYTHON} does not have Debian 12's packages:\n  "
            + "\n  ".join(problems)
            + f"\nInstall them with: apt-get install {packages} {' '.join(BUILD_PACKAGES)}",
            pytrace=False,
        )


@dataclass
class DebianTree:
    """picoord as installed by scripts/build-debian-tree, and what the build did."""

    path: Path
    build_seconds: float
    build_output: str
    source_before: dict[str, str]
    source_after: dict[str, str]


@pytest.fixture(scope="session")
def debian_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianTree]:
    """Built once per session with Debian's toolchain only, removed at the end."""
    work = tmp_path_factory.mktemp("debian-tree")
    try:
        require_debian_runtime(work)
        dest = work / "tree"
        command = [DEBIAN_PYTHON, str(BUILD_SCRIPT), str(dest)]
        if os.geteuid() == 0 and shutil.which("unshare"):
            command = ["unshare", "--net", "--", *command]  # prove it needs no network
        before = source_generated_hashes()
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        seconds = time.monotonic() - started
        if done.returncode:
            pytest.fail(
                f"scripts/build-debian-tree failed ({done.returncode}):\n{done.stdout}{done.stderr}",
                pytrace=False,
            )
        yield DebianTree(dest, seconds, done.stdout + done.stderr, before, source_generated_hashes())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_debian_tree_imports_on_debian_grpc_and_protobuf(debian_tree: DebianTree, scratch: Path) -> None:
    """Debian's python imports picoord.v1 and the agent from the tree, on grpc 1.51 and protobuf 4.21."""
    report = probe(["grpc", "google.protobuf", "picoord", *AGENT_MODULES], debian_tree.path, scratch)

    failed = {name: seen["error"] for name, seen in report.items() if "error" in seen}
    assert not failed, f"imports failed on Debian's runtime: {failed}"
    assert report["grpc"]["version"].startswith("1.51."), report["grpc"]
    assert report["google.protobuf"]["version"].startswith("4.21."), report["google.protobuf"]
    for name in ("grpc", "google.protobuf"):
        assert report[name]["file"].startswith(DEBIAN_SITE), report[name]
    for name in AGENT_MODULES:
        assert report[name]["file"].startswith(f"{debian_tree.path}/"), report[name]
    # picoord is a namespace package: no part of it may come from anywhere but the tree.
    assert report["picoord"]["path"] == [str(debian_tree.path / "picoord")], report["picoord"]


def test_debian_tree_is_generated_by_debian_protoc(debian_tree: DebianTree) -> None:
    """The tree's picoord.v1 comes from protoc 3.21, and its console scripts run Debian's python."""
    generated = sorted((debian_tree.path / "picoord" / "v1").glob("*_pb2*.py"))
    protos = sorted((REPO_ROOT / "proto" / "picoord" / "v1").glob("*.proto"))

    assert {path.name for path in generated} == {
        f"{proto.stem}{suffix}" for proto in protos for suffix in ("_pb2.py", "_pb2_grpc.py")
    }
    for path in generated:
        text = path.read_text()
        # Newer protocs (protobuf 5.26+) write modules that refuse an older runtime; 3.21 does not.
        assert "runtime_version" not in text, f"{path.name} was generated by a newer protoc"
        assert "Protobuf Python Version" not in text, f"{path.name} was generated by a newer protoc"
    assert "DO NOT EDIT" in (debian_tree.path / "picoord" / "v1" / "agent_pb2_grpc.py").read_text()
    script = (debian_tree.path / "bin" / "picoord-agent").read_text()
    assert script.startswith(f"#!{DEBIAN_PYTHON}\n"), script.splitlines()[0]


def test_debian_build_leaves_the_checkouts_generated_modules_alone(debian_tree: DebianTree) -> None:
    """The checkout's picoord.v1 (generated for the venv's protobuf) is not touched by the build."""
    assert debian_tree.source_before, "the checkout has no generated picoord.v1 modules to compare"
    assert debian_tree.source_after == debian_tree.source_before
    print(f"Debian tree built in {debian_tree.build_seconds:.1f}s: {debian_tree.build_output.strip()}")


# ---------------------------------------------------------------- end to end


def free_port_pair() -> int:
    """A loopback port P with P+1 free too (the coordinator's enrollment port)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two consecutive free loopback ports")


def free_port(avoid: set[int]) -> int:
    """A free loopback port not in `avoid`."""
    while True:
        with socket.socket() as probe_socket:
            probe_socket.bind(("127.0.0.1", 0))
            port = int(probe_socket.getsockname()[1])
        if port not in avoid:
            return port


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Processes:
    """Daemons started by a test; all stopped at teardown whatever happened."""

    started: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        """Start `argv` with stdout and stderr to `log`."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        self.started.append((process, log))
        return process

    def logs(self) -> str:
        """Every daemon's recent log lines."""
        return "\n".join(f"--- {log.name} (pid {p.pid}):\n{tail(log)}" for p, log in self.started)

    def stop_all(self) -> None:
        """SIGTERM, then SIGKILL after 10 s, each daemon this test started (by pid)."""
        for process, _ in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


@dataclass
class Coordinator:
    """A coordinator started from the venv on free loopback ports."""

    process: subprocess.Popen[bytes]
    address: str
    admin_socket: Path
    work: Path

    def ctl(self, *args: str, check: bool = True) -> Any:
        """`coordctl ARGS -o json` from the venv, parsed."""
        done = subprocess.run(
            [str(VENV_BIN / "coordctl"), *args, "-o", "json"],
            env={**os.environ, "COORDCTL_ADMIN_SOCKET": str(self.admin_socket)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode:
            if check:
                raise AssertionError(f"coordctl {' '.join(args)} failed: {done.stderr}")
            return None
        return json.loads(done.stdout)


def wait_for(what: str, probe_fn: Callable[[], Any], timeout: float, processes: Processes) -> Any:
    """Poll until `probe_fn` returns something truthy; fail with the daemons' logs otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe_fn()
        if last:
            return last
        for process, log in processes.started:
            if process.poll() is not None:
                pytest.fail(
                    f"{log.stem} exited ({process.returncode}) while waiting for {what}\n{processes.logs()}",
                    pytrace=False,
                )
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}\n{processes.logs()}")


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A work directory removed at teardown (it holds an agent's private key)."""
    work = tmp_path_factory.mktemp("debian-agent")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Daemons of one test, stopped at teardown even when it failed."""
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def coordinator(tmp_path_factory: pytest.TempPathFactory, processes: Processes) -> Iterator[Coordinator]:
    """The coordinator from the venv (current PyPI grpcio and protobuf), admin socket in its work dir."""
    work = tmp_path_factory.mktemp("coord")
    try:
        port = free_port_pair()
        metrics_port = free_port({port, port + 1})
        config = work / "coordinator.toml"
        config.write_text(
            "# this test's own settings: the host's /etc/picoord plays no part\n"
            f'node-cert-validity = "{DEBIAN_NODE_CERT_VALIDITY:g}s"\n'  # renewal in a test's time
        )
        admin_socket = work / "admin.sock"
        process = processes.start(
            [
                str(VENV_BIN / "picoord-coordinator"),
                "--config",
                str(config),
                "--state-dir",
                str(work / "state"),
                "--admin-socket",
                str(admin_socket),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--advertise-address",
                "127.0.0.1",
            ],
            work / "coordinator.log",
            dict(os.environ),
            work,
        )
        coordinator = Coordinator(process, f"127.0.0.1:{port}", admin_socket, work)
        wait_for(
            "the coordinator's admin socket",
            lambda: coordinator.ctl("nodes", check=False) is not None,
            30,
            processes,
        )
        yield coordinator
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def node_view(coordinator: Coordinator, name: str) -> dict[str, Any] | None:
    """The node's row in `coordctl nodes`, None when it is not listed."""
    return next((node for node in coordinator.ctl("nodes") if node["name"] == name), None)


DEBIAN_NODE_CERT_VALIDITY = 30.0


def test_agent_on_debian_runtime_enrolls_and_streams_metrics(
    debian_tree: DebianTree,
    coordinator: Coordinator,
    processes: Processes,
    scratch: Path,
) -> None:
    """An agent on Debian's packages joins a coordinator on PyPI's, turns Ready and streams metrics."""
    token = coordinator.ctl("token", "create", "--ttl", "1h")
    state_dir = scratch / "agent-state"
    config = scratch / "agent.toml"
    config.write_text("# this test's own settings: the host's /etc/picoord plays no part\n")
    # The console script Debian's pip wrote (#!/usr/bin/python3), run explicitly by that python.
    agent = [DEBIAN_PYTHON, "-s", str(debian_tree.path / "bin" / "picoord-agent"), "--config", str(config)]
    env = debian_env(debian_tree.path)

    joined = subprocess.run(
        [
            *agent,
            "join",
            coordinator.address,
            "--token",
            token["token"],
            "--ca-cert-hash",
            token["ca_cert_hash"],
            "--node-name",
            "debpi",
            "--state-dir",
            str(state_dir),
        ],
        env=env,
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
        check=False,
    )
    assert joined.returncode == 0, f"join failed:\n{joined.stdout}{joined.stderr}\n{processes.logs()}"
    assert "node debpi enrolled" in joined.stdout

    runner = processes.start(
        [*agent, "run", "--state-dir", str(state_dir), "--metrics-interval", "1"],
        scratch / "agent.log",
        env,
        scratch,
    )

    def ready() -> dict[str, Any] | None:
        node = node_view(coordinator, "debpi")
        return node if node and node["status"] == "Ready" and node["cpu_cores"] else None

    node = wait_for("debpi to be Ready with its hardware", ready, READY_TIMEOUT, processes)
    assert node["connected"] is True
    assert node["arch"] == platform.machine()
    assert node["cpu_cores"] >= 1
    assert node["memory_total_bytes"] > 0
    assert node["agent_version"] == VERSION

    # The running agent really is Debian's python with Debian's grpc and protobuf loaded.
    assert os.path.realpath(f"/proc/{runner.pid}/exe") == os.path.realpath(DEBIAN_PYTHON)
    mapped = Path(f"/proc/{runner.pid}/maps").read_text()
    assert f"{DEBIAN_SITE}grpc/_cython/cygrpc" in mapped
    assert str(VENV_BIN.parent) not in mapped, "the agent mapped a file from the venv"

    def metrics() -> list[dict[str, Any]] | None:
        samples = coordinator.ctl("node", "show", "debpi")["recent_metrics"]
        return samples if len(samples) >= 3 else None

    samples = wait_for("three metric samples from debpi", metrics, READY_TIMEOUT, processes)
    stamps = [sample["timestamp"] for sample in samples]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    assert int(samples[-1]["memory_total_bytes"]) == node["memory_total_bytes"]
    assert samples[-1]["cpus"], samples[-1]

    # SIGTERM (what systemd sends) ends the agent cleanly, and the coordinator notices.
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(15) == 0, processes.logs()
    wait_for(
        "debpi to be disconnected",
        lambda: node_view(coordinator, "debpi")["connected"] is False,
        READY_TIMEOUT,
        processes=Processes([entry for entry in processes.started if entry[0] is not runner]),
    )


def test_agent_on_debian_runtime_renews_its_certificate(
    debian_tree: DebianTree,
    coordinator: Coordinator,
    processes: Processes,
    scratch: Path,
) -> None:
    """Debian's grpc 1.51 and cryptography 38 renew the node's certificate over the session,
    and a restarted agent connects with the new one once the first has ended."""
    token = coordinator.ctl("token", "create", "--ttl", "1h")
    state_dir = scratch / "agent-state"
    config = scratch / "agent.toml"
    config.write_text("# this test's own settings: the host's /etc/picoord plays no part\n")
    agent = [DEBIAN_PYTHON, "-s", str(debian_tree.path / "bin" / "picoord-agent"), "--config", str(config)]
    env = debian_env(debian_tree.path)
    join = [*agent, "join", coordinator.address, "--token", token["token"]]
    join += ["--ca-cert-hash", token["ca_cert_hash"], "--node-name", "debpi", "--state-dir", str(state_dir)]
    joined = subprocess.run(join, env=env, cwd=scratch, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
    assert joined.returncode == 0, f"join failed:\n{joined.stdout}{joined.stderr}\n{processes.logs()}"
    first = coordinator.ctl("node", "show", "debpi")
    run = [*agent, "run", "--state-dir", str(state_dir), "--metrics-interval", "1"]
    log = scratch / "agent.log"
    runner = processes.start(run, log, env, scratch)
    wait_for(
        "debpi to renew its certificate",
        lambda: "certificate renewed; used from the next connection" in log.read_text(),
        DEBIAN_NODE_CERT_VALIDITY,
        processes,
    )
    renewed = coordinator.ctl("node", "show", "debpi")
    assert renewed["certificate_serial"] != first["certificate_serial"]
    assert renewed["certificate_not_after"] > first["certificate_not_after"]
    first_end = dt.datetime.fromisoformat(first["certificate_not_after"].replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, first_end + 1 - time.time()))
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(15) == 0, processes.logs()
    restarted_log = scratch / "agent-restarted.log"
    processes.start(run, restarted_log, env, scratch)
    wait_for(
        "debpi to come back with its renewed certificate",
        lambda: (node_view(coordinator, "debpi") or {}).get("status") == "Ready",
        READY_TIMEOUT,
        processes,
    )
    assert "expired" not in restarted_log.read_text()
