"""The service spec's own rules: image references, cross-field checks, secrets, depends_on,
references between services, and the revision key."""

import dataclasses

import pytest

from picoord.common.validation import FieldError, image_reference
from picoord.coordinator.placement.constraints import parse_constraint
from picoord.coordinator.placement.scheduler import ALL_GPUS, Request
from picoord.coordinator.workloads import spec as s


@pytest.mark.parametrize(
    ("written", "normalised"),
    [
        ("mcp-modules-rust:latest", "mcp-modules-rust:latest"),
        ("postgres:15-alpine", "postgres:15-alpine"),
        ("mcp", "mcp:latest"),  # Docker reads no tag as latest
        ("registry.lab:5000/mcp:2", "registry.lab:5000/mcp:2"),
        ("localhost:5000/team/mcp", "localhost:5000/team/mcp:latest"),
        ("prom/node-exporter:latest", "prom/node-exporter:latest"),
        ("ghcr.io/o/r/x:v1.2.3", "ghcr.io/o/r/x:v1.2.3"),
        ("mcp@sha256:" + "a" * 64, "mcp@sha256:" + "a" * 64),
        ("mcp:1@sha256:" + "0" * 64, "mcp:1@sha256:" + "0" * 64),
        ("[fd00::1]:5000/mcp:1", "[fd00::1]:5000/mcp:1"),
    ],
)
def test_image_references(written: str, normalised: str) -> None:
    assert image_reference("image", written) == normalised


@pytest.mark.parametrize(
    "written",
    [
        "mcp server:1",
        "mcp:1 ",
        "mcp;rm -rf /",
        "$(id)",
        "mcp:`id`",
        "MCP:1",  # repository paths are lowercase
        "-mcp",
        "mcp:",
        "mcp@sha256:short",
        "reg:port/mcp",
        "mcp:" + "a" * 200,
        "",
        None,
        5,
    ],
)
def test_bad_image_references(written: object) -> None:
    with pytest.raises(FieldError) as error:
        image_reference("Service/mcp.image", written)
    assert error.value.field == "Service/mcp.image"


def test_image_with_a_space_names_it() -> None:
    with pytest.raises(
        FieldError, match=r'"mcp server:1" is not an image reference \(it contains whitespace\)'
    ):
        image_reference("Service/mcp.image", "mcp server:1")


@pytest.mark.parametrize("name", ["mcp", "mcp-server", "postgres", "a", "x1"])
def test_service_names(name: str) -> None:
    assert s.service_name("name", name) == name


@pytest.mark.parametrize("name", ["MCP", "mcp_server", "-mcp", "mcp-", "a" * 64, "", "mcp.server", 5])
def test_bad_service_names(name: object) -> None:
    with pytest.raises(FieldError):
        s.service_name("name", name)


BASE = s.ServiceSpec(
    name="mcp",
    image="mcp:1",
    replicas=3,
    ports=(s.PortMapping(8080, 8080),),
    env=(s.EnvVar("A", "1"),),
    secrets=(s.SecretEnv("DATABASE_URL", "mcp-secrets", "database-url", field="Service/mcp.secrets[0]"),),
    resources=s.Resources(memory_request=256, memory_limit=512, cpu_request=250, cpu_limit=500),
    health=s.HealthCheck(s.TCP, port=8080, field="Service/mcp.health.tcp"),
    origin="Service/mcp",
)


