"""Node restriction (issue 18): one enrolled node, with its own valid certificate and
hand-made messages, can no longer describe itself into another node's workloads and
secrets, nor take more than its share of the session port.

Each row of the issue's table is one test here, with what the operator sees after the
fix, and the positive controls: an operator's label selects the node, and an accepted
hardware change places again. One two-Pi lab serves the module; the hostile client is a
raw session with pi2's (or a freshly enrolled node's) certificate, pi2's real agent
stopped meanwhile, and each test puts pi2's agent back before it ends.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from picoord.agent.channel import channel_options
from picoord.agent.enroll import Endpoint, fetch_pinned_ca, new_key_and_csr
from picoord.lab.cluster import Lab
from picoord.v1 import agent_pb2, agent_pb2_grpc, node_pb2
from tests.conftest import _module_lab
from tests.lab.helpers import enroll_address, node_credentials

pytestmark = pytest.mark.lab

GIB = 1 << 30
SECRET_VALUE = "Restricted-9kW2pQ"
SECRET_NAME = "restriction-secrets"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(tmp_path_factory, 2)


# --------------------------------------------------------------------------- a hostile node


class RawSession:
    """A Session stream held open from a test thread: messages go in when `send` is called,
    whatever the coordinator sends is collected in `received`, and `status` is how it ended."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials) -> None:
        self._outgoing: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        self.received: list[agent_pb2.CoordinatorMessage] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self._closing = threading.Event()
        self._channel = grpc.secure_channel(address, credentials, options=channel_options())
        self._call = agent_pb2_grpc.AgentSessionStub(self._channel).Session(iter(self._outgoing.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.received.append(message)
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.status, self.details = error.code(), error.details() or ""

    def keep_alive(self, every: float = 1.0) -> RawSession:
        """Heartbeats, as an agent sends them, so the node stays Ready while the test looks."""

        def beat() -> None:
            while self.status is None and not self._closing.wait(every):
                self.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=time.time())))

        threading.Thread(target=beat, daemon=True).start()
        return self

    def send(self, *messages: agent_pb2.AgentMessage) -> RawSession:
        for message in messages:
            self._outgoing.put(message)
        return self

    def ended(self, timeout: float = 20.0) -> bool:
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def welcomed(self, timeout: float = 20.0) -> bool:
        return wait_for(lambda: any(m.HasField("welcome") for m in self.received) or self.status, timeout)

    def close(self) -> None:
        self._closing.set()
        self._outgoing.put(None)
        self._call.cancel()
        self._reader.join(10)
        self._channel.close()

    def assigned(self) -> dict[str, set[str]]:
        """service -> the secret values its replicas carried, over every assignment received."""
        found: dict[str, set[str]] = {}
        for message in self.received:
            for replica in message.assignment.replicas if message.HasField("assignment") else ():
                found.setdefault(replica.service, set()).update(replica.env.values())
        return found


@contextlib.contextmanager
def raw_session(
    lab: Lab, credentials: grpc.ChannelCredentials, *first: agent_pb2.AgentMessage
) -> Iterator[RawSession]:
    session = RawSession(lab.coordinator_address, credentials).send(*first)
    if first:
        session.keep_alive()
    try:
        yield session
    finally:
        session.close()


def wait_for(check: Callable[[], Any], timeout: float, step: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return bool(check())


def hello(node: str, hardware: node_pb2.Hardware) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(node_name=node, agent_version="hostile", hardware=hardware)
    )


def recorded_hardware(lab: Lab, node: str) -> node_pb2.Hardware:
    """What the node's real agent reported (its hello, as `node show` has it)."""
    detail = lab.coordctl_json("node", "show", node)["hardware"]
    hardware = node_pb2.Hardware(
        hostname=detail.get("hostname", ""),
        arch=detail.get("arch", ""),
        cpu_cores=int(detail.get("cpu_cores", 0)),
        memory_total_bytes=int(detail.get("memory_total_bytes", 0)),
    )
    for gpu in detail.get("gpus", []):
        hardware.gpus.add(vendor=gpu.get("vendor", ""), name=gpu.get("name", ""))
    return hardware


@contextlib.contextmanager
def agent_away(lab: Lab, node: str) -> Iterator[None]:
    """The node's real agent stopped while the hostile client holds its name; back (and
    Ready) afterwards."""
    lab.kill_agent(node)
    lab.wait_for_status("NotReady", [node], timeout=60)
    try:
        yield
    finally:
        lab.start_agent(node)


def nodes(lab: Lab) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in lab.coordctl_json("nodes")}


# --------------------------------------------------------------------------- services


