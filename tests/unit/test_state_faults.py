"""The daemons' own checks of their state and config, each fault reproduced on disk: an
unsafe state directory, a cluster CA half gone or damaged, a node's enrollment partly
deleted, a coordinator.toml with a bad value. Each is refused with a message naming the
file and the fix, and nothing on disk is changed (in particular no new CA is minted)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from picoord.agent.cli import wait_for_join
from picoord.agent.state import AgentFiles, Enrollment, NotEnrolled
from picoord.common import defaults
from picoord.common.files import UnsafeStateDir, check_state_dir
from picoord.coordinator.ca import CAUnavailable, ClusterCA
from picoord.coordinator.config import ConfigError, CoordinatorConfig

NOBODY = 65534


def tree(tmp_path: Path) -> Path:
    state = tmp_path / "lib" / "picoord"
    (state / "agent").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    return state


def test_a_private_state_dir_is_accepted(tmp_path: Path) -> None:
    state = tree(tmp_path)
    check_state_dir(state / "agent")
    check_state_dir(state / "not-yet-made")  # made 0700 by the daemon
    (state / "agent").chmod(0o755)  # readable is fine: the keys in it are 0600
    check_state_dir(state / "agent")


@pytest.mark.parametrize(
    ("change", "named", "fix"),
    [
        (lambda s: (s / "agent").chmod(0o777), "agent is writable by group or others", "chmod 700 {s}/agent"),
        (lambda s: (s / "agent").chmod(0o770), "(mode 0770)", "chmod 700 {s}/agent"),
        (lambda s: os.chown(s / "agent", NOBODY, NOBODY), "belongs to uid 65534", "chown 0 {s}/agent"),
        (lambda s: s.chmod(0o777), "above the state directory", "chmod go-w {s}"),
        (lambda s: os.chown(s, NOBODY, NOBODY), "above the state directory", "chown root {s}"),
    ],
)
def test_an_unsafe_state_dir_is_refused_naming_the_fix(tmp_path: Path, change, named: str, fix: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (chown to another user)")
    state = tree(tmp_path)
    change(state)
    before = {path: path.lstat() for path in (state, state / "agent")}
    with pytest.raises(UnsafeStateDir) as refused:
        check_state_dir(state / "agent")
    assert named in str(refused.value) and fix.format(s=state) in str(refused.value), refused.value
    assert {path: path.lstat() for path in before} == before, "the check changes nothing"


def test_a_sticky_world_writable_parent_is_fine(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "state").mkdir(mode=0o700)
    check_state_dir(shared / "state")


def test_a_state_dir_that_is_a_symlink_or_file_is_refused(tmp_path: Path) -> None:
    state = tree(tmp_path)
    (state / "link").symlink_to(state / "agent")
    (state / "file").write_text("")
    for name in ("link", "file"):
        with pytest.raises(UnsafeStateDir, match="is not a directory"):
            check_state_dir(state / name)


# ---------------------------------------------------------------- the cluster CA


def file_states(state: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(state.iterdir())}


@pytest.mark.parametrize("lost", ["ca.key", "ca.crt"])
def test_a_half_gone_ca_is_refused_and_never_replaced(tmp_path: Path, lost: str) -> None:
    ClusterCA.load_or_create(tmp_path)
    kept = "ca.crt" if lost == "ca.key" else "ca.key"
    (tmp_path / lost).unlink()
    before = file_states(tmp_path)
    with pytest.raises(CAUnavailable) as refused:
        ClusterCA.load_or_create(tmp_path)
    message = str(refused.value)
    assert f"{tmp_path / lost} is missing while {tmp_path / kept} is there" in message
    assert (
        f"Restore {tmp_path / lost} from your backup" in message
        and "move ca.key, ca.crt and state.db" in message
    )
    assert file_states(tmp_path) == before


def test_a_damaged_or_foreign_ca_key_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp_path = tmp_path_factory.mktemp("ca")
    ClusterCA.load_or_create(tmp_path)
    good = (tmp_path / "ca.key").read_bytes()
    (tmp_path / "ca.key").write_bytes(good[: len(good) // 2])
    with pytest.raises(CAUnavailable, match=r"ca.key is damaged .*restore it from your backup"):
        ClusterCA.load_or_create(tmp_path)
    other = tmp_path_factory.mktemp("other")
    ClusterCA.load_or_create(other)
    (tmp_path / "ca.key").write_bytes((other / "ca.key").read_bytes())
    before = file_states(tmp_path)
    with pytest.raises(CAUnavailable, match="is not the key of"):
        ClusterCA.load_or_create(tmp_path)
    assert file_states(tmp_path) == before


def test_the_coordinator_refuses_a_new_ca_beside_an_existing_clusters_database(tmp_path: Path) -> None:
    from picoord.coordinator.main import load_cluster_ca

    (tmp_path / "state.db").write_bytes(b"")  # the cluster's database, its CA deleted
    with pytest.raises(CAUnavailable, match=r"ca.key and ca.crt\) is missing while the cluster's database"):
        load_cluster_ca(CoordinatorConfig(), tmp_path, "localhost")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state.db"]
    (tmp_path / "state.db").unlink()
    load_cluster_ca(CoordinatorConfig(), tmp_path, "localhost")  # a first start makes one
    assert (tmp_path / "ca.key").is_file()


def test_the_coordinator_exits_78_on_an_unsafe_state_dir(tmp_path: Path) -> None:
    from picoord.coordinator import main

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o777)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'state_dir = "{state}"\nadmin_socket = "{tmp_path}/admin.sock"\nlisten = "127.0.0.1:0"\n'
    )
    with pytest.raises(SystemExit) as exited:
        main.main(["--config", str(config)])
    assert exited.value.code == defaults.EXIT_CONFIG
    assert list(state.iterdir()) == [], "nothing is written into it"


# ---------------------------------------------------------------- coordinator.toml


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('heartbeat_timeout = "soon"', "heartbeat_timeout = 'soon' must be a number"),
        ("heartbeat_timeout = true", "heartbeat_timeout = 'True' must be a number"),
        ("metrics_history = 2.5", "metrics_history = '2.5' must be a whole number"),
        ("listen = 7443", "listen = '7443' must be a string in quotes"),
        ('log_json = "yes"', "log_json = 'yes' must be true or false"),
        ('lissen = "0.0.0.0:7443"', "unknown setting 'lissen'"),
    ],
)
def test_a_coordinator_setting_of_the_wrong_type_names_file_and_line(
    tmp_path: Path, line: str, named: str
) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(ConfigError) as refused:
        CoordinatorConfig.load(path, required=True)
    assert f"{path} line 3: {named}" in str(refused.value)
    assert str(refused.value).endswith("(else: systemctl restart picoord-coordinator)")


def test_a_bad_value_found_by_validate_names_its_line_or_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from picoord.coordinator import main

    path = tmp_path / "coordinator.toml"
    path.write_text('listen = "127.0.0.1:7443"\ndown_timeout = 10.0\nheartbeat_timeout = 20.0\n')
    for argv, expected in (
        ([], f"{path} line 3: heartbeat_timeout must be positive"),
        (["--heartbeat-timeout", "30"], f"{path} line 2: heartbeat_timeout must be positive"),
        (["--down-timeout", "60", "--heartbeat-timeout", "90"], "(from a flag: see `systemctl cat"),
    ):
        with pytest.raises(SystemExit) as exited:
            main.main(["--config", str(path), *argv])
        assert exited.value.code == defaults.EXIT_CONFIG
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- the agent's enrollment


def enroll(files: AgentFiles) -> None:
    files.state_dir.mkdir(mode=0o700, exist_ok=True)
    for path in (files.credentials_path, files.ca):
        path.write_bytes(b"placeholder")
    files.enrollment_path.write_text(
        json.dumps({"node_name": "pi1", "coordinator": "h:7443", "enrolled_at": 1.0})
    )


def test_not_joined_and_half_gone_enrollments_say_which_command_fixes_them(tmp_path: Path) -> None:
    files = AgentFiles(tmp_path / "agent")
    with pytest.raises(NotEnrolled, match=r"^not joined .*run `picoord-agent join HOST:7443 --token"):
        files.load()
    enroll(files)
    assert files.load() == Enrollment("pi1", "h:7443", 1.0)
    files.credentials_path.unlink()
    with pytest.raises(NotEnrolled, match=r"incomplete \(node.pem missing\).*coordctl node remove.*--force"):
        files.load()
    enroll(files)
    files.enrollment_path.write_text("{")
    with pytest.raises(NotEnrolled, match=r"enrollment\.json is damaged"):
        files.load()


async def test_run_waits_for_the_join_and_then_goes_on(tmp_path: Path) -> None:
    """`run --wait-for-join` (the unit) neither exits nor needs a restart: it returns the
    enrollment once `join` has written it, and tells systemd it is ready meanwhile."""
    files = AgentFiles(tmp_path / "agent")
    waiting = asyncio.create_task(wait_for_join(files, poll=0.05))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    enroll(files)
    assert await asyncio.wait_for(waiting, 5) == Enrollment("pi1", "h:7443", 1.0)
