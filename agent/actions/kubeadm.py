"""kubeadm membership: init the control plane and hand out a join token; join; reset.

The seed's Option 1, as typed actions. Idempotency comes from the files kubeadm itself
leaves: /etc/kubernetes/admin.conf on an initialised control plane, kubelet.conf on a
joined node. On the manager a usable bootstrap token is reused (`kubeadm token list`);
only when none is left is one created, so a second apply runs nothing. The agent
chooses the new token itself, so it is a known secret before any argv or output is
recorded, and `kubeadm init --skip-token-print` keeps init's own token out of its output.

The `kubeadm` program is found through PATH. It is not packaged for this machine: the
tests run these executors against a recording stand-in (tests/fixtures/standin).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.agent.commands import program_available
from picoord.common.checks.membership import (
    KUBE_API_PORT,
    check_kubeadm_init,
    check_kubeadm_join,
    check_kubeadm_reset,
    kubeadm_api_server,
)
from picoord.common.files import write_atomically
from picoord.common.validation import FieldError, host_port, kubeadm_token, sha256_pin
from picoord.v1 import actions_pb2

KUBERNETES_DIR = Path("/etc/kubernetes")
ADMIN_CONF = KUBERNETES_DIR / "admin.conf"  # written by `kubeadm init`
KUBELET_CONF = KUBERNETES_DIR / "kubelet.conf"  # written by `kubeadm join` (and init)
CA_CERT = KUBERNETES_DIR / "pki" / "ca.crt"

INIT_TIMEOUT = 600.0  # pulls control-plane images and waits for the API server
JOIN_TIMEOUT = 300.0
TOKEN_TIMEOUT = 60.0
RESET_TIMEOUT = 120.0
# A listed token is reused only if it stays valid this long: time for the workers to join.
TOKEN_MARGIN = timedelta(minutes=30)
DEFAULT_NODE_TOKEN_GROUP = "system:bootstrappers:kubeadm:default-node-token"


@dataclass(frozen=True)
class JoinCommand:
    api_server: str  # HOST:PORT
    token: str
    ca_cert_hash: str  # sha256:<hex>


# --- pure parts ----------------------------------------------------------------------


def plan_kubeadm_init(initialised: bool, advertise: str, pod_network_cidr: str) -> list[list[str]]:
    """`kubeadm init` unless admin.conf shows the control plane is already there."""
    if initialised:
        return []
    argv = ["kubeadm", "init", "--apiserver-advertise-address", advertise]
    if pod_network_cidr:
        argv += ["--pod-network-cidr", pod_network_cidr]
    return [[*argv, "--skip-token-print"]]


# kubeadm generates the token: it is printed (output withheld from records), never on an argv.
TOKEN_CREATE_ARGV = ["kubeadm", "token", "create", "--print-join-command"]
# The join's token travels in this file (root-only, removed after the join), not on the
# command line, where `ps` would show it to every user of the Pi.
JOIN_CONFIG = Path("/run/picoord-agent/kubeadm-join.yaml")


def join_configuration(api_server: str, token: str, ca_cert_hash: str) -> str:
    """kubeadm's JoinConfiguration: what `join HOST:PORT --token T --discovery-token-ca-cert-hash H` says."""
    return (
        "apiVersion: kubeadm.k8s.io/v1beta3\n"
        "kind: JoinConfiguration\n"
        "discovery:\n"
        "  bootstrapToken:\n"
        f'    apiServerEndpoint: "{api_server}"\n'
        f'    token: "{token}"\n'
        "    caCertHashes:\n"
        f'      - "{ca_cert_hash}"\n'
    )


def plan_kubeadm_join(joined_to: str | None, api_server: str) -> list[list[str]]:
    """Nothing when kubelet.conf already points at `api_server`; join when there is none.

    A node joined to another control plane fails: kubeadm_reset first, never implicitly.
    """
    if joined_to is not None:
        if joined_to == api_server:
            return []
        raise ActionFailed(
            f"this node is already joined to the cluster at {joined_to}, not {api_server}; "
            "kubeadm_reset first"
        )
    return [["kubeadm", "join", "--config", str(JOIN_CONFIG)]]


def plan_kubeadm_reset(initialised: bool, joined: bool) -> list[list[str]]:
    return [["kubeadm", "reset", "--force"]] if initialised or joined else []


