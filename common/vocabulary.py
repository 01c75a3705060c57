"""The words of picoord's workload and certificate enums: one definition each, for the wire,
the agent, the coordinator, `coordctl` and the Prometheus labels alike.

Each enum member is the word a user sees (its value, so a member compares equal to its
word and is stored as it in JSON) and its number in the proto enum (`wire`). Nothing else
spells these words or maps these numbers: the proto comment points here, and
tests/unit/test_enum_names.py checks that every proto value has exactly one member.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from picoord.v1 import admin_pb2, services_pb2, workloads_pb2


class WireWord(StrEnum):
    """Base of the enums below: a member is (the word users see, its number on the wire)."""

    wire: int

    def __new__(cls, word: str, wire: int) -> Self:
        member = str.__new__(cls, word)
        member._value_ = word
        member.wire = wire
        return member

    @classmethod
    def from_wire(cls, number: int) -> Self:
        """The member sent as `number`. A number this build does not know (a newer peer's)
        reads as the unspecified member (0), as proto3 reads an unknown enum value."""
        unspecified = None
        for member in cls:
            if member.wire == number:
                return member
            if member.wire == 0:
                unspecified = member
        if unspecified is None:
            raise ValueError(f"{cls.__name__} has no member for wire value 0")
        return unspecified

    @classmethod
    def from_word(cls, word: str) -> Self:
        """The member whose word this is; another word reads as the unspecified member."""
        try:
            return cls(word)
        except ValueError:
            return cls.from_wire(0)


class RolloutStatus(WireWord):
    """Where a service's rollout is. The stored rollout holds PROGRESSING, PAUSED, COMPLETE
    or FAILED; ROLLING_BACK and ROLLED_BACK are those with its rolling_back flag; FAILING
    is a service whose replicas keep failing to start and wait in a retry backoff."""

    NOT_ROLLED_OUT = ("not rolled out", services_pb2.ROLLOUT_STATUS_UNSPECIFIED)
    PROGRESSING = ("progressing", services_pb2.ROLLOUT_STATUS_PROGRESSING)
    ROLLING_BACK = ("rolling back", services_pb2.ROLLOUT_STATUS_ROLLING_BACK)
    PAUSED = ("paused", services_pb2.ROLLOUT_STATUS_PAUSED)
    COMPLETE = ("complete", services_pb2.ROLLOUT_STATUS_COMPLETE)
    ROLLED_BACK = ("rolled back", services_pb2.ROLLOUT_STATUS_ROLLED_BACK)
    FAILED = ("failed", services_pb2.ROLLOUT_STATUS_FAILED)
    FAILING = ("failing", services_pb2.ROLLOUT_STATUS_FAILING)

    @property
    def under_way(self) -> bool:
        """Still moving by itself: a follower keeps waiting; any other status is where it ended."""
        return self in (RolloutStatus.PROGRESSING, RolloutStatus.ROLLING_BACK, RolloutStatus.FAILING)


class ReplicaState(WireWord):
    """What a replica is doing (see workloads.proto). The agent's words are Docker's
    container states plus its own pending, pulling and failed; STARTING and STOPPED are
    the coordinator's classification for its rollouts (controller/observed.py); BACKOFF is
    the row `coordctl ps` shows for a slot waiting out its start backoff (controller/backoff.py)."""

    UNKNOWN = ("unknown", workloads_pb2.REPLICA_STATE_UNSPECIFIED)
    PENDING = ("pending", workloads_pb2.REPLICA_STATE_PENDING)
    PULLING = ("pulling", workloads_pb2.REPLICA_STATE_PULLING)
    CREATED = ("created", workloads_pb2.REPLICA_STATE_CREATED)
    RUNNING = ("running", workloads_pb2.REPLICA_STATE_RUNNING)
    RESTARTING = ("restarting", workloads_pb2.REPLICA_STATE_RESTARTING)
    EXITED = ("exited", workloads_pb2.REPLICA_STATE_EXITED)
    DEAD = ("dead", workloads_pb2.REPLICA_STATE_DEAD)
    FAILED = ("failed", workloads_pb2.REPLICA_STATE_FAILED)
    REMOVING = ("removing", workloads_pb2.REPLICA_STATE_REMOVING)
    PAUSED = ("paused", workloads_pb2.REPLICA_STATE_PAUSED)
    STARTING = ("starting", workloads_pb2.REPLICA_STATE_STARTING)
    STOPPED = ("stopped", workloads_pb2.REPLICA_STATE_STOPPED)
    BACKOFF = ("backoff", workloads_pb2.REPLICA_STATE_BACKOFF)  # a slot waiting out its start backoff


class ReplicaHealth(WireWord):
    """A replica's health check result. UNKNOWN: nothing reported yet."""

    UNKNOWN = ("-", workloads_pb2.REPLICA_HEALTH_UNSPECIFIED)
    STARTING = ("starting", workloads_pb2.REPLICA_HEALTH_STARTING)
    HEALTHY = ("healthy", workloads_pb2.REPLICA_HEALTH_HEALTHY)
    UNHEALTHY = ("unhealthy", workloads_pb2.REPLICA_HEALTH_UNHEALTHY)
    NONE = ("no check", workloads_pb2.REPLICA_HEALTH_NONE)  # the replica has no health check


class CertificateState(WireWord):
    """A certificate's state; NONE: the node has no certificate on record."""

    NONE = ("none", admin_pb2.CERTIFICATE_STATE_UNSPECIFIED)
    VALID = ("valid", admin_pb2.CERTIFICATE_STATE_VALID)
    EXPIRED = ("expired", admin_pb2.CERTIFICATE_STATE_EXPIRED)
    REVOKED = ("revoked", admin_pb2.CERTIFICATE_STATE_REVOKED)
