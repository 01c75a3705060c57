"""Kubernetes Deployment/DaemonSet + Service manifests: mapped as Kubernetes means them,
or warned about, or refused with the document and field named."""

import copy
import re
from typing import Any

import pytest
import yaml

from picoord.coordinator.placement.constraints import ARCH, HOSTNAME, Constraint
from picoord.coordinator.rollout.policy import UpdatePolicy
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.importers.kubernetes import (
    CONTAINER_KEYS,
    METADATA_KEYS,
    POD_KEYS,
    SERVICE_SPEC_KEYS,
    WORKLOAD_SPEC_KEYS,
)
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from tests.unit.workloads.documents import EXAMPLES

MI = 1024**2
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]},
        },
    },
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web-svc"},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080, "targetPort": 8080}]},
}
POD = ("spec", "template", "spec")
CONTAINER = (*POD, "containers", 0)
CONTAINER_PATH = "Deployment/web.spec.template.spec.containers[0]"


def _with(where: tuple, values: dict, base: dict = DEPLOYMENT) -> dict:
    document = copy.deepcopy(base)
    target = document
    for step in where:
        target = target[step]
    target.update(values)
    return document


def _read(*documents: dict):
    workloads = read_workloads(yaml.safe_dump_all(documents), "k8s.yaml")
    return workloads.services[0], workloads.warning_lines()


def _error(*documents: dict) -> str:
    with pytest.raises(WorkloadError) as error:
        read_workloads(yaml.safe_dump_all(documents), "k8s.yaml")
    return str(error.value)


def test_a_plain_deployment() -> None:
    spec, warnings = _read(DEPLOYMENT)
    assert (spec.name, spec.image, spec.mode, spec.replicas) == ("web", "web:1", s.REPLICATED, 2)
    assert spec.ports == (s.PortMapping(8080),)
    assert spec.restart == s.RestartPolicy(s.RESTART_ALWAYS)
    assert spec.stop_grace_period == 30.0  # Kubernetes' terminationGracePeriodSeconds default
    assert warnings == []


def test_without_a_strategy_kubernetes_rolls_25_percent() -> None:
    spec, _ = _read(DEPLOYMENT)
    assert spec.update == UpdatePolicy(max_surge="25%", max_unavailable="25%", order="start-first")
    assert spec.update.bounds(4) == (1, 1)  # surge rounds up, unavailable down


@pytest.mark.parametrize(
    ("strategy", "min_ready", "expected"),
    [
        (
            {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            None,
            UpdatePolicy(max_surge=1, max_unavailable=0, order="start-first"),
        ),
        (
            {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "50%"}},
            10,
            UpdatePolicy(max_surge=0, max_unavailable="50%", monitor=10.0),
        ),
        ({"type": "Recreate"}, None, UpdatePolicy(parallelism=0, max_surge=0, max_unavailable="100%")),
    ],
)
def test_strategies(strategy: dict, min_ready: int | None, expected: UpdatePolicy) -> None:
    values: dict[str, Any] = {"strategy": strategy}
    if min_ready is not None:
        values["minReadySeconds"] = min_ready
    assert _read(_with(("spec",), values))[0].update == expected


@pytest.mark.parametrize(
    ("strategy", "field"),
    [
        ({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}, "strategy.rollingUpdate.maxUnavailable"),
        ({"rollingUpdate": {"maxSurge": "150%"}}, "strategy.rollingUpdate.maxSurge"),
        ({"rollingUpdate": {"maxUnavailable": -1}}, "strategy.rollingUpdate.maxUnavailable"),
        ({"type": "OnDelete"}, "strategy.type"),
        ({"type": "Recreate", "rollingUpdate": {}}, "strategy.rollingUpdate"),
        ({"type": "Blue"}, "strategy.type"),
    ],
)
def test_strategy_errors(strategy: dict, field: str) -> None:
    assert f"Deployment/web.spec.{field}" in _error(_with(("spec",), {"strategy": strategy}))


@pytest.mark.parametrize("replicas", [-1, 1001, "3"])
def test_bad_replicas_name_the_field(replicas: object) -> None:
    assert "k8s.yaml: Deployment/web.spec.replicas: " in _error(_with(("spec",), {"replicas": replicas}))


def test_a_daemonset_is_a_global_service() -> None:
    daemonset = _with((), {"kind": "DaemonSet"})
    del daemonset["spec"]["replicas"]
    spec, _ = _read(daemonset)
    assert (spec.mode, spec.replicas) == (s.GLOBAL, 0)
    assert spec.update.bounds(5) == (0, 1)
    assert "DaemonSet/web.spec.replicas" in _error(_with((), {"kind": "DaemonSet"}))