def test_a_good_spec_passes() -> None:
    assert s.check_service(BASE, {}) is BASE


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"replicas": -1}, "Service/mcp.replicas", "-1 is not a replica count"),
        ({"replicas": 1001}, "Service/mcp.replicas", "not a replica count"),
        ({"mode": "replicated-job"}, "Service/mcp.mode", "not one of"),
        (
            {"health": s.HealthCheck(s.HTTP, port=9090, field="Service/mcp.health.http")},
            "Service/mcp.health.http.port",
            "probes port 9090, which the service does not expose",
        ),
        (
            {"ports": (s.PortMapping(8080, 8080, "udp"),)},
            "Service/mcp.health.tcp.port",
            "does not expose",
        ),
        (
            {"resources": s.Resources(memory_request=600, memory_limit=512)},
            "Service/mcp.resources.memory",
            "larger",
        ),
        ({"resources": s.Resources(cpu_request=600, cpu_limit=500)}, "Service/mcp.resources.cpu", "larger"),
        ({"env": (s.EnvVar("DATABASE_URL", "x"),)}, "Service/mcp.env", "DATABASE_URL is set twice"),
        ({"env": (s.EnvVar("A", "x"), s.EnvVar("A", "y"))}, "Service/mcp.env", "A is set twice"),
        (
            {"ports": (s.PortMapping(8080, 80), s.PortMapping(8081, 80))},
            "Service/mcp.ports",
            "published twice",
        ),
        ({"ports": (s.PortMapping(8080, 80), s.PortMapping(8080, 81))}, "Service/mcp.ports", "listed twice"),
    ],
)
def test_cross_field_errors(change: dict, field: str, message: str) -> None:
    with pytest.raises(FieldError, match=message) as error:
        s.check_service(dataclasses.replace(BASE, **change), {})
    assert error.value.field == field


def test_cross_field_errors_name_the_users_field() -> None:
    paths = {"replicas": "Deployment/mcp.spec.replicas"}
    with pytest.raises(FieldError) as error:
        s.check_service(dataclasses.replace(BASE, replicas=-1), paths)
    assert error.value.field == "Deployment/mcp.spec.replicas"


def test_exec_health_checks_need_no_port() -> None:
    spec = dataclasses.replace(BASE, ports=(), health=s.HealthCheck(s.EXEC, command=("true",)))
    assert s.check_service(spec, {}) == spec


def test_check_secrets_passes_when_all_exist() -> None:
    s.check_secrets(BASE, {("mcp-secrets", "database-url"), ("other", "x")})


@pytest.mark.parametrize("known", [set(), {("mcp-secrets", "other-key")}, {("other", "database-url")}])
def test_check_secrets_names_the_missing_one(known: set) -> None:
    with pytest.raises(FieldError) as error:
        s.check_secrets(BASE, known)
    assert error.value.field == "Service/mcp.secrets[0]"
    assert "secret mcp-secrets/database-url (for DATABASE_URL) does not exist" in str(error.value)
    assert "coordctl secret create mcp-secrets database-url" in str(error.value)


def _named(name: str, depends: tuple[str, ...] = ()) -> s.ServiceSpec:
    return s.ServiceSpec(name=name, image="x:1", depends_on=depends, origin=f"Service/{name}")


def test_depends_on_orders_first_placement() -> None:
    specs = [_named("web", ("api",)), _named("api", ("db", "cache")), _named("db"), _named("cache")]
    s.check_references(specs, {})
    assert s.placement_order(specs) == ["db", "cache", "api", "web"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([_named("a", ("b",))], "'b' is not a service of this file"),
        ([_named("a", ("b",)), _named("b", ("a",))], "cycle a -> b -> a"),
        ([_named("a", ("a",))], "cycle a -> a"),
    ],
)
def test_depends_on_errors(specs: list, message: str) -> None:
    with pytest.raises(FieldError, match=message):
        s.check_references(specs, {})


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"DATABASE_URL": "postgresql://mcp:password@postgres:5432/mcp_db"}, (), ("postgres",)),
        ({"POSTGRES_USER": "mcp"}, (), ()),  # a user name, not a host
        ({"DATABASE_URL": "postgresql://mcp:pw@db.example:5432/mcp"}, (), ()),
        ({"CACHE": "redis:6379"}, (), ("redis",)),
        ({"CACHE_HOST": "redis"}, (), ("redis",)),
        ({"CACHE_NAME": "redis"}, (), ()),
        ({"PEERS": "redis:6379,postgres:5432"}, (), ("postgres", "redis")),
        ({"X": "redis:abc"}, (), ()),
        ({}, ("--db", "postgres:5432"), ("postgres",)),
        ({"SELF": "mcp:8080"}, (), ()),  # itself
        ({"BROKEN": "http://[bad"}, (), ()),
    ],
)
def test_references_to_other_services(env: dict, args: tuple, expected: tuple) -> None:
    spec = dataclasses.replace(
        BASE, env=tuple(s.EnvVar(k, v) for k, v in env.items()), args=args, secrets=(), depends_on=()
    )
    assert s.referenced_services(spec, ["mcp", "postgres", "redis"]) == expected


