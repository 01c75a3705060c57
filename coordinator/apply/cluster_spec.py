"""cluster.yaml: the documents `coordctl apply` takes, read into plain, validated data.

A file holds YAML documents of six kinds: ClusterMembership, GlusterVolume, Mount,
FirewallPolicy, TimeSource and Registry (see README, docs/images.md). Reading is
all-or-nothing: the first invalid field stops it with an error naming the document and the
field, so a rejected file changes nothing.
Node names and selectors are checked against the inventory later, by the planner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from picoord.common import limits
from picoord.common import validation as v
from picoord.common.checks import firewall as firewall_checks
from picoord.common.checks import registry as registry_checks
from picoord.common.checks import time as time_checks
from picoord.common.names import InvalidName, validate_label_key, validate_label_value, validate_node_name
from picoord.common.validation import FieldError

MAX_SPEC_BYTES = limits.SPEC_BYTES
MAX_DOCUMENTS = limits.SPEC_DOCUMENTS
MAX_LIST = limits.SPEC_LIST
ENGINES = ("swarm", "kubeadm", "k3s")
MOUNT_TYPES = ("glusterfs", "nfs", "bind", "tmpfs")
# `persist: true` means the classic way, an fstab line.
PERSISTENCE = {False: "none", True: "fstab", "none": "none", "fstab": "fstab", "systemd": "systemd"}
BACKENDS = ("ufw", "nftables")
VERDICTS = ("allow", "deny")
PROTOCOLS = ("tcp", "udp", "any", "vrrp")
PORTLESS = firewall_checks.PORTLESS
CLUSTER_PORTS = ("check", "allow")  # what a policy does about the cluster's own ports
# Example files mark what the reader must fill in as YOUR_SOMETHING (YOUR_LAN/24).
PLACEHOLDER = "YOUR_"


class SpecError(ValueError):
    """The file is not a valid cluster spec; the message names the document and field."""


@dataclass(frozen=True)
class NodeSet:
    """Which nodes a document applies to: explicit names, or a label selector."""

    names: tuple[str, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ClusterMembership:
    name: str
    engine: str
    manager: str
    workers: NodeSet
    state: str = "present"  # present: init and join; absent: workers leave
    advertise_address: str = ""  # default: the manager's address as the coordinator sees it
    pod_network_cidr: str = ""  # kubeadm only


@dataclass(frozen=True)
class Brick:
    node: str
    path: str


@dataclass(frozen=True)
class GlusterVolume:
    name: str
    replica: int
    bricks: tuple[Brick, ...]
    start: bool = True


@dataclass(frozen=True)
class Mount:
    name: str
    type: str
    source: str
    target: str
    nodes: NodeSet
    options: tuple[str, ...] = ()
    persist: str = "none"


@dataclass(frozen=True)
class Rule:
    verdict: str
    from_cidr: str = ""
    port_from: int = 0
    port_to: int = 0
    protocol: str = "any"
    comment: str = ""


@dataclass(frozen=True)
class FirewallPolicy:
    name: str
    nodes: NodeSet
    backend: str = "ufw"
    default_incoming: str = "deny"
    rules: tuple[Rule, ...] = ()
    confirm_within_seconds: float = 10.0
    keep_ssh: bool = True  # false: live SSH sessions' sources get no rule of their own
    cluster_ports: str = "check"  # check: refuse a policy that cuts them; allow: add the rules
    ssh_port: int = firewall_checks.DEFAULT_SSH_PORT


@dataclass(frozen=True)
class TimeSource:
    """One node (the desktop) serves time to `allow`; `clients` take it from `address`."""

    name: str
    server: str
    clients: NodeSet
    allow: tuple[str, ...]
    stratum: int = time_checks.DEFAULT_STRATUM
    address: str = ""  # what clients dial; default: the server's address as the coordinator sees it


@dataclass(frozen=True)
class Registry:
    """One node (the desktop) serves the cluster's container registry over TLS with a
    certificate from the cluster CA; `nodes`' dockerd trust it by that CA."""

    name: str
    server: str
    nodes: NodeSet
    port: int = 5000
    storage: str = "/var/lib/docker-registry"  # Debian's docker-registry keeps images here
    names: tuple[str, ...] = ()  # more host names nodes pull it by (the node name always is one)
    address: str = ""  # what nodes dial; default: the server's address as the coordinator sees it


Document = ClusterMembership | GlusterVolume | Mount | FirewallPolicy | TimeSource | Registry