def roll_out(lab: Lab, tmp_path: Path, name: str, constraint: str, memory: str = "64Mi") -> str:
    """Apply a one-replica service holding the secret and start its rollout; "" when it
    started, else what coordctl said (a rollout that cannot place is refused up front)."""
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(
        "apiVersion: picoord/v1\nkind: Service\n"
        f"name: {name}\nimage: busybox:latest\nreplicas: 1\n"
        f"secrets:\n  - {{env: DB_PASSWORD, secret: {SECRET_NAME}, key: password}}\n"
        f"resources:\n  requests: {{memory: {memory}}}\n"
        f'placement:\n  constraints: ["{constraint}"]\n'
    )
    lab.coordctl("apply", "-f", str(spec), check=True, timeout=60)
    return again(lab, name)


def again(lab: Lab, name: str) -> str:
    done = lab.coordctl("rollout", name, "--detach", timeout=60)
    return "" if done.returncode == 0 else done.stderr.strip()


def placed_on(lab: Lab, name: str) -> set[str]:
    return {replica["node"] for replica in lab.coordctl_json("ps", name) if replica["node"]}


@pytest.fixture(scope="module")
def secret(lab: Lab) -> str:
    lab.coordctl("secret", "create", SECRET_NAME, "password", "--from-literal", SECRET_VALUE, check=True)
    return SECRET_VALUE


@pytest.fixture
def service(lab: Lab, secret: str) -> Iterator[list[str]]:
    """Names of services a test applies; removed at its end."""
    names: list[str] = []
    yield names
    for name in names:
        lab.coordctl("rm", "service", name, timeout=60)


# --------------------------------------------------------------------------- the table's rows


def test_row1_reported_hardware_is_held_until_accepted(lab: Lab, tmp_path: Path, service: list[str]) -> None:
    """64 CPUs, 64 GiB, 2 GPUs from pi2: flagged, placement keeps the recorded hardware and
    gives the node nothing new; `node accept` records the claim and it places again."""
    real = recorded_hardware(lab, "pi2")
    claim = node_pb2.Hardware()
    claim.CopyFrom(real)
    claim.cpu_cores, claim.memory_total_bytes = 64, 64 * GIB
    claim.gpus.add(vendor="nvidia", name="A100")
    claim.gpus.add(vendor="nvidia", name="A100")
    with (
        agent_away(lab, "pi2"),
        raw_session(lab, node_credentials(lab, "pi2"), hello("pi2", claim)) as hostile,
    ):
        assert hostile.welcomed()
        listed = nodes(lab)["pi2"]
        assert listed["held"] == [
            f"cores {real.cpu_cores} -> 64",
            f"memory {listed_memory(real)} -> 64.0 GiB",
            f"gpus {len(real.gpus)} -> {len(real.gpus) + 2}",
        ]
        assert listed["cpu_cores"] == 64  # `nodes` shows the report, HELD says it is a claim
        table = lab.coordctl("nodes", check=True).stdout
        assert "HELD: cores" in table
        service.append("claims-big")
        refused = roll_out(lab, tmp_path, "claims-big", "node.hostname == pi2")
        assert "1 of 1 replicas cannot be placed: 0/2 nodes available: 1 held (hardware claim)" in refused
        assert placed_on(lab, "claims-big") == set()
        assert "claims-big" not in hostile.assigned()
        # positive control: the operator accepts the change, and the node places again
        done = lab.coordctl("node", "accept", "pi2", check=True)
        assert "accepted: hardware cores" in done.stdout, done.stdout
        assert nodes(lab)["pi2"]["held"] == []
        assert again(lab, "claims-big") == ""
        assert wait_for(lambda: placed_on(lab, "claims-big") == {"pi2"}, 30)
        # what the checks above would have seen: the assignment, secret and all, on pi2's stream
        assert wait_for(lambda: SECRET_VALUE in hostile.assigned().get("claims-big", set()), 30)
    # the real agent is back with its real hardware: a change again, held again until accepted
    assert wait_for(lambda: nodes(lab)["pi2"]["held"], 60)
    lab.coordctl("node", "accept", "pi2", check=True)
    lab.wait_ready(["pi2"], timeout=60)
    assert nodes(lab)["pi2"]["held"] == []


def listed_memory(hardware: node_pb2.Hardware) -> str:
    from picoord.coordinator.ctl.output import human_bytes

    return human_bytes(hardware.memory_total_bytes)


