"""Compose/stack files: each key mapped as `docker stack deploy` reads it, or warned about,
or refused with the file and field named."""

import re

import pytest
import yaml

from picoord.coordinator.placement.constraints import ARCH, Constraint, Spread
from picoord.coordinator.rollout.policy import UpdatePolicy
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.importers.compose import DEPLOY_KEYS, SERVICE_KEYS, TOP_LEVEL_KEYS
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads

MI = 1024**2


def _stack(service: dict, extra: dict | None = None, name: str = "web") -> dict:
    document = {"version": "3.8", "services": {name: {"image": "web:1", **service}}}
    document.update(extra or {})
    return document


def _read(service: dict, extra: dict | None = None):
    workloads = read_workloads(yaml.safe_dump(_stack(service, extra)), "docker-stack.yml")
    return workloads.services[0], workloads.warning_lines()


def _error(service: dict, extra: dict | None = None) -> str:
    with pytest.raises(WorkloadError) as error:
        read_workloads(yaml.safe_dump(_stack(service, extra)), "docker-stack.yml")
    return str(error.value)


@pytest.mark.parametrize("mode", ["replicated-job", "global-job", "swarm", ""])
def test_unsupported_deploy_mode_names_file_and_field(mode: str) -> None:
    assert _error({"deploy": {"mode": mode}}).startswith(
        f"docker-stack.yml: services.web.deploy.mode: {mode!r} is not supported"
    )


def test_global_mode() -> None:
    spec, _ = _read({"deploy": {"mode": "global"}})
    assert (spec.mode, spec.replicas) == (s.GLOBAL, 0)
    assert "services.web.deploy.replicas" in _error({"deploy": {"mode": "global", "replicas": 2}})


@pytest.mark.parametrize(
    ("service", "replicas"),
    [({}, 1), ({"deploy": {"replicas": 0}}, 0), ({"deploy": {"replicas": 5}}, 5), ({"scale": 2}, 2)],
)
def test_replicas(service: dict, replicas: int) -> None:
    assert _read(service)[0].replicas == replicas


@pytest.mark.parametrize("value", [-1, "3", 1.5, True, 100000])
def test_bad_replicas(value: object) -> None:
    assert "services.web.deploy.replicas" in _error({"deploy": {"replicas": value}})


@pytest.mark.parametrize(
    "environment",
    [
        ["A=1", "B=x=y", "C="],
        {"A": "1", "B": "x=y", "C": ""},
        {"A": 1, "B": "x=y", "C": ""},
    ],
)
def test_environment_list_and_map(environment: object) -> None:
    spec, _ = _read({"environment": environment})
    assert spec.env == (s.EnvVar("A", "1"), s.EnvVar("B", "x=y"), s.EnvVar("C", ""))


@pytest.mark.parametrize(
    ("environment", "field", "message"),
    [
        (["A"], "environment[0]", "A has no value"),
        ({"A": None}, "environment.A", "A has no value"),
        ({"A": True}, "environment.A", "is a boolean; quote it"),
        (["1A=x"], "environment[0]", "is not an environment variable name"),
        ({"A": "${HOME}"}, "environment.A", "uses variable substitution"),
        ({"A": "$HOME"}, "environment.A", "uses variable substitution"),
    ],
)
def test_environment_errors(environment: object, field: str, message: str) -> None:
    error = _error({"environment": environment})
    assert f"services.web.{field}" in error and message in error


def test_double_dollar_is_a_literal_dollar() -> None:
    assert _read({"environment": {"PRICE": "$$5"}})[0].env == (s.EnvVar("PRICE", "$5"),)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        (["8080:8080"], (s.PortMapping(8080, 8080),)),
        (["80:8080"], (s.PortMapping(8080, 80),)),
        (["8080"], (s.PortMapping(8080),)),
        ([8080], (s.PortMapping(8080),)),
        (["53:53/udp"], (s.PortMapping(53, 53, "udp"),)),
        (["9000-9001:8000-8001"], (s.PortMapping(8000, 9000), s.PortMapping(8001, 9001))),
        ([{"target": 8080, "published": 80}], (s.PortMapping(8080, 80),)),
        (
            [{"target": 8080, "published": "80", "protocol": "udp", "mode": "host"}],
            (s.PortMapping(8080, 80, "udp"),),
        ),
        ([{"target": 8080}], (s.PortMapping(8080),)),
    ],
)
def test_ports(ports: list, expected: tuple) -> None:
    assert _read({"ports": ports})[0].ports == expected


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (["127.0.0.1:80:80"], "is not [PUBLISHED:]TARGET"),
        (["80:80/sctp"], "protocol 'sctp'"),
        (["9000-9002:8000-8001"], "ranges of different lengths"),
        (["70000:80"], "outside 1-65535"),
        ([{"target": 80, "host_ip": "127.0.0.1"}], "binding one host address"),
        ([{"target": 80, "mode": "vip"}], "not one of ingress, host"),
        (["80:80", "80:81"], "published twice"),
    ],
)
def test_port_errors(ports: list, message: str) -> None:
    error = _error({"ports": ports})
    assert "services.web.ports" in error and message in error


