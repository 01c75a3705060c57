"""A whole picoord cluster on one machine: a coordinator on the host, an agent per namespace.

Why: end-to-end tests and demos need real processes talking gRPC over real addresses, and
they need to take nodes away and bring the coordinator back. `Lab` drives the real
`picoord-coordinator`, `coordctl` and `picoord-agent` executables through their CLIs only,
and records everything it starts in a JSON state file so that another process
(`picoord-lab down`) can clean up after it, even after a crash half-way through `up()`.

With `sandboxes=True` every Pi also gets its own mount and UTS namespace (a PiSandbox:
private /etc/ufw, /etc/fstab, docker and gluster state, /mnt, /srv) and its agent runs in
it; `services=("dockerd", "glusterd")` starts those daemons in every Pi before the agents.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from picoord.common.defaults import JOIN_TOKEN_ENV
from picoord.lab import arm64, netns
from picoord.lab.images import BUSYBOX, host_architecture, lab_images, multi_arch_images
from picoord.lab.netns import LabError, LabNetwork, require_root, tail
from picoord.lab.registry import Registry, dockerd_registry_args
from picoord.lab.sandbox import SERVICES, PiRack, PiSandbox, find_sandboxes

STATE_FILE = "lab.json"
INDEX_DIR = "index"  # LAB_ROOT/index/<id> holds the work dir of every lab not yet torn down
COORDINATOR = "coordinator"
REGISTRY = "registry"
REGISTRY_PORT = 5000
# The Docker Hub mirror of the arm64 Pis: their dockerd is the host's amd64 engine, which
# would take amd64 from a manifest list; this registry holds the arm64 images alone, as
# what an arm64 engine takes from the lab registry's lists.
REGISTRY_ARM64 = "registry-arm64"
REGISTRY_ARM64_PORT = 5001
COORDINATOR_PORT = 7443
_SUN_PATH_MAX = 107  # a unix socket path longer than this cannot be bound


@dataclass
class ProcessRecord:
    """One long-running process the lab started; enough to find and stop it from elsewhere."""

    name: str  # "coordinator" or the node name
    pid: int
    starttime: int  # /proc/PID/stat field 22: a recycled pid never gets our signal
    argv: list[str]
    log: str
    netns: str | None = None


@dataclass
class LabConfig:
    """What `up()` was asked for; saved so a loaded Lab restarts processes the same way."""

    coordinator_port: int = COORDINATOR_PORT
    metrics_port: int = 0  # 0: pick a free loopback port at up()
    log_level: str = "info"
    heartbeat_timeout: float | None = None
    down_timeout: float | None = None
    metrics_interval: float | None = 1.0
    coordinator_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    # Written to the lab's own coordinator.toml (--config), e.g. {"heartbeat_interval": 1}:
    # settings without a flag. The host's /etc/picoord/*.toml never reaches a lab.
    coordinator_config: dict[str, Any] = field(default_factory=dict)
    sandboxes: bool = False  # each Pi gets a PiSandbox and its agent runs inside it
    services: list[str] = field(default_factory=list)  # started in every sandbox: dockerd, glusterd
    registry: bool = False  # a docker-registry on the bridge with the stand-in images; Pis pull from it
    node_names: list[str] = field(default_factory=list)  # in place of pi1..piN
    arm64_nodes: list[str] = field(default_factory=list)  # Pis whose agent runs in the arm64 root
    arm64_root: list[str] = field(default_factory=list)  # its overlay lower dirs, top first
    faked_clocks: list[str] = field(default_factory=list)  # Pis whose agent runs under libfaketime


def executable(name: str, bin_dir: Path | None = None) -> Path:
    """The venv's own copy of a console script, so the lab runs the code under test."""
    path = (bin_dir or Path(sys.executable).parent) / name
    if not os.access(path, os.X_OK):
        raise LabError(f"{name} not found at {path}: install the project into this venv (pip install -e .)")
    return path


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")  # Debian's faketime


def faketime_argv(spec_file: Path, argv: Sequence[str]) -> list[str]:
    """argv run under libfaketime with the offset in `spec_file` (e.g. "-3d"), read again every
    second so a test moves a running process's clock. Only the wall clock moves: asyncio and
    gRPC's timers use the monotonic one."""
    if not LIBFAKETIME.exists():
        raise LabError(f"{LIBFAKETIME} not found: apt-get install faketime")
    return [
        "env",
        f"LD_PRELOAD={LIBFAKETIME}",
        f"FAKETIME_TIMESTAMP_FILE={spec_file}",
        "FAKETIME_CACHE_DURATION=1",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        *argv,
    ]