def test_depends_on_counts_as_a_reference() -> None:
    spec = dataclasses.replace(BASE, env=(), depends_on=("postgres",))
    assert s.referenced_services(spec, ["postgres"]) == ("postgres",)


def test_revision_key_is_stable_and_short() -> None:
    assert s.revision_key(BASE) == s.revision_key(dataclasses.replace(BASE))
    assert len(s.revision_key(BASE)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"image": "mcp:2"},
        {"command": ("/bin/mcp",)},
        {"args": ("--verbose",)},
        {"env": (s.EnvVar("A", "2"),)},
        {"secrets": ()},
        {"ports": (s.PortMapping(8080, 8081),)},
        {"volumes": (s.VolumeMount(s.VOLUME, "/data", "data"),)},
        {"resources": s.Resources(memory_request=1)},
        {"restart": s.RestartPolicy(condition=s.RESTART_NONE)},
        {"placement": s.Placement(constraints=(parse_constraint("c", "node.arch == arm64"),))},
        {"health": None},
        {"labels": (("a", "b"),)},
        {"user": "1000"},
        {"working_dir": "/srv"},
        {"stop_grace_period": 30.0},
        {"name": "other"},
    ],
)
def test_what_runs_changes_the_revision(change: dict) -> None:
    assert s.revision_key(dataclasses.replace(BASE, **change)) != s.revision_key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": 5},
        {"depends_on": ("postgres",)},
        {"references": ("postgres",)},
        {"aliases": ("mcp-service",)},
        {"origin": "services.mcp"},
        {"secrets": (s.SecretEnv("DATABASE_URL", "mcp-secrets", "database-url", field="elsewhere"),)},
    ],
)
def test_scaling_and_bookkeeping_keep_the_revision(change: dict) -> None:
    assert s.revision_key(dataclasses.replace(BASE, **change)) == s.revision_key(BASE)


def test_every_field_is_either_in_the_revision_or_excluded_on_purpose() -> None:
    """A field added later must be placed deliberately: a new field is in the revision unless
    listed in NOT_IN_REVISION, and that list names only real fields."""
    names = {f.name for f in dataclasses.fields(s.ServiceSpec)}
    assert set(s.NOT_IN_REVISION) <= names


def test_spec_digest_sees_everything_that_compares() -> None:
    assert s.spec_digest(dataclasses.replace(BASE, replicas=5)) != s.spec_digest(BASE)
    assert s.spec_digest(dataclasses.replace(BASE, origin="x")) == s.spec_digest(BASE)


@pytest.mark.parametrize("path", ["/mnt/gluster/mcp", "/srv/data", "/var/lib/app"])
def test_host_paths(path: str) -> None:
    assert s.host_path("volumes[0].source", path) == path


@pytest.mark.parametrize("path", ["/", "/etc", "/proc/1", "/sys", "relative/path", "/a b", "/x;y"])
def test_host_paths_refused(path: str) -> None:
    with pytest.raises(FieldError):
        s.host_path("volumes[0].source", path)


def test_gpu_count() -> None:
    resources = s.Resources(devices=(s.DeviceRequest(count=2), s.DeviceRequest(capabilities=("compute",))))
    assert resources.gpu_count == 2