def test_row1_implausible_samples_end_the_session(lab: Lab) -> None:
    """20 °C and 0 % CPU stay the node's word; more memory free than it has does not."""
    real = recorded_hardware(lab, "pi2")
    bogus = node_pb2.MetricsSample(
        timestamp=time.time(),
        memory_total_bytes=real.memory_total_bytes,
        memory_available_bytes=real.memory_total_bytes + 64 * GIB,
    )
    with (
        agent_away(lab, "pi2"),
        raw_session(lab, node_credentials(lab, "pi2"), hello("pi2", real)) as hostile,
    ):
        assert hostile.welcomed()
        hostile.send(agent_pb2.AgentMessage(metrics=bogus))
        assert hostile.ended()
        assert hostile.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "implausible sample: metrics.memory_available_bytes is more than memory_total_bytes" in (
            hostile.details
        )
    lab.wait_ready(["pi2"], timeout=60)


def test_row2_a_hostname_claim_pulls_no_pinned_service(lab: Lab, tmp_path: Path, service: list[str]) -> None:
    """pi2 says its hostname is pi1 while pi1 is away: the service pinned to pi1 (and its
    secret) waits for pi1 instead of going to pi2; once pi1 is back it runs there."""
    claim = recorded_hardware(lab, "pi2")
    claim.hostname = "pi1"
    lab.kill_agent("pi1")
    lab.wait_for_status("NotReady", ["pi1"], timeout=60)
    try:
        with (
            agent_away(lab, "pi2"),
            raw_session(lab, node_credentials(lab, "pi2"), hello("pi2", claim)) as hostile,
        ):
            assert hostile.welcomed()
            service.append("pinned-db")
            refused = roll_out(lab, tmp_path, "pinned-db", "node.hostname == pi1")
            assert "0/2 nodes available: 1 node.hostname != pi1, 1 not ready" in refused, refused
            time.sleep(3)  # a controller tick or two: nothing may reach pi2 meanwhile
            assert placed_on(lab, "pinned-db") == set()
            assert "pinned-db" not in hostile.assigned()
    finally:
        lab.start_agent("pi1")
    lab.wait_ready(timeout=60)
    assert again(lab, "pinned-db") == ""  # positive control: pi1 itself
    assert wait_for(lambda: placed_on(lab, "pinned-db") == {"pi1"}, 60)


def enroll_raw(lab: Lab, token: dict[str, Any], name: str, labels: dict[str, str]) -> grpc.ChannelCredentials:
    """Enroll `name` as a hostile client would (labels of its choosing); its credentials."""
    host, _, port = enroll_address(lab).rpartition(":")
    ca_pem = fetch_pinned_ca(Endpoint(host, int(port)), token["ca_cert_hash"])
    key_pem, csr_pem = new_key_and_csr(name)
    with grpc.secure_channel(
        enroll_address(lab), grpc.ssl_channel_credentials(root_certificates=ca_pem)
    ) as channel:
        reply = agent_pb2_grpc.EnrollmentStub(channel).Enroll(
            agent_pb2.EnrollRequest(token=token["token"], node_name=name, csr_pem=csr_pem, labels=labels),
            timeout=30,
        )
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=reply.certificate_pem
    )


def test_row3_join_labels_wait_for_the_operator(lab: Lab, tmp_path: Path, service: list[str]) -> None:
    """A node joining with role=manager on a multi-use token gets neither node.role nor
    node.labels.role; the operator's own label does select a node (positive control), and a
    token's labels are granted; `token create` and `token list` say what a token did."""
    created = lab.coordctl(
        "token", "create", "--uses", "3", "--ttl", "1h", "--label", "zone=shelf-b", check=True
    )
    assert "up to 3 node(s) may join until" in created.stderr and "grants zone=shelf-b" in created.stderr
    argv = created.stdout.split()  # picoord-agent join HOST:PORT --token T --ca-cert-hash H
    token = {"token": argv[argv.index("--token") + 1], "ca_cert_hash": argv[argv.index("--ca-cert-hash") + 1]}
    evil = enroll_raw(lab, token, "evil", {"role": "manager"})
    fake = recorded_hardware(lab, "pi2")
    fake.hostname = "pi1"  # its first hello names another node: no hostname fact either
    try:
        with raw_session(lab, evil, hello("evil", fake)) as hostile:
            assert hostile.welcomed()
            listed = nodes(lab)["evil"]
            assert listed["pending_labels"] == {"role": "manager"} and listed["role"] == "worker"
            assert listed["labels"] == {"role": "manager", "zone": "shelf-b"}
            assert "role=manager (asked)" in lab.coordctl("nodes", check=True).stdout
            for name, constraint in (
                ("wants-manager", "node.role == manager"),
                ("wants-label", "node.labels.role == manager"),
            ):
                service.append(name)
                refused = roll_out(lab, tmp_path, name, constraint)
                assert f"0/3 nodes available: 3 {constraint.replace('==', '!=')}" in refused, refused
                assert placed_on(lab, name) == set()
            service.append("wants-pi1")  # evil's hostname claim does not make it a candidate
            assert roll_out(lab, tmp_path, "wants-pi1", "node.hostname == pi1") == ""
            assert wait_for(lambda: placed_on(lab, "wants-pi1") == {"pi1"}, 30)
            assert not any(SECRET_VALUE in values for values in hostile.assigned().values())
            # the token's own label is granted: it selects evil (nothing secret in that)
            assert "zone" not in nodes(lab)["evil"]["pending_labels"]
            # positive control: the operator's label selects the node it is set on
            lab.coordctl("node", "label", "pi2", "role=manager", check=True)
            assert again(lab, "wants-label") == ""
            assert wait_for(lambda: placed_on(lab, "wants-label") == {"pi2"}, 60)
            assert "evil" not in placed_on(lab, "wants-label")
        used = {t["token_id"]: t for t in lab.coordctl_json("token", "list")}
        [mine] = [t for t in used.values() if t["labels"] == {"zone": "shelf-b"}]
        assert (mine["uses"], mine["usage_limit"], mine["used_by"]) == (1, 3, ["evil"])
        assert "evil" in lab.coordctl("token", "list", check=True).stdout
    finally:
        lab.coordctl("node", "label", "pi2", "role-")
        lab.coordctl("node", "remove", "evil")


