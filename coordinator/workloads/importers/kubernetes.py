"""Kubernetes `Deployment` (and `DaemonSet`) plus `Service` manifests into ServiceSpecs.

A Deployment is a replicated service, a DaemonSet a global one; each must run exactly one
container per pod (picoord runs one container per replica). A Kubernetes Service adds
nothing that runs: it maps onto the Deployment it selects, giving it another name to be
reached by (an alias) and publishing its ports as its type says (see docs/workloads.md).

Kubernetes' meanings apply: `512M` is 512*10^6 bytes, `512Mi` 512 MiB; a Deployment without
a strategy rolls 25% surge / 25% unavailable. Every key is mapped, warned about or refused,
as in the Compose importer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from picoord.common.validation import (
    FieldError,
    absolute_path,
    env_name,
    image_reference,
    ip_address,
    port,
    volume_name,
)
from picoord.coordinator.placement.constraints import from_node_selector
from picoord.coordinator.rollout.policy import START_FIRST, UpdatePolicy, validate_update_policy
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.fields import Fields, SpecWarning, argv, mapping
from picoord.coordinator.workloads.quantities import KUBERNETES, cpu_millicores, memory_bytes

WORKLOAD_KINDS = {"Deployment": "apps/v1", "DaemonSet": "apps/v1"}
SERVICE_KIND = "Service"
KINDS = (*WORKLOAD_KINDS, SERVICE_KIND)
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")

WARN = "warn"
ERROR = "error"
_PRIVILEGE = "changes the container's privileges or isolation, which picoord does not do"

# metadata.namespace is not in this table: the reader takes it as the stack (stacks.py).
METADATA_KEYS = {
    "annotations": (WARN, "annotations are not used"),
    "generateName": (ERROR, "give metadata.name"),
    "uid": (WARN, "set by Kubernetes"),
    "resourceVersion": (WARN, "set by Kubernetes"),
    "generation": (WARN, "set by Kubernetes"),
    "creationTimestamp": (WARN, "set by Kubernetes"),
    "managedFields": (WARN, "set by Kubernetes"),
    "ownerReferences": (WARN, "not used"),
    "finalizers": (WARN, "not used"),
}
WORKLOAD_SPEC_KEYS = {
    "revisionHistoryLimit": (WARN, "picoord keeps its own revision history"),
    "progressDeadlineSeconds": (WARN, "a rollout is judged by its monitor window (minReadySeconds)"),
    "paused": (ERROR, "use `coordctl rollout pause`"),
}
POD_KEYS = {
    "affinity": (WARN, "affinity is not applied; use nodeSelector for hard constraints"),
    "tolerations": (WARN, "picoord nodes have no taints; tolerations are not needed"),
    "topologySpreadConstraints": (WARN, "replicas always spread over nodes; not applied as written"),
    "priorityClassName": (WARN, "no priorities or preemption"),
    "priority": (WARN, "no priorities or preemption"),
    "schedulerName": (WARN, "picoord's scheduler places every replica"),
    "serviceAccountName": (WARN, "no service accounts"),
    "serviceAccount": (WARN, "no service accounts"),
    "automountServiceAccountToken": (WARN, "no service account token is mounted"),
    "imagePullSecrets": (WARN, "nodes pull without registry credentials"),
    "dnsPolicy": (WARN, "containers use the node's resolver configuration"),
    "dnsConfig": (WARN, "containers use the node's resolver configuration"),
    "hostname": (WARN, "the container's host name is its container id"),
    "subdomain": (WARN, "the container's host name is its container id"),
    "enableServiceLinks": (WARN, "no service environment variables are injected"),
    "nodeName": (ERROR, "use nodeSelector kubernetes.io/hostname"),
    "initContainers": (ERROR, "init containers are not supported: picoord runs one container per replica"),
    "ephemeralContainers": (ERROR, "ephemeral containers are not supported"),
    "hostNetwork": (ERROR, _PRIVILEGE),
    "hostPID": (ERROR, _PRIVILEGE),
    "hostIPC": (ERROR, _PRIVILEGE),
    "hostUsers": (ERROR, _PRIVILEGE),
    "shareProcessNamespace": (ERROR, _PRIVILEGE),
    "securityContext": (ERROR, _PRIVILEGE),
    "runtimeClassName": (ERROR, "containers run with dockerd's default runtime"),
    "overhead": (ERROR, "pod overhead is not supported"),
    "readinessGates": (ERROR, "readiness gates are not supported"),
    "os": (ERROR, "use nodeSelector kubernetes.io/os"),
    "activeDeadlineSeconds": (ERROR, "picoord runs services, not jobs"),
    "hostAliases": (ERROR, "extra /etc/hosts entries are not supported; services reach each other by name"),
    "preemptionPolicy": (WARN, "no priorities or preemption"),
    "setHostnameAsFQDN": (WARN, "the container's host name is its container id"),
    "resourceClaims": (ERROR, "dynamic resource claims are not supported"),
}
CONTAINER_KEYS = {
    "imagePullPolicy": (WARN, "a node pulls the image when it lacks that reference"),
    "terminationMessagePath": (WARN, "not used"),
    "terminationMessagePolicy": (WARN, "not used"),
    "stdin": (WARN, "containers run without stdin"),
    "stdinOnce": (WARN, "containers run without stdin"),
    "tty": (WARN, "containers run without a terminal"),
    "envFrom": (ERROR, "envFrom is not supported: list each variable with valueFrom.secretKeyRef"),
    "lifecycle": (ERROR, "lifecycle hooks are not supported"),
    "volumeDevices": (ERROR, "raw block devices are not supported"),
    "resizePolicy": (WARN, "resources change through a rollout"),
    "restartPolicy": (ERROR, "container restart policies are for init containers"),
}
SERVICE_SPEC_KEYS = {
    "clusterIP": (WARN, "no virtual IP: the name leads to the nodes that run the replicas"),
    "clusterIPs": (WARN, "no virtual IP: the name leads to the nodes that run the replicas"),
    "sessionAffinity": (WARN, "no session affinity"),
    "sessionAffinityConfig": (WARN, "no session affinity"),
    "externalTrafficPolicy": (WARN, "traffic goes to the replica on the node it reaches"),
    "internalTrafficPolicy": (WARN, "traffic goes to the replica on the node it reaches"),
    "ipFamilies": (WARN, "not used"),
    "ipFamilyPolicy": (WARN, "not used"),
    "loadBalancerSourceRanges": (ERROR, "source ranges are not enforced; use a FirewallPolicy"),
    "loadBalancerClass": (WARN, "no load balancer"),
    "allocateLoadBalancerNodePorts": (WARN, "no load balancer"),
    "healthCheckNodePort": (WARN, "no load balancer"),
    "publishNotReadyAddresses": (WARN, "only healthy replicas are reached by name"),
    "externalIPs": (ERROR, "external IPs are not supported"),
    "externalName": (ERROR, "ExternalName services are not supported"),
}
_LOAD_BALANCER = (
    "no spec.loadBalancerIP: picoord has no address pool, so the port is answered on every node's "
    "own address; give an unused address of the nodes' subnet for a virtual IP that follows "
    "healthy replicas"
)
_K8S_ROLLING_DEFAULT = "25%"
_VOLUME_SOURCES = ("hostPath", "emptyDir", "persistentVolumeClaim")


def is_kubernetes(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and document.get("kind") in KINDS
        and isinstance(document.get("apiVersion"), str)
        and not str(document.get("apiVersion")).startswith("picoord/")
    )


def read_kubernetes(raws: list[dict[str, Any]], warnings: list[SpecWarning]) -> list[s.ServiceSpec]:
    """Every Deployment/DaemonSet with the Services that select it, in file order."""
    workloads: list[tuple[s.ServiceSpec, dict[str, str], Fields, dict[str, int]]] = []
    services: list[tuple[Fields, dict[str, Any]]] = []
    for raw in raws:
        kind = raw.get("kind")
        if kind == SERVICE_KIND:
            services.append(_service_document(raw, warnings))
        else:
            workloads.append(_workload(raw, warnings))
    specs = [workload[0] for workload in workloads]
    for doc, service in services:
        selector = service["selector"]
        chosen = [
            index
            for index, (_, labels, _, _) in enumerate(workloads)
            if selector and all(labels.get(key) == value for key, value in selector.items())
        ]
        if not chosen:
            raise FieldError(doc.at("spec.selector"), f"{selector} selects no Deployment of this file")
        for index in chosen:
            specs[index] = _expose(specs[index], service, workloads[index][3])
    names = [spec.name for spec in specs]
    specs = [replace(spec, references=s.referenced_services(spec, names)) for spec in specs]
    for index, spec in enumerate(specs):
        specs[index] = s.check_service(spec, _paths(workloads[index][2]))
    return specs


def _paths(doc: Fields) -> dict[str, str]:
    container = f"{doc.path}.spec.template.spec.containers[0]"
    return {
        "replicas": f"{doc.path}.spec.replicas",
        "resources.memory": f"{container}.resources.requests.memory",
        "resources.cpu": f"{container}.resources.requests.cpu",
        "env": f"{container}.env",
        "ports": f"{container}.ports",
    }


def _header(raw: dict[str, Any], warnings: list[SpecWarning]) -> tuple[Fields, str, Fields]:
    kind = str(raw.get("kind"))
    doc = mapping(kind, raw, warnings)
    doc.get("kind")
    wanted = WORKLOAD_KINDS.get(kind, "v1")
    version = doc.text("apiVersion")
    meta = doc.mapping("metadata")
    if meta is None:
        raise FieldError(doc.at("metadata"), "is required")
    name = s.service_name(meta.at("name"), meta.get("name", required=True))
    doc.path = f"{kind}/{name}"
    meta.path = doc.at("metadata")
    if version != wanted:
        raise FieldError(doc.at("apiVersion"), f"{version!r}: picoord reads {kind} as {wanted}")
    meta.apply_table(METADATA_KEYS)
    meta.get("namespace")  # the stack: reader.py takes it from every document
    doc.warn("status", "set by Kubernetes")
    return doc, name, meta


def _string_map(table: Fields | None) -> dict[str, str]:
    if table is None:
        return {}
    result = {}
    for key, value in table.data.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise FieldError(table.at(key), f"{value!r} is not a string")
        result[key] = str(value)
    return result


def _workload(
    raw: dict[str, Any], warnings: list[SpecWarning]
) -> tuple[s.ServiceSpec, dict[str, str], Fields, dict[str, int]]:
    doc, name, meta = _header(raw, warnings)
    labels = _string_map(meta.mapping("labels"))
    meta.finish()
    spec_fields = doc.mapping("spec")
    if spec_fields is None:
        raise FieldError(doc.at("spec"), "is required")
    spec_fields.apply_table(WORKLOAD_SPEC_KEYS)
    global_mode = doc.path.startswith("DaemonSet/")
    if global_mode:
        spec_fields.refuse("replicas", "a DaemonSet runs one replica per matching node")
        replicas = 0
    else:
        replicas = spec_fields.integer("replicas", 1, minimum=-(1 << 31))
        if not 0 <= replicas <= s.MAX_REPLICAS:
            raise FieldError(
                spec_fields.at("replicas"), f"{replicas} is not a replica count (0-{s.MAX_REPLICAS})"
            )
    selector = spec_fields.mapping("selector")
    if selector is None:
        raise FieldError(spec_fields.at("selector"), "is required")
    match_labels = _string_map(selector.mapping("matchLabels"))
    selector.refuse("matchExpressions", "use matchLabels")
    selector.finish()
    template = spec_fields.mapping("template")
    if template is None:
        raise FieldError(spec_fields.at("template"), "is required")
    template_meta = template.mapping("metadata")
    pod_labels = _string_map(template_meta.mapping("labels")) if template_meta else {}
    if template_meta is not None:
        template_meta.warn("annotations", "annotations are not used")
        template_meta.warn("name", "replicas are named by picoord")
        template_meta.finish()
    if not match_labels or any(pod_labels.get(k) != v for k, v in match_labels.items()):
        raise FieldError(
            selector.at("matchLabels"), "must be non-empty and match spec.template.metadata.labels"
        )
    pod = template.mapping("spec")
    if pod is None:
        raise FieldError(template.at("spec"), "is required")
    template.finish()
    update = _strategy(spec_fields, global_mode)
    spec, port_names = _pod(pod, name, doc.path, replicas, global_mode, update, labels)
    spec_fields.finish()
    doc.finish()
    return spec, pod_labels, doc, port_names


def _strategy(spec_fields: Fields, global_mode: bool) -> UpdatePolicy:
    """Kubernetes' rolling update as bounds. With a surge, new replicas start before old ones
    stop (start-first); without, old ones stop first. Recreate stops all, then starts all."""
    key = "updateStrategy" if global_mode else "strategy"
    other = "strategy" if global_mode else "updateStrategy"
    spec_fields.refuse(other, f"a {'DaemonSet' if global_mode else 'Deployment'} takes {key}")
    table = spec_fields.mapping(key) or Fields(spec_fields.at(key), {}, spec_fields.warnings)
    min_ready = spec_fields.integer("minReadySeconds", -1, minimum=-1, maximum=3600)
    monitor = float(min_ready) if min_ready >= 0 else UpdatePolicy().monitor
    kind = table.text("type", "RollingUpdate", choices=("RollingUpdate", "Recreate", "OnDelete"))
    if kind == "OnDelete":
        raise FieldError(table.at("type"), "OnDelete is not supported: picoord rolls every change out")
    if kind == "Recreate":
        table.refuse("rollingUpdate", "Recreate takes no rollingUpdate")
        table.finish()
        return validate_update_policy(
            UpdatePolicy(parallelism=0, max_surge=0, max_unavailable="100%", monitor=monitor), table.path
        )
    rolling = table.mapping("rollingUpdate") or Fields(table.at("rollingUpdate"), {}, table.warnings)
    # Kubernetes' defaults: 25%/25% for a Deployment, 0/1 for a DaemonSet.
    surge = rolling.get("maxSurge", 0 if global_mode else _K8S_ROLLING_DEFAULT)
    unavailable = rolling.get("maxUnavailable", 1 if global_mode else _K8S_ROLLING_DEFAULT)
    rolling.finish()
    table.finish()
    policy = validate_update_policy(
        UpdatePolicy(max_surge=surge, max_unavailable=unavailable, monitor=monitor),
        rolling.path,
        {"max_surge": "maxSurge", "max_unavailable": "maxUnavailable"},
    )
    if policy.bounds(100)[0] > 0:
        policy = replace(policy, order=START_FIRST)
    return policy


def _pod(
    pod: Fields,
    name: str,
    origin: str,
    replicas: int,
    global_mode: bool,
    update: UpdatePolicy,
    labels: dict[str, str],
) -> tuple[s.ServiceSpec, dict[str, int]]:
    pod.apply_table(POD_KEYS)
    restart = pod.text("restartPolicy", "Always", choices=("Always", "OnFailure", "Never"))
    if restart != "Always":
        raise FieldError(pod.at("restartPolicy"), f"{restart!r}: a Deployment's pods restart Always")
    containers = pod.items("containers")
    if len(containers) != 1:
        raise FieldError(
            pod.at("containers"),
            f"has {len(containers)} containers; picoord runs exactly one container per replica",
        )
    volumes = _pod_volumes(pod)
    container = mapping(f"{pod.at('containers')}[0]", containers[0], pod.warnings)
    container.apply_table(CONTAINER_KEYS)
    container.text("name", name)
    ports, port_names = _container_ports(container)
    health = _health(container, port_names)
    selector = pod.mapping("nodeSelector")
    pairs = selector.data.items() if selector else ()
    constraints = tuple(from_node_selector(selector.at(key), key, value) for key, value in pairs if selector)
    grace = pod.integer("terminationGracePeriodSeconds", 30, maximum=3600)
    env, secrets = _env(container)
    spec = s.ServiceSpec(
        name=name,
        image=image_reference(container.at("image"), container.get("image", required=True)),
        mode=s.GLOBAL if global_mode else s.REPLICATED,
        replicas=replicas,
        command=argv(container.at("command"), container.get("command")) if container.has("command") else None,
        args=argv(container.at("args"), container.get("args")) if container.has("args") else None,
        ports=ports,
        env=env,
        secrets=secrets,
        volumes=_mounts(container, volumes),
        resources=_resources(container.mapping("resources")),
        placement=s.Placement(constraints=constraints),
        health=health,
        update=update,
        labels=tuple(sorted(labels.items())),
        user=_security(container),
        working_dir=s.working_dir(container.at("workingDir"), container.text("workingDir", "")),
        stop_grace_period=float(grace),
        origin=origin,
    )
    container.finish()
    pod.finish()
    return spec, port_names


def _container_ports(container: Fields) -> tuple[tuple[s.PortMapping, ...], dict[str, int]]:
    result, names = [], {}
    for index, raw in enumerate(container.items("ports")):
        item = mapping(f"{container.at('ports')}[{index}]", raw, container.warnings)
        target = port(item.at("containerPort"), item.get("containerPort", required=True))
        published = port(item.at("hostPort"), item.get("hostPort")) if item.has("hostPort") else 0
        protocol = item.text("protocol", "TCP", choices=("TCP", "UDP")).lower()
        item.refuse("hostIP", "binding a host address is not supported")
        if item.has("name"):
            names[item.text("name")] = target
        result.append(s.PortMapping(target, published, protocol))
        item.finish()
    return tuple(result), names


def _env(container: Fields) -> tuple[tuple[s.EnvVar, ...], tuple[s.SecretEnv, ...]]:
    env, secrets = [], []
    for index, raw in enumerate(container.items("env")):
        item = mapping(f"{container.at('env')}[{index}]", raw, container.warnings)
        name = env_name(item.at("name"), item.get("name", required=True))
        source = item.mapping("valueFrom")
        if source is None:
            value = item.get("value", "")
            if not isinstance(value, str):
                raise FieldError(item.at("value"), f"{value!r} is not a string (quote it)")
            env.append(s.EnvVar(name, value, field=item.path))
        else:
            item.refuse("value", "give value or valueFrom, not both")
            ref = source.mapping("secretKeyRef")
            for other in ("configMapKeyRef", "fieldRef", "resourceFieldRef"):
                source.refuse(other, f"{other} is not supported; only secretKeyRef")
            if ref is None:
                raise FieldError(source.path, "needs secretKeyRef")
            secrets.append(
                s.SecretEnv(
                    env=name,
                    secret=volume_name(ref.at("name"), ref.text("name")),
                    key=volume_name(ref.at("key"), ref.text("key")),
                    field=ref.path,
                )
            )
            if ref.boolean("optional", False):
                raise FieldError(
                    ref.at("optional"), "optional secrets are not supported: the secret must exist"
                )
            ref.finish()
            source.finish()
        item.finish()
    return tuple(env), tuple(secrets)


def _pod_volumes(pod: Fields) -> dict[str, tuple[str, str, str]]:
    """Pod volumes by name -> (type, source, field)."""
    result = {}
    for index, raw in enumerate(pod.items("volumes")):
        item = mapping(f"{pod.at('volumes')}[{index}]", raw, pod.warnings)
        name = volume_name(item.at("name"), item.text("name"))
        kinds = [key for key in item.data if key != "name"]
        for key in kinds:
            if key not in _VOLUME_SOURCES:
                raise FieldError(
                    item.at(key),
                    "is not a volume source picoord supports (hostPath, emptyDir, persistentVolumeClaim)",
                )
        if len(kinds) != 1:
            raise FieldError(item.path, "give exactly one volume source")
        kind = kinds[0]
        source = item.mapping(kind) or mapping(item.at(kind), {}, pod.warnings)
        if kind == "hostPath":
            path = s.host_path(source.at("path"), source.text("path"))
            source.warn("type", "the host path must exist; picoord does not create it")
            result[name] = (s.BIND, path, item.path)
        elif kind == "emptyDir":
            source.warn("medium", "emptyDir is a tmpfs in picoord (it counts against memory)")
            source.warn("sizeLimit", "tmpfs sizes are not applied")
            pod.warnings.append(
                SpecWarning(item.at(kind), "an emptyDir is a tmpfs in picoord: it counts as memory")
            )
            result[name] = (s.TMPFS, "", item.path)
        elif kind == "persistentVolumeClaim":
            claim = volume_name(source.at("claimName"), source.text("claimName"))
            source.warn("readOnly", "use volumeMounts[].readOnly")
            pod.warnings.append(
                SpecWarning(
                    item.at(kind), f"claim {claim!r} is a named volume, local to each node running a replica"
                )
            )
            result[name] = (s.VOLUME, claim, item.path)
        else:
            raise FieldError(
                item.at(kind), f"{kind} volumes are not supported (hostPath, emptyDir, persistentVolumeClaim)"
            )
        source.finish()
        item.finish()
    return result


def _mounts(container: Fields, volumes: dict[str, tuple[str, str, str]]) -> tuple[s.VolumeMount, ...]:
    result = []
    for index, raw in enumerate(container.items("volumeMounts")):
        item = mapping(f"{container.at('volumeMounts')}[{index}]", raw, container.warnings)
        name = item.text("name")
        if name not in volumes:
            raise FieldError(item.at("name"), f"{name!r} is not a volume of the pod")
        kind, source, _ = volumes[name]
        item.refuse("subPath", "volume subpaths are not supported")
        item.refuse("subPathExpr", "volume subpaths are not supported")
        item.warn("mountPropagation", "mount propagation is not set")
        item.refuse("recursiveReadOnly", "not supported")
        target = absolute_path(item.at("mountPath"), item.text("mountPath"))
        result.append(s.VolumeMount(kind, target, source, item.boolean("readOnly", False)))
        item.finish()
    return tuple(result)


def _resources(table: Fields | None) -> s.Resources:
    if table is None:
        return s.Resources()
    values: dict[str, int] = {}
    gpus = 0
    for part, suffix in (("requests", "request"), ("limits", "limit")):
        section = table.mapping(part)
        if section is None:
            continue
        if section.has("memory"):
            values[f"memory_{suffix}"] = memory_bytes(section.at("memory"), section.get("memory"), KUBERNETES)
        if section.has("cpu"):
            values[f"cpu_{suffix}"] = cpu_millicores(section.at("cpu"), section.get("cpu"))
        for gpu in GPU_RESOURCES:
            if section.has(gpu):
                gpus = max(gpus, section.integer(gpu, 0, maximum=64))
        section.warn("ephemeral-storage", "disk use is not limited")
        section.used.update({"memory", "cpu"})
        section.finish()
    table.refuse("claims", "dynamic resource claims are not supported")
    table.finish()
    # Kubernetes: a limit without a request is also the request.
    for kind in ("memory", "cpu"):
        if f"{kind}_limit" in values and f"{kind}_request" not in values:
            values[f"{kind}_request"] = values[f"{kind}_limit"]
    devices = (s.DeviceRequest(count=gpus),) if gpus else ()
    return s.Resources(devices=devices, **values)


def _probe(path: str, raw: Any, warnings: list[SpecWarning], port_names: dict[str, int]) -> s.HealthCheck:
    probe = mapping(path, raw, warnings)
    kinds = [key for key in ("httpGet", "tcpSocket", "exec", "grpc") if probe.has(key)]
    if len(kinds) != 1:
        raise FieldError(path, "give exactly one of httpGet, tcpSocket, exec")
    kind = kinds[0]
    probe.refuse("grpc", "gRPC probes are not supported; use exec, httpGet or tcpSocket")
    target_port, http_path, command = 0, "/", ()
    if kind == "exec":
        action = probe.mapping("exec")
        assert action is not None
        command = argv(action.at("command"), action.get("command", required=True))
        action.finish()
        check_kind = s.EXEC
    else:
        action = probe.mapping(kind)
        assert action is not None
        target_port = _named_port(action.at("port"), action.get("port", required=True), port_names)
        action.refuse("host", "probes go to the replica itself")
        if kind == "httpGet":
            http_path = s.http_path(action.at("path"), action.text("path", "/"))
            action.text("scheme", "HTTP", choices=("HTTP",))
            action.warn("httpHeaders", "probe headers are not sent")
            check_kind = s.HTTP
        else:
            check_kind = s.TCP
        action.finish()
    success = probe.integer("successThreshold", 1, minimum=1)
    if success != 1:
        warnings.append(SpecWarning(probe.at("successThreshold"), "one success counts as healthy"))
    probe.warn("terminationGracePeriodSeconds", "the pod's grace period is used")
    check = s.HealthCheck(
        kind=check_kind,
        port=target_port,
        path=http_path,
        command=command,
        interval=float(probe.integer("periodSeconds", 10, minimum=1)),
        timeout=float(probe.integer("timeoutSeconds", 1, minimum=1)),
        retries=probe.integer("failureThreshold", 3, minimum=1, maximum=100),
        start_period=float(probe.integer("initialDelaySeconds", 0)),
        field=f"{path}.{kind}",
    )
    probe.finish()
    return check


def _named_port(path: str, value: Any, port_names: dict[str, int]) -> int:
    if isinstance(value, str) and not value.isdigit():
        if value not in port_names:
            raise FieldError(path, f"{value!r} names no port of the container")
        return port_names[value]
    return port(path, int(value) if isinstance(value, str) else value)


def _health(container: Fields, port_names: dict[str, int]) -> s.HealthCheck | None:
    """readinessProbe gates rollouts; a livenessProbe alone is used as the check; both: the
    readiness one, with a warning when they differ (picoord runs one check)."""
    checks = {}
    for key in ("readinessProbe", "livenessProbe"):
        raw = container.get(key)
        if raw is not None:
            checks[key] = _probe(container.at(key), raw, container.warnings, port_names)
    container.warn("startupProbe", "not used; initialDelaySeconds of the readinessProbe gives a start period")
    if (
        "readinessProbe" in checks
        and "livenessProbe" in checks
        and checks["readinessProbe"] != checks["livenessProbe"]
    ):
        container.warnings.append(
            SpecWarning(container.at("livenessProbe"), "picoord runs one check: the readinessProbe is used")
        )
    return checks.get("readinessProbe") or checks.get("livenessProbe")


def _security(container: Fields) -> str:
    table = container.mapping("securityContext")
    if table is None:
        return ""
    table.refuse("privileged", _PRIVILEGE, unless=False)
    table.refuse("capabilities", _PRIVILEGE)
    table.refuse("allowPrivilegeEscalation", _PRIVILEGE, unless=True)
    table.refuse("readOnlyRootFilesystem", "a read-only root file system is not supported yet", unless=False)
    table.refuse("runAsNonRoot", "not enforced; give runAsUser", unless=False)
    for key in ("seLinuxOptions", "seccompProfile", "appArmorProfile", "procMount", "windowsOptions"):
        table.refuse(key, _PRIVILEGE)
    user = table.integer("runAsUser", -1, minimum=-1)
    group = table.integer("runAsGroup", -1, minimum=-1)
    table.finish()
    if user < 0:
        if group >= 0:
            raise FieldError(table.at("runAsGroup"), "give runAsUser too")
        return ""
    return f"{user}:{group}" if group >= 0 else str(user)


def _service_document(raw: dict[str, Any], warnings: list[SpecWarning]) -> tuple[Fields, dict[str, Any]]:
    doc, name, meta = _header(raw, warnings)
    meta.warn("labels", "a Service's own labels are not used")
    meta.finish()
    spec_fields = doc.mapping("spec")
    if spec_fields is None:
        raise FieldError(doc.at("spec"), "is required")
    spec_fields.apply_table(SERVICE_SPEC_KEYS)
    kind = spec_fields.text(
        "type", "ClusterIP", choices=("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
    )
    if kind == "ExternalName":
        raise FieldError(spec_fields.at("type"), "ExternalName services are not supported")
    address = ""
    if spec_fields.has("loadBalancerIP"):
        if kind != "LoadBalancer":
            raise FieldError(spec_fields.at("loadBalancerIP"), "only a LoadBalancer Service has one")
        address = ip_address(spec_fields.at("loadBalancerIP"), spec_fields.text("loadBalancerIP"))
    elif kind == "LoadBalancer":
        warnings.append(SpecWarning(spec_fields.at("type"), _LOAD_BALANCER))
    selector = _string_map(spec_fields.mapping("selector"))
    ports = []
    for index, item_raw in enumerate(spec_fields.items("ports")):
        item = mapping(f"{spec_fields.at('ports')}[{index}]", item_raw, warnings)
        service_port = port(item.at("port"), item.get("port", required=True))
        target = item.get("targetPort", service_port)
        node_port = port(item.at("nodePort"), item.get("nodePort")) if item.has("nodePort") else 0
        if node_port and kind == "ClusterIP":
            raise FieldError(item.at("nodePort"), "a ClusterIP Service has no nodePort")
        protocol = item.text("protocol", "TCP", choices=("TCP", "UDP")).lower()
        item.warn("name", "port names are not used")
        item.warn("appProtocol", "not used")
        ports.append((item.path, service_port, target, node_port, protocol))
        item.finish()
    spec_fields.finish()
    doc.finish()
    service = {"name": name, "type": kind, "selector": selector, "ports": ports, "address": address}
    return doc, {**service, "address_field": spec_fields.at("loadBalancerIP")}


def _expose(spec: s.ServiceSpec, service: dict[str, Any], port_names: dict[str, int]) -> s.ServiceSpec:
    """Apply a Kubernetes Service to the spec it selects: an alias, and its ports.

    ClusterIP: reachable by name only; the port must equal the targetPort, as there is no
    virtual IP to translate it. NodePort: published on the nodePort (or the port).
    LoadBalancer: published on the port, on the nodes that run a replica."""
    ports = list(spec.ports)
    for path, service_port, target, node_port, protocol in service["ports"]:
        target_port = _named_port(f"{path}.targetPort", target, port_names)
        if service["type"] == "ClusterIP":
            published = 0
            if service_port != target_port:
                raise FieldError(
                    f"{path}.port",
                    f"port {service_port} differs from targetPort {target_port}: with no virtual IP "
                    "clients connect to the targetPort; make them equal",
                )
        elif service["type"] == "NodePort":
            published = node_port or service_port
        else:
            published = service_port
        existing = [i for i, p in enumerate(ports) if p.target == target_port and p.protocol == protocol]
        if existing:
            current = ports[existing[0]]
            if current.published and published and current.published != published:
                raise FieldError(path, f"publishes container port {target_port} a second time")
            ports[existing[0]] = replace(current, published=published or current.published)
        else:
            ports.append(s.PortMapping(target_port, published, protocol))
    aliases = spec.aliases if service["name"] == spec.name else (*spec.aliases, service["name"])
    address, address_field = spec.address, spec.address_field
    if service["address"]:
        if address and address != service["address"]:
            raise FieldError(
                service["address_field"], f"{spec.name} already has the virtual address {address}"
            )
        address, address_field = service["address"], service["address_field"]
    return replace(spec, ports=tuple(ports), aliases=aliases, address=address, address_field=address_field)
