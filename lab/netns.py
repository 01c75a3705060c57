"""Network primitives of the lab: one host bridge, one network namespace per "Pi".

Why: without Raspberry Pis at hand, each Pi is a network namespace with its own address on
a private bridge, so agents dial the coordinator over a real IP path. The lab is an island:
nothing here adds a default route, enables forwarding or sets up NAT, so a packet sent from
a namespace can only reach the host's bridge address or another namespace of the same lab.

Every name carries a short lab id (`pcl<id>-pi1`, bridge `pcl<id>br`, host veth
`pcl<id>h1`), so two labs, or the leftovers of a crashed one, never collide. Teardown works
from the planned names alone, so it is idempotent and safe after a half-way creation.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from picoord.agent.commands import CommandResult, run_command
from picoord.common.names import validate_node_name

LAB_ROOT = Path(os.environ.get("PICOORD_LAB_ROOT", "/run/picoord-lab"))
# Each lab takes one /24 from this pool unless given a subnet; 10.213/16 is rarely used.
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
LAB_PREFIXLEN = 24
# Pi N gets host address number N + PI_ADDRESS_OFFSET (pi1 = .11 in a /24): easy to read in logs.
PI_ADDRESS_OFFSET = 10
PI_INTERFACE = "eth0"  # the Pi's side of its veth, named like a real Pi's NIC
IP_TIMEOUT = 15.0
IFNAMSIZ = 15  # longest Linux interface name
NETNS_DIR = Path("/run/netns")
SYS_CLASS_NET = Path("/sys/class/net")

_LAB_ID = re.compile(r"^[0-9a-f]{4}$")
_LAB_NAME = re.compile(r"^pcl([0-9a-f]{4})(?:br|h\d+|-pi\d+)$")
# Environment variables that would make gRPC or HTTP clients in the lab dial a proxy,
# i.e. send packets out of the lab. Children never inherit them.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy")


class LabError(RuntimeError):
    """The lab could not be created, used or torn down; the message says what to do."""


class LabNeedsRoot(LabError):
    """Raised before anything is touched when the lab is used without root."""


def require_root() -> None:
    """Refuse early and clearly: half-created namespaces are worse than none."""
    if os.geteuid() != 0:
        raise LabNeedsRoot(
            "the lab needs root: it creates network namespaces, veth pairs and a bridge "
            f"(ip netns add, ip link add) and runs agents inside them; effective uid is {os.geteuid()}. "
            "Run it as root, e.g. `sudo picoord-lab up --nodes 3`."
        )


@dataclass(frozen=True)
class PiNet:
    """The network identity of one stand-in Pi."""

    node: str  # node name the agent enrolls with, e.g. "pi1"
    netns: str  # namespace name, e.g. "pcl1a2b-pi1"
    veth_host: str  # host end of the veth pair, enslaved to the bridge
    address: str  # the Pi's address on the lab subnet (without prefix length)


@dataclass(frozen=True)
class LabNetwork:
    """The planned (and, after create_network, real) network of one lab."""

    lab_id: str
    subnet: str
    bridge: str
    gateway: str
    pis: tuple[PiNet, ...]

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def spare_address(self) -> str:
        """An address of the subnet that no Pi and not the bridge has: for a virtual address
        (a stack's `--address`). Pis take the low addresses; this is near the top."""
        taken = {pi.address for pi in self.pis} | {self.gateway.split("/")[0]}
        hosts = list(ipaddress.IPv4Network(self.subnet).hosts())
        return next(str(host) for host in reversed(hosts[:-9]) if str(host) not in taken)

    def pi(self, node: str) -> PiNet:
        for pi in self.pis:
            if node in (pi.node, pi.netns):
                return pi
        raise LabError(f"lab {self.lab_id} has no Pi named {node!r} (it has {[p.node for p in self.pis]})")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pis"] = [asdict(pi) for pi in self.pis]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabNetwork:
        pis = tuple(PiNet(**pi) for pi in data["pis"])
        return cls(data["lab_id"], data["subnet"], data["bridge"], data["gateway"], pis)


def _name_prefix(lab_id: str) -> str:
    return f"pcl{lab_id}"


def bridge_name(lab_id: str) -> str:
    return f"{_name_prefix(lab_id)}br"


def plan_network(lab_id: str, subnet: str, nodes: int, names: Sequence[str] = ()) -> LabNetwork:
    """Name and address everything up front, so teardown never depends on what got created.

    Pi N is node `piN` unless `names` gives its node name (e.g. "ubuntu-desktop"); its
    interfaces and namespace keep the index, so they stay short and unique."""
    if not _LAB_ID.match(lab_id):
        raise LabError(f"invalid lab id {lab_id!r}: use 4 lowercase hex digits")
    if nodes < 1:
        raise LabError(f"a lab needs at least one Pi, got {nodes}")
    network = validate_subnet(subnet)
    hosts = list(network.hosts())
    if len(hosts) < nodes + PI_ADDRESS_OFFSET + 1:
        raise LabError(
            f"subnet {network} is too small for {nodes} Pis: Pi N takes host address N+{PI_ADDRESS_OFFSET}"
        )
    node_names = check_node_names(names, nodes)
    prefix = _name_prefix(lab_id)
    pis = tuple(
        PiNet(
            node=node_names[n - 1],
            netns=f"{prefix}-pi{n}",
            veth_host=f"{prefix}h{n}",
            address=str(hosts[n + PI_ADDRESS_OFFSET - 1]),
        )
        for n in range(1, nodes + 1)
    )
    for name in (bridge_name(lab_id), *(pi.veth_host for pi in pis)):
        if len(name) > IFNAMSIZ:
            raise LabError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return LabNetwork(lab_id, str(network), bridge_name(lab_id), str(hosts[0]), pis)


def check_node_names(names: Sequence[str], nodes: int) -> list[str]:
    """The node names of `nodes` Pis: `names` if given (one per Pi, distinct, valid node
    names), else pi1..piN."""
    if not names:
        return [f"pi{n}" for n in range(1, nodes + 1)]
    if isinstance(names, str) or len(names) != nodes:
        raise LabError(f"node names {list(names)!r}: give exactly one name for each of the {nodes} Pis")
    for name in names:
        try:
            validate_node_name(name)
        except ValueError as error:
            raise LabError(f"node names: {error}") from None
    if len(set(names)) != len(names):
        raise LabError(f"node names {list(names)!r}: each Pi needs its own name")
    return list(names)


def validate_subnet(subnet: str) -> ipaddress.IPv4Network:
    """Only private IPv4 ranges: a lab route must never shadow a real address on the host."""
    try:
        network = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as error:
        raise LabError(f"invalid lab subnet {subnet!r}: {error} (use e.g. 10.213.7.0/24)") from error
    if not network.is_private or network.is_loopback or network.is_link_local or network.prefixlen < 16:
        raise LabError(
            f"lab subnet {network} must be a private IPv4 range no larger than a /16, "
            "not loopback or link-local (e.g. 10.213.7.0/24)"
        )
    return network


# --------------------------------------------------------------------------- host state


def _ip(*args: str, netns: str | None = None) -> CommandResult:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return run_command(argv, timeout=IP_TIMEOUT)


def _ip_checked(*args: str, netns: str | None = None) -> str:
    result = _ip(*args, netns=netns)
    if not result.ok:
        where = f" in namespace {netns}" if netns else ""
        reason = result.stderr.strip() or f"exit code {result.exit_code}"
        raise LabError(f"`{' '.join(result.argv)}` failed{where}: {reason}")
    return result.stdout


def namespace_exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def link_exists(name: str) -> bool:
    """Whether an interface of that name exists in the host's namespace."""
    return (SYS_CLASS_NET / name).exists()


def list_namespaces() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def list_links() -> list[str]:
    return sorted(entry.name for entry in SYS_CLASS_NET.iterdir())


def lab_id_of(name: str) -> str | None:
    """The lab id in a namespace or interface name of a lab, None for any other name."""
    match = _LAB_NAME.match(name)
    return match.group(1) if match else None


def lab_names_in_use() -> dict[str, list[str]]:
    """Namespaces and host interfaces that look like any lab's, keyed by lab id."""
    found: dict[str, list[str]] = {}
    for name in [*list_namespaces(), *list_links()]:
        match = _LAB_NAME.match(name)
        if match:
            found.setdefault(match.group(1), []).append(name)
    return found


def host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 network the host already routes or owns, with a description for errors."""
    networks: list[tuple[ipaddress.IPv4Network, str]] = []
    routes = json.loads(_ip_checked("-j", "-4", "route", "show", "table", "all") or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or dst.startswith("0.0.0.0/0"):
            continue  # the default route covers everything; it is not a collision
        with contextlib.suppress(ValueError):
            where = f"route {dst} dev {route.get('dev', '?')} table {route.get('table', 'main')}"
            networks.append((ipaddress.IPv4Network(dst, strict=False), where))
    for link in json.loads(_ip_checked("-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                net = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                networks.append((net, f"address {info['local']}/{info['prefixlen']} on {link['ifname']}"))
    return networks


def check_subnet_free(subnet: str, claimed: Iterable[str] = ()) -> None:
    """Refuse a subnet that overlaps anything the host routes or another lab has claimed."""
    network = validate_subnet(subnet)
    for other, where in host_networks():
        if network.overlaps(other):
            raise LabError(f"lab subnet {network} collides with the host's {where}; choose another --subnet")
    for other in claimed:
        if network.overlaps(ipaddress.IPv4Network(other)):
            raise LabError(f"lab subnet {network} is already claimed by another lab ({other})")


def choose_subnet(claimed: Iterable[str] = ()) -> str:
    """The first /24 of the pool that collides with nothing the host routes and no other lab."""
    taken = [net for net, _ in host_networks()] + [ipaddress.IPv4Network(c) for c in claimed]
    for candidate in SUBNET_POOL.subnets(new_prefix=LAB_PREFIXLEN):
        if not any(candidate.overlaps(other) for other in taken):
            return str(candidate)
    raise LabError(f"no free /{LAB_PREFIXLEN} left in {SUBNET_POOL}; pass --subnet or tear down old labs")


def new_lab_id(taken: Iterable[str] = ()) -> str:
    """A random 4-hex-digit id that no namespace, interface or known lab uses yet."""
    used = set(lab_names_in_use()) | set(taken)
    for _ in range(1000):
        candidate = secrets.token_hex(2)
        if candidate not in used:
            return candidate
    raise LabError("could not find an unused lab id; tear down old labs with `picoord-lab down --all`")


@contextlib.contextmanager
def host_lock(root: Path = LAB_ROOT) -> Iterator[None]:
    """Serialise id/subnet choice and creation between labs started at the same moment."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- create / teardown


def create_network(net: LabNetwork) -> None:
    """Create the bridge and every Pi's namespace; raises on the first failure, leaving what
    exists so the caller's teardown_network(net) can remove it."""
    require_root()
    hint = "a leftover lab? try `picoord-lab down --all`"
    for pi in net.pis:
        if namespace_exists(pi.netns):
            raise LabError(f"namespace {pi.netns} already exists ({hint})")
    if link_exists(net.bridge):
        raise LabError(f"interface {net.bridge} already exists ({hint})")
    # No STP: ports forward at once. addrgenmode none: no IPv6 link-local chatter on the lab.
    _ip_checked("link", "add", net.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    _ip_checked("link", "set", "dev", net.bridge, "addrgenmode", "none")
    _ip_checked("addr", "add", f"{net.gateway}/{net.prefixlen}", "dev", net.bridge)
    _ip_checked("link", "set", "dev", net.bridge, "up")
    for pi in net.pis:
        _create_pi(net, pi)


def _create_pi(net: LabNetwork, pi: PiNet) -> None:
    _ip_checked("netns", "add", pi.netns)
    # The peer is born inside the namespace, so its name never meets the host's eth0.
    _ip_checked("link", "add", pi.veth_host, "type", "veth", "peer", "name", PI_INTERFACE, "netns", pi.netns)
    _ip_checked("link", "set", "dev", pi.veth_host, "addrgenmode", "none")
    _ip_checked("link", "set", "dev", pi.veth_host, "master", net.bridge)
    _ip_checked("link", "set", "dev", pi.veth_host, "up")
    _ip_checked("link", "set", "dev", "lo", "up", netns=pi.netns)
    _ip_checked("link", "set", "dev", PI_INTERFACE, "addrgenmode", "none", netns=pi.netns)
    _ip_checked("addr", "add", f"{pi.address}/{net.prefixlen}", "dev", PI_INTERFACE, netns=pi.netns)
    _ip_checked("link", "set", "dev", PI_INTERFACE, "up", netns=pi.netns)


def namespace_pids(netns: str) -> list[int]:
    """Processes living in the namespace (all started by the lab: the namespace is its own)."""
    if not namespace_exists(netns):
        return []
    result = _ip("netns", "pids", netns)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def kill_namespace_processes(netns: str, timeout: float = 5.0) -> list[int]:
    """SIGTERM whatever still runs in the namespace, SIGKILL it after `timeout`.

    A namespace with a process inside outlives `ip netns del`, so teardown sweeps it."""
    pids = namespace_pids(netns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            _reap(pids)
            time.sleep(0.05)
        if not any(_running(pid) for pid in pids):
            break
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here may be slow to reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _reap(pids: Iterable[int]) -> None:
    """Collect those of `pids` that are our own exited children, so they stop being zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def teardown_network(net: LabNetwork, process_timeout: float = 5.0) -> None:
    """Remove processes, namespaces, veths and the bridge of `net`; idempotent.

    Raises LabError naming whatever is still there afterwards."""
    require_root()
    problems: list[str] = []
    for pi in net.pis:
        kill_namespace_processes(pi.netns, process_timeout)
        # Deleting the host end deletes the pair at once; a namespace's own
        # cleanup of its end is asynchronous.
        if link_exists(pi.veth_host):
            _delete(problems, "link", "del", "dev", pi.veth_host)
        if namespace_exists(pi.netns):
            _delete(problems, "netns", "del", pi.netns)
    if link_exists(net.bridge):
        _delete(problems, "link", "del", "dev", net.bridge)
    leftovers = remaining(net)
    if leftovers:
        why = "; ".join(problems) or "no error given"
        raise LabError(f"teardown of lab {net.lab_id} left {leftovers}: {why}")


def _delete(problems: list[str], *args: str) -> None:
    result = _ip(*args)
    gone = ("Cannot find device", "No such file", "does not exist")
    if not result.ok and not any(text in result.stderr for text in gone):
        problems.append(f"`{' '.join(result.argv)}`: {result.stderr.strip()}")


def remaining(net: LabNetwork) -> list[str]:
    """Which of the lab's namespaces and interfaces still exist (empty after teardown)."""
    left = [pi.netns for pi in net.pis if namespace_exists(pi.netns)]
    left += [name for name in (*(pi.veth_host for pi in net.pis), net.bridge) if link_exists(name)]
    return left


def orphaned_network(lab_id: str) -> LabNetwork:
    """A network plan covering whatever a lab id left behind, for sweeping after a crash."""
    prefix = _name_prefix(lab_id)
    numbers: set[int] = set()
    for name in lab_names_in_use().get(lab_id, []):
        match = re.match(rf"^{prefix}(?:h|-pi)(\d+)$", name)
        if match:
            numbers.add(int(match.group(1)))
    pis = tuple(PiNet(f"pi{n}", f"{prefix}-pi{n}", f"{prefix}h{n}", "") for n in sorted(numbers))
    return LabNetwork(lab_id, "", bridge_name(lab_id), "", pis)


# --------------------------------------------------------------------------- processes


def lab_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for lab processes: unbuffered logs, and no proxy that would lead out."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in _PROXY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """`ip netns exec` execs the program, so the child's pid is the program's pid."""
    if isinstance(argv, str) or not argv:
        raise TypeError("argv must be a non-empty list of strings, never a shell string")
    return ["ip", "netns", "exec", netns, *argv]


def run_in_netns(
    netns: str, argv: Sequence[str], timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command inside a Pi and capture its output (whole, unlike run_command)."""
    return subprocess.run(
        netns_argv(netns, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=lab_env(env),
    )


def popen_logged(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running process detached (own session) with stdout+stderr appended to a log.

    Its own session lets the lab signal the whole process group and lets `picoord-lab up`
    return while the cluster keeps running."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {redacted(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=lab_env(env),
        )


def redacted(argv: Sequence[str]) -> list[str]:
    """argv fit for a log: the value after --token is a secret, even a short-lived one."""
    shown = list(argv)
    for index, word in enumerate(shown[:-1]):
        if word == "--token":
            shown[index + 1] = "<redacted>"
    return shown


def popen_in_netns(
    netns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return popen_logged(netns_argv(netns, argv), log_path, env)


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log file, for error messages that explain themselves."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def write_json(path: Path, data: Any) -> None:
    """Atomic write, so a concurrent `picoord-lab status` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)
