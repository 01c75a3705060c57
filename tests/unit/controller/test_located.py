"""A refusal at rollout time names the applied document and the field, although the store
keeps specs without where they were written."""

import dataclasses

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.controller.controller import located
from picoord.coordinator.placement.constraints import Spread
from picoord.coordinator.placement.scheduler import check_spread
from picoord.coordinator.workloads.codec import spec_from_json, spec_to_json
from picoord.coordinator.workloads.spec import SecretEnv, ServiceSpec, check_secrets

APPLIED = ServiceSpec(
    name="mcp",
    image="mcp:1",
    replicas=4,
    secrets=(
        SecretEnv("DATABASE_URL", "mcp-secrets", "database-url", field="Service/mcp.secrets[0]"),
        SecretEnv("API_TOKEN", "nowhere", "token", field="Service/mcp.secrets[1]"),
    ),
    origin="Service/mcp",
)
STORED = spec_from_json(spec_to_json(APPLIED))  # what a rollout reads back: no origin, no field


@pytest.mark.parametrize(
    ("spec", "source", "where"),
    [
        (STORED, "mcp.yaml", "mcp.yaml: service/mcp"),
        (STORED, "", "service/mcp"),
        (APPLIED, "mcp.yaml", "Service/mcp"),  # already known: kept
    ],
)
def test_located_names_the_document(spec: ServiceSpec, source: str, where: str) -> None:
    assert located(spec, source).origin == where
    assert located(spec, source) == spec  # where it was written is not what runs


@pytest.mark.parametrize(
    ("known", "field"),
    [
        (set(), "mcp.yaml: service/mcp.secrets[0]"),
        ({("mcp-secrets", "database-url")}, "mcp.yaml: service/mcp.secrets[1]"),
    ],
)
def test_a_missing_secret_of_a_stored_spec_names_document_and_field(known: set, field: str) -> None:
    assert STORED.origin == "" and all(not ref.field for ref in STORED.secrets)
    with pytest.raises(FieldError) as error:
        check_secrets(located(STORED, "mcp.yaml"), known)
    assert error.value.field == field


def test_a_spread_refusal_of_a_stored_spec_names_document_and_field() -> None:
    spec = located(dataclasses.replace(STORED, replicas=4), "mcp.yaml")
    with pytest.raises(FieldError) as error:
        check_spread(f"{spec.origin}.placement", spec.replicas, Spread(1), 3)
    assert error.value.field == "mcp.yaml: service/mcp.placement"
