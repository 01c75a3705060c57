"""Stacks end to end: the seed's docker-stack.yml applied as stack `mcp` on three Pis with
dockerd, rolled out in dependency order, listed, scaled; and the bad inputs (an unknown
stack or service, a dependency cycle, a name another stack holds), through `coordctl` only.

The lab's Pis are this machine's architecture, so the file's one constraint on the Pis'
arch (aarch64) is given this machine's; its postgres constraint (node.hostname ==
ubuntu-desktop) is met as written by naming the third Pi ubuntu-desktop, as the seed's
layout does. The Pis are in no Swarm, so the file also chooses published-ports mode
(`x-picoord`); overlay networks are tests/lab/test_overlay_lab.py's. One lab serves the
module; the tests run in file order (the stack is applied, then rolled out, then listed
and scaled).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab
from tests.conftest import _module_lab
from tests.lab.test_workloads_lab import (
    containers,
    ctl,
    docker,
    ok,
    services,
    set_link,
    settle,
    spec_file,
    wait_until,
    words,
)

pytestmark = pytest.mark.lab

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_STACK = (REPO_ROOT / "examples" / "seed-docker-stack.yml").read_text()
NODES = ["pi1", "pi2", "ubuntu-desktop"]
ROLLOUT_TIMEOUT = 240.0


def lab_stack() -> str:
    """The seed's file with the arch of this machine's Pis in place of aarch64, in
    published-ports mode (the Pis are in no Swarm); nothing else."""
    assert "node.platform.arch == aarch64" in SEED_STACK
    arch = SEED_STACK.replace("node.platform.arch == aarch64", f"node.platform.arch == {platform.machine()}")
    return arch + "\nx-picoord:\n  network_mode: published-ports\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(
        tmp_path_factory,
        len(NODES),
        "stacks",
        sandboxes=True,
        services=["dockerd"],
        registry=True,
        node_names=NODES,
    )


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spec_file(tmp_path_factory.mktemp("files"), "docker-stack", lab_stack())


def test_the_seed_file_applies_as_stack_mcp_under_its_short_names(lab: Lab, stack_file: Path) -> None:
    said = ok(lab, "apply", "-f", str(stack_file), "--stack", "mcp", "--dry-run")
    assert "stack/mcp service/postgres would be recorded (new, " in said, said
    assert services(lab) == {}  # the dry run recorded nothing
    said = ok(lab, "stack", "deploy", "-c", str(stack_file), "mcp")
    assert "stack/mcp service/mcp-server recorded (new, 3 x mcp-modules-rust:latest)" in said, said
    assert "roll it out with `coordctl rollout mcp`" in said, said
    listed = services(lab)
    assert sorted(listed) == ["mcp-server", "postgres"]
    assert {view["stack"] for view in listed.values()} == {"mcp"}
    said = ok(lab, "apply", "-f", str(stack_file), "--stack", "mcp")
    assert "stack/mcp service/postgres unchanged" in said and "stack/mcp service/mcp-server unchanged" in said


def test_rollout_mcp_rolls_postgres_first_then_mcp_server(lab: Lab) -> None:
    said = ok(lab, "rollout", "mcp", timeout=ROLLOUT_TIMEOUT)
    assert "stack/mcp: rolling postgres, mcp-server in this order" in said, said
    postgres_done = said.index("service/postgres revision 1: 1/1 healthy")
    assert postgres_done < said.index("rolling out revision 1 of mcp-server"), said
    assert "stack/mcp: 2 services healthy" in said, said
    settle(lab, "postgres settled", "postgres", 1)
    placed = settle(lab, "mcp-server settled", "mcp-server", 3)
    assert sorted(r["node"] for r in placed) == sorted(NODES)
    [postgres] = settle(lab, "postgres settled", "postgres", 1)
    assert postgres["node"] == "ubuntu-desktop"  # the file's own constraint


def test_ps_of_the_stack_and_of_everything(lab: Lab) -> None:
    stack = lab.coordctl_json("ps", "mcp")
    assert sorted(r["service"] for r in stack if r["desired"] == "running") == [
        "mcp-server",
        "mcp-server",
        "mcp-server",
        "postgres",
    ]
    every = lab.coordctl_json("ps")
    assert {r["replica"] for r in stack} <= {r["replica"] for r in every}
    table = ok(lab, "ps")
    assert "NODE" in table and "ubuntu-desktop" in table


def _revisions(lab: Lab, service: str) -> list[int]:
    return [view["revision"] for view in lab.coordctl_json("rollout", "history", service)]


def test_scale_changes_the_count_without_a_new_revision(lab: Lab) -> None:
    said = ok(lab, "scale", "mcp-server=2")
    assert "service/mcp-server scaled to 2" in said, said
    settle(lab, "mcp-server at 2", "mcp-server", 2, revision=1)
    assert _revisions(lab, "mcp-server") == [1]
    ok(lab, "scale", "mcp-server=3")
    settle(lab, "mcp-server at 3", "mcp-server", 3, revision=1)
    assert _revisions(lab, "mcp-server") == [1]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("rollout", "nosuch"), "no service 'nosuch' and no stack of that name"),
        (("ps", "nosuch"), "no service 'nosuch'"),
        (("scale", "nosuch=2"), "no service 'nosuch'"),
        (("scale", "mcp-server"), "use `scale SERVICE=COUNT`"),
    ],
)
def test_an_unknown_stack_or_service_is_refused(lab: Lab, argv: tuple[str, ...], says: str) -> None:
    before = services(lab)
    done = ctl(lab, *argv, timeout=30)
    assert done.returncode != 0, words(done)
    assert says in words(done), words(done)
    assert services(lab) == before


CYCLE = """services:
  web:
    image: mcp:1
    depends_on: [api]
  api:
    image: mcp:1
    environment:
      UPSTREAM: http://web:8080
