"""Published ports answered on every node, forwarded in the kernel (kube-proxy's nftables
mode in picoord's terms; docs/service-ports.md).

The coordinator sends every node every published port with its healthy replicas
(NodeAssignment.service_ports). `ruleset` (pure) renders one nftables table, `ip
picoord_ports`, that

- DNATs a published port arriving for any local address (`fib daddr type local`: the node's
  own address, and a VIP keepalived makes local) in prerouting, and the node's own
  connections to it in output, to one of the endpoints picked by `numgen random`;
- reaches a replica on this node straight at its container address (Docker's own DNAT
  would not run: conntrack binds one NAT per connection, and ours, at dstnat - 10, is first);
- reaches a replica on another node at that node's endpoint port, with a conntrack mark that
  masquerades the connection (so replies come back through this node) and that Docker's
  DOCKER-USER chain lets through its FORWARD policy (`forward_rule`);
- drops connections to the endpoint ports on this node's cluster address from anything but
  another node (the endpoints are the mesh's, not the LAN's).

`apply` loads it with one `nft -f -` (one transaction: the old table goes and the new one
comes, or nothing changes). No published port at all: the table is deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

from picoord.agent.commands import CommandResult, run_command
from picoord.common import limits
from picoord.v1 import workloads_pb2

TABLE = "picoord_ports"
REMOTE_MARK = 0x7063  # conntrack mark of a connection forwarded to another node ("pc")
NFT_TIMEOUT = 10.0
IPTABLES_TIMEOUT = 10.0
DSTNAT = -110  # dstnat - 10: before Docker's iptables nat PREROUTING/OUTPUT (dstnat)
SRCNAT = 90  # srcnat - 10
GUARD = -150  # mangle: before any NAT

log = structlog.get_logger(__name__)


def _endpoint_chain(port: workloads_pb2.PublishedPort, index: int) -> str:
    return f"ep_{port.protocol}_{port.port}_{index}"


def _service_chain(port: workloads_pb2.PublishedPort) -> str:
    return f"svc_{port.protocol}_{port.port}"


def ruleset(ports: workloads_pb2.ServicePorts, local: Mapping[str, str]) -> str:
    """The nft script that replaces the table (checked input: common/checks/workloads.py).

    `local`: replica id -> container address, for this node's replicas; a local endpoint
    whose container address is unknown is reached at its endpoint port instead."""
    head = f"table ip {TABLE}\ndelete table ip {TABLE}\n"
    serving = [port for port in ports.ports if port.endpoints]
    if not serving and not ports.node_address:
        return head
    lines = [f"table ip {TABLE} {{"]
    if ports.node_address:
        nodes = ", ".join(sorted(set(ports.nodes) | {ports.node_address}))
        lines += [
            "\tset nodes {",
            "\t\ttype ipv4_addr",
            f"\t\telements = {{ {nodes} }}",
            "\t}",
            "\tchain guard {",
            f"\t\ttype filter hook prerouting priority {GUARD}; policy accept;",
            f"\t\tip daddr {ports.node_address} meta l4proto {{ tcp, udp }} "
            f"th dport {limits.ENDPOINT_PORT_FIRST}-{limits.ENDPOINT_PORT_LAST} ip saddr != @nodes drop",
            "\t}",
        ]
    jumps = [
        f"\t\tfib daddr type local ip daddr != 127.0.0.0/8 {port.protocol} dport {port.port} "
        f"jump {_service_chain(port)}"
        for port in serving
    ]
    for hook in ("prerouting", "output"):
        lines += [f"\tchain {hook} {{", f"\t\ttype nat hook {hook} priority {DSTNAT}; policy accept;"]
        lines += jumps
        lines.append("\t}")
    for port in serving:
        choices = ", ".join(f"{i} : jump {_endpoint_chain(port, i)}" for i in range(len(port.endpoints)))
        lines += [
            f"\tchain {_service_chain(port)} {{",
            f"\t\tnumgen random mod {len(port.endpoints)} vmap {{ {choices} }}",
            "\t}",
        ]
        for index, endpoint in enumerate(port.endpoints):
            if endpoint.address == ports.node_address and local.get(endpoint.replica):
                action = f"dnat to {local[endpoint.replica]}:{endpoint.target}"
            elif endpoint.address == ports.node_address:
                action = f"dnat to {endpoint.address}:{endpoint.port}"
            else:
                action = f"ct mark set {REMOTE_MARK:#x} dnat to {endpoint.address}:{endpoint.port}"
            lines += [
                f"\tchain {_endpoint_chain(port, index)} {{",
                f"\t\tmeta l4proto {port.protocol} {action}",
                "\t}",
            ]
    lines += [
        "\tchain postrouting {",
        f"\t\ttype nat hook postrouting priority {SRCNAT}; policy accept;",
        f"\t\tct mark {REMOTE_MARK:#x} masquerade",
        "\t}",
        "}",
    ]
    return head + "\n".join(lines) + "\n"


def forward_rule(action: str) -> list[str]:
    """iptables argv (`-C` check or `-I` insert) of the rule that lets forwarded mesh
    connections through Docker's FORWARD policy: DOCKER-USER is Docker's chain for the
    user's own rules, kept across dockerd restarts."""
    where = ["DOCKER-USER", "1"] if action == "-I" else ["DOCKER-USER"]
    return [
        "iptables", "-w", "5", action, *where, "-m", "connmark", "--mark", f"{REMOTE_MARK:#x}",
        "-m", "comment", "--comment", TABLE, "-j", "ACCEPT",
    ]  # fmt: skip


