"""From validated documents and the inventory to the steps that converge the cluster.

A pure function, like a scheduler: no I/O, no clock, table-tested. Each step is one typed
action for one node. Steps form a graph: `after` orders them (the firewall goes last on a
node), `requires` also makes them depend on success (workers join only once the manager
has initialised). Values only known at run time, such as a join token, are named as
facts of an earlier step and filled in by the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from picoord.common.checks import check_action
from picoord.common.names import normalise_arch
from picoord.common.validation import FieldError
from picoord.coordinator.apply import cluster_ports
from picoord.coordinator.apply.cluster_spec import (
    ClusterMembership,
    Document,
    FirewallPolicy,
    GlusterVolume,
    Mount,
    NodeSet,
    Registry,
    Rule,
    TimeSource,
)
from picoord.v1 import actions_pb2

SWARM_PORT = 2377
KUBE_API_PORT = 6443

# What an executor reports, by fact key, for the next steps to use.
FACT_SWARM_WORKER_TOKEN = "swarm.worker_token"
FACT_SWARM_MANAGER_ADDRESS = "swarm.manager_address"
FACT_KUBEADM_TOKEN = "kubeadm.token"
FACT_KUBEADM_CA_HASH = "kubeadm.ca_cert_hash"
FACT_KUBEADM_API_SERVER = "kubeadm.api_server"
FACT_K3S_TOKEN = "k3s.token"
FACT_K3S_SERVER_URL = "k3s.server_url"

_NAME_KEYS = ("hostname", "name", "kubernetes.io/hostname", "node.hostname")
_ARCH_KEYS = ("arch", "kubernetes.io/arch", "node.platform.arch")


@dataclass(frozen=True)
class RegistryTls:
    """A cluster registry's TLS identity, issued by the coordinator from the cluster CA."""

    certificate_pem: str  # the server certificate, then the CA
    key_pem: str
    ca_pem: str


# (registry name, names its certificate must cover) -> its identity: the shell passes the
# CA's registry_identity in; the planner stays pure.
IssueRegistryTls = Callable[[str, list[str]], RegistryTls]


class PlanError(ValueError):
    """The documents cannot be planned against this inventory (unknown node, no address...)."""


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    arch: str = ""
    address: str = ""  # where the coordinator sees the node's session come from; "" when offline
    swarm_role: str = ""  # "manager" or "worker" in the Swarm the coordinator made; "" in none
    virtual_addresses: bool = False  # may announce a virtual address (runs VRRP)


@dataclass(frozen=True)
class FactRef:
    step: str
    key: str


@dataclass(frozen=True)
class Step:
    id: str
    document: str
    node: str
    action: actions_pb2.Action
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    inputs: tuple[tuple[str, FactRef], ...] = ()  # (field of the action's message, fact)

    @property
    def kind(self) -> str:
        return self.action.WhichOneof("kind") or ""


def matches(node: NodeView, selector: Sequence[tuple[str, str]]) -> bool:
    """Every pair must hold; labels first, then the built-in name and arch."""
    for key, wanted in selector:
        if key in node.labels:
            actual = node.labels[key]
        elif key in _NAME_KEYS:
            actual = node.name
        elif key in _ARCH_KEYS:
            actual, wanted = normalise_arch(node.arch), normalise_arch(wanted)
        else:
            return False
        if actual != wanted:
            return False
    return True


