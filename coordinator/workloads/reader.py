"""One file given to `coordctl apply -f`, read into service specs (and cluster documents).

A file may hold picoord `kind: Service` documents, a Compose/stack file (top-level
`services:`), Kubernetes Deployment/DaemonSet + Service manifests, and the cluster.yaml
kinds (ClusterMembership, GlusterVolume, Mount, FirewallPolicy), which are handed back as
coordinator/apply/cluster_spec.py reads them, for the apply planner. Reading is all-or-nothing:
the first problem stops it with an error naming the file, document and field, so a
rejected file changes nothing and the running revision keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from picoord.common.validation import FieldError
from picoord.coordinator.apply import cluster_spec
from picoord.coordinator.workloads import networks
from picoord.coordinator.workloads import spec as s
from picoord.coordinator.workloads.fields import SpecWarning
from picoord.coordinator.workloads.importers import compose, kubernetes, native


class WorkloadError(ValueError):
    """The file cannot be read; the message names the file, document and field."""


@dataclass(frozen=True)
class Workloads:
    services: tuple[s.ServiceSpec, ...]
    warnings: tuple[SpecWarning, ...]
    cluster: tuple[cluster_spec.Document, ...] = ()  # for the apply planner, untouched
    source: str = ""
    namespace: str = ""  # the Kubernetes documents' metadata.namespace: their stack
    network_mode: str = networks.OVERLAY  # a Compose file's x-picoord.network_mode (networks.py)
    # a Compose file without x-picoord.address: a re-deploy keeps the stack's virtual address
    keeps_address: bool = False

    def warning_lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{warning}" for warning in self.warnings]


def _format(document: Any) -> str:
    if compose.is_compose(document):
        return "compose"
    if kubernetes.is_kubernetes(document):
        return "kubernetes"
    if isinstance(document, dict) and document.get("kind") == "Service":
        return "picoord"
    if isinstance(document, dict) and document.get("kind") in cluster_spec.READERS:
        return "cluster"
    return ""


def read_workloads(text: str | bytes, source: str = "") -> Workloads:
    """Every service of the file, checked across documents (unique names, depends_on)."""
    prefix = f"{source}: " if source else ""
    try:
        raw_documents = cluster_spec.load_documents(text)
    except cluster_spec.SpecError as error:
        raise WorkloadError(f"{prefix}{error}") from None
    warnings: list[SpecWarning] = []
    services: list[s.ServiceSpec] = []
    cluster: list[cluster_spec.Document] = []
    kubernetes_documents: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    modes: set[str] = set()
    keeps_address = False
    try:
        for index, raw in enumerate(raw_documents):
            if not isinstance(raw, dict):
                raise FieldError(
                    f"documents[{index}]",
                    f"must be a mapping (kind: ..., or services: ...), not {type(raw).__name__}",
                )
            kind = _format(raw)
            if kind == "compose":
                services.extend(compose.read_compose(raw, warnings))
                settings = compose.stack_settings(raw)
                modes.add(settings.network_mode)
                keeps_address = settings.address is None
            elif kind == "kubernetes":
                kubernetes_documents.append(raw)
            elif kind == "picoord":
                services.append(native.read_service(raw, warnings))
            elif kind == "cluster":
                cluster.append(cluster_spec.parse_document(index, raw, seen))
            else:
                found = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
                raise FieldError(
                    f"documents[{index}].kind",
                    f"{found!r} is not something picoord reads: a picoord Service, a Compose/stack file "
                    f"(services:), a Kubernetes Deployment, DaemonSet or Service, or one of "
                    f"{', '.join(cluster_spec.READERS)}",
                )
        namespace = _namespace(kubernetes_documents)
        if kubernetes_documents:
            services.extend(kubernetes.read_kubernetes(kubernetes_documents, warnings))
        services = _linked(services)
        for spec in services:
            warnings.extend(SpecWarning(where, why) for where, why in s.plaintext_secrets(spec))
    except (FieldError, cluster_spec.SpecError) as error:
        raise WorkloadError(f"{prefix}{error}") from None
    if len(modes) > 1:
        raise WorkloadError(f"{prefix}x-picoord.network_mode: one file is one stack; its documents differ")
    mode = next(iter(modes), networks.OVERLAY)
    return Workloads(tuple(services), tuple(warnings), tuple(cluster), source, namespace, mode, keeps_address)


def _namespace(documents: list[dict[str, Any]]) -> str:
    """The one metadata.namespace the Kubernetes documents give (a file is one stack)."""
    found: dict[str, int] = {}
    for index, document in enumerate(documents):
        metadata = document.get("metadata")
        value = metadata.get("namespace") if isinstance(metadata, dict) else None
        if value is None:
            continue
        if not isinstance(value, str):
            raise FieldError("metadata.namespace", f"must be a string, not {type(value).__name__}")
        found.setdefault(s.service_name("metadata.namespace", value), index)
    if len(found) > 1:
        raise FieldError("metadata.namespace", f"one file is one stack; it names {', '.join(sorted(found))}")
    return next(iter(found), "")


def _linked(services: list[s.ServiceSpec]) -> list[s.ServiceSpec]:
    """Names unique across the file; depends_on and references resolved within it."""
    taken: dict[str, str] = {}
    for spec in services:
        for name in (spec.name, *spec.aliases):
            if name in taken:
                raise FieldError(spec.origin, f"the name {name!r} is already taken by {taken[name]}")
            taken[name] = spec.origin
    s.check_references(services, {})
    owner = {name: spec.name for spec in services for name in (spec.name, *spec.aliases)}
    linked = []
    for spec in services:
        found = s.referenced_services(spec, [name for name in owner if owner[name] != spec.name])
        linked.append(replace(spec, references=tuple(sorted({owner.get(name, name) for name in found}))))
    return linked