"""


def test_a_dependency_cycle_is_refused_at_apply_naming_it(lab: Lab, tmp_path: Path) -> None:
    before = services(lab)
    done = ctl(lab, "apply", "-f", str(spec_file(tmp_path, "cycle", CYCLE)), "--stack", "loop", timeout=30)
    assert done.returncode != 0, words(done)
    assert "dependency cycle: web -> api -> web" in words(done), words(done)
    assert services(lab) == before


def test_a_name_another_stack_holds_is_refused(lab: Lab, stack_file: Path) -> None:
    before = services(lab)
    done = ctl(lab, "stack", "deploy", "-c", str(stack_file), "other", timeout=30)
    assert done.returncode != 0, words(done)
    assert "already belongs to stack 'mcp'" in words(done), words(done)
    assert services(lab) == before


@pytest.mark.parametrize(
    ("argv", "says"),
    [(("rm", "stack", "nosuch"), "no stack 'nosuch'"), (("rm", "service", "nosuch"), "no service 'nosuch'")],
)
def test_removing_an_unknown_stack_or_service_is_refused(lab: Lab, argv: tuple[str, ...], says: str) -> None:
    before = services(lab)
    done = ctl(lab, *argv, timeout=30)
    assert done.returncode != 0 and says in words(done), words(done)
    assert services(lab) == before


# --------------------------------------------------------------------------- last: rm stack mcp


def _left(lab: Lab) -> dict[str, list[dict[str, str]]]:
    """Every container (any state) of the stack's services, per node that has one."""
    found: dict[str, list[dict[str, str]]] = {}
    for service in ("mcp-server", "postgres"):
        for node, items in containers(lab, service, every=True).items():
            if items:
                found.setdefault(node, []).extend(items)
    return found


def test_rm_stack_mcp_leaves_no_container_on_any_pi_and_keeps_history(lab: Lab, stack_file: Path) -> None:
    said = ok(lab, "rm", "stack", "mcp", "--dry-run")
    assert "service/mcp-server would be removed" in said and "service/postgres would be removed" in said, said
    assert "volume postgres_data kept" in said, said
    assert sorted(services(lab)) == ["mcp-server", "postgres"]  # the dry run removed nothing
    assert _left(lab)

    said = ok(lab, "rm", "stack", "mcp")
    assert "service/mcp-server removed" in said and "revision history kept" in said, said
    assert services(lab) == {}
    wait_until("no container of the stack on any Pi", lambda: not _left(lab), 60, explain=lambda: _left(lab))

    # applied again, it starts from its kept history: no revision is lost, none repeated
    ok(lab, "stack", "deploy", "-c", str(stack_file), "mcp")
    assert _revisions(lab, "mcp-server") == [1]


# --------------------------------------------------------------------------- after it: removal
# while a Pi is away (the stack was applied again by the test above, not rolled out)


def _status(lab: Lab, node: str) -> str:
    return next(view["status"] for view in lab.coordctl_json("nodes") if view["name"] == node)