class _Planner:
    def __init__(self, inventory: Sequence[NodeView], issue_tls: IssueRegistryTls | None = None) -> None:
        self.nodes = {node.name: node for node in inventory}
        self.steps: list[Step] = []
        self.issue_tls = issue_tls

    def node(self, where: str, name: str) -> NodeView:
        if name not in self.nodes:
            raise PlanError(f"{where}: unknown node {name!r}")
        return self.nodes[name]

    def address(self, where: str, name: str) -> str:
        node = self.node(where, name)
        if not node.address:
            raise PlanError(f"{where}: node {name!r} is not connected, so its address is unknown")
        return node.address

    def select(self, where: str, nodes: NodeSet) -> list[str]:
        if nodes.names:
            return [self.node(f"{where}[{i}]", name).name for i, name in enumerate(nodes.names)]
        chosen = [name for name, node in sorted(self.nodes.items()) if matches(node, nodes.selector)]
        if not chosen:
            text = ",".join(f"{key}={value}" for key, value in nodes.selector)
            raise PlanError(f"{where}: selector {text} matches no node")
        return chosen

    def add(self, document: str, verb: str, node: str, action: actions_pb2.Action, **links: object) -> str:
        step_id = f"{document}:{verb}@{node}"
        self.steps.append(Step(id=step_id, document=document, node=node, action=action, **links))  # type: ignore[arg-type]
        return step_id

    # --- documents ----------------------------------------------------------------------

    def membership(self, doc: ClusterMembership) -> None:
        name = f"ClusterMembership/{doc.name}"
        manager = self.node(f"{name}.manager", doc.manager).name
        workers = [w for w in self.select(f"{name}.workers", doc.workers) if w != manager]
        if doc.state == "absent":
            leave = {
                "swarm": lambda: actions_pb2.Action(swarm_leave=actions_pb2.SwarmLeave()),
                "kubeadm": lambda: actions_pb2.Action(kubeadm_reset=actions_pb2.KubeadmReset()),
                "k3s": lambda: actions_pb2.Action(k3s_uninstall=actions_pb2.K3sUninstall()),
            }[doc.engine]
            for worker in workers:
                self.add(name, "leave", worker, leave())
            return
        advertise = doc.advertise_address or self.address(f"{name}.manager", manager)
        if doc.engine == "swarm":
            init = self.add(
                name,
                "init",
                manager,
                actions_pb2.Action(
                    swarm_init=actions_pb2.SwarmInit(
                        advertise_address=advertise, report_worker_token=bool(workers)
                    )
                ),
            )
            for worker in workers:
                join = actions_pb2.SwarmJoin(advertise_address=self.address(f"{name}.workers", worker))
                self.add(
                    name,
                    "join",
                    worker,
                    actions_pb2.Action(swarm_join=join),
                    requires=(init,),
                    inputs=(
                        ("swarm_join.manager_address", FactRef(init, FACT_SWARM_MANAGER_ADDRESS)),
                        ("swarm_join.join_token", FactRef(init, FACT_SWARM_WORKER_TOKEN)),
                    ),
                )
        elif doc.engine == "kubeadm":
            init_action = actions_pb2.KubeadmInit(
                advertise_address=advertise, pod_network_cidr=doc.pod_network_cidr or "10.244.0.0/16"
            )
            init = self.add(name, "init", manager, actions_pb2.Action(kubeadm_init=init_action))
            for worker in workers:
                self.add(
                    name,
                    "join",
                    worker,
                    actions_pb2.Action(kubeadm_join=actions_pb2.KubeadmJoin()),
                    requires=(init,),
                    inputs=(
                        ("kubeadm_join.api_server", FactRef(init, FACT_KUBEADM_API_SERVER)),
                        ("kubeadm_join.token", FactRef(init, FACT_KUBEADM_TOKEN)),
                        ("kubeadm_join.ca_cert_hash", FactRef(init, FACT_KUBEADM_CA_HASH)),
                    ),
                )
        else:
            init = self.add(
                name,
                "init",
                manager,
                actions_pb2.Action(k3s_server=actions_pb2.K3sServer(advertise_address=advertise)),
            )
            for worker in workers:
                self.add(
                    name,
                    "join",
                    worker,
                    actions_pb2.Action(k3s_agent=actions_pb2.K3sAgent()),
                    requires=(init,),
                    inputs=(
                        ("k3s_agent.server_url", FactRef(init, FACT_K3S_SERVER_URL)),
                        ("k3s_agent.token", FactRef(init, FACT_K3S_TOKEN)),
                    ),
                )

    def gluster(self, doc: GlusterVolume) -> str:
        name = f"GlusterVolume/{doc.name}"
        nodes = list(dict.fromkeys(brick.node for brick in doc.bricks))
        addresses = {n: self.address(f"{name}.bricks", n) for n in nodes}
        first, others = nodes[0], nodes[1:]
        requires: tuple[str, ...] = ()
        if others:
            probe = actions_pb2.GlusterPeerProbe(peers=[addresses[n] for n in others])
            requires = (self.add(name, "probe", first, actions_pb2.Action(gluster_peer_probe=probe)),)
        volume = actions_pb2.GlusterVolume(
            name=doc.name,
            replica=doc.replica,
            bricks=[f"{addresses[b.node]}:{b.path}" for b in doc.bricks],
            start=doc.start,
        )
        return self.add(name, "volume", first, actions_pb2.Action(gluster_volume=volume), requires=requires)

    def mount(self, doc: Mount, volumes: Mapping[str, str]) -> None:
        name = f"Mount/{doc.name}"
        source = doc.source
        requires: tuple[str, ...] = ()
        if doc.type in ("glusterfs", "nfs"):
            host, _, path = source.partition(":")
            if host in self.nodes:  # a node name: the other nodes reach it by its address
                source = f"{self.address(f'{name}.source', host)}:{path}"
            if doc.type == "glusterfs" and path.lstrip("/") in volumes:
                requires = (volumes[path.lstrip("/")],)
        persist = {
            "none": actions_pb2.MOUNT_PERSISTENCE_NONE,
            "fstab": actions_pb2.MOUNT_PERSISTENCE_FSTAB,
            "systemd": actions_pb2.MOUNT_PERSISTENCE_SYSTEMD,
        }[doc.persist]
        kind = {
            "glusterfs": actions_pb2.MOUNT_TYPE_GLUSTERFS,
            "nfs": actions_pb2.MOUNT_TYPE_NFS,
            "bind": actions_pb2.MOUNT_TYPE_BIND,
            "tmpfs": actions_pb2.MOUNT_TYPE_TMPFS,
        }[doc.type]
        for node in self.select(f"{name}.nodes", doc.nodes):
            action = actions_pb2.Mount(
                type=kind, source=source, target=doc.target, options=list(doc.options), persist=persist
            )
            self.add(name, "mount", node, actions_pb2.Action(mount=action), requires=requires)

    def firewall(self, doc: FirewallPolicy) -> None:
        name = f"FirewallPolicy/{doc.name}"
        for node in self.select(f"{name}.nodes", doc.nodes):
            policy = actions_pb2.FirewallPolicy(
                backend=actions_pb2.FIREWALL_BACKEND_NFTABLES
                if doc.backend == "nftables"
                else actions_pb2.FIREWALL_BACKEND_UFW,
                default_incoming=_verdict(doc.default_incoming),
                rules=[_rule(rule) for rule in doc.rules],
                confirm_within_seconds=doc.confirm_within_seconds,
                no_keep_ssh=not doc.keep_ssh,
                ssh_port=doc.ssh_port,
            )
            if doc.cluster_ports == "allow":  # what the cluster needs and the rules would drop, first
                members = _members(self.steps, list(self.nodes.values()))
                needed = cluster_ports.missing_rules(
                    [cluster_ports.PlannedPolicy(name, node, policy)], members
                )
                policy.ClearField("rules")
                policy.rules.extend(
                    [*cluster_ports.allow_rules(needed), *(_rule(rule) for rule in doc.rules)]
                )
            # Last on the node: everything else must be in place before its ports close.
            before = tuple(step.id for step in self.steps if step.node == node)
            self.add(name, "firewall", node, actions_pb2.Action(firewall=policy), after=before)

    def time_source(self, doc: TimeSource) -> None:
        name = f"TimeSource/{doc.name}"
        server = self.node(f"{name}.server", doc.server).name
        address = doc.address or self.address(f"{name}.server", server)
        clients = [c for c in self.select(f"{name}.clients", doc.clients) if c != server]
        serve = actions_pb2.TimeServer(allow=list(doc.allow), stratum=doc.stratum)
        served = self.add(name, "serve", server, actions_pb2.Action(time_server=serve))
        for client in clients:
            take = actions_pb2.TimeClient(servers=[address])
            # after, not requires: a client pointed at a server that failed is still right.
            self.add(name, "client", client, actions_pb2.Action(time_client=take), after=(served,))

    def registry(self, doc: Registry) -> None:
        name = f"Registry/{doc.name}"
        server = self.node(f"{name}.server", doc.server).name
        address = doc.address or self.address(f"{name}.server", server)
        hosts = list(dict.fromkeys([address, server, *doc.names]))
        if self.issue_tls is None:
            raise PlanError(f"{name}: this coordinator cannot issue registry certificates")
        tls = self.issue_tls(doc.name, hosts)
        serve = actions_pb2.RegistryServer(
            port=doc.port, storage=doc.storage, certificate_pem=tls.certificate_pem, key_pem=tls.key_pem
        )
        served = self.add(name, "serve", server, actions_pb2.Action(registry_server=serve))
        trust = actions_pb2.RegistryTrust(addresses=registry_addresses(hosts, doc.port), ca_pem=tls.ca_pem)
        for node in self.select(f"{name}.nodes", doc.nodes):
            # after, not requires: trusting the CA is right whether or not the server started.
            self.add(name, "trust", node, actions_pb2.Action(registry_trust=trust), after=(served,))