@dataclass
class _Fields:
    """One YAML mapping being read: knows its path for errors and refuses unknown keys."""

    path: str
    data: dict[str, Any]
    used: set[str] = field(default_factory=set)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise FieldError(self.at(key), "is required")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key, default, required=default is None)
        if not isinstance(value, str):
            raise FieldError(self.at(key), f"must be a string, not {type(value).__name__}")
        if choices and value not in choices:
            raise FieldError(self.at(key), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise FieldError(self.at(unknown[0]), "unknown field")


def _mapping(path: str, value: Any) -> _Fields:
    if not isinstance(value, dict):
        raise FieldError(path, f"must be a mapping, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise FieldError(path, f"has a non-string key {key!r}")
    return _Fields(path, value)


def _list(path: str, value: Any, limit: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list):
        raise FieldError(path, f"must be a list, not {type(value).__name__}")
    if len(value) > limit:
        raise FieldError(path, f"has more than {limit} entries")
    return value


def _node_name(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FieldError(path, "must be a node name")
    try:
        return validate_node_name(value)
    except InvalidName as error:
        raise FieldError(path, str(error)) from None


def _node_set(path: str, value: Any) -> NodeSet:
    """`[pi1, pi2]`, or `{selector: {arch: arm64, role: storage}}`, or `{selector: "arch=arm64"}`."""
    if isinstance(value, list):
        names = tuple(_node_name(f"{path}[{i}]", item) for i, item in enumerate(_list(path, value)))
        if not names:
            raise FieldError(path, "names no node")
        if len(set(names)) != len(names):
            raise FieldError(path, "names a node twice")
        return NodeSet(names=names)
    fields = _mapping(path, value)
    raw = fields.get("selector", required=True)
    fields.finish()
    if isinstance(raw, str):
        pairs = []
        for item in raw.split(","):
            key, sep, wanted = item.strip().partition("=")
            if not sep:
                raise FieldError(f"{path}.selector", f"{item!r} is not key=value")
            pairs.append((key, wanted))
    else:
        pairs = [(key, str(wanted)) for key, wanted in _mapping(f"{path}.selector", raw).data.items()]
    if not pairs:
        raise FieldError(f"{path}.selector", "is empty")
    try:
        for key, wanted in pairs:
            validate_label_key(key)
            validate_label_value(key, wanted)
    except InvalidName as error:
        raise FieldError(f"{path}.selector", str(error)) from None
    return NodeSet(selector=tuple(sorted(pairs)))


def _membership(doc: _Fields, name: str) -> ClusterMembership:
    engine = doc.text("engine", choices=ENGINES)
    advertise = doc.text("advertise_address", "")
    pod_cidr = doc.text("pod_network_cidr", "")
    return ClusterMembership(
        name=name,
        engine=engine,
        manager=_node_name(doc.at("manager"), doc.get("manager", required=True)),
        workers=_node_set(doc.at("workers"), doc.get("workers", required=True)),
        state=doc.text("state", "present", choices=("present", "absent")),
        advertise_address=v.ip_address(doc.at("advertise_address"), advertise) if advertise else "",
        pod_network_cidr=v.cidr(doc.at("pod_network_cidr"), pod_cidr) if pod_cidr else "",
    )


def _gluster_volume(doc: _Fields, name: str) -> GlusterVolume:
    v.volume_name(doc.at("name"), name)
    replica = doc.get("replica", 0)
    if (
        isinstance(replica, bool)
        or not isinstance(replica, int)
        or replica < 0
        or replica == 1
        or replica > 16
    ):
        raise FieldError(doc.at("replica"), f"{replica!r} is not a replica count (0 for none, or 2-16)")
    bricks = []
    for index, item in enumerate(
        _list(doc.at("bricks"), doc.get("bricks", required=True), limits.GLUSTER_BRICKS)
    ):
        where = f"{doc.at('bricks')}[{index}]"
        host, path = v.remote_path(where, item)
        bricks.append(Brick(node=_node_name(where, host), path=path))
    if not bricks:
        raise FieldError(doc.at("bricks"), "names no brick")
    if len(set(bricks)) != len(bricks):
        raise FieldError(doc.at("bricks"), "names a brick twice")
    if replica and len(bricks) % replica:
        raise FieldError(
            doc.at("bricks"), f"{len(bricks)} bricks do not divide into replica sets of {replica}"
        )
    start = doc.get("start", True)
    if not isinstance(start, bool):
        raise FieldError(doc.at("start"), "must be true or false")
    return GlusterVolume(name=name, replica=replica, bricks=tuple(bricks), start=start)


def _mount(doc: _Fields, name: str) -> Mount:
    kind = doc.text("type", choices=MOUNT_TYPES)
    source = doc.get("source", "" if kind == "tmpfs" else None)
    if source is None:
        raise FieldError(doc.at("source"), "is required")
    if not isinstance(source, str):
        raise FieldError(doc.at("source"), "must be a string")
    if kind in ("glusterfs", "nfs"):
        _, path = v.remote_path(doc.at("source"), source)
        if kind == "glusterfs":
            v.volume_name(doc.at("source"), path.lstrip("/"))
    elif kind == "bind":
        v.absolute_path(doc.at("source"), source)
    elif source not in ("", "tmpfs"):
        raise FieldError(doc.at("source"), "must be empty or 'tmpfs' for a tmpfs mount")
    options = tuple(
        v.mount_option(f"{doc.at('options')}[{i}]", option)
        for i, option in enumerate(_list(doc.at("options"), doc.get("options", []), limits.MOUNT_OPTIONS))
    )
    persist = doc.get("persist", "none")
    if not isinstance(persist, bool | str) or persist not in PERSISTENCE:
        raise FieldError(doc.at("persist"), f"{persist!r} is not one of false, true (fstab), fstab, systemd")
    return Mount(
        name=name,
        type=kind,
        source=source,
        target=v.mount_target(doc.at("target"), doc.get("target", required=True)),
        nodes=_node_set(doc.at("nodes"), doc.get("nodes", required=True)),
        options=options,
        persist=PERSISTENCE[persist],
    )


def _ports(path: str, value: Any) -> tuple[int, int]:
    """`6443`, `"2379:2380"` (ufw's form) or `"10250-10252"`."""
    if value is None:
        return 0, 0
    if isinstance(value, int) and not isinstance(value, bool):
        return v.port(path, value), v.port(path, value)
    if isinstance(value, str):
        for separator in (":", "-"):
            low, sep, high = value.partition(separator)
            if sep:
                if not (low.isdigit() and high.isdigit()):
                    raise FieldError(path, f"{value!r} is not a port range")
                return v.port_range(path, int(low), int(high))
        if value.isdigit():
            return v.port(path, int(value)), v.port(path, int(value))
    raise FieldError(path, f"{value!r} is not a port or a port range")


def _rule(path: str, raw: Any) -> Rule:
    fields = _mapping(path, raw)
    verdict = fields.text("action", choices=VERDICTS)
    source = fields.get("from", "")
    if not isinstance(source, str):
        raise FieldError(fields.at("from"), "must be a CIDR string")
    if PLACEHOLDER in source.upper():
        raise FieldError(
            fields.at("from"),
            f"{source!r} is a placeholder: put your own network there (e.g. 192.168.1.0/24, as "
            "`ip -4 addr` shows it on a node), then run `coordctl apply --dry-run -f FILE` first",
        )
    from_cidr = "" if source in ("", "any") else v.cidr(fields.at("from"), source)
    port_from, port_to = _ports(fields.at("port"), fields.get("port"))
    protocol = fields.text("protocol", "any", choices=PROTOCOLS)
    if protocol in PORTLESS and port_from:
        raise FieldError(fields.at("port"), f"{protocol} has no ports; leave `port` out")
    if port_from != port_to and protocol == "any":
        raise FieldError(fields.at("protocol"), "a port range needs tcp or udp")
    comment = fields.text("comment", "")
    if comment:
        firewall_checks.comment(fields.at("comment"), comment)
    if not from_cidr and not port_from and protocol not in PORTLESS:
        raise FieldError(path, "a rule needs `from`, `port`, or both")
    fields.finish()
    return Rule(verdict, from_cidr, port_from, port_to if port_to != port_from else 0, protocol, comment)


def _firewall(doc: _Fields, name: str) -> FirewallPolicy:
    rules = tuple(
        _rule(f"{doc.at('rules')}[{i}]", item)
        for i, item in enumerate(_list(doc.at("rules"), doc.get("rules", []), limits.FIREWALL_RULES))
    )
    confirm = doc.get("confirm_within_seconds", 10.0)
    if isinstance(confirm, bool) or not isinstance(confirm, int | float) or not 1 <= confirm <= 300:
        raise FieldError(doc.at("confirm_within_seconds"), "must be a number of seconds between 1 and 300")
    keep_ssh = doc.get("keep_ssh", True)
    if not isinstance(keep_ssh, bool):
        raise FieldError(doc.at("keep_ssh"), "must be true or false")
    return FirewallPolicy(
        name=name,
        nodes=_node_set(doc.at("nodes"), doc.get("nodes", required=True)),
        backend=doc.text("backend", "ufw", choices=BACKENDS),
        default_incoming=doc.text("default_incoming", "deny", choices=VERDICTS),
        rules=rules,
        confirm_within_seconds=float(confirm),
        keep_ssh=keep_ssh,
        cluster_ports=doc.text("cluster_ports", "check", choices=CLUSTER_PORTS),
        ssh_port=v.port(doc.at("ssh_port"), doc.get("ssh_port", firewall_checks.DEFAULT_SSH_PORT)),
    )


def _time_source(doc: _Fields, name: str) -> TimeSource:
    raw = _list(doc.at("allow"), doc.get("allow", required=True), time_checks.MAX_NETWORKS)
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise FieldError(f"{doc.at('allow')}[{index}]", "must be a CIDR string")
    allow = tuple(time_checks.networks(doc.at("allow"), raw))
    stratum = doc.get("stratum", time_checks.DEFAULT_STRATUM)
    if isinstance(stratum, bool) or not isinstance(stratum, int):
        raise FieldError(doc.at("stratum"), f"{stratum!r} is not a stratum (a whole number)")
    time_checks.stratum(doc.at("stratum"), stratum)
    address = doc.text("address", "")
    return TimeSource(
        name=name,
        server=_node_name(doc.at("server"), doc.get("server", required=True)),
        clients=_node_set(doc.at("clients"), doc.get("clients", required=True)),
        allow=allow,
        stratum=stratum,
        address=v.ip_address(doc.at("address"), address) if address else "",
    )


def _registry(doc: _Fields, name: str) -> Registry:
    port = doc.get("port", 5000)
    if isinstance(port, bool) or not isinstance(port, int):
        raise FieldError(doc.at("port"), f"{port!r} is not a port number")
    v.port(doc.at("port"), port)
    raw = _list(doc.at("names"), doc.get("names", []), registry_checks.MAX_ADDRESSES - 2)
    names = []
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise FieldError(f"{doc.at('names')}[{index}]", "must be a host name")
        names.append(v.hostname(f"{doc.at('names')}[{index}]", item))
    if len(set(names)) != len(names):
        raise FieldError(doc.at("names"), "names one twice")
    address = doc.text("address", "")
    return Registry(
        name=_registry_name(doc.at("name"), name),
        server=_node_name(doc.at("server"), doc.get("server", required=True)),
        nodes=_node_set(doc.at("nodes"), doc.get("nodes", required=True)),
        port=port,
        storage=v.absolute_path(doc.at("storage"), doc.text("storage", "/var/lib/docker-registry")),
        names=tuple(names),
        address=v.ip_address(doc.at("address"), address) if address else "",
    )


def _registry_name(field: str, name: str) -> str:
    """A Registry's name also names its key and certificate files: a DNS label."""
    try:
        return validate_node_name(name)
    except InvalidName as error:
        raise FieldError(field, str(error)) from None


READERS: dict[str, Callable[[_Fields, str], Document]] = {
    "ClusterMembership": _membership,
    "GlusterVolume": _gluster_volume,
    "Mount": _mount,
    "FirewallPolicy": _firewall,
    "TimeSource": _time_source,
    "Registry": _registry,
}


def load_documents(text: str | bytes) -> list[Any]:
    """The file's YAML documents, size- and count-bounded, empty ones dropped (shared with
    the workload reader, which takes the same files)."""
    if isinstance(text, bytes):
        if len(text) > MAX_SPEC_BYTES:
            raise SpecError(f"the file is {len(text)} bytes; the limit is {MAX_SPEC_BYTES}")
        try:
            text = text.decode("utf-8", errors="strict")
        except UnicodeDecodeError as error:
            raise SpecError(f"the file is not UTF-8 text (byte {error.start})") from None
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"the file is larger than {MAX_SPEC_BYTES} bytes")
    try:
        raw_documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise SpecError(f"not valid YAML: {error}") from None
    except RecursionError:
        raise SpecError("not valid YAML: nested too deeply") from None
    if not raw_documents:
        raise SpecError("the file holds no document")
    if len(raw_documents) > MAX_DOCUMENTS:
        raise SpecError(f"more than {MAX_DOCUMENTS} documents")
    return raw_documents


def parse_document(index: int, raw: Any, seen: set[tuple[str, str]]) -> Document:
    """Document number `index` of a file; `seen` collects (kind, name) to refuse repeats."""
    path = f"documents[{index}]"
    try:
        fields = _mapping(path, raw)
        kind = fields.text("kind", choices=tuple(READERS))
        name = fields.text("name")
        v.safe_word(fields.at("name"), name, 64)
        if (kind, name) in seen:
            raise FieldError(fields.at("name"), f"a second {kind} named {name!r}")
        seen.add((kind, name))
        fields.path = f"{kind}/{name}"
        document = READERS[kind](fields, name)
        fields.finish()
        return document
    except FieldError as error:
        raise SpecError(str(error)) from None


def parse_spec(text: str | bytes) -> list[Document]:
    """Every document of the file, validated, in file order; SpecError on the first problem."""
    seen: set[tuple[str, str]] = set()
    return [parse_document(index, raw, seen) for index, raw in enumerate(load_documents(text))]
