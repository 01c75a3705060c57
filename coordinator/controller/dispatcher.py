"""The dispatcher: the one owner of what each node was told to run (SwarmKit's dispatcher).

It sends a node its whole assignment (every replica it must run) when that set changed,
numbered by a generation that only grows, and remembers at which generation each replica
was left out, so that a stopped replica is forgotten only once its node reported an
assignment at or after that generation without it. A new session gets the whole
assignment again. Sending goes through `session.outbox.put` (the session bounds it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from picoord.coordinator.cluster import LiveSession
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.v1 import agent_pb2, workloads_pb2


class Dispatcher:
    def __init__(self) -> None:
        self._sent: dict[str, bytes] = {}  # node -> the replicas last sent, serialized
        self._removed_at: dict[str, int] = {}  # replica id -> generation of the assignment without it
        self._generation = 0
        self._generations: dict[str, int] = {}  # node -> generation of the assignment last sent
        self._reports: dict[str, workloads_pb2.ReplicaReports] = {}

    # what the agents say
    def reported(self, node: str, reports: workloads_pb2.ReplicaReports) -> bool:
        """Keep the node's latest report; whether it says anything new (an agent repeats an
        unchanged report every few seconds as a liveness signal: nothing to decide on)."""
        previous = self._reports.get(node)
        self._reports[node] = reports
        return previous is None or previous.SerializeToString(
            deterministic=True
        ) != reports.SerializeToString(deterministic=True)

    def reports(self) -> Mapping[str, workloads_pb2.ReplicaReports]:
        return self._reports

    def session_opened(self, node: str) -> None:
        """A new session gets the whole assignment again."""
        self._sent.pop(node, None)

    def confirmed_gone(self, records: Iterable[ReplicaRecord]) -> frozenset[str]:
        """Stopping replicas whose node reported, since the assignment without them, that
        it no longer runs them."""
        gone = set()
        for record in records:
            if not record.stopping:
                continue
            report = self._reports.get(record.node)
            removed_at = self._removed_at.get(record.id)
            if report is None or removed_at is None or report.generation < removed_at:
                continue
            if not any(item.replica == record.id for item in report.replicas):
                gone.add(record.id)
        return frozenset(gone)

    def sent_generation(self, node: str) -> int:
        """The generation of the assignment last sent to `node` (0: none this session)."""
        return self._generations.get(node, 0) if node in self._sent else 0

    def forgotten(self, replicas: Iterable[str]) -> None:
        for replica in replicas:
            self._removed_at.pop(replica, None)

    async def send(
        self,
        by_node: Mapping[str, list[workloads_pb2.ReplicaSpec]],
        sessions: Mapping[str, LiveSession],
        records: Iterable[ReplicaRecord],
        now: float,
        volumes: Mapping[str, list[str]] | None = None,
        networks: Mapping[str, list[workloads_pb2.OverlayNetwork]] | None = None,
        virtual: Mapping[str, list[workloads_pb2.VirtualAddress]] | None = None,
        service_ports: Mapping[str, workloads_pb2.ServicePorts] | None = None,
    ) -> int:
        """Send each connected node its assignment (its replicas, the named volumes to
        remove, for the Swarm manager the overlay networks to keep, the virtual addresses it
        announces, the published ports it answers) if it changed; return how many were sent."""
        on_node: dict[str, list[str]] = {}
        for record in records:
            on_node.setdefault(record.node, []).append(record.id)
        sent = 0
        for node, session in list(sessions.items()):
            replicas = by_node.get(node, [])
            remove = (volumes or {}).get(node, [])
            keep = (networks or {}).get(node, [])
            announce = (virtual or {}).get(node, [])
            ports = (service_ports or {}).get(node)
            unsent = workloads_pb2.NodeAssignment(
                replicas=replicas,
                remove_volumes=remove,
                networks=keep,
                virtual_addresses=announce,
                service_ports=ports,
            )
            data = unsent.SerializeToString(deterministic=True)
            if self._sent.get(node) == data:
                continue
            self._generation = max(self._generation + 1, int(now * 1000))
            assignment = workloads_pb2.NodeAssignment(
                generation=self._generation,
                replicas=replicas,
                remove_volumes=remove,
                networks=keep,
                virtual_addresses=announce,
                service_ports=ports,
            )
            await session.outbox.put(agent_pb2.CoordinatorMessage(assignment=assignment))
            self._sent[node] = data
            self._generations[node] = self._generation
            sent += 1
            named = {spec.replica for spec in replicas}
            for replica in named:  # sent again (it had waited, e.g. for its network): not removed
                self._removed_at.pop(replica, None)
            for replica in on_node.get(node, ()):
                if replica not in named and replica not in self._removed_at:
                    self._removed_at[replica] = self._generation
        return sent
