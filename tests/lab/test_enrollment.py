"""Joining the cluster: every way a join can go wrong gets a clear error and changes nothing.

Each join runs inside a lab Pi (a network namespace) as `picoord-agent join`, exactly
as an operator would paste it; a fresh state dir makes it a new node.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from picoord.common.defaults import JOIN_TOKEN_ENV
from picoord.lab import netns
from picoord.lab.cluster import Lab


@pytest.fixture
def lab(lab1: Lab) -> Lab:
    return lab1


def join(lab: Lab, state: Path, name: str, token: str, ca_hash: str, *extra: str) -> tuple[int, str]:
    done = lab.exec_in("pi1", *lab.join_argv(ca_hash, name, state, "--token", token, *extra))
    return done.returncode, done.stdout + done.stderr


def snapshot(lab: Lab) -> tuple[list[str], list[dict]]:
    """What a refused join must not change: the node list and the tokens' use counts."""
    nodes = sorted(node["name"] for node in lab.coordctl_json("nodes"))
    return nodes, lab.coordctl_json("token", "list")


def refused_enrollments(lab: Lab) -> float:
    import urllib.request

    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("picoord_coordinator_enrollments_refused_total "):
                return float(line.split()[1])
    raise AssertionError("picoord_coordinator_enrollments_refused_total not exported")


def test_a_good_join_writes_a_private_key_and_registers_labels(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token(uses=1)
    code, output = join(
        lab, tmp_path, "newpi", token["token"], token["ca_cert_hash"], "--label", "role=storage"
    )
    assert code == 0, output
    assert "newpi enrolled" in output
    assert (tmp_path / "node.pem").stat().st_mode & 0o777 == 0o600  # key and certificate, one file
    assert token["token"] not in output  # never echoed back
    nodes = {node["name"]: node for node in lab.coordctl_json("nodes")}
    assert nodes["newpi"]["labels"] == {"role": "storage"}
    assert nodes["newpi"]["status"] == "Down"  # enrolled, but `run` never started
    lab.coordctl("node", "remove", "newpi", check=True)


@pytest.mark.parametrize(
    ("token", "exit_code", "message"),
    [
        ("abcdef.0123456789abcdef", 1, "refused the token: unknown token or wrong secret"),
        ("abcdef.0123456789abcde", 2, "malformed token"),
        ("abcdef.0123456789abcdef; reboot", 2, "malformed token"),
    ],
)
def test_wrong_tokens_are_refused(lab: Lab, tmp_path: Path, token: str, exit_code: int, message: str) -> None:
    ca_hash = lab.create_token()["ca_cert_hash"]
    before = snapshot(lab)
    code, output = join(lab, tmp_path, "intruder", token, ca_hash)
    assert (code, message in output) == (exit_code, True), output
    assert snapshot(lab) == before
    assert not (tmp_path / "enrollment.json").exists()


def test_expired_token_is_refused(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token(ttl="1s")
    time.sleep(1.5)
    before = snapshot(lab)
    code, output = join(lab, tmp_path, "latecomer", token["token"], token["ca_cert_hash"])
    assert code == 1 and "has expired" in output, output
    assert snapshot(lab) == before


def test_used_up_token_is_refused(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token(uses=1)
    code, output = join(lab, tmp_path / "a", "firstpi", token["token"], token["ca_cert_hash"])
    assert code == 0, output
    before = snapshot(lab)
    code, output = join(lab, tmp_path / "b", "secondpi", token["token"], token["ca_cert_hash"])
    assert code == 1 and "used up (1 of 1 uses)" in output, output
    assert snapshot(lab) == before
    lab.coordctl("node", "remove", "firstpi", check=True)


def test_ca_hash_mismatch_refuses_before_sending_the_token(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token()
    wrong = "sha256:" + hashlib.sha256(b"someone else's CA").hexdigest()
    refused_before = refused_enrollments(lab)
    before = snapshot(lab)
    code, output = join(lab, tmp_path, "pinned", token["token"], wrong)
    assert code == 1, output
    assert "CA certificate hash mismatch" in output and "Refusing to send the token" in output
    assert token["ca_cert_hash"] in output  # says what the coordinator really presented
    # the coordinator never saw an enrollment attempt: the token did not leave the Pi
    assert refused_enrollments(lab) == refused_before
    assert snapshot(lab) == before


@pytest.mark.parametrize(
    ("name", "message"),
    [("Pi_3", "DNS label"), ("-pi", "DNS label"), ("picoord-coordinator", "reserved for the coordinator")],
)
def test_bad_node_names_are_refused(lab: Lab, tmp_path: Path, name: str, message: str) -> None:
    token = lab.create_token()
    before = snapshot(lab)
    code, output = join(lab, tmp_path, name, token["token"], token["ca_cert_hash"])
    assert code != 0 and message in output, output
    assert snapshot(lab) == before


def test_a_node_cannot_take_an_enrolled_name(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token(uses=5)
    code, output = join(lab, tmp_path, "pi1", token["token"], token["ca_cert_hash"])
    assert code == 1 and "already enrolled" in output, output
    assert [t["uses"] for t in lab.coordctl_json("token", "list") if t["token_id"] == token["token"][:6]] == [
        0
    ]


def test_the_token_can_come_from_the_environment(lab: Lab, tmp_path: Path) -> None:
    """$PICOORD_JOIN_TOKEN instead of --token, so the secret is not on the command line."""
    token = lab.create_token(uses=1)
    argv = lab.join_argv(token["ca_cert_hash"], "envpi", tmp_path)
    assert token["token"] not in argv
    done = netns.run_in_netns(lab.namespace("pi1"), argv, 30, env={JOIN_TOKEN_ENV: token["token"]})
    assert done.returncode == 0, done.stderr
    assert "envpi" in [node["name"] for node in lab.coordctl_json("nodes")]
    lab.coordctl("node", "remove", "envpi", check=True)


def test_rejoining_an_enrolled_state_dir_needs_force(lab: Lab) -> None:
    token = lab.create_token()
    code, output = join(lab, lab.agent_state_dir("pi1"), "pi1", token["token"], token["ca_cert_hash"])
    assert code == 2 and "already enrolled" in output and "--force" in output, output