@contextlib.contextmanager
def _away(lab: Lab, node: str) -> Iterator[None]:
    """The Pi away (agent killed, link down) until the block ends; then back, and every Pi Ready."""
    try:
        lab.kill_agent(node)
        set_link(lab, node, up=False)
        wait_until(f"{node} away", lambda: _status(lab, node) != "Ready", 60)
        yield
    finally:
        set_link(lab, node, up=True)
        if not lab.is_running(node):
            lab.start_agent(node)
    lab.wait_ready()


def _stack_with_postgres(lab: Lab, stack_file: Path) -> str:
    """Stack mcp applied and postgres rolled out; the node that holds postgres_data."""
    ok(lab, "stack", "deploy", "-c", str(stack_file), "mcp")
    ok(lab, "rollout", "postgres", timeout=ROLLOUT_TIMEOUT)
    [postgres] = settle(lab, "postgres settled", "postgres", 1)
    assert "postgres_data" in _volumes(lab, postgres["node"])
    return str(postgres["node"])


def test_rm_while_a_pi_is_away_goes_on_the_others_at_once_and_on_it_when_it_returns(lab: Lab) -> None:
    ok(lab, "rollout", "mcp-server", timeout=ROLLOUT_TIMEOUT)
    placed = settle(lab, "mcp-server settled", "mcp-server", 3)
    victim = "pi1"
    others = [node for node in NODES if node != victim]
    assert victim in {r["node"] for r in placed}, placed
    with _away(lab, victim):
        said = ok(lab, "rm", "stack", "mcp", "--dry-run")
        assert f"would stop when {victim} returns ({victim} is away)" in said, said
        said = ok(lab, "rm", "stack", "mcp")
        assert "service/mcp-server removed" in said, said
        assert f"stops when {victim} returns ({victim} is away); its container goes then" in said, said
        for node in others:
            assert f"@{node} stops within its grace" in said, said
        wait_until(
            "no container of the stack on the reachable Pis",
            lambda: not any(_left(lab).get(node) for node in others),
            60,
            explain=lambda: _left(lab),
        )
        assert _left(lab).get(victim), "the away Pi's container went before it returned"
    wait_until(
        f"{victim}'s container gone after it returned", lambda: not _left(lab), 90, explain=lambda: _left(lab)
    )


def _volumes(lab: Lab, node: str) -> list[str]:
    return docker(lab, node, "volume", "ls", "-q").split()


def test_rm_volumes_removes_the_named_volume_where_its_replica_ran_and_without_it_keeps_it(
    lab: Lab, stack_file: Path
) -> None:
    node = _stack_with_postgres(lab, stack_file)
    # a volume of the same name on a Pi where no replica of it ran is not the removal's
    elsewhere = next(n for n in NODES if n != node)
    docker(lab, elsewhere, "volume", "create", "postgres_data")

    said = ok(lab, "rm", "service", "postgres")  # without --volumes: kept
    assert "volume postgres_data kept" in said, said
    wait_until(
        "postgres's container gone", lambda: not any(containers(lab, "postgres", every=True).values()), 60
    )
    assert "postgres_data" in _volumes(lab, node)

    assert _stack_with_postgres(lab, stack_file) == node  # its file's constraint
    said = ok(lab, "rm", "stack", "mcp", "--volumes", "--dry-run")
    assert f"volume postgres_data@{node} would be removed once no container uses it" in said, said
    assert "postgres_data" in _volumes(lab, node)  # the dry run removed nothing
    said = ok(lab, "rm", "stack", "mcp", "--volumes")
    assert f"volume postgres_data@{node} removed once no container uses it" in said, said
    wait_until(
        f"postgres_data gone on {node}",
        lambda: "postgres_data" not in _volumes(lab, node),
        90,
        explain=lambda: (_volumes(lab, node), _left(lab)),
    )
    assert not _left(lab)
    assert "postgres_data" in _volumes(lab, elsewhere)
    docker(lab, elsewhere, "volume", "rm", "postgres_data")


def test_rm_volumes_while_the_pi_is_away_removes_the_volume_when_it_returns(
    lab: Lab, stack_file: Path
) -> None:
    node = _stack_with_postgres(lab, stack_file)
    with _away(lab, node):
        said = ok(lab, "rm", "stack", "mcp", "--volumes")
        assert f"stops when {node} returns ({node} is away)" in said, said
        assert f"volume postgres_data@{node} removed once no container uses it" in said, said
        assert "postgres_data" in _volumes(lab, node)  # nothing reaches a node that is away
    wait_until(
        f"postgres_data gone on {node} after it returned",
        lambda: "postgres_data" not in _volumes(lab, node),
        90,
        explain=lambda: (_volumes(lab, node), _left(lab)),
    )
    assert not _left(lab)
