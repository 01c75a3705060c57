"""Certificate rotation with real processes and lifetimes of well under a minute: nodes
renew over their session and stay Ready past their first certificate's end, also across a
restart; the coordinator's server certificate rotates without a restart; an expired or
revoked certificate is named as such, with the fix, in the agent's log and by coordctl."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509

from picoord.agent.state import AgentFiles
from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.lab.cluster import Lab
from tests.lab.helpers import enroll_address

FAST = {"heartbeat_timeout": 3.0, "down_timeout": 6.0}
NODE_VALIDITY = 40.0  # renewal at ~2/3: after about 25 s; a failed attempt is retried 5 s later
SERVER_VALIDITY = 30.0


def wait_for_log(lab: Lab, name: str, text: str, timeout: float, after: int = 0) -> str:
    """The log from byte `after` on, once it contains `text`."""
    deadline = time.monotonic() + timeout
    while True:
        log = lab.log_path(name).read_text(errors="replace")[after:]
        if text in log:
            return log
        if time.monotonic() >= deadline:
            raise AssertionError(f"{text!r} not in the {name} log after {timeout:g}s:\n{log[-3000:]}")
        time.sleep(0.25)


def log_size(lab: Lab, name: str) -> int:
    return lab.log_path(name).stat().st_size


def presented_server_serial(lab: Lab) -> str:
    """The serial of the certificate the coordinator shows a new TLS client right now."""
    host, _, port = enroll_address(lab).rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=COORDINATOR_SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def certificates(lab: Lab) -> dict[str, dict]:
    return {entry["name"]: entry for entry in lab.coordctl_json("certs", "check-expiration")}


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


@contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """A state dir even root cannot write to (as a read-only disk would be)."""
    subprocess.run(["chattr", "+i", str(directory)], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True, timeout=10)


def test_certificates_rotate_and_nodes_stay_ready(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(
        1,
        coordinator_args=[
            "--node-cert-validity",
            f"{NODE_VALIDITY:g}s",
            "--server-cert-validity",
            f"{SERVER_VALIDITY:g}s",
        ],
        **FAST,
    )
    coordinator_pid = lab.processes["coordinator"].pid
    first = lab.coordctl_json("node", "show", "pi1")
    first_server = certificates(lab)["server"]
    assert presented_server_serial(lab) == first_server["serial"]
    files = AgentFiles(lab.agent_state_dir("pi1"))
    before = files.credentials_path.read_bytes()

    # The renewal falls due while the state dir cannot be written: the old pair stays.
    with immutable(files.state_dir):
        failed = wait_for_log(lab, "pi1", "cannot store the renewed certificate", timeout=NODE_VALIDITY)
        assert "keeping the current key and certificate" in failed
        assert files.credentials_path.read_bytes() == before
        assert sorted(p.name for p in files.state_dir.iterdir()) == ["ca.crt", "enrollment.json", "node.pem"]
    # ...and is retried once it can.
    wait_for_log(lab, "pi1", "certificate renewed; used from the next connection", timeout=15)
    renewed = lab.coordctl_json("node", "show", "pi1")
    assert renewed["certificate_serial"] != first["certificate_serial"]
    assert renewed["certificate_not_after"] > first["certificate_not_after"]
    assert renewed["certificate_state"] == "valid"
    assert files.credentials().key_pem not in before  # a new key, not only a new certificate

    # The server certificate rotated meanwhile, without a restart; new handshakes get it.
    deadline = time.monotonic() + SERVER_VALIDITY
    while (server := certificates(lab)["server"])["serial"] == first_server["serial"]:
        assert time.monotonic() < deadline, "the server certificate did not rotate"
        time.sleep(0.5)
    assert presented_server_serial(lab) == server["serial"]
    assert lab.processes["coordinator"].pid == coordinator_pid and lab.is_running("coordinator")

    # Past the first node certificate's end the node is still Ready...
    wait_until(epoch(first["certificate_not_after"]) + 1)
    assert lab.node_statuses() == {"pi1": "Ready"}
    # ...and a restarted agent connects with the renewed certificate (the first one has ended).
    lab.kill_agent("pi1")
    lab.start_agent("pi1")
    lab.wait_ready(timeout=20)
    log = lab.log_path("pi1").read_text()
    assert "expired" not in log and "unusable" not in log

    table = lab.coordctl("certs", "check-expiration", check=True).stdout
    assert table.splitlines()[0].split() == ["CERTIFICATE", "EXPIRES", "RESIDUAL", "TIME", "SERIAL"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"ca", "server", "node/pi1"}
    assert rows["ca"][2].endswith("d")  # years left
    listing = certificates(lab)
    assert (
        listing["node/pi1"]["state"] == "valid"
        and 0 < listing["node/pi1"]["residual_seconds"] <= NODE_VALIDITY
    )


def test_expired_and_revoked_certificates_are_named_with_the_fix(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2, coordinator_args=["--node-cert-validity", "30s"], **FAST)
    lab.kill_agent("pi1")  # stopped long before its renewal point: its certificate runs out
    ends = lab.coordctl_json("node", "show", "pi1")["certificate_not_after"]

    # pi2 is removed: its running agent is refused from now on, and says why.
    lab.coordctl("node", "remove", "pi2", check=True)
    revoked = wait_for_log(lab, "pi2", "certificate was revoked", timeout=20)
    assert "Fix: on the coordinator run `coordctl token create`" in revoked and "--force" in revoked

    wait_until(epoch(ends) + 0.5)
    started = log_size(lab, "pi1")
    lab.start_agent("pi1")
    expired = wait_for_log(lab, "pi1", "certificate expired at", timeout=10, after=started)
    assert f"this node's certificate expired at {ends}; it can no longer connect" in expired
    assert "coordctl token create" in expired and "--force" in expired
    assert "Socket closed" not in expired

    (node,) = lab.coordctl_json("nodes")
    assert (node["name"], node["certificate_state"]) == ("pi1", "expired")
    assert node["certificate_not_after"] == ends
    table = lab.coordctl("nodes", check=True).stdout
    assert table.splitlines()[1].split()[:2] == ["pi1", "Down,CertExpired"]
    shown = lab.coordctl("node", "show", "pi1", check=True).stdout
    assert f"until {ends} (expired)" in shown and "None" not in shown
    listed = certificates(lab)
    assert listed["node/pi1"]["state"] == "expired" and listed["node/pi1"]["residual_seconds"] == 0
    assert "node/pi2" not in listed  # removed nodes are no longer listed
    check = lab.coordctl("certs", "check-expiration", check=True).stdout
    assert [line.split()[2] for line in check.splitlines() if line.startswith("node/pi1")] == ["expired"]

    # The fix the log names works: a new token, join --force, and the node is back.
    token = lab.create_token()
    done = lab.exec_in(
        "pi1",
        *lab.join_argv(
            token["ca_cert_hash"], "pi1", lab.agent_state_dir("pi1"), "--token", token["token"], "--force"
        ),
    )
    assert done.returncode == 0, done.stderr
    lab.kill_agent("pi1")
    lab.start_agent("pi1")
    lab.wait_ready(["pi1"], timeout=20)
    assert lab.coordctl_json("nodes")[0]["certificate_state"] == "valid"
