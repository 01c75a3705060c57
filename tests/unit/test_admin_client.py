"""coordctl's reads: the read replica first, the admin socket when the replica is absent
or stuck, and the caller's own deadline kept."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from picoord.coordinator.ctl.client import REPLICA_PATIENCE, _replica_first


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


@pytest.mark.parametrize(
    ("replica_fails", "timeout", "answered_by", "replica_timeout"),
    [
        (None, 10.0, "replica", REPLICA_PATIENCE),
        (None, None, "replica", REPLICA_PATIENCE),
        (None, 0.5, "replica", 0.5),  # a shorter deadline than the patience is the caller's
        (grpc.StatusCode.UNAVAILABLE, 10.0, "admin", REPLICA_PATIENCE),  # not running
        (grpc.StatusCode.UNIMPLEMENTED, 10.0, "admin", REPLICA_PATIENCE),  # not a replica
        (grpc.StatusCode.DEADLINE_EXCEEDED, 10.0, "admin", REPLICA_PATIENCE),  # stuck
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, "admin", REPLICA_PATIENCE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 0.5, grpc.StatusCode.DEADLINE_EXCEEDED, 0.5),  # the caller's
        (grpc.StatusCode.INVALID_ARGUMENT, 10.0, grpc.StatusCode.INVALID_ARGUMENT, REPLICA_PATIENCE),
    ],
)
def test_the_replica_is_asked_first_and_the_admin_socket_when_it_is_absent_or_stuck(
    replica_fails: grpc.StatusCode | None,
    timeout: float | None,
    answered_by: str | grpc.StatusCode,
    replica_timeout: float,
) -> None:
    asked: dict[str, Any] = {}

    def replica(request: str, **kwargs: Any) -> str:
        asked["replica"] = kwargs["timeout"]
        if replica_fails is not None:
            raise Failed(replica_fails)
        return "replica"

    def admin(request: str, **kwargs: Any) -> str:
        asked["admin"] = kwargs.get("timeout")
        return "admin"

    call = _replica_first(replica, admin)
    kwargs = {} if timeout is None else {"timeout": timeout}
    if isinstance(answered_by, grpc.StatusCode):
        with pytest.raises(Failed) as raised:
            call("request", **kwargs)
        assert raised.value.code() == answered_by and "admin" not in asked
    else:
        assert call("request", **kwargs) == answered_by
    assert asked["replica"] == replica_timeout
    if answered_by == "admin":
        # what is left of the caller's deadline, or none when it gave none
        assert (asked["admin"] is None) == (timeout is None)
        assert timeout is None or timeout - 1.0 < asked["admin"] <= timeout