def test_env_and_secret_key_refs() -> None:
    spec, _ = _read(
        _with(
            CONTAINER,
            {
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "EMPTY"},
                    {"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db-secrets", "key": "url"}}},
                ]
            },
        )
    )
    assert spec.env == (s.EnvVar("A", "1"), s.EnvVar("EMPTY", ""))
    assert spec.secrets == (s.SecretEnv("DB", "db-secrets", "url"),)
    assert spec.secrets[0].field == f"{CONTAINER_PATH}.env[2].valueFrom.secretKeyRef"


@pytest.mark.parametrize(
    ("env", "field", "message"),
    [
        (
            [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}],
            "env[0].valueFrom.configMapKeyRef",
            "only secretKeyRef",
        ),
        (
            [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
            "env[0].valueFrom.fieldRef",
            "only secretKeyRef",
        ),
        (
            [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}}],
            "env[0].valueFrom.secretKeyRef.optional",
            "must exist",
        ),
        ([{"name": "A", "value": 1}], "env[0].value", "quote it"),
        (
            [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
            "env[0].value",
            "not both",
        ),
        ([{"name": "A", "value": "x"}, {"name": "A", "value": "y"}], "env", "A is set twice"),
    ],
)
def test_env_errors(env: list, field: str, message: str) -> None:
    error = _error(_with(CONTAINER, {"env": env}))
    assert f"{CONTAINER_PATH}.{field}" in error and message in error


def test_resources_in_kubernetes_units() -> None:
    spec, _ = _read(
        _with(
            CONTAINER,
            {
                "resources": {
                    "requests": {"memory": "256Mi", "cpu": "250m"},
                    "limits": {"memory": "512Mi", "cpu": "500m", "nvidia.com/gpu": 1},
                }
            },
        )
    )
    assert spec.resources == s.Resources(
        memory_request=256 * MI,
        memory_limit=512 * MI,
        cpu_request=250,
        cpu_limit=500,
        devices=(s.DeviceRequest(count=1),),
    )


def test_memory_12xb_names_the_field() -> None:
    error = _error(_with(CONTAINER, {"resources": {"requests": {"memory": "12XB"}}}))
    assert error == (
        f"k8s.yaml: {CONTAINER_PATH}.resources.requests.memory: "
        '"12XB" is not a memory size (use e.g. 256Mi or 1G)'
    )


def test_node_selector_is_constraints() -> None:
    spec, _ = _read(
        _with(
            POD,
            {"nodeSelector": {"kubernetes.io/arch": "arm64", "kubernetes.io/hostname": "pi1", "disk": "ssd"}},
        )
    )
    assert set(spec.placement.constraints) == {
        Constraint(ARCH, "==", "arm64"),
        Constraint(HOSTNAME, "==", "pi1"),
        Constraint("node.labels.disk", "==", "ssd"),
    }


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        (
            {
                "httpGet": {"path": "/healthz", "port": 8080},
                "periodSeconds": 5,
                "timeoutSeconds": 2,
                "failureThreshold": 4,
                "initialDelaySeconds": 7,
            },
            s.HealthCheck(
                s.HTTP, port=8080, path="/healthz", interval=5.0, timeout=2.0, retries=4, start_period=7.0
            ),
        ),
        ({"httpGet": {"port": "http"}}, s.HealthCheck(s.HTTP, port=8080, interval=10.0, timeout=1.0)),
        ({"tcpSocket": {"port": 8080}}, s.HealthCheck(s.TCP, port=8080, interval=10.0, timeout=1.0)),
        (
            {"exec": {"command": ["/bin/check"]}},
            s.HealthCheck(s.EXEC, command=("/bin/check",), interval=10.0, timeout=1.0),
        ),
    ],
)
@pytest.mark.parametrize("key", ["readinessProbe", "livenessProbe"])
def test_probes(probe: dict, expected: s.HealthCheck, key: str) -> None:
    ports = [{"containerPort": 8080, "name": "http"}]
    spec, _ = _read(_with(CONTAINER, {"ports": ports, key: probe}))
    assert spec.health == expected


def test_readiness_wins_and_a_different_liveness_is_warned() -> None:
    spec, warnings = _read(
        _with(
            CONTAINER,
            {"readinessProbe": {"tcpSocket": {"port": 8080}}, "livenessProbe": {"exec": {"command": ["x"]}}},
        )
    )
    assert spec.health is not None and spec.health.kind == s.TCP
    assert any(f"{CONTAINER_PATH}.livenessProbe: picoord runs one check" in line for line in warnings)