def _proc_starttime(pid: int) -> int | None:
    """Start time of a live (non-zombie) pid, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fmt_seconds(value: float) -> str:
    return f"{value:g}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise LabError(f"cannot write {value!r} to a TOML settings file")


def write_settings(path: Path, settings: Mapping[str, Any]) -> None:
    """A flat TOML file: the lab's own settings, so /etc/picoord on the host plays no part."""
    lines = [
        "# written by picoord-lab for this lab only",
        *(f"{k} = {_toml_value(v)}" for k, v in settings.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


class Lab:
    """One lab: a bridge, N namespaced Pis, a coordinator and an agent per Pi.

    Usable as a context manager (`with Lab() as lab: lab.up(3)`); `down()` always cleans up.
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        subnet: str | None = None,
        lab_id: str | None = None,
        bin_dir: Path | str | None = None,
        coordinator_port: int = COORDINATOR_PORT,
        log_level: str = "info",
        heartbeat_timeout: float | None = None,
        down_timeout: float | None = None,
        metrics_interval: float | None = 1.0,
        coordinator_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        coordinator_config: Mapping[str, Any] | None = None,
        ready_timeout: float = 60.0,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        sandboxes: bool = False,
        services: Sequence[str] = (),
        registry: bool = False,
        node_names: Sequence[str] = (),
        arm64_nodes: Sequence[str] = (),
        arm64_root: Sequence[Path | str] = (),
        faked_clocks: Sequence[str] = (),
    ) -> None:
        """`node_names` names the Pis (default pi1..piN; up() then takes as many Pis);
        `arm64_nodes` are Pis whose agent is the arm64 `picoord-agent` deb in a Debian arm64
        root (`arm64_root`: its overlay lower dirs, top first, see arm64.agent_root()), run
        chrooted in the Pi through qemu-user; they need sandboxes=True. `faked_clocks` are Pis
        whose agent (join and run) sees the time libfaketime gives it: see set_clock()."""
        if set(faked_clocks) & set(arm64_nodes):
            raise LabError("a faked clock is for the venv's agent, not an arm64 Pi's")
        unknown = [name for name in services if name not in SERVICES]
        if unknown:
            raise LabError(f"unknown lab service(s) {unknown}: known are {sorted(SERVICES)}")
        if services and not sandboxes:
            raise LabError("services run inside the Pis' sandboxes: pass sandboxes=True as well")
        if registry and "dockerd" not in services:
            raise LabError("the lab registry is for the Pis' dockerd: add the dockerd service")
        check_arm64_options(sandboxes, node_names, arm64_nodes, arm64_root)
        self.lab_id = lab_id or netns.new_lab_id(self._indexed_ids())
        self.work_dir = Path(work_dir) if work_dir else netns.LAB_ROOT / self.lab_id
        self.requested_subnet = subnet
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.config = LabConfig(
            coordinator_port=coordinator_port,
            log_level=log_level,
            heartbeat_timeout=heartbeat_timeout,
            down_timeout=down_timeout,
            metrics_interval=metrics_interval,
            coordinator_args=list(coordinator_args),
            agent_args=list(agent_args),
            coordinator_config=dict(coordinator_config or {}),
            sandboxes=sandboxes,
            services=list(services),
            registry=registry,
            node_names=list(node_names),
            arm64_nodes=list(arm64_nodes),
            arm64_root=[str(path) for path in arm64_root],
            faked_clocks=list(faked_clocks),
        )
        self.rack: PiRack | None = None
        self.ready_timeout = ready_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.network: LabNetwork | None = None
        self.processes: dict[str, ProcessRecord] = {}
        self.status = "new"  # new -> creating -> starting -> up -> down
        self.admin_socket = self._choose_admin_socket()
        self._popens: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ paths and names

    @property
    def state_path(self) -> Path:
        return self.work_dir / STATE_FILE

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def coordinator_state_dir(self) -> Path:
        return self.work_dir / "coordinator"

    @property
    def coordinator_config_path(self) -> Path:
        return self.work_dir / "coordinator.toml"

    @property
    def agent_config_path(self) -> Path:
        return self.work_dir / "agent.toml"

    @property
    def sandboxes_dir(self) -> Path:
        return self.work_dir / "sandboxes"

    def sandbox(self, node: str) -> PiSandbox:
        """The PiSandbox of a Pi (labs made with sandboxes=True)."""
        if self.rack is None:
            raise LabError(f"lab {self.lab_id} has no sandboxes: create it with sandboxes=True")
        return self.rack.sandbox(node)

    def in_pi(self, node: str, argv: Sequence[str]) -> list[str]:
        """argv that runs inside the Pi: its sandbox if it has one, else its network namespace."""
        if self.rack is not None:
            return self.sandbox(node).argv(argv)
        return netns.netns_argv(self.namespace(node), argv)

    def agent_state_dir(self, node: str) -> Path:
        return self.work_dir / "pis" / node

    def log_path(self, name: str, kind: str = "") -> Path:
        """Log of the coordinator, of a node's agent (`kind=""`) or of its join (`kind="join"`)."""
        if name in (COORDINATOR, REGISTRY, REGISTRY_ARM64):
            return self.logs_dir / f"{name}.log"
        return self.logs_dir / f"{name}-{kind or 'agent'}.log"

    def log_tail(self, name: str, lines: int = 40, kind: str = "") -> str:
        return tail(self.log_path(name, kind), lines)

    @property
    def nodes(self) -> list[str]:
        return [pi.node for pi in self.network.pis] if self.network else []

    @property
    def coordinator_address(self) -> str:
        """HOST:PORT the agents dial: the bridge's address, reachable from every namespace."""
        return f"{self._net().gateway}:{self.config.coordinator_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    @property
    def registry_address(self) -> str:
        """HOST:PORT of the lab registry: the bridge address, as a LAN registry would be."""
        return f"{self._net().gateway}:{REGISTRY_PORT}"

    @property
    def arm64_registry_address(self) -> str:
        """HOST:PORT of the arm64 Pis' Docker Hub mirror (labs with arm64 nodes and a registry)."""
        return f"{self._net().gateway}:{REGISTRY_ARM64_PORT}"

    def is_arm64(self, node: str) -> bool:
        return node in self.config.arm64_nodes

    def arm64_pi_dir(self, node: str) -> Path:
        """Where an arm64 Pi's root overlay lives (inside its sandbox dir)."""
        return self.sandboxes_dir / node

    def namespace(self, node: str) -> str:
        return self._net().pi(node).netns

    def address(self, node: str) -> str:
        return self._net().pi(node).address

    def spare_address(self) -> str:
        """An address of the lab's subnet that no Pi has: a virtual address for a stack."""
        return self._net().spare_address()

    def _net(self) -> LabNetwork:
        if self.network is None:
            raise LabError(f"lab {self.lab_id} has no network: call up() first")
        return self.network

    def _choose_admin_socket(self) -> Path:
        path = self.work_dir / "admin.sock"
        if len(str(path).encode()) > _SUN_PATH_MAX:  # long pytest tmp dirs
            path = netns.LAB_ROOT / f"{self.lab_id}.admin.sock"
        return path

    # ------------------------------------------------------------------ state file

    def _state(self) -> dict[str, Any]:
        return {
            "lab_id": self.lab_id,
            "status": self.status,
            "work_dir": str(self.work_dir),
            "admin_socket": str(self.admin_socket),
            "bin_dir": str(self.bin_dir),
            "network": self.network.to_dict() if self.network else None,
            "namespaces": [pi.netns for pi in self.network.pis] if self.network else [],
            "bridge": self.network.bridge if self.network else None,
            "coordinator_address": self.coordinator_address if self.network else None,
            "metrics_url": self.metrics_url,
            "config": asdict(self.config),
            "processes": {name: asdict(record) for name, record in self.processes.items()},
            "pids": {name: record.pid for name, record in self.processes.items()},
            "logs": str(self.logs_dir),
            "sandboxes": self.rack.describe() if self.rack else None,
        }

    def save(self) -> None:
        netns.write_json(self.state_path, self._state())

    @classmethod
    def load(cls, work_dir: Path | str) -> Lab:
        """Rebuild a Lab from its state file, e.g. to tear down one started by another process."""
        path = Path(work_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise LabError(f"no lab state at {path}") from error
        lab = cls.__new__(cls)
        lab.lab_id = data["lab_id"]
        lab.work_dir = Path(data["work_dir"])
        lab.requested_subnet = data["network"]["subnet"] if data.get("network") else None
        lab.bin_dir = Path(data["bin_dir"])
        lab.config = LabConfig(**data["config"])
        lab.ready_timeout, lab.start_timeout, lab.stop_timeout = 60.0, 30.0, 10.0
        lab.network = LabNetwork.from_dict(data["network"]) if data.get("network") else None
        lab.processes = {name: ProcessRecord(**rec) for name, rec in data.get("processes", {}).items()}
        lab.status = data["status"]
        lab.admin_socket = Path(data["admin_socket"])
        lab._popens = {}
        lab.rack = None
        if data.get("sandboxes") and lab.network is not None:
            lab.rack = PiRack.from_dict(lab.network, data["sandboxes"])
        return lab

    @staticmethod
    def _index_dir() -> Path:
        return netns.LAB_ROOT / INDEX_DIR

    @classmethod
    def _indexed_ids(cls) -> list[str]:
        try:
            return [entry.name for entry in cls._index_dir().iterdir()]
        except FileNotFoundError:
            return []

    def _index(self) -> None:
        self._index_dir().mkdir(parents=True, exist_ok=True)
        (self._index_dir() / self.lab_id).write_text(f"{self.work_dir}\n")

    def _unindex(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._index_dir() / self.lab_id).unlink()

    # ------------------------------------------------------------------ up / down

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self, nodes: int, labels: Mapping[str, Mapping[str, str]] | None = None) -> Lab:
        """Create the network, start the coordinator, enroll and start one agent per Pi, and
        wait until every node is Ready. On any failure (or Ctrl-C) everything is torn down
        before the error propagates; logs stay in the work dir."""
        require_root()
        if self.status not in ("new", "down"):
            raise LabError(f"lab {self.lab_id} is already {self.status}")
        for name in ("picoord-coordinator", "picoord-agent", "coordctl"):
            executable(name, self.bin_dir)
        try:
            self._create_network(nodes)
            self.status = "starting"
            self.save()
            self._create_sandboxes()
            if self.config.registry:
                self.start_registry()
            self.start_coordinator()
            self._enroll_all(labels or {})
            for node in self.nodes:
                self.start_agent(node)
            self.wait_ready()
            self.status = "up"
            self.save()
        except BaseException as error:
            try:
                self.down()
            except Exception as cleanup_error:  # the original error matters more; keep both
                error.add_note(f"and cleaning up after it failed too: {cleanup_error}")
            raise
        return self

    def _create_network(self, nodes: int) -> None:
        self.network = None  # a refused id or subnet below must not make down() touch anything
        with netns.host_lock():
            others = self._claimed_subnets()
            if netns.lab_names_in_use().get(self.lab_id) or self.lab_id in self._indexed_ids():
                raise LabError(f"lab id {self.lab_id} is already in use; pick another or omit it")
            if self.requested_subnet:
                netns.check_subnet_free(self.requested_subnet, others)
                subnet = self.requested_subnet
            else:
                subnet = netns.choose_subnet(others)
            self.network = netns.plan_network(self.lab_id, subnet, nodes, self.config.node_names)
            if not self.config.metrics_port:
                self.config.metrics_port = _free_loopback_port()
            self.status = "creating"
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # Recorded before anything exists, so a crash from here on is recoverable.
            self.save()
            self._index()
            netns.create_network(self.network)

    def _create_sandboxes(self) -> None:
        """Sandboxes and services for every Pi; recorded before they exist, so a crash from
        here on is recoverable by `picoord-lab down`."""
        if not self.config.sandboxes:
            self.rack = None
            return
        missing = sorted(set(self.config.arm64_nodes) - set(self.nodes))
        if missing:
            raise LabError(f"arm64_nodes {missing} are not Pis of this lab (its Pis: {self.nodes})")
        if self.config.arm64_nodes:
            arm64.ensure_binfmt()
        registry = self.config.registry
        arm64_args = {"dockerd": dockerd_registry_args(self.registry_address, self.arm64_registry_address)}
        self.rack = PiRack(
            self._net(),
            self.sandboxes_dir,
            self.config.services,
            logs_dir=self.logs_dir,
            service_timeout=self.start_timeout * 2,
            service_args={"dockerd": dockerd_registry_args(self.registry_address)} if registry else None,
            node_service_args={node: arm64_args for node in self.config.arm64_nodes} if registry else None,
        )
        self.save()
        self.rack.up()
        self.save()
        for node in self.config.arm64_nodes:
            self._mount_arm64_root(node)

    def _mount_arm64_root(self, node: str) -> None:
        """The Pi's own overlay of the arm64 root, inside its mount namespace (it goes with
        the namespace), with /proc, /sys, /dev, its docker dir and the lab's work dir; on
        top, this machine's own nft, iptables and keepalived (arm64.host_netfilter_layer)."""
        pi_dir = self.arm64_pi_dir(node)
        arm64.prepare_pi_dirs(pi_dir)
        tools = arm64.host_netfilter_layer(self.work_dir.absolute() / "arm64-netfilter")
        lower = [tools, *(Path(path) for path in self.config.arm64_root)]
        for argv in arm64.pi_root_commands(lower, pi_dir, [str(self.work_dir.absolute())]):
            self.sandbox(node).run(argv, timeout=60, check=True)

    def _claimed_subnets(self) -> list[str]:
        """Subnets of labs that are indexed but may not have their bridge up yet."""
        claimed = []
        for lab_id in self._indexed_ids():
            with contextlib.suppress(LabError, OSError, ValueError, KeyError, TypeError):
                other = Lab.load((self._index_dir() / lab_id).read_text().strip())
                if other.network and other.status != "down":
                    claimed.append(other.network.subnet)
        return claimed

    def down(self, remove_work_dir: bool = False) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove the network. Idempotent; works
        on a half-created lab and on a Lab loaded from another process's state file."""
        if self.status == "new" and self.network is None:
            return
        require_root()
        problems: list[str] = []
        for name in [name for name in self.processes if name != COORDINATOR]:
            self._stop(name, problems)  # agents first: they must not see a half-dead coordinator
        if self.rack is not None:
            try:
                self.rack.down()  # services, then whatever else runs inside, then the namespaces
            except LabError as error:
                problems.append(str(error))
        if COORDINATOR in self.processes:
            self._stop(COORDINATOR, problems)
        if self.network:
            try:
                netns.teardown_network(self.network)
            except LabError as error:
                problems.append(str(error))
        with contextlib.suppress(FileNotFoundError):
            if self.admin_socket.is_socket():
                self.admin_socket.unlink()
        if problems:
            self.save()
            raise LabError(f"lab {self.lab_id} did not come down cleanly: {'; '.join(problems)}")
        self.status = "down"
        self._unindex()
        if remove_work_dir:
            self._remove_work_dir()
        elif self.work_dir.exists():
            self.save()

    def _remove_work_dir(self) -> None:
        import shutil

        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ processes

    def _spawn(
        self, name: str, argv: list[str], log: Path, netns_name: str | None = None, node: str | None = None
    ) -> ProcessRecord:
        """Start and record a process: on the host, in `netns_name`, or inside Pi `node`."""
        if node is not None:
            argv = self.in_pi(node, argv)
            netns_name = self.namespace(node)
        elif netns_name:
            argv = netns.netns_argv(netns_name, argv)
        popen = netns.popen_logged(argv, log)
        starttime = _proc_starttime(popen.pid) or 0
        record = ProcessRecord(name, popen.pid, starttime, argv, str(log), netns_name)
        self._popens[popen.pid] = popen
        self.processes[name] = record
        self.save()
        return record

    def is_running(self, name: str) -> bool:
        """Whether the recorded process for `name` (a node or "coordinator") still runs."""
        record = self.processes.get(name)
        if record is None:
            return False
        popen = self._popens.get(record.pid)
        if popen is not None and popen.poll() is not None:
            return False
        return _proc_starttime(record.pid) == record.starttime

    def exit_code(self, name: str) -> int | None:
        """Exit status of a process this Lab object started, once it has exited."""
        record = self.processes.get(name)
        popen = self._popens.get(record.pid) if record else None
        return popen.poll() if popen else None

    def _signal(self, record: ProcessRecord, sig: signal.Signals) -> None:
        """Signal the process's group (its own session), so helpers it forked go too."""
        if _proc_starttime(record.pid) != record.starttime:
            return
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(record.pid) == record.pid:
                os.killpg(record.pid, sig)
            else:
                os.kill(record.pid, sig)

    def _wait_gone(self, record: ProcessRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        popen = self._popens.get(record.pid)
        while time.monotonic() < deadline:
            if popen is not None and popen.poll() is not None:
                return True
            if _proc_starttime(record.pid) != record.starttime:
                return True
            time.sleep(0.05)
        return False

    def _stop(self, name: str, problems: list[str] | None = None, timeout: float | None = None) -> None:
        record = self.processes.get(name)
        if record is None:
            return
        self._signal(record, signal.SIGTERM)
        if not self._wait_gone(record, self.stop_timeout if timeout is None else timeout):
            self._signal(record, signal.SIGKILL)
            if not self._wait_gone(record, 5.0) and problems is not None:
                problems.append(f"{name} (pid {record.pid}) survived SIGKILL")
        self._popens.pop(record.pid, None)

    def start_registry(self) -> None:
        """Debian's docker-registry on the bridge, filled with the stand-in images."""
        registry = self._start_registry_process(REGISTRY, self.registry_address)
        if not self.config.arm64_nodes:
            for image in lab_images(BUSYBOX.read_bytes(), host_architecture()):
                registry.push(image)
            return
        # Both architectures under each tag (manifest lists), and the arm64 Pis' mirror.
        busyboxes = {host_architecture(): BUSYBOX.read_bytes(), arm64.ARCH: arm64.busybox()}
        for image_list in multi_arch_images(busyboxes):
            registry.push_list(image_list)
        mirror = self._start_registry_process(REGISTRY_ARM64, self.arm64_registry_address)
        for image in lab_images(busyboxes[arm64.ARCH], arm64.ARCH):
            mirror.push(image)

    def _start_registry_process(self, name: str, address: str) -> Registry:
        registry = Registry(self.work_dir / name, address, self.log_path(name))
        self._spawn(name, registry.argv(), self.log_path(name))
        deadline = time.monotonic() + self.start_timeout
        while not registry.answers():
            if not self.is_running(name) or time.monotonic() > deadline:
                raise LabError(f"the lab registry {name} did not answer on {address}:\n{self.log_tail(name)}")
            time.sleep(0.1)
        return registry

    def start_coordinator(self) -> None:
        """Start the coordinator on the host (listening on the bridge address) and wait until
        its admin API answers."""
        if self.is_running(COORDINATOR):
            raise LabError(f"the coordinator of lab {self.lab_id} is already running")
        cfg = self.config
        argv = [
            str(executable("picoord-coordinator", self.bin_dir)),
            "--config",
            str(self.coordinator_config_path),
            "--listen",
            self.coordinator_address,
            "--admin-socket",
            str(self.admin_socket),
            "--metrics-listen",
            f"127.0.0.1:{cfg.metrics_port}",
            "--state-dir",
            str(self.coordinator_state_dir),
            "--log-level",
            cfg.log_level,
        ]
        if cfg.heartbeat_timeout is not None:
            argv += ["--heartbeat-timeout", _fmt_seconds(cfg.heartbeat_timeout)]
        if cfg.down_timeout is not None:
            argv += ["--down-timeout", _fmt_seconds(cfg.down_timeout)]
        argv += cfg.coordinator_args
        self.coordinator_state_dir.mkdir(parents=True, exist_ok=True)
        write_settings(self.coordinator_config_path, cfg.coordinator_config)
        with contextlib.suppress(FileNotFoundError):
            if self.admin_socket.is_socket():
                self.admin_socket.unlink()  # a stale socket from a killed coordinator
        self._spawn(COORDINATOR, argv, self.log_path(COORDINATOR))
        self._wait_coordinator()

    def _wait_coordinator(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.is_running(COORDINATOR):
                raise LabError(
                    f"the coordinator exited (code {self.exit_code(COORDINATOR)}) before its admin API "
                    f"answered; log {self.log_path(COORDINATOR)}:\n{self.log_tail(COORDINATOR)}"
                )
            if self.admin_socket.exists():
                done = self.coordctl("nodes", "-o", "json", timeout=10.0)
                if done.returncode == 0:
                    return
                last = (done.stderr or done.stdout).strip()
            time.sleep(0.2)
        raise LabError(
            f"the coordinator's admin API at {self.admin_socket} did not answer within "
            f"{self.start_timeout:g}s (last coordctl error: {last or 'socket never appeared'}); "
            f"log:\n{self.log_tail(COORDINATOR)}"
        )

    def stop_coordinator(self, graceful: bool = True) -> None:
        """SIGTERM (then SIGKILL) the coordinator; `graceful=False` kills it outright, like a crash."""
        record = self.processes.get(COORDINATOR)
        if record is None:
            return
        if graceful:
            self._stop(COORDINATOR)
        else:
            self._signal(record, signal.SIGKILL)
            self._wait_gone(record, 5.0)

    def restart_coordinator(self, graceful: bool = True) -> None:
        """Stop and start the coordinator with the same state dir; returns once its admin API
        answers (agents reconnect on their own: use wait_ready() to wait for them)."""
        self.stop_coordinator(graceful)
        self.start_coordinator()

    def create_token(self, uses: int = 1, ttl: str = "1h") -> dict[str, Any]:
        """`coordctl token create` as JSON: token, ca_cert_hash, join_command, expires_at."""
        data = self.coordctl_json("token", "create", "--ttl", ttl, "--uses", str(uses))
        for key in ("token", "ca_cert_hash"):
            if not isinstance(data, dict) or key not in data:
                raise LabError(f"`coordctl token create -o json` gave no {key!r}: {data!r}")
        return data

    def agent_settings(self) -> dict[str, Any]:
        """The lab's agent.toml: empty, except that a sandboxed agent is told where its Pi's
        dockerd listens (once the agent knows a `docker_socket` setting)."""
        from picoord.agent.cli import AGENT_SETTINGS  # the agent's own list of known keys

        settings: dict[str, Any] = {}
        if self.config.sandboxes and "docker_socket" in AGENT_SETTINGS:
            settings["docker_socket"] = PiSandbox.docker_socket
        return settings

    def clock_file(self, node: str) -> Path:
        """libfaketime's spec for the Pi's agent, read again every second (FAKETIME_TIMESTAMP_FILE)."""
        return self.work_dir / "clocks" / node

    def set_clock(self, node: str, offset: str) -> None:
        """Move a faked Pi's clock, also under a running agent: "-3d", "+10m", "+0" (right).
        Lab Pis share the machine's one clock; only the agent's own view of it moves."""
        if node not in self.config.faked_clocks:
            raise LabError(f"{node} has no faked clock: list it in faked_clocks")
        path = self.clock_file(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{offset}\n")

    def _agent(self, node: str | None = None) -> list[str]:
        """The agent executable with the lab's own settings file: the venv's, or on an arm64
        Pi the arm64 deb's /usr/bin/picoord-agent, chrooted in the Pi's root."""
        if not self.agent_config_path.exists():
            write_settings(self.agent_config_path, self.agent_settings())
        if node is not None and self.is_arm64(node):
            return arm64.chroot_argv(
                self.arm64_pi_dir(node), ["/usr/bin/picoord-agent", "--config", str(self.agent_config_path)]
            )
        agent = [str(executable("picoord-agent", self.bin_dir)), "--config", str(self.agent_config_path)]
        if node is not None and node in self.config.faked_clocks:
            if not self.clock_file(node).exists():
                self.set_clock(node, "+0")
            return faketime_argv(self.clock_file(node), agent)
        return agent

    def join_argv(self, ca_cert_hash: str, node_name: str, state_dir: Path | str, *extra: str) -> list[str]:
        """`picoord-agent join` against this lab's coordinator, without the token: pass that in
        the environment ($PICOORD_JOIN_TOKEN), or as `--token` in `extra` to try a bad one."""
        return [
            *self._agent(node_name),
            "join",
            self.coordinator_address,
            "--ca-cert-hash",
            ca_cert_hash,
            f"--node-name={node_name}",  # the = form, so even a name like "-pi" reaches the validator
            "--state-dir",
            str(state_dir),
            *extra,
        ]

    def _join_command(
        self, node: str, token: Mapping[str, Any], labels: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """argv and environment of `picoord-agent join`: the token travels in the environment,
        so it never shows in `ps` while the join runs."""
        label_args = [word for key, value in labels.items() for word in ("--label", f"{key}={value}")]
        argv = self.join_argv(str(token["ca_cert_hash"]), node, self.agent_state_dir(node), *label_args)
        return self.in_pi(node, argv), {JOIN_TOKEN_ENV: str(token["token"])}

    def _enroll_all(self, labels: Mapping[str, Mapping[str, str]]) -> None:
        """Run every `picoord-agent join` at once (each in its Pi) and wait for all of them."""
        token = self.create_token(uses=len(self.nodes))
        running: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for node in self.nodes:
                self.agent_state_dir(node).mkdir(parents=True, exist_ok=True)
                log = self.log_path(node, "join")
                argv, env = self._join_command(node, token, labels.get(node, {}))
                running[node] = netns.popen_logged(argv, log, env)
            deadline = time.monotonic() + self.start_timeout
            for node, popen in running.items():
                try:
                    code = popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise LabError(
                        f"`picoord-agent join` for {node} did not finish within {self.start_timeout:g}s; "
                        f"log:\n{self.log_tail(node, kind='join')}"
                    ) from None
                if code != 0:
                    raise LabError(
                        f"`picoord-agent join` for {node} exited {code}; "
                        f"log {self.log_path(node, 'join')}:\n{self.log_tail(node, kind='join')}"
                    )
        finally:
            for popen in running.values():
                if popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait(timeout=5)

    def join_agent(self, node: str, labels: Mapping[str, str] | None = None) -> None:
        """Enroll one Pi again with a fresh one-use token (e.g. after `coordctl node remove`)."""
        token = self.create_token(uses=1)
        argv, env = self._join_command(node, token, labels or {})
        log = self.log_path(node, "join")
        popen = netns.popen_logged(argv, log, env)
        try:
            code = popen.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5)
            raise LabError(f"`picoord-agent join` for {node} timed out; log:\n{tail(log)}") from None
        if code != 0:
            raise LabError(f"`picoord-agent join` for {node} exited {code}; log:\n{tail(log)}")

    def start_agent(self, node: str) -> None:
        """Start `picoord-agent run` inside the Pi's namespace (the Pi must have joined)."""
        if self.is_running(node):
            raise LabError(f"the agent on {node} is already running (pid {self.processes[node].pid})")
        argv = [
            *self._agent(node),
            "run",
            "--state-dir",
            str(self.agent_state_dir(node)),
        ]
        if self.config.metrics_interval is not None:
            argv += ["--metrics-interval", _fmt_seconds(self.config.metrics_interval)]
        argv += self.config.agent_args
        self._spawn(node, argv, self.log_path(node), node=node)

    def kill_agent(self, node: str, graceful: bool = False) -> None:
        """Take a Pi's agent away: SIGKILL by default (a crash or power cut, no goodbye), or
        `graceful=True` for SIGTERM as systemd would send it."""
        record = self.processes.get(node)
        if record is None:
            raise LabError(f"no agent was started on {node!r}")
        if graceful:
            self._stop(node)
        else:
            self._signal(record, signal.SIGKILL)
            self._wait_gone(record, 5.0)
            self._popens.pop(record.pid, None)

    # ------------------------------------------------------------------ coordctl and waiting

    def coordctl(
        self, *args: str, check: bool = False, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `coordctl --admin-socket <lab socket> ARGS...` and capture its output."""
        argv = [str(executable("coordctl", self.bin_dir)), "--admin-socket", str(self.admin_socket), *args]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
                env=netns.lab_env(),
            )
        except subprocess.TimeoutExpired as error:
            raise LabError(f"`coordctl {' '.join(args)}` did not finish within {timeout:g}s") from error
        if check and done.returncode != 0:
            raise LabError(
                f"`coordctl {' '.join(args)}` exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def coordctl_json(self, *args: str, timeout: float = 30.0) -> Any:
        """Run coordctl with `-o json` (added unless given) and parse what it prints."""
        if "-o" not in args and "--output" not in args:
            args = (*args, "-o", "json")
        done = self.coordctl(*args, check=True, timeout=timeout)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as error:
            raise LabError(f"`coordctl {' '.join(args)}` printed no JSON: {done.stdout[:500]!r}") from error

    def node_statuses(self) -> dict[str, str]:
        """name -> status as `coordctl nodes -o json` reports them."""
        listing = self.coordctl_json("nodes")
        if not isinstance(listing, list):
            raise LabError(f"`coordctl nodes -o json` did not print a list: {listing!r}")
        return {str(item.get("name")): str(item.get("status")) for item in listing if isinstance(item, dict)}

    def wait_for_status(
        self, status: str = "Ready", nodes: Sequence[str] | None = None, timeout: float | None = None
    ) -> dict[str, str]:
        """Poll `coordctl nodes` until every one of `nodes` (default all) shows `status`.

        Fails early, with the agent's log, if an agent that should be Ready has exited."""
        wanted = list(nodes) if nodes is not None else self.nodes
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        error = ""
        while True:
            if status == "Ready":
                for node in wanted:
                    if node in self.processes and not self.is_running(node):
                        raise LabError(
                            f"the agent on {node} exited (code {self.exit_code(node)}) before it was Ready; "
                            f"log {self.log_path(node)}:\n{self.log_tail(node)}"
                        )
            try:
                statuses = self.node_statuses()
                error = ""
            except LabError as failure:
                error = str(failure)
            if not error and all(statuses.get(node) == status for node in wanted):
                return statuses
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        late = [node for node in wanted if statuses.get(node) != status]
        logs = "\n".join(
            f"--- {node} agent log ({self.log_path(node)}):\n{self.log_tail(node)}" for node in late
        )
        raise LabError(
            f"after {timeout:g}s, {late} not {status}: coordctl nodes says {statuses}"
            f"{f' (last error: {error})' if error else ''}\n{logs}\n"
            f"--- coordinator log:\n{self.log_tail(COORDINATOR, 20)}"
        )

    def wait_ready(self, nodes: Sequence[str] | None = None, timeout: float | None = None) -> dict[str, str]:
        return self.wait_for_status("Ready", nodes, timeout)

    def exec_in(self, node: str, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a short command inside a Pi (its sandbox if it has one), e.g.
        `lab.exec_in("pi1", "ip", "addr")`."""
        if self.rack is not None:
            return self.sandbox(node).run(argv, timeout)
        return netns.run_in_netns(self.namespace(node), argv, timeout)

    def describe(self) -> dict[str, Any]:
        """State plus liveness, for `picoord-lab status`."""
        state = self._state()
        state["running"] = {name: self.is_running(name) for name in self.processes}
        state["network_present"] = bool(self.network and netns.remaining(self.network))
        return state


def check_arm64_options(
    sandboxes: bool, node_names: Sequence[str], arm64_nodes: Sequence[str], arm64_root: Sequence[Path | str]
) -> None:
    """Refuse arm64 options that cannot work, naming the option, before anything is made."""
    if isinstance(node_names, str) or isinstance(arm64_nodes, str):
        raise LabError("node_names and arm64_nodes are lists of node names, not one string")
    if not arm64_nodes:
        if arm64_root:
            raise LabError("arm64_root is given but no arm64_nodes use it")
        return
    if not sandboxes:
        raise LabError("arm64_nodes run their agent in a root mounted in their sandbox: pass sandboxes=True")
    if len(set(arm64_nodes)) != len(arm64_nodes):
        raise LabError(f"arm64_nodes {list(arm64_nodes)!r} names a Pi twice")
    if node_names and set(arm64_nodes) - set(node_names):
        raise LabError(f"arm64_nodes {sorted(set(arm64_nodes) - set(node_names))} are not in node_names")
    if not arm64_root:
        raise LabError("arm64_nodes need arm64_root: the overlay lower dirs from arm64.agent_root()")
    for path in arm64_root:
        if not (Path(path) / "usr").is_dir():
            raise LabError(f"arm64_root: {path} is not a root file system layer (no usr/ in it)")


def known_labs() -> Iterator[Path]:
    """Work dirs of every lab started on this host and not yet torn down."""
    index = netns.LAB_ROOT / INDEX_DIR
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(index.iterdir()):
            yield Path(entry.read_text().strip())


def sweep_orphans(lab_ids: Iterable[str] | None = None) -> list[str]:
    """Remove sandboxes, namespaces and interfaces of lab ids that no index entry claims
    (crash leftovers); `lab_ids` limits the sweep to those ids."""
    require_root()
    claimed = set(Lab._indexed_ids())
    only = set(lab_ids) if lab_ids is not None else None

    def orphaned(lab_id: str | None) -> bool:
        return lab_id is not None and lab_id not in claimed and (only is None or lab_id in only)

    claimed_dirs = []
    for lab_id in claimed:
        with contextlib.suppress(OSError):
            claimed_dirs.append((Lab._index_dir() / lab_id).read_text().strip())
    swept = []
    for sandbox in find_sandboxes():
        lab_id = netns.lab_id_of(sandbox.netns)
        unknown = lab_id is None and only is None  # marker lost: orphaned unless in a live lab's dir
        if unknown and any(str(sandbox.root).startswith(f"{d}/") for d in claimed_dirs):
            continue
        if unknown or orphaned(lab_id):
            sandbox.destroy()
            swept.append(f"sandbox {sandbox.name} ({sandbox.root})")
    for lab_id, names in netns.lab_names_in_use().items():
        if not orphaned(lab_id):
            continue
        netns.teardown_network(netns.orphaned_network(lab_id))
        swept += names
    return swept