def test_published_ports_mean_what_swarms_routing_mesh_means_no_warning() -> None:
    spec, warnings = _read({"ports": ["8080:8080"]})
    assert [(p.target, p.published) for p in spec.ports] == [(8080, 8080)]
    assert not any("services.web.ports" in line for line in warnings)


def test_expose_adds_container_ports() -> None:
    assert _read({"expose": [9000, "9001/udp"]})[0].ports == (
        s.PortMapping(9000),
        s.PortMapping(9001, 0, "udp"),
    )


DECLARED = {"volumes": {"data": None}}


@pytest.mark.parametrize(
    ("volumes", "expected"),
    [
        (["data:/data"], s.VolumeMount(s.VOLUME, "/data", "data")),
        (["data:/data:ro"], s.VolumeMount(s.VOLUME, "/data", "data", True)),
        (["/mnt/gluster/web:/srv:rw"], s.VolumeMount(s.BIND, "/srv", "/mnt/gluster/web")),
        (
            [{"type": "bind", "source": "/mnt/x", "target": "/x", "read_only": True}],
            s.VolumeMount(s.BIND, "/x", "/mnt/x", True),
        ),
        ([{"type": "volume", "source": "data", "target": "/d"}], s.VolumeMount(s.VOLUME, "/d", "data")),
        ([{"type": "tmpfs", "target": "/tmp"}], s.VolumeMount(s.TMPFS, "/tmp")),
    ],
)
def test_volumes(volumes: list, expected: s.VolumeMount) -> None:
    assert _read({"volumes": volumes}, DECLARED)[0].volumes == (expected,)


@pytest.mark.parametrize(
    ("volumes", "message"),
    [
        (["other:/data"], "volume 'other' is not declared"),
        (["./data:/data"], "relative to the deploying machine"),
        (["~/data:/data"], "relative to the deploying machine"),
        (["/etc:/host-etc"], "refusing to bind-mount /etc"),
        (["/proc/1:/p"], "refusing to bind-mount from under /proc"),
        (["/data"], "anonymous volume"),
        (["data:/data:shared"], "volume option 'shared'"),
        (["data:relative"], "is not an absolute path"),
        ([{"type": "npipe", "source": "x", "target": "/x"}], "not one of volume, bind, tmpfs"),
    ],
)
def test_volume_errors(volumes: list, message: str) -> None:
    error = _error({"volumes": volumes}, DECLARED)
    assert "services.web.volumes[0]" in error and message in error


def test_named_volumes_warn_they_are_per_node() -> None:
    _, warnings = _read({"volumes": ["data:/data"], "deploy": {"replicas": 2}}, DECLARED)
    assert any("named volume 'data' is local to each node" in line for line in warnings)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"data": {"driver": "glusterfs"}}, "volumes.data.driver: volume driver 'glusterfs'"),
        ({"data": {"driver_opts": {"type": "nfs"}}}, "volumes.data.driver_opts"),
        ({"Bad Name": None}, "volumes.Bad Name"),
    ],
)
def test_top_level_volume_errors(declared: dict, message: str) -> None:
    assert message in _error({}, {"volumes": declared})


@pytest.mark.parametrize(
    ("test", "command"),
    [
        (["CMD", "/bin/check", "--quick"], ("/bin/check", "--quick")),
        (
            ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
            ("/bin/sh", "-c", "curl -f http://localhost/ || exit 1"),
        ),
        ("curl -f http://localhost/", ("/bin/sh", "-c", "curl -f http://localhost/")),
    ],
)
def test_healthcheck_commands(test: object, command: tuple) -> None:
    spec, _ = _read(
        {
            "healthcheck": {
                "test": test,
                "interval": "10s",
                "timeout": "2s",
                "retries": 5,
                "start_period": "1m",
            }
        }
    )
    assert spec.health == s.HealthCheck(
        s.EXEC, command=command, interval=10.0, timeout=2.0, retries=5, start_period=60.0
    )


