"""A TimeSource document applied with `coordctl apply` on three sandboxed lab Pis: one serves
time with chrony, the others' chrony is pointed at it and reaches it.

In the lab no agent runs on the host, so pi1 stands in for the desktop (on a real cluster
the desktop runs an agent too and takes the `server` role). Each Pi's /etc/chrony is its
own (lab/sandbox.py), and no systemd runs there, so the executor only writes the drop-ins.

Lab Pis share the machine's one clock (network namespaces do not separate it), so no
process here may set it: the test starts pi1's server as `chronyd -x` (serves, never
touches the clock) and runs each client as `chronyd -Q` (measure-only: it asks the server
named in its drop-in, prints the offset and exits without correcting anything). Both read
only the drop-in directory, with no command socket or pid file on the shared /run.

The tests of this module share one lab and run in order: dry run, apply, second apply,
then time served and measured.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.agent.actions.chrony import DROP_IN
from picoord.lab.cluster import Lab
from tests.conftest import _module_lab

SPEC = """
kind: TimeSource
name: lab-time
server: pi1
clients: [pi2, pi3]
allow: [%(subnet)s]
stratum: 10
"""
CLIENTS = ("pi2", "pi3")
OFFSET = re.compile(r"System clock wrong by (-?\d+\.\d+) seconds \(ignored\)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(tmp_path_factory, 3, "timesource-lab", sandboxes=True)


@pytest.fixture(scope="module")
def spec(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "time.yaml"
    path.write_text(SPEC % {"subnet": str(lab.network.subnet)})
    return path


def apply(lab: Lab, spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return lab.coordctl("apply", "-f", str(spec), *extra, timeout=120)


def drop_in(lab: Lab, node: str) -> str | None:
    done = lab.sandbox(node).run(["cat", str(DROP_IN)], timeout=10)
    return done.stdout if done.returncode == 0 else None


def chronyd(mode: str, pid_file: Path, *extra: str) -> list[str]:
    """chronyd reading only /etc/chrony/conf.d, with nothing on the shared /run."""
    return [
        "chronyd",
        mode,
        "-u",
        "root",
        *extra,
        "confdir /etc/chrony/conf.d",
        "cmdport 0",
        "bindcmdaddress /",
        f"pidfile {pid_file}",
    ]


def measured_offset(lab: Lab, node: str, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while (offset := lab.coordctl_json("node", "show", node)["clock_offset_seconds"]) is None:
        assert time.monotonic() < deadline, f"{node}'s offset was never measured"
        time.sleep(0.5)
    return float(offset)


def test_dry_run_prints_the_drop_ins_and_changes_nothing(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(f"would run: write {DROP_IN}") == 3
    assert all(drop_in(lab, node) is None for node in lab.nodes)
    assert not DROP_IN.exists()  # the host's own /etc/chrony is never touched


def test_apply_writes_the_server_and_client_drop_ins(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec)
    assert done.returncode == 0, done.stdout + done.stderr
    served = drop_in(lab, "pi1") or ""
    assert f"allow {lab.network.subnet}\nlocal stratum 10\n" in served
    server_address = lab.network.pi("pi1").address
    for node in CLIENTS:
        assert f"server {server_address} iburst\n" in (drop_in(lab, node) or "")
    assert not DROP_IN.exists()


def test_a_second_apply_changes_nothing_and_says_so(lab: Lab, spec: Path) -> None:
    done = apply(lab, spec)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to change" in done.stdout
    assert " ran: " not in done.stdout


def test_the_clients_reach_the_server_and_the_offsets_stay_sane(lab: Lab, tmp_path: Path) -> None:
    server = subprocess.Popen(
        lab.sandbox("pi1").argv(chronyd("-x", tmp_path / "server.pid", "-d")),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
    )
    try:
        time.sleep(1.0)
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        for node in CLIENTS:
            measured = lab.sandbox(node).run(chronyd("-Q", tmp_path / f"{node}.pid", "-t", "20"), timeout=30)
            output = measured.stdout + measured.stderr
            match = OFFSET.search(output)
            assert match, f"{node}'s chronyd -Q did not reach pi1: {output}"
            assert abs(float(match.group(1))) < 0.5  # one clock, measured through pi1's chronyd
            assert abs(measured_offset(lab, node)) < 1.0  # what `coordctl node show` says
    finally:
        server.terminate()
        server.wait(timeout=10)
