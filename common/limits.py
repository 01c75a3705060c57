"""Every size and count limit picoord enforces, in one place.

Both ends read these: the coordinator refuses what exceeds them, and the agent and the
CLI can keep within them. A limit defined anywhere else is a bug (the firewall rule count
was once 256 in the checks and 512 in the spec reader).

Texts are counted in characters (what `len()` of a protobuf string gives); byte budgets
in serialized bytes (`message.ByteSize()`). Each message kind has a byte budget well under
gRPC's 4 MiB receive limit, so one node can neither fill the coordinator's memory nor its
state database, whatever the per-field limits would add up to.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

# --- Texts (characters) -------------------------------------------------------------------
TEXT = 256  # any short free text from a node: hostnames, versions, devices, mountpoints, ...
NODE_NAME = 63  # an RFC 1123 DNS label
LABEL_KEY = 253 + 1 + 63  # an optional DNS-subdomain prefix, "/", a name
LABEL_VALUE = 63
BOOTSTRAP_TOKEN = 64  # a token is 23 characters; room for whitespace around a pasted one
EVENT_KIND = TEXT
EVENT_MESSAGE = 4096
EVENT_ATTRIBUTE_KEY = 64
EVENT_ATTRIBUTE_VALUE = 1024
FACT_KEY = TEXT
FACT_VALUE = 16 * KIB  # join commands and tokens, certificates in PEM
ARGV_ITEM = 4096
COMMAND_OUTPUT_TAIL = 4096  # what the agent keeps of a command's output
RESULT_TEXT = 64 * KIB  # an action result's message and in_place text
FIREWALL_COMMENT = 64
TOKEN_DESCRIPTION = 256

# --- Counts -------------------------------------------------------------------------------
CPUS = 1024
FILESYSTEMS = 256  # also a Hello's disks
INTERFACES = 512  # also a sample's network devices
ADDRESSES = 64  # per interface
TEMPERATURES = 128
GPUS = 64
SERIES = 1024  # declared node_exporter series per node (Hardware.series, MetricsSample.series_values)
SERIES_LABELS = 4  # label values of one declared series
COMMANDS = 256  # per action result
ARGV = 512  # items per command
FACTS = 64
EVENT_ATTRIBUTES = 32
LABELS = 64  # per node
FIREWALL_RULES = 256
GLUSTER_PEERS = 64
GLUSTER_BRICKS = 128
MOUNT_OPTIONS = 32
SPEC_DOCUMENTS = 256
SPEC_LIST = 512  # entries of any other list in a spec document (nodes, bricks, options)

# --- Bytes --------------------------------------------------------------------------------
CSR_BYTES = 16 * KIB
# A hello's declared series (Hardware.series): most of its "hello" budget, the rest left for
# disks, interfaces and the like. 1,024 series with one short label take about 43 KiB.
SERIES_BYTES = 48 * KIB
SPEC_BYTES = 1 * MIB
SECRET_BYTES = 64 * KIB  # one secret's value: coordctl refuses it before sending, the coordinator on receipt
GRPC_RECEIVE_BYTES = 4 * MIB  # the servers' transport limit; every budget below is far under it
# A coordinator backup's members (picoord-coordinator restore refuses larger ones)
BACKUP_MANIFEST_BYTES = 64 * KIB
BACKUP_PEM_BYTES = 64 * KIB  # a key or certificate
BACKUP_CONFIG_BYTES = 1 * MIB
BACKUP_DATABASE_BYTES = 16 * 1024 * MIB  # the state database

# Byte budget of each inbound message kind, keyed by its name in AgentMessage's oneof
# (and "enroll" for EnrollRequest).
MESSAGE_BYTES: dict[str, int] = {
    "hello": 64 * KIB,
    "metrics": 64 * KIB,
    "heartbeat": 1 * KIB,
    "action_result": 256 * KIB,
    "event": 8 * KIB,
    "enroll": 32 * KIB,
    "renew": 32 * KIB,
    "replicas": 128 * KIB,
    "log_chunk": 96 * KIB,
}
# How a message kind is named in errors and logs.
MESSAGE_NAMES: dict[str, str] = {
    "hello": "hello",
    "metrics": "metrics sample",
    "heartbeat": "heartbeat",
    "action_result": "action result",
    "event": "event",
    "enroll": "enroll request",
    "renew": "certificate renewal request",
    "replicas": "replica report",
    "log_chunk": "log chunk",
}

# --- Workloads ----------------------------------------------------------------------------
REPLICAS_PER_NODE = 256  # replicas one node may be assigned or report
VOLUME_REMOVALS = 256  # named volumes one node is asked to remove at once, or reports removed (rm --volumes)
REPLICA_MESSAGE = 1024  # a replica's last probe output or error, as reported
# Overlay networks (docs/networking.md): a name is "<stack>_<network>", two DNS labels and a _
NETWORK_NAME = 127
NETWORKS_PER_REPLICA = 16  # networks one replica joins
NETWORK_ALIASES = 32  # names one replica answers to on one network
OVERLAY_NETWORKS = 256  # networks a manager is told to keep, or reports present
# LoadBalancer virtual addresses one node announces or reports holding: VRRP has 255 router ids
VIRTUAL_ADDRESSES = 255
VIRTUAL_ADDRESS_PEERS = 256  # other nodes of one VRRP instance
VIRTUAL_ADDRESS_SERVICES = 64  # services one virtual address leads to
IP_ADDRESS = 64  # an IP address as text (IPv6 with a zone at most)
PUBLISHED_PORTS = (
    1024  # published ports of the whole cluster, sent to every node (NodeAssignment.service_ports)
)
PORT_ENDPOINTS = 1024  # healthy replicas behind one published port
CLUSTER_NODES = 1024  # node addresses a node lets in on its endpoint ports
# Endpoint ports: where Docker binds a replica's published container port on its own node's
# cluster address. Above Linux's ephemeral ports (32768-60999) and Kubernetes' NodePort range
# (30000-32767, which an imported `nodePort` publishes): no published port may be one.
ENDPOINT_PORT_FIRST = 61000
ENDPOINT_PORT_LAST = 63999
# `coordctl logs`: a replica's output travels up the node's session in chunks. A line longer
# than LOG_LINE_BYTES is cut (the rest counted as dropped). Each stream (one replica) and
# each node spends from a byte bucket (rate per second, burst): output past it is dropped
# and said so, so a chatty container cannot flood its node's session or the coordinator.
LOG_LINE_BYTES = 16 * KIB
LOG_CHUNK_BYTES = 64 * KIB  # line bytes in one LogChunk (its budget above leaves room for framing)
LOG_CHUNK_LINES = 2048
LOG_STREAM_RATE = 256 * KIB
LOG_STREAM_BURST = 4 * MIB
LOG_NODE_RATE = 1 * MIB
LOG_NODE_BURST = 8 * MIB
# Log chunks one node sends: at most this many a second, this many at once; a stream waits
# for its turn (its dockerd stream waits with it). Far below the coordinator's per-node
# share of messages (SessionLimits.messages: 500 in 10 s), which would end the session.
LOG_NODE_MESSAGES = 20
LOG_NODE_MESSAGE_BURST = 100
LOG_STREAMS_PER_NODE = 8  # log streams one node serves at once (each sends at most 4 chunks a second)
LOG_PENDING_BYTES = LOG_NODE_BURST  # line bytes the coordinator holds for one stream

# --- Memory -------------------------------------------------------------------------------
HISTORY_SAMPLES = 120  # per node, by count
HISTORY_NODE_BYTES = 2 * MIB  # per node, serialized samples
# All nodes together. `node show` reads the last 10 by default; 32 MiB keeps 120 of a Pi's
# samples (about 530 bytes each) for up to about 500 nodes, and about 12 each at 5,000, where
# 256 MiB let the history alone reach 300 MiB of the coordinator's memory after 10 minutes.
HISTORY_TOTAL_BYTES = 32 * MIB

# --- Logs ---------------------------------------------------------------------------------
LOG_TEXT = 200  # the most of any untrusted value written to a log line
LOG_REFUSALS_EVERY_SECONDS = 60.0  # one refusal line per node per this many seconds

# --- Workload timing ----------------------------------------------------------------------
# How long a node's replicas keep counting after its session is gone (or it went silent)
# before they are replaced elsewhere (Nomad's `lost_after`); coordinator.toml's
# [workloads] disconnect_grace overrides it.
DISCONNECT_GRACE = 5.0
# A replica that cannot start (pull refused, image missing, exits at once) is tried again
# in its slot after a delay that doubles from the first to the most (Kubernetes'
# ImagePullBackOff and CrashLoopBackOff); a replica that serves this long resets it.
START_BACKOFF_FIRST = 10.0
START_BACKOFF_MAX = 300.0
START_BACKOFF_RESET_AFTER = 60.0
# Attempts remembered per replica slot, as Swarm's task history limit (5 by default).
SLOT_HISTORY = 5

# The cluster registry's actions (Registry document): PEM text of one certificate chain or
# one key, and the HOST:PORT names one registry is pulled by.
REGISTRY_PEM = 16 * 1024
REGISTRY_ADDRESSES = 8