@pytest.mark.parametrize(
    "healthcheck", [{"test": ["NONE"]}, {"disable": True}, {"disable": True, "test": ["CMD", "x"]}]
)
def test_healthcheck_off(healthcheck: dict) -> None:
    assert _read({"healthcheck": healthcheck})[0].health is None


def test_healthcheck_defaults_are_dockers() -> None:
    health = _read({"healthcheck": {"test": ["CMD", "x"]}})[0].health
    assert (health.interval, health.timeout, health.retries, health.start_period) == (30.0, 30.0, 3, 0.0)


@pytest.mark.parametrize(
    ("healthcheck", "message"),
    [
        ({"test": ["RUN", "x"]}, "must start with CMD, CMD-SHELL or NONE"),
        ({"test": ["CMD"]}, "names no command"),
        ({"test": ["CMD-SHELL", "a", "b"]}, "CMD-SHELL takes one command string"),
        ({"test": ["CMD", "x"], "interval": "often"}, "healthcheck.interval"),
        ({"test": ["CMD", "x"], "retries": 0}, "healthcheck.retries"),
    ],
)
def test_healthcheck_errors(healthcheck: dict, message: str) -> None:
    assert message in _error({"healthcheck": healthcheck})


def test_update_config_and_rollback_config() -> None:
    spec, _ = _read(
        {
            "deploy": {
                "update_config": {
                    "parallelism": 2,
                    "delay": "10s",
                    "failure_action": "pause",
                    "monitor": "30s",
                    "max_failure_ratio": 0.25,
                    "order": "start-first",
                },
                "rollback_config": {"parallelism": 0, "failure_action": "continue"},
            }
        }
    )
    assert spec.update == UpdatePolicy(
        parallelism=2,
        delay=10.0,
        failure_action="pause",
        monitor=30.0,
        max_failure_ratio=0.25,
        order="start-first",
    )
    assert spec.rollback == UpdatePolicy(parallelism=0, failure_action="continue")


def test_update_policy_defaults_are_swarms_with_rollback() -> None:
    spec, _ = _read({})
    assert spec.update == UpdatePolicy(
        parallelism=1, monitor=5.0, order="stop-first", failure_action="rollback"
    )
    assert spec.rollback is None


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"order": "random"}, "update_config.order"),
        ({"failure_action": "explode"}, "update_config.failure_action"),
        ({"max_failure_ratio": 2}, "update_config.max_failure_ratio"),
        ({"parallelism": -1}, "update_config.parallelism"),
        ({"delay": "soon"}, "update_config.delay"),
    ],
)
def test_update_config_errors(update: dict, field: str) -> None:
    assert f"services.web.deploy.{field}" in _error({"deploy": {"update_config": update}})


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ({}, s.RestartPolicy()),
        ({"deploy": {"restart_policy": {"condition": "any"}}}, s.RestartPolicy(s.RESTART_ALWAYS)),
        ({"deploy": {"restart_policy": {"condition": "none"}}}, s.RestartPolicy(s.RESTART_NONE)),
        (
            {
                "deploy": {
                    "restart_policy": {
                        "condition": "on-failure",
                        "delay": "10s",
                        "max_attempts": 3,
                        "window": "1m",
                    }
                }
            },
            s.RestartPolicy(s.RESTART_ON_FAILURE, 3, 10.0, 60.0),
        ),
        ({"restart": "unless-stopped"}, s.RestartPolicy(s.RESTART_ALWAYS)),
        ({"restart": "no"}, s.RestartPolicy(s.RESTART_NONE)),
        ({"restart": "on-failure:4"}, s.RestartPolicy(s.RESTART_ON_FAILURE, 4)),
    ],
)
def test_restart_policy(service: dict, expected: s.RestartPolicy) -> None:
    assert _read(service)[0].restart == expected


def test_restart_beside_restart_policy_warns() -> None:
    _, warnings = _read({"restart": "always", "deploy": {"restart_policy": {"condition": "none"}}})
    assert any("services.web.restart" in line for line in warnings)


@pytest.mark.parametrize("restart", ["sometimes", "on-failure:x"])
def test_restart_errors(restart: str) -> None:
    assert "services.web.restart" in _error({"restart": restart})


def test_resources_in_dockers_units() -> None:
    spec, _ = _read(
        {
            "deploy": {
                "resources": {
                    "limits": {"cpus": "0.5", "memory": "512M"},
                    "reservations": {
                        "cpus": "0.25",
                        "memory": "256M",
                        "devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}],
                    },
                }
            }
        }
    )
    assert spec.resources == s.Resources(
        memory_request=256 * MI,
        memory_limit=512 * MI,
        cpu_request=250,
        cpu_limit=500,
        devices=(s.DeviceRequest("nvidia", -1, (), ("gpu",)),),
    )