@pytest.mark.parametrize(
    ("probe", "field", "message"),
    [
        (
            {"httpGet": {"port": 9090}},
            "readinessProbe.httpGet.port",
            "probes port 9090, which the service does not expose",
        ),
        ({"tcpSocket": {"port": "metrics"}}, "readinessProbe.tcpSocket.port", "names no port"),
        ({"grpc": {"port": 8080}}, "readinessProbe.grpc", "gRPC probes are not supported"),
        ({"httpGet": {"port": 8080, "scheme": "HTTPS"}}, "readinessProbe.httpGet.scheme", "not one of HTTP"),
        ({"httpGet": {"port": 8080, "host": "x"}}, "readinessProbe.httpGet.host", "probes go to the replica"),
        ({"tcpSocket": {"port": 8080}, "exec": {"command": ["x"]}}, "readinessProbe", "exactly one of"),
        ({"tcpSocket": {"port": 8080}, "periodSeconds": 0}, "readinessProbe.periodSeconds", "outside"),
    ],
)
def test_probe_errors(probe: dict, field: str, message: str) -> None:
    error = _error(_with(CONTAINER, {"readinessProbe": probe}))
    assert f"{CONTAINER_PATH}.{field}" in error and message in error


def test_volumes() -> None:
    volumes = [
        {"name": "data", "hostPath": {"path": "/mnt/gluster/web"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "db", "persistentVolumeClaim": {"claimName": "pgdata"}},
    ]
    mounts = [
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "scratch", "mountPath": "/tmp"},
        {"name": "db", "mountPath": "/var/lib/db"},
    ]
    spec, warnings = _read(_with(CONTAINER, {"volumeMounts": mounts}, _with(POD, {"volumes": volumes})))
    assert spec.volumes == (
        s.VolumeMount(s.BIND, "/data", "/mnt/gluster/web", True),
        s.VolumeMount(s.TMPFS, "/tmp"),
        s.VolumeMount(s.VOLUME, "/var/lib/db", "pgdata"),
    )
    assert any("emptyDir is a tmpfs" in line for line in warnings)
    assert any("claim 'pgdata' is a named volume" in line for line in warnings)


@pytest.mark.parametrize(
    ("volume", "mount", "field", "message"),
    [
        (
            {"name": "v", "hostPath": {"path": "/etc"}},
            {"name": "v", "mountPath": "/x"},
            "volumes[0].hostPath.path",
            "refusing",
        ),
        (
            {"name": "v", "secret": {"secretName": "s"}},
            {"name": "v", "mountPath": "/x"},
            "volumes[0].secret",
            "not a volume source",
        ),
        (
            {"name": "v", "emptyDir": {}},
            {"name": "w", "mountPath": "/x"},
            "containers[0].volumeMounts[0].name",
            "not a volume of the pod",
        ),
        (
            {"name": "v", "emptyDir": {}},
            {"name": "v", "mountPath": "/x", "subPath": "a"},
            "containers[0].volumeMounts[0].subPath",
            "subpaths",
        ),
    ],
)
def test_volume_errors(volume: dict, mount: dict, field: str, message: str) -> None:
    document = _with(CONTAINER, {"volumeMounts": [mount]}, _with(POD, {"volumes": [volume]}))
    error = _error(document)
    assert f"Deployment/web.spec.template.spec.{field}" in error and message in error