def kubeconfig_server(text: str) -> str | None:
    """HOST:PORT of the first cluster's `server: https://...` line in a kubeconfig."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "server":
            url = value.strip().strip("\"'")
            if url.startswith("https://"):
                try:
                    return host_port("server", url[len("https://") :].rstrip("/"), KUBE_API_PORT)
                except FieldError:
                    return None
    return None


def _json_documents(text: str) -> list[object]:
    """kubeadm's `-o json` prints one object per token, one after another (not an array)."""
    decoder, documents, index = json.JSONDecoder(), [], 0
    while True:
        while index < len(text) and text[index] in " \t\r\n":
            index += 1
        if index >= len(text):
            return documents
        document, index = decoder.raw_decode(text, index)
        if isinstance(document, list):
            documents.extend(document)
        elif isinstance(document, dict) and isinstance(document.get("items"), list):
            documents.extend(document["items"])
        else:
            documents.append(document)


def _expiry(value: object) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def usable_token(token_list_json: str, now: datetime) -> str | None:
    """A listed bootstrap token a worker can join with for at least TOKEN_MARGIN, if any.

    It must authenticate and sign (discovery), belong to kubeadm's default node group,
    and expire later than now + TOKEN_MARGIN (or never). The longest-lived one wins.
    """
    try:
        entries = _json_documents(token_list_json)
    except ValueError:
        raise ActionFailed("`kubeadm token list -o json` printed something that is not JSON") from None
    best: tuple[datetime, str] | None = None
    never = datetime.max.replace(tzinfo=UTC)
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        token = str(entry.get("token", ""))
        usages = set(entry.get("usages") or [])
        groups = set(entry.get("groups") or [])
        try:
            kubeadm_token("token", token)
            expires = _expiry(entry.get("expires")) or never
        except (FieldError, ValueError):
            continue
        if {"authentication", "signing"} - usages or DEFAULT_NODE_TOKEN_GROUP not in groups:
            continue
        if expires < now + TOKEN_MARGIN:
            continue
        if best is None or expires > best[0]:
            best = (expires, token)
    return best[1] if best else None


def parse_join_command(output: str) -> JoinCommand:
    """The `kubeadm join HOST:PORT --token T --discovery-token-ca-cert-hash sha256:H` line."""
    for line in output.splitlines():
        words = line.replace("\\", " ").split()
        if words[:2] != ["kubeadm", "join"] or len(words) < 3:
            continue
        values = dict(zip(words[3::2], words[4::2], strict=False))
        try:
            return JoinCommand(
                api_server=host_port("api_server", words[2], KUBE_API_PORT),
                token=kubeadm_token("token", values.get("--token", "")),
                ca_cert_hash=sha256_pin("ca_cert_hash", values.get("--discovery-token-ca-cert-hash", "")),
            )
        except FieldError as error:
            raise ActionFailed(f"kubeadm printed a join command this agent cannot read: {error}") from None
    raise ActionFailed("kubeadm printed no join command")


def ca_cert_hash(pem: bytes) -> str:
    """kubeadm's discovery pin: sha256 of the CA certificate's DER SubjectPublicKeyInfo."""
    from cryptography import x509  # only the control-plane node needs it
    from cryptography.hazmat.primitives import serialization

    try:
        public_key = x509.load_pem_x509_certificate(pem).public_key()
    except ValueError as error:
        raise ActionFailed(f"{CA_CERT} is not a PEM certificate: {error}") from None
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


# --- the imperative shell ----------------------------------------------------------


def _require_kubeadm() -> None:
    if not program_available("kubeadm"):
        raise ActionFailed("kubeadm is not installed on this node (not found on PATH)")


def _fact(key: str, value: str, secret: bool = False) -> actions_pb2.Fact:
    return actions_pb2.Fact(key=key, value=value, secret=secret)