@pytest.mark.parametrize(
    ("resources", "field", "message"),
    [
        (
            {"limits": {"memory": "12XB"}},
            "limits.memory",
            '"12XB" is not a memory size (use e.g. 256Mi or 1G)',
        ),
        ({"limits": {"cpus": "lots"}}, "limits.cpus", "is not a CPU amount"),
        ({"limits": {"pids": 100}}, "limits.pids", "container limit"),
        ({"reservations": {"generic_resources": []}}, "reservations.generic_resources", "not supported"),
        ({"limits": {"memory": "256M"}, "reservations": {"memory": "512M"}}, "reservations.memory", "larger"),
    ],
)
def test_resource_errors(resources: dict, field: str, message: str) -> None:
    error = _error({"deploy": {"resources": resources}})
    assert f"services.web.deploy.resources.{field}" in error and message in error


def test_placement() -> None:
    spec, _ = _read(
        {
            "deploy": {
                "placement": {
                    "constraints": [
                        "node.platform.arch == aarch64",
                        "node.labels.disk != hdd",
                        "node.role == worker",
                    ],
                    "preferences": [{"spread": "node.labels.zone"}],
                    "max_replicas_per_node": 1,
                }
            }
        }
    )
    assert spec.placement == s.Placement(
        constraints=(
            Constraint(ARCH, "==", "aarch64"),
            Constraint("node.labels.disk", "!=", "hdd"),
            Constraint("node.role", "==", "worker"),
        ),
        spread=Spread(max_per_node=1, over_label="zone"),
    )


@pytest.mark.parametrize(
    ("placement", "field"),
    [
        ({"constraints": ["node.color == red"]}, "placement.constraints[0]"),
        ({"constraints": ["node.hostname = pi1"]}, "placement.constraints[0]"),
        ({"preferences": [{"spread": "node.zone"}]}, "placement.preferences[0].spread"),
        ({"max_replicas_per_node": -1}, "placement.max_replicas_per_node"),
    ],
)
def test_placement_errors(placement: dict, field: str) -> None:
    assert f"services.web.deploy.{field}" in _error({"deploy": {"placement": placement}})


def test_platform_is_an_arch_constraint() -> None:
    spec, _ = _read({"platform": "linux/arm64/v8"})
    assert spec.placement.constraints == (Constraint(ARCH, "==", "arm64"),)
    assert "services.web.platform" in _error({"platform": "windows/amd64"})


@pytest.mark.parametrize(
    ("service", "command", "args"),
    [
        ({}, None, None),
        ({"command": "serve --port 8080"}, None, ("serve", "--port", "8080")),
        ({"command": ["serve", "--name", "a b"]}, None, ("serve", "--name", "a b")),
        ({"command": "echo 'a b'"}, None, ("echo", "a b")),
        ({"entrypoint": "/bin/web", "command": []}, ("/bin/web",), ()),
    ],
)
def test_entrypoint_is_command_and_command_is_args(service: dict, command: object, args: object) -> None:
    spec, _ = _read(service)
    assert (spec.command, spec.args) == (command, args)


def test_unbalanced_quotes_in_a_command() -> None:
    assert "services.web.command: cannot split into words" in _error({"command": "echo 'a"})


@pytest.mark.parametrize(
    ("depends_on", "expected"),
    [
        (["db"], ("db",)),
        ({"db": {"condition": "service_started"}}, ("db",)),
        ({"db": {"condition": "service_healthy"}}, ("db",)),
        ({"db": None}, ("db",)),
    ],
)
def test_depends_on_list_and_map(depends_on: object, expected: tuple) -> None:
    document = _stack({"depends_on": depends_on})
    document["services"]["db"] = {"image": "postgres:15"}
    (web,) = [spec for spec in read_workloads(yaml.safe_dump(document)).services if spec.name == "web"]
    assert web.depends_on == expected and web.references == ("db",)


@pytest.mark.parametrize(
    ("depends_on", "message"),
    [
        (["nothing"], "services.web.depends_on: 'nothing' is not a service of this file"),
        ({"db": {"condition": "service_completed_successfully"}}, "not one-off jobs"),
        ({"db": {"condition": "whenever"}}, "depends_on.db.condition"),
    ],
)
def test_depends_on_errors(depends_on: object, message: str) -> None:
    document = _stack({"depends_on": depends_on})
    document["services"]["db"] = {"image": "postgres:15"}
    with pytest.raises(WorkloadError, match=re.escape(message)):
        read_workloads(yaml.safe_dump(document))