@pytest.mark.parametrize(
    ("where", "values", "field", "message"),
    [
        (POD, {"containers": []}, "spec.template.spec.containers", "has 0 containers"),
        (
            POD,
            {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
            "spec.template.spec.containers",
            "has 2 containers; picoord runs exactly one container per replica",
        ),
        (
            POD,
            {"initContainers": [{"name": "i", "image": "i:1"}]},
            "spec.template.spec.initContainers",
            "init containers",
        ),
        (POD, {"hostNetwork": True}, "spec.template.spec.hostNetwork", "privileges"),
        (POD, {"restartPolicy": "Never"}, "spec.template.spec.restartPolicy", "restart Always"),
        (
            CONTAINER,
            {"securityContext": {"privileged": True}},
            "containers[0].securityContext.privileged",
            "privileges",
        ),
        (
            CONTAINER,
            {"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
            "containers[0].securityContext.capabilities",
            "privileges",
        ),
        (CONTAINER, {"envFrom": [{"secretRef": {"name": "s"}}]}, "containers[0].envFrom", "secretKeyRef"),
        (CONTAINER, {"image": "Web:1"}, "containers[0].image", "not an image reference"),
        (
            CONTAINER,
            {"ports": [{"containerPort": 80, "hostIP": "127.0.0.1"}]},
            "containers[0].ports[0].hostIP",
            "host address",
        ),
        (
            ("spec", "selector"),
            {"matchLabels": {"app": "other"}},
            "spec.selector.matchLabels",
            "must be non-empty and match",
        ),
        (("spec", "selector"), {"matchExpressions": []}, "spec.selector.matchExpressions", "use matchLabels"),
        ((), {"apiVersion": "extensions/v1beta1"}, "apiVersion", "picoord reads Deployment as apps/v1"),
        (("metadata",), {"name": "Web_1"}, "metadata.name", "is not a service name"),
    ],
)
def test_what_would_change_what_runs_is_an_error(
    where: tuple, values: dict, field: str, message: str
) -> None:
    error = _error(_with(where, values))
    assert message in error
    assert f".{field}" in error or f"/{field}" in error or field in error


def test_security_context_that_changes_nothing_is_fine() -> None:
    spec, _ = _read(
        _with(
            CONTAINER,
            {
                "securityContext": {
                    "privileged": False,
                    "runAsUser": 1000,
                    "runAsGroup": 100,
                    "allowPrivilegeEscalation": True,
                }
            },
        )
    )
    assert spec.user == "1000:100"


@pytest.mark.parametrize(
    ("service_spec", "published"),
    [
        ({"type": "LoadBalancer"}, 8080),
        ({"type": "NodePort", "ports": [{"port": 8080, "nodePort": 30080}]}, 30080),
        ({"type": "NodePort"}, 8080),
        ({"type": "ClusterIP"}, 0),
        ({}, 0),
    ],
)
def test_service_types(service_spec: dict, published: int) -> None:
    spec, _ = _read(DEPLOYMENT, _with(("spec",), service_spec, SERVICE))
    assert spec.ports == (s.PortMapping(8080, published),)
    assert spec.aliases == ("web-svc",)


def test_a_load_balancer_without_an_address_is_a_warning() -> None:
    spec, warnings = _read(DEPLOYMENT, _with(("spec",), {"type": "LoadBalancer"}, SERVICE))
    assert warnings == [
        "k8s.yaml: Service/web-svc.spec.type: no spec.loadBalancerIP: picoord has no address pool, so "
        "the port is answered on every node's own address; give an unused address of the nodes' "
        "subnet for a virtual IP that follows healthy replicas"
    ]
    assert spec.address == ""


def test_a_load_balancer_ip_is_the_services_virtual_address() -> None:
    service = _with(("spec",), {"type": "LoadBalancer", "loadBalancerIP": "10.213.0.200"}, SERVICE)
    spec, warnings = _read(DEPLOYMENT, service)
    assert spec.address == "10.213.0.200"
    assert spec.address_field == "Service/web-svc.spec.loadBalancerIP"
    assert spec.ports == (s.PortMapping(8080, 8080),)
    assert warnings == []


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"type": "LoadBalancer", "loadBalancerIP": "ten"},
            "spec.loadBalancerIP: 'ten' is not an IP address",
        ),
        ({"type": "NodePort", "loadBalancerIP": "10.0.0.5"}, "only a LoadBalancer Service has one"),
    ],
)
def test_bad_load_balancer_ips_are_refused(values: dict, error: str) -> None:
    assert error in _error(DEPLOYMENT, _with(("spec",), values, SERVICE))


def test_two_load_balancers_of_one_deployment_with_different_addresses_are_refused() -> None:
    first = _with(("spec",), {"type": "LoadBalancer", "loadBalancerIP": "10.0.0.5"}, SERVICE)
    second = _with(("metadata",), {"name": "web-svc2"}, first)
    second["spec"]["loadBalancerIP"] = "10.0.0.6"
    assert "web already has the virtual address 10.0.0.5" in _error(DEPLOYMENT, first, second)


def test_a_service_named_like_its_deployment_adds_no_alias_and_new_ports() -> None:
    service = _with(
        ("metadata",),
        {"name": "web"},
        _with(("spec",), {"ports": [{"port": 9000, "protocol": "UDP"}]}, SERVICE),
    )
    spec, _ = _read(DEPLOYMENT, service)
    assert spec.aliases == ()
    assert spec.ports == (s.PortMapping(8080), s.PortMapping(9000, 0, "udp"))


