"""gRPC channel settings for talking to the coordinator, kept apart from enrollment so the
running agent does not import cryptography (about 10 MiB) just to dial out."""

from __future__ import annotations

from picoord.common.defaults import COORDINATOR_SERVER_NAME


def channel_options() -> list[tuple[str, object]]:
    return [
        # Trust comes from the pinned CA; the server is checked by its fixed name, not the address.
        ("grpc.ssl_target_name_override", COORDINATOR_SERVER_NAME),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
