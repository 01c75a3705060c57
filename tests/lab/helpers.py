"""Raw gRPC clients for the lab tests: what a misbehaving or hostile peer would send."""

from __future__ import annotations

import grpc

from picoord.agent.channel import channel_options
from picoord.agent.state import AgentFiles
from picoord.lab.cluster import Lab
from picoord.v1 import agent_pb2, agent_pb2_grpc

CALL_TIMEOUT = 10.0


def node_credentials(lab: Lab, node: str) -> grpc.ChannelCredentials:
    """The credentials `picoord-agent run` would use on that Pi."""
    files = AgentFiles(lab.agent_state_dir(node))
    current = files.credentials()
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=current.key_pem,
        certificate_chain=current.certificate_pem,
    )


def enroll_address(lab: Lab) -> str:
    host, _, port = lab.coordinator_address.rpartition(":")
    return f"{host}:{int(port) + 1}"


def open_session(
    address: str, credentials: grpc.ChannelCredentials, messages: list[agent_pb2.AgentMessage]
) -> list[agent_pb2.CoordinatorMessage]:
    """Send `messages` on one Session stream and collect what comes back until it ends.

    Raises grpc.RpcError with the coordinator's status when it refuses the session."""
    with grpc.secure_channel(address, credentials, options=channel_options()) as channel:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session(iter(messages), timeout=CALL_TIMEOUT)
        return list(call)


def session_raw(address: str, credentials: grpc.ChannelCredentials, payloads: list[bytes]) -> list[bytes]:
    """A Session stream carrying arbitrary bytes: what a corrupted or hostile client sends."""
    with grpc.secure_channel(address, credentials, options=channel_options()) as channel:
        call = channel.stream_stream(
            "/picoord.v1.AgentSession/Session", request_serializer=None, response_deserializer=None
        )(iter(payloads), timeout=CALL_TIMEOUT)
        return list(call)


def hello(node: str) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_name=node, agent_version="test"))
