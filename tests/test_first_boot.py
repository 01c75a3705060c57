"""Joining the rack in one step, in a booted Debian 12 (root, a few minutes).

One booted root for the module (tests/test_packages.py's Container and builders, by
import): both packages installed with apt, the coordinator told to advertise 127.0.0.1 (the
container has loopback only), and a simulated boot partition at /boot/firmware. Then:
- the coordinator's start-up check warns that a loopback address is advertised while the
  agent port listens on all addresses;
- a first-boot file with a wrong token: its presence enables and starts the agent (the
  package's first-boot path unit), the agent tries it, the journal says the token was
  refused (never the token), the file is gone, the agent keeps waiting;
- a first-boot file from `coordctl token create --first-boot` while the coordinator is
  down: kept and retried; once the coordinator is back, the node enrolls (Ready under the
  file's name) and the file is gone;
- `picoord-agent check` on this node, which has no dockerd: names it and exits 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from picoord.common.joining import parse_first_boot
from picoord.lab.arm64 import build_debs
from tests.conftest import require_root_or_fail
from tests.test_packages import Container, base_root

NODE = "pi-boot"
BOOT_FILE = "/boot/firmware/picoord-join.toml"


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """Debian 12 booted with both packages installed and the coordinator running."""
    require_root_or_fail()
    debs = build_debs(tmp_path_factory.mktemp("debs"))
    made = Container(tmp_path_factory.mktemp("first-boot"), base_root())
    try:
        made.prepare(list(debs.values()))
        made.boot()
        made.apt("install", "-y", "-q", *[f"/root/debs/{deb.name}" for deb in debs.values()], timeout=600)
        made.wait_active("picoord-coordinator")
        # The container has loopback only: the address its agent can reach.
        config = made.root / "etc/picoord/coordinator.toml"
        config.write_text(config.read_text() + '\nadvertise_address = "127.0.0.1"\n')
        made.systemctl("restart", "picoord-coordinator")
        made.wait_active("picoord-coordinator")
        (made.root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
        yield made
    finally:
        made.destroy()
        assert not os.path.ismount(made.root), f"{made.root} is still mounted"


def agent_journal(container: Container) -> str:
    return container.sh("journalctl", "-u", "picoord-agent", "--no-pager", "-o", "cat", check=False).stdout


def wait_for(what: str, condition: object, timeout: float, container: Container) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}:\n{agent_journal(container)[-3000:]}"
        time.sleep(0.5)


def first_boot_file(container: Container, *extra: str) -> str:
    done = container.sh("coordctl", "token", "create", "--ttl", "10m", "--first-boot", *extra)
    return done.stdout


def test_the_coordinator_warns_about_a_loopback_advertise_address(booted: Container) -> None:
    journal = booted.sh("journalctl", "-u", "picoord-coordinator", "--no-pager", "-o", "cat").stdout
    assert "is a loopback address while the agent port listens on 0.0.0.0" in journal, journal[-2000:]
    assert "join commands name this address" in journal
    printed = booted.sh("coordctl", "token", "create", "--ttl", "1m").stdout
    assert printed.startswith("picoord-agent join 127.0.0.1:7443 --token "), printed


def test_first_boot_join_from_the_boot_partition(booted: Container) -> None:
    boot_file = booted.root / BOOT_FILE.lstrip("/")

    # A wrong token: tried, refused, deleted; the agent keeps waiting, the secret unlogged.
    good = parse_first_boot(first_boot_file(booted, "--node-name", NODE).encode())
    wrong_secret = "wrongsecret00000"
    assert booted.sh("systemctl", "is-enabled", "picoord-agent", check=False).stdout.strip() == "disabled"
    boot_file.write_text(_with_secret(first_boot_file(booted), wrong_secret))
    booted.wait_active("picoord-agent")  # started by picoord-agent-first-boot.path
    assert booted.sh("systemctl", "is-enabled", "picoord-agent", check=False).stdout.strip() == "enabled"
    wait_for("the refused file was not deleted", lambda: not boot_file.exists(), 60, booted)
    journal = agent_journal(booted)
    assert "the coordinator refused the token" in journal, journal[-2000:]
    assert wrong_secret not in journal
    assert booted.sh("systemctl", "is-active", "picoord-agent", check=False).stdout.strip() == "active"
    assert not (booted.root / "var/lib/picoord/agent/enrollment.json").exists()

    # The coordinator down (the rack booted first): the file is kept and tried again.
    text = first_boot_file(booted, "--node-name", NODE)
    secret = parse_first_boot(text.encode()).token.secret
    booted.systemctl("stop", "picoord-coordinator")
    boot_file.write_text(text)
    wait_for(
        "no retry was announced",
        lambda: "kept, retrying" in agent_journal(booted),
        60,
        booted,
    )
    assert boot_file.read_text() == text
    booted.systemctl("start", "picoord-coordinator")
    node = booted.wait_node_ready(NODE, timeout=120)
    assert node["name"] == NODE
    wait_for("the used file was not deleted", lambda: not boot_file.exists(), 30, booted)
    journal = agent_journal(booted)
    assert f"joined with {BOOT_FILE}; deleted it" in journal
    assert secret not in journal and good.token.secret not in journal
    assert booted.show("picoord-agent", "NRestarts") == "0"


def _with_secret(text: str, secret: str) -> str:
    """The first-boot file `text` with its token's secret replaced."""
    parameters = parse_first_boot(text.encode())
    return text.replace(
        f"{parameters.token.token_id}.{parameters.token.secret}", f"{parameters.token.token_id}.{secret}"
    )


def test_check_names_the_missing_dockerd(booted: Container) -> None:
    assert not (booted.root / "usr/sbin/dockerd").exists(), "this node is meant to lack dockerd"
    done = booted.sh("picoord-agent", "check", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("MISSING") and "dockerd" in line for line in lines), done.stdout
    assert "fix: apt install docker.io" in done.stdout
    assert lines[-1].startswith("not ready for workloads: dockerd"), done.stdout
    # The checks for actions are reported too, each with its state.
    for name in ("cgroup memory", "gluster client", "firewall", "time sync"):
        assert any(name in line for line in lines), done.stdout