def kubeadm_init(request: actions_pb2.KubeadmInit, context: ActionContext) -> Outcome:
    """Initialise the control plane unless admin.conf exists; then a usable join token.

    Facts: kubeadm.api_server (HOST:6443), kubeadm.ca_cert_hash, and kubeadm.token
    (secret). A dry run before init has only the API server address it would have.
    """
    check_kubeadm_init(request)
    _require_kubeadm()
    advertise = request.advertise_address
    admin = read_file(ADMIN_CONF, errors="replace")
    server = kubeconfig_server(admin) if admin is not None else None
    if admin is not None and server and server.rpartition(":")[0].strip("[]") != advertise:
        raise ActionFailed(
            f"the control plane here was initialised for {server}, not {advertise}; kubeadm_reset first"
        )
    in_place = f"control plane initialised (API server {server})" if admin is not None else "no control plane"
    for argv in plan_kubeadm_init(admin is not None, advertise, request.pod_network_cidr):
        context.change(argv, INIT_TIMEOUT)
    planned_server = server or host_port("advertise_address", advertise, KUBE_API_PORT)
    if context.dry_run and admin is None:
        outcome = Outcome.done(context, f"would initialise a control plane at {planned_server}", in_place)
        outcome.facts = [_fact("kubeadm.api_server", planned_server)]
        return outcome
    if admin is None:
        server = kubeconfig_server(read_file(ADMIN_CONF, errors="replace") or "") or planned_server

    listed = context.read(["kubeadm", "token", "list", "-o", "json"], TOKEN_TIMEOUT)
    if not listed.ok:
        raise ActionFailed(f"kubeadm token list failed ({listed.exit_code}): {listed.stderr.strip()[-500:]}")
    token = usable_token(listed.stdout, datetime.now(UTC))
    pem_text = read_file(CA_CERT, errors="replace")
    pem = pem_text.encode() if pem_text is not None else None
    if token is not None:
        context.secrets = (*context.secrets, token)
        if pem is None:
            raise ActionFailed(f"{CA_CERT} is missing: cannot pin the cluster CA for joining workers")
        join = JoinCommand(server or planned_server, token, ca_cert_hash(pem))
    else:
        result = context.change(TOKEN_CREATE_ARGV, TOKEN_TIMEOUT, secret_output=True)
        if result is None:  # dry run on an initialised control plane without a usable token
            outcome = Outcome.done(context, "would create a join token", in_place)
            outcome.facts = [_fact("kubeadm.api_server", server or planned_server)]
            if pem is not None:
                outcome.facts.append(_fact("kubeadm.ca_cert_hash", ca_cert_hash(pem)))
            return outcome
        join = parse_join_command(result.stdout)
        context.secrets = (*context.secrets, join.token)
    message = (
        "control plane initialised" if admin is None else "join token created" if context.commands else ""
    )
    outcome = Outcome.done(context, message, in_place)
    outcome.facts = [
        _fact("kubeadm.api_server", join.api_server),
        _fact("kubeadm.ca_cert_hash", join.ca_cert_hash),
        _fact("kubeadm.token", join.token, secret=True),
    ]
    return outcome


def kubeadm_join(request: actions_pb2.KubeadmJoin, context: ActionContext) -> Outcome:
    """Join the cluster at api_server unless kubelet.conf shows this node already did.

    The token goes to kubeadm in a root-only JoinConfiguration file, removed afterwards,
    never on its command line. Facts: kubeadm.api_server this node is joined to.
    """
    check_kubeadm_join(request)
    _require_kubeadm()
    api_server = kubeadm_api_server(request)
    context.secrets = (*context.secrets, request.token)
    kubelet = read_file(KUBELET_CONF, errors="replace")
    joined_to = (kubeconfig_server(kubelet) or "?") if kubelet is not None else None
    in_place = f"joined to {joined_to}" if joined_to else "not joined"
    for argv in plan_kubeadm_join(joined_to, api_server):
        if context.dry_run:
            context.change(argv, JOIN_TIMEOUT)
            continue
        JOIN_CONFIG.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(
            JOIN_CONFIG, join_configuration(api_server, request.token, request.ca_cert_hash).encode(), 0o600
        )
        try:
            context.change(argv, JOIN_TIMEOUT)
        finally:
            JOIN_CONFIG.unlink(missing_ok=True)
    verb = "would join" if context.dry_run else "joined"
    outcome = Outcome.done(
        context, f"{verb} the cluster at {api_server}" if context.commands else "", in_place
    )
    outcome.facts = [_fact("kubeadm.api_server", api_server)]
    return outcome


def kubeadm_reset(request: actions_pb2.KubeadmReset, context: ActionContext) -> Outcome:
    """`kubeadm reset --force` when this node is a control plane or a joined node."""
    check_kubeadm_reset(request)
    initialised, joined = ADMIN_CONF.exists(), KUBELET_CONF.exists()
    plan = plan_kubeadm_reset(initialised, joined)
    if plan:
        _require_kubeadm()
    for argv in plan:
        context.change(argv, RESET_TIMEOUT)
    in_place = "control plane" if initialised else "joined node" if joined else "not part of a cluster"
    verb = "would reset" if context.dry_run else "reset"
    return Outcome.done(context, f"{verb} this node's kubeadm state" if plan else "", in_place)
