"""Stacks: a named group of services applied from one file (Swarm's stack, a Kubernetes
namespace). Pure decisions only: what re-applying a stack adds, changes and drops, and in
which order a stack's services roll.

Names: a service keeps the short name of its file (`postgres`, `mcp-server`) and the stack
is recorded beside it, so the names a file uses to reach its services (DATABASE_URL names
`postgres`) resolve as written and `coordctl rollout postgres` keeps working. Service names
are one namespace across stacks: a second stack may not take a name another stack (or a
file applied without --stack) already holds; it is refused at apply, naming the owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from picoord.common.validation import FieldError
from picoord.coordinator.workloads.spec import DependencyCycle, ServiceSpec, dependency_order, service_name


class StackError(ValueError):
    """A stack apply that cannot be right; nothing is recorded."""


ADDED = "added"
CHANGED = "changed"
UNCHANGED = "unchanged"
DROPPED = "dropped"  # in the stack, not in the file: kept unless --prune
PRUNED = "pruned"  # dropped, and --prune asked to remove it


@dataclass(frozen=True)
class Applied:
    """What the store holds for one service: the stack it belongs to ('' for none), its spec."""

    stack: str
    spec: ServiceSpec


@dataclass(frozen=True)
class StackChange:
    name: str
    change: str  # ADDED | CHANGED | UNCHANGED | DROPPED | PRUNED


class Listed(Protocol):
    """A service as listed (services_pb2.ServiceInfo): its name and its stack, if any."""

    @property
    def name(self) -> str: ...

    @property
    def stack(self) -> str: ...


def services_of(services: Iterable[Listed], name: str | None) -> list[str]:
    """The services `ps NAME` or `logs NAME` covers: the service NAME (its own name wins),
    else the stack NAME's services, else NAME for the coordinator to refuse; every service
    without NAME."""
    services = list(services)
    if name is None:
        return [service.name for service in services]
    if any(service.name == name for service in services):
        return [name]
    return [service.name for service in services if service.stack == name] or [name]


def stack_name(name: str) -> str:
    """A stack is named like a service (it names things on the wire and in the CLI)."""
    try:
        return service_name("stack", name)
    except FieldError as error:
        raise StackError(str(error)) from None


def plan_stack(
    existing: Mapping[str, Applied], specs: Sequence[ServiceSpec], stack: str, prune: bool
) -> list[StackChange]:
    """The file's services as added, changed or unchanged, then the stack's services the file
    no longer names (dropped, or pruned with --prune). StackError when a name of the file
    belongs to another stack, or its services depend on each other in a cycle."""
    for spec in specs:
        held = existing.get(spec.name)
        if held is not None and held.stack != stack:
            owner = f"stack {held.stack!r}" if held.stack else "a file applied without --stack"
            raise StackError(f"service {spec.name!r} already belongs to {owner}; names are one namespace")
    if stack:
        rollout_order({spec.name: dependencies(spec) for spec in specs})  # a cycle is refused at apply
    changes = []
    for spec in specs:
        held = existing.get(spec.name)
        change = ADDED if held is None else UNCHANGED if held.spec == spec else CHANGED
        changes.append(StackChange(spec.name, change))
    named = {spec.name for spec in specs}
    if stack:
        for name in sorted(existing):
            if existing[name].stack == stack and name not in named:
                changes.append(StackChange(name, PRUNED if prune else DROPPED))
    return changes


def dependencies(spec: ServiceSpec) -> tuple[str, ...]:
    """What a service waits for in a stack rollout: depends_on and the services it names."""
    return tuple(dict.fromkeys((*spec.depends_on, *spec.references)))


def rollout_order(depends: Mapping[str, Sequence[str]]) -> list[str]:
    """spec.dependency_order, with a cycle as a StackError (it is refused at apply)."""
    try:
        return dependency_order(depends)
    except DependencyCycle as error:
        raise StackError(str(error)) from None
