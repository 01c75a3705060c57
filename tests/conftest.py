"""Shared fixtures: labs of namespaced "Pis" that are always torn down, whatever happens.

Tests that need root fail (never skip) when not root, with the reason, so a run without
privileges cannot look green.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from picoord.lab import netns
from picoord.lab.cluster import Lab
from picoord.lab.images import BUSYBOX, lab_images
from picoord.lab.netns import LabError, LabNetwork
from picoord.lab.registry import Registry, dockerd_registry_args
from picoord.lab.sandbox import PiRack


def require_root_or_fail() -> None:
    """Fail the test loudly (not skip) when the lab cannot run here; and make a SIGTERM (a CI
    timeout) unwind like Ctrl-C, so fixture teardown still removes namespaces and processes."""
    try:
        netns.require_root()
    except netns.LabNeedsRoot as error:
        pytest.fail(str(error), pytrace=False)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}: tearing the lab down")


def _down_all(labs: list[Lab]) -> None:
    problems = []
    for lab in reversed(labs):
        try:
            lab.down()
        except Exception as error:
            problems.append(f"lab {lab.lab_id}: {error}")
    if problems:
        pytest.fail("lab teardown failed: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def root() -> None:
    """For tests that need root but no lab fixture: fail with the reason when not root."""
    require_root_or_fail()


@pytest.fixture
def lab_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Lab]]:
    """`make(nodes=None, **Lab kwargs) -> Lab`: a Lab in a fresh tmp work dir, brought up when
    `nodes` is given. Every lab made is downed at teardown, also when the test failed."""
    require_root_or_fail()
    labs: list[Lab] = []

    def make(nodes: int | None = None, **kwargs: Any) -> Lab:
        kwargs.setdefault("work_dir", tmp_path_factory.mktemp("lab"))
        lab = Lab(**kwargs)
        labs.append(lab)
        if nodes is not None:
            lab.up(nodes)
        return lab

    try:
        yield make
    finally:
        _down_all(labs)


def _module_lab(
    tmp_path_factory: pytest.TempPathFactory, nodes: int, name: str = "", **kwargs: Any
) -> Iterator[Lab]:
    """A lab brought up for one test module (`yield from` it in a module-scoped fixture),
    always downed after, a teardown failure failing the module."""
    require_root_or_fail()
    lab = Lab(tmp_path_factory.mktemp(name or f"lab{nodes}"), **kwargs)
    try:
        lab.up(nodes)
        yield lab
    finally:
        _down_all([lab])


@pytest.fixture(scope="module")
def lab1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One Pi, up and Ready, shared by the tests of one module; tests undo what they add."""
    yield from _module_lab(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three Pis, up and Ready, shared by the tests of one module: only for tests that read."""
    yield from _module_lab(tmp_path_factory, 3)


def _new_network(made: list[LabNetwork], nodes: int, subnet: str | None, lab_id: str | None) -> LabNetwork:
    with netns.host_lock():
        chosen = subnet or netns.choose_subnet()
        if subnet:
            netns.check_subnet_free(subnet)
        net = netns.plan_network(lab_id or netns.new_lab_id(), chosen, nodes)
        made.append(net)
        netns.create_network(net)
    return net


def _teardown_networks(made: list[LabNetwork], problems: list[str]) -> None:
    for net in reversed(made):
        try:
            netns.teardown_network(net)
        except LabError as error:
            problems.append(str(error))


@pytest.fixture
def network_factory() -> Iterator[Callable[..., LabNetwork]]:
    """`make(nodes, subnet=None, lab_id=None) -> LabNetwork`: namespaces and bridge only, no
    processes; for tests of the network itself or of programs that bring their own daemons."""
    require_root_or_fail()
    made: list[LabNetwork] = []

    def make(nodes: int, subnet: str | None = None, lab_id: str | None = None) -> LabNetwork:
        return _new_network(made, nodes, subnet, lab_id)

    try:
        yield make
    finally:
        problems: list[str] = []
        _teardown_networks(made, problems)
        if problems:
            pytest.fail("network teardown failed: " + "; ".join(problems), pytrace=False)


def _rack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PiRack]]:
    require_root_or_fail()
    networks: list[LabNetwork] = []
    racks: list[PiRack] = []

    def make(
        nodes: int,
        services: Sequence[str] = (),
        subnet: str | None = None,
        service_args: Callable[[LabNetwork], dict[str, Sequence[str]]] | None = None,
    ) -> PiRack:
        net = _new_network(networks, nodes, subnet, None)
        args = service_args(net) if service_args else None
        rack = PiRack(net, Path(tmp_path_factory.mktemp(f"rack{net.lab_id}")), services, service_args=args)
        racks.append(rack)
        return rack.up()

    try:
        yield make
    finally:
        problems: list[str] = []
        for rack in reversed(racks):
            try:
                rack.down()
            except LabError as error:
                problems.append(f"rack {rack.network.lab_id}: {error}")
        _teardown_networks(networks, problems)
        if problems:
            pytest.fail("sandbox teardown failed: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def sandbox_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PiRack]]:
    """`make(nodes, services=(), subnet=None, service_args=None) -> PiRack`: a fresh lab network
    whose Pis each have a PiSandbox (own /etc/ufw, /etc/fstab, docker and gluster state, /mnt, /srv) and the
    given services ("dockerd", "glusterd") running (`service_args(network)` may add daemon
    flags, e.g. dockerd's registry flags); no coordinator, no agents. Services
    stopped, sandboxes destroyed and network removed at teardown, also when the test failed.
    `rack.sandbox("pi1")`, `rack.address("pi1")`, `rack.daemon("pi1", "dockerd")`."""
    yield from _rack_factory(tmp_path_factory)


@pytest.fixture(scope="module")
def module_sandbox_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PiRack]]:
    """sandbox_factory shared by the tests of one module (dockerd and glusterd take seconds
    to start): for tests that only read, or that undo what they change."""
    yield from _rack_factory(tmp_path_factory)


@pytest.fixture(scope="module")
def registry_rack(
    module_sandbox_factory: Callable[..., PiRack], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PiRack, Registry]]:
    """One Pi with its own dockerd, pulling from Debian's docker-registry on the lab bridge,
    filled with the lab's stand-in images (mcp:1-3, postgres). Stopped at teardown."""
    port = free_loopback_port()
    rack: PiRack = module_sandbox_factory(
        1,
        services=("dockerd",),
        service_args=lambda net: {"dockerd": dockerd_registry_args(f"{net.gateway}:{port}")},
    )
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root / "data", f"{rack.network.gateway}:{port}", root / "registry.log").start()
    try:
        for image in lab_images(BUSYBOX.read_bytes(), "amd64"):
            registry.push(image)
        yield rack, registry
    finally:
        registry.stop()


def free_loopback_port() -> int:
    """A port nothing listens on now (the registry binds it on the lab bridge address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
