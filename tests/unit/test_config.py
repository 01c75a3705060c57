"""Coordinator settings and HOST:PORT parsing."""

from pathlib import Path

import pytest

from picoord.common.addresses import InvalidAddress, join_host_port, split_host_port
from picoord.coordinator.config import ConfigError, CoordinatorConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:7443", ("0.0.0.0", 7443)),
        ("pi-desktop:7443", ("pi-desktop", 7443)),
        ("[::1]:7443", ("::1", 7443)),
        ("[fe80::1]:0", ("fe80::1", 0)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected
    assert split_host_port(join_host_port(*expected)) == expected


@pytest.mark.parametrize(
    "text", ["7443", ":7443", "host:", "host:70000", "host:-1", "host:port", "-oProxy:22"]
)
def test_split_host_port_rejects(text: str) -> None:
    with pytest.raises(InvalidAddress):
        split_host_port(text)


def test_enroll_port_defaults_to_the_next_port() -> None:
    config = CoordinatorConfig(listen="0.0.0.0:7443")
    assert config.enroll_address() == "0.0.0.0:7444"
    config.enroll_listen = "127.0.0.1:9000"
    assert config.enroll_address() == "127.0.0.1:9000"


def test_config_file_is_read_and_unknown_keys_refused(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('listen = "127.0.0.1:8443"\nheartbeat-timeout = 10.0\n')
    config = CoordinatorConfig.load(path, required=True)
    assert config.listen == "127.0.0.1:8443" and config.heartbeat_timeout == 10.0
    path.write_text('listne = "127.0.0.1:8443"\n')
    with pytest.raises(ConfigError, match="unknown setting 'listne'"):
        CoordinatorConfig.load(path, required=True)
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        CoordinatorConfig.load(path, required=True)


def test_missing_config_file() -> None:
    assert CoordinatorConfig.load(Path("/nonexistent.toml"), required=False) == CoordinatorConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        CoordinatorConfig.load(Path("/nonexistent.toml"), required=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen": "nowhere"}, "listen"),
        ({"metrics_interval": 0.5}, "metrics_interval"),
        ({"heartbeat_timeout": 90.0, "down_timeout": 60.0}, "heartbeat_timeout"),
        ({"heartbeat_interval": 61.0}, "heartbeat_interval"),
        ({"heartbeat_interval": -1.0}, "heartbeat_interval"),
        ({"metrics_history": 1}, "metrics_history"),
    ],
)
def test_invalid_settings(changes: dict, message: str) -> None:
    config = CoordinatorConfig(**changes)
    with pytest.raises(ConfigError, match=message):
        config.validate()


@pytest.mark.parametrize(
    ("settings", "interval", "working"),
    [
        ({}, 5.0, 15.0),  # samples every 5 s are the only messages; 3 missed: NotReady
        ({"metrics_interval": 1.0}, 1.0, 3.0),  # never below heartbeat_timeout
        ({"metrics_interval": 30.0}, 30.0, 60.0),  # never past down_timeout
        ({"heartbeat_interval": 2.0, "heartbeat_timeout": 10.0}, 2.0, 10.0),
        ({"heartbeat_interval": 4.0, "down_timeout": 6.0}, 4.0, 6.0),
    ],
)
def test_heartbeats_follow_the_samples(settings: dict, interval: float, working: float) -> None:
    """Liveness is the keepalive's (heartbeat_timeout); the agent's messages only say it is
    working, so by default they are its samples and nothing more."""
    config = CoordinatorConfig(**settings)
    config.validate()
    assert (config.heartbeat_interval, config.working_timeout) == (interval, working)


@pytest.mark.parametrize(
    ("timeout", "ping_ms", "answer_ms"), [(3.0, 1000, 2000), (9.0, 3000, 6000), (0.2, 100, 100)]
)
def test_session_keepalive_ends_a_silent_link_within_the_timeout(
    timeout: float, ping_ms: int, answer_ms: int
) -> None:
    from picoord.coordinator.main import agent_server_options, session_keepalive

    options = dict(session_keepalive(timeout))
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (ping_ms, answer_ms)
    assert options["grpc.http2.ping_timeout_ms"] == answer_ms  # what newer cores time the answer with
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.http2.min_time_between_pings_ms"] == ping_ms
    served = agent_server_options(CoordinatorConfig(heartbeat_timeout=timeout), 4096)
    keys = [key for key, _ in served]
    assert len(keys) == len(set(keys)), "an option given twice"
    assert dict(served)["grpc.keepalive_time_ms"] == ping_ms


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    from picoord.coordinator.main import parse_args

    path = tmp_path / "coordinator.toml"
    path.write_text('listen = "127.0.0.1:8443"\nheartbeat-timeout = 10.0\n')
    config, _ = parse_args(["--config", str(path), "--heartbeat-timeout", "4", "--heartbeat-interval", "1"])
    assert (config.listen, config.heartbeat_timeout, config.heartbeat_interval) == (
        "127.0.0.1:8443",
        4.0,
        1.0,
    )
    config, _ = parse_args(["--config", str(path), "--listen", "10.0.0.1:7443", "--metrics-interval", "1"])
    assert (config.listen, config.metrics_interval, config.heartbeat_interval) == ("10.0.0.1:7443", 1.0, 1.0)


@pytest.mark.parametrize(
    ("listen_host", "expected"),
    [("10.213.0.1", "10.213.0.1"), ("::1", "::1"), ("0.0.0.0", "192.168.1.10"), ("::", "192.168.1.10")],
)
def test_join_commands_name_a_specific_listen_address(listen_host: str, expected: str) -> None:
    from picoord.coordinator.advertise import choose_advertised

    assert choose_advertised("", listen_host, "192.168.1.10", "desktop").host == expected


@pytest.mark.parametrize(
    ("file_value", "flags", "node", "server"),
    [
        (None, [], 365 * 86400.0, 365 * 86400.0),
        ('"90d"', [], 90 * 86400.0, 365 * 86400.0),
        ("3600", [], 3600.0, 365 * 86400.0),
        ('"90d"', ["--node-cert-validity", "2m", "--server-cert-validity", "90s"], 120.0, 90.0),
    ],
)
def test_certificate_lifetimes(
    tmp_path: Path, file_value: str | None, flags: list[str], node: float, server: float
) -> None:
    from picoord.coordinator.main import parse_args

    path = tmp_path / "coordinator.toml"
    path.write_text(f"node-cert-validity = {file_value}\n" if file_value else "")
    config, _ = parse_args(["--config", str(path), *flags])
    assert (config.node_cert_validity, config.server_cert_validity) == (node, server)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10s", "between 30s and 3650d"),
        ("4000d", "between 30s and 3650d"),
        ("soon", "node_cert_validity must be a duration"),
        (True, "between 30s"),
    ],
)
def test_invalid_certificate_lifetimes(value: object, message: str) -> None:
    config = CoordinatorConfig(node_cert_validity=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_a_bad_lifetime_flag_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from picoord.coordinator.main import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--node-cert-validity", "1w"])
    assert "--node-cert-validity: invalid duration '1w'" in capsys.readouterr().err


@pytest.mark.parametrize(("metrics_interval", "render"), [(5.0, 5.0), (1.0, 1.0), (0.5, 1.0), (30.0, 30.0)])
def test_metrics_are_rendered_as_often_as_samples_come(metrics_interval: float, render: float) -> None:
    from picoord.coordinator.main import render_interval

    assert render_interval(metrics_interval) == render


def test_the_garbage_collector_runs_less_often_and_skips_start_up_objects() -> None:
    import gc

    from picoord.coordinator.main import GC_YOUNG_THRESHOLD, tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