def test_labels_from_service_and_deploy() -> None:
    spec, _ = _read({"labels": ["a=1"], "deploy": {"labels": {"b": "2"}}})
    assert spec.labels == (("a", "1"), ("b", "2"))


def test_user_workdir_grace() -> None:
    spec, _ = _read({"user": "1000:1000", "working_dir": "/srv", "stop_grace_period": "1m"})
    assert (spec.user, spec.working_dir, spec.stop_grace_period) == ("1000:1000", "/srv", 60.0)


@pytest.mark.parametrize(("key", "verdict"), sorted((key, rule[0]) for key, rule in SERVICE_KEYS.items()))
def test_every_declared_service_key_is_warned_or_refused(key: str, verdict: str) -> None:
    service = {key: "x"}
    if verdict == "warn":
        _, warnings = _read(service)
        assert any(f"services.web.{key}:" in line for line in warnings)
    else:
        assert f"docker-stack.yml: services.web.{key}: " in _error(service)


@pytest.mark.parametrize(("key", "verdict"), sorted((key, rule[0]) for key, rule in DEPLOY_KEYS.items()))
def test_every_declared_deploy_key(key: str, verdict: str) -> None:
    _, warnings = _read({"deploy": {key: "vip"}})
    assert verdict == "warn" and any(f"services.web.deploy.{key}:" in line for line in warnings)


@pytest.mark.parametrize(("key", "verdict"), sorted((key, rule[0]) for key, rule in TOP_LEVEL_KEYS.items()))
def test_every_declared_top_level_key(key: str, verdict: str) -> None:
    if verdict == "warn":
        _, warnings = _read({}, {key: "x"})
        assert any(line.startswith(f"docker-stack.yml: {key}:") for line in warnings)
    else:
        assert f"docker-stack.yml: {key}: " in _error({}, {key: {}})


@pytest.mark.parametrize(
    "key", ["privileged", "cap_add", "devices", "network_mode", "secrets", "env_file", "configs", "read_only"]
)
def test_what_would_change_what_runs_is_an_error(key: str) -> None:
    assert SERVICE_KEYS[key][0] == "error"


def test_unknown_keys_are_errors_and_extensions_warnings() -> None:
    assert "services.web.imagee: unknown field" in _error({"imagee": "x"})
    _, warnings = _read({"x-note": "hi"}, {"x-defaults": {"a": 1}})
    assert any("services.web.x-note: extension field" in line for line in warnings)
    assert any("x-defaults: extension field" in line for line in warnings)


@pytest.mark.parametrize(
    ("networks", "message"),
    [
        ({"n": {"driver": "overlay", "internal": True}}, "networks.n.internal"),
        ({"n": {"driver": "overlay", "mtu": 1}}, "networks.n.mtu: unknown field"),
    ],
)
def test_network_errors(networks: dict, message: str) -> None:
    assert message in _error({}, {"networks": networks})


@pytest.mark.parametrize("name", ["Web", "my_service", "a.b"])
def test_service_names_must_be_dns_labels(name: str) -> None:
    with pytest.raises(WorkloadError, match=re.escape(f"services.{name}")):
        read_workloads(yaml.safe_dump(_stack({}, name=name)))


def test_no_services() -> None:
    with pytest.raises(WorkloadError, match="services: names no service"):
        read_workloads("version: '3.8'\nservices: {}\n")


def test_image_is_required_and_checked() -> None:
    with pytest.raises(WorkloadError, match=r"services.web.image: is required"):
        read_workloads("services:\n  web: {}\n")
    assert 'services.web.image: "web app:1" is not an image reference' in _error({"image": "web app:1"})


@pytest.mark.parametrize(
    "healthcheck", [{"disable": True, "intervall": "5s"}, {"test": ["NONE"], "intervall": "5s"}]
)
def test_a_disabled_healthcheck_still_refuses_unknown_keys(healthcheck: dict) -> None:
    assert "services.web.healthcheck.intervall: unknown field" in _error({"healthcheck": healthcheck})


@pytest.mark.parametrize(
    ("service", "field"),
    [
        ({"user": "root; id"}, "user"),
        ({"working_dir": "srv"}, "working_dir"),
        ({"tmpfs": ["run"]}, "tmpfs[0]"),
    ],
)
def test_user_working_dir_and_tmpfs_are_checked(service: dict, field: str) -> None:
    assert f"services.web.{field}: " in _error(service)
