"""agent.toml: every setting is read, checked and applied; anything else is an error naming
the key (picoord.agent.cli.load_config and run_settings)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from picoord.agent.cli import build_parser, load_config, run_settings
from picoord.common import defaults
from picoord.common.configfile import ConfigFileError

GOOD = """
state_dir = "/srv/picoord-agent/"
metrics_interval = 5
log_level = "debug"
docker_socket = "/run/docker/docker.sock"
allow_mount_paths = ["/srv/x", "/var/lib/docker/volumes/data", "/srv/x"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_every_setting_is_read_and_normalised(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD), required=True) == {
        "state_dir": "/srv/picoord-agent",
        "metrics_interval": 5.0,
        "log_level": "debug",
        "docker_socket": "/run/docker/docker.sock",
        "allow_mount_paths": ("/srv/x", "/var/lib/docker/volumes/data"),
    }


def test_dashes_spell_the_same_setting(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'log-level = "warning"\n'), required=True) == {"log_level": "warning"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('stat_dir = "/var/lib/x"\n', "unknown setting 'stat_dir'"),
        ("[agent]\nstate_dir = 1\n", "unknown setting 'agent'"),
        ("state_dir = 5\n", "state_dir"),
        ('state_dir = "relative/dir"\n', "state_dir"),
        ('metrics_interval = "fast"\n', "metrics_interval"),
        ("metrics_interval = 0.5\n", "metrics_interval"),
        ("metrics_interval = 7200\n", "metrics_interval"),
        ("metrics_interval = nan\n", "metrics_interval"),
        ("metrics_interval = true\n", "metrics_interval"),
        ('log_level = "verbose"\n', "log_level"),
        ("docker_socket = 1\n", "docker_socket"),
        ('docker_socket = "docker.sock"\n', "docker_socket"),
        ('allow_mount_paths = "/srv/x"\n', "allow_mount_paths"),
        ('allow_mount_paths = ["srv/x"]\n', "allow_mount_paths"),
        ('allow_mount_paths = ["/"]\n', "allow_mount_paths"),
        ('allow_mount_paths = ["/srv", 3]\n', "allow_mount_paths"),
        ("state_dir = \n", "cannot read"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    """The message names the file, the line (when the setting has one) and the fix."""
    with pytest.raises(ConfigFileError, match=named) as caught:
        load_config(write(tmp_path, text), required=True)
    message = str(caught.value)
    assert str(tmp_path / "agent.toml") in message
    assert ("line 1" in message) == (not text.startswith("[")), message
    assert message.endswith("(else: systemctl restart picoord-agent)"), message


def test_a_bad_setting_far_down_is_named_by_its_line(tmp_path: Path) -> None:
    shipped = (Path(__file__).parents[2] / "packaging/deb/etc/agent.toml").read_text()
    broken = shipped.replace('#log_level = "info"', 'log_level = "chatty"')
    line = broken.splitlines().index('log_level = "chatty"') + 1
    with pytest.raises(ConfigFileError, match=rf"agent.toml line {line}: log_level = 'chatty' is invalid"):
        load_config(write(tmp_path, broken), required=True)


@pytest.mark.parametrize("text", ['log_level = "chatty"\n', "log_level = \n", "metrics-intervall = 5\n"])
def test_a_bad_file_exits_78_so_systemd_does_not_restart_it(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """EXIT_CONFIG (78), which both units list in RestartPreventExitStatus=; one line on stderr."""
    from picoord.agent import cli

    config = write(tmp_path, text)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(config), "run", "--wait-for-join"])
    assert exited.value.code == defaults.EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"picoord-agent: {config}"), err


def test_a_missing_file_is_an_error_only_when_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config(tmp_path / "agent.toml", required=True)
    assert load_config(tmp_path / "agent.toml", required=False) == {}


def test_the_settings_reach_the_running_agent(tmp_path: Path) -> None:
    files, run = run_settings(run_args(), load_config(write(tmp_path, GOOD), required=True))
    assert files.state_dir == Path("/srv/picoord-agent")
    assert run.metrics_interval == 5.0
    assert run.docker_socket == "/run/docker/docker.sock"
    assert run.allow_mount_paths == ("/srv/x", "/var/lib/docker/volumes/data")


def test_the_command_line_wins_over_the_file_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, GOOD), required=True)
    files, run = run_settings(run_args("--state-dir", "/tmp/x", "--metrics-interval", "30"), settings)
    assert (files.state_dir, run.metrics_interval) == (Path("/tmp/x"), 30.0)
    files, run = run_settings(run_args(), {})
    assert files.state_dir == defaults.AGENT_STATE_DIR and run.metrics_interval is None
    assert run.docker_socket == "/var/run/docker.sock" and run.allow_mount_paths == ()


def test_log_level_from_the_file_is_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """main() configures logging from the file before running the command: with
    log_level = "error" an info line is not printed, with "debug" it is."""
    import structlog

    from picoord.agent import cli

    for level, shown in (("error", False), ("debug", True)):
        config = write(tmp_path, f'log_level = "{level}"\nstate_dir = "{tmp_path}/state"\n')
        with pytest.raises(SystemExit):
            cli.main(["--config", str(config), "run"])  # not enrolled: exits 1 after logging is set
        structlog.get_logger("picoord.agent").info("probe line")
        assert ("probe line" in capsys.readouterr().err) is shown
    structlog.reset_defaults()


def test_the_agent_rearms_a_pending_firewall_revert_first_thing(tmp_path: Path) -> None:
    """`picoord-agent run` with a pending revert in its state dir (a previous run died in a
    confirm window) starts a watchdog for it, even before finding it is not enrolled."""
    import os
    import signal
    import time

    import structlog

    from picoord.agent import cli
    from picoord.agent.actions.firewall import watchdog

    state = tmp_path / "state"
    state.mkdir()
    pending = watchdog.PendingRevert("abcdef012345", "nftables", time.time() + 300, {"table": None}, "test")
    watchdog.pending_path(state).write_bytes(pending.to_json())
    config = write(tmp_path, f'state_dir = "{state}"\n')
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(config), "run"])
    assert exited.value.code == 1  # not enrolled, but the revert was armed before that
    path = str(watchdog.pending_path(state)).encode()
    pids = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and path in _cmdline(entry)
    ]
    try:
        assert len(pids) == 1, pids
        assert watchdog.claim(state, pending.id)  # confirmed: the watchdog finds nothing to do
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        structlog.reset_defaults()


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""