# --------------------------------------------------------------------------- one node's fair share


def test_rows5_to_7_one_certificate_gets_one_nodes_share(lab: Lab) -> None:
    """Row 6: pi2's certificate cannot hold the port (two sessions; a third is refused at
    once) and pi1's restarted agent connects meanwhile. Row 5: a burst of session opens is
    cut at the per-node rate. Row 7: 5,000 events end the session at the message rate,
    with a handful of log lines."""
    credentials = node_credentials(lab, "pi2")
    real = recorded_hardware(lab, "pi2")
    log_before = len(lab.log_tail("coordinator", lines=100_000))
    with agent_away(lab, "pi2"):
        # row 6: two streams held without hello, the third refused; pi1 comes back regardless
        with raw_session(lab, credentials), raw_session(lab, credentials):
            time.sleep(1)
            with raw_session(lab, credentials) as third:
                assert third.ended(10)
                assert third.status == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "node 'pi2' already has 2 sessions open" in third.details
            lab.kill_agent("pi1")
            lab.start_agent("pi1")
            lab.wait_ready(["pi1"], timeout=60)
        # row 7: a flood of events is cut at the message rate
        with raw_session(lab, credentials, hello("pi2", real)) as flood:
            assert flood.welcomed()
            event = agent_pb2.AgentMessage(
                event=agent_pb2.Event(kind="spam", message="x" * 200, timestamp=1.0)
            )
            flood.send(*[event] * 5000)
            assert flood.ended(60)
            assert flood.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "sent more than 500 messages in 10s" in flood.details
        logged = lab.log_tail("coordinator", lines=100_000)[log_before:]
        assert logged.count("agent event") <= 20, logged.count("agent event")
        # row 5: many session opens in a row: cut at the per-node rate
        outcomes: dict[str, int] = {}
        for _ in range(80):
            with raw_session(lab, credentials, hello("pi2", real)) as burst:
                burst.welcomed(10)
                key = "welcomed" if any(m.HasField("welcome") for m in burst.received) else str(burst.status)
                outcomes[key] = outcomes.get(key, 0) + 1
        assert outcomes.get("welcomed", 0) <= 60, outcomes
        assert outcomes.get(str(grpc.StatusCode.RESOURCE_EXHAUSTED), 0) >= 20, outcomes
    # the real agent comes back once the pause (30 s) is over
    lab.wait_ready(["pi2"], timeout=120)


def test_a_real_join_says_its_labels_wait_and_accept_grants_them(lab: Lab, tmp_path: Path) -> None:
    """`picoord-agent join --label` as an operator pastes it: the agent says the labels wait,
    `coordctl node accept` grants them (positive control of the approve verb)."""
    token = lab.create_token(uses=1)
    done = lab.exec_in(
        "pi1",
        *lab.join_argv(
            token["ca_cert_hash"], "asker", tmp_path, "--token", token["token"], "--label", "disk=ssd"
        ),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "labels disk=ssd wait for the operator: coordctl node accept asker" in done.stdout
    try:
        assert nodes(lab)["asker"]["pending_labels"] == {"disk": "ssd"}
        accepted = lab.coordctl("node", "accept", "asker", check=True)
        assert "node/asker accepted: labels disk=ssd" in accepted.stdout, accepted.stdout
        listed = nodes(lab)["asker"]
        assert (listed["labels"], listed["pending_labels"]) == ({"disk": "ssd"}, {})
        again = lab.coordctl("node", "accept", "asker", check=True)
        assert "accepted: nothing was held" in again.stdout
    finally:
        lab.coordctl("node", "remove", "asker")
