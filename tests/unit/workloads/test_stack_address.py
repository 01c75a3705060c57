"""A stack's LoadBalancer virtual address: `x-picoord: {address: ADDR}` in a Compose file,
or `coordctl stack deploy --address ADDR` (which writes it into the file's text)."""

import re

import pytest
import yaml

from picoord.common.validation import FieldError
from picoord.coordinator.workloads.importers.compose import with_stack_address
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads

STACK = {
    "services": {
        "postgres": {"image": "postgres:15", "expose": ["5432"]},
        "mcp-server": {"image": "mcp:1", "ports": ["8080:8080"]},
    }
}


def _read(extension: object = None) -> tuple[dict[str, str], bool]:
    document = dict(STACK)
    if extension is not None:
        document["x-picoord"] = extension
    workloads = read_workloads(yaml.safe_dump(document), "docker-stack.yml")
    return {spec.name: spec.address for spec in workloads.services}, workloads.keeps_address


@pytest.mark.parametrize(
    ("extension", "addresses", "keeps"),
    [
        # only the services that publish a port lead anywhere from the address
        ({"address": "10.213.0.200"}, {"postgres": "", "mcp-server": "10.213.0.200"}, False),
        # `none` gives it up; saying nothing keeps the stack's (a re-deploy without --address)
        ({"address": "none"}, {"postgres": "", "mcp-server": ""}, False),
        (None, {"postgres": "", "mcp-server": ""}, True),
        ({}, {"postgres": "", "mcp-server": ""}, True),
    ],
)
def test_the_stack_address_goes_to_its_publishing_services(
    extension: object, addresses: dict, keeps: bool
) -> None:
    assert _read(extension) == (addresses, keeps)


@pytest.mark.parametrize(
    ("extension", "error"),
    [
        ({"address": "10.213.0.300"}, "x-picoord.address: '10.213.0.300' is not an IP address"),
        ({"address": "10.0.0.1", "pool": "x"}, "x-picoord.pool: unknown field"),
        ("10.0.0.1", "x-picoord: must be a mapping"),
    ],
)
def test_bad_extensions_are_refused_naming_the_field(extension: object, error: str) -> None:
    with pytest.raises(WorkloadError, match=error):
        _read(extension)


def test_an_address_for_a_stack_that_publishes_nothing_is_refused() -> None:
    document = {"services": {"db": {"image": "postgres:15"}}, "x-picoord": {"address": "10.0.0.9"}}
    with pytest.raises(WorkloadError, match="no service of the file publishes a port"):
        read_workloads(yaml.safe_dump(document))


def test_deploy_address_is_written_into_the_file() -> None:
    text = with_stack_address(yaml.safe_dump(STACK), "10.213.0.201")
    addresses = {spec.name: spec.address for spec in read_workloads(text).services}
    assert addresses == {"postgres": "", "mcp-server": "10.213.0.201"}
    same = dict(STACK, **{"x-picoord": {"address": "10.213.0.201"}})
    assert yaml.safe_load(with_stack_address(yaml.safe_dump(same), "10.213.0.201")) == same


def test_deploy_address_that_contradicts_the_file_is_refused() -> None:
    other = dict(STACK, **{"x-picoord": {"address": "10.213.0.9"}})
    with pytest.raises(FieldError, match=re.escape("the file says 10.213.0.9, --address says 10.213.0.201")):
        with_stack_address(yaml.safe_dump(other), "10.213.0.201")


def test_deploy_address_is_for_compose_files_only() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    with pytest.raises(FieldError, match=r"spec\.loadBalancerIP"):
        with_stack_address(yaml.safe_dump(deployment), "10.0.0.5")


@pytest.mark.parametrize("mode", ["overlay", "published-ports"])
def test_one_x_picoord_holds_the_network_mode_and_the_address(mode: str) -> None:
    document = dict(STACK, **{"x-picoord": {"network_mode": mode, "address": "10.213.0.200"}})
    workloads = read_workloads(yaml.safe_dump(document), "docker-stack.yml")
    assert workloads.network_mode == mode
    assert {spec.name: spec.address for spec in workloads.services}["mcp-server"] == "10.213.0.200"


def test_an_unknown_x_picoord_setting_is_named() -> None:
    document = dict(STACK, **{"x-picoord": {"adress": "10.213.0.200"}})
    with pytest.raises(WorkloadError, match=r"x-picoord\.adress"):
        read_workloads(yaml.safe_dump(document), "docker-stack.yml")