@pytest.mark.parametrize(
    ("service_spec", "field", "message"),
    [
        (
            {"selector": {"app": "nothing"}},
            "Service/web-svc.spec.selector",
            "selects no Deployment of this file",
        ),
        (
            {"ports": [{"port": 80, "targetPort": 8080}]},
            "Service/web-svc.spec.ports[0].port",
            "make them equal",
        ),
        ({"ports": [{"port": 80, "nodePort": 30080}]}, "Service/web-svc.spec.ports[0].nodePort", "ClusterIP"),
        ({"type": "ExternalName"}, "Service/web-svc.spec.type", "not supported"),
        ({"externalIPs": ["1.2.3.4"]}, "Service/web-svc.spec.externalIPs", "not supported"),
        (
            {"ports": [{"port": 8080, "targetPort": "nope"}]},
            "Service/web-svc.spec.ports[0].targetPort",
            "names no port",
        ),
    ],
)
def test_service_errors(service_spec: dict, field: str, message: str) -> None:
    error = _error(DEPLOYMENT, _with(("spec",), service_spec, SERVICE))
    assert field in error and message in error


def _declared(table: dict, where: tuple, base: dict, prefix: str):
    for key, (verdict, _) in sorted(table.items()):
        yield pytest.param(where, key, verdict, base, prefix, id=f"{prefix}.{key}")


@pytest.mark.parametrize(
    ("where", "key", "verdict", "base", "prefix"),
    [
        *_declared(METADATA_KEYS, ("metadata",), DEPLOYMENT, "Deployment/web.metadata"),
        *_declared(WORKLOAD_SPEC_KEYS, ("spec",), DEPLOYMENT, "Deployment/web.spec"),
        *_declared(POD_KEYS, POD, DEPLOYMENT, "Deployment/web.spec.template.spec"),
        *_declared(CONTAINER_KEYS, CONTAINER, DEPLOYMENT, CONTAINER_PATH),
    ],
)
def test_every_declared_key_is_warned_or_refused(
    where: tuple, key: str, verdict: str, base: dict, prefix: str
) -> None:
    document = _with(where, {key: True}, base)
    if verdict == "warn":
        _, warnings = _read(document)
        assert any(f"{prefix}.{key}:" in line for line in warnings)
    else:
        assert f"k8s.yaml: {prefix}.{key}: " in _error(document)


@pytest.mark.parametrize(
    ("key", "verdict"), sorted((key, rule[0]) for key, rule in SERVICE_SPEC_KEYS.items())
)
def test_every_declared_service_key(key: str, verdict: str) -> None:
    service = _with(("spec",), {key: "x"}, SERVICE)
    if verdict == "warn":
        _, warnings = _read(DEPLOYMENT, service)
        assert any(f"Service/web-svc.spec.{key}:" in line for line in warnings)
    else:
        assert f"k8s.yaml: Service/web-svc.spec.{key}: " in _error(DEPLOYMENT, service)


@pytest.mark.parametrize(
    ("key", "verdict"),
    [
        ("tolerations", "warn"),
        ("affinity", "warn"),
        ("hostNetwork", "error"),
        ("initContainers", "error"),
        ("securityContext", "error"),
    ],
)
def test_the_issues_examples(key: str, verdict: str) -> None:
    assert POD_KEYS[key][0] == verdict


def test_unknown_keys_are_errors() -> None:
    assert f"{CONTAINER_PATH}.imagee: unknown field" in _error(_with(CONTAINER, {"imagee": "x"}))
    with pytest.raises(WorkloadError, match=re.escape("Service/web-svc.spec.selectr: unknown field")):
        read_workloads(yaml.safe_dump_all([DEPLOYMENT, _with(("spec",), {"selectr": {}}, SERVICE)]))


def test_a_limit_without_a_request_is_the_request_as_in_kubernetes() -> None:
    spec, _ = _read(_with(CONTAINER, {"resources": {"limits": {"memory": "128Mi", "cpu": "1"}}}))
    assert spec.resources == s.Resources(
        memory_request=128 * MI, memory_limit=128 * MI, cpu_request=1000, cpu_limit=1000
    )


def test_the_seed_deployment_asks_the_scheduler_for_256mi_on_arm64() -> None:
    (mcp,) = read_workloads((EXAMPLES / "seed-mcp-deployment.yaml").read_text()).services
    request = s.placement_request(mcp)
    assert (request.service, request.replicas, request.memory_bytes, request.cpu_millis) == (
        "mcp-server",
        3,
        256 * MI,
        250,
    )
    assert request.constraints == (Constraint(ARCH, "==", "arm64"),)