def registry_addresses(hosts: Sequence[str], port: int) -> list[str]:
    """HOST:PORT for each name a registry is pulled by: the certs.d directories, and the
    registry part of the image references rollouts pin."""
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in hosts]


def _verdict(text: str) -> int:
    return actions_pb2.FIREWALL_VERDICT_ALLOW if text == "allow" else actions_pb2.FIREWALL_VERDICT_DENY


def _rule(rule: Rule) -> actions_pb2.FirewallRule:
    protocol = {
        "tcp": actions_pb2.PROTOCOL_TCP,
        "udp": actions_pb2.PROTOCOL_UDP,
        "vrrp": actions_pb2.PROTOCOL_VRRP,
    }.get(rule.protocol, actions_pb2.PROTOCOL_ANY)
    return actions_pb2.FirewallRule(
        verdict=_verdict(rule.verdict),
        from_cidr=rule.from_cidr,
        port_from=rule.port_from,
        port_to=rule.port_to,
        protocol=protocol,
        comment=rule.comment,
    )


def plan(
    documents: Sequence[Document], inventory: Sequence[NodeView], issue_tls: IssueRegistryTls | None = None
) -> list[Step]:
    """The steps for these documents, in an order that respects every dependency.

    Membership first, then storage (peers before volumes, volumes before their mounts),
    then time (the server before its clients), registries (the server before the nodes
    that trust it), firewalls last on each node. `issue_tls` issues a Registry's
    certificate (the coordinator's CA)."""
    planner = _Planner(inventory, issue_tls)
    for doc in documents:
        if isinstance(doc, ClusterMembership):
            planner.membership(doc)
    volumes = {doc.name: planner.gluster(doc) for doc in documents if isinstance(doc, GlusterVolume)}
    for doc in documents:
        if isinstance(doc, Mount):
            planner.mount(doc, volumes)
    for doc in documents:
        if isinstance(doc, TimeSource):
            planner.time_source(doc)
    for doc in documents:
        if isinstance(doc, Registry):
            planner.registry(doc)
    for doc in documents:
        if isinstance(doc, FirewallPolicy):
            planner.firewall(doc)
    _check_conflicts(planner.steps)
    for step in planner.steps:
        if not step.inputs:  # a step filled in at run time is checked by its agent then
            try:
                check_action(step.action)
            except FieldError as error:
                raise PlanError(f"{step.document} on {step.node}: {error}") from None
    _check_cluster_ports(planner.steps, inventory)
    return planner.steps


