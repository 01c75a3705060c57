"""Table tests of the engine's pure parts: the create request it sends dockerd (checked
against docker-py's own ContainerConfig/HostConfig, which the engine replaced), the exec
output stream, and registry credentials from a docker config.json."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from docker.types import ContainerConfig, HostConfig

from picoord.agent.docker_api import demultiplex
from picoord.agent.runtime.engine import (
    RuntimeFailure,
    create_request,
    docker_config,
    image_registry,
    registry_auth,
    wire_host_config,
)
from picoord.agent.runtime.model import ContainerSpec, Port, VolumeMount, create_arguments, host_config

BASE = ContainerSpec(service="mcp", revision=2, replica="mcp.1", image="reg:5000/mcp:2")
API_VERSION = "1.41"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"env": {"DATABASE_URL": "postgresql://u:p@postgres:5432/db", "EMPTY": ""}},
        {"ports": (Port(8080, 18080), Port(9000), Port(53, 5353, "udp"))},
        {"volumes": (VolumeMount("/mnt/gv0", "/data", True), VolumeMount("pgdata", "/var/lib/pg"))},
        {"volumes": (VolumeMount("", "/tmp", tmpfs=True), VolumeMount("", "/run", True, tmpfs=True))},
        {"memory_limit": 128 << 20, "memory_reservation": 64 << 20, "cpu_limit_millis": 500},
        {"gpus": 2},
        {"restart": "on-failure", "restart_max_attempts": 3},
        {"restart": "unless-stopped"},
        {"hosts": {"postgres": "10.99.0.7", "cache": "10.99.0.8"}},
        {"command": ("/bin/httpd",), "args": ("-f", "-p", "8080")},
        {"args": ("serve",)},
    ],
)
def test_create_request_is_what_docker_py_sent(changes: dict[str, Any]) -> None:
    spec = ContainerSpec(**{**BASE.__dict__, **changes})
    arguments = create_arguments(spec)
    name = arguments.pop("name")
    config = ContainerConfig(  # what APIClient.create_container built from the same arguments
        API_VERSION,
        command=arguments.pop("command", None),
        host_config=HostConfig(API_VERSION, **host_config(spec)),
        **arguments,
    )
    sent_by_docker_py = {key: value for key, value in config.items() if value is not None}
    assert create_request(spec) == (name, sent_by_docker_py)


def test_a_host_config_key_the_engine_cannot_spell_is_an_error() -> None:
    with pytest.raises(RuntimeFailure, match="'shm_size'"):
        wire_host_config({**host_config(BASE), "shm_size": 1 << 20})


def _frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"", b""),
        (_frame(1, b"ok\n"), b"ok\n"),
        (_frame(1, b"out ") + _frame(2, b"err ") + _frame(1, b"out"), b"out err out"),
        (_frame(1, b""), b""),
        (_frame(1, b"whole") + _frame(2, b"truncated")[:-4], b"wholetrunc"),
        (_frame(1, b"x") + b"\x01\x00", b"x"),  # a header cut short: nothing more
    ],
)
def test_demultiplex(stream: bytes, expected: bytes) -> None:
    assert demultiplex(stream) == expected


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("mcp:1", "docker.io"),
        ("library/postgres:15-alpine", "docker.io"),
        ("ghcr.io/org/app:1", "ghcr.io"),
        ("10.99.0.1:5000/mcp:1", "10.99.0.1:5000"),
        ("registry.lab:5000/mcp", "registry.lab:5000"),
        ("localhost/app", "localhost"),
        ("user/app:latest", "docker.io"),
    ],
)
def test_image_registry(image: str, registry: str) -> None:
    assert image_registry(image) == registry


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("auths", "registry", "expected"),
    [
        ({}, "ghcr.io", None),
        (
            {"ghcr.io": {"auth": _basic("me", "pa:ss")}},
            "ghcr.io",
            {"username": "me", "password": "pa:ss", "serveraddress": "ghcr.io"},
        ),
        (
            {"https://registry.lab:5000/v2/": {"username": "u", "password": "p"}},
            "registry.lab:5000",
            {"username": "u", "password": "p", "serveraddress": "https://registry.lab:5000/v2/"},
        ),
        (
            {"https://index.docker.io/v1/": {"auth": _basic("hub", "pw")}},
            "docker.io",
            {"username": "hub", "password": "pw", "serveraddress": "https://index.docker.io/v1/"},
        ),
        (
            {"ghcr.io": {"identitytoken": "tok"}},
            "ghcr.io",
            {"identitytoken": "tok", "serveraddress": "ghcr.io"},
        ),
        ({"ghcr.io": {"auth": _basic("me", "pw")}}, "registry.lab:5000", None),
        ({"ghcr.io": {"auth": "not base64!"}}, "ghcr.io", None),
        ({"ghcr.io": {}}, "ghcr.io", None),  # `docker login` with a credential helper: not run
        ({"ghcr.io": "junk"}, "ghcr.io", None),
    ],
)
def test_registry_auth(auths: dict[str, Any], registry: str, expected: dict[str, str] | None) -> None:
    assert registry_auth({"auths": auths}, registry) == expected


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"auths": {}}'])
def test_docker_config_reads_docker_config_dir(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    expected = json.loads(content) if content and content.startswith("{") else {}
    assert docker_config({"DOCKER_CONFIG": str(tmp_path)}) == expected