def test_arch_spellings_are_one_revision() -> None:
    def on(arch: str) -> s.ServiceSpec:
        return dataclasses.replace(
            BASE, placement=s.Placement(constraints=(parse_constraint("c", f"node.platform.arch == {arch}"),))
        )

    assert s.revision_key(on("aarch64")) == s.revision_key(on("arm64"))
    assert s.revision_key(on("aarch64")) != s.revision_key(on("amd64"))


@pytest.mark.parametrize("path", ["/", "/health", "/healthz?full=1", "/a/b-c_d.e~f%20"])
def test_http_paths(path: str) -> None:
    assert s.http_path("health.http.path", path) == path


@pytest.mark.parametrize("path", ["health", "/a b", "/a\nb", "", "http://x/", "/" + "a" * 1024])
def test_bad_http_paths(path: str) -> None:
    with pytest.raises(FieldError, match="is not an HTTP path"):
        s.http_path("health.http.path", path)


@pytest.mark.parametrize("user", ["", "1000", "1000:1000", "postgres", "www-data:www-data"])
def test_users(user: str) -> None:
    assert s.user_spec("user", user) == user


@pytest.mark.parametrize("user", ["root; id", "-u", "a b", "1000:", ":1000", "$(id)"])
def test_bad_users(user: str) -> None:
    with pytest.raises(FieldError, match=r"is not USER\[:GROUP\]"):
        s.user_spec("user", user)


@pytest.mark.parametrize(("written", "kept"), [("", ""), ("/srv", "/srv"), ("/srv/../app", "/app")])
def test_working_dir(written: str, kept: str) -> None:
    assert s.working_dir("working_dir", written) == kept


@pytest.mark.parametrize("written", ["srv", "/a b", "/x;y"])
def test_bad_working_dir(written: str) -> None:
    with pytest.raises(FieldError):
        s.working_dir("working_dir", written)


def test_every_gpu_is_minus_one_as_the_scheduler_means_it() -> None:
    assert s.Resources(devices=(s.DeviceRequest(count=-1),)).gpu_count == ALL_GPUS


def test_placement_request_carries_what_the_scheduler_needs() -> None:
    spec = dataclasses.replace(
        BASE,
        placement=s.Placement(constraints=(parse_constraint("c", "node.arch == arm64"),), spread=s.Spread(1)),
        resources=s.Resources(memory_request=256, cpu_request=250, devices=(s.DeviceRequest(count=1),)),
    )
    assert s.placement_request(spec) == Request(
        service="mcp",
        replicas=3,
        memory_bytes=256,
        cpu_millis=250,
        gpus=1,
        constraints=spec.placement.constraints,
        spread=s.Spread(1),
    )
    assert s.placement_request(spec, replicas=1).replicas == 1
    assert s.placement_request(dataclasses.replace(spec, mode=s.GLOBAL, replicas=0)).global_mode


@pytest.mark.parametrize(
    ("name", "value", "warned"),
    [
        ("POSTGRES_PASSWORD", "password", True),
        ("API_KEY", "abc", True),
        ("GITHUB_TOKEN", "abc", True),
        ("client_secret", "abc", True),
        ("DATABASE_URL", "postgresql://mcp:password@postgres:5432/mcp_db", True),
        ("DATABASE_URL", "postgresql://mcp@postgres:5432/mcp_db", False),  # no password
        ("POSTGRES_PASSWORD", "", False),  # empty: nothing to leak
        ("POSTGRES_USER", "mcp", False),
        ("MCP_HTTP_HOST", "0.0.0.0", False),
        ("BROKEN", "http://[x", False),
    ],
)
def test_plaintext_secrets(name: str, value: str, warned: bool) -> None:
    spec = dataclasses.replace(BASE, env=(s.EnvVar(name, value, field=f"services.web.environment.{name}"),))
    found = s.plaintext_secrets(spec)
    assert bool(found) == warned
    if warned:
        ((where, why),) = found
        assert where == f"services.web.environment.{name}"
        assert name in why and (not value or value not in why)  # the value is never repeated