def _members(steps: Sequence[Step], inventory: Sequence[NodeView]) -> list[cluster_ports.Member]:
    """The nodes as the cluster-port check sees them, with their Swarm roles after `steps`."""
    roles = cluster_ports.swarm_roles_after(
        {node.name: node.swarm_role for node in inventory if node.swarm_role},
        [(step.node, step.kind) for step in steps],
    )
    return [
        cluster_ports.Member(node.name, roles.get(node.name, ""), node.virtual_addresses, node.address)
        for node in inventory
    ]


def _check_cluster_ports(steps: Sequence[Step], inventory: Sequence[NodeView]) -> None:
    """Refuse a plan whose firewall policies would drop what Swarm and VRRP need between
    the nodes (cluster_ports.py), judged on the nodes' Swarm roles after this plan."""
    members = _members(steps, inventory)
    policies = [
        cluster_ports.PlannedPolicy(step.document, step.node, step.action.firewall)
        for step in steps
        if step.kind == "firewall"
    ]
    missing = cluster_ports.missing_rules(policies, members)
    if missing:
        raise PlanError(cluster_ports.refusal(missing))


def _check_conflicts(steps: Sequence[Step]) -> None:
    """One firewall policy per node, one mount per target per node, one membership role,
    one time role (chrony's one drop-in), one registry served per node (its one config)."""
    claimed: dict[tuple[str, str], str] = {}
    for step in steps:
        if step.kind == "firewall":
            key = (step.node, "firewall")
        elif step.kind == "mount":
            key = (step.node, f"mount {step.action.mount.target}")
        elif step.kind in ("time_server", "time_client"):
            key = (step.node, "time source")
        elif step.kind == "registry_server":
            key = (step.node, "registry server")
        elif step.kind in (
            "swarm_init",
            "swarm_join",
            "kubeadm_init",
            "kubeadm_join",
            "k3s_server",
            "k3s_agent",
        ):
            key = (step.node, f"member of {step.kind.split('_')[0]}")
        else:
            continue
        if key in claimed and claimed[key] != step.document:
            raise PlanError(f"{step.document} and {claimed[key]} both set the {key[1]} of node {step.node}")
        claimed[key] = step.document