def load(script: str) -> CommandResult:
    """The whole table in one nft transaction: argv and stdin, with a timeout."""
    return run_command(["nft", "-f", "-"], NFT_TIMEOUT, input_text=script)


def allow_forwarding() -> CommandResult | None:
    """Insert the DOCKER-USER rule once; None when it is there or there is no such chain
    (no dockerd with iptables: nothing drops forwarded traffic on its behalf)."""
    if run_command(forward_rule("-C"), IPTABLES_TIMEOUT).ok:
        return None
    inserted = run_command(forward_rule("-I"), IPTABLES_TIMEOUT)
    return None if "No chain" in inserted.stderr or "does not exist" in inserted.stderr else inserted


class ServicePortsApplier:
    """The thin shell: loads the table when what it renders changed, and says why not."""

    def __init__(
        self,
        loader: Callable[[str], CommandResult] = load,
        forwarding: Callable[[], CommandResult | None] = allow_forwarding,
    ) -> None:
        self._loader = loader
        self._forwarding = forwarding
        self._loaded: str | None = None
        self.error = ""

    def apply(self, ports: workloads_pb2.ServicePorts | None, local: Mapping[str, str]) -> bool:
        """Make the table say `ports` (None: the coordinator never sent any and nothing was
        loaded: leave the kernel alone). True when the kernel holds it."""
        if ports is None and self._loaded is None:
            return True
        wanted = ports or workloads_pb2.ServicePorts()
        script = ruleset(wanted, local)
        if script == self._loaded:
            return True
        if any(e.address != wanted.node_address for port in wanted.ports for e in port.endpoints):
            refused = self._forwarding()
            if refused is not None and not refused.ok:
                log.warning("forwarded mesh traffic may be dropped", error=refused.stderr[-300:])
        done = self._loader(script)
        if not done.ok:
            self.error = (done.stderr or "nft timed out").strip()[-500:]
            log.error("published ports not loaded", table=TABLE, error=self.error)
            return False
        self._loaded, self.error = script, ""
        log.info(
            "published ports loaded",
            table=TABLE,
            ports=len(wanted.ports),
            endpoints=sum(len(port.endpoints) for port in wanted.ports),
        )
        return True
